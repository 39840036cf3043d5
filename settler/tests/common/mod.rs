//! Shared test harness: a SQLite store and a file log in a temp dir, a mock provider on a
//! free port, a recording stock release, and a deadline-bound wait.

#![allow(dead_code)]

use async_trait::async_trait;
use mock_provider::{MockConfig, MockProvider};
use parking_lot::Mutex;
use sequencer::embedded::{FileLog, FileLogOptions};
use sequencer::{OrderLog, OrderRecord, RECORD_VERSION};
use settler::{FileDeadLetter, Settler, SettlerConfig, SettlerStats, StockRelease};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;
use storage::sqlite::SqliteStore;
use storage::{Currency, Order, OrderId, OrderStatus, OrderStore, SaleId, Timestamp, UserId};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// How long any condition may take before a test fails.
pub const DEADLINE: Duration = Duration::from_secs(60);

pub use testkit::eventually;

/// A valid order record; `token` starting with `tok_decline` makes the mock decline it.
pub fn record(seq: u64, token: &str) -> OrderRecord {
    OrderRecord {
        v: RECORD_VERSION,
        order_id: OrderId::new(),
        sale_id: SaleId::parse("sale-1").expect("sale id"),
        user_id: UserId::parse(format!("user-{seq}")).expect("user id"),
        quantity: 1 + (seq % 2) as u32,
        amount_minor: 1999,
        currency: Currency::parse("EUR").expect("currency"),
        sequence: seq,
        idempotency_key: format!("key-{seq}"),
        fingerprint: "f".repeat(32),
        payment_token: token.into(),
        accepted_at: Timestamp::now(),
    }
}

/// A stock release that records every call.
#[derive(Default)]
pub struct RecordingRelease {
    calls: Mutex<Vec<OrderId>>,
    aborted: Mutex<std::collections::HashSet<OrderId>>,
}

impl RecordingRelease {
    /// Marks an order as aborted by ingest: its claim fails.
    pub fn abort(&self, id: OrderId) {
        self.aborted.lock().insert(id);
    }

    /// Calls per order id.
    pub fn calls(&self) -> HashMap<OrderId, usize> {
        let mut out = HashMap::new();
        for id in self.calls.lock().iter() {
            *out.entry(*id).or_default() += 1;
        }
        out
    }
}

#[async_trait]
impl StockRelease for RecordingRelease {
    async fn release(&self, order: &Order) -> settler::Result<bool> {
        assert!(
            order.status.releases_stock(),
            "release of an order in {}",
            order.status
        );
        self.calls.lock().push(order.new.order_id);
        Ok(true)
    }

    async fn claim(&self, order: &Order) -> settler::Result<bool> {
        Ok(!self.aborted.lock().contains(&order.new.order_id))
    }
}

/// Real components in a temp dir.
pub struct Harness {
    pub dir: tempfile::TempDir,
    pub store: Arc<SqliteStore>,
    pub log: FileLog,
    pub mock: MockProvider,
    pub release: Arc<RecordingRelease>,
    pub dead_letter: Arc<FileDeadLetter>,
}

/// A running settler.
pub struct Running {
    pub shutdown: CancellationToken,
    pub task: JoinHandle<settler::Result<()>>,
    pub stats: SettlerStats,
}

impl Running {
    /// Cancels the settler and waits for it to return.
    pub async fn stop(self) {
        self.shutdown.cancel();
        tokio::time::timeout(DEADLINE, self.task)
            .await
            .expect("settler stops within the deadline")
            .expect("settler task joins")
            .expect("settler returns Ok");
    }
}

impl Harness {
    pub async fn new(mock: MockConfig) -> Harness {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Arc::new(SqliteStore::open(dir.path().join("db.sqlite")).expect("store"));
        let log = FileLog::open(dir.path().join("log"), FileLogOptions::default()).expect("log");
        let mock = MockProvider::start(mock).await.expect("mock provider");
        let dead_letter =
            Arc::new(FileDeadLetter::open(dir.path().join("dead-letter")).expect("dead letter"));
        Harness {
            dir,
            store,
            log,
            mock,
            release: Arc::new(RecordingRelease::default()),
            dead_letter,
        }
    }

    /// Settings for tests: quick sweeps and retries.
    pub fn config(&self) -> SettlerConfig {
        SettlerConfig {
            batch_size: 64,
            poll_wait: Duration::from_millis(20),
            charge_concurrency: 16,
            payment_url: self.mock.url(),
            notification_url: self.mock.url(),
            provider_timeout: Duration::from_secs(2),
            retry_max_attempts: 2,
            retry_min_delay: Duration::from_millis(5),
            retry_max_delay: Duration::from_millis(20),
            sweep_interval: Duration::from_millis(100),
            ..SettlerConfig::default()
        }
    }

    /// Appends `records` to the log and returns them.
    pub async fn append(&self, records: Vec<OrderRecord>) -> Vec<OrderRecord> {
        for r in &records {
            self.log.append(r).await.expect("append");
        }
        records
    }

    /// Starts a settler reading from the store's checkpoint.
    pub async fn start(&self, config: SettlerConfig) -> Running {
        self.start_with_sink(config, None).await
    }

    /// A settler reading from the store's checkpoint, publishing to `sink` if given.
    pub async fn settler(
        &self,
        config: SettlerConfig,
        sink: Option<Arc<dyn settler::EventSink>>,
    ) -> Settler {
        let from = self
            .store
            .checkpoint(&config.consumer, 0)
            .await
            .expect("checkpoint")
            .unwrap_or(0);
        let settler = Settler::new(
            Arc::clone(&self.store) as Arc<dyn OrderStore>,
            Box::new(self.log.consumer(from)),
            Arc::clone(&self.release) as Arc<dyn StockRelease>,
            Arc::clone(&self.dead_letter) as Arc<dyn settler::DeadLetter>,
            config,
        )
        .expect("settler");
        match sink {
            Some(sink) => settler.with_event_sink(sink),
            None => settler,
        }
    }

    /// Starts a settler reading from the store's checkpoint, publishing to `sink` if given.
    pub async fn start_with_sink(
        &self,
        config: SettlerConfig,
        sink: Option<Arc<dyn settler::EventSink>>,
    ) -> Running {
        let settler = self.settler(config, sink).await;
        let stats = settler.stats();
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(settler.run(shutdown.clone()));
        Running {
            shutdown,
            task,
            stats,
        }
    }

    /// Every stored order.
    pub async fn orders(&self) -> Vec<Order> {
        self.store
            .orders_in_status(&OrderStatus::ALL, 1_000_000)
            .await
            .expect("orders")
    }

    /// Waits until `n` orders are stored, all final, released where owed and notified.
    pub async fn wait_settled(&self, n: usize) {
        eventually("every order settled and followed up", DEADLINE, || async {
            let orders = self.orders().await;
            orders.len() == n
                && orders.iter().all(|o| {
                    o.status.is_final()
                        && o.notified_at.is_some()
                        && (o.released_at.is_some() || !o.status.releases_stock())
                })
        })
        .await;
    }

    /// Checks the settled state against the records and the mock's audit: one row per
    /// record, one successful charge per paid order and none for a failed one, one release
    /// per failed order, one notification per order.
    pub async fn check_exactly_once(&self, records: &[OrderRecord]) {
        let orders = self.orders().await;
        assert_eq!(orders.len(), records.len(), "one stored order per record");
        let by_id: HashMap<OrderId, &Order> = orders.iter().map(|o| (o.new.order_id, o)).collect();
        let audit = mock_provider::fetch_audit(&self.mock.url())
            .await
            .expect("audit");
        let releases = self.release.calls();
        for r in records {
            let order = by_id.get(&r.order_id).expect("record persisted");
            assert_eq!(order.new, r.to_new_order());
            let expected = if r.payment_token.starts_with("tok_decline") {
                OrderStatus::PaymentFailed
            } else {
                OrderStatus::Paid
            };
            assert_eq!(order.status, expected, "order {}", r.order_id);
            let a = audit
                .orders
                .get(&r.order_id.to_string())
                .expect("the provider saw the order");
            let paid = u64::from(expected == OrderStatus::Paid);
            assert_eq!(
                a.successful_charges, paid,
                "successful charges of {}",
                r.order_id
            );
            assert_eq!(
                a.declined_charges,
                1 - paid,
                "declined charges of {}",
                r.order_id
            );
            assert!(a.charge_attempts >= 1);
            assert_eq!(a.notifications.len(), 1, "notifications of {}", r.order_id);
            assert_eq!(a.refunds, 0);
            let released = releases.get(&r.order_id).copied().unwrap_or(0);
            assert_eq!(released, 1 - paid as usize, "releases of {}", r.order_id);
            if expected == OrderStatus::Paid {
                assert!(
                    order.charge_id.is_some(),
                    "a paid order keeps its charge id"
                );
            }
        }
        assert_eq!(
            releases.len(),
            records
                .iter()
                .filter(|r| r.payment_token.starts_with("tok_decline"))
                .count()
        );
    }
}

/// The sale every [`record`] belongs to, as the catalog holds it.
pub fn sale_1() -> storage::Sale {
    let now = Timestamp::now();
    storage::Sale {
        stock_buckets: 1,
        id: SaleId::parse("sale-1").expect("sale id"),
        sku: "sku-1".into(),
        stock: 1000,
        price: storage::Money {
            minor: 1999,
            currency: Currency::parse("EUR").expect("currency"),
        },
        starts_at: now,
        ends_at: now.plus_millis(3_600_000),
        per_user_limit: 2,
        max_quantity_per_order: 2,
        user_rate: storage::UserRate::default(),
        created_at: now,
    }
}
