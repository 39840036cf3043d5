//! Scaled out: three `flashsale serve` processes (settler off) and three `flashsale settle`
//! processes sharing one consumer group, on a three-primary Redis Cluster, a tansu broker,
//! two Postgres shards and the mock provider. One sale is driven through all three ingests
//! while a settler is SIGKILLed (and later restarted: it rejoins the group) and the Redis
//! primary owning the sale's slot is killed and restarted empty: the sale answers 503,
//! never full stock, until `flashsale reconcile` has rebuilt its counters from the store
//! (only once the settlers have caught up with the log), then sells on. At the end nothing
//! is oversold, lost or settled twice, and reconcile finds everything consistent.
#![cfg(feature = "kafka")]

use flashsale::config::Config;
use mock_provider::{Audit, MockConfig, MockProvider};
use parking_lot::Mutex;
use serde_json::{json, Value};
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::io::{BufRead, BufReader};
use std::process::{Child, ChildStdout, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use storage::{Order, OrderStatus, OrderStore, SaleId};
use testkit::eventually;

const SALE: &str = "scale-out";
const OPERATOR: &str = "flashsale-dev-operator-token";
const STOCK: u64 = 2_000;
const PER_USER: u64 = 2;
/// Buyers: their limits add up to twice the stock, so the sale sells out.
const USERS: usize = 2_000;
const CLIENTS: usize = 64;
const PARTITIONS: u32 = 6;
const SERVES: usize = 3;
const SETTLERS: usize = 3;

/// Where the sale is when a request starts or ends. Ordered: a phase only moves forward.
const SELLING: u8 = 0;
/// The Redis primary owning the sale's slot is dead.
const NODE_DOWN: u8 = 1;
/// It is back, empty: the sale's keys are missing until reconcile rebuilds them.
const NODE_EMPTY: u8 = 2;
/// Reconcile runs until it rebuilds the counters (an order sent now may be decided before
/// or after that).
const REPAIRING: u8 = 3;
/// Reconcile rebuilt the counters.
const RESUMED: u8 = 4;
const PHASES: usize = 5;

/// A child process of the binary, SIGKILLed on drop. Its stdout stays open (read up to the
/// first line), so a later write never meets a closed pipe.
struct Proc {
    child: Child,
    _stdout: BufReader<ChildStdout>,
    /// The `http://...` word of its first line (serve: the API; settle: its metrics).
    url: String,
}

impl Proc {
    fn spawn(args: &[&str], env: &[(&'static str, String)]) -> Proc {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_flashsale"));
        cmd.args(args)
            .env_remove("FLASHSALE_CONFIG")
            .env("RUST_LOG", "error")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().expect("spawn flashsale");
        let mut stdout = BufReader::new(child.stdout.take().expect("stdout"));
        let mut line = String::new();
        stdout.read_line(&mut line).expect("read the first line");
        let url = line
            .split_whitespace()
            .find_map(|w| w.strip_prefix("http://"))
            .map(|w| format!("http://{}", w.trim_end_matches(')')))
            .unwrap_or_else(|| panic!("flashsale {args:?} printed no URL: {line:?}"));
        Proc {
            child,
            _stdout: stdout,
            url,
        }
    }

    /// SIGKILL: no shutdown, no flush, whatever was under way is cut.
    fn kill(&mut self) {
        self.child.kill().expect("kill");
        self.child.wait().expect("wait");
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One answer the buyers got.
#[derive(Debug, Clone)]
struct Answer {
    /// The phase when the request was sent and when its answer arrived.
    started: u8,
    ended: u8,
    /// Which ingest answered.
    ingest: usize,
    status: u16,
    code: String,
    /// The problem's detail (why a 503 was a 503).
    detail: String,
    order_id: Option<String>,
}

/// The buyers: `CLIENTS` tasks sending orders round-robin over the ingests, request `i`
/// from user `i % USERS` with key `k{i}`, as long as `i` is below the limit the test sets
/// (so the sale cannot run ahead of the steps that disturb it), until stopped.
struct Load {
    answers: Arc<Mutex<Vec<Answer>>>,
    phase: Arc<AtomicU8>,
    /// Requests under way, by the phase they were sent in.
    in_flight: Arc<[AtomicUsize; PHASES]>,
    limit: tokio::sync::watch::Sender<usize>,
    stop: Arc<AtomicBool>,
    tasks: tokio::task::JoinSet<()>,
}

impl Load {
    fn start(client: &reqwest::Client, urls: &[String], tokens: Vec<String>, limit: usize) -> Load {
        let answers = Arc::new(Mutex::new(Vec::new()));
        let phase = Arc::new(AtomicU8::new(SELLING));
        let in_flight: Arc<[AtomicUsize; PHASES]> = Arc::new(Default::default());
        let (limit, allowed) = tokio::sync::watch::channel(limit);
        let stop = Arc::new(AtomicBool::new(false));
        let next = Arc::new(AtomicUsize::new(0));
        let tokens = Arc::new(tokens);
        let urls: Arc<Vec<String>> = Arc::new(urls.to_vec());
        let mut tasks = tokio::task::JoinSet::new();
        for _ in 0..CLIENTS {
            let (answers, phase, in_flight, mut allowed, stop, next, tokens, urls, client) = (
                Arc::clone(&answers),
                Arc::clone(&phase),
                Arc::clone(&in_flight),
                allowed.clone(),
                Arc::clone(&stop),
                Arc::clone(&next),
                Arc::clone(&tokens),
                Arc::clone(&urls),
                client.clone(),
            );
            tasks.spawn(async move {
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if allowed.wait_for(|limit| i < *limit).await.is_err()
                        || stop.load(Ordering::SeqCst)
                    {
                        return;
                    }
                    let ingest = i % urls.len();
                    let started = phase.load(Ordering::SeqCst);
                    in_flight[started as usize].fetch_add(1, Ordering::SeqCst);
                    let resp = client
                        .post(format!("{}/v1/sales/{SALE}/orders", urls[ingest]))
                        .bearer_auth(&tokens[i % tokens.len()])
                        .header("idempotency-key", format!("k{i}"))
                        .json(&json!({"quantity": 1, "payment_token": "tok_visa"}))
                        .send()
                        .await
                        .expect("every ingest answers, Redis node down or not");
                    let status = resp.status().as_u16();
                    let body: Value = resp.json().await.unwrap_or(Value::Null);
                    let answer = Answer {
                        started,
                        ended: phase.load(Ordering::SeqCst),
                        ingest,
                        status,
                        code: body["code"].as_str().unwrap_or_default().to_owned(),
                        detail: body["detail"].as_str().unwrap_or_default().to_owned(),
                        order_id: body["order_id"].as_str().map(str::to_owned),
                    };
                    // Recorded before it stops counting as under way, so once nothing of a
                    // phase is under way every answer of that phase is here.
                    answers.lock().push(answer);
                    in_flight[started as usize].fetch_sub(1, Ordering::SeqCst);
                }
            });
        }
        Load {
            answers,
            phase,
            in_flight,
            limit,
            stop,
            tasks,
        }
    }

    /// Lets requests below `limit` go.
    fn allow(&self, limit: usize) {
        self.limit.send_replace(limit);
    }

    /// Answers to requests sent in `phase`, by ingest, status, code and (for a 503) detail.
    fn tally(&self, phase: u8) -> BTreeMap<(usize, u16, String, String), usize> {
        let mut tally = BTreeMap::new();
        for a in self.answers.lock().iter().filter(|a| a.started == phase) {
            let detail = if a.status == 503 {
                a.detail.clone()
            } else {
                String::new()
            };
            *tally
                .entry((a.ingest, a.status, a.code.clone(), detail))
                .or_default() += 1;
        }
        tally
    }

    /// Requests answered so far.
    fn answered(&self) -> usize {
        self.answers.lock().len()
    }

    fn enter(&self, phase: u8) {
        self.phase.store(phase, Ordering::SeqCst);
    }

    /// Answers matching `f` so far.
    fn count(&self, f: impl Fn(&Answer) -> bool) -> usize {
        self.answers.lock().iter().filter(|a| f(a)).count()
    }

    /// Requests sent before `phase` still without an answer.
    fn under_way_before(&self, phase: u8) -> usize {
        self.in_flight[..phase as usize]
            .iter()
            .map(|n| n.load(Ordering::SeqCst))
            .sum()
    }

    fn accepted_ids(&self) -> HashSet<String> {
        accepted_ids(&self.answers.lock())
    }

    async fn stop(mut self) -> Vec<Answer> {
        self.stop.store(true, Ordering::SeqCst);
        self.allow(usize::MAX);
        while let Some(r) = self.tasks.join_next().await {
            r.expect("buyer task");
        }
        let answers = self.answers.lock().clone();
        answers
    }
}

/// The order ids answered 202.
fn accepted_ids(answers: &[Answer]) -> HashSet<String> {
    answers
        .iter()
        .filter(|a| a.status == 202)
        .map(|a| a.order_id.clone().expect("a 202 names its order"))
        .collect()
}

/// The members of consumer group `group` as the broker at `bootstrap` counts them: one
/// DescribeGroups request (version 0) on a connection of its own. librdkafka describes only
/// the groups ListGroups names, and tansu 0.6.0 answers ListGroups with none.
async fn group_members(bootstrap: &str, group: &str) -> std::io::Result<usize> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    fn string(out: &mut Vec<u8>, s: &str) {
        out.extend((s.len() as i16).to_be_bytes());
        out.extend(s.as_bytes());
    }
    let bad = |what: &str| std::io::Error::new(std::io::ErrorKind::InvalidData, what.to_owned());
    // api key 15 (DescribeGroups), version 0, correlation id, client id, [group]
    let mut request = Vec::new();
    request.extend(15i16.to_be_bytes());
    request.extend(0i16.to_be_bytes());
    request.extend(1i32.to_be_bytes());
    string(&mut request, "scale-out-test");
    request.extend(1i32.to_be_bytes());
    string(&mut request, group);
    let mut stream = tokio::net::TcpStream::connect(bootstrap).await?;
    stream
        .write_all(&(request.len() as i32).to_be_bytes())
        .await?;
    stream.write_all(&request).await?;
    let len = usize::try_from(stream.read_i32().await?).map_err(|_| bad("length"))?;
    let mut response = vec![0; len];
    stream.read_exact(&mut response).await?;
    // correlation id, [groups]: error code, group id, state, protocol type, protocol
    // data, [members]
    let mut at = 4;
    let mut take = |n: usize| -> std::io::Result<&[u8]> {
        let bytes = response.get(at..at + n).ok_or_else(|| bad("short"))?;
        at += n;
        Ok(bytes)
    };
    let groups = i32::from_be_bytes(take(4)?.try_into().expect("4 bytes"));
    let error = i16::from_be_bytes(take(2)?.try_into().expect("2 bytes"));
    if groups != 1 || error != 0 {
        return Err(bad("no such group"));
    }
    for _ in 0..4 {
        let n = i16::from_be_bytes(take(2)?.try_into().expect("2 bytes"));
        take(usize::try_from(n).unwrap_or(0))?;
    }
    let members = i32::from_be_bytes(take(4)?.try_into().expect("4 bytes"));
    usize::try_from(members).map_err(|_| bad("members"))
}

/// What a settle process's `/metrics` says: orders it persisted, partitions it reads.
#[derive(Debug, Default)]
struct SettlerView {
    persisted: u64,
    partitions: BTreeSet<u32>,
}

async fn settler_view(client: &reqwest::Client, metrics_url: &str) -> Option<SettlerView> {
    let text = client
        .get(metrics_url)
        .send()
        .await
        .ok()?
        .text()
        .await
        .ok()?;
    let mut view = SettlerView::default();
    for line in text.lines() {
        if let Some(n) = line.strip_prefix("flashsale_settler_orders_total{event=\"persisted\"} ") {
            view.persisted = n.trim().parse::<f64>().ok()? as u64;
        } else if let Some(rest) = line.strip_prefix("flashsale_settler_lag_records{partition=\"") {
            view.partitions
                .insert(rest.split('"').next()?.parse().ok()?);
        }
    }
    Some(view)
}

/// Every server, the three ingests and the three settlers. Fields drop in order: the
/// processes go before the servers they use.
struct Cluster {
    serves: Vec<Proc>,
    settlers: Vec<Option<Proc>>,
    mock: MockProvider,
    store: Arc<dyn OrderStore>,
    _broker: testkit::TansuBroker,
    redis: testkit::RedisCluster,
    _pg: testkit::PostgresCluster,
    config: Config,
    client: reqwest::Client,
    /// One data directory per process (and per reconcile run).
    dirs: Vec<tempfile::TempDir>,
}

impl Cluster {
    async fn start(mock: MockConfig) -> Cluster {
        // The servers start at once, each on a blocking thread of its own.
        let pg = tokio::task::spawn_blocking(|| testkit::PostgresCluster::start(2));
        let redis = tokio::task::spawn_blocking(|| testkit::RedisCluster::start(3));
        let broker = tokio::task::spawn_blocking(testkit::TansuBroker::start);
        let mock = MockProvider::start(mock).await.expect("mock provider");
        let (pg, redis, broker) = (
            pg.await.expect("postgres"),
            redis.await.expect("redis cluster"),
            broker.await.expect("tansu"),
        );
        let dir = tempfile::tempdir().expect("tempdir");
        let mut config = Config {
            data_dir: dir.path().to_path_buf(),
            ..Config::default()
        };
        config.admission.url = redis.url();
        config.admission.decision_timeout = Duration::from_secs(2);
        config.log.url = format!("kafka://{}", broker.bootstrap());
        config.log.partitions = PARTITIONS;
        config.store.url = pg.shard_urls().join(",");
        config.store.catalog_url = pg.catalog_url();
        config.providers.payment_url = mock.url();
        config.providers.notification_url = mock.url();
        config.settler.enabled = false;
        config.receipts.enabled = false;
        sequencer::kafka::create_topics(&config.log.kafka().expect("kafka"))
            .await
            .expect("topics");
        let migrated = flashsale::app::migrate_store(&config)
            .await
            .expect("migrate");
        assert!(migrated.contains("2 shard(s)"), "{migrated}");
        let store = flashsale::app::open_store(&config).await.expect("store");
        let mut c = Cluster {
            _pg: pg,
            redis,
            _broker: broker,
            mock,
            config,
            store,
            client: reqwest::Client::builder()
                .timeout(Duration::from_secs(30))
                .pool_max_idle_per_host(CLIENTS * 2)
                .build()
                .expect("client"),
            serves: Vec::new(),
            settlers: Vec::new(),
            dirs: vec![dir],
        };
        for _ in 0..SERVES {
            let mut env = c.env();
            env.push(("FLASHSALE_SETTLER__ENABLED", "false".into()));
            c.serves
                .push(Proc::spawn(&["serve", "--listen", "127.0.0.1:0"], &env));
        }
        for i in 0..SETTLERS {
            c.settlers.push(None);
            c.start_settler(i);
        }
        c
    }

    /// The configuration as environment variables of a child process, with a data
    /// directory of its own. Receipts are off in every process (and in reconcile): by
    /// default they go to a local archive under `data_dir`, which here is a different
    /// directory per process, so no process would see the others' receipts; receipts are
    /// tested in `tests/postgres.rs` and `tests/receipts.rs`.
    fn env(&mut self) -> Vec<(&'static str, String)> {
        let dir = tempfile::tempdir().expect("tempdir");
        let data = dir.path().display().to_string();
        self.dirs.push(dir);
        let c = &self.config;
        vec![
            ("FLASHSALE_ADMISSION__URL", c.admission.url.clone()),
            ("FLASHSALE_ADMISSION__DECISION_TIMEOUT", "2s".into()),
            ("FLASHSALE_LOG__URL", c.log.url.clone()),
            ("FLASHSALE_LOG__PARTITIONS", PARTITIONS.to_string()),
            ("FLASHSALE_STORE__URL", c.store.url.clone()),
            ("FLASHSALE_STORE__CATALOG_URL", c.store.catalog_url.clone()),
            ("FLASHSALE_PROVIDERS__PAYMENT_URL", self.mock.url()),
            ("FLASHSALE_PROVIDERS__NOTIFICATION_URL", self.mock.url()),
            ("FLASHSALE_DATA_DIR", data),
            ("FLASHSALE_RECEIPTS__ENABLED", "false".into()),
            // Three settlers on one host: each its own metrics port.
            ("FLASHSALE_METRICS__SETTLE_LISTEN", "127.0.0.1:0".into()),
        ]
    }

    fn start_settler(&mut self, i: usize) {
        let mut env = self.env();
        // The in-process mock serves at most 1,024 connections at once. At the default
        // (256 charges at once) the settlers held more than that (1,154 were seen open),
        // and a new connection (the test's audit read) waited for an idle one to time out.
        env.push(("FLASHSALE_SETTLER__CHARGE_CONCURRENCY", "64".into()));
        self.settlers[i] = Some(Proc::spawn(&["settle"], &env));
    }

    fn kill_settler(&mut self, i: usize) {
        self.settlers[i].take().expect("running").kill();
    }

    /// How many members the broker counts in the settlers' consumer group (`None` when it
    /// does not say).
    async fn group_members(&self) -> Option<usize> {
        let bootstrap = self.config.log.url.trim_start_matches("kafka://");
        tokio::time::timeout(
            Duration::from_secs(5),
            group_members(bootstrap, &self.config.settler.consumer),
        )
        .await
        .ok()?
        .ok()
    }

    fn serve_urls(&self) -> Vec<String> {
        self.serves.iter().map(|p| p.url.clone()).collect()
    }

    /// What every running settler's metrics say, by settler; `None` for one not running
    /// or not answering.
    async fn settler_views(&self) -> Vec<Option<SettlerView>> {
        let mut views = Vec::new();
        for s in &self.settlers {
            views.push(match s {
                Some(p) => settler_view(&self.client, &p.url).await,
                None => None,
            });
        }
        views
    }

    async fn create_sale(&self) {
        let a = self
            .client
            .post(format!("{}/v1/sales", self.serves[0].url))
            .bearer_auth(OPERATOR)
            .json(&json!({
                "id": SALE, "sku": "s", "stock": STOCK, "price_cents": 700, "currency": "EUR",
                "per_user_limit": PER_USER, "max_quantity_per_order": 1,
                "user_rate": {"per_second": 100000, "burst": 100000}
            }))
            .send()
            .await
            .expect("create");
        assert_eq!(a.status().as_u16(), 201);
    }

    fn tokens(&self) -> Vec<String> {
        let auth = self.config.auth.to_auth_config().expect("auth");
        (0..USERS)
            .map(|u| {
                ingest::auth::issue_token(&auth, &format!("u{u}"), Duration::from_secs(3600))
                    .expect("token")
            })
            .collect()
    }

    async fn orders(&self) -> Vec<Order> {
        self.store
            .orders_of_sale(&SaleId::parse(SALE).expect("id"))
            .await
            .expect("orders")
    }

    /// The ids of the sale's orders in the store (none while it does not answer).
    async fn stored_ids(&self) -> HashSet<String> {
        self.store
            .orders_of_sale(&SaleId::parse(SALE).expect("id"))
            .await
            .map(|orders| orders.iter().map(|o| o.new.order_id.to_string()).collect())
            .unwrap_or_default()
    }

    async fn stats(&self) -> Value {
        self.client
            .get(format!("{}/v1/sales/{SALE}/stats", self.serves[1].url))
            .bearer_auth(OPERATOR)
            .send()
            .await
            .expect("stats")
            .json()
            .await
            .expect("json")
    }

    /// `flashsale reconcile --sale SALE` (with the provider's audit when `audit`): whether
    /// it exited 0, and what it printed.
    async fn reconcile(&mut self, audit: bool) -> (bool, String) {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_flashsale"));
        cmd.args(["reconcile", "--sale", SALE]);
        if audit {
            cmd.args(["--payment-url", &self.mock.url()]);
        }
        cmd.env_remove("FLASHSALE_CONFIG").envs(self.env());
        let out = tokio::task::spawn_blocking(move || cmd.output().expect("reconcile"))
            .await
            .expect("join");
        (
            out.status.success(),
            format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ),
        )
    }

    /// Runs reconcile until its report says `want` (and it exits 0), within `deadline`.
    async fn reconcile_until(&mut self, audit: bool, want: &[&str], deadline: Duration) -> String {
        let end = Instant::now() + deadline;
        loop {
            let (ok, text) = self.reconcile(audit).await;
            if ok && want.iter().any(|w| text.contains(w)) {
                return text;
            }
            // Shown with the test's output: why a run had to be repeated.
            eprintln!("reconcile, not yet {want:?}:\n{text}");
            assert!(
                Instant::now() < end,
                "reconcile did not report {want:?} within {deadline:?}; last report:\n{text}"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_ingests_and_three_settlers_survive_a_settler_and_a_redis_primary_lost_mid_sale() {
    let began = Instant::now();
    // When each step was reached, printed at the end (a slow run shows where it was slow).
    let mut marks: Vec<(&str, Duration)> = Vec::new();
    let mut c = Cluster::start(MockConfig {
        latency: Duration::from_millis(2),
        // Declines give units back mid-sale: they sell again, and reconcile rebuilds them.
        decline_rate: 0.05,
        seed: Some(11),
        ..MockConfig::default()
    })
    .await;
    let all: BTreeSet<u32> = (0..PARTITIONS).collect();

    // The three settlers share the orders topic's partitions before the sale begins.
    eventually(
        "the three settlers split the partitions",
        Duration::from_secs(60),
        || async {
            let views = c.settler_views().await;
            let mut seen = BTreeSet::new();
            let mut total = 0;
            for v in &views {
                let Some(v) = v else { return false };
                if v.partitions.is_empty() {
                    return false;
                }
                total += v.partitions.len();
                seen.extend(&v.partitions);
            }
            seen == all && total == all.len() && c.group_members().await == Some(SETTLERS)
        },
    )
    .await;

    marks.push(("settlers split the partitions", began.elapsed()));
    c.create_sale().await;
    let node = c.redis.node_of(&format!("fs:{{{SALE}}}:sale"));
    // The first orders, while every settler reads its share of the log.
    let load = Load::start(&c.client, &c.serve_urls(), c.tokens(), 500);
    eventually(
        "every settler persists orders of its own",
        Duration::from_secs(60),
        || async {
            load.answered() >= 500
                && c.settler_views()
                    .await
                    .iter()
                    .all(|v| v.as_ref().is_some_and(|v| v.persisted > 0))
        },
    )
    .await;

    // Mid-sale, one settler is SIGKILLed; the sale goes on without it.
    load.allow(1_000);
    c.kill_settler(0);
    marks.push(("settler 0 killed", began.elapsed()));
    eventually(
        "the sale sells on without settler 0",
        Duration::from_secs(60),
        || async { load.answered() >= 1_000 },
    )
    .await;

    // Then the Redis primary owning the sale's slot dies, under load.
    load.allow(usize::MAX);
    tokio::task::block_in_place(|| c.redis.kill(node));
    load.enter(NODE_DOWN);
    marks.push(("Redis node killed", began.elapsed()));
    eventually(
        "every ingest answers 503 while the sale's node is down",
        Duration::from_secs(30),
        || async {
            (0..SERVES).all(|i| {
                load.count(|a| a.started == NODE_DOWN && a.ingest == i && a.status == 503) > 0
            })
        },
    )
    .await;

    // Back, empty: the sale answers 503 (its keys are missing, or the ingest's cluster
    // client is still reconnecting: the answer is the same), never full stock.
    tokio::task::block_in_place(|| c.redis.restart(node));
    load.enter(NODE_EMPTY);
    marks.push(("Redis node back, empty", began.elapsed()));
    eventually(
        "every ingest answers 503 for the sale whose keys are missing",
        Duration::from_secs(30),
        || async {
            (0..SERVES).all(|i| {
                load.count(|a| {
                    a.started == NODE_EMPTY
                        && a.ingest == i
                        && a.status == 503
                        && a.code == "unavailable"
                }) > 0
            })
        },
    )
    .await;

    // Every order admitted before the node died has its answer.
    eventually(
        "the answers of requests sent before the restart",
        Duration::from_secs(30),
        || async { load.under_way_before(NODE_EMPTY) == 0 },
    )
    .await;
    let acked_before = load.accepted_ids();

    // Reconcile refuses to rebuild from a store that lacks accepted orders. tansu 0.6.0
    // does not hand a SIGKILLed member's partitions to the members left (they keep their
    // own after the rebalance its session timeout causes), so settler 0's partitions are
    // unread until a member joins: whatever accepted order the store still lacks once
    // reconcile has run, reconcile ran without it and must have refused.
    let (ok, report) = c.reconcile(false).await;
    let refused = !acked_before.is_subset(&c.stored_ids().await);
    if refused {
        assert!(
            !ok && report.contains("not repaired") && report.contains("has not persisted"),
            "reconcile repaired from a store without every accepted order:\n{report}"
        );
    }

    // Settler 0 comes back once the broker has dropped its dead member from the group: a
    // member joining before that gets tansu 0.6.0 to hand partitions to the dead member
    // (they stay unread). Then the settlers persist every accepted order (waited for in
    // the store: tansu's end offsets can trail what a fetch returns, so reconcile's own lag
    // check is not enough; see ARCHITECTURE.md "Kafka log").
    eventually(
        "the broker drops the killed settler from the group",
        Duration::from_secs(60),
        || async { c.group_members().await == Some(SETTLERS - 1) },
    )
    .await;
    marks.push(("killed settler out of the group", began.elapsed()));
    c.start_settler(0);
    marks.push(("settler 0 restarted", began.elapsed()));
    let persisted = testkit::wait_until(Duration::from_secs(60), || async {
        acked_before.is_subset(&c.stored_ids().await)
    })
    .await;
    if !persisted {
        let stored = c.stored_ids().await;
        panic!(
            "{} of {} orders accepted before the outage are not persisted after 60 s; \
             the settlers say {:?}",
            acked_before.difference(&stored).count(),
            acked_before.len(),
            c.settler_views().await
        );
    }
    marks.push(("every accepted order persisted", began.elapsed()));
    // Once they caught up, reconcile rebuilds the missing keys from the store.
    load.enter(REPAIRING);
    let report = c
        .reconcile_until(false, &["repaired", "consistent"], Duration::from_secs(60))
        .await;
    load.enter(RESUMED);
    marks.push(("reconcile repaired", began.elapsed()));
    assert!(report.contains("repaired: Redis now holds"), "{report}");

    // Nothing was accepted while the node was down or empty.
    let during = load.count(|a| a.started >= NODE_DOWN && a.ended <= NODE_EMPTY && a.status == 202);
    assert_eq!(during, 0, "orders accepted while the sale's keys were gone");

    // Selling resumes on every ingest, until the sale sells out.
    let sells = testkit::wait_until(Duration::from_secs(30), || async {
        (0..SERVES)
            .all(|i| load.count(|a| a.started == RESUMED && a.ingest == i && a.status == 202) > 0)
    })
    .await;
    assert!(
        sells,
        "not every ingest sells again within 30 s of the repair; answers since, by ingest, \
         status, code and detail: {:?}; stats: {}",
        load.tally(RESUMED),
        c.stats().await
    );
    eventually("the sale sells out", Duration::from_secs(60), || async {
        load.count(|a| a.started == RESUMED && a.code == "sold_out") >= CLIENTS
    })
    .await;
    let answers = load.stop().await;
    marks.push(("sold out", began.elapsed()));

    // Every answer is an acceptance or a refusal; 503 only while the sale's keys were gone.
    let mut unavailable = [0usize; SERVES];
    for a in &answers {
        match (a.status, a.code.as_str()) {
            (202, _) | (409, "sold_out") | (403, "limit_exceeded") => {}
            (503, _) if a.ended >= NODE_DOWN && a.started <= REPAIRING => {
                unavailable[a.ingest] += 1
            }
            _ => panic!("unexpected answer {a:?}"),
        }
    }
    assert!(
        unavailable.iter().all(|n| *n > 0),
        "503s while the node was down or empty, by ingest: {unavailable:?}"
    );
    let acked = accepted_ids(&answers);
    assert_eq!(
        acked.len(),
        answers.iter().filter(|a| a.status == 202).count(),
        "no order id answered twice"
    );

    // Everything settles: persisted, final, notified, released where the stock went back.
    eventually(
        "every accepted order settled",
        Duration::from_secs(90),
        || async {
            let Ok(orders) = c
                .store
                .orders_of_sale(&SaleId::parse(SALE).expect("id"))
                .await
            else {
                return false;
            };
            orders.len() >= acked.len()
                && orders.iter().all(|o| {
                    o.status.is_final()
                        && o.notified_at.is_some()
                        && (!o.status.releases_stock() || o.released_at.is_some())
                })
        },
    )
    .await;

    marks.push(("every order settled", began.elapsed()));

    // Persisted exactly once, exactly the accepted orders.
    let orders = c.orders().await;
    let stored: HashSet<String> = orders.iter().map(|o| o.new.order_id.to_string()).collect();
    assert_eq!(stored.len(), orders.len(), "no order persisted twice");
    assert_eq!(stored, acked, "persisted == accepted");

    // One successful charge per paid order, none kept for a released one, one notification
    // per order.
    let audit: Audit = mock_provider::fetch_audit(&c.mock.url())
        .await
        .expect("audit");
    let mut by_status: HashMap<OrderStatus, u64> = HashMap::new();
    let mut released_units = 0;
    for o in &orders {
        *by_status.entry(o.status).or_default() += u64::from(o.new.quantity);
        let a = audit
            .orders
            .get(&o.new.order_id.to_string())
            .cloned()
            .unwrap_or_default();
        match o.status {
            OrderStatus::Paid => assert_eq!(
                (a.successful_charges, a.refunds),
                (1, 0),
                "one successful charge for paid order {}",
                o.new.order_id
            ),
            _ => assert!(
                a.successful_charges <= a.refunds,
                "no charge kept for released order {} ({})",
                o.new.order_id,
                o.status
            ),
        }
        assert_eq!(
            a.notifications.len(),
            1,
            "one notification for order {}",
            o.new.order_id
        );
        if o.status.releases_stock() {
            released_units += u64::from(o.new.quantity);
        }
    }
    let paid = by_status.get(&OrderStatus::Paid).copied().unwrap_or(0);
    assert!(paid <= STOCK, "oversold: {paid} units paid of {STOCK}");
    assert!(
        by_status
            .get(&OrderStatus::PaymentFailed)
            .copied()
            .unwrap_or(0)
            > 0,
        "declines happened and were released: {by_status:?}"
    );
    let stats = c.stats().await;
    assert_eq!(
        stats["accepted"].as_u64(),
        Some(acked.len() as u64),
        "accepted in Redis == accepted by the buyers: {stats}"
    );
    assert_eq!(stats["released_units"].as_u64(), Some(released_units));
    assert_eq!(
        stats["stock_left"].as_u64(),
        Some(STOCK - paid),
        "conservation: left = stock - paid once everything settled: {stats}"
    );

    // Reconcile agrees (the settlers' checkpoints reach the log's end on their own time).
    let report = c
        .reconcile_until(true, &["consistent"], Duration::from_secs(60))
        .await;
    assert!(!report.contains("pending"), "{report}");
    marks.push(("reconcile consistent", began.elapsed()));
    eprintln!(
        "scale_out: {} accepted, {paid} paid, {released_units} released, {} answers, \
         503s by ingest {unavailable:?}, reconcile refused while behind: {refused}; {marks:.1?}",
        acked.len(),
        answers.len(),
    );
}
