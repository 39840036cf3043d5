//! HTTP clients of the payment and notification providers, and the wire types both they
//! and the mock provider (the `mock-provider` crate) speak.
//!
//! Every request carries an `Idempotency-Key` (the order id for a charge,
//! `"{order_id}:{kind}"` for a notification, `"{order_id}:refund"` for a refund), so a
//! retry can never charge, refund or notify twice. Retries use jittered exponential
//! backoff ([`RetryPolicy`]) and happen only on timeouts, transport errors and 5xx/408/429
//! answers; a decline or any other 4xx is an answer, not a failure. A charge whose request
//! timed out may have gone through, so before it is sent again its outcome is looked up
//! with `GET /v1/charges/{key}`.
//!
//! Every HTTP attempt (a retry is another attempt) is counted and timed in
//! [`crate::metrics`]: `flashsale_provider_calls_total{provider,op,outcome}` and
//! `flashsale_provider_call_duration_seconds{provider,op}`, with `op` one of `charge`,
//! `lookup`, `refund` (payment) and `notify` (notification); see [`ProviderError::outcome`].

use crate::breaker::CircuitBreaker;
use crate::metrics::{metrics, NOTIFICATION, PAYMENT};
use backon::{ExponentialBuilder, Retryable};
use bytes::Bytes;
use http::StatusCode;
use serde::{Deserialize, Serialize};
use std::borrow::Cow;
use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};
use storage::{NewOrder, OrderId, OrderStatus, UserId};

/// Name of the header that carries the idempotency key.
pub const IDEMPOTENCY_KEY: &str = "idempotency-key";

/// Largest response body a client reads; a provider answer is a few hundred bytes.
const MAX_RESPONSE_BYTES: usize = 64 * 1024;

/// Why a provider call failed.
#[derive(Debug, thiserror::Error)]
pub enum ProviderError {
    /// No complete answer within the client timeout. The request may have been processed.
    #[error("provider request timed out")]
    Timeout,
    /// The provider could not be reached or the connection broke.
    #[error("provider unreachable: {0}")]
    Transport(#[source] reqwest::Error),
    /// The provider answered 5xx, 408 or 429: it may work if asked again later.
    #[error("provider unavailable: HTTP {0}")]
    Unavailable(StatusCode),
    /// The provider refused the request (4xx): asking again will not help.
    #[error("provider refused the request: HTTP {status} ({code})")]
    Rejected {
        /// The HTTP status.
        status: StatusCode,
        /// The problem's `code`, or empty if the answer had none.
        code: String,
    },
    /// The answer did not decode or was too large.
    #[error("unexpected provider response: {0}")]
    InvalidResponse(String),
    /// The base URL is not an absolute `http://` URL.
    #[error("invalid provider url {0:?}")]
    InvalidUrl(String),
    /// The HTTP client could not be built or the request could not be formed.
    #[error("provider client: {0}")]
    Client(#[source] reqwest::Error),
}

impl ProviderError {
    /// Whether asking again may succeed (timeouts, transport errors, 5xx, 408, 429).
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            ProviderError::Timeout | ProviderError::Transport(_) | ProviderError::Unavailable(_)
        )
    }

    /// The `outcome` label of an attempt that failed this way: `timeout`, `transport`
    /// (unreachable, or the request could not be formed), `server_error` (5xx, 408, 429, or
    /// an answer that does not decode) or `refused` (any other 4xx).
    pub fn outcome(&self) -> &'static str {
        match self {
            ProviderError::Timeout => "timeout",
            ProviderError::Transport(_)
            | ProviderError::InvalidUrl(_)
            | ProviderError::Client(_) => "transport",
            ProviderError::Unavailable(_) | ProviderError::InvalidResponse(_) => "server_error",
            ProviderError::Rejected { .. } => "refused",
        }
    }

    /// The error of a failed `reqwest` call.
    pub fn from_reqwest(e: reqwest::Error) -> Self {
        if e.is_timeout() {
            ProviderError::Timeout
        } else if e.is_builder() {
            ProviderError::Client(e)
        } else if e.is_decode() {
            ProviderError::InvalidResponse(e.to_string())
        } else {
            ProviderError::Transport(e)
        }
    }
}

/// How often and how patiently a failed provider call is retried.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Attempts in all, the first included (at least 1).
    pub max_attempts: usize,
    /// Delay before the first retry; it doubles per retry, plus random jitter.
    pub min_delay: Duration,
    /// Longest delay between two attempts.
    pub max_delay: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            max_attempts: 4,
            min_delay: Duration::from_millis(50),
            max_delay: Duration::from_secs(2),
        }
    }
}

impl RetryPolicy {
    fn backoff(&self) -> ExponentialBuilder {
        ExponentialBuilder::new()
            .with_min_delay(self.min_delay)
            .with_max_delay(self.max_delay.max(self.min_delay))
            .with_max_times(self.max_attempts.saturating_sub(1))
            .with_jitter()
    }
}

/// Outcome of a charge as the provider stored it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ChargeStatus {
    /// The money was taken.
    Succeeded,
    /// The payment method was declined; nothing was taken.
    Declined,
}

/// Body of `POST /v1/charges`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChargeRequest<'a> {
    /// The order charged.
    #[serde(borrow)]
    pub order_id: Cow<'a, str>,
    /// Amount in minor units.
    pub amount_minor: i64,
    /// ISO 4217 currency code.
    #[serde(borrow)]
    pub currency: Cow<'a, str>,
    /// The buyer's payment token.
    #[serde(borrow)]
    pub payment_token: Cow<'a, str>,
}

/// A charge as the provider answers it (`POST /v1/charges`, `GET /v1/charges/{key}`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Charge {
    /// The provider's id of the charge.
    pub charge_id: String,
    /// The order charged.
    pub order_id: String,
    /// Whether it went through.
    pub status: ChargeStatus,
}

/// Body of `POST /v1/refunds`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RefundRequest<'a> {
    /// The order refunded.
    #[serde(borrow)]
    pub order_id: Cow<'a, str>,
    /// The charge refunded.
    #[serde(borrow)]
    pub charge_id: Cow<'a, str>,
}

/// Status of a refund; the mock refunds at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RefundStatus {
    /// The money went back.
    Refunded,
}

/// A refund as the provider answers it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Refund {
    /// The provider's id of the refund.
    pub refund_id: String,
    /// The order refunded.
    pub order_id: String,
    /// Its status.
    pub status: RefundStatus,
}

/// What a buyer is told.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NotificationKind {
    /// The order was charged.
    OrderPaid,
    /// The charge was declined; the order is void.
    PaymentFailed,
    /// The order was not paid in time; it is void.
    OrderExpired,
}

impl NotificationKind {
    /// The notification owed for an order in a final `status`; `None` if not final.
    pub fn for_status(status: OrderStatus) -> Option<Self> {
        match status {
            OrderStatus::Paid => Some(NotificationKind::OrderPaid),
            OrderStatus::PaymentFailed => Some(NotificationKind::PaymentFailed),
            OrderStatus::Expired => Some(NotificationKind::OrderExpired),
            OrderStatus::Accepted | OrderStatus::Persisted | OrderStatus::PaymentPending => None,
        }
    }

    /// The kind as its wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            NotificationKind::OrderPaid => "order_paid",
            NotificationKind::PaymentFailed => "payment_failed",
            NotificationKind::OrderExpired => "order_expired",
        }
    }
}

/// Body of `POST /v1/notifications`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NotificationRequest<'a> {
    /// The order the buyer is told about.
    #[serde(borrow)]
    pub order_id: Cow<'a, str>,
    /// The buyer.
    #[serde(borrow)]
    pub user_id: Cow<'a, str>,
    /// What they are told.
    pub kind: NotificationKind,
}

/// Outcome of a charge, as the settler acts on it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChargeOutcome {
    /// Charged; the order becomes `paid`.
    Succeeded {
        /// The provider's id of the charge.
        charge_id: String,
    },
    /// Declined; the order becomes `payment_failed`.
    Declined,
}

impl From<Charge> for ChargeOutcome {
    fn from(c: Charge) -> Self {
        match c.status {
            ChargeStatus::Succeeded => ChargeOutcome::Succeeded {
                charge_id: c.charge_id,
            },
            ChargeStatus::Declined => ChargeOutcome::Declined,
        }
    }
}

/// Builds the shared HTTP client: one timeout for the whole exchange, kept-alive connections.
fn http_client(timeout: Duration) -> Result<reqwest::Client, ProviderError> {
    reqwest::Client::builder()
        .timeout(timeout)
        .connect_timeout(timeout)
        .pool_idle_timeout(Duration::from_secs(30))
        .tcp_nodelay(true)
        .build()
        .map_err(ProviderError::Client)
}

/// Checks a base URL and drops its trailing slashes.
fn base_url(url: &str) -> Result<String, ProviderError> {
    let trimmed = url.trim_end_matches('/');
    match reqwest::Url::parse(trimmed) {
        Ok(u) if u.scheme() == "http" && u.has_host() => Ok(trimmed.to_owned()),
        _ => Err(ProviderError::InvalidUrl(url.to_owned())),
    }
}

/// Sends a request and reads the answer's status and body (at most 64 KiB).
pub async fn exchange(
    request: reqwest::RequestBuilder,
) -> Result<(StatusCode, Bytes), ProviderError> {
    let mut response = request.send().await.map_err(ProviderError::from_reqwest)?;
    let status = response.status();
    if response
        .content_length()
        .is_some_and(|n| n > MAX_RESPONSE_BYTES as u64)
    {
        return Err(ProviderError::InvalidResponse(
            "response body too large".into(),
        ));
    }
    let mut body = Vec::new();
    while let Some(chunk) = response
        .chunk()
        .await
        .map_err(ProviderError::from_reqwest)?
    {
        if body.len() + chunk.len() > MAX_RESPONSE_BYTES {
            return Err(ProviderError::InvalidResponse(
                "response body too large".into(),
            ));
        }
        body.extend_from_slice(&chunk);
    }
    Ok((status, Bytes::from(body)))
}

#[derive(Deserialize)]
struct ProblemCode {
    #[serde(default)]
    code: String,
}

/// Maps a non-2xx answer to its error; passes a 2xx body through.
pub fn expect_success(status: StatusCode, body: Bytes) -> Result<Bytes, ProviderError> {
    if status.is_success() {
        return Ok(body);
    }
    if status.is_server_error()
        || status == StatusCode::TOO_MANY_REQUESTS
        || status == StatusCode::REQUEST_TIMEOUT
    {
        return Err(ProviderError::Unavailable(status));
    }
    let code = serde_json::from_slice::<ProblemCode>(&body)
        .map(|p| p.code)
        .unwrap_or_default();
    Err(ProviderError::Rejected { status, code })
}

/// Decodes a JSON answer.
pub fn decode_json<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, ProviderError> {
    serde_json::from_slice(body).map_err(|e| ProviderError::InvalidResponse(e.to_string()))
}

/// Runs one HTTP attempt of `provider`'s `op`, counting it by outcome (`answered` names the
/// outcome of an answer) and timing it.
async fn observed<T, F>(
    provider: &'static str,
    op: &'static str,
    answered: fn(&T) -> &'static str,
    attempt: F,
) -> Result<T, ProviderError>
where
    F: Future<Output = Result<T, ProviderError>>,
{
    let start = Instant::now();
    let result = attempt.await;
    let outcome = match &result {
        Ok(answer) => answered(answer),
        Err(e) => e.outcome(),
    };
    metrics().provider_call(provider, op, outcome, start.elapsed());
    result
}

fn succeeded<T>(_: &T) -> &'static str {
    "succeeded"
}

fn charge_outcome(outcome: &ChargeOutcome) -> &'static str {
    match outcome {
        ChargeOutcome::Succeeded { .. } => "succeeded",
        ChargeOutcome::Declined => "declined",
    }
}

/// Whether a failed attempt is tried again: a retryable error, while the circuit (if any)
/// is closed.
fn retry_further(circuit: Option<&CircuitBreaker>, e: &ProviderError) -> bool {
    e.is_retryable() && circuit.is_none_or(CircuitBreaker::is_closed)
}

/// A failed attempt about to be retried: counted by the circuit, logged.
fn note_retry(circuit: Option<&CircuitBreaker>, e: &ProviderError, after: Duration) {
    if let Some(c) = circuit {
        c.attempt_failed();
    }
    tracing::debug!(error = %e, retry_in = ?after, "provider call failed; retrying");
}

/// Client of the payment provider: charge, look up, refund.
#[derive(Debug, Clone)]
pub struct PaymentClient {
    endpoint: Endpoint,
    charges_url: String,
    refunds_url: String,
}

/// What both provider clients share: the HTTP client, the provider's base URL, the retry
/// policy and the circuit their attempts count against.
#[derive(Debug, Clone)]
struct Endpoint {
    http: reqwest::Client,
    base_url: String,
    retry: RetryPolicy,
    circuit: Option<CircuitBreaker>,
}

impl Endpoint {
    fn new(base_url: &str, timeout: Duration, retry: RetryPolicy) -> Result<Self, ProviderError> {
        Ok(Endpoint {
            http: http_client(timeout)?,
            base_url: self::base_url(base_url)?,
            retry,
            circuit: None,
        })
    }

    /// Runs `attempt` until it succeeds, with the retry policy's backoff, for as long as
    /// its error is worth another attempt and the circuit is closed.
    async fn retried<T, F, Fut>(&self, attempt: F) -> Result<T, ProviderError>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<T, ProviderError>>,
    {
        attempt
            .retry(self.retry.backoff())
            .when(|e| retry_further(self.circuit.as_ref(), e))
            .notify(|e, after| note_retry(self.circuit.as_ref(), e, after))
            .await
    }
}

impl PaymentClient {
    /// A client of the provider at `base_url` (`http://host:port`), with `timeout` per
    /// request attempt and `retry` for failed attempts.
    pub fn new(
        base_url: &str,
        timeout: Duration,
        retry: RetryPolicy,
    ) -> Result<Self, ProviderError> {
        let endpoint = Endpoint::new(base_url, timeout, retry)?;
        Ok(PaymentClient {
            charges_url: format!("{}/v1/charges", endpoint.base_url),
            refunds_url: format!("{}/v1/refunds", endpoint.base_url),
            endpoint,
        })
    }

    /// Ties the client's retries to `circuit`: every failed attempt counts as a failure
    /// (so a provider that goes down opens the circuit after `threshold` attempts, not
    /// `threshold` calls of four attempts each), and a call stops retrying once the circuit
    /// is not closed: with hundreds of calls in flight, an outage then costs each of them
    /// one attempt instead of all its retries.
    pub fn with_circuit(mut self, circuit: CircuitBreaker) -> Self {
        self.endpoint.circuit = Some(circuit);
        self
    }

    /// The provider's base URL.
    pub fn base_url(&self) -> &str {
        &self.endpoint.base_url
    }

    /// The idempotency key of an order's charge: the order id.
    pub fn charge_key(order_id: OrderId) -> String {
        order_id.to_string()
    }

    /// Charges an order's amount to its payment token, at most once whatever the retries.
    /// A declined payment is `Ok(ChargeOutcome::Declined)`; an error means the outcome is
    /// unknown (the provider is down or refused the request) and the order stays pending.
    #[tracing::instrument(level = "debug", skip_all, fields(order_id = %order.order_id))]
    pub async fn charge(&self, order: &NewOrder) -> Result<ChargeOutcome, ProviderError> {
        let key = Self::charge_key(order.order_id);
        let request = ChargeRequest {
            order_id: Cow::Borrowed(&key),
            amount_minor: order.amount.minor,
            currency: Cow::Borrowed(order.amount.currency.as_str()),
            payment_token: Cow::Borrowed(&order.payment_token),
        };
        // Set when an attempt timed out: the provider may have charged, so the next attempt
        // asks before it charges again.
        let timed_out = &AtomicBool::new(false);
        let (key, request) = (&key, &request);
        let attempt = || async move {
            if timed_out.load(Ordering::Relaxed) {
                if let Some(outcome) = self.lookup_once(key).await? {
                    return Ok(outcome);
                }
                timed_out.store(false, Ordering::Relaxed);
            }
            let sent = self.charge_once(key, request).await;
            if matches!(sent, Err(ProviderError::Timeout)) {
                timed_out.store(true, Ordering::Relaxed);
            }
            sent
        };
        self.endpoint.retried(attempt).await
    }

    async fn charge_once(
        &self,
        key: &str,
        request: &ChargeRequest<'_>,
    ) -> Result<ChargeOutcome, ProviderError> {
        observed(
            PAYMENT,
            "charge",
            charge_outcome,
            self.charge_attempt(key, request),
        )
        .await
    }

    async fn charge_attempt(
        &self,
        key: &str,
        request: &ChargeRequest<'_>,
    ) -> Result<ChargeOutcome, ProviderError> {
        let (status, body) = exchange(
            self.endpoint
                .http
                .post(&self.charges_url)
                .header(IDEMPOTENCY_KEY, key)
                .json(request),
        )
        .await?;
        let body = expect_success(status, body)?;
        Ok(decode_json::<Charge>(&body)?.into())
    }

    /// The stored outcome of the charge with idempotency key `key`, `None` if the provider
    /// never took it. Retried like a charge.
    #[tracing::instrument(level = "debug", skip(self))]
    pub async fn lookup(&self, key: &str) -> Result<Option<ChargeOutcome>, ProviderError> {
        self.endpoint.retried(|| self.lookup_once(key)).await
    }

    async fn lookup_once(&self, key: &str) -> Result<Option<ChargeOutcome>, ProviderError> {
        observed(PAYMENT, "lookup", succeeded, self.lookup_attempt(key)).await
    }

    async fn lookup_attempt(&self, key: &str) -> Result<Option<ChargeOutcome>, ProviderError> {
        let url = format!("{}/{key}", self.charges_url);
        let (status, body) = exchange(self.endpoint.http.get(url)).await?;
        if status == StatusCode::NOT_FOUND {
            return Ok(None);
        }
        let body = expect_success(status, body)?;
        Ok(Some(decode_json::<Charge>(&body)?.into()))
    }

    /// Refunds a charge (a late success for an order that was already released), at most
    /// once: the idempotency key is `"{order_id}:refund"`.
    #[tracing::instrument(level = "debug", skip(self))]
    pub async fn refund(
        &self,
        order_id: OrderId,
        charge_id: &str,
    ) -> Result<Refund, ProviderError> {
        let order = order_id.to_string();
        let key = format!("{order}:refund");
        let request = RefundRequest {
            order_id: Cow::Borrowed(&order),
            charge_id: Cow::Borrowed(charge_id),
        };
        let (key, request) = (&key, &request);
        let attempt = || {
            observed(PAYMENT, "refund", succeeded, async move {
                let (status, body) = exchange(
                    self.endpoint
                        .http
                        .post(&self.refunds_url)
                        .header(IDEMPOTENCY_KEY, key)
                        .json(request),
                )
                .await?;
                let body = expect_success(status, body)?;
                decode_json::<Refund>(&body)
            })
        };
        self.endpoint.retried(attempt).await
    }
}

/// Client of the notification provider.
#[derive(Debug, Clone)]
pub struct NotificationClient {
    endpoint: Endpoint,
    notifications_url: String,
}

impl NotificationClient {
    /// A client of the provider at `base_url` (`http://host:port`), with `timeout` per
    /// request attempt and `retry` for failed attempts.
    pub fn new(
        base_url: &str,
        timeout: Duration,
        retry: RetryPolicy,
    ) -> Result<Self, ProviderError> {
        let endpoint = Endpoint::new(base_url, timeout, retry)?;
        Ok(NotificationClient {
            notifications_url: format!("{}/v1/notifications", endpoint.base_url),
            endpoint,
        })
    }

    /// Ties the client's retries to `circuit`, as [`PaymentClient::with_circuit`] does.
    pub fn with_circuit(mut self, circuit: CircuitBreaker) -> Self {
        self.endpoint.circuit = Some(circuit);
        self
    }

    /// The provider's base URL.
    pub fn base_url(&self) -> &str {
        &self.endpoint.base_url
    }

    /// The idempotency key of a notification: `"{order_id}:{kind}"`.
    pub fn notification_key(order_id: OrderId, kind: NotificationKind) -> String {
        format!("{order_id}:{}", kind.as_str())
    }

    /// Tells the buyer about their order, at most once per order and kind whatever the
    /// retries.
    #[tracing::instrument(level = "debug", skip(self, user_id))]
    pub async fn notify(
        &self,
        order_id: OrderId,
        user_id: &UserId,
        kind: NotificationKind,
    ) -> Result<(), ProviderError> {
        let key = Self::notification_key(order_id, kind);
        let order = order_id.to_string();
        let request = NotificationRequest {
            order_id: Cow::Borrowed(&order),
            user_id: Cow::Borrowed(user_id.as_str()),
            kind,
        };
        let (key, request) = (&key, &request);
        let attempt = || {
            observed(NOTIFICATION, "notify", succeeded, async move {
                let (status, body) = exchange(
                    self.endpoint
                        .http
                        .post(&self.notifications_url)
                        .header(IDEMPOTENCY_KEY, key)
                        .json(request),
                )
                .await?;
                expect_success(status, body).map(drop)
            })
        };
        self.endpoint.retried(attempt).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classifies_answers() {
        assert!(matches!(
            expect_success(StatusCode::INTERNAL_SERVER_ERROR, Bytes::new()),
            Err(ProviderError::Unavailable(_))
        ));
        assert!(matches!(
            expect_success(StatusCode::TOO_MANY_REQUESTS, Bytes::new()),
            Err(ProviderError::Unavailable(_))
        ));
        match expect_success(
            StatusCode::BAD_REQUEST,
            Bytes::from_static(br#"{"code":"missing_idempotency_key"}"#),
        ) {
            Err(e @ ProviderError::Rejected { .. }) => {
                assert!(!e.is_retryable());
                assert!(e.to_string().contains("missing_idempotency_key"));
            }
            other => panic!("unexpected {other:?}"),
        }
        assert!(expect_success(StatusCode::OK, Bytes::new()).is_ok());
    }

    #[test]
    fn checks_base_urls() {
        assert_eq!(
            base_url("http://127.0.0.1:9/").ok().as_deref(),
            Some("http://127.0.0.1:9")
        );
        assert!(base_url("127.0.0.1:9").is_err());
        assert!(base_url("https://example.com").is_err());
    }

    #[test]
    fn notifications_follow_final_statuses() {
        assert_eq!(
            NotificationKind::for_status(OrderStatus::Paid),
            Some(NotificationKind::OrderPaid)
        );
        assert_eq!(
            NotificationKind::for_status(OrderStatus::PaymentPending),
            None
        );
        let json = serde_json::to_string(&NotificationKind::OrderExpired).ok();
        assert_eq!(json.as_deref(), Some("\"order_expired\""));
    }
}
