//! The store's Prometheus metrics, named once here: time per store call and the state of the
//! connection pools.
//!
//! The families are process-global (a store is one of several parts of a process, and
//! every part registers into the process's one registry): [`register`] adds them to a
//! registry, and may be called for several registries (tests start several systems in
//! one process). Calls are timed by [`Metered`], a wrapper around any [`OrderStore`], so
//! every backend is measured the same way in one place. Pools are read when a registry
//! is encoded (a scrape), from every store of the process still open: deadpool's status
//! for Postgres (every database summed), the readers and the writer's queue for SQLite.

use crate::{
    Change, Checkpoint, Error, NewOrder, Order, OrderEvent, OrderId, OrderStatus, OrderStore,
    Result, Sale, SaleId, SaleTotals, Timestamp,
};
use async_trait::async_trait;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use std::future::Future;
use std::sync::{LazyLock, Mutex, OnceLock, PoisonError, Weak};
use std::time::{Duration, Instant};

/// Name of the store-call histogram.
pub const STORE_DURATION: &str = "flashsale_store_duration_seconds";
/// Name of the counter of store calls cut off by their deadline.
pub const STORE_DEADLINE_EXCEEDED: &str = "flashsale_store_deadline_exceeded_total";
/// Name of the pool-connection gauge.
pub const POOL_CONNECTIONS: &str = "flashsale_store_pool_connections";
/// Name of the pool-waiting gauge.
pub const POOL_WAITING: &str = "flashsale_store_pool_waiting";

/// The operation a store call performs: one per [`OrderStore`] method.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Op {
    /// `create_sale`
    CreateSale,
    /// `get_sale`
    GetSale,
    /// `list_sales`
    ListSales,
    /// `add_stock`
    AddStock,
    /// `persist_batch`
    PersistBatch,
    /// `checkpoint`
    Checkpoint,
    /// `transition`
    Transition,
    /// `apply_batch`
    ApplyBatch,
    /// `mark_released`
    MarkReleased,
    /// `mark_notified`
    MarkNotified,
    /// `get_order`
    GetOrder,
    /// `orders_in_status`
    OrdersInStatus,
    /// `orders_due`
    OrdersDue,
    /// `refunds_owed`
    RefundsOwed,
    /// `documents_owed`
    DocumentsOwed,
    /// `unfinished_followups`
    UnfinishedFollowups,
    /// `orders_of_sale`
    OrdersOfSale,
    /// `sale_totals`
    SaleTotals,
    /// `pending_since`
    PendingSince,
    /// `unpublished_events`
    UnpublishedEvents,
    /// `mark_published`
    MarkPublished,
    /// `ping`
    Ping,
}

impl Op {
    /// Every operation, in the order of [`Op::index`].
    pub const ALL: [Op; 22] = [
        Op::CreateSale,
        Op::GetSale,
        Op::ListSales,
        Op::AddStock,
        Op::PersistBatch,
        Op::Checkpoint,
        Op::Transition,
        Op::ApplyBatch,
        Op::MarkReleased,
        Op::MarkNotified,
        Op::GetOrder,
        Op::OrdersInStatus,
        Op::OrdersDue,
        Op::RefundsOwed,
        Op::DocumentsOwed,
        Op::UnfinishedFollowups,
        Op::OrdersOfSale,
        Op::SaleTotals,
        Op::PendingSince,
        Op::UnpublishedEvents,
        Op::MarkPublished,
        Op::Ping,
    ];

    /// The label value: the method's name.
    pub fn as_str(self) -> &'static str {
        match self {
            Op::CreateSale => "create_sale",
            Op::GetSale => "get_sale",
            Op::ListSales => "list_sales",
            Op::AddStock => "add_stock",
            Op::PersistBatch => "persist_batch",
            Op::Checkpoint => "checkpoint",
            Op::Transition => "transition",
            Op::ApplyBatch => "apply_batch",
            Op::MarkReleased => "mark_released",
            Op::MarkNotified => "mark_notified",
            Op::GetOrder => "get_order",
            Op::OrdersInStatus => "orders_in_status",
            Op::OrdersDue => "orders_due",
            Op::RefundsOwed => "refunds_owed",
            Op::DocumentsOwed => "documents_owed",
            Op::UnfinishedFollowups => "unfinished_followups",
            Op::OrdersOfSale => "orders_of_sale",
            Op::SaleTotals => "sale_totals",
            Op::PendingSince => "pending_since",
            Op::UnpublishedEvents => "unpublished_events",
            Op::MarkPublished => "mark_published",
            Op::Ping => "ping",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// Label of a store call.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OpLabel {
    /// The operation.
    pub op: &'static str,
}

fn duration_histogram() -> Histogram {
    // 50 µs to about 6.5 s.
    Histogram::new(exponential_buckets(0.000_05, 2.0, 18))
}

type HistogramFamily<L> = Family<L, Histogram, fn() -> Histogram>;

struct StoreMetrics {
    duration: HistogramFamily<OpLabel>,
    deadline_exceeded: Family<OpLabel, Counter>,
    /// One handle per operation, created at its first call (no label lookup after; an
    /// operation never called has no series).
    by_op: [OnceLock<Histogram>; Op::ALL.len()],
}

static METRICS: LazyLock<StoreMetrics> = LazyLock::new(|| StoreMetrics {
    duration: Family::new_with_constructor(duration_histogram),
    deadline_exceeded: Family::default(),
    by_op: std::array::from_fn(|_| OnceLock::new()),
});

/// How busy a store's connections are right now.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PoolStatus {
    /// Connections handed out.
    pub in_use: u64,
    /// Connections open and free.
    pub idle: u64,
    /// Callers waiting for a connection (SQLite: write commands queued for the writer).
    pub waiting: u64,
}

impl std::ops::AddAssign for PoolStatus {
    fn add_assign(&mut self, other: PoolStatus) {
        self.in_use += other.in_use;
        self.idle += other.idle;
        self.waiting += other.waiting;
    }
}

/// A store whose pool the metrics read at a scrape.
#[cfg_attr(not(any(feature = "embedded", feature = "postgres")), allow(dead_code))]
pub(crate) trait PoolSource: Send + Sync {
    /// The pool's state now (cheap, no I/O).
    fn pool_status(&self) -> PoolStatus;
}

/// Every store opened in this process, while it is open.
static POOLS: LazyLock<Mutex<Vec<Weak<dyn PoolSource>>>> = LazyLock::new(Mutex::default);

/// Adds a store's pool to what the metrics report (a backend calls it once it is open).
#[cfg_attr(not(any(feature = "embedded", feature = "postgres")), allow(dead_code))]
pub(crate) fn watch_pool(source: Weak<dyn PoolSource>) {
    let mut pools = POOLS.lock().unwrap_or_else(PoisonError::into_inner);
    pools.retain(|p| p.strong_count() > 0);
    pools.push(source);
}

/// The pools of every open store of the process, summed.
pub fn pool_status() -> PoolStatus {
    let sources: Vec<_> = POOLS
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .iter()
        .filter_map(Weak::upgrade)
        .collect();
    let mut total = PoolStatus::default();
    for s in &sources {
        total += s.pool_status();
    }
    total
}

/// Encodes the pool gauges from [`pool_status`] at each scrape.
#[derive(Debug)]
struct PoolCollector;

impl Collector for PoolCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> std::fmt::Result {
        let status = pool_status();
        let in_use = ConstGauge::new(status.in_use as i64);
        let mut e = encoder.encode_descriptor(
            POOL_CONNECTIONS,
            "Store connections by state (Postgres: every database's pool; SQLite: the readers)",
            None,
            in_use.metric_type(),
        )?;
        in_use.encode(e.encode_family(&[("state", "in_use")])?)?;
        ConstGauge::new(status.idle as i64).encode(e.encode_family(&[("state", "idle")])?)?;
        let waiting = ConstGauge::new(status.waiting as i64);
        let e = encoder.encode_descriptor(
            POOL_WAITING,
            "Store calls waiting for a connection (SQLite: writes queued for the writer)",
            None,
            waiting.metric_type(),
        )?;
        waiting.encode(e)
    }
}

/// Registers the store's families (the process-global ones) in `registry`.
pub fn register(registry: &mut Registry) {
    registry.register(
        STORE_DURATION,
        "Time of one store call, by operation",
        METRICS.duration.clone(),
    );
    registry.register(
        STORE_DEADLINE_EXCEEDED.trim_end_matches("_total"),
        "Store calls failed because they did not finish within store.call_timeout, by operation",
        METRICS.deadline_exceeded.clone(),
    );
    registry.register_collector(Box::new(PoolCollector));
}

/// Times one call of `op` from now until it is dropped (a cancelled call counts too).
struct Timer {
    histogram: &'static Histogram,
    started: Instant,
}

impl Timer {
    fn start(op: Op) -> Timer {
        let m = &*METRICS;
        let histogram = m.by_op[op.index()].get_or_init(|| {
            m.duration
                .get_or_create(&OpLabel { op: op.as_str() })
                .clone()
        });
        Timer {
            histogram,
            started: Instant::now(),
        }
    }
}

impl Drop for Timer {
    fn drop(&mut self) {
        self.histogram.observe(self.started.elapsed().as_secs_f64());
    }
}

/// An [`OrderStore`] whose every call is timed in `flashsale_store_duration_seconds{op}`
/// and bounded by a deadline: a call that has not returned by then fails with
/// [`Error::Unavailable`] and counts in `flashsale_store_deadline_exceeded_total{op}`.
///
/// The deadline is what stops a backend that hangs (a Postgres server stopped, not gone: its
/// connections stay open and TCP never gives up) from holding a caller forever. A write cut
/// off by it may still commit: every write of the store is idempotent or conditional, so
/// the caller's retry (the settler's sweep, the ingest's next request) is safe.
#[derive(Debug)]
pub struct Metered<S> {
    inner: S,
    deadline: Duration,
}

impl<S: OrderStore> Metered<S> {
    /// Wraps `inner`, each call bounded by `deadline`.
    pub fn new(inner: S, deadline: Duration) -> Self {
        Metered { inner, deadline }
    }

    /// Runs one call of `op`: timed, and failed once `deadline` is over.
    async fn call<T>(&self, op: Op, call: impl Future<Output = Result<T>>) -> Result<T> {
        let _t = Timer::start(op);
        match tokio::time::timeout(self.deadline, call).await {
            Ok(result) => result,
            Err(_) => {
                METRICS
                    .deadline_exceeded
                    .get_or_create(&OpLabel { op: op.as_str() })
                    .inc();
                Err(Error::unavailable_msg(format!(
                    "store call {} did not finish within its deadline of {:?} \
                     (store.call_timeout)",
                    op.as_str(),
                    self.deadline
                )))
            }
        }
    }

    /// The wrapped store.
    pub fn inner(&self) -> &S {
        &self.inner
    }
}

#[async_trait]
impl<S: OrderStore> OrderStore for Metered<S> {
    async fn create_sale(&self, sale: &Sale) -> Result<()> {
        self.call(Op::CreateSale, self.inner.create_sale(sale))
            .await
    }

    async fn get_sale(&self, id: &SaleId) -> Result<Option<Sale>> {
        self.call(Op::GetSale, self.inner.get_sale(id)).await
    }

    async fn list_sales(&self) -> Result<Vec<Sale>> {
        self.call(Op::ListSales, self.inner.list_sales()).await
    }

    async fn add_stock(&self, id: &SaleId, units: u32) -> Result<Sale> {
        self.call(Op::AddStock, self.inner.add_stock(id, units))
            .await
    }

    async fn persist_batch(
        &self,
        orders: &[NewOrder],
        checkpoint: Option<&Checkpoint>,
    ) -> Result<usize> {
        self.call(
            Op::PersistBatch,
            self.inner.persist_batch(orders, checkpoint),
        )
        .await
    }

    async fn checkpoint(&self, consumer: &str, partition: u32) -> Result<Option<u64>> {
        self.call(Op::Checkpoint, self.inner.checkpoint(consumer, partition))
            .await
    }

    async fn transition(
        &self,
        id: OrderId,
        from: OrderStatus,
        to: OrderStatus,
        charge_id: Option<&str>,
    ) -> Result<bool> {
        self.call(
            Op::Transition,
            self.inner.transition(id, from, to, charge_id),
        )
        .await
    }

    async fn apply_batch(&self, changes: &[Change]) -> Result<Vec<bool>> {
        self.call(Op::ApplyBatch, self.inner.apply_batch(changes))
            .await
    }

    async fn mark_released(&self, id: OrderId) -> Result<bool> {
        self.call(Op::MarkReleased, self.inner.mark_released(id))
            .await
    }

    async fn mark_notified(&self, id: OrderId) -> Result<bool> {
        self.call(Op::MarkNotified, self.inner.mark_notified(id))
            .await
    }

    async fn get_order(&self, id: OrderId) -> Result<Option<Order>> {
        self.call(Op::GetOrder, self.inner.get_order(id)).await
    }

    async fn orders_in_status(&self, statuses: &[OrderStatus], limit: usize) -> Result<Vec<Order>> {
        self.call(
            Op::OrdersInStatus,
            self.inner.orders_in_status(statuses, limit),
        )
        .await
    }

    async fn orders_due(
        &self,
        statuses: &[OrderStatus],
        now: Timestamp,
        limit: usize,
    ) -> Result<Vec<Order>> {
        self.call(Op::OrdersDue, self.inner.orders_due(statuses, now, limit))
            .await
    }

    async fn refunds_owed(&self, limit: usize) -> Result<Vec<Order>> {
        self.call(Op::RefundsOwed, self.inner.refunds_owed(limit))
            .await
    }

    async fn documents_owed(&self, limit: usize) -> Result<Vec<Order>> {
        self.call(Op::DocumentsOwed, self.inner.documents_owed(limit))
            .await
    }

    async fn unfinished_followups(&self, limit: usize) -> Result<Vec<Order>> {
        self.call(
            Op::UnfinishedFollowups,
            self.inner.unfinished_followups(limit),
        )
        .await
    }

    async fn orders_of_sale(&self, sale: &SaleId) -> Result<Vec<Order>> {
        self.call(Op::OrdersOfSale, self.inner.orders_of_sale(sale))
            .await
    }

    async fn sale_totals(&self, sale: &SaleId) -> Result<SaleTotals> {
        self.call(Op::SaleTotals, self.inner.sale_totals(sale))
            .await
    }

    async fn pending_since(&self, before: Timestamp, limit: usize) -> Result<Vec<Order>> {
        self.call(Op::PendingSince, self.inner.pending_since(before, limit))
            .await
    }

    async fn unpublished_events(&self, limit: usize) -> Result<Vec<OrderEvent>> {
        self.call(Op::UnpublishedEvents, self.inner.unpublished_events(limit))
            .await
    }

    async fn mark_published(&self, events: &[(OrderId, OrderStatus)]) -> Result<usize> {
        self.call(Op::MarkPublished, self.inner.mark_published(events))
            .await
    }

    async fn ping(&self) -> Result<()> {
        self.call(Op::Ping, self.inner.ping()).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_op_has_its_own_handle() {
        for (i, op) in Op::ALL.iter().enumerate() {
            assert_eq!(op.index(), i, "{op:?}");
        }
        let mut names: Vec<_> = Op::ALL.iter().map(|o| o.as_str()).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), Op::ALL.len());
    }

    #[test]
    fn registered_families_encode() {
        let mut registry = Registry::default();
        register(&mut registry);
        drop(Timer::start(Op::Ping));
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).expect("encode");
        assert!(
            text.contains("flashsale_store_duration_seconds_count{op=\"ping\"}"),
            "{text}"
        );
        assert!(
            text.contains("flashsale_store_pool_connections{state=\"in_use\"}"),
            "{text}"
        );
        assert!(text.contains("flashsale_store_pool_waiting "), "{text}");
    }
}
