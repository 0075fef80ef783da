//! Crash tests: run one `#[ignore]`d test of the current test binary as a child process, read
//! what it confirms on stdout (each read bounded), and kill it with SIGKILL at a moment of the
//! parent's choosing.

use std::ffi::OsStr;
use std::process::Command;
use std::time::{Duration, Instant};

use crate::child::Proc;

/// A child running the ignored test `test_name` of this test binary, with `env` set.
pub struct CrashChild {
    proc: Proc,
}

impl CrashChild {
    /// Starts the child. Panics (this is test support) if it cannot.
    pub fn start(test_name: &str, env: (&str, &OsStr)) -> Self {
        let exe = std::env::current_exe().unwrap_or_else(|e| panic!("current_exe: {e}"));
        let mut cmd = Command::new(exe);
        cmd.args([
            "--exact",
            test_name,
            "--ignored",
            "--nocapture",
            "--test-threads",
            "1",
        ])
        .env(env.0, env.1);
        Self {
            proc: Proc::spawn(cmd),
        }
    }

    /// Reads lines until `n` of them parse with `parse`, all within `within`; the parsed
    /// values. Past the deadline the child is killed and the test fails with its output.
    pub fn confirmations<T>(
        &mut self,
        n: usize,
        within: Duration,
        parse: impl Fn(&str) -> Option<T>,
    ) -> Vec<T> {
        let end = Instant::now() + within;
        let mut got = Vec::with_capacity(n);
        while got.len() < n {
            let left = end.saturating_duration_since(Instant::now());
            let what = format!("confirm {n} times (confirmed {})", got.len());
            got.push(self.proc.next_matching(left, &what, |l| parse(l.trim())));
        }
        got
    }

    /// SIGKILL, and reap.
    pub fn kill(mut self) {
        self.proc.kill();
    }
}
