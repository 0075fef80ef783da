//! The packets of MQTT 3.1.1, as values.

use bytes::Bytes;

/// Quality of service of a publish or a subscription.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum QoS {
    /// 0: at most once.
    AtMostOnce = 0,
    /// 1: at least once.
    AtLeastOnce = 1,
    /// 2: exactly once.
    ExactlyOnce = 2,
}

impl QoS {
    /// The QoS for a wire value 0-2; `None` for 3 and above.
    pub fn from_u8(v: u8) -> Option<QoS> {
        match v {
            0 => Some(QoS::AtMostOnce),
            1 => Some(QoS::AtLeastOnce),
            2 => Some(QoS::ExactlyOnce),
            _ => None,
        }
    }
}

/// A will message announced in CONNECT.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Will {
    /// Topic name (valid UTF-8, no wildcards).
    pub topic: String,
    /// Payload.
    pub payload: Bytes,
    /// QoS it is published at.
    pub qos: QoS,
    /// Whether it is retained.
    pub retain: bool,
}

/// CONNECT.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Connect {
    /// Protocol level: 4 for MQTT 3.1.1 (the decoder accepts no other).
    pub level: u8,
    /// Clean session flag.
    pub clean_session: bool,
    /// Keep-alive in seconds; 0 turns it off.
    pub keep_alive: u16,
    /// Client identifier (may be empty).
    pub client_id: String,
    /// The will, if any.
    pub will: Option<Will>,
    /// User name, if the flag is set.
    pub username: Option<String>,
    /// Password, if the flag is set (only with a user name).
    pub password: Option<Bytes>,
}

/// CONNACK return codes (MQTT 3.1.1 table 3.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConnectCode {
    /// 0x00 accepted.
    Accepted = 0,
    /// 0x01 unacceptable protocol version.
    UnacceptableProtocolVersion = 1,
    /// 0x02 identifier rejected.
    IdentifierRejected = 2,
    /// 0x03 server unavailable.
    ServerUnavailable = 3,
    /// 0x04 bad user name or password.
    BadUserNameOrPassword = 4,
    /// 0x05 not authorized.
    NotAuthorized = 5,
}

/// CONNACK.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnAck {
    /// Whether the server had a session for the client (only with code 0).
    pub session_present: bool,
    /// The return code.
    pub code: ConnectCode,
}

/// PUBLISH.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Publish {
    /// DUP flag: this may be a re-delivery (never set with QoS 0).
    pub dup: bool,
    /// QoS.
    pub qos: QoS,
    /// RETAIN flag.
    pub retain: bool,
    /// Topic name (valid UTF-8, no wildcards, not empty).
    pub topic: String,
    /// Packet identifier: `Some` (non-zero) exactly when QoS > 0.
    pub packet_id: Option<u16>,
    /// Payload.
    pub payload: Bytes,
}

/// SUBSCRIBE.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Subscribe {
    /// Packet identifier (non-zero).
    pub packet_id: u16,
    /// At least one (filter, requested QoS).
    pub filters: Vec<(String, QoS)>,
}

/// One SUBACK return code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SubAckCode {
    /// Granted at this maximum QoS.
    Granted(QoS),
    /// 0x80 failure.
    Failure,
}

/// SUBACK.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubAck {
    /// Packet identifier of the SUBSCRIBE.
    pub packet_id: u16,
    /// One code per filter, in order.
    pub codes: Vec<SubAckCode>,
}

/// UNSUBSCRIBE.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unsubscribe {
    /// Packet identifier (non-zero).
    pub packet_id: u16,
    /// At least one filter.
    pub filters: Vec<String>,
}

/// Every MQTT 3.1.1 control packet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Packet {
    /// CONNECT (client to server).
    Connect(Connect),
    /// CONNACK (server to client).
    ConnAck(ConnAck),
    /// PUBLISH (both ways).
    Publish(Publish),
    /// PUBACK with its packet id (both ways).
    PubAck(u16),
    /// PUBREC (both ways).
    PubRec(u16),
    /// PUBREL (both ways).
    PubRel(u16),
    /// PUBCOMP (both ways).
    PubComp(u16),
    /// SUBSCRIBE (client to server).
    Subscribe(Subscribe),
    /// SUBACK (server to client).
    SubAck(SubAck),
    /// UNSUBSCRIBE (client to server).
    Unsubscribe(Unsubscribe),
    /// UNSUBACK (server to client).
    UnsubAck(u16),
    /// PINGREQ (client to server).
    PingReq,
    /// PINGRESP (server to client).
    PingResp,
    /// DISCONNECT (client to server).
    Disconnect,
}

impl Packet {
    /// The packet type's name, for logs.
    pub fn name(&self) -> &'static str {
        match self {
            Packet::Connect(_) => "CONNECT",
            Packet::ConnAck(_) => "CONNACK",
            Packet::Publish(_) => "PUBLISH",
            Packet::PubAck(_) => "PUBACK",
            Packet::PubRec(_) => "PUBREC",
            Packet::PubRel(_) => "PUBREL",
            Packet::PubComp(_) => "PUBCOMP",
            Packet::Subscribe(_) => "SUBSCRIBE",
            Packet::SubAck(_) => "SUBACK",
            Packet::Unsubscribe(_) => "UNSUBSCRIBE",
            Packet::UnsubAck(_) => "UNSUBACK",
            Packet::PingReq => "PINGREQ",
            Packet::PingResp => "PINGRESP",
            Packet::Disconnect => "DISCONNECT",
        }
    }
}
