//! The mock's state: its configuration, the random draws of its faults, the ledger of
//! charges, refunds and notifications by idempotency key (what makes a retry get the stored
//! outcome), and the [`AuditBook`]. One [`Inner`] behind one lock per mock server.

use crate::audit::AuditBook;
use crate::config::MockConfig;
use http::StatusCode;
use httpd::Problem;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use settler::provider::{Charge, ChargeRequest, ChargeStatus, Refund};
use std::collections::{HashMap, HashSet};
use std::time::Duration;

pub(crate) struct StoredCharge {
    pub(crate) charge: Charge,
    amount_minor: i64,
}

pub(crate) struct Inner {
    pub(crate) config: MockConfig,
    pub(crate) rng: StdRng,
    /// By idempotency key.
    pub(crate) charges: HashMap<String, StoredCharge>,
    /// Charge id to the idempotency key of its charge.
    pub(crate) charge_ids: HashMap<String, String>,
    /// By idempotency key.
    pub(crate) refunds: HashMap<String, Refund>,
    pub(crate) refunded_charges: HashSet<String>,
    pub(crate) notifications: HashSet<String>,
    pub(crate) audit: AuditBook,
}

impl Inner {
    pub(crate) fn new(config: MockConfig) -> Self {
        let rng = match config.seed {
            Some(seed) => StdRng::seed_from_u64(seed),
            None => StdRng::from_os_rng(),
        };
        let audit = AuditBook::new(config.audit_cap);
        Inner {
            config,
            rng,
            charges: HashMap::new(),
            charge_ids: HashMap::new(),
            refunds: HashMap::new(),
            refunded_charges: HashSet::new(),
            notifications: HashSet::new(),
            audit,
        }
    }

    fn chance(&mut self, rate: f64) -> bool {
        rate > 0.0 && self.rng.random::<f64>() < rate
    }

    /// Draws the fault (if any) and the delay of one charge or notification request.
    pub(crate) fn inject(&mut self) -> Injection {
        let fault = if self.config.down {
            self.audit.totals.unavailable += 1;
            Some(Fault::Down)
        } else if self.chance(self.config.timeout_rate) {
            self.audit.totals.timeouts += 1;
            Some(Fault::Hang)
        } else if self.chance(self.config.error_rate) {
            self.audit.totals.errors += 1;
            Some(Fault::Error)
        } else if self.chance(self.config.lost_answer_rate) {
            Some(Fault::LoseAnswer)
        } else {
            None
        };
        let delay = match fault {
            Some(Fault::Down) => Duration::ZERO,
            Some(Fault::Hang) => self.config.hang,
            _ if self.chance(self.config.slow_rate) => self.config.slow_latency,
            _ => {
                let jitter = self.config.latency_jitter.as_micros() as u64;
                let extra = if jitter == 0 {
                    0
                } else {
                    self.rng.random_range(0..=jitter)
                };
                self.config.latency + Duration::from_micros(extra)
            }
        };
        Injection { delay, fault }
    }

    /// Replaces the configuration (and the random draws, when it has a seed).
    pub(crate) fn set_config(&mut self, config: MockConfig) {
        if let Some(seed) = config.seed {
            self.rng = StdRng::seed_from_u64(seed);
        }
        self.audit.set_cap(config.audit_cap);
        self.config = config;
    }
}

/// A fault injected into one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Fault {
    /// 503 at once, nothing recorded.
    Down,
    /// Hang for `hang`, nothing recorded, then 504.
    Hang,
    /// 500, nothing recorded.
    Error,
    /// Recorded, then the connection is closed without an answer.
    LoseAnswer,
}

/// What [`Inner::inject`] drew for one request.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Injection {
    pub(crate) delay: Duration,
    pub(crate) fault: Option<Fault>,
}

/// Records a charge under `key` (or finds the one stored under it) and returns it.
pub(crate) fn record_charge(
    inner: &mut Inner,
    key: String,
    request: &ChargeRequest<'_>,
) -> Result<Charge, Problem> {
    if let Some(stored) = inner.charges.get(&key) {
        if stored.charge.order_id != request.order_id || stored.amount_minor != request.amount_minor
        {
            return Err(Problem::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "idempotency_key_reused",
                "this Idempotency-Key was used for a different charge",
            ));
        }
        let charge = stored.charge.clone();
        inner.audit.order(&request.order_id).charge_attempts += 1;
        return Ok(charge);
    }
    if request.payment_token.starts_with("tok_reject") {
        inner.audit.totals.refused += 1;
        inner.audit.order(&request.order_id).refused_charges += 1;
        return Err(Problem::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_payment_token",
            "the payment token was refused",
        ));
    }
    let declined = request.payment_token.starts_with("tok_decline")
        || (inner.config.decline_rate > 0.0
            && inner.rng.random::<f64>() < inner.config.decline_rate);
    let charge = Charge {
        charge_id: format!("ch_{}", uuid::Uuid::now_v7().simple()),
        order_id: request.order_id.clone().into_owned(),
        status: if declined {
            ChargeStatus::Declined
        } else {
            ChargeStatus::Succeeded
        },
    };
    let audit = inner.audit.order(&request.order_id);
    audit.charge_attempts += 1;
    if declined {
        audit.declined_charges += 1;
    } else {
        audit.successful_charges += 1;
    }
    let totals = &mut inner.audit.totals;
    totals.charges += 1;
    if declined {
        totals.declined_charges += 1;
    } else {
        totals.successful_charges += 1;
    }
    inner
        .charge_ids
        .insert(charge.charge_id.clone(), key.clone());
    inner.charges.insert(
        key,
        StoredCharge {
            charge: charge.clone(),
            amount_minor: request.amount_minor,
        },
    );
    Ok(charge)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn injection_draws_within_bounds() {
        let mut inner = Inner::new(MockConfig {
            latency: Duration::from_millis(2),
            latency_jitter: Duration::from_millis(3),
            error_rate: 1.0,
            seed: Some(7),
            ..MockConfig::default()
        });
        for _ in 0..100 {
            let Injection { delay, fault } = inner.inject();
            assert_eq!(fault, Some(Fault::Error));
            assert!(delay >= Duration::from_millis(2) && delay <= Duration::from_millis(5));
        }
        assert_eq!(inner.audit.totals.errors, 100);
    }

    #[test]
    fn faults_follow_their_rates_and_order() {
        let mut inner = Inner::new(MockConfig {
            latency: Duration::from_millis(1),
            slow_rate: 0.25,
            slow_latency: Duration::from_millis(500),
            timeout_rate: 0.1,
            hang: Duration::from_secs(30),
            lost_answer_rate: 0.2,
            seed: Some(3),
            ..MockConfig::default()
        });
        let n = 10_000;
        let (mut hangs, mut lost, mut slow, mut fast) = (0, 0, 0, 0);
        for _ in 0..n {
            let Injection { delay, fault } = inner.inject();
            match fault {
                Some(Fault::Hang) => {
                    hangs += 1;
                    assert_eq!(delay, Duration::from_secs(30));
                    continue;
                }
                Some(Fault::LoseAnswer) => lost += 1,
                None => {}
                other => panic!("unexpected fault {other:?}"),
            }
            if delay == Duration::from_millis(500) {
                slow += 1;
            } else {
                assert_eq!(delay, Duration::from_millis(1));
                fast += 1;
            }
        }
        let near =
            |count: i32, expected: f64| (f64::from(count) - expected).abs() < expected * 0.15;
        assert!(near(hangs, 1000.0), "hangs {hangs}");
        assert!(near(lost, 1800.0), "lost answers {lost}");
        assert!(near(slow, 2250.0), "slow {slow}");
        assert_eq!(slow + fast + hangs, n);
        assert_eq!(inner.audit.totals.timeouts, hangs as u64);

        inner.config.down = true;
        let Injection { delay, fault } = inner.inject();
        assert_eq!((delay, fault), (Duration::ZERO, Some(Fault::Down)));
        assert_eq!(inner.audit.totals.unavailable, 1);
    }
}
