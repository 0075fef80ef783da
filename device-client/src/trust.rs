//! The root of trust on the device: where the newest accepted root is kept, which root a
//! start uses, what the device reports about it, and the clock trust decisions are made by.
//!
//! * The provisioned root (from the builder) must pass [`TrustedRoot::provisioned`].
//! * Every root accepted later (walked to from the current one, see
//!   [`TrustedRoot::walk`]) is written to [`ROOT_FILE`] in the state directory **before** it
//!   is used, atomically (temporary file, fsync, rename, directory fsync).
//! * At start the persisted root is used when it is newer than the provisioned one and still
//!   passes [`TrustedRoot::provisioned`]; an unreadable or corrupt file is logged, counted, and
//!   the provisioned root is used.
//! * Expiry is judged by [`TrustClock`]: the wall clock, never below the build time or the
//!   newest issue time the update agent accepted (the same floor it uses).

use std::fs::{self, File};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use fleet_proto::report::bounded_detail;
use fleet_proto::trust::{TrustError, TrustedRoot};
use fleet_proto::v1::{RootRefusal, TrustReport};

/// Where the newest accepted root is kept, under the state directory.
pub const ROOT_FILE: &str = "trust/root.bin";

/// The persisted root in a state directory.
#[derive(Debug)]
pub(crate) struct RootStore {
    path: PathBuf,
}

/// What a start found.
#[derive(Debug)]
pub(crate) struct Loaded {
    /// The root to start with.
    pub root: Option<TrustedRoot>,
    /// Why the persisted root was not used, when it exists and cannot be.
    pub problem: Option<String>,
}

impl RootStore {
    pub(crate) fn new(state_dir: &Path) -> Self {
        Self {
            path: state_dir.join(ROOT_FILE),
        }
    }

    /// The root to start with: the persisted one when it is newer than `provisioned` and
    /// checks, else `provisioned`. Without a provisioned root there is nothing to anchor the
    /// persisted one to: the device has no root.
    pub(crate) fn load(&self, provisioned: Option<TrustedRoot>) -> Loaded {
        let Some(provisioned) = provisioned else {
            return Loaded {
                root: None,
                problem: None,
            };
        };
        let keep = |problem| Loaded {
            root: Some(provisioned.clone()),
            problem,
        };
        let bytes = match fs::read(&self.path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return keep(None),
            Err(e) => return keep(Some(format!("{}: {e}", self.path.display()))),
        };
        match TrustedRoot::provisioned(&bytes) {
            Ok(r) if r.version > provisioned.version => Loaded {
                root: Some(r),
                problem: None,
            },
            Ok(_) => keep(None),
            Err(e) => keep(Some(format!("{}: {e}", self.path.display()))),
        }
    }

    /// Writes `root` durably: after a power cut the file holds the old root or this one.
    pub(crate) fn save(&self, root: &TrustedRoot) -> std::io::Result<()> {
        write_atomic(&self.path, &root.signed)
    }
}

/// Replaces `path` with `bytes`: temporary file, fsync, rename, directory fsync.
pub(crate) fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    fs::create_dir_all(dir)?;
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    let mut f = File::create(&tmp)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    drop(f);
    fs::rename(&tmp, path)?;
    File::open(dir)?.sync_all()
}

/// The clock trust decisions use: the wall clock, floored by the build time and by the newest
/// issue time the update agent accepted (it raises the floor).
#[derive(Debug)]
pub(crate) struct TrustClock {
    floor: AtomicU64,
}

impl TrustClock {
    pub(crate) fn new(floor_ms: u64) -> Self {
        Self {
            floor: AtomicU64::new(floor_ms),
        }
    }

    /// Raises the floor (never lowers it).
    pub(crate) fn raise(&self, floor_ms: u64) {
        self.floor.fetch_max(floor_ms, Ordering::Relaxed);
    }

    /// `now_ms`, never below the floor.
    pub(crate) fn at(&self, now_ms: u64) -> u64 {
        now_ms.max(self.floor.load(Ordering::Relaxed))
    }

    /// The floored wall clock.
    pub(crate) fn now(&self) -> u64 {
        self.at(fleet_proto::time::now_ms())
    }
}

/// What the device holds and last refused.
#[derive(Debug, Default)]
pub(crate) struct TrustState {
    /// The current root.
    pub root: Option<TrustedRoot>,
    /// The last root refused: its version, why, and a detail.
    pub refused: Option<(u64, RootRefusal, String)>,
}

/// What a root chain did to the device's trust.
#[derive(Debug, Default)]
pub(crate) struct Taken {
    /// The newest root accepted, persisted and now current.
    pub accepted: Option<TrustedRoot>,
    /// The first root refused, and why.
    pub refused: Option<(u64, TrustError)>,
    /// A root was accepted but could not be persisted: it is not used.
    pub persist_error: Option<String>,
    /// The device holds no root: there is nothing to check a chain against.
    pub no_root: bool,
    /// The root or the last refusal changed (the trust report is due).
    pub changed: bool,
}

impl TrustState {
    /// Walks `chain` (as received on `fleet/trust/roots`) from the current root at `now_ms`.
    /// The newest root accepted is handed to `persist` and becomes current only once that
    /// succeeded; the first refusal is recorded.
    pub(crate) fn take_chain(
        &mut self,
        chain: &[u8],
        now_ms: u64,
        persist: impl FnOnce(&TrustedRoot) -> Result<(), String>,
    ) -> Taken {
        let Some(current) = &self.root else {
            return Taken {
                no_root: true,
                ..Taken::default()
            };
        };
        let walk = current.walk(chain, now_ms);
        let mut taken = Taken::default();
        if let Some(next) = walk.accepted {
            match persist(&next) {
                Ok(()) => {
                    self.root = Some(next.clone());
                    taken.accepted = Some(next);
                    taken.changed = true;
                }
                Err(e) => taken.persist_error = Some(e),
            }
        }
        if let Some((version, e)) = walk.refused {
            taken.changed |= self.refuse(version, &e);
            taken.refused = Some((version, e));
        }
        taken
    }

    /// Records a refusal; true when it differs from the last one.
    pub(crate) fn refuse(&mut self, version: u64, e: &TrustError) -> bool {
        let next = Some((version, e.refusal(), bounded_detail(&e.to_string())));
        let changed = next != self.refused;
        self.refused = next;
        changed
    }

    /// Whether the root has expired at `now_ms` (no root: not "expired", absent).
    pub(crate) fn expired(&self, now_ms: u64) -> bool {
        self.root.as_ref().is_some_and(|r| r.expired(now_ms))
    }

    /// The report published on `devices/{id}/trust`.
    pub(crate) fn report(&self, now_ms: u64) -> TrustReport {
        let (refused_version, refusal, detail) =
            self.refused
                .clone()
                .unwrap_or((0, RootRefusal::Unspecified, String::new()));
        TrustReport {
            root_version: self.root.as_ref().map_or(0, |r| r.version),
            root_expires_at_ms: self.root.as_ref().map_or(0, |r| r.expires_at_ms),
            root_expired: self.expired(now_ms),
            refused_version,
            refusal: refusal.into(),
            detail,
            timestamp_ms: now_ms,
        }
    }
}

/// A log line budget: at most `burst` lines per `period`; the rest are counted and summed up
/// in the next line allowed.
#[derive(Debug)]
pub(crate) struct LogLimit {
    period: Duration,
    burst: u32,
    window_start: Option<Instant>,
    used: u32,
    suppressed: u64,
}

impl LogLimit {
    pub(crate) fn new(period: Duration, burst: u32) -> Self {
        Self {
            period,
            burst: burst.max(1),
            window_start: None,
            used: 0,
            suppressed: 0,
        }
    }

    /// `Some(n)` when a line may be logged now (`n` lines were suppressed before it), `None`
    /// when this one is to be suppressed.
    pub(crate) fn allow(&mut self, now: Instant) -> Option<u64> {
        let fresh = self
            .window_start
            .is_none_or(|s| now.saturating_duration_since(s) >= self.period);
        if fresh {
            self.window_start = Some(now);
            self.used = 0;
        }
        if self.used < self.burst {
            self.used += 1;
            Some(std::mem::take(&mut self.suppressed))
        } else {
            self.suppressed += 1;
            None
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use fleet_proto::signing::UpdateSigner;
    use fleet_proto::trust::{build, ROOT_FORMAT_VERSION};
    use fleet_proto::v1;
    use fleet_proto::Message;

    /// A root (version, expiry) whose root role is `root_keys` (threshold 1), updates role
    /// `updates` (threshold `updates_threshold`) and commands role `commands`, signed by
    /// `signers`.
    pub(crate) fn signed_root(
        version: u64,
        expires_at_ms: u64,
        root_keys: &[&UpdateSigner],
        updates: &[&UpdateSigner],
        updates_threshold: u32,
        commands: &[&UpdateSigner],
        signers: &[&UpdateSigner],
    ) -> Vec<u8> {
        let vk = |s: &[&UpdateSigner]| s.iter().map(|k| k.verifying_key()).collect::<Vec<_>>();
        let r = v1::Root {
            format_version: ROOT_FORMAT_VERSION,
            version,
            expires_at_ms,
            root: Some(build::role(&vk(root_keys), 1)),
            updates: Some(build::role(&vk(updates), updates_threshold)),
            commands: Some(build::role(&vk(commands), 1)),
        };
        let mut s = build::encode(&r);
        for k in signers {
            build::add_signature(*k, &mut s).unwrap();
        }
        s.encode_to_vec()
    }

    #[test]
    fn the_newer_persisted_root_wins_and_a_corrupt_one_falls_back() {
        let rk = UpdateSigner::generate();
        let k = UpdateSigner::generate();
        let v1 =
            TrustedRoot::provisioned(&signed_root(1, u64::MAX, &[&rk], &[&k], 1, &[&k], &[&rk]))
                .unwrap();
        let v2 =
            TrustedRoot::provisioned(&signed_root(2, u64::MAX, &[&rk], &[&k], 1, &[&k], &[&rk]))
                .unwrap();
        let dir = tempfile::tempdir().unwrap();
        let store = RootStore::new(dir.path());
        // Nothing persisted: the provisioned root.
        assert_eq!(store.load(Some(v1.clone())).root.unwrap().version, 1);
        store.save(&v2).unwrap();
        let l = store.load(Some(v1.clone()));
        assert_eq!((l.root.unwrap().version, l.problem), (2, None));
        // A provisioned root newer than the persisted one wins (a device re-provisioned).
        let v3 =
            TrustedRoot::provisioned(&signed_root(3, u64::MAX, &[&rk], &[&k], 1, &[&k], &[&rk]))
                .unwrap();
        assert_eq!(store.load(Some(v3)).root.unwrap().version, 3);
        // No provisioned root: none, whatever is on disk.
        assert!(store.load(None).root.is_none());
        // Corrupt: a problem, and the provisioned root.
        fs::write(dir.path().join(ROOT_FILE), b"\xff\xff garbage").unwrap();
        let l = store.load(Some(v1.clone()));
        assert_eq!(l.root.unwrap().version, 1);
        assert!(l.problem.unwrap().contains("root.bin"));
        // Not signed by its own root keys: the same.
        let forged = signed_root(9, u64::MAX, &[&rk], &[&k], 1, &[&k], &[&k]);
        fs::write(dir.path().join(ROOT_FILE), forged).unwrap();
        let l = store.load(Some(v1));
        assert_eq!(l.root.unwrap().version, 1);
        assert!(l.problem.is_some());
    }

    /// A chain is walked from the current root; the accepted root is persisted BEFORE it is
    /// used (a failed write leaves the old root current), refusals are recorded and reported
    /// once, a repeated chain changes nothing, and a restart starts from the persisted root.
    #[test]
    fn a_root_chain_is_persisted_before_it_is_used() {
        let (rk1, rk2) = (UpdateSigner::generate(), UpdateSigner::generate());
        let k = UpdateSigner::generate();
        let v1 = signed_root(1, 1_000_000, &[&rk1], &[&k], 1, &[&k], &[&rk1]);
        // v2 hands the root role to rk2: signed by the old and the new root keys.
        let v2 = signed_root(2, 1_000_000, &[&rk2], &[&k], 1, &[&k], &[&rk1, &rk2]);
        // v3 signed by the new keys only is fine from v2, not from v1.
        let v3 = signed_root(3, 1_000_000, &[&rk2], &[&k], 1, &[&k], &[&rk2]);
        let chain = |roots: &[&Vec<u8>]| {
            fleet_proto::trust::build::chain(
                &roots.iter().map(|r| (*r).clone()).collect::<Vec<_>>(),
            )
            .encode_to_vec()
        };
        let dir = tempfile::tempdir().unwrap();
        let store = RootStore::new(dir.path());
        let provisioned = TrustedRoot::provisioned(&v1).unwrap();
        let mut t = TrustState {
            root: Some(provisioned.clone()),
            refused: None,
        };
        // Signed by the new keys only, offered straight to v1: refused, recorded, reported.
        let taken = t.take_chain(&chain(&[&v3]), 10, |r| {
            store.save(r).map_err(|e| e.to_string())
        });
        assert!(taken.accepted.is_none());
        assert_eq!(
            taken.refused.as_ref().map(|(v, e)| (*v, e.refusal())),
            Some((3, RootRefusal::Untrusted))
        );
        assert!(taken.changed);
        assert_eq!(t.report(10).refused_version, 3);
        // The same refusal again: nothing new to report.
        let again = t.take_chain(&chain(&[&v3]), 10, |_| unreachable!("nothing to persist"));
        assert!(!again.changed);
        // The full chain, but the disk fails: the old root stays current.
        let failed = t.take_chain(&chain(&[&v1, &v2, &v3]), 10, |_| Err("disk full".into()));
        assert_eq!(
            (
                failed.persist_error.as_deref(),
                t.root.as_ref().unwrap().version
            ),
            (Some("disk full"), 1)
        );
        assert!(failed.accepted.is_none());
        // It works: v3 is persisted, then current.
        let ok = t.take_chain(&chain(&[&v1, &v2, &v3]), 10, |r| {
            assert_eq!(r.version, 3);
            store.save(r).map_err(|e| e.to_string())
        });
        assert_eq!(ok.accepted.map(|r| r.version), Some(3));
        assert!(ok.changed);
        assert_eq!(t.report(10).root_version, 3);
        // The retained chain at the next connection: history, nothing to do.
        let history = t.take_chain(&chain(&[&v1, &v2, &v3]), 10, |_| unreachable!("history"));
        assert!(!history.changed && history.refused.is_none());
        // A rollback to v2 alone is refused.
        let back = t.take_chain(&chain(&[&v2]), 10, |_| unreachable!("rollback"));
        assert_eq!(
            back.refused.map(|(_, e)| e.refusal()),
            Some(RootRefusal::NotNewer)
        );
        // A restart starts from the persisted v3.
        assert_eq!(store.load(Some(provisioned)).root.unwrap().version, 3);
        // No root: nothing to walk from.
        let mut none = TrustState::default();
        assert!(
            none.take_chain(&chain(&[&v2]), 10, |_| unreachable!())
                .no_root
        );
    }

    #[test]
    fn the_log_limit_lets_a_burst_through_and_counts_the_rest() {
        let mut l = LogLimit::new(Duration::from_secs(10), 2);
        let t = Instant::now();
        assert_eq!(l.allow(t), Some(0));
        assert_eq!(l.allow(t), Some(0));
        assert_eq!(l.allow(t), None);
        assert_eq!(l.allow(t), None);
        assert_eq!(l.allow(t + Duration::from_secs(10)), Some(2));
    }

    #[test]
    fn the_clock_never_goes_below_its_floor() {
        let c = TrustClock::new(100);
        assert_eq!(c.at(5), 100);
        c.raise(50);
        assert_eq!(c.at(5), 100);
        c.raise(200);
        assert_eq!(c.at(5), 200);
        assert_eq!(c.at(300), 300);
    }
}
