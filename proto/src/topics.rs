//! The topic tree, in one place: builders and parsers for every topic the fleet uses.
//!
//! Gateway side (MQTT 3.1.1):
//!
//! | topic | direction | payload |
//! |---|---|---|
//! | `devices/{id}/cmd` | gateway -> device | `Command` |
//! | `devices/{id}/cmd/result` | device -> gateway | `CommandResult` |
//! | `devices/{id}/status` | device -> gateway | `StatusReport` |
//! | `devices/{id}/presence` | device (birth + will) | `Presence` |
//! | `devices/{id}/update/manifest` | gateway -> device | `SignedManifest` |
//! | `devices/{id}/update/get` | device -> gateway | `ChunkRequest` |
//! | `devices/{id}/update/chunk` | gateway -> device | `Chunk` |
//! | `devices/{id}/update/progress` | device -> gateway | `UpdateProgress` |
//! | `devices/{id}/trust` | device -> gateway (retained) | `TrustReport` |
//! | `fleet/trust/roots` | gateway -> every device (retained) | `RootChain` |
//! | `fleet/...` | service <-> gateway | the fleet API |
//!
//! Upstream, the bridge maps the gateway's tree under `gateways/{gateway_id}/...`.

use crate::ids::{DeviceId, GatewayId, IdError};

/// First level of every device topic.
pub const DEVICES: &str = "devices";
/// First level of the service-facing fleet API.
pub const FLEET: &str = "fleet";
/// First level of the upstream (cloud broker) tree.
pub const GATEWAYS: &str = "gateways";

/// Which way a device topic flows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Direction {
    /// Published by the gateway (or a service through it), subscribed by the device.
    ToDevice,
    /// Published by the device.
    FromDevice,
}

/// The kinds of topic under `devices/{id}/`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DeviceTopic {
    /// `cmd`: commands to the device.
    Cmd,
    /// `cmd/result`: command results from the device.
    CmdResult,
    /// `status`: status reports from the device.
    Status,
    /// `presence`: birth and will messages of the device.
    Presence,
    /// `update/manifest`: signed manifests offered to the device.
    UpdateManifest,
    /// `update/get`: chunk requests from the device.
    UpdateGet,
    /// `update/chunk`: chunks sent to the device.
    UpdateChunk,
    /// `update/progress`: update progress from the device.
    UpdateProgress,
    /// `trust`: the device's TrustReport (retained).
    Trust,
}

impl DeviceTopic {
    /// Every device topic kind.
    pub const ALL: [DeviceTopic; 9] = [
        DeviceTopic::Cmd,
        DeviceTopic::CmdResult,
        DeviceTopic::Status,
        DeviceTopic::Presence,
        DeviceTopic::UpdateManifest,
        DeviceTopic::UpdateGet,
        DeviceTopic::UpdateChunk,
        DeviceTopic::UpdateProgress,
        DeviceTopic::Trust,
    ];

    /// The topic levels after `devices/{id}/`.
    pub const fn suffix(self) -> &'static str {
        match self {
            DeviceTopic::Cmd => "cmd",
            DeviceTopic::CmdResult => "cmd/result",
            DeviceTopic::Status => "status",
            DeviceTopic::Presence => "presence",
            DeviceTopic::UpdateManifest => "update/manifest",
            DeviceTopic::UpdateGet => "update/get",
            DeviceTopic::UpdateChunk => "update/chunk",
            DeviceTopic::UpdateProgress => "update/progress",
            DeviceTopic::Trust => "trust",
        }
    }

    /// Which way the topic flows.
    pub const fn direction(self) -> Direction {
        match self {
            DeviceTopic::Cmd | DeviceTopic::UpdateManifest | DeviceTopic::UpdateChunk => {
                Direction::ToDevice
            }
            DeviceTopic::CmdResult
            | DeviceTopic::Status
            | DeviceTopic::Presence
            | DeviceTopic::UpdateGet
            | DeviceTopic::UpdateProgress
            | DeviceTopic::Trust => Direction::FromDevice,
        }
    }

    /// The kind whose suffix is `suffix`, if any.
    pub fn from_suffix(suffix: &str) -> Option<DeviceTopic> {
        DeviceTopic::ALL.into_iter().find(|k| k.suffix() == suffix)
    }
}

/// `devices/{id}/{suffix}` for a device and a topic kind.
pub fn device_topic(id: &DeviceId, kind: DeviceTopic) -> String {
    format!("{DEVICES}/{id}/{}", kind.suffix())
}

/// `devices/{id}/#`: a filter for everything of one device.
pub fn device_filter(id: &DeviceId) -> String {
    format!("{DEVICES}/{id}/#")
}

/// `devices/+/{suffix}`: a filter for one topic kind of every device (for in-process services).
pub fn all_devices_filter(kind: DeviceTopic) -> String {
    format!("{DEVICES}/+/{}", kind.suffix())
}

/// A topic name parsed into its meaning.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Topic<'a> {
    /// A topic under `devices/{id}/`.
    Device {
        /// The device the topic belongs to.
        id: DeviceId,
        /// Which device topic it is.
        kind: DeviceTopic,
    },
    /// A topic under `fleet/`; `path` is what follows `fleet/` (the fleet API defines it).
    Fleet {
        /// The levels after `fleet/`, possibly empty.
        path: &'a str,
    },
}

/// Why a topic name is not part of the fleet tree.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum TopicError {
    /// The first level is neither `devices` nor `fleet`.
    #[error("topic {0:?} is outside the fleet tree")]
    OutsideTree(String),
    /// The device id level is not a valid id.
    #[error("bad device id in topic: {0}")]
    BadId(#[from] IdError),
    /// `devices/{id}/...` with a suffix that is not a device topic.
    #[error("unknown device topic suffix {0:?}")]
    UnknownSuffix(String),
}

/// Parses a topic name (not a filter) of the gateway-side tree.
pub fn parse(topic: &str) -> Result<Topic<'_>, TopicError> {
    if let Some(path) = topic.strip_prefix(FLEET).and_then(|r| r.strip_prefix('/')) {
        return Ok(Topic::Fleet { path });
    }
    let rest = topic
        .strip_prefix(DEVICES)
        .and_then(|r| r.strip_prefix('/'))
        .ok_or_else(|| TopicError::OutsideTree(topic.to_owned()))?;
    let (id, suffix) = rest.split_once('/').unwrap_or((rest, ""));
    let id = DeviceId::new(id)?;
    let kind =
        DeviceTopic::from_suffix(suffix).ok_or_else(|| TopicError::UnknownSuffix(suffix.into()))?;
    Ok(Topic::Device { id, kind })
}

/// `fleet/api/{service_id}/request`: where a service sends its `ApiRequest`s.
pub fn api_request_topic(service_id: &str) -> String {
    format!("{FLEET}/api/{service_id}/request")
}

/// `fleet/api/{service_id}/response`: where the gateway answers a service.
pub fn api_response_topic(service_id: &str) -> String {
    format!("{FLEET}/api/{service_id}/response")
}

/// `fleet/api/+/request`: every service's requests (for the gateway's API service).
pub const ALL_API_REQUESTS: &str = "fleet/api/+/request";

/// `fleet/events/commands/{device_id}`: command state changes of one device.
pub fn command_events_topic(device_id: &str) -> String {
    format!("{FLEET}/events/commands/{device_id}")
}

/// `fleet/events/commands/+`: command state changes of every device.
pub const ALL_COMMAND_EVENTS: &str = "fleet/events/commands/+";

/// `fleet/trust/roots`: the RootChain the gateway distributes, retained; every device
/// subscribes to it (it is public: roots carry public keys only).
pub const TRUST_ROOTS: &str = "fleet/trust/roots";

/// `fleet/events/trust/{device_id}`: a device's TrustReport changed.
pub fn trust_events_topic(device_id: &str) -> String {
    format!("{FLEET}/events/trust/{device_id}")
}

/// A topic of the fleet API (what follows `fleet/`), parsed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FleetTopic<'a> {
    /// `api/{service_id}/request`.
    ApiRequest {
        /// The requesting service's id (not validated here).
        service_id: &'a str,
    },
    /// `api/{service_id}/response`.
    ApiResponse {
        /// The service the response is for.
        service_id: &'a str,
    },
    /// `events/commands/{device_id}`.
    CommandEvents {
        /// The device whose command changed.
        device_id: &'a str,
    },
}

impl<'a> FleetTopic<'a> {
    /// Parses the `path` of a [`Topic::Fleet`]; `None` when it is not an API topic.
    pub fn parse(path: &'a str) -> Option<FleetTopic<'a>> {
        let levels: Vec<&str> = path.split('/').collect();
        match levels.as_slice() {
            ["api", id, "request"] if !id.is_empty() => {
                Some(FleetTopic::ApiRequest { service_id: id })
            }
            ["api", id, "response"] if !id.is_empty() => {
                Some(FleetTopic::ApiResponse { service_id: id })
            }
            ["events", "commands", id] if !id.is_empty() => {
                Some(FleetTopic::CommandEvents { device_id: id })
            }
            _ => None,
        }
    }
}

/// Where gateway `gateway` announces itself upstream (retained `GatewayPresence`, and its
/// will): `gateways/{gateway_id}/presence`. Not a local topic: nothing below a gateway's prefix
/// is mapped down but `bridge.down`.
pub fn gateway_presence_topic(gateway: &GatewayId) -> String {
    format!("{GATEWAYS}/{gateway}/presence")
}

/// Every gateway's presence, upstream.
pub const ALL_GATEWAY_PRESENCE: &str = "gateways/+/presence";

/// The gateway whose presence topic `upstream` is, if it is one.
pub fn parse_gateway_presence(upstream: &str) -> Option<&str> {
    let rest = upstream.strip_prefix(GATEWAYS)?.strip_prefix('/')?;
    let (gateway, tail) = rest.split_once('/')?;
    (tail == "presence" && !gateway.is_empty()).then_some(gateway)
}

/// The upstream name of a local topic: `gateways/{gateway_id}/{local}`.
pub fn to_upstream(gateway: &GatewayId, local: &str) -> String {
    format!("{GATEWAYS}/{gateway}/{local}")
}

/// The local topic for an upstream topic of this gateway, or `None` if `upstream` is not under
/// `gateways/{gateway_id}/` or names nothing below it.
pub fn from_upstream<'a>(gateway: &GatewayId, upstream: &'a str) -> Option<&'a str> {
    let local = upstream
        .strip_prefix(GATEWAYS)?
        .strip_prefix('/')?
        .strip_prefix(gateway.as_str())?
        .strip_prefix('/')?;
    (!local.is_empty()).then_some(local)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn dev(s: &str) -> DeviceId {
        DeviceId::new(s).unwrap_or_else(|e| panic!("{s}: {e}"))
    }

    #[test]
    fn gateway_presence_topics_round_trip() {
        let gw = GatewayId::new("gw-0001").unwrap_or_else(|e| panic!("{e}"));
        let t = gateway_presence_topic(&gw);
        assert_eq!(t, "gateways/gw-0001/presence");
        assert_eq!(parse_gateway_presence(&t), Some("gw-0001"));
        for other in [
            "gateways//presence",
            "gateways/gw-0001/presence/x",
            "gateways/gw-0001/devices/d/presence",
            "gateway/gw-0001/presence",
            "gateways/gw-0001",
        ] {
            assert_eq!(parse_gateway_presence(other), None, "{other}");
        }
    }

    #[test]
    fn fleet_api_topics_round_trip() {
        for (topic, want) in [
            (
                api_request_topic("svc-1"),
                FleetTopic::ApiRequest {
                    service_id: "svc-1",
                },
            ),
            (
                api_response_topic("svc-1"),
                FleetTopic::ApiResponse {
                    service_id: "svc-1",
                },
            ),
            (
                command_events_topic("dev-9"),
                FleetTopic::CommandEvents { device_id: "dev-9" },
            ),
        ] {
            let Ok(Topic::Fleet { path }) = parse(&topic) else {
                panic!("{topic} is not a fleet topic");
            };
            assert_eq!(FleetTopic::parse(path), Some(want), "{topic}");
        }
        for bad in [
            "api//request",
            "api/svc-1",
            "api/svc-1/request/x",
            "events/commands",
            "",
        ] {
            assert_eq!(FleetTopic::parse(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn builds_the_table() {
        let d = dev("dev-42");
        let built: Vec<String> = DeviceTopic::ALL
            .iter()
            .map(|k| device_topic(&d, *k))
            .collect();
        assert_eq!(
            built,
            [
                "devices/dev-42/cmd",
                "devices/dev-42/cmd/result",
                "devices/dev-42/status",
                "devices/dev-42/presence",
                "devices/dev-42/update/manifest",
                "devices/dev-42/update/get",
                "devices/dev-42/update/chunk",
                "devices/dev-42/update/progress",
                "devices/dev-42/trust",
            ]
        );
        assert_eq!(device_filter(&d), "devices/dev-42/#");
        assert_eq!(all_devices_filter(DeviceTopic::Status), "devices/+/status");
    }

    #[test]
    fn rejects_what_is_not_ours() {
        assert!(
            matches!(parse("devices/dev-1"), Err(TopicError::UnknownSuffix(s)) if s.is_empty())
        );
        assert!(matches!(
            parse("devices/dev-1/cmd/"),
            Err(TopicError::UnknownSuffix(_))
        ));
        assert!(matches!(
            parse("devices/dev-1/update"),
            Err(TopicError::UnknownSuffix(_))
        ));
        assert!(matches!(
            parse("devices//cmd"),
            Err(TopicError::BadId(IdError::Empty))
        ));
        assert!(matches!(parse("devices/+/cmd"), Err(TopicError::BadId(_))));
        assert!(matches!(parse("devices/#"), Err(TopicError::BadId(_))));
        assert!(matches!(parse("$SYS/x"), Err(TopicError::OutsideTree(_))));
        assert!(matches!(
            parse("devicesX/a/cmd"),
            Err(TopicError::OutsideTree(_))
        ));
        assert!(matches!(parse("fleetX/a"), Err(TopicError::OutsideTree(_))));
        assert_eq!(
            parse("fleet/commands/submit"),
            Ok(Topic::Fleet {
                path: "commands/submit"
            })
        );
    }

    #[test]
    fn directions_follow_the_table() {
        use DeviceTopic::*;
        for k in [Cmd, UpdateManifest, UpdateChunk] {
            assert_eq!(k.direction(), Direction::ToDevice);
        }
        for k in [
            CmdResult,
            Status,
            Presence,
            UpdateGet,
            UpdateProgress,
            Trust,
        ] {
            assert_eq!(k.direction(), Direction::FromDevice);
        }
    }

    #[test]
    fn upstream_mapping() {
        let gw = GatewayId::new("gw-7").unwrap_or_else(|e| panic!("{e}"));
        let up = to_upstream(&gw, "devices/d/status");
        assert_eq!(up, "gateways/gw-7/devices/d/status");
        assert_eq!(from_upstream(&gw, &up), Some("devices/d/status"));
        assert_eq!(from_upstream(&gw, "gateways/gw-77/devices/d/status"), None);
        assert_eq!(from_upstream(&gw, "gateways/gw-7/"), None);
        assert_eq!(from_upstream(&gw, "gateways/gw-7"), None);
    }

    fn id_strategy() -> impl Strategy<Value = String> {
        // Any printable characters but the forbidden ones, 1..=64 bytes.
        "[^/+#$\\p{Cc}]{1,16}".prop_filter("at most 64 bytes", |s| s.len() <= 64)
    }

    proptest! {
        #[test]
        fn device_topics_round_trip(id in id_strategy(), k in 0usize..9) {
            let id = DeviceId::new(id).map_err(|e| TestCaseError::fail(e.to_string()))?;
            let kind = DeviceTopic::ALL[k];
            let topic = device_topic(&id, kind);
            prop_assert_eq!(parse(&topic), Ok(Topic::Device { id: id.clone(), kind }));
        }

        #[test]
        fn upstream_round_trip(gw in id_strategy(), local in "[a-z/]{1,30}") {
            let gw = GatewayId::new(gw).map_err(|e| TestCaseError::fail(e.to_string()))?;
            let up = to_upstream(&gw, &local);
            prop_assert_eq!(from_upstream(&gw, &up), Some(local.as_str()));
        }

        /// Whatever the input, parse never panics, and a device topic it accepts is rebuilt
        /// exactly by the builder: no alternative spelling addresses a device.
        #[test]
        fn parse_is_canonical(topic in "[a-z/+#$\\x00-\\x1f-]{0,40}|devices/[^/]{0,8}/[a-z/]{0,20}") {
            if let Ok(Topic::Device { id, kind }) = parse(&topic) {
                prop_assert_eq!(device_topic(&id, kind), topic);
            }
        }
    }
}
