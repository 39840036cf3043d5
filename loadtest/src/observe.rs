//! What the load test saw: outcomes by request, status and problem code, the order ids
//! answered 202, and idempotency violations. Shared by every goose user.

use parking_lot::Mutex;
use serde::Serialize;
use std::collections::{BTreeMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

/// Statuses an order request may get without anything being wrong.
pub fn order_status_expected(status: u16) -> bool {
    matches!(status, 202 | 403 | 409 | 429)
}

/// Final order statuses (`GET /v1/orders/{id}`).
pub fn order_final(status: &str) -> bool {
    matches!(status, "paid" | "payment_failed" | "expired")
}

/// The `code` of an RFC 9457 problem body, if it is one.
pub fn problem_code(body: &str) -> Option<String> {
    let v: serde_json::Value = serde_json::from_str(body).ok()?;
    v.get("code")?.as_str().map(str::to_owned)
}

/// Idempotency violations kept in full; past this only counted.
const KEEP_VIOLATIONS: usize = 20;

/// Counters of one run.
#[derive(Debug, Default)]
pub struct Observed {
    outcomes: Mutex<BTreeMap<String, u64>>,
    requests: AtomicU64,
    errors: AtomicU64,
    orders_sent: AtomicU64,
    orders_answered: AtomicU64,
    accepted: Mutex<HashSet<String>>,
    violations: Mutex<Vec<String>>,
    violation_count: AtomicU64,
}

/// A summary of [`Observed`], for the checks and the JSON file.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Summary {
    /// Requests sent (every attempt).
    pub requests: u64,
    /// Requests whose answer was unexpected, and failures that are not answers.
    pub errors: u64,
    /// Distinct order ids answered 202.
    pub distinct_accepted: u64,
    /// Order requests sent that got no HTTP answer (timed out, failed, or cut off when
    /// the run ended): each may or may not have taken stock.
    pub unanswered_orders: u64,
    /// Keys answered with two different order ids, or refused after a 202.
    pub idempotency_violations: u64,
    /// The first violations.
    pub violation_examples: Vec<String>,
    /// Outcomes: `<request> <status> [<code>]` -> count.
    pub outcomes: BTreeMap<String, u64>,
}

impl Observed {
    /// Counts one outcome under `key`.
    pub fn outcome(&self, key: impl Into<String>) {
        *self.outcomes.lock().entry(key.into()).or_default() += 1;
    }

    /// Counts a request about to be sent; `order` says it is an order.
    pub fn sent(&self, order: bool) {
        self.requests.fetch_add(1, Relaxed);
        if order {
            self.orders_sent.fetch_add(1, Relaxed);
        }
    }

    /// Counts an HTTP answer to an order request.
    pub fn order_answered(&self) {
        self.orders_answered.fetch_add(1, Relaxed);
    }

    /// Counts an error.
    pub fn error(&self) {
        self.errors.fetch_add(1, Relaxed);
    }

    /// Records an order id answered 202.
    pub fn accepted(&self, order_id: &str) {
        let mut set = self.accepted.lock();
        if !set.contains(order_id) {
            set.insert(order_id.to_owned());
        }
    }

    /// Records an idempotency violation.
    pub fn violation(&self, detail: String) {
        self.violation_count.fetch_add(1, Relaxed);
        let mut v = self.violations.lock();
        if v.len() < KEEP_VIOLATIONS {
            v.push(detail);
        }
    }

    /// The counters now.
    pub fn summary(&self) -> Summary {
        let sent = self.orders_sent.load(Relaxed);
        let answered = self.orders_answered.load(Relaxed);
        Summary {
            requests: self.requests.load(Relaxed),
            errors: self.errors.load(Relaxed),
            distinct_accepted: self.accepted.lock().len() as u64,
            unanswered_orders: sent.saturating_sub(answered),
            idempotency_violations: self.violation_count.load(Relaxed),
            violation_examples: self.violations.lock().clone(),
            outcomes: self.outcomes.lock().clone(),
        }
    }
}

/// What happened to one Idempotency-Key: every 202 must name the same order.
#[derive(Debug, Default)]
pub struct KeyLedger {
    order_id: Option<String>,
}

impl KeyLedger {
    /// The order id answered first, if any.
    pub fn order_id(&self) -> Option<&str> {
        self.order_id.as_deref()
    }

    /// Records a 202 for the key; a different order id than an earlier 202 is an error,
    /// described in the `Err`.
    pub fn answered(&mut self, order_id: &str) -> Result<(), String> {
        match &self.order_id {
            None => {
                self.order_id = Some(order_id.to_owned());
                Ok(())
            }
            Some(first) if first == order_id => Ok(()),
            Some(first) => Err(format!(
                "answered with order {order_id}, earlier with order {first}"
            )),
        }
    }

    /// Records a refusal: after a 202 the key must keep its answer, so a refusal that is
    /// a decision (sold out, limit exceeded, sale not active) is an error. Rate limiting
    /// and request_in_progress are not decisions about the order.
    pub fn refused(&self, status: u16, code: Option<&str>) -> Result<(), String> {
        match (&self.order_id, status, code) {
            (Some(_), 429, _) | (Some(_), 409, Some("request_in_progress")) | (None, _, _) => {
                Ok(())
            }
            (Some(first), _, _) => Err(format!(
                "refused with {status} {} after order {first} was accepted",
                code.unwrap_or("-")
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expected_statuses_are_the_documented_refusals_and_acceptance() {
        for s in [202, 403, 409, 429] {
            assert!(order_status_expected(s), "{s}");
        }
        for s in [200, 400, 401, 404, 408, 413, 415, 422, 500, 503] {
            assert!(!order_status_expected(s), "{s}");
        }
    }

    #[test]
    fn problem_codes_are_read_from_problem_bodies_only() {
        let body = r#"{"type":"urn:flashsale:problem:sold_out","title":"Sold out","status":409,"code":"sold_out"}"#;
        assert_eq!(problem_code(body).as_deref(), Some("sold_out"));
        assert_eq!(problem_code("<html>"), None);
        assert_eq!(problem_code(r#"{"order_id":"x"}"#), None);
    }

    #[test]
    fn a_key_answered_with_two_orders_is_a_violation() {
        let mut k = KeyLedger::default();
        assert!(
            k.refused(409, Some("sold_out")).is_ok(),
            "refusals before a 202"
        );
        assert!(k.answered("a").is_ok());
        assert!(k.answered("a").is_ok());
        assert!(k.refused(409, Some("request_in_progress")).is_ok());
        assert!(k.refused(429, Some("rate_limited")).is_ok());
        assert!(k.answered("b").is_err());
        assert!(k.refused(409, Some("sold_out")).is_err());
        assert_eq!(k.order_id(), Some("a"));
    }

    #[test]
    fn unanswered_orders_are_sent_less_answered() {
        let o = Observed::default();
        for _ in 0..3 {
            o.sent(true);
        }
        o.sent(false);
        o.order_answered();
        o.accepted("x");
        o.accepted("x");
        o.violation("v".into());
        let s = o.summary();
        assert_eq!(s.requests, 4);
        assert_eq!(s.unanswered_orders, 2);
        assert_eq!(s.distinct_accepted, 1);
        assert_eq!(s.idempotency_violations, 1);
    }
}
