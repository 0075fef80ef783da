//! Fair chunk scheduling, I/O-free: each device has at most one window of chunks queued (a new
//! request replaces what is left of its previous one), and chunks are taken round-robin, one per
//! device per turn, so a device asking for much cannot starve the others.

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::sync::Arc;

use fleet_proto::v1::ChunkRequest;

/// One chunk to send.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Job {
    /// The update.
    pub update_id: Arc<str>,
    /// Index of the component in the manifest.
    pub component: usize,
    /// Chunk index.
    pub index: u32,
    /// The request it answers.
    pub request_id: u64,
}

/// The per-device queues and the round-robin ring.
#[derive(Debug, Default)]
pub(crate) struct FairQueue {
    per_device: HashMap<String, VecDeque<Job>>,
    ring: VecDeque<String>,
}

impl FairQueue {
    /// Replaces `device`'s queued chunks with `jobs`.
    pub(crate) fn replace(&mut self, device: &str, jobs: Vec<Job>) {
        if jobs.is_empty() {
            self.per_device.remove(device);
            return;
        }
        if self
            .per_device
            .insert(device.to_owned(), jobs.into())
            .is_none()
        {
            self.ring.push_back(device.to_owned());
        }
    }

    /// Drops `device`'s queued chunks.
    pub(crate) fn remove(&mut self, device: &str) {
        self.per_device.remove(device);
    }

    /// Whether nothing is queued.
    pub(crate) fn is_empty(&self) -> bool {
        self.per_device.is_empty()
    }

    /// Up to `max` chunks, one per device per turn.
    pub(crate) fn take(&mut self, max: usize) -> Vec<(String, Job)> {
        let mut out = Vec::with_capacity(max.min(64));
        while out.len() < max {
            let Some(device) = self.ring.pop_front() else {
                break;
            };
            let Some(q) = self.per_device.get_mut(&device) else {
                // Removed or emptied: it leaves the ring.
                continue;
            };
            if let Some(job) = q.pop_front() {
                out.push((device.clone(), job));
            }
            if q.is_empty() {
                self.per_device.remove(&device);
            } else {
                self.ring.push_back(device);
            }
        }
        out
    }
}

/// The chunk indexes a request wants, lowest first, at most `window`, all below `count`.
/// Work is bounded by the request's size, whatever ranges it names.
pub(crate) fn wanted(req: &ChunkRequest, count: u32, window: u32) -> Vec<u32> {
    let window = window as usize;
    let mut set = BTreeSet::new();
    for r in &req.ranges {
        let end = r.end.min(count);
        for i in (r.start..end).take(window) {
            set.insert(i);
        }
    }
    let mut bits = 0usize;
    'bitmap: for (byte_no, byte) in req.bitmap.iter().enumerate() {
        for bit in 0..8u32 {
            if byte & (1 << bit) == 0 {
                continue;
            }
            let Some(i) = u32::try_from(byte_no)
                .ok()
                .and_then(|b| b.checked_mul(8))
                .and_then(|b| b.checked_add(bit))
                .and_then(|k| k.checked_add(req.bitmap_offset))
            else {
                break 'bitmap;
            };
            if i >= count {
                break 'bitmap;
            }
            set.insert(i);
            bits += 1;
            if bits >= window {
                break 'bitmap;
            }
        }
    }
    set.into_iter().take(window).collect()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use fleet_proto::v1::ChunkRange;

    fn jobs(n: u32) -> Vec<Job> {
        (0..n)
            .map(|index| Job {
                update_id: "u".into(),
                component: 0,
                index,
                request_id: 1,
            })
            .collect()
    }

    #[test]
    fn devices_take_turns_and_new_requests_replace_old_ones() {
        let mut q = FairQueue::default();
        q.replace("greedy", jobs(100));
        q.replace("small", jobs(2));
        let got: Vec<String> = q.take(4).into_iter().map(|(d, _)| d).collect();
        assert_eq!(got, ["greedy", "small", "greedy", "small"]);
        let got: Vec<String> = q.take(3).into_iter().map(|(d, _)| d).collect();
        assert_eq!(got, ["greedy", "greedy", "greedy"]);
        q.replace("greedy", jobs(1));
        assert_eq!(q.take(10).len(), 1);
        assert!(q.is_empty());
        q.replace("a", jobs(3));
        q.remove("a");
        assert!(q.is_empty() && q.take(5).is_empty());
    }

    #[test]
    fn wanted_is_bounded_sorted_and_in_range() {
        let req = ChunkRequest {
            ranges: vec![
                ChunkRange { start: 5, end: 8 },
                ChunkRange {
                    start: 0,
                    end: u32::MAX,
                },
                ChunkRange { start: 9, end: 3 },
            ],
            bitmap: vec![0b1000_0001, 0xff],
            bitmap_offset: 2,
            ..Default::default()
        };
        assert_eq!(wanted(&req, 12, 4), vec![0, 1, 2, 3]);
        let only_bits = ChunkRequest {
            bitmap: vec![0b1000_0001, 0xff],
            bitmap_offset: 2,
            ..Default::default()
        };
        assert_eq!(wanted(&only_bits, 12, 16), vec![2, 9, 10, 11]);
        let far = ChunkRequest {
            bitmap: vec![1],
            bitmap_offset: u32::MAX,
            ..Default::default()
        };
        assert!(wanted(&far, 12, 16).is_empty());
    }
}
