//! Ingest's Prometheus metrics, named once here, and the rendering of a registry.
//!
//! Three kinds:
//!
//! - The HTTP front end's families ([`Metrics`]): one set per [`Ingest`](crate::api::Ingest)
//!   (two servers in one test process count apart), added to the process's registry by
//!   [`Metrics::register`]. Every answer of the order route is counted by outcome and code
//!   and timed by outcome from handles created once ([`Metrics::record_order_answer`]: no
//!   label lookup or allocation per request).
//! - The admission families (decision time and errors per backend and operation, sold-out
//!   answers given locally): process-global, since the backends are built apart from the
//!   API and the settler holds one of its own; added to a registry by [`register`].
//! - The per-sale gauges ([`SaleGauges`]): a collector that encodes the last snapshot of
//!   the open sales' stats, which a background task refreshes (see
//!   [`Ingest::refresh_sale_gauges`](crate::api::Ingest::refresh_sale_gauges)); a scrape
//!   never reads a backend.
//!
//! [`render`] encodes a registry as OpenMetrics for a client that asks for it (Prometheus
//! does), else as the Prometheus text format 0.0.4, which is what `promtool check metrics`
//! and most tools read (the usual default of Prometheus client libraries).

use crate::api::SaleStats;
use parking_lot::{Mutex, RwLock};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use std::collections::HashMap;
use std::sync::{Arc, LazyLock, OnceLock};
use std::time::{Duration, Instant};

/// Answers of the order route by outcome and code.
pub const ORDER_ANSWERS: &str = "flashsale_order_answers";
/// Time from request to answer on the order route, by outcome.
pub const ORDER_LATENCY: &str = "flashsale_order_latency_seconds";
/// Responses of every route by status.
pub const HTTP_RESPONSES: &str = "flashsale_http_responses";
/// Time from request to answer of every route.
pub const HTTP_DURATION: &str = "flashsale_http_request_duration_seconds";
/// Client connections open now.
pub const OPEN_CONNECTIONS: &str = "flashsale_http_open_connections";
/// Time of one admission call.
pub const ADMISSION_DURATION: &str = "flashsale_admission_duration_seconds";
/// Failed admission calls.
pub const ADMISSION_ERRORS: &str = "flashsale_admission_errors";
/// Entries the embedded admission state holds, by map (the bounded-memory gauge).
pub const ADMISSION_ENTRIES: &str = "flashsale_admission_entries";
/// Sold-out answers given from the instance's flag, without a round trip.
pub const SOLD_OUT_LOCAL: &str = "flashsale_sold_out_local";
/// Per sale: units put on sale.
pub const SALE_STOCK: &str = "flashsale_sale_stock_units";
/// Per sale: units not taken.
pub const SALE_STOCK_LEFT: &str = "flashsale_sale_stock_left_units";
/// Per sale: units accepted.
pub const SALE_ACCEPTED_UNITS: &str = "flashsale_sale_accepted_units";
/// Per sale: orders accepted.
pub const SALE_ACCEPTED_ORDERS: &str = "flashsale_sale_accepted_orders";
/// Per sale and persisted status: orders in the store.
pub const SALE_ORDERS: &str = "flashsale_sale_orders";
/// Per sale: orders whose units went back.
pub const SALE_RELEASED_ORDERS: &str = "flashsale_sale_released_orders";
/// Per sale: units that went back.
pub const SALE_RELEASED_UNITS: &str = "flashsale_sale_released_units";

/// The outcome classes of an order answer (label `outcome`).
pub mod outcome {
    /// 202, a new order.
    pub const ACCEPTED: &str = "accepted";
    /// 202, the stored answer of a retry.
    pub const REPLAYED: &str = "replayed";
    /// A 4xx refusal (validation, auth, the sale's rules, sold out).
    pub const REFUSED: &str = "refused";
    /// A 5xx: a backend was unavailable (nothing taken).
    pub const UNAVAILABLE: &str = "unavailable";
    /// Every class.
    pub const ALL: [&str; 4] = [ACCEPTED, REPLAYED, REFUSED, UNAVAILABLE];
}

/// The outcome class of an order answer with problem `code` (or `accepted`, `replayed`)
/// and HTTP `status`.
pub fn outcome_of(code: &str, status: u16) -> &'static str {
    match code {
        outcome::ACCEPTED => outcome::ACCEPTED,
        outcome::REPLAYED => outcome::REPLAYED,
        _ if status >= 500 => outcome::UNAVAILABLE,
        _ => outcome::REFUSED,
    }
}

/// Labels of an order answer.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct AnswerLabel {
    /// Outcome class.
    pub outcome: &'static str,
    /// Problem code, `accepted` or `replayed`.
    pub code: &'static str,
}

/// Label of an order outcome class.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabel {
    /// Outcome class.
    pub outcome: &'static str,
}

/// Labels of an HTTP response.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResponseLabel {
    /// Route name.
    pub route: &'static str,
    /// Status code.
    pub status: u16,
}

/// Label of a route.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteLabel {
    /// Route name.
    pub route: &'static str,
}

/// Label of the admission entries gauge.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct EntriesLabel {
    /// `buckets`, `units`, `answers`, `released` or `claimed`.
    pub map: &'static str,
}

/// Labels of an admission call.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct AdmissionLabel {
    /// `embedded` or `redis`.
    pub backend: &'static str,
    /// `admit`, `confirm`, `abort`, `claim` or `release`.
    pub op: &'static str,
}

/// A latency histogram: 50 µs to about 6.5 s.
pub fn latency_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.000_05, 2.0, 18))
}

type HistogramFamily<L> = Family<L, Histogram, fn() -> Histogram>;

/// The handles of one order-answer code, created once.
#[derive(Debug)]
struct AnswerHandles {
    count: Counter,
    latency: Histogram,
}

/// The HTTP front end's metrics of one [`Ingest`](crate::api::Ingest).
pub struct Metrics {
    /// Order answers by outcome and code.
    pub order_answers: Family<AnswerLabel, Counter>,
    /// Order route latency by outcome class.
    pub order_latency: HistogramFamily<OutcomeLabel>,
    /// Responses by route and status.
    pub responses: Family<ResponseLabel, Counter>,
    /// Request duration by route.
    pub request_duration: HistogramFamily<RouteLabel>,
    /// Connections open now.
    pub open_connections: Gauge,
    /// Per code (every problem code, `accepted`, `replayed`).
    answers: HashMap<&'static str, AnswerHandles>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        let order_answers = Family::<AnswerLabel, Counter>::default();
        let order_latency: HistogramFamily<OutcomeLabel> =
            Family::new_with_constructor(latency_histogram);
        let codes = [(outcome::ACCEPTED, 202), (outcome::REPLAYED, 202)]
            .into_iter()
            .chain(
                crate::problem::ALL_CODES
                    .iter()
                    .map(|(code, status, _)| (*code, *status)),
            );
        let answers = codes
            .map(|(code, status)| {
                let outcome = outcome_of(code, status);
                let handles = AnswerHandles {
                    count: order_answers
                        .get_or_create(&AnswerLabel { outcome, code })
                        .clone(),
                    latency: order_latency
                        .get_or_create(&OutcomeLabel { outcome })
                        .clone(),
                };
                (code, handles)
            })
            .collect();
        Metrics {
            order_answers,
            order_latency,
            responses: Family::default(),
            request_duration: Family::new_with_constructor(latency_histogram),
            open_connections: Gauge::default(),
            answers,
        }
    }
}

impl Metrics {
    /// Registers these families in `registry`.
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            ORDER_ANSWERS,
            "Every answer of POST /v1/sales/{id}/orders, by outcome class and code",
            self.order_answers.clone(),
        );
        registry.register(
            ORDER_LATENCY,
            "Time from request to answer of POST /v1/sales/{id}/orders, by outcome class",
            self.order_latency.clone(),
        );
        registry.register(
            HTTP_RESPONSES,
            "Responses of every route, by status",
            self.responses.clone(),
        );
        registry.register(
            HTTP_DURATION,
            "Time from request to answer, by route",
            self.request_duration.clone(),
        );
        registry.register(
            OPEN_CONNECTIONS,
            "Client connections open now",
            self.open_connections.clone(),
        );
    }

    /// A registry holding only these families (an API not given the process's registry).
    pub fn registry(&self) -> Registry {
        let mut registry = Registry::default();
        self.register(&mut registry);
        registry
    }

    /// Counts one answer of the order route with `code` (a problem code, `accepted` or
    /// `replayed`) and records how long it took.
    pub fn record_order_answer(&self, code: &'static str, status: u16, elapsed: Duration) {
        let seconds = elapsed.as_secs_f64();
        if let Some(h) = self.answers.get(code) {
            h.count.inc();
            h.latency.observe(seconds);
            return;
        }
        // Not a code of the API (cannot happen: every code is in ALL_CODES).
        let outcome = outcome_of(code, status);
        self.order_answers
            .get_or_create(&AnswerLabel { outcome, code })
            .inc();
        self.order_latency
            .get_or_create(&OutcomeLabel { outcome })
            .observe(seconds);
    }

    /// Counts one response of `route` and records how long it took.
    pub fn record_response(&self, route: &'static str, status: u16, elapsed: Duration) {
        self.responses
            .get_or_create(&ResponseLabel { route, status })
            .inc();
        self.request_duration
            .get_or_create(&RouteLabel { route })
            .observe(elapsed.as_secs_f64());
    }
}

/// An admission backend (label `backend`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// In-process counters.
    Embedded,
    /// Redis Lua scripts.
    Redis,
}

impl Backend {
    const ALL: [Backend; 2] = [Backend::Embedded, Backend::Redis];

    fn as_str(self) -> &'static str {
        match self {
            Backend::Embedded => "embedded",
            Backend::Redis => "redis",
        }
    }
}

/// An admission operation (label `op`); a batch call counts as one call of its operation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AdmissionOp {
    /// One decision.
    Admit,
    /// Marking idempotency answers durable.
    Confirm,
    /// Undoing an acceptance whose record did not reach the log.
    Abort,
    /// The settler taking orders it read.
    Claim,
    /// Giving units back.
    Release,
}

impl AdmissionOp {
    const ALL: [AdmissionOp; 5] = [
        AdmissionOp::Admit,
        AdmissionOp::Confirm,
        AdmissionOp::Abort,
        AdmissionOp::Claim,
        AdmissionOp::Release,
    ];

    fn as_str(self) -> &'static str {
        match self {
            AdmissionOp::Admit => "admit",
            AdmissionOp::Confirm => "confirm",
            AdmissionOp::Abort => "abort",
            AdmissionOp::Claim => "claim",
            AdmissionOp::Release => "release",
        }
    }
}

/// The handles of one (backend, operation).
#[derive(Debug)]
pub(crate) struct OpMetrics {
    duration: Histogram,
    errors: Counter,
}

const ADMISSION_SLOTS: usize = Backend::ALL.len() * AdmissionOp::ALL.len();

struct Globals {
    admission_duration: HistogramFamily<AdmissionLabel>,
    admission_errors: Family<AdmissionLabel, Counter>,
    /// Indexed by `backend * ops + op`; a series exists once its first call was made
    /// (a process on one backend exports that backend's series only).
    ops: [OnceLock<OpMetrics>; ADMISSION_SLOTS],
    sold_out_local: Counter,
    entries: Family<EntriesLabel, Gauge>,
}

static GLOBALS: LazyLock<Globals> = LazyLock::new(|| Globals {
    admission_duration: Family::new_with_constructor(latency_histogram),
    admission_errors: Family::default(),
    ops: std::array::from_fn(|_| OnceLock::new()),
    sold_out_local: Counter::default(),
    entries: Family::default(),
});

/// Registers ingest's process-global families (admission, sold-out answers) in `registry`.
pub fn register(registry: &mut Registry) {
    let g = &*GLOBALS;
    registry.register(
        ADMISSION_DURATION,
        "Time of one admission call (a batch is one call), by backend and operation",
        g.admission_duration.clone(),
    );
    registry.register(
        ADMISSION_ERRORS,
        "Admission calls (in a batch: orders) that failed or passed their deadline, by \
         backend and operation",
        g.admission_errors.clone(),
    );
    registry.register(
        ADMISSION_ENTRIES,
        "Entries the embedded admission state holds over every sale, by map (token buckets, \
         users' units, idempotency answers, released and claimed orders)",
        g.entries.clone(),
    );
    registry.register(
        SOLD_OUT_LOCAL,
        "Sold-out answers given from the instance's sold-out flag, without a round trip",
        g.sold_out_local.clone(),
    );
}

/// Sets the embedded admission entries gauge.
pub(crate) fn set_entries(e: &crate::model::Entries) {
    let g = &GLOBALS.entries;
    for (map, n) in [
        ("buckets", e.buckets),
        ("units", e.units),
        ("answers", e.answers),
        ("released", e.released),
        ("claimed", e.claimed),
    ] {
        g.get_or_create(&EntriesLabel { map }).set(n as i64);
    }
}

/// Counts a sold-out answer given locally.
pub(crate) fn sold_out_local() -> &'static Counter {
    &GLOBALS.sold_out_local
}

/// Starts timing one admission call.
pub(crate) fn admission(backend: Backend, op: AdmissionOp) -> OpTimer {
    let g = &*GLOBALS;
    let index = backend as usize * AdmissionOp::ALL.len() + op as usize;
    let metrics = g.ops[index].get_or_init(|| {
        let label = AdmissionLabel {
            backend: backend.as_str(),
            op: op.as_str(),
        };
        OpMetrics {
            duration: g.admission_duration.get_or_create(&label).clone(),
            errors: g.admission_errors.get_or_create(&label).clone(),
        }
    });
    OpTimer {
        metrics,
        started: Instant::now(),
        done: false,
    }
}

/// One admission call under way; dropped unfinished (its caller gave up, a deadline
/// passed), it counts as a failed call.
#[derive(Debug)]
pub(crate) struct OpTimer {
    metrics: &'static OpMetrics,
    started: Instant,
    done: bool,
}

impl OpTimer {
    /// The call returned; `failed` of its orders failed (0 or 1 for a single call).
    pub(crate) fn finish(mut self, failed: u64) {
        self.record(failed);
    }

    /// [`finish`](Self::finish) from a single call's result, passed through.
    pub(crate) fn result<T, E>(self, r: Result<T, E>) -> Result<T, E> {
        self.finish(u64::from(r.is_err()));
        r
    }

    fn record(&mut self, failed: u64) {
        self.done = true;
        self.metrics
            .duration
            .observe(self.started.elapsed().as_secs_f64());
        if failed > 0 {
            self.metrics.errors.inc_by(failed);
        }
    }
}

impl Drop for OpTimer {
    fn drop(&mut self) {
        if !self.done {
            self.record(1);
        }
    }
}

/// The per-sale gauges: a collector over a snapshot of the exported sales' stats, which
/// a background task replaces (see the module documentation). Clones share the snapshot.
#[derive(Debug, Clone, Default)]
pub struct SaleGauges {
    /// Each exported sale's stats, as `GET /v1/sales/{id}/stats` answered at the last
    /// refresh.
    sales: Arc<RwLock<Vec<SaleStats>>>,
    /// When the snapshot was last taken and which sales it covers (kept between
    /// refreshes so the catalog is not listed every time).
    pub(crate) refresh: Arc<Mutex<RefreshState>>,
}

/// Bookkeeping of the refresher.
#[derive(Debug, Default)]
pub(crate) struct RefreshState {
    /// When the sale list was last read from the catalog.
    pub(crate) listed_at: Option<Instant>,
    /// The sales to export (bounded).
    pub(crate) sales: Vec<storage::Sale>,
}

impl SaleGauges {
    /// Replaces the snapshot.
    pub fn set(&self, sales: Vec<SaleStats>) {
        *self.sales.write() = sales;
    }

    /// The stats of every sale in the snapshot.
    pub fn snapshot(&self) -> Vec<SaleStats> {
        self.sales.read().clone()
    }
}

/// The persisted statuses a `flashsale_sale_orders` series is exported for.
const STATUSES: [&str; 5] = [
    "persisted",
    "payment_pending",
    "paid",
    "payment_failed",
    "expired",
];

fn orders_in(stats: &SaleStats, status: &str) -> u64 {
    match status {
        "payment_pending" => stats.payment_pending,
        "paid" => stats.paid,
        "payment_failed" => stats.payment_failed,
        "expired" => stats.expired,
        // `persisted` counts every stored order; in status `persisted` are the others.
        _ => stats.persisted.saturating_sub(
            stats.payment_pending + stats.paid + stats.payment_failed + stats.expired,
        ),
    }
}

fn gauge(v: u64) -> ConstGauge {
    ConstGauge::new(i64::try_from(v).unwrap_or(i64::MAX))
}

impl Collector for SaleGauges {
    fn encode(&self, mut encoder: DescriptorEncoder) -> std::fmt::Result {
        let sales = self.sales.read();
        type Field = fn(&SaleStats) -> i64;
        let simple: [(&str, &str, Field); 6] = [
            (
                SALE_STOCK,
                "Units put on sale (operator additions included)",
                |s| i64::try_from(s.stock).unwrap_or(i64::MAX),
            ),
            (SALE_STOCK_LEFT, "Units not taken", |s| s.stock_left),
            (SALE_ACCEPTED_UNITS, "Units accepted (202)", |s| {
                i64::try_from(s.accepted_units).unwrap_or(i64::MAX)
            }),
            (SALE_ACCEPTED_ORDERS, "Orders accepted (202)", |s| {
                i64::try_from(s.accepted).unwrap_or(i64::MAX)
            }),
            (
                SALE_RELEASED_ORDERS,
                "Orders whose units went back (payment failed, expired)",
                |s| i64::try_from(s.released).unwrap_or(i64::MAX),
            ),
            (SALE_RELEASED_UNITS, "Units that went back", |s| {
                i64::try_from(s.released_units).unwrap_or(i64::MAX)
            }),
        ];
        for (name, help, field) in simple {
            let mut e =
                encoder.encode_descriptor(name, help, None, ConstGauge::new(0i64).metric_type())?;
            for s in sales.iter() {
                let labels = [("sale", s.sale_id.as_str())];
                ConstGauge::new(field(s)).encode(e.encode_family(&labels)?)?;
            }
        }
        let mut e = encoder.encode_descriptor(
            SALE_ORDERS,
            "Orders in the store by status",
            None,
            ConstGauge::new(0i64).metric_type(),
        )?;
        for s in sales.iter() {
            for status in STATUSES {
                let labels = [("sale", s.sale_id.as_str()), ("status", status)];
                gauge(orders_in(s, status)).encode(e.encode_family(&labels)?)?;
            }
        }
        Ok(())
    }
}

pub use storage::exposition::{
    render, to_text_format, wants_openmetrics, OPENMETRICS, TEXT_FORMAT,
};

/// Accepted orders per second over the last ten whole seconds.
#[derive(Debug, Default)]
pub struct RateWindow {
    slots: Mutex<[(i64, u64); 10]>,
}

impl RateWindow {
    /// Counts `n` events at `now_s`.
    pub fn add(&self, now_s: i64, n: u64) {
        let mut slots = self.slots.lock();
        let slot = &mut slots[now_s.rem_euclid(10) as usize];
        if slot.0 != now_s {
            *slot = (now_s, 0);
        }
        slot.1 += n;
    }

    /// Events per second over the ten seconds before `now_s`.
    pub fn per_second(&self, now_s: i64) -> f64 {
        let slots = self.slots.lock();
        let sum: u64 = slots
            .iter()
            .filter(|(s, _)| *s > now_s - 10 && *s <= now_s)
            .map(|(_, n)| n)
            .sum();
        sum as f64 / 10.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text_of(registry: &Registry) -> String {
        render(registry, true).0
    }

    #[test]
    fn every_code_has_a_series_and_its_outcome() {
        let m = Metrics::default();
        m.record_order_answer("accepted", 202, Duration::from_millis(3));
        m.record_order_answer("sold_out", 409, Duration::from_micros(80));
        m.record_order_answer("unavailable", 503, Duration::from_millis(1));
        m.record_order_answer("invalid_token", 401, Duration::from_micros(10));
        let text = text_of(&m.registry());
        for want in [
            "flashsale_order_answers_total{outcome=\"accepted\",code=\"accepted\"} 1",
            "flashsale_order_answers_total{outcome=\"refused\",code=\"sold_out\"} 1",
            "flashsale_order_answers_total{outcome=\"unavailable\",code=\"unavailable\"} 1",
            "flashsale_order_answers_total{outcome=\"refused\",code=\"invalid_token\"} 1",
            "flashsale_order_answers_total{outcome=\"replayed\",code=\"replayed\"} 0",
            "flashsale_order_latency_seconds_count{outcome=\"accepted\"} 1",
            "flashsale_order_latency_seconds_count{outcome=\"refused\"} 2",
        ] {
            assert!(text.contains(want), "{want} missing in:\n{text}");
        }
    }

    #[test]
    fn an_abandoned_admission_call_is_an_error() {
        let mut registry = Registry::default();
        register(&mut registry);
        let errors = || {
            GLOBALS.ops[AdmissionOp::Abort as usize]
                .get()
                .map_or(0, |m| m.errors.get())
        };
        let before = errors();
        admission(Backend::Embedded, AdmissionOp::Abort).finish(0);
        assert_eq!(errors(), before);
        drop(admission(Backend::Embedded, AdmissionOp::Abort));
        assert_eq!(errors(), before + 1);
        let text = text_of(&registry);
        assert!(
            text.contains(
                "flashsale_admission_duration_seconds_count{backend=\"embedded\",op=\"abort\"}"
            ),
            "{text}"
        );
    }

    #[test]
    fn sale_gauges_encode_the_snapshot() {
        let gauges = SaleGauges::default();
        gauges.set(vec![SaleStats {
            sale_id: "drop-1".into(),
            stock: 10,
            stock_left: 3,
            accepted: 6,
            accepted_units: 8,
            persisted: 6,
            paid: 4,
            payment_failed: 1,
            released: 1,
            released_units: 1,
            ..SaleStats::default()
        }]);
        let mut registry = Registry::default();
        registry.register_collector(Box::new(gauges.clone()));
        let text = text_of(&registry);
        for want in [
            "flashsale_sale_stock_units{sale=\"drop-1\"} 10",
            "flashsale_sale_stock_left_units{sale=\"drop-1\"} 3",
            "flashsale_sale_accepted_units{sale=\"drop-1\"} 8",
            "flashsale_sale_accepted_orders{sale=\"drop-1\"} 6",
            "flashsale_sale_orders{sale=\"drop-1\",status=\"paid\"} 4",
            "flashsale_sale_orders{sale=\"drop-1\",status=\"persisted\"} 1",
            "flashsale_sale_orders{sale=\"drop-1\",status=\"expired\"} 0",
            "flashsale_sale_released_orders{sale=\"drop-1\"} 1",
            "flashsale_sale_released_units{sale=\"drop-1\"} 1",
        ] {
            assert!(text.contains(want), "{want} missing in:\n{text}");
        }
        gauges.set(Vec::new());
        assert!(!text_of(&registry).contains("drop-1"));
    }

    #[test]
    fn the_text_format_names_counters_with_their_suffix() {
        let m = Metrics::default();
        let (text, content_type) = render(&m.registry(), false);
        assert_eq!(content_type, TEXT_FORMAT);
        assert!(text.contains("# TYPE flashsale_order_answers_total counter\n"));
        assert!(text.contains("# HELP flashsale_order_answers_total Every answer"));
        assert!(text.contains("# TYPE flashsale_order_latency_seconds histogram\n"));
        assert!(!text.contains("# EOF"));
        let (om, content_type) = render(&m.registry(), true);
        assert_eq!(content_type, OPENMETRICS);
        assert!(om.contains("# TYPE flashsale_order_answers counter\n"));
        assert!(om.ends_with("# EOF\n"));
        assert!(wants_openmetrics(Some(
            "application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5"
        )));
        assert!(!wants_openmetrics(Some("text/plain; version=0.0.4")));
        assert!(!wants_openmetrics(None));
        assert!(!wants_openmetrics(Some("*/*")));
    }
}
