//! The settler's Prometheus metrics, named once here (see `docs/METRICS.md`): the settle
//! loop's progress, the provider calls and the circuit breakers, process-global
//! ([`metrics`]) and added to a registry by [`register`]. (The mock provider's families
//! are the `mock-provider` crate's.)
//!
//! The families are `Arc`-backed: registering them into several registries (several apps
//! in one test process) shows the same values. Label values come from closed sets: events,
//! statuses, partitions, providers, operations, outcomes, routes.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use sequencer::PartitionLag;
use std::collections::BTreeSet;
use std::sync::LazyLock;
use std::time::Duration;
use storage::OrderStatus;

/// `provider` label of the payment provider.
pub const PAYMENT: &str = "payment";
/// `provider` label of the notification provider.
pub const NOTIFICATION: &str = "notification";

/// What happened to an order, as `flashsale_settler_orders_total{event}` counts it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    /// Newly written to the store by the intake (replays not counted).
    Persisted,
    /// The payment provider decided its charge (succeeded or declined).
    Charged,
    /// Moved to `paid`.
    Paid,
    /// Moved to `payment_failed`.
    PaymentFailed,
    /// Moved to `expired`.
    Expired,
    /// Its stock release was recorded.
    Released,
    /// Its notification was recorded.
    Notified,
    /// A late charge of a void order was refunded.
    Refunded,
    /// Persisted but not handed to the charge stage (circuit open): left for the sweep.
    Deferred,
    /// Its document (receipt or refund note) was written to the archive and recorded.
    Documented,
}

impl Event {
    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Event::Persisted => "persisted",
            Event::Charged => "charged",
            Event::Paid => "paid",
            Event::PaymentFailed => "payment_failed",
            Event::Expired => "expired",
            Event::Released => "released",
            Event::Notified => "notified",
            Event::Refunded => "refunded",
            Event::Deferred => "deferred",
            Event::Documented => "documented",
        }
    }
}

/// Label of [`SettlerMetrics::orders`].
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct EventLabel {
    /// [`Event::as_str`].
    pub event: &'static str,
}

/// Label of [`SettlerMetrics::transitions`].
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TransitionLabel {
    /// The status left.
    pub from: &'static str,
    /// The status entered.
    pub to: &'static str,
}

/// Label of [`SettlerMetrics::queue_depth`].
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct QueueLabel {
    /// The queue (`charge`).
    pub queue: &'static str,
}

/// Label of [`SettlerMetrics::outbox_backlog`].
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabel {
    /// `events` or `notifications`.
    pub kind: &'static str,
}

/// Label of [`SettlerMetrics::lag`].
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PartitionLabel {
    /// The log partition.
    pub partition: u32,
}

/// Label of [`SettlerMetrics::stage_up`] and [`SettlerMetrics::stage_restarts`].
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StageLabel {
    /// `intake`, `charge`, `sweep` or `publisher` ([`crate::settle::Stage`]).
    pub stage: &'static str,
}

/// Label of the breaker families.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ProviderLabel {
    /// [`PAYMENT`] or [`NOTIFICATION`].
    pub provider: &'static str,
}

/// Label of [`SettlerMetrics::provider_call_duration`].
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OpLabel {
    /// [`PAYMENT`] or [`NOTIFICATION`].
    pub provider: &'static str,
    /// `charge`, `lookup`, `refund` or `notify`.
    pub op: &'static str,
}

/// Label of [`SettlerMetrics::provider_calls`].
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CallLabel {
    /// [`PAYMENT`] or [`NOTIFICATION`].
    pub provider: &'static str,
    /// `charge`, `lookup`, `refund` or `notify`.
    pub op: &'static str,
    /// `succeeded`, `declined`, `refused`, `timeout`, `server_error` or `transport`.
    pub outcome: &'static str,
}

type HistogramFamily<L> = Family<L, Histogram, fn() -> Histogram>;

fn provider_buckets() -> Histogram {
    // 500 µs to ~16 s.
    Histogram::new(exponential_buckets(0.000_5, 2.0, 16))
}

/// The queue of [`SettlerMetrics::queue_depth`]: the hand-over to the charge stage.
pub const CHARGE_QUEUE: &str = "charge";
/// [`SettlerMetrics::outbox_backlog`] of status changes not yet published.
pub const EVENTS_BACKLOG: &str = "events";
/// [`SettlerMetrics::outbox_backlog`] of final orders whose buyer is not told yet.
pub const NOTIFICATIONS_BACKLOG: &str = "notifications";

/// Every process-global family of the settler.
#[derive(Debug)]
pub struct SettlerMetrics {
    /// `flashsale_settler_orders_total{event}`.
    pub orders: Family<EventLabel, Counter>,
    /// `flashsale_settler_transitions_total{from,to}`: status moves the store applied.
    pub transitions: Family<TransitionLabel, Counter>,
    /// `flashsale_settler_queue_depth{queue}`: orders waiting in the hand-over queue.
    pub queue_depth: Family<QueueLabel, Gauge>,
    /// `flashsale_settler_charges_in_flight`: orders the charge stage drives now (at most
    /// `charge_concurrency`).
    pub charges_in_flight: Gauge,
    /// `flashsale_settler_outbox_backlog{kind}`: as last read by the publisher (events, at
    /// most `publish_batch`) and the sweep (notifications, at most `sweep_limit`).
    pub outbox_backlog: Family<KindLabel, Gauge>,
    /// `flashsale_settler_dead_letters_total`: records sent to the dead-letter sink.
    pub dead_letters: Counter,
    /// `flashsale_settler_write_batch_changes`: changes per store write batch.
    pub write_batch_changes: Histogram,
    /// `flashsale_order_paid_delay_seconds`: from acceptance to `paid`.
    pub paid_delay: Histogram,
    /// `flashsale_settler_lag_records{partition}`: log end offset minus the checkpoint,
    /// sampled once a second.
    pub lag: Family<PartitionLabel, Gauge>,
    /// `flashsale_provider_calls_total{provider,op,outcome}`: one per HTTP attempt.
    pub provider_calls: Family<CallLabel, Counter>,
    /// `flashsale_provider_call_duration_seconds{provider,op}`: one per HTTP attempt.
    pub provider_call_duration: HistogramFamily<OpLabel>,
    /// `flashsale_breaker_state{provider}`: 0 closed, 1 half-open, 2 open.
    pub breaker_state: Family<ProviderLabel, Gauge>,
    /// `flashsale_breaker_openings_total{provider}`.
    pub breaker_openings: Family<ProviderLabel, Counter>,
    /// `flashsale_settler_stage_up{stage}`: 1 while the stage runs, 0 from its death until
    /// it is restarted (or for good once the settler gave up).
    pub stage_up: Family<StageLabel, Gauge>,
    /// `flashsale_settler_stage_restarts_total{stage}`: restarts of the settle loop, by
    /// the stage whose death caused them.
    pub stage_restarts: Family<StageLabel, Counter>,
}

impl SettlerMetrics {
    fn new() -> Self {
        SettlerMetrics {
            orders: Family::default(),
            transitions: Family::default(),
            queue_depth: Family::default(),
            charges_in_flight: Gauge::default(),
            outbox_backlog: Family::default(),
            dead_letters: Counter::default(),
            // 1 to 4096 changes.
            write_batch_changes: Histogram::new(exponential_buckets(1.0, 2.0, 13)),
            // 5 ms to ~22 min (an outage holds orders up to the payment TTL).
            paid_delay: Histogram::new(exponential_buckets(0.005, 2.0, 19)),
            lag: Family::default(),
            provider_calls: Family::default(),
            provider_call_duration: Family::new_with_constructor(provider_buckets),
            breaker_state: Family::default(),
            breaker_openings: Family::default(),
            stage_up: Family::default(),
            stage_restarts: Family::default(),
        }
    }

    /// Counts `n` orders for `event`.
    pub(crate) fn event(&self, event: Event, n: u64) {
        if n > 0 {
            self.orders
                .get_or_create(&EventLabel {
                    event: event.as_str(),
                })
                .inc_by(n);
        }
    }

    /// Counts `n` orders moved `from -> to`.
    pub(crate) fn transition(&self, from: OrderStatus, to: OrderStatus, n: u64) {
        if n > 0 {
            self.transitions
                .get_or_create(&TransitionLabel {
                    from: from.as_str(),
                    to: to.as_str(),
                })
                .inc_by(n);
        }
    }

    pub(crate) fn set_queue_depth(&self, queue: &'static str, depth: usize) {
        self.queue_depth
            .get_or_create(&QueueLabel { queue })
            .set(i64::try_from(depth).unwrap_or(i64::MAX));
    }

    pub(crate) fn set_backlog(&self, kind: &'static str, n: usize) {
        self.outbox_backlog
            .get_or_create(&KindLabel { kind })
            .set(i64::try_from(n).unwrap_or(i64::MAX));
    }

    /// Sets the lag of every partition in `lag` and drops the series of those in
    /// `reported` (the partitions of the last sample) that are gone (revoked); `reported`
    /// becomes this sample's partitions.
    pub(crate) fn set_lag(&self, reported: &mut BTreeSet<u32>, lag: &[PartitionLag]) {
        let now: BTreeSet<u32> = lag.iter().map(|l| l.partition).collect();
        for gone in reported.difference(&now) {
            self.lag.remove(&PartitionLabel { partition: *gone });
        }
        for l in lag {
            self.lag
                .get_or_create(&PartitionLabel {
                    partition: l.partition,
                })
                .set(i64::try_from(l.records()).unwrap_or(i64::MAX));
        }
        *reported = now;
    }

    /// Records one provider attempt.
    pub(crate) fn provider_call(
        &self,
        provider: &'static str,
        op: &'static str,
        outcome: &'static str,
        elapsed: Duration,
    ) {
        self.provider_calls
            .get_or_create(&CallLabel {
                provider,
                op,
                outcome,
            })
            .inc();
        self.provider_call_duration
            .get_or_create(&OpLabel { provider, op })
            .observe(elapsed.as_secs_f64());
    }

    pub(crate) fn set_breaker_state(&self, provider: &'static str, state: i64) {
        self.breaker_state
            .get_or_create(&ProviderLabel { provider })
            .set(state);
    }

    /// Sets a stage's up gauge; the first call creates its restarts counter at 0, so a
    /// rate over it has data before any restart.
    pub(crate) fn set_stage_up(&self, stage: &'static str, up: bool) {
        let label = StageLabel { stage };
        self.stage_up.get_or_create(&label).set(i64::from(up));
        let _ = self.stage_restarts.get_or_create(&label);
    }

    pub(crate) fn stage_restarted(&self, stage: &'static str) {
        self.stage_restarts
            .get_or_create(&StageLabel { stage })
            .inc();
    }

    pub(crate) fn breaker_opened(&self, provider: &'static str) {
        self.breaker_openings
            .get_or_create(&ProviderLabel { provider })
            .inc();
    }
}

static METRICS: LazyLock<SettlerMetrics> = LazyLock::new(SettlerMetrics::new);

/// The process's settler families.
pub fn metrics() -> &'static SettlerMetrics {
    &METRICS
}

/// Registers every settler family into `registry` (clones sharing the values).
pub fn register(registry: &mut Registry) {
    let m = metrics();
    registry.register(
        "flashsale_settler_orders",
        "Orders by what the settler did to them",
        m.orders.clone(),
    );
    registry.register(
        "flashsale_settler_transitions",
        "Order status moves applied by the settler",
        m.transitions.clone(),
    );
    registry.register(
        "flashsale_settler_queue_depth",
        "Orders waiting in the settler's queues",
        m.queue_depth.clone(),
    );
    registry.register(
        "flashsale_settler_charges_in_flight",
        "Orders the charge stage drives now",
        m.charges_in_flight.clone(),
    );
    registry.register(
        "flashsale_settler_outbox_backlog",
        "Outbox entries waiting (events unpublished, final orders not notified), as last read",
        m.outbox_backlog.clone(),
    );
    registry.register(
        "flashsale_settler_dead_letters",
        "Log records sent to the dead-letter sink",
        m.dead_letters.clone(),
    );
    registry.register(
        "flashsale_settler_write_batch_changes",
        "Order changes per store write batch",
        m.write_batch_changes.clone(),
    );
    registry.register(
        "flashsale_order_paid_delay_seconds",
        "Time from an order's acceptance to paid",
        m.paid_delay.clone(),
    );
    registry.register(
        "flashsale_settler_lag_records",
        "Log end offset minus the settler's checkpoint, per partition",
        m.lag.clone(),
    );
    registry.register(
        "flashsale_provider_calls",
        "Provider HTTP attempts by outcome",
        m.provider_calls.clone(),
    );
    registry.register(
        "flashsale_provider_call_duration_seconds",
        "Duration of one provider HTTP attempt",
        m.provider_call_duration.clone(),
    );
    registry.register(
        "flashsale_breaker_state",
        "Circuit breaker state: 0 closed, 1 half-open, 2 open",
        m.breaker_state.clone(),
    );
    registry.register(
        "flashsale_breaker_openings",
        "Times the circuit breaker opened",
        m.breaker_openings.clone(),
    );
    registry.register(
        "flashsale_settler_stage_up",
        "Whether a stage of the settle loop runs: 1 up, 0 dead (restarting or given up)",
        m.stage_up.clone(),
    );
    registry.register(
        "flashsale_settler_stage_restarts",
        "Restarts of the settle loop, by the stage whose death caused them",
        m.stage_restarts.clone(),
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    fn encode(r: &Registry) -> String {
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, r).expect("encodes");
        text
    }

    #[test]
    fn the_global_families_register_into_several_registries() {
        metrics().event(Event::Deferred, 2);
        metrics().set_breaker_state(NOTIFICATION, 0);
        let (mut a, mut b) = (Registry::default(), Registry::default());
        register(&mut a);
        register(&mut b);
        for text in [encode(&a), encode(&b)] {
            assert!(
                text.contains("flashsale_settler_orders_total{event=\"deferred\"}"),
                "{text}"
            );
            assert!(text.contains("flashsale_breaker_state{provider=\"notification\"} 0"));
            for family in [
                "flashsale_settler_transitions",
                "flashsale_settler_queue_depth",
                "flashsale_settler_charges_in_flight",
                "flashsale_settler_outbox_backlog",
                "flashsale_settler_dead_letters",
                "flashsale_settler_write_batch_changes",
                "flashsale_order_paid_delay_seconds",
                "flashsale_settler_lag_records",
                "flashsale_provider_calls",
                "flashsale_provider_call_duration_seconds",
                "flashsale_breaker_openings",
                "flashsale_settler_stage_up",
                "flashsale_settler_stage_restarts",
            ] {
                assert!(text.contains(&format!("# TYPE {family} ")), "{family}");
            }
        }
    }

    #[test]
    fn lag_series_of_partitions_no_longer_read_are_dropped() {
        let m = metrics();
        let mut reported = BTreeSet::new();
        let lag = |partition, end_offset, committed| PartitionLag {
            partition,
            end_offset,
            committed,
        };
        m.set_lag(&mut reported, &[lag(900, 50, 20), lag(901, 5, 5)]);
        let mut r = Registry::default();
        register(&mut r);
        let text = encode(&r);
        assert!(text.contains("flashsale_settler_lag_records{partition=\"900\"} 30"));
        assert!(text.contains("flashsale_settler_lag_records{partition=\"901\"} 0"));
        m.set_lag(&mut reported, &[lag(901, 9, 5)]);
        let text = encode(&r);
        assert!(!text.contains("partition=\"900\""), "{text}");
        assert!(text.contains("flashsale_settler_lag_records{partition=\"901\"} 4"));
    }
}
