//! The embedded order store on SQLite: WAL journal, batched transactions, migrations by
//! `rusqlite_migration`.
//!
//! One connection behind a mutex serves every call on tokio's blocking pool: SQLite has a
//! single writer anyway, and batches keep the number of transactions small.

use crate::{
    model::*, Checkpoint, Error, Order, OrderStore, Result, Sale, SaleId, SaleTotals, StatusCount,
};
use async_trait::async_trait;
use rusqlite::{params, Connection, OptionalExtension, Row};
use rusqlite_migration::{Migrations, M};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

fn migrations() -> Migrations<'static> {
    Migrations::new(vec![
        M::up(include_str!("../migrations/0001_initial.sql")),
        M::up(include_str!("../migrations/0002_outbox.sql")),
    ])
}

fn unavailable(e: impl std::fmt::Display) -> Error {
    Error::Unavailable(e.to_string())
}

/// SQLite-backed [`OrderStore`].
#[derive(Clone)]
pub struct SqliteStore {
    conn: Arc<Mutex<Connection>>,
    path: PathBuf,
}

impl std::fmt::Debug for SqliteStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqliteStore")
            .field("path", &self.path)
            .finish()
    }
}

impl SqliteStore {
    /// Opens (creating if needed) the database at `path` and applies pending migrations.
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref().to_path_buf();
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(unavailable)?;
        }
        let mut conn = Connection::open(&path).map_err(unavailable)?;
        conn.pragma_update(None, "journal_mode", "WAL")
            .map_err(unavailable)?;
        // FULL: a committed batch (and its log checkpoint) survives power loss, not only a
        // killed process.
        conn.pragma_update(None, "synchronous", "FULL")
            .map_err(unavailable)?;
        conn.pragma_update(None, "foreign_keys", "ON")
            .map_err(unavailable)?;
        conn.busy_timeout(std::time::Duration::from_secs(5))
            .map_err(unavailable)?;
        migrations().to_latest(&mut conn).map_err(unavailable)?;
        Ok(SqliteStore {
            conn: Arc::new(Mutex::new(conn)),
            path,
        })
    }

    /// Where the database lives.
    pub fn path(&self) -> &Path {
        &self.path
    }

    async fn with<T, F>(&self, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&mut Connection) -> Result<T> + Send + 'static,
    {
        let conn = Arc::clone(&self.conn);
        tokio::task::spawn_blocking(move || {
            let mut guard = conn
                .lock()
                .map_err(|_| Error::Unavailable("store connection poisoned".into()))?;
            f(&mut guard)
        })
        .await
        .map_err(unavailable)?
    }
}

fn sale_from_row(body: String, stock: i64) -> Result<Sale> {
    let mut sale: Sale = serde_json::from_str(&body).map_err(|e| Error::Corrupt(e.to_string()))?;
    sale.stock = u32::try_from(stock).map_err(|e| Error::Corrupt(e.to_string()))?;
    Ok(sale)
}

const ORDER_COLUMNS: &str = "order_id, sale_id, user_id, quantity, amount_minor, currency, \
     sequence, idempotency_key, payment_token, status, accepted_at, charge_id, released_at, \
     notified_at";

fn corrupt(e: impl std::fmt::Display) -> Error {
    Error::Corrupt(e.to_string())
}

fn order_from_row(row: &Row<'_>) -> Result<Order> {
    let get_s = |i: usize| row.get::<_, String>(i).map_err(corrupt);
    let new = NewOrder {
        order_id: get_s(0)?.parse().map_err(corrupt)?,
        sale_id: SaleId::parse(get_s(1)?).map_err(corrupt)?,
        user_id: UserId::parse(get_s(2)?).map_err(corrupt)?,
        quantity: row.get(3).map_err(corrupt)?,
        amount: Money {
            minor: row.get(4).map_err(corrupt)?,
            currency: Currency::parse(&get_s(5)?).map_err(corrupt)?,
        },
        sequence: row.get::<_, i64>(6).map_err(corrupt)? as u64,
        idempotency_key: get_s(7)?,
        payment_token: get_s(8)?,
        accepted_at: Timestamp(row.get(10).map_err(corrupt)?),
    };
    Ok(Order {
        new,
        status: get_s(9)?.parse().map_err(corrupt)?,
        history: Vec::new(),
        charge_id: row.get(11).map_err(corrupt)?,
        released_at: row
            .get::<_, Option<i64>>(12)
            .map_err(corrupt)?
            .map(Timestamp),
        notified_at: row
            .get::<_, Option<i64>>(13)
            .map_err(corrupt)?
            .map(Timestamp),
    })
}

fn query_orders(conn: &Connection, sql: &str, params: impl rusqlite::Params) -> Result<Vec<Order>> {
    let mut stmt = conn.prepare_cached(sql).map_err(unavailable)?;
    let mut rows = stmt.query(params).map_err(unavailable)?;
    let mut out = Vec::new();
    while let Some(row) = rows.next().map_err(unavailable)? {
        out.push(order_from_row(row)?);
    }
    Ok(out)
}

fn status_list(statuses: &[OrderStatus]) -> String {
    // Statuses come from the enum, never from input: safe to inline as literals.
    statuses
        .iter()
        .map(|s| format!("'{}'", s.as_str()))
        .collect::<Vec<_>>()
        .join(",")
}

#[async_trait]
impl OrderStore for SqliteStore {
    async fn create_sale(&self, sale: &Sale) -> Result<()> {
        let sale = sale.clone();
        self.with(move |c| {
            let body = serde_json::to_string(&sale).map_err(corrupt)?;
            let n = c
                .execute(
                    "INSERT INTO sales (id, body, stock, created_at) VALUES (?1, ?2, ?3, ?4) \
                     ON CONFLICT (id) DO NOTHING",
                    params![sale.id.as_str(), body, sale.stock, sale.created_at.millis()],
                )
                .map_err(unavailable)?;
            if n == 0 {
                return Err(Error::SaleExists(sale.id));
            }
            Ok(())
        })
        .await
    }

    async fn get_sale(&self, id: &SaleId) -> Result<Option<Sale>> {
        let id = id.clone();
        self.with(move |c| {
            let row: Option<(String, i64)> = c
                .prepare_cached("SELECT body, stock FROM sales WHERE id = ?1")
                .map_err(unavailable)?
                .query_row(params![id.as_str()], |r| Ok((r.get(0)?, r.get(1)?)))
                .optional()
                .map_err(unavailable)?;
            row.map(|(b, s)| sale_from_row(b, s)).transpose()
        })
        .await
    }

    async fn list_sales(&self) -> Result<Vec<Sale>> {
        self.with(|c| {
            let mut stmt = c
                .prepare_cached("SELECT body, stock FROM sales ORDER BY created_at")
                .map_err(unavailable)?;
            let rows = stmt
                .query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?)))
                .map_err(unavailable)?;
            let mut out = Vec::new();
            for row in rows {
                let (b, s) = row.map_err(unavailable)?;
                out.push(sale_from_row(b, s)?);
            }
            Ok(out)
        })
        .await
    }

    async fn add_stock(&self, id: &SaleId, units: u32) -> Result<Sale> {
        let id = id.clone();
        self.with(move |c| {
            let tx = c.transaction().map_err(unavailable)?;
            let n = tx
                .execute(
                    "UPDATE sales SET stock = stock + ?2 WHERE id = ?1 AND stock + ?2 <= ?3",
                    params![id.as_str(), units, MAX_STOCK],
                )
                .map_err(unavailable)?;
            if n == 0 {
                let exists = tx
                    .query_row(
                        "SELECT 1 FROM sales WHERE id = ?1",
                        params![id.as_str()],
                        |_| Ok(()),
                    )
                    .optional()
                    .map_err(unavailable)?
                    .is_some();
                return Err(if exists {
                    Error::Invalid(InvalidValue {
                        field: "quantity",
                        reason: "the sale's stock would exceed 100000000 units",
                    })
                } else {
                    Error::UnknownSale(id)
                });
            }
            let (b, s): (String, i64) = tx
                .query_row(
                    "SELECT body, stock FROM sales WHERE id = ?1",
                    params![id.as_str()],
                    |r| Ok((r.get(0)?, r.get(1)?)),
                )
                .map_err(unavailable)?;
            tx.commit().map_err(unavailable)?;
            sale_from_row(b, s)
        })
        .await
    }

    async fn persist_batch(
        &self,
        orders: &[NewOrder],
        checkpoint: Option<&Checkpoint>,
    ) -> Result<usize> {
        let orders = orders.to_vec();
        let checkpoint = checkpoint.cloned();
        self.with(move |c| {
            let now = Timestamp::now().millis();
            let tx = c.transaction().map_err(unavailable)?;
            let mut inserted = 0;
            {
                let mut ins = tx
                    .prepare_cached(
                        "INSERT INTO orders (order_id, sale_id, user_id, quantity, amount_minor, \
                         currency, sequence, idempotency_key, payment_token, status, \
                         accepted_at, updated_at) \
                         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, 'persisted', ?10, ?11) \
                         ON CONFLICT (order_id) DO NOTHING",
                    )
                    .map_err(unavailable)?;
                let mut hist = tx
                    .prepare_cached(
                        "INSERT INTO order_history (order_id, status, at) VALUES (?1, ?2, ?3) \
                         ON CONFLICT DO NOTHING",
                    )
                    .map_err(unavailable)?;
                for o in &orders {
                    let id = o.order_id.to_string();
                    let n = ins
                        .execute(params![
                            id,
                            o.sale_id.as_str(),
                            o.user_id.as_str(),
                            o.quantity,
                            o.amount.minor,
                            o.amount.currency.as_str(),
                            o.sequence as i64,
                            o.idempotency_key,
                            o.payment_token,
                            o.accepted_at.millis(),
                            now,
                        ])
                        .map_err(unavailable)?;
                    if n == 1 {
                        inserted += 1;
                        hist.execute(params![id, "accepted", o.accepted_at.millis()])
                            .map_err(unavailable)?;
                        hist.execute(params![id, "persisted", now])
                            .map_err(unavailable)?;
                    }
                }
                if let Some(cp) = &checkpoint {
                    tx.execute(
                        "INSERT INTO consumer_offsets (consumer, partition, next_offset) \
                         VALUES (?1, ?2, ?3) ON CONFLICT (consumer, partition) \
                         DO UPDATE SET next_offset = max(next_offset, excluded.next_offset)",
                        params![cp.consumer, cp.partition, cp.next_offset as i64],
                    )
                    .map_err(unavailable)?;
                }
            }
            tx.commit().map_err(unavailable)?;
            Ok(inserted)
        })
        .await
    }

    async fn checkpoint(&self, consumer: &str, partition: u32) -> Result<Option<u64>> {
        let consumer = consumer.to_owned();
        self.with(move |c| {
            c.query_row(
                "SELECT next_offset FROM consumer_offsets WHERE consumer = ?1 AND partition = ?2",
                params![consumer, partition],
                |r| r.get::<_, i64>(0),
            )
            .optional()
            .map(|o| o.map(|v| v as u64))
            .map_err(unavailable)
        })
        .await
    }

    async fn transition(
        &self,
        id: OrderId,
        from: OrderStatus,
        to: OrderStatus,
        charge_id: Option<&str>,
    ) -> Result<bool> {
        transition(from, to)?;
        let charge_id = charge_id.map(str::to_owned);
        self.with(move |c| {
            let now = Timestamp::now().millis();
            let id = id.to_string();
            let tx = c.transaction().map_err(unavailable)?;
            let n = tx
                .prepare_cached(
                    "UPDATE orders SET status = ?3, updated_at = ?4, \
                     charge_id = coalesce(?5, charge_id) WHERE order_id = ?1 AND status = ?2",
                )
                .map_err(unavailable)?
                .execute(params![id, from.as_str(), to.as_str(), now, charge_id])
                .map_err(unavailable)?;
            if n == 1 {
                tx.prepare_cached(
                    "INSERT INTO order_history (order_id, status, at) VALUES (?1, ?2, ?3) \
                     ON CONFLICT DO NOTHING",
                )
                .map_err(unavailable)?
                .execute(params![id, to.as_str(), now])
                .map_err(unavailable)?;
            }
            tx.commit().map_err(unavailable)?;
            Ok(n == 1)
        })
        .await
    }

    async fn mark_released(&self, id: OrderId) -> Result<bool> {
        self.with(move |c| {
            let n = c
                .prepare_cached(
                    "UPDATE orders SET released_at = ?2 WHERE order_id = ?1 \
                     AND released_at IS NULL AND status IN ('payment_failed', 'expired')",
                )
                .map_err(unavailable)?
                .execute(params![id.to_string(), Timestamp::now().millis()])
                .map_err(unavailable)?;
            Ok(n == 1)
        })
        .await
    }

    async fn mark_notified(&self, id: OrderId) -> Result<bool> {
        self.with(move |c| {
            let n = c
                .prepare_cached(
                    "UPDATE orders SET notified_at = ?2 WHERE order_id = ?1 \
                     AND notified_at IS NULL",
                )
                .map_err(unavailable)?
                .execute(params![id.to_string(), Timestamp::now().millis()])
                .map_err(unavailable)?;
            Ok(n == 1)
        })
        .await
    }

    async fn get_order(&self, id: OrderId) -> Result<Option<Order>> {
        self.with(move |c| {
            let id = id.to_string();
            let sql = format!("SELECT {ORDER_COLUMNS} FROM orders WHERE order_id = ?1");
            let Some(mut order) = query_orders(c, &sql, params![id])?.pop() else {
                return Ok(None);
            };
            let mut stmt = c
                .prepare_cached(
                    "SELECT status, at FROM order_history WHERE order_id = ?1 ORDER BY at, rowid",
                )
                .map_err(unavailable)?;
            let rows = stmt
                .query_map(params![id], |r| {
                    Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?))
                })
                .map_err(unavailable)?;
            for row in rows {
                let (s, at) = row.map_err(unavailable)?;
                order.history.push(HistoryEntry {
                    status: s.parse().map_err(corrupt)?,
                    at: Timestamp(at),
                });
            }
            order.history.sort_by_key(|h| (h.at, h.status));
            Ok(Some(order))
        })
        .await
    }

    async fn orders_in_status(&self, statuses: &[OrderStatus], limit: usize) -> Result<Vec<Order>> {
        let sql = format!(
            "SELECT {ORDER_COLUMNS} FROM orders WHERE status IN ({}) \
             ORDER BY accepted_at LIMIT ?1",
            status_list(statuses)
        );
        self.with(move |c| query_orders(c, &sql, params![limit as i64]))
            .await
    }

    async fn unfinished_followups(&self, limit: usize) -> Result<Vec<Order>> {
        let sql = format!(
            "SELECT {ORDER_COLUMNS} FROM orders WHERE \
             (status IN ('payment_failed', 'expired') AND released_at IS NULL) OR \
             (status IN ('paid', 'payment_failed', 'expired') AND notified_at IS NULL) \
             ORDER BY accepted_at LIMIT ?1"
        );
        self.with(move |c| query_orders(c, &sql, params![limit as i64]))
            .await
    }

    async fn orders_of_sale(&self, sale: &SaleId) -> Result<Vec<Order>> {
        let sale = sale.clone();
        let sql =
            format!("SELECT {ORDER_COLUMNS} FROM orders WHERE sale_id = ?1 ORDER BY sequence");
        self.with(move |c| query_orders(c, &sql, params![sale.as_str()]))
            .await
    }

    async fn sale_totals(&self, sale: &SaleId) -> Result<SaleTotals> {
        let sale = sale.clone();
        self.with(move |c| {
            let mut totals = SaleTotals::default();
            let mut stmt = c
                .prepare_cached(
                    "SELECT status, count(*), sum(quantity), \
                     sum(CASE WHEN released_at IS NULL THEN 0 ELSE 1 END), \
                     sum(CASE WHEN released_at IS NULL THEN 0 ELSE quantity END) \
                     FROM orders WHERE sale_id = ?1 GROUP BY status",
                )
                .map_err(unavailable)?;
            let mut rows = stmt.query(params![sale.as_str()]).map_err(unavailable)?;
            while let Some(r) = rows.next().map_err(unavailable)? {
                let status: OrderStatus = r
                    .get::<_, String>(0)
                    .map_err(corrupt)?
                    .parse()
                    .map_err(corrupt)?;
                let orders = r.get::<_, i64>(1).map_err(corrupt)? as u64;
                let units = r.get::<_, i64>(2).map_err(corrupt)? as u64;
                totals.released_orders += r.get::<_, i64>(3).map_err(corrupt)? as u64;
                totals.released_units += r.get::<_, i64>(4).map_err(corrupt)? as u64;
                totals.orders += orders;
                totals.units += units;
                totals.by_status.push(StatusCount {
                    status,
                    orders,
                    units,
                });
            }
            Ok(totals)
        })
        .await
    }

    async fn pending_since(&self, before: Timestamp, limit: usize) -> Result<Vec<Order>> {
        let sql = format!(
            "SELECT {ORDER_COLUMNS} FROM orders WHERE status = 'payment_pending' \
             AND updated_at < ?1 ORDER BY updated_at LIMIT ?2"
        );
        self.with(move |c| query_orders(c, &sql, params![before.millis(), limit as i64]))
            .await
    }

    async fn unpublished_events(&self, limit: usize) -> Result<Vec<OrderEvent>> {
        self.with(move |c| {
            let mut stmt = c
                .prepare_cached(
                    "SELECT h.order_id, o.sale_id, o.user_id, o.quantity, h.status, h.at, \
                     o.charge_id FROM order_history h JOIN orders o ON o.order_id = h.order_id \
                     WHERE h.published = 0 ORDER BY h.at, h.rowid LIMIT ?1",
                )
                .map_err(unavailable)?;
            let mut rows = stmt.query(params![limit as i64]).map_err(unavailable)?;
            let mut out = Vec::new();
            while let Some(r) = rows.next().map_err(unavailable)? {
                let get_s = |i: usize| r.get::<_, String>(i).map_err(corrupt);
                let status: OrderStatus = get_s(4)?.parse().map_err(corrupt)?;
                out.push(OrderEvent {
                    order_id: get_s(0)?.parse().map_err(corrupt)?,
                    sale_id: SaleId::parse(get_s(1)?).map_err(corrupt)?,
                    user_id: UserId::parse(get_s(2)?).map_err(corrupt)?,
                    quantity: r.get(3).map_err(corrupt)?,
                    status,
                    at: Timestamp(r.get(5).map_err(corrupt)?),
                    charge_id: if status == OrderStatus::Paid {
                        r.get(6).map_err(corrupt)?
                    } else {
                        None
                    },
                });
            }
            Ok(out)
        })
        .await
    }

    async fn mark_published(&self, events: &[(OrderId, OrderStatus)]) -> Result<usize> {
        let events = events.to_vec();
        self.with(move |c| {
            let tx = c.transaction().map_err(unavailable)?;
            let mut n = 0;
            {
                let mut stmt = tx
                    .prepare_cached(
                        "UPDATE order_history SET published = 1 \
                         WHERE order_id = ?1 AND status = ?2 AND published = 0",
                    )
                    .map_err(unavailable)?;
                for (id, status) in &events {
                    n += stmt
                        .execute(params![id.to_string(), status.as_str()])
                        .map_err(unavailable)?;
                }
            }
            tx.commit().map_err(unavailable)?;
            Ok(n)
        })
        .await
    }

    async fn ping(&self) -> Result<()> {
        self.with(|c| c.query_row("SELECT 1", [], |_| Ok(())).map_err(unavailable))
            .await
    }
}

// Behaviour tests: storage/tests/conformance.rs runs the same checks on SQLite and Postgres.
