//! The Redis batches (`confirm_batch`, `claim_batch`, `release_batch`: one pipeline each)
//! against the single calls, on a real redis-server: the same per-order results and the
//! same final counters; one order's error does not fail the others; a flushed script
//! cache is reloaded.

use ingest::admission::Admission;
use ingest::model::{AbortOutcome, AdmitRequest, Decision, OrderRef};
use ingest::redis_admission::RedisAdmission;
use std::time::Duration;
use storage::{Currency, Money, OrderId, Sale, SaleId, Timestamp, UserId, UserRate};

fn sale(id: &str) -> Sale {
    let now = Timestamp::now();
    Sale {
        stock_buckets: 1,
        id: SaleId::parse(id).expect("id"),
        sku: "sku".into(),
        stock: 10,
        price: Money {
            minor: 100,
            currency: Currency::parse("EUR").expect("eur"),
        },
        starts_at: now.plus_millis(-1000),
        ends_at: now.plus_millis(600_000),
        per_user_limit: 2,
        max_quantity_per_order: 2,
        user_rate: UserRate {
            per_second: 10,
            burst: 10,
        },
        created_at: now,
    }
}

fn request(user: usize) -> AdmitRequest {
    AdmitRequest {
        user: UserId::parse(format!("u{user}")).expect("user"),
        quantity: 1 + (user % 2) as u32,
        key: format!("k{user}"),
        fingerprint: format!("f{user}"),
        order_id: OrderId::new(),
    }
}

async fn connect(server: &testkit::RedisServer) -> RedisAdmission {
    RedisAdmission::connect(&server.url(), "fs:", Duration::from_secs(5))
        .await
        .expect("connect")
}

/// Admits five orders (users 0..5) in a fresh sale; all accepted.
async fn admitted(redis: &RedisAdmission, id: &str) -> (Sale, Vec<AdmitRequest>) {
    let s = sale(id);
    redis.create_sale(&s).await.expect("create");
    let mut reqs = Vec::new();
    for u in 0..5 {
        let r = request(u);
        let d = redis.admit(&s.id, &r).await.expect("admit");
        assert!(matches!(d, Decision::Accepted(_)), "{d:?}");
        reqs.push(r);
    }
    (s, reqs)
}

fn shape<T: std::fmt::Debug>(results: &[ingest::admission::Result<T>]) -> Vec<String> {
    results
        .iter()
        .map(|r| match r {
            Ok(v) => format!("ok {v:?}"),
            Err(_) => "err".to_owned(),
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batches_give_the_results_and_counters_of_single_calls() {
    let server = testkit::RedisServer::start();
    let redis = connect(&server).await;
    let (single, a) = admitted(&redis, "single").await;
    let (batched, b) = admitted(&redis, "batched").await;
    let missing = SaleId::parse("never-created").expect("id");
    let ghost = request(9);

    // Confirm orders 0..4 (order 4 stays unconfirmed); the batch includes a sale that does
    // not exist, which confirms nothing, as the single call does.
    for r in &a[..4] {
        redis
            .confirm(&single.id, &OrderRef::from(r))
            .await
            .expect("confirm");
    }
    redis
        .confirm(&missing, &OrderRef::from(&ghost))
        .await
        .expect("single confirm of an unknown sale");
    let mut confirms: Vec<(SaleId, OrderRef)> = b[..4]
        .iter()
        .map(|r| (batched.id.clone(), OrderRef::from(r)))
        .collect();
    confirms.push((missing.clone(), OrderRef::from(&ghost)));
    let results = redis.confirm_batch(&confirms).await;
    assert_eq!(results.len(), 5);
    assert!(results.iter().all(Result::is_ok), "{:?}", shape(&results));

    // Order 2 aborted (its claim must then be false), order 1 released already.
    for (s, reqs) in [(&single, &a), (&batched, &b)] {
        assert_eq!(
            redis
                .abort(&s.id, &OrderRef::from(&reqs[2]))
                .await
                .expect("abort"),
            AbortOutcome::Undone
        );
    }
    for (s, reqs) in [(&single, &a), (&batched, &b)] {
        assert!(redis
            .release(&s.id, &OrderRef::from(&reqs[1]))
            .await
            .expect("release"));
    }

    // Claims: every order, one of them twice, plus an unknown sale.
    let claims = |s: &Sale, reqs: &[AdmitRequest]| {
        let mut v: Vec<(SaleId, OrderRef)> = reqs
            .iter()
            .map(|r| (s.id.clone(), OrderRef::from(r)))
            .collect();
        v.push((s.id.clone(), OrderRef::from(&reqs[0])));
        v.insert(2, (missing.clone(), OrderRef::from(&ghost)));
        v
    };
    let mut one_by_one = Vec::new();
    for (s, order) in claims(&single, &a) {
        one_by_one.push(redis.claim(&s, &order).await);
    }
    let in_batch = redis.claim_batch(&claims(&batched, &b)).await;
    assert_eq!(shape(&one_by_one), shape(&in_batch));
    // 0 claimed, 1 released before (false), the unknown sale fails alone, 2 aborted
    // (false), 3 and 4 claimed, 0 again (still claimed).
    assert_eq!(
        shape(&in_batch),
        vec!["ok true", "ok false", "err", "ok false", "ok true", "ok true", "ok true"]
    );

    // Releases: order 1 again (released before), 0 twice, 3, the unknown sale.
    let releases = |s: &Sale, reqs: &[AdmitRequest]| {
        vec![
            (s.id.clone(), OrderRef::from(&reqs[1])),
            (s.id.clone(), OrderRef::from(&reqs[0])),
            (missing.clone(), OrderRef::from(&ghost)),
            (s.id.clone(), OrderRef::from(&reqs[0])),
            (s.id.clone(), OrderRef::from(&reqs[3])),
        ]
    };
    let mut one_by_one = Vec::new();
    for (s, o) in releases(&single, &a) {
        one_by_one.push(redis.release(&s, &o).await);
    }
    let in_batch = redis.release_batch(&releases(&batched, &b)).await;
    assert_eq!(shape(&one_by_one), shape(&in_batch));
    assert_eq!(
        shape(&in_batch),
        vec!["ok false", "ok true", "err", "ok false", "ok true"]
    );

    // Same final state.
    let c1 = redis.counters(&single.id).await.expect("counters");
    let c2 = redis.counters(&batched.id).await.expect("counters");
    assert_eq!(c1, c2);
    assert_eq!(
        redis.all_units(&single.id).await.expect("units"),
        redis.all_units(&batched.id).await.expect("units")
    );
    assert_eq!(
        redis.released(&single.id).await.expect("released").len(),
        redis.released(&batched.id).await.expect("released").len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_aborted_order_is_not_claimed_in_a_batch() {
    let server = testkit::RedisServer::start();
    let redis = connect(&server).await;
    let (s, reqs) = admitted(&redis, "aborted").await;
    // Order 0's append failed: aborted before the settler saw it.
    assert_eq!(
        redis
            .abort(&s.id, &OrderRef::from(&reqs[0]))
            .await
            .expect("abort"),
        AbortOutcome::Undone
    );
    let results = redis
        .claim_batch(&[
            (s.id.clone(), OrderRef::from(&reqs[0])),
            (s.id.clone(), OrderRef::from(&reqs[1])),
        ])
        .await;
    assert_eq!(shape(&results), vec!["ok false", "ok true"]);
    // Claimed now: an abort of order 1 is refused.
    assert_eq!(
        redis
            .abort(&s.id, &OrderRef::from(&reqs[1]))
            .await
            .expect("abort"),
        AbortOutcome::AlreadyClaimed
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn confirm_batch_makes_retries_replay() {
    let server = testkit::RedisServer::start();
    let redis = connect(&server).await;
    let (s, reqs) = admitted(&redis, "confirm").await;
    let retry = |r: &AdmitRequest| AdmitRequest {
        order_id: OrderId::new(),
        ..r.clone()
    };
    for r in &reqs {
        assert_eq!(
            redis.admit(&s.id, &retry(r)).await.expect("admit"),
            Decision::InProgress
        );
    }
    let batch: Vec<(SaleId, OrderRef)> = reqs[..3]
        .iter()
        .map(|r| (s.id.clone(), OrderRef::from(r)))
        .collect();
    let results = redis.confirm_batch(&batch).await;
    assert!(results.iter().all(Result::is_ok));
    for (i, r) in reqs.iter().enumerate() {
        let d = redis.admit(&s.id, &retry(r)).await.expect("admit");
        if i < 3 {
            match d {
                Decision::Replayed(answer) => assert_eq!(answer.order_id, r.order_id),
                other => panic!("order {i}: {other:?}"),
            }
        } else {
            assert_eq!(d, Decision::InProgress, "order {i} was not confirmed");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_order_error_does_not_fail_the_batch_and_flushed_scripts_reload() {
    let server = testkit::RedisServer::start();
    let redis = connect(&server).await;
    let (s, reqs) = admitted(&redis, "errors").await;
    let client = redis::Client::open(server.url()).expect("client");
    let mut raw = client
        .get_multiplexed_async_connection()
        .await
        .expect("raw connection");
    // A sale whose key holds the wrong type: its script call fails with a server error.
    let _: () = redis::cmd("SET")
        .arg("fs:{broken}:sale")
        .arg("x")
        .query_async(&mut raw)
        .await
        .expect("set");
    let broken = SaleId::parse("broken").expect("id");
    // The scripts are not cached any more: the batch loads them and sends again.
    let _: () = redis::cmd("SCRIPT")
        .arg("FLUSH")
        .query_async(&mut raw)
        .await
        .expect("flush");
    let results = redis
        .claim_batch(&[
            (s.id.clone(), OrderRef::from(&reqs[0])),
            (broken.clone(), OrderRef::from(&reqs[1])),
            (s.id.clone(), OrderRef::from(&reqs[1])),
        ])
        .await;
    assert_eq!(shape(&results), vec!["ok true", "err", "ok true"]);
    let _: () = redis::cmd("SCRIPT")
        .arg("FLUSH")
        .query_async(&mut raw)
        .await
        .expect("flush");
    let results = redis
        .release_batch(&[
            (broken.clone(), OrderRef::from(&reqs[2])),
            (s.id.clone(), OrderRef::from(&reqs[2])),
        ])
        .await;
    assert_eq!(shape(&results), vec!["err", "ok true"]);
    let _: () = redis::cmd("SCRIPT")
        .arg("FLUSH")
        .query_async(&mut raw)
        .await
        .expect("flush");
    let results = redis
        .confirm_batch(&[
            (broken.clone(), OrderRef::from(&reqs[3])),
            (s.id.clone(), OrderRef::from(&reqs[3])),
        ])
        .await;
    // The confirm script reads only the idem hash, which the broken sale lacks.
    assert!(results[1].is_ok());
    assert!(matches!(
        redis
            .admit(
                &s.id,
                &AdmitRequest {
                    order_id: OrderId::new(),
                    ..reqs[3].clone()
                }
            )
            .await
            .expect("admit"),
        Decision::Replayed(_)
    ));
    // Single calls still work.
    assert!(redis
        .claim(&s.id, &OrderRef::from(&reqs[4]))
        .await
        .expect("claim"));
    assert!(!redis
        .release(&s.id, &OrderRef::from(&reqs[2]))
        .await
        .expect("release"));
    // Empty batches cost nothing and answer nothing.
    assert!(redis.claim_batch(&[]).await.is_empty());
    let c = redis
        .counters(&s.id)
        .await
        .expect("counters")
        .expect("sale");
    assert_eq!(c.released_units, u64::from(reqs[2].quantity));
}
