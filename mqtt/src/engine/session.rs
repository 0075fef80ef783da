//! One session's state: its subscriptions, its outgoing queue and in-flight window, and the
//! incoming QoS 2 packet ids it has not seen released yet.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::Instant;

pub(super) use super::types::SessionIdx;
use super::types::{ConnId, Message, SessionKey, Settings, StoreSeq};
use crate::codec::QoS;

/// The packet id a session's message number `id` is sent with: `1 + (id % 65535)`, so ids run
/// 1..=65535 and a restored session re-sends with the same packet ids.
pub(super) fn packet_id(id: u64) -> u16 {
    // 1 + (id % 65535) is at most 65535: the conversion cannot fail.
    u16::try_from(1 + id % 65_535).unwrap_or(u16::MAX)
}

/// A message waiting in a session's queue (not yet sent, or sent and taken back when the
/// connection ended).
#[derive(Debug, Clone)]
pub(super) struct Queued {
    /// Message number; `None` for QoS 0 (never stored, needs no packet id).
    pub(super) id: Option<u64>,
    /// The message at its delivery QoS.
    pub(super) msg: Message,
    /// Whether it may have been sent before (DUP on the next send).
    pub(super) dup: bool,
    /// QoS 2 only: PUBREC came back and PUBREL was sent; re-send PUBREL, not the PUBLISH.
    pub(super) released: bool,
    /// Not sent before the store write with this number is durable (0: no wait). A QoS 2
    /// message of a persistent publisher becomes visible only once its receipt is durable, so
    /// a crash cannot deliver it a second time when the publisher re-sends.
    pub(super) visible_at: StoreSeq,
}

impl Queued {
    /// Whether the client may hold this message's packet id (a QoS 2 message it may have
    /// received and not seen PUBREL for): dropping it would leave the id taken on the client,
    /// which then takes a later message with that id for a duplicate.
    pub(super) fn pinned(&self) -> bool {
        self.released || (self.dup && self.msg.qos == QoS::ExactlyOnce)
    }
}

/// Placeholder of [`Queued::visible_at`] while the store write it waits for is not numbered
/// yet.
pub(super) const INVISIBLE: StoreSeq = StoreSeq::MAX;

/// A QoS 1/2 message sent and not yet acknowledged.
#[derive(Debug, Clone)]
pub(super) struct InFlight {
    /// Message number.
    pub(super) id: u64,
    /// `packet_id(id)`.
    pub(super) packet_id: u16,
    /// The message.
    pub(super) msg: Message,
    /// QoS 2: PUBREC received, PUBREL sent, waiting for PUBCOMP.
    pub(super) released: bool,
    /// The store write recording the release (0: none); PUBREL goes out only once it is
    /// durable, or a crash would send the PUBLISH again after the client finished with it.
    pub(super) released_seq: StoreSeq,
}

/// A session: online while `conn` is set.
#[derive(Debug)]
pub(super) struct Session {
    pub(super) key: SessionKey,
    /// Clean session 0: kept offline and written to the store.
    pub(super) persistent: bool,
    pub(super) conn: Option<ConnId>,
    /// Filter -> granted QoS.
    pub(super) subs: HashMap<Arc<str>, QoS>,
    /// The next message number.
    pub(super) next_id: u64,
    queue: VecDeque<Queued>,
    queue_bytes: usize,
    /// Queued messages the client may hold a packet id for ([`Queued::pinned`]): never
    /// dropped, not counted against the offline caps.
    pub(super) queue_pinned: usize,
    pub(super) inflight: VecDeque<InFlight>,
    /// Incoming QoS 2 packet ids routed and not yet released by PUBREL.
    pub(super) unreleased_in: HashSet<u16>,
    pub(super) offline_since: Option<Instant>,
    /// Since when the (online) queue has been full without a break.
    pub(super) full_since: Option<Instant>,
    /// Connections whose next incoming publish waits for room in this queue.
    pub(super) waiters: Vec<ConnId>,
    /// The highest store position this session asked to be told about (queue head waiting to
    /// become visible).
    pub(super) visible_wait: StoreSeq,
}

impl Session {
    pub(super) fn new(key: SessionKey, persistent: bool) -> Self {
        Session {
            key,
            persistent,
            conn: None,
            subs: HashMap::new(),
            next_id: 0,
            queue: VecDeque::new(),
            queue_bytes: 0,
            queue_pinned: 0,
            inflight: VecDeque::new(),
            unreleased_in: HashSet::new(),
            offline_since: None,
            full_since: None,
            waiters: Vec::new(),
            visible_wait: 0,
        }
    }

    /// A new message number.
    pub(super) fn take_id(&mut self) -> u64 {
        let id = self.next_id;
        self.next_id = self.next_id.saturating_add(1);
        id
    }

    pub(super) fn queue_len(&self) -> usize {
        self.queue.len()
    }

    #[cfg(test)]
    pub(super) fn queue_bytes(&self) -> usize {
        self.queue_bytes
    }

    pub(super) fn queue_front(&self) -> Option<&Queued> {
        self.queue.front()
    }

    #[cfg(test)]
    pub(super) fn queue_iter(&self) -> impl Iterator<Item = &Queued> {
        self.queue.iter()
    }

    pub(super) fn push_back(&mut self, q: Queued) {
        self.queue_bytes += q.msg.payload.len();
        self.queue_pinned += usize::from(q.pinned());
        self.queue.push_back(q);
    }

    /// Makes the message just queued at the back visible once `seq` is durable.
    pub(super) fn set_back_visible_at(&mut self, seq: StoreSeq) {
        if let Some(q) = self.queue.back_mut() {
            if q.visible_at == INVISIBLE {
                q.visible_at = seq;
            }
        }
    }

    /// The head of the queue goes out only once `seq` is durable (as well).
    pub(super) fn hold_front_until(&mut self, seq: StoreSeq) {
        if let Some(q) = self.queue.front_mut() {
            if q.visible_at != INVISIBLE {
                q.visible_at = q.visible_at.max(seq);
            }
        }
    }

    /// Removes the oldest message that may be dropped (not [`Queued::pinned`]).
    pub(super) fn pop_oldest_droppable(&mut self) -> Option<Queued> {
        let i = self.queue.iter().position(|q| !q.pinned())?;
        let q = self.queue.remove(i)?;
        self.queue_bytes = self.queue_bytes.saturating_sub(q.msg.payload.len());
        Some(q)
    }

    pub(super) fn pop_front(&mut self) -> Option<Queued> {
        let q = self.queue.pop_front()?;
        self.queue_bytes = self.queue_bytes.saturating_sub(q.msg.payload.len());
        self.queue_pinned = self.queue_pinned.saturating_sub(usize::from(q.pinned()));
        if self.queue.is_empty() {
            // An idle session keeps no queue storage.
            self.queue = VecDeque::new();
        }
        Some(q)
    }

    /// Whether the online queue is at its cap (new QoS 1/2 messages for it are held).
    pub(super) fn is_full(&self, settings: &Settings) -> bool {
        self.queue.len() >= settings.queue_messages.max(1)
            || self.queue_bytes >= settings.queue_bytes.max(1)
    }

    /// Whether the offline queue is over its caps (one message always stays). Pinned messages
    /// do not count: they are never dropped, and only those sent before (at most a window per
    /// connection, or what a restart restored) are pinned.
    pub(super) fn over_offline_caps(&self, settings: &Settings) -> bool {
        let droppable = self.queue.len().saturating_sub(self.queue_pinned);
        droppable > settings.offline_messages
            || (self.queue_bytes > settings.offline_bytes && droppable > 1)
    }

    fn packet_id_in_flight(&self, pid: u16) -> bool {
        self.inflight.iter().any(|f| f.packet_id == pid)
    }

    /// Whether the head of the queue may be sent now, with store writes up to `durable`
    /// durable.
    pub(super) fn can_send(&self, settings: &Settings, durable: StoreSeq) -> bool {
        match self.queue.front() {
            None => false,
            Some(q) if q.visible_at > durable => false,
            Some(q) => match q.id {
                None => true,
                Some(id) => {
                    self.inflight.len() < settings.max_inflight_out.max(1)
                        && !self.packet_id_in_flight(packet_id(id))
                }
            },
        }
    }

    /// The connection ended: unacknowledged messages go back to the head of the queue, in
    /// order, marked for re-delivery.
    pub(super) fn requeue_inflight(&mut self) {
        while let Some(f) = self.inflight.pop_back() {
            self.queue_bytes += f.msg.payload.len();
            let q = Queued {
                id: Some(f.id),
                msg: f.msg,
                dup: true,
                released: f.released,
                visible_at: f.released_seq,
            };
            self.queue_pinned += usize::from(q.pinned());
            self.queue.push_front(q);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn packet_ids_wrap_within_1_to_65535() {
        assert_eq!(packet_id(0), 1);
        assert_eq!(packet_id(65_534), 65_535);
        assert_eq!(packet_id(65_535), 1);
        assert_eq!(packet_id(u64::MAX), packet_id(u64::MAX % 65_535));
    }
}
