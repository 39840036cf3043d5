//! The v1 HTTP API: the [`Ingest`] type every route runs on, its settings, and routing.
//!
//! A module per concern: `orders` (the order path and order status), `sales` (catalog
//! routes and sale stats), `health` (`/healthz`, `/readyz`, `/metrics` and the per-sale
//! gauges), `body` (what requests carry: bodies, headers, the body fingerprint) and
//! `answer` (the views and responses). Refusals of every layer become problems in
//! [`crate::problem`]. Every error is problem+json with a stable code and changes nothing.
//!
//! The order path is: authenticate, check headers, read at most `order_body_limit` bytes,
//! parse, look the sale up (from memory, see `sale_cache.rs`), decide in the admission
//! backend (one call), append the record to the log and answer 202 only once the log has
//! it. The idempotency answer is then confirmed in the background, in batches (see
//! `confirmer.rs`): one admission round trip per accepted order while the buyer waits. If
//! the log refuses the record, the admission is aborted (stock back, idempotency answer
//! forgotten) and the buyer gets 503.
//!
//! A retry that arrives after the append returned but before the confirmation landed gets
//! `request_in_progress` from the backend; this instance remembers the durable answers it
//! gave and answers such a retry with the order's 202 instead. Another instance answers it
//! 409 `request_in_progress` with `Retry-After` (never a 202 for an order not yet durable).

mod answer;
mod body;
mod health;
mod orders;
mod receipts;
mod sales;

pub use answer::{OrderView, SaleStats, SaleView};
pub use body::{fingerprint, parse_order_body, CreateSale, OrderBody};
pub use health::{SALE_GAUGES_EVERY, SALE_GAUGES_MAX};
pub use receipts::{DocumentError, DocumentReader};

use crate::admission::Admission;
use crate::auth::Auth;
use crate::confirmer::{ConfirmConfig, Confirmer};
use crate::metrics::{Metrics, RateWindow, SaleGauges};
use crate::problem::ApiError;
use crate::sale_cache::SaleCache;
use answer::Resp;
use dashmap::DashMap;
use http::{Method, Request};
use hyper::body::Incoming;
use orders::{DurableAnswer, IdemKey, RecentOrder};
use prometheus_client::registry::Registry;
use sequencer::OrderLog;
use std::sync::Arc;
use std::time::{Duration, Instant};
use storage::{OrderId, OrderStore, SaleId};

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
    /// Where `GET /v1/orders/{id}/receipt` reads documents; see [`Ingest::with_documents`].
    documents: Option<Arc<dyn DocumentReader>>,
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

/// The name a route is counted under in the metrics.
fn route_name(method: &Method, segments: &[&str]) -> &'static str {
    match (method, segments) {
        (_, ["v1", "sales", _, "orders"]) => "order",
        (_, ["v1", "sales"]) => "sales",
        (_, ["v1", "sales", _]) => "sale",
        (_, ["v1", "sales", _, "stats"]) => "stats",
        (_, ["v1", "sales", _, "stock"]) => "stock",
        (_, ["v1", "orders", _]) => "order_status",
        (_, ["v1", "orders", _, "receipt"]) => "receipt",
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
            documents: None,
            config,
        }
    }

    /// Makes `/readyz` answer 503 `settler_stage_down` (with the stage in `stage`) while
    /// `check` names a settler stage that is down.
    pub fn with_readiness(mut self, check: ReadinessCheck) -> Self {
        self.readiness = Some(check);
        self
    }

    /// Serves the orders' documents (`GET /v1/orders/{id}/receipt`) from `reader`; without
    /// it, an order with a document gets 503 `unavailable`.
    pub fn with_documents(mut self, reader: Arc<dyn DocumentReader>) -> Self {
        self.documents = Some(reader);
        self
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

    /// Every route but the order route (which also returns its outcome code).
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
            (&Method::GET, ["v1", "orders", id, "receipt"]) => {
                self.get_receipt(id, req.headers()).await
            }
            (&Method::GET, ["healthz"]) => Ok(health::healthz()),
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
                | ["v1", "orders", _, "receipt"]
                | ["healthz" | "readyz" | "metrics"],
            ) => Err(
                ApiError::method_not_allowed(format!("{method} is not allowed here")).allow("GET"),
            ),
            _ => Err(ApiError::not_found("no such route")),
        }
    }
}
