//! The `Admission` trait and its embedded backend.
//!
//! A backend owns the per-sale counters (stock, users' units, token buckets, idempotency
//! answers, sequence). The embedded backend keeps them in memory behind one mutex per sale
//! and runs the I/O-free [`model`](crate::model) directly; after a restart it is rebuilt
//! from its [`checkpoint`](crate::checkpoint), the order log after it and the store (see
//! [`EmbeddedAdmission::restore_accepted`]). Its memory is bounded per sale by
//! [`Limits`] and [`EmbeddedAdmission::maintain`] / [`EmbeddedAdmission::retire`].
//!
//! Each backend times its calls itself (`flashsale_admission_duration_seconds{backend,op}`,
//! errors in `flashsale_admission_errors_total`, see [`crate::metrics`]), around the
//! decision proper: a sold-out answer given from a local flag is not a decision.

use crate::metrics::{self, AdmissionOp, Backend};
use crate::model::{
    AbortOutcome, AdmitRequest, Counters, Decision, Entries, Limits, OrderRef, SaleRules, SaleState,
};
use async_trait::async_trait;
use dashmap::DashMap;
use parking_lot::Mutex;
use std::borrow::Cow;
use std::sync::Arc;
use storage::{BoxError, Sale, SaleId, Timestamp};

/// Errors of an admission backend.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The backend is down or too slow; nothing is known to be taken.
    #[error("admission unavailable: {context}")]
    Unavailable {
        /// What failed.
        context: Cow<'static, str>,
        /// The backend's error, if there is one ([`std::error::Error::source`]).
        #[source]
        source: Option<BoxError>,
    },
    /// The sale is not known to the backend.
    #[error("unknown sale {0}")]
    UnknownSale(SaleId),
    /// The sale exists already.
    #[error("sale {0} exists already")]
    SaleExists(SaleId),
}

impl Error {
    /// [`Error::Unavailable`] caused by `source`: `context` says what failed.
    pub fn unavailable(context: impl Into<Cow<'static, str>>, source: impl Into<BoxError>) -> Self {
        Error::Unavailable {
            context: context.into(),
            source: Some(source.into()),
        }
    }

    /// [`Error::Unavailable`] with no underlying error: `context` says it all.
    pub fn unavailable_msg(context: impl Into<Cow<'static, str>>) -> Self {
        Error::Unavailable {
            context: context.into(),
            source: None,
        }
    }
}

/// Result alias of admission.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Decides orders against a sale's counters, atomically per decision.
#[async_trait]
pub trait Admission: Send + Sync + 'static {
    /// Puts a sale's counters in place with all its stock.
    async fn create_sale(&self, sale: &Sale) -> Result<()>;
    /// Adds units to a sale's stock.
    async fn add_stock(&self, sale: &SaleId, units: u32) -> Result<()>;
    /// Decides one order attempt.
    async fn admit(&self, sale: &SaleId, req: &AdmitRequest) -> Result<Decision>;
    /// The order's record is durable: its retries now get its answer.
    async fn confirm(&self, sale: &SaleId, order: &OrderRef) -> Result<()>;
    /// The order's record did not reach the log, or its outcome is unknown: undo the
    /// acceptance unless the settler already claimed the record (see
    /// [`SaleState::abort`](crate::model::SaleState::abort)).
    async fn abort(&self, sale: &SaleId, order: &OrderRef) -> Result<AbortOutcome>;
    /// The settler takes an order it read from the log; `Ok(false)` if it was aborted
    /// first and must be cancelled, not charged. (The whole order, not only its id: a sale
    /// of several stock buckets keeps the claim in its buyer's bucket.)
    async fn claim(&self, sale: &SaleId, order: &OrderRef) -> Result<bool>;
    /// Gives an order's units back, exactly once per order id. `Ok(true)` if this call did.
    async fn release(&self, sale: &SaleId, order: &OrderRef) -> Result<bool>;
    /// [`confirm`](Self::confirm) for many orders in one call (one round trip where the
    /// backend is remote); one result per order, in order. An error of one order does not
    /// fail the others.
    async fn confirm_batch(&self, orders: &[(SaleId, OrderRef)]) -> Vec<Result<()>> {
        let mut out = Vec::with_capacity(orders.len());
        for (sale, order) in orders {
            out.push(self.confirm(sale, order).await);
        }
        out
    }
    /// [`claim`](Self::claim) for many orders in one call (one round trip where the
    /// backend is remote); one result per order, in order. An error of one order (such as
    /// its sale's keys missing) does not fail the others.
    async fn claim_batch(&self, orders: &[(SaleId, OrderRef)]) -> Vec<Result<bool>> {
        let mut out = Vec::with_capacity(orders.len());
        for (sale, order) in orders {
            out.push(self.claim(sale, order).await);
        }
        out
    }
    /// [`release`](Self::release) for many orders in one call (one round trip where the
    /// backend is remote); one result per order, in order. An error of one order does not
    /// fail the others.
    async fn release_batch(&self, orders: &[(SaleId, OrderRef)]) -> Vec<Result<bool>> {
        let mut out = Vec::with_capacity(orders.len());
        for (sale, order) in orders {
            out.push(self.release(sale, order).await);
        }
        out
    }
    /// The sale's counters, or `None` if the backend does not know the sale.
    async fn counters(&self, sale: &SaleId) -> Result<Option<Counters>>;
    /// Cheap liveness check.
    async fn ping(&self) -> Result<()>;
}

/// In-process [`Admission`]: one [`SaleState`] per sale.
#[derive(Debug, Default)]
pub struct EmbeddedAdmission {
    sales: DashMap<SaleId, Arc<Mutex<SaleState>>>,
    limits: Limits,
}

/// Bucket maps smaller than this are not worth a periodic prune (the cap prunes anyway).
const PRUNE_FROM: usize = 1024;

impl EmbeddedAdmission {
    /// An empty backend with the default caps.
    pub fn new() -> Self {
        Self::default()
    }

    /// An empty backend whose sales have these caps.
    pub fn with_limits(limits: Limits) -> Self {
        EmbeddedAdmission {
            sales: DashMap::new(),
            limits,
        }
    }

    fn new_state(&self, sale: &Sale) -> Arc<Mutex<SaleState>> {
        Arc::new(Mutex::new(SaleState::with_limits(
            SaleRules::of(sale),
            self.limits,
        )))
    }

    /// Bounds memory, called every second by the maintenance task: drops the token buckets
    /// that refilled (in sales with many) and sets the entries gauge. Returns the entries
    /// held over every sale afterwards.
    pub fn maintain(&self, now_us: i64) -> Entries {
        let mut total = Entries::default();
        for state in self.all_sales() {
            let mut s = state.lock();
            if s.entries().buckets >= PRUNE_FROM && s.prune_due(now_us) {
                s.prune_buckets(now_us);
            }
            let e = s.entries();
            total.buckets += e.buckets;
            total.units += e.units;
            total.answers += e.answers;
            total.released += e.released;
            total.claimed += e.claimed;
        }
        metrics::set_entries(&total);
        total
    }

    fn all_sales(&self) -> Vec<Arc<Mutex<SaleState>>> {
        self.sales.iter().map(|s| Arc::clone(s.value())).collect()
    }

    /// Entries a sale's state holds, per map.
    pub fn entries(&self, sale: &SaleId) -> Option<Entries> {
        self.sales.get(sale).map(|s| s.lock().entries())
    }

    /// Sales not yet retired whose end plus `retention_us` is before `now_us`, with the
    /// orders each accepted: candidates for [`retire`](Self::retire) once the store shows
    /// that many orders, all final.
    pub fn ended_sales(&self, now_us: i64, retention_us: i64) -> Vec<(SaleId, u64)> {
        self.sales
            .iter()
            .filter_map(|e| {
                let s = e.value().lock();
                let ended = s.rules.ends_at_us.saturating_add(retention_us) <= now_us;
                (ended && !s.is_retired()).then(|| (e.key().clone(), s.accepted_orders()))
            })
            .collect()
    }

    /// Drops a settled sale's per-user and per-order entries (see
    /// [`SaleState::retire`]). The caller checked that the sale ended, its idempotency
    /// retention passed and every order it accepted is final in the store.
    pub fn retire(&self, sale: &SaleId) {
        if let Some(s) = self.sales.get(sale) {
            s.lock().retire();
        }
    }

    /// The state of every sale, to write an admission checkpoint.
    pub fn sales(&self) -> Vec<(SaleId, Arc<Mutex<SaleState>>)> {
        self.sales
            .iter()
            .map(|e| (e.key().clone(), Arc::clone(e.value())))
            .collect()
    }

    /// Recovery: puts a sale's state as a checkpoint held it.
    pub fn restore_state(&self, sale: SaleId, state: SaleState) {
        self.sales.insert(sale, Arc::new(Mutex::new(state)));
    }

    /// The caps of this backend's sales.
    pub fn limits(&self) -> Limits {
        self.limits
    }

    fn sale(&self, id: &SaleId) -> Result<Arc<Mutex<SaleState>>> {
        self.sales
            .get(id)
            .map(|s| Arc::clone(s.value()))
            .ok_or_else(|| Error::UnknownSale(id.clone()))
    }

    /// Recovery: loads a sale known to the catalog (stock as the catalog holds it).
    pub fn restore_sale(&self, sale: &Sale) {
        self.sales
            .entry(sale.id.clone())
            .or_insert_with(|| self.new_state(sale));
    }

    /// Recovery: replays an order that is durable in the log.
    pub fn restore_accepted(
        &self,
        sale: &SaleId,
        order: &OrderRef,
        fingerprint: &str,
        sequence: u64,
    ) -> Result<()> {
        self.sale(sale)?
            .lock()
            .restore_accepted(order, fingerprint, sequence);
        Ok(())
    }

    /// Decides one attempt at `now_us` (the model tests drive the clock).
    pub fn admit_at(&self, sale: &SaleId, req: &AdmitRequest, now_us: i64) -> Decision {
        match self.sale(sale) {
            Ok(state) => state.lock().admit(req, now_us),
            Err(_) => Decision::Rejected(crate::model::Rejection::UnknownSale),
        }
    }

    /// Units a user holds in a sale.
    pub fn units_of(&self, sale: &SaleId, user: &storage::UserId) -> u32 {
        self.sale(sale).map_or(0, |s| s.lock().units_of(user))
    }

    /// The checkpoint writer read the order's record in the log: it is durable (see
    /// [`SaleState::mark_durable`]).
    pub fn mark_durable(&self, sale: &SaleId, order: &OrderRef) {
        if let Some(s) = self.sales.get(sale) {
            s.lock().mark_durable(order);
        }
    }

    /// Recovery: replays a release the store holds.
    pub fn restore_release(&self, sale: &SaleId, order: &OrderRef) -> Result<()> {
        self.sale(sale)?.lock().release(order);
        Ok(())
    }
}

#[async_trait]
impl Admission for EmbeddedAdmission {
    async fn create_sale(&self, sale: &Sale) -> Result<()> {
        match self.sales.entry(sale.id.clone()) {
            dashmap::mapref::entry::Entry::Occupied(_) => Err(Error::SaleExists(sale.id.clone())),
            dashmap::mapref::entry::Entry::Vacant(v) => {
                v.insert(self.new_state(sale));
                Ok(())
            }
        }
    }

    async fn add_stock(&self, sale: &SaleId, units: u32) -> Result<()> {
        self.sale(sale)?.lock().add_stock(u64::from(units));
        Ok(())
    }

    async fn admit(&self, sale: &SaleId, req: &AdmitRequest) -> Result<Decision> {
        let timer = metrics::admission(Backend::Embedded, AdmissionOp::Admit);
        let decision = self.admit_at(sale, req, Timestamp::now().micros());
        timer.finish(0);
        Ok(decision)
    }

    async fn confirm(&self, sale: &SaleId, order: &OrderRef) -> Result<()> {
        let timer = metrics::admission(Backend::Embedded, AdmissionOp::Confirm);
        timer.result(self.sale(sale).map(|s| {
            s.lock().confirm(order);
        }))
    }

    async fn abort(&self, sale: &SaleId, order: &OrderRef) -> Result<AbortOutcome> {
        let timer = metrics::admission(Backend::Embedded, AdmissionOp::Abort);
        timer.result(self.sale(sale).map(|s| s.lock().abort(order)))
    }

    async fn claim(&self, sale: &SaleId, order: &OrderRef) -> Result<bool> {
        let timer = metrics::admission(Backend::Embedded, AdmissionOp::Claim);
        timer.result(self.sale(sale).map(|s| s.lock().claim(order.order_id)))
    }

    async fn release(&self, sale: &SaleId, order: &OrderRef) -> Result<bool> {
        let timer = metrics::admission(Backend::Embedded, AdmissionOp::Release);
        timer.result(self.sale(sale).map(|s| s.lock().release(order)))
    }

    async fn counters(&self, sale: &SaleId) -> Result<Option<Counters>> {
        Ok(self.sales.get(sale).map(|s| s.lock().counters()))
    }

    async fn ping(&self) -> Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::error::Error as _;

    #[test]
    fn unavailable_exposes_the_backend_error() {
        let cause = std::io::Error::new(std::io::ErrorKind::ConnectionReset, "reset by peer");
        let err = Error::unavailable("redis", cause);
        assert_eq!(err.to_string(), "admission unavailable: redis");
        let source = err.source().expect("a source");
        assert!(
            source.downcast_ref::<std::io::Error>().is_some(),
            "{source}"
        );
        assert_eq!(
            storage::ErrorChain(&err).to_string(),
            "admission unavailable: redis: reset by peer"
        );
        assert!(Error::unavailable_msg("no reply").source().is_none());
    }
}
