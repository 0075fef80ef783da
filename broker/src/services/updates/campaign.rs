//! A campaign's rules, I/O-free: which devices are offered the update when, and when the
//! rollout pauses, completes or is aborted.
//!
//! * Targets are split into batches of `batch_size` in rollout order. Batch 0 is offered at
//!   deploy; the next batch when every device of the current one has finished (committed,
//!   rolled back, rejected or failed).
//! * At the end of a batch, if more than `max_failures_percent` of the devices finished so far
//!   have failed, the campaign pauses instead (an operator resumes or aborts it).
//! * Abort withdraws the offer from every device that has not finished.
//! * A deployment whose targets include devices known to be of another class than the
//!   manifest's is refused, naming them ([`wrong_class`]).
//!
//! Every change is returned as [`Effects`]: what to persist (before anything is published) and
//! which devices to offer the manifest to or withdraw it from.

use std::collections::HashMap;

use fleet_proto::v1::{
    CampaignAction, CampaignRecord, CampaignState, TargetRecord, UpdateProgress,
};

/// Whether a target was offered the update and is still working on it (not aborted, not
/// finished): its chunk requests are served, its progress recorded, its offer renewed.
fn working(t: &TargetRecord) -> bool {
    t.offered && !t.aborted && !t.phase().is_final()
}

/// What a change requires of the service.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub(crate) struct Effects {
    /// The campaign record changed: persist it.
    pub campaign_changed: bool,
    /// Targets (indexes) whose records changed and must be persisted before the offers below.
    pub changed: Vec<usize>,
    /// Devices to offer the manifest to (publish it retained).
    pub offer: Vec<String>,
    /// Devices whose offer is withdrawn (clear the retained manifest).
    pub withdraw: Vec<String>,
}

impl Effects {
    /// Whether anything must be persisted.
    pub(crate) fn needs_save(&self) -> bool {
        self.campaign_changed || !self.changed.is_empty()
    }
}

/// One update's rollout.
#[derive(Debug, Clone)]
pub(crate) struct Campaign {
    /// Its state.
    pub record: CampaignRecord,
    /// Its devices, in rollout order.
    pub targets: Vec<TargetRecord>,
    index: HashMap<String, usize>,
}

/// Why a control action is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub(crate) struct ControlError(pub String);

impl Campaign {
    /// A campaign as stored.
    pub(crate) fn from_parts(record: CampaignRecord, targets: Vec<TargetRecord>) -> Self {
        let index = targets
            .iter()
            .enumerate()
            .map(|(i, t)| (t.device_id.clone(), i))
            .collect();
        Campaign {
            record,
            targets,
            index,
        }
    }

    /// A new campaign over `devices` (deduplicated, order kept), not started.
    pub(crate) fn plan(
        devices: &[String],
        batch_size: u32,
        max_failures_percent: u32,
        created_by: &str,
        now_ms: u64,
    ) -> Self {
        let mut seen = std::collections::HashSet::new();
        let devices: Vec<&String> = devices.iter().filter(|d| seen.insert(*d)).collect();
        let n = devices.len().max(1) as u32;
        let size = if batch_size == 0 {
            n
        } else {
            batch_size.min(n)
        };
        let targets = devices
            .iter()
            .enumerate()
            .map(|(i, d)| TargetRecord {
                device_id: (*d).clone(),
                batch: i as u32 / size,
                ..Default::default()
            })
            .collect();
        let record = CampaignRecord {
            state: CampaignState::Running.into(),
            batch_size: size,
            max_failures_percent: match max_failures_percent {
                0 => 100,
                p => p.min(100),
            },
            current_batch: 0,
            batches: n.div_ceil(size),
            reason: String::new(),
            created_at_ms: now_ms,
            updated_at_ms: now_ms,
            created_by: created_by.to_owned(),
        };
        Self::from_parts(record, targets)
    }

    /// Adds the `devices` that are not yet targets as one new batch at the end (order kept,
    /// duplicates dropped). When the campaign had completed it runs again with the new batch
    /// offered at once; otherwise the batch waits its turn (and a resume). Returns the
    /// positions of the new targets (to be stored with their records before the offers) and
    /// the effects, or `None` when no device is new (a retry). Refused on an aborted campaign.
    pub(crate) fn add_batch(
        &mut self,
        devices: &[String],
        now_ms: u64,
    ) -> Result<Option<(Vec<usize>, Effects)>, ControlError> {
        if self.state() == CampaignState::Aborted {
            return Err(ControlError(
                "the campaign was aborted; deploy a new update".into(),
            ));
        }
        let batch = self.record.batches;
        let first = self.targets.len();
        for d in devices {
            if self.index.contains_key(d) {
                continue;
            }
            self.index.insert(d.clone(), self.targets.len());
            self.targets.push(TargetRecord {
                device_id: d.clone(),
                batch,
                ..Default::default()
            });
        }
        if self.targets.len() == first {
            return Ok(None);
        }
        self.record.batches = batch + 1;
        self.record.updated_at_ms = now_ms;
        let mut e = Effects {
            campaign_changed: true,
            ..Effects::default()
        };
        if self.state() == CampaignState::Completed {
            // Completing judged every earlier batch: the new one is offered without a check.
            self.record.state = CampaignState::Running.into();
            self.record.reason = String::new();
            self.record.current_batch = batch;
            self.offer_batch(batch, &mut e);
        }
        Ok(Some(((first..self.targets.len()).collect(), e)))
    }

    /// The target record of `device`, if it is one.
    pub(crate) fn target(&self, device: &str) -> Option<&TargetRecord> {
        self.index.get(device).map(|&i| &self.targets[i])
    }

    /// Whether `device` has been offered the update and is still working on it (so its chunk
    /// requests are served).
    pub(crate) fn is_active(&self, device: &str) -> bool {
        self.target(device).is_some_and(working)
    }

    /// Devices offered the update and not finished: their manifests are re-published after a
    /// restart (the router's retained messages do not survive one).
    pub(crate) fn offered_unfinished(&self) -> Vec<String> {
        self.targets
            .iter()
            .filter(|t| working(t))
            .map(|t| t.device_id.clone())
            .collect()
    }

    /// Counts one chunk sent to `device` (kept in memory, saved with its next change).
    pub(crate) fn note_sent(&mut self, device: &str) {
        if let Some(&i) = self.index.get(device) {
            self.targets[i].chunks_sent += 1;
        }
    }

    fn state(&self) -> CampaignState {
        self.record.state()
    }

    /// Offers the first batch.
    pub(crate) fn start(&mut self, now_ms: u64) -> Effects {
        let mut e = Effects::default();
        self.offer_batch(self.record.current_batch, &mut e);
        self.advance(now_ms, &mut e, false);
        e
    }

    fn offer_batch(&mut self, batch: u32, e: &mut Effects) {
        for (i, t) in self.targets.iter_mut().enumerate() {
            if t.batch == batch && !t.offered && !t.aborted {
                t.offered = true;
                e.changed.push(i);
                e.offer.push(t.device_id.clone());
            }
        }
    }

    /// While running and the current batch is finished: pause at the threshold, complete after
    /// the last batch, or offer the next one. `judged`: the current batch was already judged
    /// (an operator resumed after a pause at the threshold), so it moves on without a check.
    fn advance(&mut self, now_ms: u64, e: &mut Effects, mut judged: bool) {
        while self.state() == CampaignState::Running {
            let batch = self.record.current_batch;
            let unfinished = self
                .targets
                .iter()
                .any(|t| t.batch == batch && !t.aborted && !t.phase().is_final());
            if unfinished {
                return;
            }
            let finished = self.targets.iter().filter(|t| t.phase().is_final()).count() as u64;
            let failed = self
                .targets
                .iter()
                .filter(|t| t.phase().is_failure())
                .count() as u64;
            let max = u64::from(self.record.max_failures_percent);
            e.campaign_changed = true;
            self.record.updated_at_ms = now_ms;
            let over = max < 100 && failed * 100 > max * finished;
            let skip = std::mem::take(&mut judged);
            if over && !skip {
                self.record.state = CampaignState::Paused.into();
                self.record.reason = format!(
                    "paused after batch {}: {failed} of {finished} finished devices failed \
                     (more than {max} %)",
                    batch + 1
                );
                return;
            }
            if batch + 1 >= self.record.batches {
                self.record.state = CampaignState::Completed.into();
                self.record.reason = format!(
                    "{} of {} devices committed",
                    finished - failed,
                    self.targets.len()
                );
                return;
            }
            self.record.current_batch = batch + 1;
            self.offer_batch(batch + 1, e);
        }
    }

    /// A device reported progress. `None` when it is not an active target (unknown, not
    /// offered, aborted, or already finished): nothing changes.
    pub(crate) fn on_progress(
        &mut self,
        device: &str,
        p: &UpdateProgress,
        now_ms: u64,
    ) -> Option<Effects> {
        let &i = self.index.get(device)?;
        let t = &mut self.targets[i];
        if !working(t) {
            return None;
        }
        let phase_changed = t.phase != p.phase;
        t.phase = p.phase;
        t.chunks_held = p.chunks_held;
        t.chunks_total = p.chunks_total;
        t.chunks_rejected = p.chunks_rejected;
        t.error = p.error;
        t.detail = p.detail.clone();
        t.running_version = p.running_version.clone();
        t.updated_at_ms = now_ms;
        let mut e = Effects::default();
        if phase_changed {
            e.changed.push(i);
        }
        if p.phase().is_final() {
            e.withdraw.push(device.to_owned());
            self.advance(now_ms, &mut e, false);
        }
        Some(e)
    }

    /// Pause, resume or abort.
    pub(crate) fn control(
        &mut self,
        action: CampaignAction,
        now_ms: u64,
    ) -> Result<Effects, ControlError> {
        let mut e = Effects::default();
        let state = self.state();
        match (action, state) {
            (CampaignAction::Pause, CampaignState::Running) => {
                self.record.state = CampaignState::Paused.into();
                self.record.reason = "paused by an operator".into();
            }
            (CampaignAction::Resume, CampaignState::Paused) => {
                self.record.state = CampaignState::Running.into();
                self.record.reason = String::new();
                // A batch that finished while paused moves on now, even past the threshold
                // that paused it: resuming is the operator's decision.
                let batch = self.record.current_batch;
                self.offer_batch(batch, &mut e);
                self.advance(now_ms, &mut e, true);
            }
            (CampaignAction::Abort, CampaignState::Running | CampaignState::Paused) => {
                self.record.state = CampaignState::Aborted.into();
                self.record.reason = "aborted by an operator".into();
                for (i, t) in self.targets.iter_mut().enumerate() {
                    if !t.phase().is_final() && !t.aborted {
                        t.aborted = true;
                        e.changed.push(i);
                        if t.offered {
                            e.withdraw.push(t.device_id.clone());
                        }
                    }
                }
            }
            (CampaignAction::Unspecified, _) => {
                return Err(ControlError("no action given".into()));
            }
            (a, s) => {
                return Err(ControlError(format!(
                    "cannot {} a campaign that is {}",
                    a.as_str_name()
                        .trim_start_matches("CAMPAIGN_ACTION_")
                        .to_lowercase(),
                    s.as_str_name()
                        .trim_start_matches("CAMPAIGN_STATE_")
                        .to_lowercase()
                )));
            }
        }
        e.campaign_changed = true;
        self.record.updated_at_ms = now_ms;
        Ok(e)
    }
}

/// Most devices a refusal names; the rest are counted.
const NAMED: usize = 10;

/// Why a deployment is refused: target devices known to be of another class than the
/// manifest's. `known` pairs each target with its class as the gateway last heard it (`None`:
/// never reported one; such a device checks the class itself and rejects a foreign manifest).
pub(crate) fn wrong_class(
    manifest_class: &str,
    known: &[(String, Option<String>)],
) -> Option<String> {
    let wrong: Vec<String> = known
        .iter()
        .filter_map(|(d, c)| {
            c.as_deref()
                .filter(|c| *c != manifest_class)
                .map(|c| format!("{d} ({c})"))
        })
        .collect();
    if wrong.is_empty() {
        return None;
    }
    let more = match wrong.len().saturating_sub(NAMED) {
        0 => String::new(),
        n => format!(" and {n} more"),
    };
    Some(format!(
        "{} target device(s) are not of the update's class {manifest_class:?}: {}{more}; \
         leave them out or deploy an update built for their class",
        wrong.len(),
        wrong[..wrong.len().min(NAMED)].join(", ")
    ))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use fleet_proto::v1::UpdatePhase;

    fn devices(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("d{i}")).collect()
    }

    fn report(phase: UpdatePhase) -> UpdateProgress {
        UpdateProgress {
            phase: phase.into(),
            ..Default::default()
        }
    }

    #[test]
    fn batches_advance_on_success_and_complete() {
        let mut c = Campaign::plan(&devices(5), 2, 0, "svc", 1);
        assert_eq!(c.record.batches, 3);
        let e = c.start(1);
        assert_eq!(e.offer, vec!["d0", "d1"]);
        assert!(c.is_active("d0") && !c.is_active("d2"));
        // Progress inside a batch offers nothing new.
        let e = c
            .on_progress("d0", &report(UpdatePhase::Downloading), 2)
            .unwrap();
        assert!(e.offer.is_empty() && e.changed == vec![0]);
        let e = c
            .on_progress("d0", &report(UpdatePhase::Downloading), 2)
            .unwrap();
        assert!(!e.needs_save(), "same phase again is not saved");
        c.on_progress("d0", &report(UpdatePhase::Committed), 3)
            .unwrap();
        let e = c
            .on_progress("d1", &report(UpdatePhase::Committed), 3)
            .unwrap();
        assert_eq!(e.offer, vec!["d2", "d3"]);
        assert_eq!(e.withdraw, vec!["d1"]);
        // Not offered yet, or finished: ignored.
        assert!(c
            .on_progress("d4", &report(UpdatePhase::Committed), 4)
            .is_none());
        assert!(c
            .on_progress("d0", &report(UpdatePhase::Failed), 4)
            .is_none());
        assert!(c
            .on_progress("zz", &report(UpdatePhase::Failed), 4)
            .is_none());
        c.on_progress("d2", &report(UpdatePhase::Committed), 5)
            .unwrap();
        let e = c
            .on_progress("d3", &report(UpdatePhase::Committed), 5)
            .unwrap();
        assert_eq!(e.offer, vec!["d4"]);
        c.on_progress("d4", &report(UpdatePhase::Committed), 6)
            .unwrap();
        assert_eq!(c.record.state(), CampaignState::Completed);
        assert_eq!(c.record.reason, "5 of 5 devices committed");
    }

    #[test]
    fn the_failure_threshold_pauses_at_the_end_of_a_batch() {
        let mut c = Campaign::plan(&devices(6), 2, 25, "svc", 1);
        c.start(1);
        let e = c
            .on_progress("d0", &report(UpdatePhase::RolledBack), 2)
            .unwrap();
        assert!(e.offer.is_empty());
        assert_eq!(
            c.record.state(),
            CampaignState::Running,
            "batch not finished yet"
        );
        let e = c
            .on_progress("d1", &report(UpdatePhase::Committed), 3)
            .unwrap();
        assert!(e.offer.is_empty());
        assert_eq!(c.record.state(), CampaignState::Paused);
        assert!(c.record.reason.contains("1 of 2"), "{}", c.record.reason);
        // Resume offers the next batch (past the threshold that paused it); abort withdraws
        // the unfinished.
        let e = c.control(CampaignAction::Resume, 4).unwrap();
        assert_eq!(e.offer, vec!["d2", "d3"]);
        assert_eq!(c.record.state(), CampaignState::Running);
        c.on_progress("d2", &report(UpdatePhase::Downloading), 5)
            .unwrap();
        let e = c.control(CampaignAction::Abort, 6).unwrap();
        assert_eq!(e.withdraw, vec!["d2", "d3"]);
        assert_eq!(e.changed, vec![2, 3, 4, 5]);
        assert!(!c.is_active("d2"));
        assert!(c.control(CampaignAction::Resume, 7).is_err());
    }

    #[test]
    fn a_threshold_of_fifty_tolerates_half() {
        let mut c = Campaign::plan(&devices(4), 2, 50, "svc", 1);
        c.start(1);
        c.on_progress("d0", &report(UpdatePhase::Rejected), 2)
            .unwrap();
        let e = c
            .on_progress("d1", &report(UpdatePhase::Committed), 2)
            .unwrap();
        assert_eq!(e.offer, vec!["d2", "d3"], "1 of 2 is not more than 50 %");
    }

    #[test]
    fn targets_of_another_class_are_named() {
        let known = |v: &[(&str, Option<&str>)]| -> Vec<(String, Option<String>)> {
            v.iter()
                .map(|(d, c)| (d.to_string(), c.map(str::to_owned)))
                .collect()
        };
        assert_eq!(
            wrong_class("pump", &known(&[("d0", Some("pump")), ("d1", None)])),
            None,
            "same class or never reported: allowed"
        );
        let msg = wrong_class(
            "pump",
            &known(&[("d0", Some("pump")), ("d1", Some("valve")), ("d2", None)]),
        )
        .unwrap();
        assert!(msg.starts_with("1 target device(s)"), "{msg}");
        assert!(msg.contains("d1 (valve)") && !msg.contains("d0"), "{msg}");
        let many: Vec<_> = (0..25)
            .map(|i| (format!("v{i}"), Some("valve".to_owned())))
            .collect();
        let msg = wrong_class("pump", &many).unwrap();
        assert!(msg.contains("v9 (valve)") && !msg.contains("v10 "), "{msg}");
        assert!(msg.contains("and 15 more"), "{msg}");
    }

    #[test]
    fn pause_holds_the_next_batch_until_resume() {
        let mut c = Campaign::plan(&devices(2), 1, 0, "svc", 1);
        c.start(1);
        c.control(CampaignAction::Pause, 2).unwrap();
        let e = c
            .on_progress("d0", &report(UpdatePhase::Committed), 3)
            .unwrap();
        assert!(e.offer.is_empty());
        let e = c.control(CampaignAction::Resume, 4).unwrap();
        assert_eq!(e.offer, vec!["d1"]);
        assert!(c.control(CampaignAction::Resume, 5).is_err());
        assert!(c.control(CampaignAction::Unspecified, 5).is_err());
    }

    #[test]
    fn added_batches_wait_their_turn_and_reopen_a_completed_campaign() {
        let mut c = Campaign::plan(&devices(2), 0, 100, "svc", 1);
        let e = c.start(1);
        assert_eq!(e.offer, ["d0", "d1"]);
        // Added while the first batch runs: queued behind it, nothing offered yet.
        let (new, e) = c
            .add_batch(&["d1".into(), "d2".into(), "d2".into()], 2)
            .unwrap()
            .unwrap();
        assert_eq!(new, [2]);
        assert!(e.offer.is_empty() && e.campaign_changed);
        assert_eq!((c.record.batches, c.targets[2].batch), (2, 1));
        // A retry adds nothing.
        assert!(c
            .add_batch(&["d0".into(), "d2".into()], 3)
            .unwrap()
            .is_none());
        c.on_progress("d0", &report(UpdatePhase::Committed), 4)
            .unwrap();
        let e = c
            .on_progress("d1", &report(UpdatePhase::Failed), 5)
            .unwrap();
        assert_eq!(e.offer, ["d2"], "the added batch follows the first");
        let e = c
            .on_progress("d2", &report(UpdatePhase::Committed), 6)
            .unwrap();
        assert!(e.offer.is_empty());
        assert_eq!(c.record.state(), CampaignState::Completed);
        // Added after completion: the campaign runs again and offers it at once.
        let (new, e) = c.add_batch(&["d3".into()], 7).unwrap().unwrap();
        assert_eq!((new, e.offer), (vec![3], vec!["d3".to_owned()]));
        assert_eq!(c.record.state(), CampaignState::Running);
        assert_eq!((c.record.current_batch, c.record.batches), (2, 3));
        assert!(c.is_active("d3"));
        c.on_progress("d3", &report(UpdatePhase::Committed), 8)
            .unwrap();
        assert_eq!(c.record.state(), CampaignState::Completed);
        // Never to an aborted campaign.
        let mut c = Campaign::plan(&devices(1), 0, 100, "svc", 1);
        c.start(1);
        c.control(CampaignAction::Abort, 2).unwrap();
        assert!(c.add_batch(&["d9".into()], 3).is_err());
    }
}
