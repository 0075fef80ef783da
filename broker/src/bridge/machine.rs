//! The bridge's upward flow as an I/O-free state machine: values in, actions out.
//!
//! The driver (the parent module) owns the MQTT client, the store and the clock. It feeds the
//! machine what happens (connected, disconnected, rows read from the store's upward queue, the
//! client gave a publish its packet id, a PUBACK came, rows were removed, time passed, new rows
//! were queued locally) and carries out the [`Action`]s it returns, in order: read the queue
//! after a position, hand a row to the client, remove acknowledged rows, wait before the next
//! connection attempt, count.
//!
//! The rules it keeps:
//! * A row leaves the queue only after a PUBACK, on the connection that sent it, for the packet
//!   id the client gave that row. The client numbers QoS 1 publishes in the order it is handed
//!   them, so the machine binds each packet id it is told about ([`Machine::sent`]) to the
//!   oldest publish (row or presence) handed over and not yet numbered.
//! * At most [`WINDOW`] rows are handed over and unacknowledged at any time.
//! * A connection starts from the queue's head: whatever the previous one left unacknowledged
//!   is sent again, in queue order (at least once; subscribers drop duplicates by sequence or
//!   id). Rows already acknowledged but not yet removed are skipped, so a row is repeated only
//!   when no PUBACK for it ever arrived. On a new connection the driver must drop whatever the
//!   client still holds from the previous one (its own re-sends would only duplicate rows and
//!   shift the numbering).
//! * A row the driver says the upstream broker would refuse ([`Machine::refused`]: its topic
//!   holds a character the broker does not take) is never handed over: it leaves the queue
//!   like an acknowledged one, without being counted as delivered.
//! * Everything here is rebuilt from the store alone after a restart: a new machine starts at
//!   the head of whatever the queue still holds.
//! * Upstream addresses: every failed attempt and every lost connection moves to the next one
//!   of the list, round robin (so each of `n` addresses is tried within `n` failures), paced by
//!   the same backoff (reset by a connection that lasted [`BackoffConfig::healthy_after`]). A
//!   switch is only a new connection: the queue rules above are the same whichever address
//!   the rows went to.
//! * A downward subscription the upstream broker refuses on a connection is asked for again
//!   on that connection, after [`RESUBSCRIBE_MIN`] doubling up to [`RESUBSCRIBE_MAX`] while the
//!   refusals go on: a cluster refuses subscriptions while it elects new leaders (NATS:
//!   "Unable to add JetStream consumer"), and a gateway that took the refusal as final would
//!   hear no request until its next connection. A new connection starts from the shortest
//!   delay.
//! * The gateway's presence: announced (online, with the device counts) on every new
//!   connection, then again when the counts change, at most once per presence interval, again
//!   unchanged once the presence refresh has passed since the last, and offline when the
//!   bridge stops. Its publishes are QoS 1 like the rows and are numbered by
//!   the client in the same sequence, so the machine keeps them in its hand-over order (a
//!   presence PUBACK never acknowledges a row); they are not rows and do not take room in
//!   the window.

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::time::{Duration, Instant};

use fleet_backoff::{Backoff, BackoffConfig};

/// Upward messages in flight (handed to the client, not yet acknowledged).
pub(crate) const WINDOW: usize = 64;
/// Acknowledged rows that make a removal transaction on their own (otherwise they are removed
/// on the next tick).
pub(crate) const ACK_BATCH: usize = 256;
/// How often the queue is trimmed to its budget and its gauges refreshed.
pub(crate) const HOUSEKEEPING: Duration = Duration::from_secs(1);
/// First wait before a refused downward subscription is asked for again.
pub(crate) const RESUBSCRIBE_MIN: Duration = Duration::from_secs(1);
/// Longest wait between two requests of a subscription the broker keeps refusing.
pub(crate) const RESUBSCRIBE_MAX: Duration = Duration::from_secs(30);

/// What the gateway announces upstream about its devices.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct DeviceCounts {
    /// Devices the gateway has stored anything from.
    pub known: u32,
    /// Devices connected now.
    pub online: u32,
}

/// The machine's settings.
#[derive(Debug, Clone, Copy)]
pub(crate) struct MachineConfig {
    /// Paces the connection attempts.
    pub backoff: BackoffConfig,
    /// Number of upstream addresses (at least one).
    pub upstreams: usize,
    /// Presence updates after the first on a connection: at most one per this.
    pub presence_interval: Duration,
    /// Presence is announced again, changed or not, once this has passed since the last
    /// announcement (at least `presence_interval`).
    pub presence_refresh: Duration,
}

/// A publish handed to the client, as the machine tracks it until its PUBACK.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Handed {
    Row(Row),
    Presence { online: bool },
}

/// One row of the upward queue, as far as the machine cares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Row {
    /// Queue position.
    pub seq: i64,
    /// Payload bytes (for the byte counters).
    pub len: usize,
}

/// What the driver must do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Action {
    /// Read up to `room` rows after position `after`, oldest first, and report them with
    /// [`Machine::rows`] quoting `read` (also when the read failed: with no rows).
    Read {
        /// Number of this read.
        read: u64,
        /// Queue position to read after.
        after: i64,
        /// Most rows wanted.
        room: usize,
    },
    /// Hand this row (from the read just reported) to the client at QoS 1. When the client
    /// refuses it, report [`Machine::unsent`].
    Publish(Row),
    /// Remove these acknowledged rows in one transaction and report [`Machine::removed`].
    Remove(Vec<i64>),
    /// A connection is up: set the gauge, count it, subscribe downward.
    Up {
        /// The upstream broker kept the session.
        session_present: bool,
    },
    /// The connection failed or was lost: set the gauge, and do not poll the client for a new
    /// attempt before `retry_at`, which goes to upstream address `upstream`.
    Down {
        /// Earliest next attempt.
        retry_at: Instant,
        /// A connection was up (rather than an attempt failing).
        was_up: bool,
        /// Index of the address the next attempt goes to.
        upstream: usize,
        /// It is not the one that just failed (count a fail-over).
        switched: bool,
    },
    /// Publish the gateway's presence (retained, QoS 1) with these counts. When the client
    /// refuses it, report [`Machine::presence_unsent`].
    Presence {
        /// Online (or the bridge is stopping).
        online: bool,
        /// The device counts to announce.
        counts: DeviceCounts,
    },
    /// The upstream broker acknowledged a presence publish.
    Announced {
        /// The online flag it carried.
        online: bool,
    },
    /// The upstream broker acknowledged a row: count it and its bytes.
    Delivered(Row),
    /// Trim the queue to its budget and refresh its gauges.
    Housekeeping,
    /// Ask again for the downward subscriptions (the broker refused one on this connection);
    /// report a refusal again with [`Machine::subscribe_refused`].
    Resubscribe,
}

/// The outstanding read.
#[derive(Debug, Clone, Copy)]
struct Reading {
    read: u64,
    room: usize,
    /// Rows were queued after the read was asked for: it may have missed them.
    stale: bool,
}

/// The bridge's upward state machine.
#[derive(Debug)]
pub(crate) struct Machine {
    backoff: Backoff,
    upstreams: usize,
    /// Index of the address connected to, or tried next.
    upstream: usize,
    presence_interval: Duration,
    presence_refresh: Duration,
    /// The latest device counts.
    counts: DeviceCounts,
    /// Counts last announced on this connection (none: not yet, or the client refused it).
    announced: Option<DeviceCounts>,
    /// When presence was last handed to the client on this connection.
    announced_at: Option<Instant>,
    /// The bridge is stopping: nothing more is announced.
    stopping: bool,
    connected: bool,
    /// Number of the last read asked for.
    reads: u64,
    reading: Option<Reading>,
    /// Highest queue position handed to the client (or skipped) on this connection.
    cursor: i64,
    /// Handed to the client, not yet numbered, in hand-over order.
    unnumbered: VecDeque<Handed>,
    /// Numbered and awaiting PUBACK on this connection.
    inflight: HashMap<u16, Handed>,
    /// Acknowledged, removal not yet asked for.
    acked: Vec<i64>,
    /// Acknowledged, removal not yet confirmed: never handed over again.
    done: BTreeSet<i64>,
    next_housekeeping: Option<Instant>,
    /// When refused subscriptions are asked for again (on this connection).
    resubscribe_at: Option<Instant>,
    /// The wait after the next refusal.
    resubscribe_delay: Duration,
    actions: VecDeque<Action>,
}

impl Machine {
    /// A disconnected machine that tries the first address first. The driver polls the client
    /// (which connects) until told otherwise.
    pub(crate) fn new(config: MachineConfig) -> Self {
        Machine {
            backoff: Backoff::new(config.backoff),
            upstreams: config.upstreams.max(1),
            upstream: 0,
            presence_interval: config.presence_interval,
            presence_refresh: config.presence_refresh.max(config.presence_interval),
            counts: DeviceCounts::default(),
            announced: None,
            announced_at: None,
            stopping: false,
            connected: false,
            reads: 0,
            reading: None,
            cursor: 0,
            unnumbered: VecDeque::new(),
            inflight: HashMap::new(),
            acked: Vec::new(),
            done: BTreeSet::new(),
            next_housekeeping: None,
            resubscribe_at: None,
            resubscribe_delay: RESUBSCRIBE_MIN,
            actions: VecDeque::new(),
        }
    }

    /// The next thing to do.
    pub(crate) fn poll_action(&mut self) -> Option<Action> {
        self.actions.pop_front()
    }

    /// Whether a connection is up.
    pub(crate) fn is_connected(&self) -> bool {
        self.connected
    }

    /// Rows handed to the client on this connection and not yet acknowledged.
    pub(crate) fn unacknowledged(&self) -> usize {
        let rows = |h: &Handed| matches!(h, Handed::Row(_));
        self.unnumbered.iter().filter(|h| rows(h)).count()
            + self.inflight.values().filter(|h| rows(h)).count()
    }

    /// Index of the upstream address connected to, or tried next.
    pub(crate) fn upstream(&self) -> usize {
        self.upstream
    }

    /// The client connected (CONNACK accepted). Everything the previous connection left
    /// unacknowledged is sent again from the queue's head; the gateway announces itself.
    pub(crate) fn connected(&mut self, now: Instant, session_present: bool) {
        self.forget_connection();
        self.connected = true;
        self.backoff.connected(now);
        self.actions.push_back(Action::Up { session_present });
        if !self.stopping {
            self.announce(now, true);
        }
        self.flush();
        self.pump();
    }

    /// The connection (or an attempt) failed; `random` is the jitter of the next delay. The
    /// next attempt goes to the next address.
    pub(crate) fn disconnected(&mut self, now: Instant, random: u64) {
        let was_up = self.connected;
        self.forget_connection();
        self.connected = false;
        let delay = self.backoff.failed(now, random);
        let before = self.upstream;
        self.upstream = (self.upstream + 1) % self.upstreams;
        self.actions.push_back(Action::Down {
            retry_at: now + delay,
            was_up,
            upstream: self.upstream,
            switched: self.upstream != before,
        });
    }

    fn forget_connection(&mut self) {
        self.cursor = 0;
        self.unnumbered.clear();
        self.inflight.clear();
        self.announced = None;
        self.announced_at = None;
        // A read asked for on the previous connection is stale when it comes back.
        self.reading = None;
        // A new connection subscribes to everything anyway.
        self.resubscribe_at = None;
        self.resubscribe_delay = RESUBSCRIBE_MIN;
        self.actions.retain(|a| {
            !matches!(
                a,
                Action::Publish(_)
                    | Action::Read { .. }
                    | Action::Presence { .. }
                    | Action::Resubscribe
            )
        });
    }

    /// The upstream broker refused a downward subscription on this connection: it is asked
    /// for again ([`Action::Resubscribe`]) once the current delay has passed, and the delay
    /// after that doubles (up to [`RESUBSCRIBE_MAX`]). Ignored while disconnected.
    pub(crate) fn subscribe_refused(&mut self, now: Instant) {
        if !self.connected || self.resubscribe_at.is_some() {
            return;
        }
        self.resubscribe_at = Some(now + self.resubscribe_delay);
        self.resubscribe_delay = (self.resubscribe_delay * 2).min(RESUBSCRIBE_MAX);
    }

    /// The device counts are now `counts`: announced when they differ from the last announced
    /// ones and the presence interval has passed (otherwise on a later tick).
    pub(crate) fn devices(&mut self, now: Instant, counts: DeviceCounts) {
        self.counts = counts;
        self.announce_if_due(now);
    }

    /// The bridge is stopping: when connected, announces the gateway offline (wait for
    /// [`Action::Announced`] with `online: false` before disconnecting); whether it did.
    pub(crate) fn stop(&mut self, now: Instant) -> bool {
        self.stopping = true;
        if self.connected {
            self.announce(now, false);
        }
        self.connected
    }

    /// The client refused the presence publish: it is announced again once the presence
    /// interval has passed.
    pub(crate) fn presence_unsent(&mut self) {
        if let Some(i) = self
            .unnumbered
            .iter()
            .rposition(|h| matches!(h, Handed::Presence { .. }))
        {
            self.unnumbered.remove(i);
        }
        self.announced = None;
    }

    fn announce_if_due(&mut self, now: Instant) {
        let changed = self.announced != Some(self.counts)
            && self
                .announced_at
                .is_none_or(|at| now >= at + self.presence_interval);
        // Also unchanged, now and then: a presence the cloud broker lost, or the will of an
        // earlier connection it published late over this one's, is put right.
        let stale = self
            .announced_at
            .is_some_and(|at| now >= at + self.presence_refresh);
        let due = changed || stale;
        if self.connected && !self.stopping && due {
            self.announce(now, true);
        }
    }

    fn announce(&mut self, now: Instant, online: bool) {
        self.announced = Some(self.counts);
        self.announced_at = Some(now);
        self.unnumbered.push_back(Handed::Presence { online });
        self.actions.push_back(Action::Presence {
            online,
            counts: self.counts,
        });
    }

    /// Rows read for `read` (none when the read failed), oldest first.
    pub(crate) fn rows(&mut self, read: u64, rows: &[Row]) {
        let Some(r) = self.reading.filter(|r| r.read == read) else {
            return;
        };
        self.reading = None;
        for row in rows {
            if row.seq <= self.cursor {
                continue;
            }
            if self.done.contains(&row.seq) {
                self.cursor = row.seq;
                continue;
            }
            if self.unacknowledged() >= WINDOW {
                break;
            }
            self.cursor = row.seq;
            self.unnumbered.push_back(Handed::Row(*row));
            self.actions.push_back(Action::Publish(*row));
        }
        if r.stale || rows.len() >= r.room {
            self.pump();
        }
    }

    /// Rows `seqs` (of a read about to be reported) must never be handed over: the upstream
    /// broker refuses their topics. They are removed with the next acknowledged ones; the
    /// number not already on their way out (count those).
    pub(crate) fn refused(&mut self, seqs: &[i64]) -> usize {
        let mut new = 0;
        for &seq in seqs {
            if self.done.insert(seq) {
                self.acked.push(seq);
                new += 1;
            }
        }
        new
    }

    /// The client refused the publish of row `seq` (and so every later one of the same read):
    /// they are read again on the next tick (not at once: the client may still be full).
    pub(crate) fn unsent(&mut self, seq: i64) {
        self.unnumbered
            .retain(|h| !matches!(h, Handed::Row(r) if r.seq >= seq));
        // A read asked for meanwhile started past the refused rows.
        self.reading = None;
        self.actions.retain(|a| {
            !matches!(a, Action::Publish(r) if r.seq >= seq) && !matches!(a, Action::Read { .. })
        });
        self.cursor = self.cursor.min(seq - 1);
    }

    /// The client gave the oldest unnumbered publish packet id `pkid`.
    pub(crate) fn sent(&mut self, pkid: u16) {
        if let Some(row) = self.unnumbered.pop_front() {
            self.inflight.insert(pkid, row);
        }
    }

    /// A PUBACK for `pkid` on the current connection; whether it acknowledged a publish.
    pub(crate) fn puback(&mut self, pkid: u16) -> bool {
        let row = match self.inflight.remove(&pkid) {
            None => return false,
            Some(Handed::Presence { online }) => {
                self.actions.push_back(Action::Announced { online });
                return true;
            }
            Some(Handed::Row(row)) => row,
        };
        self.actions.push_back(Action::Delivered(row));
        self.done.insert(row.seq);
        self.acked.push(row.seq);
        if self.acked.len() >= ACK_BATCH {
            self.flush();
        }
        self.pump();
        true
    }

    /// Rows from [`Action::Remove`] were removed (`ok`) or the removal failed (asked again on
    /// the next tick).
    pub(crate) fn removed(&mut self, seqs: &[i64], ok: bool) {
        if ok {
            for s in seqs {
                self.done.remove(s);
            }
        } else {
            self.acked.extend_from_slice(seqs);
        }
    }

    /// New rows were queued locally.
    pub(crate) fn queued(&mut self) {
        if let Some(r) = &mut self.reading {
            r.stale = true;
        }
        self.pump();
    }

    /// Time passed: acknowledgements are flushed, the queue read, changed device counts
    /// announced, refused subscriptions asked for again and housekeeping done when due.
    pub(crate) fn tick(&mut self, now: Instant) {
        self.flush();
        self.pump();
        self.announce_if_due(now);
        if self.connected && self.resubscribe_at.is_some_and(|t| now >= t) {
            self.resubscribe_at = None;
            self.actions.push_back(Action::Resubscribe);
        }
        if self.next_housekeeping.is_none_or(|t| now >= t) {
            self.next_housekeeping = Some(now + HOUSEKEEPING);
            self.actions.push_back(Action::Housekeeping);
        }
    }

    fn flush(&mut self) {
        if !self.acked.is_empty() {
            self.actions
                .push_back(Action::Remove(std::mem::take(&mut self.acked)));
        }
    }

    /// Asks for rows while the window has room.
    fn pump(&mut self) {
        if !self.connected || self.reading.is_some() {
            return;
        }
        let room = WINDOW.saturating_sub(self.unacknowledged());
        if room == 0 {
            return;
        }
        self.reads += 1;
        self.reading = Some(Reading {
            read: self.reads,
            room,
            stale: false,
        });
        self.actions.push_back(Action::Read {
            read: self.reads,
            after: self.cursor,
            room,
        });
    }
}

#[cfg(test)]
mod tests;
