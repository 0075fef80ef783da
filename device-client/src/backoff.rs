//! Reconnect delays: exponential backoff with full jitter.
//!
//! After the n-th consecutive failure the delay is uniform in `[0, min(max, base * 2^n)]`
//! ("full jitter"): a fleet that lost its gateway at the same instant does not come back in
//! lock-step, and a device that keeps failing waits at most `max`. A successful connection
//! resets the sequence. Pure: the caller supplies the random number, so tests are exact.

use std::time::Duration;

/// The backoff policy and its state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Backoff {
    base: Duration,
    max: Duration,
    failures: u32,
}

impl Backoff {
    /// A policy starting at `base` (at least 1 ms) and capped at `max` (at least `base`).
    pub fn new(base: Duration, max: Duration) -> Self {
        let base = base.max(Duration::from_millis(1));
        Self {
            base,
            max: max.max(base),
            failures: 0,
        }
    }

    /// The ceiling of the next delay: `min(max, base * 2^failures)`.
    pub fn ceiling(&self) -> Duration {
        let factor = 1u32.checked_shl(self.failures.min(31)).unwrap_or(u32::MAX);
        self.base.saturating_mul(factor).min(self.max)
    }

    /// The delay before the next attempt, given `unit` uniform in [0, 1); counts a failure.
    pub fn next_delay(&mut self, unit: f64) -> Duration {
        let unit = if unit.is_finite() {
            unit.clamp(0.0, 1.0)
        } else {
            0.0
        };
        let delay = self.ceiling().mul_f64(unit);
        self.failures = self.failures.saturating_add(1);
        delay
    }

    /// A connection succeeded: start again from `base`.
    pub fn reset(&mut self) {
        self.failures = 0;
    }

    /// Consecutive failures so far.
    pub fn failures(&self) -> u32 {
        self.failures
    }
}

impl Default for Backoff {
    /// 500 ms doubling to 60 s: quick after a blip, gentle on a gateway that is down.
    fn default() -> Self {
        Self::new(Duration::from_millis(500), Duration::from_secs(60))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn doubles_to_the_cap_and_resets() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_secs(1));
        let ceilings: Vec<u128> = (0..6)
            .map(|_| {
                let c = b.ceiling().as_millis();
                b.next_delay(0.5);
                c
            })
            .collect();
        assert_eq!(ceilings, [100, 200, 400, 800, 1000, 1000]);
        assert_eq!(b.failures(), 6);
        b.reset();
        assert_eq!(b.ceiling(), Duration::from_millis(100));
        assert_eq!(b.next_delay(0.5), Duration::from_millis(50));
    }

    #[test]
    fn odd_inputs_are_tamed() {
        let mut b = Backoff::new(Duration::ZERO, Duration::ZERO);
        assert_eq!(b.ceiling(), Duration::from_millis(1));
        assert_eq!(b.next_delay(f64::NAN), Duration::ZERO);
        assert!(b.next_delay(7.0) <= Duration::from_millis(1));
        let mut long = Backoff::default();
        for _ in 0..100 {
            long.next_delay(0.99);
        }
        assert_eq!(long.ceiling(), Duration::from_secs(60));
    }

    proptest! {
        #[test]
        fn delays_stay_under_the_ceiling(units in prop::collection::vec(0.0f64..1.0, 1..80)) {
            let mut b = Backoff::default();
            for u in units {
                let ceiling = b.ceiling();
                let d = b.next_delay(u);
                prop_assert!(d <= ceiling && ceiling <= Duration::from_secs(60));
            }
        }
    }
}
