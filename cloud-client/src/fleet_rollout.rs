//! One rollout across the fleet, as an I/O-free state machine: ONE set of batch and
//! threshold rules ([`Rollout`]) for all gateways' targets together.
//!
//! * The targets are ordered by (gateway id, device id) and cut into batches of the rollout's
//!   size (resolved against the whole fleet's target count); a batch may span gateways.
//! * The next batch starts when every device of the current one has finished (committed,
//!   rolled back, rejected, failed, or withdrawn by an abort on its gateway).
//! * When a batch has finished and more than `max_failures_percent` of the devices finished so
//!   far have failed, the rollout pauses (the gateway's own rule, applied fleet-wide; 100
//!   never pauses); [`FleetRolloutPlan::resume`] goes on with the next batch.
//!
//! Inputs are the devices' final phases as their gateways report them; outputs are
//! [`DeployBatch`]es, "deploy these devices on gateway G" (a `DeployUpdate` with
//! `add_targets`, so the gateway appends them to its campaign for the update).
//!
//! Restartable: the gateways' update records say which devices were deployed and how they
//! ended, which is all the state there is. [`FleetRolloutPlan::restore`] rebuilds the machine
//! from them (deployed devices first, in order, then the rest in order) and continues with the
//! same next batch an uninterrupted run would have offered. What it cannot know is an
//! operator's resume: a rollout over its threshold pauses again after a restart.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use fleet_proto::v1::{TargetRecord, UpdatePhase};

use crate::rollout::{BatchSize, Rollout};

/// One device of a fleet rollout.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct FleetTarget {
    /// Its gateway.
    pub gateway_id: String,
    /// The device.
    pub device_id: String,
}

/// Where a target stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TargetState {
    /// Not deployed yet.
    Waiting,
    /// Deployed to its gateway, not finished.
    Deployed,
    /// Committed the update.
    Succeeded,
    /// Finished without the update (rolled back, rejected, failed, withdrawn).
    Failed,
}

impl TargetState {
    /// Whether the device has finished.
    pub fn is_final(self) -> bool {
        matches!(self, TargetState::Succeeded | TargetState::Failed)
    }
}

/// The rollout's state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FleetRolloutState {
    /// Offering batch after batch.
    Running,
    /// Stopped by the failure threshold; [`FleetRolloutPlan::resume`] goes on.
    Paused(String),
    /// Every target has finished.
    Completed,
}

/// "Deploy these devices on gateway G", as part of fleet batch `batch`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeployBatch {
    /// The fleet batch (0-based).
    pub batch: u32,
    /// The gateway.
    pub gateway_id: String,
    /// Its devices of the batch, by id.
    pub device_ids: Vec<String>,
}

/// Counts of a rollout's targets.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FleetProgress {
    /// Targets.
    pub targets: usize,
    /// Deployed so far.
    pub deployed: usize,
    /// Committed.
    pub succeeded: usize,
    /// Finished without the update.
    pub failed: usize,
}

/// The fleet rollout state machine: the targets in (gateway, device) order cut into batches,
/// the next batch once the current one has finished, a pause past the failure threshold, and
/// [`restore`](Self::restore) from the gateways' records after a restart.
#[derive(Debug, Clone)]
pub struct FleetRolloutPlan {
    /// In rollout order; the first `deployed` have been deployed.
    targets: Vec<(FleetTarget, TargetState)>,
    index: HashMap<FleetTarget, usize>,
    batch_size: usize,
    max_failures_percent: u32,
    deployed: usize,
    batches_started: u32,
    state: FleetRolloutState,
}

impl FleetRolloutPlan {
    /// A rollout over `targets` (deduplicated, put in (gateway, device) order), not started.
    pub fn new(targets: impl IntoIterator<Item = FleetTarget>, rollout: Rollout) -> Self {
        let ordered: BTreeSet<FleetTarget> = targets.into_iter().collect();
        Self::from_order(ordered.into_iter().collect(), rollout)
    }

    fn from_order(order: Vec<FleetTarget>, rollout: Rollout) -> Self {
        let n = order.len();
        let batch_size = match rollout.batch {
            BatchSize::All => n.max(1),
            b => usize::try_from(b.resolve(n)).unwrap_or(usize::MAX).max(1),
        };
        let index = order
            .iter()
            .enumerate()
            .map(|(i, t)| (t.clone(), i))
            .collect();
        FleetRolloutPlan {
            targets: order
                .into_iter()
                .map(|t| (t, TargetState::Waiting))
                .collect(),
            index,
            batch_size,
            max_failures_percent: match rollout.max_failures_percent {
                0 => 1,
                p => p.min(100),
            },
            deployed: 0,
            batches_started: 0,
            state: FleetRolloutState::Running,
        }
    }

    /// Rebuilds a rollout after a restart from what the gateways hold: for each gateway, the
    /// targets of its campaign for the update (`UpdateRecord.targets`). Devices found there
    /// count as deployed, with the state their record shows; they come first (in (gateway,
    /// device) order), then the `targets` not deployed yet. Returns the machine and what to
    /// deploy now (the next batch, when the deployed ones have all finished and the threshold
    /// allows).
    pub fn restore(
        targets: impl IntoIterator<Item = FleetTarget>,
        rollout: Rollout,
        records: &BTreeMap<String, Vec<TargetRecord>>,
    ) -> (Self, Vec<DeployBatch>) {
        let mut done: BTreeMap<FleetTarget, TargetState> = BTreeMap::new();
        for (gw, recs) in records {
            for r in recs {
                let t = FleetTarget {
                    gateway_id: gw.clone(),
                    device_id: r.device_id.clone(),
                };
                done.insert(t, state_of(r));
            }
        }
        let rest: BTreeSet<FleetTarget> = targets
            .into_iter()
            .filter(|t| !done.contains_key(t))
            .collect();
        let mut order: Vec<FleetTarget> = done.keys().cloned().collect();
        order.extend(rest);
        let mut plan = Self::from_order(order, rollout);
        for (i, st) in done.values().enumerate() {
            plan.targets[i].1 = *st;
        }
        plan.deployed = done.len();
        plan.batches_started =
            u32::try_from(done.len().div_ceil(plan.batch_size)).unwrap_or(u32::MAX);
        let out = plan.advance(false);
        (plan, out)
    }

    /// Offers the first batch.
    pub fn start(&mut self) -> Vec<DeployBatch> {
        self.advance(false)
    }

    /// A device reported `phase` on its gateway. A final phase of a deployed device finishes
    /// it; when that ends the batch, returns the next one to deploy (or pauses, or completes).
    /// Anything else (not a target, not deployed, already finished, not final) changes nothing.
    pub fn on_phase(
        &mut self,
        gateway_id: &str,
        device_id: &str,
        phase: UpdatePhase,
    ) -> Vec<DeployBatch> {
        if !phase.is_final() {
            return Vec::new();
        }
        let state = if phase.is_failure() {
            TargetState::Failed
        } else {
            TargetState::Succeeded
        };
        self.finish(gateway_id, device_id, state)
    }

    /// As [`on_phase`](Self::on_phase) from a gateway's target record (an aborted target
    /// counts as failed).
    pub fn on_record(&mut self, gateway_id: &str, record: &TargetRecord) -> Vec<DeployBatch> {
        match state_of(record) {
            s @ (TargetState::Succeeded | TargetState::Failed) => {
                self.finish(gateway_id, &record.device_id, s)
            }
            TargetState::Waiting | TargetState::Deployed => Vec::new(),
        }
    }

    fn finish(
        &mut self,
        gateway_id: &str,
        device_id: &str,
        state: TargetState,
    ) -> Vec<DeployBatch> {
        let key = FleetTarget {
            gateway_id: gateway_id.to_owned(),
            device_id: device_id.to_owned(),
        };
        let Some(&i) = self.index.get(&key) else {
            return Vec::new();
        };
        if self.targets[i].1 != TargetState::Deployed {
            return Vec::new();
        }
        self.targets[i].1 = state;
        self.advance(false)
    }

    /// Goes on after a pause: the next batch is offered even though the threshold was
    /// passed (the operator's decision). Nothing when not paused.
    pub fn resume(&mut self) -> Vec<DeployBatch> {
        if !matches!(self.state, FleetRolloutState::Paused(_)) {
            return Vec::new();
        }
        self.state = FleetRolloutState::Running;
        self.advance(true)
    }

    /// Its state.
    pub fn state(&self) -> &FleetRolloutState {
        &self.state
    }

    /// Devices per batch.
    pub fn batch_size(&self) -> usize {
        self.batch_size
    }

    /// Every target in rollout order, with its state.
    pub fn targets(&self) -> &[(FleetTarget, TargetState)] {
        &self.targets
    }

    /// Deployed devices that have not finished, by gateway.
    pub fn in_flight(&self) -> BTreeMap<String, Vec<String>> {
        let mut out: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for (t, s) in &self.targets[..self.deployed] {
            if *s == TargetState::Deployed {
                out.entry(t.gateway_id.clone())
                    .or_default()
                    .push(t.device_id.clone());
            }
        }
        out
    }

    /// Counts.
    pub fn progress(&self) -> FleetProgress {
        let count = |s: TargetState| self.targets.iter().filter(|(_, x)| *x == s).count();
        FleetProgress {
            targets: self.targets.len(),
            deployed: self.deployed,
            succeeded: count(TargetState::Succeeded),
            failed: count(TargetState::Failed),
        }
    }

    /// While running and every deployed device has finished: pause at the threshold (unless
    /// `judged`), complete after the last batch, or return the next batch.
    fn advance(&mut self, judged: bool) -> Vec<DeployBatch> {
        if self.state != FleetRolloutState::Running {
            return Vec::new();
        }
        if self.targets[..self.deployed]
            .iter()
            .any(|(_, s)| !s.is_final())
        {
            return Vec::new();
        }
        let p = self.progress();
        let finished = (p.succeeded + p.failed) as u64;
        let failed = p.failed as u64;
        let max = u64::from(self.max_failures_percent);
        if self.deployed > 0 && !judged && max < 100 && failed * 100 > max * finished {
            self.state = FleetRolloutState::Paused(format!(
                "paused after batch {}: {failed} of {finished} finished devices failed (more than {max} %)",
                self.batches_started
            ));
            return Vec::new();
        }
        if self.deployed == self.targets.len() {
            self.state = FleetRolloutState::Completed;
            return Vec::new();
        }
        let end = self
            .deployed
            .saturating_add(self.batch_size)
            .min(self.targets.len());
        let batch = self.batches_started;
        let mut by_gateway: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for (t, s) in &mut self.targets[self.deployed..end] {
            *s = TargetState::Deployed;
            by_gateway
                .entry(t.gateway_id.clone())
                .or_default()
                .push(t.device_id.clone());
        }
        self.deployed = end;
        self.batches_started = batch.saturating_add(1);
        by_gateway
            .into_iter()
            .map(|(gateway_id, device_ids)| DeployBatch {
                batch,
                gateway_id,
                device_ids,
            })
            .collect()
    }
}

fn state_of(r: &TargetRecord) -> TargetState {
    let phase = r.phase();
    if phase.is_failure() {
        TargetState::Failed
    } else if phase.is_final() {
        TargetState::Succeeded
    } else if r.aborted {
        TargetState::Failed
    } else {
        TargetState::Deployed
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use proptest::prelude::*;

    fn t(gw: &str, dev: &str) -> FleetTarget {
        FleetTarget {
            gateway_id: gw.into(),
            device_id: dev.into(),
        }
    }

    fn rollout(batch: u32, max: u32) -> Rollout {
        Rollout {
            batch: BatchSize::Devices(batch),
            max_failures_percent: max,
        }
    }

    #[test]
    fn batches_span_gateways_in_gateway_then_device_order() {
        let mut p = FleetRolloutPlan::new(
            [
                t("gw-2", "a"),
                t("gw-1", "b"),
                t("gw-1", "a"),
                t("gw-1", "a"),
            ],
            rollout(2, 100),
        );
        let b0 = p.start();
        assert_eq!(
            b0,
            [DeployBatch {
                batch: 0,
                gateway_id: "gw-1".into(),
                device_ids: vec!["a".into(), "b".into()],
            }]
        );
        assert!(p.on_phase("gw-1", "a", UpdatePhase::Committed).is_empty());
        assert!(
            p.on_phase("gw-1", "a", UpdatePhase::Committed).is_empty(),
            "once"
        );
        assert!(
            p.on_phase("gw-2", "a", UpdatePhase::Committed).is_empty(),
            "not deployed"
        );
        assert!(p.on_phase("gw-1", "b", UpdatePhase::Downloading).is_empty());
        let b1 = p.on_phase("gw-1", "b", UpdatePhase::Failed);
        assert_eq!(b1.len(), 1);
        assert_eq!((b1[0].batch, b1[0].gateway_id.as_str()), (1, "gw-2"));
        p.on_phase("gw-2", "a", UpdatePhase::Committed);
        assert_eq!(p.state(), &FleetRolloutState::Completed);
        assert_eq!(
            p.progress(),
            FleetProgress {
                targets: 3,
                deployed: 3,
                succeeded: 2,
                failed: 1
            }
        );
    }

    #[test]
    fn a_failure_over_the_threshold_pauses_the_whole_fleet() {
        let targets = [
            t("gw-1", "a"),
            t("gw-2", "b"),
            t("gw-3", "c"),
            t("gw-3", "d"),
        ];
        let mut p = FleetRolloutPlan::new(targets, rollout(2, 10));
        p.start();
        p.on_phase("gw-1", "a", UpdatePhase::Committed);
        assert!(p.on_phase("gw-2", "b", UpdatePhase::RolledBack).is_empty());
        assert!(matches!(p.state(), FleetRolloutState::Paused(r) if r.contains("1 of 2")));
        let next = p.resume();
        assert_eq!(next[0].device_ids, ["c", "d"]);
        assert_eq!(p.state(), &FleetRolloutState::Running);
    }

    /// A rollout plan and, per target, whether it fails and when it reports (a permutation
    /// key).
    fn scenario() -> impl Strategy<Value = (Vec<(FleetTarget, bool, u32)>, u32, u32)> {
        (
            proptest::collection::vec((0u8..4, 0u8..12, any::<bool>(), any::<u32>()), 0..40),
            1u32..12,
            0u32..=100,
        )
            .prop_map(|(raw, batch, max)| {
                let mut seen = BTreeSet::new();
                let targets = raw
                    .into_iter()
                    .filter_map(|(g, d, fail, key)| {
                        let target = t(&format!("gw-{g}"), &format!("dev-{d:02}"));
                        seen.insert(target.clone()).then_some((target, fail, key))
                    })
                    .collect();
                (targets, batch, max)
            })
    }

    /// Runs a rollout to its end (resuming every pause), checking the rules at every step;
    /// `restart_at`: rebuild the machine from the "gateways' records" after that many reports.
    /// Returns the batches deployed, in order.
    fn run(
        targets: &[(FleetTarget, bool, u32)],
        batch: u32,
        max: u32,
        mut restart_at: Option<usize>,
    ) -> Vec<DeployBatch> {
        let fails: HashMap<FleetTarget, bool> =
            targets.iter().map(|(t, f, _)| (t.clone(), *f)).collect();
        let key: HashMap<FleetTarget, u32> =
            targets.iter().map(|(t, _, k)| (t.clone(), *k)).collect();
        let r = rollout(batch, max);
        let mut p = FleetRolloutPlan::new(targets.iter().map(|(t, _, _)| t.clone()), r);
        let mut log: Vec<DeployBatch> = Vec::new();
        // What the gateways hold: deployed targets and their phases.
        let mut records: BTreeMap<String, Vec<TargetRecord>> = BTreeMap::new();
        let mut in_flight: Vec<FleetTarget> = Vec::new();
        let mut deployed: BTreeSet<FleetTarget> = BTreeSet::new();
        let mut reports = 0usize;
        let mut deploy = |out: Vec<DeployBatch>,
                          in_flight: &mut Vec<FleetTarget>,
                          records: &mut BTreeMap<String, Vec<TargetRecord>>,
                          log: &mut Vec<DeployBatch>| {
            if out.is_empty() {
                return;
            }
            // Never two batches at once: a batch starts only when nothing is in flight.
            assert!(
                in_flight.is_empty(),
                "a batch started while {in_flight:?} work"
            );
            let b = out[0].batch;
            let mut size = 0;
            for d in out {
                assert_eq!(d.batch, b, "one batch at a time");
                for dev in &d.device_ids {
                    let target = t(&d.gateway_id, dev);
                    assert!(fails.contains_key(&target), "not a target: {target:?}");
                    assert!(deployed.insert(target.clone()), "offered twice: {target:?}");
                    records
                        .entry(d.gateway_id.clone())
                        .or_default()
                        .push(TargetRecord {
                            device_id: dev.clone(),
                            offered: true,
                            ..TargetRecord::default()
                        });
                    in_flight.push(target);
                    size += 1;
                }
                log.push(d);
            }
            assert!(size <= batch as usize);
            in_flight.sort_by_key(|t| key[t]);
        };
        let out = p.start();
        deploy(out, &mut in_flight, &mut records, &mut log);
        loop {
            if restart_at == Some(reports) {
                // Once: a restored machine that pauses again is resumed like the first.
                restart_at = None;
                let (q, out) = FleetRolloutPlan::restore(
                    targets.iter().map(|(t, _, _)| t.clone()),
                    r,
                    &records,
                );
                p = q;
                deploy(out, &mut in_flight, &mut records, &mut log);
            }
            match p.state().clone() {
                FleetRolloutState::Completed => break,
                FleetRolloutState::Paused(_) => {
                    // Paused exactly per the rule: the batch is done and over the threshold.
                    assert!(in_flight.is_empty());
                    let pr = p.progress();
                    let finished = (pr.succeeded + pr.failed) as u64;
                    assert!(max < 100 && pr.failed as u64 * 100 > u64::from(max.max(1)) * finished);
                    let out = p.resume();
                    deploy(out, &mut in_flight, &mut records, &mut log);
                    continue;
                }
                FleetRolloutState::Running => {}
            }
            let Some(target) = in_flight.first().cloned() else {
                panic!("running with nothing in flight: {:?}", p.progress());
            };
            in_flight.remove(0);
            let phase = if fails[&target] {
                UpdatePhase::Failed
            } else {
                UpdatePhase::Committed
            };
            if let Some(r) = records
                .get_mut(&target.gateway_id)
                .and_then(|v| v.iter_mut().find(|r| r.device_id == target.device_id))
            {
                r.phase = phase.into();
            }
            reports += 1;
            let out = p.on_phase(&target.gateway_id, &target.device_id, phase);
            // Not paused at a batch end where the rule does not say so.
            if in_flight.is_empty() && out.is_empty() && p.state() == &FleetRolloutState::Running {
                panic!("a finished batch neither continued nor paused");
            }
            if in_flight.is_empty() && p.state() == &FleetRolloutState::Running && !out.is_empty() {
                let pr = p.progress();
                let finished = (pr.succeeded + pr.failed) as u64;
                let over = max < 100 && pr.failed as u64 * 100 > u64::from(max.max(1)) * finished;
                assert!(!over, "went on past the threshold");
            }
            deploy(out, &mut in_flight, &mut records, &mut log);
        }
        assert_eq!(deployed.len(), targets.len(), "every target offered once");
        log
    }

    proptest! {
        #[test]
        fn the_fleet_rules_hold(
            (targets, batch, max) in scenario(),
            restart in any::<prop::sample::Index>(),
        ) {
            let log = run(&targets, batch, max, None);
            // Batches in (gateway, device) order of the whole fleet, cut at the batch size.
            let mut order: Vec<FleetTarget> = targets.iter().map(|(t, _, _)| t.clone()).collect();
            order.sort();
            let flat: Vec<FleetTarget> = log
                .iter()
                .flat_map(|d| d.device_ids.iter().map(|x| t(&d.gateway_id, x)))
                .collect();
            prop_assert_eq!(&flat, &order);
            // A restart anywhere continues with the same batches.
            let at = restart.index(targets.len() + 1);
            let again = run(&targets, batch, max, Some(at));
            prop_assert_eq!(again, log);
        }
    }
}
