//! The in-process services against bad payloads: every message they cannot decode is counted
//! in `malformed_payloads`, logged and dropped, and the store stays sound.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use common::{eventually, text, TestGateway};
use fleet_broker::{Metrics, Store};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn undecodable_payloads_are_counted_and_dropped() {
    let gw = TestGateway::start().await;
    // "not protobuf": 'n' is field 13 with wire type 6, which does not exist.
    for (id, topic) in [
        ("dev-1", "devices/dev-1/status"),
        ("dev-1", "devices/dev-1/presence"),
        ("dev-1", "devices/dev-1/cmd/result"),
        ("svc-1", "fleet/api/svc-1/request"),
    ] {
        let out = gw.publish(id, topic, "not protobuf", &["-q", "1"]);
        assert!(out.status.success(), "{topic}: {}", text(&out));
    }
    let m = gw.handle.metrics();
    eventually(
        Duration::from_secs(10),
        "4 malformed payloads counted",
        || Metrics::get(&m.malformed_payloads) >= 4,
    )
    .await;
    assert_eq!(Metrics::get(&m.malformed_payloads), 4);
    assert_eq!(Metrics::get(&m.status_stored), 0);
    assert_eq!(Metrics::get(&m.store_errors), 0);
    let store = Store::open(&gw.dir.path().join("data/gateway.db")).unwrap();
    store.check_integrity().unwrap();
    assert!(store.device_states().unwrap().is_empty(), "nothing stored");
}
