//! The systems the end-to-end harness loads: the ceilings (a plain hyper server, raw
//! Redis, the admission script alone, a produce-only Kafka client) and flashsale itself,
//! embedded or distributed, through its real HTTP endpoint.
//!
//! HTTP targets are called from the load generator's own runtime (the client); the
//! non-HTTP targets run their calls on the server runtime (as ingest would) and the
//! generator awaits them.

use crate::loadgen::{CallFuture, Outcome, Target};
use anyhow::Context;
use bytes::Bytes;
use http::{header, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use ingest::admission::Admission;
use ingest::model::{AdmitRequest, Decision};
use ingest::redis_admission::RedisAdmission;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use storage::{Currency, Money, OrderId, Sale, SaleId, Timestamp, UserId, UserRate};
use tokio::runtime::Handle;

/// The body every order request carries.
pub const ORDER_BODY: &str = r#"{"quantity":1,"payment_token":"tok_visa"}"#;

/// The plain hyper ceiling's answer: the same shape and size as flashsale's 202.
const PLAIN_ANSWER: &str = r#"{"order_id":"0193a6e2-7f1c-7a3e-9b1d-3c5e7f9a1b2c","sale_id":"bench-accepted","sequence":123456,"quantity":1,"status":"accepted"}"#;

/// A plain hyper HTTP/1 server with the connection settings of `ingest::server` (nodelay,
/// keep-alive, header-read timeout), answering every request (after reading its body)
/// with a fixed 202 JSON body. Runs until the returned task is aborted.
pub async fn start_plain_hyper() -> anyhow::Result<(SocketAddr, tokio::task::JoinHandle<()>)> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let task = tokio::spawn(async move {
        let mut conns = tokio::task::JoinSet::new();
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            };
            let _ = stream.set_nodelay(true);
            while conns.try_join_next().is_some() {}
            conns.spawn(async move {
                let service = hyper::service::service_fn(|req: Request<Incoming>| async move {
                    let _ = req.into_body().collect().await;
                    let mut resp =
                        Response::new(Full::new(Bytes::from_static(PLAIN_ANSWER.as_bytes())));
                    *resp.status_mut() = StatusCode::ACCEPTED;
                    resp.headers_mut().insert(
                        header::CONTENT_TYPE,
                        HeaderValue::from_static("application/json"),
                    );
                    Ok::<_, Infallible>(resp)
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .timer(TokioTimer::new())
                    .header_read_timeout(Duration::from_secs(5))
                    .keep_alive(true)
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    Ok((addr, task))
}

type HttpClient = Client<HttpConnector, Full<Bytes>>;

/// One order answered 202: its id (from the answer's body) and when the answer was read
/// (wall clock, microseconds since the Unix epoch, to compare with the store's history).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Accepted {
    /// The order.
    pub id: OrderId,
    /// When its 202 was read, µs since the epoch.
    pub at_us: i64,
}

/// Microseconds since the Unix epoch, now.
pub fn wall_us() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as i64)
}

/// The `order_id` of a 202 body (`{"order_id":"<uuid>",...}`).
pub fn order_id_of(body: &[u8]) -> Option<OrderId> {
    const FIELD: &[u8] = br#""order_id":""#;
    let at = body.windows(FIELD.len()).position(|w| w == FIELD)? + FIELD.len();
    let id = std::str::from_utf8(body.get(at..at + 36)?).ok()?;
    id.parse().ok()
}

fn http_client() -> HttpClient {
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    Client::builder(TokioExecutor::new())
        .pool_max_idle_per_host(4096)
        .pool_idle_timeout(Duration::from_secs(3))
        .build(connector)
}

/// Order requests to `POST /v1/sales/{sale}/orders`, each with a buyer JWT (users in
/// turn), a fresh Idempotency-Key and [`ORDER_BODY`].
pub struct HttpOrders {
    client: HttpClient,
    uri: http::Uri,
    tokens: Arc<Vec<HeaderValue>>,
    expect: StatusCode,
    next: Arc<AtomicU64>,
    /// Requests answered with the expected status, over every step.
    pub answered: Arc<AtomicU64>,
    nonce: Arc<str>,
    /// With [`HttpOrders::recording`]: every 202's order id and time, in answer order.
    accepted: Option<Arc<std::sync::Mutex<Vec<Accepted>>>>,
}

impl HttpOrders {
    /// Orders for `sale` at `addr`, expecting `expect`.
    pub fn new(
        addr: SocketAddr,
        sale: &str,
        tokens: Vec<String>,
        expect: StatusCode,
    ) -> anyhow::Result<Self> {
        let tokens = tokens
            .into_iter()
            .map(|t| HeaderValue::from_str(&format!("Bearer {t}")))
            .collect::<Result<Vec<_>, _>>()?;
        anyhow::ensure!(!tokens.is_empty(), "no buyer tokens");
        Ok(HttpOrders {
            client: http_client(),
            uri: format!("http://{addr}/v1/sales/{sale}/orders").parse()?,
            tokens: Arc::new(tokens),
            expect,
            next: Arc::new(AtomicU64::new(0)),
            answered: Arc::new(AtomicU64::new(0)),
            nonce: Arc::from(format!("{:x}", Timestamp::now().millis()).as_str()),
            accepted: None,
        })
    }

    /// Records every 202's order id and time (accepted paths: for the settle check and
    /// the time from 202 to paid).
    pub fn recording(mut self) -> Self {
        self.accepted = Some(Arc::default());
        self
    }

    /// How many 202s were recorded so far.
    pub fn accepted_len(&self) -> usize {
        self.accepted
            .as_ref()
            .map_or(0, |a| a.lock().expect("accepted").len())
    }

    /// The recorded 202s from index `from` on.
    pub fn accepted_since(&self, from: usize) -> Vec<Accepted> {
        self.accepted.as_ref().map_or(Vec::new(), |a| {
            a.lock()
                .expect("accepted")
                .get(from..)
                .unwrap_or(&[])
                .to_vec()
        })
    }

    /// The same requests through a new client (no connection left from an earlier step).
    pub fn fresh(&self) -> Self {
        HttpOrders {
            client: http_client(),
            uri: self.uri.clone(),
            tokens: Arc::clone(&self.tokens),
            expect: self.expect,
            next: Arc::clone(&self.next),
            answered: Arc::clone(&self.answered),
            nonce: Arc::clone(&self.nonce),
            accepted: self.accepted.clone(),
        }
    }
}

impl Target for HttpOrders {
    fn call(&self, _i: u64) -> CallFuture {
        let n = self.next.fetch_add(1, Ordering::Relaxed);
        let token = self.tokens[(n % self.tokens.len() as u64) as usize].clone();
        let key = format!("{}-{n}", self.nonce);
        let req = Request::builder()
            .method(Method::POST)
            .uri(self.uri.clone())
            .header(header::AUTHORIZATION, token)
            .header(header::CONTENT_TYPE, "application/json")
            .header("idempotency-key", key)
            .body(Full::new(Bytes::from_static(ORDER_BODY.as_bytes())));
        let client = self.client.clone();
        let expect = self.expect;
        let answered = Arc::clone(&self.answered);
        let accepted = self.accepted.clone();
        Box::pin(async move {
            let Ok(req) = req else {
                return Outcome::Error;
            };
            match client.request(req).await {
                Ok(resp) => {
                    let status = resp.status();
                    let Ok(body) = resp.into_body().collect().await else {
                        return Outcome::Error;
                    };
                    if status == expect {
                        if let Some(acc) = &accepted {
                            let at_us = wall_us();
                            match order_id_of(&body.to_bytes()) {
                                Some(id) => {
                                    acc.lock().expect("accepted").push(Accepted { id, at_us })
                                }
                                None => return Outcome::Unexpected(status.as_u16()),
                            }
                        }
                        answered.fetch_add(1, Ordering::Relaxed);
                        Outcome::Expected
                    } else {
                        Outcome::Unexpected(status.as_u16())
                    }
                }
                Err(_) => Outcome::Error,
            }
        })
    }
}

/// Raw Redis: one `INCR` per call on a multiplexed connection (the connection type the
/// admission backend uses): what Redis and the client cost with no script.
pub struct RedisRaw {
    conn: redis::aio::ConnectionManager,
    handle: Handle,
}

impl RedisRaw {
    /// Connects to `url`.
    pub async fn connect(url: &str, handle: Handle) -> anyhow::Result<Self> {
        let client = redis::Client::open(url)?;
        let conn = redis::aio::ConnectionManager::new(client).await?;
        Ok(RedisRaw { conn, handle })
    }
}

impl Target for RedisRaw {
    fn call(&self, _i: u64) -> CallFuture {
        let mut conn = self.conn.clone();
        let task = self.handle.spawn(async move {
            redis::cmd("INCR")
                .arg("bench:counter")
                .query_async::<i64>(&mut conn)
                .await
        });
        Box::pin(async move {
            match task.await {
                Ok(Ok(_)) => Outcome::Expected,
                _ => Outcome::Error,
            }
        })
    }
}

/// A sale no load can exhaust: stock 100 M, 1000 units per user, a generous bucket.
pub fn open_sale(id: &SaleId) -> Sale {
    let now = Timestamp::now();
    Sale {
        stock_buckets: 1,
        id: id.clone(),
        sku: "bench".into(),
        stock: storage::MAX_STOCK,
        price: Money {
            minor: 1999,
            currency: Currency::parse("EUR").expect("EUR is a currency"),
        },
        starts_at: now.plus_millis(-60_000),
        ends_at: now.plus_millis(24 * 3_600_000),
        per_user_limit: 1000,
        max_quantity_per_order: 1,
        user_rate: UserRate {
            per_second: 1_000_000,
            burst: 1_000_000,
        },
        created_at: now,
    }
}

/// The admission script alone: `RedisAdmission::admit` of a new order (distinct users
/// in turn, a fresh key each) on an open sale, no HTTP, no log.
pub struct AdmissionOnly {
    admission: Arc<RedisAdmission>,
    sale: SaleId,
    users: Arc<Vec<UserId>>,
    next: Arc<AtomicU64>,
    handle: Handle,
}

impl AdmissionOnly {
    /// Connects to `url` and creates an open sale.
    pub async fn start(url: &str, users: usize, handle: Handle) -> anyhow::Result<Self> {
        let admission = RedisAdmission::connect(url, "bench:", Duration::from_millis(250))
            .await
            .context("connecting the admission backend")?;
        let sale = SaleId::parse("bench-admission").context("sale id")?;
        admission
            .create_sale(&open_sale(&sale))
            .await
            .context("creating the sale")?;
        let users = (0..users)
            .map(|u| UserId::parse(format!("buyer-{u}")))
            .collect::<Result<Vec<_>, _>>()
            .context("user ids")?;
        Ok(AdmissionOnly {
            admission: Arc::new(admission),
            sale,
            users: Arc::new(users),
            next: Arc::new(AtomicU64::new(0)),
            handle,
        })
    }
}

impl Target for AdmissionOnly {
    fn call(&self, _i: u64) -> CallFuture {
        let n = self.next.fetch_add(1, Ordering::Relaxed);
        let req = AdmitRequest {
            user: self.users[(n % self.users.len() as u64) as usize].clone(),
            quantity: 1,
            key: format!("k{n}"),
            fingerprint: ingest::api::fingerprint(1, "tok_visa"),
            order_id: OrderId::new(),
        };
        let (admission, sale) = (Arc::clone(&self.admission), self.sale.clone());
        let task = self
            .handle
            .spawn(async move { admission.admit(&sale, &req).await });
        Box::pin(async move {
            match task.await {
                Ok(Ok(Decision::Accepted(_))) => Outcome::Expected,
                Ok(Ok(_)) => Outcome::Unexpected(0),
                _ => Outcome::Error,
            }
        })
    }
}

/// A record as ingest appends it, encoded.
pub fn sample_record() -> sequencer::OrderRecord {
    sequencer::OrderRecord {
        v: sequencer::RECORD_VERSION,
        order_id: OrderId::new(),
        sale_id: SaleId::parse("bench-sale").expect("id"),
        user_id: UserId::parse("buyer-12345").expect("user"),
        quantity: 1,
        amount_minor: 1999,
        currency: Currency::parse("EUR").expect("eur"),
        sequence: 123_456,
        idempotency_key: "c3f1d2e4-0001".into(),
        fingerprint: ingest::api::fingerprint(1, "tok_visa"),
        payment_token: "tok_visa".into(),
        accepted_at: Timestamp::now(),
    }
}

/// Produce only: `KafkaLog::send` of an encoded order record (key = a new order id) to
/// the orders topic, waiting for each delivery report, with flashsale's producer settings.
#[cfg(feature = "kafka")]
pub struct KafkaProduce {
    log: Arc<sequencer::kafka::KafkaLog>,
    topic: String,
    payload: Bytes,
    handle: Handle,
}

#[cfg(feature = "kafka")]
impl KafkaProduce {
    /// Creates the topics on `bootstrap` and a producer; with `consumer`, also a
    /// consumer group reading the topic as the settler does (poll up to 512 records or
    /// 20 ms, commit), to see what a reader costs the producer.
    pub async fn start(bootstrap: &str, handle: Handle, consumer: bool) -> anyhow::Result<Self> {
        let config = sequencer::kafka::KafkaConfig {
            bootstrap: bootstrap.to_owned(),
            ..Default::default()
        };
        sequencer::kafka::create_topics(&config)
            .await
            .context("creating the topics")?;
        let log = sequencer::kafka::KafkaLog::new(&config).context("producer")?;
        log.check_topics().await.context("topics")?;
        let payload = Bytes::from(sequencer::encode(&sample_record())?);
        if consumer {
            use sequencer::LogConsumer;
            let mut c = sequencer::kafka::KafkaConsumer::new(&config, "bench-reader")
                .context("consumer")?;
            handle.spawn(async move {
                loop {
                    match c.poll(512, Duration::from_millis(20)).await {
                        Ok(entries) if !entries.is_empty() => {
                            let positions: Vec<_> = entries.iter().map(|e| e.position).collect();
                            let _ = c.commit(&positions).await;
                        }
                        Ok(_) => {}
                        Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
                    }
                }
            });
        }
        Ok(KafkaProduce {
            log: Arc::new(log),
            topic: config.orders_topic(),
            payload,
            handle,
        })
    }
}

#[cfg(feature = "kafka")]
impl Target for KafkaProduce {
    fn call(&self, _i: u64) -> CallFuture {
        let (log, topic, payload) = (
            Arc::clone(&self.log),
            self.topic.clone(),
            self.payload.clone(),
        );
        let task = self.handle.spawn(async move {
            log.send(&topic, &OrderId::new().to_string(), &payload)
                .await
        });
        Box::pin(async move {
            match task.await {
                Ok(Ok(_)) => Outcome::Expected,
                _ => Outcome::Error,
            }
        })
    }
}

/// One HTTP request on `client` (setup calls: creating sales, the first order).
async fn request(
    addr: SocketAddr,
    method: Method,
    path: &str,
    headers: &[(&str, String)],
    body: String,
) -> anyhow::Result<(StatusCode, String)> {
    let client = http_client();
    let mut req = Request::builder()
        .method(method)
        .uri(format!("http://{addr}{path}"))
        .header(header::CONTENT_TYPE, "application/json");
    for (k, v) in headers {
        req = req.header(*k, v);
    }
    let resp = client
        .request(req.body(Full::new(Bytes::from(body)))?)
        .await?;
    let status = resp.status();
    let text = resp.into_body().collect().await?.to_bytes();
    Ok((status, String::from_utf8_lossy(&text).into_owned()))
}

/// Which flashsale backends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backends {
    /// Embedded admission, embedded file log (fsync), SQLite store.
    Embedded,
    /// Redis admission, Kafka log (tansu), Postgres with 2 shards.
    Distributed,
}

/// Settings changed for a diagnosis (`e2e --fixed-rate`), never in a measured run.
#[derive(Debug, Clone, Copy, Default)]
pub struct Diagnostics {
    /// `log.fsync = false`.
    pub no_fsync: bool,
    /// `settler.enabled = false`.
    pub no_settler: bool,
    /// `kafka-produce` with a consumer group reading the topic as the settler does.
    pub kafka_consumer: bool,
}

/// Starts flashsale; with `settler.enabled = false` through `App::start_unsettled`, which
/// also takes the embedded log (the settler-alone measurement fills the log first).
async fn start(
    config: &flashsale::config::Config,
    listener: tokio::net::TcpListener,
) -> anyhow::Result<flashsale::app::Running> {
    if config.settler.enabled {
        flashsale::app::App::start(config, listener).await
    } else {
        flashsale::app::App::start_unsettled(config, listener).await
    }
}

/// flashsale running in this process on the server runtime, and the servers it uses.
pub struct Flashsale {
    running: Option<flashsale::app::Running>,
    backends: Backends,
    config: flashsale::config::Config,
    _data: tempfile::TempDir,
    _redis: Option<testkit::RedisServer>,
    #[cfg(feature = "kafka")]
    _broker: Option<testkit::TansuBroker>,
    _postgres: Option<testkit::PostgresCluster>,
}

impl Flashsale {
    /// Starts the servers it needs (testkit) and the system (`App::start`), in the
    /// context of the server runtime (call through its `block_on`).
    pub async fn start(backends: Backends, diag: Diagnostics) -> anyhow::Result<Self> {
        let data = tempfile::Builder::new()
            .prefix("flashsale-e2e-")
            .tempdir()?;
        let mut config = flashsale::config::Config {
            data_dir: data.path().to_path_buf(),
            ..Default::default()
        };
        config.log.fsync = !diag.no_fsync;
        config.settler.enabled = !diag.no_settler;
        let mut redis = None;
        let mut postgres = None;
        #[cfg(feature = "kafka")]
        let mut broker = None;
        if backends == Backends::Distributed {
            #[cfg(not(feature = "kafka"))]
            anyhow::bail!("the distributed system needs the `kafka` feature of bench");
            #[cfg(feature = "kafka")]
            {
                let r = tokio::task::spawn_blocking(testkit::RedisServer::start).await?;
                let b = tokio::task::spawn_blocking(testkit::TansuBroker::start).await?;
                let p = tokio::task::spawn_blocking(|| testkit::PostgresCluster::start(2)).await?;
                config.admission.url = r.url();
                config.log.url = format!("kafka://{}", b.bootstrap());
                config.store.url = p.shard_urls().join(",");
                config.store.catalog_url = p.catalog_url();
                let kafka = config.log.kafka().context("kafka settings")?;
                sequencer::kafka::create_topics(&kafka)
                    .await
                    .context("creating the topics")?;
                flashsale::app::migrate_store(&config).await?;
                redis = Some(r);
                broker = Some(b);
                postgres = Some(p);
            }
        }
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let running = start(&config, listener).await?;
        Ok(Flashsale {
            running: Some(running),
            backends,
            config,
            _data: data,
            _redis: redis,
            #[cfg(feature = "kafka")]
            _broker: broker,
            _postgres: postgres,
        })
    }

    /// The running system.
    pub fn running(&self) -> &flashsale::app::Running {
        self.running.as_ref().expect("flashsale is running")
    }

    /// Stops the system and starts it again on the same data, log and servers (a new
    /// port), with the settler on or off (`settler.enabled`).
    pub async fn restart(&mut self, settler: bool) -> anyhow::Result<()> {
        if let Some(r) = self.running.take() {
            r.stop().await.context("stopping flashsale")?;
        }
        self.config.settler.enabled = settler;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let running = start(&self.config, listener)
            .await
            .context("starting flashsale again")?;
        self.running = Some(running);
        Ok(())
    }

    /// The log partition an order's record went to, when it can be told: the embedded
    /// log has one; Kafka's is murmur2 of the key (the order id) over `log.partitions`.
    pub fn partition_of(&self, id: OrderId) -> Option<u32> {
        match self.backends {
            Backends::Embedded => Some(0),
            Backends::Distributed => Some(sequencer::partition::partition_for(
                id.to_string().as_bytes(),
                self.config.log.partitions.max(1),
            )),
        }
    }

    /// Creates a sale through the operator API; `stock` 0 means the open sale's 100 M.
    pub async fn create_sale(&self, id: &str, stock: u32) -> anyhow::Result<()> {
        use secrecy::ExposeSecret;
        let operator = self.config.auth.operator_token.expose_secret().to_owned();
        let body = serde_json::json!({
            "id": id,
            "sku": "bench",
            "stock": if stock == 0 { storage::MAX_STOCK } else { stock },
            "price_cents": 1999,
            "currency": "EUR",
            "per_user_limit": 1000,
            "max_quantity_per_order": 1,
            "user_rate": {"per_second": 1_000_000, "burst": 1_000_000},
        });
        let (status, text) = request(
            self.running().addr,
            Method::POST,
            "/v1/sales",
            &[("authorization", format!("Bearer {operator}"))],
            body.to_string(),
        )
        .await?;
        anyhow::ensure!(
            status == StatusCode::CREATED,
            "creating sale {id}: {status} {text}"
        );
        Ok(())
    }

    /// Buyer tokens of `users` users `buyer-0..`.
    pub fn tokens(&self, prefix: &str, users: usize) -> anyhow::Result<Vec<String>> {
        let auth = self.config.auth.to_auth_config()?;
        (0..users)
            .map(|u| {
                ingest::auth::issue_token(&auth, &format!("{prefix}{u}"), Duration::from_secs(7200))
                    .map_err(anyhow::Error::from)
            })
            .collect()
    }

    /// One order by `user` (setup: selling the last unit).
    pub async fn order(&self, sale: &str, user: &str) -> anyhow::Result<StatusCode> {
        let token = self.tokens(user, 1)?.remove(0);
        let (status, _) = request(
            self.running().addr,
            Method::POST,
            &format!("/v1/sales/{sale}/orders"),
            &[
                ("authorization", format!("Bearer {token}")),
                ("idempotency-key", format!("setup-{user}")),
            ],
            ORDER_BODY.to_owned(),
        )
        .await?;
        Ok(status)
    }

    /// Orders persisted by the settler so far (every sale).
    pub fn persisted(&self) -> u64 {
        self.running()
            .settler_stats
            .as_ref()
            .map_or(0, |s| s.snapshot().persisted)
    }

    /// Stops the system (the servers stop when this is dropped).
    pub async fn stop(self) -> anyhow::Result<()> {
        let Flashsale { running, .. } = self;
        match running {
            Some(r) => r.stop().await,
            None => Ok(()),
        }
    }
}
