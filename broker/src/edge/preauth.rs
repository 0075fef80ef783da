//! The pre-authentication budget: connections that have not yet finished TLS and CONNECT hold
//! a slot of their own, separate from authenticated sessions, with a limit overall and one per
//! source address. When a limit is reached the *oldest* pending connection (of that source, or
//! overall) is dropped to make room, so a flood of idle sockets can never keep a device out: a
//! real client finishes its handshake in milliseconds, long before it becomes the oldest.
//!
//! [`Budget`] is the bookkeeping, without I/O; [`PreAuth`] shares it between the accept loop
//! and the connection tasks and wakes the evicted.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

use tokio::sync::Notify;

/// Pending connections by admission order and by source.
#[derive(Debug, Default)]
pub(crate) struct Budget {
    next: u64,
    pending: BTreeMap<u64, IpAddr>,
    by_source: HashMap<IpAddr, VecDeque<u64>>,
}

impl Budget {
    /// Admits a connection from `ip` under `max_total` / `max_per_source` (both at least 1);
    /// returns its number and the numbers of the connections evicted to make room.
    pub(crate) fn admit(
        &mut self,
        ip: IpAddr,
        max_total: usize,
        max_per_source: usize,
    ) -> (u64, Vec<u64>) {
        let mut evicted = Vec::new();
        while self.by_source.get(&ip).map_or(0, VecDeque::len) >= max_per_source.max(1) {
            match self.by_source.get(&ip).and_then(|q| q.front().copied()) {
                Some(oldest) => {
                    self.remove(oldest);
                    evicted.push(oldest);
                }
                None => break,
            }
        }
        while self.pending.len() >= max_total.max(1) {
            match self.pending.keys().next().copied() {
                Some(oldest) => {
                    self.remove(oldest);
                    evicted.push(oldest);
                }
                None => break,
            }
        }
        let id = self.next;
        self.next += 1;
        self.pending.insert(id, ip);
        self.by_source.entry(ip).or_default().push_back(id);
        (id, evicted)
    }

    /// Forgets connection `id` (finished, failed or evicted); returns whether it was pending.
    pub(crate) fn remove(&mut self, id: u64) -> bool {
        let Some(ip) = self.pending.remove(&id) else {
            return false;
        };
        if let Some(q) = self.by_source.get_mut(&ip) {
            q.retain(|&x| x != id);
            if q.is_empty() {
                self.by_source.remove(&ip);
            }
        }
        true
    }

    /// Connections pending.
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.pending.len()
    }
}

/// The shared budget and the wake-ups of pending connections.
#[derive(Debug)]
pub(crate) struct PreAuth {
    state: Mutex<(Budget, HashMap<u64, Arc<Notify>>)>,
    max_total: usize,
    max_per_source: usize,
}

/// A pending connection's slot: released on drop; `evicted` is notified when the slot was taken
/// away for a newer connection.
#[derive(Debug)]
pub(crate) struct Ticket {
    preauth: Arc<PreAuth>,
    id: u64,
    /// Notified on eviction.
    pub(crate) evicted: Arc<Notify>,
}

impl Drop for Ticket {
    fn drop(&mut self) {
        let mut g = match self.preauth.state.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        g.0.remove(self.id);
        g.1.remove(&self.id);
    }
}

impl PreAuth {
    /// A budget of `max_total` pending connections, `max_per_source` per address.
    pub(crate) fn new(max_total: usize, max_per_source: usize) -> Arc<Self> {
        Arc::new(PreAuth {
            state: Mutex::new((Budget::default(), HashMap::new())),
            max_total,
            max_per_source,
        })
    }

    /// Admits a connection from `ip`, evicting the oldest where a limit is reached; returns
    /// its ticket and how many were evicted.
    pub(crate) fn admit(self: &Arc<Self>, ip: IpAddr) -> (Ticket, usize) {
        let evicted = Arc::new(Notify::new());
        let mut g = match self.state.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        let (id, gone) = g.0.admit(ip, self.max_total, self.max_per_source);
        for old in &gone {
            if let Some(n) = g.1.remove(old) {
                n.notify_one();
            }
        }
        g.1.insert(id, evicted.clone());
        let ticket = Ticket {
            preauth: self.clone(),
            id,
            evicted,
        };
        (ticket, gone.len())
    }

    /// Evicts every pending connection (shutdown).
    pub(crate) fn evict_all(&self) {
        let mut g = match self.state.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        g.0 = Budget::default();
        for (_, n) in g.1.drain() {
            n.notify_one();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn ip(n: u8) -> IpAddr {
        IpAddr::from([10, 0, 0, n])
    }

    #[test]
    fn the_oldest_of_a_source_makes_room_first() {
        let mut b = Budget::default();
        let (a, _) = b.admit(ip(1), 10, 2);
        let (_, _) = b.admit(ip(2), 10, 2);
        let (_, _) = b.admit(ip(1), 10, 2);
        let (_, gone) = b.admit(ip(1), 10, 2);
        assert_eq!(
            gone,
            vec![a],
            "source 1's oldest goes, source 2 is untouched"
        );
        assert_eq!(b.len(), 3);
    }

    #[test]
    fn the_oldest_overall_makes_room_when_full() {
        let mut b = Budget::default();
        let (first, _) = b.admit(ip(1), 2, 10);
        b.admit(ip(2), 2, 10);
        let (_, gone) = b.admit(ip(3), 2, 10);
        assert_eq!(gone, vec![first]);
        assert!(!b.remove(first), "evicted ones are gone");
    }

    proptest! {
        /// Whatever arrives and finishes: limits hold, the newest always gets in, and only
        /// older connections are evicted.
        #[test]
        fn limits_hold_and_newcomers_always_get_in(
            ops in proptest::collection::vec((0u8..4, proptest::bool::ANY), 1..300),
            max_total in 1usize..8,
            max_per_source in 1usize..4,
        ) {
            let mut b = Budget::default();
            let mut live: Vec<u64> = Vec::new();
            for (source, finish) in ops {
                if finish && !live.is_empty() {
                    let id = live.remove(0);
                    b.remove(id);
                    continue;
                }
                let (id, gone) = b.admit(ip(source), max_total, max_per_source);
                for g in &gone {
                    prop_assert!(*g < id);
                    live.retain(|x| x != g);
                }
                live.push(id);
                prop_assert!(b.len() <= max_total);
                prop_assert!(b.by_source.values().all(|q| q.len() <= max_per_source));
                prop_assert!(b.pending.contains_key(&id));
                prop_assert_eq!(b.len(), live.len());
            }
        }
    }
}
