//! Connection-level behaviour over raw sockets: header-read and idle timeouts, the
//! connection cap, graceful shutdown, and a log that cannot take more orders (503, no stock
//! taken).

mod common;

use common::TestApp;
use serde_json::json;
use std::sync::Arc;
use std::time::{Duration, Instant};
use testkit::eventually;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Reads until the peer closes; returns what it sent and how long that took.
async fn read_until_closed(stream: &mut TcpStream, deadline: Duration) -> (Vec<u8>, Duration) {
    let started = Instant::now();
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match tokio::time::timeout(deadline, stream.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return (out, started.elapsed()),
            Ok(Ok(n)) => out.extend_from_slice(&buf[..n]),
            Err(_) => panic!("the server did not close the connection within {deadline:?}"),
        }
    }
}

#[tokio::test]
async fn slow_headers_are_cut_off() {
    let app = TestApp::start_with(|c| {
        c.server.header_read_timeout = Duration::from_millis(300);
        c.server.idle_timeout = Duration::from_secs(30);
    })
    .await;
    // Half a request head, then silence: closed after the header-read timeout.
    let mut slow = TcpStream::connect(app.running().addr)
        .await
        .expect("connect");
    slow.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
        .await
        .expect("write");
    let (_, took) = read_until_closed(&mut slow, Duration::from_secs(10)).await;
    assert!(
        took >= Duration::from_millis(250),
        "closed too early: {took:?}"
    );
    app.stop().await;
}

#[tokio::test]
async fn idle_keep_alive_connections_are_closed() {
    let app = TestApp::start_with(|c| {
        c.server.header_read_timeout = Duration::from_secs(30);
        c.server.idle_timeout = Duration::from_millis(400);
    })
    .await;
    // One request, then idle: answered, then closed after the idle timeout.
    let mut idle = TcpStream::connect(app.running().addr)
        .await
        .expect("connect");
    idle.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .expect("write");
    let (got, took) = read_until_closed(&mut idle, Duration::from_secs(10)).await;
    assert!(String::from_utf8_lossy(&got).starts_with("HTTP/1.1 200"));
    assert!(
        took >= Duration::from_millis(350),
        "closed too early: {took:?}"
    );
    app.stop().await;
}

#[tokio::test]
async fn the_connection_cap_holds_further_clients_back() {
    let app = TestApp::start_with(|c| {
        c.server.max_connections = 2;
        c.server.idle_timeout = Duration::from_secs(30);
    })
    .await;
    let addr = app.running().addr;
    let request = b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n";
    let mut held = Vec::new();
    for _ in 0..2 {
        let mut s = TcpStream::connect(addr).await.expect("connect");
        s.write_all(request).await.expect("write");
        let mut buf = [0u8; 1024];
        let n = s.read(&mut buf).await.expect("read");
        assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"));
        held.push(s);
    }
    // A third client connects (the kernel's backlog) but is not served while two are open.
    let mut third = TcpStream::connect(addr).await.expect("connect");
    third.write_all(request).await.expect("write");
    let mut buf = [0u8; 1024];
    let waited = tokio::time::timeout(Duration::from_millis(500), third.read(&mut buf)).await;
    assert!(
        waited.is_err(),
        "a third connection was served past the cap of 2"
    );
    // Closing one lets it in.
    drop(held.pop());
    let n = tokio::time::timeout(Duration::from_secs(10), third.read(&mut buf))
        .await
        .expect("served once a slot is free")
        .expect("read");
    assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"));
    app.stop().await;
}

#[tokio::test]
async fn graceful_shutdown_finishes_requests_in_flight() {
    let mut app = TestApp::start().await;
    let sale = app.sale("drain", 100, 10).await;
    let token = app.token("d");
    // Keep many orders in flight, then stop: each finishes with a full answer.
    let mut inflight = tokio::task::JoinSet::new();
    for i in 0..50 {
        let client = app.client.clone();
        let url = format!("{}/v1/sales/{sale}/orders", app.url);
        let token = token.clone();
        inflight.spawn(async move {
            client
                .post(url)
                .bearer_auth(token)
                .header("idempotency-key", format!("g{i}"))
                .json(&json!({"quantity": 1, "payment_token": "tok_visa"}))
                .send()
                .await
                .map(|r| r.status().as_u16())
        });
    }
    let running = app.running.take().expect("running");
    let store = Arc::clone(&running.store);
    running.stop().await.expect("graceful stop");
    let mut accepted = 0;
    while let Some(r) = inflight.join_next().await {
        // A request either got its whole answer or was never read (connection refused).
        if let Ok(Ok(status)) = r {
            assert!(matches!(status, 202 | 403), "status {status}");
            accepted += u64::from(status == 202);
        }
    }
    let totals = store
        .sale_totals(&storage::SaleId::parse("drain").expect("id"))
        .await
        .expect("totals");
    assert!(
        totals.orders >= accepted,
        "every 202 before shutdown is stored"
    );
}

#[tokio::test]
async fn a_log_that_cannot_take_the_order_gives_503_and_takes_no_stock() {
    // A log queue of one: under a burst most appends are refused at once.
    let app = Arc::new(
        TestApp::start_with(|c| {
            c.log.queue_capacity = 1;
        })
        .await,
    );
    let sale = app.sale("full-log", 10_000, 1).await;
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..400 {
        let app = Arc::clone(&app);
        let sale = sale.clone();
        tasks.spawn(async move {
            let a = app.order(&sale, &app.token(&format!("u{i}")), "k", 1).await;
            if a.status == 503 {
                assert_eq!(a.code(), "unavailable");
                assert!(a.headers.contains_key("retry-after"));
            }
            a.status
        });
    }
    let mut accepted = 0i64;
    let mut unavailable = 0;
    while let Some(s) = tasks.join_next().await {
        match s.expect("task") {
            202 => accepted += 1,
            503 => unavailable += 1,
            other => panic!("unexpected status {other}"),
        }
    }
    assert!(unavailable > 0, "the burst must overflow a queue of one");
    assert!(accepted > 0);
    // Nothing leaked: exactly the acknowledged units are gone, and they all persist.
    assert_eq!(app.stock_left(&sale).await, 10_000 - accepted);
    eventually("persisted == accepted", Duration::from_secs(30), || {
        let app = Arc::clone(&app);
        let sale = sale.clone();
        async move { app.stats(&sale).await["persisted"] == accepted }
    })
    .await;
    // The admission counters count only what was acknowledged.
    let stats = app.stats(&sale).await;
    assert_eq!(stats["accepted"].as_i64(), Some(accepted));
}

#[tokio::test]
async fn a_body_that_trickles_gets_408_and_frees_the_slot() {
    let app = TestApp::start_with(|c| {
        c.server.body_read_timeout = Duration::from_millis(300);
        c.server.max_connections = 1;
    })
    .await;
    let sale = app.sale("slow-body", 10, 1).await;
    let token = app.token("slowpoke");
    let mut s = TcpStream::connect(app.running().addr)
        .await
        .expect("connect");
    let head = format!(
        "POST /v1/sales/{sale}/orders HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n\
         Idempotency-Key: k\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{{\"quan"
    );
    s.write_all(head.as_bytes()).await.expect("write");
    let mut buf = vec![0u8; 4096];
    let n = tokio::time::timeout(Duration::from_secs(10), s.read(&mut buf))
        .await
        .expect("answered within the deadline")
        .expect("read");
    let text = String::from_utf8_lossy(&buf[..n]);
    assert!(text.starts_with("HTTP/1.1 408"), "{text}");
    assert!(text.contains("request_timeout"), "{text}");
    drop(s);
    // The one connection slot is free again, and nothing was taken.
    assert_eq!(app.stock_left(&sale).await, 10);
    app.stop().await;
}

#[tokio::test]
async fn a_log_that_lost_records_refuses_to_start() {
    let mut app = TestApp::start().await;
    let sale = app.sale("lossy", 10, 5).await;
    for i in 0..3 {
        assert_eq!(
            app.order(&sale, &app.token("u"), &format!("k{i}"), 1)
                .await
                .status,
            202
        );
    }
    eventually("persisted", Duration::from_secs(30), || {
        let stats = app.stats(&sale);
        async move { stats.await["persisted"] == 3 }
    })
    .await;
    let config = app.config.clone();
    app.running
        .take()
        .expect("running")
        .stop()
        .await
        .expect("stop");
    // Lose the log file: the store's checkpoint is now past its end.
    std::fs::remove_file(config.data_dir.join("log").join("00000000000000000000.seg"))
        .expect("remove");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let err = flashsale::app::App::start(&config, listener)
        .await
        .expect_err("must refuse to start");
    assert!(format!("{err:#}").contains("checkpoint"), "{err:#}");
}

#[tokio::test]
async fn a_restart_reads_only_the_log_after_the_admission_checkpoint() {
    let mut app = TestApp::start_with(|c| {
        c.log.segment_bytes = 2048;
        c.log.checkpoint_interval = Duration::from_millis(50);
    })
    .await;
    let sale = app.sale("ckpt", 1000, 1000).await;
    let token = app.token("u");
    let mut first = None;
    for i in 0..60 {
        let a = app.order(&sale, &token, &format!("k{i}"), 1).await;
        assert_eq!(a.status, 202, "{}", a.body);
        first.get_or_insert(a.body["order_id"].clone());
    }
    let log_dir = app.config.data_dir.join("log");
    let first_segment = log_dir.join("00000000000000000000.seg");
    eventually(
        "settled segments deleted after a checkpoint",
        Duration::from_secs(30),
        || {
            let stats = app.stats(&sale);
            let gone = !first_segment.exists();
            async move { stats.await["persisted"] == 60 && gone }
        },
    )
    .await;
    assert!(log_dir.join(ingest::checkpoint::CHECKPOINT_FILE).exists());
    let config = app.config.clone();
    app.running
        .take()
        .expect("running")
        .stop()
        .await
        .expect("stop");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let running = flashsale::app::App::start(&config, listener)
        .await
        .expect("restart from the checkpoint");
    app.url = running.url();
    app.running = Some(running);
    // The counters and the answers of orders whose records were deleted came back from
    // the checkpoint.
    assert_eq!(app.stock_left(&sale).await, 940);
    let retry = app.order(&sale, &token, "k0", 1).await;
    assert_eq!(retry.status, 202, "{}", retry.body);
    assert_eq!(Some(retry.body["order_id"].clone()), first);
    let next = app.order(&sale, &token, "k60", 1).await;
    assert_eq!(next.status, 202, "{}", next.body);
    assert_eq!(next.body["sequence"], 61, "{}", next.body);
    assert_eq!(app.stock_left(&sale).await, 939);
    app.stop().await;
}

#[tokio::test]
async fn a_full_bucket_map_answers_503_capacity_exceeded() {
    let app = TestApp::start_with(|c| c.admission.max_buckets_per_sale = 3).await;
    let a = app
        .create_sale(json!({
            "id": "capped", "sku": "sku-1", "stock": 100, "price_cents": 1000,
            "currency": "EUR", "per_user_limit": 5,
            "user_rate": {"per_second": 1, "burst": 1}
        }))
        .await;
    assert_eq!(a.status, 201, "{}", a.body);
    for u in 0..3 {
        let a = app
            .order("capped", &app.token(&format!("u{u}")), "k", 1)
            .await;
        assert_eq!(a.status, 202, "{}", a.body);
    }
    let refused = app.order("capped", &app.token("u3"), "k", 1).await;
    assert_eq!(refused.status, 503, "{}", refused.body);
    assert_eq!(refused.code(), "capacity_exceeded");
    assert!(refused.headers.contains_key("retry-after"));
    assert_eq!(app.stock_left("capped").await, 97, "nothing was taken");
    app.stop().await;
}

#[tokio::test]
async fn an_ended_settled_sale_drops_its_admission_entries() {
    let app = TestApp::start_with(|c| c.admission.retention = Duration::ZERO).await;
    let ends = storage::Timestamp::now().plus_millis(1500);
    let a = app
        .create_sale(json!({
            "id": "short", "sku": "sku-1", "stock": 10, "price_cents": 1000,
            "currency": "EUR", "per_user_limit": 2, "ends_at": ends.to_string(),
            "user_rate": {"per_second": 1000, "burst": 1000}
        }))
        .await;
    assert_eq!(a.status, 201, "{}", a.body);
    let token = app.token("u");
    let first = app.order("short", &token, "k", 1).await;
    assert_eq!(first.status, 202, "{}", first.body);
    let answers = "flashsale_admission_entries{map=\"answers\"} ";
    let metrics = |app: &TestApp| {
        let req = app.client.get(format!("{}/metrics", app.url)).send();
        async move { req.await.expect("metrics").text().await.expect("text") }
    };
    eventually(
        "the entries gauge counts the answer",
        Duration::from_secs(30),
        || {
            let m = metrics(&app);
            async move { m.await.contains(&format!("{answers}1")) }
        },
    )
    .await;
    // Once the sale ended and its order is final, its entries go, and the retry of its
    // order is past its retention.
    eventually("the sale retired", Duration::from_secs(30), || {
        let retry = app.order("short", &token, "k", 1);
        let m = metrics(&app);
        async move {
            retry.await.code() == "sale_not_active" && m.await.contains(&format!("{answers}0"))
        }
    })
    .await;
    let stats = app.stats("short").await;
    assert_eq!(stats["stock_left"], 9, "the counters stay: {stats}");
    app.stop().await;
}
