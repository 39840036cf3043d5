//! Waiting for a condition with a deadline: the one poll-until-true helper of every test
//! suite. Tests never sleep a fixed time; they wait for what they need, and fail naming it
//! when it does not come.

use std::future::Future;
use std::time::Duration;
use tokio::time::Instant;

/// The first pause between two checks; it doubles up to [`MAX_POLL`], so a condition that
/// holds soon is seen soon and a long wait costs few checks.
const FIRST_POLL: Duration = Duration::from_millis(1);
/// The longest pause between two checks.
const MAX_POLL: Duration = Duration::from_millis(20);

/// Checks `cond` until it holds (`true`) or `deadline` has passed (`false`). The last check
/// is made at or after the deadline, so a condition that holds in time is never missed.
pub async fn wait_until<F, Fut>(deadline: Duration, mut cond: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let end = Instant::now() + deadline;
    let mut pause = FIRST_POLL;
    loop {
        if cond().await {
            return true;
        }
        if Instant::now() >= end {
            return false;
        }
        tokio::time::sleep(pause.min(end.saturating_duration_since(Instant::now()))).await;
        pause = (pause * 2).min(MAX_POLL);
    }
}

/// Waits for `cond` to hold; panics naming `what` when it has not within `deadline`.
pub async fn eventually<F, Fut>(what: &str, deadline: Duration, cond: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    assert!(
        wait_until(deadline, cond).await,
        "timed out after {deadline:?} waiting for: {what}"
    );
}

/// Calls `f` until it returns `Ok` and returns that value; panics naming `what` and the
/// last error when it still fails after `deadline`.
pub async fn eventually_ok<T, E, F, Fut>(what: &str, deadline: Duration, mut f: F) -> T
where
    E: std::fmt::Display,
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, E>>,
{
    let end = Instant::now() + deadline;
    let mut pause = FIRST_POLL;
    loop {
        match f().await {
            Ok(v) => return v,
            Err(e) if Instant::now() >= end => {
                panic!("timed out after {deadline:?} waiting for: {what}; last error: {e}")
            }
            Err(_) => {
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(MAX_POLL);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};

    #[tokio::test]
    async fn a_condition_that_comes_true_is_seen_and_one_that_never_does_times_out() {
        let calls = AtomicU32::new(0);
        let held = wait_until(Duration::from_secs(10), || async {
            calls.fetch_add(1, Ordering::Relaxed) >= 3
        })
        .await;
        assert!(held);
        assert_eq!(calls.load(Ordering::Relaxed), 4);

        let start = Instant::now();
        let held = wait_until(Duration::from_millis(50), || async { false }).await;
        assert!(!held);
        assert!(start.elapsed() >= Duration::from_millis(50));
    }

    #[tokio::test]
    #[should_panic(expected = "waiting for: the answer; last error: not yet")]
    async fn eventually_ok_names_the_last_error() {
        eventually_ok("the answer", Duration::from_millis(20), || async {
            Err::<(), _>("not yet")
        })
        .await;
    }

    #[tokio::test]
    async fn eventually_ok_returns_the_value() {
        let calls = AtomicU32::new(0);
        let v = eventually_ok("the value", Duration::from_secs(10), || async {
            match calls.fetch_add(1, Ordering::Relaxed) {
                0 | 1 => Err("not yet"),
                n => Ok(n),
            }
        })
        .await;
        assert_eq!(v, 2);
    }
}
