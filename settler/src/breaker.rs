//! A circuit breaker in front of a provider (the payment provider's and the notification
//! provider's are separate): while the provider is down, charging (or notifying) pauses
//! instead of failing orders or hammering the provider.
//!
//! States and moves:
//! - **closed**: every call is let through. A call that fails in a way that says the
//!   provider is unwell (timeout, transport error, 5xx/408/429) adds one to a count of
//!   consecutive failures, and so does every failed attempt inside a client's retries
//!   (the clients stop retrying once the circuit is not closed, so an outage costs each
//!   call in flight one attempt, not all of them); any answer (a success, a decline,
//!   even a 4xx refusal: the provider is up) sets the count back to 0. At `threshold`
//!   consecutive failures the breaker **opens**.
//! - **open**: no call is let through for `cool_down`. Orders stay where they are
//!   (`persisted` or `payment_pending`) and are taken up again once the breaker closes.
//! - **half-open**: after the cool-down, exactly one call (the probe) is let through; the
//!   others are still refused. The probe's success closes the breaker, its failure opens it
//!   for another cool-down. A probe that ends without telling (its permit dropped: the
//!   order needed no provider call after all, or its task was cancelled) frees the slot for
//!   another probe.
//!
//! No crate was used: `failsafe`, the maintained one, lets every call through in half-open
//! and does not expose its state, and both matter here (one probe, not the whole backlog;
//! `circuit_open` in the settler's stats). Calls ask for a [`Permit`] and report on it;
//! reports from permits handed out before the breaker opened are ignored unless they are
//! successes (any answer proves the provider is back).
//!
//! Metrics ([`crate::metrics`]), by provider: `flashsale_breaker_state` (0 closed,
//! 1 half-open, 2 open; set on every move, and an open breaker whose cool-down ended reads
//! half-open from the next [`CircuitBreaker::state`] call, which the sweep makes every
//! interval) and `flashsale_breaker_openings_total`.

use crate::metrics::{metrics, PAYMENT};
use parking_lot::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Where the breaker is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BreakerState {
    /// Calls go through.
    Closed,
    /// Calls are refused until the cool-down ends.
    Open,
    /// The cool-down ended: one probe may go through (or is under way).
    HalfOpen,
}

#[derive(Debug, Clone, Copy)]
enum State {
    Closed { failures: u32 },
    Open { until: Instant },
    HalfOpen { probing: bool },
}

impl BreakerState {
    /// The value of `flashsale_breaker_state`: 0 closed, 1 half-open, 2 open.
    pub fn gauge_value(self) -> i64 {
        match self {
            BreakerState::Closed => 0,
            BreakerState::HalfOpen => 1,
            BreakerState::Open => 2,
        }
    }
}

#[derive(Debug)]
struct Shared {
    /// The provider's `provider` label.
    provider: &'static str,
    state: Mutex<State>,
    threshold: u32,
    cool_down: Duration,
    /// Mirrors "not closed", readable without the lock.
    open: AtomicBool,
    opened_total: AtomicU64,
}

/// A circuit breaker (see the module docs). Cheap to clone; clones share their state.
#[derive(Debug, Clone)]
pub struct CircuitBreaker(Arc<Shared>);

/// Leave to make one call; report its outcome with [`Permit::record`] (or
/// [`Permit::success`] / [`Permit::failure`]).
#[derive(Debug)]
#[must_use = "a permit reports the outcome of a call"]
pub struct Permit {
    breaker: CircuitBreaker,
    probe: bool,
    reported: bool,
}

impl CircuitBreaker {
    /// A closed breaker in front of the payment provider that opens after `threshold` (at
    /// least 1) consecutive failures and stays open for `cool_down`.
    pub fn new(threshold: u32, cool_down: Duration) -> Self {
        Self::for_provider(PAYMENT, threshold, cool_down)
    }

    /// A closed breaker in front of `provider` ([`PAYMENT`](crate::metrics::PAYMENT) or
    /// [`NOTIFICATION`](crate::metrics::NOTIFICATION), its metrics label), as
    /// [`new`](Self::new).
    pub fn for_provider(provider: &'static str, threshold: u32, cool_down: Duration) -> Self {
        metrics().set_breaker_state(provider, BreakerState::Closed.gauge_value());
        CircuitBreaker(Arc::new(Shared {
            provider,
            state: Mutex::new(State::Closed { failures: 0 }),
            threshold: threshold.max(1),
            cool_down,
            open: AtomicBool::new(false),
            opened_total: AtomicU64::new(0),
        }))
    }

    /// The provider this breaker is in front of.
    pub fn provider(&self) -> &'static str {
        self.0.provider
    }

    /// The state now (an open breaker whose cool-down ended reads as half-open).
    pub fn state(&self) -> BreakerState {
        self.state_at(Instant::now())
    }

    fn state_at(&self, now: Instant) -> BreakerState {
        let state = match *self.0.state.lock() {
            State::Closed { .. } => BreakerState::Closed,
            State::Open { until } if now < until => BreakerState::Open,
            State::Open { .. } | State::HalfOpen { .. } => BreakerState::HalfOpen,
        };
        self.publish(state);
        state
    }

    /// Sets the state gauge.
    fn publish(&self, state: BreakerState) {
        metrics().set_breaker_state(self.0.provider, state.gauge_value());
    }

    /// Whether calls go through freely (no lock taken).
    pub fn is_closed(&self) -> bool {
        !self.0.open.load(Ordering::Relaxed)
    }

    /// How often the breaker opened (half-open to open included).
    pub fn opened_total(&self) -> u64 {
        self.0.opened_total.load(Ordering::Relaxed)
    }

    /// Leave to call the provider, `None` while open or while a probe is under way.
    pub fn try_acquire(&self) -> Option<Permit> {
        self.try_acquire_at(Instant::now())
    }

    fn try_acquire_at(&self, now: Instant) -> Option<Permit> {
        let mut state = self.0.state.lock();
        let probe = match *state {
            State::Closed { .. } => false,
            State::Open { until } if now < until => return None,
            State::Open { .. } | State::HalfOpen { probing: false } => {
                *state = State::HalfOpen { probing: true };
                self.publish(BreakerState::HalfOpen);
                true
            }
            State::HalfOpen { probing: true } => return None,
        };
        Some(Permit {
            breaker: self.clone(),
            probe,
            reported: false,
        })
    }

    fn on_success(&self) {
        let mut state = self.0.state.lock();
        if !matches!(*state, State::Closed { failures: 0 }) {
            if !matches!(*state, State::Closed { .. }) {
                tracing::info!(
                    provider = self.0.provider,
                    "provider answers again; circuit closed"
                );
            }
            *state = State::Closed { failures: 0 };
            self.0.open.store(false, Ordering::Relaxed);
            self.publish(BreakerState::Closed);
        }
    }

    fn on_failure(&self, probe: bool, now: Instant) {
        let mut state = self.0.state.lock();
        let open = match *state {
            State::Closed { failures } => {
                let failures = failures.saturating_add(1);
                *state = State::Closed { failures };
                failures >= self.0.threshold
            }
            State::HalfOpen { probing: true } => probe,
            // A late report of a call let through before the breaker opened.
            State::Open { .. } | State::HalfOpen { probing: false } => false,
        };
        if open {
            *state = State::Open {
                until: now + self.0.cool_down,
            };
            self.0.open.store(true, Ordering::Relaxed);
            self.0.opened_total.fetch_add(1, Ordering::Relaxed);
            self.publish(BreakerState::Open);
            metrics().breaker_opened(self.0.provider);
            tracing::warn!(provider = self.0.provider, cool_down = ?self.0.cool_down, "provider failing; circuit open, calls paused");
        }
    }

    /// One failed attempt inside a client's retries (see
    /// [`PaymentClient::with_circuit`](crate::PaymentClient::with_circuit)): counted like a
    /// failed call while closed, ignored otherwise (the call's own permit reports its end).
    pub fn attempt_failed(&self) {
        self.on_failure(false, Instant::now());
    }

    fn on_abandoned_probe(&self) {
        let mut state = self.0.state.lock();
        if let State::HalfOpen { probing: true } = *state {
            *state = State::HalfOpen { probing: false };
        }
    }
}

impl Permit {
    /// Whether this permit is the half-open probe.
    pub fn is_probe(&self) -> bool {
        self.probe
    }

    /// The call got an answer: the provider is up.
    pub fn success(mut self) {
        self.reported = true;
        self.breaker.on_success();
    }

    /// The call failed in a way that says the provider is unwell.
    pub fn failure(self) {
        self.failure_at(Instant::now());
    }

    fn failure_at(mut self, now: Instant) {
        self.reported = true;
        self.breaker.on_failure(self.probe, now);
    }

    /// Reports `result`: retryable errors (see
    /// [`ProviderError::is_retryable`](crate::ProviderError::is_retryable)) are failures,
    /// anything else (answers, refusals) successes.
    pub fn record<T>(self, result: &Result<T, crate::ProviderError>) {
        match result {
            Err(e) if e.is_retryable() => self.failure(),
            _ => self.success(),
        }
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        if self.probe && !self.reported {
            self.breaker.on_abandoned_probe();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fail_at(b: &CircuitBreaker, now: Instant) {
        b.try_acquire_at(now).expect("permit").failure_at(now);
    }

    #[test]
    fn opens_after_consecutive_failures_only() {
        let b = CircuitBreaker::new(3, Duration::from_secs(1));
        let t = Instant::now();
        fail_at(&b, t);
        fail_at(&b, t);
        b.try_acquire_at(t).expect("closed").success(); // resets the count
        fail_at(&b, t);
        fail_at(&b, t);
        assert!(b.is_closed());
        assert_eq!(b.state_at(t), BreakerState::Closed);
        fail_at(&b, t);
        assert!(!b.is_closed());
        assert_eq!(b.state_at(t), BreakerState::Open);
        assert_eq!(b.opened_total(), 1);
        assert!(b.try_acquire_at(t + Duration::from_millis(999)).is_none());
    }

    #[test]
    fn half_open_lets_one_probe_through_and_its_outcome_decides() {
        let b = CircuitBreaker::new(1, Duration::from_secs(1));
        let t = Instant::now();
        fail_at(&b, t);
        let later = t + Duration::from_secs(1);
        assert_eq!(b.state_at(later), BreakerState::HalfOpen);
        let probe = b.try_acquire_at(later).expect("probe");
        assert!(probe.is_probe());
        assert!(b.try_acquire_at(later).is_none(), "one probe at a time");
        // The probe fails: open again for another cool-down.
        probe.failure_at(later);
        assert_eq!(b.opened_total(), 2);
        assert!(b
            .try_acquire_at(later + Duration::from_millis(500))
            .is_none());
        let even_later = later + Duration::from_secs(1);
        let probe = b.try_acquire_at(even_later).expect("second probe");
        probe.success();
        assert!(b.is_closed());
        assert_eq!(b.state_at(even_later), BreakerState::Closed);
        assert!(!b.try_acquire_at(even_later).expect("closed").is_probe());
    }

    #[test]
    fn an_abandoned_probe_frees_the_slot_and_stale_failures_are_ignored() {
        let b = CircuitBreaker::new(1, Duration::ZERO);
        let t = Instant::now();
        let stale = b.try_acquire_at(t).expect("closed permit");
        fail_at(&b, t);
        let probe = b.try_acquire_at(t).expect("probe");
        drop(probe);
        let probe = b.try_acquire_at(t).expect("the slot is free again");
        // A failure reported by a permit from before the breaker opened is not the probe's.
        stale.failure();
        assert_eq!(b.opened_total(), 1);
        probe.success();
        assert!(b.is_closed());
    }

    #[test]
    fn the_state_gauge_and_the_openings_follow_the_breaker() {
        // A provider label of its own: other tests' breakers do not touch these series.
        let provider = "breaker-unit-test";
        let m = metrics();
        let label = crate::metrics::ProviderLabel { provider };
        let gauge = || m.breaker_state.get_or_create(&label).get();
        let openings = || m.breaker_openings.get_or_create(&label).get();
        let b = CircuitBreaker::for_provider(provider, 1, Duration::from_secs(1));
        assert_eq!(gauge(), 0);
        let t = Instant::now();
        fail_at(&b, t);
        assert_eq!((gauge(), openings()), (2, 1));
        let later = t + Duration::from_secs(1);
        assert_eq!(b.state_at(later), BreakerState::HalfOpen);
        assert_eq!(gauge(), 1, "reading the state publishes half-open");
        let probe = b.try_acquire_at(later).expect("probe");
        probe.failure_at(later);
        assert_eq!((gauge(), openings()), (2, 2));
        let probe = b
            .try_acquire_at(later + Duration::from_secs(1))
            .expect("probe");
        assert_eq!(gauge(), 1);
        probe.success();
        assert_eq!((gauge(), openings()), (0, 2));
    }

    #[test]
    fn refusals_count_as_answers() {
        let b = CircuitBreaker::new(1, Duration::from_secs(60));
        let refused: Result<(), crate::ProviderError> = Err(crate::ProviderError::Rejected {
            status: http::StatusCode::UNPROCESSABLE_ENTITY,
            code: "x".into(),
        });
        b.try_acquire().expect("permit").record(&refused);
        assert!(b.is_closed());
        let down: Result<(), crate::ProviderError> = Err(crate::ProviderError::Timeout);
        b.try_acquire().expect("permit").record(&down);
        assert!(!b.is_closed());
        assert_eq!(b.state(), BreakerState::Open);
    }
}
