//! Fair chunk scheduling, I/O-free: each device has at most one window of chunks queued (a new
//! request replaces what is left of its previous one), and chunks are taken round-robin, one per
//! device per turn, so a device asking for much cannot starve the others.

use std::collections::{HashMap, VecDeque};
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

/// Most ranges one `ChunkRequest` may name: a device asks for at most one window of chunks,
/// and a window is at most 256 (`updates.max_window`), so more ranges than that is no request
/// a device makes.
pub(crate) const MAX_RANGES: usize = 256;

/// Why a chunk request is refused before any work is done for it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum RequestError {
    /// More ranges than [`MAX_RANGES`].
    #[error("{0} ranges; at most {MAX_RANGES} are allowed")]
    TooManyRanges(usize),
    /// A bitmap longer than the component has chunks.
    #[error("bitmap of {len} bytes for {count} chunks (at most {max} bytes)")]
    BitmapTooLong {
        /// The bitmap's length in bytes.
        len: usize,
        /// The component's chunk count.
        count: u32,
        /// The longest bitmap that count needs.
        max: usize,
    },
}

/// The window a request is answered with: its own, at most `max`; `default` when it names none.
pub(crate) fn window(requested: u32, default: u32, max: u32) -> u32 {
    match requested {
        0 => default.min(max),
        w => w.min(max),
    }
}

/// The chunk indexes a request wants, lowest first, at most `window`, all below `count`.
///
/// The request is bounded first (at most [`MAX_RANGES`] ranges, a bitmap no longer than
/// `count` chunks need); the work is then `O(ranges * log(ranges) + bitmap bytes + window)`:
/// ranges are swept in order of their start, each index is produced at most once, and the
/// sweep stops once `window` indexes are found, however wide or overlapping the ranges are.
pub(crate) fn wanted(
    req: &ChunkRequest,
    count: u32,
    window: u32,
) -> Result<Vec<u32>, RequestError> {
    if req.ranges.len() > MAX_RANGES {
        return Err(RequestError::TooManyRanges(req.ranges.len()));
    }
    let max_bitmap = usize::try_from(count.div_ceil(8)).unwrap_or(usize::MAX);
    if req.bitmap.len() > max_bitmap {
        return Err(RequestError::BitmapTooLong {
            len: req.bitmap.len(),
            count,
            max: max_bitmap,
        });
    }
    let window = usize::try_from(window).unwrap_or(usize::MAX);
    let from_ranges = from_ranges(req, count, window);
    let from_bitmap = from_bitmap(req, count, window);
    // Merge the two ascending lists, without duplicates, up to the window.
    let mut out = Vec::with_capacity(window.min(from_ranges.len() + from_bitmap.len()));
    let (mut a, mut b) = (
        from_ranges.into_iter().peekable(),
        from_bitmap.into_iter().peekable(),
    );
    while out.len() < window {
        let next = match (a.peek(), b.peek()) {
            (Some(&x), Some(&y)) if x == y => {
                b.next();
                a.next()
            }
            (Some(&x), Some(&y)) if x < y => a.next(),
            (Some(_), Some(_)) | (None, Some(_)) => b.next(),
            (Some(_), None) => a.next(),
            (None, None) => None,
        };
        let Some(i) = next else { break };
        out.push(i);
    }
    Ok(out)
}

/// The lowest `window` indexes the ranges name, ascending, each once.
fn from_ranges(req: &ChunkRequest, count: u32, window: usize) -> Vec<u32> {
    let mut ranges: Vec<(u32, u32)> = req
        .ranges
        .iter()
        .filter_map(|r| {
            let end = r.end.min(count);
            (r.start < end).then_some((r.start, end))
        })
        .collect();
    ranges.sort_unstable();
    let mut out = Vec::new();
    // Every index below `next` has been produced (or skipped as not wanted).
    let mut next = 0u32;
    for (start, end) in ranges {
        for i in start.max(next)..end {
            if out.len() >= window {
                return out;
            }
            out.push(i);
        }
        next = next.max(end);
    }
    out
}

/// The lowest `window` indexes the bitmap names, ascending.
fn from_bitmap(req: &ChunkRequest, count: u32, window: usize) -> Vec<u32> {
    let mut out = Vec::new();
    for (byte_no, &byte) in req.bitmap.iter().enumerate() {
        if byte == 0 {
            continue;
        }
        for bit in 0..8u32 {
            if byte & (1 << bit) == 0 {
                continue;
            }
            let Some(i) = u32::try_from(byte_no)
                .ok()
                .and_then(|b| b.checked_mul(8))
                .and_then(|b| b.checked_add(bit))
                .and_then(|k| k.checked_add(req.bitmap_offset))
                .filter(|&i| i < count)
            else {
                return out;
            };
            out.push(i);
            if out.len() >= window {
                return out;
            }
        }
    }
    out
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
        assert_eq!(wanted(&req, 12, 4).unwrap(), vec![0, 1, 2, 3]);
        let only_bits = ChunkRequest {
            bitmap: vec![0b1000_0001, 0xff],
            bitmap_offset: 2,
            ..Default::default()
        };
        assert_eq!(wanted(&only_bits, 12, 16).unwrap(), vec![2, 9, 10, 11]);
        let far = ChunkRequest {
            bitmap: vec![1],
            bitmap_offset: u32::MAX,
            ..Default::default()
        };
        assert!(wanted(&far, 12, 16).unwrap().is_empty());
    }

    #[test]
    fn a_hostile_request_is_refused_or_clamped_before_any_work() {
        // 100k ranges: refused, whatever they name.
        let many = ChunkRequest {
            ranges: (0..100_000)
                .map(|i| ChunkRange {
                    start: i,
                    end: u32::MAX,
                })
                .collect(),
            ..Default::default()
        };
        assert_eq!(
            wanted(&many, 1_000, 16),
            Err(RequestError::TooManyRanges(100_000))
        );
        // A bitmap longer than the component's chunks: refused.
        let long = ChunkRequest {
            bitmap: vec![0xff; 1 << 20],
            ..Default::default()
        };
        assert_eq!(
            wanted(&long, 1_000, 16),
            Err(RequestError::BitmapTooLong {
                len: 1 << 20,
                count: 1_000,
                max: 125
            })
        );
        // A huge window is clamped to the gateway's maximum, and the most ranges allowed,
        // each naming everything, yield every index once, lowest first, up to that window.
        let w = window(u32::MAX, 16, 64);
        assert_eq!(w, 64);
        assert_eq!(window(0, 16, 64), 16);
        assert_eq!(window(0, 100, 64), 64);
        let widest = ChunkRequest {
            ranges: vec![
                ChunkRange {
                    start: 0,
                    end: u32::MAX
                };
                MAX_RANGES
            ],
            bitmap: vec![0xff; 125],
            ..Default::default()
        };
        assert_eq!(
            wanted(&widest, 1_000, w).unwrap(),
            (0..64).collect::<Vec<_>>()
        );
        assert_eq!(
            wanted(&widest, 1_000, u32::MAX).unwrap(),
            (0..1_000).collect::<Vec<_>>()
        );
    }

    #[test]
    fn ranges_in_any_order_and_overlapping_are_served_lowest_first_once() {
        let req = ChunkRequest {
            ranges: vec![
                ChunkRange { start: 20, end: 23 },
                ChunkRange { start: 2, end: 6 },
                ChunkRange { start: 4, end: 9 },
                ChunkRange { start: 3, end: 4 },
            ],
            bitmap: vec![0b0000_0011],
            bitmap_offset: 8,
            ..Default::default()
        };
        assert_eq!(
            wanted(&req, 100, 64).unwrap(),
            vec![2, 3, 4, 5, 6, 7, 8, 9, 20, 21, 22]
        );
        assert_eq!(wanted(&req, 100, 3).unwrap(), vec![2, 3, 4]);
        assert_eq!(
            wanted(&req, 21, 64).unwrap(),
            vec![2, 3, 4, 5, 6, 7, 8, 9, 20]
        );
    }
}
