//! Ingest's Prometheus metrics, named once here.

use parking_lot::Mutex;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

/// Name of the order-outcome counter.
pub const ORDERS_TOTAL: &str = "flashsale_orders";
/// Name of the order-latency histogram.
pub const ORDER_LATENCY: &str = "flashsale_order_latency_seconds";
/// Name of the HTTP response counter.
pub const HTTP_RESPONSES: &str = "flashsale_http_responses";
/// Name of the open-connection gauge.
pub const OPEN_CONNECTIONS: &str = "flashsale_open_connections";

/// Label of an order outcome: `accepted`, `replayed` or a rejection code.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabel {
    /// The outcome.
    pub outcome: &'static str,
}

/// Label of an HTTP response.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResponseLabel {
    /// Route name.
    pub route: &'static str,
    /// Status code.
    pub status: u16,
}

/// Every metric ingest exports.
pub struct Metrics {
    registry: Mutex<Registry>,
    /// Orders by outcome.
    pub orders: Family<OutcomeLabel, Counter>,
    /// Time from request to answer on the order route.
    pub order_latency: Histogram,
    /// Responses by route and status.
    pub responses: Family<ResponseLabel, Counter>,
    /// Connections open now.
    pub open_connections: Gauge,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::default();
        let orders = Family::<OutcomeLabel, Counter>::default();
        let order_latency = Histogram::new(exponential_buckets(0.000_05, 2.0, 18));
        let responses = Family::<ResponseLabel, Counter>::default();
        let open_connections = Gauge::default();
        registry.register(ORDERS_TOTAL, "Order attempts by outcome", orders.clone());
        registry.register(ORDER_LATENCY, "Order route latency", order_latency.clone());
        registry.register(HTTP_RESPONSES, "HTTP responses", responses.clone());
        registry.register(
            OPEN_CONNECTIONS,
            "Open client connections",
            open_connections.clone(),
        );
        Metrics {
            registry: Mutex::new(registry),
            orders,
            order_latency,
            responses,
            open_connections,
        }
    }
}

impl Metrics {
    /// The Prometheus text exposition.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let registry = self.registry.lock();
        if prometheus_client::encoding::text::encode(&mut out, &registry).is_err() {
            out.clear();
        }
        out
    }
}

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
