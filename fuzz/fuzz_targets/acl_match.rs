//! Topic name and filter validation and matching (`fleet_mqtt::topic`, which the gateway's ACL
//! in broker/src/acl/ uses for every decision) against a plain reference written here from
//! MQTT 3.1.1 section 4.7.
//!
//! Input: a mode byte, then `filter\ntopic`. In mode 0 the bytes are taken as they are; in
//! the others each byte is mapped onto a small alphabet (`a`, `b`, `/`, `+`, `#`, `$`, empty
//! level), so that wildcards, empty levels and `$` topics meet often enough to match.
#![no_main]

use fleet_mqtt::topic::{matches, valid_filter, valid_name};
use libfuzzer_sys::fuzz_target;

/// Reference: a topic name is non-empty, without `+`, `#` or NUL.
fn ref_valid_name(t: &str) -> bool {
    !t.is_empty() && t.chars().all(|c| c != '+' && c != '#' && c != '\0')
}

/// Reference: a filter is non-empty, without NUL; every level is `+`, or `#` as the last
/// level, or contains neither.
fn ref_valid_filter(f: &str) -> bool {
    if f.is_empty() || f.contains('\0') {
        return false;
    }
    let levels: Vec<&str> = f.split('/').collect();
    levels.iter().enumerate().all(|(i, l)| {
        *l == "+" || (*l == "#" && i == levels.len() - 1) || !(l.contains('+') || l.contains('#'))
    })
}

/// Reference matching on levels, recursively.
fn ref_levels(f: &[&str], t: &[&str]) -> bool {
    match (f.split_first(), t.split_first()) {
        // `#` matches the parent level too, and any number of levels below.
        (Some((&"#", _)), _) => true,
        (Some((&"+", fr)), Some((_, tr))) => ref_levels(fr, tr),
        (Some((a, fr)), Some((b, tr))) => a == b && ref_levels(fr, tr),
        (None, None) => true,
        _ => false,
    }
}

fn ref_matches(f: &str, t: &str) -> bool {
    let f: Vec<&str> = f.split('/').collect();
    let t: Vec<&str> = t.split('/').collect();
    // A wildcard as the first level never matches a `$` topic [MQTT-4.7.2-1].
    if t[0].starts_with('$') && (f[0] == "+" || f[0] == "#") {
        return false;
    }
    ref_levels(&f, &t)
}

fn alphabet(bytes: &[u8]) -> String {
    bytes
        .iter()
        .map(|b| match b % 8 {
            0 | 1 => "a",
            2 => "b",
            3 | 4 => "/",
            5 => "+",
            6 => "#",
            _ => "$",
        })
        .collect()
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let text = if mode == 0 {
        match std::str::from_utf8(rest) {
            Ok(s) => s.to_owned(),
            Err(_) => return,
        }
    } else {
        // The separator stays a byte of its own.
        let mut parts = rest.splitn(2, |&b| b == b'\n');
        let f = alphabet(parts.next().unwrap_or_default());
        let t = alphabet(parts.next().unwrap_or_default());
        format!("{f}\n{t}")
    };
    let (filter, topic) = text.split_once('\n').unwrap_or((text.as_str(), ""));
    assert_eq!(
        valid_filter(filter),
        ref_valid_filter(filter),
        "filter {filter:?}"
    );
    assert_eq!(valid_name(topic), ref_valid_name(topic), "topic {topic:?}");
    if ref_valid_filter(filter) && ref_valid_name(topic) {
        assert_eq!(
            matches(filter, topic),
            ref_matches(filter, topic),
            "filter {filter:?} topic {topic:?}"
        );
        // A topic name is also a filter that matches exactly itself.
        assert!(matches(topic, topic), "{topic:?} does not match itself");
    }
});
