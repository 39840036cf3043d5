//! Order reads: one order with its history (from its shard), and the listings, sweeps,
//! outbox and per-sale totals, asked of every shard at once and merged (sorted as the
//! embedded store sorts, the limit applied after the merge).

use super::pools::Db;
use super::{corrupt, PgStore};
use crate::{model::*, Error, Order, Result, SaleId, SaleTotals, StatusCount};
use std::collections::BTreeMap;
use tokio_postgres::types::ToSql;
use tokio_postgres::Row;

const ORDER_COLUMNS: &str = "order_id, sale_id, user_id, quantity, amount_minor, currency, \
     sequence, idempotency_key, payment_token, status, accepted_at, charge_id, released_at, \
     notified_at, refund_state, failed_attempts, retry_after, receipt_key, refund_note_key";
/// Column index of the sort key that every order listing selects after [`ORDER_COLUMNS`].
const SORT_KEY: usize = 19;

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
        receipt_key: row.try_get(17).map_err(corrupt)?,
        refund_note_key: row.try_get(18).map_err(corrupt)?,
    })
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

/// `documents_owed` (`$1` = limit), through `orders_documents_owed`.
fn documents_owed_sql() -> String {
    format!(
        "SELECT {ORDER_COLUMNS}, accepted_at FROM orders \
         WHERE (status = 'paid' AND receipt_key IS NULL) \
            OR (refund_state = 'refunded' AND refund_note_key IS NULL) \
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

/// Orders from every shard, merged by `(sort key, order id)`, at most `limit`.
async fn merged_orders(
    store: &PgStore,
    sql: &str,
    params: &[&(dyn ToSql + Sync)],
    limit: usize,
) -> Result<Vec<Order>> {
    let mut keyed = Vec::new();
    for rows in store.query_every_shard(sql, params).await? {
        for row in rows {
            let key: i64 = row.try_get(SORT_KEY).map_err(corrupt)?;
            keyed.push((key, order_from_row(&row)?));
        }
    }
    keyed.sort_by_key(|(k, o)| (*k, o.new.order_id));
    keyed.truncate(limit);
    Ok(keyed.into_iter().map(|(_, o)| o).collect())
}

pub(super) async fn get_order(store: &PgStore, id: OrderId) -> Result<Option<Order>> {
    // One statement, so the order and its history come from one snapshot.
    let sql = format!(
        "SELECT {ORDER_COLUMNS}, \
         ARRAY(SELECT h.status FROM order_history h WHERE h.order_id = o.order_id \
               ORDER BY h.at, h.id), \
         ARRAY(SELECT h.at FROM order_history h WHERE h.order_id = o.order_id \
               ORDER BY h.at, h.id) \
         FROM orders o WHERE o.order_id = $1"
    );
    let rows = store
        .query(Db::Shard(store.shard_of(id)), &sql, &[&id.0])
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

pub(super) async fn orders_in_status(
    store: &PgStore,
    statuses: &[OrderStatus],
    limit: usize,
) -> Result<Vec<Order>> {
    let sql = orders_in_status_sql(statuses);
    merged_orders(store, &sql, &[&sql_limit(limit)], limit).await
}

pub(super) async fn orders_due(
    store: &PgStore,
    statuses: &[OrderStatus],
    now: Timestamp,
    limit: usize,
) -> Result<Vec<Order>> {
    let sql = orders_due_sql(statuses);
    merged_orders(store, &sql, &[&sql_limit(limit), &now.millis()], limit).await
}

pub(super) async fn refunds_owed(store: &PgStore, limit: usize) -> Result<Vec<Order>> {
    merged_orders(store, &refunds_owed_sql(), &[&sql_limit(limit)], limit).await
}

pub(super) async fn documents_owed(store: &PgStore, limit: usize) -> Result<Vec<Order>> {
    merged_orders(store, &documents_owed_sql(), &[&sql_limit(limit)], limit).await
}

pub(super) async fn unfinished_followups(store: &PgStore, limit: usize) -> Result<Vec<Order>> {
    merged_orders(store, &followups_sql(), &[&sql_limit(limit)], limit).await
}

pub(super) async fn orders_of_sale(store: &PgStore, sale: &SaleId) -> Result<Vec<Order>> {
    let sql = format!(
        "SELECT {ORDER_COLUMNS}, sequence FROM orders WHERE sale_id = $1 \
         ORDER BY sequence, order_id"
    );
    merged_orders(store, &sql, &[&sale.as_str()], usize::MAX).await
}

pub(super) async fn sale_totals(store: &PgStore, sale: &SaleId) -> Result<SaleTotals> {
    // Kept by every write (see `write_totals`): a few rows per shard.
    let per_shard = store
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

pub(super) async fn pending_since(
    store: &PgStore,
    before: Timestamp,
    limit: usize,
) -> Result<Vec<Order>> {
    merged_orders(
        store,
        &pending_sql(),
        &[&before.millis(), &sql_limit(limit)],
        limit,
    )
    .await
}

pub(super) async fn unpublished_events(store: &PgStore, limit: usize) -> Result<Vec<OrderEvent>> {
    let per_shard = store
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Change, OrderStore};

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
}
