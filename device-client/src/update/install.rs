//! What the application decides and does with an update: accept or defer it, install the
//! verified images, test them, commit or roll back. [`SlotInstaller`] is the default: an A/B
//! slot per component in `STATE_DIR/slots/`.

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

/// The application's side of updates. Methods run on a blocking thread; an `Err` carries the
/// reason reported upward.
pub trait UpdateHandler: Send + Sync + 'static {
    /// Whether to install `manifest` now. The default accepts.
    fn offer(&self, manifest: &UpdateManifest) -> Decision {
        let _ = manifest;
        Decision::Accept
    }

    /// Installs the verified images (all or nothing), without activating them yet.
    fn install(&self, manifest: &UpdateManifest, images: &[StagedImage]) -> Result<(), String>;

    /// Checks the installed update. The default passes.
    fn self_test(&self, manifest: &UpdateManifest) -> Result<(), String> {
        let _ = manifest;
        Ok(())
    }

    /// Makes the installed update the running one.
    fn commit(&self, manifest: &UpdateManifest) -> Result<(), String>;

    /// Abandons the installed update; the running firmware stays.
    fn rollback(&self, manifest: &UpdateManifest) -> Result<(), String>;

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

fn io_str(path: &Path) -> impl FnOnce(io::Error) -> String + '_ {
    move |e| format!("{}: {e}", path.display())
}

fn write_durably(path: &Path, bytes: &[u8]) -> Result<(), String> {
    let tmp = path.with_extension("tmp");
    let mut f = File::create(&tmp).map_err(io_str(&tmp))?;
    f.write_all(bytes)
        .and_then(|()| f.sync_all())
        .map_err(io_str(&tmp))?;
    fs::rename(&tmp, path).map_err(io_str(path))?;
    if let Some(dir) = path.parent() {
        File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(io_str(dir))?;
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
    fn install(&self, _m: &UpdateManifest, images: &[StagedImage]) -> Result<(), String> {
        for img in images {
            let dir = self.component_dir(&img.component);
            fs::create_dir_all(&dir).map_err(io_str(&dir))?;
            let target = dir.join(format!("{}.img", self.inactive_slot(&img.component)));
            fs::copy(&img.path, &target).map_err(io_str(&target))?;
            File::open(&target)
                .and_then(|f| f.sync_all())
                .map_err(io_str(&target))?;
            write_durably(
                &dir.join("pending"),
                self.inactive_slot(&img.component).as_bytes(),
            )?;
        }
        Ok(())
    }

    fn commit(&self, m: &UpdateManifest) -> Result<(), String> {
        for c in &m.components {
            let dir = self.component_dir(&c.name);
            let pending = dir.join("pending");
            let slot = fs::read_to_string(&pending).map_err(io_str(&pending))?;
            write_durably(&dir.join("active"), slot.trim().as_bytes())?;
            fs::remove_file(&pending).map_err(io_str(&pending))?;
        }
        Ok(())
    }

    fn rollback(&self, m: &UpdateManifest) -> Result<(), String> {
        for c in &m.components {
            let pending = self.component_dir(&c.name).join("pending");
            match fs::remove_file(&pending) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(io_str(&pending)(e)),
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

    #[test]
    fn install_commit_and_rollback_switch_slots() {
        let dir = tempfile::tempdir().unwrap();
        let slots = SlotInstaller::new(dir.path());
        let m = UpdateManifest {
            components: vec![Component {
                name: "rootfs".into(),
                ..Default::default()
            }],
            ..Default::default()
        };
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
}
