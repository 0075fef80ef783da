//! Validated identifiers: device, gateway, command, update and component ids.
//!
//! Every id can stand as one MQTT topic level, so the rules are those of a topic level plus a
//! length bound: 1 to [`MAX_ID_LEN`] bytes of UTF-8 without `/`, `+`, `#`, `$`, NUL or any
//! control character. These rules are checked wherever an id enters the system (certificate,
//! topic, manifest), so a string that passed them can never widen a topic filter.
//!
//! Component names are stricter ([`validate_component_name`]): a device may use one as a file
//! name, so it must be one safe path segment on every file system.

use std::fmt;

/// Longest id in bytes.
pub const MAX_ID_LEN: usize = 64;

/// Why a string is not a valid id.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum IdError {
    /// The id is the empty string.
    #[error("id is empty")]
    Empty,
    /// The id is longer than [`MAX_ID_LEN`] bytes.
    #[error("id is {len} bytes long; the maximum is {MAX_ID_LEN}")]
    TooLong {
        /// Length of the rejected id in bytes.
        len: usize,
    },
    /// The id contains a character that is not allowed.
    #[error("id contains forbidden character {ch:?} at byte {at}")]
    ForbiddenChar {
        /// The offending character.
        ch: char,
        /// Its byte offset in the id.
        at: usize,
    },
    /// A component name starts with `.` (which covers `.` and `..`).
    #[error("a component name must not start with '.'")]
    LeadingDot,
}

/// Checks `s` against the id rules.
pub fn validate_id(s: &str) -> Result<(), IdError> {
    if s.is_empty() {
        return Err(IdError::Empty);
    }
    if s.len() > MAX_ID_LEN {
        return Err(IdError::TooLong { len: s.len() });
    }
    match s
        .char_indices()
        .find(|&(_, c)| matches!(c, '/' | '+' | '#' | '$') || c.is_control())
    {
        Some((at, ch)) => Err(IdError::ForbiddenChar { ch, at }),
        None => Ok(()),
    }
}

/// Longest component name in bytes.
pub const MAX_COMPONENT_NAME_LEN: usize = 64;

/// Checks a component name (`Component.name`): 1 to [`MAX_COMPONENT_NAME_LEN`] bytes of ASCII
/// letters, digits, `-`, `_` and `.`, not starting with `.`. Such a name is a valid id and a
/// single, ordinary path segment everywhere: never `.` or `..`, never a separator (`/`, `\`),
/// a drive prefix (`:`), NUL, or a hidden file.
pub fn validate_component_name(s: &str) -> Result<(), IdError> {
    if s.is_empty() {
        return Err(IdError::Empty);
    }
    if s.len() > MAX_COMPONENT_NAME_LEN {
        return Err(IdError::TooLong { len: s.len() });
    }
    if let Some((at, ch)) = s
        .char_indices()
        .find(|&(_, c)| !(c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.')))
    {
        return Err(IdError::ForbiddenChar { ch, at });
    }
    if s.starts_with('.') {
        return Err(IdError::LeadingDot);
    }
    Ok(())
}

macro_rules! id_type {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
        pub struct $name(String);

        impl $name {
            /// Validates `s` and wraps it.
            pub fn new(s: impl Into<String>) -> Result<Self, IdError> {
                let s = s.into();
                validate_id(&s)?;
                Ok(Self(s))
            }

            /// The id as a string slice.
            pub fn as_str(&self) -> &str {
                &self.0
            }

            /// The id as an owned string.
            pub fn into_string(self) -> String {
                self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl AsRef<str> for $name {
            fn as_ref(&self) -> &str {
                &self.0
            }
        }

        impl std::str::FromStr for $name {
            type Err = IdError;
            fn from_str(s: &str) -> Result<Self, IdError> {
                Self::new(s)
            }
        }
    };
}

id_type!(
    /// The id of a device: its certificate id and the `{id}` level of `devices/{id}/...`.
    DeviceId
);
id_type!(
    /// The id of a gateway: the `{gateway_id}` level of `gateways/{gateway_id}/...` upstream.
    GatewayId
);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_ordinary_ids() {
        for ok in [
            "dev-0001",
            "a",
            "pump.station_7",
            "Ünïcode-ok",
            &"x".repeat(64),
        ] {
            assert_eq!(validate_id(ok), Ok(()), "{ok:?}");
        }
    }

    #[test]
    fn rejects_each_forbidden_form() {
        assert_eq!(validate_id(""), Err(IdError::Empty));
        assert_eq!(
            validate_id(&"x".repeat(65)),
            Err(IdError::TooLong { len: 65 })
        );
        // 33 two-byte characters = 66 bytes: the bound is in bytes, not characters.
        assert_eq!(
            validate_id(&"é".repeat(33)),
            Err(IdError::TooLong { len: 66 })
        );
        for (bad, ch, at) in [
            ("a/b", '/', 1),
            ("+", '+', 0),
            ("dev#", '#', 3),
            ("$SYS", '$', 0),
            ("a\0b", '\0', 1),
            ("tab\there", '\t', 3),
            ("nl\n", '\n', 2),
            ("del\u{7f}", '\u{7f}', 3),
            ("c1\u{85}", '\u{85}', 2),
        ] {
            assert_eq!(
                validate_id(bad),
                Err(IdError::ForbiddenChar { ch, at }),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn component_names_are_single_safe_path_segments() {
        for ok in ["rootfs", "a", "boot-loader_2.img", "A.b.c", &"x".repeat(64)] {
            assert_eq!(validate_component_name(ok), Ok(()), "{ok:?}");
            assert_eq!(validate_id(ok), Ok(()), "{ok:?} must be an id too");
        }
        assert_eq!(validate_component_name(""), Err(IdError::Empty));
        assert_eq!(validate_component_name("."), Err(IdError::LeadingDot));
        assert_eq!(validate_component_name(".."), Err(IdError::LeadingDot));
        assert_eq!(validate_component_name(".hidden"), Err(IdError::LeadingDot));
        assert_eq!(
            validate_component_name(&"x".repeat(65)),
            Err(IdError::TooLong { len: 65 })
        );
        for (bad, ch, at) in [
            ("a/b", '/', 1),
            ("a\\b", '\\', 1),
            ("a\0b", '\0', 1),
            ("../x", '/', 2),
            ("c:", ':', 1),
            ("sp ace", ' ', 2),
            ("é", 'é', 0),
            ("nl\n", '\n', 2),
        ] {
            assert_eq!(
                validate_component_name(bad),
                Err(IdError::ForbiddenChar { ch, at }),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn typed_ids_validate() {
        assert!(DeviceId::new("dev-1").is_ok());
        assert!(DeviceId::new("dev/1").is_err());
        assert_eq!(
            "gw-1".parse::<GatewayId>().map(|g| g.to_string()),
            Ok("gw-1".into())
        );
    }
}
