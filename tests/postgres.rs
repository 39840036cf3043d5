//! The whole distributed pipeline: Redis admission, the Kafka log (tansu), the settler as
//! its own process, sharded Postgres (two servers, one shard each) and the mock provider.
//! Each test drives a sale through the API, disturbs settlement (provider failures, settler
//! killed, a shard stopped, the provider down) and then checks every invariant from the
//! store, Redis, the provider's audit, the receipts archive and `flashsale reconcile`.
#![cfg(feature = "kafka")]

mod common;

use flashsale::config::Config;
use mock_provider::{Audit, MockConfig, MockProvider};
use secrecy::ExposeSecret;
use serde_json::{json, Value};
use std::collections::HashSet;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;
use storage::{Order, OrderStatus, OrderStore, SaleId};
use testkit::eventually;

const SALE: &str = "pg-sale";
const OPERATOR: &str = "flashsale-dev-operator-token";

/// Every server of the pipeline, the API in this process, the settler as a child process.
struct Pipeline {
    pg: testkit::PostgresCluster,
    _redis: testkit::RedisServer,
    _broker: testkit::TansuBroker,
    mock: MockProvider,
    config: Config,
    running: Option<flashsale::app::Running>,
    url: String,
    store: Arc<dyn OrderStore>,
    settler: Option<Child>,
    client: reqwest::Client,
    /// The receipts archive when it is S3 (else the local default under `data_dir`).
    _s3: Option<testkit::S3Server>,
    _dir: tempfile::TempDir,
}

impl Drop for Pipeline {
    fn drop(&mut self) {
        if let Some(mut c) = self.settler.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Pipeline {
    async fn start(mock: MockConfig) -> Pipeline {
        Self::start_with(mock, None).await
    }

    /// With `s3`, receipts go to that server's bucket (else to the local default).
    async fn start_with(mock: MockConfig, s3: Option<testkit::S3Server>) -> Pipeline {
        let pg = testkit::PostgresCluster::start(2);
        let redis = testkit::RedisServer::start();
        let broker = testkit::TansuBroker::start();
        let mock = MockProvider::start(mock).await.expect("mock provider");
        let dir = tempfile::tempdir().expect("tempdir");
        let mut config = Config {
            data_dir: dir.path().to_path_buf(),
            ..Config::default()
        };
        config.admission.url = redis.url();
        config.admission.decision_timeout = Duration::from_secs(2);
        config.log.url = format!("kafka://{}", broker.bootstrap());
        config.log.partitions = 4;
        config.store.url = pg.shard_urls().join(",");
        config.store.catalog_url = pg.catalog_url();
        config.providers.payment_url = mock.url();
        config.providers.notification_url = mock.url();
        config.settler.enabled = false;
        if let Some(s3) = &s3 {
            config.receipts.url = format!("s3://{}/pg", s3.bucket());
            config.receipts.endpoint = s3.endpoint();
            config.receipts.region = s3.region().into();
            config.receipts.access_key_id = s3.access_key().into();
            config.receipts.secret_access_key = s3.secret_key().into();
            config.receipts.allow_http = true;
        }
        sequencer::kafka::create_topics(&config.log.kafka().expect("kafka"))
            .await
            .expect("topics");
        let migrated = flashsale::app::migrate_store(&config)
            .await
            .expect("migrate");
        assert!(migrated.contains("2 shard(s)"), "{migrated}");
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let running = flashsale::app::App::start(&config, listener)
            .await
            .expect("start");
        let url = running.url();
        let store = Arc::clone(&running.store);
        let mut p = Pipeline {
            pg,
            _redis: redis,
            _broker: broker,
            mock,
            config,
            running: Some(running),
            url,
            store,
            settler: None,
            client: reqwest::Client::builder()
                .timeout(Duration::from_secs(30))
                .pool_max_idle_per_host(128)
                .build()
                .expect("client"),
            _s3: s3,
            _dir: dir,
        };
        p.start_settler();
        p
    }

    /// The configuration as environment variables of a child process.
    fn env(&self) -> Vec<(&'static str, String)> {
        let c = &self.config;
        vec![
            ("FLASHSALE_ADMISSION__URL", c.admission.url.clone()),
            ("FLASHSALE_LOG__URL", c.log.url.clone()),
            ("FLASHSALE_STORE__URL", c.store.url.clone()),
            ("FLASHSALE_STORE__CATALOG_URL", c.store.catalog_url.clone()),
            ("FLASHSALE_PROVIDERS__PAYMENT_URL", self.mock.url()),
            ("FLASHSALE_PROVIDERS__NOTIFICATION_URL", self.mock.url()),
            ("FLASHSALE_DATA_DIR", c.data_dir.display().to_string()),
            ("FLASHSALE_RECEIPTS__URL", c.receipts.url.clone()),
            ("FLASHSALE_RECEIPTS__ENDPOINT", c.receipts.endpoint.clone()),
            ("FLASHSALE_RECEIPTS__REGION", c.receipts.region.clone()),
            (
                "FLASHSALE_RECEIPTS__ACCESS_KEY_ID",
                c.receipts.access_key_id.clone(),
            ),
            (
                "FLASHSALE_RECEIPTS__SECRET_ACCESS_KEY",
                c.receipts.secret_access_key.expose_secret().to_owned(),
            ),
            (
                "FLASHSALE_RECEIPTS__ALLOW_HTTP",
                c.receipts.allow_http.to_string(),
            ),
        ]
    }

    fn start_settler(&mut self) {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_flashsale"));
        cmd.arg("settle")
            .env_remove("FLASHSALE_CONFIG")
            .env("RUST_LOG", "error")
            .stdout(Stdio::null())
            .stderr(Stdio::inherit());
        for (k, v) in self.env() {
            cmd.env(k, v);
        }
        self.settler = Some(cmd.spawn().expect("spawn flashsale settle"));
    }

    /// SIGKILL: no shutdown, no flush, whatever was under way is cut.
    fn kill_settler(&mut self) {
        if let Some(mut c) = self.settler.take() {
            c.kill().expect("kill");
            c.wait().expect("wait");
        }
    }

    async fn create_sale(&self, stock: u32, limit: u32) {
        let a = self
            .client
            .post(format!("{}/v1/sales", self.url))
            .bearer_auth(OPERATOR)
            .json(&json!({
                "id": SALE, "sku": "s", "stock": stock, "price_cents": 700, "currency": "EUR",
                "per_user_limit": limit, "max_quantity_per_order": 1,
                "user_rate": {"per_second": 100000, "burst": 100000}
            }))
            .send()
            .await
            .expect("create");
        assert_eq!(a.status().as_u16(), 201);
    }

    /// `attempts` orders from `users` buyers, 64 at a time; the ids answered 202.
    async fn buy(&self, attempts: usize, users: usize) -> HashSet<String> {
        let auth = self.config.auth.to_auth_config().expect("auth");
        let tokens: Arc<Vec<String>> = Arc::new(
            (0..users)
                .map(|u| {
                    ingest::auth::issue_token(&auth, &format!("u{u}"), Duration::from_secs(3600))
                        .expect("token")
                })
                .collect(),
        );
        let next = Arc::new(AtomicUsize::new(0));
        let mut tasks = tokio::task::JoinSet::new();
        for _ in 0..64 {
            let (tokens, next, client, url) = (
                Arc::clone(&tokens),
                Arc::clone(&next),
                self.client.clone(),
                self.url.clone(),
            );
            tasks.spawn(async move {
                let mut ids = Vec::new();
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= attempts {
                        return ids;
                    }
                    let resp = client
                        .post(format!("{url}/v1/sales/{SALE}/orders"))
                        .bearer_auth(&tokens[i % tokens.len()])
                        .header("idempotency-key", format!("k{i}"))
                        .json(&json!({"quantity": 1, "payment_token": "tok_visa"}))
                        .send()
                        .await
                        .expect("order");
                    let status = resp.status().as_u16();
                    let body: Value = resp.json().await.expect("json");
                    assert!(matches!(status, 202 | 409 | 403), "{status} {body}");
                    if status == 202 {
                        ids.push(body["order_id"].as_str().expect("id").to_owned());
                    }
                }
            });
        }
        let mut acked = HashSet::new();
        while let Some(ids) = tasks.join_next().await {
            acked.extend(ids.expect("client"));
        }
        acked
    }

    async fn orders(&self) -> Vec<Order> {
        self.store
            .orders_of_sale(&SaleId::parse(SALE).expect("id"))
            .await
            .expect("orders")
    }

    /// Waits until every acknowledged order is stored, final, notified and, if it gives
    /// stock back, released.
    async fn wait_settled(&self, acked: &HashSet<String>, deadline: Duration) {
        eventually("every acknowledged order settled", deadline, || async {
            let Ok(orders) = self
                .store
                .orders_of_sale(&SaleId::parse(SALE).expect("id"))
                .await
            else {
                return false;
            };
            orders.len() == acked.len()
                && orders.iter().all(|o| {
                    o.status.is_final()
                        && o.notified_at.is_some()
                        && (!o.status.releases_stock() || o.released_at.is_some())
                })
        })
        .await;
    }

    async fn stats(&self) -> Value {
        self.client
            .get(format!("{}/v1/sales/{SALE}/stats", self.url))
            .bearer_auth(OPERATOR)
            .send()
            .await
            .expect("stats")
            .json()
            .await
            .expect("json")
    }

    /// Every invariant, from the store, Redis, the provider's audit and reconcile.
    async fn check_invariants(&self, acked: &HashSet<String>, stock: u64) {
        let orders = self.orders().await;
        let stored: HashSet<String> = orders.iter().map(|o| o.new.order_id.to_string()).collect();
        assert_eq!(stored.len(), orders.len(), "no duplicate rows");
        assert_eq!(&stored, acked, "persisted == accepted");
        let audit: Audit = mock_provider::fetch_audit(&self.mock.url())
            .await
            .expect("audit");
        let mut released_units = 0;
        for o in &orders {
            let a = audit
                .orders
                .get(&o.new.order_id.to_string())
                .cloned()
                .unwrap_or_default();
            match o.status {
                OrderStatus::Paid => assert_eq!(
                    (a.successful_charges, a.refunds),
                    (1, 0),
                    "one successful charge per paid order {}",
                    o.new.order_id
                ),
                _ => assert!(
                    a.successful_charges <= a.refunds,
                    "no charge kept for released order {}",
                    o.new.order_id
                ),
            }
            // Retries of a notification reuse its idempotency key, and the provider keeps
            // one per key: the buyer hears of the outcome exactly once.
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
        let stats = self.stats().await;
        let paid = orders
            .iter()
            .filter(|o| o.status == OrderStatus::Paid)
            .count() as u64;
        assert_eq!(stats["accepted"].as_u64(), Some(acked.len() as u64));
        assert_eq!(stats["released_units"].as_u64(), Some(released_units));
        assert_eq!(
            stats["stock_left"].as_u64(),
            Some(stock - paid),
            "conservation: left = stock - paid once everything settled"
        );
        self.check_receipts().await;
        let out = Command::new(env!("CARGO_BIN_EXE_flashsale"))
            .args([
                "reconcile",
                "--sale",
                SALE,
                "--payment-url",
                &self.mock.url(),
            ])
            .env_remove("FLASHSALE_CONFIG")
            .envs(self.env())
            .output()
            .expect("reconcile");
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "reconcile: {text}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(text.contains("consistent"), "{text}");
        assert!(!text.contains("pending"), "{text}");
    }

    /// One receipt per paid order and one refund note per refunded late charge, each
    /// recorded on its order, its bytes those the order renders to (so no write left a
    /// torn or different object); no object of any other order.
    async fn check_receipts(&self) {
        eventually(
            "every document owed is written",
            Duration::from_secs(120),
            || async { matches!(self.store.documents_owed(1).await, Ok(v) if v.is_empty()) },
        )
        .await;
        let archive = flashsale::app::open_archive(&self.config)
            .await
            .expect("archive")
            .expect("receipts enabled");
        let sale = self
            .store
            .get_sale(&SaleId::parse(SALE).expect("id"))
            .await
            .expect("sale")
            .expect("the sale");
        let mut objects = 0;
        for kind in [receipts::Kind::Receipt, receipts::Kind::RefundNote] {
            let keys: HashSet<String> = archive
                .keys(kind.key_prefix())
                .await
                .expect("keys")
                .into_iter()
                .collect();
            let mut want = HashSet::new();
            for o in self.orders().await {
                let key = receipts::object_key(o.new.order_id, kind);
                let recorded = match kind {
                    receipts::Kind::Receipt => &o.receipt_key,
                    receipts::Kind::RefundNote => &o.refund_note_key,
                };
                if receipts::Kind::of(&o) != Some(kind) {
                    assert_eq!(recorded, &None, "order {} ({})", o.new.order_id, o.status);
                    continue;
                }
                assert_eq!(recorded.as_deref(), Some(key.as_str()));
                let full = self
                    .store
                    .get_order(o.new.order_id)
                    .await
                    .expect("get")
                    .expect("order");
                let doc = receipts::Document::for_order(&full, &sale, &self.config.receipts.seller)
                    .expect("document");
                let bytes = archive.get(&key).await.expect("get").expect("object");
                assert!(
                    bytes.as_ref() == receipts::render(&doc).as_slice(),
                    "the object of order {} is the document it renders to",
                    o.new.order_id
                );
                want.insert(key);
            }
            objects += keys.len();
            assert_eq!(
                keys, want,
                "one {kind:?} object per order owed one, no other"
            );
        }
        assert!(objects > 0, "documents were written");
    }

    /// Every order's history reached `flashsale.order-events.v1` (at least once each).
    async fn check_events_published(&self, orders: &[Order]) {
        use sequencer::LogConsumer;
        let kafka = self.config.log.kafka().expect("kafka");
        let mut consumer = sequencer::kafka::KafkaConsumer::for_topic(
            &kafka,
            "events-check",
            &kafka.events_topic(),
        )
        .expect("consumer");
        let mut want: HashSet<(String, String)> = orders
            .iter()
            .flat_map(|o| {
                o.history
                    .iter()
                    .map(|h| (o.new.order_id.to_string(), h.status.as_str().to_owned()))
            })
            .collect();
        if want.is_empty() {
            // orders_of_sale leaves the history out: every order went through these.
            want = orders
                .iter()
                .flat_map(|o| {
                    ["persisted", o.status.as_str()]
                        .map(|s| (o.new.order_id.to_string(), s.to_owned()))
                })
                .collect();
        }
        let deadline = std::time::Instant::now() + Duration::from_secs(120);
        while !want.is_empty() {
            assert!(
                std::time::Instant::now() < deadline,
                "{} status changes never published, e.g. {:?}",
                want.len(),
                want.iter().next()
            );
            for e in consumer
                .poll(1000, Duration::from_millis(500))
                .await
                .expect("poll events")
            {
                let v: Value = serde_json::from_slice(&e.payload).expect("event json");
                assert_eq!(v["v"], 1, "{v}");
                let key = (
                    v["order_id"].as_str().expect("order_id").to_owned(),
                    v["status"].as_str().expect("status").to_owned(),
                );
                want.remove(&key);
            }
        }
    }

    async fn stop(mut self) {
        self.kill_settler();
        if let Some(r) = self.running.take() {
            r.stop().await.expect("stop");
        }
    }
}

fn failing_provider() -> MockConfig {
    MockConfig {
        decline_rate: 0.10,
        error_rate: 0.05,
        lost_answer_rate: 0.02,
        seed: Some(6),
        ..MockConfig::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_whole_sale_settles_exactly_once_through_provider_failures() {
    let p = Pipeline::start(failing_provider()).await;
    p.create_sale(5_000, 2).await;
    let acked = p.buy(20_000, 4_000).await;
    // Declined orders give their unit back during the sale, and it sells again.
    assert!(acked.len() >= 5_000, "the whole stock is sold");
    p.wait_settled(&acked, Duration::from_secs(300)).await;
    let orders = p.orders().await;
    let failed = orders
        .iter()
        .filter(|o| o.status == OrderStatus::PaymentFailed)
        .count();
    assert!(failed > 0, "declines happened and were released");
    // Both shards hold orders.
    let pg = p.config.store.postgres().expect("urls").expect("postgres");
    assert_eq!(pg.shards.len(), 2);
    p.check_invariants(&acked, 5_000).await;
    p.check_events_published(&orders).await;
    p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_settler_killed_three_times_mid_settlement_loses_and_repeats_nothing() {
    // Receipts go to S3 here: each kill may cut a receipt write (or the recording of its
    // key) in half, and the restart must still leave exactly one object per paid order.
    let s3 = tokio::task::spawn_blocking(testkit::S3Server::start)
        .await
        .expect("s3");
    let mut p = Pipeline::start_with(
        MockConfig {
            latency: Duration::from_millis(5),
            ..failing_provider()
        },
        Some(s3),
    )
    .await;
    p.create_sale(3_000, 2).await;
    let acked = p.buy(6_000, 2_000).await;
    let mut settled_before = 0;
    for _ in 0..3 {
        // Kill it while it is settling: once it has made progress since the last start
        // (or, on a fast run, once it has settled everything: it is killed and restarted
        // all the same, and the restart must then find nothing to redo).
        let total = acked.len();
        eventually(
            "the settler makes progress",
            Duration::from_secs(120),
            || {
                let p = &p;
                async move {
                    let n = p
                        .orders()
                        .await
                        .iter()
                        .filter(|o| o.status.is_final())
                        .count();
                    n > settled_before || n >= total
                }
            },
        )
        .await;
        settled_before = p
            .orders()
            .await
            .iter()
            .filter(|o| o.status.is_final())
            .count();
        p.kill_settler();
        p.start_settler();
    }
    p.wait_settled(&acked, Duration::from_secs(300)).await;
    p.check_invariants(&acked, 3_000).await;
    p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shard_stopped_for_ten_seconds_loses_and_duplicates_nothing() {
    let mut p = Pipeline::start(MockConfig {
        latency: Duration::from_millis(2),
        ..failing_provider()
    })
    .await;
    p.create_sale(3_000, 2).await;
    let acked = p.buy(6_000, 2_000).await;
    eventually("settlement under way", Duration::from_secs(120), || async {
        p.orders().await.iter().any(|o| o.status.is_final())
    })
    .await;
    p.pg.stop_shard(1);
    // The outage under test lasts ten seconds.
    tokio::time::sleep(Duration::from_secs(10)).await;
    p.pg.start_shard(1);
    p.wait_settled(&acked, Duration::from_secs(300)).await;
    p.check_invariants(&acked, 3_000).await;
    p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_provider_down_for_thirty_seconds_opens_the_circuit_and_fails_no_order() {
    let p = Pipeline::start(MockConfig {
        latency: Duration::from_millis(2),
        ..MockConfig::default()
    })
    .await;
    p.create_sale(2_000, 2).await;
    let acked = p.buy(2_000, 1_000).await;
    eventually("settlement under way", Duration::from_secs(120), || async {
        p.orders()
            .await
            .iter()
            .any(|o| o.status == OrderStatus::Paid)
    })
    .await;
    let down = MockConfig {
        down: true,
        ..MockConfig::default()
    };
    let refused_before = mock_provider::fetch_audit(&p.mock.url())
        .await
        .expect("audit")
        .totals
        .unavailable;
    mock_provider::update_config(&p.mock.url(), &down)
        .await
        .expect("provider down");
    // The outage under test lasts thirty seconds.
    tokio::time::sleep(Duration::from_secs(30)).await;
    let during = p.orders().await;
    assert!(
        during
            .iter()
            .all(|o| o.status != OrderStatus::PaymentFailed && o.status != OrderStatus::Expired),
        "no order failed because of the outage"
    );
    assert!(
        during.iter().any(|o| !o.status.is_final()),
        "orders waited for the provider"
    );
    // The circuit opened: the settler stopped calling after a few failures and only probes
    // now and then, where a closed circuit would call for every waiting order every sweep.
    let refused = mock_provider::fetch_audit(&p.mock.url())
        .await
        .expect("audit")
        .totals
        .unavailable
        - refused_before;
    // Without it every waiting order would be tried (four attempts each) every backoff.
    let waiting = during.iter().filter(|o| !o.status.is_final()).count() as u64;
    assert!(
        refused < waiting,
        "{refused} calls reached the provider while it was down ({waiting} orders waiting)"
    );
    mock_provider::update_config(&p.mock.url(), &MockConfig::default())
        .await
        .expect("provider up");
    p.wait_settled(&acked, Duration::from_secs(300)).await;
    assert!(
        p.orders()
            .await
            .iter()
            .all(|o| o.status == OrderStatus::Paid),
        "every order paid once the provider is back"
    );
    p.check_invariants(&acked, 2_000).await;
    p.stop().await;
}
