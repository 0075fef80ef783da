//! What the engine reports: counted always, logged at most a few lines per second per kind
//! (a flood of denials from one misbehaving client must not flood the log).

use fleet_mqtt::{DropReason, Notice};
use tracing::{info, warn};

use crate::metrics::{LogBudget, Metrics};

/// Rate limits for the notice kinds.
#[derive(Default)]
pub(super) struct Notices {
    budgets: [LogBudget; 4],
}

impl Notices {
    fn allow(&self, kind: usize) -> Option<u64> {
        self.budgets.get(kind).and_then(LogBudget::allow)
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
