//! flashsale storage: the domain model, the [`OrderStore`] trait and its backends.
//!
//! The embedded backend ([`sqlite::SqliteStore`], feature `embedded`) needs no services; the
//! sharded Postgres backend ([`postgres::PgStore`], feature `postgres`) keeps the catalog in
//! one database and the orders in N shard databases ([`shard`] says which). Both are on by
//! default and behave the same behind the trait.

#[cfg(any(feature = "embedded", feature = "postgres"))]
mod batch;
mod error;
pub mod exposition;
pub mod metrics;
pub mod model;
#[cfg(feature = "postgres")]
pub mod postgres;
#[cfg(feature = "scylla")]
pub mod scylla;
pub mod shard;
#[cfg(feature = "embedded")]
pub mod sqlite;

use async_trait::async_trait;
pub use error::{BoxError, Error, ErrorChain, Result};
pub use model::*;

/// Where a consumer of the log has got to: the next offset to read in a partition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Checkpoint {
    /// Name of the consumer (group).
    pub consumer: String,
    /// Log partition.
    pub partition: u32,
    /// Next offset to read.
    pub next_offset: u64,
}

/// The longest charge id the stores keep. The schema itself refuses a longer one: a batch
/// carrying one fails with [`Error::Invalid`] (field `charge_id`) and changes nothing in that
/// database, so retrying it as it is cannot succeed.
pub const MAX_CHARGE_ID: usize = 200;

/// One change to one order, applied by [`OrderStore::apply_batch`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// Moves the order from `from` to `to` if it is in `from` (and the move is legal),
    /// recording `charge_id` when given and a history (outbox) row for `to`.
    Status {
        /// The order.
        id: OrderId,
        /// The status it must be in.
        from: OrderStatus,
        /// The status it moves to.
        to: OrderStatus,
        /// The provider's charge id (set with `paid`).
        charge_id: Option<String>,
    },
    /// Records that admission took back the stock of a failed or expired order (only if
    /// the order is in such a status and not released yet).
    Released(OrderId),
    /// Records that the buyer was notified of the order's final outcome (only once).
    Notified(OrderId),
    /// Records the refund of a late charge: [`RefundState::Owed`] with the charge's id
    /// (only for an order in a status that releases stock, with no refund recorded yet),
    /// then [`RefundState::Refunded`] or [`RefundState::Refused`] (only while owed; a
    /// charge id given with them is ignored).
    Refund {
        /// The order.
        id: OrderId,
        /// The state it moves to.
        state: RefundState,
        /// The late charge's id (with `Owed`).
        charge_id: Option<String>,
    },
    /// Records a charge attempt that failed at the provider: one more failed attempt, and
    /// the order is not to be tried before `retry_after` (only for an order not final).
    Deferred {
        /// The order.
        id: OrderId,
        /// The earliest next attempt.
        retry_after: Timestamp,
    },
    /// Records the object key of a document stored for the order: a receipt (only for a
    /// `paid` order with none recorded) or a refund note (only for an order whose refund
    /// is `refunded`, with none recorded). Keys are at most [`MAX_DOCUMENT_KEY`] bytes.
    Document {
        /// The order.
        id: OrderId,
        /// Which document.
        kind: DocumentKind,
        /// Its object key.
        key: String,
    },
}

/// The longest document key the stores keep (a batch carrying a longer one fails with
/// [`Error::Invalid`], field `document_key`, and changes nothing).
pub const MAX_DOCUMENT_KEY: usize = 512;

impl Change {
    /// The order this change is about.
    pub fn order_id(&self) -> OrderId {
        match self {
            Change::Status { id, .. }
            | Change::Released(id)
            | Change::Notified(id)
            | Change::Refund { id, .. }
            | Change::Deferred { id, .. }
            | Change::Document { id, .. } => *id,
        }
    }
}

/// The sale catalog and the order store.
///
/// Writes are idempotent: persisting an order twice keeps one row; a status change is
/// conditional on the expected current status, so a replayed record or a racing worker
/// changes nothing.
#[async_trait]
pub trait OrderStore: Send + Sync + 'static {
    /// Adds a sale to the catalog; [`Error::SaleExists`] if the id is taken.
    async fn create_sale(&self, sale: &Sale) -> Result<()>;
    /// A sale by id.
    async fn get_sale(&self, id: &SaleId) -> Result<Option<Sale>>;
    /// Every sale in the catalog.
    async fn list_sales(&self) -> Result<Vec<Sale>>;
    /// Adds `units` to a sale's stock and returns the sale after the change; refuses
    /// ([`Error::Invalid`]) a total above [`MAX_STOCK`], changing nothing.
    async fn add_stock(&self, id: &SaleId, units: u32) -> Result<Sale>;

    /// Persists a batch of accepted orders (status `persisted`), skipping ids already held,
    /// and records `checkpoint` (never moving it back). Returns how many were new. The
    /// embedded store commits both in one transaction; the sharded store commits each
    /// shard's orders, then the checkpoint (see the `postgres` module): either way the
    /// checkpoint never passes an order that is not durable, and a replay inserts nothing.
    async fn persist_batch(
        &self,
        orders: &[NewOrder],
        checkpoint: Option<&Checkpoint>,
    ) -> Result<usize>;
    /// The checkpoint stored for a consumer and partition.
    async fn checkpoint(&self, consumer: &str, partition: u32) -> Result<Option<u64>>;

    /// Moves an order from `from` to `to` if it is in `from`; `Ok(false)` if it was not.
    /// Illegal moves are refused with [`Error::IllegalTransition`].
    async fn transition(
        &self,
        id: OrderId,
        from: OrderStatus,
        to: OrderStatus,
        charge_id: Option<&str>,
    ) -> Result<bool>;
    /// Applies a batch of changes: in order, each seeing the changes before it (so one
    /// batch may move an order `persisted -> payment_pending -> paid` and mark it notified),
    /// atomically per database (all of a database's changes commit together, or none).
    /// Returns, per change and in the same order, whether it applied: a change whose
    /// precondition does not hold (another status, already released or notified, unknown
    /// order) or whose move is illegal is skipped, exactly as the single-order calls skip
    /// it; a replayed batch applies nothing. An error means the batch (or, sharded, the
    /// failing databases' part of it) changed nothing; a charge id longer than
    /// [`MAX_CHARGE_ID`] fails it with [`Error::Invalid`].
    ///
    /// The default applies the changes one by one through the single-order calls (not
    /// atomic); backends override it.
    async fn apply_batch(&self, changes: &[Change]) -> Result<Vec<bool>> {
        let mut out = Vec::with_capacity(changes.len());
        for change in changes {
            out.push(match change {
                Change::Status {
                    id,
                    from,
                    to,
                    charge_id,
                } => match self.transition(*id, *from, *to, charge_id.as_deref()).await {
                    Ok(applied) => applied,
                    Err(Error::IllegalTransition(_)) => false,
                    Err(e) => return Err(e),
                },
                Change::Released(id) => self.mark_released(*id).await?,
                Change::Notified(id) => self.mark_notified(*id).await?,
                Change::Refund { .. } | Change::Deferred { .. } | Change::Document { .. } => {
                    return Err(Error::unavailable_msg(
                        "this store records refunds, deferrals and documents only in apply_batch",
                    ))
                }
            });
        }
        Ok(out)
    }

    /// Records that the admission backend took back the stock of a failed or expired order.
    async fn mark_released(&self, id: OrderId) -> Result<bool>;
    /// Records that the buyer was notified of the order's final outcome.
    async fn mark_notified(&self, id: OrderId) -> Result<bool>;

    /// An order with its history.
    async fn get_order(&self, id: OrderId) -> Result<Option<Order>>;
    /// Orders in any of `statuses`, oldest first, at most `limit`.
    async fn orders_in_status(&self, statuses: &[OrderStatus], limit: usize) -> Result<Vec<Order>>;
    /// Orders in any of `statuses` that are due at `now` (no [`Change::Deferred`] recorded,
    /// or its `retry_after` not after `now`), oldest accepted first, at most `limit` (the
    /// sweep's pick-up: an order waiting out a backoff stays waiting across a restart).
    async fn orders_due(
        &self,
        statuses: &[OrderStatus],
        now: Timestamp,
        limit: usize,
    ) -> Result<Vec<Order>>;
    /// Orders whose refund is [`RefundState::Owed`], oldest accepted first, at most
    /// `limit` (the refunds the sweep retries).
    async fn refunds_owed(&self, limit: usize) -> Result<Vec<Order>>;
    /// Final orders whose release (if they release stock) or notification is still owed.
    async fn unfinished_followups(&self, limit: usize) -> Result<Vec<Order>>;
    /// Orders owed a document ([`Order::document_owed`]): `paid` without a receipt key,
    /// refunded without a refund note key; oldest accepted first, at most `limit` (the
    /// receipts stage's work, durable across restarts and object-store outages).
    async fn documents_owed(&self, limit: usize) -> Result<Vec<Order>>;
    /// Every order of a sale (for reconciliation and reports).
    async fn orders_of_sale(&self, sale: &SaleId) -> Result<Vec<Order>>;
    /// Orders and units of a sale by status. The backends keep these totals in every
    /// database, updated in the transaction of each order write, so this reads a few rows
    /// per database whatever the number of orders.
    async fn sale_totals(&self, sale: &SaleId) -> Result<SaleTotals>;
    /// Orders that entered `payment_pending` before `before` and are still in it, oldest
    /// first, at most `limit` (the expiry sweeper's work).
    async fn pending_since(&self, before: Timestamp, limit: usize) -> Result<Vec<Order>>;

    /// Status changes not yet published to `flashsale.order-events.v1`, oldest first, at
    /// most `limit`. This is the outbox: each entry is written in the same transaction as
    /// the status change it records, so a change is never lost between store and topic.
    async fn unpublished_events(&self, limit: usize) -> Result<Vec<OrderEvent>>;
    /// Marks events as published; returns how many were still unpublished.
    async fn mark_published(&self, events: &[(OrderId, OrderStatus)]) -> Result<usize>;

    /// Cheap liveness check of the backend.
    async fn ping(&self) -> Result<()>;
}
