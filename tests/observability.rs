//! Watching a sale, proven against a real Prometheus: the Debian `prometheus` binary
//! (testkit) scrapes, every second, a real distributed `flashsale serve`, a `flashsale
//! settle` (Redis, tansu, two Postgres shards), `flashsale mock-provider`, and an embedded
//! `flashsale serve` with its settler inside, with the scrape config and alerting rules of
//! `deploy/prometheus/`. A small sale runs with refusals of every kind, declined payments, a
//! payment-provider outage that opens the breaker, and a poison record in the log. Then:
//!
//! - every query of every panel of every dashboard in `deploy/grafana/dashboards/` (template
//!   variables substituted as Grafana would: the sale, every instance) returns data through
//!   Prometheus's HTTP API, and the template variables list the sale and the instances;
//! - the key panels (stock left, units and orders accepted, paid, released) agree with
//!   `GET /v1/sales/{id}/stats` within a scrape or two;
//! - every metric name a panel uses is in some process's `/metrics`, and `promtool check
//!   metrics` finds nothing to say about any of them;
//! - every alerting rule evaluates without error on the real series, the dead-letter alert
//!   fires, the payment-breaker alert goes pending during the outage, and the stock
//!   accounting, process-down and 503 alerts never do.
//!
//! Problems are gathered and reported together at the end, so one run names everything
//! that is missing.
#![cfg(feature = "kafka")]

mod common;

use serde_json::{json, Value};
use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const OPERATOR: &str = "flashsale-dev-operator-token";
const SALE: &str = "watched";
const EMBEDDED_SALE: &str = "watched-embedded";
const STOCK: u64 = 60;
const PARTITIONS: &str = "4";
/// What `$__rate_interval` becomes: Grafana takes at least four scrape intervals; a wider
/// window keeps the rates of the sale's seconds in view when the queries run.
const RATE_INTERVAL: &str = "30s";

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// A child process killed on drop.
struct Proc {
    child: Child,
    what: &'static str,
}

impl Proc {
    fn spawn(what: &'static str, args: &[&str], env: &[(&str, String)]) -> Proc {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_flashsale"));
        cmd.args(args)
            .env_remove("FLASHSALE_CONFIG")
            .env("RUST_LOG", "error")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit());
        for (k, v) in env {
            cmd.env(k, v);
        }
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("spawn flashsale {what}: {e}"));
        Proc { child, what }
    }

    fn assert_running(&mut self) {
        if let Ok(Some(status)) = self.child.try_wait() {
            panic!(
                "flashsale {} exited ({status}); see its output above",
                self.what
            );
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn addr() -> String {
    format!("127.0.0.1:{}", testkit::free_port())
}

/// Waits until `GET url` answers 200, or `deadline` passes; false then.
async fn answers(client: &reqwest::Client, url: &str, deadline: Duration) -> bool {
    testkit::wait_until(deadline, || async {
        matches!(client.get(url).send().await, Ok(r) if r.status().is_success())
    })
    .await
}

async fn metrics_text(client: &reqwest::Client, base: &str) -> Result<String, String> {
    let resp = client
        .get(format!("{base}/metrics"))
        .send()
        .await
        .map_err(|e| format!("GET {base}/metrics: {e}"))?;
    if !resp.status().is_success() {
        return Err(format!("GET {base}/metrics: {}", resp.status()));
    }
    resp.text().await.map_err(|e| e.to_string())
}

/// Prometheus's HTTP API.
struct Prom {
    client: reqwest::Client,
    url: String,
}

impl Prom {
    /// An instant query: the samples of the result (a scalar is one sample without labels).
    async fn query(&self, promql: &str) -> Result<Vec<(BTreeMap<String, String>, f64)>, String> {
        let resp = self
            .client
            .get(format!("{}/api/v1/query", self.url))
            .query(&[("query", promql)])
            .send()
            .await
            .map_err(|e| format!("query failed to send: {e}"))?;
        let body: Value = resp.json().await.map_err(|e| e.to_string())?;
        if body["status"] != "success" {
            return Err(format!("{}: {}", body["errorType"], body["error"]));
        }
        let value = |v: &Value| -> f64 {
            v[1].as_str()
                .and_then(|s| s.parse::<f64>().ok())
                .unwrap_or(f64::NAN)
        };
        let result = &body["data"]["result"];
        Ok(match body["data"]["resultType"].as_str() {
            Some("scalar") => vec![(BTreeMap::new(), value(result))],
            _ => result
                .as_array()
                .map(|series| {
                    series
                        .iter()
                        .map(|s| {
                            let labels = s["metric"]
                                .as_object()
                                .map(|m| {
                                    m.iter()
                                        .map(|(k, v)| (k.clone(), v.as_str().unwrap_or("").into()))
                                        .collect()
                                })
                                .unwrap_or_default();
                            (labels, value(&s["value"]))
                        })
                        .collect()
                })
                .unwrap_or_default(),
        })
    }

    /// The single value of `promql`, if it has exactly one sample.
    async fn value(&self, promql: &str) -> Option<f64> {
        match self.query(promql).await {
            Ok(samples) if samples.len() == 1 => Some(samples[0].1),
            _ => None,
        }
    }

    /// Values of `label` on series matching `selector` (what Grafana's `label_values` shows).
    async fn label_values(&self, label: &str, selector: &str) -> Result<Vec<String>, String> {
        let body: Value = self
            .client
            .get(format!("{}/api/v1/label/{label}/values", self.url))
            .query(&[("match[]", selector)])
            .send()
            .await
            .map_err(|e| e.to_string())?
            .json()
            .await
            .map_err(|e| e.to_string())?;
        Ok(body["data"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|v| v.as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default())
    }

    async fn rules(&self) -> Result<Value, String> {
        self.client
            .get(format!("{}/api/v1/rules", self.url))
            .send()
            .await
            .map_err(|e| e.to_string())?
            .json()
            .await
            .map_err(|e| e.to_string())
    }
}

/// `deploy/prometheus/prometheus.yml` with each job's targets replaced by `targets` and the
/// rule files given by absolute path; panics if the file and `targets` name other jobs.
fn scrape_config(targets: &BTreeMap<&str, Vec<String>>) -> String {
    let dir = root().join("deploy/prometheus");
    let text = std::fs::read_to_string(dir.join("prometheus.yml")).expect("prometheus.yml");
    let mut job: Option<String> = None;
    let mut seen = BTreeSet::new();
    let mut out = String::new();
    let mut in_rules = false;
    for line in text.lines() {
        let trimmed = line.trim();
        if !line.starts_with(' ') {
            in_rules = trimmed == "rule_files:";
        }
        if let Some(name) = trimmed.strip_prefix("- job_name:") {
            job = Some(name.trim().to_owned());
        }
        if trimmed.starts_with("- targets:") {
            let name = job.clone().expect("targets before any job_name");
            let t = targets.get(name.as_str()).unwrap_or_else(|| {
                panic!("prometheus.yml has job {name}, the test has no target for it")
            });
            let indent = &line[..line.len() - line.trim_start().len()];
            let list: Vec<String> = t.iter().map(|a| format!("\"{a}\"")).collect();
            out.push_str(&format!("{indent}- targets: [{}]\n", list.join(", ")));
            seen.insert(name);
            continue;
        }
        if in_rules && trimmed.starts_with("- ") {
            let file = trimmed.trim_start_matches("- ").trim();
            let indent = &line[..line.len() - line.trim_start().len()];
            out.push_str(&format!("{indent}- {}\n", dir.join(file).display()));
            continue;
        }
        out.push_str(line);
        out.push('\n');
    }
    let wanted: BTreeSet<String> = targets.keys().map(|k| (*k).to_owned()).collect();
    assert_eq!(seen, wanted, "jobs of deploy/prometheus/prometheus.yml");
    out
}

/// Every panel of a dashboard, rows' panels included.
fn panels(dashboard: &Value) -> Vec<Value> {
    let mut out = Vec::new();
    for p in dashboard["panels"].as_array().into_iter().flatten() {
        out.push(p.clone());
        out.extend(p["panels"].as_array().into_iter().flatten().cloned());
    }
    out
}

fn dashboards() -> Vec<(String, Value)> {
    let dir = root().join("deploy/grafana/dashboards");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .expect("deploy/grafana/dashboards")
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "json"))
        .collect();
    files.sort();
    assert!(
        files.len() >= 2,
        "at least two dashboards in {}",
        dir.display()
    );
    files
        .into_iter()
        .map(|p| {
            let text = std::fs::read_to_string(&p).expect("read dashboard");
            let name = p
                .file_name()
                .unwrap_or_default()
                .to_string_lossy()
                .into_owned();
            (name, serde_json::from_str(&text).expect("dashboard JSON"))
        })
        .collect()
}

/// What Grafana sends for a multi-value variable in a regex matcher: `(a|b)`, each value
/// regex-escaped, the escapes doubled for the PromQL string.
fn regex_alternation(values: &[String]) -> String {
    let escaped: Vec<String> = values
        .iter()
        .map(|v| {
            let mut s = String::new();
            for c in v.chars() {
                if ".+*?^$()[]{}|\\".contains(c) {
                    s.push_str("\\\\");
                }
                s.push(c);
            }
            s
        })
        .collect();
    format!("({})", escaped.join("|"))
}

/// Substitutes the template variables the dashboards use; `None` if one is left.
fn substitute(expr: &str, vars: &[(&str, String)]) -> Option<String> {
    let mut out = expr.to_owned();
    // Longest names first: `$__rate_interval` before `$__range`.
    let mut vars: Vec<&(&str, String)> = vars.iter().collect();
    vars.sort_by_key(|(k, _)| std::cmp::Reverse(k.len()));
    for (name, value) in vars {
        out = out.replace(&format!("${{{name}}}"), value);
        out = out.replace(&format!("${name}"), value);
    }
    (!out.contains('$')).then_some(out)
}

/// Metric names a PromQL expression uses (the `flashsale_` ones).
fn metric_names(expr: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let bytes = expr.as_bytes();
    let mut i = 0;
    while let Some(pos) = expr[i..].find("flashsale_") {
        let start = i + pos;
        let before_ok =
            start == 0 || !(bytes[start - 1].is_ascii_alphanumeric() || bytes[start - 1] == b'_');
        let mut end = start;
        while end < bytes.len() && (bytes[end].is_ascii_alphanumeric() || bytes[end] == b'_') {
            end += 1;
        }
        if before_ok {
            out.insert(expr[start..end].to_owned());
        }
        i = end;
    }
    out
}

/// Whether `name` (as a query names it: `x_total`, `x_bucket`, a gauge) is in an exposition:
/// as a sample, or as a declared family with no sample yet.
fn exposes(text: &str, name: &str) -> bool {
    let sample = text.lines().any(|l| {
        l.strip_prefix(name)
            .is_some_and(|rest| rest.starts_with('{') || rest.starts_with(' '))
    });
    if sample {
        return true;
    }
    let family = ["_total", "_bucket", "_count", "_sum"]
        .iter()
        .find_map(|s| name.strip_suffix(s))
        .unwrap_or(name);
    text.lines().any(|l| {
        l.strip_prefix("# TYPE ")
            .and_then(|r| r.split_whitespace().next())
            == Some(family)
    })
}

fn promtool_check_metrics(text: &str) -> Result<(), String> {
    let promtool = testkit::require_binary("promtool", "prometheus");
    let mut child = Command::new(promtool)
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| e.to_string())?;
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(text.as_bytes())
        .map_err(|e| e.to_string())?;
    let out = child.wait_with_output().map_err(|e| e.to_string())?;
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if out.status.success() && said.trim().is_empty() {
        Ok(())
    } else {
        Err(said.trim().to_owned())
    }
}

/// An order as a buyer sends it; returns the status and the problem code (or "accepted").
async fn order(
    client: &reqwest::Client,
    base: &str,
    sale: &str,
    token: Option<&str>,
    key: Option<&str>,
    body: &str,
) -> (u16, String) {
    let mut req = client
        .post(format!("{base}/v1/sales/{sale}/orders"))
        .header("content-type", "application/json")
        .body(body.to_owned());
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    if let Some(k) = key {
        req = req.header("idempotency-key", k);
    }
    let resp = req.send().await.expect("order");
    let status = resp.status().as_u16();
    let body: Value = resp.json().await.unwrap_or(Value::Null);
    let code = if status == 202 {
        "accepted".to_owned()
    } else {
        body["code"].as_str().unwrap_or("").to_owned()
    };
    (status, code)
}

fn buy(quantity: u32, payment_token: &str) -> String {
    json!({"quantity": quantity, "payment_token": payment_token}).to_string()
}

async fn stats(client: &reqwest::Client, base: &str, sale: &str) -> Value {
    let resp = client
        .get(format!("{base}/v1/sales/{sale}/stats"))
        .bearer_auth(OPERATOR)
        .send()
        .await
        .expect("stats");
    assert_eq!(resp.status().as_u16(), 200, "stats of {sale}");
    resp.json().await.expect("stats json")
}

async fn create_sale(client: &reqwest::Client, base: &str, id: &str, stock: u64) {
    let resp = client
        .post(format!("{base}/v1/sales"))
        .bearer_auth(OPERATOR)
        .json(&json!({
            "id": id, "sku": "sku-watched", "stock": stock, "price_cents": 1500,
            "currency": "EUR", "per_user_limit": 2, "max_quantity_per_order": 2,
            "user_rate": {"per_second": 1000, "burst": 1000}
        }))
        .send()
        .await
        .expect("create sale");
    assert_eq!(resp.status().as_u16(), 201, "create sale {id}");
}

fn path_str(path: &Path) -> String {
    path.display().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_dashboard_query_returns_data_from_a_real_sale_and_the_alerts_evaluate() {
    let started = Instant::now();
    let mut problems: Vec<String> = Vec::new();
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .expect("client");

    // The distributed pipeline's servers.
    let pg = testkit::PostgresCluster::start(2);
    let redis = testkit::RedisServer::start();
    let broker = testkit::TansuBroker::start();
    let dir = tempfile::tempdir().expect("tempdir");
    let embedded_dir = tempfile::tempdir().expect("tempdir");
    let log_url = format!("kafka://{}", broker.bootstrap());

    let mock_addr = addr();
    let mock_url = format!("http://{mock_addr}");
    let mut mock = Proc::spawn(
        "mock-provider",
        &["mock-provider", "--listen", &mock_addr],
        &[],
    );
    assert!(
        answers(
            &client,
            &format!("{mock_url}/healthz"),
            Duration::from_secs(30)
        )
        .await,
        "the mock provider did not answer /healthz"
    );
    mock.assert_running();

    let env: Vec<(&str, String)> = vec![
        ("FLASHSALE_DATA_DIR", path_str(dir.path())),
        ("FLASHSALE_ADMISSION__URL", redis.url()),
        ("FLASHSALE_ADMISSION__DECISION_TIMEOUT", "2s".into()),
        ("FLASHSALE_LOG__URL", log_url.clone()),
        ("FLASHSALE_LOG__PARTITIONS", PARTITIONS.into()),
        ("FLASHSALE_STORE__URL", pg.shard_urls().join(",")),
        ("FLASHSALE_STORE__CATALOG_URL", pg.catalog_url()),
        ("FLASHSALE_PROVIDERS__PAYMENT_URL", mock_url.clone()),
        ("FLASHSALE_PROVIDERS__NOTIFICATION_URL", mock_url.clone()),
    ];
    let migrated = Command::new(env!("CARGO_BIN_EXE_flashsale"))
        .arg("migrate")
        .env_remove("FLASHSALE_CONFIG")
        .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
        .output()
        .expect("migrate");
    assert!(
        migrated.status.success(),
        "flashsale migrate: {}",
        String::from_utf8_lossy(&migrated.stderr)
    );

    let serve_addr = addr();
    let serve_url = format!("http://{serve_addr}");
    let mut serve_env = env.clone();
    serve_env.push(("FLASHSALE_SETTLER__ENABLED", "false".into()));
    let mut serve = Proc::spawn("serve", &["serve", "--listen", &serve_addr], &serve_env);

    let settle_addr = addr();
    let settle_url = format!("http://{settle_addr}");
    let mut settle_env = env.clone();
    settle_env.push(("FLASHSALE_METRICS__SETTLE_LISTEN", settle_addr.clone()));
    let mut settle = Proc::spawn("settle", &["settle"], &settle_env);

    // An embedded serve with its settler inside (and the built-in mock provider), so that the
    // embedded admission and log are watched too.
    let embedded_addr = addr();
    let embedded_url = format!("http://{embedded_addr}");
    let mut embedded = Proc::spawn(
        "serve (embedded)",
        &["serve", "--listen", &embedded_addr],
        &[
            ("FLASHSALE_DATA_DIR", path_str(embedded_dir.path())),
            ("FLASHSALE_ADMISSION__DECISION_TIMEOUT", "2s".into()),
            ("FLASHSALE_PROVIDERS__MOCK_DECLINE_RATE", "0.25".into()),
        ],
    );

    for (what, url) in [("serve", &serve_url), ("serve (embedded)", &embedded_url)] {
        assert!(
            answers(&client, &format!("{url}/healthz"), Duration::from_secs(60)).await,
            "flashsale {what} did not answer /healthz at {url}"
        );
    }
    serve.assert_running();
    embedded.assert_running();
    if !answers(
        &client,
        &format!("{settle_url}/metrics"),
        Duration::from_secs(30),
    )
    .await
    {
        settle.assert_running();
        problems.push(format!(
            "flashsale settle does not answer GET /metrics on metrics.settle_listen = {settle_addr}"
        ));
    }

    // Prometheus with the deploy config, targets swapped for this test's processes.
    let targets: BTreeMap<&str, Vec<String>> = BTreeMap::from([
        (
            "flashsale-serve",
            vec![serve_addr.clone(), embedded_addr.clone()],
        ),
        ("flashsale-settle", vec![settle_addr.clone()]),
        ("flashsale-mock-provider", vec![mock_addr.clone()]),
    ]);
    let instances: Vec<String> = targets.values().flatten().cloned().collect();
    let prometheus = testkit::PrometheusServer::start(&scrape_config(&targets));
    let prom = Prom {
        client: client.clone(),
        url: prometheus.url(),
    };
    let all_up = testkit::wait_until(Duration::from_secs(30), || async {
        prom.query("up == 1")
            .await
            .map(|s| s.len() == instances.len())
            .unwrap_or(false)
    })
    .await;
    if !all_up {
        let up = prom.query("up").await.unwrap_or_default();
        let down: Vec<String> = up
            .iter()
            .filter(|(_, v)| *v != 1.0)
            .map(|(l, _)| format!("{} {}", l["job"], l["instance"]))
            .collect();
        problems.push(format!("targets not up after 30 s: {down:?}"));
    }

    // The sale: refusals of every kind, declines, a sell-out.
    create_sale(&client, &serve_url, SALE, STOCK).await;
    let auth = flashsale::config::Config::default()
        .auth
        .to_auth_config()
        .expect("auth");
    let token = |user: &str| {
        ingest::auth::issue_token(&auth, user, Duration::from_secs(3600)).expect("token")
    };
    let mut answered: BTreeMap<String, u64> = BTreeMap::new();
    let mut count = |(status, code): (u16, String), want: u16| {
        assert_eq!(status, want, "answer {code}");
        *answered.entry(code).or_default() += 1;
    };
    let t = token("refused");
    count(
        order(
            &client,
            &serve_url,
            SALE,
            Some(&t),
            Some("r1"),
            &buy(0, "tok_visa"),
        )
        .await,
        422,
    );
    count(
        order(
            &client,
            &serve_url,
            SALE,
            Some("not-a-jwt"),
            Some("r2"),
            &buy(1, "tok_visa"),
        )
        .await,
        401,
    );
    count(
        order(
            &client,
            &serve_url,
            SALE,
            Some(&t),
            None,
            &buy(1, "tok_visa"),
        )
        .await,
        400,
    );
    count(
        order(&client, &serve_url, SALE, Some(&t), Some("r3"), "{not json").await,
        400,
    );
    let greedy = token("greedy");
    count(
        order(
            &client,
            &serve_url,
            SALE,
            Some(&greedy),
            Some("g1"),
            &buy(2, "tok_visa"),
        )
        .await,
        202,
    );
    count(
        order(
            &client,
            &serve_url,
            SALE,
            Some(&greedy),
            Some("g2"),
            &buy(1, "tok_visa"),
        )
        .await,
        403,
    );
    // 48 more paid units and 10 declined ones: sold out.
    for i in 0..48 {
        let t = token(&format!("buyer{i}"));
        count(
            order(
                &client,
                &serve_url,
                SALE,
                Some(&t),
                Some(&format!("b{i}")),
                &buy(1, "tok_visa"),
            )
            .await,
            202,
        );
    }
    for i in 0..10 {
        let t = token(&format!("decliner{i}"));
        count(
            order(
                &client,
                &serve_url,
                SALE,
                Some(&t),
                Some(&format!("d{i}")),
                &buy(1, "tok_decline"),
            )
            .await,
            202,
        );
    }
    testkit::eventually(
        "the first wave settles (declines released)",
        Duration::from_secs(120),
        || async {
            let s = stats(&client, &serve_url, SALE).await;
            s["paid"] == 49
                && s["payment_failed"] == 10
                && s["released"] == 10
                && s["stock_left"] == 10
        },
    )
    .await;

    // A payment-provider outage: the released units sell again but cannot be charged; the
    // breaker opens, and Prometheus sees it.
    mock_provider::update_config(
        &mock_url,
        &mock_provider::MockConfig {
            down: true,
            ..mock_provider::MockConfig::default()
        },
    )
    .await
    .expect("provider down");
    for i in 0..10 {
        let t = token(&format!("outage{i}"));
        count(
            order(
                &client,
                &serve_url,
                SALE,
                Some(&t),
                Some(&format!("o{i}")),
                &buy(1, "tok_visa"),
            )
            .await,
            202,
        );
    }
    // Sold out: no unit can come back while the provider is down (a decline releases its
    // unit as soon as it is charged, so a sold-out wave during the first one would race
    // the settler).
    for i in 10..25 {
        let t = token(&format!("outage{i}"));
        count(
            order(
                &client,
                &serve_url,
                SALE,
                Some(&t),
                Some(&format!("o{i}")),
                &buy(1, "tok_visa"),
            )
            .await,
            409,
        );
    }
    let breaker_seen = testkit::wait_until(Duration::from_secs(60), || async {
        prom.value(r#"max(flashsale_breaker_state{provider="payment"})"#)
            .await
            == Some(2.0)
    })
    .await;
    if !breaker_seen {
        problems.push("Prometheus never saw flashsale_breaker_state{provider=\"payment\"} = 2 during the outage".into());
    }
    mock_provider::update_config(&mock_url, &mock_provider::MockConfig::default())
        .await
        .expect("provider back");

    // A record the settler cannot read: it goes to the dead-letter topic.
    let kafka = sequencer::kafka::KafkaConfig {
        bootstrap: broker.bootstrap(),
        partitions: PARTITIONS.parse().expect("partitions"),
        ..sequencer::kafka::KafkaConfig::default()
    };
    sequencer::kafka::KafkaLog::new(&kafka)
        .expect("producer")
        .send(&kafka.orders_topic(), "poison", b"{not an order")
        .await
        .expect("send poison");

    testkit::eventually(
        "every order is paid once the provider is back",
        Duration::from_secs(120),
        || async {
            let s = stats(&client, &serve_url, SALE).await;
            s["paid"] == 59 && s["payment_pending"] == 0 && s["persisted"] == 69
        },
    )
    .await;

    // The embedded sale: a few orders, some declined by the built-in mock.
    // In two halves, the second once Prometheus has scraped the first: a series created by
    // the first observations has no rate until it is seen moving.
    create_sale(&client, &embedded_url, EMBEDDED_SALE, 20).await;
    for i in 0..30 {
        if i == 15 {
            let selector = format!(
                r#"flashsale_log_append_duration_seconds_count{{instance="{embedded_addr}"}}"#
            );
            let scraped = testkit::wait_until(Duration::from_secs(30), || async {
                prom.value(&selector).await.is_some_and(|n| n > 0.0)
            })
            .await;
            if !scraped {
                problems.push(format!("Prometheus never saw {selector} above 0"));
            }
        }
        let t = token(&format!("e{}", i % 15));
        let (status, code) = order(
            &client,
            &embedded_url,
            EMBEDDED_SALE,
            Some(&t),
            Some(&format!("e{i}")),
            &buy(1, "tok_visa"),
        )
        .await;
        assert!(
            matches!(status, 202 | 409 | 403),
            "embedded order: {status} {code}"
        );
    }
    testkit::eventually(
        "the embedded sale settles",
        Duration::from_secs(60),
        || async {
            let s = stats(&client, &embedded_url, EMBEDDED_SALE).await;
            s["persisted"] == s["accepted"]
                && s["payment_pending"] == 0
                && s["persisted"].as_u64() > Some(0)
        },
    )
    .await;

    let final_stats = stats(&client, &serve_url, SALE).await;
    let stats_read = Instant::now();
    assert_eq!(final_stats["accepted"], 69, "{final_stats}");
    assert_eq!(final_stats["accepted_units"], 70, "{final_stats}");
    assert_eq!(final_stats["stock_left"], 0, "{final_stats}");
    assert_eq!(final_stats["paid"], 59, "{final_stats}");
    assert_eq!(final_stats["released"], 10, "{final_stats}");
    for (code, n) in [
        ("invalid_quantity", 1),
        ("invalid_token", 1),
        ("missing_idempotency_key", 1),
        ("malformed_json", 1),
        ("limit_exceeded", 1),
        ("sold_out", 15),
    ] {
        assert_eq!(answered.get(code), Some(&n), "answers {answered:?}");
    }

    // The template variables Grafana would offer, and their substitutions.
    let vars: Vec<(&str, String)> = vec![
        ("sale", SALE.to_owned()),
        ("instance", regex_alternation(&instances)),
        ("__rate_interval", RATE_INTERVAL.to_owned()),
        ("__range", format!("{}s", started.elapsed().as_secs() + 60)),
    ];
    let dashboards = dashboards();

    // The key panels agree with the stats API within a scrape or two (the per-sale gauges
    // are refreshed at most once a second, then scraped every second).
    let key_panels = [
        ("Stock left", "stock_left"),
        ("Units accepted", "accepted_units"),
        ("Orders accepted", "accepted"),
        ("Paid", "paid"),
        ("Released", "released"),
    ];
    let live = dashboards
        .iter()
        .find(|(_, d)| d["title"] == "Flash sale, live")
        .map(|(_, d)| d.clone())
        .expect("the dashboard \"Flash sale, live\"");
    for (title, field) in key_panels {
        let panel = panels(&live)
            .into_iter()
            .find(|p| p["title"] == title)
            .unwrap_or_else(|| panic!("panel {title} in Flash sale, live"));
        let expr = substitute(panel["targets"][0]["expr"].as_str().unwrap_or(""), &vars)
            .expect("known variables");
        let want = final_stats[field].as_f64().expect("a number");
        let agreed = testkit::wait_until(Duration::from_secs(5), || async {
            prom.value(&expr).await == Some(want)
        })
        .await;
        if !agreed {
            problems.push(format!(
                "panel \"{title}\" reads {:?} from Prometheus, GET /v1/sales/{SALE}/stats says {field} = {want} \
                 ({:?} after the stats were read): {expr}",
                prom.value(&expr).await,
                stats_read.elapsed()
            ));
        }
    }

    // Template variables list the sale and every instance.
    for (name, d) in &dashboards {
        for v in d["templating"]["list"].as_array().into_iter().flatten() {
            let query = v["query"].as_str().unwrap_or("");
            let Some(args) = query
                .strip_prefix("label_values(")
                .and_then(|r| r.strip_suffix(')'))
            else {
                problems.push(format!(
                    "{name}: variable {} is not a label_values() query",
                    v["name"]
                ));
                continue;
            };
            let (selector, label) = args.rsplit_once(',').expect("label_values(metric, label)");
            let values = prom
                .label_values(label.trim(), selector.trim())
                .await
                .unwrap_or_default();
            let wanted: Vec<String> = match v["name"].as_str() {
                Some("sale") => vec![SALE.to_owned()],
                Some("instance") => instances.clone(),
                _ => Vec::new(),
            };
            for w in wanted {
                if !values.contains(&w) {
                    problems.push(format!(
                        "{name}: variable {} does not offer {w} (it offers {values:?})",
                        v["name"]
                    ));
                }
            }
        }
    }

    // Every query of every panel returns data.
    let mut used: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let mut queries = 0;
    // Quantiles over a window without observations are NaN: data, but worth a look.
    let mut nan_only: Vec<String> = Vec::new();
    for (name, d) in &dashboards {
        for p in panels(d) {
            for t in p["targets"].as_array().into_iter().flatten() {
                let raw = t["expr"].as_str().unwrap_or("");
                let at = format!(
                    "{name}: panel \"{}\" query {}",
                    p["title"].as_str().unwrap_or(""),
                    t["refId"]
                );
                for m in metric_names(raw) {
                    used.entry(m).or_default().insert(at.clone());
                }
                let Some(expr) = substitute(raw, &vars) else {
                    problems.push(format!("{at}: unknown template variable in {raw}"));
                    continue;
                };
                queries += 1;
                match prom.query(&expr).await {
                    Ok(samples) if samples.is_empty() => {
                        problems.push(format!("{at}: no data for {expr}"))
                    }
                    Ok(samples) => {
                        let numbers = samples.iter().filter(|(_, v)| !v.is_nan()).count();
                        if numbers == 0 {
                            nan_only.push(at.clone());
                        }
                        eprintln!("{at}: {} series ({numbers} not NaN)", samples.len());
                    }
                    Err(e) => problems.push(format!("{at}: {e} in {expr}")),
                }
            }
        }
    }
    assert!(
        queries > 40,
        "only {queries} panel queries in the dashboards"
    );
    eprintln!(
        "{queries} panel queries run, {} metric names; NaN only (no observation in the window): \
         {nan_only:?}",
        used.len()
    );

    // The sell-out moment lies within the sale.
    let sold_out_panel = panels(&live)
        .into_iter()
        .find(|p| p["title"] == "Sold out at")
        .expect("panel Sold out at");
    let expr = substitute(
        sold_out_panel["targets"][0]["expr"].as_str().unwrap_or(""),
        &vars,
    )
    .expect("known variables");
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_millis() as f64;
    let began_ms = now_ms - started.elapsed().as_millis() as f64;
    match prom.value(&expr).await {
        Some(at) if at >= began_ms && at <= now_ms => {}
        other => problems.push(format!(
            "Sold out at reads {other:?}, not a time within the test"
        )),
    }

    // Every metric a panel names is in some process's /metrics; promtool has nothing to say.
    let mut expositions = Vec::new();
    for (what, base) in [
        ("serve", &serve_url),
        ("serve (embedded)", &embedded_url),
        ("settle", &settle_url),
        ("mock-provider", &mock_url),
    ] {
        match metrics_text(&client, base).await {
            Ok(text) => {
                if let Err(said) = promtool_check_metrics(&text) {
                    problems.push(format!(
                        "promtool check metrics on {what}'s /metrics: {said}"
                    ));
                }
                expositions.push(text);
            }
            Err(e) => problems.push(format!("{what}: {e}")),
        }
    }
    let missing: Vec<&String> = used
        .keys()
        .filter(|m| !expositions.iter().any(|text| exposes(text, m)))
        .collect();
    if !missing.is_empty() {
        problems.push(format!(
            "metrics used by panels but in no process's /metrics: {missing:?}"
        ));
    }

    // The alerting rules evaluate on the real series.
    let dead_letter_alert = testkit::wait_until(Duration::from_secs(30), || async {
        prom.value(r#"count(ALERTS{alertname="FlashsaleDeadLetters", alertstate="firing"})"#)
            .await
            .is_some_and(|n| n >= 1.0)
    })
    .await;
    if !dead_letter_alert {
        problems.push("alert FlashsaleDeadLetters did not fire after a poison record".into());
    }
    let window = format!("{}s", started.elapsed().as_secs() + 60);
    if prom
        .value(&format!(
            r#"count(max_over_time(ALERTS{{alertname="FlashsalePaymentBreakerOpen"}}[{window}]))"#
        ))
        .await
        .is_none()
    {
        problems.push(
            "alert FlashsalePaymentBreakerOpen was never even pending during the outage".into(),
        );
    }
    for quiet in [
        "FlashsaleStockAccountingBroken",
        "FlashsaleProcessDown",
        "FlashsaleUnavailableAnswers",
    ] {
        let seen = prom
            .query(&format!(
                r#"max_over_time(ALERTS{{alertname="{quiet}"}}[{window}])"#
            ))
            .await
            .unwrap_or_default();
        if !seen.is_empty() {
            problems.push(format!(
                "alert {quiet} went off during a healthy sale: {seen:?}"
            ));
        }
    }
    match prom.rules().await {
        Ok(body) => {
            let rules: Vec<&Value> = body["data"]["groups"]
                .as_array()
                .into_iter()
                .flatten()
                .flat_map(|g| g["rules"].as_array().into_iter().flatten())
                .collect();
            if rules.len() < 7 {
                problems.push(format!(
                    "Prometheus loaded {} alerting rules, not the 7 of alerts.yml",
                    rules.len()
                ));
            }
            for r in rules {
                if r["health"] != "ok" {
                    problems.push(format!(
                        "rule {} is {}: {}",
                        r["name"], r["health"], r["lastError"]
                    ));
                }
            }
        }
        Err(e) => problems.push(format!("GET /api/v1/rules: {e}")),
    }

    serve.assert_running();
    settle.assert_running();
    embedded.assert_running();
    mock.assert_running();
    assert!(
        problems.is_empty(),
        "{} problem(s) watching the sale:\n  {}\nPrometheus log:\n{}",
        problems.len(),
        problems.join("\n  "),
        prometheus.log()
    );
}
