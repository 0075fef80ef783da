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

/// The application's side of updates. Methods run on the update agent's own thread; an `Err`
/// is the reason reported upward (see [`HandlerError`]).
///
/// A power cut can interrupt any step, and the agent then runs the same step again on the next
/// start: `install`, `activate`, `commit` and `rollback` must be idempotent (doing one twice is
/// the same as doing it once).
///
/// The order is `install` (write the inactive slot), `activate` (boot the new slot on trial:
/// it may restart the device), `self_test` (on every start on trial), then `commit` (make the
/// trial permanent) or `rollback`. The agent journals the anti-rollback sequence before it
/// calls `commit`, and falls back (`rollback`) after a few starts on trial without a passed
/// self-test.
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

    /// Starts using the installed images on trial (a boot-once flag for a bootloader). It may
    /// restart the device and never return: the agent carries on with the self-test on the
    /// next start. The default does nothing (the images are tested where they are).
    fn activate(&self, manifest: &UpdateManifest) -> Result<(), HandlerError> {
        let _ = manifest;
        Ok(())
    }

    /// Checks the update on trial. The default passes.
    fn self_test(&self, manifest: &UpdateManifest) -> Result<(), HandlerError> {
        let _ = manifest;
        Ok(())
    }

    /// Makes the update on trial permanent, for every component at once. It must be
    /// idempotent: the agent journals the commit after this returns, so a power cut in between
    /// calls it again, first thing, on the next start.
    fn commit(&self, manifest: &UpdateManifest) -> Result<(), HandlerError>;

    /// Abandons the installed or trial update; the previous firmware stays or comes back.
    fn rollback(&self, manifest: &UpdateManifest) -> Result<(), HandlerError>;

    /// The gateway withdrew its offer of `manifest` (the campaign was aborted) while the
    /// update was deferred or downloading, or a newer update replaced it; what was staged for
    /// it is already dropped. Nothing had been installed. The default does nothing.
    fn withdrawn(&self, manifest: &UpdateManifest) {
        let _ = manifest;
    }
}

/// A/B slots: each component has `STATE_DIR/slots/{component}/{a,b}.img`, and one file,
/// `STATE_DIR/slots/slots.json`, names the running slot of every component, the installed
/// ones and the ones on trial. Install writes the inactive slots; commit switches every
/// component in one atomic write of `slots.json`, so a power cut never leaves a mix.
#[derive(Debug, Clone)]
pub struct SlotInstaller {
    dir: PathBuf,
}

/// `slots.json`.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
struct SlotTable {
    /// Running slot per component (absent: `a`).
    active: std::collections::BTreeMap<String, String>,
    /// Installed, not yet committed: component -> slot.
    pending: std::collections::BTreeMap<String, String>,
    /// Whether the pending slots run on trial.
    trial: bool,
}

const TABLE: &str = "slots.json";

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

/// A component name usable as one directory name.
fn safe_component(name: &str) -> Result<&str, HandlerError> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && !name.starts_with('.')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
    if ok {
        Ok(name)
    } else {
        Err(HandlerError::msg(format!(
            "component name {:?} cannot name a slot directory",
            name.escape_debug().to_string()
        )))
    }
}

impl SlotInstaller {
    /// Slots under `STATE_DIR/slots`.
    pub fn new(state_dir: &Path) -> Self {
        SlotInstaller {
            dir: state_dir.join("slots"),
        }
    }

    fn component_dir(&self, component: &str) -> Result<PathBuf, HandlerError> {
        Ok(self.dir.join(safe_component(component)?))
    }

    fn load(&self) -> Result<SlotTable, HandlerError> {
        let path = self.dir.join(TABLE);
        match fs::read(&path) {
            Ok(b) => serde_json::from_slice(&b).map_err(|e| HandlerError::Io {
                action: "reading",
                path,
                source: io::Error::new(io::ErrorKind::InvalidData, e),
            }),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(SlotTable::default()),
            Err(e) => Err(io_err("reading", &path)(e)),
        }
    }

    fn save(&self, t: &SlotTable) -> Result<(), HandlerError> {
        fs::create_dir_all(&self.dir).map_err(io_err("creating", &self.dir))?;
        let bytes = serde_json::to_vec(t).map_err(|e| HandlerError::new(io::Error::other(e)))?;
        write_durably(&self.dir.join(TABLE), &bytes)
    }

    /// The running slot of `component` (`a` or `b`). An unreadable slot table is an error,
    /// never a guess.
    pub fn active_slot(&self, component: &str) -> Result<String, HandlerError> {
        safe_component(component)?;
        Ok(self
            .load()?
            .active
            .get(component)
            .cloned()
            .unwrap_or_else(|| "a".into()))
    }

    /// The image file of the running slot of `component` (absent before the first update).
    pub fn active_image(&self, component: &str) -> Result<PathBuf, HandlerError> {
        let slot = self.active_slot(component)?;
        Ok(self.component_dir(component)?.join(format!("{slot}.img")))
    }
}

fn other(slot: &str) -> &'static str {
    if slot == "b" {
        "a"
    } else {
        "b"
    }
}

impl UpdateHandler for SlotInstaller {
    fn install(&self, _m: &UpdateManifest, images: &[StagedImage]) -> Result<(), HandlerError> {
        let mut t = self.load()?;
        let mut pending = std::collections::BTreeMap::new();
        for img in images {
            let dir = self.component_dir(&img.component)?;
            fs::create_dir_all(&dir).map_err(io_err("creating", &dir))?;
            let running = t.active.get(&img.component).map_or("a", String::as_str);
            let slot = other(running);
            let target = dir.join(format!("{slot}.img"));
            fs::copy(&img.path, &target).map_err(io_err("copying the image to", &target))?;
            File::open(&target)
                .and_then(|f| f.sync_all())
                .map_err(io_err("syncing", &target))?;
            pending.insert(img.component.clone(), slot.to_owned());
        }
        t.pending = pending;
        t.trial = false;
        self.save(&t)
    }

    fn activate(&self, _m: &UpdateManifest) -> Result<(), HandlerError> {
        let mut t = self.load()?;
        if t.pending.is_empty() {
            return Err(HandlerError::msg("nothing is installed to activate"));
        }
        if !t.trial {
            t.trial = true;
            self.save(&t)?;
        }
        Ok(())
    }

    fn commit(&self, m: &UpdateManifest) -> Result<(), HandlerError> {
        let mut t = self.load()?;
        if t.pending.is_empty() {
            // Committed already (the agent runs a commit again after a power cut)?
            let done = m.components.iter().all(|c| {
                t.active.get(&c.name).is_some_and(|slot| {
                    self.component_dir(&c.name)
                        .is_ok_and(|d| d.join(format!("{slot}.img")).exists())
                })
            });
            return if done {
                Ok(())
            } else {
                Err(HandlerError::msg("nothing is installed to commit"))
            };
        }
        let pending = std::mem::take(&mut t.pending);
        t.active.extend(pending);
        t.trial = false;
        self.save(&t)
    }

    fn rollback(&self, _m: &UpdateManifest) -> Result<(), HandlerError> {
        let mut t = self.load()?;
        if t.pending.is_empty() && !t.trial {
            return Ok(());
        }
        t.pending.clear();
        t.trial = false;
        self.save(&t)
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
        assert_eq!(slots.active_slot("rootfs").unwrap(), "a");
        slots.install(&m, &images).unwrap();
        slots.activate(&m).unwrap();
        slots.rollback(&m).unwrap();
        assert_eq!(
            slots.active_slot("rootfs").unwrap(),
            "a",
            "rollback keeps the running slot"
        );
        slots.install(&m, &images).unwrap();
        slots.activate(&m).unwrap();
        slots.commit(&m).unwrap();
        slots.commit(&m).unwrap(); // again, as after a power cut: idempotent
        assert_eq!(slots.active_slot("rootfs").unwrap(), "b");
        assert_eq!(
            fs::read(slots.active_image("rootfs").unwrap()).unwrap(),
            b"v2"
        );
        fs::write(&staged, b"v3").unwrap();
        slots.install(&m, &images).unwrap();
        slots.commit(&m).unwrap();
        assert_eq!(
            fs::read(slots.active_image("rootfs").unwrap()).unwrap(),
            b"v3"
        );
        assert_eq!(slots.active_slot("rootfs").unwrap(), "a");
    }

    #[test]
    fn every_component_switches_in_one_write() {
        let dir = tempfile::tempdir().unwrap();
        let slots = SlotInstaller::new(dir.path());
        let mut m = rootfs_manifest();
        m.components.push(Component {
            name: "app".into(),
            ..Default::default()
        });
        let staged = dir.path().join("staged");
        fs::write(&staged, b"x").unwrap();
        let images: Vec<StagedImage> = ["rootfs", "app"]
            .iter()
            .map(|c| StagedImage {
                component: (*c).into(),
                path: staged.clone(),
                size: 1,
            })
            .collect();
        slots.install(&m, &images).unwrap();
        // Before the commit nothing runs the new slots; after it, all of them do.
        assert_eq!(slots.active_slot("app").unwrap(), "a");
        slots.commit(&m).unwrap();
        assert_eq!(slots.active_slot("rootfs").unwrap(), "b");
        assert_eq!(slots.active_slot("app").unwrap(), "b");
        let table = fs::read_to_string(dir.path().join("slots/slots.json")).unwrap();
        assert!(
            table.contains("\"rootfs\":\"b\"") && table.contains("\"app\":\"b\""),
            "{table}"
        );
    }

    #[test]
    fn unsafe_names_and_unreadable_tables_are_errors_not_guesses() {
        let dir = tempfile::tempdir().unwrap();
        let slots = SlotInstaller::new(dir.path());
        for bad in [".", "..", "a/b", "a\\b", "", "x\0"] {
            assert!(slots.active_slot(bad).is_err(), "{bad:?}");
            let img = StagedImage {
                component: bad.into(),
                path: dir.path().join("nothing"),
                size: 1,
            };
            assert!(
                slots.install(&rootfs_manifest(), &[img]).is_err(),
                "{bad:?}"
            );
        }
        fs::create_dir_all(dir.path().join("slots")).unwrap();
        fs::write(dir.path().join("slots/slots.json"), b"{").unwrap();
        let e = slots.active_slot("rootfs").unwrap_err();
        assert!(e.report().contains("slots.json"), "{}", e.report());
    }

    #[test]
    fn a_failed_step_names_the_file_and_keeps_the_cause() {
        let dir = tempfile::tempdir().unwrap();
        let slots = SlotInstaller::new(dir.path());
        fs::create_dir_all(dir.path().join("slots/slots.json")).unwrap();
        // The table is a directory: reading it fails with the OS's error as the cause.
        let e = slots.commit(&rootfs_manifest()).unwrap_err();
        let HandlerError::Io { action, path, .. } = &e else {
            panic!("not an I/O error: {e:?}");
        };
        assert_eq!(*action, "reading");
        assert!(path.ends_with("slots/slots.json"), "{path:?}");
        assert!(e.source().unwrap().downcast_ref::<io::Error>().is_some());
        assert!(e.report().starts_with("reading "), "{}", e.report());
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
