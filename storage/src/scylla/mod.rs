//! The order store on Scylla (or Cassandra): the scylla driver, no lightweight transactions
//! on the hot path. (Work in progress: the design is in docs/ARCHITECTURE.md.)

mod config;

pub use config::{Consistency, Replication, ScyllaConfig};

use crate::{
    Change, Checkpoint, Error, NewOrder, Order, OrderEvent, OrderId, OrderStatus, OrderStore,
    Result, Sale, SaleId, SaleTotals, Timestamp,
};
use async_trait::async_trait;

/// The Scylla order store.
pub struct ScyllaStore {
    _config: ScyllaConfig,
}

impl std::fmt::Debug for ScyllaStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ScyllaStore").finish_non_exhaustive()
    }
}

fn todo_err() -> Error {
    Error::unavailable_msg("the Scylla store is not implemented yet")
}

impl ScyllaStore {
    /// Connects to the cluster and checks the keyspace is at the latest schema.
    pub async fn connect(config: &ScyllaConfig) -> Result<Self> {
        let _ = config;
        Err(todo_err())
    }

    /// Creates the keyspace (if missing) and applies the migrations not applied yet;
    /// returns the versions applied by this call.
    pub async fn migrate(config: &ScyllaConfig) -> Result<Vec<u32>> {
        let _ = config;
        Err(todo_err())
    }
}

#[async_trait]
impl OrderStore for ScyllaStore {
    async fn create_sale(&self, _sale: &Sale) -> Result<()> {
        Err(todo_err())
    }
    async fn get_sale(&self, _id: &SaleId) -> Result<Option<Sale>> {
        Err(todo_err())
    }
    async fn list_sales(&self) -> Result<Vec<Sale>> {
        Err(todo_err())
    }
    async fn add_stock(&self, _id: &SaleId, _units: u32) -> Result<Sale> {
        Err(todo_err())
    }
    async fn persist_batch(&self, _o: &[NewOrder], _c: Option<&Checkpoint>) -> Result<usize> {
        Err(todo_err())
    }
    async fn checkpoint(&self, _consumer: &str, _partition: u32) -> Result<Option<u64>> {
        Err(todo_err())
    }
    async fn transition(
        &self,
        _id: OrderId,
        _from: OrderStatus,
        _to: OrderStatus,
        _charge_id: Option<&str>,
    ) -> Result<bool> {
        Err(todo_err())
    }
    async fn apply_batch(&self, _changes: &[Change]) -> Result<Vec<bool>> {
        Err(todo_err())
    }
    async fn mark_released(&self, _id: OrderId) -> Result<bool> {
        Err(todo_err())
    }
    async fn mark_notified(&self, _id: OrderId) -> Result<bool> {
        Err(todo_err())
    }
    async fn get_order(&self, _id: OrderId) -> Result<Option<Order>> {
        Err(todo_err())
    }
    async fn orders_in_status(&self, _s: &[OrderStatus], _limit: usize) -> Result<Vec<Order>> {
        Err(todo_err())
    }
    async fn orders_due(
        &self,
        _s: &[OrderStatus],
        _now: Timestamp,
        _limit: usize,
    ) -> Result<Vec<Order>> {
        Err(todo_err())
    }
    async fn refunds_owed(&self, _limit: usize) -> Result<Vec<Order>> {
        Err(todo_err())
    }
    async fn unfinished_followups(&self, _limit: usize) -> Result<Vec<Order>> {
        Err(todo_err())
    }
    async fn orders_of_sale(&self, _sale: &SaleId) -> Result<Vec<Order>> {
        Err(todo_err())
    }
    async fn sale_totals(&self, _sale: &SaleId) -> Result<SaleTotals> {
        Err(todo_err())
    }
    async fn pending_since(&self, _before: Timestamp, _limit: usize) -> Result<Vec<Order>> {
        Err(todo_err())
    }
    async fn unpublished_events(&self, _limit: usize) -> Result<Vec<OrderEvent>> {
        Err(todo_err())
    }
    async fn mark_published(&self, _events: &[(OrderId, OrderStatus)]) -> Result<usize> {
        Err(todo_err())
    }
    async fn ping(&self) -> Result<()> {
        Err(todo_err())
    }
}
