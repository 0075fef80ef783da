//! The bridge's topic mapping (`broker/src/bridge/mapping.rs`, through
//! `fleet_broker::fuzzing::Mapping`) against a simple reference:
//!
//! * a local message goes up if and only if one of the `up` filters matches it (the bridge's
//!   link subscribes to exactly those filters), under `gateways/{gateway}/{topic}`;
//! * an upstream message comes down if and only if it is under this gateway's prefix
//!   (`gateways/{gateway}/`, another gateway's never) and its local name is matched by a
//!   `down` filter; it comes down under that local name, and the bridge's upstream
//!   subscriptions cover it;
//! * local -> upstream -> local gives the topic back when a `down` filter matches it;
//! * the link queues every message except device status reports (queued by the store), and
//!   `status_up` says whether the `up` filters carry those.
//!
//! Input: a mode byte, then lines: the gateway id, filters, a local topic, an upstream topic.
//! A filter line's first byte says up (even) or down (odd). In mode 0 the bytes are taken as
//! they are (UTF-8); in the others each byte becomes a token of the gateway's topic tree
//! (`gateways`, `gw-1`, `devices`, `status`, `fleet`, `+`, `#`, `/`, `$`...), so that prefixes,
//! wildcards and other gateways' trees meet often.
#![no_main]

use fleet_broker::fuzzing::{check_filter, status_up, Mapping};
use fleet_fuzz::reference::{matches, valid_filter, valid_name};
use fleet_proto::{DeviceId, GatewayId};
use libfuzzer_sys::fuzz_target;

const TOKENS: [&str; 16] = [
    "gateways", "gw-1", "gw-10", "/", "/", "devices", "dev-1", "status", "fleet", "api", "request",
    "+", "#", "$", "cmd", "",
];

fn text(mode: u8, bytes: &[u8]) -> Option<String> {
    if mode == 0 {
        return std::str::from_utf8(bytes).ok().map(str::to_owned);
    }
    Some(bytes.iter().map(|b| TOKENS[usize::from(b % 16)]).collect())
}

/// `devices/{valid device id}/status`.
fn is_status(topic: &str) -> bool {
    match topic.split('/').collect::<Vec<_>>().as_slice() {
        ["devices", id, "status"] => DeviceId::new(*id).is_ok(),
        _ => false,
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let lines: Vec<&[u8]> = rest.split(|&b| b == b'\n').collect();
    if lines.len() < 3 || lines.len() > 12 {
        return;
    }
    let Some(gateway) = text(mode, lines[0]) else {
        return;
    };
    let gateway = GatewayId::new(gateway).unwrap_or_else(|_| GatewayId::new("gw-1").unwrap());
    let (mut up, mut down) = (Vec::new(), Vec::new());
    for line in &lines[1..lines.len() - 2] {
        let Some((&side, f)) = line.split_first() else {
            continue;
        };
        let Some(f) = text(mode, f) else {
            return;
        };
        assert_eq!(check_filter(&f).is_ok(), valid_filter(&f), "filter {f:?}");
        // The configuration refuses invalid filters.
        if valid_filter(&f) {
            if side % 2 == 0 { &mut up } else { &mut down }.push(f);
        }
    }
    let (Some(local), Some(upstream)) = (
        text(mode, lines[lines.len() - 2]),
        text(mode, lines[lines.len() - 1]),
    ) else {
        return;
    };
    let m = Mapping::new(gateway.clone(), up.clone(), down.clone());
    let prefix = format!("gateways/{gateway}/");

    assert_eq!(m.link_filters(false), up);
    // With status queued by the store, the link leaves out only filters that match nothing
    // but status topics.
    let link = m.link_filters(true);
    assert!(
        link.iter().all(|f| up.contains(f)),
        "{link:?} within {up:?}"
    );
    assert_eq!(
        status_up(&up),
        up.iter().any(|f| matches(f, "devices/x/status"))
    );
    let subscriptions = m.down_subscriptions();
    let expected: Vec<String> = down.iter().map(|f| format!("{prefix}{f}")).collect();
    assert_eq!(subscriptions, expected);

    if valid_name(&local) {
        // Up: the router matches the link's filters (the MQTT core's matcher).
        assert_eq!(
            up.iter().any(|f| fleet_mqtt::topic::matches(f, &local)),
            up.iter().any(|f| matches(f, &local)),
            "up filters {up:?} on {local:?}"
        );
        let name = m.upstream(&local);
        assert_eq!(name, format!("{prefix}{local}"));
        // And back: only what a down filter lets in.
        let back = down
            .iter()
            .any(|f| matches(f, &local))
            .then_some(local.as_str());
        assert_eq!(
            m.local(&name),
            back,
            "round trip of {local:?}, down {down:?}"
        );
        let carried = up.iter().any(|f| matches(f, &local));
        assert_eq!(
            m.queue_from_link(&local),
            carried && !is_status(&local),
            "{local:?}"
        );
        if carried && !is_status(&local) {
            assert!(
                link.iter().any(|f| matches(f, &local)),
                "{local:?} goes up but the link {link:?} does not subscribe to it"
            );
        }
    }

    let expected = upstream
        .strip_prefix(&prefix)
        .filter(|l| !l.is_empty() && down.iter().any(|f| matches(f, l)));
    let came = m.local(&upstream);
    assert_eq!(
        came, expected,
        "{upstream:?} under {prefix:?}, down {down:?}"
    );
    if came.is_some() && valid_name(&upstream) {
        assert!(
            subscriptions.iter().any(|s| matches(s, &upstream)),
            "{upstream:?} comes down but no subscription {subscriptions:?} covers it"
        );
    }
});
