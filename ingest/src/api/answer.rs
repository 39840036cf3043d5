//! What the API answers besides problems: the JSON views of sales, stats and orders, each
//! built in one place from what it shows, and the responses that carry them.

use crate::model::Answer;
use bytes::Bytes;
use http::{header, HeaderValue, Response, StatusCode};
use http_body_util::Full;
use serde::{Deserialize, Serialize};
use storage::{Currency, Order, OrderId, OrderStatus, Sale, SaleId, Timestamp, UserRate};

/// A response of the API.
pub(super) type Resp = Response<Full<Bytes>>;

/// A sale as the API shows it.
#[derive(Debug, Serialize, Deserialize)]
pub struct SaleView {
    /// Sale id.
    pub id: SaleId,
    /// Item on sale.
    pub sku: String,
    /// Total units put on sale.
    pub stock: u32,
    /// Units not taken (from the admission backend), if known.
    pub stock_left: Option<i64>,
    /// Unit price in minor units.
    pub price_cents: i64,
    /// Currency.
    pub currency: Currency,
    /// Opening instant.
    pub starts_at: Timestamp,
    /// Closing instant.
    pub ends_at: Timestamp,
    /// Most units per user.
    pub per_user_limit: u32,
    /// Most units per order.
    pub max_quantity_per_order: u32,
    /// Per-user rate.
    pub user_rate: UserRate,
    /// Stock buckets of the distributed admission backend.
    pub stock_buckets: u32,
}

impl SaleView {
    /// The view of `sale` with `stock_left` from the admission backend, if known.
    pub fn new(sale: &Sale, stock_left: Option<i64>) -> Self {
        SaleView {
            id: sale.id.clone(),
            sku: sale.sku.clone(),
            stock: sale.stock,
            stock_left,
            price_cents: sale.price.minor,
            currency: sale.price.currency,
            starts_at: sale.starts_at,
            ends_at: sale.ends_at,
            per_user_limit: sale.per_user_limit,
            max_quantity_per_order: sale.max_quantity_per_order,
            user_rate: sale.user_rate,
            stock_buckets: sale.stock_buckets,
        }
    }
}

/// `GET /v1/sales/{id}/stats`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct SaleStats {
    /// Sale id.
    pub sale_id: String,
    /// Total units put on sale.
    pub stock: u64,
    /// Units not taken.
    pub stock_left: i64,
    /// Orders accepted (202).
    pub accepted: u64,
    /// Units accepted.
    pub accepted_units: u64,
    /// Rejections by code.
    pub rejected: std::collections::BTreeMap<String, u64>,
    /// Orders in the store.
    pub persisted: u64,
    /// Orders waiting on the payment provider.
    pub payment_pending: u64,
    /// Orders paid.
    pub paid: u64,
    /// Orders whose payment failed.
    pub payment_failed: u64,
    /// Orders expired.
    pub expired: u64,
    /// Orders whose stock went back.
    pub released: u64,
    /// Units that went back.
    pub released_units: u64,
    /// Accepted orders per second over the last ten seconds.
    pub throughput_per_s: f64,
}

/// An order as its buyer sees it.
#[derive(Debug, Serialize, Deserialize)]
pub struct OrderView {
    /// Order id.
    pub order_id: OrderId,
    /// Sale id.
    pub sale_id: SaleId,
    /// Sequence in the sale.
    pub sequence: u64,
    /// Units.
    pub quantity: u32,
    /// Current status.
    pub status: OrderStatus,
    /// Statuses entered, oldest first.
    pub history: Vec<storage::HistoryEntry>,
}

impl From<Order> for OrderView {
    /// A stored order as its buyer sees it.
    fn from(order: Order) -> Self {
        OrderView {
            order_id: order.new.order_id,
            sale_id: order.new.sale_id,
            sequence: order.new.sequence,
            quantity: order.new.quantity,
            status: order.status,
            history: order.history,
        }
    }
}

/// `value` as JSON with `status`.
pub(super) fn json<T: Serialize>(status: StatusCode, value: &T) -> Resp {
    let body = serde_json::to_vec(value).unwrap_or_default();
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    resp
}

/// `body` with `status` and `content_type`.
pub(super) fn text(status: StatusCode, body: String, content_type: &'static str) -> Resp {
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    *resp.status_mut() = status;
    resp.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    resp
}

/// `resp` with a `Location` header, unless `location` is not a valid header value.
pub(super) fn located(mut resp: Resp, location: &str) -> Resp {
    if let Ok(v) = HeaderValue::from_str(location) {
        resp.headers_mut().insert(header::LOCATION, v);
    }
    resp
}

/// The 202 of an accepted (or replayed) order.
pub(super) fn accepted(sale_id: &SaleId, answer: &Answer) -> Resp {
    let resp = json(
        StatusCode::ACCEPTED,
        &serde_json::json!({
            "order_id": answer.order_id,
            "sale_id": sale_id,
            "sequence": answer.sequence,
            "quantity": answer.quantity,
            "status": "accepted",
        }),
    );
    located(resp, &format!("/v1/orders/{}", answer.order_id))
}
