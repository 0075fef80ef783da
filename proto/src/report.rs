//! Text that leaves a device in a report: bounded, and free of control characters.
//!
//! A rejection is reported upward in `UpdateProgress.detail`, and that report is persisted and
//! re-sent until the gateway takes it. Whatever goes into it may come from an attacker (a key
//! id, a component name, an update id read from a manifest that failed verification), so every
//! piece of report text passes through one of these helpers:
//!
//! * [`bounded_detail`]: any text, cut to [`MAX_DETAIL_LEN`] bytes with control characters
//!   replaced. Use it for every `detail` a device sends.
//! * [`reportable_update_id`]: an update id as read from the wire, echoed only when it is a
//!   valid id; [`unverified_update_id`]: the same for the manifest inside an envelope that
//!   failed verification, read without decoding it.
//! * [`excerpt`]: a short, quoted and escaped rendering of one untrusted string inside an
//!   error message (the error types of this crate use it in their `Display`).

use std::fmt::{self, Write as _};

use crate::ids::validate_id;

/// Longest report detail in bytes, marker included: far below any MQTT packet limit, long
/// enough for an error chain.
pub const MAX_DETAIL_LEN: usize = 512;

/// Appended to a detail that [`bounded_detail`] cut short.
pub const TRUNCATED_MARKER: &str = "…[truncated]";

/// What replaces a control character in a detail.
const REPLACEMENT: char = '\u{FFFD}';

/// Most bytes of (escaped) text an [`Excerpt`] shows of one untrusted string, quotes and
/// ellipsis not counted.
pub const MAX_EXCERPT_LEN: usize = 32;

/// `s` made safe to report: every control character (C0, DEL, C1, including newlines) is
/// replaced by U+FFFD, and the result is cut at a character boundary so that it is at most
/// [`MAX_DETAIL_LEN`] bytes, [`TRUNCATED_MARKER`] included when it was cut.
///
/// The work is bounded too: at most about [`MAX_DETAIL_LEN`] characters of `s` are looked at.
pub fn bounded_detail(s: &str) -> String {
    let budget = MAX_DETAIL_LEN - TRUNCATED_MARKER.len();
    let mut out = String::with_capacity(s.len().min(MAX_DETAIL_LEN));
    let mut cut_at = None;
    for c in s.chars() {
        let c = if c.is_control() { REPLACEMENT } else { c };
        if cut_at.is_none() && out.len() + c.len_utf8() > budget {
            // From here on only the marker fits, unless the rest fits whole.
            cut_at = Some(out.len());
        }
        if out.len() + c.len_utf8() > MAX_DETAIL_LEN {
            // The rest does not fit: cut where the marker still fits.
            out.truncate(cut_at.unwrap_or(out.len()));
            out.push_str(TRUNCATED_MARKER);
            return out;
        }
        out.push(c);
    }
    out
}

/// `raw` when it is a valid update id ([`crate::ids::validate_id`]), otherwise the empty
/// string: what a device may echo as `UpdateProgress.update_id` for a manifest it could not
/// verify.
pub fn reportable_update_id(raw: &str) -> String {
    if validate_id(raw).is_ok() {
        raw.to_owned()
    } else {
        String::new()
    }
}

/// The update id to report for an encoded `SignedManifest` that did not pass verification:
/// peeked without decoding ([`crate::wire::peek_update_id`]) and echoed only when it is a
/// valid id, otherwise the empty string. Cost: one walk over at most
/// [`crate::limits::MAX_SIGNED_MANIFEST_LEN`] bytes, no allocation but the returned id.
pub fn unverified_update_id(signed_manifest: &[u8]) -> String {
    crate::wire::peek_update_id(signed_manifest).map_or_else(String::new, reportable_update_id)
}

/// The longest prefix of `s` of at most `max` bytes that ends at a character boundary.
pub(crate) fn clip(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// An untrusted string rendered for an error message: quoted, control characters, quotes and
/// backslashes escaped, at most [`MAX_EXCERPT_LEN`] bytes of that shown, and `…` after the
/// closing quote when it was cut. Its `Display` is bounded whatever the string's length.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Excerpt<'a>(&'a str);

/// Wraps `s` for bounded display; see [`Excerpt`].
pub fn excerpt(s: &str) -> Excerpt<'_> {
    Excerpt(s)
}

impl fmt::Display for Excerpt<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_char('"')?;
        let mut shown = 0;
        for c in self.0.chars() {
            let escape = c.is_control() || c == '"' || c == '\\';
            // `\u{..}`, `\n`, `\"`, `\\`: printable ASCII only.
            let len = if escape {
                c.escape_default().len()
            } else {
                c.len_utf8()
            };
            if shown + len > MAX_EXCERPT_LEN {
                return f.write_str("\"…");
            }
            shown += len;
            if escape {
                for e in c.escape_default() {
                    f.write_char(e)?;
                }
            } else {
                f.write_char(c)?;
            }
        }
        f.write_char('"')
    }
}

impl fmt::Debug for Excerpt<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn short_clean_text_is_unchanged() {
        assert_eq!(
            bounded_detail("no signature by a trusted key"),
            "no signature by a trusted key"
        );
        assert_eq!(bounded_detail(""), "");
        let exact = "x".repeat(MAX_DETAIL_LEN);
        assert_eq!(bounded_detail(&exact), exact);
    }

    #[test]
    fn control_characters_are_replaced() {
        assert_eq!(
            bounded_detail("a\nb\0c\u{1b}[2Jd\u{85}e\u{7f}"),
            "a\u{FFFD}b\u{FFFD}c\u{FFFD}[2Jd\u{FFFD}e\u{FFFD}"
        );
    }

    #[test]
    fn long_text_is_cut_with_the_marker() {
        let d = bounded_detail(&"y".repeat(1 << 20));
        assert_eq!(d.len(), MAX_DETAIL_LEN);
        assert!(d.ends_with(TRUNCATED_MARKER));
        // One byte over the limit is cut too.
        let d = bounded_detail(&"y".repeat(MAX_DETAIL_LEN + 1));
        assert!(
            d.len() <= MAX_DETAIL_LEN && d.ends_with(TRUNCATED_MARKER),
            "{d}"
        );
        // Multi-byte characters are cut at a boundary (the String would not exist otherwise),
        // and control characters count as their 3-byte replacement.
        let d = bounded_detail(&"é\u{1}".repeat(1000));
        assert!(d.len() <= MAX_DETAIL_LEN && d.ends_with(TRUNCATED_MARKER));
    }

    #[test]
    fn update_ids_are_echoed_only_when_valid() {
        assert_eq!(reportable_update_id("fw-1.1"), "fw-1.1");
        for bad in ["", "a/b", "a\0", "\u{1b}[2J", &"x".repeat(65), "#"] {
            assert_eq!(reportable_update_id(bad), "", "{bad:?}");
        }
    }

    #[test]
    fn unverified_update_ids_are_echoed_only_when_valid() {
        use crate::v1;
        use prost::Message as _;
        let envelope = |update_id: &str| {
            v1::SignedManifest {
                withdrawal: Default::default(),
                manifest: v1::UpdateManifest {
                    update_id: update_id.into(),
                    ..Default::default()
                }
                .encode_to_vec(),
                signatures: vec![],
            }
            .encode_to_vec()
        };
        assert_eq!(unverified_update_id(&envelope("fw-3")), "fw-3");
        assert_eq!(unverified_update_id(&envelope("\u{1b}[2J")), "");
        assert_eq!(unverified_update_id(&envelope(&"x".repeat(5000))), "");
        assert_eq!(unverified_update_id(b"\xff\xff"), "");
    }

    #[test]
    fn excerpts_are_short_quoted_and_escaped() {
        assert_eq!(excerpt("abc").to_string(), "\"abc\"");
        assert_eq!(
            excerpt("a\"b\\c\n\0").to_string(),
            "\"a\\\"b\\\\c\\n\\u{0}\""
        );
        let long = excerpt(&"k".repeat(10_000)).to_string();
        assert_eq!(long, format!("\"{}\"…", "k".repeat(MAX_EXCERPT_LEN)));
    }

    proptest! {
        #[test]
        fn prop_detail_is_bounded_and_clean(s in ".{0,2000}") {
            let d = bounded_detail(&s);
            prop_assert!(d.len() <= MAX_DETAIL_LEN);
            prop_assert!(!d.chars().any(char::is_control));
            let clean: String = s.chars().map(|c| if c.is_control() { REPLACEMENT } else { c }).collect();
            if clean.len() <= MAX_DETAIL_LEN {
                prop_assert_eq!(d, clean);
            } else {
                let kept = d.strip_suffix(TRUNCATED_MARKER);
                prop_assert!(kept.is_some_and(|k| clean.starts_with(k)));
            }
        }

        #[test]
        fn prop_excerpt_is_bounded_and_clean(s in any::<String>()) {
            let e = excerpt(&s).to_string();
            // Two quotes and an ellipsis around at most MAX_EXCERPT_LEN bytes.
            prop_assert!(e.len() <= MAX_EXCERPT_LEN + 2 + '…'.len_utf8(), "{}", e);
            prop_assert!(!e.chars().any(char::is_control));
        }
    }
}
