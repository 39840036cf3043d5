//! Health, readiness and metrics: `GET /healthz`, `GET /readyz` (the backends and the
//! in-process settler's stages), `GET /metrics`, and the per-sale gauges `/metrics`
//! exports, refreshed in the background.

use super::answer::{json, text, Resp, SaleStats};
use super::Ingest;
use crate::metrics::{self, SaleGauges};
use crate::problem::ApiError;
use http::{header, HeaderMap, HeaderValue, StatusCode};
use std::sync::Arc;
use std::time::{Duration, Instant};
use storage::Timestamp;
use tokio_util::sync::CancellationToken;

/// Most sales the per-sale gauges export at once (the most recently opened first).
pub const SALE_GAUGES_MAX: usize = 100;
/// How often the per-sale gauges are refreshed.
pub const SALE_GAUGES_EVERY: Duration = Duration::from_secs(1);
/// How often the refresher reads the catalog for the sales to export (a sale created by
/// this instance makes the next refresh read it at once).
const SALE_LIST_EVERY: Duration = Duration::from_secs(10);
/// How long after its end a sale stays exported while orders of it are unsettled.
const SALE_GAUGES_AFTER_END_MS: i64 = 3600 * 1000;

/// `GET /healthz`: the process answers.
pub(super) fn healthz() -> Resp {
    json(StatusCode::OK, &serde_json::json!({"status": "ok"}))
}

impl Ingest {
    /// `GET /readyz`: 503 `settler_stage_down` while a stage of the in-process settler is
    /// down; else each backend's ping, 503 with `Retry-After` unless all answer.
    pub(super) async fn ready(&self) -> Result<Resp, ApiError> {
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

    /// `GET /metrics`: OpenMetrics for a client asking for it (Prometheus), else the text
    /// format 0.0.4 (see [`metrics::render`]).
    pub(super) fn metrics_response(&self, headers: &HeaderMap) -> Resp {
        let accept = headers.get(header::ACCEPT).and_then(|v| v.to_str().ok());
        let (body, content_type) =
            metrics::render(&self.registry, metrics::wants_openmetrics(accept));
        text(StatusCode::OK, body, content_type)
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
}
