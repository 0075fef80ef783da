//! Status reports on the device: `report()` never waits for the network.
//!
//! Reports go into a bounded outbox and leave it, oldest first, when the gateway acknowledges
//! them; after a reconnect everything unacknowledged is sent again, in order. Each report gets
//! the next value of a per-device sequence that keeps increasing across restarts, which the
//! gateway's registry uses to drop duplicates and late arrivals.
//!
//! **When the outbox is full** the oldest report is dropped to make room (a status report is a
//! snapshot: the newest state matters most) and the drop is counted in
//! [`Outbox::dropped`]; the sequence gap also shows the loss to whoever reads the reports.
//!
//! [`Outbox`] does no I/O; [`store::OutboxStore`] keeps it on disk.

pub(crate) mod store;

use std::collections::VecDeque;

use fleet_proto::v1::StatusReport;

/// Reports kept by default while the gateway is unreachable.
pub(crate) const DEFAULT_CAPACITY: usize = 1000;

/// What `push` did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pushed {
    /// Queued with this sequence.
    Queued {
        /// The report's sequence.
        sequence: u64,
    },
    /// Queued with `sequence`; the outbox was full and the report `dropped` was discarded.
    QueuedDroppingOldest {
        /// The report's sequence.
        sequence: u64,
        /// The sequence of the report discarded.
        dropped: u64,
    },
}

/// The outbox.
#[derive(Debug, Clone)]
pub struct Outbox {
    capacity: usize,
    next_sequence: u64,
    queue: VecDeque<StatusReport>,
    dropped: u64,
}

impl Outbox {
    /// An empty outbox holding up to `capacity` (at least 1) reports, numbering from
    /// `next_sequence` (at least 1).
    pub fn new(capacity: usize, next_sequence: u64) -> Self {
        Self {
            capacity: capacity.max(1),
            next_sequence: next_sequence.max(1),
            queue: VecDeque::new(),
            dropped: 0,
        }
    }

    /// An outbox restored from persisted reports (any order; sorted here) and counter.
    pub fn restore(capacity: usize, next_sequence: u64, mut reports: Vec<StatusReport>) -> Self {
        reports.sort_by_key(|r| r.sequence);
        let highest = reports.last().map_or(0, |r| r.sequence);
        let mut outbox = Self::new(capacity, next_sequence.max(highest.saturating_add(1)));
        outbox.queue = reports.into();
        while outbox.queue.len() > outbox.capacity {
            outbox.queue.pop_front();
            outbox.dropped += 1;
        }
        outbox
    }

    /// Numbers `report` and queues it, dropping the oldest report if the outbox is full.
    /// Returns the report as queued (to persist) and what happened.
    pub fn push(&mut self, mut report: StatusReport) -> (StatusReport, Pushed) {
        let sequence = self.next_sequence;
        self.next_sequence += 1;
        report.sequence = sequence;
        let mut outcome = Pushed::Queued { sequence };
        if self.queue.len() >= self.capacity {
            if let Some(old) = self.queue.pop_front() {
                self.dropped += 1;
                outcome = Pushed::QueuedDroppingOldest {
                    sequence,
                    dropped: old.sequence,
                };
            }
        }
        self.queue.push_back(report.clone());
        (report, outcome)
    }

    /// The reports to send, oldest first.
    pub fn pending(&self) -> impl Iterator<Item = &StatusReport> {
        self.queue.iter()
    }

    /// The gateway acknowledged the report `sequence`: it and every older report leave the
    /// outbox. Returns the sequences removed.
    pub fn acknowledge(&mut self, sequence: u64) -> Vec<u64> {
        let mut removed = Vec::new();
        while self.queue.front().is_some_and(|r| r.sequence <= sequence) {
            if let Some(r) = self.queue.pop_front() {
                removed.push(r.sequence);
            }
        }
        removed
    }

    /// Reports waiting.
    pub fn len(&self) -> usize {
        self.queue.len()
    }

    /// True when nothing waits.
    pub fn is_empty(&self) -> bool {
        self.queue.is_empty()
    }

    /// Reports discarded because the outbox was full, since this outbox was created.
    pub fn dropped(&self) -> u64 {
        self.dropped
    }

    /// The sequence the next report will get.
    pub fn next_sequence(&self) -> u64 {
        self.next_sequence
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn report(tag: &str) -> StatusReport {
        StatusReport {
            firmware_version: tag.into(),
            ..StatusReport::default()
        }
    }

    #[test]
    fn numbers_queues_and_acknowledges_in_order() {
        let mut o = Outbox::new(10, 1);
        for i in 0..5 {
            let (r, p) = o.push(report(&format!("r{i}")));
            assert_eq!(p, Pushed::Queued { sequence: i + 1 });
            assert_eq!(r.sequence, i + 1);
        }
        assert_eq!(
            o.pending().map(|r| r.sequence).collect::<Vec<_>>(),
            [1, 2, 3, 4, 5]
        );
        assert_eq!(o.acknowledge(3), [1, 2, 3]);
        assert_eq!(
            o.acknowledge(3),
            Vec::<u64>::new(),
            "a duplicate ack removes nothing"
        );
        assert_eq!(o.pending().map(|r| r.sequence).collect::<Vec<_>>(), [4, 5]);
    }

    #[test]
    fn full_outbox_drops_the_oldest_and_counts() {
        let mut o = Outbox::new(3, 1);
        for i in 0..3 {
            o.push(report(&i.to_string()));
        }
        assert_eq!(
            o.push(report("new")).1,
            Pushed::QueuedDroppingOldest {
                sequence: 4,
                dropped: 1
            }
        );
        assert_eq!(o.dropped(), 1);
        assert_eq!(
            o.pending().map(|r| r.sequence).collect::<Vec<_>>(),
            [2, 3, 4]
        );
    }

    #[test]
    fn restore_keeps_numbering_ahead() {
        let mut o = Outbox::new(10, 1);
        let queued: Vec<_> = (0..3).map(|i| o.push(report(&i.to_string())).0).collect();
        // Counter file lost or stale: numbering still continues after the highest queued.
        let mut back = Outbox::restore(10, 1, queued.into_iter().rev().collect());
        assert_eq!(
            back.pending().map(|r| r.sequence).collect::<Vec<_>>(),
            [1, 2, 3]
        );
        assert_eq!(back.push(report("x")).1, Pushed::Queued { sequence: 4 });
    }

    proptest! {
        /// Sequences strictly increase, the outbox never exceeds its capacity, what it hands
        /// out is in order, and every report is either pending, acknowledged or counted dropped.
        #[test]
        fn invariants(cap in 1usize..20, ops in prop::collection::vec(0u8..4, 1..300)) {
            let mut o = Outbox::new(cap, 1);
            let (mut pushed, mut acked, mut last) = (0u64, 0u64, 0u64);
            for op in ops {
                if op < 3 {
                    let (r, _) = o.push(report(""));
                    prop_assert!(r.sequence > last);
                    last = r.sequence;
                    pushed += 1;
                } else {
                    let first = o.pending().next().map(|r| r.sequence);
                    if let Some(first) = first {
                        acked += o.acknowledge(first).len() as u64;
                    }
                }
                prop_assert!(o.len() <= cap);
                let seqs: Vec<u64> = o.pending().map(|r| r.sequence).collect();
                prop_assert!(seqs.windows(2).all(|w| w[0] < w[1]));
                prop_assert_eq!(pushed, o.len() as u64 + acked + o.dropped());
            }
        }
    }
}
