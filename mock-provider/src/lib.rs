//! The mock payment and notification provider: a real HTTP/1 server (hyper) that tests,
//! `flashsale demo` and `flashsale mock-provider` run in place of real providers.
//!
//! It keeps every charge, refund and notification by idempotency key in memory (the
//! ledger, [`state`]) and counts what it saw in its [`audit`]: exact totals, and per order
//! for at most `audit_cap` orders, so a test can prove "at most one successful charge per
//! order" and "one notification per order and outcome" from the provider's side
//! ([`fetch_audit`]).
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
//! problem+json ([`httpd::Problem`]) with a stable `code`. `GET /v1/audit` pages by
//! cursor (`?after=<order id>&limit=<n>`, see [`audit`]). The audit is bounded; the ledger
//! grows with the orders seen (a retry must find its charge): the mock is for tests and
//! demos.
//!
//! Modules: [`config`] ([`MockConfig`]), [`state`] (ledger, fault draws), [`audit`],
//! `routes` (the handlers, served by the one server loop of `httpd`), [`client`]
//! ([`MockProvider`] and the admin clients) and [`metrics`].
//!
//! `GET /metrics` serves the mock's own registry ([`MockMetrics`], one per server) in the
//! OpenMetrics text format: `flashsale_mock_requests_total{route,outcome}` (outcome `ok`,
//! the problem `code` answered, or `answer_lost`) and
//! `flashsale_mock_request_duration_seconds{route}`, for every route including unknown
//! ones (`not_found`).

pub mod audit;
pub mod client;
pub mod config;
pub mod metrics;
mod routes;
mod state;

pub use audit::{Audit, AuditPage, AuditTotals, OrderAudit};
pub use client::{fetch_audit, fetch_order_audit, update_config, MockProvider};
pub use config::MockConfig;
pub use metrics::MockMetrics;

use httpd::ServerConfig;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// Most connections served at once.
const MAX_CONNECTIONS: usize = 1024;

/// Serves the mock on `listener` until `shutdown` is cancelled, then lets requests under
/// way finish (hanging ones are cut short) and returns. Fails only if `config` is invalid.
pub async fn serve(
    listener: TcpListener,
    config: MockConfig,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    config
        .validate()
        .map_err(|why| std::io::Error::new(std::io::ErrorKind::InvalidInput, why))?;
    let mock = Arc::new(routes::Mock::new(config, shutdown.clone()));
    let server = ServerConfig {
        max_connections: MAX_CONNECTIONS,
        header_read_timeout: Duration::from_secs(10),
        idle_timeout: Duration::from_secs(10),
        shutdown_grace: Duration::from_secs(10),
        ..ServerConfig::default()
    };
    httpd::serve_with(listener, mock, None, server, shutdown).await
}
