//! The MQTT 3.1.1 codec against the standard: one test per normative statement a server must
//! enforce, with the raw bytes a client could send, plus property tests for the encoder and
//! decoder together.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use bytes::{Bytes, BytesMut};
use fleet_mqtt::codec::{
    encode, ConnAck, Connect, ConnectCode, DecodeError, Decoder, EncodeError, Packet, Publish, QoS,
    SubAck, SubAckCode, Subscribe, Unsubscribe, Will,
};

const LIMIT: usize = 1 << 20;

fn decode(bytes: &[u8]) -> Result<Option<Packet>, DecodeError> {
    Decoder::new(LIMIT).decode(&mut BytesMut::from(bytes))
}

/// Decodes `bytes` as exactly one whole packet.
fn accepted(bytes: &[u8]) -> Packet {
    // Failure messages show the start of the packet only.
    let head = &bytes[..bytes.len().min(24)];
    let mut buf = BytesMut::from(bytes);
    let packet = Decoder::new(LIMIT)
        .decode(&mut buf)
        .unwrap_or_else(|e| panic!("{head:02x?} refused: {e}"))
        .unwrap_or_else(|| panic!("{head:02x?} incomplete"));
    assert!(buf.is_empty(), "{head:02x?} left {} bytes", buf.len());
    packet
}

/// Asserts that `bytes` are refused as malformed for the reason `rule` names (a normative
/// statement like "MQTT-3.8.3-3", or a fragment of the reason).
fn refused(bytes: &[u8], rule: &str) {
    match decode(bytes) {
        Err(DecodeError::Malformed { rule: why, .. }) if why.contains(rule) => {}
        other => panic!("{bytes:02x?}: expected refusal citing {rule}, got {other:?}"),
    }
}

/// A CONNECT with these flags and payload bytes: name "MQTT", level 4, keep-alive 60.
fn connect_bytes(flags: u8, payload: &[u8]) -> Vec<u8> {
    let mut body = vec![0, 4, b'M', b'Q', b'T', b'T', 4, flags, 0, 60];
    body.extend_from_slice(payload);
    let mut packet = vec![0x10, u8::try_from(body.len()).unwrap()];
    packet.extend(body);
    packet
}

/// A PUBLISH (QoS 0) to the topic with these raw bytes.
fn publish_to(topic: &[u8]) -> Vec<u8> {
    let mut packet = vec![0x30, u8::try_from(2 + topic.len()).unwrap(), 0];
    packet.push(u8::try_from(topic.len()).unwrap());
    packet.extend_from_slice(topic);
    packet
}

// ---- Fixed header: packet types and flags (section 2.2) ----

#[test]
fn mqtt_3_6_1_1_pubrel_flags_must_be_0010() {
    refused(&[0x60, 0x02, 0x00, 0x01], "MQTT-3.6.1-1");
    refused(&[0x63, 0x02, 0x00, 0x01], "MQTT-3.6.1-1");
    assert_eq!(accepted(&[0x62, 0x02, 0x00, 0x01]), Packet::PubRel(1));
}

#[test]
fn mqtt_3_8_1_1_subscribe_flags_must_be_0010() {
    // `80 ..`: SUBSCRIBE with flags 0000, refused on its first byte.
    refused(&[0x80], "MQTT-3.8.1-1");
    refused(
        &[0x80, 0x06, 0x00, 0x01, 0x00, 0x01, b'a', 0x00],
        "MQTT-3.8.1-1",
    );
    refused(
        &[0x83, 0x06, 0x00, 0x01, 0x00, 0x01, b'a', 0x00],
        "MQTT-3.8.1-1",
    );
}

#[test]
fn mqtt_3_10_1_1_unsubscribe_flags_must_be_0010() {
    // `a0 ..`: UNSUBSCRIBE with flags 0000.
    refused(&[0xa0], "MQTT-3.10.1-1");
    refused(&[0xa0, 0x05, 0x00, 0x01, 0x00, 0x01, b'a'], "MQTT-3.10.1-1");
}

#[test]
fn mqtt_2_2_2_2_reserved_flags_must_be_zero() {
    let cases: [&[u8]; 6] = [
        &[0x11],                   // CONNECT
        &[0x41, 0x02, 0x00, 0x01], // PUBACK
        &[0x58, 0x02, 0x00, 0x01], // PUBREC
        &[0x74, 0x02, 0x00, 0x01], // PUBCOMP
        &[0xc2, 0x00],             // PINGREQ
        &[0xe1, 0x00],             // DISCONNECT
    ];
    for bytes in cases {
        refused(bytes, "MQTT-2.2.2-2");
    }
}

#[test]
fn mqtt_3_3_1_4_publish_qos_3_refused() {
    refused(&[0x36], "MQTT-3.3.1-4");
    refused(&[0x36, 0x05, 0x00, 0x01, b'a', 0x00, 0x01], "MQTT-3.3.1-4");
}

#[test]
fn mqtt_3_3_1_2_dup_on_qos_0_refused() {
    refused(&[0x38, 0x03, 0x00, 0x01, b'a'], "MQTT-3.3.1-2");
    // DUP on QoS 1 is fine.
    let Packet::Publish(p) = accepted(&[0x3a, 0x05, 0x00, 0x01, b'a', 0x00, 0x07]) else {
        panic!("not a PUBLISH");
    };
    assert!(p.dup);
    assert_eq!(p.packet_id, Some(7));
}

#[test]
fn table_2_1_server_to_client_packets_refused() {
    refused(&[0x20, 0x02, 0x00, 0x00], "sent only by a server"); // CONNACK
    refused(&[0x90, 0x03, 0x00, 0x01, 0x00], "sent only by a server"); // SUBACK
    refused(&[0xb0, 0x02, 0x00, 0x01], "sent only by a server"); // UNSUBACK
    refused(&[0xd0, 0x00], "sent only by a server"); // PINGRESP
}

#[test]
fn table_2_1_reserved_packet_types_refused() {
    refused(&[0x00, 0x00], "reserved packet type");
    refused(&[0xf0, 0x00], "reserved packet type");
}

// ---- Remaining length (section 2.2.3) ----

#[test]
fn section_2_2_3_remaining_length_of_five_bytes_refused() {
    // Refused once the fourth length byte still has its continuation bit, before a fifth.
    refused(&[0x30, 0xff, 0xff, 0xff, 0xff], "longer than 4 bytes");
    refused(&[0x30, 0x80, 0x80, 0x80, 0x80, 0x00], "longer than 4 bytes");
}

#[test]
fn section_2_2_3_too_large_refused_before_the_body() {
    let decoder = Decoder::new(100);
    // Remaining length 98: 100 bytes in all, exactly the limit, so more bytes are needed.
    assert_eq!(
        decoder.decode(&mut BytesMut::from(&[0x30, 98][..])),
        Ok(None)
    );
    // Remaining length 99: 101 bytes, refused with only the header seen.
    assert_eq!(
        decoder.decode(&mut BytesMut::from(&[0x30, 99][..])),
        Err(DecodeError::TooLarge {
            size: 101,
            limit: 100
        })
    );
    // The largest length four bytes hold.
    assert_eq!(
        decoder.decode(&mut BytesMut::from(&[0x30, 0xff, 0xff, 0xff, 0x7f][..])),
        Err(DecodeError::TooLarge {
            size: 268_435_460,
            limit: 100
        })
    );
}

#[test]
fn section_2_2_3_non_minimal_remaining_length_accepted() {
    assert_eq!(accepted(&[0xc0, 0x80, 0x00]), Packet::PingReq);
    let Packet::Publish(p) = accepted(&[0x30, 0x83, 0x80, 0x00, 0x00, 0x01, b'a']) else {
        panic!("not a PUBLISH");
    };
    assert_eq!(p.topic, "a");
}

#[test]
fn section_3_12_pingreq_remaining_length_must_be_0() {
    // `c0 01 00`, refused as soon as the length is seen.
    refused(&[0xc0, 0x01], "remaining length other than 0");
    refused(&[0xc0, 0x01, 0x00], "remaining length other than 0");
    assert_eq!(accepted(&[0xc0, 0x00]), Packet::PingReq);
}

#[test]
fn section_3_14_disconnect_remaining_length_must_be_0() {
    refused(&[0xe0, 0x01, 0x00], "remaining length other than 0");
    assert_eq!(accepted(&[0xe0, 0x00]), Packet::Disconnect);
}

#[test]
fn sections_3_4_to_3_7_acks_remaining_length_must_be_2() {
    for first in [0x40, 0x50, 0x62, 0x70] {
        refused(
            &[first, 0x03, 0x00, 0x01, 0x00],
            "remaining length other than 2",
        );
        refused(&[first, 0x01, 0x01], "remaining length other than 2");
        refused(&[first, 0x00], "remaining length other than 2");
    }
}

// ---- CONNECT (section 3.1) ----

#[test]
fn mqtt_3_1_2_1_protocol_name_must_be_mqtt() {
    let mut bytes = connect_bytes(0x02, &[0, 0]);
    bytes[7] = b'X';
    refused(&bytes, "MQTT-3.1.2-1");
    // A wrong name is refused as such, whatever the level.
    bytes[8] = 3;
    refused(&bytes, "MQTT-3.1.2-1");
}

#[test]
fn mqtt_3_1_2_2_unsupported_level_is_answered() {
    let mut bytes = connect_bytes(0x02, &[0, 0]);
    bytes[8] = 5;
    assert_eq!(decode(&bytes), Err(DecodeError::UnsupportedLevel(5)));
    // MQTT 3.1.
    let mqisdp = [
        0x10, 0x0e, 0x00, 0x06, b'M', b'Q', b'I', b's', b'd', b'p', 0x03, 0x02, 0x00, 0x3c, 0x00,
        0x00,
    ];
    assert_eq!(decode(&mqisdp), Err(DecodeError::UnsupportedLevel(3)));
}

#[test]
fn mqtt_3_1_2_3_reserved_connect_flag_refused() {
    refused(&connect_bytes(0x03, &[0, 0]), "MQTT-3.1.2-3");
}

#[test]
fn mqtt_3_1_2_13_will_qos_without_will_refused() {
    refused(&connect_bytes(0x0a, &[0, 0]), "MQTT-3.1.2-13");
    refused(&connect_bytes(0x12, &[0, 0]), "MQTT-3.1.2-13");
}

#[test]
fn mqtt_3_1_2_15_will_retain_without_will_refused() {
    refused(&connect_bytes(0x22, &[0, 0]), "MQTT-3.1.2-15");
}

#[test]
fn mqtt_3_1_2_14_will_qos_3_refused() {
    // Will flag, will QoS 3, clean session; will topic "w", will message "m".
    refused(
        &connect_bytes(0x1e, &[0, 0, 0, 1, b'w', 0, 1, b'm']),
        "MQTT-3.1.2-14",
    );
}

#[test]
fn mqtt_3_1_2_22_password_without_username_refused() {
    refused(
        &connect_bytes(0x42, &[0, 0, 0, 2, b'p', b'w']),
        "MQTT-3.1.2-22",
    );
}

#[test]
fn mqtt_3_1_3_1_bytes_after_the_payload_refused() {
    refused(&connect_bytes(0x02, &[0, 0, 0xff]), "MQTT-3.1.3-1");
    // A password nobody announced.
    refused(
        &connect_bytes(0x82, &[0, 0, 0, 1, b'u', 0, 1, b'p']),
        "MQTT-3.1.3-1",
    );
}

#[test]
fn mqtt_3_1_3_1_fields_announced_by_flags_must_be_present() {
    // User name flag, no user name.
    refused(
        &connect_bytes(0x82, &[0, 0]),
        "runs past the remaining length",
    );
    // Will flag, no will topic or message.
    refused(
        &connect_bytes(0x06, &[0, 0]),
        "runs past the remaining length",
    );
    // Will topic but no will message.
    refused(
        &connect_bytes(0x06, &[0, 0, 0, 1, b'w']),
        "runs past the remaining length",
    );
    // No client identifier at all [MQTT-3.1.3-3].
    refused(&connect_bytes(0x02, &[]), "runs past the remaining length");
}

#[test]
fn mqtt_3_1_3_6_empty_client_id_accepted() {
    let Packet::Connect(c) = accepted(&connect_bytes(0x02, &[0, 0])) else {
        panic!("not a CONNECT");
    };
    assert_eq!(
        c,
        Connect {
            level: 4,
            clean_session: true,
            keep_alive: 60,
            client_id: String::new(),
            will: None,
            username: None,
            password: None,
        }
    );
}

#[test]
fn connect_with_every_field_decodes() {
    // Client id "c", will at QoS 1 retained to "w" with message "m", user "u", password "p".
    let bytes = connect_bytes(
        0xee,
        &[0, 1, b'c', 0, 1, b'w', 0, 1, b'm', 0, 1, b'u', 0, 1, b'p'],
    );
    let Packet::Connect(c) = accepted(&bytes) else {
        panic!("not a CONNECT");
    };
    assert_eq!(c.client_id, "c");
    assert_eq!(
        c.will,
        Some(Will {
            topic: "w".into(),
            payload: Bytes::from_static(b"m"),
            qos: QoS::AtLeastOnce,
            retain: true,
        })
    );
    assert_eq!(c.username.as_deref(), Some("u"));
    assert_eq!(c.password.as_deref(), Some(&b"p"[..]));
}

#[test]
fn mqtt_4_7_1_1_will_topic_with_wildcard_refused() {
    refused(
        &connect_bytes(0x06, &[0, 0, 0, 1, b'#', 0, 0]),
        "MQTT-4.7.1-1",
    );
    refused(&connect_bytes(0x06, &[0, 0, 0, 0, 0, 0]), "MQTT-4.7.3-1");
}

// ---- Strings (section 1.5.3) ----

#[test]
fn mqtt_1_5_3_1_ill_formed_utf8_refused() {
    // A UTF-16 surrogate (U+D800) encoded as if it were a character, as the client id.
    refused(
        &connect_bytes(0x02, &[0, 3, 0xed, 0xa0, 0x80]),
        "MQTT-1.5.3-1",
    );
    // A lone continuation byte in a topic name.
    refused(&publish_to(&[b'a', 0x80]), "MQTT-1.5.3-1");
    // An overlong encoding of '/'.
    refused(&publish_to(&[0xc0, 0xaf]), "MQTT-1.5.3-1");
}

#[test]
fn mqtt_1_5_3_2_nul_refused() {
    refused(&publish_to(&[b'a', 0x00, b'b']), "MQTT-1.5.3-2");
    refused(&connect_bytes(0x02, &[0, 1, 0x00]), "MQTT-1.5.3-2");
    refused(
        &connect_bytes(0x82, &[0, 0, 0, 2, b'u', 0x00]),
        "MQTT-1.5.3-2",
    );
}

#[test]
fn mqtt_1_5_3_3_byte_order_mark_kept() {
    let Packet::Publish(p) = accepted(&publish_to(&[0xef, 0xbb, 0xbf, b'a'])) else {
        panic!("not a PUBLISH");
    };
    assert_eq!(p.topic, "\u{feff}a");
}

// ---- PUBLISH (section 3.3) ----

#[test]
fn mqtt_4_7_3_1_empty_topic_name_refused() {
    refused(&[0x30, 0x02, 0x00, 0x00], "MQTT-4.7.3-1");
}

#[test]
fn mqtt_3_3_2_2_wildcard_in_topic_name_refused() {
    refused(&publish_to(b"a/+"), "MQTT-3.3.2-2");
    refused(&publish_to(b"#"), "MQTT-3.3.2-2");
}

#[test]
fn mqtt_2_3_1_1_publish_packet_id_0_refused() {
    refused(&[0x32, 0x05, 0x00, 0x01, b'a', 0x00, 0x00], "MQTT-2.3.1-1");
    refused(&[0x34, 0x05, 0x00, 0x01, b'a', 0x00, 0x00], "MQTT-2.3.1-1");
}

#[test]
fn mqtt_2_3_1_1_publish_qos_1_needs_a_packet_id() {
    refused(
        &[0x32, 0x03, 0x00, 0x01, b'a'],
        "runs past the remaining length",
    );
    refused(
        &[0x32, 0x04, 0x00, 0x01, b'a', 0x00],
        "runs past the remaining length",
    );
}

#[test]
fn mqtt_2_3_1_5_publish_qos_0_has_no_packet_id() {
    // What would be a packet id is payload at QoS 0.
    let Packet::Publish(p) = accepted(&[0x31, 0x05, 0x00, 0x01, b'a', 0x00, 0x07]) else {
        panic!("not a PUBLISH");
    };
    assert_eq!(
        p,
        Publish {
            dup: false,
            qos: QoS::AtMostOnce,
            retain: true,
            topic: "a".into(),
            packet_id: None,
            payload: Bytes::from_static(&[0x00, 0x07]),
        }
    );
}

#[test]
fn section_3_3_3_empty_payload_accepted() {
    let Packet::Publish(p) = accepted(&[0x30, 0x03, 0x00, 0x01, b'a']) else {
        panic!("not a PUBLISH");
    };
    assert!(p.payload.is_empty());
    let Packet::Publish(p) = accepted(&[0x34, 0x05, 0x00, 0x01, b'a', 0x01, 0x00]) else {
        panic!("not a PUBLISH");
    };
    assert_eq!((p.qos, p.packet_id), (QoS::ExactlyOnce, Some(256)));
    assert!(p.payload.is_empty());
}

#[test]
fn publish_topic_running_past_the_packet_refused() {
    refused(
        &[0x30, 0x03, 0x00, 0x05, b'a'],
        "runs past the remaining length",
    );
    refused(&[0x30, 0x01, 0x00], "runs past the remaining length");
}

// ---- SUBSCRIBE (section 3.8) ----

#[test]
fn mqtt_2_3_1_1_subscribe_packet_id_0_refused() {
    refused(
        &[0x82, 0x06, 0x00, 0x00, 0x00, 0x01, b'a', 0x00],
        "MQTT-2.3.1-1",
    );
}

#[test]
fn mqtt_3_8_3_3_subscribe_needs_a_filter() {
    refused(&[0x82, 0x02, 0x00, 0x01], "MQTT-3.8.3-3");
}

#[test]
fn mqtt_3_8_3_4_requested_qos_reserved_bits_refused() {
    for options in [0xfd, 0x03, 0x04, 0x80] {
        refused(
            &[0x82, 0x06, 0x00, 0x01, 0x00, 0x01, b'a', options],
            "MQTT-3-8.3-4",
        );
    }
}

#[test]
fn mqtt_4_7_1_2_subscribe_invalid_filter_refused() {
    refused(
        &[0x82, 0x07, 0x00, 0x01, 0x00, 0x02, b'a', b'#', 0x00],
        "MQTT-4.7.1-2",
    );
    refused(
        &[0x82, 0x08, 0x00, 0x01, 0x00, 0x03, b'#', b'/', b'a', 0x00],
        "MQTT-4.7.1-2",
    );
    refused(
        &[0x82, 0x07, 0x00, 0x01, 0x00, 0x02, b'a', b'+', 0x00],
        "MQTT-4.7.1-3",
    );
    refused(&[0x82, 0x05, 0x00, 0x01, 0x00, 0x00, 0x00], "MQTT-4.7.3-1");
}

#[test]
fn subscribe_filter_without_its_qos_refused() {
    refused(
        &[0x82, 0x05, 0x00, 0x01, 0x00, 0x01, b'a'],
        "runs past the remaining length",
    );
}

#[test]
fn subscribe_with_two_filters_decodes() {
    let bytes = [
        0x82, 0x0c, 0x00, 0x0a, 0x00, 0x03, b'a', b'/', b'+', 0x01, 0x00, 0x01, b'#', 0x02,
    ];
    assert_eq!(
        accepted(&bytes),
        Packet::Subscribe(Subscribe {
            packet_id: 10,
            filters: vec![
                ("a/+".into(), QoS::AtLeastOnce),
                ("#".into(), QoS::ExactlyOnce)
            ],
        })
    );
}

// ---- UNSUBSCRIBE (section 3.10) ----

#[test]
fn mqtt_3_10_3_2_unsubscribe_needs_a_filter() {
    refused(&[0xa2, 0x02, 0x00, 0x05], "MQTT-3.10.3-2");
}

#[test]
fn mqtt_2_3_1_1_unsubscribe_packet_id_0_refused() {
    refused(&[0xa2, 0x05, 0x00, 0x00, 0x00, 0x01, b'a'], "MQTT-2.3.1-1");
}

#[test]
fn mqtt_4_7_1_3_unsubscribe_invalid_filter_refused() {
    refused(
        &[0xa2, 0x06, 0x00, 0x01, 0x00, 0x02, b'+', b'a'],
        "MQTT-4.7.1-3",
    );
    assert_eq!(
        accepted(&[0xa2, 0x06, 0x00, 0x01, 0x00, 0x02, b'a', b'/']),
        Packet::Unsubscribe(Unsubscribe {
            packet_id: 1,
            filters: vec!["a/".into()],
        })
    );
}

// ---- PUBACK, PUBREC, PUBREL, PUBCOMP (sections 3.4-3.7) ----

#[test]
fn mqtt_2_3_1_1_ack_packet_id_0_refused() {
    for first in [0x40, 0x50, 0x62, 0x70] {
        refused(&[first, 0x02, 0x00, 0x00], "MQTT-2.3.1-1");
    }
    assert_eq!(accepted(&[0x40, 0x02, 0xff, 0xfe]), Packet::PubAck(0xfffe));
    assert_eq!(accepted(&[0x50, 0x02, 0x00, 0x01]), Packet::PubRec(1));
    assert_eq!(accepted(&[0x70, 0x02, 0x01, 0x00]), Packet::PubComp(256));
}

// ---- Framing ----

#[test]
fn incomplete_packets_need_more_and_consume_nothing() {
    let decoder = Decoder::new(LIMIT);
    for bytes in [
        &[][..],
        &[0x30],
        &[0x30, 0x80],
        &[0x30, 0x05, 0x00, 0x01],
        &[0x40, 0x02, 0x00],
    ] {
        let mut buf = BytesMut::from(bytes);
        assert_eq!(decoder.decode(&mut buf), Ok(None), "{bytes:02x?}");
        assert_eq!(&buf[..], bytes);
    }
}

#[test]
fn one_packet_at_a_time() {
    let decoder = Decoder::new(LIMIT);
    let mut buf = BytesMut::from(&[0xc0, 0x00, 0x40, 0x02, 0x00, 0x09, 0xe0][..]);
    assert_eq!(decoder.decode(&mut buf), Ok(Some(Packet::PingReq)));
    assert_eq!(decoder.decode(&mut buf), Ok(Some(Packet::PubAck(9))));
    assert_eq!(decoder.decode(&mut buf), Ok(None));
    assert_eq!(&buf[..], &[0xe0]);
}

// ---- Encoding ----

fn encoded(packet: &Packet) -> Vec<u8> {
    let mut out = BytesMut::new();
    encode(packet, &mut out).unwrap();
    assert_eq!(out.len(), packet.encoded_len(), "{}", packet.name());
    out.to_vec()
}

/// Asserts that `packet` is refused with `error` and nothing is appended.
fn not_encoded(packet: &Packet, error: EncodeError) {
    let mut out = BytesMut::from(&b"before"[..]);
    assert_eq!(encode(packet, &mut out), Err(error), "{}", packet.name());
    assert_eq!(&out[..], b"before");
}

fn invalid(packet: &'static str, rule: &'static str) -> EncodeError {
    EncodeError::Invalid { packet, rule }
}

fn publish(qos: QoS, packet_id: Option<u16>, topic: &str, payload: Bytes) -> Packet {
    Packet::Publish(Publish {
        dup: false,
        qos,
        retain: false,
        topic: topic.into(),
        packet_id,
        payload,
    })
}

#[test]
fn server_packets_encode_to_their_wire_form() {
    let connack = |session_present, code| {
        Packet::ConnAck(ConnAck {
            session_present,
            code,
        })
    };
    assert_eq!(
        encoded(&connack(true, ConnectCode::Accepted)),
        [0x20, 0x02, 0x01, 0x00]
    );
    assert_eq!(
        encoded(&connack(false, ConnectCode::NotAuthorized)),
        [0x20, 0x02, 0x00, 0x05]
    );
    assert_eq!(
        encoded(&Packet::SubAck(SubAck {
            packet_id: 7,
            codes: vec![
                SubAckCode::Granted(QoS::AtMostOnce),
                SubAckCode::Granted(QoS::ExactlyOnce),
                SubAckCode::Failure
            ],
        })),
        [0x90, 0x05, 0x00, 0x07, 0x00, 0x02, 0x80]
    );
    assert_eq!(encoded(&Packet::UnsubAck(9)), [0xb0, 0x02, 0x00, 0x09]);
    assert_eq!(encoded(&Packet::PingResp), [0xd0, 0x00]);
    assert_eq!(encoded(&Packet::PubRel(0x1234)), [0x62, 0x02, 0x12, 0x34]);
    assert_eq!(
        encoded(&Packet::Publish(Publish {
            dup: true,
            qos: QoS::AtLeastOnce,
            retain: true,
            topic: "t".into(),
            packet_id: Some(3),
            payload: Bytes::from_static(b"hi"),
        })),
        [0x3b, 0x07, 0x00, 0x01, b't', 0x00, 0x03, b'h', b'i']
    );
}

#[test]
fn connect_encodes_to_what_the_decoder_reads() {
    let connect = Connect {
        level: 4,
        clean_session: true,
        keep_alive: 60,
        client_id: "c".into(),
        will: Some(Will {
            topic: "w".into(),
            payload: Bytes::from_static(b"m"),
            qos: QoS::AtLeastOnce,
            retain: true,
        }),
        username: Some("u".into()),
        password: Some(Bytes::from_static(b"p")),
    };
    let bytes = connect_bytes(
        0xee,
        &[0, 1, b'c', 0, 1, b'w', 0, 1, b'm', 0, 1, b'u', 0, 1, b'p'],
    );
    assert_eq!(encoded(&Packet::Connect(connect.clone())), bytes);
    // Other levels, for testing servers: MQTT 3.1 goes by its own name.
    let v31 = Packet::Connect(Connect {
        level: 3,
        will: None,
        username: None,
        password: None,
        ..connect
    });
    assert_eq!(&encoded(&v31)[2..10], b"\x00\x06MQIsdp");
    assert_eq!(
        decode(&encoded(&v31)),
        Err(DecodeError::UnsupportedLevel(3))
    );
}

#[test]
fn encode_refuses_qos_and_packet_id_mismatches() {
    let payload = Bytes::new();
    not_encoded(
        &publish(QoS::AtMostOnce, Some(1), "a", payload.clone()),
        invalid("PUBLISH", "packet identifier on QoS 0 [MQTT-2.3.1-5]"),
    );
    not_encoded(
        &publish(QoS::AtLeastOnce, None, "a", payload.clone()),
        invalid(
            "PUBLISH",
            "no packet identifier on QoS 1 or 2 [MQTT-2.3.1-1]",
        ),
    );
    not_encoded(
        &publish(QoS::ExactlyOnce, Some(0), "a", payload),
        invalid("PUBLISH", "packet identifier 0 [MQTT-2.3.1-1]"),
    );
    not_encoded(
        &Packet::Publish(Publish {
            dup: true,
            qos: QoS::AtMostOnce,
            retain: false,
            topic: "a".into(),
            packet_id: None,
            payload: Bytes::new(),
        }),
        invalid("PUBLISH", "DUP set on QoS 0 [MQTT-3.3.1-2]"),
    );
}

#[test]
fn encode_refuses_packet_id_0() {
    let rule = "packet identifier 0 [MQTT-2.3.1-1]";
    not_encoded(&Packet::PubAck(0), invalid("PUBACK", rule));
    not_encoded(&Packet::PubRec(0), invalid("PUBREC", rule));
    not_encoded(&Packet::PubRel(0), invalid("PUBREL", rule));
    not_encoded(&Packet::PubComp(0), invalid("PUBCOMP", rule));
    not_encoded(&Packet::UnsubAck(0), invalid("UNSUBACK", rule));
    not_encoded(
        &Packet::Subscribe(Subscribe {
            packet_id: 0,
            filters: vec![("a".into(), QoS::AtMostOnce)],
        }),
        invalid("SUBSCRIBE", rule),
    );
    not_encoded(
        &Packet::SubAck(SubAck {
            packet_id: 0,
            codes: vec![SubAckCode::Failure],
        }),
        invalid("SUBACK", rule),
    );
    not_encoded(
        &Packet::Unsubscribe(Unsubscribe {
            packet_id: 0,
            filters: vec!["a".into()],
        }),
        invalid("UNSUBSCRIBE", rule),
    );
}

#[test]
fn encode_refuses_empty_filter_lists() {
    not_encoded(
        &Packet::Subscribe(Subscribe {
            packet_id: 1,
            filters: vec![],
        }),
        invalid("SUBSCRIBE", "no topic filter [MQTT-3.8.3-3]"),
    );
    not_encoded(
        &Packet::Unsubscribe(Unsubscribe {
            packet_id: 1,
            filters: vec![],
        }),
        invalid("UNSUBSCRIBE", "no topic filter [MQTT-3.10.3-2]"),
    );
    not_encoded(
        &Packet::SubAck(SubAck {
            packet_id: 1,
            codes: vec![],
        }),
        invalid("SUBACK", "no return code (section 3.9.3)"),
    );
}

#[test]
fn encode_refuses_strings_over_65535_bytes() {
    let long = "a".repeat(65_536);
    not_encoded(
        &publish(QoS::AtMostOnce, None, &long, Bytes::new()),
        EncodeError::StringTooLong(65_536),
    );
    // 65,535 bytes fit.
    let packet = publish(QoS::AtMostOnce, None, &long[1..], Bytes::new());
    assert_eq!(accepted(&encoded(&packet)), packet);
    not_encoded(
        &Packet::Unsubscribe(Unsubscribe {
            packet_id: 1,
            filters: vec!["a".into(), long.clone()],
        }),
        EncodeError::StringTooLong(65_536),
    );
    let connect = Connect {
        level: 4,
        clean_session: true,
        keep_alive: 0,
        client_id: long.clone(),
        will: None,
        username: None,
        password: None,
    };
    not_encoded(
        &Packet::Connect(connect.clone()),
        EncodeError::StringTooLong(65_536),
    );
    not_encoded(
        &Packet::Connect(Connect {
            client_id: String::new(),
            username: Some(String::new()),
            password: Some(Bytes::from(vec![0; 70_000])),
            ..connect
        }),
        EncodeError::StringTooLong(70_000),
    );
}

#[test]
fn encode_refuses_what_a_strict_decoder_would() {
    not_encoded(
        &publish(QoS::AtMostOnce, None, "a/#", Bytes::new()),
        invalid(
            "PUBLISH",
            "topic name empty or with wildcards [MQTT-4.7.3-1], [MQTT-3.3.2-2]",
        ),
    );
    not_encoded(
        &Packet::Subscribe(Subscribe {
            packet_id: 1,
            filters: vec![("a/#/b".into(), QoS::AtMostOnce)],
        }),
        invalid(
            "SUBSCRIBE",
            "invalid topic filter [MQTT-4.7.1-2], [MQTT-4.7.1-3], [MQTT-4.7.3-1]",
        ),
    );
    let connect = Connect {
        level: 4,
        clean_session: true,
        keep_alive: 0,
        client_id: "a\0".into(),
        will: None,
        username: None,
        password: None,
    };
    not_encoded(
        &Packet::Connect(connect.clone()),
        invalid("CONNECT", "U+0000 in a string [MQTT-1.5.3-2]"),
    );
    not_encoded(
        &Packet::Connect(Connect {
            client_id: "a".into(),
            password: Some(Bytes::new()),
            ..connect
        }),
        invalid("CONNECT", "password without a user name [MQTT-3.1.2-22]"),
    );
    not_encoded(
        &Packet::ConnAck(ConnAck {
            session_present: true,
            code: ConnectCode::IdentifierRejected,
        }),
        invalid("CONNACK", "session present with a refusal [MQTT-3.2.2-4]"),
    );
}

#[test]
fn encode_refuses_packets_over_the_largest_remaining_length() {
    // Zeroed and never written, so this costs address space rather than memory.
    let payload = Bytes::from(vec![0u8; 268_435_455 - 3]);
    let too_large = publish(QoS::AtMostOnce, None, "ab", payload.clone());
    not_encoded(&too_large, EncodeError::TooLarge(268_435_462));
    // One byte shorter fits: measured, not written.
    let largest = publish(QoS::AtMostOnce, None, "a", payload);
    assert_eq!(largest.encoded_len(), 268_435_460);
}

#[test]
fn remaining_length_boundaries_round_trip() {
    // Remaining lengths 127/128, 16,383/16,384 and 2,097,151/2,097,152: one more length byte.
    for (remaining, header) in [
        (127, 2),
        (128, 3),
        (16_383, 3),
        (16_384, 4),
        (2_097_151, 4),
        (2_097_152, 5),
    ] {
        let packet = publish(
            QoS::AtMostOnce,
            None,
            "a",
            Bytes::from(vec![7u8; remaining - 3]),
        );
        let bytes = encoded(&packet);
        assert_eq!(bytes.len(), header + remaining);
        let mut buf = BytesMut::from(&bytes[..]);
        assert_eq!(Decoder::new(bytes.len()).decode(&mut buf), Ok(Some(packet)));
        assert!(buf.is_empty());
    }
}

mod properties {
    use super::*;
    use proptest::collection::vec;
    use proptest::prelude::*;

    fn qos() -> impl Strategy<Value = QoS> {
        prop_oneof![
            Just(QoS::AtMostOnce),
            Just(QoS::AtLeastOnce),
            Just(QoS::ExactlyOnce)
        ]
    }

    fn packet_id() -> impl Strategy<Value = u16> {
        1..=u16::MAX
    }

    fn payload() -> impl Strategy<Value = Bytes> {
        vec(any::<u8>(), 0..48).prop_map(Bytes::from)
    }

    /// Any string (U+FEFF, multi-byte characters, wildcards) without U+0000.
    fn text() -> impl Strategy<Value = String> {
        "[^\u{0}]{0,12}"
    }

    fn topic_name() -> impl Strategy<Value = String> {
        "[^\u{0}+#]{1,12}"
    }

    fn topic_filter() -> impl Strategy<Value = String> {
        let level = prop_oneof![Just("+".to_owned()), "[^\u{0}+#/]{0,4}"];
        (vec(level, 1..4), any::<bool>()).prop_map(|(levels, multi)| {
            let mut filter = levels.join("/");
            if multi {
                filter.push_str(if filter.is_empty() { "#" } else { "/#" });
            }
            if filter.is_empty() {
                filter.push('a');
            }
            filter
        })
    }

    fn will() -> impl Strategy<Value = Will> {
        (topic_name(), payload(), qos(), any::<bool>()).prop_map(|(topic, payload, qos, retain)| {
            Will {
                topic,
                payload,
                qos,
                retain,
            }
        })
    }

    fn connect() -> impl Strategy<Value = Connect> {
        (
            any::<bool>(),
            any::<u16>(),
            text(),
            proptest::option::of(will()),
            proptest::option::of((text(), proptest::option::of(payload()))),
        )
            .prop_map(|(clean_session, keep_alive, client_id, will, login)| {
                let (username, password) = match login {
                    Some((user, password)) => (Some(user), password),
                    None => (None, None),
                };
                Connect {
                    level: 4,
                    clean_session,
                    keep_alive,
                    client_id,
                    will,
                    username,
                    password,
                }
            })
    }

    fn publish_packet() -> impl Strategy<Value = Publish> {
        (
            qos(),
            any::<bool>(),
            any::<bool>(),
            topic_name(),
            packet_id(),
            payload(),
        )
            .prop_map(|(qos, dup, retain, topic, id, payload)| {
                let at_least_once = qos != QoS::AtMostOnce;
                Publish {
                    dup: dup && at_least_once,
                    qos,
                    retain,
                    topic,
                    packet_id: at_least_once.then_some(id),
                    payload,
                }
            })
    }

    /// Any valid packet a client sends a server.
    pub(super) fn client_packet() -> impl Strategy<Value = Packet> {
        prop_oneof![
            connect().prop_map(Packet::Connect),
            publish_packet().prop_map(Packet::Publish),
            packet_id().prop_map(Packet::PubAck),
            packet_id().prop_map(Packet::PubRec),
            packet_id().prop_map(Packet::PubRel),
            packet_id().prop_map(Packet::PubComp),
            (packet_id(), vec((topic_filter(), qos()), 1..4)).prop_map(|(packet_id, filters)| {
                Packet::Subscribe(Subscribe { packet_id, filters })
            }),
            (packet_id(), vec(topic_filter(), 1..4)).prop_map(|(packet_id, filters)| {
                Packet::Unsubscribe(Unsubscribe { packet_id, filters })
            }),
            Just(Packet::PingReq),
            Just(Packet::Disconnect),
        ]
    }

    /// Any packet at all, valid or not: ids may be 0, topics may hold wildcards or U+0000,
    /// lists may be empty, CONNECT may carry any level.
    fn any_packet() -> impl Strategy<Value = Packet> {
        let id = any::<u16>();
        let string = "[a+#/\u{0}\u{feff}é]{0,6}";
        // Mostly level 4, so that the rest of the CONNECT gets checked too.
        let level = prop_oneof![3 => Just(4u8), 1 => any::<u8>()];
        let connect = (
            level,
            string,
            proptest::option::of((string, payload(), qos(), any::<bool>())),
            proptest::option::of(string),
            proptest::option::of(payload()),
        )
            .prop_map(|(level, client_id, will, username, password)| {
                Packet::Connect(Connect {
                    level,
                    clean_session: false,
                    keep_alive: 10,
                    client_id,
                    will: will.map(|(topic, payload, qos, retain)| Will {
                        topic,
                        payload,
                        qos,
                        retain,
                    }),
                    username,
                    password,
                })
            });
        let code = prop_oneof![
            Just(ConnectCode::Accepted),
            Just(ConnectCode::UnacceptableProtocolVersion),
            Just(ConnectCode::IdentifierRejected),
            Just(ConnectCode::ServerUnavailable),
            Just(ConnectCode::BadUserNameOrPassword),
            Just(ConnectCode::NotAuthorized),
        ];
        let suback_code = prop_oneof![
            qos().prop_map(SubAckCode::Granted),
            Just(SubAckCode::Failure)
        ];
        prop_oneof![
            connect,
            (any::<bool>(), code).prop_map(|(session_present, code)| Packet::ConnAck(ConnAck {
                session_present,
                code
            })),
            (
                any::<bool>(),
                qos(),
                any::<bool>(),
                string,
                proptest::option::of(id),
                payload()
            )
                .prop_map(|(dup, qos, retain, topic, packet_id, payload)| {
                    Packet::Publish(Publish {
                        dup,
                        qos,
                        retain,
                        topic,
                        packet_id,
                        payload,
                    })
                }),
            id.prop_map(Packet::PubAck),
            id.prop_map(Packet::PubRec),
            id.prop_map(Packet::PubRel),
            id.prop_map(Packet::PubComp),
            id.prop_map(Packet::UnsubAck),
            (id, vec((string, qos()), 0..3)).prop_map(|(packet_id, filters)| Packet::Subscribe(
                Subscribe { packet_id, filters }
            )),
            (id, vec(suback_code, 0..3))
                .prop_map(|(packet_id, codes)| Packet::SubAck(SubAck { packet_id, codes })),
            (id, vec(string, 0..3)).prop_map(|(packet_id, filters)| Packet::Unsubscribe(
                Unsubscribe { packet_id, filters }
            )),
            Just(Packet::PingReq),
            Just(Packet::PingResp),
            Just(Packet::Disconnect),
        ]
    }

    fn is_client_packet(packet: &Packet) -> bool {
        !matches!(
            packet,
            Packet::ConnAck(_) | Packet::SubAck(_) | Packet::UnsubAck(_) | Packet::PingResp
        )
    }

    /// Decodes everything in `buf`; stops at the first `Ok(None)`.
    fn decode_all(decoder: &Decoder, buf: &mut BytesMut) -> Vec<Packet> {
        let mut packets = Vec::new();
        while let Some(packet) = decoder.decode(buf).unwrap() {
            packets.push(packet);
        }
        packets
    }

    proptest! {
        #[test]
        fn client_packets_round_trip(packet in client_packet()) {
            let mut buf = BytesMut::new();
            encode(&packet, &mut buf).unwrap();
            prop_assert_eq!(buf.len(), packet.encoded_len());
            let decoded = Decoder::new(buf.len()).decode(&mut buf).unwrap();
            prop_assert_eq!(decoded, Some(packet));
            prop_assert!(buf.is_empty());
        }

        /// Whatever `encode` accepts is valid: it appends exactly `encoded_len` bytes, and a
        /// strict decoder reads client packets back unchanged. Whatever it refuses leaves the
        /// buffer alone.
        #[test]
        fn encode_writes_only_valid_packets(packet in any_packet()) {
            let mut out = BytesMut::from(&b"xy"[..]);
            match encode(&packet, &mut out) {
                Err(_) => prop_assert_eq!(&out[..], b"xy"),
                Ok(()) => {
                    prop_assert_eq!(out.len(), 2 + packet.encoded_len());
                    let mut wire = out.split_off(2);
                    if let Packet::Connect(c) = &packet {
                        if c.level != 4 {
                            let refused = Decoder::new(LIMIT).decode(&mut wire);
                            prop_assert_eq!(refused, Err(DecodeError::UnsupportedLevel(c.level)));
                            return Ok(());
                        }
                    }
                    if is_client_packet(&packet) {
                        prop_assert_eq!(Decoder::new(LIMIT).decode(&mut wire), Ok(Some(packet)));
                        prop_assert!(wire.is_empty());
                    }
                }
            }
        }

        /// Arbitrary bytes: each call either needs more (consuming nothing), takes a packet
        /// off (consuming something), or refuses; never a panic, never a loop.
        #[test]
        fn arbitrary_bytes_never_panic(bytes in vec(any::<u8>(), 0..256), limit in 0usize..300) {
            let decoder = Decoder::new(limit);
            let mut buf = BytesMut::from(&bytes[..]);
            loop {
                let before = buf.len();
                match decoder.decode(&mut buf) {
                    Ok(None) => {
                        prop_assert_eq!(buf.len(), before);
                        break;
                    }
                    Ok(Some(packet)) => {
                        prop_assert!(buf.len() < before);
                        prop_assert!(before - buf.len() <= limit);
                        // What the decoder accepts, the encoder can write again.
                        prop_assert!(encode(&packet, &mut BytesMut::new()).is_ok());
                    }
                    Err(_) => break,
                }
            }
        }

        /// Valid packets with a byte changed, dropped or added: the decoder copes, and
        /// anything it still accepts survives a round trip through the encoder.
        #[test]
        fn mutated_packets_never_panic(
            packet in client_packet(),
            at in any::<proptest::sample::Index>(),
            byte in any::<u8>(),
            how in 0u8..3,
        ) {
            let mut wire = BytesMut::new();
            encode(&packet, &mut wire).unwrap();
            let i = at.index(wire.len());
            let mut bytes = wire.to_vec();
            match how {
                0 => bytes[i] = byte,
                1 => { bytes.remove(i); }
                _ => bytes.insert(i, byte),
            }
            let decoder = Decoder::new(LIMIT);
            let mut buf = BytesMut::from(&bytes[..]);
            while let Ok(Some(decoded)) = decoder.decode(&mut buf) {
                let mut again = BytesMut::new();
                encode(&decoded, &mut again).unwrap();
                prop_assert_eq!(decoder.decode(&mut again), Ok(Some(decoded)));
            }
        }

        /// A stream of valid packets split at any point decodes to the same packets.
        #[test]
        fn split_streams_decode_the_same(packets in vec(client_packet(), 1..5)) {
            let mut wire = BytesMut::new();
            for packet in &packets {
                encode(packet, &mut wire).unwrap();
            }
            let decoder = Decoder::new(LIMIT);
            for split in 0..=wire.len() {
                let mut buf = BytesMut::from(&wire[..split]);
                let mut decoded = decode_all(&decoder, &mut buf);
                buf.extend_from_slice(&wire[split..]);
                decoded.extend(decode_all(&decoder, &mut buf));
                prop_assert_eq!(&decoded, &packets);
                prop_assert!(buf.is_empty());
            }
        }
    }

    #[test]
    fn byte_by_byte_stream_decodes_the_same() {
        let packets = [
            Packet::PingReq,
            Packet::PubRel(3),
            Packet::Subscribe(Subscribe {
                packet_id: 4,
                filters: vec![("a/+/#".into(), QoS::ExactlyOnce)],
            }),
            publish(
                QoS::AtLeastOnce,
                Some(5),
                "t/\u{feff}",
                Bytes::from(vec![1; 300]),
            ),
            Packet::Disconnect,
        ];
        let mut wire = BytesMut::new();
        for packet in &packets {
            encode(packet, &mut wire).unwrap();
        }
        let decoder = Decoder::new(LIMIT);
        let mut buf = BytesMut::new();
        let mut decoded = Vec::new();
        for &byte in wire.iter() {
            buf.extend_from_slice(&[byte]);
            decoded.extend(decode_all(&decoder, &mut buf));
        }
        assert_eq!(decoded, packets);
    }
}
