//! How an update is rolled out: batch size and failure threshold, with cautious defaults.
//!
//! The gateway offers an update batch by batch; a batch starts when every device of the
//! previous one has finished, and at the end of a batch the campaign pauses if more than the
//! threshold's percentage of the devices finished so far have failed. [`Rollout::default`]
//! starts small and stops early: batches of 5 % of the targets (rounded up, at least one
//! device, so a fleet of up to 20 devices starts with one) and a threshold of 1 % (so one
//! failure in the first batch pauses any fleet of up to 2,000 devices, and later batches pause
//! once more than 1 in 100 finished devices failed). An operator resumes or aborts a paused
//! campaign.

use std::collections::BTreeSet;
use std::fmt;
use std::str::FromStr;

use fleet_proto::v1::{DeployUpdate, DeviceStatus, UpdateRecord};

use crate::client::{FleetClient, SdkError};

/// Devices per batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum BatchSize {
    /// Every target in one batch.
    All,
    /// This many devices per batch (at least 1).
    Devices(u32),
    /// This percentage of the targets per batch (1 to 100), rounded up, at least one device.
    Percent(u32),
}

impl BatchSize {
    /// The batch size for `targets` devices, as `DeployUpdate.batch_size` takes it (0: all).
    pub fn resolve(self, targets: usize) -> u32 {
        match self {
            BatchSize::All => 0,
            BatchSize::Devices(n) => n.max(1),
            BatchSize::Percent(p) => {
                let targets = u64::try_from(targets).unwrap_or(u64::MAX);
                let n = targets.saturating_mul(u64::from(p.min(100))).div_ceil(100);
                u32::try_from(n).unwrap_or(u32::MAX).max(1)
            }
        }
    }
}

impl fmt::Display for BatchSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BatchSize::All => f.write_str("all"),
            BatchSize::Devices(n) => write!(f, "{n}"),
            BatchSize::Percent(p) => write!(f, "{p}%"),
        }
    }
}

/// Why a batch size does not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0:?} is not a batch size: give a number of devices (3), a percentage of the targets (5%) or all")]
pub struct BatchSizeError(String);

impl FromStr for BatchSize {
    type Err = BatchSizeError;

    /// `N` devices, `P%` of the targets, or `all` (`0` too).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || BatchSizeError(s.to_owned());
        let t = s.trim();
        if t.eq_ignore_ascii_case("all") {
            return Ok(BatchSize::All);
        }
        if let Some(p) = t.strip_suffix('%') {
            return match p.trim().parse::<u32>() {
                Ok(p @ 1..=100) => Ok(BatchSize::Percent(p)),
                _ => Err(bad()),
            };
        }
        match t.parse::<u32>() {
            Ok(0) => Ok(BatchSize::All),
            Ok(n) => Ok(BatchSize::Devices(n)),
            Err(_) => Err(bad()),
        }
    }
}

/// A rollout plan. See the [module documentation](self) for what the defaults do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rollout {
    /// Devices per batch. Default [`Rollout::DEFAULT_BATCH`].
    pub batch: BatchSize,
    /// Pause when, at the end of a batch, more than this percentage of the devices finished
    /// so far have failed; 100 never pauses. Default
    /// [`Rollout::DEFAULT_MAX_FAILURES_PERCENT`].
    pub max_failures_percent: u32,
}

impl Rollout {
    /// Default batch size: 5 % of the targets, at least one device.
    pub const DEFAULT_BATCH: BatchSize = BatchSize::Percent(5);
    /// Default failure threshold, in percent.
    pub const DEFAULT_MAX_FAILURES_PERCENT: u32 = 1;

    /// The request that deploys `update_id` to `targets` devices (named by `device_ids` and
    /// `device_class`) with this plan.
    pub fn request(
        &self,
        update_id: &str,
        device_ids: Vec<String>,
        device_class: String,
        targets: usize,
    ) -> DeployUpdate {
        DeployUpdate {
            update_id: update_id.to_owned(),
            device_ids,
            device_class,
            batch_size: self.batch.resolve(targets),
            // 0 would mean "never pause" on the wire; 100 says so explicitly.
            max_failures_percent: self.max_failures_percent.clamp(1, 100),
            add_targets: false,
        }
    }
}

impl Default for Rollout {
    fn default() -> Self {
        Rollout {
            batch: Self::DEFAULT_BATCH,
            max_failures_percent: Self::DEFAULT_MAX_FAILURES_PERCENT,
        }
    }
}

/// The class a device last told the gateway (its presence, else its status report).
pub(crate) fn class_of(s: &DeviceStatus) -> Option<&str> {
    s.presence
        .as_ref()
        .map(|p| p.device_class.as_str())
        .filter(|c| !c.is_empty())
        .or_else(|| {
            s.last_report
                .as_ref()
                .map(|r| r.device_class.as_str())
                .filter(|c| !c.is_empty())
        })
}

/// How many distinct devices a deployment to `device_ids` and the devices of `class` among
/// `known` reaches (the gateway's own rule for targets).
fn count_targets(device_ids: &[String], class: Option<&str>, known: &[DeviceStatus]) -> usize {
    let mut all: BTreeSet<&str> = device_ids.iter().map(String::as_str).collect();
    if let Some(class) = class {
        all.extend(
            known
                .iter()
                .filter(|s| class_of(s) == Some(class))
                .map(|s| s.device_id.as_str()),
        );
    }
    all.len()
}

impl FleetClient {
    /// Deploys `update_id` to `device_ids` and every known device of `device_class` (with
    /// neither: every known device of the update's class), batch by batch as `rollout` says.
    /// A batch size in percent is resolved against the number of targets the gateway knows.
    pub async fn deploy_rollout(
        &self,
        update_id: &str,
        device_ids: Vec<String>,
        device_class: Option<String>,
        rollout: Rollout,
    ) -> Result<UpdateRecord, SdkError> {
        let targets = match rollout.batch {
            BatchSize::Percent(_) => {
                let class = match (&device_class, device_ids.is_empty()) {
                    (Some(c), _) => Some(c.clone()),
                    (None, true) => Some(self.get_update(update_id).await?.device_class),
                    (None, false) => None,
                };
                let known = match &class {
                    Some(_) => self.status(&[]).await?,
                    None => Vec::new(),
                };
                count_targets(&device_ids, class.as_deref(), &known)
            }
            BatchSize::All | BatchSize::Devices(_) => 0,
        };
        let req = rollout.request(
            update_id,
            device_ids,
            device_class.unwrap_or_default(),
            targets,
        );
        self.deploy_update(req).await
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn targets_are_the_named_devices_and_the_class_members_once() {
        use fleet_proto::v1::{Presence, StatusReport};
        let dev = |id: &str, presence: Option<&str>, report: Option<&str>| DeviceStatus {
            device_id: id.into(),
            presence: presence.map(|c| Presence {
                device_class: c.into(),
                ..Default::default()
            }),
            last_report: report.map(|c| StatusReport {
                device_class: c.into(),
                ..Default::default()
            }),
            ..Default::default()
        };
        let known = [
            dev("a", Some("pump"), None),
            dev("b", None, Some("pump")),
            dev("c", Some("valve"), Some("pump")),
            dev("d", None, None),
        ];
        let named = ["a".to_owned(), "x".to_owned(), "x".to_owned()];
        assert_eq!(count_targets(&named, None, &known), 2);
        // a and b are pumps (presence first, then the report); c says valve in its presence.
        assert_eq!(count_targets(&[], Some("pump"), &known), 2);
        assert_eq!(count_targets(&named, Some("pump"), &known), 3);
        assert_eq!(count_targets(&[], Some("valve"), &known), 1);
    }

    #[test]
    fn batch_sizes_parse() {
        assert_eq!("5%".parse(), Ok(BatchSize::Percent(5)));
        assert_eq!(" 100% ".parse(), Ok(BatchSize::Percent(100)));
        assert_eq!("3".parse(), Ok(BatchSize::Devices(3)));
        assert_eq!("all".parse(), Ok(BatchSize::All));
        assert_eq!("0".parse(), Ok(BatchSize::All));
        for bad in ["0%", "101%", "-1", "x", "", "5 %%"] {
            assert!(bad.parse::<BatchSize>().is_err(), "{bad:?}");
        }
        for b in [BatchSize::All, BatchSize::Devices(7), BatchSize::Percent(5)] {
            assert_eq!(b.to_string().parse(), Ok(b));
        }
    }

    #[test]
    fn the_default_rollout_starts_small_and_pauses_on_failures() {
        let r = Rollout::default();
        assert_eq!(r.batch, BatchSize::Percent(5));
        assert_eq!(r.max_failures_percent, 1);
        // One device first in a small fleet, 5 % (rounded up) in a large one.
        for (targets, batch) in [
            (0, 1),
            (1, 1),
            (3, 1),
            (20, 1),
            (21, 2),
            (100, 5),
            (10_000, 500),
        ] {
            assert_eq!(r.batch.resolve(targets), batch, "{targets} targets");
        }
        let req = r.request("fw-1", vec!["d1".into(), "d2".into()], String::new(), 2);
        assert_eq!(req.batch_size, 1);
        assert_eq!(req.max_failures_percent, 1);
        assert_eq!(req.device_ids, ["d1", "d2"]);
        // A threshold of 0 is sent as 1, never as the wire's "never pause".
        let strict = Rollout {
            max_failures_percent: 0,
            ..Rollout::default()
        };
        assert_eq!(
            strict
                .request("u", vec![], "c".into(), 9)
                .max_failures_percent,
            1
        );
        let all = Rollout {
            batch: BatchSize::All,
            max_failures_percent: 100,
        };
        let req = all.request("u", vec![], "c".into(), 50);
        assert_eq!((req.batch_size, req.max_failures_percent), (0, 100));
        assert_eq!(BatchSize::Devices(0).resolve(10), 1);
        assert_eq!(BatchSize::Percent(100).resolve(usize::MAX), u32::MAX);
    }
}
