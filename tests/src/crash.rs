//! Crash tests: run one `#[ignore]`d test of the current test binary as a child process, read
//! what it confirms on stdout, and kill it with SIGKILL at a moment of the parent's choosing.

use std::io::{BufRead, BufReader, Lines};
use std::process::{Child, ChildStdout, Command, Stdio};

/// A child running the ignored test `test_name` of this test binary, with `env` set.
pub struct CrashChild {
    child: Child,
    lines: Lines<BufReader<ChildStdout>>,
}

impl CrashChild {
    /// Starts the child. Panics (this is test support) if it cannot.
    pub fn start(test_name: &str, env: (&str, &std::ffi::OsStr)) -> Self {
        let exe = std::env::current_exe().unwrap_or_else(|e| panic!("current_exe: {e}"));
        let mut child = Command::new(exe)
            .args([
                "--exact",
                test_name,
                "--ignored",
                "--nocapture",
                "--test-threads",
                "1",
            ])
            .env(env.0, env.1)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("spawning {test_name}: {e}"));
        let stdout = child.stdout.take().unwrap_or_else(|| panic!("no stdout"));
        Self {
            child,
            lines: BufReader::new(stdout).lines(),
        }
    }

    /// Reads lines until `n` of them parse with `parse`; returns the parsed values.
    pub fn confirmations<T>(&mut self, n: usize, parse: impl Fn(&str) -> Option<T>) -> Vec<T> {
        let mut got = Vec::with_capacity(n);
        while got.len() < n {
            let line = self
                .lines
                .next()
                .unwrap_or_else(|| panic!("child stopped after {} confirmations", got.len()))
                .unwrap_or_else(|e| panic!("reading the child: {e}"));
            if let Some(v) = parse(line.trim()) {
                got.push(v);
            }
        }
        got
    }

    /// SIGKILL, and reap.
    pub fn kill(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
