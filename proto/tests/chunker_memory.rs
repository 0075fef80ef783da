//! The chunker reads a large image as a stream: its peak memory must not grow with the image.
//!
//! This file holds a single test so that the process's peak resident set (`VmHWM`) reflects
//! only this work. Linux only, like the gateway.

use std::fs::File;
use std::io::{BufWriter, Write};

use fleet_proto::chunker::{Chunker, DEFAULT_CHUNK_SIZE};
use fleet_proto::merkle;
use sha2::{Digest, Sha256};

const IMAGE_MIB: u64 = 80;

fn peak_rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or_else(|| panic!("no VmHWM in /proc/self/status"))
}

#[test]
fn chunking_an_80_mib_image_keeps_memory_flat() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let path = dir.path().join("image.bin");
    // Write a pseudo-random image (xorshift) through a small buffer, hashing as we go so the
    // expected digest is computed independently of the chunker.
    let mut expected = Sha256::new();
    {
        let mut out = BufWriter::new(File::create(&path).unwrap_or_else(|e| panic!("{e}")));
        let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
        let mut block = vec![0u8; 64 * 1024];
        for _ in 0..(IMAGE_MIB * 16) {
            for b in block.chunks_mut(8) {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                b.copy_from_slice(&x.to_le_bytes());
            }
            expected.update(&block);
            out.write_all(&block).unwrap_or_else(|e| panic!("{e}"));
        }
        out.flush().unwrap_or_else(|e| panic!("{e}"));
    }
    let size = IMAGE_MIB << 20;
    assert_eq!(std::fs::metadata(&path).map(|m| m.len()).ok(), Some(size));

    let before = peak_rss_kib();
    let file = File::open(&path).unwrap_or_else(|e| panic!("{e}"));
    let mut chunker = Chunker::new(file, DEFAULT_CHUNK_SIZE).unwrap_or_else(|e| panic!("{e}"));
    let mut seen = 0u64;
    let mut digests = Vec::new();
    while let Some(c) = chunker.next_chunk().unwrap_or_else(|e| panic!("{e}")) {
        assert_eq!(c.offset, seen);
        seen += c.data.len() as u64;
        digests.push(c.digest);
    }
    let summary = chunker.finish().unwrap_or_else(|e| panic!("{e}"));
    let after = peak_rss_kib();

    assert_eq!(summary.size, size);
    assert_eq!(summary.sha256, <[u8; 32]>::from(expected.finalize()));
    assert_eq!(summary.chunk_count() as usize, digests.len());
    assert_eq!(Ok(summary.merkle_root), merkle::root(&digests));

    // 80 MiB went through; the chunker holds one 16 KiB buffer and 32 bytes per chunk
    // (5,120 chunks: 160 KiB, twice here because the test keeps its own copy). Allow 8 MiB of
    // slack for the allocator and page-ins; reading the image into memory would add 80 MiB.
    let growth_kib = after.saturating_sub(before);
    eprintln!("peak RSS before {before} KiB, after {after} KiB, growth {growth_kib} KiB");
    assert!(
        growth_kib < 8 * 1024,
        "peak RSS grew by {growth_kib} KiB for an {IMAGE_MIB} MiB image"
    );

    // Control: the probe does see an image held in memory, so the bound above can fail.
    let whole = std::fs::read(&path).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(whole.len() as u64, size);
    let control = peak_rss_kib().saturating_sub(after);
    assert!(
        control > 64 * 1024,
        "probe missed an {IMAGE_MIB} MiB read: {control} KiB"
    );
}
