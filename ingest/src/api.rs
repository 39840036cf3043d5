//! The v1 HTTP API: routing, request validation, and the order path.
//!
//! The order path is: authenticate, check headers, read at most `order_body_limit` bytes,
//! parse, look the sale up (from memory, see `sale_cache.rs`), decide in the admission
//! backend (one call), append the record to the log and answer 202 only once the log has
//! it. The idempotency answer is then confirmed in the background, in batches (see
//! `confirmer.rs`): one admission round trip per accepted order while the buyer waits. If
//! the log refuses the record, the admission is aborted (stock back, idempotency answer
//! forgotten) and the buyer gets 503. Every error is problem+json with a stable code and
//! changes nothing.
//!
//! A retry that arrives after the append returned but before the confirmation landed gets
//! `request_in_progress` from the backend; this instance remembers the durable answers it
//! gave and answers such a retry with the order's 202 instead. Another instance answers it
//! 409 `request_in_progress` with `Retry-After` (never a 202 for an order not yet durable).

use crate::admission::{self, Admission};
use crate::auth::Auth;
use crate::confirmer::{ConfirmConfig, Confirmer};
use crate::metrics::{self, outcome, Metrics, RateWindow, SaleGauges};
use crate::model::{AbortOutcome, AdmitRequest, Answer, Decision, OrderRef, Rejection};
use crate::problem::ApiError;
use crate::sale_cache::SaleCache;
use bytes::Bytes;
use dashmap::DashMap;
use http::{header, HeaderMap, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use prometheus_client::registry::Registry;
use sequencer::{OrderLog, OrderRecord, RECORD_VERSION};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::sync::Arc;
use std::time::{Duration, Instant};
use storage::{
    Currency, Money, Order, OrderId, OrderStatus, OrderStore, Sale, SaleId, Timestamp, UserId,
    UserRate,
};
use tokio_util::sync::CancellationToken;

/// Settings of the API layer.
#[derive(Debug, Clone)]
pub struct ApiConfig {
    /// Largest order body accepted (bytes).
    pub order_body_limit: usize,
    /// Largest operator body accepted (bytes).
    pub admin_body_limit: usize,
    /// Deadline of one admission decision; past it the buyer gets 503.
    pub decision_timeout: Duration,
    /// Deadline to receive a request body once its head arrived; past it the client gets
    /// 408 and the connection's slot is freed.
    pub body_read_timeout: Duration,
    /// Age past which a cached sale definition is refreshed in the background (requests
    /// keep getting the cached one meanwhile); also how long an unknown sale id is cached.
    pub sale_cache_ttl: Duration,
    /// Most sale definitions cached.
    pub sale_cache_capacity: u64,
    /// Most idempotency confirmations waiting for the background confirmer; when full, the
    /// order path confirms inline.
    pub confirm_queue: usize,
    /// Most confirmations sent in one batch (one admission round trip).
    pub confirm_batch_max: usize,
}

impl Default for ApiConfig {
    fn default() -> Self {
        ApiConfig {
            order_body_limit: 4096,
            admin_body_limit: 64 * 1024,
            decision_timeout: Duration::from_millis(250),
            body_read_timeout: Duration::from_secs(5),
            sale_cache_ttl: Duration::from_secs(2),
            sale_cache_capacity: 10_000,
            confirm_queue: 16_384,
            confirm_batch_max: 512,
        }
    }
}

type Resp = Response<Full<Bytes>>;

/// An order accepted by this instance and maybe not yet persisted, so that its status can
/// be read right after the 202.
#[derive(Debug, Clone)]
struct RecentOrder {
    user: UserId,
    sale_id: SaleId,
    sequence: u64,
    quantity: u32,
    accepted_at: Timestamp,
}

/// Identifies an idempotency answer: sale, user, key.
type IdemKey = (SaleId, UserId, String);

/// An answer this instance gave for an order whose record is durable.
#[derive(Debug, Clone)]
struct DurableAnswer {
    fingerprint: String,
    answer: Answer,
}

/// Most sales the per-sale gauges export at once (the most recently opened first).
pub const SALE_GAUGES_MAX: usize = 100;
/// How often the per-sale gauges are refreshed.
pub const SALE_GAUGES_EVERY: Duration = Duration::from_secs(1);
/// How often the refresher reads the catalog for the sales to export (a sale created by
/// this instance makes the next refresh read it at once).
const SALE_LIST_EVERY: Duration = Duration::from_secs(10);
/// How long after its end a sale stays exported while orders of it are unsettled.
const SALE_GAUGES_AFTER_END_MS: i64 = 3600 * 1000;

/// Attempts of a failed confirmation batch, and the wait before the second one (doubled
/// before each further one).
const CONFIRM_ATTEMPTS: u32 = 6;
const CONFIRM_BACKOFF: Duration = Duration::from_millis(20);

/// The API: everything a request handler needs.
pub struct Ingest {
    admission: Arc<dyn Admission>,
    log: Arc<dyn OrderLog>,
    store: Arc<dyn OrderStore>,
    auth: Auth,
    config: ApiConfig,
    /// Sale definitions, unknown ids included, stale-while-revalidate.
    sales: SaleCache,
    recent: moka::sync::Cache<OrderId, RecentOrder>,
    /// Answers of durable orders this instance accepted, so that a retry arriving before
    /// the confirmation landed gets the 202 replayed.
    durable: moka::sync::Cache<IdemKey, DurableAnswer>,
    confirmer: Arc<Confirmer>,
    rates: DashMap<SaleId, RateWindow>,
    /// The instance's metrics.
    pub metrics: Metrics,
    /// What `GET /metrics` renders: the process's registry (see [`Ingest::with_metrics`]),
    /// or this instance's families alone.
    registry: Arc<Registry>,
    /// The per-sale gauges' snapshot, refreshed by [`Ingest::run_sale_gauges`].
    sale_gauges: SaleGauges,
    /// Parts of the process besides the backends that `/readyz` reports (the in-process
    /// settler); see [`Ingest::with_readiness`].
    readiness: Option<ReadinessCheck>,
}

/// A part of the process `/readyz` reports besides the backends: the name of what is down
/// in it (a settler stage), or `None` when it is fine. Called on every `/readyz`: no I/O.
pub type ReadinessCheck = Arc<dyn Fn() -> Option<&'static str> + Send + Sync>;

impl std::fmt::Debug for Ingest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ingest")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

/// Body of `POST /v1/sales/{id}/orders`, as [`parse_order_body`] accepts it.
#[derive(Debug)]
pub struct OrderBody {
    /// Units ordered: at least 1 (the sale's maximum is checked by
    /// [`OrderBody::quantity_within`]).
    pub quantity: i64,
    /// Opaque token for the payment provider: 1 to 256 visible ASCII characters.
    pub payment_token: String,
}

/// The order body as sent, before its quantity is known to be an `i64`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawOrderBody {
    quantity: Quantity,
    payment_token: String,
}

impl OrderBody {
    /// The quantity as units, refused with `invalid_quantity` above the sale's
    /// `max_quantity_per_order`.
    pub fn quantity_within(&self, max_per_order: u32) -> Result<u32, ApiError> {
        u32::try_from(self.quantity)
            .ok()
            .filter(|q| (1..=max_per_order).contains(q))
            .ok_or_else(|| {
                ApiError::invalid_quantity(format!(
                    "quantity must be between 1 and {max_per_order}"
                ))
            })
    }
}

/// Parses and checks an order body with everything that needs no sale: JSON with exactly
/// `quantity` and `payment_token` (`malformed_json`, `invalid_body`), the payment token
/// (`invalid_payment_token`), a quantity of at least 1 (`invalid_quantity`; so is any
/// integer beyond 64 bits, a fraction is `invalid_body`). The order route and the fuzz
/// target (`crate::fuzzing`) both call it.
pub fn parse_order_body(body: &[u8]) -> Result<OrderBody, ApiError> {
    let body: RawOrderBody = parse_json(body)?;
    if body.payment_token.is_empty()
        || body.payment_token.len() > 256
        || !body.payment_token.bytes().all(|b| b.is_ascii_graphic())
    {
        return Err(ApiError::invalid_payment_token(
            "payment_token must be 1 to 256 visible ASCII characters",
        ));
    }
    let quantity = body.quantity.integer()?;
    if quantity < 1 {
        return Err(ApiError::invalid_quantity("quantity must be at least 1"));
    }
    let quantity = i64::try_from(quantity).map_err(|_| {
        ApiError::invalid_quantity("quantity is beyond any sale's max_quantity_per_order")
    })?;
    Ok(OrderBody {
        quantity,
        payment_token: body.payment_token,
    })
}

/// A quantity as sent: any JSON number, so that an integer too large for 64 bits is refused
/// as out of range (`invalid_quantity`) like any other, not as a body that does not parse.
#[derive(Debug, Deserialize)]
#[serde(transparent)]
struct Quantity(serde_json::Number);

impl Quantity {
    /// The integer sent (saturated at the bounds of `i128`: only compared with a range);
    /// `invalid_body` for a number with a fraction or an exponent that is not an integer.
    fn integer(&self) -> Result<i128, ApiError> {
        let n = &self.0;
        if let Some(i) = n.as_i64() {
            return Ok(i128::from(i));
        }
        if let Some(u) = n.as_u64() {
            return Ok(i128::from(u));
        }
        // serde_json reads an integer beyond 64 bits as a float; so is 1.5 or 1e3.
        match n.as_f64() {
            // 2^63: below it, an integer fits an i64 and is read as one.
            Some(f)
                if f.is_finite() && f.fract() == 0.0 && f.abs() >= 9_223_372_036_854_775_808.0 =>
            {
                Ok(f as i128)
            }
            _ => Err(ApiError::invalid_body("quantity must be an integer")),
        }
    }

    /// The quantity if it is an integer in `1..=max`; `invalid_quantity` for any other
    /// integer.
    fn within(&self, max: u32) -> Result<u32, ApiError> {
        u32::try_from(self.integer()?)
            .ok()
            .filter(|q| (1..=max).contains(q))
            .ok_or_else(|| {
                ApiError::invalid_quantity(format!("quantity must be between 1 and {max}"))
            })
    }
}

/// Body of `POST /v1/sales`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateSale {
    /// Sale id; generated (UUIDv7) when absent.
    pub id: Option<String>,
    /// Item on sale.
    pub sku: String,
    /// Initial stock.
    pub stock: u32,
    /// Unit price in minor units.
    pub price_cents: i64,
    /// ISO 4217 currency.
    pub currency: String,
    /// Opening instant (default: now).
    pub starts_at: Option<Timestamp>,
    /// Closing instant (default: 24 hours after opening).
    pub ends_at: Option<Timestamp>,
    /// Most units per user (default 1).
    pub per_user_limit: Option<u32>,
    /// Most units per order (default: the per-user limit).
    pub max_quantity_per_order: Option<u32>,
    /// Per-user rate (default 5/s, burst 10).
    pub user_rate: Option<UserRate>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct AddStock {
    quantity: Quantity,
}

/// A sale as the API shows it.
#[derive(Debug, Serialize, Deserialize)]
pub struct SaleView {
    /// Sale id.
    pub id: SaleId,
    /// Item on sale.
    pub sku: String,
    /// Total units put on sale.
    pub stock: u32,
    /// Units not taken (from the admission backend), if known.
    pub stock_left: Option<i64>,
    /// Unit price in minor units.
    pub price_cents: i64,
    /// Currency.
    pub currency: Currency,
    /// Opening instant.
    pub starts_at: Timestamp,
    /// Closing instant.
    pub ends_at: Timestamp,
    /// Most units per user.
    pub per_user_limit: u32,
    /// Most units per order.
    pub max_quantity_per_order: u32,
    /// Per-user rate.
    pub user_rate: UserRate,
}

/// `GET /v1/sales/{id}/stats`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct SaleStats {
    /// Sale id.
    pub sale_id: String,
    /// Total units put on sale.
    pub stock: u64,
    /// Units not taken.
    pub stock_left: i64,
    /// Orders accepted (202).
    pub accepted: u64,
    /// Units accepted.
    pub accepted_units: u64,
    /// Rejections by code.
    pub rejected: std::collections::BTreeMap<String, u64>,
    /// Orders in the store.
    pub persisted: u64,
    /// Orders waiting on the payment provider.
    pub payment_pending: u64,
    /// Orders paid.
    pub paid: u64,
    /// Orders whose payment failed.
    pub payment_failed: u64,
    /// Orders expired.
    pub expired: u64,
    /// Orders whose stock went back.
    pub released: u64,
    /// Units that went back.
    pub released_units: u64,
    /// Accepted orders per second over the last ten seconds.
    pub throughput_per_s: f64,
}

/// An order as its buyer sees it.
#[derive(Debug, Serialize, Deserialize)]
pub struct OrderView {
    /// Order id.
    pub order_id: OrderId,
    /// Sale id.
    pub sale_id: SaleId,
    /// Sequence in the sale.
    pub sequence: u64,
    /// Units.
    pub quantity: u32,
    /// Current status.
    pub status: OrderStatus,
    /// Statuses entered, oldest first.
    pub history: Vec<storage::HistoryEntry>,
}

fn json<T: Serialize>(status: StatusCode, value: &T) -> Resp {
    let body = serde_json::to_vec(value).unwrap_or_default();
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    resp
}

fn text(status: StatusCode, body: String, content_type: &'static str) -> Resp {
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    *resp.status_mut() = status;
    resp.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    resp
}

fn admission_error(e: admission::Error) -> ApiError {
    match e {
        admission::Error::Unavailable { .. } => {
            ApiError::unavailable("admission backend unavailable").retry_after(1)
        }
        admission::Error::UnknownSale(_) => ApiError::unknown_sale("no such sale"),
        admission::Error::SaleExists(_) => ApiError::sale_exists("the sale exists"),
    }
}

fn store_error(e: storage::Error) -> ApiError {
    match e {
        storage::Error::SaleExists(_) => ApiError::sale_exists("a sale with this id exists"),
        storage::Error::UnknownSale(_) => ApiError::unknown_sale("no such sale"),
        storage::Error::Invalid(e) => ApiError::invalid_quantity(e.to_string()),
        other => {
            tracing::warn!(error = %storage::ErrorChain(&other), "store error");
            ApiError::unavailable("order store unavailable").retry_after(1)
        }
    }
}

fn parse_error(e: serde_json::Error) -> ApiError {
    use serde_json::error::Category;
    match e.classify() {
        Category::Syntax | Category::Eof | Category::Io => {
            ApiError::malformed_json(format!("malformed JSON: {e}"))
        }
        Category::Data => ApiError::invalid_body(e.to_string()),
    }
}

fn require_json(headers: &HeaderMap) -> Result<(), ApiError> {
    let ok = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|v| v.trim().eq_ignore_ascii_case("application/json"));
    if ok {
        Ok(())
    } else {
        Err(ApiError::unsupported_media_type(
            "send Content-Type: application/json",
        ))
    }
}

async fn read_body(
    req: Request<Incoming>,
    limit: usize,
    deadline: Duration,
) -> Result<Bytes, ApiError> {
    let too_large = || ApiError::body_too_large(format!("the body must be at most {limit} bytes"));
    if let Some(len) = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
    {
        if len > limit as u64 {
            return Err(too_large());
        }
    }
    match tokio::time::timeout(deadline, Limited::new(req.into_body(), limit).collect()).await {
        Err(_) => Err(ApiError::request_timeout(format!(
            "the body must arrive within {deadline:?}"
        ))),
        Ok(Ok(c)) => Ok(c.to_bytes()),
        Ok(Err(e)) if e.is::<http_body_util::LengthLimitError>() => Err(too_large()),
        Ok(Err(_)) => Err(ApiError::malformed_json("the body could not be read")),
    }
}

/// Checks the content type, reads at most `limit` bytes within `deadline`, and parses.
async fn json_body<T: serde::de::DeserializeOwned>(
    req: Request<Incoming>,
    limit: usize,
    deadline: Duration,
) -> Result<T, ApiError> {
    require_json(req.headers())?;
    let body = read_body(req, limit, deadline).await?;
    parse_json(&body)
}

/// Parses a JSON object into `T`. serde also fills a struct from a JSON array of its
/// fields in order (`[1, "tok_visa"]`), which the API does not accept: every body is an
/// object, and any other JSON value is `invalid_body` (found by the `order_body` fuzz
/// target, as was `[1,"",""]`, which serde calls a syntax error).
fn parse_json<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    if body.trim_ascii_start().first() != Some(&b'{') {
        return Err(
            match serde_json::from_slice::<serde::de::IgnoredAny>(body) {
                Ok(_) => ApiError::invalid_body("the body must be a JSON object"),
                Err(e) => parse_error(e),
            },
        );
    }
    serde_json::from_slice(body).map_err(parse_error)
}

fn idempotency_key(headers: &HeaderMap) -> Result<String, ApiError> {
    let v = headers
        .get("idempotency-key")
        .ok_or_else(|| ApiError::missing_idempotency_key("send an Idempotency-Key header"))?;
    let s = v
        .to_str()
        .map_err(|_| ApiError::invalid_idempotency_key("the key must be visible ASCII"))?;
    if s.is_empty() || s.len() > 128 || !s.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(ApiError::invalid_idempotency_key(
            "the key must be 1 to 128 visible ASCII characters",
        ));
    }
    Ok(s.to_owned())
}

/// Digest of an order body's meaningful content: a retry with the same key must carry the
/// same quantity and payment token.
pub fn fingerprint(quantity: u32, payment_token: &str) -> String {
    let mut h = Sha256::new();
    h.update(quantity.to_le_bytes());
    h.update(payment_token.as_bytes());
    let digest = h.finalize();
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(32);
    for b in &digest[..16] {
        out.push(char::from(HEX[usize::from(b >> 4)]));
        out.push(char::from(HEX[usize::from(b & 0x0f)]));
    }
    out
}

fn sale_view(sale: &Sale, stock_left: Option<i64>) -> SaleView {
    SaleView {
        id: sale.id.clone(),
        sku: sale.sku.clone(),
        stock: sale.stock,
        stock_left,
        price_cents: sale.price.minor,
        currency: sale.price.currency,
        starts_at: sale.starts_at,
        ends_at: sale.ends_at,
        per_user_limit: sale.per_user_limit,
        max_quantity_per_order: sale.max_quantity_per_order,
        user_rate: sale.user_rate,
    }
}

impl CreateSale {
    /// The sale this body defines, with defaults applied, validated.
    pub fn into_sale(self, now: Timestamp) -> Result<Sale, ApiError> {
        let invalid = |e: storage::InvalidValue| ApiError::invalid_sale(e.to_string());
        let id = match self.id {
            Some(id) => SaleId::parse(id).map_err(invalid)?,
            None => SaleId::generate(),
        };
        let starts_at = self.starts_at.unwrap_or(now);
        let per_user_limit = self.per_user_limit.unwrap_or(1);
        let sale = Sale {
            id,
            sku: self.sku,
            stock: self.stock,
            price: Money {
                minor: self.price_cents,
                currency: Currency::parse(&self.currency).map_err(invalid)?,
            },
            starts_at,
            ends_at: self
                .ends_at
                .unwrap_or(starts_at.plus_millis(24 * 3600 * 1000)),
            per_user_limit,
            max_quantity_per_order: self.max_quantity_per_order.unwrap_or(per_user_limit),
            user_rate: self.user_rate.unwrap_or_default(),
            created_at: now,
        };
        sale.validate().map_err(invalid)?;
        Ok(sale)
    }
}

fn route_name(method: &Method, segments: &[&str]) -> &'static str {
    match (method, segments) {
        (_, ["v1", "sales", _, "orders"]) => "order",
        (_, ["v1", "sales"]) => "sales",
        (_, ["v1", "sales", _]) => "sale",
        (_, ["v1", "sales", _, "stats"]) => "stats",
        (_, ["v1", "sales", _, "stock"]) => "stock",
        (_, ["v1", "orders", _]) => "order_status",
        (_, ["healthz"]) => "healthz",
        (_, ["readyz"]) => "readyz",
        (_, ["metrics"]) => "metrics",
        _ => "other",
    }
}

impl Ingest {
    /// Builds the API over its backends.
    pub fn new(
        admission: Arc<dyn Admission>,
        log: Arc<dyn OrderLog>,
        store: Arc<dyn OrderStore>,
        auth: Auth,
        config: ApiConfig,
    ) -> Self {
        let loader_store = Arc::clone(&store);
        let sales = SaleCache::new(
            config.sale_cache_capacity,
            config.sale_cache_ttl,
            Arc::new(move |id: SaleId| {
                let store = Arc::clone(&loader_store);
                Box::pin(async move { store.get_sale(&id).await })
            }),
        );
        let confirmer = Arc::new(Confirmer::new(
            Arc::clone(&admission),
            ConfirmConfig {
                capacity: config.confirm_queue,
                batch_max: config.confirm_batch_max,
                attempts: CONFIRM_ATTEMPTS,
                backoff: CONFIRM_BACKOFF,
            },
        ));
        let metrics = Metrics::default();
        let sale_gauges = SaleGauges::default();
        let mut registry = metrics.registry();
        registry.register_collector(Box::new(sale_gauges.clone()));
        Ingest {
            admission,
            log,
            store,
            auth,
            sales,
            recent: moka::sync::Cache::builder()
                .max_capacity(1_000_000)
                .time_to_live(Duration::from_secs(600))
                .build(),
            durable: moka::sync::Cache::builder()
                .max_capacity(100_000)
                .time_to_live(Duration::from_secs(600))
                .build(),
            confirmer,
            rates: DashMap::new(),
            metrics,
            registry: Arc::new(registry),
            sale_gauges,
            readiness: None,
            config,
        }
    }

    /// Makes `/readyz` answer 503 `settler_stage_down` (with the stage in `stage`) while
    /// `check` names a settler stage that is down.
    pub fn with_readiness(mut self, check: ReadinessCheck) -> Self {
        self.readiness = Some(check);
        self
    }

    /// The per-sale gauges (a collector to register in the process's registry).
    pub fn sale_gauges(&self) -> SaleGauges {
        self.sale_gauges.clone()
    }

    /// Refreshes the per-sale gauges every [`SALE_GAUGES_EVERY`] until `shutdown`.
    pub async fn run_sale_gauges(self: Arc<Self>, shutdown: CancellationToken) {
        let mut tick = tokio::time::interval(SALE_GAUGES_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return,
                _ = tick.tick() => self.refresh_sale_gauges().await,
            }
        }
    }

    /// One refresh of the per-sale gauges: the stats of each exported sale, read as
    /// `GET /v1/sales/{id}/stats` reads them (so they agree). A sale is exported while it
    /// is open and, after its end, until every accepted order of it is settled (at most an
    /// hour); at most [`SALE_GAUGES_MAX`] sales. A sale whose stats cannot be read keeps
    /// its last ones.
    pub async fn refresh_sale_gauges(&self) {
        let now = Timestamp::now();
        let relist = {
            let r = self.sale_gauges.refresh.lock();
            r.listed_at.is_none_or(|t| t.elapsed() >= SALE_LIST_EVERY)
        };
        if relist {
            match self.store.list_sales().await {
                Ok(mut sales) => {
                    sales.retain(|s| now < s.ends_at.plus_millis(SALE_GAUGES_AFTER_END_MS));
                    sales.sort_by_key(|s| std::cmp::Reverse(s.starts_at));
                    sales.truncate(SALE_GAUGES_MAX);
                    let mut r = self.sale_gauges.refresh.lock();
                    r.sales = sales;
                    r.listed_at = Some(Instant::now());
                }
                Err(e) => tracing::debug!(error = %e, "per-sale gauges: listing the sales failed"),
            }
        }
        let sales = self.sale_gauges.refresh.lock().sales.clone();
        let mut previous: std::collections::HashMap<String, SaleStats> = self
            .sale_gauges
            .snapshot()
            .into_iter()
            .map(|s| (s.sale_id.clone(), s))
            .collect();
        let mut out = Vec::with_capacity(sales.len());
        for sale in &sales {
            let stats = match self.sale_stats(&sale.id).await {
                Ok(stats) => stats,
                Err(_) => match previous.remove(sale.id.as_str()) {
                    Some(stats) => stats,
                    None => continue,
                },
            };
            let settled = stats.persisted >= stats.accepted
                && stats.persisted == stats.paid + stats.payment_failed + stats.expired;
            if now >= sale.ends_at && settled {
                continue;
            }
            out.push(stats);
        }
        self.sale_gauges.set(out);
    }

    /// Uses `metrics` for this instance's families and renders `registry` (the process's,
    /// which holds them) on `GET /metrics`.
    pub fn with_metrics(mut self, metrics: Metrics, registry: Arc<Registry>) -> Self {
        self.metrics = metrics;
        self.registry = registry;
        self
    }

    /// Sends the confirmations still queued and stops the background confirmer; call it
    /// once the server stopped taking requests. Confirmations handed over later (a request
    /// still in flight) are sent inline.
    pub async fn shutdown(&self) {
        self.confirmer.shutdown().await;
    }

    /// Answers one request. Every answer is counted and timed by route and status, and
    /// every answer of the order route also by its outcome and code, from the final
    /// response (validation and auth refusals included).
    pub async fn handle(&self, req: Request<Incoming>) -> Resp {
        let started = Instant::now();
        let method = req.method().clone();
        let path = req.uri().path().to_owned();
        let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
        let route = route_name(&method, &segments);
        let result = match (&method, segments.as_slice()) {
            (&Method::POST, ["v1", "sales", id, "orders"]) => self.post_order(id, req).await,
            _ => self.route(&method, &segments, req).await.map(|r| (r, "")),
        };
        let (resp, code) = match result {
            Ok(answered) => answered,
            Err(e) => {
                let code = e.code;
                (e.into_response(), code)
            }
        };
        let elapsed = started.elapsed();
        let status = resp.status().as_u16();
        if route == "order" {
            self.metrics.record_order_answer(code, status, elapsed);
        }
        self.metrics.record_response(route, status, elapsed);
        resp
    }

    /// `GET /metrics`: OpenMetrics for a client asking for it (Prometheus), else the text
    /// format 0.0.4 (see [`metrics::render`]).
    fn metrics_response(&self, headers: &HeaderMap) -> Resp {
        let accept = headers.get(header::ACCEPT).and_then(|v| v.to_str().ok());
        let (body, content_type) =
            metrics::render(&self.registry, metrics::wants_openmetrics(accept));
        text(StatusCode::OK, body, content_type)
    }

    async fn route(
        &self,
        method: &Method,
        segments: &[&str],
        req: Request<Incoming>,
    ) -> Result<Resp, ApiError> {
        match (method, segments) {
            (&Method::POST, ["v1", "sales"]) => self.create_sale(req).await,
            (&Method::GET, ["v1", "sales", id]) => self.get_sale(id).await,
            (&Method::GET, ["v1", "sales", id, "stats"]) => {
                self.auth.operator(req.headers())?;
                self.stats(id).await
            }
            (&Method::POST, ["v1", "sales", id, "stock"]) => self.add_stock(id, req).await,
            (&Method::GET, ["v1", "orders", id]) => self.get_order(id, req.headers()).await,
            (&Method::GET, ["healthz"]) => {
                Ok(json(StatusCode::OK, &serde_json::json!({"status": "ok"})))
            }
            (&Method::GET, ["readyz"]) => self.ready().await,
            (&Method::GET, ["metrics"]) => Ok(self.metrics_response(req.headers())),
            (_, ["v1", "sales", _, "orders" | "stock"] | ["v1", "sales"]) => Err(
                ApiError::method_not_allowed(format!("{method} is not allowed here")).allow("POST"),
            ),
            (
                _,
                ["v1", "sales", _]
                | ["v1", "sales", _, "stats"]
                | ["v1", "orders", _]
                | ["healthz" | "readyz" | "metrics"],
            ) => Err(
                ApiError::method_not_allowed(format!("{method} is not allowed here")).allow("GET"),
            ),
            _ => Err(ApiError::not_found("no such route")),
        }
    }

    async fn sale(&self, id: &SaleId) -> Result<Option<Arc<Sale>>, ApiError> {
        // From memory; only a sale never seen waits for the store (one load for all).
        self.sales
            .get(id)
            .await
            .map_err(|e| match Arc::try_unwrap(e) {
                Ok(e) => store_error(e),
                Err(shared) => store_error(storage::Error::unavailable("loading the sale", shared)),
            })
    }

    /// The order route; on success also the answer's code (`accepted` or `replayed`).
    async fn post_order(
        &self,
        sale_id: &str,
        req: Request<Incoming>,
    ) -> Result<(Resp, &'static str), ApiError> {
        let user = self.auth.buyer(req.headers())?;
        let key = idempotency_key(req.headers())?;
        require_json(req.headers())?;
        let body = read_body(
            req,
            self.config.order_body_limit,
            self.config.body_read_timeout,
        )
        .await?;
        let body = parse_order_body(&body)?;
        let sale_id = SaleId::parse(sale_id).map_err(|_| ApiError::unknown_sale("no such sale"))?;
        let sale = self
            .sale(&sale_id)
            .await?
            .ok_or_else(|| ApiError::unknown_sale("no such sale"))?;
        let quantity = body.quantity_within(sale.max_quantity_per_order)?;
        let admit = AdmitRequest {
            user,
            quantity,
            fingerprint: fingerprint(quantity, &body.payment_token),
            key,
            order_id: OrderId::new(),
        };
        let decided = tokio::time::timeout(
            self.config.decision_timeout,
            self.admission.admit(&sale_id, &admit),
        )
        .await;
        let decision = match decided {
            Ok(Ok(d)) => d,
            outcome => {
                // Timed out or failed after sending: the decision may have taken stock. Undo
                // it in the background; abort gives back only what this order holds, so a
                // decision that never ran costs nothing. If the backend stays down, the
                // buyer's retry answers in-progress until reconcile repairs the counters.
                let (admission, task_sale) = (Arc::clone(&self.admission), sale_id.clone());
                let oref = OrderRef {
                    order_id: admit.order_id,
                    user: admit.user.clone(),
                    quantity,
                    key: admit.key.clone(),
                };
                tokio::spawn(async move {
                    if let Err(e) = admission.abort(&task_sale, &oref).await {
                        tracing::warn!(error = %e, order = %oref.order_id, "abort of an unknown decision failed");
                    }
                });
                return Err(match outcome {
                    Ok(Err(e)) => admission_error(e),
                    _ => ApiError::unavailable("admission decision timed out").retry_after(1),
                });
            }
        };
        let (answer, code) = match decision {
            Decision::Accepted(answer) => {
                let accepted_at = Timestamp::now();
                let record = OrderRecord {
                    v: RECORD_VERSION,
                    order_id: answer.order_id,
                    sale_id: sale_id.clone(),
                    user_id: admit.user.clone(),
                    quantity,
                    amount_minor: sale.price.minor * i64::from(quantity),
                    currency: sale.price.currency,
                    sequence: answer.sequence,
                    idempotency_key: admit.key.clone(),
                    fingerprint: admit.fingerprint.clone(),
                    payment_token: body.payment_token,
                    accepted_at,
                };
                let oref = OrderRef {
                    order_id: answer.order_id,
                    user: admit.user.clone(),
                    quantity,
                    key: admit.key.clone(),
                };
                // The append and its confirm-or-abort run in their own task: a buyer who
                // hangs up (which drops this future) must not leave the answer
                // unconfirmed or the stock taken. No deadline here: the embedded log
                // completes or fails every append, and abandoning an append that may
                // still land would release the stock of a durable order. The confirmation
                // is only queued (the confirmer sends it in a batch); the answer is
                // remembered here first, so a retry on this instance gets its 202.
                let (log, admission) = (Arc::clone(&self.log), Arc::clone(&self.admission));
                let (confirmer, answers) = (Arc::clone(&self.confirmer), self.durable.clone());
                let idem: IdemKey = (sale_id.clone(), admit.user.clone(), admit.key.clone());
                let remembered = DurableAnswer {
                    fingerprint: admit.fingerprint.clone(),
                    answer,
                };
                let task_sale = sale_id.clone();
                let durable = tokio::spawn(async move {
                    if let Err(e) = log.append(&record).await {
                        // Refused, or the outcome is unknown (a delivery timeout). Abort: if
                        // the settler already read the record, the abort is refused and the
                        // order stands; otherwise the stock goes back, and should the record
                        // land later, the settler's claim fails and it cancels the order.
                        tracing::warn!(error = %e, order = %oref.order_id, "append failed; aborting admission");
                        match admission.abort(&task_sale, &oref).await {
                            Ok(AbortOutcome::AlreadyClaimed) => {}
                            Ok(_) => return false,
                            Err(e) => {
                                tracing::error!(error = %e, order = %oref.order_id, "abort failed; reconcile repairs the counters");
                                return false;
                            }
                        }
                    }
                    answers.insert(idem, remembered);
                    confirmer.confirm(task_sale, oref).await;
                    true
                })
                .await
                .unwrap_or(false);
                if !durable {
                    return Err(ApiError::unavailable("order log unavailable").retry_after(1));
                }
                self.recent.insert(
                    answer.order_id,
                    RecentOrder {
                        user: admit.user,
                        sale_id: sale_id.clone(),
                        sequence: answer.sequence,
                        quantity,
                        accepted_at,
                    },
                );
                self.rates
                    .entry(sale_id.clone())
                    .or_default()
                    .add(accepted_at.millis() / 1000, 1);
                (answer, outcome::ACCEPTED)
            }
            Decision::Replayed(answer) => (answer, outcome::REPLAYED),
            Decision::InProgress => {
                // Durable and answered by this instance, confirmation not landed yet.
                let idem: IdemKey = (sale_id.clone(), admit.user.clone(), admit.key.clone());
                if let Some(d) = self
                    .durable
                    .get(&idem)
                    .filter(|d| d.fingerprint == admit.fingerprint)
                {
                    return Ok((accepted_response(&sale_id, &d.answer), outcome::REPLAYED));
                }
                return Err(ApiError::request_in_progress(
                    "the first request with this key is still being processed",
                )
                .retry_after(1));
            }
            Decision::Rejected(r) => {
                return Err(match r {
                    Rejection::IdempotencyConflict => ApiError::idempotency_conflict(
                        "this Idempotency-Key was used with a different body",
                    ),
                    Rejection::UnknownSale => ApiError::unknown_sale("no such sale"),
                    Rejection::NotActive => ApiError::sale_not_active("the sale is not open"),
                    Rejection::RateLimited { retry_after_s } => {
                        ApiError::rate_limited("slow down").retry_after(retry_after_s)
                    }
                    Rejection::LimitExceeded => ApiError::limit_exceeded(format!(
                        "at most {} units per user",
                        sale.per_user_limit
                    )),
                    Rejection::SoldOut => ApiError::sold_out("no stock left"),
                    Rejection::Capacity { retry_after_s: 0 } => ApiError::capacity_exceeded(
                        "the sale has taken the most orders this server holds for one sale",
                    ),
                    Rejection::Capacity { retry_after_s } => ApiError::capacity_exceeded(
                        "too many buyers at once for this server; retry later",
                    )
                    .retry_after(retry_after_s),
                });
            }
        };
        Ok((accepted_response(&sale_id, &answer), code))
    }

    async fn create_sale(&self, req: Request<Incoming>) -> Result<Resp, ApiError> {
        self.auth.operator(req.headers())?;
        let body: CreateSale = json_body(
            req,
            self.config.admin_body_limit,
            self.config.body_read_timeout,
        )
        .await?;
        let sale = body.into_sale(Timestamp::now())?;
        // Catalog first (durable), then the counters, in a task of their own so a client
        // that hangs up cannot leave the two apart.
        let (store, admission, task_sale) = (
            Arc::clone(&self.store),
            Arc::clone(&self.admission),
            sale.clone(),
        );
        tokio::spawn(async move {
            store.create_sale(&task_sale).await.map_err(store_error)?;
            match admission.create_sale(&task_sale).await {
                Ok(()) | Err(admission::Error::SaleExists(_)) => Ok(()),
                Err(e) => Err(admission_error(e)),
            }
        })
        .await
        .map_err(|_| ApiError::internal("creating the sale failed"))??;
        self.sales.put(sale.clone()).await;
        // The per-sale gauges pick the new sale up at their next refresh.
        self.sale_gauges.refresh.lock().listed_at = None;
        let mut resp = json(
            StatusCode::CREATED,
            &sale_view(&sale, Some(i64::from(sale.stock))),
        );
        if let Ok(v) = HeaderValue::from_str(&format!("/v1/sales/{}", sale.id)) {
            resp.headers_mut().insert(header::LOCATION, v);
        }
        Ok(resp)
    }

    async fn get_sale(&self, id: &str) -> Result<Resp, ApiError> {
        let id = SaleId::parse(id).map_err(|_| ApiError::unknown_sale("no such sale"))?;
        let sale = self
            .store
            .get_sale(&id)
            .await
            .map_err(store_error)?
            .ok_or_else(|| ApiError::unknown_sale("no such sale"))?;
        Ok(json(
            StatusCode::OK,
            &sale_view(&sale, self.stock_left(&id).await),
        ))
    }

    async fn add_stock(&self, id: &str, req: Request<Incoming>) -> Result<Resp, ApiError> {
        self.auth.operator(req.headers())?;
        let id = SaleId::parse(id).map_err(|_| ApiError::unknown_sale("no such sale"))?;
        let body: AddStock = json_body(
            req,
            self.config.admin_body_limit,
            self.config.body_read_timeout,
        )
        .await?;
        let units = body.quantity.within(100_000_000)?;
        // Catalog first (durable), then the counters, in a task of their own so a client
        // that hangs up cannot leave the two apart.
        let (store, admission, task_id) = (
            Arc::clone(&self.store),
            Arc::clone(&self.admission),
            id.clone(),
        );
        let sale = tokio::spawn(async move {
            let sale = store
                .add_stock(&task_id, units)
                .await
                .map_err(store_error)?;
            admission
                .add_stock(&task_id, units)
                .await
                .map_err(admission_error)?;
            Ok::<_, ApiError>(sale)
        })
        .await
        .map_err(|_| ApiError::internal("adding stock failed"))??;
        self.sales.put(sale.clone()).await;
        Ok(json(
            StatusCode::OK,
            &sale_view(&sale, self.stock_left(&id).await),
        ))
    }

    /// Units not taken, if the admission backend knows the sale and answers.
    async fn stock_left(&self, id: &SaleId) -> Option<i64> {
        self.admission
            .counters(id)
            .await
            .ok()
            .flatten()
            .map(|c| c.stock_left)
    }

    /// The stats of a sale, from the admission backend and the store.
    pub async fn sale_stats(&self, id: &SaleId) -> Result<SaleStats, ApiError> {
        let counters = self
            .admission
            .counters(id)
            .await
            .map_err(admission_error)?
            .ok_or_else(|| ApiError::unknown_sale("no such sale"))?;
        let totals = self.store.sale_totals(id).await.map_err(store_error)?;
        let now_s = Timestamp::now().millis() / 1000;
        Ok(SaleStats {
            sale_id: id.to_string(),
            stock: counters.stock,
            stock_left: counters.stock_left,
            accepted: counters.accepted_orders,
            accepted_units: counters.accepted_units,
            rejected: counters.rejected.into_iter().collect(),
            persisted: totals.orders,
            payment_pending: totals.get(OrderStatus::PaymentPending).orders,
            paid: totals.get(OrderStatus::Paid).orders,
            payment_failed: totals.get(OrderStatus::PaymentFailed).orders,
            expired: totals.get(OrderStatus::Expired).orders,
            released: totals.released_orders,
            released_units: totals.released_units,
            throughput_per_s: self.rates.get(id).map_or(0.0, |r| r.per_second(now_s)),
        })
    }

    async fn stats(&self, id: &str) -> Result<Resp, ApiError> {
        let id = SaleId::parse(id).map_err(|_| ApiError::unknown_sale("no such sale"))?;
        Ok(json(StatusCode::OK, &self.sale_stats(&id).await?))
    }

    async fn get_order(&self, id: &str, headers: &HeaderMap) -> Result<Resp, ApiError> {
        let user = self.auth.buyer(headers)?;
        let not_found = || ApiError::unknown_order("no such order");
        let id: OrderId = id.parse().map_err(|_| not_found())?;
        if let Some(order) = self.store.get_order(id).await.map_err(store_error)? {
            return if order.new.user_id == user {
                Ok(json(StatusCode::OK, &order_view(order)))
            } else {
                Err(not_found())
            };
        }
        match self.recent.get(&id) {
            Some(r) if r.user == user => Ok(json(
                StatusCode::OK,
                &OrderView {
                    order_id: id,
                    sale_id: r.sale_id,
                    sequence: r.sequence,
                    quantity: r.quantity,
                    status: OrderStatus::Accepted,
                    history: vec![storage::HistoryEntry {
                        status: OrderStatus::Accepted,
                        at: r.accepted_at,
                    }],
                },
            )),
            _ => Err(not_found()),
        }
    }

    async fn ready(&self) -> Result<Resp, ApiError> {
        // A dead stage of the in-process settler: orders would be accepted and never
        // settled. Checked first: it needs no I/O.
        if let Some(stage) = self.readiness.as_ref().and_then(|check| check()) {
            return Err(ApiError::settler_stage_down(format!(
                "the settler's {stage} stage is down; it is being restarted"
            ))
            .member("stage", stage)
            .retry_after(1));
        }
        let admission = self.admission.ping().await.is_ok();
        let log = self.log.ping().await.is_ok();
        let store = self.store.ping().await.is_ok();
        let body = serde_json::json!({"admission": admission, "log": log, "store": store});
        if admission && log && store {
            Ok(json(StatusCode::OK, &body))
        } else {
            let mut resp = json(StatusCode::SERVICE_UNAVAILABLE, &body);
            resp.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
            Ok(resp)
        }
    }
}

/// The 202 of an accepted (or replayed) order.
fn accepted_response(sale_id: &SaleId, answer: &Answer) -> Resp {
    let mut resp = json(
        StatusCode::ACCEPTED,
        &serde_json::json!({
            "order_id": answer.order_id,
            "sale_id": sale_id,
            "sequence": answer.sequence,
            "quantity": answer.quantity,
            "status": "accepted",
        }),
    );
    if let Ok(v) = HeaderValue::from_str(&format!("/v1/orders/{}", answer.order_id)) {
        resp.headers_mut().insert(header::LOCATION, v);
    }
    resp
}

fn order_view(order: Order) -> OrderView {
    OrderView {
        order_id: order.new.order_id,
        sale_id: order.new.sale_id,
        sequence: order.new.sequence,
        quantity: order.new.quantity,
        status: order.status,
        history: order.history,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_integer_out_of_range_is_an_invalid_quantity() {
        let code = |json: &str| match serde_json::from_str::<Quantity>(json)
            .expect("a number")
            .within(10)
        {
            Ok(q) => format!("ok {q}"),
            Err(e) => e.code.to_owned(),
        };
        assert_eq!(code("1"), "ok 1");
        assert_eq!(code("10"), "ok 10");
        for out in [
            "0",
            "-1",
            "11",
            "4294967297",
            "9223372036854775807",
            "9223372036854775808",
            "18446744073709551616",
            "-9223372036854775809",
            "100000000000000000000000000000000000000000000",
            "1e30",
        ] {
            assert_eq!(code(out), "invalid_quantity", "{out}");
        }
        for not_integer in ["1.5", "2.0", "1e2"] {
            assert_eq!(code(not_integer), "invalid_body", "{not_integer}");
        }
    }

    #[test]
    fn fingerprint_is_the_hex_of_the_first_half_of_sha256() {
        let mut h = Sha256::new();
        h.update(2u32.to_le_bytes());
        h.update(b"tok_visa");
        let want: String = h.finalize()[..16]
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        assert_eq!(fingerprint(2, "tok_visa"), want);
        assert_eq!(fingerprint(2, "tok_visa").len(), 32);
        assert_ne!(fingerprint(1, "tok_visa"), fingerprint(2, "tok_visa"));
    }

    #[test]
    fn bodies_must_be_objects_not_arrays_of_the_fields() {
        let code = |r: Result<OrderBody, ApiError>| r.map(|_| ()).map_err(|e| e.code);
        assert_eq!(
            code(parse_order_body(br#"[1,"tok_visa"]"#)),
            Err("invalid_body")
        );
        assert_eq!(code(parse_order_body(br#"[1,"",""]"#)), Err("invalid_body"));
        assert_eq!(code(parse_order_body(b"42")), Err("invalid_body"));
        assert_eq!(code(parse_order_body(b" [1,")), Err("malformed_json"));
        assert_eq!(
            code(parse_order_body(
                br#" {"quantity":1,"payment_token":"tok_visa"}"#
            )),
            Ok(())
        );
        let sale = br#"[null,"sku",10,100,"EUR",null,null,null,null,null]"#;
        assert_eq!(
            parse_json::<CreateSale>(sale)
                .map(|_| ())
                .map_err(|e| e.code),
            Err("invalid_body")
        );
    }
}
