//! One behaviour, every backend: [`check`] runs against the embedded SQLite store and against
//! the sharded Postgres store (two servers, one shard each, started by the harness), so the
//! two cannot drift apart. The Postgres tests also cover what only a sharded store has: a
//! stopped shard and the schema check at connect.

#![cfg(any(feature = "embedded", feature = "postgres"))]

use std::collections::{BTreeMap, BTreeSet, HashMap};
use storage::*;

fn sale(id: &str) -> Sale {
    let now = Timestamp::now();
    Sale {
        // Not the default, so every store shows it keeps the field.
        stock_buckets: 3,
        id: SaleId::parse(id).expect("id"),
        sku: "sku-1".into(),
        stock: 10,
        price: Money {
            minor: 100,
            currency: Currency::parse("EUR").expect("eur"),
        },
        starts_at: now,
        ends_at: now.plus_millis(60_000),
        per_user_limit: 2,
        max_quantity_per_order: 2,
        user_rate: UserRate::default(),
        created_at: now,
    }
}

fn order(sale: &str, seq: u64, quantity: u32, accepted_at: Timestamp) -> NewOrder {
    let s = self::sale(sale);
    NewOrder {
        order_id: OrderId::new(),
        sale_id: s.id,
        user_id: UserId::parse(format!("u{seq}")).expect("user"),
        quantity,
        amount: s.price.times(quantity).expect("amount"),
        sequence: seq,
        idempotency_key: format!("k{seq}"),
        payment_token: "tok".into(),
        accepted_at,
    }
}

fn ids(orders: &[Order]) -> Vec<OrderId> {
    orders.iter().map(|o| o.new.order_id).collect()
}

/// Which database of the store holds an order (always 0 for a store of one database).
type ShardOf<'a> = &'a (dyn Fn(OrderId) -> usize + Sync);

/// Every behaviour of [`OrderStore`], on a fresh store.
async fn check(store: &dyn OrderStore, shard_of: ShardOf<'_>) {
    single_sale(store).await;
    totals_agree_with_the_orders(store).await;
    catalog(store).await;
    many_orders(store).await;
    totals_agree_with_the_orders(store).await;
    batches(store, shard_of).await;
    totals_agree_with_the_orders(store).await;
    totals_through_replays_failures_and_concurrency(store).await;
    totals_agree_with_the_orders(store).await;
    refunds_and_retries(store).await;
    totals_agree_with_the_orders(store).await;
    documents(store).await;
    totals_agree_with_the_orders(store).await;
}

/// Every sale id the sections write orders for (some have no catalog entry).
const SALES: [&str; 8] = [
    "s1", "many", "batch", "split", "outage", "totals", "refunds", "docs",
];

/// What `sale_totals` must answer: a count of the sale's orders as they are stored.
async fn recount(store: &dyn OrderStore, sale: &SaleId) -> SaleTotals {
    let mut totals = SaleTotals::default();
    let mut by_status: BTreeMap<&'static str, StatusCount> = BTreeMap::new();
    for o in store.orders_of_sale(sale).await.expect("orders") {
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
    totals
}

/// The totals the store keeps match its orders, for every sale written so far.
async fn totals_agree_with_the_orders(store: &dyn OrderStore) {
    let mut sales: BTreeSet<SaleId> = store
        .list_sales()
        .await
        .expect("sales")
        .into_iter()
        .map(|s| s.id)
        .collect();
    sales.extend(SALES.map(|s| SaleId::parse(s).expect("id")));
    for sale in &sales {
        assert_eq!(
            store.sale_totals(sale).await.expect("totals"),
            recount(store, sale).await,
            "totals of sale {sale}"
        );
    }
}

/// The kept totals move only with what a write really changed: a replayed persist or
/// batch changes nothing, a refused batch changes nothing, and concurrent batches over
/// the same sale (every one locking the same totals rows) all commit and add up.
async fn totals_through_replays_failures_and_concurrency(store: &dyn OrderStore) {
    use OrderStatus::*;
    let s = sale("totals");
    store.create_sale(&s).await.expect("create");
    let orders: Vec<_> = (0..40)
        .map(|i| order("totals", i, 1 + (i % 2) as u32, Timestamp::now()))
        .collect();
    assert_eq!(
        store.persist_batch(&orders, None).await.expect("persist"),
        40
    );
    assert_eq!(store.persist_batch(&orders, None).await.expect("replay"), 0);
    let totals = store.sale_totals(&s.id).await.expect("totals");
    assert_eq!((totals.orders, totals.units), (40, 60));
    assert_eq!(totals.get(Persisted).orders, 40);

    // A batch refused by the schema (a charge id too long) changes no totals.
    let id = orders[0].order_id;
    let refused = store
        .apply_batch(&[
            status(id, Persisted, PaymentPending, None),
            status(
                id,
                PaymentPending,
                Paid,
                Some(&"x".repeat(MAX_CHARGE_ID + 1)),
            ),
        ])
        .await;
    assert!(matches!(refused, Err(Error::Invalid(_))), "{refused:?}");
    assert_eq!(store.sale_totals(&s.id).await.expect("totals"), totals);

    // Concurrent batches, each settling its own orders of the one sale (every batch moves
    // orders into and out of the same statuses, so each locks the same totals rows), then
    // replayed: every one commits, the replays apply nothing.
    let chunks: Vec<Vec<OrderId>> = orders
        .chunks(8)
        .map(|c| c.iter().map(|o| o.order_id).collect())
        .collect();
    let batch_of = |ids: &[OrderId]| -> Vec<Change> {
        let mut changes = Vec::new();
        for (i, &id) in ids.iter().enumerate() {
            changes.push(status(id, Persisted, PaymentPending, None));
            if i % 3 == 0 {
                changes.push(status(id, PaymentPending, PaymentFailed, None));
                changes.push(Change::Released(id));
            } else {
                changes.push(status(id, PaymentPending, Paid, Some("ch")));
            }
            changes.push(Change::Notified(id));
        }
        changes
    };
    let runs = futures_util::future::join_all(chunks.iter().map(|ids| {
        let changes = batch_of(ids);
        async move {
            let first = store.apply_batch(&changes).await.expect("batch");
            let replay = store.apply_batch(&changes).await.expect("replay");
            (first, replay)
        }
    }))
    .await;
    for (first, replay) in runs {
        assert!(first.iter().all(|a| *a), "{first:?}");
        assert!(replay.iter().all(|a| !a), "{replay:?}");
    }
    let after = store.sale_totals(&s.id).await.expect("totals");
    assert_eq!(after, recount(store, &s.id).await);
    assert_eq!(after.get(Persisted).orders, 0);
    let failed: u64 = chunks.iter().map(|c| c.len().div_ceil(3) as u64).sum();
    assert_eq!(after.get(PaymentFailed).orders, failed);
    assert_eq!(after.get(Paid).orders, 40 - failed);
    assert_eq!(after.released_orders, failed);
    assert_eq!((after.orders, after.units), (40, 60));
}

/// Marks every outbox entry published, so a section starts from an empty outbox.
async fn publish_all(store: &dyn OrderStore) {
    let all: Vec<_> = store
        .unpublished_events(100_000)
        .await
        .expect("events")
        .iter()
        .map(|e| (e.order_id, e.status))
        .collect();
    store.mark_published(&all).await.expect("publish");
    assert!(store.unpublished_events(10).await.expect("none").is_empty());
}

fn status(id: OrderId, from: OrderStatus, to: OrderStatus, charge_id: Option<&str>) -> Change {
    Change::Status {
        id,
        from,
        to,
        charge_id: charge_id.map(str::to_owned),
    }
}

/// A refund owed for a late charge and a charge attempt deferred are state of the order:
/// recorded by `apply_batch` under their preconditions, read back by `get_order`, listed by
/// `refunds_owed` and honoured by `orders_due`, and a replay changes nothing.
async fn refunds_and_retries(store: &dyn OrderStore) {
    use OrderStatus::*;
    store.create_sale(&sale("refunds")).await.expect("create");
    let t0 = Timestamp::now().plus_millis(-60_000);
    let orders: Vec<NewOrder> = (0..4)
        .map(|i| order("refunds", i, 1, t0.plus_millis(i as i64)))
        .collect();
    store.persist_batch(&orders, None).await.expect("persist");
    let [void, paid, waiting, fresh] = [0, 1, 2, 3].map(|i| orders[i].order_id);
    let setup = vec![
        status(void, Persisted, PaymentPending, None),
        status(void, PaymentPending, Expired, None),
        Change::Released(void),
        status(paid, Persisted, PaymentPending, None),
        status(paid, PaymentPending, Paid, Some("ch_paid")),
        status(waiting, Persisted, PaymentPending, None),
    ];
    assert!(store
        .apply_batch(&setup)
        .await
        .expect("setup")
        .iter()
        .all(|a| *a));
    assert!(store.refunds_owed(10).await.expect("none owed").is_empty());
    let fresh_order = store.get_order(fresh).await.expect("get").expect("order");
    assert_eq!(
        (
            fresh_order.refund,
            fresh_order.failed_attempts,
            fresh_order.retry_after
        ),
        (None, 0, None)
    );

    let refund = |id, state, charge: Option<&str>| Change::Refund {
        id,
        state,
        charge_id: charge.map(str::to_owned),
    };
    let later = Timestamp::now().plus_millis(3_600_000);
    let changes = vec![
        refund(void, RefundState::Owed, Some("ch_late")),
        refund(paid, RefundState::Owed, Some("ch_other")), // paid: nothing owed
        Change::Deferred {
            id: waiting,
            retry_after: later,
        },
        Change::Deferred {
            id: paid,
            retry_after: later,
        }, // final
    ];
    let applied = store.apply_batch(&changes).await.expect("record");
    assert_eq!(applied, vec![true, false, true, false]);
    // A replay: the refund is owed already; a deferral counts one more failed attempt.
    let replay = store.apply_batch(&changes[..1]).await.expect("replay");
    assert_eq!(replay, vec![false]);

    let v = store.get_order(void).await.expect("get").expect("void");
    assert_eq!(v.refund, Some(RefundState::Owed));
    assert_eq!(v.charge_id.as_deref(), Some("ch_late"));
    assert_eq!(v.status, Expired, "a refund is not a status change");
    let p = store.get_order(paid).await.expect("get").expect("paid");
    assert_eq!((p.refund, p.charge_id.as_deref()), (None, Some("ch_paid")));
    assert_eq!((p.failed_attempts, p.retry_after), (0, None));
    let w = store
        .get_order(waiting)
        .await
        .expect("get")
        .expect("waiting");
    assert_eq!((w.failed_attempts, w.retry_after), (1, Some(later)));
    assert_eq!(
        ids(&store.refunds_owed(10).await.expect("owed")),
        vec![void]
    );
    assert!(store.refunds_owed(0).await.expect("limit").is_empty());

    // Only the orders that are due: `waiting` is not before `later`.
    let open = [Persisted, PaymentPending];
    let sale_id = SaleId::parse("refunds").expect("id");
    let due = |now: Timestamp| {
        let sale_id = sale_id.clone();
        async move {
            let due = store.orders_due(&open, now, 10_000).await.expect("due");
            due.into_iter()
                .filter(|o| o.new.sale_id == sale_id)
                .map(|o| o.new.order_id)
                .collect::<Vec<_>>()
        }
    };
    assert_eq!(due(Timestamp::now()).await, vec![fresh]);
    assert_eq!(due(later).await, vec![waiting, fresh]);
    let again = Change::Deferred {
        id: waiting,
        retry_after: later.plus_millis(1),
    };
    assert_eq!(
        store.apply_batch(&[again]).await.expect("again"),
        vec![true]
    );
    let w = store
        .get_order(waiting)
        .await
        .expect("get")
        .expect("waiting");
    assert_eq!(
        (w.failed_attempts, w.retry_after),
        (2, Some(later.plus_millis(1)))
    );
    assert_eq!(due(later).await, vec![fresh]);

    // Settled once: refunded, then nothing moves it.
    let settled = vec![
        refund(void, RefundState::Refunded, None),
        refund(void, RefundState::Refused, None),
    ];
    assert_eq!(
        store.apply_batch(&settled).await.expect("settle"),
        vec![true, false]
    );
    let v = store.get_order(void).await.expect("get").expect("void");
    assert_eq!(v.refund, Some(RefundState::Refunded));
    assert_eq!(v.charge_id.as_deref(), Some("ch_late"));
    assert!(store.refunds_owed(10).await.expect("owed").is_empty());
    let listed = store
        .orders_of_sale(&SaleId::parse("refunds").expect("id"))
        .await
        .expect("sale");
    let listed_void = listed
        .iter()
        .find(|o| o.new.order_id == void)
        .expect("listed");
    assert_eq!(listed_void.refund, Some(RefundState::Refunded));
}

/// Documents (receipts, refund notes): owed by a paid or refunded order until a key is
/// recorded, once per order and kind, listed by `documents_owed` oldest first.
async fn documents(store: &dyn OrderStore) {
    use OrderStatus::*;
    // Earlier sections left paid and refunded orders without documents: record theirs, so
    // this section sees only its own.
    for o in store.documents_owed(100_000).await.expect("owed") {
        let kind = o.document_owed().expect("owed a document");
        let change = Change::Document {
            id: o.new.order_id,
            kind,
            key: format!("k/{}", o.new.order_id),
        };
        assert_eq!(
            store.apply_batch(&[change]).await.expect("record"),
            vec![true]
        );
    }
    assert!(store.documents_owed(10).await.expect("none").is_empty());

    store.create_sale(&sale("docs")).await.expect("create");
    let t0 = Timestamp::now().plus_millis(-60_000);
    let orders: Vec<NewOrder> = (0..4)
        .map(|i| order("docs", i, 1, t0.plus_millis(i as i64)))
        .collect();
    store.persist_batch(&orders, None).await.expect("persist");
    let [paid, other, refunded, open] = [0, 1, 2, 3].map(|i| orders[i].order_id);
    let setup = vec![
        status(paid, Persisted, PaymentPending, None),
        status(paid, PaymentPending, Paid, Some("ch_1")),
        status(other, Persisted, PaymentPending, None),
        status(other, PaymentPending, Paid, Some("ch_2")),
        status(refunded, Persisted, Expired, None),
        Change::Refund {
            id: refunded,
            state: RefundState::Owed,
            charge_id: Some("ch_late".into()),
        },
    ];
    assert!(store
        .apply_batch(&setup)
        .await
        .expect("setup")
        .iter()
        .all(|a| *a));
    // Owed: the paid ones; the refund is not settled yet.
    assert_eq!(
        ids(&store.documents_owed(10).await.expect("owed")),
        vec![paid, other]
    );
    assert_eq!(
        ids(&store.documents_owed(1).await.expect("one")),
        vec![paid]
    );
    assert!(store.documents_owed(0).await.expect("zero").is_empty());
    let refund_done = Change::Refund {
        id: refunded,
        state: RefundState::Refunded,
        charge_id: None,
    };
    assert_eq!(
        store.apply_batch(&[refund_done]).await.expect("refunded"),
        vec![true]
    );
    assert_eq!(
        ids(&store.documents_owed(10).await.expect("owed")),
        vec![paid, other, refunded]
    );

    let doc = |id, kind, key: &str| Change::Document {
        id,
        kind,
        key: key.to_owned(),
    };
    use DocumentKind::{Receipt, RefundNote};
    // A key longer than the stores keep fails the batch and changes nothing.
    let refused = store
        .apply_batch(&[
            doc(paid, Receipt, "r/paid"),
            doc(other, Receipt, &"x".repeat(513)),
        ])
        .await;
    assert!(
        matches!(&refused, Err(Error::Invalid(v)) if v.field == "document_key"),
        "{refused:?}"
    );
    assert_eq!(store.documents_owed(10).await.expect("owed").len(), 3);

    let changes = vec![
        doc(paid, Receipt, "r/paid"),              // yes
        doc(paid, Receipt, "r/again"),             // no: recorded already
        doc(paid, RefundNote, "n/paid"),           // no: nothing refunded
        doc(refunded, Receipt, "r/refunded"),      // no: not paid
        doc(refunded, RefundNote, "n/refunded"),   // yes
        doc(open, Receipt, "r/open"),              // no: not paid
        doc(OrderId::new(), Receipt, "r/unknown"), // no: unknown order
    ];
    assert_eq!(
        store.apply_batch(&changes).await.expect("record"),
        vec![true, false, false, false, true, false, false]
    );
    assert_eq!(
        store.apply_batch(&changes).await.expect("replay"),
        vec![false; changes.len()]
    );
    let p = store.get_order(paid).await.expect("get").expect("paid");
    assert_eq!(
        (p.receipt_key.as_deref(), p.refund_note_key.as_deref()),
        (Some("r/paid"), None)
    );
    assert_eq!(p.document_owed(), None);
    let r = store
        .get_order(refunded)
        .await
        .expect("get")
        .expect("refunded");
    assert_eq!(
        (r.receipt_key.as_deref(), r.refund_note_key.as_deref()),
        (None, Some("n/refunded"))
    );
    assert_eq!(
        ids(&store.documents_owed(10).await.expect("owed")),
        vec![other]
    );
    let listed = store
        .orders_of_sale(&SaleId::parse("docs").expect("id"))
        .await
        .expect("sale");
    let listed_paid = listed
        .iter()
        .find(|o| o.new.order_id == paid)
        .expect("listed");
    assert_eq!(listed_paid.receipt_key.as_deref(), Some("r/paid"));
    assert!(
        store
            .apply_batch(&[doc(other, Receipt, "r/other")])
            .await
            .expect("other")[0]
    );
    assert!(store.documents_owed(10).await.expect("none").is_empty());
}

/// The orders as stored (with their history), in the order of `ids`.
async fn snapshot(store: &dyn OrderStore, ids: &[OrderId]) -> Vec<Option<Order>> {
    let mut out = Vec::with_capacity(ids.len());
    for &id in ids {
        out.push(store.get_order(id).await.expect("get"));
    }
    out
}

/// `apply_batch`: legal and illegal changes in one batch, its replay, and a batch that the
/// database refuses midway.
async fn batches(store: &dyn OrderStore, shard_of: ShardOf<'_>) {
    use OrderStatus::*;
    store.create_sale(&sale("batch")).await.expect("create");
    let orders: Vec<_> = (0..4)
        .map(|i| order("batch", i, 1, Timestamp::now()))
        .collect();
    assert_eq!(
        store.persist_batch(&orders, None).await.expect("persist"),
        4
    );
    publish_all(store).await;
    let [a, b, c, d] = [0, 1, 2, 3].map(|i| orders[i].order_id);
    let unknown = OrderId::new();
    assert_eq!(
        store.apply_batch(&[]).await.expect("empty"),
        Vec::<bool>::new()
    );

    // (a) Exactly the legal changes whose preconditions hold apply, each seeing the ones
    // before it.
    let changes = vec![
        status(a, Persisted, PaymentPending, None),       // yes
        status(a, PaymentPending, Paid, Some("ch_a")),    // yes: moved twice in one batch
        Change::Notified(a),                              // yes
        Change::Notified(a),                              // no: notified twice
        Change::Released(a),                              // no: a paid order keeps its stock
        status(b, PaymentPending, Paid, None),            // no: b is persisted
        status(b, Persisted, Paid, None),                 // no: illegal move
        status(b, Accepted, Persisted, None),             // no: legal, but b is not accepted
        status(unknown, Persisted, PaymentPending, None), // no: unknown order
        Change::Notified(unknown),                        // no
        Change::Released(unknown),                        // no
        Change::Released(c),                              // no: not final yet
        status(c, Persisted, Expired, None),              // yes
        Change::Released(c),                              // yes: sees the expiry
        Change::Released(c),                              // no: released twice
        status(d, Persisted, PaymentPending, None),       // yes
        status(d, Persisted, PaymentPending, None),       // no: moved already
        status(d, PaymentPending, Persisted, None),       // no: illegal move back
    ];
    let want = vec![
        true, true, true, false, false, false, false, false, false, false, false, false, true,
        true, false, true, false, false,
    ];
    let b_before = store.get_order(b).await.expect("get b");
    assert_eq!(store.apply_batch(&changes).await.expect("batch"), want);

    let got_a = store.get_order(a).await.expect("get").expect("a");
    assert_eq!(got_a.status, Paid);
    assert_eq!(got_a.charge_id.as_deref(), Some("ch_a"));
    assert!(got_a.notified_at.is_some());
    assert_eq!(got_a.released_at, None);
    assert_eq!(
        got_a.history.iter().map(|h| h.status).collect::<Vec<_>>(),
        vec![Accepted, Persisted, PaymentPending, Paid]
    );
    assert_eq!(store.get_order(b).await.expect("get b"), b_before);
    let got_c = store.get_order(c).await.expect("get").expect("c");
    assert_eq!(got_c.status, Expired);
    assert!(got_c.released_at.is_some());
    assert_eq!(got_c.notified_at, None);
    assert_eq!(got_c.charge_id, None);
    let got_d = store.get_order(d).await.expect("get").expect("d");
    assert_eq!(got_d.status, PaymentPending);
    assert_eq!((got_d.released_at, got_d.notified_at), (None, None));
    assert!(store
        .pending_since(Timestamp::now().plus_millis(1_000), 1000)
        .await
        .expect("pending")
        .iter()
        .any(|o| o.new.order_id == d));
    // One history (outbox) row per applied move, and only those.
    let events = store.unpublished_events(100).await.expect("events");
    let moved: BTreeSet<_> = events.iter().map(|e| (e.order_id, e.status)).collect();
    assert_eq!(events.len(), 4, "{events:?}");
    assert_eq!(
        moved,
        BTreeSet::from([
            (a, PaymentPending),
            (a, Paid),
            (c, Expired),
            (d, PaymentPending)
        ])
    );
    let pos = |st| {
        events
            .iter()
            .position(|e| e.order_id == a && e.status == st)
            .expect("event")
    };
    assert!(pos(PaymentPending) < pos(Paid), "{events:?}");
    for e in &events {
        let want = (e.status == Paid).then_some("ch_a");
        assert_eq!(e.charge_id.as_deref(), want, "{e:?}");
    }

    // (b) A replay applies nothing and changes nothing.
    let touched = [a, b, c, d, unknown];
    let before = snapshot(store, &touched).await;
    assert_eq!(
        store.apply_batch(&changes).await.expect("replay"),
        vec![false; changes.len()]
    );
    assert_eq!(snapshot(store, &touched).await, before);
    assert_eq!(store.unpublished_events(100).await.expect("events"), events);
    // The single-order calls agree.
    assert!(!store.mark_notified(a).await.expect("notified"));
    assert!(!store.mark_released(c).await.expect("released"));
    assert!(!store
        .transition(d, Persisted, PaymentPending, None)
        .await
        .expect("moved"));
    publish_all(store).await;

    // (c) A batch that the database refuses midway (a charge id above the schema's limit,
    // on the batch's last change) changes nothing, not even its earlier changes. The orders
    // share one database, since a sharded store is atomic per database.
    let mut same_db = Vec::new();
    let mut seq = 10;
    while same_db.len() < 3 {
        let o = order("batch", seq, 1, Timestamp::now());
        seq += 1;
        if same_db
            .first()
            .is_none_or(|f: &NewOrder| shard_of(f.order_id) == shard_of(o.order_id))
        {
            same_db.push(o);
        }
    }
    store.persist_batch(&same_db, None).await.expect("persist");
    publish_all(store).await;
    let [e, f, g] = [0, 1, 2].map(|i| same_db[i].order_id);
    let long = "c".repeat(201);
    let mut failing = vec![
        status(e, Persisted, PaymentPending, None),
        status(e, PaymentPending, Paid, Some("ch_e")),
        Change::Notified(e),
        status(f, Persisted, Expired, None),
        Change::Released(f),
        Change::Notified(f),
        status(g, Persisted, PaymentPending, None),
        status(g, PaymentPending, Paid, Some(&long)),
    ];
    let before = snapshot(store, &[e, f, g]).await;
    let err = store
        .apply_batch(&failing)
        .await
        .expect_err("the database refuses the charge id");
    assert!(
        matches!(&err, Error::Invalid(v) if v.field == "charge_id"),
        "{err}"
    );
    assert_eq!(snapshot(store, &[e, f, g]).await, before);
    assert!(store.unpublished_events(10).await.expect("none").is_empty());
    // With a charge id the database takes, the same batch applies in full.
    failing[7] = status(g, PaymentPending, Paid, Some("ch_g"));
    assert_eq!(
        store.apply_batch(&failing).await.expect("batch"),
        vec![true; failing.len()]
    );
    let got_g = store.get_order(g).await.expect("get").expect("g");
    assert_eq!(
        (got_g.status, got_g.charge_id.as_deref()),
        (Paid, Some("ch_g"))
    );
    assert_eq!(
        store.unpublished_events(100).await.expect("events").len(),
        5
    );
    publish_all(store).await;
}

/// The life of a few orders of one sale (the embedded store's original test).
async fn single_sale(store: &dyn OrderStore) {
    use OrderStatus::*;
    let s1 = sale("s1");
    store.create_sale(&s1).await.expect("create");
    assert!(matches!(
        store.create_sale(&s1).await,
        Err(Error::SaleExists(id)) if id == s1.id
    ));
    let orders: Vec<_> = (1..=3)
        .map(|i| order("s1", i, 1, Timestamp::now()))
        .collect();
    let cp = Checkpoint {
        consumer: "settler".into(),
        partition: 0,
        next_offset: 3,
    };
    assert_eq!(store.checkpoint("settler", 0).await.expect("cp"), None);
    assert_eq!(
        store
            .persist_batch(&orders, Some(&cp))
            .await
            .expect("persist"),
        3
    );
    assert_eq!(store.persist_batch(&orders, None).await.expect("replay"), 0);
    assert_eq!(store.checkpoint("settler", 0).await.expect("cp"), Some(3));
    assert_eq!(store.checkpoint("settler", 1).await.expect("cp"), None);
    assert_eq!(store.checkpoint("other", 0).await.expect("cp"), None);

    let id = orders[0].order_id;
    let fresh = store.get_order(id).await.expect("get").expect("some");
    assert_eq!(fresh.new, orders[0]);
    assert_eq!(fresh.status, Persisted);
    assert_eq!(fresh.charge_id, None);
    assert_eq!(fresh.released_at, None);
    assert_eq!(fresh.notified_at, None);
    assert_eq!(fresh.history[0].at, orders[0].accepted_at);
    assert_eq!(
        store.get_order(OrderId::new()).await.expect("get unknown"),
        None
    );

    assert!(store
        .transition(id, Persisted, PaymentPending, None)
        .await
        .expect("t1"));
    assert!(!store
        .transition(id, Persisted, PaymentPending, None)
        .await
        .expect("t2"));
    assert!(matches!(
        store.transition(id, Accepted, Paid, None).await,
        Err(Error::IllegalTransition(_))
    ));
    assert!(!store.mark_released(id).await.expect("not final yet"));
    assert!(store
        .transition(id, PaymentPending, PaymentFailed, None)
        .await
        .expect("t3"));
    assert!(store.mark_released(id).await.expect("rel"));
    assert!(!store.mark_released(id).await.expect("rel twice"));
    assert!(store.mark_notified(id).await.expect("notify"));
    assert!(!store.mark_notified(id).await.expect("notify twice"));
    assert!(!store
        .transition(OrderId::new(), Persisted, PaymentPending, None)
        .await
        .expect("unknown order"));

    let got = store.get_order(id).await.expect("get").expect("some");
    assert_eq!(got.status, PaymentFailed);
    assert!(got.released_at.is_some() && got.notified_at.is_some());
    let hist: Vec<_> = got.history.iter().map(|h| h.status).collect();
    assert_eq!(
        hist,
        vec![Accepted, Persisted, PaymentPending, PaymentFailed]
    );

    // The outbox holds every status entered, until published.
    let events = store.unpublished_events(100).await.expect("events");
    assert_eq!(events.len(), 8, "{events:?}");
    assert!(events
        .iter()
        .any(|e| e.order_id == id && e.status == PaymentFailed));
    assert!(events.windows(2).all(|w| w[0].at <= w[1].at), "{events:?}");
    assert_eq!(store.unpublished_events(3).await.expect("3").len(), 3);
    let first: Vec<_> = events[..2].iter().map(|e| (e.order_id, e.status)).collect();
    assert_eq!(store.mark_published(&first).await.expect("publish"), 2);
    assert_eq!(store.mark_published(&first).await.expect("again"), 0);
    assert_eq!(store.unpublished_events(100).await.expect("rest").len(), 6);

    // Expiry: pending since before a cutoff.
    let pending = orders[1].order_id;
    assert!(store
        .transition(pending, Persisted, PaymentPending, None)
        .await
        .expect("pending"));
    let late = store
        .pending_since(Timestamp::now().plus_millis(1_000), 10)
        .await
        .expect("stale");
    assert_eq!(ids(&late), vec![pending]);
    assert!(store
        .pending_since(Timestamp(0), 10)
        .await
        .expect("none")
        .is_empty());
    assert!(store
        .transition(pending, PaymentPending, Persisted, None)
        .await
        .is_err());

    // A charge id is kept, and published with `paid` only.
    assert!(store
        .transition(pending, PaymentPending, Paid, Some("ch_1"))
        .await
        .expect("paid"));
    let paid = store.get_order(pending).await.expect("get").expect("some");
    assert_eq!(paid.charge_id.as_deref(), Some("ch_1"));
    let events = store.unpublished_events(100).await.expect("events");
    for e in events.iter().filter(|e| e.order_id == pending) {
        let want = (e.status == Paid).then_some("ch_1");
        assert_eq!(e.charge_id.as_deref(), want, "{e:?}");
    }
    let followups = store.unfinished_followups(10).await.expect("followups");
    assert_eq!(ids(&followups), vec![pending], "paid, not yet notified");

    let totals = store.sale_totals(&s1.id).await.expect("totals");
    assert_eq!(totals.orders, 3);
    assert_eq!(totals.units, 3);
    assert_eq!(totals.get(Persisted).orders, 1);
    assert_eq!(totals.get(Paid).orders, 1);
    assert_eq!(totals.get(PaymentFailed).units, 1);
    assert_eq!(totals.get(Expired).orders, 0);
    assert_eq!(totals.released_units, 1);
    assert_eq!(totals.released_orders, 1);
    assert_eq!(
        store
            .sale_totals(&SaleId::parse("nothing-sold").expect("id"))
            .await
            .expect("empty totals"),
        SaleTotals::default()
    );

    // Publish everything, so later sections start from an empty outbox.
    let all: Vec<_> = store
        .unpublished_events(1000)
        .await
        .expect("events")
        .iter()
        .map(|e| (e.order_id, e.status))
        .collect();
    assert_eq!(
        store.mark_published(&all).await.expect("publish all"),
        all.len()
    );
    assert!(store.unpublished_events(10).await.expect("none").is_empty());
}

/// Sales: listing, stock additions and their limits.
async fn catalog(store: &dyn OrderStore) {
    let mut s2 = sale("s2");
    s2.created_at = Timestamp(s2.created_at.millis() + 10);
    store.create_sale(&s2).await.expect("create s2");
    let listed: Vec<_> = store
        .list_sales()
        .await
        .expect("list")
        .into_iter()
        .map(|s| s.id.to_string())
        .collect();
    assert_eq!(listed, vec!["s1", "s2"]);
    assert_eq!(
        store
            .get_sale(&SaleId::parse("nope").expect("id"))
            .await
            .expect("get"),
        None
    );
    assert_eq!(
        store.get_sale(&s2.id).await.expect("get").expect("some"),
        s2
    );

    let s1 = sale("s1").id;
    let s = store.add_stock(&s1, 5).await.expect("add");
    assert_eq!(s.stock, 15);
    assert!(matches!(
        store.add_stock(&s1, MAX_STOCK).await,
        Err(Error::Invalid(_))
    ));
    assert_eq!(
        store.get_sale(&s1).await.expect("get").expect("some").stock,
        15
    );
    let s = store
        .add_stock(&s1, MAX_STOCK - 15)
        .await
        .expect("up to the max");
    assert_eq!(s.stock, MAX_STOCK);
    assert!(matches!(
        store.add_stock(&s1, 1).await,
        Err(Error::Invalid(_))
    ));
    assert!(matches!(
        store
            .add_stock(&SaleId::parse("nope").expect("id"), 1)
            .await,
        Err(Error::UnknownSale(_))
    ));
}

/// Many orders of one sale, in several batches (on a sharded store they spread over every
/// shard): listings merge in order, limits hold, totals add up, replays insert nothing.
async fn many_orders(store: &dyn OrderStore) {
    use OrderStatus::*;
    const N: u64 = 60;
    let many = sale("many");
    store.create_sale(&many).await.expect("create many");
    let base = Timestamp::now().millis() - 100_000;
    // Sequence and acceptance time in opposite orders, so the two sorts differ.
    let orders: Vec<_> = (0..N)
        .map(|i| {
            order(
                "many",
                i,
                1 + (i % 2) as u32,
                Timestamp(base + (N - i) as i64),
            )
        })
        .collect();
    let mut persisted = 0;
    for (n, chunk) in orders.chunks(25).enumerate() {
        let cp = Checkpoint {
            consumer: "settler".into(),
            partition: 7,
            next_offset: ((n + 1) * 25) as u64,
        };
        persisted += store
            .persist_batch(chunk, Some(&cp))
            .await
            .expect("persist");
    }
    assert_eq!(persisted, N as usize);
    // A replay of everything (with an older checkpoint) inserts nothing and keeps the max.
    let old = Checkpoint {
        consumer: "settler".into(),
        partition: 7,
        next_offset: 10,
    };
    assert_eq!(
        store
            .persist_batch(&orders, Some(&old))
            .await
            .expect("replay"),
        0
    );
    assert_eq!(store.checkpoint("settler", 7).await.expect("cp"), Some(75));
    // A batch repeating an id holds it once; an empty batch still checkpoints.
    let extra = order("many", N, 1, Timestamp(base));
    assert_eq!(
        store
            .persist_batch(&[extra.clone(), extra.clone()], None)
            .await
            .expect("repeat"),
        1
    );
    let cp = Checkpoint {
        consumer: "settler".into(),
        partition: 7,
        next_offset: 80,
    };
    assert_eq!(store.persist_batch(&[], Some(&cp)).await.expect("empty"), 0);
    assert_eq!(store.checkpoint("settler", 7).await.expect("cp"), Some(80));
    let mut orders = orders;
    orders.push(extra);
    let n = orders.len();

    // orders_of_sale: every order, by sequence.
    let listed = store.orders_of_sale(&many.id).await.expect("of sale");
    assert_eq!(listed.len(), n);
    assert_eq!(
        listed.iter().map(|o| o.new.sequence).collect::<Vec<_>>(),
        (0..n as u64).collect::<Vec<_>>()
    );
    let by_id: HashMap<OrderId, &NewOrder> = orders.iter().map(|o| (o.order_id, o)).collect();
    for o in &listed {
        assert_eq!(&o.new, by_id[&o.new.order_id]);
        assert_eq!(o.status, Persisted);
    }

    // orders_in_status: oldest accepted first, the limit after the merge.
    let mut by_age = orders.clone();
    by_age.sort_by_key(|o| (o.accepted_at, o.order_id));
    let oldest: Vec<_> = by_age.iter().map(|o| o.order_id).collect();
    let five = store
        .orders_in_status(&[Persisted], 5)
        .await
        .expect("in status");
    assert_eq!(ids(&five), oldest[..5].to_vec());
    let all = store
        .orders_in_status(&[Persisted, PaymentPending], 1000)
        .await
        .expect("all");
    // (The last one is the first sale's order left in persisted: accepted after these.)
    assert_eq!(ids(&all[..n]), oldest);
    assert_eq!(all.len(), n + 1);
    assert!(store
        .orders_in_status(&[Expired], 10)
        .await
        .expect("none expired")
        .is_empty());
    assert!(store
        .orders_in_status(&[], 10)
        .await
        .expect("no statuses")
        .is_empty());

    // The outbox: two events per new order, oldest first, limit after the merge; each
    // order's accepted comes before its persisted.
    let events = store.unpublished_events(1000).await.expect("events");
    assert_eq!(events.len(), 2 * n);
    assert!(events.windows(2).all(|w| w[0].at <= w[1].at));
    for o in &orders {
        let pos = |st| {
            events
                .iter()
                .position(|e| e.order_id == o.order_id && e.status == st)
                .expect("event")
        };
        assert!(pos(Accepted) < pos(Persisted));
    }
    let ten = store.unpublished_events(10).await.expect("ten");
    assert_eq!(ten, events[..10].to_vec());
    let published: Vec<_> = events.iter().map(|e| (e.order_id, e.status)).collect();
    assert_eq!(
        store.mark_published(&published).await.expect("publish"),
        2 * n
    );
    assert!(store.unpublished_events(10).await.expect("none").is_empty());

    // Move a third to payment_pending, then settle some of them every way.
    let third: Vec<_> = orders.iter().step_by(3).map(|o| o.order_id).collect();
    for &id in &third {
        assert!(store
            .transition(id, Persisted, PaymentPending, None)
            .await
            .expect("pending"));
    }
    let pending = store
        .pending_since(Timestamp::now().plus_millis(1_000), 1000)
        .await
        .expect("pending");
    assert_eq!(
        ids(&pending).into_iter().collect::<BTreeSet<_>>(),
        third.iter().copied().collect::<BTreeSet<_>>()
    );
    let entered = |o: &Order| {
        o.history
            .iter()
            .find(|h| h.status == PaymentPending)
            .map(|h| h.at)
    };
    // The listing has no history; look each up to check the order of entry.
    let mut entered_at = Vec::new();
    for id in ids(&pending) {
        let o = store.get_order(id).await.expect("get").expect("some");
        entered_at.push(entered(&o).expect("entered"));
    }
    assert!(entered_at.windows(2).all(|w| w[0] <= w[1]));
    let three = store
        .pending_since(Timestamp::now().plus_millis(1_000), 3)
        .await
        .expect("three");
    // The limit keeps the earliest (ties in the millisecond may come in any order).
    let mut three_at = Vec::new();
    for id in ids(&three) {
        let o = store.get_order(id).await.expect("get").expect("some");
        three_at.push(entered(&o).expect("entered"));
    }
    assert_eq!(three_at, entered_at[..3].to_vec());

    let (paid, rest) = third.split_at(third.len() / 2);
    let (failed, expired) = rest.split_at(rest.len() / 2);
    for (i, &id) in paid.iter().enumerate() {
        let charge = format!("ch_{i}");
        assert!(store
            .transition(id, PaymentPending, Paid, Some(&charge))
            .await
            .expect("paid"));
    }
    for &id in failed {
        assert!(store
            .transition(id, PaymentPending, PaymentFailed, None)
            .await
            .expect("failed"));
    }
    for &id in expired {
        assert!(store
            .transition(id, PaymentPending, Expired, None)
            .await
            .expect("expired"));
    }
    // Two never-charged orders expire from persisted.
    let never: Vec<_> = orders
        .iter()
        .map(|o| o.order_id)
        .filter(|id| !third.contains(id))
        .take(2)
        .collect();
    for &id in &never {
        assert!(store
            .transition(id, Persisted, Expired, None)
            .await
            .expect("expire"));
    }
    assert!(store
        .pending_since(Timestamp::now().plus_millis(1_000), 1000)
        .await
        .expect("none pending")
        .is_empty());

    let finals = third.len() + never.len();
    let followups = store.unfinished_followups(1000).await.expect("followups");
    // (Plus the first sale's paid order, not yet notified, accepted after these.)
    assert_eq!(followups.len(), finals + 1);
    assert!(followups
        .windows(2)
        .all(|w| w[0].new.accepted_at <= w[1].new.accepted_at));
    assert_eq!(
        ids(&store.unfinished_followups(4).await.expect("four")),
        ids(&followups)[..4].to_vec()
    );
    // Release what went back, notify everything: nothing is owed any more.
    let releasing: Vec<_> = failed
        .iter()
        .chain(expired)
        .chain(&never)
        .copied()
        .collect();
    for &id in &releasing {
        assert!(store.mark_released(id).await.expect("release"));
    }
    for &id in paid {
        assert!(!store.mark_released(id).await.expect("paid keeps its stock"));
    }
    for o in &followups {
        assert!(store.mark_notified(o.new.order_id).await.expect("notify"));
    }
    assert!(store
        .unfinished_followups(1000)
        .await
        .expect("done")
        .is_empty());

    // Totals add up over every shard.
    let quantity: HashMap<OrderId, u64> = orders
        .iter()
        .map(|o| (o.order_id, u64::from(o.quantity)))
        .collect();
    let units = |ids: &[OrderId]| ids.iter().map(|id| quantity[id]).sum::<u64>();
    let totals = store.sale_totals(&many.id).await.expect("totals");
    assert_eq!(totals.orders, n as u64);
    assert_eq!(totals.units, quantity.values().sum::<u64>());
    assert_eq!(totals.get(Paid).orders, paid.len() as u64);
    assert_eq!(totals.get(Paid).units, units(paid));
    assert_eq!(totals.get(PaymentFailed).units, units(failed));
    let expired_all: Vec<_> = expired.iter().chain(&never).copied().collect();
    assert_eq!(totals.get(Expired).orders, expired_all.len() as u64);
    assert_eq!(totals.get(Expired).units, units(&expired_all));
    assert_eq!(totals.get(Persisted).orders, (n - finals) as u64);
    assert_eq!(totals.released_orders, releasing.len() as u64);
    assert_eq!(totals.released_units, units(&releasing));
    let statuses: Vec<_> = totals.by_status.iter().map(|c| c.status.as_str()).collect();
    let mut sorted = statuses.clone();
    sorted.sort_unstable();
    assert_eq!(statuses, sorted, "by_status is sorted by name");
    assert_eq!(
        totals.by_status.iter().map(|c| c.orders).sum::<u64>(),
        totals.orders
    );
    // The first sale is untouched by all this.
    assert_eq!(
        store
            .sale_totals(&sale("s1").id)
            .await
            .expect("s1 totals")
            .orders,
        3
    );
    store.ping().await.expect("ping");
}

#[cfg(feature = "embedded")]
#[tokio::test]
async fn sqlite_store_conforms() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = storage::sqlite::SqliteStore::open(dir.path().join("db.sqlite")).expect("open");
    check(&store, &|_| 0).await;
}

/// (d) Group commit: many concurrent callers, each with its own batches and a command that
/// fails, all get their own right answers, and writes share transactions.
#[cfg(feature = "embedded")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_concurrent_batches_commit_in_groups() {
    use std::sync::Arc;
    use std::time::Duration;
    use OrderStatus::*;
    const TASKS: usize = 32;
    const ORDERS: u64 = 10; // 5 changes each: 50 changes per batch
    let dir = tempfile::tempdir().expect("tempdir");
    let store = storage::sqlite::SqliteStore::open(dir.path().join("db.sqlite")).expect("open");
    let s = sale("crowd");
    store.create_sale(&s).await.expect("sale");
    let orders: Vec<_> = (0..TASKS as u64 * ORDERS)
        .map(|i| order("crowd", i, 1, Timestamp::now()))
        .collect();
    store.persist_batch(&orders, None).await.expect("persist");
    publish_all(&store).await;
    let start = store.writer_stats();

    let barrier = Arc::new(tokio::sync::Barrier::new(TASKS));
    let tasks: Vec<_> = orders
        .chunks(ORDERS as usize)
        .map(|chunk| {
            let ids: Vec<_> = chunk.iter().map(|o| o.order_id).collect();
            let (store, barrier, s) = (store.clone(), Arc::clone(&barrier), s.clone());
            tokio::spawn(async move {
                let mut changes = Vec::new();
                let mut want = Vec::new();
                for (i, &id) in ids.iter().enumerate() {
                    let paid = i % 2 == 0;
                    let charge = format!("ch_{id}");
                    changes.push(status(id, Persisted, PaymentPending, None));
                    changes.push(if paid {
                        status(id, PaymentPending, Paid, Some(&charge))
                    } else {
                        status(id, PaymentPending, PaymentFailed, None)
                    });
                    changes.push(Change::Released(id));
                    changes.push(Change::Notified(id));
                    changes.push(Change::Notified(id));
                    want.extend([true, true, !paid, true, false]);
                }
                barrier.wait().await;
                let first = store.apply_batch(&changes).await.expect("batch");
                let refused = store.create_sale(&s).await;
                let replay = store.apply_batch(&changes).await.expect("replay");
                (
                    ids,
                    first == want,
                    matches!(refused, Err(Error::SaleExists(_))),
                    replay,
                )
            })
        })
        .collect();
    let deadline = Duration::from_secs(60);
    for task in tasks {
        let (ids, right, refused, replay) = tokio::time::timeout(deadline, task)
            .await
            .expect("in time")
            .expect("task");
        assert!(right, "wrong answers for {ids:?}");
        assert!(refused, "create_sale of an existing sale must fail alone");
        assert!(replay.iter().all(|a| !a), "a replay applies nothing");
        for (i, id) in ids.into_iter().enumerate() {
            let o = store.get_order(id).await.expect("get").expect("some");
            let want = if i % 2 == 0 { Paid } else { PaymentFailed };
            assert_eq!(o.status, want);
            assert_eq!(o.released_at.is_some(), want == PaymentFailed);
            assert!(o.notified_at.is_some());
            assert_eq!(o.history.len(), 4, "{:?}", o.history);
        }
    }
    let totals = store.sale_totals(&s.id).await.expect("totals");
    let half = (TASKS as u64 * ORDERS) / 2;
    assert_eq!(totals.get(Paid).orders, half);
    assert_eq!(totals.get(PaymentFailed).orders, half);
    assert_eq!(totals.released_orders, half);
    assert_eq!(
        store
            .unpublished_events(100_000)
            .await
            .expect("events")
            .len(),
        TASKS * ORDERS as usize * 2
    );
    let stats = store.writer_stats();
    let commands = stats.commands - start.commands;
    let groups = stats.groups - start.groups;
    assert_eq!(commands, 3 * TASKS as u64, "{stats:?}");
    eprintln!("{commands} concurrent writes committed in {groups} transactions");
    assert!(
        groups < commands,
        "no two writes shared a commit: {stats:?}"
    );
}

/// The sharded Postgres store: two servers, one shard each.
#[cfg(feature = "postgres")]
mod postgres {
    use super::*;
    use std::time::{Duration, Instant};
    use storage::postgres::PgStore;

    async fn migrated(pg: &testkit::PostgresCluster) -> PgStore {
        PgStore::migrate(&pg.catalog_url(), &pg.shard_urls())
            .await
            .expect("migrate");
        PgStore::connect(&pg.catalog_url(), &pg.shard_urls(), 8)
            .await
            .expect("connect")
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn conforms_over_two_shards() {
        let pg = testkit::PostgresCluster::start(2);
        let store = migrated(&pg).await;
        assert_eq!(store.shard_count(), 2);
        check(&store, &|id| store.shard_of(id)).await;
        // The orders did spread: every shard holds some, each on the shard its id says.
        let orders = store
            .orders_of_sale(&SaleId::parse("many").expect("id"))
            .await
            .expect("orders");
        let mut per_shard = [0usize; 2];
        for o in &orders {
            per_shard[store.shard_of(o.new.order_id)] += 1;
        }
        assert!(per_shard.iter().all(|&c| c > 0), "{per_shard:?}");
        assert_eq!(
            store.shard_of(orders[0].new.order_id),
            shard::shard_of(orders[0].new.order_id, 2) as usize
        );
        // Migrating again changes nothing, and a second store sees the same data.
        let again = migrated(&pg).await;
        assert_eq!(
            again
                .orders_of_sale(&orders[0].new.sale_id)
                .await
                .expect("again"),
            orders
        );
    }

    /// A shard that hangs (SIGSTOP: its connections stay open, nothing is answered, TCP
    /// never gives up) fails each call at the store's deadline instead of holding it for as
    /// long as the server is stopped; the other shard keeps answering, and once the shard
    /// resumes the calls work again and a write cut off by the deadline can be repeated.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_hung_shard_fails_calls_at_their_deadline() {
        use storage::metrics::Metered;
        use OrderStatus::*;
        let mut pg = testkit::PostgresCluster::start(2);
        let store = Metered::new(migrated(&pg).await, Duration::from_secs(1));
        store.create_sale(&sale("hung")).await.expect("sale");
        let orders: Vec<_> = (0..32)
            .map(|i| order("hung", i, 1, Timestamp::now()))
            .collect();
        store.persist_batch(&orders, None).await.expect("persist");
        let on = |shard| {
            orders
                .iter()
                .find(|o| store.inner().shard_of(o.order_id) == shard)
                .expect("an order on each shard")
                .order_id
        };
        let (healthy, hung) = (on(0), on(1));
        let pending = [status(hung, Persisted, PaymentPending, None)];

        pg.freeze_shard(1);
        // Without a deadline these wait for as long as the shard is frozen: the outer
        // timeout only turns such a hang into a failure that says so.
        let hang = Duration::from_secs(30);
        let read = tokio::time::timeout(hang, store.get_order(hung))
            .await
            .expect("a read of the frozen shard returned");
        assert!(
            matches!(&read, Err(Error::Unavailable { context: m, .. }) if m.contains("deadline")),
            "{read:?}"
        );
        let write = tokio::time::timeout(hang, store.apply_batch(&pending))
            .await
            .expect("a write to the frozen shard returned");
        assert!(
            matches!(&write, Err(Error::Unavailable { .. })),
            "{write:?}"
        );
        let other = tokio::time::timeout(hang, store.get_order(healthy))
            .await
            .expect("a read of the other shard returned")
            .expect("the other shard answers");
        assert_eq!(other.map(|o| o.status), Some(Persisted));

        pg.thaw_shard(1);
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Ok(Some(_)) = store.get_order(hung).await {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "the thawed shard never answered again"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        // The write cut off may have committed after all; repeating it is safe.
        let again = store.apply_batch(&pending).await.expect("write after thaw");
        assert_eq!(again.len(), 1);
        let order = store.get_order(hung).await.expect("get").expect("order");
        assert_eq!(order.status, PaymentPending);
        let entered = order
            .history
            .iter()
            .filter(|h| h.status == PaymentPending)
            .count();
        assert_eq!(entered, 1, "entered payment_pending once");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn connect_refuses_an_unmigrated_store() {
        let pg = testkit::PostgresCluster::start(1);
        let err = PgStore::connect(&pg.catalog_url(), &pg.shard_urls(), 2)
            .await
            .expect_err("not migrated");
        assert!(
            matches!(&err, Error::Unavailable { context: m, .. } if m.contains("flashsale migrate")),
            "{err}"
        );
        // A shard URL that nothing answers is refused too, quickly, naming the shard.
        PgStore::migrate(&pg.catalog_url(), &pg.shard_urls())
            .await
            .expect("migrate");
        let mut urls = pg.shard_urls();
        urls.push(format!(
            "postgres://postgres@127.0.0.1:{}/nothing",
            testkit::free_port()
        ));
        let started = Instant::now();
        let err = PgStore::connect(&pg.catalog_url(), &urls, 2)
            .await
            .expect_err("shard 1 down");
        assert!(
            matches!(&err, Error::Unavailable { context: m, .. } if m.contains("shard 1")),
            "{err}"
        );
        assert!(started.elapsed() < Duration::from_secs(10));
    }

    #[tokio::test]
    async fn the_catalog_and_a_shard_share_a_database_and_the_shard_count_is_kept() {
        let pg = testkit::PostgresCluster::start(1);
        // The default layout: the catalog lives in the first shard's database.
        let shard = pg.shard_urls()[0].clone();
        PgStore::migrate(&shard, std::slice::from_ref(&shard))
            .await
            .expect("migrate catalog and shard into one database");
        PgStore::migrate(&shard, std::slice::from_ref(&shard))
            .await
            .expect("again");
        let store = PgStore::connect(&shard, std::slice::from_ref(&shard), 2)
            .await
            .expect("connect");
        check(&store, &|id| store.shard_of(id)).await;
        // Another shard list would send every order id to the wrong shard: refused, by
        // migrate and by connect, and nothing changes.
        pg.server(0).create_database("second");
        let two = vec![shard.clone(), pg.server(0).url("second")];
        let err = PgStore::migrate(&shard, &two)
            .await
            .expect_err("two shards over a one-shard catalog");
        assert!(
            matches!(&err, Error::Unavailable { context: m, .. } if m.contains("records 1 shard")),
            "{err}"
        );
        let err = PgStore::connect(&shard, &two, 2)
            .await
            .expect_err("connect with two");
        assert!(
            matches!(&err, Error::Unavailable { context: m, .. } if m.contains("records 1 shard")),
            "{err}"
        );
    }

    /// A batch over two shards that one shard refuses: that shard's part changes nothing,
    /// the other's commits (a sharded store is atomic per database), and the retried batch
    /// applies exactly the refused part.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_refused_shard_keeps_its_part_of_a_batch_unchanged() {
        use OrderStatus::*;
        let pg = testkit::PostgresCluster::start(2);
        let store = migrated(&pg).await;
        store.create_sale(&sale("split")).await.expect("sale");
        let orders: Vec<_> = (0..40)
            .map(|i| order("split", i, 1, Timestamp::now()))
            .collect();
        store.persist_batch(&orders, None).await.expect("persist");
        let on = |shard: usize| -> Vec<OrderId> {
            orders
                .iter()
                .map(|o| o.order_id)
                .filter(|&id| store.shard_of(id) == shard)
                .take(2)
                .collect()
        };
        let (zero, one) = (on(0), on(1));
        assert_eq!((zero.len(), one.len()), (2, 2));
        let long = "x".repeat(201);
        let mut changes = vec![
            status(zero[0], Persisted, PaymentPending, None),
            status(one[0], Persisted, PaymentPending, None),
            status(zero[0], PaymentPending, Paid, Some("ch_0")),
            status(one[1], Persisted, PaymentPending, None),
            status(one[1], PaymentPending, Paid, Some(&long)),
            status(zero[1], Persisted, Expired, None),
            Change::Released(zero[1]),
        ];
        let one_before = snapshot(&store, &one).await;
        let err = store
            .apply_batch(&changes)
            .await
            .expect_err("shard 1 refuses the charge id");
        assert!(matches!(&err, Error::Invalid(_)), "{err}");
        assert_eq!(snapshot(&store, &one).await, one_before);
        let z0 = store.get_order(zero[0]).await.expect("get").expect("z0");
        assert_eq!((z0.status, z0.charge_id.as_deref()), (Paid, Some("ch_0")));
        let z1 = store.get_order(zero[1]).await.expect("get").expect("z1");
        assert_eq!(z1.status, Expired);
        assert!(z1.released_at.is_some());
        // The retry applies shard 1's part only: shard 0's is done.
        changes[4] = status(one[1], PaymentPending, Paid, Some("ch_1"));
        assert_eq!(
            store.apply_batch(&changes).await.expect("retry"),
            vec![false, true, false, true, true, false, false]
        );
        let o1 = store.get_order(one[1]).await.expect("get").expect("o1");
        assert_eq!((o1.status, o1.charge_id.as_deref()), (Paid, Some("ch_1")));
        // Each shard's totals moved with its own part only.
        totals_agree_with_the_orders(&store).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn stopped_shard_is_unavailable_then_recovers() {
        let mut pg = testkit::PostgresCluster::start(2);
        let store = migrated(&pg).await;
        let s = sale("outage");
        store.create_sale(&s).await.expect("sale");
        // Enough orders that both shards hold some.
        let orders: Vec<_> = (0..40)
            .map(|i| order("outage", i, 1, Timestamp::now()))
            .collect();
        assert_eq!(
            store.persist_batch(&orders, None).await.expect("persist"),
            40
        );
        let on_1 = orders
            .iter()
            .find(|o| store.shard_of(o.order_id) == 1)
            .expect("an order on shard 1")
            .order_id;
        let on_0 = orders
            .iter()
            .find(|o| store.shard_of(o.order_id) == 0)
            .expect("an order on shard 0")
            .order_id;

        pg.stop_shard(1);
        // Every call that needs shard 1 fails with Unavailable, naming it, within seconds.
        let started = Instant::now();
        let err = store.get_order(on_1).await.expect_err("shard 1 is down");
        assert!(
            matches!(&err, Error::Unavailable { context: m, .. } if m.contains("shard 1")),
            "{err}"
        );
        assert!(matches!(
            store.orders_of_sale(&s.id).await,
            Err(Error::Unavailable { .. })
        ));
        assert!(matches!(
            store
                .transition(
                    on_1,
                    OrderStatus::Persisted,
                    OrderStatus::PaymentPending,
                    None
                )
                .await,
            Err(Error::Unavailable { .. })
        ));
        let more: Vec<_> = (40..80)
            .map(|i| order("outage", i, 1, Timestamp::now()))
            .collect();
        let cp = Checkpoint {
            consumer: "settler".into(),
            partition: 0,
            next_offset: 80,
        };
        assert!(matches!(
            store.persist_batch(&more, Some(&cp)).await,
            Err(Error::Unavailable { .. })
        ));
        assert!(matches!(store.ping().await, Err(Error::Unavailable { .. })));
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "failing took {:?}",
            started.elapsed()
        );
        // The failed batch wrote no checkpoint; shard 0 and the catalog still answer.
        assert_eq!(store.checkpoint("settler", 0).await.expect("cp"), None);
        assert!(store.get_order(on_0).await.expect("shard 0").is_some());

        pg.start_shard(1);
        let got = testkit::eventually_ok("shard 1 back", Duration::from_secs(20), || {
            store.get_order(on_1)
        })
        .await;
        assert_eq!(got.expect("order").new.order_id, on_1);
        // The retried batch inserts what the failed attempt did not, then checkpoints.
        let on_shard_1 = more
            .iter()
            .filter(|o| store.shard_of(o.order_id) == 1)
            .count();
        let retried = store.persist_batch(&more, Some(&cp)).await.expect("retry");
        assert_eq!(
            retried, on_shard_1,
            "shard 0 committed its part the first time"
        );
        assert_eq!(store.checkpoint("settler", 0).await.expect("cp"), Some(80));
        assert_eq!(store.sale_totals(&s.id).await.expect("totals").orders, 80);
        store.ping().await.expect("ping");
    }
}

/// The Scylla store: against the harness's CQL server (kassandra, in-process), or against a
/// live Scylla or Cassandra node when `FLASHSALE_TEST_SCYLLA=host:port` is set (in a fresh
/// keyspace of its own, dropped afterwards).
#[cfg(feature = "scylla")]
mod scylla_store {
    use super::*;
    use storage::scylla::{ScyllaConfig, ScyllaStore};

    /// A CQL node to test against: the live one named by the environment, else a harness
    /// server (kept alive by the returned guard).
    fn node() -> (String, Option<testkit::CqlServer>) {
        match std::env::var("FLASHSALE_TEST_SCYLLA") {
            Ok(live) if !live.trim().is_empty() => (live.trim().to_owned(), None),
            _ => {
                let server = testkit::CqlServer::start();
                (server.node(), Some(server))
            }
        }
    }

    fn config(node: &str) -> ScyllaConfig {
        let keyspace = format!(
            "fs_test_{}_{}",
            std::process::id(),
            Timestamp::now().millis() % 1_000_000_000
        );
        ScyllaConfig::from_url(&format!("scylla://{node}/{keyspace}")).expect("url")
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn conforms() {
        let (node, _server) = node();
        let config = config(&node);
        assert_eq!(
            ScyllaStore::migrate(&config).await.expect("migrate"),
            vec![1, 2]
        );
        assert!(
            ScyllaStore::migrate(&config)
                .await
                .expect("migrate again")
                .is_empty(),
            "a second migrate applies nothing"
        );
        let store = ScyllaStore::connect(&config).await.expect("connect");
        check(&store, &|_| 0).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_unmigrated_keyspace_is_refused_naming_the_fix() {
        let (node, _server) = node();
        let err = ScyllaStore::connect(&config(&node))
            .await
            .expect_err("no schema yet");
        assert!(err.to_string().contains("flashsale migrate"), "{err}");
    }
}
