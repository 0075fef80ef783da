//! What the application decides and does with an update: accept or defer it, install the
//! verified images, test them, commit or roll back. [`SlotInstaller`] is the default: an A/B
//! slot per component in `STATE_DIR/slots/`.

use std::error::Error as StdError;
use std::fs::{self, File};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use fleet_proto::v1::UpdateManifest;

/// The application's answer to an offered update.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Download and install now.
    Accept,
    /// Not now: the offer is considered again later (next connection or retry interval).
    Defer,
    /// Never: reported upward as DECLINED.
    Decline(String),
}

/// One verified image, staged on disk, ready to install.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StagedImage {
    /// Component name.
    pub component: String,
    /// The staged file (its SHA-256 matched the signed manifest).
    pub path: PathBuf,
    /// Its size.
    pub size: u64,
}

/// Any error an application's own code returns, kept as the cause of a [`HandlerError`].
type BoxError = Box<dyn StdError + Send + Sync + 'static>;

/// Why a step of an [`UpdateHandler`] failed. The update is then reported upward as failed (or
/// rolled back) with this error and its causes as the reason.
///
/// Build one from a message ([`HandlerError::msg`], or `?`/`.into()` on a `String` or `&str`),
/// from any error ([`HandlerError::new`], or `?` on an [`io::Error`]), or from an error and
/// what was being done ([`HandlerError::context`]). The cause stays reachable through
/// [`std::error::Error::source`] and can be downcast.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum HandlerError {
    /// A failure described by a message only.
    #[error("{0}")]
    Message(String),
    /// An error of the application's own code.
    #[error(transparent)]
    Other(BoxError),
    /// An error of the application's own code, with what was being done.
    #[error("{context}")]
    Context {
        /// What was being done ("writing the boot flag").
        context: String,
        /// Why it failed.
        #[source]
        source: BoxError,
    },
    /// A file operation of the default [`SlotInstaller`] failed.
    #[error("{action} {}", path.display())]
    Io {
        /// What was being done to the file.
        action: &'static str,
        /// The file.
        path: PathBuf,
        /// Why it failed.
        #[source]
        source: io::Error,
    },
}

impl HandlerError {
    /// A failure described by `message`.
    pub fn msg(message: impl Into<String>) -> Self {
        Self::Message(message.into())
    }

    /// A failure caused by `error`, which is kept as it is.
    pub fn new(error: impl StdError + Send + Sync + 'static) -> Self {
        Self::Other(Box::new(error))
    }

    /// A failure caused by `error` while doing `context`.
    pub fn context(
        context: impl Into<String>,
        error: impl StdError + Send + Sync + 'static,
    ) -> Self {
        Self::Context {
            context: context.into(),
            source: Box::new(error),
        }
    }

    /// The error and all its causes on one line, `outer: inner: ...`: the reason reported
    /// upward.
    pub fn report(&self) -> String {
        let mut out = self.to_string();
        let mut next = self.source();
        while let Some(e) = next {
            out.push_str(": ");
            out.push_str(&e.to_string());
            next = e.source();
        }
        out
    }
}

impl From<String> for HandlerError {
    fn from(message: String) -> Self {
        Self::Message(message)
    }
}

impl From<&str> for HandlerError {
    fn from(message: &str) -> Self {
        Self::Message(message.to_owned())
    }
}

impl From<io::Error> for HandlerError {
    fn from(error: io::Error) -> Self {
        Self::new(error)
    }
}

/// The application's side of updates. Methods run on a blocking thread; an `Err` is the reason
/// reported upward (see [`HandlerError`]).
pub trait UpdateHandler: Send + Sync + 'static {
    /// Whether to install `manifest` now. The default accepts.
    fn offer(&self, manifest: &UpdateManifest) -> Decision {
        let _ = manifest;
        Decision::Accept
    }

    /// Installs the verified images (all or nothing), without activating them yet.
    fn install(
        &self,
        manifest: &UpdateManifest,
        images: &[StagedImage],
    ) -> Result<(), HandlerError>;

    /// Checks the installed update. The default passes.
    fn self_test(&self, manifest: &UpdateManifest) -> Result<(), HandlerError> {
        let _ = manifest;
        Ok(())
    }

    /// Makes the installed update the running one.
    fn commit(&self, manifest: &UpdateManifest) -> Result<(), HandlerError>;

    /// Abandons the installed update; the running firmware stays.
    fn rollback(&self, manifest: &UpdateManifest) -> Result<(), HandlerError>;

    /// The gateway withdrew its offer of `manifest` (the campaign was aborted) while the
    /// update was deferred or downloading; what was staged for it is already dropped. Nothing
    /// had been installed. The default does nothing.
    fn withdrawn(&self, manifest: &UpdateManifest) {
        let _ = manifest;
    }
}

/// A/B slots: each component has `STATE_DIR/slots/{component}/{a,b}.img` and a file `active`
/// naming the running slot (`a` before any update). Install writes the inactive slot and marks
/// it pending; commit makes it active; rollback drops the pending mark.
#[derive(Debug, Clone)]
pub struct SlotInstaller {
    dir: PathBuf,
}

/// Maps an [`io::Error`] on `path` during `action` to a [`HandlerError::Io`].
fn io_err<'a>(action: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> HandlerError + 'a {
    move |source| HandlerError::Io {
        action,
        path: path.to_owned(),
        source,
    }
}

fn write_durably(path: &Path, bytes: &[u8]) -> Result<(), HandlerError> {
    let tmp = path.with_extension("tmp");
    let mut f = File::create(&tmp).map_err(io_err("creating", &tmp))?;
    f.write_all(bytes)
        .and_then(|()| f.sync_all())
        .map_err(io_err("writing", &tmp))?;
    fs::rename(&tmp, path).map_err(io_err("renaming into", path))?;
    if let Some(dir) = path.parent() {
        File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(io_err("syncing", dir))?;
    }
    Ok(())
}

impl SlotInstaller {
    /// Slots under `STATE_DIR/slots`.
    pub fn new(state_dir: &Path) -> Self {
        SlotInstaller {
            dir: state_dir.join("slots"),
        }
    }

    fn component_dir(&self, component: &str) -> PathBuf {
        // Component names are manifest ids (no '/'); keep them from naming anything else.
        self.dir.join(component.replace(['/', '\\'], "_"))
    }

    /// The running slot of `component` (`a` or `b`).
    pub fn active_slot(&self, component: &str) -> String {
        match fs::read_to_string(self.component_dir(component).join("active")) {
            Ok(s) if s.trim() == "b" => "b".into(),
            _ => "a".into(),
        }
    }

    /// The image file of the running slot of `component` (absent before the first update).
    pub fn active_image(&self, component: &str) -> PathBuf {
        let slot = self.active_slot(component);
        self.component_dir(component).join(format!("{slot}.img"))
    }

    fn inactive_slot(&self, component: &str) -> &'static str {
        if self.active_slot(component) == "a" {
            "b"
        } else {
            "a"
        }
    }
}

impl UpdateHandler for SlotInstaller {
    fn install(&self, _m: &UpdateManifest, images: &[StagedImage]) -> Result<(), HandlerError> {
        for img in images {
            let dir = self.component_dir(&img.component);
            fs::create_dir_all(&dir).map_err(io_err("creating", &dir))?;
            let target = dir.join(format!("{}.img", self.inactive_slot(&img.component)));
            fs::copy(&img.path, &target).map_err(io_err("copying the image to", &target))?;
            File::open(&target)
                .and_then(|f| f.sync_all())
                .map_err(io_err("syncing", &target))?;
            write_durably(
                &dir.join("pending"),
                self.inactive_slot(&img.component).as_bytes(),
            )?;
        }
        Ok(())
    }

    fn commit(&self, m: &UpdateManifest) -> Result<(), HandlerError> {
        for c in &m.components {
            let dir = self.component_dir(&c.name);
            let pending = dir.join("pending");
            let slot = fs::read_to_string(&pending).map_err(io_err("reading", &pending))?;
            write_durably(&dir.join("active"), slot.trim().as_bytes())?;
            fs::remove_file(&pending).map_err(io_err("removing", &pending))?;
        }
        Ok(())
    }

    fn rollback(&self, m: &UpdateManifest) -> Result<(), HandlerError> {
        for c in &m.components {
            let pending = self.component_dir(&c.name).join("pending");
            match fs::remove_file(&pending) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(io_err("removing", &pending)(e)),
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use fleet_proto::v1::Component;

    /// A manifest with one component, `rootfs`.
    fn rootfs_manifest() -> UpdateManifest {
        UpdateManifest {
            components: vec![Component {
                name: "rootfs".into(),
                ..Default::default()
            }],
            ..Default::default()
        }
    }

    #[test]
    fn install_commit_and_rollback_switch_slots() {
        let dir = tempfile::tempdir().unwrap();
        let slots = SlotInstaller::new(dir.path());
        let m = rootfs_manifest();
        let staged = dir.path().join("staged");
        fs::write(&staged, b"v2").unwrap();
        let images = [StagedImage {
            component: "rootfs".into(),
            path: staged.clone(),
            size: 2,
        }];
        assert_eq!(slots.active_slot("rootfs"), "a");
        slots.install(&m, &images).unwrap();
        slots.rollback(&m).unwrap();
        assert_eq!(
            slots.active_slot("rootfs"),
            "a",
            "rollback keeps the running slot"
        );
        slots.install(&m, &images).unwrap();
        slots.commit(&m).unwrap();
        assert_eq!(slots.active_slot("rootfs"), "b");
        assert_eq!(fs::read(slots.active_image("rootfs")).unwrap(), b"v2");
        fs::write(&staged, b"v3").unwrap();
        slots.install(&m, &images).unwrap();
        slots.commit(&m).unwrap();
        assert_eq!(fs::read(slots.active_image("rootfs")).unwrap(), b"v3");
        assert_eq!(slots.active_slot("rootfs"), "a");
    }

    #[test]
    fn a_failed_step_names_the_file_and_keeps_the_cause() {
        let dir = tempfile::tempdir().unwrap();
        let slots = SlotInstaller::new(dir.path());
        let m = rootfs_manifest();
        // Nothing was installed, so there is no pending slot to commit.
        let e = slots.commit(&m).unwrap_err();
        let HandlerError::Io {
            action,
            path,
            source,
        } = &e
        else {
            panic!("not an I/O error: {e:?}");
        };
        assert_eq!(*action, "reading");
        assert!(path.ends_with("slots/rootfs/pending"), "{path:?}");
        assert_eq!(source.kind(), io::ErrorKind::NotFound);
        let cause = e.source().unwrap().downcast_ref::<io::Error>().unwrap();
        assert_eq!(cause.kind(), io::ErrorKind::NotFound);
        let report = e.report();
        assert!(report.starts_with("reading "), "{report}");
        assert!(report.contains("pending: "), "{report}");
    }

    #[derive(Debug, thiserror::Error)]
    #[error("bootloader says no")]
    struct Bootloader(#[source] io::Error);

    #[test]
    fn implementors_keep_their_own_errors() {
        let e = HandlerError::context("writing the boot flag", Bootloader(io::Error::other("EIO")));
        assert_eq!(e.to_string(), "writing the boot flag");
        assert_eq!(e.report(), "writing the boot flag: bootloader says no: EIO");
        assert!(e.source().unwrap().downcast_ref::<Bootloader>().is_some());

        let e = HandlerError::new(Bootloader(io::Error::other("EIO")));
        assert_eq!(e.report(), "bootloader says no: EIO");
        let HandlerError::Other(inner) = &e else {
            panic!("{e:?}");
        };
        assert!(inner.downcast_ref::<Bootloader>().is_some());

        let from_str: HandlerError = "checksum mismatch".into();
        assert_eq!(from_str.report(), "checksum mismatch");
        let from_io: HandlerError = io::Error::other("disk full").into();
        assert_eq!(from_io.report(), "disk full");
    }
}
