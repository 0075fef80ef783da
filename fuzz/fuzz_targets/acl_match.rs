//! Topic name and filter validation and matching (`fleet_mqtt::topic`, which the gateway's ACL
//! in broker/src/acl/ uses for every decision), the ACL's own checks (`check_name`,
//! `check_filter`) and its containment test (`within`, which decides whether a subscription
//! stays inside what a rule allows), against the plain reference in `fleet_fuzz::reference`
//! (MQTT 3.1.1 section 4.7).
//!
//! `within` is meant to be sound, not complete: when it says yes, every topic the inner
//! filter matches is matched by the outer one (checked on the reference's witness topics);
//! for a topic name as the inner filter it is exact (the outer filter matches the name).
//!
//! Input: a mode byte, then `filter\ntopic`. In mode 0 the bytes are taken as they are; in
//! the others each byte is mapped onto a small alphabet (`a`, `b`, `/`, `+`, `#`, `$`, empty
//! level), so that wildcards, empty levels and `$` topics meet often enough to match.
#![no_main]

use fleet_broker::fuzzing::{check_filter, check_name, within};
use fleet_fuzz::reference::{
    matches as ref_matches, valid_filter as ref_valid_filter, valid_name as ref_valid_name,
    witnesses,
};
use fleet_mqtt::topic::{matches, valid_filter, valid_name};
use libfuzzer_sys::fuzz_target;

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
    assert_eq!(
        check_filter(filter).is_ok(),
        ref_valid_filter(filter),
        "ACL filter {filter:?}"
    );
    assert_eq!(
        check_name(topic).is_ok(),
        ref_valid_name(topic),
        "ACL topic {topic:?}"
    );
    // The second line read as a filter too: the inner filter of a containment test.
    if ref_valid_filter(filter) && ref_valid_filter(topic) {
        let (inner, outer) = (topic, filter);
        let within = within(inner, outer);
        if ref_valid_name(inner) {
            assert_eq!(
                within,
                ref_matches(outer, inner),
                "within({inner:?}, {outer:?})"
            );
        }
        if within {
            for w in witnesses(inner, outer) {
                assert!(ref_matches(inner, &w), "witness {w:?} of {inner:?}");
                assert!(
                    ref_matches(outer, &w),
                    "within({inner:?}, {outer:?}) but {outer:?} does not match {w:?}"
                );
            }
        }
    }
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
