//! What a user of the mock calls: [`MockProvider`] (a mock started in process on a free
//! port, as the tests and `flashsale demo` use it) and the clients of its admin routes
//! ([`fetch_audit`], [`fetch_order_audit`], [`update_config`]).

use crate::audit::{Audit, AuditPage, OrderAudit, MAX_PAGE};
use crate::config::MockConfig;
use http::StatusCode;
use settler::provider::{self, ProviderError};
use std::net::SocketAddr;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

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
        let task = tokio::spawn(crate::serve(listener, config, shutdown.clone()));
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

/// Everything the mock at `base_url` saw: every page of `GET /v1/audit` (the largest the
/// mock answers), merged; the totals and `pruned` are those of the last page. A page is
/// larger than a provider answer, so it is read without the 64 KiB cap.
pub async fn fetch_audit(base_url: &str) -> Result<Audit, ProviderError> {
    let url = format!("{}/v1/audit", base_url.trim_end_matches('/'));
    let client = admin_client()?;
    let mut audit = Audit::default();
    let mut after: Option<String> = None;
    loop {
        let mut request = client.get(&url).query(&[("limit", MAX_PAGE.to_string())]);
        if let Some(after) = &after {
            request = request.query(&[("after", after)]);
        }
        let response = request.send().await.map_err(ProviderError::from_reqwest)?;
        let status = response.status();
        let body = response
            .bytes()
            .await
            .map_err(ProviderError::from_reqwest)?;
        let page: AuditPage = provider::decode_json(&provider::expect_success(status, body)?)?;
        audit.orders.extend(page.audit.orders);
        audit.totals = page.audit.totals;
        audit.pruned = page.audit.pruned;
        match page.next {
            Some(next) => after = Some(next),
            None => return Ok(audit),
        }
    }
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
