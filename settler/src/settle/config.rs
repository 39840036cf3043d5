//! The settler's settings: the one definition, embedded as `[settler]` in the binary's
//! configuration.

use crate::provider::RetryPolicy;
use serde::{Deserialize, Serialize};
use std::time::Duration;

/// Settings of the settler. Durations are humantime strings (`"50ms"`) in TOML and JSON.
///
/// The provider endpoints (`payment_url`, `notification_url`, `provider_timeout`) are not
/// read from `[settler]`: the binary fills them from `[providers]`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SettlerConfig {
    /// Run the settler inside `serve` (the embedded log always needs it there). The
    /// settler itself ignores it.
    pub enabled: bool,
    /// Worker threads of the settler's own runtime when it runs inside `serve` or `demo`
    /// (default 1): settlement never runs on the threads that answer orders.
    pub threads: usize,
    /// Nice value added to the settler's threads (default 10, 0 to 19): when the order path
    /// and the settler both want the CPU, the order path wins; the settler catches up after
    /// the burst. Ignored where the system refuses it.
    pub nice: u8,
    /// Most records read and persisted in one batch (default 1024).
    pub batch_size: usize,
    /// Longest a poll waits for the first record (default 20 ms).
    #[serde(with = "humantime_serde")]
    pub poll_wait: Duration,
    /// Most orders charged (and released, notified) at once (default 256).
    pub charge_concurrency: usize,
    /// Capacity of the hand-over queue from the intake (and the sweep) to the charge stage
    /// (default 8192). A persisted order that finds it full is left for the sweep.
    pub charge_queue: usize,
    /// Most status changes written to the store in one batch (default 1024); changes
    /// queued while a batch is written go together into the next one.
    pub write_batch: usize,
    /// Most claims or stock releases sent to admission in one call (default 512).
    pub admission_batch: usize,
    /// Name under which the log checkpoint is stored (the consumer group).
    pub consumer: String,
    /// Base URL of the payment provider (from `[providers]`).
    #[serde(skip)]
    pub payment_url: String,
    /// Base URL of the notification provider (from `[providers]`).
    #[serde(skip)]
    pub notification_url: String,
    /// Timeout of one provider request (from `[providers]`, default 2 s).
    #[serde(skip)]
    pub provider_timeout: Duration,
    /// Attempts per provider call, the first included, before the order is left for the
    /// next sweep (default 4).
    pub retry_max_attempts: usize,
    /// Delay before the first retry of a provider call; it doubles per retry, with jitter
    /// (default 50 ms).
    #[serde(with = "humantime_serde")]
    pub retry_min_delay: Duration,
    /// Longest delay between two attempts of a provider call (default 2 s).
    #[serde(with = "humantime_serde")]
    pub retry_max_delay: Duration,
    /// Consecutive provider calls failing with a timeout, transport error or 5xx (each
    /// after its retries) that open the circuit (default 5).
    pub circuit_failure_threshold: u32,
    /// How long an open circuit refuses calls before one probe is let through
    /// (default 5 s).
    #[serde(with = "humantime_serde")]
    pub circuit_cool_down: Duration,
    /// Longest an order whose charge failed waits before the sweep tries it again; the
    /// wait starts at `sweep_interval` and doubles per failure, with jitter (default 1 min).
    #[serde(with = "humantime_serde")]
    pub order_retry_max: Duration,
    /// How long an order may stay `payment_pending` before it expires (default 15 min).
    #[serde(with = "humantime_serde")]
    pub payment_ttl: Duration,
    /// How often unfinished orders are looked for (default 1 s).
    #[serde(with = "humantime_serde")]
    pub sweep_interval: Duration,
    /// Most orders of each kind one sweep picks up (default 1000).
    pub sweep_limit: usize,
    /// How often the outbox of status changes is drained when no change wakes the
    /// publisher (default 1 s); also the wait after a failed publish.
    #[serde(with = "humantime_serde")]
    pub publish_interval: Duration,
    /// Most events handed to the event sink at once (default 1000).
    pub publish_batch: usize,
    /// How often orders owed a document (receipt, refund note) are looked for when no
    /// status change wakes the receipts stage (default 200 ms). While the archive fails,
    /// the wait doubles up to 5 s. Only with a `[receipts]` archive.
    #[serde(with = "humantime_serde")]
    pub receipts_interval: Duration,
    /// Most orders documented in one pass, their keys recorded in one store write
    /// (default 256).
    pub receipts_batch: usize,
    /// How long orders under way may take to finish after shutdown is asked for; then they
    /// are abandoned (the next start's sweep finishes them). Default 5 s.
    #[serde(with = "humantime_serde")]
    pub shutdown_grace: Duration,
}

impl Default for SettlerConfig {
    fn default() -> Self {
        SettlerConfig {
            enabled: true,
            threads: 1,
            nice: 10,
            batch_size: 1024,
            poll_wait: Duration::from_millis(20),
            charge_concurrency: 256,
            charge_queue: 8192,
            write_batch: 1024,
            admission_batch: 512,
            consumer: "settler".into(),
            payment_url: "http://127.0.0.1:8090".into(),
            notification_url: "http://127.0.0.1:8090".into(),
            provider_timeout: Duration::from_secs(2),
            retry_max_attempts: 4,
            retry_min_delay: Duration::from_millis(50),
            retry_max_delay: Duration::from_secs(2),
            circuit_failure_threshold: 5,
            circuit_cool_down: Duration::from_secs(5),
            order_retry_max: Duration::from_secs(60),
            payment_ttl: Duration::from_secs(15 * 60),
            sweep_interval: Duration::from_secs(1),
            sweep_limit: 1000,
            publish_interval: Duration::from_secs(1),
            publish_batch: 1000,
            receipts_interval: Duration::from_millis(200),
            receipts_batch: 256,
            shutdown_grace: Duration::from_secs(5),
        }
    }
}

impl SettlerConfig {
    pub(crate) fn retry(&self) -> RetryPolicy {
        RetryPolicy {
            max_attempts: self.retry_max_attempts.max(1),
            min_delay: self.retry_min_delay,
            max_delay: self.retry_max_delay,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_reads_humantime_and_refuses_unknown_keys() {
        let c: SettlerConfig = serde_json::from_str(
            r#"{"poll_wait":"10ms","sweep_interval":"250ms","charge_concurrency":8}"#,
        )
        .expect("config");
        assert_eq!(c.poll_wait, Duration::from_millis(10));
        assert_eq!(c.sweep_interval, Duration::from_millis(250));
        assert_eq!(c.charge_concurrency, 8);
        assert_eq!(c.batch_size, 1024);
        assert_eq!(c.payment_ttl, Duration::from_secs(900));
        assert!(serde_json::from_str::<SettlerConfig>(r#"{"batch":1}"#).is_err());
        // Provider endpoints come from [providers], never from [settler].
        assert!(serde_json::from_str::<SettlerConfig>(r#"{"payment_url":"http://x"}"#).is_err());
        let c: SettlerConfig = serde_json::from_str(
            r#"{"payment_ttl":"10m","circuit_cool_down":"2s","circuit_failure_threshold":3}"#,
        )
        .expect("config");
        assert_eq!(c.payment_ttl, Duration::from_secs(600));
        assert_eq!(c.circuit_cool_down, Duration::from_secs(2));
        assert_eq!(c.circuit_failure_threshold, 3);
        assert_eq!(c.receipts_interval, Duration::from_millis(200));
        assert_eq!(c.receipts_batch, 256);
        let c: SettlerConfig =
            serde_json::from_str(r#"{"receipts_interval":"1s","receipts_batch":8}"#)
                .expect("config");
        assert_eq!(c.receipts_interval, Duration::from_secs(1));
        assert_eq!(c.receipts_batch, 8);
    }
}
