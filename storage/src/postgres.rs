//! The sharded order store on Postgres: tokio-postgres with one deadpool pool per database,
//! schema by refinery (`migrations/postgres/`).
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

use crate::batch::{self, Current, Deltas};
use crate::metrics::{self, PoolSource, PoolStatus};
use crate::shard;
use crate::{
    model::*, Change, Checkpoint, Error, Order, OrderStore, Result, Sale, SaleId, SaleTotals,
    StatusCount,
};
use async_trait::async_trait;
use deadpool_postgres::{
    Manager, ManagerConfig, Object, Pool, RecyclingMethod, Runtime, Transaction,
};
use futures_util::future::{join_all, try_join_all};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Weak};
use std::time::Duration;
use tokio_postgres::error::SqlState;
use tokio_postgres::types::ToSql;
use tokio_postgres::{NoTls, Row};
use uuid::Uuid;

/// How long opening a connection to a database may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// How long a call may wait for a pooled connection (and for creating or recycling one).
pub const POOL_TIMEOUT: Duration = Duration::from_secs(2);

mod catalog_schema {
    refinery::embed_migrations!("migrations/postgres/catalog");
}
mod shard_schema {
    refinery::embed_migrations!("migrations/postgres/shard");
}

/// Which database a call went to, for error messages (URLs may hold passwords: never shown).
#[derive(Debug, Clone, Copy)]
enum Db {
    Catalog,
    Shard(usize),
}

impl Db {
    /// refinery's history table of this kind of database. The catalog and a shard may be
    /// one database (the default `catalog_url` is the first shard's), so each schema keeps
    /// its own history.
    fn history_table(self) -> &'static str {
        match self {
            Db::Catalog => "flashsale_catalog_schema_history",
            Db::Shard(_) => "flashsale_shard_schema_history",
        }
    }
}

impl std::fmt::Display for Db {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Db::Catalog => f.write_str("catalog database"),
            Db::Shard(i) => write!(f, "shard {i}"),
        }
    }
}

fn unavailable(db: Db, e: impl std::fmt::Display) -> Error {
    Error::Unavailable(format!("{db}: {e}"))
}

fn corrupt(e: impl std::fmt::Display) -> Error {
    Error::Corrupt(e.to_string())
}

fn pg_config(url: &str, db: Db) -> Result<tokio_postgres::Config> {
    let mut cfg: tokio_postgres::Config = url
        .parse()
        .map_err(|e| Error::Unavailable(format!("{db}: bad database URL: {e}")))?;
    cfg.connect_timeout(CONNECT_TIMEOUT);
    if cfg.get_application_name().is_none() {
        cfg.application_name("flashsale");
    }
    Ok(cfg)
}

fn make_pool(url: &str, db: Db, size: usize) -> Result<Pool> {
    let manager = Manager::from_config(
        pg_config(url, db)?,
        NoTls,
        ManagerConfig {
            recycling_method: RecyclingMethod::Fast,
        },
    );
    Pool::builder(manager)
        .max_size(size.max(1))
        .wait_timeout(Some(POOL_TIMEOUT))
        .create_timeout(Some(POOL_TIMEOUT))
        .recycle_timeout(Some(POOL_TIMEOUT))
        .runtime(Runtime::Tokio1)
        .build()
        .map_err(|e| unavailable(db, e))
}

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

/// The highest schema version of a set of embedded migrations.
fn latest_version(runner: &refinery::Runner) -> i64 {
    runner
        .get_migrations()
        .iter()
        .map(|m| i64::from(m.version()))
        .max()
        .unwrap_or(0)
}

async fn migrate_one(url: &str, db: Db, mut runner: refinery::Runner) -> Result<()> {
    runner.set_migration_table_name(db.history_table());
    let (mut client, connection) = pg_config(url, db)?
        .connect(NoTls)
        .await
        .map_err(|e| unavailable(db, e))?;
    let conn = tokio::spawn(async move {
        if let Err(e) = connection.await {
            tracing::debug!(error = %e, "migration connection ended");
        }
    });
    // Two `flashsale migrate` at once must not both create the tables: one waits.
    let result = async {
        client
            .execute(
                "SELECT pg_advisory_lock(hashtext('flashsale migrate'))",
                &[],
            )
            .await
            .map_err(|e| unavailable(db, e))?;
        let report = runner
            .run_async(&mut client)
            .await
            .map_err(|e| unavailable(db, format!("migration failed: {e}")));
        let _ = client
            .execute(
                "SELECT pg_advisory_unlock(hashtext('flashsale migrate'))",
                &[],
            )
            .await;
        for m in report?.applied_migrations() {
            tracing::info!(database = %db, migration = %m, "applied migration");
        }
        Ok(())
    }
    .await;
    drop(client);
    let _ = conn.await;
    result
}

impl PgStore {
    /// Applies the pending migrations to the catalog and to every shard. Idempotent: a
    /// database already at the latest schema is left as it is.
    pub async fn migrate(catalog_url: &str, shard_urls: &[String]) -> Result<()> {
        migrate_one(
            catalog_url,
            Db::Catalog,
            catalog_schema::migrations::runner(),
        )
        .await?;
        for (i, url) in shard_urls.iter().enumerate() {
            migrate_one(url, Db::Shard(i), shard_schema::migrations::runner()).await?;
        }
        // The first migrate records the number of shards; later ones must agree.
        let (client, connection) = pg_config(catalog_url, Db::Catalog)?
            .connect(NoTls)
            .await
            .map_err(|e| unavailable(Db::Catalog, e))?;
        let conn = tokio::spawn(connection);
        let shards = i32::try_from(shard_urls.len()).unwrap_or(i32::MAX);
        let recorded = async {
            client
                .execute(
                    "INSERT INTO store_layout (id, shards) VALUES (1, $1) \
                     ON CONFLICT (id) DO NOTHING",
                    &[&shards],
                )
                .await?;
            client
                .query_one("SELECT shards FROM store_layout WHERE id = 1", &[])
                .await?
                .try_get::<_, i32>(0)
        }
        .await
        .map_err(|e| unavailable(Db::Catalog, e));
        drop(client);
        let _ = conn.await;
        let recorded = recorded?;
        if recorded != shards {
            return Err(Error::Unavailable(format!(
                "the catalog records {recorded} shard(s) but {shards} are configured: adding \
                 shards moves orders (see storage/src/shard.rs); nothing was changed"
            )));
        }
        Ok(())
    }

    /// Opens a pool of at most `pool_size` connections to the catalog and to each shard
    /// (shard `i` is `shard_urls[i]`), and checks that every database answers and is
    /// migrated. Refuses with [`Error::Unavailable`] otherwise.
    pub async fn connect(
        catalog_url: &str,
        shard_urls: &[String],
        pool_size: usize,
    ) -> Result<PgStore> {
        if shard_urls.is_empty() {
            return Err(Error::Unavailable(
                "the sharded Postgres store needs at least one shard URL".into(),
            ));
        }
        let shards = shard_urls
            .iter()
            .enumerate()
            .map(|(i, url)| make_pool(url, Db::Shard(i), pool_size))
            .collect::<Result<Vec<_>>>()?;
        let store = PgStore {
            inner: Arc::new(Inner {
                catalog: make_pool(catalog_url, Db::Catalog, pool_size)?,
                shards,
            }),
        };
        let pool: Weak<Inner> = Arc::downgrade(&store.inner);
        metrics::watch_pool(pool);
        let catalog_want = latest_version(&catalog_schema::migrations::runner());
        let shard_want = latest_version(&shard_schema::migrations::runner());
        let mut checks = vec![store.check_schema(Db::Catalog, catalog_want)];
        for i in 0..store.shard_count() {
            checks.push(store.check_schema(Db::Shard(i), shard_want));
        }
        try_join_all(checks).await?;
        store.check_layout().await?;
        Ok(store)
    }

    /// Refuses a shard list whose length differs from the one the catalog recorded.
    async fn check_layout(&self) -> Result<()> {
        let rows = self
            .query(
                Db::Catalog,
                "SELECT shards FROM store_layout WHERE id = 1",
                &[],
            )
            .await?;
        let recorded: Option<i32> = rows
            .first()
            .map(|r| r.try_get(0))
            .transpose()
            .map_err(corrupt)?;
        match recorded {
            Some(n) if usize::try_from(n).ok() == Some(self.shard_count()) => Ok(()),
            Some(n) => Err(Error::Unavailable(format!(
                "the catalog records {n} shard(s) but {} are configured: order ids would be \
                 looked for on the wrong shards (adding shards: see storage/src/shard.rs)",
                self.shard_count()
            ))),
            None => Err(Error::Unavailable(
                "the catalog records no shard layout: run `flashsale migrate` first".into(),
            )),
        }
    }

    async fn check_schema(&self, db: Db, want: i64) -> Result<()> {
        let client = self.client(db).await?;
        let row = client
            .query_one("SELECT to_regclass($1) IS NOT NULL", &[&db.history_table()])
            .await
            .map_err(|e| unavailable(db, e))?;
        let have: i64 = if row.try_get::<_, bool>(0).map_err(corrupt)? {
            client
                .query_one(
                    &format!(
                        "SELECT coalesce(max(version), 0)::int8 FROM {}",
                        db.history_table()
                    ),
                    &[],
                )
                .await
                .map_err(|e| unavailable(db, e))?
                .try_get(0)
                .map_err(corrupt)?
        } else {
            0
        };
        if have < want {
            return Err(Error::Unavailable(format!(
                "{db} is not migrated (schema version {have}, this build needs {want}): run \
                 `flashsale migrate` first"
            )));
        }
        Ok(())
    }

    /// How many shards the store has.
    pub fn shard_count(&self) -> usize {
        self.inner.shards.len()
    }

    /// The shard holding order `id`.
    pub fn shard_of(&self, id: OrderId) -> usize {
        // At most u32::MAX shards exist in practice; more would be a configuration error.
        let n = u32::try_from(self.shard_count()).unwrap_or(u32::MAX);
        shard::shard_of(id, n) as usize
    }

    fn pool(&self, db: Db) -> &Pool {
        match db {
            Db::Catalog => &self.inner.catalog,
            Db::Shard(i) => &self.inner.shards[i],
        }
    }

    async fn client(&self, db: Db) -> Result<Object> {
        self.pool(db).get().await.map_err(|e| unavailable(db, e))
    }

    async fn query(&self, db: Db, sql: &str, params: &[&(dyn ToSql + Sync)]) -> Result<Vec<Row>> {
        let client = self.client(db).await?;
        let stmt = client
            .prepare_cached(sql)
            .await
            .map_err(|e| unavailable(db, e))?;
        client
            .query(&stmt, params)
            .await
            .map_err(|e| unavailable(db, e))
    }

    async fn execute(&self, db: Db, sql: &str, params: &[&(dyn ToSql + Sync)]) -> Result<u64> {
        let client = self.client(db).await?;
        let stmt = client
            .prepare_cached(sql)
            .await
            .map_err(|e| unavailable(db, e))?;
        client
            .execute(&stmt, params)
            .await
            .map_err(|e| unavailable(db, e))
    }

    /// Runs the same query on every shard at once; the rows per shard, in shard order.
    async fn query_every_shard(
        &self,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Vec<Vec<Row>>> {
        try_join_all((0..self.shard_count()).map(|i| self.query(Db::Shard(i), sql, params))).await
    }

    /// Orders from every shard, merged by `(sort key, order id)`, at most `limit`.
    async fn merged_orders(
        &self,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
        limit: usize,
    ) -> Result<Vec<Order>> {
        let mut keyed = Vec::new();
        for rows in self.query_every_shard(sql, params).await? {
            for row in rows {
                let key: i64 = row.try_get(SORT_KEY).map_err(corrupt)?;
                keyed.push((key, order_from_row(&row)?));
            }
        }
        keyed.sort_by_key(|(k, o)| (*k, o.new.order_id));
        keyed.truncate(limit);
        Ok(keyed.into_iter().map(|(_, o)| o).collect())
    }

    async fn persist_on_shard(
        &self,
        shard: usize,
        orders: &[&NewOrder],
        now: i64,
    ) -> Result<usize> {
        let db = Db::Shard(shard);
        let err = |e| unavailable(db, e);
        let mut ids = Vec::with_capacity(orders.len());
        let mut sales = Vec::with_capacity(orders.len());
        let mut users = Vec::with_capacity(orders.len());
        let mut quantities = Vec::with_capacity(orders.len());
        let mut amounts = Vec::with_capacity(orders.len());
        let mut currencies = Vec::with_capacity(orders.len());
        let mut sequences = Vec::with_capacity(orders.len());
        let mut keys = Vec::with_capacity(orders.len());
        let mut tokens = Vec::with_capacity(orders.len());
        let mut accepted = Vec::with_capacity(orders.len());
        for o in orders {
            ids.push(o.order_id.0);
            sales.push(o.sale_id.as_str());
            users.push(o.user_id.as_str());
            quantities.push(i32::try_from(o.quantity).map_err(|_| InvalidValue {
                field: "quantity",
                reason: "too large",
            })?);
            amounts.push(o.amount.minor);
            currencies.push(o.amount.currency.as_str());
            sequences.push(o.sequence as i64);
            keys.push(o.idempotency_key.as_str());
            tokens.push(o.payment_token.as_str());
            accepted.push(o.accepted_at.millis());
        }
        let mut client = self.client(db).await?;
        let tx = client.transaction().await.map_err(err)?;
        let insert = tx
            .prepare_cached(
                "INSERT INTO orders (order_id, sale_id, user_id, quantity, amount_minor, \
                 currency, sequence, idempotency_key, payment_token, accepted_at, status, \
                 updated_at) \
                 SELECT u.order_id, u.sale_id, u.user_id, u.quantity, u.amount_minor, \
                 u.currency, u.sequence, u.idempotency_key, u.payment_token, u.accepted_at, \
                 'persisted', $11 \
                 FROM UNNEST($1::uuid[], $2::text[], $3::text[], $4::int4[], $5::int8[], \
                 $6::text[], $7::int8[], $8::text[], $9::text[], $10::int8[]) WITH ORDINALITY \
                 AS u(order_id, sale_id, user_id, quantity, amount_minor, currency, sequence, \
                 idempotency_key, payment_token, accepted_at, n) \
                 ORDER BY u.n \
                 ON CONFLICT (order_id) DO NOTHING RETURNING order_id",
            )
            .await
            .map_err(err)?;
        let rows = tx
            .query(
                &insert,
                &[
                    &ids,
                    &sales,
                    &users,
                    &quantities,
                    &amounts,
                    &currencies,
                    &sequences,
                    &keys,
                    &tokens,
                    &accepted,
                    &now,
                ],
            )
            .await
            .map_err(err)?;
        let new: HashSet<Uuid> = rows
            .iter()
            .map(|r| r.try_get::<_, Uuid>(0).map_err(corrupt))
            .collect::<Result<_>>()?;
        let mut totals = Deltas::new();
        for o in orders.iter().filter(|o| new.contains(&o.order_id.0)) {
            batch::persisted(&mut totals, o.sale_id.as_str(), o.quantity);
        }
        if !new.is_empty() {
            // accepted then persisted for each new order, in batch order (as the embedded
            // store writes them), so the outbox lists them in that order.
            let mut h_ids = Vec::with_capacity(2 * new.len());
            let mut h_status = Vec::with_capacity(2 * new.len());
            let mut h_at = Vec::with_capacity(2 * new.len());
            for o in orders.iter().filter(|o| new.contains(&o.order_id.0)) {
                h_ids.extend([o.order_id.0, o.order_id.0]);
                h_status.extend([
                    OrderStatus::Accepted.as_str(),
                    OrderStatus::Persisted.as_str(),
                ]);
                h_at.extend([o.accepted_at.millis(), now]);
            }
            let history = tx
                .prepare_cached(
                    "INSERT INTO order_history (order_id, status, at) \
                     SELECT h.order_id, h.status, h.at \
                     FROM UNNEST($1::uuid[], $2::text[], $3::int8[]) WITH ORDINALITY \
                     AS h(order_id, status, at, n) ORDER BY h.n \
                     ON CONFLICT DO NOTHING",
                )
                .await
                .map_err(err)?;
            tx.execute(&history, &[&h_ids, &h_status, &h_at])
                .await
                .map_err(err)?;
        }
        write_totals(&tx, &totals).await.map_err(err)?;
        tx.commit().await.map_err(err)?;
        Ok(new.len())
    }

    /// Applies one shard's part of a batch in one transaction (see the module doc).
    async fn apply_on_shard(
        &self,
        shard: usize,
        changes: &[&Change],
        now: i64,
    ) -> Result<Vec<bool>> {
        let db = Db::Shard(shard);
        let err = |e: tokio_postgres::Error| write_error(db, e);
        let ids: Vec<Uuid> = batch::touched(changes.iter().copied())
            .into_iter()
            .map(|id| id.0)
            .collect();
        let mut client = self.client(db).await?;
        let tx = client.transaction().await.map_err(err)?;
        let select = tx
            .prepare_cached(
                "SELECT order_id, status, released_at IS NOT NULL, notified_at IS NOT NULL, \
                 sale_id, quantity, refund_state, failed_attempts FROM orders \
                 WHERE order_id = ANY($1) ORDER BY order_id FOR UPDATE",
            )
            .await
            .map_err(err)?;
        let mut current = HashMap::with_capacity(ids.len());
        let mut orders = HashMap::with_capacity(ids.len());
        for row in tx.query(&select, &[&ids]).await.map_err(err)? {
            let id = OrderId(row.try_get(0).map_err(corrupt)?);
            let status: String = row.try_get(1).map_err(corrupt)?;
            current.insert(
                id,
                Current {
                    status: status.parse().map_err(corrupt)?,
                    released: row.try_get(2).map_err(corrupt)?,
                    notified: row.try_get(3).map_err(corrupt)?,
                    refund: row
                        .try_get::<_, Option<String>>(6)
                        .map_err(corrupt)?
                        .map(|s| s.parse())
                        .transpose()
                        .map_err(corrupt)?,
                    failed_attempts: u32::try_from(row.try_get::<_, i32>(7).map_err(corrupt)?)
                        .map_err(corrupt)?,
                },
            );
            let quantity: i32 = row.try_get(5).map_err(corrupt)?;
            orders.insert(
                id,
                (
                    row.try_get::<_, String>(4).map_err(corrupt)?,
                    u32::try_from(quantity).map_err(corrupt)?,
                ),
            );
        }
        let plan = batch::plan(changes.iter().copied(), &current, now);
        let totals = batch::totals_of_plan(&plan, &current, &orders);
        if !plan.updates.is_empty() {
            let n = plan.updates.len();
            let mut u_ids = Vec::with_capacity(n);
            let mut u_status = Vec::with_capacity(n);
            let mut u_updated = Vec::with_capacity(n);
            let mut u_charge = Vec::with_capacity(n);
            let mut u_released = Vec::with_capacity(n);
            let mut u_notified = Vec::with_capacity(n);
            let mut u_refund = Vec::with_capacity(n);
            let mut u_failed = Vec::with_capacity(n);
            let mut u_retry = Vec::with_capacity(n);
            for u in &plan.updates {
                u_refund.push(u.refund_str());
                u_failed.push(
                    u.failed_attempts
                        .map(|n| i32::try_from(n).unwrap_or(i32::MAX)),
                );
                u_retry.push(u.retry_after);
                u_ids.push(u.id.0);
                u_status.push(u.status.as_str());
                u_updated.push(u.updated_at);
                u_charge.push(u.charge_id.as_deref());
                u_released.push(u.released_at);
                u_notified.push(u.notified_at);
            }
            let update = tx
                .prepare_cached(
                    "UPDATE orders o SET status = u.status, \
                     updated_at = coalesce(u.updated_at, o.updated_at), \
                     charge_id = coalesce(u.charge_id, o.charge_id), \
                     released_at = coalesce(u.released_at, o.released_at), \
                     notified_at = coalesce(u.notified_at, o.notified_at), \
                     refund_state = coalesce(u.refund_state, o.refund_state), \
                     failed_attempts = coalesce(u.failed_attempts, o.failed_attempts), \
                     retry_after = coalesce(u.retry_after, o.retry_after) \
                     FROM UNNEST($1::uuid[], $2::text[], $3::int8[], $4::text[], $5::int8[], \
                     $6::int8[], $7::text[], $8::int4[], $9::int8[]) AS u(order_id, status, \
                     updated_at, charge_id, released_at, notified_at, refund_state, \
                     failed_attempts, retry_after) \
                     WHERE o.order_id = u.order_id",
                )
                .await
                .map_err(err)?;
            tx.execute(
                &update,
                &[
                    &u_ids,
                    &u_status,
                    &u_updated,
                    &u_charge,
                    &u_released,
                    &u_notified,
                    &u_refund,
                    &u_failed,
                    &u_retry,
                ],
            )
            .await
            .map_err(err)?;
        }
        if !plan.history.is_empty() {
            let n = plan.history.len();
            let mut h_ids = Vec::with_capacity(n);
            let mut h_status = Vec::with_capacity(n);
            let mut h_at = Vec::with_capacity(n);
            for h in &plan.history {
                h_ids.push(h.id.0);
                h_status.push(h.status.as_str());
                h_at.push(h.at);
            }
            let history = tx
                .prepare_cached(
                    "INSERT INTO order_history (order_id, status, at) \
                     SELECT h.order_id, h.status, h.at \
                     FROM UNNEST($1::uuid[], $2::text[], $3::int8[]) WITH ORDINALITY \
                     AS h(order_id, status, at, n) ORDER BY h.n \
                     ON CONFLICT DO NOTHING",
                )
                .await
                .map_err(err)?;
            tx.execute(&history, &[&h_ids, &h_status, &h_at])
                .await
                .map_err(err)?;
        }
        write_totals(&tx, &totals).await.map_err(err)?;
        tx.commit().await.map_err(err)?;
        Ok(plan.applied)
    }

    /// One change, as the single-order calls make it.
    async fn apply_one(&self, change: Change) -> Result<bool> {
        let applied = self.apply_batch(std::slice::from_ref(&change)).await?;
        Ok(applied.first().copied().unwrap_or(false))
    }
}

/// Adds `deltas` to the shard's `sale_totals` rows in one statement, rows in the sorted
/// order of [`Deltas`] (so concurrent transactions lock them in the same order).
async fn write_totals(
    tx: &Transaction<'_>,
    deltas: &Deltas,
) -> std::result::Result<(), tokio_postgres::Error> {
    if deltas.is_empty() {
        return Ok(());
    }
    let n = deltas.len();
    let (mut sales, mut statuses) = (Vec::with_capacity(n), Vec::with_capacity(n));
    let (mut orders, mut units) = (Vec::with_capacity(n), Vec::with_capacity(n));
    let (mut released_orders, mut released_units) = (Vec::with_capacity(n), Vec::with_capacity(n));
    for ((sale, status), d) in deltas {
        sales.push(sale.as_str());
        statuses.push(*status);
        orders.push(d.orders);
        units.push(d.units);
        released_orders.push(d.released_orders);
        released_units.push(d.released_units);
    }
    let upsert = tx
        .prepare_cached(
            "INSERT INTO sale_totals (sale_id, status, orders, units, released_orders, \
             released_units) \
             SELECT d.sale_id, d.status, d.orders, d.units, d.released_orders, d.released_units \
             FROM UNNEST($1::text[], $2::text[], $3::int8[], $4::int8[], $5::int8[], \
             $6::int8[]) WITH ORDINALITY \
             AS d(sale_id, status, orders, units, released_orders, released_units, n) \
             ORDER BY d.n \
             ON CONFLICT (sale_id, status) DO UPDATE SET \
             orders = sale_totals.orders + excluded.orders, \
             units = sale_totals.units + excluded.units, \
             released_orders = sale_totals.released_orders + excluded.released_orders, \
             released_units = sale_totals.released_units + excluded.released_units",
        )
        .await?;
    tx.execute(
        &upsert,
        &[
            &sales,
            &statuses,
            &orders,
            &units,
            &released_orders,
            &released_units,
        ],
    )
    .await?;
    Ok(())
}

/// A database error of a write: the charge-id limit (`orders_charge_id_length`) becomes
/// [`Error::Invalid`].
fn write_error(db: Db, e: tokio_postgres::Error) -> Error {
    let charge_id = e.code() == Some(&SqlState::CHECK_VIOLATION)
        && e.as_db_error().and_then(|d| d.constraint()) == Some("orders_charge_id_length");
    if charge_id {
        Error::Invalid(InvalidValue {
            field: "charge_id",
            reason: "longer than 200 characters",
        })
    } else {
        unavailable(db, e)
    }
}

const ORDER_COLUMNS: &str = "order_id, sale_id, user_id, quantity, amount_minor, currency, \
     sequence, idempotency_key, payment_token, status, accepted_at, charge_id, released_at, \
     notified_at, refund_state, failed_attempts, retry_after";
/// Column index of the sort key that every order listing selects after [`ORDER_COLUMNS`].
const SORT_KEY: usize = 17;

fn order_from_row(row: &Row) -> Result<Order> {
    let s = |i: usize| row.try_get::<_, String>(i).map_err(corrupt);
    let i64_at = |i: usize| row.try_get::<_, i64>(i).map_err(corrupt);
    let opt_i64 = |i: usize| row.try_get::<_, Option<i64>>(i).map_err(corrupt);
    let quantity: i32 = row.try_get(3).map_err(corrupt)?;
    let new = NewOrder {
        order_id: OrderId(row.try_get(0).map_err(corrupt)?),
        sale_id: SaleId::parse(s(1)?).map_err(corrupt)?,
        user_id: UserId::parse(s(2)?).map_err(corrupt)?,
        quantity: u32::try_from(quantity).map_err(corrupt)?,
        amount: Money {
            minor: i64_at(4)?,
            currency: Currency::parse(&s(5)?).map_err(corrupt)?,
        },
        sequence: i64_at(6)? as u64,
        idempotency_key: s(7)?,
        payment_token: s(8)?,
        accepted_at: Timestamp(i64_at(10)?),
    };
    Ok(Order {
        new,
        status: s(9)?.parse().map_err(corrupt)?,
        history: Vec::new(),
        charge_id: row.try_get(11).map_err(corrupt)?,
        released_at: opt_i64(12)?.map(Timestamp),
        notified_at: opt_i64(13)?.map(Timestamp),
        refund: row
            .try_get::<_, Option<String>>(14)
            .map_err(corrupt)?
            .map(|s| s.parse())
            .transpose()
            .map_err(corrupt)?,
        failed_attempts: u32::try_from(row.try_get::<_, i32>(15).map_err(corrupt)?)
            .map_err(corrupt)?,
        retry_after: opt_i64(16)?.map(Timestamp),
    })
}

fn sale_from_row(row: &Row) -> Result<Sale> {
    let body: String = row.try_get(0).map_err(corrupt)?;
    let stock: i64 = row.try_get(1).map_err(corrupt)?;
    let mut sale: Sale = serde_json::from_str(&body).map_err(corrupt)?;
    sale.stock = u32::try_from(stock).map_err(corrupt)?;
    Ok(sale)
}

/// `orders_in_status` (`$1` = limit). The statuses are written into the query as literals
/// (they come from the enum, never from input): the planner proves a partial index usable
/// only from constants (`status = ANY($1)` says nothing about `orders_open`), and a
/// repeated condition would spoil its row estimates.
fn orders_in_status_sql(statuses: &[OrderStatus]) -> String {
    orders_in_status_where(statuses, "")
}

/// `orders_due` (`$1` = limit, `$2` = now): `orders_in_status`, less the orders waiting out
/// a deferral.
fn orders_due_sql(statuses: &[OrderStatus]) -> String {
    orders_in_status_where(statuses, " AND (retry_after IS NULL OR retry_after <= $2)")
}

/// `refunds_owed` (`$1` = limit), through `orders_refunds_owed`.
fn refunds_owed_sql() -> String {
    format!(
        "SELECT {ORDER_COLUMNS}, accepted_at FROM orders WHERE refund_state = 'owed' \
         ORDER BY accepted_at, order_id LIMIT $1"
    )
}

fn orders_in_status_where(statuses: &[OrderStatus], and: &str) -> String {
    let list = statuses
        .iter()
        .map(|s| format!("'{}'", s.as_str()))
        .collect::<Vec<_>>()
        .join(", ");
    let condition = if statuses.is_empty() {
        "false".to_owned()
    } else {
        format!("status IN ({list})")
    };
    format!(
        "SELECT {ORDER_COLUMNS}, accepted_at FROM orders WHERE ({condition}){and} \
         ORDER BY accepted_at, order_id LIMIT $1"
    )
}

/// `unfinished_followups` (`$1` = limit); the condition is `orders_followups`'s.
fn followups_sql() -> String {
    format!(
        "SELECT {ORDER_COLUMNS}, accepted_at FROM orders WHERE \
         (status IN ('payment_failed', 'expired') AND released_at IS NULL) OR \
         (status IN ('paid', 'payment_failed', 'expired') AND notified_at IS NULL) \
         ORDER BY accepted_at, order_id LIMIT $1"
    )
}

/// `pending_since` (`$1` = before, `$2` = limit), through `orders_pending`.
fn pending_sql() -> String {
    format!(
        "SELECT {ORDER_COLUMNS}, updated_at FROM orders WHERE status = 'payment_pending' \
         AND updated_at < $1 ORDER BY updated_at, order_id LIMIT $2"
    )
}

/// `unpublished_events` (`$1` = limit), through `order_history_unpublished`.
const UNPUBLISHED_SQL: &str = "SELECT h.order_id, o.sale_id, o.user_id, o.quantity, h.status, \
     h.at, o.charge_id FROM order_history h JOIN orders o ON o.order_id = h.order_id \
     WHERE NOT h.published ORDER BY h.at, h.id LIMIT $1";

fn sql_limit(limit: usize) -> i64 {
    i64::try_from(limit).unwrap_or(i64::MAX)
}

#[async_trait]
impl OrderStore for PgStore {
    async fn create_sale(&self, sale: &Sale) -> Result<()> {
        let body = serde_json::to_string(sale).map_err(corrupt)?;
        let db = Db::Catalog;
        let client = self.client(db).await?;
        let stmt = client
            .prepare_cached(
                "INSERT INTO sales (id, body, stock, created_at) VALUES ($1, $2, $3, $4)",
            )
            .await
            .map_err(|e| unavailable(db, e))?;
        let params: [&(dyn ToSql + Sync); 4] = [
            &sale.id.as_str(),
            &body,
            &i64::from(sale.stock),
            &sale.created_at.millis(),
        ];
        match client.execute(&stmt, &params).await {
            Ok(_) => Ok(()),
            Err(e) if e.code() == Some(&SqlState::UNIQUE_VIOLATION) => {
                Err(Error::SaleExists(sale.id.clone()))
            }
            Err(e) => Err(unavailable(db, e)),
        }
    }

    async fn get_sale(&self, id: &SaleId) -> Result<Option<Sale>> {
        let rows = self
            .query(
                Db::Catalog,
                "SELECT body, stock FROM sales WHERE id = $1",
                &[&id.as_str()],
            )
            .await?;
        rows.first().map(sale_from_row).transpose()
    }

    async fn list_sales(&self) -> Result<Vec<Sale>> {
        let rows = self
            .query(
                Db::Catalog,
                "SELECT body, stock FROM sales ORDER BY created_at, id",
                &[],
            )
            .await?;
        rows.iter().map(sale_from_row).collect()
    }

    async fn add_stock(&self, id: &SaleId, units: u32) -> Result<Sale> {
        let rows = self
            .query(
                Db::Catalog,
                "UPDATE sales SET stock = stock + $2 WHERE id = $1 AND stock + $2 <= $3 \
                 RETURNING body, stock",
                &[&id.as_str(), &i64::from(units), &i64::from(MAX_STOCK)],
            )
            .await?;
        if let Some(row) = rows.first() {
            return sale_from_row(row);
        }
        let exists = !self
            .query(
                Db::Catalog,
                "SELECT 1 FROM sales WHERE id = $1",
                &[&id.as_str()],
            )
            .await?
            .is_empty();
        Err(if exists {
            Error::Invalid(InvalidValue {
                field: "quantity",
                reason: "the sale's stock would exceed 100000000 units",
            })
        } else {
            Error::UnknownSale(id.clone())
        })
    }

    async fn persist_batch(
        &self,
        orders: &[NewOrder],
        checkpoint: Option<&Checkpoint>,
    ) -> Result<usize> {
        // Group by shard, keeping batch order and the first of repeated ids (as the
        // embedded store does: a repeated id is a known id).
        let mut seen = HashSet::with_capacity(orders.len());
        let mut by_shard: BTreeMap<usize, Vec<&NewOrder>> = BTreeMap::new();
        for o in orders {
            if seen.insert(o.order_id) {
                by_shard
                    .entry(self.shard_of(o.order_id))
                    .or_default()
                    .push(o);
            }
        }
        let now = Timestamp::now().millis();
        // Every shard runs to its end (no half-cancelled transaction); the first error wins.
        let results = join_all(
            by_shard
                .iter()
                .map(|(&shard, batch)| self.persist_on_shard(shard, batch, now)),
        )
        .await;
        let mut inserted = 0;
        for r in results {
            inserted += r?;
        }
        if let Some(cp) = checkpoint {
            self.execute(
                Db::Catalog,
                "INSERT INTO consumer_offsets (consumer, partition, next_offset) \
                 VALUES ($1, $2, $3) ON CONFLICT (consumer, partition) DO UPDATE \
                 SET next_offset = GREATEST(consumer_offsets.next_offset, excluded.next_offset)",
                &[
                    &cp.consumer.as_str(),
                    &i64::from(cp.partition),
                    &(cp.next_offset as i64),
                ],
            )
            .await?;
        }
        Ok(inserted)
    }

    async fn checkpoint(&self, consumer: &str, partition: u32) -> Result<Option<u64>> {
        let rows = self
            .query(
                Db::Catalog,
                "SELECT next_offset FROM consumer_offsets WHERE consumer = $1 AND partition = $2",
                &[&consumer, &i64::from(partition)],
            )
            .await?;
        rows.first()
            .map(|r| r.try_get::<_, i64>(0).map(|v| v as u64).map_err(corrupt))
            .transpose()
    }

    async fn transition(
        &self,
        id: OrderId,
        from: OrderStatus,
        to: OrderStatus,
        charge_id: Option<&str>,
    ) -> Result<bool> {
        transition(from, to)?;
        self.apply_one(Change::Status {
            id,
            from,
            to,
            charge_id: charge_id.map(str::to_owned),
        })
        .await
    }

    async fn apply_batch(&self, changes: &[Change]) -> Result<Vec<bool>> {
        // Group by shard, keeping batch order within each shard.
        let mut by_shard: BTreeMap<usize, (Vec<usize>, Vec<&Change>)> = BTreeMap::new();
        for (i, change) in changes.iter().enumerate() {
            let (index, part) = by_shard
                .entry(self.shard_of(change.order_id()))
                .or_default();
            index.push(i);
            part.push(change);
        }
        let now = Timestamp::now().millis();
        // Every shard runs to its end (no half-cancelled transaction); the first error wins.
        let results = join_all(
            by_shard
                .iter()
                .map(|(&shard, (_, part))| self.apply_on_shard(shard, part, now)),
        )
        .await;
        let mut applied = vec![false; changes.len()];
        for ((index, _), result) in by_shard.values().zip(results) {
            for (&i, done) in index.iter().zip(result?) {
                applied[i] = done;
            }
        }
        Ok(applied)
    }

    async fn mark_released(&self, id: OrderId) -> Result<bool> {
        self.apply_one(Change::Released(id)).await
    }

    async fn mark_notified(&self, id: OrderId) -> Result<bool> {
        self.apply_one(Change::Notified(id)).await
    }

    async fn get_order(&self, id: OrderId) -> Result<Option<Order>> {
        // One statement, so the order and its history come from one snapshot.
        let sql = format!(
            "SELECT {ORDER_COLUMNS}, \
             ARRAY(SELECT h.status FROM order_history h WHERE h.order_id = o.order_id \
                   ORDER BY h.at, h.id), \
             ARRAY(SELECT h.at FROM order_history h WHERE h.order_id = o.order_id \
                   ORDER BY h.at, h.id) \
             FROM orders o WHERE o.order_id = $1"
        );
        let rows = self
            .query(Db::Shard(self.shard_of(id)), &sql, &[&id.0])
            .await?;
        let Some(row) = rows.first() else {
            return Ok(None);
        };
        let mut order = order_from_row(row)?;
        // The two arrays follow ORDER_COLUMNS, where a listing's sort key would be.
        let statuses: Vec<String> = row.try_get(SORT_KEY).map_err(corrupt)?;
        let ats: Vec<i64> = row.try_get(SORT_KEY + 1).map_err(corrupt)?;
        if statuses.len() != ats.len() {
            return Err(Error::Corrupt(format!(
                "history of order {id} does not decode"
            )));
        }
        for (s, at) in statuses.into_iter().zip(ats) {
            order.history.push(HistoryEntry {
                status: s.parse().map_err(corrupt)?,
                at: Timestamp(at),
            });
        }
        order.history.sort_by_key(|h| (h.at, h.status));
        Ok(Some(order))
    }

    async fn orders_in_status(&self, statuses: &[OrderStatus], limit: usize) -> Result<Vec<Order>> {
        let sql = orders_in_status_sql(statuses);
        self.merged_orders(&sql, &[&sql_limit(limit)], limit).await
    }

    async fn orders_due(
        &self,
        statuses: &[OrderStatus],
        now: Timestamp,
        limit: usize,
    ) -> Result<Vec<Order>> {
        let sql = orders_due_sql(statuses);
        self.merged_orders(&sql, &[&sql_limit(limit), &now.millis()], limit)
            .await
    }

    async fn refunds_owed(&self, limit: usize) -> Result<Vec<Order>> {
        self.merged_orders(&refunds_owed_sql(), &[&sql_limit(limit)], limit)
            .await
    }

    async fn unfinished_followups(&self, limit: usize) -> Result<Vec<Order>> {
        self.merged_orders(&followups_sql(), &[&sql_limit(limit)], limit)
            .await
    }

    async fn orders_of_sale(&self, sale: &SaleId) -> Result<Vec<Order>> {
        let sql = format!(
            "SELECT {ORDER_COLUMNS}, sequence FROM orders WHERE sale_id = $1 \
             ORDER BY sequence, order_id"
        );
        self.merged_orders(&sql, &[&sale.as_str()], usize::MAX)
            .await
    }

    async fn sale_totals(&self, sale: &SaleId) -> Result<SaleTotals> {
        // Kept by every write (see `write_totals`): a few rows per shard.
        let per_shard = self
            .query_every_shard(
                "SELECT status, orders, units, released_orders, released_units \
                 FROM sale_totals WHERE sale_id = $1 AND orders <> 0",
                &[&sale.as_str()],
            )
            .await?;
        let mut totals = SaleTotals::default();
        // Sorted by the status name, as the embedded store's GROUP BY lists them.
        let mut by_status: BTreeMap<&'static str, StatusCount> = BTreeMap::new();
        for row in per_shard.iter().flatten() {
            let status: OrderStatus = row
                .try_get::<_, String>(0)
                .map_err(corrupt)?
                .parse()
                .map_err(corrupt)?;
            let get = |i: usize| row.try_get::<_, i64>(i).map(|v| v as u64).map_err(corrupt);
            let (orders, units) = (get(1)?, get(2)?);
            totals.released_orders += get(3)?;
            totals.released_units += get(4)?;
            totals.orders += orders;
            totals.units += units;
            let entry = by_status.entry(status.as_str()).or_insert(StatusCount {
                status,
                orders: 0,
                units: 0,
            });
            entry.orders += orders;
            entry.units += units;
        }
        totals.by_status = by_status.into_values().collect();
        Ok(totals)
    }

    async fn pending_since(&self, before: Timestamp, limit: usize) -> Result<Vec<Order>> {
        self.merged_orders(
            &pending_sql(),
            &[&before.millis(), &sql_limit(limit)],
            limit,
        )
        .await
    }

    async fn unpublished_events(&self, limit: usize) -> Result<Vec<OrderEvent>> {
        let per_shard = self
            .query_every_shard(UNPUBLISHED_SQL, &[&sql_limit(limit)])
            .await?;
        let mut out = Vec::new();
        for row in per_shard.iter().flatten() {
            let s = |i: usize| row.try_get::<_, String>(i).map_err(corrupt);
            let status: OrderStatus = s(4)?.parse().map_err(corrupt)?;
            let quantity: i32 = row.try_get(3).map_err(corrupt)?;
            out.push(OrderEvent {
                order_id: OrderId(row.try_get(0).map_err(corrupt)?),
                sale_id: SaleId::parse(s(1)?).map_err(corrupt)?,
                user_id: UserId::parse(s(2)?).map_err(corrupt)?,
                quantity: u32::try_from(quantity).map_err(corrupt)?,
                status,
                at: Timestamp(row.try_get(5).map_err(corrupt)?),
                charge_id: if status == OrderStatus::Paid {
                    row.try_get(6).map_err(corrupt)?
                } else {
                    None
                },
            });
        }
        // Stable: events of one instant keep their shard's order (an order's events are all
        // on one shard, so its accepted/persisted order is kept).
        out.sort_by_key(|e| e.at);
        out.truncate(limit);
        Ok(out)
    }

    async fn mark_published(&self, events: &[(OrderId, OrderStatus)]) -> Result<usize> {
        let mut by_shard: HashMap<usize, (Vec<Uuid>, Vec<&str>)> = HashMap::new();
        for (id, status) in events {
            let (ids, statuses) = by_shard.entry(self.shard_of(*id)).or_default();
            ids.push(id.0);
            statuses.push(status.as_str());
        }
        let results = join_all(by_shard.iter().map(|(&shard, (ids, statuses))| async move {
            self.execute(
                Db::Shard(shard),
                "UPDATE order_history h SET published = true \
                 FROM UNNEST($1::uuid[], $2::text[]) AS e(order_id, status) \
                 WHERE h.order_id = e.order_id AND h.status = e.status AND NOT h.published",
                &[ids, statuses],
            )
            .await
        }))
        .await;
        let mut n = 0;
        for r in results {
            n += r? as usize;
        }
        Ok(n)
    }

    async fn ping(&self) -> Result<()> {
        let mut pings = vec![self.query(Db::Catalog, "SELECT 1", &[])];
        for i in 0..self.shard_count() {
            pings.push(self.query(Db::Shard(i), "SELECT 1", &[]));
        }
        try_join_all(pings).await.map(|_| ())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_schemas_are_embedded() {
        assert_eq!(latest_version(&catalog_schema::migrations::runner()), 2);
        assert_eq!(latest_version(&shard_schema::migrations::runner()), 4);
    }

    /// Every sweep query reads through its partial index on a shard holding mostly settled
    /// orders (no sequential scan of the orders, no sort of them).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn sweep_queries_use_partial_indexes() {
        use OrderStatus::*;
        let pg = testkit::PostgresCluster::start(1);
        PgStore::migrate(&pg.catalog_url(), &pg.shard_urls())
            .await
            .expect("migrate");
        let store = PgStore::connect(&pg.catalog_url(), &pg.shard_urls(), 2)
            .await
            .expect("connect");
        let now = Timestamp::now();
        let orders: Vec<_> = (0..5000u64)
            .map(|i| NewOrder {
                order_id: OrderId::new(),
                sale_id: SaleId::parse("s").expect("sale"),
                user_id: UserId::parse(format!("u{i}")).expect("user"),
                quantity: 1,
                amount: Money {
                    minor: 100,
                    currency: Currency::parse("EUR").expect("eur"),
                },
                sequence: i,
                idempotency_key: format!("k{i}"),
                payment_token: "tok".into(),
                accepted_at: Timestamp(now.millis() + i as i64),
            })
            .collect();
        store.persist_batch(&orders, None).await.expect("persist");
        let mut changes = Vec::new();
        // A backlog (an outage): 500 persisted, 500 payment_pending, the rest settled.
        for (i, o) in orders.iter().enumerate().skip(500) {
            let id = o.order_id;
            changes.push(Change::Status {
                id,
                from: Persisted,
                to: PaymentPending,
                charge_id: None,
            });
            if i >= 1000 {
                changes.push(Change::Status {
                    id,
                    from: PaymentPending,
                    to: Paid,
                    charge_id: Some(format!("ch_{i}")),
                });
                changes.push(Change::Notified(id));
            }
        }
        let applied = store.apply_batch(&changes).await.expect("settle");
        assert!(applied.iter().all(|a| *a));
        let events: Vec<_> = store
            .unpublished_events(100_000)
            .await
            .expect("events")
            .iter()
            .skip(30)
            .map(|e| (e.order_id, e.status))
            .collect();
        store.mark_published(&events).await.expect("publish");
        let client = store.client(Db::Shard(0)).await.expect("client");
        client.batch_execute("ANALYZE").await.expect("analyze");

        let limit = 100i64;
        let before = Timestamp::now().plus_millis(60_000).millis();
        let open_sql = orders_in_status_sql(&[Persisted, PaymentPending]);
        let persisted_sql = orders_in_status_sql(&[Persisted]);
        let due_sql = orders_due_sql(&[Persisted, PaymentPending]);
        let refunds_sql = refunds_owed_sql();
        let (followups, pending) = (followups_sql(), pending_sql());
        let queries: [(&str, &[&(dyn ToSql + Sync)], &str); 7] = [
            (&open_sql, &[&limit], "orders_open"),
            (&persisted_sql, &[&limit], "orders_open"),
            (&due_sql, &[&limit, &before], "orders_open"),
            (&refunds_sql, &[&limit], "orders_refunds_owed"),
            (&followups, &[&limit], "orders_followups"),
            (&pending, &[&before, &limit], "orders_pending"),
            (UNPUBLISHED_SQL, &[&limit], "order_history_unpublished"),
        ];
        for (sql, params, index) in queries {
            let plan: Vec<String> = client
                .query(&format!("EXPLAIN {sql}"), params)
                .await
                .expect("explain")
                .iter()
                .map(|r| r.get(0))
                .collect();
            let plan = plan.join("\n");
            eprintln!("{index}:\n{plan}");
            assert!(plan.contains(index), "{sql}:\n{plan}");
            assert!(!plan.contains("Seq Scan on orders"), "{sql}:\n{plan}");
            assert!(!plan.contains("Sort"), "{sql}:\n{plan}");
        }
    }

    #[test]
    fn bad_urls_are_refused_without_echoing_them() {
        let err = make_pool("postgres://u:secret@host:notaport/db", Db::Shard(3), 4)
            .expect_err("bad port");
        let text = err.to_string();
        assert!(text.contains("shard 3"), "{text}");
        assert!(!text.contains("secret"), "{text}");
    }
}
