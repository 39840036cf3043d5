//! The sale routes: `POST /v1/sales` (create), `GET /v1/sales/{id}`,
//! `POST /v1/sales/{id}/stock` (add stock) and `GET /v1/sales/{id}/stats`, and the sale
//! lookup the order route makes (from memory, see `sale_cache.rs`).
//!
//! A change to a sale goes to the catalog first (durable), then to the admission counters,
//! in a task of its own so a client that hangs up cannot leave the two apart; this
//! instance's cache takes the new definition at once.

use super::answer::{json, located, Resp, SaleStats, SaleView};
use super::body::{json_body, AddStock, CreateSale};
use super::Ingest;
use crate::admission;
use crate::problem::ApiError;
use http::{Request, StatusCode};
use hyper::body::Incoming;
use std::sync::Arc;
use storage::{OrderStatus, Sale, SaleId, Timestamp};

/// Most units one `POST /v1/sales/{id}/stock` adds.
const MAX_STOCK_ADDED: u32 = 100_000_000;

/// The sale id of a path; `unknown_sale` for one no sale can have.
pub(super) fn parse_sale_id(id: &str) -> Result<SaleId, ApiError> {
    SaleId::parse(id).map_err(|_| ApiError::no_such_sale())
}

impl Ingest {
    /// `POST /v1/sales`: 201 with the sale and its `Location`.
    pub(super) async fn create_sale(&self, req: Request<Incoming>) -> Result<Resp, ApiError> {
        self.auth.operator(req.headers())?;
        let body: CreateSale = json_body(
            req,
            self.config.admin_body_limit,
            self.config.body_read_timeout,
        )
        .await?;
        let sale = body.into_sale(Timestamp::now())?;
        let (store, admission, task_sale) = (
            Arc::clone(&self.store),
            Arc::clone(&self.admission),
            sale.clone(),
        );
        tokio::spawn(async move {
            store.create_sale(&task_sale).await?;
            match admission.create_sale(&task_sale).await {
                Ok(()) | Err(admission::Error::SaleExists(_)) => Ok(()),
                Err(e) => Err(ApiError::from(e)),
            }
        })
        .await
        .map_err(|_| ApiError::internal("creating the sale failed"))??;
        self.sales.put(sale.clone()).await;
        // The per-sale gauges pick the new sale up at their next refresh.
        self.sale_gauges.refresh.lock().listed_at = None;
        let resp = json(
            StatusCode::CREATED,
            &SaleView::new(&sale, Some(i64::from(sale.stock))),
        );
        Ok(located(resp, &format!("/v1/sales/{}", sale.id)))
    }

    /// `GET /v1/sales/{id}`.
    pub(super) async fn get_sale(&self, id: &str) -> Result<Resp, ApiError> {
        let id = parse_sale_id(id)?;
        let sale = self
            .store
            .get_sale(&id)
            .await?
            .ok_or_else(ApiError::no_such_sale)?;
        Ok(json(
            StatusCode::OK,
            &SaleView::new(&sale, self.stock_left(&id).await),
        ))
    }

    /// `POST /v1/sales/{id}/stock`: the sale with its new stock.
    pub(super) async fn add_stock(
        &self,
        id: &str,
        req: Request<Incoming>,
    ) -> Result<Resp, ApiError> {
        self.auth.operator(req.headers())?;
        let id = parse_sale_id(id)?;
        let body: AddStock = json_body(
            req,
            self.config.admin_body_limit,
            self.config.body_read_timeout,
        )
        .await?;
        let units = body.quantity.within(MAX_STOCK_ADDED)?;
        let (store, admission, task_id) = (
            Arc::clone(&self.store),
            Arc::clone(&self.admission),
            id.clone(),
        );
        let sale = tokio::spawn(async move {
            let sale = store.add_stock(&task_id, units).await?;
            admission.add_stock(&task_id, units).await?;
            Ok::<_, ApiError>(sale)
        })
        .await
        .map_err(|_| ApiError::internal("adding stock failed"))??;
        self.sales.put(sale.clone()).await;
        Ok(json(
            StatusCode::OK,
            &SaleView::new(&sale, self.stock_left(&id).await),
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
            .await?
            .ok_or_else(ApiError::no_such_sale)?;
        let totals = self.store.sale_totals(id).await?;
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

    /// `GET /v1/sales/{id}/stats` (the operator token is checked by the router).
    pub(super) async fn stats(&self, id: &str) -> Result<Resp, ApiError> {
        let id = parse_sale_id(id)?;
        Ok(json(StatusCode::OK, &self.sale_stats(&id).await?))
    }

    /// The definition of a sale, from memory; only a sale never seen waits for the store
    /// (one load for all). `None`: no such sale.
    pub(super) async fn sale(&self, id: &SaleId) -> Result<Option<Arc<Sale>>, ApiError> {
        Ok(self.sales.get(id).await?)
    }
}
