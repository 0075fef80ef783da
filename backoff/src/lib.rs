//! Reconnect delays for every client of the fleet (devices, the cloud SDK, the gateway's
//! bridge): exponential backoff with full jitter.
//!
//! After the n-th consecutive failure (counting from 0) the delay is uniform in
//! `[floor, clamp(initial * 2^n, floor, max)]`. "Full jitter" spreads a fleet that lost its
//! gateway at the same instant over the whole window, so it does not come back in lock-step;
//! the cap bounds how long one client that keeps failing waits.
//!
//! The sequence starts again only after a *healthy* connection, one that lasted
//! [`BackoffConfig::healthy_after`]: a peer that accepts and then drops the client at once
//! (a duplicate client id taking over, an ACL that disconnects) is treated as still failing
//! instead of being hammered at the shortest delay.
//!
//! No I/O: the caller passes the time and a random number, so the policy is exact under test.
//!
//! ```
//! use std::time::{Duration, Instant};
//! use fleet_backoff::{Backoff, BackoffConfig};
//!
//! let mut backoff = Backoff::new(BackoffConfig::default());
//! let now = Instant::now();
//! // A failed connection attempt; 12345 stands in for a random u64.
//! let delay = backoff.failed(now, 12345);
//! assert!(delay <= Duration::from_millis(500));
//! backoff.connected(now + delay);
//! ```
#![forbid(unsafe_code)]
#![warn(missing_docs, unreachable_pub)]

use std::time::{Duration, Instant};

/// The policy. Build a [`Backoff`] from it; [`Backoff::new`] tames odd values (see there).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BackoffConfig {
    /// Ceiling of the first delay after a failure; it doubles with each further consecutive
    /// failure. Default 500 ms: quick after a blip.
    pub initial: Duration,
    /// The ceiling never grows past this. Default 60 s: gentle on a server that is down, and a
    /// client still notices within a minute that it is back.
    pub max: Duration,
    /// No delay is shorter. Default zero: full jitter over the whole window spreads a fleet
    /// best, and the window itself grows quickly.
    pub floor: Duration,
    /// A connection that lasted this long was healthy: its loss starts the sequence again from
    /// `initial`. Default 10 s: longer than a broker takes to accept and then drop a client it
    /// does not want, far shorter than a real session.
    pub healthy_after: Duration,
}

impl Default for BackoffConfig {
    fn default() -> Self {
        Self {
            initial: Duration::from_millis(500),
            max: Duration::from_secs(60),
            floor: Duration::ZERO,
            healthy_after: Duration::from_secs(10),
        }
    }
}

impl BackoffConfig {
    /// The default policy with the ceiling starting at `initial` and capped at `max`.
    pub fn exponential(initial: Duration, max: Duration) -> Self {
        Self {
            initial,
            max,
            ..Self::default()
        }
    }
}

/// The longest delay this crate computes with (about 584 years): it keeps the arithmetic in
/// exact integers.
const LONGEST: Duration = Duration::from_nanos(u64::MAX);

/// The backoff state of one client: consecutive failures and the current connection's start.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Backoff {
    config: BackoffConfig,
    failures: u32,
    connected_at: Option<Instant>,
}

impl Backoff {
    /// A fresh state for `config`, after taming it: `initial` at least 1 ms, `max` at least
    /// `initial` and at most about 584 years, `floor` at most `max`.
    pub fn new(config: BackoffConfig) -> Self {
        let initial = config.initial.clamp(Duration::from_millis(1), LONGEST);
        let max = config.max.clamp(initial, LONGEST);
        let floor = config.floor.min(max);
        Self {
            config: BackoffConfig {
                initial,
                max,
                floor,
                healthy_after: config.healthy_after,
            },
            failures: 0,
            connected_at: None,
        }
    }

    /// The policy in force (after taming).
    pub fn config(&self) -> &BackoffConfig {
        &self.config
    }

    /// Consecutive failures so far.
    pub fn failures(&self) -> u32 {
        self.failures
    }

    /// The ceiling of the next delay, unless a healthy connection resets the sequence first:
    /// `clamp(initial * 2^failures, floor, max)`.
    pub fn ceiling(&self) -> Duration {
        let factor = 1u32.checked_shl(self.failures.min(31)).unwrap_or(u32::MAX);
        self.config
            .initial
            .saturating_mul(factor)
            .clamp(self.config.floor, self.config.max)
    }

    /// A connection was established at `now`.
    pub fn connected(&mut self, now: Instant) {
        self.connected_at = Some(now);
    }

    /// A connection attempt failed, or the connection was lost, at `now`. Returns how long to
    /// wait before the next attempt; `random` is a uniformly random `u64` that picks the point
    /// in the window. Counts a failure.
    pub fn failed(&mut self, now: Instant, random: u64) -> Duration {
        if let Some(since) = self.connected_at.take() {
            if now.saturating_duration_since(since) >= self.config.healthy_after {
                self.failures = 0;
            }
        }
        let floor = self.config.floor;
        let span = self.ceiling().saturating_sub(floor);
        // Both fit: `span` is at most `LONGEST` (u64 nanoseconds), the unit has 53 bits.
        let span_nanos = u64::try_from(span.as_nanos()).unwrap_or(u64::MAX);
        let scaled = (u128::from(span_nanos) * u128::from(random >> 11)) >> 53;
        let jitter = Duration::from_nanos(u64::try_from(scaled).unwrap_or(u64::MAX));
        self.failures = self.failures.saturating_add(1);
        floor.saturating_add(jitter)
    }

    /// Forget the failures, as after a healthy connection.
    pub fn reset(&mut self) {
        self.failures = 0;
        self.connected_at = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const MS: Duration = Duration::from_millis(1);

    fn policy(initial: u64, max: u64, floor: u64, healthy: u64) -> BackoffConfig {
        BackoffConfig {
            initial: MS * initial as u32,
            max: MS * max as u32,
            floor: MS * floor as u32,
            healthy_after: MS * healthy as u32,
        }
    }

    #[test]
    fn doubles_to_the_cap() {
        let mut b = Backoff::new(policy(100, 1000, 0, 0));
        let t = Instant::now();
        let ceilings: Vec<u128> = (0..6)
            .map(|_| {
                let c = b.ceiling().as_millis();
                b.failed(t, 0);
                c
            })
            .collect();
        assert_eq!(ceilings, [100, 200, 400, 800, 1000, 1000]);
        assert_eq!(b.failures(), 6);
        b.reset();
        assert_eq!(b.ceiling(), 100 * MS);
    }

    #[test]
    fn random_spans_the_whole_window() {
        let t = Instant::now();
        let mut b = Backoff::new(policy(400, 1000, 100, 0));
        assert_eq!(b.clone().failed(t, 0), 100 * MS);
        // Half of the range lands in the middle of [floor, ceiling].
        assert_eq!(b.clone().failed(t, 1 << 63), 250 * MS);
        let top = b.failed(t, u64::MAX);
        assert!(top < 400 * MS && top > 400 * MS - Duration::from_micros(1));
    }

    #[test]
    fn only_a_healthy_connection_resets() {
        let t0 = Instant::now();
        let mut b = Backoff::new(policy(100, 60_000, 0, 10_000));
        for _ in 0..4 {
            b.failed(t0, 0);
        }
        // Accepted, then dropped after 2 s: still failing, the window keeps growing.
        b.connected(t0);
        b.failed(t0 + 2000 * MS, 0);
        assert_eq!(b.failures(), 5);
        assert_eq!(b.ceiling(), 3200 * MS);
        // Up for 10 s: healthy; the next delay is from the start of the sequence.
        b.connected(t0);
        let d = b.failed(t0 + 10_000 * MS, u64::MAX);
        assert!(d < 100 * MS, "{d:?}");
        assert_eq!(b.failures(), 1);
        // A failed attempt without a connection in between does not reset.
        b.failed(t0 + 20_000 * MS, 0);
        assert_eq!(b.failures(), 2);
    }

    #[test]
    fn odd_configs_are_tamed() {
        let t = Instant::now();
        let mut b = Backoff::new(policy(0, 0, 5, 0));
        assert_eq!(b.config().initial, MS);
        assert_eq!(b.config().max, MS);
        assert_eq!(b.config().floor, MS);
        assert_eq!(b.failed(t, u64::MAX), MS);
        let mut huge = Backoff::new(BackoffConfig {
            initial: Duration::MAX,
            max: Duration::MAX,
            ..BackoffConfig::default()
        });
        assert_eq!(huge.config().max, LONGEST);
        for _ in 0..40 {
            assert!(huge.failed(t, u64::MAX) <= LONGEST);
        }
    }

    #[test]
    fn defaults_are_documented() {
        let c = BackoffConfig::default();
        assert_eq!(c.initial, 500 * MS);
        assert_eq!(c.max, Duration::from_secs(60));
        assert_eq!(c.floor, Duration::ZERO);
        assert_eq!(c.healthy_after, Duration::from_secs(10));
    }

    /// One thing that happens to a client: a failure `at_ms` after the previous event, with a
    /// random number, or a connection.
    #[derive(Debug, Clone)]
    enum Event {
        Failed { after_ms: u64, random: u64 },
        Connected { after_ms: u64 },
    }

    fn event() -> impl Strategy<Value = Event> {
        prop_oneof![
            3 => (0u64..30_000, any::<u64>())
                .prop_map(|(after_ms, random)| Event::Failed { after_ms, random }),
            1 => (0u64..30_000).prop_map(|after_ms| Event::Connected { after_ms }),
        ]
    }

    proptest! {
        #[test]
        fn delays_stay_in_the_window(
            initial in 0u64..5_000,
            max in 0u64..120_000,
            floor in 0u64..2_000,
            healthy in 0u64..20_000,
            events in prop::collection::vec(event(), 1..100),
        ) {
            let mut b = Backoff::new(policy(initial, max, floor, healthy));
            let c = *b.config();
            prop_assert!(c.floor <= c.max && c.initial <= c.max);
            let mut now = Instant::now();
            let mut connected_at = None;
            let mut last_ceiling = Duration::ZERO;
            for e in events {
                match e {
                    Event::Connected { after_ms } => {
                        now += MS * after_ms as u32;
                        b.connected(now);
                        connected_at = Some(now);
                    }
                    Event::Failed { after_ms, random } => {
                        now += MS * after_ms as u32;
                        let healthy = connected_at
                            .take()
                            .is_some_and(|t| now - t >= c.healthy_after);
                        let before = b.failures();
                        let d = b.failed(now, random);
                        // Never above the cap, never below the floor.
                        prop_assert!(d >= c.floor && d <= c.max, "{d:?} outside {c:?}");
                        if healthy {
                            // A healthy connection starts the sequence again.
                            prop_assert_eq!(b.failures(), 1);
                            prop_assert!(d <= c.initial.clamp(c.floor, c.max));
                        } else {
                            // Otherwise the window never shrinks.
                            prop_assert_eq!(b.failures(), before + 1);
                            prop_assert!(d <= b.clone().ceiling_before_last());
                            prop_assert!(b.clone().ceiling_before_last() >= last_ceiling);
                        }
                        last_ceiling = b.clone().ceiling_before_last();
                    }
                }
            }
        }
    }

    impl Backoff {
        /// The ceiling the last delay was drawn under.
        fn ceiling_before_last(mut self) -> Duration {
            self.failures = self.failures.saturating_sub(1);
            self.ceiling()
        }
    }
}
