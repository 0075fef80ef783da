//! What the engine reports: counted always, logged at most a few lines per second per kind
//! (a flood of denials from one misbehaving client must not flood the log).

use std::sync::Mutex;
use std::time::{Duration, Instant};

use fleet_mqtt::{DropReason, Notice};
use tracing::{info, warn};

use crate::metrics::Metrics;

/// Log lines per kind per window.
const LINES_PER_WINDOW: u32 = 5;
const WINDOW: Duration = Duration::from_secs(1);

#[derive(Default)]
struct Budget {
    window_start: Option<Instant>,
    used: u32,
    suppressed: u64,
}

impl Budget {
    /// Whether a line may be logged now, and how many were suppressed since the last one.
    fn take(&mut self, now: Instant) -> Option<u64> {
        let fresh = self
            .window_start
            .is_none_or(|s| now.duration_since(s) >= WINDOW);
        if fresh {
            self.window_start = Some(now);
            self.used = 0;
        }
        if self.used < LINES_PER_WINDOW {
            self.used += 1;
            Some(std::mem::take(&mut self.suppressed))
        } else {
            self.suppressed += 1;
            None
        }
    }
}

/// Rate limits for the notice kinds.
#[derive(Default)]
pub(super) struct Notices {
    budgets: Mutex<[Budget; 4]>,
}

impl Notices {
    fn allow(&self, kind: usize) -> Option<u64> {
        let mut b = super::lock(&self.budgets);
        b.get_mut(kind).and_then(|b| b.take(Instant::now()))
    }

    /// Counts `n` and logs it within the rate limit.
    pub(super) fn note(&self, metrics: &Metrics, n: Notice) {
        match n {
            Notice::Dropped { key, reason, count } => {
                Metrics::add(&metrics.messages_dropped, count);
                if let Some(suppressed) = self.allow(0) {
                    let why = match reason {
                        DropReason::Qos0QueueFull => "QoS 0 message for a full queue",
                        DropReason::OfflineQueueFull => "oldest of a full offline queue",
                        DropReason::SessionExpired => "session expired",
                    };
                    warn!(session = %key, count, reason = why, suppressed, "messages dropped");
                }
            }
            Notice::PublishDenied { key, topic } => {
                Metrics::inc(&metrics.acl_denials);
                if let Some(suppressed) = self.allow(1) {
                    warn!(session = %key, topic, suppressed, "publish denied");
                }
            }
            Notice::SubscriptionDenied {
                key,
                filter,
                revoked,
            } => {
                if revoked {
                    Metrics::inc(&metrics.subscriptions_revoked);
                } else {
                    Metrics::inc(&metrics.acl_denials);
                }
                if let Some(suppressed) = self.allow(2) {
                    if revoked {
                        warn!(session = %key, filter, suppressed, "subscription removed: the policy no longer allows it");
                    } else {
                        warn!(session = %key, filter, suppressed, "subscription denied");
                    }
                }
            }
            Notice::WillPublished { key, topic } => {
                Metrics::inc(&metrics.wills_published);
                if let Some(suppressed) = self.allow(3) {
                    info!(session = %key, topic, suppressed, "will published");
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_flood_is_logged_a_few_lines_a_window_and_the_rest_counted() {
        let mut b = Budget::default();
        let t0 = Instant::now();
        let allowed = (0..100).filter(|_| b.take(t0).is_some()).count();
        assert_eq!(allowed, LINES_PER_WINDOW as usize);
        // The next window's first line says how many were suppressed.
        assert_eq!(b.take(t0 + WINDOW), Some(100 - u64::from(LINES_PER_WINDOW)));
    }
}
