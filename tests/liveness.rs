//! Liveness of `serve`: a dead settler stage shows in `/readyz` (503 `settler_stage_down`)
//! and in the metrics until it is restarted; a stage that keeps dying stops the process
//! with an error; a configuration where nothing settles is refused; records the Kafka
//! producer could not deliver at shutdown fail the stop.

mod common;

use common::TestApp;
use flashsale::config::Config;
use settler::Stage;
use std::time::Duration;
use testkit::eventually;

/// The value of `series` in the app's `/metrics` (None when absent).
async fn metric(app: &TestApp, series: &str) -> Option<f64> {
    let text = app
        .client
        .get(format!("{}/metrics", app.url))
        .send()
        .await
        .ok()?
        .text()
        .await
        .ok()?;
    text.lines().find_map(|l| {
        l.strip_prefix(series)?
            .strip_prefix(' ')?
            .trim()
            .parse()
            .ok()
    })
}

async fn readyz(app: &TestApp) -> common::Answer {
    TestApp::answer(
        app.client
            .get(format!("{}/readyz", app.url))
            .send()
            .await
            .expect("send"),
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_settler_stage_shows_in_readyz_and_metrics_until_restarted() {
    let app = TestApp::start().await;
    let health = app.running().settler_health.clone().expect("settler runs");
    assert_eq!(readyz(&app).await.status, 200);
    let up = r#"flashsale_settler_stage_up{stage="sweep"}"#;
    let restarts = r#"flashsale_settler_stage_restarts_total{stage="sweep"}"#;
    eventually("the stages report up", Duration::from_secs(30), || async {
        metric(&app, up).await == Some(1.0) && metric(&app, restarts).await == Some(0.0)
    })
    .await;

    // The sweep dies at once every time it starts, until the fault is cleared.
    health.inject_fault(Stage::Sweep);
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let seen = loop {
        let a = readyz(&app).await;
        if a.status == 503 {
            break a;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "/readyz never answered 503: {} {}",
            a.status,
            a.body
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    let a = seen;
    assert_eq!(a.code(), "settler_stage_down", "{}", a.body);
    assert_eq!(a.body["stage"], "sweep", "{}", a.body);
    assert_eq!(
        a.headers["content-type"], "application/problem+json",
        "{:?}",
        a.headers
    );
    assert!(a.headers.contains_key("retry-after"));
    health.clear_faults();

    eventually(
        "ready again once the stage was restarted",
        Duration::from_secs(30),
        || async { readyz(&app).await.status == 200 },
    )
    .await;
    assert_eq!(metric(&app, up).await, Some(1.0));
    assert!(metric(&app, restarts).await.unwrap_or(0.0) >= 1.0);
    assert!(!health.failed());

    // Orders still settle after the restart.
    let sale = app.sale("after-restart", 10, 5).await;
    let a = app.order(&sale, &app.token("u1"), "k1", 1).await;
    assert_eq!(a.status, 202, "{}", a.body);
    let store = app.running().store.clone();
    let sale_id = storage::SaleId::parse(&sale).expect("sale id");
    eventually("the order is paid", Duration::from_secs(30), || {
        let store = store.clone();
        let sale_id = sale_id.clone();
        async move {
            store
                .orders_of_sale(&sale_id)
                .await
                .is_ok_and(|o| o.len() == 1 && o[0].status == storage::OrderStatus::Paid)
        }
    })
    .await;
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_settler_stage_that_keeps_dying_stops_serve_with_an_error() {
    let mut app = TestApp::start().await;
    let running = app.running.take().expect("running");
    let health = running.settler_health.clone().expect("settler runs");
    health.inject_fault(Stage::Charge);
    let stopped = tokio::time::timeout(Duration::from_secs(60), running.wait())
        .await
        .expect("serve stops on its own within the deadline");
    let err = stopped.expect_err("an error: the process exits non-zero");
    let text = format!("{err:#}");
    assert!(text.contains("charge stage"), "{text}");
    assert!(health.failed());
    // The server is down too.
    assert!(
        app.client
            .get(format!("{}/healthz", app.url))
            .send()
            .await
            .is_err(),
        "the API stopped"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_refuses_the_embedded_log_without_the_settler() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut config = Config {
        data_dir: dir.path().to_path_buf(),
        ..Config::default()
    };
    config.settler.enabled = false;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let err = flashsale::app::App::start(&config, listener)
        .await
        .expect_err("refused");
    let text = format!("{err:#}");
    assert!(
        text.contains("settler.enabled = false") && text.contains("log.url = \"embedded\""),
        "{text}"
    );

    // The same from the command line: exit code 2 and the message, nothing listening.
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_flashsale"))
        .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(dir.path())
        .env_remove("FLASHSALE_CONFIG")
        .env("FLASHSALE_SETTLER__ENABLED", "false")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run flashsale");
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while child.try_wait().expect("wait").is_none() {
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            panic!("serve started instead of refusing the configuration");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let out = child.wait_with_output().expect("output");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("settler.enabled = false") && stderr.contains("log.url"),
        "{stderr}"
    );
}

/// With the broker frozen, an order's record sits in the producer when `serve` stops: the
/// flush at shutdown cannot deliver it and the stop fails (the process exits non-zero).
#[cfg(feature = "kafka")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_left_in_the_producer_at_shutdown_fail_the_stop() {
    let broker = testkit::TansuBroker::start();
    let redis = testkit::RedisServer::start();
    let kafka = sequencer::kafka::KafkaConfig {
        bootstrap: broker.bootstrap(),
        partitions: 1,
        ..Default::default()
    };
    sequencer::kafka::create_topics(&kafka)
        .await
        .expect("topics");
    let mut app = TestApp::start_with(|c| {
        c.admission.url = redis.url();
        c.log.url = format!("kafka://{}", broker.bootstrap());
        c.log.delivery_timeout = Duration::from_secs(60);
        c.server.shutdown_grace = Duration::from_millis(100);
        c.settler.enabled = false;
    })
    .await;
    let sale = app.sale("flush", 10, 5).await;
    let a = app.order(&sale, &app.token("u0"), "k0", 1).await;
    assert_eq!(a.status, 202, "{}", a.body);

    broker.pause();
    let order = {
        let (client, url, token) = (app.client.clone(), app.url.clone(), app.token("u1"));
        let sale = sale.clone();
        tokio::spawn(async move {
            client
                .post(format!("{url}/v1/sales/{sale}/orders"))
                .bearer_auth(token)
                .header("idempotency-key", "k1")
                .json(&serde_json::json!({"quantity": 1, "payment_token": "tok_visa"}))
                .send()
                .await
        })
    };
    eventually(
        "the record waits in the producer",
        Duration::from_secs(30),
        || async {
            metric(&app, "flashsale_kafka_producer_queue_messages")
                .await
                .is_some_and(|n| n >= 1.0)
        },
    )
    .await;
    let running = app.running.take().expect("running");
    let stopped = running.stop().await;
    broker.resume();
    let err = stopped.expect_err("records were left undelivered");
    let text = format!("{err:#}");
    assert!(text.contains("left undelivered"), "{text}");
    order.abort();
}
