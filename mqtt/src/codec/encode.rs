//! Encoding any packet.
//!
//! [`encode`] first checks the packet and measures it, then reserves its exact size once and
//! writes it field by field: no intermediate buffers, no per-field allocation. It refuses every
//! packet the decoder of a strict peer would refuse, so that what it writes is always valid
//! MQTT 3.1.1 (a CONNECT may carry another protocol level, for testing servers).

use bytes::{BufMut, BytesMut};

use super::packet::{ConnAck, Connect, Packet, Publish, QoS, SubAckCode};
use crate::topic;

/// Why a packet cannot be encoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum EncodeError {
    /// A string or binary field longer than 65,535 bytes.
    #[error("string of {0} bytes does not fit a length prefix")]
    StringTooLong(usize),
    /// The packet exceeds the largest remaining length (268,435,455 bytes); the value is its
    /// size as it would be on the wire.
    #[error("packet too large: {0} bytes")]
    TooLarge(usize),
    /// A field violates the standard (QoS 0 with a packet id, packet id 0, ...).
    #[error("cannot encode {packet}: {rule}")]
    Invalid {
        /// The packet type.
        packet: &'static str,
        /// What is wrong.
        rule: &'static str,
    },
}

/// The largest remaining length four bytes can express (section 2.2.3).
const MAX_REMAINING_LENGTH: usize = 268_435_455;

/// Appends the wire form of `packet` to `out`. On error nothing is appended.
pub fn encode(packet: &Packet, out: &mut BytesMut) -> Result<(), EncodeError> {
    check(packet)?;
    let remaining = remaining_length(packet);
    if remaining > MAX_REMAINING_LENGTH {
        return Err(EncodeError::TooLarge(wire_size(remaining)));
    }
    out.reserve(wire_size(remaining));
    out.put_u8(first_byte(packet));
    put_remaining_length(out, remaining);
    put_body(packet, out);
    Ok(())
}

impl Packet {
    /// How many bytes [`encode`] appends for this packet, fixed header included. Exact for
    /// every packet `encode` accepts (for a refused one it is the size it would have had).
    pub fn encoded_len(&self) -> usize {
        wire_size(remaining_length(self))
    }
}

/// The size of a packet with this remaining length: type byte, length bytes, body.
fn wire_size(remaining: usize) -> usize {
    let length_bytes = match remaining {
        0..=127 => 1,
        128..=16_383 => 2,
        16_384..=2_097_151 => 3,
        2_097_152..=MAX_REMAINING_LENGTH => 4,
        _ => 5,
    };
    1 + length_bytes + remaining
}

fn invalid(packet: &Packet, rule: &'static str) -> EncodeError {
    EncodeError::Invalid {
        packet: packet.name(),
        rule,
    }
}

/// A length-prefixed field must fit its two-byte prefix.
fn check_len(field: &[u8]) -> Result<(), EncodeError> {
    if field.len() > usize::from(u16::MAX) {
        return Err(EncodeError::StringTooLong(field.len()));
    }
    Ok(())
}

/// A UTF-8 string field: fits its prefix, no U+0000 [MQTT-1.5.3-2].
fn check_string(packet: &Packet, s: &str) -> Result<(), EncodeError> {
    check_len(s.as_bytes())?;
    if s.as_bytes().contains(&0) {
        return Err(invalid(packet, "U+0000 in a string [MQTT-1.5.3-2]"));
    }
    Ok(())
}

fn check_topic_name(packet: &Packet, name: &str) -> Result<(), EncodeError> {
    check_len(name.as_bytes())?;
    if !topic::valid_name(name) {
        return Err(invalid(
            packet,
            "topic name empty or with wildcards [MQTT-4.7.3-1], [MQTT-3.3.2-2]",
        ));
    }
    Ok(())
}

fn check_packet_id(packet: &Packet, id: u16) -> Result<(), EncodeError> {
    if id == 0 {
        return Err(invalid(packet, "packet identifier 0 [MQTT-2.3.1-1]"));
    }
    Ok(())
}

/// Everything about `packet` that would make its wire form invalid, except its total size.
fn check(packet: &Packet) -> Result<(), EncodeError> {
    match packet {
        Packet::Connect(c) => {
            check_string(packet, &c.client_id)?;
            if let Some(will) = &c.will {
                check_topic_name(packet, &will.topic)?;
                check_len(&will.payload)?;
            }
            if let Some(username) = &c.username {
                check_string(packet, username)?;
            }
            if let Some(password) = &c.password {
                if c.username.is_none() {
                    return Err(invalid(
                        packet,
                        "password without a user name [MQTT-3.1.2-22]",
                    ));
                }
                check_len(password)?;
            }
        }
        Packet::ConnAck(ConnAck {
            session_present,
            code,
        }) => {
            if *session_present && *code != super::ConnectCode::Accepted {
                return Err(invalid(
                    packet,
                    "session present with a refusal [MQTT-3.2.2-4]",
                ));
            }
        }
        Packet::Publish(p) => {
            check_topic_name(packet, &p.topic)?;
            match (p.qos, p.packet_id) {
                (QoS::AtMostOnce, Some(_)) => {
                    return Err(invalid(packet, "packet identifier on QoS 0 [MQTT-2.3.1-5]"))
                }
                (QoS::AtMostOnce, None) => {
                    if p.dup {
                        return Err(invalid(packet, "DUP set on QoS 0 [MQTT-3.3.1-2]"));
                    }
                }
                (_, None) => {
                    return Err(invalid(
                        packet,
                        "no packet identifier on QoS 1 or 2 [MQTT-2.3.1-1]",
                    ))
                }
                (_, Some(id)) => check_packet_id(packet, id)?,
            }
        }
        Packet::PubAck(id)
        | Packet::PubRec(id)
        | Packet::PubRel(id)
        | Packet::PubComp(id)
        | Packet::UnsubAck(id) => check_packet_id(packet, *id)?,
        Packet::Subscribe(s) => {
            check_packet_id(packet, s.packet_id)?;
            if s.filters.is_empty() {
                return Err(invalid(packet, "no topic filter [MQTT-3.8.3-3]"));
            }
            for (filter, _) in &s.filters {
                check_topic_filter(packet, filter)?;
            }
        }
        Packet::SubAck(s) => {
            check_packet_id(packet, s.packet_id)?;
            if s.codes.is_empty() {
                return Err(invalid(packet, "no return code (section 3.9.3)"));
            }
        }
        Packet::Unsubscribe(u) => {
            check_packet_id(packet, u.packet_id)?;
            if u.filters.is_empty() {
                return Err(invalid(packet, "no topic filter [MQTT-3.10.3-2]"));
            }
            for filter in &u.filters {
                check_topic_filter(packet, filter)?;
            }
        }
        Packet::PingReq | Packet::PingResp | Packet::Disconnect => {}
    }
    Ok(())
}

fn check_topic_filter(packet: &Packet, filter: &str) -> Result<(), EncodeError> {
    check_len(filter.as_bytes())?;
    if !topic::valid_filter(filter) {
        return Err(invalid(
            packet,
            "invalid topic filter [MQTT-4.7.1-2], [MQTT-4.7.1-3], [MQTT-4.7.3-1]",
        ));
    }
    Ok(())
}

/// The protocol name that goes with a level: MQTT 3.1 (level 3) called itself "MQIsdp".
fn protocol_name(level: u8) -> &'static [u8] {
    if level == 3 {
        b"MQIsdp"
    } else {
        b"MQTT"
    }
}

/// Length of a field with its two-byte prefix.
fn prefixed(len: usize) -> usize {
    2 + len
}

fn connect_length(c: &Connect) -> usize {
    let mut len = prefixed(protocol_name(c.level).len()) + 1 + 1 + 2;
    len += prefixed(c.client_id.len());
    if let Some(will) = &c.will {
        len += prefixed(will.topic.len()) + prefixed(will.payload.len());
    }
    if let Some(username) = &c.username {
        len += prefixed(username.len());
    }
    if let Some(password) = &c.password {
        len += prefixed(password.len());
    }
    len
}

fn publish_length(p: &Publish) -> usize {
    prefixed(p.topic.len()) + if p.packet_id.is_some() { 2 } else { 0 } + p.payload.len()
}

/// The remaining length of section 2.2.3: variable header plus payload.
fn remaining_length(packet: &Packet) -> usize {
    match packet {
        Packet::Connect(c) => connect_length(c),
        Packet::ConnAck(_) => 2,
        Packet::Publish(p) => publish_length(p),
        Packet::PubAck(_)
        | Packet::PubRec(_)
        | Packet::PubRel(_)
        | Packet::PubComp(_)
        | Packet::UnsubAck(_) => 2,
        Packet::Subscribe(s) => {
            2 + s
                .filters
                .iter()
                .map(|(f, _)| prefixed(f.len()) + 1)
                .sum::<usize>()
        }
        Packet::SubAck(s) => 2 + s.codes.len(),
        Packet::Unsubscribe(u) => 2 + u.filters.iter().map(|f| prefixed(f.len())).sum::<usize>(),
        Packet::PingReq | Packet::PingResp | Packet::Disconnect => 0,
    }
}

/// Type and flags (table 2.2).
fn first_byte(packet: &Packet) -> u8 {
    match packet {
        Packet::Connect(_) => 0x10,
        Packet::ConnAck(_) => 0x20,
        Packet::Publish(p) => {
            0x30 | (u8::from(p.dup) << 3) | ((p.qos as u8) << 1) | u8::from(p.retain)
        }
        Packet::PubAck(_) => 0x40,
        Packet::PubRec(_) => 0x50,
        Packet::PubRel(_) => 0x62,
        Packet::PubComp(_) => 0x70,
        Packet::Subscribe(_) => 0x82,
        Packet::SubAck(_) => 0x90,
        Packet::Unsubscribe(_) => 0xa2,
        Packet::UnsubAck(_) => 0xb0,
        Packet::PingReq => 0xc0,
        Packet::PingResp => 0xd0,
        Packet::Disconnect => 0xe0,
    }
}

/// Writes a remaining length (at most `MAX_REMAINING_LENGTH`) in its minimal encoding.
fn put_remaining_length(out: &mut BytesMut, mut len: usize) {
    loop {
        // The mask keeps the value below 128.
        let byte = (len & 0x7f) as u8;
        len >>= 7;
        if len == 0 {
            out.put_u8(byte);
            return;
        }
        out.put_u8(byte | 0x80);
    }
}

/// Writes a field with its two-byte length prefix; `check` made sure it fits.
fn put_prefixed(out: &mut BytesMut, field: &[u8]) {
    out.put_u16(field.len() as u16);
    out.put_slice(field);
}

fn put_body(packet: &Packet, out: &mut BytesMut) {
    match packet {
        Packet::Connect(c) => put_connect(c, out),
        Packet::ConnAck(a) => {
            out.put_u8(u8::from(a.session_present));
            out.put_u8(a.code as u8);
        }
        Packet::Publish(p) => {
            put_prefixed(out, p.topic.as_bytes());
            if let Some(id) = p.packet_id {
                out.put_u16(id);
            }
            out.put_slice(&p.payload);
        }
        Packet::PubAck(id)
        | Packet::PubRec(id)
        | Packet::PubRel(id)
        | Packet::PubComp(id)
        | Packet::UnsubAck(id) => out.put_u16(*id),
        Packet::Subscribe(s) => {
            out.put_u16(s.packet_id);
            for (filter, qos) in &s.filters {
                put_prefixed(out, filter.as_bytes());
                out.put_u8(*qos as u8);
            }
        }
        Packet::SubAck(s) => {
            out.put_u16(s.packet_id);
            for code in &s.codes {
                out.put_u8(match code {
                    SubAckCode::Granted(qos) => *qos as u8,
                    SubAckCode::Failure => 0x80,
                });
            }
        }
        Packet::Unsubscribe(u) => {
            out.put_u16(u.packet_id);
            for filter in &u.filters {
                put_prefixed(out, filter.as_bytes());
            }
        }
        Packet::PingReq | Packet::PingResp | Packet::Disconnect => {}
    }
}

fn put_connect(c: &Connect, out: &mut BytesMut) {
    put_prefixed(out, protocol_name(c.level));
    out.put_u8(c.level);
    let mut flags = 0u8;
    if c.username.is_some() {
        flags |= 0x80;
    }
    if c.password.is_some() {
        flags |= 0x40;
    }
    if let Some(will) = &c.will {
        flags |= 0x04 | ((will.qos as u8) << 3);
        if will.retain {
            flags |= 0x20;
        }
    }
    if c.clean_session {
        flags |= 0x02;
    }
    out.put_u8(flags);
    out.put_u16(c.keep_alive);
    put_prefixed(out, c.client_id.as_bytes());
    if let Some(will) = &c.will {
        put_prefixed(out, will.topic.as_bytes());
        put_prefixed(out, &will.payload);
    }
    if let Some(username) = &c.username {
        put_prefixed(out, username.as_bytes());
    }
    if let Some(password) = &c.password {
        put_prefixed(out, password);
    }
}
