//! `GET /v1/orders/{id}/receipt`: the order's PDF document (its receipt, or the refund
//! note of a refunded late charge), read from the archive through a [`DocumentReader`].
//!
//! Authorized like `GET /v1/orders/{id}`: another buyer's order is `unknown_order`, the
//! same answer as an order that does not exist, so a token learns nothing about orders
//! that are not its own.

use super::answer::Resp;
use super::Ingest;
use crate::problem::ApiError;
use async_trait::async_trait;
use bytes::Bytes;
use http::{header, HeaderMap, HeaderValue, Response, StatusCode};
use http_body_util::Full;
use storage::OrderId;

/// Why a document could not be read.
#[derive(Debug, thiserror::Error)]
#[error("document archive unavailable: {0}")]
pub struct DocumentError(pub String);

/// Read access to the stored documents (the receipts archive): the object under `key`, or
/// `None` when there is none.
#[async_trait]
pub trait DocumentReader: Send + Sync {
    /// The document under `key`, if any.
    async fn get(&self, key: &str) -> Result<Option<Bytes>, DocumentError>;
}

impl Ingest {
    /// `GET /v1/orders/{id}/receipt`.
    pub(super) async fn get_receipt(
        &self,
        id: &str,
        headers: &HeaderMap,
    ) -> Result<Resp, ApiError> {
        let user = self.auth.buyer(headers)?;
        let not_found = || ApiError::unknown_order("no such order");
        let id: OrderId = id.parse().map_err(|_| not_found())?;
        let order = match self.store.get_order(id).await? {
            Some(order) if order.new.user_id == user => order,
            // Another buyer's order answers exactly as an unknown one.
            Some(_) => return Err(not_found()),
            // Accepted by this instance but not stored yet: no document yet.
            None => {
                return match self.recent.get(&id) {
                    Some(r) if r.user == user => Err(not_ready()),
                    _ => Err(not_found()),
                }
            }
        };
        let Some(key) = order.refund_note_key.or(order.receipt_key) else {
            return Err(not_ready());
        };
        let Some(reader) = &self.documents else {
            return Err(
                ApiError::unavailable("receipts are not served by this instance").retry_after(5),
            );
        };
        match reader.get(&key).await {
            Ok(Some(bytes)) => Ok(pdf(bytes)),
            // Recorded on the order but not (or no longer) in the archive.
            Ok(None) => {
                tracing::warn!(order = %id, key, "the order's document is missing from the archive");
                Err(not_ready())
            }
            Err(e) => {
                tracing::warn!(error = %e, order = %id, "reading a receipt");
                Err(ApiError::unavailable("the receipts archive is unavailable").retry_after(1))
            }
        }
    }
}

fn not_ready() -> ApiError {
    ApiError::receipt_not_ready(
        "the order has no receipt yet (it is written once the order is paid)",
    )
}

/// 200 `application/pdf` with `bytes`.
fn pdf(bytes: Bytes) -> Resp {
    let mut resp = Response::new(Full::new(bytes));
    *resp.status_mut() = StatusCode::OK;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/pdf"),
    );
    resp
}
