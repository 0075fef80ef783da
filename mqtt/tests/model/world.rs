//! The fixed world of the model test: four identities, their access policy, the topics and
//! filters the operations pick from, and a simulated store that keeps only what was reported
//! durable when the gateway crashes.

use std::collections::{BTreeMap, BTreeSet};

use fleet_mqtt::{
    Authorizer, Message, QoS, Role, SessionKey, StoreOp, StoreSeq, StoredMessage, StoredSession,
};

/// The parties of the test. `DevSvc1A` is a device whose certificate id reads `svc-1:a`: the
/// same client id text as the service `svc-1`, instance `a` (`Svc1A`); the engine must keep
/// their sessions apart.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(crate) enum Who {
    D1,
    DevSvc1A,
    Svc1A,
    Core,
}

pub(crate) const EVERYONE: [Who; 4] = [Who::D1, Who::DevSvc1A, Who::Svc1A, Who::Core];

impl Who {
    pub(crate) fn idx(self) -> usize {
        self as usize
    }

    pub(crate) fn key(self) -> SessionKey {
        let (role, id, instance) = match self {
            Who::D1 => (Role::Device, "d1", None),
            Who::DevSvc1A => (Role::Device, "svc-1:a", None),
            Who::Svc1A => (Role::Service, "svc-1", Some("a")),
            Who::Core => (Role::Internal, "core", None),
        };
        SessionKey {
            role,
            id: id.to_owned(),
            instance: instance.map(str::to_owned),
        }
    }

    pub(crate) fn client_id(self) -> &'static str {
        match self {
            Who::D1 => "d1",
            Who::DevSvc1A | Who::Svc1A => "svc-1:a",
            Who::Core => "core",
        }
    }

    pub(crate) fn of(key: &SessionKey) -> Option<Who> {
        EVERYONE.into_iter().find(|w| &w.key() == key)
    }
}

/// Topic names publishes pick from.
pub(crate) const TOPICS: [&str; 7] = [
    "dev/d1/up",
    "dev/d1/down",
    "dev/svc-1:a/up",
    "dev/svc-1:a/down",
    "svc/svc-1/cmd",
    "pub/news",
    "deny/x",
];

/// Filters subscriptions pick from: exact ones and wildcards.
pub(crate) const FILTERS: [&str; 14] = [
    "dev/d1/up",
    "dev/d1/down",
    "dev/svc-1:a/up",
    "dev/svc-1:a/down",
    "dev/+/up",
    "dev/+/down",
    "dev/d1/#",
    "dev/svc-1:a/#",
    "svc/svc-1/cmd",
    "svc/#",
    "pub/+",
    "+/+/up",
    "#",
    "deny/x",
];

/// The publish policy. `strict` is the policy after the change: it takes a few rights away.
pub(crate) fn may_publish(who: Who, topic: &str, strict: bool) -> bool {
    if topic.starts_with("deny/") {
        return false;
    }
    match who {
        Who::D1 => topic == "dev/d1/up" || (topic == "pub/news" && !strict),
        Who::DevSvc1A => matches!(topic, "dev/svc-1:a/up" | "pub/news"),
        Who::Svc1A => {
            matches!(topic, "dev/d1/down" | "svc/svc-1/cmd" | "pub/news")
                || (topic == "dev/svc-1:a/down" && !strict)
        }
        Who::Core => true,
    }
}

/// The subscribe policy, on filter strings as the client sends them.
pub(crate) fn may_subscribe(who: Who, filter: &str, strict: bool) -> bool {
    match who {
        Who::D1 => matches!(filter, "dev/d1/down" | "pub/+") || (filter == "dev/d1/#" && !strict),
        Who::DevSvc1A => matches!(filter, "dev/svc-1:a/down" | "dev/svc-1:a/#" | "pub/+"),
        Who::Svc1A => {
            matches!(
                filter,
                "dev/d1/up" | "dev/svc-1:a/up" | "svc/#" | "svc/svc-1/cmd" | "pub/+"
            ) || (!strict && matches!(filter, "dev/+/up" | "+/+/up"))
        }
        Who::Core => filter != "deny/x" && !(strict && filter == "#"),
    }
}

/// The policy as the engine sees it.
#[derive(Debug)]
pub(crate) struct Policy {
    pub(crate) strict: bool,
}

impl Authorizer for Policy {
    fn may_publish(&self, who: &SessionKey, topic: &str) -> bool {
        Who::of(who).is_some_and(|w| may_publish(w, topic, self.strict))
    }

    fn may_subscribe(&self, who: &SessionKey, filter: &str) -> bool {
        Who::of(who).is_some_and(|w| may_subscribe(w, filter, self.strict))
    }
}

/// One persistent session as the simulated store holds it.
#[derive(Debug, Default, Clone)]
pub(crate) struct StoredState {
    pub(crate) subs: BTreeMap<String, QoS>,
    /// Message number -> (message, released).
    pub(crate) queue: BTreeMap<u64, (Message, bool)>,
    pub(crate) unreleased: BTreeSet<u16>,
}

/// The simulated store: writes arrive numbered; those reported durable are applied, the rest
/// wait and are lost in a crash. Like a driver that commits in batches, it commits the writes
/// of one engine call together (a group), never part of them: the API has no other way to
/// make, say, a QoS 2 message's queue entries and its receipt durable at once.
#[derive(Debug)]
pub(crate) struct Store {
    pub(crate) sessions: BTreeMap<SessionKey, StoredState>,
    pub(crate) retained: BTreeMap<String, Message>,
    /// (number, write, group)
    pending: Vec<(StoreSeq, StoreOp, u64)>,
    next_seq: StoreSeq,
}

impl Store {
    pub(crate) fn new() -> Self {
        Store {
            sessions: BTreeMap::new(),
            retained: BTreeMap::new(),
            pending: Vec::new(),
            next_seq: 1,
        }
    }

    /// Takes a write; an out-of-order number is an error (the write is kept anyway).
    pub(crate) fn write(&mut self, seq: StoreSeq, op: StoreOp, group: u64) -> Result<(), String> {
        let expected = self.next_seq;
        self.next_seq = seq.max(expected) + 1;
        self.pending.push((seq, op, group));
        if seq == expected {
            Ok(())
        } else {
            Err(format!("store write numbered {seq}, expected {expected}"))
        }
    }

    pub(crate) fn has_pending(&self) -> bool {
        !self.pending.is_empty()
    }

    /// Makes every write so far durable (or, with `half`, the older half of them, as a
    /// batched commit that has not caught up); the number to report, if there was any.
    pub(crate) fn make_durable(&mut self, half: bool) -> Option<StoreSeq> {
        let mut n = if half {
            self.pending.len().div_ceil(2)
        } else {
            self.pending.len()
        };
        while n > 0 && n < self.pending.len() && self.pending[n].2 == self.pending[n - 1].2 {
            n += 1;
        }
        let last = self.pending.get(n.checked_sub(1)?).map(|(s, _, _)| *s)?;
        let done: Vec<_> = self.pending.drain(..n).collect();
        for (_, op, _) in done {
            self.apply(op);
        }
        Some(last)
    }

    /// The process died: writes not reported durable are gone; a new engine numbers from 1.
    pub(crate) fn crash(&mut self) {
        self.pending.clear();
        self.next_seq = 1;
    }

    /// What `Engine::restore` gets.
    pub(crate) fn contents(&self) -> (Vec<StoredSession>, Vec<Message>) {
        let sessions = self
            .sessions
            .iter()
            .map(|(key, s)| StoredSession {
                key: key.clone(),
                subscriptions: s.subs.iter().map(|(f, q)| (f.clone(), *q)).collect(),
                queue: s
                    .queue
                    .iter()
                    .map(|(id, (m, released))| StoredMessage {
                        id: *id,
                        message: m.clone(),
                        released: *released,
                    })
                    .collect(),
                unreleased: s.unreleased.iter().copied().collect(),
            })
            .collect();
        (sessions, self.retained.values().cloned().collect())
    }

    fn apply(&mut self, op: StoreOp) {
        match op {
            StoreOp::SessionReset { key, persistent } => {
                self.sessions.remove(&key);
                if persistent {
                    self.sessions.insert(key, StoredState::default());
                }
            }
            StoreOp::SessionExpired { key } => {
                self.sessions.remove(&key);
            }
            StoreOp::Subscribed { key, filter, qos } => {
                self.sessions
                    .entry(key)
                    .or_default()
                    .subs
                    .insert(filter, qos);
            }
            StoreOp::Unsubscribed { key, filter } => {
                if let Some(s) = self.sessions.get_mut(&key) {
                    s.subs.remove(&filter);
                }
            }
            StoreOp::Enqueued { key, id, message } => {
                let s = self.sessions.entry(key).or_default();
                s.queue.insert(id, (message, false));
            }
            StoreOp::Released { key, id } => {
                if let Some(m) = self
                    .sessions
                    .get_mut(&key)
                    .and_then(|s| s.queue.get_mut(&id))
                {
                    m.1 = true;
                }
            }
            StoreOp::Dequeued { key, id } => {
                if let Some(s) = self.sessions.get_mut(&key) {
                    s.queue.remove(&id);
                }
            }
            StoreOp::Qos2Received { key, packet_id } => {
                self.sessions
                    .entry(key)
                    .or_default()
                    .unreleased
                    .insert(packet_id);
            }
            StoreOp::Qos2Released { key, packet_id } => {
                if let Some(s) = self.sessions.get_mut(&key) {
                    s.unreleased.remove(&packet_id);
                }
            }
            StoreOp::Retained { topic, message } => match message {
                Some(m) => {
                    self.retained.insert(topic, m);
                }
                None => {
                    self.retained.remove(&topic);
                }
            },
        }
    }
}
