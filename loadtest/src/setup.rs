//! The operator's side of a run: create or read the sale before it, read its stats after.
//! Uses goose's HTTP client, so goose's `--timeout` and `--accept-invalid-certs` apply.

use crate::invariants::Stats;
use anyhow::{anyhow, bail, Context};
use goose::config::GooseConfiguration;
use goose::goose::GooseUser;
use serde::Deserialize;
use std::time::Duration;
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

/// The sale under test.
#[derive(Debug, Clone)]
pub struct SaleInfo {
    /// Sale id.
    pub id: String,
    /// Opening instant.
    pub starts_at: OffsetDateTime,
    /// Stock put on sale.
    pub stock: u64,
    /// Most units per user.
    pub per_user_limit: u64,
}

#[derive(Deserialize)]
struct SaleView {
    id: String,
    starts_at: String,
    stock: u64,
    per_user_limit: u64,
}

impl TryFrom<SaleView> for SaleInfo {
    type Error = anyhow::Error;
    fn try_from(v: SaleView) -> anyhow::Result<Self> {
        Ok(SaleInfo {
            starts_at: OffsetDateTime::parse(&v.starts_at, &Rfc3339)
                .with_context(|| format!("starts_at {:?}", v.starts_at))?,
            id: v.id,
            stock: v.stock,
            per_user_limit: v.per_user_limit,
        })
    }
}

/// Sends a request builder of goose's client; its status and body. (A macro, as goose
/// does not re-export the `reqwest` whose types it would name.)
macro_rules! exchange {
    ($what:expr, $request:expr) => {{
        let what: &str = $what;
        let resp = $request.send().await.with_context(|| what.to_owned())?;
        let status = resp.status().as_u16();
        let text = resp.text().await.with_context(|| what.to_owned())?;
        (status, text)
    }};
}

/// Operator client of the API.
pub struct Api {
    user: GooseUser,
    operator_token: String,
}

impl std::fmt::Debug for Api {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Api")
            .field("base_url", &self.user.base_url.as_str())
            .finish_non_exhaustive()
    }
}

impl Api {
    /// A client of `host` with goose's configuration.
    pub fn new(
        host: &str,
        config: &GooseConfiguration,
        operator_token: &str,
    ) -> anyhow::Result<Self> {
        let url = url::Url::parse(host).with_context(|| format!("host {host:?}"))?;
        let user = GooseUser::single(url, config).map_err(|e| anyhow!("HTTP client: {e}"))?;
        Ok(Api {
            user,
            operator_token: operator_token.to_owned(),
        })
    }

    fn url(&self, path: &str) -> anyhow::Result<String> {
        self.user
            .build_url(path)
            .map_err(|e| anyhow!("{path}: {e}"))
    }

    /// Creates a sale opening at `starts_at` (now when `None`).
    pub async fn create_sale(
        &self,
        stock: u32,
        per_user_limit: u32,
        starts_at: Option<OffsetDateTime>,
    ) -> anyhow::Result<SaleInfo> {
        let mut body = serde_json::json!({
            "sku": "loadtest",
            "stock": stock,
            "price_cents": 1999,
            "currency": "EUR",
            "per_user_limit": per_user_limit,
        });
        if let Some(t) = starts_at {
            body["starts_at"] = serde_json::Value::String(t.format(&Rfc3339)?);
        }
        let (status, text) = exchange!(
            "POST /v1/sales",
            self.user
                .client
                .post(self.url("/v1/sales")?)
                .bearer_auth(&self.operator_token)
                .json(&body)
        );
        if status != 201 {
            bail!("creating the sale: {status} {text}");
        }
        let view: SaleView = serde_json::from_str(&text).context("the created sale")?;
        view.try_into()
    }

    /// Reads a sale.
    pub async fn sale(&self, id: &str) -> anyhow::Result<SaleInfo> {
        let (status, text) = exchange!(
            "GET /v1/sales/{id}",
            self.user.client.get(self.url(&format!("/v1/sales/{id}"))?)
        );
        if status != 200 {
            bail!("reading sale {id}: {status} {text}");
        }
        let view: SaleView = serde_json::from_str(&text).context("the sale")?;
        view.try_into()
    }

    /// The sale's stats.
    pub async fn stats(&self, id: &str) -> anyhow::Result<Stats> {
        let (status, text) = exchange!(
            "GET /v1/sales/{id}/stats",
            self.user
                .client
                .get(self.url(&format!("/v1/sales/{id}/stats"))?)
                .bearer_auth(&self.operator_token)
        );
        if status != 200 {
            bail!("reading the stats of sale {id}: {status} {text}");
        }
        serde_json::from_str(&text).context("the stats")
    }

    /// Waits up to `timeout` for the sale to settle; the last stats read, and whether it
    /// settled.
    pub async fn wait_settled(&self, id: &str, timeout: Duration) -> anyhow::Result<(Stats, bool)> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let stats = self.stats(id).await?;
            if stats.settled() {
                return Ok((stats, true));
            }
            if tokio::time::Instant::now() >= deadline {
                return Ok((stats, false));
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }
}
