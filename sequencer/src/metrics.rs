//! The order log's Prometheus metrics, named once here (see `docs/METRICS.md`).
//!
//! The families are process-global ([`metrics`]): every log of the process records into
//! them, and [`register`] adds them to a registry. They are `Arc`-backed, so registering
//! them into several registries (several apps in one test process) shows the same values.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use std::sync::LazyLock;
use std::time::Duration;

/// `flashsale_log_append_duration_seconds` (histogram, `log`).
pub const APPEND_DURATION: &str = "flashsale_log_append_duration_seconds";
/// `flashsale_log_append_errors_total` (counter, `log`).
pub const APPEND_ERRORS: &str = "flashsale_log_append_errors";
/// `flashsale_log_group_commit_records` (histogram, embedded log).
pub const GROUP_COMMIT_RECORDS: &str = "flashsale_log_group_commit_records";
/// `flashsale_log_fsync_duration_seconds` (histogram, embedded log).
pub const FSYNC_DURATION: &str = "flashsale_log_fsync_duration_seconds";
/// `flashsale_kafka_producer_queue_messages` (gauge).
pub const KAFKA_QUEUE_MESSAGES: &str = "flashsale_kafka_producer_queue_messages";
/// `flashsale_kafka_producer_retries_total` (counter).
pub const KAFKA_RETRIES: &str = "flashsale_kafka_producer_retries";

/// `flashsale_kafka_consumer_commits_total` (counter, `outcome`).
pub const KAFKA_COMMITS: &str = "flashsale_kafka_consumer_commits";
/// `flashsale_kafka_producer_recreated_total` (counter).
pub const KAFKA_PRODUCER_RECREATED: &str = "flashsale_kafka_producer_recreated";

/// `outcome` of a commit the broker confirmed.
pub const COMMIT_OK: &str = "ok";
/// `outcome` of a commit that failed (whole or for some partitions).
pub const COMMIT_FAILED: &str = "failed";

/// `log` label value of the embedded file log.
pub const EMBEDDED: &str = "embedded";
/// `log` label value of the Kafka log.
pub const KAFKA: &str = "kafka";

/// Which log: [`EMBEDDED`] or [`KAFKA`].
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct LogLabel {
    /// The backend.
    pub log: &'static str,
}

/// Outcome of a consumer commit: [`COMMIT_OK`] or [`COMMIT_FAILED`].
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabel {
    /// The outcome.
    pub outcome: &'static str,
}

type HistogramFamily<L> = Family<L, Histogram, fn() -> Histogram>;

fn append_buckets() -> Histogram {
    // 50 µs to ~6.5 s: a group commit on a fast disk to a delivery timeout.
    Histogram::new(exponential_buckets(0.000_05, 2.0, 18))
}

/// Every family of the order log.
#[derive(Debug)]
pub struct LogMetrics {
    /// Time from an append call to its durable answer, errors included.
    pub append_duration: HistogramFamily<LogLabel>,
    /// Appends that failed (nothing acknowledged).
    pub append_errors: Family<LogLabel, Counter>,
    /// Records written with one flush of the embedded log.
    pub group_commit_records: Histogram,
    /// One group commit's `fdatasync` (embedded log, `fsync = true`).
    pub fsync_duration: Histogram,
    /// Messages in the Kafka producers' queues (librdkafka `msg_cnt`, summed over the
    /// process's producers, sampled every second).
    pub kafka_queue_messages: Gauge,
    /// Request retries of the Kafka producers (librdkafka `txretries` over every broker).
    pub kafka_retries: Counter,
    /// Offset commits of the Kafka consumers, by the outcome the broker reported.
    pub kafka_commits: Family<OutcomeLabel, Counter>,
    /// Kafka producers replaced (refused by the broker, or a broker connection failed
    /// after they had delivered records).
    pub kafka_producer_recreated: Counter,
}

impl LogMetrics {
    fn new() -> Self {
        LogMetrics {
            append_duration: Family::new_with_constructor(append_buckets),
            append_errors: Family::default(),
            // 1 to 8192 records.
            group_commit_records: Histogram::new(exponential_buckets(1.0, 2.0, 14)),
            // 20 µs to ~1.3 s.
            fsync_duration: Histogram::new(exponential_buckets(0.000_02, 2.0, 17)),
            kafka_queue_messages: Gauge::default(),
            kafka_retries: Counter::default(),
            kafka_commits: Family::default(),
            kafka_producer_recreated: Counter::default(),
        }
    }

    /// Creates both commit series at 0 (a consumer exists: a rate has data before the
    /// first failure).
    #[cfg(feature = "kafka")]
    pub(crate) fn kafka_commits_init(&self) {
        for outcome in [COMMIT_OK, COMMIT_FAILED] {
            let _ = self.kafka_commits.get_or_create(&OutcomeLabel { outcome });
        }
    }

    /// Counts one commit outcome.
    #[cfg(feature = "kafka")]
    pub(crate) fn kafka_commit(&self, ok: bool) {
        let outcome = if ok { COMMIT_OK } else { COMMIT_FAILED };
        self.kafka_commits
            .get_or_create(&OutcomeLabel { outcome })
            .inc();
    }

    /// Records one append of `log` that took `elapsed`, failed or not.
    pub(crate) fn append(&self, log: &'static str, elapsed: Duration, ok: bool) {
        let label = LogLabel { log };
        self.append_duration
            .get_or_create(&label)
            .observe(elapsed.as_secs_f64());
        // Created at 0 with the first append, so a rate over it has data before any error.
        let errors = self.append_errors.get_or_create(&label);
        if !ok {
            errors.inc();
        }
    }
}

static METRICS: LazyLock<LogMetrics> = LazyLock::new(LogMetrics::new);

/// The process's order-log families.
pub fn metrics() -> &'static LogMetrics {
    &METRICS
}

/// Registers every family of the order log into `registry` (clones sharing the values).
pub fn register(registry: &mut Registry) {
    let m = metrics();
    registry.register(
        APPEND_DURATION,
        "Order log append latency, from the call to the durable answer",
        m.append_duration.clone(),
    );
    registry.register(
        APPEND_ERRORS,
        "Order log appends that failed",
        m.append_errors.clone(),
    );
    registry.register(
        GROUP_COMMIT_RECORDS,
        "Records per group commit of the embedded log",
        m.group_commit_records.clone(),
    );
    registry.register(
        FSYNC_DURATION,
        "Duration of one group commit's fsync (embedded log)",
        m.fsync_duration.clone(),
    );
    registry.register(
        KAFKA_QUEUE_MESSAGES,
        "Messages in the Kafka producer queues (librdkafka msg_cnt)",
        m.kafka_queue_messages.clone(),
    );
    registry.register(
        KAFKA_RETRIES,
        "Kafka producer request retries (librdkafka txretries)",
        m.kafka_retries.clone(),
    );
    registry.register(
        KAFKA_COMMITS,
        "Kafka consumer offset commits by outcome (as the broker reported them)",
        m.kafka_commits.clone(),
    );
    registry.register(
        KAFKA_PRODUCER_RECREATED,
        "Kafka producers replaced by a new one with a new producer id",
        m.kafka_producer_recreated.clone(),
    );
}

/// The value of one series (`name{labels}` exactly as encoded) in a fresh registry holding
/// this crate's families; 0 when absent.
#[cfg(test)]
pub(crate) fn sample(series: &str) -> f64 {
    let mut registry = Registry::default();
    register(&mut registry);
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &registry).expect("encodes");
    text.lines()
        .find_map(|line| {
            line.strip_prefix(series)
                .and_then(|rest| rest.strip_prefix(' '))
                .and_then(|v| v.trim().parse().ok())
        })
        .unwrap_or(0.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn families_register_into_several_registries_and_share_values() {
        let before = sample("flashsale_log_append_errors_total{log=\"kafka\"}");
        metrics().append(KAFKA, Duration::from_millis(3), false);
        let mut a = Registry::default();
        let mut b = Registry::default();
        register(&mut a);
        register(&mut b);
        let encode = |r: &Registry| {
            let mut text = String::new();
            prometheus_client::encoding::text::encode(&mut text, r).expect("encodes");
            text
        };
        let (ta, tb) = (encode(&a), encode(&b));
        for name in [
            "flashsale_log_append_duration_seconds",
            "flashsale_log_append_errors_total",
            "flashsale_log_group_commit_records",
            "flashsale_log_fsync_duration_seconds",
            "flashsale_kafka_producer_queue_messages",
            "flashsale_kafka_producer_retries_total",
            "flashsale_kafka_consumer_commits_total",
            "flashsale_kafka_producer_recreated_total",
        ] {
            let family = name.trim_end_matches("_total");
            assert!(
                ta.contains(&format!("# TYPE {family} ")),
                "{name} missing:\n{ta}"
            );
        }
        assert!(ta.contains("flashsale_log_append_errors_total{log=\"kafka\"}"));
        assert!(tb.contains("flashsale_log_append_errors_total{log=\"kafka\"}"));
        assert!(sample("flashsale_log_append_errors_total{log=\"kafka\"}") >= before + 1.0);
    }
}
