//! The mock payment and notification provider: a real HTTP/1 server (hyper) that tests,
//! `flashsale demo` and `flashsale mock-provider` run in place of real providers.
//!
//! It keeps every charge, refund and notification by idempotency key in memory and counts
//! per order what it saw, so a test can prove "at most one successful charge per order" and
//! "one notification per order" from the provider's side ([`fetch_audit`]). Latency,
//! declines and 500 errors are injected per [`MockConfig`], which `POST /v1/admin/config`
//! changes at run time (an outage and its end, in a test).
//!
//! Routes: `POST /v1/charges`, `GET /v1/charges/{key}`, `POST /v1/refunds`,
//! `POST /v1/notifications`, `GET /v1/audit`, `GET /v1/audit/{order_id}`,
//! `GET|POST /v1/admin/config`, `GET /healthz`. Errors are RFC 9457 problem+json with a
//! stable `code`. State grows with the orders seen; the mock is for tests and demos.

use crate::provider::{
    self, Charge, ChargeRequest, ChargeStatus, NotificationKind, NotificationRequest,
    ProviderError, Refund, RefundRequest, RefundStatus, IDEMPOTENCY_KEY,
};
use bytes::Bytes;
use http::{header, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use parking_lot::Mutex;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};
use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Largest request body the mock reads.
const MAX_BODY: usize = 64 * 1024;
/// Most connections served at once.
const MAX_CONNECTIONS: usize = 1024;
/// Longest an idempotency key may be.
const MAX_KEY: usize = 255;

/// How the mock behaves. Durations are humantime strings (`"5ms"`) in JSON and TOML.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MockConfig {
    /// Fixed delay added to every charge and notification.
    #[serde(with = "humantime_serde")]
    pub latency: Duration,
    /// Extra delay drawn uniformly from `0..=latency_jitter`.
    #[serde(with = "humantime_serde")]
    pub latency_jitter: Duration,
    /// Probability in `0..=1` that a charge is declined (tokens starting with
    /// `tok_decline` are always declined).
    pub decline_rate: f64,
    /// Probability in `0..=1` that a charge or notification is answered 500 without being
    /// recorded.
    pub error_rate: f64,
    /// Seed of the random draws, for repeatable runs; from the OS when absent.
    pub seed: Option<u64>,
}

impl Default for MockConfig {
    fn default() -> Self {
        MockConfig {
            latency: Duration::ZERO,
            latency_jitter: Duration::ZERO,
            decline_rate: 0.0,
            error_rate: 0.0,
            seed: None,
        }
    }
}

impl MockConfig {
    /// Checks that the rates are probabilities; names the offending key otherwise.
    pub fn validate(&self) -> Result<(), &'static str> {
        if !(0.0..=1.0).contains(&self.decline_rate) {
            return Err("decline_rate must be between 0 and 1");
        }
        if !(0.0..=1.0).contains(&self.error_rate) {
            return Err("error_rate must be between 0 and 1");
        }
        Ok(())
    }
}

/// What the mock saw of one order.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct OrderAudit {
    /// Charge requests answered 200, repeats of a key included (500s are not attempts).
    pub charge_attempts: u64,
    /// Distinct charges that succeeded.
    pub successful_charges: u64,
    /// Distinct charges that were declined.
    pub declined_charges: u64,
    /// Distinct refunds.
    pub refunds: u64,
    /// Notifications delivered, one entry per distinct key, in arrival order.
    pub notifications: Vec<NotificationKind>,
    /// Notifications whose key had been delivered before.
    pub duplicate_notifications: u64,
}

/// Totals over all orders.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditTotals {
    /// Distinct charges created.
    pub charges: u64,
    /// Distinct charges that succeeded.
    pub successful_charges: u64,
    /// Distinct charges that were declined.
    pub declined_charges: u64,
    /// Requests answered 500 by error injection.
    pub errors: u64,
    /// Distinct refunds.
    pub refunds: u64,
    /// Distinct notifications delivered.
    pub notifications: u64,
}

/// Everything the mock saw: `GET /v1/audit`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Audit {
    /// Per order, by order id.
    pub orders: BTreeMap<String, OrderAudit>,
    /// Over all orders.
    pub totals: AuditTotals,
}

struct StoredCharge {
    charge: Charge,
    amount_minor: i64,
}

struct Inner {
    config: MockConfig,
    rng: StdRng,
    /// By idempotency key.
    charges: HashMap<String, StoredCharge>,
    /// Charge id to the idempotency key of its charge.
    charge_ids: HashMap<String, String>,
    /// By idempotency key.
    refunds: HashMap<String, Refund>,
    refunded_charges: HashSet<String>,
    notifications: HashSet<String>,
    audit: Audit,
}

impl Inner {
    fn new(config: MockConfig) -> Self {
        let rng = match config.seed {
            Some(seed) => StdRng::seed_from_u64(seed),
            None => StdRng::from_os_rng(),
        };
        Inner {
            config,
            rng,
            charges: HashMap::new(),
            charge_ids: HashMap::new(),
            refunds: HashMap::new(),
            refunded_charges: HashSet::new(),
            notifications: HashSet::new(),
            audit: Audit::default(),
        }
    }

    /// Draws the delay and whether to fail for one injected request.
    fn inject(&mut self) -> (Duration, bool) {
        let jitter = self.config.latency_jitter.as_micros() as u64;
        let extra = if jitter == 0 {
            0
        } else {
            self.rng.random_range(0..=jitter)
        };
        let delay = self.config.latency + Duration::from_micros(extra);
        let fail =
            self.config.error_rate > 0.0 && self.rng.random::<f64>() < self.config.error_rate;
        if fail {
            self.audit.totals.errors += 1;
        }
        (delay, fail)
    }

    fn order(&mut self, order_id: &str) -> &mut OrderAudit {
        self.audit.orders.entry(order_id.to_owned()).or_default()
    }
}

struct State {
    inner: Mutex<Inner>,
}

type Reply = Response<Full<Bytes>>;

/// A refused request, answered as RFC 9457 problem+json with a stable `code`.
#[derive(Debug)]
struct Problem {
    status: StatusCode,
    code: &'static str,
    detail: Cow<'static, str>,
}

fn problem(
    status: StatusCode,
    code: &'static str,
    detail: impl Into<Cow<'static, str>>,
) -> Problem {
    Problem {
        status,
        code,
        detail: detail.into(),
    }
}

impl Problem {
    fn into_reply(self) -> Reply {
        let body = serde_json::json!({
            "type": "about:blank",
            "title": self.status.canonical_reason().unwrap_or("error"),
            "status": self.status.as_u16(),
            "code": self.code,
            "detail": self.detail,
        });
        reply(
            self.status,
            "application/problem+json",
            body.to_string().into_bytes(),
        )
    }
}

fn reply(status: StatusCode, content_type: &'static str, body: Vec<u8>) -> Reply {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static(content_type),
    );
    r
}

type Handled = Result<Reply, Problem>;

fn json_reply<T: Serialize>(status: StatusCode, body: &T) -> Handled {
    let bytes = serde_json::to_vec(body).map_err(|_| {
        problem(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            "response did not encode",
        )
    })?;
    Ok(reply(status, "application/json", bytes))
}

fn idempotency_key(req: &Request<Incoming>) -> Result<String, Problem> {
    req.headers()
        .get(IDEMPOTENCY_KEY)
        .and_then(|v| v.to_str().ok())
        .filter(|k| !k.is_empty() && k.len() <= MAX_KEY && k.bytes().all(|b| b.is_ascii_graphic()))
        .map(str::to_owned)
        .ok_or_else(|| {
            problem(
                StatusCode::BAD_REQUEST,
                "missing_idempotency_key",
                "an Idempotency-Key header of 1 to 255 visible ASCII characters is required",
            )
        })
}

async fn read_body(req: Request<Incoming>) -> Result<Bytes, Problem> {
    match Limited::new(req.into_body(), MAX_BODY).collect().await {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(_) => Err(problem(
            StatusCode::PAYLOAD_TOO_LARGE,
            "body_too_large",
            "the request body is unreadable or larger than 64 KiB",
        )),
    }
}

fn invalid_body(detail: impl Into<Cow<'static, str>>) -> Problem {
    problem(StatusCode::BAD_REQUEST, "invalid_body", detail)
}

fn parse_json<'a, T: Deserialize<'a>>(body: &'a [u8]) -> Result<T, Problem> {
    serde_json::from_slice(body).map_err(|e| invalid_body(e.to_string()))
}

async fn pause(delay: Duration) {
    if !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }
}

fn injected_error() -> Problem {
    problem(
        StatusCode::INTERNAL_SERVER_ERROR,
        "injected_error",
        "error injected by the mock's error_rate",
    )
}

async fn charge(state: &State, req: Request<Incoming>) -> Handled {
    let key = idempotency_key(&req)?;
    let body = read_body(req).await?;
    let request: ChargeRequest<'_> = parse_json(&body)?;
    if request.order_id.is_empty()
        || request.payment_token.is_empty()
        || request.amount_minor < 0
        || request.currency.len() != 3
        || !request.currency.bytes().all(|b| b.is_ascii_uppercase())
    {
        return Err(invalid_body(
            "order_id and payment_token must be non-empty, amount_minor not negative, \
             currency a three-letter code",
        ));
    }
    let (delay, outcome) = {
        let mut inner = state.inner.lock();
        let (delay, fail) = inner.inject();
        if fail {
            (delay, Err(injected_error()))
        } else {
            (delay, record_charge(&mut inner, key, &request))
        }
    };
    // The charge is recorded before the delay: a client that times out has been charged
    // anyway, which is what the status lookup is for.
    pause(delay).await;
    json_reply(StatusCode::OK, &outcome?)
}

fn record_charge(
    inner: &mut Inner,
    key: String,
    request: &ChargeRequest<'_>,
) -> Result<Charge, Problem> {
    if let Some(stored) = inner.charges.get(&key) {
        if stored.charge.order_id != request.order_id || stored.amount_minor != request.amount_minor
        {
            return Err(problem(
                StatusCode::UNPROCESSABLE_ENTITY,
                "idempotency_key_reused",
                "this Idempotency-Key was used for a different charge",
            ));
        }
        let charge = stored.charge.clone();
        inner.order(&request.order_id).charge_attempts += 1;
        return Ok(charge);
    }
    let declined = request.payment_token.starts_with("tok_decline")
        || (inner.config.decline_rate > 0.0
            && inner.rng.random::<f64>() < inner.config.decline_rate);
    let charge = Charge {
        charge_id: format!("ch_{}", uuid::Uuid::now_v7().simple()),
        order_id: request.order_id.clone().into_owned(),
        status: if declined {
            ChargeStatus::Declined
        } else {
            ChargeStatus::Succeeded
        },
    };
    let audit = inner.order(&request.order_id);
    audit.charge_attempts += 1;
    if declined {
        audit.declined_charges += 1;
    } else {
        audit.successful_charges += 1;
    }
    let totals = &mut inner.audit.totals;
    totals.charges += 1;
    if declined {
        totals.declined_charges += 1;
    } else {
        totals.successful_charges += 1;
    }
    inner
        .charge_ids
        .insert(charge.charge_id.clone(), key.clone());
    inner.charges.insert(
        key,
        StoredCharge {
            charge: charge.clone(),
            amount_minor: request.amount_minor,
        },
    );
    Ok(charge)
}

fn lookup(state: &State, key: &str) -> Handled {
    let inner = state.inner.lock();
    match inner.charges.get(key) {
        Some(stored) => json_reply(StatusCode::OK, &stored.charge),
        None => Err(problem(
            StatusCode::NOT_FOUND,
            "unknown_charge",
            "no charge with this Idempotency-Key",
        )),
    }
}

async fn refund(state: &State, req: Request<Incoming>) -> Handled {
    let key = idempotency_key(&req)?;
    let body = read_body(req).await?;
    let request: RefundRequest<'_> = parse_json(&body)?;
    let mut inner = state.inner.lock();
    if let Some(done) = inner.refunds.get(&key) {
        return json_reply(StatusCode::OK, done);
    }
    let charge = inner
        .charge_ids
        .get(request.charge_id.as_ref())
        .and_then(|k| inner.charges.get(k))
        .map(|c| c.charge.clone())
        .filter(|c| c.order_id == request.order_id)
        .ok_or_else(|| {
            problem(
                StatusCode::NOT_FOUND,
                "unknown_charge",
                "no charge with this id for this order",
            )
        })?;
    if charge.status != ChargeStatus::Succeeded {
        return Err(problem(
            StatusCode::CONFLICT,
            "not_refundable",
            "the charge was declined",
        ));
    }
    if !inner.refunded_charges.insert(charge.charge_id.clone()) {
        return Err(problem(
            StatusCode::CONFLICT,
            "already_refunded",
            "the charge was refunded under another Idempotency-Key",
        ));
    }
    let refund = Refund {
        refund_id: format!("re_{}", uuid::Uuid::now_v7().simple()),
        order_id: charge.order_id,
        status: RefundStatus::Refunded,
    };
    inner.audit.totals.refunds += 1;
    inner.order(&refund.order_id).refunds += 1;
    inner.refunds.insert(key, refund.clone());
    json_reply(StatusCode::OK, &refund)
}

async fn notification(state: &State, req: Request<Incoming>) -> Handled {
    let key = idempotency_key(&req)?;
    let body = read_body(req).await?;
    let request: NotificationRequest<'_> = parse_json(&body)?;
    if request.order_id.is_empty() || request.user_id.is_empty() {
        return Err(invalid_body("order_id and user_id must be non-empty"));
    }
    let (delay, duplicate) = {
        let mut inner = state.inner.lock();
        let (delay, fail) = inner.inject();
        if fail {
            (delay, Err(injected_error()))
        } else {
            let fresh = inner.notifications.insert(key);
            let audit = inner.order(&request.order_id);
            if fresh {
                audit.notifications.push(request.kind);
            } else {
                audit.duplicate_notifications += 1;
            }
            if fresh {
                inner.audit.totals.notifications += 1;
            }
            (delay, Ok(!fresh))
        }
    };
    pause(delay).await;
    json_reply(
        StatusCode::ACCEPTED,
        &serde_json::json!({"status": "accepted", "duplicate": duplicate?}),
    )
}

async fn set_config(state: &State, req: Request<Incoming>) -> Handled {
    let body = read_body(req).await?;
    let config: MockConfig = parse_json(&body)?;
    config.validate().map_err(invalid_body)?;
    let mut inner = state.inner.lock();
    if let Some(seed) = config.seed {
        inner.rng = StdRng::seed_from_u64(seed);
    }
    inner.config = config;
    json_reply(StatusCode::OK, &inner.config)
}

async fn route(state: Arc<State>, req: Request<Incoming>) -> Reply {
    let path = req.uri().path().to_owned();
    let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
    let method = req.method().clone();
    let handled = match (&method, segments.as_slice()) {
        (&Method::GET, ["healthz"]) => {
            json_reply(StatusCode::OK, &serde_json::json!({"status": "ok"}))
        }
        (&Method::POST, ["v1", "charges"]) => charge(&state, req).await,
        (&Method::GET, ["v1", "charges", key]) => lookup(&state, key),
        (&Method::POST, ["v1", "refunds"]) => refund(&state, req).await,
        (&Method::POST, ["v1", "notifications"]) => notification(&state, req).await,
        (&Method::GET, ["v1", "audit"]) => json_reply(StatusCode::OK, &state.inner.lock().audit),
        (&Method::GET, ["v1", "audit", order_id]) => {
            let inner = state.inner.lock();
            match inner.audit.orders.get(*order_id) {
                Some(a) => json_reply(StatusCode::OK, a),
                None => Err(problem(
                    StatusCode::NOT_FOUND,
                    "unknown_order",
                    "the mock saw no such order",
                )),
            }
        }
        (&Method::GET, ["v1", "admin", "config"]) => {
            json_reply(StatusCode::OK, &state.inner.lock().config)
        }
        (&Method::POST | &Method::PUT, ["v1", "admin", "config"]) => set_config(&state, req).await,
        _ => Err(problem(StatusCode::NOT_FOUND, "not_found", "no such route")),
    };
    handled.unwrap_or_else(Problem::into_reply)
}

/// Serves the mock on `listener` until `shutdown` is cancelled, then lets requests under
/// way finish and returns. Fails only if `config` is invalid.
pub async fn serve(
    listener: TcpListener,
    config: MockConfig,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    config
        .validate()
        .map_err(|why| std::io::Error::new(std::io::ErrorKind::InvalidInput, why))?;
    let state = Arc::new(State {
        inner: Mutex::new(Inner::new(config)),
    });
    let connections = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let tracker = TaskTracker::new();
    loop {
        let permit = tokio::select! {
            biased;
            _ = shutdown.cancelled() => break,
            p = Arc::clone(&connections).acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => break,
            },
        };
        let stream = tokio::select! {
            biased;
            _ = shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    // Out of file descriptors and the like: back off, keep serving.
                    tracing::warn!(error = %e, "mock provider accept failed");
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    continue;
                }
            },
        };
        let _ = stream.set_nodelay(true);
        let state = Arc::clone(&state);
        let shutdown = shutdown.clone();
        tracker.spawn(async move {
            let _permit = permit;
            let service = service_fn(move |req| {
                let state = Arc::clone(&state);
                async move { Ok::<_, Infallible>(route(state, req).await) }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(Duration::from_secs(10))
                .serve_connection(TokioIo::new(stream), service);
            let mut conn = std::pin::pin!(conn);
            let done = tokio::select! {
                r = conn.as_mut() => Some(r),
                _ = shutdown.cancelled() => None,
            };
            let result = match done {
                Some(r) => r,
                None => {
                    conn.as_mut().graceful_shutdown();
                    conn.await
                }
            };
            if let Err(e) = result {
                tracing::debug!(error = %e, "mock provider connection ended with an error");
            }
        });
    }
    tracker.close();
    tracker.wait().await;
    Ok(())
}

/// A mock provider serving on `127.0.0.1` on a free port, stopped on drop.
pub struct MockProvider {
    /// Where it listens.
    pub addr: SocketAddr,
    shutdown: CancellationToken,
    task: Option<JoinHandle<std::io::Result<()>>>,
}

impl std::fmt::Debug for MockProvider {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MockProvider")
            .field("addr", &self.addr)
            .finish()
    }
}

impl MockProvider {
    /// Binds `127.0.0.1:0` and serves the mock with `config` on a spawned task.
    pub async fn start(config: MockConfig) -> std::io::Result<MockProvider> {
        config
            .validate()
            .map_err(|why| std::io::Error::new(std::io::ErrorKind::InvalidInput, why))?;
        let listener = TcpListener::bind((std::net::Ipv4Addr::LOCALHOST, 0)).await?;
        let addr = listener.local_addr()?;
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(serve(listener, config, shutdown.clone()));
        Ok(MockProvider {
            addr,
            shutdown,
            task: Some(task),
        })
    }

    /// Base URL of the mock: `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Stops serving and waits until the requests under way are answered.
    pub async fn stop(mut self) {
        self.shutdown.cancel();
        if let Some(task) = self.task.take() {
            match task.await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => tracing::warn!(error = %e, "mock provider ended with an error"),
                Err(e) => tracing::error!(error = %e, "mock provider task failed"),
            }
        }
    }
}

impl Drop for MockProvider {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

fn admin_client() -> Result<reqwest::Client, ProviderError> {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .map_err(ProviderError::Client)
}

/// Everything the mock at `base_url` saw (`GET /v1/audit`). The audit grows with every
/// order, so unlike provider answers it is read without the 64 KiB cap.
pub async fn fetch_audit(base_url: &str) -> Result<Audit, ProviderError> {
    let url = format!("{}/v1/audit", base_url.trim_end_matches('/'));
    let response = admin_client()?
        .get(url)
        .send()
        .await
        .map_err(ProviderError::from_reqwest)?;
    let status = response.status();
    let body = response
        .bytes()
        .await
        .map_err(ProviderError::from_reqwest)?;
    provider::decode_json(&provider::expect_success(status, body)?)
}

/// What the mock at `base_url` saw of one order (`GET /v1/audit/{order_id}`); `None` if
/// nothing.
pub async fn fetch_order_audit(
    base_url: &str,
    order_id: &str,
) -> Result<Option<OrderAudit>, ProviderError> {
    let url = format!("{}/v1/audit/{order_id}", base_url.trim_end_matches('/'));
    let (status, body) = provider::exchange(admin_client()?.get(url)).await?;
    if status == StatusCode::NOT_FOUND {
        return Ok(None);
    }
    provider::decode_json(&provider::expect_success(status, body)?).map(Some)
}

/// Replaces the configuration of the mock at `base_url` (`POST /v1/admin/config`).
pub async fn update_config(base_url: &str, config: &MockConfig) -> Result<(), ProviderError> {
    let url = format!("{}/v1/admin/config", base_url.trim_end_matches('/'));
    let (status, body) = provider::exchange(admin_client()?.post(url).json(config)).await?;
    provider::expect_success(status, body).map(drop)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_reads_humantime_and_checks_rates() {
        let c: MockConfig =
            serde_json::from_str(r#"{"latency":"5ms","error_rate":0.5}"#).expect("config");
        assert_eq!(c.latency, Duration::from_millis(5));
        assert_eq!(c.error_rate, 0.5);
        assert!(c.validate().is_ok());
        let bad = MockConfig {
            decline_rate: 1.5,
            ..MockConfig::default()
        };
        assert!(bad.validate().is_err());
        assert!(serde_json::from_str::<MockConfig>(r#"{"latncy":"5ms"}"#).is_err());
    }

    #[test]
    fn injection_draws_within_bounds() {
        let mut inner = Inner::new(MockConfig {
            latency: Duration::from_millis(2),
            latency_jitter: Duration::from_millis(3),
            error_rate: 1.0,
            seed: Some(7),
            ..MockConfig::default()
        });
        for _ in 0..100 {
            let (delay, fail) = inner.inject();
            assert!(fail);
            assert!(delay >= Duration::from_millis(2) && delay <= Duration::from_millis(5));
        }
        assert_eq!(inner.audit.totals.errors, 100);
    }
}
