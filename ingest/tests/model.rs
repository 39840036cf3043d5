//! Model test: random sequences of admit (user, quantity, key, body), confirm, release,
//! abort, stock additions and clock steps run against the I/O-free model, the embedded
//! backend and the Redis backend (a real redis-server, and a 3-primary Redis Cluster); all
//! must give the same outcomes and end in the same state. Sales of several stock buckets
//! run on the cluster against the buckets' model (`ingest::stock_buckets::BucketedSale`).

use ingest::admission::{Admission, EmbeddedAdmission};
use ingest::model::{AdmitRequest, OrderRef, SaleRules, SaleState};
use ingest::redis_admission::RedisAdmission;
use ingest::stock_buckets::{home_bucket, BucketedSale};
use proptest::prelude::*;
use std::time::Duration;
use storage::{Currency, Money, OrderId, Sale, SaleId, Timestamp, UserId, UserRate};

#[derive(Debug, Clone)]
enum Op {
    Admit {
        user: u8,
        qty: u32,
        key: u8,
        body: u8,
    },
    Confirm(usize),
    Release(usize),
    Abort(usize),
    Claim(usize),
    Tick(u32),
    AddStock(u8),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        8 => (0u8..5, 1u32..4, 0u8..5, 0u8..2).prop_map(|(user, qty, key, body)| Op::Admit { user, qty, key, body }),
        4 => (0usize..40).prop_map(Op::Confirm),
        2 => (0usize..40).prop_map(Op::Release),
        1 => (0usize..40).prop_map(Op::Abort),
        1 => (0usize..40).prop_map(Op::Claim),
        2 => (0u32..700_000).prop_map(Op::Tick),
        1 => (1u8..4).prop_map(Op::AddStock),
    ]
}

/// As [`op`], with more buyers (so every bucket has some) and larger stock additions.
fn bucket_op() -> impl Strategy<Value = Op> {
    prop_oneof![
        10 => (0u8..16, 1u32..4, 0u8..3, 0u8..2).prop_map(|(user, qty, key, body)| Op::Admit { user, qty, key, body }),
        4 => (0usize..60).prop_map(Op::Confirm),
        3 => (0usize..60).prop_map(Op::Release),
        1 => (0usize..60).prop_map(Op::Abort),
        2 => (0usize..60).prop_map(Op::Claim),
        1 => (0u32..700_000).prop_map(Op::Tick),
        1 => (1u8..6).prop_map(Op::AddStock),
    ]
}

/// Sales of 2 to 5 stock buckets on a 3-primary cluster decide as the buckets' model does:
/// the same answers (sequences included), the same counters, the same units per buyer, and
/// each bucket's units left as the model's (so borrowing moved the same units).
#[test]
fn stock_buckets_on_a_redis_cluster_agree_with_the_model() {
    let cluster = testkit::RedisCluster::start(3);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let redis = rt
        .block_on(RedisAdmission::connect(
            &cluster.url(),
            "fs:",
            Duration::from_secs(2),
        ))
        .expect("connect");
    let case = std::sync::atomic::AtomicU32::new(0);
    let borrowed = std::sync::atomic::AtomicU32::new(0);
    let config = ProptestConfig {
        cases: 48,
        ..ProptestConfig::default()
    };
    proptest!(config, |(stock in 2u32..30, n in 2u32..6, limit in 1u32..5, rate in 1u32..4,
                        burst in 1u32..6, ops in prop::collection::vec(bucket_op(), 1..80))| {
        let c = case.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let sale_id = SaleId::parse(format!("buckets-{c}")).expect("id");
        let mut s = sale(&sale_id, stock, limit, rate, burst);
        s.stock_buckets = n.min(stock);
        let n = s.stock_buckets;
        let mut model = BucketedSale::new(SaleRules::of(&s), n);
        rt.block_on(redis.create_sale(&s)).expect("create");
        let mut accepted: Vec<AdmitRequest> = Vec::new();
        for op in ops {
            match op {
                Op::Admit { user: u, qty, key, body } => {
                    let req = AdmitRequest {
                        user: user(u),
                        quantity: qty.min(limit),
                        key: format!("k{key}"),
                        fingerprint: format!("f{body}"),
                        order_id: OrderId::new(),
                    };
                    let before = model.lefts();
                    let (from_redis, now) = rt.block_on(redis.admit_at(&sale_id, &req)).expect("admit");
                    let from_model = model.admit(&req, now);
                    prop_assert_eq!(from_redis, from_model, "redis vs model at {}", now);
                    let home = home_bucket(&req.user, n) as usize;
                    let after = model.lefts();
                    if (0..n as usize).any(|b| b != home && after[b] < before[b]) {
                        borrowed.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    }
                    if matches!(from_model, ingest::model::Decision::Accepted(_)) {
                        accepted.push(req);
                    }
                }
                Op::Confirm(i) => if let Some(r) = accepted.get(i) {
                    model.confirm(&OrderRef::from(r));
                    rt.block_on(redis.confirm(&sale_id, &OrderRef::from(r))).expect("confirm");
                },
                Op::Release(i) => if let Some(r) = accepted.get(i) {
                    let m = model.release(&OrderRef::from(r));
                    let rr = rt.block_on(redis.release(&sale_id, &OrderRef::from(r))).expect("release");
                    prop_assert_eq!(rr, m);
                },
                Op::Abort(i) => if let Some(r) = accepted.get(i) {
                    let m = model.abort(&OrderRef::from(r));
                    let rr = rt.block_on(redis.abort(&sale_id, &OrderRef::from(r))).expect("abort");
                    prop_assert_eq!(rr, m);
                },
                Op::Claim(i) => if let Some(r) = accepted.get(i) {
                    let m = model.claim(&r.user, r.order_id);
                    let rr = rt.block_on(redis.claim(&sale_id, &OrderRef::from(r))).expect("claim");
                    prop_assert_eq!(rr, m);
                },
                Op::Tick(us) => {
                    rt.block_on(redis.advance_clock(&sale_id, i64::from(us))).expect("tick");
                }
                Op::AddStock(k) => {
                    model.add_stock(u64::from(k));
                    rt.block_on(redis.add_stock(&sale_id, u32::from(k))).expect("add");
                }
            }
        }
        let counters = rt.block_on(redis.counters(&sale_id)).expect("counters").expect("known");
        prop_assert_eq!(&counters, &model.counters());
        for u in 0..16 {
            let m = model.units_of(&user(u));
            prop_assert_eq!(rt.block_on(redis.units_of(&sale_id, &user(u))).expect("units"), m);
        }
    });
    // Buckets ran short and borrowed (the path under test was taken), and the buyers
    // live in every bucket of 5.
    assert!(
        borrowed.into_inner() > 0,
        "no attempt borrowed from another bucket"
    );
    let buckets: std::collections::HashSet<u32> =
        (0..16).map(|u| home_bucket(&user(u), 5)).collect();
    assert_eq!(buckets.len(), 5, "the test's buyers live in every bucket");
}

fn user(u: u8) -> UserId {
    UserId::parse(format!("user-{u}")).expect("user")
}

fn sale(id: &SaleId, stock: u32, limit: u32, rate: u32, burst: u32) -> Sale {
    let now = Timestamp::now();
    Sale {
        stock_buckets: 1,
        id: id.clone(),
        sku: "sku".into(),
        stock,
        price: Money {
            minor: 100,
            currency: Currency::parse("EUR").expect("eur"),
        },
        starts_at: now.plus_millis(-1000),
        ends_at: now.plus_millis(4000),
        per_user_limit: limit,
        max_quantity_per_order: limit,
        user_rate: UserRate {
            per_second: rate,
            burst,
        },
        created_at: now,
    }
}

#[test]
fn model_embedded_and_redis_agree() {
    let server = testkit::RedisServer::start();
    model_agrees_on(&server.url());
}

/// The same on a 3-primary Redis Cluster: the sales of the run (one per case) hash to
/// slots of every node, so the scripts run on all three.
#[test]
fn model_embedded_and_redis_cluster_agree() {
    let cluster = testkit::RedisCluster::start(3);
    let cases = model_agrees_on(&cluster.url());
    let nodes: std::collections::HashSet<usize> = (0..cases)
        .map(|n| cluster.node_of(&format!("fs:{{model-{n}}}:sale")))
        .collect();
    assert_eq!(nodes.len(), 3, "the sales were spread over every primary");
}

/// Runs the model test against the Redis at `url`; returns how many cases (sales) ran.
fn model_agrees_on(url: &str) -> u32 {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let redis = rt
        .block_on(RedisAdmission::connect(url, "fs:", Duration::from_secs(2)))
        .expect("connect");
    let case = std::sync::atomic::AtomicU32::new(0);
    let config = ProptestConfig {
        cases: 64,
        ..ProptestConfig::default()
    };
    proptest!(config, |(stock in 1u32..12, limit in 1u32..5, rate in 1u32..4, burst in 1u32..6,
                        ops in prop::collection::vec(op(), 1..60))| {
        let n = case.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let sale_id = SaleId::parse(format!("model-{n}")).expect("id");
        let s = sale(&sale_id, stock, limit, rate, burst);
        let mut model = SaleState::new(SaleRules::of(&s));
        let embedded = EmbeddedAdmission::new();
        rt.block_on(async {
            embedded.create_sale(&s).await.expect("embedded create");
            redis.create_sale(&s).await.expect("redis create");
        });
        let mut accepted: Vec<AdmitRequest> = Vec::new();
        for op in ops {
            match op {
                Op::Admit { user: u, qty, key, body } => {
                    let req = AdmitRequest {
                        user: user(u),
                        quantity: qty.min(limit),
                        key: format!("k{key}"),
                        fingerprint: format!("f{body}"),
                        order_id: OrderId::new(),
                    };
                    let (from_redis, now) = rt.block_on(redis.admit_at(&sale_id, &req)).expect("redis admit");
                    let from_model = model.admit(&req, now);
                    let from_embedded = embedded.admit_at(&sale_id, &req, now);
                    prop_assert_eq!(from_redis, from_model, "redis vs model at {}", now);
                    prop_assert_eq!(from_embedded, from_model);
                    if matches!(from_model, ingest::model::Decision::Accepted(_)) {
                        accepted.push(req);
                    }
                }
                Op::Confirm(i) => if let Some(r) = accepted.get(i) {
                    model.confirm(&OrderRef::from(r));
                    rt.block_on(async {
                        embedded.confirm(&sale_id, &OrderRef::from(r)).await.expect("embedded");
                        redis.confirm(&sale_id, &OrderRef::from(r)).await.expect("redis");
                    });
                },
                Op::Release(i) => if let Some(r) = accepted.get(i) {
                    let m = model.release(&OrderRef::from(r));
                    let (e, rr) = rt.block_on(async {
                        (embedded.release(&sale_id, &OrderRef::from(r)).await.expect("embedded"),
                         redis.release(&sale_id, &OrderRef::from(r)).await.expect("redis"))
                    });
                    prop_assert_eq!(e, m);
                    prop_assert_eq!(rr, m);
                },
                Op::Abort(i) => {
                    // Sometimes abort an order that was never accepted: it must give
                    // nothing back.
                    let stray;
                    let target = match accepted.get(i) {
                        Some(r) => r,
                        None => {
                            stray = AdmitRequest {
                                user: user((i % 5) as u8),
                                quantity: 1,
                                key: format!("k{}", i % 5),
                                fingerprint: "f0".into(),
                                order_id: OrderId::new(),
                            };
                            &stray
                        }
                    };
                    let m = model.abort(&OrderRef::from(target));
                    let (e, r) = rt.block_on(async {
                        (embedded.abort(&sale_id, &OrderRef::from(target)).await.expect("embedded"),
                         redis.abort(&sale_id, &OrderRef::from(target)).await.expect("redis"))
                    });
                    prop_assert_eq!(e, m);
                    prop_assert_eq!(r, m);
                }
                Op::Claim(i) => if let Some(r) = accepted.get(i) {
                    let m = model.claim(r.order_id);
                    let (e, rr) = rt.block_on(async {
                        (embedded.claim(&sale_id, &OrderRef::from(r)).await.expect("embedded"),
                         redis.claim(&sale_id, &OrderRef::from(r)).await.expect("redis"))
                    });
                    prop_assert_eq!(e, m);
                    prop_assert_eq!(rr, m);
                },
                Op::Tick(us) => {
                    rt.block_on(redis.advance_clock(&sale_id, i64::from(us))).expect("tick");
                }
                Op::AddStock(n) => {
                    model.add_stock(u64::from(n));
                    rt.block_on(async {
                        embedded.add_stock(&sale_id, u32::from(n)).await.expect("embedded");
                        redis.add_stock(&sale_id, u32::from(n)).await.expect("redis");
                    });
                }
            }
        }
        let (e, r) = rt.block_on(async {
            (embedded.counters(&sale_id).await.expect("embedded").expect("known"),
             redis.counters(&sale_id).await.expect("redis").expect("known"))
        });
        prop_assert_eq!(&e, &model.counters());
        prop_assert_eq!(&r, &model.counters());
        for u in 0..5 {
            let m = model.units_of(&user(u));
            prop_assert_eq!(embedded.units_of(&sale_id, &user(u)), m);
            prop_assert_eq!(rt.block_on(redis.units_of(&sale_id, &user(u))).expect("units"), m);
        }
    });
    case.into_inner()
}

#[tokio::test]
async fn a_missing_sale_is_unavailable_never_full_stock() {
    let server = testkit::RedisServer::start();
    let redis = RedisAdmission::connect(&server.url(), "fs:", Duration::from_secs(2))
        .await
        .expect("connect");
    let id = SaleId::parse("ghost").expect("id");
    let req = AdmitRequest {
        user: user(1),
        quantity: 1,
        key: "k".into(),
        fingerprint: "f".into(),
        order_id: OrderId::new(),
    };
    assert!(matches!(
        redis.admit(&id, &req).await,
        Err(ingest::admission::Error::Unavailable { .. })
    ));
    // A half-written sale (one field, no `ready` mark) is missing too.
    let client = redis::Client::open(server.url()).expect("client");
    let mut c = client
        .get_multiplexed_async_connection()
        .await
        .expect("conn");
    let _: () = redis::cmd("HSET")
        .arg("fs:{ghost}:sale")
        .arg("left")
        .arg(100)
        .query_async(&mut c)
        .await
        .expect("hset");
    assert!(matches!(
        redis.admit(&id, &req).await,
        Err(ingest::admission::Error::Unavailable { .. })
    ));
    assert_eq!(redis.counters(&id).await.expect("counters"), None);
    // Every key of a sale carries its hash tag.
    let s = sale(&SaleId::parse("tagged").expect("id"), 5, 1, 5, 5);
    redis.create_sale(&s).await.expect("create");
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg("*tagged*")
        .query_async(&mut c)
        .await
        .expect("keys");
    assert_eq!(keys.len(), 9, "{keys:?}");
    assert!(
        keys.iter().all(|k| k.starts_with("fs:{tagged}:")),
        "{keys:?}"
    );
    let ttl: i64 = redis::cmd("PTTL")
        .arg("fs:{tagged}:idem")
        .query_async(&mut c)
        .await
        .expect("ttl");
    assert!(ttl > 4000, "idempotency answers outlive the sale: {ttl}");
}

#[tokio::test]
async fn redis_buckets_expire_once_refilled() {
    let server = testkit::RedisServer::start();
    let redis = RedisAdmission::connect(&server.url(), "fs:", Duration::from_secs(2))
        .await
        .expect("connect");
    let client = redis::Client::open(server.url()).expect("client");
    let mut c = client
        .get_multiplexed_async_connection()
        .await
        .expect("conn");
    // 100 tokens a second, burst 1: a bucket that gave its token refills in 10 ms.
    let id = SaleId::parse("many").expect("id");
    redis
        .create_sale(&sale(&id, 1, 1, 100, 1))
        .await
        .expect("create");
    for u in 0..200u32 {
        let req = AdmitRequest {
            user: UserId::parse(format!("buyer-{u}")).expect("user"),
            quantity: 1,
            key: "k".into(),
            fingerprint: "f".into(),
            order_id: OrderId::new(),
        };
        redis.admit(&id, &req).await.expect("admit");
    }
    // Every buyer tried once (one accepted, the rest sold out); their buckets go once
    // refilled, and nothing per buyer is kept in the old buckets hash.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let keys: Vec<String> = redis::cmd("KEYS")
            .arg("fs:{many}:b:*")
            .query_async(&mut c)
            .await
            .expect("keys");
        if keys.is_empty() {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{} bucket keys never expired",
            keys.len()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let in_hash: i64 = redis::cmd("HLEN")
        .arg("fs:{many}:buckets")
        .query_async(&mut c)
        .await
        .expect("hlen");
    assert!(in_hash <= 1, "{in_hash} buckets kept in the hash");
}
