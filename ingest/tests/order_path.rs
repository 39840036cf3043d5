//! The order endpoint over a real socket: one admission round trip per accepted order
//! while the buyer waits; the confirmation is sent in the background, and what happens to
//! a retry before it lands; back-pressure of a full confirm queue; retries of a failed
//! confirmation; the queue drained on shutdown; a stale sale definition served while its
//! refresh waits on the store.
//!
//! The admission backend is the embedded one behind a wrapper that counts calls and holds
//! every confirmation until the test lets it through. Tests wait for conditions with a
//! deadline, never for a fixed time.

use async_trait::async_trait;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use ingest::admission::{self, Admission, EmbeddedAdmission};
use ingest::api::{ApiConfig, Ingest};
use ingest::auth::{Auth, AuthConfig};
use ingest::model::{AbortOutcome, AdmitRequest, Counters, Decision, OrderRef};
use ingest::server::{self, ServerConfig};
use secrecy::SecretString;
use sequencer::{LogPosition, OrderLog, OrderRecord};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;
use storage::sqlite::SqliteStore;
use storage::{
    Checkpoint, Currency, Money, NewOrder, Order, OrderEvent, OrderId, OrderStatus, OrderStore,
    Sale, SaleId, SaleTotals, Timestamp, UserRate,
};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

const DEADLINE: Duration = Duration::from_secs(20);

/// Embedded admission that counts calls; confirmations wait for a permit of `gate`, and
/// the first `failures` of them fail.
struct Counting {
    inner: EmbeddedAdmission,
    admits: AtomicUsize,
    confirms_started: AtomicUsize,
    confirms_done: AtomicUsize,
    failures: AtomicUsize,
    gate: Semaphore,
}

impl Counting {
    fn new(gate_open: bool) -> Arc<Self> {
        Arc::new(Counting {
            inner: EmbeddedAdmission::new(),
            admits: AtomicUsize::new(0),
            confirms_started: AtomicUsize::new(0),
            confirms_done: AtomicUsize::new(0),
            failures: AtomicUsize::new(0),
            gate: Semaphore::new(if gate_open { Semaphore::MAX_PERMITS } else { 0 }),
        })
    }

    fn open_gate(&self) {
        self.gate
            .add_permits(Semaphore::MAX_PERMITS - self.gate.available_permits());
    }

    fn started(&self) -> usize {
        self.confirms_started.load(Ordering::SeqCst)
    }

    fn done(&self) -> usize {
        self.confirms_done.load(Ordering::SeqCst)
    }
}

#[async_trait]
impl Admission for Counting {
    async fn create_sale(&self, sale: &Sale) -> admission::Result<()> {
        self.inner.create_sale(sale).await
    }
    async fn add_stock(&self, sale: &SaleId, units: u32) -> admission::Result<()> {
        self.inner.add_stock(sale, units).await
    }
    async fn admit(&self, sale: &SaleId, req: &AdmitRequest) -> admission::Result<Decision> {
        self.admits.fetch_add(1, Ordering::SeqCst);
        self.inner.admit(sale, req).await
    }
    async fn confirm(&self, sale: &SaleId, order: &OrderRef) -> admission::Result<()> {
        self.confirms_started.fetch_add(1, Ordering::SeqCst);
        self.gate.acquire().await.expect("gate").forget();
        let fail = self
            .failures
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok();
        if fail {
            return Err(admission::Error::unavailable_msg("injected"));
        }
        self.inner.confirm(sale, order).await?;
        self.confirms_done.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
    async fn abort(&self, sale: &SaleId, order: &OrderRef) -> admission::Result<AbortOutcome> {
        self.inner.abort(sale, order).await
    }
    async fn claim(&self, sale: &SaleId, order: &OrderRef) -> admission::Result<bool> {
        self.inner.claim(sale, order).await
    }
    async fn release(&self, sale: &SaleId, order: &OrderRef) -> admission::Result<bool> {
        self.inner.release(sale, order).await
    }
    async fn counters(&self, sale: &SaleId) -> admission::Result<Option<Counters>> {
        self.inner.counters(sale).await
    }
    async fn ping(&self) -> admission::Result<()> {
        Ok(())
    }
}

/// A log that keeps nothing and acknowledges every append at once.
#[derive(Default)]
struct NullLog {
    next: AtomicU64,
}

#[async_trait]
impl OrderLog for NullLog {
    async fn append(&self, _record: &OrderRecord) -> sequencer::Result<LogPosition> {
        Ok(LogPosition {
            partition: 0,
            offset: self.next.fetch_add(1, Ordering::SeqCst),
        })
    }
    async fn ping(&self) -> sequencer::Result<()> {
        Ok(())
    }
}

/// The embedded store, whose `get_sale` waits for a permit of `gate` while `blocked`.
struct GatedStore {
    inner: SqliteStore,
    blocked: std::sync::atomic::AtomicBool,
    waiting: AtomicUsize,
    gate: Semaphore,
}

#[async_trait]
impl OrderStore for GatedStore {
    async fn create_sale(&self, sale: &Sale) -> storage::Result<()> {
        self.inner.create_sale(sale).await
    }
    async fn get_sale(&self, id: &SaleId) -> storage::Result<Option<Sale>> {
        if self.blocked.load(Ordering::SeqCst) {
            self.waiting.fetch_add(1, Ordering::SeqCst);
            self.gate.acquire().await.expect("gate").forget();
            self.waiting.fetch_sub(1, Ordering::SeqCst);
        }
        self.inner.get_sale(id).await
    }
    async fn list_sales(&self) -> storage::Result<Vec<Sale>> {
        self.inner.list_sales().await
    }
    async fn add_stock(&self, id: &SaleId, units: u32) -> storage::Result<Sale> {
        self.inner.add_stock(id, units).await
    }
    async fn persist_batch(
        &self,
        orders: &[NewOrder],
        checkpoint: Option<&Checkpoint>,
    ) -> storage::Result<usize> {
        self.inner.persist_batch(orders, checkpoint).await
    }
    async fn checkpoint(&self, consumer: &str, partition: u32) -> storage::Result<Option<u64>> {
        self.inner.checkpoint(consumer, partition).await
    }
    async fn transition(
        &self,
        id: OrderId,
        from: OrderStatus,
        to: OrderStatus,
        charge_id: Option<&str>,
    ) -> storage::Result<bool> {
        self.inner.transition(id, from, to, charge_id).await
    }
    async fn mark_released(&self, id: OrderId) -> storage::Result<bool> {
        self.inner.mark_released(id).await
    }
    async fn mark_notified(&self, id: OrderId) -> storage::Result<bool> {
        self.inner.mark_notified(id).await
    }
    async fn get_order(&self, id: OrderId) -> storage::Result<Option<Order>> {
        self.inner.get_order(id).await
    }
    async fn orders_in_status(
        &self,
        statuses: &[OrderStatus],
        limit: usize,
    ) -> storage::Result<Vec<Order>> {
        self.inner.orders_in_status(statuses, limit).await
    }
    async fn apply_batch(&self, changes: &[storage::Change]) -> storage::Result<Vec<bool>> {
        self.inner.apply_batch(changes).await
    }
    async fn orders_due(
        &self,
        statuses: &[OrderStatus],
        now: Timestamp,
        limit: usize,
    ) -> storage::Result<Vec<Order>> {
        self.inner.orders_due(statuses, now, limit).await
    }
    async fn refunds_owed(&self, limit: usize) -> storage::Result<Vec<Order>> {
        self.inner.refunds_owed(limit).await
    }
    async fn documents_owed(&self, limit: usize) -> storage::Result<Vec<Order>> {
        self.inner.documents_owed(limit).await
    }
    async fn unfinished_followups(&self, limit: usize) -> storage::Result<Vec<Order>> {
        self.inner.unfinished_followups(limit).await
    }
    async fn orders_of_sale(&self, sale: &SaleId) -> storage::Result<Vec<Order>> {
        self.inner.orders_of_sale(sale).await
    }
    async fn sale_totals(&self, sale: &SaleId) -> storage::Result<SaleTotals> {
        self.inner.sale_totals(sale).await
    }
    async fn pending_since(&self, before: Timestamp, limit: usize) -> storage::Result<Vec<Order>> {
        self.inner.pending_since(before, limit).await
    }
    async fn unpublished_events(&self, limit: usize) -> storage::Result<Vec<OrderEvent>> {
        self.inner.unpublished_events(limit).await
    }
    async fn mark_published(&self, events: &[(OrderId, OrderStatus)]) -> storage::Result<usize> {
        self.inner.mark_published(events).await
    }
    async fn ping(&self) -> storage::Result<()> {
        self.inner.ping().await
    }
}

fn auth_config() -> AuthConfig {
    AuthConfig {
        jwt_secret: SecretString::from("order-path-test-secret"),
        issuer: "flashsale".into(),
        audience: "flashsale-buyers".into(),
        algorithms: vec![jsonwebtoken::Algorithm::HS256],
        leeway: Duration::from_secs(5),
        operator_token: SecretString::from("operator"),
    }
}

struct Instance {
    addr: SocketAddr,
    ingest: Arc<Ingest>,
    stop: CancellationToken,
}

impl Drop for Instance {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

struct Harness {
    admission: Arc<Counting>,
    log: Arc<NullLog>,
    store: Arc<GatedStore>,
    sale: SaleId,
    dir: PathBuf,
}

impl Drop for Harness {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl Harness {
    async fn new(admission: Arc<Counting>) -> Harness {
        let dir = std::env::temp_dir().join(format!("ingest-order-path-{}", OrderId::new()));
        let store = Arc::new(GatedStore {
            inner: SqliteStore::open(dir.join("store.db")).expect("store"),
            blocked: std::sync::atomic::AtomicBool::new(false),
            waiting: AtomicUsize::new(0),
            gate: Semaphore::new(0),
        });
        let now = Timestamp::now();
        let sale = Sale {
            stock_buckets: 1,
            id: SaleId::parse("sale-1").expect("id"),
            sku: "sku".into(),
            stock: 1000,
            price: Money {
                minor: 100,
                currency: Currency::parse("EUR").expect("eur"),
            },
            starts_at: now.plus_millis(-1000),
            ends_at: now.plus_millis(3_600_000),
            per_user_limit: 1,
            max_quantity_per_order: 1,
            user_rate: UserRate::default(),
            created_at: now,
        };
        store.create_sale(&sale).await.expect("store sale");
        admission.create_sale(&sale).await.expect("admission sale");
        Harness {
            admission,
            log: Arc::new(NullLog::default()),
            store,
            sale: sale.id,
            dir,
        }
    }

    /// One more ingest instance over the shared backends.
    async fn instance(&self, config: ApiConfig) -> Instance {
        let ingest = Arc::new(Ingest::new(
            Arc::clone(&self.admission) as Arc<dyn Admission>,
            Arc::clone(&self.log) as Arc<dyn OrderLog>,
            Arc::clone(&self.store) as Arc<dyn OrderStore>,
            Auth::new(&auth_config()).expect("auth"),
            config,
        ));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let stop = CancellationToken::new();
        tokio::spawn(server::serve(
            listener,
            Arc::clone(&ingest),
            ServerConfig::default(),
            stop.clone(),
        ));
        Instance { addr, ingest, stop }
    }
}

#[derive(Debug)]
struct Reply {
    status: u16,
    retry_after: Option<String>,
    body: serde_json::Value,
}

impl Reply {
    fn order_id(&self) -> String {
        self.body["order_id"]
            .as_str()
            .unwrap_or_else(|| panic!("no order id in {:?}", self.body))
            .to_owned()
    }
}

async fn post_order(addr: SocketAddr, sale: &SaleId, user: &str, key: &str, token: &str) -> Reply {
    let jwt =
        ingest::auth::issue_token(&auth_config(), user, Duration::from_secs(600)).expect("token");
    let stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .expect("handshake");
    tokio::spawn(conn);
    let body = serde_json::json!({"quantity": 1, "payment_token": token}).to_string();
    let req = http::Request::post(format!("/v1/sales/{sale}/orders"))
        .header(http::header::HOST, "localhost")
        .header(http::header::AUTHORIZATION, format!("Bearer {jwt}"))
        .header(http::header::CONTENT_TYPE, "application/json")
        .header("idempotency-key", key)
        .body(Full::new(Bytes::from(body)))
        .expect("request");
    let resp = sender.send_request(req).await.expect("send");
    let status = resp.status().as_u16();
    let retry_after = resp
        .headers()
        .get(http::header::RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let bytes = resp.into_body().collect().await.expect("body").to_bytes();
    Reply {
        status,
        retry_after,
        body: serde_json::from_slice(&bytes).unwrap_or(serde_json::Value::Null),
    }
}

/// `post_order`, failing the test if it takes longer than the deadline.
async fn order(inst: &Instance, sale: &SaleId, user: &str, key: &str, token: &str) -> Reply {
    tokio::time::timeout(DEADLINE, post_order(inst.addr, sale, user, key, token))
        .await
        .unwrap_or_else(|_| panic!("the order of {user} did not answer in time"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_accepted_order_costs_one_admission_round_trip_while_the_buyer_waits() {
    let h = Harness::new(Counting::new(false)).await;
    let a = h.instance(ApiConfig::default()).await;
    let b = h.instance(ApiConfig::default()).await;

    // Every confirmation is held: the 202 still comes back.
    let first = order(&a, &h.sale, "buyer-1", "key-1", "tok_visa").await;
    assert_eq!(first.status, 202, "{:?}", first.body);
    assert_eq!(h.admission.admits.load(Ordering::SeqCst), 1);
    testkit::eventually("the confirmer to pick the order up", DEADLINE, || async {
        h.admission.started() == 1
    })
    .await;
    assert_eq!(h.admission.done(), 0);

    // A retry on the same instance before the confirmation landed: its 202 replayed from
    // what this instance remembers (the order is durable).
    let retry = order(&a, &h.sale, "buyer-1", "key-1", "tok_visa").await;
    assert_eq!(retry.status, 202, "{:?}", retry.body);
    assert_eq!(retry.order_id(), first.order_id());
    // On another instance: in progress, never a 202 it cannot vouch for.
    let elsewhere = order(&b, &h.sale, "buyer-1", "key-1", "tok_visa").await;
    assert_eq!(elsewhere.status, 409, "{:?}", elsewhere.body);
    assert_eq!(elsewhere.body["code"], "request_in_progress");
    assert_eq!(elsewhere.retry_after.as_deref(), Some("1"));
    // A different body under the same key is still a conflict.
    let conflict = order(&a, &h.sale, "buyer-1", "key-1", "tok_other").await;
    assert_eq!(conflict.status, 422);
    assert_eq!(conflict.body["code"], "idempotency_conflict");

    // The confirmation lands; every instance replays the answer.
    h.admission.open_gate();
    testkit::eventually("the confirmation to land", DEADLINE, || async {
        h.admission.done() == 1
    })
    .await;
    let replay = order(&b, &h.sale, "buyer-1", "key-1", "tok_visa").await;
    assert_eq!(replay.status, 202, "{:?}", replay.body);
    assert_eq!(replay.order_id(), first.order_id());
    assert_eq!(
        h.admission.started(),
        1,
        "one confirmation per accepted order"
    );
    a.ingest.shutdown().await;
    b.ingest.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_confirm_queue_confirms_inline() {
    let h = Harness::new(Counting::new(false)).await;
    let a = h
        .instance(ApiConfig {
            confirm_queue: 1,
            confirm_batch_max: 1,
            ..ApiConfig::default()
        })
        .await;
    // Order 1: taken by the confirmer, which waits at the gate.
    assert_eq!(order(&a, &h.sale, "u1", "k", "tok").await.status, 202);
    testkit::eventually("the confirmer to take order 1", DEADLINE, || async {
        h.admission.started() == 1
    })
    .await;
    // Order 2: queued (the queue holds one).
    assert_eq!(order(&a, &h.sale, "u2", "k", "tok").await.status, 202);
    // Order 3: the queue is full, so its request confirms inline and waits.
    let (addr, sale) = (a.addr, h.sale.clone());
    let third = tokio::spawn(async move { post_order(addr, &sale, "u3", "k", "tok").await });
    testkit::eventually("order 3 to confirm inline", DEADLINE, || async {
        h.admission.started() == 2
    })
    .await;
    assert!(
        !third.is_finished(),
        "order 3 answered before its inline confirm"
    );
    h.admission.open_gate();
    let third = tokio::time::timeout(DEADLINE, third)
        .await
        .expect("order 3 answered")
        .expect("join");
    assert_eq!(third.status, 202, "{:?}", third.body);
    testkit::eventually("every confirmation to land", DEADLINE, || async {
        h.admission.done() == 3
    })
    .await;
    a.ingest.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_confirmation_is_retried() {
    let admission = Counting::new(true);
    admission.failures.store(2, Ordering::SeqCst);
    let h = Harness::new(admission).await;
    let a = h.instance(ApiConfig::default()).await;
    let first = order(&a, &h.sale, "u1", "k", "tok").await;
    assert_eq!(first.status, 202);
    testkit::eventually("the confirmation to land", DEADLINE, || async {
        h.admission.done() == 1
    })
    .await;
    assert_eq!(h.admission.started(), 3, "two failures, then success");
    let b = h.instance(ApiConfig::default()).await;
    let replay = order(&b, &h.sale, "u1", "k", "tok").await;
    assert_eq!(replay.status, 202);
    assert_eq!(replay.order_id(), first.order_id());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_sends_the_queued_confirmations() {
    let h = Harness::new(Counting::new(false)).await;
    let a = h.instance(ApiConfig::default()).await;
    for u in 0..5 {
        let r = order(&a, &h.sale, &format!("u{u}"), "k", "tok").await;
        assert_eq!(r.status, 202, "{:?}", r.body);
    }
    assert_eq!(h.admission.done(), 0);
    let ingest = Arc::clone(&a.ingest);
    let shutdown = tokio::spawn(async move { ingest.shutdown().await });
    testkit::eventually("the confirmer to start sending", DEADLINE, || async {
        h.admission.started() >= 1
    })
    .await;
    assert!(!shutdown.is_finished());
    h.admission.open_gate();
    tokio::time::timeout(DEADLINE, shutdown)
        .await
        .expect("shutdown returned")
        .expect("join");
    assert_eq!(
        h.admission.done(),
        5,
        "shutdown returned before the queue was sent"
    );
    // After shutdown an accepted order is confirmed inline, before its 202.
    let late = order(&a, &h.sale, "late", "k", "tok").await;
    assert_eq!(late.status, 202);
    assert_eq!(h.admission.done(), 6);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_sale_is_served_while_its_refresh_waits_on_the_store() {
    let h = Harness::new(Counting::new(true)).await;
    // TTL zero: the sale is stale as soon as it is loaded.
    let a = h
        .instance(ApiConfig {
            sale_cache_ttl: Duration::ZERO,
            ..ApiConfig::default()
        })
        .await;
    // Never seen: this one loads it from the store.
    assert_eq!(order(&a, &h.sale, "u0", "k", "tok").await.status, 202);
    // From now on the store does not answer: refreshes hang, orders do not.
    h.store.blocked.store(true, Ordering::SeqCst);
    for u in 1..=5 {
        let r = order(&a, &h.sale, &format!("u{u}"), "k", "tok").await;
        assert_eq!(r.status, 202, "{:?}", r.body);
    }
    testkit::eventually("a refresh to wait on the store", DEADLINE, || async {
        h.store.waiting.load(Ordering::SeqCst) == 1
    })
    .await;
    let r = order(&a, &h.sale, "u6", "k", "tok").await;
    assert_eq!(r.status, 202, "{:?}", r.body);
    assert_eq!(
        h.store.waiting.load(Ordering::SeqCst),
        1,
        "one refresh at a time"
    );
    h.store.blocked.store(false, Ordering::SeqCst);
    h.store.gate.add_permits(100);
    a.ingest.shutdown().await;
}
