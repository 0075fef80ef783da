//! The download of one update's components as an I/O-free state machine: which chunks to ask
//! for, and whether an arriving chunk is genuine.
//!
//! * Components are fetched one after the other; for the current one at most one
//!   `ChunkRequest` is outstanding, asking for up to `window` missing chunks (as ranges). When
//!   every chunk asked for has arrived (or been rejected), or the request has waited
//!   `request_timeout_ms`, the next request asks for what is still missing.
//! * Every chunk is checked on arrival against the signed manifest: index in range, exact
//!   length, and its Merkle proof to the component's root. A bad chunk is counted and asked for
//!   again; a chunk that fails `max_rejections` times fails the download (a gateway that keeps
//!   corrupting data cannot keep the device busy forever).
//! * A verified chunk is handed to the caller to write at its offset; the caller then marks it
//!   held ([`Download::mark_held`]) and persists the bitmap, so a restart resumes with exactly
//!   the chunks on disk.
//!
//! Memory is bounded by the window: nothing here holds chunk data.

use std::collections::BTreeSet;

use fleet_proto::merkle;
use fleet_proto::v1::{Chunk, ChunkRange, ChunkRequest, Component, UpdateError};

use super::bitmap::{BitmapSizeError, ChunkBitmap};
use super::judge::Rejection;

/// Chunks asked for in one request, by default.
pub(crate) const DEFAULT_WINDOW: u32 = 16;
/// How long a request may go unanswered before it is sent again, by default.
pub(crate) const DEFAULT_REQUEST_TIMEOUT_MS: u64 = 5_000;
/// Failed verifications of one chunk before the download is abandoned, by default.
pub(crate) const DEFAULT_MAX_REJECTIONS: u32 = 5;

/// Tuning of a download.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DownloadSettings {
    /// Chunks per request (at least 1).
    pub window: u32,
    /// Re-request after this long without the whole answer.
    pub request_timeout_ms: u64,
    /// Failed verifications of one chunk before giving up.
    pub max_rejections: u32,
}

impl Default for DownloadSettings {
    fn default() -> Self {
        DownloadSettings {
            window: DEFAULT_WINDOW,
            request_timeout_ms: DEFAULT_REQUEST_TIMEOUT_MS,
            max_rejections: DEFAULT_MAX_REJECTIONS,
        }
    }
}

#[derive(Debug, Clone)]
struct Part {
    name: String,
    count: u32,
    component: Component,
    held: ChunkBitmap,
    rejections: std::collections::HashMap<u32, u32>,
}

#[derive(Debug, Clone)]
struct Outstanding {
    part: usize,
    waiting: BTreeSet<u32>,
    sent_at_ms: u64,
}

/// A chunk that passed verification, to be written at `offset` of component `component`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct VerifiedChunk {
    /// Index of the component in the manifest.
    pub component: usize,
    /// Chunk index.
    pub index: u32,
    /// Byte offset of the chunk in the image.
    pub offset: u64,
}

/// What an arriving chunk turned out to be.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum ChunkOutcome {
    /// Genuine and new: write `chunk.data` at the offset, then [`Download::mark_held`].
    Verified(VerifiedChunk),
    /// Genuine or not, already held: ignore.
    Duplicate,
    /// Not for this download (other update or component name): ignore.
    Stray,
    /// Failed verification: counted, will be asked for again.
    Rejected {
        /// Chunk index.
        index: u32,
        /// Why.
        reason: String,
    },
    /// Failed verification once too often: the download is over.
    Failed(Rejection),
}

/// The download state machine.
#[derive(Debug, Clone)]
pub(crate) struct Download {
    update_id: String,
    parts: Vec<Part>,
    settings: DownloadSettings,
    outstanding: Option<Outstanding>,
    next_request_id: u64,
    rejected: u32,
    reported_step: u32,
}

/// Why a download cannot be set up from a manifest and saved bitmaps.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub(crate) enum DownloadError {
    /// A component's Merkle root is not 32 bytes (the manifest was not validated).
    #[error("component {0:?} has no usable Merkle root")]
    Root(String),
    /// A saved bitmap does not fit its component.
    #[error("saved progress of component {name:?}: {source}")]
    Bitmap {
        /// The component.
        name: String,
        /// What is wrong.
        source: BitmapSizeError,
    },
    /// The number of saved bitmaps is not the number of components.
    #[error("saved progress has {got} components, the manifest {want}")]
    Components {
        /// Saved.
        got: usize,
        /// In the manifest.
        want: usize,
    },
}

impl Download {
    /// A fresh download of a (validated) manifest's components.
    pub(crate) fn new(
        update_id: &str,
        components: &[Component],
        settings: DownloadSettings,
    ) -> Result<Self, DownloadError> {
        Self::resume(
            update_id,
            components,
            &vec![Vec::new(); components.len()],
            settings,
        )
    }

    /// A download resuming with the saved bitmaps ([`Download::bitmap`] of each component; an
    /// empty one means nothing held).
    pub(crate) fn resume(
        update_id: &str,
        components: &[Component],
        saved: &[Vec<u8>],
        settings: DownloadSettings,
    ) -> Result<Self, DownloadError> {
        if saved.len() != components.len() {
            return Err(DownloadError::Components {
                got: saved.len(),
                want: components.len(),
            });
        }
        let mut parts = Vec::with_capacity(components.len());
        for (c, bits) in components.iter().zip(saved) {
            if c.merkle_root.len() != 32 {
                return Err(DownloadError::Root(c.name.clone()));
            }
            let held = if bits.is_empty() {
                ChunkBitmap::new(c.chunk_count)
            } else {
                ChunkBitmap::from_bytes(c.chunk_count, bits).map_err(|source| {
                    DownloadError::Bitmap {
                        name: c.name.clone(),
                        source,
                    }
                })?
            };
            parts.push(Part {
                name: c.name.clone(),
                count: c.chunk_count,
                component: c.clone(),
                held,
                rejections: Default::default(),
            });
        }
        let mut d = Download {
            update_id: update_id.to_owned(),
            parts,
            settings: DownloadSettings {
                window: settings.window.max(1),
                ..settings
            },
            outstanding: None,
            next_request_id: 1,
            rejected: 0,
            reported_step: 0,
        };
        d.reported_step = d.step();
        Ok(d)
    }

    /// The held-chunk bitmap of component `i`, to persist.
    pub(crate) fn bitmap(&self, i: usize) -> Option<&[u8]> {
        self.parts.get(i).map(|p| p.held.as_bytes())
    }

    /// Chunks held, over all components.
    pub(crate) fn held(&self) -> u32 {
        self.parts.iter().map(|p| p.held.held()).sum()
    }

    /// Chunks in the update, over all components.
    pub(crate) fn total(&self) -> u32 {
        self.parts.iter().map(|p| p.count).sum()
    }

    /// Chunks rejected so far.
    pub(crate) fn rejected(&self) -> u32 {
        self.rejected
    }

    /// Whether every chunk of every component is held.
    pub(crate) fn is_complete(&self) -> bool {
        self.parts.iter().all(|p| p.held.is_complete())
    }

    fn step(&self) -> u32 {
        // 5 % steps of progress, 0..=20.
        let total = u64::from(self.total().max(1));
        (u64::from(self.held()) * 20 / total) as u32
    }

    /// True once each time progress crosses another 5 % since the last `true`.
    pub(crate) fn progress_due(&mut self) -> bool {
        let s = self.step();
        if s > self.reported_step {
            self.reported_step = s;
            true
        } else {
            false
        }
    }

    /// Whether [`Download::next_request`] would send a request now (the caller persists what
    /// it holds first).
    pub(crate) fn request_due(&self, now_ms: u64) -> bool {
        match &self.outstanding {
            None => !self.is_complete(),
            Some(o) => {
                o.waiting.is_empty()
                    || now_ms.saturating_sub(o.sent_at_ms) >= self.settings.request_timeout_ms
            }
        }
    }

    /// Forgets the outstanding request (the connection was lost: its answers will not come),
    /// so the next call to [`Download::next_request`] asks again at once.
    pub(crate) fn reset_outstanding(&mut self) {
        self.outstanding = None;
    }

    /// The request to send now, if any: when nothing is outstanding, when everything asked for
    /// has come, or when the outstanding request timed out.
    pub(crate) fn next_request(&mut self, now_ms: u64) -> Option<ChunkRequest> {
        if let Some(o) = &self.outstanding {
            let answered = o.waiting.is_empty();
            let timed_out = now_ms.saturating_sub(o.sent_at_ms) >= self.settings.request_timeout_ms;
            if !answered && !timed_out {
                return None;
            }
        }
        self.outstanding = None;
        let part_idx = self.parts.iter().position(|p| !p.held.is_complete())?;
        let part = &self.parts[part_idx];
        let wanted: BTreeSet<u32> = part
            .held
            .missing_from(0)
            .take(self.settings.window as usize)
            .collect();
        let request_id = self.next_request_id;
        self.next_request_id += 1;
        let req = ChunkRequest {
            update_id: self.update_id.clone(),
            component: part.name.clone(),
            ranges: ranges(&wanted),
            bitmap: Vec::new(),
            bitmap_offset: 0,
            window: self.settings.window,
            request_id,
        };
        self.outstanding = Some(Outstanding {
            part: part_idx,
            waiting: wanted,
            sent_at_ms: now_ms,
        });
        Some(req)
    }

    /// Whether a chunk with these header fields would be new: of this update, of one of its
    /// components, in range and not held yet. Anything else is dropped before its proof is
    /// decoded.
    pub(crate) fn wants(&self, update_id: &str, component: &str, index: u32) -> bool {
        update_id == self.update_id
            && self
                .parts
                .iter()
                .any(|p| p.name == component && index < p.count && !p.held.has(index))
    }

    /// Checks an arriving chunk.
    pub(crate) fn on_chunk(&mut self, chunk: &Chunk) -> ChunkOutcome {
        if chunk.update_id != self.update_id {
            return ChunkOutcome::Stray;
        }
        let Some(part_idx) = self.parts.iter().position(|p| p.name == chunk.component) else {
            return ChunkOutcome::Stray;
        };
        let index = chunk.index;
        if self.parts[part_idx].held.has(index) {
            self.forget_waiting(part_idx, index);
            return ChunkOutcome::Duplicate;
        }
        match check(&self.parts[part_idx], chunk) {
            Ok(offset) => {
                self.forget_waiting(part_idx, index);
                ChunkOutcome::Verified(VerifiedChunk {
                    component: part_idx,
                    index,
                    offset,
                })
            }
            Err(reason) => {
                self.rejected += 1;
                if index >= self.parts[part_idx].count {
                    // Not a chunk of this component at all: nothing to ask for again.
                    return ChunkOutcome::Rejected { index, reason };
                }
                self.forget_waiting(part_idx, index);
                let part = &mut self.parts[part_idx];
                let n = part.rejections.entry(index).or_insert(0);
                *n += 1;
                if *n >= self.settings.max_rejections {
                    return ChunkOutcome::Failed(Rejection {
                        code: UpdateError::ChunkVerification,
                        detail: format!(
                            "chunk {index} of {} failed verification {} times (last: {reason})",
                            part.name, n
                        ),
                    });
                }
                ChunkOutcome::Rejected { index, reason }
            }
        }
    }

    fn forget_waiting(&mut self, part: usize, index: u32) {
        if let Some(o) = &mut self.outstanding {
            if o.part == part {
                o.waiting.remove(&index);
            }
        }
    }

    /// The verified chunk is written and durable: count it held.
    pub(crate) fn mark_held(&mut self, c: &VerifiedChunk) -> bool {
        self.parts
            .get_mut(c.component)
            .is_some_and(|p| p.held.set(c.index))
    }
}

/// Verifies `chunk` against `part`; the byte offset on success.
fn check(part: &Part, chunk: &Chunk) -> Result<u64, String> {
    merkle::verify_chunk(&part.component, chunk.index, &chunk.data, &chunk.proof)
        .map(|(offset, _)| offset)
        .map_err(|e| e.to_string())
}

/// Coalesces sorted indexes into half-open ranges.
fn ranges(indexes: &BTreeSet<u32>) -> Vec<ChunkRange> {
    let mut out: Vec<ChunkRange> = Vec::new();
    for &i in indexes {
        match out.last_mut() {
            Some(r) if r.end == i => r.end = i + 1,
            _ => out.push(ChunkRange {
                start: i,
                end: i + 1,
            }),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use fleet_proto::chunker::summarize;
    use fleet_proto::merkle::{Hash, MerkleTree};

    const CS: u32 = 1024;

    /// An image of `n` bytes, its component and its tree.
    fn image(n: usize) -> (Vec<u8>, Component, MerkleTree) {
        let data: Vec<u8> = (0..n).map(|i| (i * 7 % 251) as u8).collect();
        let summary = summarize(data.as_slice(), CS).unwrap();
        let c = summary.component("rootfs");
        let digests: Vec<Hash> = data.chunks(CS as usize).map(merkle::chunk_digest).collect();
        (data, c, MerkleTree::from_chunk_digests(&digests).unwrap())
    }

    fn chunk(data: &[u8], tree: &MerkleTree, i: u32) -> Chunk {
        let start = i as usize * CS as usize;
        let end = (start + CS as usize).min(data.len());
        Chunk {
            update_id: "u1".into(),
            component: "rootfs".into(),
            index: i,
            data: data[start..end].to_vec(),
            proof: tree.proof(i).unwrap().iter().map(|h| h.to_vec()).collect(),
            request_id: 0,
        }
    }

    fn settings() -> DownloadSettings {
        DownloadSettings {
            window: 4,
            request_timeout_ms: 1_000,
            max_rejections: 3,
        }
    }

    /// Serves every request honestly until complete; returns the bytes written.
    fn run(d: &mut Download, data: &[u8], tree: &MerkleTree, now: &mut u64) -> Vec<u8> {
        let mut out = vec![0u8; data.len()];
        while let Some(req) = d.next_request(*now) {
            for r in &req.ranges {
                for i in r.start..r.end {
                    let c = chunk(data, tree, i);
                    if let ChunkOutcome::Verified(v) = d.on_chunk(&c) {
                        out[v.offset as usize..v.offset as usize + c.data.len()]
                            .copy_from_slice(&c.data);
                        assert!(d.mark_held(&v));
                    }
                }
            }
            *now += 1;
        }
        out
    }

    #[test]
    fn an_honest_gateway_gets_the_image_in_windows() {
        let (data, c, tree) = image(10 * 1024 + 17);
        let mut d = Download::new("u1", &[c], settings()).unwrap();
        let first = d.next_request(0).unwrap();
        assert_eq!(first.ranges, vec![ChunkRange { start: 0, end: 4 }]);
        assert!(d.next_request(1).is_none(), "one request outstanding");
        // Answer the first request, then let run() do the rest.
        for i in 0..4 {
            let ChunkOutcome::Verified(v) = d.on_chunk(&chunk(&data, &tree, i)) else {
                panic!("chunk {i}");
            };
            d.mark_held(&v);
        }
        assert!(d.progress_due());
        let mut now = 2;
        let mut out = run(&mut d, &data, &tree, &mut now);
        out[..4 * CS as usize].copy_from_slice(&data[..4 * CS as usize]);
        assert!(d.is_complete());
        assert_eq!(out, data);
        assert_eq!((d.held(), d.total(), d.rejected()), (11, 11, 0));
    }

    #[test]
    fn bad_chunks_are_rejected_and_asked_for_again() {
        let (data, c, tree) = image(8 * 1024);
        let mut d = Download::new("u1", &[c], settings()).unwrap();
        d.next_request(0).unwrap();
        let mut bad = chunk(&data, &tree, 1);
        bad.data[5] ^= 0x40;
        assert!(matches!(
            d.on_chunk(&bad),
            ChunkOutcome::Rejected { index: 1, .. }
        ));
        let mut short = chunk(&data, &tree, 2);
        short.data.pop();
        assert!(matches!(
            d.on_chunk(&short),
            ChunkOutcome::Rejected { index: 2, .. }
        ));
        // Chunk 0's data with chunk 3's index and proof: the proof binds data to its index.
        let mut swapped = chunk(&data, &tree, 3);
        swapped.data = chunk(&data, &tree, 0).data;
        assert!(matches!(
            d.on_chunk(&swapped),
            ChunkOutcome::Rejected { index: 3, .. }
        ));
        let mut beyond = chunk(&data, &tree, 0);
        beyond.index = 99;
        assert!(matches!(
            d.on_chunk(&beyond),
            ChunkOutcome::Rejected { index: 99, .. }
        ));
        assert_eq!(d.rejected(), 4);
        let ChunkOutcome::Verified(v) = d.on_chunk(&chunk(&data, &tree, 0)) else {
            panic!()
        };
        d.mark_held(&v);
        // Everything asked for was answered (badly or not): the next request asks again.
        let again = d.next_request(1).unwrap();
        assert_eq!(again.ranges, vec![ChunkRange { start: 1, end: 5 }]);
        assert_eq!(d.on_chunk(&chunk(&data, &tree, 0)), ChunkOutcome::Duplicate);
        let mut stray = chunk(&data, &tree, 1);
        stray.update_id = "other".into();
        assert_eq!(d.on_chunk(&stray), ChunkOutcome::Stray);
    }

    #[test]
    fn persistent_corruption_fails_the_download() {
        let (data, c, tree) = image(4 * 1024);
        let mut d = Download::new("u1", &[c], settings()).unwrap();
        let mut bad = chunk(&data, &tree, 2);
        bad.data[0] ^= 1;
        let mut last = ChunkOutcome::Stray;
        for t in 0..3 {
            d.next_request(t * 10_000);
            last = d.on_chunk(&bad);
        }
        let ChunkOutcome::Failed(r) = last else {
            panic!("{last:?}")
        };
        assert_eq!(r.code, UpdateError::ChunkVerification);
    }

    #[test]
    fn a_silent_gateway_is_asked_again_after_the_timeout() {
        let (_, c, _) = image(4 * 1024);
        let mut d = Download::new("u1", &[c], settings()).unwrap();
        let a = d.next_request(0).unwrap();
        assert!(d.next_request(999).is_none());
        let b = d.next_request(1_000).unwrap();
        assert_ne!(a.request_id, b.request_id);
        assert_eq!(a.ranges, b.ranges);
    }

    #[test]
    fn a_restart_resumes_with_the_saved_bitmap() {
        let (data, c, tree) = image(9 * 1024);
        let mut d = Download::new("u1", std::slice::from_ref(&c), settings()).unwrap();
        d.next_request(0);
        for i in [0, 1, 3] {
            let ChunkOutcome::Verified(v) = d.on_chunk(&chunk(&data, &tree, i)) else {
                panic!()
            };
            d.mark_held(&v);
        }
        let saved = vec![d.bitmap(0).unwrap().to_vec()];
        let mut r = Download::resume("u1", std::slice::from_ref(&c), &saved, settings()).unwrap();
        assert_eq!(r.held(), 3);
        let req = r.next_request(0).unwrap();
        assert_eq!(
            req.ranges,
            vec![
                ChunkRange { start: 2, end: 3 },
                ChunkRange { start: 4, end: 7 }
            ]
        );
        assert!(Download::resume("u1", &[c], &[vec![0xff; 9]], settings()).is_err());
    }
}
