//! Strict decoding of what a client sends (server side).
//!
//! The decoder looks at a packet in three steps, each as soon as its bytes are there:
//! 1. the first byte: packet type and the flags table 2.2 fixes for it;
//! 2. the remaining length: at most four bytes, within the configured maximum packet size, and
//!    exactly the fixed size for the packets that have one;
//! 3. once the whole packet is buffered, its variable header and payload.
//!
//! So an oversized or nonsensical packet is refused before its body is read or buffered.

use bytes::{Buf, Bytes, BytesMut};

use super::packet::{Connect, Packet, Publish, QoS, Subscribe, Unsubscribe, Will};
use crate::topic;

/// Why bytes from a client are not an acceptable packet. Every variant closes the connection
/// (MQTT 3.1.1 section 4.8), except that [`DecodeError::UnsupportedLevel`] is answered with
/// CONNACK 0x01 first.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DecodeError {
    /// CONNECT with a protocol level other than 4 (answer CONNACK 0x01, then close).
    #[error("unsupported protocol level {0}")]
    UnsupportedLevel(u8),
    /// The remaining length exceeds the configured maximum packet size.
    #[error("packet of {size} bytes exceeds the limit of {limit}")]
    TooLarge {
        /// Announced size of the whole packet.
        size: usize,
        /// The limit.
        limit: usize,
    },
    /// Anything else the standard forbids; the text names the rule.
    #[error("malformed {packet}: {rule}")]
    Malformed {
        /// The packet type being decoded.
        packet: &'static str,
        /// What is wrong (with the normative statement where there is one).
        rule: &'static str,
    },
}

/// Decodes packets from a client, bounded by a maximum packet size.
#[derive(Debug, Clone)]
pub struct Decoder {
    max_packet_size: usize,
}

/// The packet types of table 2.1, by their wire value.
const CONNECT: u8 = 1;
const CONNACK: u8 = 2;
const PUBLISH: u8 = 3;
const PUBACK: u8 = 4;
const PUBREC: u8 = 5;
const PUBREL: u8 = 6;
const PUBCOMP: u8 = 7;
const SUBSCRIBE: u8 = 8;
const SUBACK: u8 = 9;
const UNSUBSCRIBE: u8 = 10;
const UNSUBACK: u8 = 11;
const PINGREQ: u8 = 12;
const PINGRESP: u8 = 13;
const DISCONNECT: u8 = 14;

fn malformed(packet: &'static str, rule: &'static str) -> DecodeError {
    DecodeError::Malformed { packet, rule }
}

/// Checks the first byte of a packet: a type a client may send, with the flags table 2.2
/// prescribes for it. Returns the packet's name.
fn check_first_byte(byte: u8) -> Result<&'static str, DecodeError> {
    let flags = byte & 0x0f;
    let (name, required_flags, rule) = match byte >> 4 {
        CONNECT => ("CONNECT", 0, "reserved flags set [MQTT-2.2.2-2]"),
        PUBLISH => {
            // DUP (bit 3), QoS (bits 2-1) and RETAIN (bit 0) are all meaningful.
            let qos = (flags >> 1) & 0b11;
            if qos == 3 {
                return Err(malformed("PUBLISH", "QoS 3 [MQTT-3.3.1-4]"));
            }
            if qos == 0 && flags & 0b1000 != 0 {
                return Err(malformed(
                    "PUBLISH",
                    "DUP set on a QoS 0 message [MQTT-3.3.1-2]",
                ));
            }
            return Ok("PUBLISH");
        }
        PUBACK => ("PUBACK", 0, "reserved flags set [MQTT-2.2.2-2]"),
        PUBREC => ("PUBREC", 0, "reserved flags set [MQTT-2.2.2-2]"),
        PUBREL => ("PUBREL", 0b0010, "flags other than 0010 [MQTT-3.6.1-1]"),
        PUBCOMP => ("PUBCOMP", 0, "reserved flags set [MQTT-2.2.2-2]"),
        SUBSCRIBE => ("SUBSCRIBE", 0b0010, "flags other than 0010 [MQTT-3.8.1-1]"),
        UNSUBSCRIBE => (
            "UNSUBSCRIBE",
            0b0010,
            "flags other than 0010 [MQTT-3.10.1-1]",
        ),
        PINGREQ => ("PINGREQ", 0, "reserved flags set [MQTT-2.2.2-2]"),
        DISCONNECT => ("DISCONNECT", 0, "reserved flags set [MQTT-2.2.2-2]"),
        CONNACK => return Err(malformed("CONNACK", "sent only by a server (table 2.1)")),
        SUBACK => return Err(malformed("SUBACK", "sent only by a server (table 2.1)")),
        UNSUBACK => return Err(malformed("UNSUBACK", "sent only by a server (table 2.1)")),
        PINGRESP => return Err(malformed("PINGRESP", "sent only by a server (table 2.1)")),
        _ => {
            return Err(malformed(
                "packet",
                "reserved packet type 0 or 15 (table 2.1)",
            ))
        }
    };
    if flags != required_flags {
        return Err(malformed(name, rule));
    }
    Ok(name)
}

/// The remaining length that packets of fixed size must announce, with the rule to cite.
fn fixed_remaining_length(kind: u8) -> Option<(usize, &'static str)> {
    match kind {
        PUBACK | PUBREC | PUBREL | PUBCOMP => {
            Some((2, "remaining length other than 2 (sections 3.4-3.7)"))
        }
        PINGREQ | DISCONNECT => Some((0, "remaining length other than 0 (sections 3.12, 3.14)")),
        _ => None,
    }
}

/// The remaining length of section 2.2.3 from the bytes after the first: `Ok(None)` while
/// incomplete, else the value and how many bytes encode it. Non-minimal encodings are
/// accepted; a fifth byte is not.
fn remaining_length(
    bytes: &[u8],
    packet: &'static str,
) -> Result<Option<(usize, usize)>, DecodeError> {
    let mut value = 0usize;
    for (i, &b) in bytes.iter().take(4).enumerate() {
        value |= usize::from(b & 0x7f) << (7 * i);
        if b & 0x80 == 0 {
            return Ok(Some((value, i + 1)));
        }
    }
    if bytes.len() >= 4 {
        return Err(malformed(
            packet,
            "remaining length longer than 4 bytes (section 2.2.3)",
        ));
    }
    Ok(None)
}

impl Decoder {
    /// A decoder refusing packets larger than `max_packet_size` bytes (fixed header included).
    pub fn new(max_packet_size: usize) -> Self {
        Decoder { max_packet_size }
    }

    /// The largest packet (fixed header included) this decoder accepts.
    pub fn max_packet_size(&self) -> usize {
        self.max_packet_size
    }

    /// Takes the next whole packet off the front of `buf`; `Ok(None)` when more bytes are
    /// needed (nothing is consumed then). A too-large or malformed header is refused as soon as
    /// it is visible, before its body arrives.
    ///
    /// After an error the connection must be closed: what is left in `buf` is unspecified (a
    /// packet refused once complete has been taken off it).
    pub fn decode(&self, buf: &mut BytesMut) -> Result<Option<Packet>, DecodeError> {
        let Some(&first) = buf.first() else {
            return Ok(None);
        };
        let name = check_first_byte(first)?;
        let Some((remaining, length_bytes)) = remaining_length(&buf[1..], name)? else {
            return Ok(None);
        };
        let header = 1 + length_bytes;
        let size = header + remaining;
        if size > self.max_packet_size {
            return Err(DecodeError::TooLarge {
                size,
                limit: self.max_packet_size,
            });
        }
        let kind = first >> 4;
        if let Some((fixed, rule)) = fixed_remaining_length(kind) {
            if remaining != fixed {
                return Err(malformed(name, rule));
            }
        }
        if buf.len() < size {
            return Ok(None);
        }
        buf.advance(header);
        // Payloads below share this allocation instead of copying it.
        let body = buf.split_to(remaining).freeze();
        let flags = first & 0x0f;
        let mut r = Reader {
            buf: body,
            packet: name,
        };
        let packet = match kind {
            CONNECT => Packet::Connect(connect(&mut r)?),
            PUBLISH => Packet::Publish(publish(flags, &mut r)?),
            PUBACK => Packet::PubAck(r.packet_id()?),
            PUBREC => Packet::PubRec(r.packet_id()?),
            PUBREL => Packet::PubRel(r.packet_id()?),
            PUBCOMP => Packet::PubComp(r.packet_id()?),
            SUBSCRIBE => Packet::Subscribe(subscribe(&mut r)?),
            UNSUBSCRIBE => Packet::Unsubscribe(unsubscribe(&mut r)?),
            PINGREQ => Packet::PingReq,
            DISCONNECT => Packet::Disconnect,
            // check_first_byte let no other type through.
            _ => return Err(malformed(name, "unexpected packet type")),
        };
        Ok(Some(packet))
    }
}

/// Reads the fields of one packet's body, never past its remaining length.
struct Reader {
    buf: Bytes,
    packet: &'static str,
}

impl Reader {
    fn malformed(&self, rule: &'static str) -> DecodeError {
        malformed(self.packet, rule)
    }

    fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }

    fn need(&self, n: usize) -> Result<(), DecodeError> {
        if self.buf.len() < n {
            return Err(self.malformed("field runs past the remaining length (section 2.2.3)"));
        }
        Ok(())
    }

    fn take(&mut self, n: usize) -> Result<Bytes, DecodeError> {
        self.need(n)?;
        Ok(self.buf.split_to(n))
    }

    fn u8(&mut self) -> Result<u8, DecodeError> {
        self.need(1)?;
        Ok(self.buf.get_u8())
    }

    fn u16(&mut self) -> Result<u16, DecodeError> {
        self.need(2)?;
        Ok(self.buf.get_u16())
    }

    /// A non-zero packet identifier [MQTT-2.3.1-1].
    fn packet_id(&mut self) -> Result<u16, DecodeError> {
        match self.u16()? {
            0 => Err(self.malformed("packet identifier 0 [MQTT-2.3.1-1]")),
            id => Ok(id),
        }
    }

    /// Binary data with a two-byte length prefix (section 1.5.3 without the UTF-8 part).
    fn binary(&mut self) -> Result<Bytes, DecodeError> {
        let len = self.u16()?;
        self.take(usize::from(len))
    }

    /// A UTF-8 encoded string: well-formed, no U+0000 [MQTT-1.5.3-1], [MQTT-1.5.3-2]. A
    /// leading U+FEFF is kept [MQTT-1.5.3-3].
    fn string(&mut self) -> Result<String, DecodeError> {
        let raw = self.binary()?;
        let Ok(s) = std::str::from_utf8(&raw) else {
            return Err(self.malformed("ill-formed UTF-8 string [MQTT-1.5.3-1]"));
        };
        // In well-formed UTF-8 a zero byte can only be U+0000.
        if raw.contains(&0) {
            return Err(self.malformed("U+0000 in a string [MQTT-1.5.3-2]"));
        }
        Ok(s.to_owned())
    }

    /// A PUBLISH or will topic name: a string, not empty, without wildcards.
    fn topic_name(&mut self) -> Result<String, DecodeError> {
        let name = self.string()?;
        if name.is_empty() {
            return Err(self.malformed("empty topic name [MQTT-4.7.3-1]"));
        }
        if !topic::valid_name(&name) {
            return Err(self.malformed("wildcard in a topic name [MQTT-4.7.1-1], [MQTT-3.3.2-2]"));
        }
        Ok(name)
    }

    /// A SUBSCRIBE or UNSUBSCRIBE topic filter: a string with valid wildcard syntax.
    fn topic_filter(&mut self) -> Result<String, DecodeError> {
        let filter = self.string()?;
        if filter.is_empty() {
            return Err(self.malformed("empty topic filter [MQTT-4.7.3-1]"));
        }
        if !topic::valid_filter(&filter) {
            return Err(
                self.malformed("invalid wildcard in a topic filter [MQTT-4.7.1-2], [MQTT-4.7.1-3]")
            );
        }
        Ok(filter)
    }
}

/// CONNECT flag bits (section 3.1.2.3).
const USERNAME: u8 = 0x80;
const PASSWORD: u8 = 0x40;
const WILL_RETAIN: u8 = 0x20;
const WILL_QOS: u8 = 0x18;
const WILL: u8 = 0x04;
const CLEAN_SESSION: u8 = 0x02;
const RESERVED: u8 = 0x01;

fn connect(r: &mut Reader) -> Result<Connect, DecodeError> {
    let name = r.binary()?;
    let level = r.u8()?;
    match (&name[..], level) {
        (b"MQTT", 4) => {}
        (b"MQTT", level) => return Err(DecodeError::UnsupportedLevel(level)),
        // MQTT 3.1 named itself "MQIsdp".
        (b"MQIsdp", level) if level != 4 => return Err(DecodeError::UnsupportedLevel(level)),
        _ => return Err(r.malformed("protocol name other than \"MQTT\" [MQTT-3.1.2-1]")),
    }
    let flags = r.u8()?;
    if flags & RESERVED != 0 {
        return Err(r.malformed("reserved flag set [MQTT-3.1.2-3]"));
    }
    let will_qos = (flags & WILL_QOS) >> 3;
    let will_retain = flags & WILL_RETAIN != 0;
    if flags & WILL == 0 {
        if will_qos != 0 {
            return Err(r.malformed("will QoS without a will [MQTT-3.1.2-11], [MQTT-3.1.2-13]"));
        }
        if will_retain {
            return Err(r.malformed("will retain without a will [MQTT-3.1.2-11], [MQTT-3.1.2-15]"));
        }
    }
    let Some(will_qos) = QoS::from_u8(will_qos) else {
        return Err(r.malformed("will QoS 3 [MQTT-3.1.2-14]"));
    };
    if flags & PASSWORD != 0 && flags & USERNAME == 0 {
        return Err(r.malformed("password without a user name [MQTT-3.1.2-22]"));
    }
    let keep_alive = r.u16()?;
    // The payload holds exactly the fields the flags announce, in order [MQTT-3.1.3-1].
    let client_id = r.string()?;
    let will = if flags & WILL != 0 {
        let topic = r.topic_name()?;
        let payload = r.binary()?;
        Some(Will {
            topic,
            payload,
            qos: will_qos,
            retain: will_retain,
        })
    } else {
        None
    };
    let username = if flags & USERNAME != 0 {
        Some(r.string()?)
    } else {
        None
    };
    let password = if flags & PASSWORD != 0 {
        Some(r.binary()?)
    } else {
        None
    };
    if !r.is_empty() {
        return Err(r.malformed("bytes after the last field the flags announce [MQTT-3.1.3-1]"));
    }
    Ok(Connect {
        level,
        clean_session: flags & CLEAN_SESSION != 0,
        keep_alive,
        client_id,
        will,
        username,
        password,
    })
}

fn publish(flags: u8, r: &mut Reader) -> Result<Publish, DecodeError> {
    let dup = flags & 0b1000 != 0;
    let retain = flags & 0b0001 != 0;
    // check_first_byte refused QoS 3.
    let qos =
        QoS::from_u8((flags >> 1) & 0b11).ok_or_else(|| r.malformed("QoS 3 [MQTT-3.3.1-4]"))?;
    let topic = r.topic_name()?;
    let packet_id = match qos {
        QoS::AtMostOnce => None,
        QoS::AtLeastOnce | QoS::ExactlyOnce => Some(r.packet_id()?),
    };
    let payload = std::mem::take(&mut r.buf);
    Ok(Publish {
        dup,
        qos,
        retain,
        topic,
        packet_id,
        payload,
    })
}

fn subscribe(r: &mut Reader) -> Result<Subscribe, DecodeError> {
    let packet_id = r.packet_id()?;
    if r.is_empty() {
        return Err(r.malformed("no topic filter [MQTT-3.8.3-3]"));
    }
    let mut filters = Vec::new();
    while !r.is_empty() {
        let filter = r.topic_filter()?;
        let options = r.u8()?;
        // The upper six bits are reserved; QoS 3 does not exist. The standard spells this
        // statement's number "3-8.3-4".
        let Some(qos) = QoS::from_u8(options) else {
            return Err(r.malformed("requested QoS byte other than 0, 1 or 2 [MQTT-3-8.3-4]"));
        };
        filters.push((filter, qos));
    }
    Ok(Subscribe { packet_id, filters })
}

fn unsubscribe(r: &mut Reader) -> Result<Unsubscribe, DecodeError> {
    let packet_id = r.packet_id()?;
    if r.is_empty() {
        return Err(r.malformed("no topic filter [MQTT-3.10.3-2]"));
    }
    let mut filters = Vec::new();
    while !r.is_empty() {
        filters.push(r.topic_filter()?);
    }
    Ok(Unsubscribe { packet_id, filters })
}
