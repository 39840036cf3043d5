//! Bounded memory of embedded admission: a flash sale with 1,000,000 distinct buyers keeps
//! its token buckets under the cap (refilled buckets are dropped, not kept forever), its
//! per-order entries bounded by the orders it took, refuses clearly when a map is full,
//! and drops a sale's entries once it ended and settled.

use ingest::admission::{Admission, EmbeddedAdmission};
use ingest::model::{AdmitRequest, Decision, Limits, OrderRef, Rejection};
use storage::{Currency, Money, OrderId, Sale, SaleId, Timestamp, UserId, UserRate};

const SEC: i64 = 1_000_000;

fn sale(id: &str, stock: u32, starts: Timestamp, ends: Timestamp) -> Sale {
    Sale {
        stock_buckets: 1,
        id: SaleId::parse(id).expect("sale id"),
        sku: "sku".into(),
        stock,
        price: Money {
            minor: 100,
            currency: Currency::parse("EUR").expect("eur"),
        },
        starts_at: starts,
        ends_at: ends,
        per_user_limit: 2,
        max_quantity_per_order: 2,
        user_rate: UserRate {
            per_second: 5,
            burst: 10,
        },
        created_at: starts,
    }
}

fn attempt(user: u64) -> AdmitRequest {
    AdmitRequest {
        user: UserId::parse(format!("u{user}")).expect("user"),
        quantity: 1,
        key: "k".into(),
        fingerprint: "f".into(),
        order_id: OrderId::new(),
    }
}

#[tokio::test]
async fn a_million_distinct_buyers_keep_admission_memory_bounded() {
    const USERS: u64 = 1_000_000;
    const PER_SECOND: u64 = 20_000;
    const MAX_BUCKETS: usize = 60_000;
    const STOCK: u32 = 10_000;
    let start = Timestamp::now();
    let s = sale("million", STOCK, start, start.plus_millis(3_600_000));
    let admission = EmbeddedAdmission::with_limits(Limits {
        max_orders: 100_000,
        max_buckets: MAX_BUCKETS,
    });
    admission.create_sale(&s).await.expect("create");
    let t0 = start.micros();
    let (mut accepted, mut sold_out, mut refused) = (0u64, 0u64, 0u64);
    let mut most_buckets = 0;
    for u in 0..USERS {
        // 20,000 new buyers a second for 50 simulated seconds; a bucket that gave one
        // token (burst 10, rate 5/s) refills in 0.2 s, and a maintenance pass runs once a
        // simulated second, so about one second of buyers is kept at most.
        let now = t0 + (u * SEC as u64 / PER_SECOND) as i64;
        if u % PER_SECOND == 0 {
            admission.maintain(now);
        }
        let r = attempt(u);
        match admission.admit_at(&s.id, &r, now) {
            Decision::Accepted(_) => {
                accepted += 1;
                admission
                    .confirm(&s.id, &OrderRef::from(&r))
                    .await
                    .expect("confirm");
            }
            Decision::Rejected(Rejection::SoldOut) => sold_out += 1,
            Decision::Rejected(Rejection::Capacity { .. }) => refused += 1,
            other => panic!("user {u}: unexpected {other:?}"),
        }
        if u % 1000 == 0 {
            let e = admission.entries(&s.id).expect("entries");
            most_buckets = most_buckets.max(e.buckets);
        }
    }
    let e = admission.entries(&s.id).expect("entries");
    assert!(
        most_buckets <= MAX_BUCKETS && e.buckets <= MAX_BUCKETS,
        "buckets {most_buckets} / {} over the cap {MAX_BUCKETS}",
        e.buckets
    );
    assert!(
        most_buckets <= 25_000,
        "about 1 s of buyers is kept; {most_buckets} buckets kept"
    );
    assert_eq!(
        refused, 0,
        "refilled buckets are dropped, so no buyer meets the cap"
    );
    assert_eq!(accepted, u64::from(STOCK));
    assert_eq!(sold_out, USERS - u64::from(STOCK));
    // Per-order state grows with the orders taken, never with the buyers.
    assert_eq!((e.units, e.answers), (STOCK as usize, STOCK as usize));
    // Seconds later every bucket has refilled and a maintenance pass drops them all.
    let later = t0 + (USERS * SEC as u64 / PER_SECOND) as i64 + 3 * SEC;
    let after = admission.maintain(later);
    assert_eq!(after.buckets, 0);
    assert!(after.total() <= 2 * STOCK as usize, "{after:?}");
}

#[tokio::test]
async fn a_full_bucket_map_refuses_with_capacity_until_buckets_refill() {
    let start = Timestamp::now();
    let s = sale("capped", 1_000, start, start.plus_millis(3_600_000));
    let admission = EmbeddedAdmission::with_limits(Limits {
        max_orders: 1_000_000,
        max_buckets: 100,
    });
    admission.create_sale(&s).await.expect("create");
    let now = start.micros();
    for u in 0..100 {
        assert!(matches!(
            admission.admit_at(&s.id, &attempt(u), now),
            Decision::Accepted(_)
        ));
    }
    // Every bucket is still refilling: a new buyer is refused, and nothing is taken.
    let refused = admission.admit_at(&s.id, &attempt(100), now + SEC / 10);
    let Decision::Rejected(Rejection::Capacity { retry_after_s }) = refused else {
        panic!("expected capacity_exceeded, got {refused:?}");
    };
    assert!((1..=2).contains(&retry_after_s), "{retry_after_s}");
    assert_eq!(admission.units_of(&s.id, &attempt(100).user), 0);
    // A buyer who has a bucket still gets decided.
    let again = AdmitRequest {
        key: "k2".into(),
        ..attempt(5)
    };
    assert!(matches!(
        admission.admit_at(&s.id, &again, now + SEC / 10),
        Decision::Accepted(_)
    ));
    // Once the buckets refilled (burst 10 at 5/s: 2 s), they are dropped and room is back.
    assert!(matches!(
        admission.admit_at(&s.id, &attempt(100), now + 3 * SEC),
        Decision::Accepted(_)
    ));
    assert!(admission.entries(&s.id).expect("entries").buckets <= 2);
}

#[tokio::test]
async fn the_order_cap_refuses_without_taking_and_a_settled_sale_is_retired() {
    let start = Timestamp::now();
    let s = sale("retire", 100, start, start.plus_millis(60_000));
    let admission = EmbeddedAdmission::with_limits(Limits {
        max_orders: 3,
        max_buckets: 1_000,
    });
    admission.create_sale(&s).await.expect("create");
    let now = start.micros();
    let orders: Vec<AdmitRequest> = (0..3).map(attempt).collect();
    for r in &orders {
        assert!(matches!(
            admission.admit_at(&s.id, r, now),
            Decision::Accepted(_)
        ));
        admission
            .confirm(&s.id, &OrderRef::from(r))
            .await
            .expect("confirm");
        assert!(admission
            .claim(&s.id, &OrderRef::from(r))
            .await
            .expect("claim"));
    }
    assert_eq!(
        admission.admit_at(&s.id, &attempt(3), now),
        Decision::Rejected(Rejection::Capacity { retry_after_s: 0 })
    );
    let c = admission.counters(&s.id).await.expect("ok").expect("sale");
    assert_eq!((c.accepted_orders, c.stock_left), (3, 97));
    // A released order's user holds nothing, and keeps no entry.
    assert!(admission
        .release(&s.id, &OrderRef::from(&orders[0]))
        .await
        .expect("release"));
    let e = admission.entries(&s.id).expect("entries");
    assert_eq!((e.units, e.answers, e.released, e.claimed), (2, 3, 1, 3));
    // Not a candidate before its end plus the retention.
    let ends = s.ends_at.micros();
    assert!(admission.ended_sales(ends, 60 * SEC).is_empty());
    assert_eq!(
        admission.ended_sales(ends + 60 * SEC, 60 * SEC),
        vec![(s.id.clone(), 3)]
    );
    admission.retire(&s.id);
    assert_eq!(admission.entries(&s.id).expect("entries").total(), 0);
    assert!(admission.ended_sales(ends + 60 * SEC, 60 * SEC).is_empty());
    // The counters stay for stats; a retry past the retention is refused as not active.
    let c = admission.counters(&s.id).await.expect("ok").expect("sale");
    assert_eq!((c.accepted_orders, c.stock_left), (3, 98));
    assert_eq!(
        admission.admit_at(&s.id, &orders[1], ends + 61 * SEC),
        Decision::Rejected(Rejection::NotActive)
    );
}
