//! Rules for update manifests, as pure functions: structural validity, and freshness for one
//! device (class, expiry, anti-rollback sequence). No I/O, no clock: the caller passes `now`.
//!
//! The `Display` of every error here is bounded: strings from the manifest are shown through
//! [`crate::report::excerpt`], never whole.

use std::collections::BTreeSet;

use crate::chunker::{self, chunk_count};
use crate::ids::{validate_component_name, validate_id, IdError};
use crate::limits::MAX_DESCRIPTION_LEN;
use crate::report::excerpt;
use crate::v1::{self, UpdateError};

/// The manifest format this library writes and understands.
pub const FORMAT_VERSION: u32 = 1;
/// Most components one update may carry.
pub const MAX_COMPONENTS: usize = 16;
/// Longest version string in bytes.
pub const MAX_VERSION_LEN: usize = 64;

/// Why a manifest is structurally invalid.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ManifestError {
    /// `format_version` is not [`FORMAT_VERSION`].
    #[error("manifest format {0} is not supported (this library knows {FORMAT_VERSION})")]
    UnsupportedFormat(u32),
    /// `update_id` is not a valid id.
    #[error("bad update id: {0}")]
    UpdateId(IdError),
    /// `device_class` is not a valid id.
    #[error("bad device class: {0}")]
    DeviceClass(IdError),
    /// `version` is empty, too long or has control characters.
    #[error("version must be 1 to {MAX_VERSION_LEN} bytes without control characters")]
    Version,
    /// `expires_at_ms` is 0: every manifest must expire.
    #[error("manifest has no expiry")]
    NoExpiry,
    /// No components, or more than [`MAX_COMPONENTS`].
    #[error("manifest has {0} components; 1 to {MAX_COMPONENTS} are allowed")]
    ComponentCount(usize),
    /// `description` is longer than [`MAX_DESCRIPTION_LEN`] bytes.
    #[error("description is {len} bytes; at most {MAX_DESCRIPTION_LEN} are allowed")]
    Description {
        /// Its length in bytes.
        len: usize,
    },
    /// Two components share a name.
    #[error("component name {} appears twice", excerpt(.0))]
    DuplicateComponent(String),
    /// A component is invalid.
    #[error("component {}: {problem}", excerpt(.name))]
    Component {
        /// The component's name as given.
        name: String,
        /// What is wrong with it.
        problem: ComponentError,
    },
}

impl ManifestError {
    /// The reason code reported upward in `UpdateProgress`.
    pub fn code(&self) -> UpdateError {
        match self {
            ManifestError::UnsupportedFormat(_) => UpdateError::UnsupportedFormat,
            _ => UpdateError::MalformedManifest,
        }
    }
}

/// Why a component is invalid.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ComponentError {
    /// The name is not a safe component name ([`validate_component_name`]).
    #[error("bad name: {0}")]
    Name(IdError),
    /// Size 0.
    #[error("image is empty")]
    Empty,
    /// Chunk size outside the allowed bounds.
    #[error("chunk size {0} is outside {min}..={max}", min = chunker::MIN_CHUNK_SIZE, max = chunker::MAX_CHUNK_SIZE)]
    ChunkSize(u32),
    /// `chunk_count` disagrees with size and chunk size.
    #[error("chunk count {got} does not match size and chunk size (expected {expected:?})")]
    ChunkCount {
        /// What size and chunk size imply.
        expected: Option<u32>,
        /// What the manifest says.
        got: u32,
    },
    /// `sha256` is not 32 bytes.
    #[error("sha256 is {0} bytes, not 32")]
    DigestLength(usize),
    /// `merkle_root` is not 32 bytes.
    #[error("merkle root is {0} bytes, not 32")]
    RootLength(usize),
}

/// Checks the structure of a decoded manifest.
pub fn validate(m: &v1::UpdateManifest) -> Result<(), ManifestError> {
    if m.format_version != FORMAT_VERSION {
        return Err(ManifestError::UnsupportedFormat(m.format_version));
    }
    validate_id(&m.update_id).map_err(ManifestError::UpdateId)?;
    validate_id(&m.device_class).map_err(ManifestError::DeviceClass)?;
    if m.version.is_empty()
        || m.version.len() > MAX_VERSION_LEN
        || m.version.chars().any(char::is_control)
    {
        return Err(ManifestError::Version);
    }
    if m.expires_at_ms == 0 {
        return Err(ManifestError::NoExpiry);
    }
    if m.description.len() > MAX_DESCRIPTION_LEN {
        return Err(ManifestError::Description {
            len: m.description.len(),
        });
    }
    if m.components.is_empty() || m.components.len() > MAX_COMPONENTS {
        return Err(ManifestError::ComponentCount(m.components.len()));
    }
    let mut names = BTreeSet::new();
    for c in &m.components {
        validate_component(c).map_err(|problem| ManifestError::Component {
            name: c.name.clone(),
            problem,
        })?;
        if !names.insert(c.name.as_str()) {
            return Err(ManifestError::DuplicateComponent(c.name.clone()));
        }
    }
    Ok(())
}

fn validate_component(c: &v1::Component) -> Result<(), ComponentError> {
    validate_component_name(&c.name).map_err(ComponentError::Name)?;
    if c.size == 0 {
        return Err(ComponentError::Empty);
    }
    chunker::check_chunk_size(c.chunk_size).map_err(|_| ComponentError::ChunkSize(c.chunk_size))?;
    let expected = chunk_count(c.size, c.chunk_size);
    if expected != Some(c.chunk_count) {
        return Err(ComponentError::ChunkCount {
            expected,
            got: c.chunk_count,
        });
    }
    if c.sha256.len() != 32 {
        return Err(ComponentError::DigestLength(c.sha256.len()));
    }
    if c.merkle_root.len() != 32 {
        return Err(ComponentError::RootLength(c.merkle_root.len()));
    }
    Ok(())
}

/// What a device knows about itself when it judges a manifest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeviceFacts<'a> {
    /// The device's class.
    pub device_class: &'a str,
    /// The highest manifest sequence the device has ever installed (0 if none).
    pub installed_sequence: u64,
    /// The current time, Unix epoch milliseconds.
    pub now_ms: u64,
}

/// Why a valid, authentic manifest is not for this device now.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum FreshnessError {
    /// The manifest is for another device class.
    #[error("manifest is for class {}, this device is {}", excerpt(.manifest), excerpt(.device))]
    WrongClass {
        /// Class named by the manifest.
        manifest: String,
        /// The device's class.
        device: String,
    },
    /// The manifest's expiry has passed.
    #[error("manifest expired at {expires_at_ms} ms, now is {now_ms} ms")]
    Expired {
        /// The manifest's expiry.
        expires_at_ms: u64,
        /// The time of the check.
        now_ms: u64,
    },
    /// The manifest's sequence is not newer than the installed one (anti-rollback).
    #[error("manifest sequence {sequence} is not newer than installed sequence {installed}")]
    NotNewer {
        /// The manifest's sequence.
        sequence: u64,
        /// The highest sequence installed.
        installed: u64,
    },
}

impl FreshnessError {
    /// The reason code reported upward in `UpdateProgress`.
    pub fn code(&self) -> UpdateError {
        match self {
            FreshnessError::WrongClass { .. } => UpdateError::WrongClass,
            FreshnessError::Expired { .. } => UpdateError::Expired,
            FreshnessError::NotNewer { .. } => UpdateError::NotNewer,
        }
    }
}

/// Decides whether a manifest is for this device now. A manifest expiring exactly at `now_ms`
/// has expired.
pub fn check_freshness(
    m: &v1::UpdateManifest,
    facts: &DeviceFacts<'_>,
) -> Result<(), FreshnessError> {
    if m.device_class != facts.device_class {
        return Err(FreshnessError::WrongClass {
            manifest: m.device_class.clone(),
            device: facts.device_class.to_owned(),
        });
    }
    if m.expires_at_ms <= facts.now_ms {
        return Err(FreshnessError::Expired {
            expires_at_ms: m.expires_at_ms,
            now_ms: facts.now_ms,
        });
    }
    if m.sequence <= facts.installed_sequence {
        return Err(FreshnessError::NotNewer {
            sequence: m.sequence,
            installed: facts.installed_sequence,
        });
    }
    Ok(())
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn sample() -> v1::UpdateManifest {
        v1::UpdateManifest {
            format_version: FORMAT_VERSION,
            update_id: "fw-1.1".into(),
            device_class: "pump-v2".into(),
            version: "1.1.0+build.7".into(),
            sequence: 11,
            issued_at_ms: 1_000,
            expires_at_ms: 10_000,
            components: vec![v1::Component {
                name: "rootfs".into(),
                size: 5000,
                sha256: vec![1; 32],
                chunk_size: 1024,
                chunk_count: 5,
                merkle_root: vec![2; 32],
            }],
            description: String::new(),
        }
    }

    const FACTS: DeviceFacts<'static> = DeviceFacts {
        device_class: "pump-v2",
        installed_sequence: 10,
        now_ms: 5_000,
    };

    #[test]
    fn sample_is_valid_and_fresh() {
        assert_eq!(validate(&sample()), Ok(()));
        assert_eq!(check_freshness(&sample(), &FACTS), Ok(()));
    }

    #[test]
    fn freshness_rules() {
        let m = sample();
        let wrong = DeviceFacts {
            device_class: "valve-v1",
            ..FACTS
        };
        assert_eq!(
            check_freshness(&m, &wrong).map_err(|e| e.code()),
            Err(UpdateError::WrongClass)
        );
        for now_ms in [10_000, 10_001, u64::MAX] {
            let late = DeviceFacts { now_ms, ..FACTS };
            assert_eq!(
                check_freshness(&m, &late).map_err(|e| e.code()),
                Err(UpdateError::Expired)
            );
        }
        for installed_sequence in [11, 12, u64::MAX] {
            let newer = DeviceFacts {
                installed_sequence,
                ..FACTS
            };
            assert_eq!(
                check_freshness(&m, &newer),
                Err(FreshnessError::NotNewer {
                    sequence: 11,
                    installed: installed_sequence
                })
            );
        }
    }

    #[test]
    fn component_names_that_are_not_one_safe_path_segment_are_refused() {
        for bad in [
            ".", "..", "a/b", "a\\b", "", "a\0b", "\0", ".hidden", "../etc", "c:",
        ] {
            let mut m = sample();
            m.components[0].name = bad.into();
            assert!(
                matches!(
                    validate(&m),
                    Err(ManifestError::Component {
                        problem: ComponentError::Name(_),
                        ..
                    })
                ),
                "{bad:?}: {:?}",
                validate(&m)
            );
        }
        let mut m = sample();
        m.components[0].name = "boot-loader_2.img".into();
        assert_eq!(validate(&m), Ok(()));
    }

    #[test]
    fn descriptions_up_to_the_bound_are_valid() {
        let mut m = sample();
        m.description = "d".repeat(MAX_DESCRIPTION_LEN);
        assert_eq!(validate(&m), Ok(()));
        m.description.push('d');
        assert_eq!(
            validate(&m),
            Err(ManifestError::Description {
                len: MAX_DESCRIPTION_LEN + 1
            })
        );
    }

    #[test]
    fn error_messages_are_bounded_and_clean_whatever_the_input() {
        let hostile = "\u{1b}[2J\n\0".repeat(20_000);
        let mut m = sample();
        m.components[0].name = hostile.clone();
        let messages = [
            validate(&m).err().map(|e| e.to_string()),
            Some(ManifestError::DuplicateComponent(hostile.clone()).to_string()),
            check_freshness(
                &v1::UpdateManifest {
                    device_class: hostile.clone(),
                    ..sample()
                },
                &FACTS,
            )
            .err()
            .map(|e| e.to_string()),
        ];
        for msg in messages {
            let msg = msg.unwrap_or_else(|| panic!("hostile input accepted"));
            assert!(msg.len() < 300, "{} bytes: {msg}", msg.len());
            assert!(!msg.chars().any(char::is_control), "{msg:?}");
        }
    }

    #[test]
    fn structural_rules() {
        type Mutation = fn(&mut v1::UpdateManifest);
        let cases: Vec<(Mutation, &str)> = vec![
            (|m| m.format_version = 2, "format"),
            (|m| m.update_id = "a/b".into(), "update id"),
            (|m| m.device_class = String::new(), "class"),
            (|m| m.version = String::new(), "version"),
            (|m| m.version = "1\n".into(), "version ctl"),
            (|m| m.expires_at_ms = 0, "expiry"),
            (|m| m.components.clear(), "no components"),
            (
                |m| m.components = vec![m.components[0].clone(); 17],
                "too many",
            ),
            (|m| m.components.push(m.components[0].clone()), "duplicate"),
            (|m| m.components[0].name = "#".into(), "component name"),
            (|m| m.components[0].size = 0, "empty"),
            (|m| m.components[0].chunk_size = 100, "chunk size"),
            (|m| m.components[0].chunk_count = 4, "chunk count"),
            (
                |m| m.components[0].sha256.pop().map_or((), drop),
                "digest len",
            ),
            (|m| m.components[0].merkle_root.push(0), "root len"),
            (
                |m| m.description = "d".repeat(MAX_DESCRIPTION_LEN + 1),
                "description",
            ),
            (|m| m.components[0].size = u64::MAX, "size u64::MAX"),
            (|m| m.components[0].chunk_count = u32::MAX, "count u32::MAX"),
            (
                |m| {
                    m.components[0].size = u64::MAX;
                    m.components[0].chunk_size = u32::MAX;
                    m.components[0].chunk_count = u32::MAX;
                },
                "everything at its maximum",
            ),
        ];
        for (mutate, what) in cases {
            let mut m = sample();
            mutate(&mut m);
            assert!(validate(&m).is_err(), "{what} accepted");
        }
    }
}
