//! The order routes: `POST /v1/sales/{id}/orders` (the order path) and
//! `GET /v1/orders/{id}`.
//!
//! The order path reads as its steps: parse (authenticate, check the headers, read at most
//! `order_body_limit` bytes, parse, look the sale up), admit within the deadline (one
//! admission call), make durable (append the record to the log, then confirm in the
//! background), answer 202. If the log refuses the record, the admission is aborted (stock
//! back, idempotency answer forgotten) and the buyer gets 503.
//!
//! This instance remembers the orders it accepted (so their status can be read before the
//! settler stored them) and the answers it made durable (so a retry that arrives before
//! the confirmation landed gets the 202 replayed instead of `request_in_progress`).

use super::answer::{self, json, OrderView, Resp};
use super::body::{fingerprint, idempotency_key, parse_order_body, read_body, require_json};
use super::sales::parse_sale_id;
use super::Ingest;
use crate::admission::Admission;
use crate::confirmer::Confirmer;
use crate::metrics::outcome;
use crate::model::{AbortOutcome, AdmitRequest, Answer, Decision, OrderRef};
use crate::problem::ApiError;
use http::{HeaderMap, Request, StatusCode};
use hyper::body::Incoming;
use sequencer::{OrderLog, OrderRecord, RECORD_VERSION};
use std::sync::Arc;
use storage::{OrderId, OrderStatus, Sale, SaleId, Timestamp, UserId};

/// An order accepted by this instance and maybe not yet persisted, so that its status can
/// be read right after the 202.
#[derive(Debug, Clone)]
pub(super) struct RecentOrder {
    pub(super) user: UserId,
    sale_id: SaleId,
    sequence: u64,
    quantity: u32,
    accepted_at: Timestamp,
}

impl From<&OrderRecord> for RecentOrder {
    fn from(r: &OrderRecord) -> Self {
        RecentOrder {
            user: r.user_id.clone(),
            sale_id: r.sale_id.clone(),
            sequence: r.sequence,
            quantity: r.quantity,
            accepted_at: r.accepted_at,
        }
    }
}

impl RecentOrder {
    /// The order `id` as its buyer sees it: accepted, not stored yet.
    fn view(self, id: OrderId) -> OrderView {
        OrderView {
            order_id: id,
            sale_id: self.sale_id,
            sequence: self.sequence,
            quantity: self.quantity,
            status: OrderStatus::Accepted,
            history: vec![storage::HistoryEntry {
                status: OrderStatus::Accepted,
                at: self.accepted_at,
            }],
        }
    }
}

/// Identifies an idempotency answer: sale, user, key.
pub(super) type IdemKey = (SaleId, UserId, String);

/// An answer this instance gave for an order whose record is durable.
#[derive(Debug, Clone)]
pub(super) struct DurableAnswer {
    fingerprint: String,
    answer: Answer,
}

/// One order attempt, parsed and checked against its sale: what admission decides on and
/// what the order's record is made of.
struct Attempt {
    sale_id: SaleId,
    sale: Arc<Sale>,
    admit: AdmitRequest,
    payment_token: String,
}

impl Attempt {
    /// The log record of the attempt once admission accepted it with `answer`.
    fn record(&self, answer: &Answer, accepted_at: Timestamp) -> OrderRecord {
        let quantity = self.admit.quantity;
        OrderRecord {
            v: RECORD_VERSION,
            order_id: answer.order_id,
            sale_id: self.sale_id.clone(),
            user_id: self.admit.user.clone(),
            quantity,
            amount_minor: self.sale.price.minor * i64::from(quantity),
            currency: self.sale.price.currency,
            sequence: answer.sequence,
            idempotency_key: self.admit.key.clone(),
            fingerprint: self.admit.fingerprint.clone(),
            payment_token: self.payment_token.clone(),
            accepted_at,
        }
    }

    /// The key of the attempt's idempotency answer.
    fn idem_key(&self) -> IdemKey {
        (
            self.sale_id.clone(),
            self.admit.user.clone(),
            self.admit.key.clone(),
        )
    }
}

impl Ingest {
    /// The order route: parse, admit within the deadline, make durable, answer. On success
    /// also the answer's code (`accepted` or `replayed`).
    pub(super) async fn post_order(
        &self,
        sale_id: &str,
        req: Request<Incoming>,
    ) -> Result<(Resp, &'static str), ApiError> {
        let attempt = self.parse_order(sale_id, req).await?;
        let (answer, code) = match self.admit_within_deadline(&attempt).await? {
            Decision::Accepted(answer) => (
                self.make_durable(&attempt, answer).await?,
                outcome::ACCEPTED,
            ),
            Decision::Replayed(answer) => (answer, outcome::REPLAYED),
            Decision::InProgress => (self.durable_answer(&attempt)?, outcome::REPLAYED),
            Decision::Rejected(r) => {
                return Err(ApiError::rejected(r, attempt.sale.per_user_limit))
            }
        };
        Ok((answer::accepted(&attempt.sale_id, &answer), code))
    }

    /// Everything checked before admission, in this order: the buyer's token, the
    /// `Idempotency-Key`, the content type, the body (size, deadline, shape), the sale, the
    /// quantity against the sale's per-order maximum.
    async fn parse_order(
        &self,
        sale_id: &str,
        req: Request<Incoming>,
    ) -> Result<Attempt, ApiError> {
        let user = self.auth.buyer(req.headers())?;
        let key = idempotency_key(req.headers())?;
        require_json(req.headers())?;
        let body = read_body(
            req,
            self.config.order_body_limit,
            self.config.body_read_timeout,
        )
        .await?;
        let body = parse_order_body(&body)?;
        let sale_id = parse_sale_id(sale_id)?;
        let sale = self
            .sale(&sale_id)
            .await?
            .ok_or_else(ApiError::no_such_sale)?;
        let quantity = body.quantity_within(sale.max_quantity_per_order)?;
        let admit = AdmitRequest {
            user,
            quantity,
            fingerprint: fingerprint(quantity, &body.payment_token),
            key,
            order_id: OrderId::new(),
        };
        Ok(Attempt {
            sale_id,
            sale,
            admit,
            payment_token: body.payment_token,
        })
    }

    /// One admission decision within `decision_timeout`. A decision that timed out or
    /// failed after sending may have taken stock: it is aborted in the background (abort
    /// gives back only what this order holds, so a decision that never ran costs nothing;
    /// if the backend stays down, the buyer's retry answers in-progress until reconcile
    /// repairs the counters).
    async fn admit_within_deadline(&self, attempt: &Attempt) -> Result<Decision, ApiError> {
        let decided = tokio::time::timeout(
            self.config.decision_timeout,
            self.admission.admit(&attempt.sale_id, &attempt.admit),
        )
        .await;
        match decided {
            Ok(Ok(decision)) => Ok(decision),
            failed => {
                let (admission, sale) = (Arc::clone(&self.admission), attempt.sale_id.clone());
                let oref = OrderRef::from(&attempt.admit);
                tokio::spawn(async move {
                    if let Err(e) = admission.abort(&sale, &oref).await {
                        tracing::warn!(error = %e, order = %oref.order_id, "abort of an unknown decision failed");
                    }
                });
                Err(match failed {
                    Ok(Err(e)) => e.into(),
                    _ => ApiError::decision_timed_out(),
                })
            }
        }
    }

    /// Appends the accepted order's record to the log and, once it is there, remembers the
    /// order and its answer and queues the confirmation. `log_unavailable` when the log
    /// refused the record and the admission was aborted.
    ///
    /// The append and its confirm-or-abort run in their own task: a buyer who hangs up
    /// (which drops this future) must not leave the answer unconfirmed or the stock taken.
    /// No deadline here: the embedded log completes or fails every append, and abandoning
    /// an append that may still land would release the stock of a durable order.
    async fn make_durable(&self, attempt: &Attempt, answer: Answer) -> Result<Answer, ApiError> {
        let accepted_at = Timestamp::now();
        let record = attempt.record(&answer, accepted_at);
        let recent = RecentOrder::from(&record);
        let durable = tokio::spawn(append_then_confirm(
            Arc::clone(&self.log),
            Arc::clone(&self.admission),
            Arc::clone(&self.confirmer),
            self.durable.clone(),
            record,
            answer,
        ))
        .await
        .unwrap_or(false);
        if !durable {
            return Err(ApiError::log_unavailable());
        }
        self.recent.insert(answer.order_id, recent);
        self.rates
            .entry(attempt.sale_id.clone())
            .or_default()
            .add(accepted_at.millis() / 1000, 1);
        Ok(answer)
    }

    /// A retry of an order whose confirmation has not landed yet: its answer if this
    /// instance made it durable (same body), else `request_in_progress`.
    fn durable_answer(&self, attempt: &Attempt) -> Result<Answer, ApiError> {
        self.durable
            .get(&attempt.idem_key())
            .filter(|d| d.fingerprint == attempt.admit.fingerprint)
            .map(|d| d.answer)
            .ok_or_else(ApiError::in_progress)
    }

    /// `GET /v1/orders/{id}`: the buyer's own order, from the store or, not stored yet,
    /// from the orders this instance accepted; anyone else's is `unknown_order`.
    pub(super) async fn get_order(&self, id: &str, headers: &HeaderMap) -> Result<Resp, ApiError> {
        let user = self.auth.buyer(headers)?;
        let not_found = || ApiError::unknown_order("no such order");
        let id: OrderId = id.parse().map_err(|_| not_found())?;
        if let Some(order) = self.store.get_order(id).await? {
            return if order.new.user_id == user {
                Ok(json(StatusCode::OK, &OrderView::from(order)))
            } else {
                Err(not_found())
            };
        }
        match self.recent.get(&id) {
            Some(r) if r.user == user => Ok(json(StatusCode::OK, &r.view(id))),
            _ => Err(not_found()),
        }
    }
}

/// Appends `record` to the log; whether the order is durable. On success its answer is
/// remembered in `answers` (first, so a retry on this instance gets its 202) and its
/// confirmation queued. On failure (refused, or the outcome is unknown: a delivery
/// timeout) the admission is aborted: if the settler already read the record, the abort is
/// refused and the order stands (durable after all); otherwise the stock goes back, and
/// should the record land later, the settler's claim fails and it cancels the order.
async fn append_then_confirm(
    log: Arc<dyn OrderLog>,
    admission: Arc<dyn Admission>,
    confirmer: Arc<Confirmer>,
    answers: moka::sync::Cache<IdemKey, DurableAnswer>,
    record: OrderRecord,
    answer: Answer,
) -> bool {
    let oref = OrderRef::from(&record);
    if let Err(e) = log.append(&record).await {
        tracing::warn!(error = %e, order = %oref.order_id, "append failed; aborting admission");
        match admission.abort(&record.sale_id, &oref).await {
            Ok(AbortOutcome::AlreadyClaimed) => {}
            Ok(_) => return false,
            Err(e) => {
                tracing::error!(error = %e, order = %oref.order_id, "abort failed; reconcile repairs the counters");
                return false;
            }
        }
    }
    let OrderRecord {
        sale_id,
        user_id,
        idempotency_key,
        fingerprint,
        ..
    } = record;
    answers.insert(
        (sale_id.clone(), user_id, idempotency_key),
        DurableAnswer {
            fingerprint,
            answer,
        },
    );
    confirmer.confirm(sale_id, oref).await;
    true
}
