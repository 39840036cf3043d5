//! `flashsale demo --json` runs a whole (small) sale through the binary, exits 0 with every
//! invariant true, and carries the documented keys.

use serde_json::Value;
use std::process::Command;

#[test]
fn demo_json_reports_every_key_and_passes() {
    demo_passes(&[]);
}

#[test]
fn demo_on_redis_admission_passes() {
    let redis = testkit::RedisServer::start();
    demo_passes(&["--admission", &redis.url()]);
}

/// A sale of six stock buckets on a 3-primary Redis Cluster: every invariant holds (no unit
/// sold twice), every unit was sold before buyers heard `sold_out` (none stranded in a cold
/// bucket; the model test checks the rule exactly), and the buckets live on every node.
#[test]
fn demo_with_stock_buckets_on_a_redis_cluster_passes() {
    let cluster = testkit::RedisCluster::start(3);
    let r = demo_passes(&["--admission", &cluster.url(), "--stock-buckets", "6"]);
    let sold_out = r["rejected"]["sold_out"].as_u64().unwrap_or(0);
    assert!(sold_out > 0, "the sale sold out: {r}");
    assert!(
        r["accepted_units"].as_u64() >= r["stock"].as_u64(),
        "every unit sold at least once: {r}"
    );
    let mut nodes_with_buckets = 0;
    for i in 0..cluster.len() {
        let mut conn = redis::Client::open(cluster.node_url(i))
            .expect("client")
            .get_connection()
            .expect("connect");
        let keys: Vec<String> = redis::cmd("KEYS")
            .arg("fs:{*}:sale")
            .query(&mut conn)
            .expect("keys");
        nodes_with_buckets += usize::from(!keys.is_empty());
    }
    assert_eq!(
        nodes_with_buckets, 3,
        "the sale's buckets spread over every primary"
    );
}

#[cfg(feature = "kafka")]
#[test]
fn demo_on_redis_and_kafka_passes() {
    let redis = testkit::RedisServer::start();
    let broker = testkit::TansuBroker::start();
    let log = format!("kafka://{}", broker.bootstrap());
    demo_passes(&["--admission", &redis.url(), "--log", &log]);
}

#[cfg(feature = "kafka")]
#[test]
fn demo_on_redis_kafka_and_sharded_postgres_passes_and_reconciles() {
    let redis = testkit::RedisServer::start();
    let broker = testkit::TansuBroker::start();
    let pg = testkit::PostgresCluster::start(2);
    let log = format!("kafka://{}", broker.bootstrap());
    let store = pg.shard_urls().join(",");
    let backends = [
        "--admission",
        &redis.url(),
        "--log",
        &log,
        "--store",
        &store,
    ];
    let catalog = ("FLASHSALE_STORE__CATALOG_URL", pg.catalog_url());
    let r = demo_passes_with(&backends, std::slice::from_ref(&catalog));
    assert!(r["paid"].as_u64().unwrap_or(0) > 0, "{r}");
    // Afterwards the distributed state checks out.
    let out = Command::new(env!("CARGO_BIN_EXE_flashsale"))
        .arg("reconcile")
        // The demo's (or the run's) receipts lived in its own data directory.
        .env("FLASHSALE_RECEIPTS__ENABLED", "false")
        .args(backends)
        .env_remove("FLASHSALE_CONFIG")
        .env(catalog.0, catalog.1)
        .output()
        .expect("run reconcile");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "reconcile: {text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("consistent"), "{text}");
}

#[cfg(all(feature = "kafka", feature = "scylla"))]
#[test]
fn demo_on_redis_kafka_and_scylla_passes_and_reconciles() {
    let redis = testkit::RedisServer::start();
    let broker = testkit::TansuBroker::start();
    let cql = testkit::CqlServer::start();
    let log = format!("kafka://{}", broker.bootstrap());
    let store = format!("scylla://{}/flashsale", cql.node());
    let backends = [
        "--admission",
        &redis.url(),
        "--log",
        &log,
        "--store",
        &store,
    ];
    let r = demo_passes(&backends);
    assert!(r["paid"].as_u64().unwrap_or(0) > 0, "{r}");
    // Afterwards the distributed state checks out.
    let out = Command::new(env!("CARGO_BIN_EXE_flashsale"))
        .arg("reconcile")
        // The demo's (or the run's) receipts lived in its own data directory.
        .env("FLASHSALE_RECEIPTS__ENABLED", "false")
        .args(backends)
        .env_remove("FLASHSALE_CONFIG")
        .output()
        .expect("run reconcile");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "reconcile: {text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("consistent"), "{text}");
}

fn demo_passes(extra: &[&str]) -> Value {
    demo_passes_with(extra, &[])
}

fn demo_passes_with(extra: &[&str], env: &[(&str, String)]) -> Value {
    let out = Command::new(env!("CARGO_BIN_EXE_flashsale"))
        .args([
            "demo",
            "--json",
            "--stock",
            "300",
            "--users",
            "500",
            "--requests",
            "2000",
            "--concurrency",
            "32",
            "--decline-rate",
            "0.2",
        ])
        .args(extra)
        .env_remove("FLASHSALE_CONFIG")
        .envs(env.iter().map(|(k, v)| (k, v)))
        .output()
        .expect("run demo");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "demo failed ({:?}):\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let r: Value = serde_json::from_str(&stdout).expect("one JSON object");
    for key in [
        "requests",
        "accepted",
        "rejected",
        "persisted",
        "paid",
        "payment_failed",
        "released",
        "receipts",
        "stock_left",
        "latency_ms",
        "throughput_per_s",
        "invariants",
    ] {
        assert!(r.get(key).is_some(), "missing key {key}: {r}");
    }
    assert!(r["latency_ms"]["p50"].is_number() && r["latency_ms"]["p99"].is_number());
    assert!(r["rejected"].is_object());
    let inv = r["invariants"].as_object().expect("invariants");
    for name in [
        "no_oversell",
        "no_loss",
        "per_user_limit",
        "idempotency",
        "conservation",
        "one_charge_per_order",
        "bad_input_rejected",
        "receipts",
    ] {
        assert_eq!(
            inv.get(name),
            Some(&Value::Bool(true)),
            "invariant {name}: {r}"
        );
    }
    assert_eq!(r["requests"], 2000);
    // Demand exceeds stock: every unit is sold or released, none twice.
    assert_eq!(r["persisted"], r["accepted"]);
    assert_eq!(
        r["paid"].as_u64().unwrap_or(0) + r["payment_failed"].as_u64().unwrap_or(0),
        r["persisted"].as_u64().unwrap_or(u64::MAX)
    );
    assert!(
        r["payment_failed"].as_u64().unwrap_or(0) > 0,
        "declines happen at rate 0.2"
    );
    assert!(
        r["rejected"]["malformed_json"].as_u64().unwrap_or(0) > 0,
        "bad requests were sent"
    );
    r
}
