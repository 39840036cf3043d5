//! The operator and helper commands of the binary against a running server: `sale`,
//! `token`, `migrate`, and configuration errors that name the key.

mod common;

use common::TestApp;
use serde_json::Value;
use std::process::{Command, Output};

fn flashsale(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_flashsale"));
    cmd.args(args).env_remove("FLASHSALE_CONFIG");
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().expect("run flashsale")
}

fn json_of(out: &Output) -> Value {
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "not JSON ({e}): {}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sale_commands_drive_the_operator_api() {
    let app = TestApp::start().await;
    let url = app.url.clone();
    let run = |args: Vec<String>| {
        tokio::task::spawn_blocking(move || {
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            flashsale(&args, &[])
        })
    };
    let s = |v: &[&str]| v.iter().map(|x| (*x).to_owned()).collect::<Vec<_>>();

    let created = run(s(&[
        "sale",
        "--url",
        &url,
        "create",
        "--id",
        "cli",
        "--stock",
        "7",
        "--per-user-limit",
        "2",
    ]))
    .await
    .expect("join");
    assert!(
        created.status.success(),
        "{}",
        String::from_utf8_lossy(&created.stderr)
    );
    assert_eq!(json_of(&created)["id"], "cli");

    let token = run(s(&["token", "--user", "carol"])).await.expect("join");
    assert!(token.status.success());
    let token = String::from_utf8(token.stdout)
        .expect("utf8")
        .trim()
        .to_owned();
    let order = app.order("cli", &token, "c1", 2).await;
    assert_eq!(
        order.status, 202,
        "a token from `flashsale token` is accepted: {}",
        order.body
    );

    let got = run(s(&["sale", "--url", &url, "get", "cli"]))
        .await
        .expect("join");
    assert_eq!(json_of(&got)["stock_left"], 5);
    let added = run(s(&[
        "sale",
        "--url",
        &url,
        "add-stock",
        "cli",
        "--quantity",
        "3",
    ]))
    .await
    .expect("join");
    assert_eq!(json_of(&added)["stock"], 10);
    let stats = run(s(&["sale", "--url", &url, "stats", "cli"]))
        .await
        .expect("join");
    let stats = json_of(&stats);
    assert_eq!(stats["accepted_units"], 2);
    assert_eq!(stats["stock_left"], 8);

    let missing = run(s(&["sale", "--url", &url, "get", "nope"]))
        .await
        .expect("join");
    assert!(!missing.status.success(), "an API error exits non-zero");
    assert_eq!(json_of(&missing)["code"], "unknown_sale");
    app.stop().await;
}

#[test]
fn migrate_creates_the_schema_and_bad_config_names_the_key() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().display().to_string();
    let out = flashsale(&["migrate", "--data-dir", &data], &[]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(dir.path().join("flashsale.db").exists());

    let out = flashsale(
        &["token", "--user", "x"],
        &[("FLASHSALE_SERVER__LISTEN", "not-an-address")],
    );
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.to_lowercase().contains("server.listen"), "{err}");

    let out = flashsale(
        &[
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--data-dir",
            &data,
            "--admission",
            "redis://127.0.0.1:1",
        ],
        &[],
    );
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("admission.url"), "{err}");

    let out = flashsale(&["demo", "--decline-rate", "2"], &[]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--decline-rate"));
}

#[test]
fn migrate_readies_a_redis_cluster_and_refuses_one_missing_a_primary() {
    let mut cluster = testkit::RedisCluster::start(3);
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().display().to_string();
    let url = cluster.url();
    let out = flashsale(&["migrate", "--data-dir", &data, "--admission", &url], &[]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        text.contains("admission: Redis Cluster of 3 primaries serving all 16384 slots"),
        "{text}"
    );
    // The scripts are on every primary, not only on the one a first call reached.
    let sha = redis::Script::new(include_str!("../ingest/src/lua/admit.lua"))
        .get_hash()
        .to_owned();
    for i in 0..cluster.len() {
        let mut conn = redis::Client::open(cluster.node_url(i))
            .expect("client")
            .get_connection()
            .expect("connect");
        let exists: Vec<bool> = redis::cmd("SCRIPT")
            .arg("EXISTS")
            .arg(&sha)
            .query(&mut conn)
            .expect("script exists");
        assert_eq!(exists, vec![true], "node {i}");
    }
    // A primary down: once the others mark it failed, migrate refuses, naming the key.
    cluster.kill(2);
    let refused = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let out = flashsale(&["migrate", "--data-dir", &data, "--admission", &url], &[]);
        let err = String::from_utf8_lossy(&out.stderr).into_owned();
        if !out.status.success() {
            assert!(err.contains("admission.url"), "{err}");
            break;
        }
        assert!(
            std::time::Instant::now() < refused,
            "migrate kept accepting a cluster missing a primary"
        );
    }
}

#[cfg(feature = "scylla")]
#[test]
fn migrate_creates_the_scylla_keyspace_once() {
    let cql = testkit::CqlServer::start();
    let store = format!("scylla://{}/flashsale", cql.node());
    let first = flashsale(&["migrate", "--store", &store], &[]);
    let text = String::from_utf8_lossy(&first.stdout);
    assert!(
        first.status.success(),
        "{text}\n{}",
        String::from_utf8_lossy(&first.stderr)
    );
    assert!(
        text.contains("store: keyspace flashsale at the latest schema (applied versions ["),
        "{text}"
    );
    let again = flashsale(&["migrate", "--store", &store], &[]);
    let text = String::from_utf8_lossy(&again.stdout);
    assert!(again.status.success(), "{text}");
    assert!(text.contains("(nothing to apply)"), "{text}");
}

#[cfg(not(feature = "scylla"))]
#[test]
fn a_scylla_store_needs_the_scylla_feature() {
    let out = flashsale(
        &["migrate", "--store", "scylla://127.0.0.1:9042/flashsale"],
        &[],
    );
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("store.url"), "{err}");
    assert!(err.contains("without the `scylla` feature"), "{err}");
}
