//! The charge stage: drives each order it is handed from `persisted` to a final status,
//! its stock released and its buyer notified, at most `charge_concurrency` at once. Store
//! writes and admission calls go through the core's batchers, so concurrent orders share
//! transactions and round trips.

use super::core::{claim, fresh_order, Core, Job, Work};
use super::stats::SettlerStats;
use crate::breaker::Permit;
use crate::metrics::{metrics, Event, CHARGE_QUEUE};
use crate::provider::{ChargeOutcome, PaymentClient, ProviderError};
use std::sync::Arc;
use std::time::Duration;
use storage::{Change, Order, OrderId, OrderStatus, RefundState, MAX_CHARGE_ID};
use tokio::sync::{mpsc, Semaphore};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

/// Bound on status steps for one order in one job; a legal life has at most three.
const MAX_STEPS: usize = 8;

/// Runs jobs with bounded concurrency until shutdown, then gives those under way `grace`.
pub(crate) async fn charge_stage(
    core: Arc<Core>,
    mut jobs: mpsc::Receiver<Job>,
    concurrency: usize,
    grace: Duration,
    shutdown: CancellationToken,
) {
    let permits = Arc::new(Semaphore::new(concurrency.max(1)));
    let mut running = JoinSet::new();
    loop {
        while let Some(done) = running.try_join_next() {
            if let Err(e) = done {
                tracing::error!(error = %e, "settle job panicked");
            }
        }
        let permit = tokio::select! {
            biased;
            _ = shutdown.cancelled() => break,
            p = Arc::clone(&permits).acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => break,
            },
        };
        let job = tokio::select! {
            biased;
            _ = shutdown.cancelled() => break,
            job = jobs.recv() => match job {
                Some(job) => job,
                None => break,
            },
        };
        metrics().set_queue_depth(CHARGE_QUEUE, jobs.len());
        let core = Arc::clone(&core);
        let driving = InFlight::start();
        running.spawn(async move {
            let _permit = permit;
            let _driving = driving;
            core.run_job(job).await;
        });
    }
    // Queued jobs are dropped (their claims with them): the orders are durable and the next
    // sweep or start picks them up.
    drop(jobs);
    metrics().set_queue_depth(CHARGE_QUEUE, 0);
    let drained = tokio::time::timeout(grace, async {
        while running.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        tracing::warn!(
            abandoned = running.len(),
            "shutdown grace over; abandoning orders under way"
        );
        running.abort_all();
        while running.join_next().await.is_some() {}
    }
}

/// One order driven by the charge stage, counted in `flashsale_settler_charges_in_flight`
/// until dropped (a job that ends, panics or is aborted).
struct InFlight;

impl InFlight {
    fn start() -> Self {
        metrics().charges_in_flight.inc();
        InFlight
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        metrics().charges_in_flight.dec();
    }
}

impl Core {
    async fn run_job(&self, job: Job) {
        let id = job.claim.id;
        let (order, recovering) = match job.work {
            Work::Fresh(new) => (fresh_order(new), false),
            Work::Recover => match self.reload(id).await {
                Some(order) => (order, true),
                None => return,
            },
        };
        self.drive(order, recovering).await;
        drop(job.claim);
    }

    /// Moves an order along until it is final and followed up, or a step fails (then the
    /// sweep takes it up again). `recovering`: a `payment_pending` order may have been
    /// charged already, so its charge is looked up before it is sent. An order that is not
    /// final needs the payment provider, so nothing happens to it while the circuit is open.
    async fn drive(&self, mut order: Order, mut recovering: bool) {
        let id = order.new.order_id;
        let mut permit: Option<Permit> = None;
        for _ in 0..MAX_STEPS {
            if !order.status.is_final() && permit.is_none() {
                match self.breaker.try_acquire() {
                    Some(p) => permit = Some(p),
                    None => {
                        tracing::debug!(order_id = %id, status = %order.status, "circuit open; order left for later");
                        return;
                    }
                }
            }
            match order.status {
                OrderStatus::Accepted => {
                    tracing::error!(order_id = %id, "stored order in status accepted");
                    return;
                }
                OrderStatus::Persisted => {
                    let next = match self.claims.call(order.clone()).await {
                        Some(Ok(true)) => OrderStatus::PaymentPending,
                        Some(Ok(false)) => {
                            tracing::warn!(order_id = %id, "admission was aborted before the record landed; cancelling the order");
                            OrderStatus::Expired
                        }
                        Some(Err(e)) => {
                            tracing::warn!(order_id = %id, error = %e, "claim failed; left for the sweep");
                            return;
                        }
                        None => return,
                    };
                    match self.step(&mut order, next, None, Vec::new()).await {
                        // Entered now: not past its TTL.
                        Some(true) if next == OrderStatus::PaymentPending => {
                            order.history.clear();
                            recovering = false;
                        }
                        Some(true) => recovering = false,
                        Some(false) => recovering = true,
                        None => return,
                    }
                }
                OrderStatus::PaymentPending => {
                    let Some(p) = permit.take() else {
                        return;
                    };
                    let expiring = recovering && self.past_ttl(&order);
                    let settled = self
                        .settle_charge(&mut order, recovering, expiring, p)
                        .await;
                    if settled.is_none() || !order.status.is_final() {
                        return;
                    }
                    recovering = true;
                }
                OrderStatus::Paid | OrderStatus::PaymentFailed | OrderStatus::Expired => {
                    self.forget_backoff(id);
                    self.follow_up(&order).await;
                    return;
                }
            }
        }
        tracing::error!(order_id = %id, status = %order.status, "order did not settle in bounded steps");
    }

    /// Charges a `payment_pending` order (after a lookup when `recovering`), or, when
    /// `expiring`, only looks its charge up and expires it if there is none; records the
    /// outcome in `order` and the provider's health in `permit`. `None` if the order must
    /// wait (provider or store failed).
    async fn settle_charge(
        &self,
        order: &mut Order,
        recovering: bool,
        expiring: bool,
        permit: Permit,
    ) -> Option<()> {
        let id = order.new.order_id;
        let charged: Result<Option<ChargeOutcome>, ProviderError> = if recovering || expiring {
            match self.payments.lookup(&PaymentClient::charge_key(id)).await {
                Ok(Some(outcome)) => Ok(Some(outcome)),
                Ok(None) if expiring => Ok(None),
                Ok(None) => self.payments.charge(&order.new).await.map(Some),
                Err(e) => Err(e),
            }
        } else {
            self.payments.charge(&order.new).await.map(Some)
        };
        permit.record(&charged);
        if let Ok(Some(_)) = &charged {
            metrics().event(Event::Charged, 1);
        }
        let outcome = match charged {
            Ok(Some(outcome)) => outcome,
            Ok(None) => {
                let moved = self.finalize(order, OrderStatus::Expired, None).await?;
                if moved {
                    tracing::info!(order_id = %id, "order not paid in time; expired");
                }
                return Some(());
            }
            Err(e) => {
                SettlerStats::add(&self.counters().provider_errors, 1);
                self.defer(order).await;
                if e.is_retryable() {
                    tracing::warn!(order_id = %id, error = %e, "payment provider unavailable; order stays payment_pending");
                } else {
                    // A refusal is not a decline: nothing says the buyer cannot pay, so the
                    // order waits (for an operator or the expiry) instead of failing.
                    tracing::error!(order_id = %id, error = %e, "payment provider refused the charge request; order stays payment_pending");
                }
                return None;
            }
        };
        let (to, charge_id) = match &outcome {
            ChargeOutcome::Succeeded { charge_id } if charge_id.len() > MAX_CHARGE_ID => {
                // The store refuses it (and with it the whole batch): never send it there.
                SettlerStats::add(&self.counters().provider_errors, 1);
                self.defer(order).await;
                tracing::error!(order_id = %id, len = charge_id.len(), "payment provider answered a charge id longer than the store keeps; order stays payment_pending");
                return None;
            }
            ChargeOutcome::Succeeded { charge_id } => (OrderStatus::Paid, Some(charge_id.clone())),
            ChargeOutcome::Declined => (OrderStatus::PaymentFailed, None),
        };
        if !self.finalize(order, to, charge_id).await? {
            // Someone else settled it (e.g. it expired meanwhile): `order` is what the
            // store holds now.
            if let ChargeOutcome::Succeeded { charge_id } = &outcome {
                if order.status.releases_stock() {
                    self.refund(id, charge_id, None).await;
                }
            }
        }
        Some(())
    }

    /// Moves a `payment_pending` order to its final status `to`, its stock released first
    /// when `to` releases it and `released_at` recorded in the same write. The buyer is
    /// told only once the status write applied (another process may have moved the order
    /// to another outcome meanwhile), by the drive's follow-up. As [`Core::step`].
    async fn finalize(
        &self,
        order: &mut Order,
        to: OrderStatus,
        charge_id: Option<String>,
    ) -> Option<bool> {
        let id = order.new.order_id;
        let mut follow_ups = Vec::with_capacity(1);
        if to.releases_stock() {
            let mut ending = order.clone();
            ending.status = to;
            if self.release_stock(&ending).await {
                follow_ups.push(Change::Released(id));
            }
        }
        self.step(order, to, charge_id, follow_ups).await
    }

    /// A charge that succeeded for an order already void: give the money back (invariant:
    /// at most one successful charge per order, none kept for a released order). The refund
    /// is an outbox on the order: recorded `owed` with the charge id before the provider is
    /// asked, `refunded` or `refused` after, so one owed survives a restart and the sweep
    /// finishes it ([`Core::retry_refunds`]). The refund's key is `"{order_id}:refund"`, so
    /// retrying it refunds once; `permit` (the sweep's retries) learns the provider's health.
    /// `true` if the refund is no longer owed (refunded or refused).
    async fn refund(&self, id: OrderId, charge_id: &str, permit: Option<Permit>) -> bool {
        let owed = Change::Refund {
            id,
            state: RefundState::Owed,
            charge_id: Some(charge_id.to_owned()),
        };
        if let Err(e) = self.write(vec![owed]).await {
            // Not recorded: the charge is still looked up (and found) when the sweep picks
            // the order up again, so refund now rather than wait.
            tracing::warn!(order_id = %id, charge_id, error = %e, "refund owed not recorded");
        }
        let result = self.payments.refund(id, charge_id).await;
        if let Some(p) = permit {
            p.record(&result);
        }
        let settled = match result {
            Ok(_) => {
                SettlerStats::add(&self.counters().refunded, 1);
                metrics().event(Event::Refunded, 1);
                tracing::warn!(order_id = %id, charge_id, "late charge of a void order refunded");
                RefundState::Refunded
            }
            Err(e) if e.is_retryable() => {
                SettlerStats::add(&self.counters().provider_errors, 1);
                tracing::error!(order_id = %id, charge_id, error = %e, "refund of a late charge failed; the sweep retries it");
                return false;
            }
            Err(e) => {
                SettlerStats::add(&self.counters().provider_errors, 1);
                tracing::error!(order_id = %id, charge_id, error = %e, "refund of a late charge refused; an operator must settle it (reconcile reports it)");
                RefundState::Refused
            }
        };
        let done = Change::Refund {
            id,
            state: settled,
            charge_id: None,
        };
        if let Err(e) = self.write(vec![done]).await {
            // Left owed: the sweep asks again, under the same key, and records the answer.
            tracing::warn!(order_id = %id, charge_id, error = %e, "refund outcome not recorded; the sweep asks again");
        }
        true
    }

    /// Retries the refunds the store holds as owed, while the circuit lets calls through.
    pub(crate) async fn retry_refunds(self: &Arc<Self>, limit: usize) {
        let owed = match self.store.refunds_owed(limit).await {
            Ok(owed) => owed,
            Err(e) => {
                tracing::warn!(error = %storage::ErrorChain(&e), "sweep: refunds owed not read");
                return;
            }
        };
        let mut left = owed.len();
        self.note_refunds_owed(left);
        for order in owed {
            let id = order.new.order_id;
            let Some(charge_id) = order.charge_id else {
                tracing::error!(order_id = %id, "refund owed without a charge id");
                continue;
            };
            let Some(claim) = claim(self, id) else {
                continue;
            };
            let Some(permit) = self.breaker.try_acquire() else {
                return;
            };
            if self.refund(id, &charge_id, Some(permit)).await {
                left -= 1;
                self.note_refunds_owed(left);
            }
            drop(claim);
        }
    }

    /// `flashsale`'s count of refunds owed, as the sweep's last read saw it (and settled
    /// since).
    fn note_refunds_owed(&self, owed: usize) {
        self.counters()
            .refunds_owed
            .store(owed as u64, std::sync::atomic::Ordering::Relaxed);
    }

    /// Releases the stock of a failed or expired order and notifies the buyer, each only if
    /// still owed, and records both in one write. The notification goes through the outbox
    /// that `notified_at` is: sent while NULL, then recorded.
    async fn follow_up(&self, order: &Order) {
        let id = order.new.order_id;
        let mut changes = Vec::with_capacity(2);
        if order.status.releases_stock()
            && order.released_at.is_none()
            && self.release_stock(order).await
        {
            changes.push(Change::Released(id));
        }
        if order.notified_at.is_none() && self.notify(order, order.status).await {
            changes.push(Change::Notified(id));
        }
        if changes.is_empty() {
            return;
        }
        match self.write(changes.clone()).await {
            Ok(applied) => self.count_follow_ups(&changes, &applied),
            Err(e) => {
                tracing::warn!(order_id = %id, error = %e, "follow-up not recorded; left for the sweep");
            }
        }
    }
}
