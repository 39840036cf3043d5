//! The gain of pipelining admission decisions: one decision at a time (a round trip each)
//! against 64 concurrent decisions sharing one multiplexed connection, which the redis
//! client writes back to back, so one round trip carries many decisions. Needs
//! `redis-server` (installed by scripts/test.sh); each run starts its own.

use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use ingest::admission::Admission;
use ingest::model::AdmitRequest;
use ingest::redis_admission::RedisAdmission;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use storage::{Currency, Money, OrderId, Sale, SaleId, Timestamp, UserId, UserRate};

fn request(n: u64) -> AdmitRequest {
    AdmitRequest {
        user: UserId::parse(format!("u{}", n % 100_000)).expect("user"),
        quantity: 1,
        key: format!("k{n}"),
        fingerprint: "f".into(),
        order_id: OrderId::new(),
    }
}

fn pipelining(c: &mut Criterion) {
    let server = testkit::RedisServer::start();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("runtime");
    let redis = rt
        .block_on(RedisAdmission::connect(
            &server.url(),
            "bench:",
            Duration::from_secs(5),
        ))
        .expect("connect");
    let sale_id = SaleId::parse("bench").expect("id");
    let now = Timestamp::now();
    rt.block_on(redis.create_sale(&Sale {
        stock_buckets: 1,
        id: sale_id.clone(),
        sku: "s".into(),
        stock: storage::MAX_STOCK,
        price: Money {
            minor: 1,
            currency: Currency::parse("EUR").expect("eur"),
        },
        starts_at: now,
        ends_at: now.plus_millis(3_600_000),
        per_user_limit: 1000,
        max_quantity_per_order: 1,
        user_rate: UserRate {
            per_second: 1_000_000,
            burst: 1_000_000,
        },
        created_at: now,
    }))
    .expect("sale");
    let n = AtomicU64::new(0);
    let mut group = c.benchmark_group("redis_admission");
    group.throughput(Throughput::Elements(1));
    group.bench_function("one_at_a_time", |b| {
        b.iter(|| {
            let req = request(n.fetch_add(1, Ordering::Relaxed));
            rt.block_on(redis.admit(&sale_id, &req)).expect("admit")
        })
    });
    const BATCH: u64 = 64;
    group.throughput(Throughput::Elements(BATCH));
    let redis = Arc::new(redis);
    group.bench_function("64_concurrent_pipelined", |b| {
        b.iter_batched(
            || {
                (0..BATCH)
                    .map(|_| request(n.fetch_add(1, Ordering::Relaxed)))
                    .collect::<Vec<_>>()
            },
            |reqs| {
                rt.block_on(async {
                    let mut set = tokio::task::JoinSet::new();
                    for req in reqs {
                        let (redis, sale) = (Arc::clone(&redis), sale_id.clone());
                        set.spawn(async move { redis.admit(&sale, &req).await });
                    }
                    while let Some(r) = set.join_next().await {
                        r.expect("join").expect("admit");
                    }
                })
            },
            BatchSize::SmallInput,
        )
    });
    group.finish();
}

/// plotters is built with `ab_glyph` (for the e2e chart) and criterion shares it, so its
/// plots need a registered font; without one on this machine, criterion runs without plots.
fn config() -> Criterion {
    if bench::chart::register_font() {
        Criterion::default()
    } else {
        Criterion::default().without_plots()
    }
}

criterion_group! {
    name = benches;
    config = config();
    targets = pipelining
}
criterion_main!(benches);
