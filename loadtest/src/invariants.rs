//! The checks made at the end of a run, from the sale's stats
//! (`GET /v1/sales/{id}/stats`) and what the load test saw.

use crate::observe::Summary;
use serde::{Deserialize, Serialize};
use std::fmt::Write as _;

/// `GET /v1/sales/{id}/stats`, the fields the checks read.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Stats {
    /// Total units put on sale.
    pub stock: u64,
    /// Units not taken.
    pub stock_left: i64,
    /// Orders accepted (202).
    pub accepted: u64,
    /// Units accepted.
    pub accepted_units: u64,
    /// Orders in the store.
    #[serde(default)]
    pub persisted: u64,
    /// Orders waiting on the payment provider.
    #[serde(default)]
    pub payment_pending: u64,
    /// Orders paid.
    #[serde(default)]
    pub paid: u64,
    /// Orders whose payment failed.
    #[serde(default)]
    pub payment_failed: u64,
    /// Orders expired.
    #[serde(default)]
    pub expired: u64,
    /// Orders whose stock went back.
    #[serde(default)]
    pub released: u64,
    /// Units that went back.
    #[serde(default)]
    pub released_units: u64,
}

impl Stats {
    /// Every accepted order is stored, final, and released when it did not sell.
    pub fn settled(&self) -> bool {
        self.persisted >= self.accepted
            && self.paid + self.payment_failed + self.expired == self.persisted
            && self.released == self.payment_failed + self.expired
    }
}

/// Outcome of one check.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum Verdict {
    /// Holds.
    Pass,
    /// Broken.
    Fail,
    /// Not checked in this run.
    Skip,
}

/// One check and why it has its verdict.
#[derive(Debug, Clone, Serialize)]
pub struct Check {
    /// Short name.
    pub name: &'static str,
    /// Verdict.
    pub verdict: Verdict,
    /// The numbers behind it.
    pub detail: String,
}

fn check(name: &'static str, ok: bool, detail: String) -> Check {
    let verdict = if ok { Verdict::Pass } else { Verdict::Fail };
    Check {
        name,
        verdict,
        detail,
    }
}

fn skip(name: &'static str, detail: &str) -> Check {
    Check {
        name,
        verdict: Verdict::Skip,
        detail: detail.to_owned(),
    }
}

/// How the run is judged.
#[derive(Debug, Clone)]
pub struct Expectations {
    /// No other client used the sale during the run.
    pub exclusive: bool,
    /// Largest share of requests allowed an unexpected answer.
    pub max_error_rate: f64,
    /// Whether the sale settled before the stats were read (`None`: not waited for).
    pub settled: Option<bool>,
}

/// Checks the invariants.
///
/// - `no_oversell`: `accepted_units <= stock + released_units` (released units sell again);
/// - `stock_left_non_negative`: `stock_left >= 0`;
/// - `conservation`: `stock_left == stock - accepted_units + released_units`;
/// - `settled`: every accepted order reached a final status before the stats were read;
/// - `answers_match_accepted`: the distinct order ids answered 202 in this run equal the
///   orders the sale accepted during it (`after.accepted - before.accepted`), give or
///   take the order requests that got no answer (a timed-out or cut-off request may have
///   been accepted); skipped when other clients share the sale;
/// - `idempotency`: no Idempotency-Key was answered with two order ids, or refused
///   after its 202;
/// - `error_rate`: unexpected answers are at most `max_error_rate` of the requests, and
///   there was at least one request.
pub fn check_all(
    after: &Stats,
    before: Option<&Stats>,
    seen: &Summary,
    exp: &Expectations,
) -> Vec<Check> {
    let mut out = Vec::new();
    let sellable = after.stock + after.released_units;
    out.push(check(
        "no_oversell",
        after.accepted_units <= sellable,
        format!(
            "accepted {} units <= stock {} + released {}",
            after.accepted_units, after.stock, after.released_units
        ),
    ));
    out.push(check(
        "stock_left_non_negative",
        after.stock_left >= 0,
        format!("stock_left {}", after.stock_left),
    ));
    let expected_left =
        after.stock as i128 - after.accepted_units as i128 + after.released_units as i128;
    out.push(check(
        "conservation",
        i128::from(after.stock_left) == expected_left,
        format!(
            "stock_left {} == stock {} - accepted {} + released {} = {expected_left}",
            after.stock_left, after.stock, after.accepted_units, after.released_units
        ),
    ));
    out.push(match exp.settled {
        None => skip("settled", "not waited for (--settle-timeout 0s)"),
        Some(ok) => check(
            "settled",
            ok,
            format!(
                "persisted {} of {} accepted; paid {}, payment_failed {}, expired {}, pending {}; released {}",
                after.persisted,
                after.accepted,
                after.paid,
                after.payment_failed,
                after.expired,
                after.payment_pending,
                after.released
            ),
        ),
    });
    if exp.exclusive {
        let base = before.map_or(0, |b| b.accepted);
        let during = after.accepted.saturating_sub(base);
        let seen_ok = seen.distinct_accepted;
        let slack = seen.unanswered_orders;
        out.push(check(
            "answers_match_accepted",
            seen_ok <= during && during <= seen_ok + slack,
            format!(
                "{seen_ok} distinct order ids answered 202; sale accepted {during} during the run; {slack} order requests unanswered"
            ),
        ));
    } else {
        out.push(skip(
            "answers_match_accepted",
            "the sale is shared with other clients (--shared-sale)",
        ));
    }
    let mut detail = format!(
        "{} keys answered with another order or refused after their 202",
        seen.idempotency_violations
    );
    if let Some(first) = seen.violation_examples.first() {
        let _ = write!(detail, "; first: {first}");
    }
    out.push(check(
        "idempotency",
        seen.idempotency_violations == 0,
        detail,
    ));
    let rate = if seen.requests == 0 {
        1.0
    } else {
        seen.errors as f64 / seen.requests as f64
    };
    out.push(check(
        "error_rate",
        seen.requests > 0 && rate <= exp.max_error_rate,
        format!(
            "{} unexpected of {} requests = {:.3} % (at most {:.3} %)",
            seen.errors,
            seen.requests,
            rate * 100.0,
            exp.max_error_rate * 100.0
        ),
    ));
    out
}

/// Whether no check failed.
pub fn passed(checks: &[Check]) -> bool {
    checks.iter().all(|c| c.verdict != Verdict::Fail)
}

/// The checks as a table.
pub fn render(checks: &[Check]) -> String {
    let mut s = String::new();
    let width = checks.iter().map(|c| c.name.len()).max().unwrap_or(0);
    for c in checks {
        let v = match c.verdict {
            Verdict::Pass => "PASS",
            Verdict::Fail => "FAIL",
            Verdict::Skip => "SKIP",
        };
        let _ = writeln!(s, "  {:<width$}  {v}  {}", c.name, c.detail);
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stats(json: &str) -> Stats {
        serde_json::from_str(json).expect("stats JSON")
    }

    const HEALTHY: &str = r#"{"sale_id":"s1","stock":100,"stock_left":5,"accepted":100,
        "accepted_units":100,"rejected":{"sold_out":40},"persisted":100,"payment_pending":0,
        "paid":95,"payment_failed":5,"expired":0,"released":5,"released_units":5,
        "throughput_per_s":12.5}"#;

    fn seen(distinct: u64, unanswered: u64) -> Summary {
        Summary {
            requests: 200,
            errors: 0,
            distinct_accepted: distinct,
            unanswered_orders: unanswered,
            ..Summary::default()
        }
    }

    fn exp() -> Expectations {
        Expectations {
            exclusive: true,
            max_error_rate: 0.01,
            settled: Some(true),
        }
    }

    fn verdict(checks: &[Check], name: &str) -> Verdict {
        checks
            .iter()
            .find(|c| c.name == name)
            .map(|c| c.verdict)
            .expect("check present")
    }

    #[test]
    fn a_healthy_sale_passes_every_check() {
        let s = stats(HEALTHY);
        assert!(s.settled());
        let checks = check_all(&s, None, &seen(100, 0), &exp());
        assert!(passed(&checks), "{}", render(&checks));
        assert_eq!(checks.len(), 7);
    }

    #[test]
    fn oversell_and_broken_conservation_fail() {
        let mut s = stats(HEALTHY);
        s.accepted_units = 106;
        s.stock_left = -1;
        let checks = check_all(&s, None, &seen(100, 0), &exp());
        assert_eq!(verdict(&checks, "no_oversell"), Verdict::Fail);
        assert_eq!(verdict(&checks, "stock_left_non_negative"), Verdict::Fail);
        assert_eq!(verdict(&checks, "conservation"), Verdict::Pass);
        s.stock_left = 3;
        s.accepted_units = 100;
        let checks = check_all(&s, None, &seen(100, 0), &exp());
        assert_eq!(verdict(&checks, "conservation"), Verdict::Fail);
        assert!(!passed(&checks));
    }

    #[test]
    fn accepted_orders_match_the_answers_up_to_the_unanswered_requests() {
        let s = stats(HEALTHY);
        // Two 202s lost to timeouts: covered by three unanswered requests.
        let checks = check_all(&s, None, &seen(98, 3), &exp());
        assert_eq!(verdict(&checks, "answers_match_accepted"), Verdict::Pass);
        // Not covered.
        let checks = check_all(&s, None, &seen(98, 1), &exp());
        assert_eq!(verdict(&checks, "answers_match_accepted"), Verdict::Fail);
        // More 202s than the sale accepted: never fine.
        let checks = check_all(&s, None, &seen(101, 5), &exp());
        assert_eq!(verdict(&checks, "answers_match_accepted"), Verdict::Fail);
        // Orders from before the run do not count.
        let before = Stats {
            accepted: 40,
            ..Stats::default()
        };
        let checks = check_all(&s, Some(&before), &seen(60, 0), &exp());
        assert_eq!(verdict(&checks, "answers_match_accepted"), Verdict::Pass);
        // A shared sale skips the check.
        let shared = Expectations {
            exclusive: false,
            ..exp()
        };
        let checks = check_all(&s, None, &seen(1, 0), &shared);
        assert_eq!(verdict(&checks, "answers_match_accepted"), Verdict::Skip);
        assert!(passed(&checks));
    }

    #[test]
    fn errors_over_the_threshold_and_idempotency_violations_fail() {
        let s = stats(HEALTHY);
        let mut seen = seen(100, 0);
        seen.errors = 2; // 1 % of 200
        assert_eq!(
            verdict(&check_all(&s, None, &seen, &exp()), "error_rate"),
            Verdict::Pass
        );
        seen.errors = 3;
        assert_eq!(
            verdict(&check_all(&s, None, &seen, &exp()), "error_rate"),
            Verdict::Fail
        );
        seen.errors = 0;
        seen.requests = 0;
        assert_eq!(
            verdict(&check_all(&s, None, &seen, &exp()), "error_rate"),
            Verdict::Fail,
            "a run without requests tested nothing"
        );
        seen.requests = 200;
        seen.idempotency_violations = 1;
        seen.violation_examples = vec!["key k1 answered with order b, earlier a".into()];
        let checks = check_all(&s, None, &seen, &exp());
        assert_eq!(verdict(&checks, "idempotency"), Verdict::Fail);
        assert!(render(&checks).contains("key k1"));
    }

    #[test]
    fn an_unsettled_sale_fails_and_not_waiting_skips() {
        let mut s = stats(HEALTHY);
        s.payment_pending = 3;
        s.paid = 92;
        assert!(!s.settled());
        let unsettled = Expectations {
            settled: Some(s.settled()),
            ..exp()
        };
        assert_eq!(
            verdict(&check_all(&s, None, &seen(100, 0), &unsettled), "settled"),
            Verdict::Fail
        );
        let no_wait = Expectations {
            settled: None,
            ..exp()
        };
        assert_eq!(
            verdict(&check_all(&s, None, &seen(100, 0), &no_wait), "settled"),
            Verdict::Skip
        );
    }
}
