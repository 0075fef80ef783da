//! Waiting for a condition, with a deadline and a message: the only polling in test code.

use std::fmt::{Debug, Display};
use std::time::{Duration, Instant};

/// How often a condition is checked: short, so tests do not wait longer than they must.
pub const POLL: Duration = Duration::from_millis(20);

/// What a polled closure may return: `bool`, `Option<T>` (the value once it is `Some`) or
/// `Result<T, E>` (the value once `Ok`; the last error is in the failure message).
pub trait Condition {
    /// What the wait returns once the condition holds.
    type Value;
    /// `Ok(value)` when it holds, else what to say about the last attempt.
    fn check(self) -> Result<Self::Value, Option<String>>;
}

impl Condition for bool {
    type Value = ();
    fn check(self) -> Result<(), Option<String>> {
        if self {
            Ok(())
        } else {
            Err(None)
        }
    }
}

impl<T> Condition for Option<T> {
    type Value = T;
    fn check(self) -> Result<T, Option<String>> {
        self.ok_or(None)
    }
}

impl<T, E: Debug> Condition for Result<T, E> {
    type Value = T;
    fn check(self) -> Result<T, Option<String>> {
        self.map_err(|e| Some(format!("{e:?}")))
    }
}

fn give_up(what: &dyn Display, within: Duration, waited: Duration, last: Option<String>) -> ! {
    match last {
        Some(last) => {
            panic!("not within {within:?} (waited {waited:?}): {what}\nlast attempt: {last}")
        }
        None => panic!("not within {within:?} (waited {waited:?}): {what}"),
    }
}

/// Checks `cond` every [`POLL`] until it holds (its value) or `within` has passed (a panic
/// with `what`, how long it waited and the last error). It is checked once more at the
/// deadline, so a slow machine only fails what really did not happen.
pub async fn eventually<C: Condition>(
    within: Duration,
    what: impl Display,
    mut cond: impl FnMut() -> C,
) -> C::Value {
    eventually_async(within, what, async || cond()).await
}

/// [`eventually`] with an async condition (an SDK call, say).
pub async fn eventually_async<C: Condition>(
    within: Duration,
    what: impl Display,
    mut cond: impl AsyncFnMut() -> C,
) -> C::Value {
    let start = tokio::time::Instant::now();
    let end = start + within;
    loop {
        let last = match cond().await.check() {
            Ok(v) => return v,
            Err(last) => last,
        };
        if tokio::time::Instant::now() >= end {
            give_up(&what, within, start.elapsed(), last);
        }
        tokio::time::sleep(POLL).await;
    }
}

/// [`eventually`] for tests and fixtures without a runtime (it blocks the thread).
pub fn eventually_blocking<C: Condition>(
    within: Duration,
    what: impl Display,
    cond: impl FnMut() -> C,
) -> C::Value {
    let start = Instant::now();
    match poll_blocking(within, cond) {
        Ok(v) => v,
        Err(last) => give_up(&what, within, start.elapsed(), last),
    }
}

/// The loop under [`eventually_blocking`], for fixtures that report a timeout themselves.
pub(crate) fn poll_blocking<C: Condition>(
    within: Duration,
    mut cond: impl FnMut() -> C,
) -> Result<C::Value, Option<String>> {
    let end = Instant::now() + within;
    loop {
        let last = match cond().check() {
            Ok(v) => return Ok(v),
            Err(last) => last,
        };
        if Instant::now() >= end {
            return Err(last);
        }
        std::thread::sleep(POLL);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn returns_the_value_once_it_holds() {
        let mut n = 0;
        let v = eventually(Duration::from_secs(5), "n reaches 3", || {
            n += 1;
            (n >= 3).then_some(n)
        })
        .await;
        assert_eq!(v, 3);
    }

    #[tokio::test]
    #[should_panic(expected = "the sky falls")]
    async fn panics_with_the_message_at_the_deadline() {
        eventually(Duration::from_millis(50), "the sky falls", || false).await;
    }

    #[test]
    fn blocking_reports_the_last_error() {
        let r = std::panic::catch_unwind(|| {
            eventually_blocking(Duration::from_millis(30), "ok", || {
                Err::<(), _>("still broken")
            })
        });
        let msg = r
            .err()
            .and_then(|p| p.downcast_ref::<String>().cloned())
            .unwrap_or_default();
        assert!(msg.contains("still broken") && msg.contains("ok"), "{msg}");
    }
}
