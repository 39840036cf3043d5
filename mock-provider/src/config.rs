//! [`MockConfig`]: how the mock behaves (latency, faults, declines, the audit's cap), the
//! one definition of what `POST /v1/admin/config` and `flashsale mock-provider` set.

use serde::{Deserialize, Serialize};
use std::time::Duration;

/// Default of [`MockConfig::audit_cap`].
pub const DEFAULT_AUDIT_CAP: usize = 100_000;

/// How the mock behaves. Durations are humantime strings (`"5ms"`) in JSON and TOML. Rates
/// are probabilities in `0..=1`. See the crate docs for the order the faults are drawn in.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MockConfig {
    /// Fixed delay added to every charge and notification (default 0).
    #[serde(with = "humantime_serde")]
    pub latency: Duration,
    /// Extra delay drawn uniformly from `0..=latency_jitter` (default 0).
    #[serde(with = "humantime_serde")]
    pub latency_jitter: Duration,
    /// Probability that a request takes `slow_latency` instead of `latency` plus jitter
    /// (default 0).
    pub slow_rate: f64,
    /// The delay of a slow request (default 0).
    #[serde(with = "humantime_serde")]
    pub slow_latency: Duration,
    /// Probability that a charge is declined (tokens starting with `tok_decline` are always
    /// declined; default 0).
    pub decline_rate: f64,
    /// Probability that a charge or notification is answered 500 without being recorded
    /// (default 0).
    pub error_rate: f64,
    /// Probability that a charge or notification hangs for `hang` without being recorded,
    /// then is answered 504 (default 0).
    pub timeout_rate: f64,
    /// How long a request picked by `timeout_rate` hangs (default 60 s; cut short when the
    /// mock stops).
    #[serde(with = "humantime_serde")]
    pub hang: Duration,
    /// Probability that a charge or notification is recorded but its answer lost: the
    /// connection closes without a response (default 0).
    pub lost_answer_rate: f64,
    /// Whether the provider is down: every charge, lookup, refund and notification is
    /// answered 503 and records nothing (default false).
    pub down: bool,
    /// Seed of the random draws, for repeatable runs; from the OS when absent.
    pub seed: Option<u64>,
    /// Most orders the audit keeps per-order detail of (default 100,000): past it the
    /// detail of the order seen first is dropped (counted in the audit's `pruned`); the
    /// totals stay exact. Lowering it at run time drops the excess at once.
    pub audit_cap: usize,
}

impl Default for MockConfig {
    fn default() -> Self {
        MockConfig {
            latency: Duration::ZERO,
            latency_jitter: Duration::ZERO,
            slow_rate: 0.0,
            slow_latency: Duration::ZERO,
            decline_rate: 0.0,
            error_rate: 0.0,
            timeout_rate: 0.0,
            hang: Duration::from_secs(60),
            lost_answer_rate: 0.0,
            down: false,
            seed: None,
            audit_cap: DEFAULT_AUDIT_CAP,
        }
    }
}

impl MockConfig {
    /// Checks that the rates are probabilities and the audit's cap at least 1; names the
    /// offending key otherwise.
    pub fn validate(&self) -> Result<(), &'static str> {
        let rates = [
            (self.slow_rate, "slow_rate must be between 0 and 1"),
            (self.decline_rate, "decline_rate must be between 0 and 1"),
            (self.error_rate, "error_rate must be between 0 and 1"),
            (self.timeout_rate, "timeout_rate must be between 0 and 1"),
            (
                self.lost_answer_rate,
                "lost_answer_rate must be between 0 and 1",
            ),
        ];
        for (rate, why) in rates {
            if !(0.0..=1.0).contains(&rate) {
                return Err(why);
            }
        }
        if self.audit_cap == 0 {
            return Err("audit_cap must be at least 1");
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_reads_humantime_and_checks_rates() {
        let c: MockConfig =
            serde_json::from_str(r#"{"latency":"5ms","error_rate":0.5}"#).expect("config");
        assert_eq!(c.latency, Duration::from_millis(5));
        assert_eq!(c.error_rate, 0.5);
        assert!(c.validate().is_ok());
        let bad = MockConfig {
            decline_rate: 1.5,
            ..MockConfig::default()
        };
        assert!(bad.validate().is_err());
        assert!(serde_json::from_str::<MockConfig>(r#"{"latncy":"5ms"}"#).is_err());
    }

    #[test]
    fn every_rate_is_checked() {
        for json in [
            r#"{"slow_rate":-0.1}"#,
            r#"{"timeout_rate":1.01}"#,
            r#"{"lost_answer_rate":2}"#,
            r#"{"error_rate":1.5}"#,
            r#"{"audit_cap":0}"#,
        ] {
            let c: MockConfig = serde_json::from_str(json).expect("parses");
            assert!(c.validate().is_err(), "{json} must be refused");
        }
        let c = MockConfig {
            lost_answer_rate: f64::NAN,
            ..MockConfig::default()
        };
        assert!(c.validate().is_err());
        let c: MockConfig =
            serde_json::from_str(r#"{"down":true,"hang":"2s","slow_latency":"1s"}"#)
                .expect("config");
        assert!(c.down);
        assert_eq!(c.hang, Duration::from_secs(2));
        assert!(c.validate().is_ok());
    }
}
