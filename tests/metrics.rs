//! `/metrics` of every process, read over real HTTP: `serve` counts every answer of the
//! order route by outcome and code (validation and auth refusals included), its per-sale
//! gauges agree with the stats API once the orders settle, and `flashsale settle` answers
//! on its own metrics listener. Each output is linted by `promtool check metrics` when
//! promtool is installed (the Debian `prometheus` package; `scripts/test.sh` installs it).

mod common;

use common::{Backend, TestApp};
use serde_json::{json, Value};
use std::io::Write;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use testkit::eventually;

/// The value of the sample `series` (name and labels exactly as encoded) in `text`.
fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .and_then(|v| v.trim().parse().ok())
}

/// `/metrics` of `url` as a plain client gets it: the text format 0.0.4 (what promtool
/// reads).
async fn scrape(client: &reqwest::Client, url: &str) -> String {
    let resp = client.get(url).send().await.expect("scrape");
    assert_eq!(resp.status().as_u16(), 200);
    let content_type = resp.headers()["content-type"]
        .to_str()
        .expect("ascii")
        .to_owned();
    assert!(
        content_type.starts_with("text/plain; version=0.0.4"),
        "{content_type}"
    );
    resp.text().await.expect("body")
}

/// `promtool check metrics` on `text` reports nothing; skipped (with the reason printed)
/// when promtool is not installed.
fn promtool_finds_nothing(what: &str, text: &str) {
    let child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn();
    let mut child = match child {
        Ok(c) => c,
        Err(e) => {
            eprintln!(
                "SKIPPED promtool check of {what}: promtool not found ({e}); install the \
                 Debian prometheus package (scripts/test.sh does)"
            );
            return;
        }
    };
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(text.as_bytes())
        .expect("write");
    let out = child.wait_with_output().expect("promtool");
    let report = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success() && report.trim().is_empty(),
        "promtool check metrics on {what}:\n{report}"
    );
}

async fn post(app: &TestApp, sale: &str, token: Option<&str>, key: &str, body: &str) -> u16 {
    let mut req = app
        .client
        .post(format!("{}/v1/sales/{sale}/orders", app.url))
        .header("idempotency-key", key)
        .header("content-type", "application/json")
        .body(body.to_owned());
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    req.send().await.expect("send").status().as_u16()
}

async fn every_answer_is_counted_and_the_sale_gauges_agree(backend: Backend) {
    let app = TestApp::start_on(backend).await;
    let sale = app.sale("metered", 3, 1).await;
    let good = r#"{"quantity":1,"payment_token":"tok_visa"}"#;
    let mut accepted = 0;
    for user in ["a", "b", "c"] {
        let status = post(
            &app,
            &sale,
            Some(&app.token(user)),
            &format!("k-{user}"),
            good,
        )
        .await;
        assert_eq!(status, 202);
        accepted += 1;
    }
    // A retry of a's order gets its first answer.
    assert_eq!(
        post(&app, &sale, Some(&app.token("a")), "k-a", good).await,
        202
    );
    let sold_out = post(&app, &sale, Some(&app.token("d")), "k-d", good).await;
    assert_eq!(sold_out, 409);
    let invalid = r#"{"quantity":"one","payment_token":"tok_visa"}"#;
    assert_eq!(
        post(&app, &sale, Some(&app.token("e")), "k-e", invalid).await,
        422
    );
    assert_eq!(post(&app, &sale, Some("not-a-jwt"), "k-f", good).await, 401);
    assert_eq!(post(&app, &sale, None, "k-g", good).await, 401);
    let wrong_method = app
        .client
        .get(format!("{}/v1/sales/{sale}/orders", app.url))
        .send()
        .await
        .expect("send");
    assert_eq!(wrong_method.status().as_u16(), 405);

    let metrics_url = format!("{}/metrics", app.url);
    let text = scrape(&app.client, &metrics_url).await;
    let answers = |outcome: &str, code: &str| {
        sample(
            &text,
            &format!("flashsale_order_answers_total{{outcome=\"{outcome}\",code=\"{code}\"}}"),
        )
    };
    assert_eq!(
        answers("accepted", "accepted"),
        Some(f64::from(accepted)),
        "{text}"
    );
    assert_eq!(answers("replayed", "replayed"), Some(1.0), "{text}");
    assert_eq!(answers("refused", "sold_out"), Some(1.0), "{text}");
    assert_eq!(answers("refused", "invalid_body"), Some(1.0), "{text}");
    assert_eq!(answers("refused", "invalid_token"), Some(1.0), "{text}");
    assert_eq!(answers("refused", "missing_token"), Some(1.0), "{text}");
    assert_eq!(
        answers("refused", "method_not_allowed"),
        Some(1.0),
        "{text}"
    );
    assert_eq!(answers("unavailable", "unavailable"), Some(0.0), "{text}");
    let latency = |outcome: &str| {
        sample(
            &text,
            &format!("flashsale_order_latency_seconds_count{{outcome=\"{outcome}\"}}"),
        )
    };
    assert_eq!(latency("accepted"), Some(3.0), "{text}");
    assert_eq!(latency("replayed"), Some(1.0), "{text}");
    assert_eq!(latency("refused"), Some(5.0), "{text}");
    assert_eq!(
        sample(
            &text,
            "flashsale_http_responses_total{route=\"order\",status=\"202\"}"
        ),
        Some(4.0),
        "{text}"
    );
    assert_eq!(
        sample(
            &text,
            "flashsale_http_request_duration_seconds_count{route=\"sales\"}"
        ),
        Some(1.0),
        "{text}"
    );
    let backend_label = match backend {
        Backend::Embedded => "embedded",
        Backend::Redis | Backend::RedisCluster => "redis",
    };
    let admits = sample(
        &text,
        &format!(
            "flashsale_admission_duration_seconds_count{{backend=\"{backend_label}\",op=\"admit\"}}"
        ),
    )
    .unwrap_or(0.0);
    assert!(admits >= 4.0, "{text}");
    for family in [
        "# TYPE flashsale_http_open_connections gauge",
        "# TYPE flashsale_store_duration_seconds histogram",
        "# TYPE flashsale_store_pool_connections gauge",
        "# TYPE flashsale_runtime_busy_seconds_total counter",
        "# TYPE flashsale_runtime_scheduling_delay_seconds_total counter",
        "# TYPE flashsale_sold_out_local_total counter",
        "flashsale_runtime_workers{runtime=\"http\"}",
        "flashsale_runtime_workers{runtime=\"settler\"}",
        "process=\"serve\"",
    ] {
        assert!(text.contains(family), "{family} missing in:\n{text}");
    }
    promtool_finds_nothing("serve's /metrics", &text);

    // Prometheus asks for OpenMetrics and gets it.
    let om = app
        .client
        .get(&metrics_url)
        .header(
            "accept",
            "application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5",
        )
        .send()
        .await
        .expect("scrape");
    assert!(om.headers()["content-type"]
        .to_str()
        .expect("ascii")
        .starts_with("application/openmetrics-text"));
    let om = om.text().await.expect("body");
    assert!(om.ends_with("# EOF\n"));
    assert!(om.contains("# TYPE flashsale_order_answers counter"));

    // Once every order is settled, the per-sale gauges say what the stats API says.
    eventually(
        "every accepted order is paid",
        Duration::from_secs(30),
        || {
            let app = &app;
            let sale = sale.clone();
            async move { app.stats(&sale).await["paid"] == accepted }
        },
    )
    .await;
    // The gauges are refreshed every second: wait for the refresh after the last change.
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let stats = app.stats(&sale).await;
        let text = scrape(&app.client, &metrics_url).await;
        if gauges_agree(&text, &sale, &stats) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the per-sale gauges never agreed with the stats {stats}:\n{text}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    app.stop().await;
}

/// Whether `flashsale_sale_*{sale}` in `text` equal the stats answer `stats`.
fn gauges_agree(text: &str, sale: &str, stats: &Value) -> bool {
    let n = |k: &str| stats[k].as_f64().unwrap_or(f64::NAN);
    let gauge = |name: &str| sample(text, &format!("{name}{{sale=\"{sale}\"}}"));
    let orders = |status: &str| {
        sample(
            text,
            &format!("flashsale_sale_orders{{sale=\"{sale}\",status=\"{status}\"}}"),
        )
    };
    let in_persisted =
        n("persisted") - n("payment_pending") - n("paid") - n("payment_failed") - n("expired");
    [
        (gauge("flashsale_sale_stock_units"), n("stock")),
        (gauge("flashsale_sale_stock_left_units"), n("stock_left")),
        (gauge("flashsale_sale_accepted_units"), n("accepted_units")),
        (gauge("flashsale_sale_accepted_orders"), n("accepted")),
        (gauge("flashsale_sale_released_orders"), n("released")),
        (gauge("flashsale_sale_released_units"), n("released_units")),
        (orders("paid"), n("paid")),
        (orders("payment_failed"), n("payment_failed")),
        (orders("payment_pending"), n("payment_pending")),
        (orders("expired"), n("expired")),
        (orders("persisted"), in_persisted),
    ]
    .iter()
    .all(|(got, want)| *got == Some(*want))
}

mod serve {
    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn embedded() {
        every_answer_is_counted_and_the_sale_gauges_agree(Backend::Embedded).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn redis() {
        every_answer_is_counted_and_the_sale_gauges_agree(Backend::Redis).await;
    }
}

/// `flashsale settle` (distributed: Redis, tansu, Postgres) serves the process's metrics
/// on `metrics.settle_listen`, and they move with what it settles.
#[cfg(feature = "kafka")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn settle_answers_metrics_on_its_own_listener() {
    use std::io::BufRead;
    let pg = testkit::PostgresCluster::start(1);
    let redis = testkit::RedisServer::start();
    let broker = testkit::TansuBroker::start();
    let log_url = format!("kafka://{}", broker.bootstrap());
    let distributed = |c: &mut flashsale::config::Config| {
        c.admission.url = redis.url();
        c.log.url = log_url.clone();
        c.log.partitions = 2;
        c.store.url = pg.shard_urls().join(",");
        c.store.catalog_url = pg.catalog_url();
        c.settler.enabled = false;
    };
    // Topics and schema first (serve and settle refuse to start without them).
    let mut config = flashsale::config::Config::default();
    distributed(&mut config);
    sequencer::kafka::create_topics(&config.log.kafka().expect("kafka"))
        .await
        .expect("topics");
    flashsale::app::migrate_store(&config)
        .await
        .expect("migrate");
    let app = TestApp::start_with(distributed).await;

    let port = testkit::free_port();
    let mut settle = Command::new(env!("CARGO_BIN_EXE_flashsale"));
    settle
        .arg("settle")
        .env_remove("FLASHSALE_CONFIG")
        .env("RUST_LOG", "warn")
        .env("FLASHSALE_ADMISSION__URL", redis.url())
        .env("FLASHSALE_LOG__URL", &log_url)
        .env("FLASHSALE_STORE__URL", pg.shard_urls().join(","))
        .env("FLASHSALE_STORE__CATALOG_URL", pg.catalog_url())
        .env(
            "FLASHSALE_METRICS__SETTLE_LISTEN",
            format!("127.0.0.1:{port}"),
        )
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    let mut child = Guard(settle.spawn().expect("spawn flashsale settle"));
    let mut line = String::new();
    std::io::BufReader::new(child.0.stdout.take().expect("stdout"))
        .read_line(&mut line)
        .expect("read");
    let metrics_url = format!("http://127.0.0.1:{port}/metrics");
    assert!(line.contains(&metrics_url), "{line}");

    let sale = app.sale("settled", 5, 1).await;
    for user in ["a", "b", "c"] {
        let a = app.order(&sale, &app.token(user), user, 1).await;
        assert_eq!(a.status, 202, "{}", a.body);
    }
    eventually(
        "the settle process pays every order",
        Duration::from_secs(60),
        || {
            let (app, sale) = (&app, sale.clone());
            async move { app.stats(&sale).await["paid"] == 3 }
        },
    )
    .await;
    let text = scrape(&app.client, &metrics_url).await;
    assert!(text.contains("process=\"settle\""), "{text}");
    let persists = sample(
        &text,
        "flashsale_store_duration_seconds_count{op=\"persist_batch\"}",
    )
    .unwrap_or(0.0);
    assert!(persists >= 1.0, "{text}");
    let claims = sample(
        &text,
        "flashsale_admission_duration_seconds_count{backend=\"redis\",op=\"claim\"}",
    )
    .unwrap_or(0.0);
    assert!(claims >= 1.0, "{text}");
    for family in [
        "flashsale_runtime_workers{runtime=\"settler\"}",
        "# TYPE flashsale_store_pool_connections gauge",
        "# TYPE flashsale_store_pool_waiting gauge",
    ] {
        assert!(text.contains(family), "{family} missing in:\n{text}");
    }
    assert!(
        !text.contains("flashsale_order_answers"),
        "the API's families belong to serve"
    );
    let health = app
        .client
        .get(format!("http://127.0.0.1:{port}/healthz"))
        .send()
        .await
        .expect("healthz");
    assert_eq!(health.status().as_u16(), 200);
    promtool_finds_nothing("settle's /metrics", &text);
    app.stop().await;
}

#[cfg(feature = "kafka")]
struct Guard(std::process::Child);

#[cfg(feature = "kafka")]
impl Drop for Guard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A sale created through the API shows up in the per-sale gauges at the next refresh,
/// without waiting for the catalog to be listed again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_sale_is_exported_at_the_next_refresh() {
    let app = TestApp::start().await;
    let url = format!("{}/metrics", app.url);
    app.sale("first", 2, 1).await;
    eventually(
        "the first sale is exported",
        Duration::from_secs(10),
        || {
            let (app, url) = (&app, url.clone());
            async move {
                scrape(&app.client, &url)
                    .await
                    .contains("flashsale_sale_stock_units{sale=\"first\"} 2")
            }
        },
    )
    .await;
    let created = app
        .create_sale(json!({
            "id": "second", "sku": "s", "stock": 7, "price_cents": 100, "currency": "EUR"
        }))
        .await;
    assert_eq!(created.status, 201, "{}", created.body);
    eventually(
        "the second sale is exported",
        Duration::from_secs(5),
        || {
            let (app, url) = (&app, url.clone());
            async move {
                scrape(&app.client, &url)
                    .await
                    .contains("flashsale_sale_stock_units{sale=\"second\"} 7")
            }
        },
    )
    .await;
    app.stop().await;
}
