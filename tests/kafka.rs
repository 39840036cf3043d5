//! The Kafka log end to end, against a real tansu broker and redis-server: orders answered
//! 202 by ingest are in the orders topic exactly once, spread over every partition, and the
//! settler consumes them back into the store.
#![cfg(feature = "kafka")]

mod common;

const PARTITIONS: u32 = 6;

use common::TestApp;
use sequencer::kafka::{KafkaConfig, KafkaConsumer};
use sequencer::LogConsumer;
use serde_json::json;
use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use testkit::eventually;

fn migrate(log_url: &str, data: &std::path::Path) -> String {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_flashsale"))
        .args([
            "migrate",
            "--log",
            log_url,
            "--data-dir",
            &data.display().to_string(),
        ])
        .env_remove("FLASHSALE_CONFIG")
        .env("FLASHSALE_LOG__PARTITIONS", PARTITIONS.to_string())
        .output()
        .expect("migrate");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_acknowledged_order_is_in_the_topic_once_and_settles() {
    const ORDERS: usize = 20_000;
    let broker = testkit::TansuBroker::start();
    let redis = testkit::RedisServer::start();
    let log_url = format!("kafka://{}", broker.bootstrap());

    // A missing topic is a clear error at start-up, not a hang.
    let dir = tempfile::tempdir().expect("tempdir");
    let mut config = flashsale::config::Config {
        data_dir: dir.path().to_path_buf(),
        ..Default::default()
    };
    config.admission.url = redis.url();
    config.log.url = log_url.clone();
    config.log.partitions = PARTITIONS;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let err = flashsale::app::App::start(&config, listener)
        .await
        .expect_err("no topics yet");
    assert!(format!("{err:#}").contains("flashsale migrate"), "{err:#}");

    let out = migrate(&log_url, dir.path());
    assert!(out.contains("flashsale.orders.v1: created"), "{out}");
    assert!(migrate(&log_url, dir.path()).contains("flashsale.orders.v1: exists"));

    let app = Arc::new(
        TestApp::start_with(|c| {
            c.admission.url = redis.url();
            c.log.url = log_url.clone();
            c.log.partitions = PARTITIONS;
        })
        .await,
    );
    let a = app
        .create_sale(json!({
            "id": "kafka", "sku": "s", "stock": 1000000, "price_cents": 100, "currency": "EUR",
            "per_user_limit": 1000, "max_quantity_per_order": 1,
            "user_rate": {"per_second": 100000, "burst": 100000}
        }))
        .await;
    assert_eq!(a.status, 201, "{}", a.body);
    let tokens: Arc<Vec<String>> =
        Arc::new((0..100).map(|u| app.token(&format!("k{u}"))).collect());
    let next = Arc::new(AtomicUsize::new(0));
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..64 {
        let (app, tokens, next) = (Arc::clone(&app), Arc::clone(&tokens), Arc::clone(&next));
        tasks.spawn(async move {
            let mut ids = Vec::new();
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= ORDERS {
                    break;
                }
                let a = app
                    .order("kafka", &tokens[i % tokens.len()], &format!("o{i}"), 1)
                    .await;
                assert_eq!(a.status, 202, "{}", a.body);
                ids.push(a.body["order_id"].as_str().expect("id").to_owned());
            }
            ids
        });
    }
    let mut acked: HashSet<String> = HashSet::new();
    while let Some(r) = tasks.join_next().await {
        acked.extend(r.expect("client"));
    }
    assert_eq!(acked.len(), ORDERS);

    // Read the topic with a group of our own: every acknowledged order exactly once.
    let kafka = KafkaConfig {
        bootstrap: broker.bootstrap(),
        ..KafkaConfig::default()
    };
    let mut reader = KafkaConsumer::new(&kafka, "test-reader").expect("consumer");
    let mut seen: HashMap<String, u32> = HashMap::new();
    let mut partitions = HashSet::new();
    let deadline = Instant::now() + Duration::from_secs(120);
    while seen.len() < ORDERS {
        assert!(Instant::now() < deadline, "read {} of {ORDERS}", seen.len());
        for e in reader
            .poll(1000, Duration::from_millis(500))
            .await
            .expect("poll")
        {
            let r = sequencer::decode(&e.payload).expect("decodes");
            partitions.insert(e.position.partition);
            *seen.entry(r.order_id.to_string()).or_default() += 1;
        }
    }
    assert_eq!(
        partitions.len() as u32,
        PARTITIONS,
        "spread over every partition"
    );
    assert!(seen.values().all(|n| *n == 1), "no record twice");
    assert_eq!(seen.keys().cloned().collect::<HashSet<_>>(), acked);

    // The settler consumed them back: everything persisted and paid.
    eventually(
        "every order persisted and paid",
        Duration::from_secs(120),
        || {
            let app = Arc::clone(&app);
            async move {
                let s = app.stats("kafka").await;
                s["persisted"] == ORDERS && s["paid"] == ORDERS
            }
        },
    )
    .await;
}

/// Starts the binary and returns it with the first line it printed.
fn spawn(args: &[&str], env: &[(&str, String)]) -> (std::process::Child, String) {
    use std::io::BufRead;
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_flashsale"));
    cmd.args(args)
        .env_remove("FLASHSALE_CONFIG")
        .env("RUST_LOG", "warn")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::inherit());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().expect("spawn flashsale");
    let mut line = String::new();
    std::io::BufReader::new(child.stdout.take().expect("stdout"))
        .read_line(&mut line)
        .expect("read");
    (child, line)
}

struct Guard(std::process::Child);

impl Drop for Guard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_and_settle_run_as_separate_processes() {
    let broker = testkit::TansuBroker::start();
    let redis = testkit::RedisServer::start();
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().display().to_string();
    let log_url = format!("kafka://{}", broker.bootstrap());
    migrate(&log_url, dir.path());
    let (provider, line) = spawn(&["mock-provider", "--listen", "127.0.0.1:0"], &[]);
    let _provider = Guard(provider);
    let provider_url = line
        .split_whitespace()
        .find(|w| w.starts_with("http://"))
        .expect("url")
        .to_owned();
    let env = vec![
        ("FLASHSALE_ADMISSION__URL", redis.url()),
        ("FLASHSALE_LOG__URL", log_url.clone()),
        ("FLASHSALE_DATA_DIR", data.clone()),
        ("FLASHSALE_PROVIDERS__PAYMENT_URL", provider_url.clone()),
        (
            "FLASHSALE_PROVIDERS__NOTIFICATION_URL",
            provider_url.clone(),
        ),
    ];
    let mut serve_env = env.clone();
    serve_env.push(("FLASHSALE_SETTLER__ENABLED", "false".into()));
    let (server, line) = spawn(&["serve", "--listen", "127.0.0.1:0"], &serve_env);
    let _server = Guard(server);
    let url = line
        .split_whitespace()
        .find(|w| w.starts_with("http://"))
        .expect("url")
        .to_owned();

    let client = reqwest::Client::new();
    let operator = "flashsale-dev-operator-token";
    let created = client
        .post(format!("{url}/v1/sales"))
        .bearer_auth(operator)
        .json(
            &json!({"id": "split", "sku": "s", "stock": 1000, "price_cents": 100, "currency": "EUR",
                      "per_user_limit": 10, "max_quantity_per_order": 1,
                      "user_rate": {"per_second": 1000, "burst": 1000}}),
        )
        .send()
        .await
        .expect("create");
    assert_eq!(created.status().as_u16(), 201);
    let auth = flashsale::config::Config::default()
        .auth
        .to_auth_config()
        .expect("auth");
    let mut acked = Vec::new();
    for i in 0..200 {
        let token =
            ingest::auth::issue_token(&auth, &format!("s{}", i % 40), Duration::from_secs(600))
                .expect("token");
        let resp = client
            .post(format!("{url}/v1/sales/split/orders"))
            .bearer_auth(&token)
            .header("idempotency-key", format!("s{i}"))
            .json(&json!({"quantity": 1, "payment_token": "tok_visa"}))
            .send()
            .await
            .expect("order");
        assert_eq!(resp.status().as_u16(), 202);
        acked.push(resp.json::<serde_json::Value>().await.expect("json")["order_id"].clone());
    }
    let stats = |client: reqwest::Client, url: String| async move {
        client
            .get(format!("{url}/v1/sales/split/stats"))
            .bearer_auth(operator)
            .send()
            .await
            .expect("stats")
            .json::<serde_json::Value>()
            .await
            .expect("json")
    };
    // Nothing settles without the settler process.
    assert_eq!(stats(client.clone(), url.clone()).await["persisted"], 0);
    let (settler, _) = spawn(&["settle"], &env);
    let _settler = Guard(settler);
    eventually(
        "the settler process settles every order",
        Duration::from_secs(120),
        || {
            let (client, url) = (client.clone(), url.clone());
            async move {
                let s = stats(client, url).await;
                s["persisted"] == 200 && s["paid"] == 200
            }
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_poison_record_goes_to_the_dead_letter_topic_and_the_partition_moves_on() {
    let broker = testkit::TansuBroker::start();
    let redis = testkit::RedisServer::start();
    let log_url = format!("kafka://{}", broker.bootstrap());
    let kafka = KafkaConfig {
        bootstrap: broker.bootstrap(),
        partitions: 1,
        ..KafkaConfig::default()
    };
    sequencer::kafka::create_topics(&kafka)
        .await
        .expect("topics");
    let app = TestApp::start_with(|c| {
        c.admission.url = redis.url();
        c.log.url = log_url.clone();
    })
    .await;
    let sale = app.sale("poisoned", 100, 10).await;
    let producer = sequencer::kafka::KafkaLog::new(&kafka).expect("producer");
    producer
        .send(&kafka.orders_topic(), "poison", b"{not an order")
        .await
        .expect("send poison");
    for i in 0..5 {
        assert_eq!(
            app.order(&sale, &app.token("p"), &format!("p{i}"), 1)
                .await
                .status,
            202
        );
    }
    eventually(
        "orders after the poison settle",
        Duration::from_secs(60),
        || {
            let s = app.stats(&sale);
            async move { s.await["paid"] == 5 }
        },
    )
    .await;
    let mut dlq = KafkaConsumer::for_topic(&kafka, "dlq-reader", &kafka.dlq_topic()).expect("dlq");
    let deadline = Instant::now() + Duration::from_secs(60);
    let poison = loop {
        assert!(
            Instant::now() < deadline,
            "nothing in the dead-letter topic"
        );
        if let Some(e) = dlq
            .poll(10, Duration::from_millis(500))
            .await
            .expect("poll")
            .pop()
        {
            break e;
        }
    };
    assert_eq!(&poison.payload[..], b"{not an order");
    app.stop().await;
}

/// tansu 0.6.0 answers a fetch at an offset inside a record batch with the batches after
/// it only, so a group member resuming from a commit inside a partition's last batch read
/// nothing more of it (the settler left acknowledged orders unsettled after a rebalance or
/// restart). The consumer resumes before the commit and drops what was already returned.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_resuming_inside_a_batch_reads_the_rest_of_the_partition_once() {
    const RECORDS: usize = 20;
    const FIRST: usize = 7;
    let broker = testkit::TansuBroker::start();
    let kafka = KafkaConfig {
        bootstrap: broker.bootstrap(),
        topic_prefix: "resume.".into(),
        partitions: 1,
        // Concurrent sends within the linger go out as one batch: offsets 0..20.
        linger: Duration::from_millis(200),
        ..KafkaConfig::default()
    };
    sequencer::kafka::create_topics(&kafka)
        .await
        .expect("topics");
    let log = Arc::new(sequencer::kafka::KafkaLog::new(&kafka).expect("producer"));
    let topic = kafka.orders_topic();
    let mut sends = tokio::task::JoinSet::new();
    for i in 0..RECORDS {
        let (log, topic) = (Arc::clone(&log), topic.clone());
        sends.spawn(async move {
            log.send(&topic, &format!("k{i}"), format!("r{i}").as_bytes())
                .await
                .expect("send")
                .offset
        });
    }
    let mut acked = Vec::new();
    while let Some(o) = sends.join_next().await {
        acked.push(o.expect("sender"));
    }
    acked.sort_unstable();
    assert_eq!(acked, (0..RECORDS as u64).collect::<Vec<_>>());

    // A first member returns and commits the first records, then goes away.
    {
        let mut first = KafkaConsumer::new(&kafka, "resume").expect("consumer");
        let mut read = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(30);
        while read.len() < FIRST {
            assert!(Instant::now() < deadline, "the first member read {read:?}");
            let batch = first
                .poll(FIRST - read.len(), Duration::from_millis(200))
                .await
                .expect("poll");
            let positions: Vec<_> = batch.iter().map(|e| e.position).collect();
            if !positions.is_empty() {
                first.commit(&positions).await.expect("commit");
            }
            read.extend(positions.iter().map(|p| p.offset));
        }
        assert_eq!(read, (0..FIRST as u64).collect::<Vec<_>>());
    }

    // The next member returns exactly the rest, within a bound.
    let mut second = KafkaConsumer::new(&kafka, "resume").expect("consumer");
    let want: Vec<u64> = (FIRST as u64..RECORDS as u64).collect();
    let mut read = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(15);
    while read.len() < want.len() && Instant::now() < deadline {
        let batch = second
            .poll(100, Duration::from_millis(200))
            .await
            .expect("poll");
        read.extend(batch.iter().map(|e| e.position.offset));
    }
    assert_eq!(
        read, want,
        "resumed at the commit and read the rest of the batch, once"
    );
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Outage {
    /// SIGSTOP, then SIGCONT: the broker hangs and comes back with its state.
    Hang,
    /// SIGKILL, then a restart on its durable (SQLite) storage.
    Crash,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_hung_mid_burst_gives_503_and_leaks_no_stock() {
    broker_down_mid_burst(Outage::Hang).await;
}

/// tansu 0.6.0 on SQLite panics when an idempotent producer goes on after a restart (and
/// then refuses every produce): this passes because the producer is replaced, with a new
/// producer id, once a broker connection failed after it had delivered records.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_crashed_mid_burst_gives_503_and_leaks_no_stock() {
    broker_down_mid_burst(Outage::Crash).await;
}

async fn broker_down_mid_burst(outage: Outage) {
    const STOCK: i64 = 100_000;
    let mut broker = match outage {
        Outage::Hang => testkit::TansuBroker::start(),
        Outage::Crash => testkit::TansuBroker::start_durable(),
    };
    let redis = testkit::RedisServer::start();
    let log_url = format!("kafka://{}", broker.bootstrap());
    let kafka = KafkaConfig {
        bootstrap: broker.bootstrap(),
        partitions: 3,
        ..KafkaConfig::default()
    };
    sequencer::kafka::create_topics(&kafka)
        .await
        .expect("topics");
    let app = Arc::new(
        TestApp::start_with(|c| {
            c.admission.url = redis.url();
            c.log.url = log_url.clone();
            c.log.delivery_timeout = Duration::from_secs(1);
        })
        .await,
    );
    let a = app
        .create_sale(json!({
            "id": "down", "sku": "s", "stock": STOCK, "price_cents": 100, "currency": "EUR",
            "per_user_limit": 1000, "max_quantity_per_order": 1,
            "user_rate": {"per_second": 100000, "burst": 100000}
        }))
        .await;
    assert_eq!(a.status, 201, "{}", a.body);
    let answers = Arc::new(parking_lot::Mutex::new(Vec::<(
        u16,
        Duration,
        Option<String>,
    )>::new()));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let next = Arc::new(AtomicUsize::new(0));
    let tokens: Arc<Vec<String>> =
        Arc::new((0..100).map(|u| app.token(&format!("d{u}"))).collect());
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..16 {
        let (app, answers, stop, next, tokens) = (
            Arc::clone(&app),
            Arc::clone(&answers),
            Arc::clone(&stop),
            Arc::clone(&next),
            Arc::clone(&tokens),
        );
        tasks.spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let started = Instant::now();
                let a = app
                    .order("down", &tokens[i % 100], &format!("d{i}"), 1)
                    .await;
                assert!(matches!(a.status, 202 | 503), "{} {}", a.status, a.body);
                let id = a.body["order_id"].as_str().map(str::to_owned);
                answers.lock().push((a.status, started.elapsed(), id));
            }
        });
    }
    let count = |status: u16| answers.lock().iter().filter(|a| a.0 == status).count();
    eventually("200 orders accepted", Duration::from_secs(60), || {
        let n = count(202);
        async move { n >= 200 }
    })
    .await;
    match outage {
        Outage::Hang => broker.pause(),
        Outage::Crash => broker.kill(),
    }
    eventually(
        "buyers get 503 while the broker is down",
        Duration::from_secs(30),
        || {
            let n = count(503);
            async move { n >= 20 }
        },
    )
    .await;
    match outage {
        Outage::Hang => broker.resume(),
        Outage::Crash => broker.restart(),
    }
    let before = count(202);
    eventually(
        "selling resumes after the broker returns",
        Duration::from_secs(60),
        || {
            let n = count(202);
            async move { n >= before + 100 }
        },
    )
    .await;
    stop.store(true, Ordering::Relaxed);
    while let Some(r) = tasks.join_next().await {
        r.expect("client");
    }
    let answers = answers.lock().clone();
    for (status, took, _) in &answers {
        if *status == 503 {
            assert!(*took < Duration::from_secs(4), "a 503 took {took:?}");
        }
    }
    let acked: HashSet<String> = answers.iter().filter_map(|a| a.2.clone()).collect();

    // Every 202 order settles; an order whose produce failed is either absent or cancelled.
    let sale = storage::SaleId::parse("down").expect("id");
    let store = Arc::clone(&app.running().store);
    wait_paid(&store, &sale, &acked, true).await;
    let orders = store.orders_of_sale(&sale).await.expect("orders");
    for o in &orders {
        let id = o.new.order_id.to_string();
        if o.status == storage::OrderStatus::Paid {
            assert!(
                acked.contains(&id),
                "order {id} was charged but its buyer got 503"
            );
        } else {
            assert_eq!(o.status, storage::OrderStatus::Expired, "order {id}");
            assert!(o.released_at.is_some());
        }
    }
    // No stock leaked: what Redis has left is the stock less what the store holds.
    let held = orders
        .iter()
        .filter(|o| !o.status.releases_stock())
        .map(|o| i64::from(o.new.quantity))
        .sum::<i64>();
    let stats = app.stats("down").await;
    assert_eq!(stats["stock_left"].as_i64(), Some(STOCK - held), "{stats}");
}

/// Injected produce errors and a whole-cluster outage on librdkafka's mock cluster.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn injected_produce_errors_and_an_outage_lose_nothing_and_admit_nothing_twice() {
    use rdkafka::mocking::MockCluster;
    use rdkafka::types::{RDKafkaApiKey, RDKafkaRespErr};
    const STOCK: i64 = 100_000;
    let cluster = MockCluster::new(3).expect("mock cluster");
    let kafka = KafkaConfig {
        bootstrap: cluster.bootstrap_servers(),
        ..KafkaConfig::default()
    };
    for t in kafka.topics() {
        cluster.create_topic(&t, 3, 3).expect("topic");
    }
    let redis = testkit::RedisServer::start();
    let app = Arc::new(
        TestApp::start_with(|c| {
            c.admission.url = redis.url();
            c.log.url = format!("kafka://{}", kafka.bootstrap);
            c.log.delivery_timeout = Duration::from_secs(1);
        })
        .await,
    );
    let a = app
        .create_sale(json!({
            "id": "mock", "sku": "s", "stock": STOCK, "price_cents": 100, "currency": "EUR",
            "per_user_limit": 1000, "max_quantity_per_order": 1,
            "user_rate": {"per_second": 100000, "burst": 100000}
        }))
        .await;
    assert_eq!(a.status, 201, "{}", a.body);
    let tokens: Vec<String> = (0..50).map(|u| app.token(&format!("m{u}"))).collect();
    let mut answers: Vec<(u16, Option<String>)> = Vec::new();
    let send = |n: usize, from: usize| {
        let app = Arc::clone(&app);
        let tokens = tokens.clone();
        async move {
            let mut set = tokio::task::JoinSet::new();
            for i in from..from + n {
                let (app, token) = (Arc::clone(&app), tokens[i % tokens.len()].clone());
                set.spawn(async move {
                    let a = app.order("mock", &token, &format!("m{i}"), 1).await;
                    assert!(matches!(a.status, 202 | 503), "{} {}", a.status, a.body);
                    (a.status, a.body["order_id"].as_str().map(str::to_owned))
                });
            }
            let mut out = Vec::new();
            while let Some(r) = set.join_next().await {
                out.push(r.expect("client"));
            }
            out
        }
    };
    // Retriable produce errors: the idempotent producer retries them without duplicates.
    cluster.request_errors(
        RDKafkaApiKey::Produce,
        &[
            RDKafkaRespErr::RD_KAFKA_RESP_ERR_NOT_LEADER_FOR_PARTITION,
            RDKafkaRespErr::RD_KAFKA_RESP_ERR_REQUEST_TIMED_OUT,
            RDKafkaRespErr::RD_KAFKA_RESP_ERR_NOT_ENOUGH_REPLICAS,
        ],
    );
    answers.extend(send(300, 0).await);
    // Every broker down: buyers get 503 and their stock goes back.
    for b in 1..=3 {
        cluster.broker_down(b).expect("down");
    }
    answers.extend(send(100, 300).await);
    for b in 1..=3 {
        cluster.broker_up(b).expect("up");
    }
    eventually("selling resumes", Duration::from_secs(60), || {
        let app = Arc::clone(&app);
        let token = tokens[0].clone();
        async move {
            app.order(
                "mock",
                &token,
                &format!("probe-{}", storage::OrderId::new()),
                1,
            )
            .await
            .status
                == 202
        }
    })
    .await;
    answers.extend(send(200, 400).await);
    assert!(answers.iter().any(|a| a.0 == 503), "the outage was felt");
    let acked: HashSet<String> = answers.iter().filter_map(|a| a.1.clone()).collect();
    // Most orders outside the outage are acknowledged (a produce held up by the injected
    // errors past the delivery deadline is a 503 too, more of them on a busy machine).
    assert!(acked.len() >= 250, "{} acknowledged", acked.len());

    // Every acknowledged order settles exactly once; nothing was admitted twice.
    let sale = storage::SaleId::parse("mock").expect("id");
    let store = Arc::clone(&app.running().store);
    wait_paid(&store, &sale, &acked, false).await;
    let orders = store.orders_of_sale(&sale).await.expect("orders");
    let keys: HashSet<(String, String)> = orders
        .iter()
        .map(|o| (o.new.user_id.to_string(), o.new.idempotency_key.clone()))
        .collect();
    assert_eq!(keys.len(), orders.len(), "one order per key");
    for o in orders
        .iter()
        .filter(|o| o.status == storage::OrderStatus::Paid)
    {
        assert!(
            acked.contains(&o.new.order_id.to_string())
                || o.new.idempotency_key.starts_with("probe-"),
            "order {} was charged but its buyer got 503",
            o.new.order_id
        );
    }
    let held = orders
        .iter()
        .filter(|o| !o.status.releases_stock())
        .map(|o| i64::from(o.new.quantity))
        .sum::<i64>();
    eventually(
        "the counters match the store",
        Duration::from_secs(30),
        || {
            let app = Arc::clone(&app);
            async move { app.stats("mock").await["stock_left"].as_i64() == Some(STOCK - held) }
        },
    )
    .await;
    // Reconcile agrees once the settler is done, orders whose admission was aborted before
    // their record landed included (cancelled, not counted as accepted and released).
    let data = app.config.data_dir.display().to_string();
    let (admission, log) = (app.config.admission.url.clone(), app.config.log.url.clone());
    let mut last = String::new();
    let consistent = testkit::wait_until(Duration::from_secs(60), || {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_flashsale"))
            .args(["reconcile", "--sale", "mock", "--data-dir", &data])
            .args(["--admission", &admission, "--log", &log])
            .env_remove("FLASHSALE_CONFIG")
            .output()
            .expect("reconcile");
        last = String::from_utf8_lossy(&out.stdout).into_owned();
        let ok = out.status.success() && last.contains("consistent");
        async move { ok }
    })
    .await;
    assert!(consistent, "reconcile: {last}");
}

/// Waits until every acknowledged order is paid (and, with `all_settled`, every stored order
/// of the sale is final and notified).
async fn wait_paid(
    store: &Arc<dyn storage::OrderStore>,
    sale: &storage::SaleId,
    acked: &HashSet<String>,
    all_settled: bool,
) {
    eventually(
        "every acknowledged order paid",
        Duration::from_secs(120),
        || {
            let (store, sale, acked) = (Arc::clone(store), sale.clone(), acked.clone());
            async move {
                let orders = store.orders_of_sale(&sale).await.unwrap_or_default();
                let paid: HashSet<String> = orders
                    .iter()
                    .filter(|o| o.status == storage::OrderStatus::Paid)
                    .map(|o| o.new.order_id.to_string())
                    .collect();
                acked.iter().all(|id| paid.contains(id))
                    && (!all_settled
                        || orders
                            .iter()
                            .all(|o| o.status.is_final() && o.notified_at.is_some()))
            }
        },
    )
    .await;
}
