//! One live connection: the packets waiting to be written, and the incoming publishes and
//! PUBRELs not yet answered, in the order the client sent them.

use std::collections::VecDeque;
use std::sync::Arc;

use bytes::Bytes;

use super::types::{SessionIdx, StoreSeq};
use crate::codec::{Packet, QoS, Will};

/// An incoming PUBLISH, its topic already shared.
#[derive(Debug, Clone)]
pub(super) struct InPublish {
    pub(super) topic: Arc<str>,
    pub(super) payload: Bytes,
    pub(super) qos: QoS,
    pub(super) retain: bool,
    /// `Some` exactly for QoS 1/2.
    pub(super) packet_id: Option<u16>,
    /// The authorizer refused it when it arrived: answered in turn, never routed.
    pub(super) denied: bool,
}

/// An entry of a connection's incoming pipeline.
#[derive(Debug)]
pub(super) enum Inbound {
    /// Not routed yet (it waits for room in a subscriber's queue, or behind one that does).
    Publish(InPublish),
    /// PUBREL not processed yet (behind a held publish).
    PubRel(u16),
    /// Processed; `packet` (if any) goes out once writes up to `need` are durable and every
    /// earlier entry is answered.
    Answer {
        packet: Option<Packet>,
        need: StoreSeq,
    },
    /// A SUBACK or UNSUBACK: goes out once writes up to `need` are durable and every earlier
    /// entry is answered. Not a held publish.
    Control { packet: Packet, need: StoreSeq },
}

/// A connection whose CONNECT was accepted.
#[derive(Debug)]
pub(super) struct Conn {
    pub(super) session: SessionIdx,
    /// Answers ready to write (CONNACK, SUBACK, PUBACK, PUBREL, ...), in order.
    pub(super) control: VecDeque<Packet>,
    /// Incoming entries: `[0, processed)` are answers, the rest wait to be processed.
    pub(super) inbound: VecDeque<Inbound>,
    pub(super) processed: usize,
    /// QoS 1/2 publishes and PUBRELs in `inbound` (received, not yet answered).
    pub(super) held: usize,
    /// QoS 0 publishes waiting in `inbound` behind a held one.
    pub(super) qos0_waiting: usize,
    pub(super) will: Option<Will>,
    /// An [`super::Action::Transmit`] was emitted and `transmit` has not run since.
    pub(super) transmit_wanted: bool,
    /// The session whose full queue holds the next entry (registered as its waiter).
    pub(super) blocked_on: Option<SessionIdx>,
    /// Highest store position this connection has asked to be woken at.
    pub(super) durable_wait: StoreSeq,
    /// PUBRELs for messages sent to the client, each waiting for its release write to be
    /// durable, in write order.
    pub(super) rel_waiting: VecDeque<(StoreSeq, u16)>,
}

impl Conn {
    pub(super) fn new(session: SessionIdx, will: Option<Will>) -> Self {
        Conn {
            session,
            control: VecDeque::new(),
            inbound: VecDeque::new(),
            processed: 0,
            held: 0,
            qos0_waiting: 0,
            will,
            transmit_wanted: false,
            blocked_on: None,
            durable_wait: 0,
            rel_waiting: VecDeque::new(),
        }
    }
}

/// The answer to an incoming publish at `qos` with `packet_id`.
pub(super) fn answer_for(qos: QoS, packet_id: Option<u16>) -> Option<Packet> {
    match (qos, packet_id) {
        (QoS::AtLeastOnce, Some(id)) => Some(Packet::PubAck(id)),
        (QoS::ExactlyOnce, Some(id)) => Some(Packet::PubRec(id)),
        _ => None,
    }
}
