//! Which topics cross the bridge and what they are called on each side, I/O-free. Upstream,
//! this gateway's tree is `gateways/{gateway_id}/{local topic}`. Only topics matching a `down`
//! filter come in: the cloud cannot publish into the rest of the local tree (device command
//! topics, other services' responses) through the bridge. Nothing goes up whose upstream
//! topic holds a character the upstream broker refuses (`bridge.refuse_topic_chars`): such a
//! publish would only get the connection closed, again after every reconnect.

use fleet_proto::topics::{self, DeviceTopic, Topic};
use fleet_proto::GatewayId;

use crate::acl::filter;

/// The bridge's topic rules.
#[derive(Debug, Clone)]
pub(crate) struct Mapping {
    gateway: GatewayId,
    up: Vec<String>,
    down: Vec<String>,
    /// Characters the upstream broker does not take in a topic.
    refuse: String,
}

impl Mapping {
    /// Rules for `gateway` with local filters `up` and `down`.
    pub(crate) fn new(gateway: GatewayId, up: Vec<String>, down: Vec<String>) -> Self {
        Mapping {
            gateway,
            up,
            down,
            refuse: String::new(),
        }
    }

    /// The same rules, sending up no topic that holds one of `chars`.
    pub(crate) fn refusing(mut self, chars: &str) -> Self {
        self.refuse = chars.to_owned();
        self
    }

    /// Whether the upstream name of local topic `local` holds a character the upstream broker
    /// refuses: such a message is not sent up.
    pub(crate) fn refused(&self, local: &str) -> bool {
        !self.refuse.is_empty() && self.upstream(local).contains(|c| self.refuse.contains(c))
    }

    /// The upstream name of a local topic.
    pub(crate) fn upstream(&self, local: &str) -> String {
        topics::to_upstream(&self.gateway, local)
    }

    /// The local topic of an upstream one, if it is this gateway's and may come down.
    pub(crate) fn local<'a>(&self, upstream: &'a str) -> Option<&'a str> {
        let local = topics::from_upstream(&self.gateway, upstream)?;
        self.down
            .iter()
            .any(|f| filter::matches(f, local))
            .then_some(local)
    }

    /// What the bridge subscribes to upstream.
    pub(crate) fn down_subscriptions(&self) -> Vec<String> {
        self.down.iter().map(|f| self.upstream(f)).collect()
    }

    /// What the bridge's local link subscribes to: the `up` filters, less those that match
    /// nothing but status reports when the status owner queues those (`status_queued`).
    pub(crate) fn link_filters(&self, status_queued: bool) -> Vec<String> {
        self.up
            .iter()
            .filter(|f| !(status_queued && only_status(f)))
            .cloned()
            .collect()
    }

    /// Whether a message the link received is queued by the link: it matches an `up` filter
    /// (the link's stored session may keep subscriptions of an earlier configuration) and is
    /// not a status report (the store queued those already).
    pub(crate) fn queue_from_link(&self, local: &str) -> bool {
        self.up.iter().any(|f| filter::matches(f, local))
            && !matches!(
                topics::parse(local),
                Ok(Topic::Device {
                    kind: DeviceTopic::Status,
                    ..
                })
            )
    }
}

/// `topic` cut to at most [`SHOWN`] bytes (at a character boundary), for a log line.
pub(crate) fn shown(topic: &str) -> &str {
    let mut end = topic.len().min(SHOWN);
    while !topic.is_char_boundary(end) {
        end -= 1;
    }
    &topic[..end]
}

/// Bytes of a topic a log line shows, at most.
const SHOWN: usize = 120;

/// Whether every topic `filter` matches is a device's status topic (`devices/+/status`,
/// `devices/{id}/status`).
fn only_status(filter: &str) -> bool {
    let levels: Vec<&str> = filter.split('/').collect();
    matches!(levels[..], ["devices", id, "status"] if id != "#")
}

/// Whether the `up` filters carry device status reports. Those are queued in the transaction
/// that stores them (before the device's acknowledgement), not by the bridge's link.
pub(crate) fn status_up(up: &[String]) -> bool {
    up.iter().any(|f| filter::matches(f, "devices/x/status"))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::config::BridgeSettings;

    fn mapping() -> Mapping {
        let d = BridgeSettings::default();
        Mapping::new(GatewayId::new("gw-1").unwrap(), d.up, d.down)
    }

    #[test]
    fn only_the_down_filters_come_in_and_only_for_this_gateway() {
        let m = mapping();
        assert_eq!(
            m.upstream("devices/d1/status"),
            "gateways/gw-1/devices/d1/status"
        );
        assert_eq!(
            m.local("gateways/gw-1/fleet/api/svc-1/request"),
            Some("fleet/api/svc-1/request")
        );
        assert_eq!(m.local("gateways/gw-1/devices/d1/cmd"), None);
        assert_eq!(m.local("gateways/gw-1/fleet/api/svc-1/response"), None);
        assert_eq!(m.local("gateways/gw-2/fleet/api/svc-1/request"), None);
        assert_eq!(m.local("fleet/api/svc-1/request"), None);
        assert_eq!(
            m.down_subscriptions(),
            ["gateways/gw-1/fleet/api/+/request"]
        );
        assert!(status_up(&BridgeSettings::default().up));
        assert!(!m.queue_from_link("devices/d1/status"));
        assert!(m.queue_from_link("devices/d1/presence"));
        assert!(m.queue_from_link("fleet/events/commands/d1"));
        // Outside the up filters (a subscription the stored session kept): not queued.
        assert!(!m.queue_from_link("devices/d1/cmd"));
    }

    #[test]
    fn the_link_leaves_status_to_the_store_when_the_store_queues_it() {
        let m = Mapping::new(
            GatewayId::new("gw-1").unwrap(),
            [
                "devices/+/status",
                "devices/d1/status",
                "devices/+/#",
                "+/+/status",
                "devices/+/presence",
            ]
            .map(String::from)
            .to_vec(),
            Vec::new(),
        );
        assert_eq!(
            m.link_filters(true),
            ["devices/+/#", "+/+/status", "devices/+/presence"]
        );
        assert_eq!(m.link_filters(false).len(), 5);
    }

    #[test]
    fn topics_with_a_refused_character_do_not_go_up() {
        let plain = mapping();
        assert!(!plain.refused("devices/dev.0002/status"));
        let nats = mapping().refusing(". ");
        assert!(nats.refused("devices/dev.0002/status"));
        assert!(nats.refused("devices/dev 2/presence"));
        assert!(nats.refused("fleet/events/commands/dev.0002"));
        assert!(!nats.refused("devices/dev-0001/status"));
        assert!(!nats.refused("fleet/api/svc-1/response"));
        // The check is on the upstream name, prefix included.
        let dotted =
            Mapping::new(GatewayId::new("gw.1").unwrap(), Vec::new(), Vec::new()).refusing(".");
        assert!(dotted.refused("devices/d1/status"));
    }

    #[test]
    fn a_logged_topic_is_cut_at_a_character_boundary() {
        assert_eq!(shown("devices/d1/status"), "devices/d1/status");
        let long = "é".repeat(100);
        let cut = shown(&long);
        assert!(
            cut.len() <= SHOWN && cut.len() >= SHOWN - 1,
            "{}",
            cut.len()
        );
        assert!(long.starts_with(cut));
    }
}
