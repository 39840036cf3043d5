//! The sharded order store on Postgres: tokio-postgres with one deadpool pool per database,
//! schema by refinery (`migrations/postgres/`).
//!
//! This module holds [`PgStore`] and its [`OrderStore`] impl, which hands each call to the
//! part that owns it: `schema` (embedded migrations, `migrate`, the checks at connect),
//! `pools` (a pool per database, which shard an order is on, the query helpers), `catalog`
//! (sales), `writes` (persisting, changes, checkpoints, published marks) and `reads` (one
//! order, listings, sweeps, outbox, totals).
//!
//! # Layout
//!
//! - The **catalog** database holds `sales` and `consumer_offsets`.
//! - `N` **shard** databases hold `orders` and `order_history`; an order and its history live
//!   on shard [`crate::shard::shard_of`]`(order_id, N)`, shard `i` being the `i`-th URL.
//!
//! Calls about one order (`get_order`, `transition`, `mark_*`) go to its shard; listings and
//! totals ask every shard at once and merge (sorted as the embedded store sorts, the limit
//! applied after the merge). Instants are BIGINT milliseconds, as in the embedded store.
//!
//! # Persisting a batch: exactly-once in effect
//!
//! [`OrderStore::persist_batch`] writes each shard's orders in one transaction per shard
//! (`INSERT ... ON CONFLICT (order_id) DO NOTHING RETURNING order_id`, then the history rows
//! of the ids that were new) and, once every shard committed, the checkpoint in the catalog
//! (`GREATEST` of the stored and the new offset). Unlike the embedded store, the checkpoint
//! is *not* in the orders' transaction: a transaction cannot span databases. It is still
//! exactly-once in effect: every write is idempotent, so after a crash (or a failed shard)
//! between the shard commits and the checkpoint, the consumer reads the same records again
//! from the old checkpoint and the replay inserts nothing that is already held, while the
//! checkpoint never moves past a record whose order is not committed. If any shard fails
//! the call returns [`Error::Unavailable`] and the caller retries the whole batch.
//!
//! # Applying a batch of changes
//!
//! [`OrderStore::apply_batch`] groups the changes by shard and runs the shards at once, one
//! transaction each: `SELECT ... WHERE order_id = ANY($1) ORDER BY order_id FOR UPDATE` (the
//! rows are locked in id order, so two batches cannot deadlock on each other), the plan
//! ([`crate::batch::plan`]), then one `UPDATE orders ... FROM UNNEST(...)` carrying each changed
//! order's final values and one `INSERT INTO order_history ... SELECT * FROM UNNEST(...)`,
//! and the commit. A shard that fails changes nothing and the call returns its error; the
//! other shards' parts are committed (and a replay of the batch applies nothing there).
//!
//! # Sale totals
//!
//! Each shard keeps `sale_totals` (orders, units and releases per sale and status of its
//! orders), written in the transaction of every order write, rows in sorted order (see
//! `batch.rs`); [`OrderStore::sale_totals`] sums the shards' rows.
//!
//! # Failures
//!
//! Connecting is bounded by [`CONNECT_TIMEOUT`] and waiting for, creating or recycling a pooled
//! connection by [`POOL_TIMEOUT`], so a stopped database makes calls fail with
//! [`Error::Unavailable`] (naming the shard) within seconds instead of hanging; the pools
//! reconnect by themselves once it is back.

mod catalog;
mod pools;
mod reads;
mod schema;
mod writes;

pub use pools::{CONNECT_TIMEOUT, POOL_TIMEOUT};

use crate::metrics::{PoolSource, PoolStatus};
use crate::{
    model::*, Change, Checkpoint, Error, Order, OrderStore, Result, Sale, SaleId, SaleTotals,
};
use async_trait::async_trait;
use deadpool_postgres::Pool;
use std::sync::Arc;

/// Sharded-Postgres-backed [`OrderStore`]. Cheap to clone (the pools are shared).
#[derive(Clone)]
pub struct PgStore {
    inner: Arc<Inner>,
}

struct Inner {
    catalog: Pool,
    shards: Vec<Pool>,
}

/// Every database's pool, summed.
impl PoolSource for Inner {
    fn pool_status(&self) -> PoolStatus {
        let mut total = PoolStatus::default();
        for pool in std::iter::once(&self.catalog).chain(&self.shards) {
            let s = pool.status();
            total += PoolStatus {
                in_use: s.size.saturating_sub(s.available) as u64,
                idle: s.available as u64,
                waiting: s.waiting as u64,
            };
        }
        total
    }
}

impl std::fmt::Debug for PgStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgStore")
            .field("shards", &self.inner.shards.len())
            .finish()
    }
}

/// Stored data that does not decode.
fn corrupt(e: impl std::fmt::Display) -> Error {
    Error::Corrupt(e.to_string())
}

#[async_trait]
impl OrderStore for PgStore {
    async fn create_sale(&self, sale: &Sale) -> Result<()> {
        catalog::create_sale(self, sale).await
    }

    async fn get_sale(&self, id: &SaleId) -> Result<Option<Sale>> {
        catalog::get_sale(self, id).await
    }

    async fn list_sales(&self) -> Result<Vec<Sale>> {
        catalog::list_sales(self).await
    }

    async fn add_stock(&self, id: &SaleId, units: u32) -> Result<Sale> {
        catalog::add_stock(self, id, units).await
    }

    async fn persist_batch(
        &self,
        orders: &[NewOrder],
        checkpoint: Option<&Checkpoint>,
    ) -> Result<usize> {
        writes::persist_batch(self, orders, checkpoint).await
    }

    async fn checkpoint(&self, consumer: &str, partition: u32) -> Result<Option<u64>> {
        writes::checkpoint(self, consumer, partition).await
    }

    async fn transition(
        &self,
        id: OrderId,
        from: OrderStatus,
        to: OrderStatus,
        charge_id: Option<&str>,
    ) -> Result<bool> {
        writes::transition(self, id, from, to, charge_id).await
    }

    async fn apply_batch(&self, changes: &[Change]) -> Result<Vec<bool>> {
        writes::apply_batch(self, changes).await
    }

    async fn mark_released(&self, id: OrderId) -> Result<bool> {
        writes::apply_one(self, Change::Released(id)).await
    }

    async fn mark_notified(&self, id: OrderId) -> Result<bool> {
        writes::apply_one(self, Change::Notified(id)).await
    }

    async fn get_order(&self, id: OrderId) -> Result<Option<Order>> {
        reads::get_order(self, id).await
    }

    async fn orders_in_status(&self, statuses: &[OrderStatus], limit: usize) -> Result<Vec<Order>> {
        reads::orders_in_status(self, statuses, limit).await
    }

    async fn orders_due(
        &self,
        statuses: &[OrderStatus],
        now: Timestamp,
        limit: usize,
    ) -> Result<Vec<Order>> {
        reads::orders_due(self, statuses, now, limit).await
    }

    async fn documents_owed(&self, limit: usize) -> Result<Vec<Order>> {
        reads::documents_owed(self, limit).await
    }

    async fn refunds_owed(&self, limit: usize) -> Result<Vec<Order>> {
        reads::refunds_owed(self, limit).await
    }

    async fn unfinished_followups(&self, limit: usize) -> Result<Vec<Order>> {
        reads::unfinished_followups(self, limit).await
    }

    async fn orders_of_sale(&self, sale: &SaleId) -> Result<Vec<Order>> {
        reads::orders_of_sale(self, sale).await
    }

    async fn sale_totals(&self, sale: &SaleId) -> Result<SaleTotals> {
        reads::sale_totals(self, sale).await
    }

    async fn pending_since(&self, before: Timestamp, limit: usize) -> Result<Vec<Order>> {
        reads::pending_since(self, before, limit).await
    }

    async fn unpublished_events(&self, limit: usize) -> Result<Vec<OrderEvent>> {
        reads::unpublished_events(self, limit).await
    }

    async fn mark_published(&self, events: &[(OrderId, OrderStatus)]) -> Result<usize> {
        writes::mark_published(self, events).await
    }

    async fn ping(&self) -> Result<()> {
        pools::ping(self).await
    }
}
