//! The update machine's answers to hostile or unlucky input, one defect each: what a service,
//! a gateway or the clock can send, and what the device must do about it.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::sync::{Arc, Mutex};

use fleet_proto::v1::{
    Signature, SignedManifest, UpdateError, UpdateManifest, UpdatePhase, UpdateProgress,
};
use fleet_proto::Message;

use super::install::{Decision, HandlerError, StagedImage, UpdateHandler};
use super::machine::{Journal, Machine, Output};
use super::power_loss::{config, release, Release, FLEET};
use super::storage::sim::{SimDisk, SimStorage};
use super::storage::Storage;
use fleet_proto::report::MAX_DETAIL_LEN;

/// An application that records what it was asked and answers as told.
#[derive(Default)]
struct App {
    calls: Mutex<Vec<String>>,
    decision: Mutex<Option<Decision>>,
    fail_self_test: Mutex<bool>,
    /// Power is lost in the self-test (the device restarts before it ends).
    cut_in_self_test: Mutex<Option<SimDisk>>,
}

impl App {
    fn calls(&self) -> Vec<String> {
        self.calls.lock().unwrap().clone()
    }
    fn log(&self, what: &str, m: &UpdateManifest) {
        self.calls
            .lock()
            .unwrap()
            .push(format!("{what} {}", m.update_id));
    }
    /// Whether the device still has power (a process that lost it calls nothing more).
    fn alive(&self) -> Result<(), HandlerError> {
        match self.cut_in_self_test.lock().unwrap().as_ref() {
            Some(disk) if disk.lock().dead => Err("power lost".into()),
            _ => Ok(()),
        }
    }
}

impl UpdateHandler for Arc<App> {
    fn offer(&self, m: &UpdateManifest) -> Decision {
        self.log("offer", m);
        self.decision
            .lock()
            .unwrap()
            .clone()
            .unwrap_or(Decision::Accept)
    }
    fn install(&self, m: &UpdateManifest, _images: &[StagedImage]) -> Result<(), HandlerError> {
        self.alive()?;
        self.log("install", m);
        Ok(())
    }
    fn self_test(&self, m: &UpdateManifest) -> Result<(), HandlerError> {
        self.alive()?;
        self.log("self_test", m);
        if let Some(disk) = self.cut_in_self_test.lock().unwrap().as_ref() {
            let mut d = disk.lock();
            d.dead = true;
            return Err("power lost".into());
        }
        if *self.fail_self_test.lock().unwrap() {
            return Err("self-test failed".into());
        }
        Ok(())
    }
    fn commit(&self, m: &UpdateManifest) -> Result<(), HandlerError> {
        self.alive()?;
        self.log("commit", m);
        Ok(())
    }
    fn rollback(&self, m: &UpdateManifest) -> Result<(), HandlerError> {
        self.alive()?;
        self.log("rollback", m);
        Ok(())
    }
    fn withdrawn(&self, m: &UpdateManifest) {
        self.log("withdrawn", m);
    }
}

/// Starts a machine configured with `cfg` on `disk` with `app` (not connected).
fn start_with(
    cfg: super::machine::MachineConfig,
    disk: &SimDisk,
    app: &Arc<App>,
    now: u64,
) -> Machine<SimStorage> {
    Machine::start(
        cfg,
        SimStorage(disk.clone()),
        Arc::new(app.clone()),
        None,
        now,
    )
}

struct Rig {
    disk: SimDisk,
    app: Arc<App>,
    m: Machine<SimStorage>,
}

impl Rig {
    fn new() -> Rig {
        let disk = SimDisk::default();
        let app = Arc::new(App::default());
        let m = Self::start(&disk, &app, 10_000);
        Rig { disk, app, m }
    }
    /// Starts a machine on `disk` with `app`, connected.
    fn start(disk: &SimDisk, app: &Arc<App>, now: u64) -> Machine<SimStorage> {
        let mut m = start_with(config(), disk, app, now);
        m.connected(now);
        m
    }
    fn restart(&mut self, now: u64) {
        self.disk.lock().power_up(&mut || 0);
        self.m = Self::start(&self.disk, &self.app, now);
    }
    fn reports(&mut self) -> Vec<UpdateProgress> {
        self.m
            .take_output()
            .into_iter()
            .filter_map(|o| match o {
                Output::Report(p) => Some(p),
                Output::Request(_) => None,
            })
            .collect()
    }
    fn journal(&self) -> Journal {
        serde_json::from_slice(&self.disk.lock().durable_journal().unwrap()).unwrap()
    }
    /// Serves every request with release `i`'s genuine chunks until none is asked for.
    fn serve(&mut self, i: usize, now: u64) {
        self.serve_release(&FLEET.releases[i], now);
    }

    /// Serves every request with `r`'s genuine chunks until none is asked for.
    fn serve_release(&mut self, r: &Release, now: u64) {
        for _ in 0..100 {
            let reqs: Vec<_> = self
                .m
                .take_output()
                .into_iter()
                .filter_map(|o| match o {
                    Output::Request(r) => Some(r),
                    Output::Report(_) => None,
                })
                .collect();
            if reqs.is_empty() {
                self.m.tick(now);
                if !self.m.wants_chunks() {
                    return;
                }
                continue;
            }
            for req in reqs {
                let ci = r
                    .manifest
                    .components
                    .iter()
                    .position(|c| c.name == req.component)
                    .unwrap();
                let (data, tree) = &r.images[ci];
                for range in &req.ranges {
                    for k in range.start..range.end {
                        let cs = r.manifest.components[ci].chunk_size as usize;
                        let start = k as usize * cs;
                        let end = (start + cs).min(data.len());
                        let chunk = fleet_proto::v1::Chunk {
                            update_id: req.update_id.clone(),
                            component: req.component.clone(),
                            index: k,
                            data: data[start..end].to_vec(),
                            proof: tree.proof(k).unwrap().iter().map(|h| h.to_vec()).collect(),
                            request_id: req.request_id,
                        };
                        self.m.chunk(&chunk.encode_to_vec(), now);
                    }
                }
            }
        }
    }
}

fn phase(p: &UpdateProgress) -> UpdatePhase {
    UpdatePhase::try_from(p.phase).unwrap()
}

/// D1: an envelope full of signatures whose key ids are control bytes, with an update id that
/// is not an id, cannot make a report that the gateway would refuse: the detail is bounded and
/// printable, the update id is not echoed, and the device keeps no state for it.
#[test]
fn d1_a_hostile_envelope_gets_a_small_printable_report() {
    let mut rig = Rig::new();
    let bad_id = "\u{1}\u{7}x".repeat(200);
    let manifest = UpdateManifest {
        update_id: bad_id.clone(),
        ..FLEET.releases[1].manifest.clone()
    };
    let signatures = (0..600)
        .map(|i| Signature {
            key_id: format!("\u{1b}[2J{i}\u{0}"),
            algorithm: 1,
            signature: vec![0; 64],
        })
        .collect();
    let envelope = SignedManifest {
        withdrawal: Default::default(),
        manifest: manifest.encode_to_vec(),
        signatures,
    }
    .encode_to_vec();
    assert!(
        envelope.len() < 64 << 10,
        "under the size bound: judged, not refused unread"
    );
    rig.m.manifest(&envelope, 10_000);
    let reports = rig.reports();
    assert_eq!(reports.len(), 1);
    let r = &reports[0];
    assert_eq!(phase(r), UpdatePhase::Rejected);
    assert!(
        r.detail.len() <= MAX_DETAIL_LEN,
        "detail of {} bytes",
        r.detail.len()
    );
    assert!(!r.detail.chars().any(char::is_control), "{:?}", r.detail);
    assert!(
        r.update_id.is_empty(),
        "an unvalidated id is echoed: {:?}",
        r.update_id
    );
    assert!(
        r.encoded_len() < 1024,
        "report of {} bytes",
        r.encoded_len()
    );
    // Nothing journaled: a stream of such envelopes does not wear the flash.
    assert!(rig.disk.lock().ops < 5);
    assert!(SimStorage(rig.disk.clone())
        .load_journal()
        .unwrap()
        .is_none());

    // Larger than the bound: refused unread, with the same small report.
    let mut huge = SignedManifest::decode(envelope.as_slice()).unwrap();
    huge.signatures.extend(huge.signatures.clone());
    huge.signatures.extend(huge.signatures.clone());
    rig.m.manifest(&huge.encode_to_vec(), 10_000);
    let r = rig.reports().pop().unwrap();
    assert_eq!(r.error(), UpdateError::MalformedManifest);
    assert!(r.detail.contains("at most"), "{}", r.detail);
}

/// D8: a manifest with a lower sequence than the update in progress does not replace it (no
/// downgrade between two newer releases, no flash wear by alternating two); a higher one does.
#[test]
fn d8_only_a_higher_sequence_supersedes_the_update_in_progress() {
    let mut rig = Rig::new();
    rig.m.manifest(&FLEET.releases[1].signed, 10_000); // sequence 3, downloading
    assert!(rig.m.wants_chunks());
    rig.reports();
    rig.m.manifest(&FLEET.releases[0].signed, 10_001); // sequence 2
    let r = rig.reports().pop().unwrap();
    assert_eq!(
        (phase(&r), r.error()),
        (UpdatePhase::Rejected, UpdateError::NotNewer)
    );
    assert_eq!(r.update_id, "fw-2");
    assert!(r.detail.contains("fw-3"), "{}", r.detail);
    assert_eq!(rig.app.calls(), ["offer fw-3"]);
    assert!(
        rig.journal().current.unwrap().signed_manifest == hex::encode(&FLEET.releases[1].signed)
    );

    rig.m.manifest(&FLEET.releases[2].signed, 10_002); // sequence 4
    assert_eq!(
        rig.app.calls(),
        ["offer fw-3", "withdrawn fw-3", "offer fw-4"]
    );
}

/// D9: the answer to a manifest is keyed by the manifest, not by its envelope: a release that
/// failed (here: declined) and comes again with one more signature gets the same answer and is
/// not offered again.
#[test]
fn d9_an_extra_signature_does_not_reopen_an_answered_release() {
    let mut rig = Rig::new();
    *rig.app.decision.lock().unwrap() = Some(Decision::Decline("not on this line".into()));
    rig.m.manifest(&FLEET.releases[1].signed, 10_000);
    let first = rig.reports().pop().unwrap();
    assert_eq!(
        (phase(&first), first.error()),
        (UpdatePhase::Rejected, UpdateError::Declined)
    );
    *rig.app.decision.lock().unwrap() = None;

    let mut again = SignedManifest::decode(FLEET.releases[1].signed.as_slice()).unwrap();
    again.signatures.push(Signature {
        key_id: "0000000000000000".into(),
        algorithm: 1,
        signature: vec![7; 64],
    });
    rig.m.manifest(&again.encode_to_vec(), 10_001);
    let second = rig.reports().pop().unwrap();
    assert_eq!(second, first, "the same answer, again");
    assert_eq!(rig.app.calls(), ["offer fw-3"], "offered once");
}

/// D6: expiry is checked again before anything is downloaded or installed, and a clock behind
/// the newest issue time seen (or before 1970) does not make an expired manifest fresh.
#[test]
fn d6_expiry_is_checked_again_and_a_clock_gone_back_does_not_help() {
    let signer = &FLEET.signer;
    let mut r = release(signer, 3, &[("rootfs", 3, 2048)], false, false);
    r.manifest.issued_at_ms = 50_000;
    r.manifest.expires_at_ms = 60_000;
    r.signed = signer.sign_manifest(&r.manifest).encode_to_vec();

    let mut rig = Rig::new();
    *rig.app.decision.lock().unwrap() = Some(Decision::Defer);
    rig.m.manifest(&r.signed, 55_000);
    assert_eq!(phase(&rig.reports().pop().unwrap()), UpdatePhase::Deferred);
    *rig.app.decision.lock().unwrap() = None;
    // The retry comes after the expiry: refused, never offered again, nothing downloaded.
    rig.m.tick(61_000);
    let last = rig.reports().pop().unwrap();
    assert_eq!(
        (phase(&last), last.error()),
        (UpdatePhase::Failed, UpdateError::Expired)
    );
    assert_eq!(rig.app.calls(), ["offer fw-3"]);

    // A device whose clock reads 0 (before 1970) after having seen a manifest issued at
    // 50 s: the floor, not the clock, decides.
    let mut rig = Rig::new();
    rig.m.manifest(&FLEET.releases[0].signed, 10_000);
    rig.m.manifest(&r.signed, 0);
    let j = rig.journal();
    assert!(j.time_floor_ms >= 1_000);
    let mut late = release(signer, 4, &[("rootfs", 4, 2048)], false, false);
    late.manifest.issued_at_ms = 1;
    late.manifest.expires_at_ms = 500;
    late.signed = signer.sign_manifest(&late.manifest).encode_to_vec();
    rig.reports();
    rig.m.manifest(&late.signed, 0);
    let rep = rig.reports().pop().unwrap();
    assert_eq!(
        (rep.update_id.as_str(), rep.error()),
        ("fw-4", UpdateError::Expired)
    );
}

/// D6: before any manifest was accepted, the build time is the floor: a device whose clock
/// reads 0 refuses a manifest that expired before the firmware was built.
#[test]
fn d6_the_build_time_floors_the_clock_of_a_new_device() {
    let mut r = release(&FLEET.signer, 3, &[("rootfs", 3, 2048)], false, false);
    r.manifest.issued_at_ms = 1;
    r.manifest.expires_at_ms = 40_000;
    r.signed = FLEET.signer.sign_manifest(&r.manifest).encode_to_vec();
    let disk = SimDisk::default();
    let app = Arc::new(App::default());
    let cfg = super::machine::MachineConfig {
        build_time_ms: 50_000,
        ..config()
    };
    let mut m = start_with(cfg, &disk, &app, 0);
    m.connected(0);
    m.manifest(&r.signed, 0);
    let Some(Output::Report(p)) = m.take_output().pop() else {
        panic!("no report");
    };
    assert_eq!(
        (phase(&p), p.error()),
        (UpdatePhase::Rejected, UpdateError::Expired)
    );
    assert!(app.calls().is_empty());
}

/// An update larger than the device's staging budget is refused when offered, before the
/// application is asked or anything is downloaded.
#[test]
fn an_update_over_the_storage_budget_is_refused_unread() {
    let disk = SimDisk::default();
    let app = Arc::new(App::default());
    let cfg = super::machine::MachineConfig {
        storage_budget: 2047,
        ..config()
    };
    let mut m = start_with(cfg, &disk, &app, 10_000);
    m.connected(10_000);
    m.manifest(&FLEET.releases[1].signed, 10_000); // 2,048 bytes
    let Some(Output::Report(p)) = m.take_output().pop() else {
        panic!("no report");
    };
    assert_eq!(
        (phase(&p), p.error()),
        (UpdatePhase::Rejected, UpdateError::Storage)
    );
    assert!(
        p.detail.contains("2048") && p.detail.contains("2047"),
        "{}",
        p.detail
    );
    assert!(app.calls().is_empty(), "{:?}", app.calls());
    assert!(!m.wants_chunks());
}

/// D17: a corrupt journal does not stop the device: the agent says so upward and runs with
/// the factory sequence as its floor.
#[test]
fn d17_a_corrupt_journal_is_reported_not_fatal() {
    let disk = SimDisk::default();
    SimStorage(disk.clone()).save_journal(b"{not json").unwrap();
    let app = Arc::new(App::default());
    let mut m = Rig::start(&disk, &app, 10_000);
    let reports: Vec<_> = m.take_output();
    let Some(Output::Report(r)) = reports.first() else {
        panic!("no report: {reports:?}");
    };
    assert_eq!(
        (phase(r), r.error()),
        (UpdatePhase::Failed, UpdateError::Storage)
    );
    assert!(r.detail.contains("unreadable"), "{}", r.detail);
    // And it still takes updates.
    m.manifest(&FLEET.releases[1].signed, 10_000);
    assert!(m.wants_chunks());
}

/// Trial boot: a self-test that never ends (the device loses power in it every time) is not
/// retried forever: after `max_trial_starts` starts on trial, the agent falls back.
#[test]
fn an_unconfirmed_trial_falls_back_after_max_starts() {
    let mut rig = Rig::new();
    *rig.app.cut_in_self_test.lock().unwrap() = Some(rig.disk.clone());
    rig.m.manifest(&FLEET.releases[1].signed, 10_000);
    rig.serve(1, 10_000);
    for start in 1..=3 {
        assert!(
            matches!(rig.journal().current.map(|c| c.phase), Some(super::machine::Phase::Trial { starts }) if starts == start),
            "start {start}: {:?}",
            rig.journal().current
        );
        rig.restart(20_000);
    }
    let calls = rig.app.calls();
    assert_eq!(
        calls.iter().filter(|c| c.starts_with("self_test")).count(),
        3,
        "{calls:?}"
    );
    assert_eq!(calls.last().unwrap(), "rollback fw-3", "{calls:?}");
    let r = rig.m.last_report().unwrap().clone();
    assert_eq!(
        (phase(&r), r.error()),
        (UpdatePhase::RolledBack, UpdateError::SelfTestFailed)
    );
    assert!(
        r.detail.contains("not confirmed after 3 starts"),
        "{}",
        r.detail
    );
    let j = rig.journal();
    assert!(j.current.is_none());
    assert_eq!(
        j.installed_sequence, 0,
        "the floor was not raised for a release never confirmed"
    );
}

/// D2 through the agent: a commit hook that does not return (the application restarts the
/// device in it) leaves the journal in `Committing` with the sequence raised; the next start,
/// even after the manifest expired, finishes the commit and never installs again.
#[test]
fn d2_a_commit_that_restarts_the_device_is_finished_not_repeated() {
    struct Rebooting(SimDisk, Arc<App>);
    impl UpdateHandler for Rebooting {
        fn install(&self, m: &UpdateManifest, i: &[StagedImage]) -> Result<(), HandlerError> {
            self.1.install(m, i)
        }
        fn commit(&self, m: &UpdateManifest) -> Result<(), HandlerError> {
            if self.0.lock().dead {
                return Err("power lost".into());
            }
            self.1.log("commit", m);
            if self
                .1
                .calls()
                .iter()
                .filter(|c| c.starts_with("commit"))
                .count()
                == 1
            {
                self.0.lock().dead = true; // the device restarts inside commit()
                return Err("restarting".into());
            }
            Ok(())
        }
        fn rollback(&self, m: &UpdateManifest) -> Result<(), HandlerError> {
            if self.0.lock().dead {
                return Err("power lost".into());
            }
            self.1.rollback(m)
        }
    }
    let disk = SimDisk::default();
    let app = Arc::new(App::default());
    let boot = |now| {
        let mut m = Machine::start(
            config(),
            SimStorage(disk.clone()),
            Arc::new(Rebooting(disk.clone(), app.clone())),
            None,
            now,
        );
        m.connected(now);
        m
    };
    let mut rig = Rig {
        disk: disk.clone(),
        app: app.clone(),
        m: boot(10_000),
    };
    let mut r = release(&FLEET.signer, 3, &[("rootfs", 3, 2048)], false, false);
    r.manifest.expires_at_ms = 30_000;
    r.signed = FLEET.signer.sign_manifest(&r.manifest).encode_to_vec();
    rig.m.manifest(&r.signed, 10_000);
    rig.serve_release(&r, 10_000);
    assert!(rig.disk.lock().dead, "the commit hook restarted the device");
    disk.lock().power_up(&mut || 0);
    let j = rig.journal();
    assert_eq!(j.installed_sequence, 3, "raised before commit() ran");
    // Restarted long after the manifest expired.
    rig.m = boot(40_000);
    let j = rig.journal();
    assert!(j.current.is_none(), "{:?}", j.current);
    assert_eq!(
        (j.installed_sequence, j.running_version.as_str()),
        (3, "3.0")
    );
    let r = rig.m.last_report().unwrap();
    assert_eq!(phase(r), UpdatePhase::Committed);
    let calls = app.calls();
    assert_eq!(
        calls.iter().filter(|c| c.starts_with("install")).count(),
        1,
        "{calls:?}"
    );
    assert_eq!(
        calls.iter().filter(|c| c.starts_with("commit")).count(),
        2,
        "{calls:?}"
    );
}

/// D12: staged bytes and bitmaps belong to one manifest (named by its digest): an update that
/// replaces a half-downloaded one with the same shape starts from nothing, instead of taking
/// the other's chunks for its own and failing its digest check.
#[test]
fn d12_a_replacing_update_does_not_inherit_the_others_chunks() {
    let signer = &FLEET.signer;
    let a = &FLEET.releases[0]; // rootfs 4 chunks, app 2 chunks
    let b = release(
        signer,
        6,
        &[("rootfs", 7, 3 * 1024 + 5), ("app", 8, 1500)],
        false,
        false,
    );
    let mut rig = Rig::new();
    rig.m.manifest(&a.signed, 10_000);
    // Two of A's chunks arrive and are persisted (the next request flushes them).
    let (data, tree) = &a.images[0];
    for k in 0..2u32 {
        let start = k as usize * 1024;
        let chunk = fleet_proto::v1::Chunk {
            update_id: a.manifest.update_id.clone(),
            component: "rootfs".into(),
            index: k,
            data: data[start..start + 1024].to_vec(),
            proof: tree.proof(k).unwrap().iter().map(|h| h.to_vec()).collect(),
            request_id: 1,
        };
        rig.m.chunk(&chunk.encode_to_vec(), 10_000);
    }
    rig.m.tick(20_000);
    assert!(rig.disk.lock().files_named(".bitmap") > 0);
    rig.reports();
    // B replaces A; after a restart (so only what is on disk counts) it is served in full.
    rig.m.manifest(&b.signed, 20_001);
    rig.restart(20_002);
    rig.serve_release(&b, 30_000);
    let r = rig.m.last_report().unwrap().clone();
    assert_eq!(
        (r.update_id.as_str(), phase(&r), r.error()),
        ("fw-6", UpdatePhase::Committed, UpdateError::Unspecified),
        "{}",
        r.detail
    );
}

/// D13: a final report is journaled before it is sent. Power goes at the very save of a final
/// answer (here: the application declined): nothing final left the device, so the gateway
/// never hears an answer the device later contradicts (after the restart the offer is put
/// again, and accepted this time).
#[test]
fn d13_a_final_report_never_leaves_before_it_is_journaled() {
    let disk = SimDisk::default();
    let app = Arc::new(App::default());
    let sent = Arc::new(Mutex::new(Vec::<UpdateProgress>::new()));
    let mut m = start_with(config(), &disk, &app, 10_000);
    let tap = sent.clone();
    m.set_sink(Box::new(move |o| {
        if let Output::Report(p) = o {
            tap.lock().unwrap().push(p);
        }
    }));
    m.connected(10_000);
    *app.decision.lock().unwrap() = Some(Decision::Decline("not now, not ever".into()));
    {
        let mut d = disk.lock();
        d.cut_at = Some(d.ops + 1); // the next disk operation: the final answer's save
    }
    m.manifest(&FLEET.releases[1].signed, 10_000);
    assert!(disk.lock().dead);
    let finals: Vec<_> = sent
        .lock()
        .unwrap()
        .iter()
        .map(phase)
        .filter(|p| *p >= UpdatePhase::Committed)
        .collect();
    assert!(
        finals.is_empty(),
        "sent before it was journaled: {finals:?}"
    );

    // Restarted (the interrupted save did not land), the offer comes again and is accepted:
    // the first final answer the gateway hears is this one.
    disk.lock().power_up(&mut || 1);
    *app.decision.lock().unwrap() = None;
    let mut rig = Rig {
        disk: disk.clone(),
        app: app.clone(),
        m: Rig::start(&disk, &app, 20_000),
    };
    rig.m.manifest(&FLEET.releases[1].signed, 20_000);
    rig.serve(1, 20_000);
    assert_eq!(phase(rig.m.last_report().unwrap()), UpdatePhase::Committed);
}

/// A root of version `version`, signed by the fleet's root key, whose `updates` role is
/// `updates` with `threshold` and whose `commands` role is `commands`.
fn root(
    version: u64,
    expires_at_ms: u64,
    updates: &[&fleet_proto::signing::UpdateSigner],
    threshold: u32,
    commands: &[&fleet_proto::signing::UpdateSigner],
) -> fleet_proto::trust::TrustedRoot {
    fleet_proto::trust::TrustedRoot::provisioned(&crate::trust::tests::signed_root(
        version,
        expires_at_ms,
        &[&FLEET.root_signer],
        updates,
        threshold,
        commands,
        &[&FLEET.root_signer],
    ))
    .unwrap()
}

/// A machine started with `root` (connected), and the report its first manifest gets.
fn judged_with(
    root: Option<fleet_proto::trust::TrustedRoot>,
    signed: &[u8],
    now: u64,
) -> UpdateProgress {
    let disk = SimDisk::default();
    let app = Arc::new(App::default());
    let cfg = super::machine::MachineConfig { root, ..config() };
    let mut m = start_with(cfg, &disk, &app, now);
    m.connected(now);
    m.manifest(signed, now);
    let Some(p) = m.take_output().into_iter().rev().find_map(|o| match o {
        Output::Report(p) => Some(p),
        Output::Request(_) => None,
    }) else {
        panic!("no report");
    };
    p
}

/// The `updates` role's threshold counts: with 2 of 2 required, one signature is refused
/// (BELOW_THRESHOLD); both pass.
#[test]
fn a_manifest_below_the_updates_threshold_is_rejected() {
    let second = fleet_proto::signing::UpdateSigner::generate();
    let r2 = root(2, u64::MAX / 2, &[&FLEET.signer, &second], 2, &[&second]);
    let one = judged_with(Some(r2.clone()), &FLEET.releases[1].signed, 10_000);
    assert_eq!(
        (phase(&one), one.error()),
        (UpdatePhase::Rejected, UpdateError::BelowThreshold),
        "{}",
        one.detail
    );
    let both = fleet_proto::signing::sign_manifest_with(
        &FLEET.releases[1].manifest,
        &[&FLEET.signer, &second],
    )
    .unwrap()
    .encode_to_vec();
    let ok = judged_with(Some(r2), &both, 10_000);
    assert_eq!(phase(&ok), UpdatePhase::Downloading, "{}", ok.detail);
}

/// No root: every manifest is refused (NO_ROOT). An expired root: refused (ROOT_EXPIRED),
/// judged by the floored clock (a clock reading 0 does not revive it).
#[test]
fn no_root_or_an_expired_root_rejects_every_manifest() {
    let p = judged_with(None, &FLEET.releases[1].signed, 10_000);
    assert_eq!(
        (phase(&p), p.error()),
        (UpdatePhase::Rejected, UpdateError::NoRoot)
    );
    let short = root(2, 20_000, &[&FLEET.signer], 1, &[&FLEET.signer]);
    let p = judged_with(Some(short.clone()), &FLEET.releases[1].signed, 20_000);
    assert_eq!(
        (phase(&p), p.error()),
        (UpdatePhase::Rejected, UpdateError::RootExpired),
        "{}",
        p.detail
    );
    // Before the expiry it passes.
    let p = judged_with(Some(short.clone()), &FLEET.releases[1].signed, 19_999);
    assert_eq!(phase(&p), UpdatePhase::Downloading);
    // A clock gone back below the build time does not make the root fresh again.
    let disk = SimDisk::default();
    let app = Arc::new(App::default());
    let cfg = super::machine::MachineConfig {
        root: Some(short),
        build_time_ms: 30_000,
        ..config()
    };
    let mut m = start_with(cfg, &disk, &app, 0);
    m.connected(0);
    m.manifest(&FLEET.releases[1].signed, 0);
    let Some(Output::Report(p)) = m.take_output().pop() else {
        panic!("no report");
    };
    assert_eq!(p.error(), UpdateError::RootExpired);
}

/// After a root change that replaces the `updates` key, a manifest signed by the rotated-out
/// key is refused (UNKNOWN_KEY) and one by the new key taken; a download begun under the old
/// root keeps the manifest it verified and finishes.
#[test]
fn after_a_rotation_only_the_new_updates_key_is_trusted() {
    let new_key = fleet_proto::signing::UpdateSigner::generate();
    let mut rig = Rig::new();
    rig.m.manifest(&FLEET.releases[1].signed, 10_000); // fw-3, old key: downloading
    assert!(rig.m.wants_chunks());
    rig.reports();
    rig.m
        .set_root(root(2, u64::MAX / 2, &[&new_key], 1, &[&new_key]), 10_000);
    // The rotated-out key signs fw-4: refused, the download goes on.
    rig.m.manifest(&FLEET.releases[2].signed, 10_001);
    let r = rig.reports().pop().unwrap();
    assert_eq!(
        (r.update_id.as_str(), phase(&r), r.error()),
        ("fw-4", UpdatePhase::Rejected, UpdateError::UnknownKey),
        "{}",
        r.detail
    );
    assert!(rig.m.wants_chunks(), "the download in progress was dropped");
    // (Later: the outstanding request is asked again.)
    rig.serve(1, 100_000);
    let done = rig.m.last_report().unwrap().clone();
    assert_eq!(
        (done.update_id.as_str(), phase(&done)),
        ("fw-3", UpdatePhase::Committed)
    );
    // The new key signs a newer release: taken.
    let next = release(&new_key, 7, &[("rootfs", 7, 2048)], false, false);
    rig.m.manifest(&next.signed, 10_003);
    assert!(rig.m.wants_chunks());
    assert_eq!(
        rig.reports()
            .pop()
            .map(|r| (r.update_id, phase_of(r.phase))),
        Some(("fw-7".to_owned(), UpdatePhase::Downloading))
    );
}

fn phase_of(p: i32) -> UpdatePhase {
    UpdatePhase::try_from(p).unwrap()
}

/// Only a withdrawal signed by the `commands` role of the current root and naming the
/// manifest in progress drops it. An empty retained message, an unsigned withdrawal, one
/// signed by another key (here: the updates key of another fleet) and a valid one for another
/// offer are counted and the download goes on.
#[test]
fn only_a_signed_withdrawal_of_this_offer_drops_the_update() {
    use fleet_proto::command::{sign_withdrawal, withdrawal_of};
    let commands = fleet_proto::signing::UpdateSigner::generate();
    let stranger = fleet_proto::signing::UpdateSigner::generate();
    let disk = SimDisk::default();
    let app = Arc::new(App::default());
    let cfg = super::machine::MachineConfig {
        root: Some(root(1, u64::MAX / 2, &[&FLEET.signer], 1, &[&commands])),
        ..config()
    };
    let mut m = start_with(cfg, &disk, &app, 10_000);
    m.connected(10_000);
    let r = &FLEET.releases[1];
    m.manifest(&r.signed, 10_000);
    assert!(m.wants_chunks());
    let this = withdrawal_of("fw-3", &r.manifest.encode_to_vec(), 10_000, "abort");
    let other = withdrawal_of(
        "fw-4",
        &FLEET.releases[2].manifest.encode_to_vec(),
        10_000,
        "abort",
    );
    let attempts = [
        ("empty", Vec::new()),
        (
            "unsigned",
            sign_withdrawal(&this, &[]).unwrap().encode_to_vec(),
        ),
        (
            "another key",
            sign_withdrawal(&this, &[&stranger])
                .unwrap()
                .encode_to_vec(),
        ),
        (
            "the updates key (not the commands role)",
            sign_withdrawal(&this, &[&FLEET.signer])
                .unwrap()
                .encode_to_vec(),
        ),
        (
            "another offer",
            sign_withdrawal(&other, &[&commands])
                .unwrap()
                .encode_to_vec(),
        ),
    ];
    for (n, (what, bytes)) in attempts.iter().enumerate() {
        m.manifest(bytes, 10_001);
        assert!(m.wants_chunks(), "{what}: the update was dropped");
        assert_eq!(m.withdrawals_ignored(), n as u64 + 1, "{what}");
    }
    assert_eq!(app.calls(), ["offer fw-3"]);
    let signed = sign_withdrawal(&this, &[&commands])
        .unwrap()
        .encode_to_vec();
    m.manifest(&signed, 10_002);
    assert!(!m.wants_chunks());
    assert_eq!(app.calls(), ["offer fw-3", "withdrawn fw-3"]);
    assert_eq!(m.withdrawals_ignored(), 5);
    let j: Journal = serde_json::from_slice(&disk.lock().durable_journal().unwrap()).unwrap();
    assert!(j.current.is_none());
}

/// A manifest signed for the next root can arrive just before that root: refused (no update
/// in progress, nothing journaled), then taken when the root comes, without waiting for the
/// gateway to send it again.
#[test]
fn a_manifest_signed_for_the_next_root_is_taken_when_that_root_arrives() {
    let new_key = fleet_proto::signing::UpdateSigner::generate();
    let next = release(&new_key, 7, &[("rootfs", 7, 2048)], false, false);
    let mut rig = Rig::new();
    rig.m.manifest(&next.signed, 10_000);
    let r = rig.reports().pop().unwrap();
    assert_eq!(
        (phase(&r), r.error()),
        (UpdatePhase::Rejected, UpdateError::UnknownKey)
    );
    rig.m
        .set_root(root(2, u64::MAX / 2, &[&new_key], 1, &[&new_key]), 10_001);
    assert!(rig.m.wants_chunks(), "not taken when its root arrived");
    assert_eq!(rig.app.calls(), ["offer fw-7"]);
}
