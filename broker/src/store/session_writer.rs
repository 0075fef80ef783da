//! Group commit for the MQTT core's store writes: [`SessionWriter`].
//!
//! The engine numbers its writes 1, 2, 3, ... and may acknowledge a publish only once the writes
//! it depends on are durable. The writer takes them from a channel on its own OS thread, with
//! its own connection to the store file (WAL lets it write beside the gateway's other
//! connection), and commits everything that is waiting in one transaction: one disk sync for
//! a whole batch, so the sync cost is shared by as many writes as arrive while the previous
//! sync runs. After each commit it reports the batch's last number; the driver passes it to
//! `Engine::durable`.
//!
//! A failed batch is rolled back and never reported durable; the writer logs the error, reports
//! it and stops. Acknowledging without durability is not allowed, so the driver shuts the
//! gateway down when that happens.

use std::path::Path;
use std::thread::JoinHandle;

use fleet_mqtt::{StoreOp, StoreSeq};
use tokio::sync::mpsc::{self, UnboundedReceiver, UnboundedSender};
use tracing::{error, info_span};

use super::{sessions, Store, StoreError};

/// Most writes committed in one transaction. Under a flood this bounds how long the first
/// write of a batch waits for its sync (and how much one transaction holds); below it, a batch
/// is simply whatever was waiting.
pub(crate) const MAX_BATCH: usize = 4096;

/// The sending side: the `(seq, op)` writes of one engine call, in the engine's order, as one
/// message: they are committed in one transaction (never a part of them), since the engine's
/// crash rules hold only for whole calls. Dropping every sender ends the writer after it has
/// committed what was sent.
pub(crate) type SessionOps = UnboundedSender<Vec<(StoreSeq, StoreOp)>>;

/// What the writer did, once it has ended.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct WriterSummary {
    /// Transactions committed.
    pub batches: u64,
    /// Writes committed.
    pub ops: u64,
    /// The last number reported durable, if any.
    pub last_durable: Option<StoreSeq>,
}

/// The writer thread (see the module documentation). Join it with [`SessionWriter::join`] after
/// dropping the senders.
#[derive(Debug)]
pub(crate) struct SessionWriter {
    // Joined by the tests; the gateway's writer lives as long as the process.
    #[cfg_attr(not(test), allow(dead_code))]
    thread: JoinHandle<Result<WriterSummary, StoreError>>,
}

impl SessionWriter {
    /// Opens its own connection to the store at `path` (configured like every store
    /// connection; open the gateway's [`Store`] first, so that the schema is up to date
    /// before two connections share the file) and starts the thread.
    ///
    /// `on_durable(seq)` runs on that thread after each commit with the batch's last number:
    /// every write up to `seq` is durable. `on_error` runs there once if a batch fails (the
    /// error is already logged); then the thread ends and sends on the channel fail.
    pub(crate) fn spawn(
        path: &Path,
        on_durable: impl FnMut(StoreSeq) + Send + 'static,
        on_error: impl FnOnce(&StoreError) + Send + 'static,
    ) -> Result<(SessionOps, SessionWriter), StoreError> {
        let store = Store::open(path)?;
        // Room for every statement of `sessions::apply`, so none is ever re-prepared.
        store.conn.set_prepared_statement_cache_capacity(32);
        let (tx, rx) = mpsc::unbounded_channel();
        let thread = std::thread::Builder::new()
            .name("mqtt-store".into())
            .spawn(move || {
                let span = info_span!("session_writer", path = %store.path.display());
                span.in_scope(|| run(store, rx, on_durable, on_error))
            })
            .map_err(|e| StoreError::Task(format!("starting the session writer: {e}")))?;
        Ok((tx, SessionWriter { thread }))
    }

    /// Waits for the thread to end (every sender dropped and the queue committed, or a failed
    /// batch) and gives its outcome.
    #[cfg(test)]
    pub(crate) fn join(self) -> Result<WriterSummary, StoreError> {
        self.thread
            .join()
            .map_err(|_| StoreError::Task("the session writer panicked".into()))?
    }
}

fn run(
    mut store: Store,
    mut rx: UnboundedReceiver<Vec<(StoreSeq, StoreOp)>>,
    mut on_durable: impl FnMut(StoreSeq),
    on_error: impl FnOnce(&StoreError),
) -> Result<WriterSummary, StoreError> {
    let mut summary = WriterSummary::default();
    let mut batch = Vec::new();
    // `None`: every sender is gone and nothing is left.
    while let Some(first) = rx.blocking_recv() {
        batch.extend(first);
        // Whole calls only: a batch may pass MAX_BATCH by the last call it takes.
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(next) => batch.extend(next),
                Err(_) => break,
            }
        }
        let (Some(&(first_seq, _)), Some(&(last, _))) = (batch.first(), batch.last()) else {
            continue;
        };
        if let Err(e) = store.write(|tx| sessions::apply(tx, &batch)) {
            error!(error = %e, first_seq, last_seq = last, ops = batch.len(),
                "session store write failed; nothing more is made durable");
            on_error(&e);
            return Err(e);
        }
        summary.batches += 1;
        summary.ops += batch.len() as u64;
        summary.last_durable = Some(last);
        batch.clear();
        on_durable(last);
    }
    Ok(summary)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use std::sync::mpsc as std_mpsc;
    use std::time::{Duration, Instant};

    use fleet_mqtt::{QoS, Role};

    use super::*;
    use crate::store::sessions::model::{key, msg, Model};

    /// Long enough for a loaded CI box; only reached when something is broken.
    const DEADLINE: Duration = Duration::from_secs(60);

    /// `n` ops touching several sessions and every kind of write, numbered from `first`.
    fn ops(first: StoreSeq, n: u64) -> Vec<(StoreSeq, StoreOp)> {
        let keys = [
            key(Role::Device, "dev-1", None),
            key(Role::Service, "svc-1", Some("a")),
        ];
        (first..first + n)
            .map(|seq| {
                let k = keys[(seq % 2) as usize].clone();
                let op = match seq % 7 {
                    0 => StoreOp::Subscribed {
                        key: k,
                        filter: format!("f/{}", seq % 5),
                        qos: QoS::AtLeastOnce,
                    },
                    1 | 2 => StoreOp::Enqueued {
                        key: k,
                        id: seq,
                        message: msg("t/1", &seq.to_be_bytes(), QoS::ExactlyOnce, false),
                    },
                    3 => StoreOp::Released {
                        key: k,
                        id: seq - 2,
                    },
                    4 => StoreOp::Dequeued {
                        key: k,
                        id: seq - 2,
                    },
                    5 => StoreOp::Qos2Received {
                        key: k,
                        packet_id: (seq % 50) as u16,
                    },
                    _ => StoreOp::Retained {
                        topic: format!("r/{}", seq % 3),
                        message: Some(msg("r", &seq.to_be_bytes(), QoS::AtLeastOnce, true)),
                    },
                };
                (seq, op)
            })
            .collect()
    }

    /// Joins the writer, failing the test if it has not ended by the deadline.
    fn join(writer: SessionWriter) -> Result<WriterSummary, StoreError> {
        let (tx, rx) = std_mpsc::channel();
        std::thread::spawn(move || tx.send(writer.join()));
        rx.recv_timeout(DEADLINE)
            .unwrap_or_else(|_| panic!("the writer did not end within {DEADLINE:?}"))
    }

    fn model_of(ops: &[(StoreSeq, StoreOp)]) -> Model {
        let mut m = Model::default();
        ops.iter().for_each(|(_, op)| m.apply(op));
        m
    }

    #[test]
    fn the_writer_reports_durable_seqs_in_order_only_after_commit_and_drains_on_drop() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("gateway.db");
        // Another connection (as the gateway's own) looks at the file at every report.
        let reader = Store::open(&path).unwrap();
        let (durable_tx, durable) = std_mpsc::channel();
        let (sender, writer) = SessionWriter::spawn(
            &path,
            move |seq| {
                durable_tx
                    .send((seq, reader.load_sessions().unwrap()))
                    .unwrap()
            },
            |e| panic!("unexpected store error: {e}"),
        )
        .unwrap();

        // One write on its own, then the rest; the sender goes away at once after them:
        // everything sent is still committed.
        let all = ops(1, 3_000);
        sender.send(vec![all[0].clone()]).unwrap();
        assert_eq!(durable.recv_timeout(DEADLINE).unwrap().0, 1);
        for op in &all[1..] {
            sender.send(vec![op.clone()]).unwrap();
        }
        drop(sender);
        let summary = join(writer).unwrap();

        let reported: Vec<_> = std::iter::once(1)
            .chain(durable.try_iter().map(|(seq, seen)| {
                // When a number is reported, every write up to it is committed, and no later one.
                let upto = usize::try_from(seq).unwrap();
                assert_eq!(seen, model_of(&all[..upto]).expected(), "at {seq}");
                seq
            }))
            .collect();
        assert!(
            reported.windows(2).all(|w| w[0] < w[1]),
            "not in order: {reported:?}"
        );
        assert_eq!(reported.last(), Some(&3_000));
        assert_eq!(summary.ops, 3_000);
        assert_eq!(summary.last_durable, Some(3_000));
        // One report per transaction.
        assert_eq!(summary.batches, reported.len() as u64);

        let reopened = Store::open(&path).unwrap();
        assert_eq!(reopened.load_sessions().unwrap(), model_of(&all).expected());
    }

    /// Names the store file the child process of the kill test writes to.
    const CHILD_STORE: &str = "FLEET_TEST_SESSION_WRITER_CHILD_STORE";

    /// The kill test's writes: message `seq` queued on odd numbers, and on even ones the
    /// message three numbers earlier acknowledged, so the state after `k` writes tells `k`.
    fn kill_test_op(seq: StoreSeq) -> (StoreSeq, StoreOp) {
        let key = key(Role::Device, "dev-1", None);
        let op = if seq % 2 == 1 {
            let message = msg("t", &seq.to_be_bytes(), QoS::AtLeastOnce, false);
            StoreOp::Enqueued {
                key,
                id: seq,
                message,
            }
        } else {
            StoreOp::Dequeued {
                key,
                id: seq.saturating_sub(3),
            }
        };
        (seq, op)
    }

    /// The process the kill test starts and kills: writes through a writer and prints every
    /// durable report. Does nothing unless started by that test.
    #[test]
    #[ignore = "started by a_killed_process_keeps_every_write_it_reported_durable"]
    fn killed_writer_process() {
        use std::io::Write;
        let Some(path) = std::env::var_os(CHILD_STORE) else {
            return;
        };
        let (durable_tx, durable) = std_mpsc::channel();
        let (sender, writer) = SessionWriter::spawn(
            Path::new(&path),
            move |seq| {
                let mut out = std::io::stdout().lock();
                writeln!(out, "durable {seq}").unwrap();
                out.flush().unwrap();
                let _ = durable_tx.send(seq);
            },
            |e| panic!("store error: {e}"),
        )
        .unwrap();
        // At most 2,000 writes in flight, until killed (or, if nobody kills it, a bound).
        let mut durable_upto = 0;
        for seq in 1..=1_000_000 {
            while durable_upto + 2_000 < seq {
                durable_upto = durable.recv_timeout(DEADLINE).unwrap();
            }
            sender.send(vec![kill_test_op(seq)]).unwrap();
        }
        drop(sender);
        join(writer).unwrap();
    }

    /// Kills its child process when dropped, so a failing test leaves nothing behind.
    struct KillOnDrop(std::process::Child);

    impl Drop for KillOnDrop {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }

    #[cfg(unix)]
    #[test]
    fn a_killed_process_keeps_every_write_it_reported_durable() {
        use std::io::BufRead;
        use std::os::unix::process::ExitStatusExt;
        use std::process::{Command, Stdio};

        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("gateway.db");
        drop(Store::open(&path).unwrap());
        let child = Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "store::session_writer::tests::killed_writer_process",
                "--ignored",
                "--nocapture",
            ])
            .env(CHILD_STORE, &path)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let mut child = KillOnDrop(child);
        let stdout = child.0.stdout.take().unwrap();
        let (report_tx, reports) = std_mpsc::channel();
        let reader = std::thread::spawn(move || {
            for line in std::io::BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if let Some(seq) = line.strip_prefix("durable ") {
                    let _ = report_tx.send(seq.parse::<StoreSeq>().unwrap());
                }
            }
        });

        // SIGKILL in the middle of the stream, once some thousands of writes are durable.
        let mut reported = 0;
        while reported < 5_000 {
            reported = reports.recv_timeout(DEADLINE).unwrap();
        }
        child.0.kill().unwrap();
        let status = child.0.wait().unwrap();
        assert_eq!(status.signal(), Some(9), "{status}");
        // Reports still in the pipe were made before the kill.
        reader.join().unwrap();
        reported = reports.try_iter().fold(reported, StoreSeq::max);

        // The file holds the first `k` writes, whole, for a `k` no smaller than any report.
        let (sessions, _) = Store::open(&path).unwrap().load_sessions().unwrap();
        let newest = sessions
            .first()
            .and_then(|s| s.queue.last())
            .map_or(0, |m| m.id);
        let k = [newest, newest + 1]
            .into_iter()
            .find(|k| {
                let prefix: Vec<_> = (1..=*k).map(kill_test_op).collect();
                model_of(&prefix).expected().0 == sessions
            })
            .unwrap_or_else(|| panic!("not the state after any prefix of the writes"));
        assert!(k >= reported, "reported {reported} durable, {k} kept");
    }

    #[test]
    fn a_flood_is_committed_in_batches_of_at_most_max_batch() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("gateway.db");
        // The first report waits until the flood is queued behind it.
        let (durable_tx, durable) = std_mpsc::channel();
        let (go_tx, go) = std_mpsc::channel::<()>();
        let (sender, writer) = SessionWriter::spawn(
            &path,
            move |seq| {
                durable_tx.send(seq).unwrap();
                if seq == 1 {
                    go.recv_timeout(DEADLINE).unwrap();
                }
            },
            |e| panic!("unexpected store error: {e}"),
        )
        .unwrap();
        let n = 2 * MAX_BATCH as u64 + 100;
        let all = ops(1, n);
        sender.send(vec![all[0].clone()]).unwrap();
        assert_eq!(durable.recv_timeout(DEADLINE).unwrap(), 1);
        for op in &all[1..] {
            sender.send(vec![op.clone()]).unwrap();
        }
        go_tx.send(()).unwrap();
        drop(sender);
        join(writer).unwrap();
        let batch = MAX_BATCH as u64;
        let reported: Vec<StoreSeq> = durable.try_iter().collect();
        assert_eq!(reported, [1 + batch, 1 + 2 * batch, n]);
    }

    #[test]
    fn a_failed_batch_is_never_reported_durable_and_stops_the_writer() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("gateway.db");
        let store = Store::open(&path).unwrap();
        // SQLite refuses one write of the second batch, as a full disk would refuse a commit.
        store
            .conn
            .execute_batch(
                "CREATE TRIGGER refuse BEFORE INSERT ON mqtt_queue WHEN NEW.topic = 'refused'
                 BEGIN SELECT RAISE(ABORT, 'refused by the test'); END;",
            )
            .unwrap();
        drop(store);

        let first = ops(1, 50);
        let mut second = ops(51, 10);
        second[4].1 = StoreOp::Enqueued {
            key: key(Role::Device, "dev-1", None),
            id: 1_000,
            message: msg("refused", b"", QoS::AtLeastOnce, false),
        };

        // The report of the first batch's end waits until the whole second batch is queued,
        // so the second batch is one transaction.
        let (durable_tx, durable) = std_mpsc::channel();
        let (go_tx, go) = std_mpsc::channel::<()>();
        let (error_tx, errors) = std_mpsc::channel();
        let (sender, writer) = SessionWriter::spawn(
            &path,
            move |seq| {
                durable_tx.send(seq).unwrap();
                if seq == 50 {
                    go.recv_timeout(DEADLINE).unwrap();
                }
            },
            move |e| error_tx.send(e.to_string()).unwrap(),
        )
        .unwrap();
        for op in &first {
            sender.send(vec![op.clone()]).unwrap();
        }
        let deadline = Instant::now() + DEADLINE;
        while durable
            .recv_timeout(deadline.saturating_duration_since(Instant::now()))
            .unwrap()
            != 50
        {}
        for op in &second {
            sender.send(vec![op.clone()]).unwrap();
        }
        go_tx.send(()).unwrap();

        let error = join(writer).unwrap_err();
        assert!(error.to_string().contains("refused by the test"), "{error}");
        assert_eq!(errors.try_iter().count(), 1);
        // Nothing past the first batch was reported, and the writer takes nothing more.
        assert_eq!(durable.try_iter().count(), 0);
        assert!(sender.send(vec![ops(61, 1)[0].clone()]).is_err());

        // A restart finds exactly the first batch: no write of the failed one.
        let reopened = Store::open(&path).unwrap();
        assert_eq!(
            reopened.load_sessions().unwrap(),
            model_of(&first).expected()
        );
    }

    /// Not a test: the writer's throughput. 100,000 messages of 1 KiB queued for a persistent
    /// session and acknowledged (an Enqueued and, 32 messages later, a Dequeued each),
    /// committed in whatever batches form: first sent as fast as possible, then by a sender
    /// that waits for durability whenever 100 of its messages are not yet durable (the
    /// engine's default cap on held publishes per connection). Run with
    /// `cargo test -p fleet-broker --lib store::session_writer::tests::throughput -- --ignored --nocapture`.
    #[test]
    #[ignore = "a measurement, not a test"]
    fn throughput() {
        measure(None);
        measure(Some(100));
    }

    fn measure(window: Option<u64>) {
        const MESSAGES: u64 = 100_000;
        const ACK_AFTER: u64 = 32;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("gateway.db");
        let (durable_tx, durable) = std_mpsc::channel();
        let (sender, writer) = SessionWriter::spawn(
            &path,
            move |seq| durable_tx.send((seq, Instant::now())).unwrap(),
            |e| panic!("store error: {e}"),
        )
        .unwrap();
        let k = key(Role::Device, "dev-1", None);
        let payload = [0x5a; 1024];
        let started = Instant::now();
        let mut seq = 0;
        let mut durable_upto = 0;
        // The seq of each message's Enqueued, for the window.
        let mut enqueued_at = Vec::with_capacity(MESSAGES as usize);
        let mut send = |op| {
            seq += 1;
            sender.send(vec![(seq, op)]).unwrap();
            seq
        };
        for id in 0..MESSAGES {
            if let Some(w) = window.filter(|w| id >= *w) {
                let needed = enqueued_at[(id - w) as usize];
                while durable_upto < needed {
                    durable_upto = durable.recv_timeout(DEADLINE).unwrap().0;
                }
            }
            let message = msg("devices/dev-1/cmd", &payload, QoS::AtLeastOnce, false);
            let key = k.clone();
            enqueued_at.push(send(StoreOp::Enqueued { key, id, message }));
            if id >= ACK_AFTER {
                let (key, id) = (k.clone(), id - ACK_AFTER);
                send(StoreOp::Dequeued { key, id });
            }
        }
        for id in MESSAGES - ACK_AFTER..MESSAGES {
            send(StoreOp::Dequeued { key: k.clone(), id });
        }
        drop(sender);
        let summary = join(writer).unwrap();
        let finished = durable.try_iter().last().map_or(started, |(_, at)| at);
        let secs = finished.duration_since(started).as_secs_f64();
        println!(
            "{}: {} ops ({MESSAGES} Enqueued + {MESSAGES} Dequeued, 1 KiB) in {secs:.2} s: \
             {:.0} ops/s, {:.0} messages/s; {} commits, {:.0} ops per commit",
            match window {
                None => "flood".to_string(),
                Some(w) => format!("window {w}"),
            },
            summary.ops,
            summary.ops as f64 / secs,
            MESSAGES as f64 / secs,
            summary.batches,
            summary.ops as f64 / summary.batches as f64,
        );
    }
}
