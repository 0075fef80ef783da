//! Child processes for tests: output captured line by line by threads, every wait bounded,
//! killed when a deadline passes (the panic shows the command line and what it printed) and
//! when the fixture is dropped.

use std::borrow::BorrowMut;
use std::io::{BufRead, BufReader, Read};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use serde::de::DeserializeOwned;

use crate::eventually::poll_blocking;

/// The key of a readiness line: `{"ready": {...}}` alone on a line of stdout.
pub const READY_KEY: &str = "ready";

/// How long the output readers get to drain after the child is gone.
const DRAIN: Duration = Duration::from_secs(2);

/// Lines of one stream, shared with the thread reading them.
#[derive(Clone, Default)]
struct Lines(Arc<Mutex<Vec<String>>>);

impl Lines {
    fn get(&self) -> Vec<String> {
        match self.0.lock() {
            Ok(g) => g.clone(),
            Err(p) => p.into_inner().clone(),
        }
    }
    fn push(&self, line: String) {
        match self.0.lock() {
            Ok(mut g) => g.push(line),
            Err(p) => p.into_inner().push(line),
        }
    }
}

/// A running child process.
pub struct Proc {
    child: Child,
    cmdline: String,
    stdout: Lines,
    stderr: Lines,
    /// Stdout lines not yet consumed by [`Proc::next_line`] and friends.
    fresh: mpsc::Receiver<String>,
    /// Reader threads still running.
    readers: Arc<AtomicUsize>,
}

fn reader(
    stream: impl Read + Send + 'static,
    sink: Lines,
    tx: Option<mpsc::Sender<String>>,
    echo: Option<String>,
    readers: Arc<AtomicUsize>,
) {
    readers.fetch_add(1, Ordering::SeqCst);
    std::thread::spawn(move || {
        // Lossy: a child printing invalid UTF-8 must not stop the capture.
        let mut r = BufReader::new(stream);
        let mut buf = Vec::new();
        while let Ok(n) = r.read_until(b'\n', &mut buf) {
            if n == 0 {
                break;
            }
            let line = String::from_utf8_lossy(&buf)
                .trim_end_matches(['\n', '\r'])
                .to_owned();
            buf.clear();
            if let Some(name) = &echo {
                eprintln!("{name}: {line}");
            }
            if let Some(tx) = &tx {
                let _ = tx.send(line.clone());
            }
            sink.push(line);
        }
        readers.fetch_sub(1, Ordering::SeqCst);
    });
}

impl Proc {
    /// Spawns `cmd` with stdin closed and stdout and stderr captured. With `FLEET_TEST_ECHO`
    /// set, every line is also echoed to the test's stderr as it arrives. Panics (this is test
    /// support) if the program cannot be started.
    pub fn spawn(mut cmd: impl BorrowMut<Command>) -> Proc {
        let cmd = cmd.borrow_mut();
        let cmdline = format!("{cmd:?}");
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {cmdline}: {e}"));
        let name = cmd
            .get_program()
            .to_string_lossy()
            .rsplit('/')
            .next()
            .unwrap_or_default()
            .to_owned();
        let echo = std::env::var_os("FLEET_TEST_ECHO").is_some();
        let (tx, fresh) = mpsc::channel();
        let readers = Arc::new(AtomicUsize::new(0));
        let (stdout, stderr) = (Lines::default(), Lines::default());
        if let Some(s) = child.stdout.take() {
            let echo = echo.then(|| format!("{name}[{}]", child.id()));
            reader(s, stdout.clone(), Some(tx), echo, readers.clone());
        }
        if let Some(s) = child.stderr.take() {
            let echo = echo.then(|| format!("{name}[{}] (stderr)", child.id()));
            reader(s, stderr.clone(), None, echo, readers.clone());
        }
        Proc {
            child,
            cmdline,
            stdout,
            stderr,
            fresh,
            readers,
        }
    }

    /// Its process id.
    pub fn id(&self) -> u32 {
        self.child.id()
    }

    /// The command line, as it appears in failure messages.
    pub fn cmdline(&self) -> &str {
        &self.cmdline
    }

    /// Every stdout line so far.
    pub fn stdout(&self) -> Vec<String> {
        self.stdout.get()
    }

    /// Every stderr line so far.
    pub fn stderr(&self) -> Vec<String> {
        self.stderr.get()
    }

    /// Whether some stdout line so far contains `needle`.
    pub fn printed(&self, needle: &str) -> bool {
        self.stdout.get().iter().any(|l| l.contains(needle))
    }

    /// Kills the child, waits for it and its output, and panics saying that it did not `what`
    /// within `within`, with the command line and everything it printed.
    pub fn fail(&mut self, what: &str, within: Duration) -> ! {
        self.stop();
        panic!(
            "{} did not {what} within {within:?}; killed it.\n{}",
            self.cmdline,
            self.transcript()
        );
    }

    fn transcript(&self) -> String {
        format!(
            "--- stdout ---\n{}\n--- stderr ---\n{}",
            self.stdout.get().join("\n"),
            self.stderr.get().join("\n")
        )
    }

    /// SIGKILL, reap, and give the readers a moment to take what was left in the pipes.
    fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let readers = self.readers.clone();
        let _ = poll_blocking(DRAIN, || readers.load(Ordering::SeqCst) == 0);
    }

    /// The next stdout line not yet taken, waiting up to `within` for it.
    pub fn next_line(&mut self, within: Duration) -> String {
        self.next_matching(within, "print another line", |l| Some(l.to_owned()))
    }

    /// Takes stdout lines until `parse` accepts one (its value), waiting up to `within`; the
    /// child is killed and reported if it exits first or the deadline passes.
    pub fn next_matching<T>(
        &mut self,
        within: Duration,
        what: &str,
        mut parse: impl FnMut(&str) -> Option<T>,
    ) -> T {
        let end = Instant::now() + within;
        loop {
            let left = end.saturating_duration_since(Instant::now());
            match self.fresh.recv_timeout(left) {
                Ok(line) => {
                    if let Some(v) = parse(&line) {
                        return v;
                    }
                }
                Err(mpsc::RecvTimeoutError::Timeout) => self.fail(what, within),
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    let status = self.child.wait().ok();
                    self.stop();
                    panic!(
                        "{} exited ({status:?}) before it did {what}.\n{}",
                        self.cmdline,
                        self.transcript()
                    );
                }
            }
        }
    }

    /// Waits up to `within` for the process's readiness line, `{"ready": VALUE}` alone on a
    /// line of stdout, and returns VALUE. Other lines (logs) are skipped.
    pub fn ready<T: DeserializeOwned>(&mut self, within: Duration) -> T {
        self.next_matching(within, "print its ready line", parse_ready)
    }

    /// Waits up to `within` for the process to exit by itself; its status.
    pub fn wait(&mut self, within: Duration) -> ExitStatus {
        let child = &mut self.child;
        match poll_blocking(within, || child.try_wait().ok().flatten()) {
            Ok(status) => {
                let readers = self.readers.clone();
                let _ = poll_blocking(DRAIN, || readers.load(Ordering::SeqCst) == 0);
                status
            }
            Err(_) => self.fail("exit", within),
        }
    }

    /// Waits up to `within` for the process to exit; its status and everything it printed.
    pub fn finish(mut self, within: Duration) -> Output {
        let status = self.wait(within);
        let join = |l: Vec<String>| {
            let mut s = l.join("\n");
            if !s.is_empty() {
                s.push('\n');
            }
            s.into_bytes()
        };
        Output {
            status,
            stdout: join(self.stdout.get()),
            stderr: join(self.stderr.get()),
        }
    }

    /// Sends SIGKILL and reaps (what it printed stays readable).
    pub fn kill(&mut self) {
        self.stop();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `{"ready": VALUE}` → VALUE.
fn parse_ready<T: DeserializeOwned>(line: &str) -> Option<T> {
    let mut v: serde_json::Value = serde_json::from_str(line.trim()).ok()?;
    let ready = v.get_mut(READY_KEY)?.take();
    serde_json::from_value(ready).ok()
}

/// Runs `cmd` to completion, as `Command::output()` does, but kills it and panics with its
/// command line and output if it takes longer than `within`.
pub fn run(cmd: impl BorrowMut<Command>, within: Duration) -> Output {
    Proc::spawn(cmd).finish(within)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sh(script: &str) -> Command {
        let mut c = Command::new("sh");
        c.args(["-c", script]);
        c
    }

    #[test]
    fn run_returns_output_and_status() {
        let out = run(
            sh("echo out; echo err >&2; exit 3"),
            Duration::from_secs(20),
        );
        assert_eq!(out.status.code(), Some(3));
        assert_eq!(out.stdout, b"out\n");
        assert_eq!(out.stderr, b"err\n");
    }

    #[test]
    fn a_child_past_its_deadline_is_killed_and_reported_with_its_output() {
        let r = std::panic::catch_unwind(|| {
            run(
                sh("echo said-this; exec sleep 600"),
                Duration::from_millis(300),
            )
        });
        let msg = r
            .err()
            .and_then(|p| p.downcast_ref::<String>().cloned())
            .unwrap_or_default();
        assert!(
            msg.contains("did not exit") && msg.contains("said-this") && msg.contains("sleep"),
            "{msg}"
        );
    }

    #[test]
    fn the_ready_line_is_found_among_log_lines() {
        #[derive(serde::Deserialize)]
        struct Ready {
            mqtt: String,
        }
        let mut p = Proc::spawn(sh(
            r#"echo 'INFO mqtt ready at 1.2.3.4:5'; echo '{"ready":{"mqtt":"127.0.0.1:7"}}'; exec sleep 600"#,
        ));
        let r: Ready = p.ready(Duration::from_secs(20));
        assert_eq!(r.mqtt, "127.0.0.1:7");
    }

    #[test]
    fn a_child_that_exits_before_it_is_ready_is_reported() {
        let r = std::panic::catch_unwind(|| {
            let mut p = Proc::spawn(sh("echo bye; exit 1"));
            p.ready::<serde_json::Value>(Duration::from_secs(20))
        });
        let msg = r
            .err()
            .and_then(|p| p.downcast_ref::<String>().cloned())
            .unwrap_or_default();
        assert!(msg.contains("exited") && msg.contains("bye"), "{msg}");
    }
}
