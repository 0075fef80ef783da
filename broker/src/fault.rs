//! Fault injection for the integration tests; compiled only with the `fault-injection` feature
//! (off by default, enabled by the test suite's dev-dependencies, never by a release build).
//!
//! * Corrupt served chunks: every Nth firmware chunk the update server sends has one byte
//!   flipped, so the tests can watch devices reject and re-request it. The `gateway` binary
//!   sets it from `GATEWAY_TEST_CORRUPT_CHUNKS`.
//!
//! * Acknowledge status reports first (a broken guarantee, to prove that the chaos test
//!   catches it): the status owner answers "stored" at once and writes the reports only
//!   after a delay, so a gateway killed in that gap has acknowledged reports it never stored
//!   or queued upward. The `gateway` binary sets it from `GATEWAY_TEST_STATUS_ACK_FIRST_MS`
//!   (the delay in ms).
//!
//! The switches are process-wide: a test that needs them runs the gateway as a process.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::Duration;

static CORRUPT_EVERY: AtomicU32 = AtomicU32::new(0);
static STATUS_ACK_FIRST_MS: AtomicU64 = AtomicU64::new(0);

/// Breaks the status path's ordering on purpose: from now on reports are acknowledged before
/// they are stored, and stored `delay` later (zero restores the real order).
pub fn status_ack_first(delay: Duration) {
    let ms = u64::try_from(delay.as_millis()).unwrap_or(u64::MAX);
    STATUS_ACK_FIRST_MS.store(ms, Ordering::Relaxed);
}

/// The delay set by [`status_ack_first`], if the switch is on.
pub(crate) fn status_ack_first_delay() -> Option<Duration> {
    match STATUS_ACK_FIRST_MS.load(Ordering::Relaxed) {
        0 => None,
        ms => Some(Duration::from_millis(ms)),
    }
}

/// Corrupts every `n`th chunk served from now on (one byte flipped); 0 turns it off.
pub fn corrupt_chunks_every(n: u32) {
    CORRUPT_EVERY.store(n, Ordering::Relaxed);
}

/// The current setting of [`corrupt_chunks_every`].
pub fn corrupt_every() -> u32 {
    CORRUPT_EVERY.load(Ordering::Relaxed)
}

/// Applies the switch to the `sent`th chunk served (counted from 1).
pub(crate) fn corrupt_chunk(sent: u64, data: &mut [u8]) {
    let every = u64::from(corrupt_every());
    if every > 0 && sent.is_multiple_of(every) {
        if let Some(b) = data.first_mut() {
            *b ^= 0xff;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_nth_chunk_has_its_first_byte_flipped() {
        corrupt_chunks_every(3);
        let flipped: Vec<u64> = (1..=9)
            .filter(|&i| {
                let mut d = [0x0fu8, 1];
                corrupt_chunk(i, &mut d);
                d != [0x0f, 1]
            })
            .collect();
        assert_eq!(flipped, [3, 6, 9]);
        let mut empty: [u8; 0] = [];
        corrupt_chunk(3, &mut empty);
        corrupt_chunks_every(0);
        let mut d = [0u8];
        corrupt_chunk(3, &mut d);
        assert_eq!(d, [0]);
    }
}
