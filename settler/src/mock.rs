//! The mock payment and notification provider: a real HTTP/1 server (hyper) that tests,
//! `flashsale demo` and `flashsale mock-provider` run in place of real providers.
//!
//! It keeps every charge, refund and notification by idempotency key in memory and counts
//! per order what it saw, so a test can prove "at most one successful charge per order" and
//! "one notification per order and outcome" from the provider's side ([`fetch_audit`]).
//! `POST /v1/admin/config` replaces the [`MockConfig`] at run time (an outage and its end,
//! in a test).
//!
//! Failure modes ([`MockConfig`]), drawn per charge and notification request in this order:
//! - `down`: every provider request (charges, lookups, refunds, notifications) is answered
//!   503 `provider_down` at once and records nothing: an outage.
//! - `timeout_rate`: the request hangs for `hang` (longer than any sane client timeout),
//!   records nothing, then is answered 504 `injected_timeout`. A *pure* timeout: a lookup
//!   afterwards finds no charge.
//! - `error_rate`: answered 500 `injected_error`, recording nothing.
//! - `lost_answer_rate`: "charged but the answer was lost": the request is processed and
//!   recorded as usual (the charge succeeds or is declined, the notification is delivered),
//!   then the connection is closed without an answer. A retry with the same key gets the
//!   stored outcome; a lookup finds it.
//! - latency: `latency` plus a uniform draw from `0..=latency_jitter`, or, with probability
//!   `slow_rate`, `slow_latency` instead: a two-point distribution whose tail is
//!   `slow_latency` (e.g. `slow_rate = 0.01` makes it roughly the p99). A charge is recorded
//!   before the delay, so a client that gives up meanwhile has been charged anyway.
//!
//! Outcomes by payment token: `tok_decline…` is always declined, `tok_reject…` is refused
//! with 422 `invalid_payment_token` (a 4xx that is not a decline; nothing is recorded), any
//! other token is declined with probability `decline_rate`.
//!
//! Routes: `POST /v1/charges`, `GET /v1/charges/{key}`, `POST /v1/refunds`,
//! `POST /v1/notifications`, `GET /v1/audit`, `GET /v1/audit/{order_id}`,
//! `GET|POST /v1/admin/config`, `GET /healthz`, `GET /metrics`. Errors are RFC 9457
//! problem+json with a stable `code`. State grows with the orders seen; the mock is for
//! tests and demos.
//!
//! `GET /metrics` serves the mock's own registry ([`MockMetrics`], one per server) in the
//! OpenMetrics text format: `flashsale_mock_requests_total{route,outcome}` (outcome `ok`,
//! the problem `code` answered, or `answer_lost`) and
//! `flashsale_mock_request_duration_seconds{route}`, for every route including unknown
//! ones (`not_found`).

use crate::metrics::MockMetrics;
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
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};
use storage::exposition::wants_openmetrics;
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

/// How the mock behaves. Durations are humantime strings (`"5ms"`) in JSON and TOML. Rates
/// are probabilities in `0..=1`. See the module docs for the order the faults are drawn in.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MockConfig {
    /// Fixed delay added to every charge and notification (default 0).
    #[serde(with = "humantime_serde")]
    pub latency: Duration,
    /// Extra delay drawn uniformly from `0..=latency_jitter` (default 0).
    #[serde(with = "humantime_serde")]
    pub latency_jitter: Duration,
    /// Probability that a request takes `slow_latency` instead of `latency` plus jitter
    /// (default 0).
    pub slow_rate: f64,
    /// The delay of a slow request (default 0).
    #[serde(with = "humantime_serde")]
    pub slow_latency: Duration,
    /// Probability that a charge is declined (tokens starting with `tok_decline` are always
    /// declined; default 0).
    pub decline_rate: f64,
    /// Probability that a charge or notification is answered 500 without being recorded
    /// (default 0).
    pub error_rate: f64,
    /// Probability that a charge or notification hangs for `hang` without being recorded,
    /// then is answered 504 (default 0).
    pub timeout_rate: f64,
    /// How long a request picked by `timeout_rate` hangs (default 60 s; cut short when the
    /// mock stops).
    #[serde(with = "humantime_serde")]
    pub hang: Duration,
    /// Probability that a charge or notification is recorded but its answer lost: the
    /// connection closes without a response (default 0).
    pub lost_answer_rate: f64,
    /// Whether the provider is down: every charge, lookup, refund and notification is
    /// answered 503 and records nothing (default false).
    pub down: bool,
    /// Seed of the random draws, for repeatable runs; from the OS when absent.
    pub seed: Option<u64>,
}

impl Default for MockConfig {
    fn default() -> Self {
        MockConfig {
            latency: Duration::ZERO,
            latency_jitter: Duration::ZERO,
            slow_rate: 0.0,
            slow_latency: Duration::ZERO,
            decline_rate: 0.0,
            error_rate: 0.0,
            timeout_rate: 0.0,
            hang: Duration::from_secs(60),
            lost_answer_rate: 0.0,
            down: false,
            seed: None,
        }
    }
}

impl MockConfig {
    /// Checks that the rates are probabilities; names the offending key otherwise.
    pub fn validate(&self) -> Result<(), &'static str> {
        let rates = [
            (self.slow_rate, "slow_rate must be between 0 and 1"),
            (self.decline_rate, "decline_rate must be between 0 and 1"),
            (self.error_rate, "error_rate must be between 0 and 1"),
            (self.timeout_rate, "timeout_rate must be between 0 and 1"),
            (
                self.lost_answer_rate,
                "lost_answer_rate must be between 0 and 1",
            ),
        ];
        for (rate, why) in rates {
            if !(0.0..=1.0).contains(&rate) {
                return Err(why);
            }
        }
        Ok(())
    }
}

/// What the mock saw of one order.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
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
    /// Charge requests refused with 422 (`tok_reject` tokens).
    pub refused_charges: u64,
}

/// Totals over all orders.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct AuditTotals {
    /// Distinct charges created.
    pub charges: u64,
    /// Distinct charges that succeeded.
    pub successful_charges: u64,
    /// Distinct charges that were declined.
    pub declined_charges: u64,
    /// Requests answered 500 by error injection.
    pub errors: u64,
    /// Requests that hung (`timeout_rate`) and recorded nothing.
    pub timeouts: u64,
    /// Requests recorded whose answer was lost (`lost_answer_rate`).
    pub lost_answers: u64,
    /// Requests answered 503 because the mock was `down`.
    pub unavailable: u64,
    /// Charges refused with 422 (`tok_reject` tokens); nothing recorded.
    pub refused: u64,
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

    fn chance(&mut self, rate: f64) -> bool {
        rate > 0.0 && self.rng.random::<f64>() < rate
    }

    /// Draws the fault (if any) and the delay of one charge or notification request.
    fn inject(&mut self) -> Injection {
        let fault = if self.config.down {
            self.audit.totals.unavailable += 1;
            Some(Fault::Down)
        } else if self.chance(self.config.timeout_rate) {
            self.audit.totals.timeouts += 1;
            Some(Fault::Hang)
        } else if self.chance(self.config.error_rate) {
            self.audit.totals.errors += 1;
            Some(Fault::Error)
        } else if self.chance(self.config.lost_answer_rate) {
            Some(Fault::LoseAnswer)
        } else {
            None
        };
        let delay = match fault {
            Some(Fault::Down) => Duration::ZERO,
            Some(Fault::Hang) => self.config.hang,
            _ if self.chance(self.config.slow_rate) => self.config.slow_latency,
            _ => {
                let jitter = self.config.latency_jitter.as_micros() as u64;
                let extra = if jitter == 0 {
                    0
                } else {
                    self.rng.random_range(0..=jitter)
                };
                self.config.latency + Duration::from_micros(extra)
            }
        };
        Injection { delay, fault }
    }

    fn order(&mut self, order_id: &str) -> &mut OrderAudit {
        self.audit.orders.entry(order_id.to_owned()).or_default()
    }
}

/// A fault injected into one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fault {
    /// 503 at once, nothing recorded.
    Down,
    /// Hang for `hang`, nothing recorded, then 504.
    Hang,
    /// 500, nothing recorded.
    Error,
    /// Recorded, then the connection is closed without an answer.
    LoseAnswer,
}

/// What [`Inner::inject`] drew for one request.
#[derive(Debug, Clone, Copy)]
struct Injection {
    delay: Duration,
    fault: Option<Fault>,
}

struct State {
    inner: Mutex<Inner>,
    /// Cancelled when the mock stops: cuts hanging requests short.
    shutdown: CancellationToken,
    metrics: MockMetrics,
}

/// The answer to a request was "lost": the service fails, so hyper closes the connection
/// without a response.
#[derive(Debug)]
struct AnswerLost;

impl std::fmt::Display for AnswerLost {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("answer lost (injected by the mock's lost_answer_rate)")
    }
}

impl std::error::Error for AnswerLost {}

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

/// A request's answer after its injected fault: `Ok(())` to go on, or the answer to give
/// instead (after the hang, for a timeout).
async fn apply_fault(state: &State, injection: Injection) -> Result<(), Problem> {
    match injection.fault {
        Some(Fault::Down) => Err(unavailable()),
        Some(Fault::Hang) => {
            tokio::select! {
                _ = state.shutdown.cancelled() => {}
                _ = pause(injection.delay) => {}
            }
            Err(problem(
                StatusCode::GATEWAY_TIMEOUT,
                "injected_timeout",
                "timeout injected by the mock's timeout_rate",
            ))
        }
        Some(Fault::Error) => {
            pause(injection.delay).await;
            Err(problem(
                StatusCode::INTERNAL_SERVER_ERROR,
                "injected_error",
                "error injected by the mock's error_rate",
            ))
        }
        Some(Fault::LoseAnswer) | None => Ok(()),
    }
}

fn unavailable() -> Problem {
    problem(
        StatusCode::SERVICE_UNAVAILABLE,
        "provider_down",
        "the mock is configured down",
    )
}

/// Refuses every request while the mock is `down`.
fn check_up(inner: &mut Inner) -> Result<(), Problem> {
    if inner.config.down {
        inner.audit.totals.unavailable += 1;
        return Err(unavailable());
    }
    Ok(())
}

/// The result of a charge or notification: an answer, or a lost one.
type Processed = Result<Handled, AnswerLost>;

/// Waits the request's delay, then answers `handled` unless the answer is to be lost.
async fn answer(state: &State, injection: Injection, handled: Handled) -> Processed {
    pause(injection.delay).await;
    if injection.fault == Some(Fault::LoseAnswer) && handled.is_ok() {
        state.inner.lock().audit.totals.lost_answers += 1;
        return Err(AnswerLost);
    }
    Ok(handled)
}

async fn charge(state: &State, req: Request<Incoming>) -> Processed {
    let key = match idempotency_key(&req) {
        Ok(key) => key,
        Err(p) => return Ok(Err(p)),
    };
    let body = match read_body(req).await {
        Ok(body) => body,
        Err(p) => return Ok(Err(p)),
    };
    let request: ChargeRequest<'_> = match parse_json(&body) {
        Ok(r) => r,
        Err(p) => return Ok(Err(p)),
    };
    if request.order_id.is_empty()
        || request.payment_token.is_empty()
        || request.amount_minor < 0
        || request.currency.len() != 3
        || !request.currency.bytes().all(|b| b.is_ascii_uppercase())
    {
        return Ok(Err(invalid_body(
            "order_id and payment_token must be non-empty, amount_minor not negative, \
             currency a three-letter code",
        )));
    }
    let injection = state.inner.lock().inject();
    if let Err(p) = apply_fault(state, injection).await {
        return Ok(Err(p));
    }
    // The charge is recorded before the delay: a client that times out has been charged
    // anyway, which is what the status lookup is for.
    let outcome = record_charge(&mut state.inner.lock(), key, &request);
    answer(
        state,
        injection,
        outcome.and_then(|c| json_reply(StatusCode::OK, &c)),
    )
    .await
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
    if request.payment_token.starts_with("tok_reject") {
        inner.audit.totals.refused += 1;
        inner.order(&request.order_id).refused_charges += 1;
        return Err(problem(
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_payment_token",
            "the payment token was refused",
        ));
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
    let mut inner = state.inner.lock();
    check_up(&mut inner)?;
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
    check_up(&mut inner)?;
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

async fn notification(state: &State, req: Request<Incoming>) -> Processed {
    let key = match idempotency_key(&req) {
        Ok(key) => key,
        Err(p) => return Ok(Err(p)),
    };
    let body = match read_body(req).await {
        Ok(body) => body,
        Err(p) => return Ok(Err(p)),
    };
    let request: NotificationRequest<'_> = match parse_json(&body) {
        Ok(r) => r,
        Err(p) => return Ok(Err(p)),
    };
    if request.order_id.is_empty() || request.user_id.is_empty() {
        return Ok(Err(invalid_body("order_id and user_id must be non-empty")));
    }
    let injection = state.inner.lock().inject();
    if let Err(p) = apply_fault(state, injection).await {
        return Ok(Err(p));
    }
    let duplicate = {
        let mut inner = state.inner.lock();
        let fresh = inner.notifications.insert(key);
        let audit = inner.order(&request.order_id);
        if fresh {
            audit.notifications.push(request.kind);
            inner.audit.totals.notifications += 1;
        } else {
            audit.duplicate_notifications += 1;
        }
        !fresh
    };
    answer(
        state,
        injection,
        json_reply(
            StatusCode::ACCEPTED,
            &serde_json::json!({"status": "accepted", "duplicate": duplicate}),
        ),
    )
    .await
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

async fn route(state: Arc<State>, req: Request<Incoming>) -> Result<Reply, AnswerLost> {
    let start = Instant::now();
    let (name, handled) = dispatch(&state, req).await;
    let outcome = match &handled {
        Ok(Ok(_)) => "ok",
        Ok(Err(p)) => p.code,
        Err(AnswerLost) => "answer_lost",
    };
    state.metrics.request(name, outcome, start.elapsed());
    Ok(handled?.unwrap_or_else(Problem::into_reply))
}

/// Runs the route `req` asks for; returns the route's name (its metrics label) and what it
/// answered.
async fn dispatch(state: &State, req: Request<Incoming>) -> (&'static str, Processed) {
    let path = req.uri().path().to_owned();
    let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
    let method = req.method().clone();
    match (&method, segments.as_slice()) {
        (&Method::GET, ["healthz"]) => (
            "healthz",
            Ok(json_reply(
                StatusCode::OK,
                &serde_json::json!({"status": "ok"}),
            )),
        ),
        (&Method::GET, ["metrics"]) => {
            let accept = req
                .headers()
                .get(http::header::ACCEPT)
                .and_then(|v| v.to_str().ok());
            let (body, content_type) = state.metrics.encode(wants_openmetrics(accept));
            (
                "metrics",
                Ok(Ok(reply(StatusCode::OK, content_type, body.into_bytes()))),
            )
        }
        (&Method::POST, ["v1", "charges"]) => ("charge", charge(state, req).await),
        (&Method::GET, ["v1", "charges", key]) => ("charge_lookup", Ok(lookup(state, key))),
        (&Method::POST, ["v1", "refunds"]) => ("refund", Ok(refund(state, req).await)),
        (&Method::POST, ["v1", "notifications"]) => {
            ("notification", notification(state, req).await)
        }
        (&Method::GET, ["v1", "audit"]) => (
            "audit",
            Ok(json_reply(StatusCode::OK, &state.inner.lock().audit)),
        ),
        (&Method::GET, ["v1", "audit", order_id]) => {
            let inner = state.inner.lock();
            let handled = match inner.audit.orders.get(*order_id) {
                Some(a) => json_reply(StatusCode::OK, a),
                None => Err(problem(
                    StatusCode::NOT_FOUND,
                    "unknown_order",
                    "the mock saw no such order",
                )),
            };
            ("audit_order", Ok(handled))
        }
        (&Method::GET, ["v1", "admin", "config"]) => (
            "admin_config",
            Ok(json_reply(StatusCode::OK, &state.inner.lock().config)),
        ),
        (&Method::POST | &Method::PUT, ["v1", "admin", "config"]) => {
            ("admin_config", Ok(set_config(state, req).await))
        }
        _ => (
            "not_found",
            Ok(Err(problem(
                StatusCode::NOT_FOUND,
                "not_found",
                "no such route",
            ))),
        ),
    }
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
        shutdown: shutdown.clone(),
        metrics: MockMetrics::default(),
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
                async move { route(state, req).await }
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
            let Injection { delay, fault } = inner.inject();
            assert_eq!(fault, Some(Fault::Error));
            assert!(delay >= Duration::from_millis(2) && delay <= Duration::from_millis(5));
        }
        assert_eq!(inner.audit.totals.errors, 100);
    }

    #[test]
    fn faults_follow_their_rates_and_order() {
        let mut inner = Inner::new(MockConfig {
            latency: Duration::from_millis(1),
            slow_rate: 0.25,
            slow_latency: Duration::from_millis(500),
            timeout_rate: 0.1,
            hang: Duration::from_secs(30),
            lost_answer_rate: 0.2,
            seed: Some(3),
            ..MockConfig::default()
        });
        let n = 10_000;
        let (mut hangs, mut lost, mut slow, mut fast) = (0, 0, 0, 0);
        for _ in 0..n {
            let Injection { delay, fault } = inner.inject();
            match fault {
                Some(Fault::Hang) => {
                    hangs += 1;
                    assert_eq!(delay, Duration::from_secs(30));
                    continue;
                }
                Some(Fault::LoseAnswer) => lost += 1,
                None => {}
                other => panic!("unexpected fault {other:?}"),
            }
            if delay == Duration::from_millis(500) {
                slow += 1;
            } else {
                assert_eq!(delay, Duration::from_millis(1));
                fast += 1;
            }
        }
        let near =
            |count: i32, expected: f64| (f64::from(count) - expected).abs() < expected * 0.15;
        assert!(near(hangs, 1000.0), "hangs {hangs}");
        assert!(near(lost, 1800.0), "lost answers {lost}");
        assert!(near(slow, 2250.0), "slow {slow}");
        assert_eq!(slow + fast + hangs, n);
        assert_eq!(inner.audit.totals.timeouts, hangs as u64);

        inner.config.down = true;
        let Injection { delay, fault } = inner.inject();
        assert_eq!((delay, fault), (Duration::ZERO, Some(Fault::Down)));
        assert_eq!(inner.audit.totals.unavailable, 1);
    }

    #[test]
    fn every_rate_is_checked() {
        for json in [
            r#"{"slow_rate":-0.1}"#,
            r#"{"timeout_rate":1.01}"#,
            r#"{"lost_answer_rate":2}"#,
            r#"{"error_rate":1.5}"#,
        ] {
            let c: MockConfig = serde_json::from_str(json).expect("parses");
            assert!(c.validate().is_err(), "{json} must be refused");
        }
        let c = MockConfig {
            lost_answer_rate: f64::NAN,
            ..MockConfig::default()
        };
        assert!(c.validate().is_err());
        let c: MockConfig =
            serde_json::from_str(r#"{"down":true,"hang":"2s","slow_latency":"1s"}"#)
                .expect("config");
        assert!(c.down);
        assert_eq!(c.hang, Duration::from_secs(2));
        assert!(c.validate().is_ok());
    }
}
