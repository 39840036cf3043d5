//! Order writes, on the shards: persisting a batch of accepted orders and then its
//! checkpoint (in the catalog), applying a batch of changes in one transaction per shard,
//! the per-sale totals every write keeps, and the outbox's published marks. The module
//! documentation of [`super`] says why this is exactly-once in effect.

use super::pools::{unavailable, Db};
use super::{corrupt, PgStore};
use crate::batch::{self, Current, Deltas};
use crate::{model::*, Change, Checkpoint, Error, Result};
use deadpool_postgres::Transaction;
use futures_util::future::join_all;
use std::collections::{BTreeMap, HashMap, HashSet};
use tokio_postgres::error::SqlState;
use uuid::Uuid;

pub(super) async fn persist_batch(
    store: &PgStore,
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
                .entry(store.shard_of(o.order_id))
                .or_default()
                .push(o);
        }
    }
    let now = Timestamp::now().millis();
    // Every shard runs to its end (no half-cancelled transaction); the first error wins.
    let results = join_all(
        by_shard
            .iter()
            .map(|(&shard, batch)| persist_on_shard(store, shard, batch, now)),
    )
    .await;
    let mut inserted = 0;
    for r in results {
        inserted += r?;
    }
    if let Some(cp) = checkpoint {
        store
            .execute(
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

pub(super) async fn checkpoint(
    store: &PgStore,
    consumer: &str,
    partition: u32,
) -> Result<Option<u64>> {
    let rows = store
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

pub(super) async fn transition(
    store: &PgStore,
    id: OrderId,
    from: OrderStatus,
    to: OrderStatus,
    charge_id: Option<&str>,
) -> Result<bool> {
    crate::model::transition(from, to)?;
    apply_one(
        store,
        Change::Status {
            id,
            from,
            to,
            charge_id: charge_id.map(str::to_owned),
        },
    )
    .await
}

pub(super) async fn apply_batch(store: &PgStore, changes: &[Change]) -> Result<Vec<bool>> {
    batch::check_document_keys(changes)?;
    // Group by shard, keeping batch order within each shard.
    let mut by_shard: BTreeMap<usize, (Vec<usize>, Vec<&Change>)> = BTreeMap::new();
    for (i, change) in changes.iter().enumerate() {
        let (index, part) = by_shard
            .entry(store.shard_of(change.order_id()))
            .or_default();
        index.push(i);
        part.push(change);
    }
    let now = Timestamp::now().millis();
    // Every shard runs to its end (no half-cancelled transaction); the first error wins.
    let results = join_all(
        by_shard
            .iter()
            .map(|(&shard, (_, part))| apply_on_shard(store, shard, part, now)),
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

/// One change, as the single-order calls make it.
pub(super) async fn apply_one(store: &PgStore, change: Change) -> Result<bool> {
    let applied = apply_batch(store, std::slice::from_ref(&change)).await?;
    Ok(applied.first().copied().unwrap_or(false))
}

pub(super) async fn mark_published(
    store: &PgStore,
    events: &[(OrderId, OrderStatus)],
) -> Result<usize> {
    let mut by_shard: HashMap<usize, (Vec<Uuid>, Vec<&str>)> = HashMap::new();
    for (id, status) in events {
        let (ids, statuses) = by_shard.entry(store.shard_of(*id)).or_default();
        ids.push(id.0);
        statuses.push(status.as_str());
    }
    let results = join_all(by_shard.iter().map(|(&shard, (ids, statuses))| async move {
        store
            .execute(
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

async fn persist_on_shard(
    store: &PgStore,
    shard: usize,
    orders: &[&NewOrder],
    now: i64,
) -> Result<usize> {
    let db = Db::Shard(shard);
    let err = |e: tokio_postgres::Error| unavailable(db, e);
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
    let mut client = store.client(db).await?;
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
        insert_history(&tx, &h_ids, &h_status, &h_at)
            .await
            .map_err(err)?;
    }
    write_totals(&tx, &totals).await.map_err(err)?;
    tx.commit().await.map_err(err)?;
    Ok(new.len())
}

/// Applies one shard's part of a batch in one transaction (see the module doc).
async fn apply_on_shard(
    store: &PgStore,
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
    let mut client = store.client(db).await?;
    let tx = client.transaction().await.map_err(err)?;
    let select = tx
        .prepare_cached(
            "SELECT order_id, status, released_at IS NOT NULL, notified_at IS NOT NULL, \
             sale_id, quantity, refund_state, failed_attempts, receipt_key IS NOT NULL, \
             refund_note_key IS NOT NULL FROM orders \
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
                receipt: row.try_get(8).map_err(corrupt)?,
                refund_note: row.try_get(9).map_err(corrupt)?,
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
        let mut u_receipt = Vec::with_capacity(n);
        let mut u_note = Vec::with_capacity(n);
        for u in &plan.updates {
            u_receipt.push(u.receipt_key.as_deref());
            u_note.push(u.refund_note_key.as_deref());
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
                 retry_after = coalesce(u.retry_after, o.retry_after), \
                 receipt_key = coalesce(u.receipt_key, o.receipt_key), \
                 refund_note_key = coalesce(u.refund_note_key, o.refund_note_key) \
                 FROM UNNEST($1::uuid[], $2::text[], $3::int8[], $4::text[], $5::int8[], \
                 $6::int8[], $7::text[], $8::int4[], $9::int8[], $10::text[], $11::text[]) \
                 AS u(order_id, status, updated_at, charge_id, released_at, notified_at, \
                 refund_state, failed_attempts, retry_after, receipt_key, refund_note_key) \
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
                &u_receipt,
                &u_note,
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
        insert_history(&tx, &h_ids, &h_status, &h_at)
            .await
            .map_err(err)?;
    }
    write_totals(&tx, &totals).await.map_err(err)?;
    tx.commit().await.map_err(err)?;
    Ok(plan.applied)
}

/// Adds history (outbox) rows, in the given order; rows already held are skipped.
async fn insert_history(
    tx: &Transaction<'_>,
    ids: &[Uuid],
    statuses: &[&str],
    ats: &[i64],
) -> std::result::Result<(), tokio_postgres::Error> {
    let history = tx
        .prepare_cached(
            "INSERT INTO order_history (order_id, status, at) \
             SELECT h.order_id, h.status, h.at \
             FROM UNNEST($1::uuid[], $2::text[], $3::int8[]) WITH ORDINALITY \
             AS h(order_id, status, at, n) ORDER BY h.n \
             ON CONFLICT DO NOTHING",
        )
        .await?;
    tx.execute(&history, &[&ids, &statuses, &ats]).await?;
    Ok(())
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
