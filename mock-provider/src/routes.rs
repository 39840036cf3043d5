//! The mock's routes: the HTTP handlers of charges, lookups, refunds, notifications, the
//! audit, the configuration, health and metrics, and the faults they inject. [`Mock`] is
//! the [`Handler`] the one server loop (`httpd`) serves.

use crate::audit::DEFAULT_PAGE;
use crate::config::MockConfig;
use crate::metrics::MockMetrics;
use crate::state::{record_charge, Fault, Injection, Inner};
use bytes::Bytes;
use http::{header, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use httpd::{Handler, Hangup, Problem, Reply};
use hyper::body::Incoming;
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use settler::provider::{
    ChargeRequest, ChargeStatus, NotificationRequest, Refund, RefundRequest, RefundStatus,
    IDEMPOTENCY_KEY,
};
use std::borrow::Cow;
use std::time::{Duration, Instant};
use storage::exposition::wants_openmetrics;
use tokio_util::sync::CancellationToken;

/// Largest request body the mock reads.
const MAX_BODY: usize = 64 * 1024;
/// Longest an idempotency key may be.
const MAX_KEY: usize = 255;

/// One mock server: its state behind one lock, its stop signal and its metrics.
pub(crate) struct Mock {
    inner: Mutex<Inner>,
    /// Cancelled when the mock stops: cuts hanging requests short.
    shutdown: CancellationToken,
    metrics: MockMetrics,
}

impl Mock {
    /// A mock with `config` (already validated) that stops hanging when `shutdown` is
    /// cancelled.
    pub(crate) fn new(config: MockConfig, shutdown: CancellationToken) -> Self {
        Mock {
            inner: Mutex::new(Inner::new(config)),
            shutdown,
            metrics: MockMetrics::default(),
        }
    }
}

impl Handler for Mock {
    async fn handle(&self, req: Request<Incoming>) -> Result<Reply, Hangup> {
        route(self, req).await
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
        Problem::new(
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
            Problem::new(
                StatusCode::BAD_REQUEST,
                "missing_idempotency_key",
                "an Idempotency-Key header of 1 to 255 visible ASCII characters is required",
            )
        })
}

async fn read_body(req: Request<Incoming>) -> Result<Bytes, Problem> {
    match Limited::new(req.into_body(), MAX_BODY).collect().await {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(_) => Err(Problem::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "body_too_large",
            "the request body is unreadable or larger than 64 KiB",
        )),
    }
}

/// The request's idempotency key and body.
async fn keyed_body(req: Request<Incoming>) -> Result<(String, Bytes), Problem> {
    let key = idempotency_key(&req)?;
    Ok((key, read_body(req).await?))
}

fn invalid_body(detail: impl Into<Cow<'static, str>>) -> Problem {
    Problem::new(StatusCode::BAD_REQUEST, "invalid_body", detail)
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
async fn apply_fault(state: &Mock, injection: Injection) -> Result<(), Problem> {
    match injection.fault {
        Some(Fault::Down) => Err(unavailable()),
        Some(Fault::Hang) => {
            tokio::select! {
                _ = state.shutdown.cancelled() => {}
                _ = pause(injection.delay) => {}
            }
            Err(Problem::new(
                StatusCode::GATEWAY_TIMEOUT,
                "injected_timeout",
                "timeout injected by the mock's timeout_rate",
            ))
        }
        Some(Fault::Error) => {
            pause(injection.delay).await;
            Err(Problem::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "injected_error",
                "error injected by the mock's error_rate",
            ))
        }
        Some(Fault::LoseAnswer) | None => Ok(()),
    }
}

fn unavailable() -> Problem {
    Problem::new(
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
type Processed = Result<Handled, Hangup>;

/// Waits the request's delay, then answers `handled` unless the answer is to be lost.
async fn answer(state: &Mock, injection: Injection, handled: Handled) -> Processed {
    pause(injection.delay).await;
    if injection.fault == Some(Fault::LoseAnswer) && handled.is_ok() {
        state.inner.lock().audit.totals.lost_answers += 1;
        return Err(Hangup);
    }
    Ok(handled)
}

async fn charge(state: &Mock, req: Request<Incoming>) -> Processed {
    let (key, body) = match keyed_body(req).await {
        Ok(kb) => kb,
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

fn lookup(state: &Mock, key: &str) -> Handled {
    let mut inner = state.inner.lock();
    check_up(&mut inner)?;
    match inner.charges.get(key) {
        Some(stored) => json_reply(StatusCode::OK, &stored.charge),
        None => Err(Problem::new(
            StatusCode::NOT_FOUND,
            "unknown_charge",
            "no charge with this Idempotency-Key",
        )),
    }
}

async fn refund(state: &Mock, req: Request<Incoming>) -> Handled {
    let (key, body) = keyed_body(req).await?;
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
            Problem::new(
                StatusCode::NOT_FOUND,
                "unknown_charge",
                "no charge with this id for this order",
            )
        })?;
    if charge.status != ChargeStatus::Succeeded {
        return Err(Problem::new(
            StatusCode::CONFLICT,
            "not_refundable",
            "the charge was declined",
        ));
    }
    if !inner.refunded_charges.insert(charge.charge_id.clone()) {
        return Err(Problem::new(
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
    inner.audit.order(&refund.order_id).refunds += 1;
    inner.refunds.insert(key, refund.clone());
    json_reply(StatusCode::OK, &refund)
}

async fn notification(state: &Mock, req: Request<Incoming>) -> Processed {
    let (key, body) = match keyed_body(req).await {
        Ok(kb) => kb,
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
        let audit = inner.audit.order(&request.order_id);
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

async fn set_config(state: &Mock, req: Request<Incoming>) -> Handled {
    let body = read_body(req).await?;
    let config: MockConfig = parse_json(&body)?;
    config.validate().map_err(invalid_body)?;
    let answer = json_reply(StatusCode::OK, &config);
    state.inner.lock().set_config(config);
    answer
}

/// `GET /v1/audit?after=<order id>&limit=<n>`: one page, copied under the lock and
/// serialized outside it.
fn audit_page(state: &Mock, query: Option<&str>) -> Handled {
    let mut after = None;
    let mut limit = DEFAULT_PAGE;
    for (name, value) in url::form_urlencoded::parse(query.unwrap_or_default().as_bytes()) {
        match name.as_ref() {
            "after" => after = Some(value.into_owned()),
            "limit" => {
                limit = value
                    .parse()
                    .ok()
                    .filter(|n| *n > 0)
                    .ok_or_else(|| invalid_query("limit must be a positive integer"))?;
            }
            _ => return Err(invalid_query(format!("unknown parameter {name:?}"))),
        }
    }
    let page = state.inner.lock().audit.page(after.as_deref(), limit);
    json_reply(StatusCode::OK, &page)
}

fn invalid_query(detail: impl Into<Cow<'static, str>>) -> Problem {
    Problem::new(StatusCode::BAD_REQUEST, "invalid_query", detail)
}

async fn route(state: &Mock, req: Request<Incoming>) -> Result<Reply, Hangup> {
    let start = Instant::now();
    let (name, handled) = dispatch(state, req).await;
    let outcome = match &handled {
        Ok(Ok(_)) => "ok",
        Ok(Err(p)) => p.code,
        Err(Hangup) => "answer_lost",
    };
    state.metrics.request(name, outcome, start.elapsed());
    Ok(handled?.unwrap_or_else(Problem::into_response))
}

/// Runs the route `req` asks for; returns the route's name (its metrics label) and what it
/// answered.
async fn dispatch(state: &Mock, req: Request<Incoming>) -> (&'static str, Processed) {
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
        (&Method::GET, ["v1", "audit"]) => ("audit", Ok(audit_page(state, req.uri().query()))),
        (&Method::GET, ["v1", "audit", order_id]) => {
            let seen = state.inner.lock().audit.get(order_id);
            let handled = match seen {
                Some(a) => json_reply(StatusCode::OK, &a),
                None => Err(Problem::new(
                    StatusCode::NOT_FOUND,
                    "unknown_order",
                    "the mock saw no such order",
                )),
            };
            ("audit_order", Ok(handled))
        }
        (&Method::GET, ["v1", "admin", "config"]) => {
            let config = state.inner.lock().config.clone();
            ("admin_config", Ok(json_reply(StatusCode::OK, &config)))
        }
        (&Method::POST | &Method::PUT, ["v1", "admin", "config"]) => {
            ("admin_config", Ok(set_config(state, req).await))
        }
        _ => (
            "not_found",
            Ok(Err(Problem::new(
                StatusCode::NOT_FOUND,
                "not_found",
                "no such route",
            ))),
        ),
    }
}
