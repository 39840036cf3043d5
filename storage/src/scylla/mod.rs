//! The order store on Scylla (or Cassandra): the scylla driver (prepared statements,
//! token-aware routing, a configurable consistency level, bounded requests and the driver's
//! retries of idempotent statements), and no lightweight transaction.
//!
//! # Data model (`migrations/scylla/`)
//!
//! - `order_facts`, partition `(sale_id, bucket)`: every order of a sale, as append-only
//!   facts ([`facts`]): the order, each status entered, its release, its notification, its
//!   refund states, its deferred attempts, each a row of its own under `(order_id, kind,
//!   rank)`. A sale spreads over [`facts::BUCKETS`] partitions.
//! - `orders`, partition `order_id`: where an order's facts are (its sale and bucket).
//! - `order_sales`: the sales that have orders. `sales`: the catalog. `consumer_offsets`:
//!   the log checkpoints.
//!
//! # Why it is correct without compare-and-set
//!
//! Every write inserts rows; no row is ever updated into another meaning (the `published`
//! mark of a status row aside, which only goes from absent to true). A replayed write
//! writes the same row again. An order's status is the fold of its status rows
//! ([`facts::resolve`]): the latest in the order's life, so no write can move an order
//! backwards, and a status entered twice is one row. All the rows one batch writes for one
//! order go to one partition in one unlogged batch, which Scylla applies atomically and in
//! isolation: a reader sees all of an order's changes of a batch or none.
//!
//! Preconditions (the order is in `from`, not released yet, ...) are checked against the
//! facts read just before the write, under the store's write lock, so within a process no
//! two calls interleave on an order; the settler's in-flight set already keeps two of its
//! tasks off one order. Between *processes*, the only moves that can race are an order's
//! final ones (a charge that succeeds while another process's sweep expires the order):
//! both rows then exist, and the fold decides the same way for every reader, whatever the
//! order they landed in: the void status wins, and the charge of the `paid` that lost is
//! owed back (`refund = owed`, picked up by the refund sweep). No unit is sold twice (a
//! void order's units are released once, by admission's exactly-once release) and no
//! charge is kept for an order that did not sell; the buyer may be told `paid` and then
//! `expired` with the refund, in that rare race.
//!
//! Persisting is idempotent: an order's rows are written first, its `orders` row last, so
//! the `orders` row says the order is there; the checkpoint is written after the orders
//! (with the offset as the write timestamp, so the highest wins on a cluster).

mod config;
pub(crate) mod facts;
mod schema;

pub use config::{Consistency, Replication, ScyllaConfig};

use crate::batch;
use crate::{
    Change, Checkpoint, Currency, Error, InvalidValue, Money, NewOrder, Order, OrderEvent, OrderId,
    OrderStatus, OrderStore, RefundState, Result, Sale, SaleId, SaleTotals, StatusCount, Timestamp,
    UserRate, MAX_CHARGE_ID, MAX_STOCK,
};
use async_trait::async_trait;
use facts::{bucket_of, refund_rank, status_rank, FactRow, Folded, Kind, RawFact, BUCKETS};
use futures_util::{StreamExt, TryStreamExt};
use scylla::client::execution_profile::ExecutionProfile;
use scylla::client::session_builder::SessionBuilder;
use scylla::policies::load_balancing::DefaultPolicy;
use scylla::policies::retry::DefaultRetryPolicy;
use scylla::statement::batch::{Batch, BatchType};
use scylla::statement::prepared::PreparedStatement;
use scylla::value::MaybeUnset;
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;
use uuid::Uuid;

pub(crate) type Session = scylla::client::session::Session;

/// How long connecting to the contact points may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Orders whose place (sale, bucket) is remembered (it never changes).
const ROUTES_CACHED: u64 = 1_000_000;

/// Reads of partitions at once (listings read every bucket of every sale with orders).
const READS_AT_ONCE: usize = 32;

pub(crate) fn unavailable(
    context: impl Into<std::borrow::Cow<'static, str>>,
    e: impl std::error::Error + Send + Sync + 'static,
) -> Error {
    Error::unavailable(context, e)
}

fn corrupt(e: InvalidValue) -> Error {
    Error::Corrupt(format!("order_facts: {e}"))
}

/// The prepared statements.
struct Statements {
    insert_row: PreparedStatement,
    mark_published: PreparedStatement,
    select_order: PreparedStatement,
    select_partition: PreparedStatement,
    insert_route: PreparedStatement,
    select_route: PreparedStatement,
    insert_order_sale: PreparedStatement,
    select_order_sales: PreparedStatement,
    insert_sale: PreparedStatement,
    select_sale: PreparedStatement,
    select_sales: PreparedStatement,
    insert_sale_buckets: PreparedStatement,
    select_sale_buckets: PreparedStatement,
    select_all_sale_buckets: PreparedStatement,
    select_offset: PreparedStatement,
}

/// The columns of a sale row, in order.
const SALE_COLUMNS: &str = "id, sku, stock, price, currency, starts_at, ends_at, \
     per_user_limit, max_per_order, rate_per_second, rate_burst, created_at";

type SaleRow = (
    String,
    String,
    i32,
    i64,
    String,
    i64,
    i64,
    i32,
    i32,
    i32,
    i32,
    i64,
);

impl Statements {
    async fn prepare(session: &Session, ks: &str) -> Result<Statements> {
        let prepare = |cql: String| async move {
            let mut p = session
                .prepare(cql.clone())
                .await
                .map_err(|e| unavailable(format!("preparing {cql}"), e))?;
            // Every statement here may be sent twice: inserts write the same row again.
            p.set_is_idempotent(true);
            Ok::<_, Error>(p)
        };
        let cols = facts::FACT_COLUMNS;
        Ok(Statements {
            insert_row: prepare(format!(
                "INSERT INTO {ks}.order_facts (sale_id, bucket, order_id, kind, rank, user_id, \
                 quantity, amount, currency, seq, idem_key, payment_token, at, charge_id) \
                 VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
            ))
            .await?,
            mark_published: prepare(format!(
                // An upsert of one cell (the row exists: only unpublished ones are marked).
                "INSERT INTO {ks}.order_facts (sale_id, bucket, order_id, kind, rank, published) \
                 VALUES (?, ?, ?, ?, ?, ?)"
            ))
            .await?,
            select_order: prepare(format!(
                "SELECT {cols} FROM {ks}.order_facts WHERE sale_id = ? AND bucket = ? \
                 AND order_id = ?"
            ))
            .await?,
            select_partition: prepare(format!(
                "SELECT {cols} FROM {ks}.order_facts WHERE sale_id = ? AND bucket = ?"
            ))
            .await?,
            insert_route: prepare(format!(
                "INSERT INTO {ks}.orders (order_id, sale_id, bucket) VALUES (?, ?, ?)"
            ))
            .await?,
            select_route: prepare(format!(
                "SELECT sale_id, bucket FROM {ks}.orders WHERE order_id = ?"
            ))
            .await?,
            insert_order_sale: prepare(format!(
                "INSERT INTO {ks}.order_sales (part, sale_id) VALUES (?, ?)"
            ))
            .await?,
            select_order_sales: prepare(format!(
                "SELECT sale_id FROM {ks}.order_sales WHERE part = ?"
            ))
            .await?,
            insert_sale: prepare(format!(
                "INSERT INTO {ks}.sales ({SALE_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
            ))
            .await?,
            select_sale: prepare(format!(
                "SELECT {SALE_COLUMNS} FROM {ks}.sales WHERE id = ?"
            ))
            .await?,
            select_sales: prepare(format!("SELECT {SALE_COLUMNS} FROM {ks}.sales")).await?,
            insert_sale_buckets: prepare(format!(
                "INSERT INTO {ks}.sale_stock_buckets (sale_id, stock_buckets) VALUES (?, ?)"
            ))
            .await?,
            select_sale_buckets: prepare(format!(
                "SELECT stock_buckets FROM {ks}.sale_stock_buckets WHERE sale_id = ?"
            ))
            .await?,
            select_all_sale_buckets: prepare(format!(
                "SELECT sale_id, stock_buckets FROM {ks}.sale_stock_buckets"
            ))
            .await?,
            select_offset: prepare(format!(
                "SELECT next_offset FROM {ks}.consumer_offsets WHERE consumer = ? \
                 AND log_partition = ?"
            ))
            .await?,
        })
    }
}

/// Where an order's facts are.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct Place {
    sale: SaleId,
    bucket: i32,
}

/// The Scylla order store. See the module documentation for the data model.
pub struct ScyllaStore {
    session: Session,
    keyspace: String,
    st: Statements,
    /// Order id → its place (immutable once written, so caching it is always right).
    routes: moka::sync::Cache<OrderId, Place>,
    /// Status changes, releases, notifications, refunds and deferrals of this process read
    /// their preconditions and write under this lock (see the module documentation).
    write_lock: tokio::sync::Mutex<()>,
    /// Checkpoints likewise (read, compare, write).
    offsets_lock: tokio::sync::Mutex<()>,
    /// Stock additions likewise.
    catalog_lock: tokio::sync::Mutex<()>,
}

impl std::fmt::Debug for ScyllaStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ScyllaStore")
            .field("keyspace", &self.keyspace)
            .finish_non_exhaustive()
    }
}

async fn session(config: &ScyllaConfig) -> Result<Session> {
    let profile = ExecutionProfile::builder()
        .consistency(config.consistency.driver())
        .request_timeout(Some(config.request_timeout))
        .load_balancing_policy(DefaultPolicy::builder().token_aware(true).build())
        .retry_policy(Arc::new(DefaultRetryPolicy::new()))
        .build();
    SessionBuilder::new()
        .known_nodes(&config.nodes)
        .connection_timeout(CONNECT_TIMEOUT)
        .default_execution_profile_handle(profile.into_handle())
        // `migrate` awaits schema agreement itself, where there are peers to agree with.
        .auto_await_schema_agreement(false)
        .build()
        .await
        .map_err(|e| unavailable(format!("cannot connect to {}", config.nodes.join(",")), e))
}

impl ScyllaStore {
    /// Connects to the cluster and checks the keyspace is at the latest schema.
    pub async fn connect(config: &ScyllaConfig) -> Result<Self> {
        let session = session(config).await?;
        schema::check(&session, &config.keyspace).await?;
        let st = Statements::prepare(&session, &config.keyspace).await?;
        Ok(ScyllaStore {
            session,
            keyspace: config.keyspace.clone(),
            st,
            routes: moka::sync::Cache::new(ROUTES_CACHED),
            write_lock: tokio::sync::Mutex::new(()),
            offsets_lock: tokio::sync::Mutex::new(()),
            catalog_lock: tokio::sync::Mutex::new(()),
        })
    }

    /// Creates the keyspace (if missing, with the configured replication) and applies the
    /// migrations not applied yet; returns the versions applied by this call.
    pub async fn migrate(config: &ScyllaConfig) -> Result<Vec<u32>> {
        let session = session(config).await?;
        schema::migrate(&session, &config.keyspace, &config.replication.cql()).await
    }

    // ---- reads ---------------------------------------------------------------------

    async fn rows(
        &self,
        stmt: &PreparedStatement,
        values: impl scylla::serialize::row::SerializeRow,
    ) -> Result<Vec<FactRow>> {
        let pager = self
            .session
            .execute_iter(stmt.clone(), values)
            .await
            .map_err(|e| unavailable("reading order facts", e))?;
        pager
            .rows_stream::<RawFact>()
            .map_err(|e| unavailable("reading order facts", e))?
            .map_ok(FactRow::from)
            .try_collect()
            .await
            .map_err(|e| unavailable("reading order facts", e))
    }

    async fn place(&self, id: OrderId) -> Result<Option<Place>> {
        if let Some(p) = self.routes.get(&id) {
            return Ok(Some(p));
        }
        let rows = self
            .session
            .execute_unpaged(&self.st.select_route, (id.0,))
            .await
            .map_err(|e| unavailable("reading an order's place", e))?
            .into_rows_result()
            .map_err(|e| unavailable("reading an order's place", e))?;
        let Some((sale, bucket)) = rows
            .maybe_first_row::<(String, i32)>()
            .map_err(|e| unavailable("reading an order's place", e))?
        else {
            return Ok(None);
        };
        let place = Place {
            sale: SaleId::parse(sale).map_err(corrupt)?,
            bucket,
        };
        self.routes.insert(id, place.clone());
        Ok(Some(place))
    }

    /// One order, folded from its facts.
    async fn folded(&self, id: OrderId) -> Result<Option<(Place, Folded)>> {
        let Some(place) = self.place(id).await? else {
            return Ok(None);
        };
        let rows = self
            .rows(
                &self.st.select_order,
                (place.sale.as_str(), place.bucket, id.0),
            )
            .await?;
        Ok(facts::fold(&place.sale, id, &rows)
            .map_err(corrupt)?
            .map(|f| (place, f)))
    }

    /// Several orders (unknown ones left out), read at once.
    async fn folded_many(&self, ids: &[OrderId]) -> Result<HashMap<OrderId, (Place, Folded)>> {
        let reads: Vec<_> = ids
            .iter()
            .map(|&id| async move { self.folded(id).await.map(|f| f.map(|f| (id, f))) })
            .collect();
        let reads = futures_util::stream::iter(reads)
            .buffer_unordered(READS_AT_ONCE)
            .try_collect::<Vec<_>>()
            .await?;
        Ok(reads.into_iter().flatten().collect())
    }

    /// Every order of a sale, folded (the sale's partitions read at once).
    async fn sale_orders(&self, sale: &SaleId) -> Result<Vec<Folded>> {
        let parts = futures_util::stream::iter((0..BUCKETS).map(|bucket| async move {
            let rows = self
                .rows(&self.st.select_partition, (sale.as_str(), bucket))
                .await?;
            facts::fold_all(sale, &rows).map_err(corrupt)
        }))
        .buffer_unordered(READS_AT_ONCE)
        .try_collect::<Vec<_>>()
        .await?;
        Ok(parts.into_iter().flatten().collect())
    }

    /// The sales that have orders.
    async fn sales_with_orders(&self) -> Result<Vec<SaleId>> {
        let rows = self
            .session
            .execute_unpaged(&self.st.select_order_sales, (0_i32,))
            .await
            .map_err(|e| unavailable("reading the sales with orders", e))?
            .into_rows_result()
            .map_err(|e| unavailable("reading the sales with orders", e))?;
        rows.rows::<(String,)>()
            .map_err(|e| unavailable("reading the sales with orders", e))?
            .map(|r| {
                let (s,) = r.map_err(|e| unavailable("reading the sales with orders", e))?;
                SaleId::parse(s).map_err(corrupt)
            })
            .collect()
    }

    /// Every order of every sale that has orders, kept if `keep` says so (the sweeps and
    /// listings: each reads the buckets of every sale with orders and filters).
    async fn every_order(&self, keep: impl Fn(&Folded) -> bool) -> Result<Vec<Folded>> {
        let sales = self.sales_with_orders().await?;
        let mut out = Vec::new();
        for sale in &sales {
            out.extend(self.sale_orders(sale).await?.into_iter().filter(&keep));
        }
        Ok(out)
    }

    /// Orders kept by `keep`, sorted by `key`, at most `limit`.
    async fn listing<K: Ord>(
        &self,
        limit: usize,
        keep: impl Fn(&Folded) -> bool,
        key: impl Fn(&Folded) -> K,
    ) -> Result<Vec<Order>> {
        if limit == 0 {
            return Ok(Vec::new());
        }
        let mut found = self.every_order(keep).await?;
        found.sort_by_key(|f| key(f));
        Ok(found.into_iter().take(limit).map(|f| f.order).collect())
    }

    // ---- writes --------------------------------------------------------------------

    /// Runs one unlogged batch per partition, all partitions at once: Scylla applies a
    /// batch of one partition atomically and in isolation.
    async fn write_rows(
        &self,
        by_partition: BTreeMap<(String, i32), Vec<RowValues>>,
        what: &'static str,
    ) -> Result<()> {
        let writes = by_partition.into_values().map(|values| {
            let mut batch = Batch::new(BatchType::Unlogged);
            batch.set_is_idempotent(true);
            for _ in &values {
                batch.append_statement(self.st.insert_row.clone());
            }
            async move {
                self.session
                    .batch(&batch, values)
                    .await
                    .map(drop)
                    .map_err(|e| unavailable(what, e))
            }
        });
        futures_util::future::try_join_all(writes).await.map(drop)
    }

    async fn read_sale(&self, id: &SaleId) -> Result<Option<Sale>> {
        let rows = self
            .session
            .execute_unpaged(&self.st.select_sale, (id.as_str(),))
            .await
            .map_err(|e| unavailable("reading a sale", e))?
            .into_rows_result()
            .map_err(|e| unavailable("reading a sale", e))?;
        let Some(mut sale) = rows
            .maybe_first_row::<SaleRow>()
            .map_err(|e| unavailable("reading a sale", e))?
            .map(sale_of_row)
            .transpose()?
        else {
            return Ok(None);
        };
        let buckets = self
            .session
            .execute_unpaged(&self.st.select_sale_buckets, (id.as_str(),))
            .await
            .map_err(|e| unavailable("reading a sale", e))?
            .into_rows_result()
            .map_err(|e| unavailable("reading a sale", e))?
            .maybe_first_row::<(Option<i32>,)>()
            .map_err(|e| unavailable("reading a sale", e))?;
        sale.stock_buckets = buckets_of(buckets.and_then(|(n,)| n))?;
        Ok(Some(sale))
    }

    async fn write_sale(&self, s: &Sale) -> Result<()> {
        self.session
            .execute_unpaged(
                &self.st.insert_sale,
                (
                    s.id.as_str(),
                    s.sku.as_str(),
                    s.stock as i32,
                    s.price.minor,
                    s.price.currency.as_str(),
                    s.starts_at.millis(),
                    s.ends_at.millis(),
                    s.per_user_limit as i32,
                    s.max_quantity_per_order as i32,
                    s.user_rate.per_second as i32,
                    s.user_rate.burst as i32,
                    s.created_at.millis(),
                ),
            )
            .await
            .map(drop)
            .map_err(|e| unavailable("writing a sale", e))
    }
}

/// The values of one `order_facts` insert: the key, then the order's own columns (unset
/// on the other rows), `at` and the charge id (unset when there is none, so no write leaves
/// a tombstone).
type RowValues = (
    String,
    i32,
    Uuid,
    i32,
    i32,
    MaybeUnset<String>,
    MaybeUnset<i32>,
    MaybeUnset<i64>,
    MaybeUnset<String>,
    MaybeUnset<i64>,
    MaybeUnset<String>,
    MaybeUnset<String>,
    i64,
    MaybeUnset<String>,
);

fn opt<T>(v: Option<T>) -> MaybeUnset<T> {
    v.map_or(MaybeUnset::Unset, MaybeUnset::Set)
}

/// A fact of `order` in `place`.
fn fact_row(
    place: &Place,
    order: OrderId,
    kind: Kind,
    rank: i32,
    at: i64,
    charge_id: Option<String>,
) -> RowValues {
    keyed_row(place, order, kind, rank, at, charge_id, None)
}

/// A fact with a key (a document's object key, in the column of keys).
fn keyed_row(
    place: &Place,
    order: OrderId,
    kind: Kind,
    rank: i32,
    at: i64,
    charge_id: Option<String>,
    key: Option<String>,
) -> RowValues {
    use MaybeUnset::Unset;
    (
        place.sale.as_str().to_owned(),
        place.bucket,
        order.0,
        kind as i32,
        rank,
        Unset,
        Unset,
        Unset,
        Unset,
        Unset,
        opt(key),
        Unset,
        at,
        opt(charge_id),
    )
}

/// The order's own row.
fn order_row(place: &Place, o: &NewOrder) -> RowValues {
    use MaybeUnset::{Set, Unset};
    (
        place.sale.as_str().to_owned(),
        place.bucket,
        o.order_id.0,
        Kind::Order as i32,
        0,
        Set(o.user_id.as_str().to_owned()),
        Set(o.quantity as i32),
        Set(o.amount.minor),
        Set(o.amount.currency.as_str().to_owned()),
        Set(o.sequence as i64),
        Set(o.idempotency_key.clone()),
        Set(o.payment_token.clone()),
        o.accepted_at.millis(),
        Unset,
    )
}

/// A sale's stock buckets as stored (absent: a sale from before V2, one bucket).
fn buckets_of(n: Option<i32>) -> Result<u32> {
    n.map_or(Ok(1), |v| {
        u32::try_from(v).map_err(|_| Error::Corrupt(format!("sale_stock_buckets: {v}")))
    })
}

/// The sale of a `sales` row; its stock buckets are read beside ([`buckets_of`]).
fn sale_of_row(r: SaleRow) -> Result<Sale> {
    let n = |v: i32| u32::try_from(v).map_err(|_| Error::Corrupt(format!("sales: {v}")));
    Ok(Sale {
        id: SaleId::parse(r.0).map_err(corrupt)?,
        sku: r.1,
        stock: n(r.2)?,
        price: Money {
            minor: r.3,
            currency: Currency::parse(&r.4).map_err(corrupt)?,
        },
        starts_at: Timestamp(r.5),
        ends_at: Timestamp(r.6),
        per_user_limit: n(r.7)?,
        max_quantity_per_order: n(r.8)?,
        user_rate: UserRate {
            per_second: n(r.9)?,
            burst: n(r.10)?,
        },
        created_at: Timestamp(r.11),
        stock_buckets: 1,
    })
}

/// The facts a planned batch writes, by partition.
fn facts_of_plan(
    plan: &batch::Plan,
    found: &HashMap<OrderId, (Place, Folded)>,
) -> BTreeMap<(String, i32), Vec<RowValues>> {
    let mut out: BTreeMap<(String, i32), Vec<RowValues>> = BTreeMap::new();
    let mut push = |id: OrderId, kind: Kind, rank: i32, at: i64, charge: Option<String>, key| {
        if let Some((place, _)) = found.get(&id) {
            out.entry((place.sale.as_str().to_owned(), place.bucket))
                .or_default()
                .push(keyed_row(place, id, kind, rank, at, charge, key));
        }
    };
    let update_of: HashMap<OrderId, &batch::RowUpdate> =
        plan.updates.iter().map(|u| (u.id, u)).collect();
    for h in &plan.history {
        // The charge id goes with `paid` (the plan keeps the last one given).
        let charge = update_of
            .get(&h.id)
            .filter(|_| h.status == OrderStatus::Paid)
            .and_then(|u| u.charge_id.clone());
        push(
            h.id,
            Kind::Status,
            status_rank(h.status),
            h.at,
            charge,
            None,
        );
    }
    let now = Timestamp::now().millis();
    for u in &plan.updates {
        if let Some(at) = u.released_at {
            push(u.id, Kind::Released, 0, at, None, None);
        }
        if let Some(at) = u.notified_at {
            push(u.id, Kind::Notified, status_rank(u.status), at, None, None);
        }
        if let Some(state) = u.refund {
            let charge = (state == RefundState::Owed)
                .then(|| u.charge_id.clone())
                .flatten();
            push(u.id, Kind::Refund, refund_rank(state), now, charge, None);
        }
        if let (Some(n), Some(after)) = (u.failed_attempts, u.retry_after) {
            let rank = i32::try_from(n).unwrap_or(i32::MAX);
            push(u.id, Kind::Deferred, rank, after, None, None);
        }
        for (rank, key) in [(0, &u.receipt_key), (1, &u.refund_note_key)] {
            if key.is_some() {
                push(u.id, Kind::Document, rank, now, None, key.clone());
            }
        }
    }
    out
}

fn check_charge_ids(changes: &[Change]) -> Result<()> {
    let too_long = changes.iter().any(|c| match c {
        Change::Status { charge_id, .. } | Change::Refund { charge_id, .. } => {
            charge_id.as_ref().is_some_and(|c| c.len() > MAX_CHARGE_ID)
        }
        _ => false,
    });
    if too_long {
        return Err(Error::Invalid(InvalidValue {
            field: "charge_id",
            reason: "must be at most 200 bytes",
        }));
    }
    Ok(())
}

#[async_trait]
impl OrderStore for ScyllaStore {
    async fn create_sale(&self, sale: &Sale) -> Result<()> {
        sale.validate()?;
        let _guard = self.catalog_lock.lock().await;
        if self.read_sale(&sale.id).await?.is_some() {
            return Err(Error::SaleExists(sale.id.clone()));
        }
        // The buckets first: a sale row is only ever read with its buckets known.
        self.session
            .execute_unpaged(
                &self.st.insert_sale_buckets,
                (sale.id.as_str(), sale.stock_buckets as i32),
            )
            .await
            .map_err(|e| unavailable("writing a sale", e))?;
        self.write_sale(sale).await
    }

    async fn get_sale(&self, id: &SaleId) -> Result<Option<Sale>> {
        self.read_sale(id).await
    }

    async fn list_sales(&self) -> Result<Vec<Sale>> {
        let pager = self
            .session
            .execute_iter(self.st.select_sales.clone(), ())
            .await
            .map_err(|e| unavailable("listing sales", e))?;
        let rows: Vec<SaleRow> = pager
            .rows_stream::<SaleRow>()
            .map_err(|e| unavailable("listing sales", e))?
            .try_collect()
            .await
            .map_err(|e| unavailable("listing sales", e))?;
        let buckets: HashMap<String, Option<i32>> = self
            .session
            .execute_iter(self.st.select_all_sale_buckets.clone(), ())
            .await
            .map_err(|e| unavailable("listing sales", e))?
            .rows_stream::<(String, Option<i32>)>()
            .map_err(|e| unavailable("listing sales", e))?
            .try_collect::<Vec<_>>()
            .await
            .map_err(|e| unavailable("listing sales", e))?
            .into_iter()
            .collect();
        let mut sales = rows
            .into_iter()
            .map(|r| {
                let mut sale = sale_of_row(r)?;
                sale.stock_buckets = buckets_of(buckets.get(sale.id.as_str()).copied().flatten())?;
                Ok(sale)
            })
            .collect::<Result<Vec<_>>>()?;
        sales.sort_by(|a, b| (a.created_at, &a.id).cmp(&(b.created_at, &b.id)));
        Ok(sales)
    }

    async fn add_stock(&self, id: &SaleId, units: u32) -> Result<Sale> {
        let _guard = self.catalog_lock.lock().await;
        let mut sale = self
            .read_sale(id)
            .await?
            .ok_or_else(|| Error::UnknownSale(id.clone()))?;
        let total = u64::from(sale.stock) + u64::from(units);
        if total > u64::from(MAX_STOCK) {
            return Err(Error::Invalid(InvalidValue {
                field: "units",
                reason: "the sale's stock would exceed 100000000",
            }));
        }
        sale.stock = total as u32;
        self.write_sale(&sale).await?;
        Ok(sale)
    }

    async fn persist_batch(
        &self,
        orders: &[NewOrder],
        checkpoint: Option<&Checkpoint>,
    ) -> Result<usize> {
        // Which are new: an order whose `orders` row exists is held (written last).
        let mut seen = std::collections::HashSet::new();
        let unique: Vec<&NewOrder> = orders.iter().filter(|o| seen.insert(o.order_id)).collect();
        let held: Vec<_> = unique.iter().map(|o| self.place(o.order_id)).collect();
        let held = futures_util::stream::iter(held)
            .buffered(READS_AT_ONCE)
            .map_ok(|p| p.is_some())
            .try_collect::<Vec<bool>>()
            .await?;
        let new: Vec<&NewOrder> = unique
            .into_iter()
            .zip(held)
            .filter(|(_, held)| !held)
            .map(|(o, _)| o)
            .collect();
        if !new.is_empty() {
            // The sales first (a listing reads their partitions), then each partition's
            // orders and their first two statuses in one batch, then the places.
            let sales: std::collections::BTreeSet<&str> =
                new.iter().map(|o| o.sale_id.as_str()).collect();
            futures_util::future::try_join_all(sales.into_iter().map(|s| async move {
                self.session
                    .execute_unpaged(&self.st.insert_order_sale, (0_i32, s))
                    .await
                    .map_err(|e| unavailable("recording a sale with orders", e))
            }))
            .await?;
            let now = Timestamp::now().millis();
            let mut rows: BTreeMap<(String, i32), Vec<RowValues>> = BTreeMap::new();
            for o in &new {
                let place = Place {
                    sale: o.sale_id.clone(),
                    bucket: bucket_of(o.order_id),
                };
                let part = rows
                    .entry((place.sale.as_str().to_owned(), place.bucket))
                    .or_default();
                part.push(order_row(&place, o));
                for (status, at) in [
                    (OrderStatus::Accepted, o.accepted_at.millis()),
                    (OrderStatus::Persisted, now),
                ] {
                    part.push(fact_row(
                        &place,
                        o.order_id,
                        Kind::Status,
                        status_rank(status),
                        at,
                        None,
                    ));
                }
            }
            self.write_rows(rows, "persisting orders").await?;
            futures_util::future::try_join_all(new.iter().map(|o| async move {
                let bucket = bucket_of(o.order_id);
                self.session
                    .execute_unpaged(
                        &self.st.insert_route,
                        (o.order_id.0, o.sale_id.as_str(), bucket),
                    )
                    .await
                    .map_err(|e| unavailable("persisting orders", e))?;
                self.routes.insert(
                    o.order_id,
                    Place {
                        sale: o.sale_id.clone(),
                        bucket,
                    },
                );
                Ok::<_, Error>(())
            }))
            .await?;
        }
        if let Some(cp) = checkpoint {
            let _guard = self.offsets_lock.lock().await;
            let stored = self.checkpoint(&cp.consumer, cp.partition).await?;
            if stored.is_none_or(|s| s < cp.next_offset) {
                // The offset is the write's timestamp too: on a cluster the highest offset
                // wins however two writers interleave.
                let ts = i64::try_from(cp.next_offset).unwrap_or(i64::MAX);
                self.session
                    .query_unpaged(
                        format!(
                            "INSERT INTO {}.consumer_offsets (consumer, log_partition, \
                             next_offset) VALUES (?, ?, ?) USING TIMESTAMP {ts}",
                            self.keyspace
                        ),
                        (cp.consumer.as_str(), cp.partition as i32, ts),
                    )
                    .await
                    .map_err(|e| unavailable("writing a checkpoint", e))?;
            }
        }
        Ok(new.len())
    }

    async fn checkpoint(&self, consumer: &str, partition: u32) -> Result<Option<u64>> {
        let rows = self
            .session
            .execute_unpaged(&self.st.select_offset, (consumer, partition as i32))
            .await
            .map_err(|e| unavailable("reading a checkpoint", e))?
            .into_rows_result()
            .map_err(|e| unavailable("reading a checkpoint", e))?;
        Ok(rows
            .maybe_first_row::<(i64,)>()
            .map_err(|e| unavailable("reading a checkpoint", e))?
            .and_then(|(n,)| u64::try_from(n).ok()))
    }

    async fn transition(
        &self,
        id: OrderId,
        from: OrderStatus,
        to: OrderStatus,
        charge_id: Option<&str>,
    ) -> Result<bool> {
        crate::transition(from, to)?;
        let change = Change::Status {
            id,
            from,
            to,
            charge_id: charge_id.map(str::to_owned),
        };
        Ok(self.apply_batch(&[change]).await?.first() == Some(&true))
    }

    async fn apply_batch(&self, changes: &[Change]) -> Result<Vec<bool>> {
        if changes.is_empty() {
            return Ok(Vec::new());
        }
        check_charge_ids(changes)?;
        batch::check_document_keys(changes)?;
        let _guard = self.write_lock.lock().await;
        let ids = batch::touched(changes);
        let found = self.folded_many(&ids).await?;
        let current: HashMap<OrderId, batch::Current> = found
            .iter()
            .map(|(id, (_, f))| (*id, f.current()))
            .collect();
        let plan = batch::plan(changes, &current, Timestamp::now().millis());
        let writes = facts_of_plan(&plan, &found);
        if !writes.is_empty() {
            self.write_rows(writes, "writing order facts").await?;
        }
        Ok(plan.applied)
    }

    async fn mark_released(&self, id: OrderId) -> Result<bool> {
        Ok(self.apply_batch(&[Change::Released(id)]).await?.first() == Some(&true))
    }

    async fn mark_notified(&self, id: OrderId) -> Result<bool> {
        Ok(self.apply_batch(&[Change::Notified(id)]).await?.first() == Some(&true))
    }

    async fn get_order(&self, id: OrderId) -> Result<Option<Order>> {
        Ok(self.folded(id).await?.map(|(_, f)| f.order))
    }

    async fn orders_in_status(&self, statuses: &[OrderStatus], limit: usize) -> Result<Vec<Order>> {
        self.listing(
            limit,
            |f| statuses.contains(&f.order.status),
            |f| (f.order.new.accepted_at, f.order.new.order_id),
        )
        .await
    }

    async fn orders_due(
        &self,
        statuses: &[OrderStatus],
        now: Timestamp,
        limit: usize,
    ) -> Result<Vec<Order>> {
        self.listing(
            limit,
            |f| statuses.contains(&f.order.status) && f.order.retry_after.is_none_or(|t| t <= now),
            |f| (f.order.new.accepted_at, f.order.new.order_id),
        )
        .await
    }

    async fn refunds_owed(&self, limit: usize) -> Result<Vec<Order>> {
        self.listing(
            limit,
            |f| f.order.refund == Some(RefundState::Owed),
            |f| (f.order.new.accepted_at, f.order.new.order_id),
        )
        .await
    }

    async fn unfinished_followups(&self, limit: usize) -> Result<Vec<Order>> {
        self.listing(
            limit,
            |f| {
                let o = &f.order;
                (o.status.releases_stock() && o.released_at.is_none())
                    || (o.status.is_final() && o.notified_at.is_none())
            },
            |f| (f.order.new.accepted_at, f.order.new.order_id),
        )
        .await
    }

    async fn documents_owed(&self, limit: usize) -> Result<Vec<Order>> {
        self.listing(
            limit,
            |f| f.order.document_owed().is_some(),
            |f| (f.order.new.accepted_at, f.order.new.order_id),
        )
        .await
    }

    async fn orders_of_sale(&self, sale: &SaleId) -> Result<Vec<Order>> {
        let mut orders: Vec<Order> = self
            .sale_orders(sale)
            .await?
            .into_iter()
            .map(|f| f.order)
            .collect();
        orders.sort_by_key(|o| (o.new.sequence, o.new.order_id));
        Ok(orders)
    }

    async fn sale_totals(&self, sale: &SaleId) -> Result<SaleTotals> {
        let mut totals = SaleTotals::default();
        let mut by_status: BTreeMap<&'static str, StatusCount> = BTreeMap::new();
        for f in self.sale_orders(sale).await? {
            let o = &f.order;
            let units = u64::from(o.new.quantity);
            totals.orders += 1;
            totals.units += units;
            if o.released_at.is_some() {
                totals.released_orders += 1;
                totals.released_units += units;
            }
            let c = by_status.entry(o.status.as_str()).or_insert(StatusCount {
                status: o.status,
                orders: 0,
                units: 0,
            });
            c.orders += 1;
            c.units += units;
        }
        totals.by_status = by_status.into_values().collect();
        Ok(totals)
    }

    async fn pending_since(&self, before: Timestamp, limit: usize) -> Result<Vec<Order>> {
        self.listing(
            limit,
            |f| f.order.status == OrderStatus::PaymentPending && f.entered_at < before,
            |f| (f.entered_at, f.order.new.order_id),
        )
        .await
    }

    async fn unpublished_events(&self, limit: usize) -> Result<Vec<OrderEvent>> {
        if limit == 0 {
            return Ok(Vec::new());
        }
        let found = self.every_order(|f| !f.unpublished.is_empty()).await?;
        let mut events: Vec<OrderEvent> = found.iter().flat_map(Folded::events).collect();
        events.sort_by_key(|e| (e.at, status_rank(e.status), e.order_id));
        events.truncate(limit);
        Ok(events)
    }

    async fn mark_published(&self, events: &[(OrderId, OrderStatus)]) -> Result<usize> {
        let mut wanted: BTreeMap<OrderId, Vec<OrderStatus>> = BTreeMap::new();
        for (id, status) in events {
            let v = wanted.entry(*id).or_default();
            if !v.contains(status) {
                v.push(*status);
            }
        }
        let ids: Vec<OrderId> = wanted.keys().copied().collect();
        let found = self.folded_many(&ids).await?;
        let mut marks = Vec::new();
        for (id, statuses) in &wanted {
            let Some((place, f)) = found.get(id) else {
                continue;
            };
            for s in statuses {
                if f.unpublished.iter().any(|(u, ..)| u == s) {
                    marks.push((place.clone(), *id, *s));
                }
            }
        }
        let count = marks.len();
        futures_util::stream::iter(marks.into_iter().map(|(place, id, status)| async move {
            self.session
                .execute_unpaged(
                    &self.st.mark_published,
                    (
                        place.sale.as_str().to_owned(),
                        place.bucket,
                        id.0,
                        Kind::Status as i32,
                        status_rank(status),
                        true,
                    ),
                )
                .await
                .map(drop)
                .map_err(|e| unavailable("marking events published", e))
        }))
        .buffer_unordered(READS_AT_ONCE)
        .try_collect::<Vec<()>>()
        .await?;
        Ok(count)
    }

    async fn ping(&self) -> Result<()> {
        self.session
            .query_unpaged(
                format!("SELECT version FROM {}.schema_migrations", self.keyspace),
                &[],
            )
            .await
            .map(drop)
            .map_err(|e| unavailable("ping", e))
    }
}
