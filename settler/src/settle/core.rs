//! What the stages share: the store and provider clients, the batchers in front of the
//! store and admission, the in-flight set, backoffs and the one status step every stage
//! takes.

use super::batcher::Batcher;
use super::stats::{Counters, SettlerStats};
use super::StockRelease;
use crate::breaker::CircuitBreaker;
use crate::metrics::{metrics, Event};
use crate::provider::{NotificationClient, NotificationKind, PaymentClient};
use parking_lot::Mutex;
use rand::Rng;
use std::collections::{HashMap, HashSet};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};
use storage::{Change, NewOrder, Order, OrderId, OrderStatus, OrderStore, Timestamp};
use tokio::sync::Notify;

/// Store writes: a caller's changes (one order's) and what applied.
pub(crate) type Writes = Batcher<Vec<Change>, Result<Vec<bool>, String>>;
/// Claims or releases at admission, one order each.
pub(crate) type AdmissionCalls = Batcher<Order, Result<bool, String>>;

/// When an order whose charge failed may be tried again.
#[derive(Debug, Clone, Copy)]
struct Backoff {
    due: Instant,
    failures: u32,
}

/// State shared by the intake, the charge stage, the sweep and the publisher.
pub(crate) struct Core {
    pub(crate) store: Arc<dyn OrderStore>,
    pub(crate) payments: PaymentClient,
    pub(crate) notifications: NotificationClient,
    pub(crate) breaker: CircuitBreaker,
    /// The notification provider's own breaker: while it is open, notifications wait in
    /// the outbox instead of being sent to a provider that is down.
    pub(crate) notify_breaker: CircuitBreaker,
    pub(crate) writes: Writes,
    pub(crate) claims: AdmissionCalls,
    pub(crate) releases: AdmissionCalls,
    in_flight: Mutex<HashSet<OrderId>>,
    /// Orders whose last charge failed, until they may be tried again.
    backoff: Mutex<HashMap<OrderId, Backoff>>,
    /// Woken on every status change, so the publisher runs soon after.
    pub(crate) events_ready: Notify,
    /// Woken on every status change, so the receipts stage looks for owed documents soon.
    pub(crate) documents_ready: Notify,
    pub(crate) stats: SettlerStats,
    pub(crate) payment_ttl: Duration,
    backoff_min: Duration,
    backoff_max: Duration,
}

/// The parts a [`Core`] is made of.
pub(crate) struct CoreParts {
    pub(crate) store: Arc<dyn OrderStore>,
    pub(crate) release: Arc<dyn StockRelease>,
    pub(crate) payments: PaymentClient,
    pub(crate) notifications: NotificationClient,
    pub(crate) breaker: CircuitBreaker,
    pub(crate) notify_breaker: CircuitBreaker,
    pub(crate) stats: SettlerStats,
    pub(crate) payment_ttl: Duration,
    pub(crate) sweep_interval: Duration,
    pub(crate) order_retry_max: Duration,
    pub(crate) write_batch: usize,
    pub(crate) admission_batch: usize,
}

fn message<E: std::fmt::Display>(r: Result<bool, E>) -> Result<bool, String> {
    r.map_err(|e| e.to_string())
}

impl Core {
    /// Builds the core and starts its batchers on the current runtime.
    pub(crate) fn start(parts: CoreParts) -> Arc<Core> {
        let store = Arc::clone(&parts.store);
        let counters = Arc::clone(&parts.stats.counters);
        let writes = Batcher::spawn(parts.write_batch, move |reqs: Vec<Vec<Change>>| {
            let store = Arc::clone(&store);
            let counters = Arc::clone(&counters);
            async move {
                let all: Vec<Change> = reqs.iter().flatten().cloned().collect();
                metrics().write_batch_changes.observe(all.len() as f64);
                SettlerStats::add(&counters.write_batches, 1);
                SettlerStats::add(&counters.writes, all.len() as u64);
                match store.apply_batch(&all).await {
                    Ok(applied) => {
                        let mut applied = applied.into_iter();
                        reqs.iter()
                            .map(|r| Ok(applied.by_ref().take(r.len()).collect()))
                            .collect()
                    }
                    Err(e) => {
                        let e = storage::ErrorChain(&e).to_string();
                        reqs.iter().map(|_| Err(e.clone())).collect()
                    }
                }
            }
        });
        let release = Arc::clone(&parts.release);
        let claims = Batcher::spawn(parts.admission_batch, move |orders: Vec<Order>| {
            let release = Arc::clone(&release);
            async move {
                release
                    .claim_batch(&orders)
                    .await
                    .into_iter()
                    .map(message)
                    .collect()
            }
        });
        let release = Arc::clone(&parts.release);
        let releases = Batcher::spawn(parts.admission_batch, move |orders: Vec<Order>| {
            let release = Arc::clone(&release);
            async move {
                release
                    .release_batch(&orders)
                    .await
                    .into_iter()
                    .map(message)
                    .collect()
            }
        });
        Arc::new(Core {
            store: parts.store,
            payments: parts.payments,
            notifications: parts.notifications,
            breaker: parts.breaker,
            notify_breaker: parts.notify_breaker,
            writes,
            claims,
            releases,
            in_flight: Mutex::new(HashSet::new()),
            backoff: Mutex::new(HashMap::new()),
            events_ready: Notify::new(),
            documents_ready: Notify::new(),
            stats: parts.stats,
            payment_ttl: parts.payment_ttl,
            backoff_min: parts.sweep_interval.max(Duration::from_millis(1)),
            backoff_max: parts.order_retry_max,
        })
    }

    pub(crate) fn counters(&self) -> &Counters {
        &self.stats.counters
    }

    /// Tells the publisher (and the receipts stage) a status changed.
    pub(crate) fn changed(&self) {
        self.events_ready.notify_one();
        self.documents_ready.notify_one();
    }

    /// Whether the sweep may try the order's charge again.
    pub(crate) fn is_due(&self, id: OrderId, now: Instant) -> bool {
        self.backoff.lock().get(&id).is_none_or(|b| b.due <= now)
    }

    /// How many orders wait out a backoff.
    pub(crate) fn waiting(&self) -> usize {
        self.backoff.lock().len()
    }

    pub(crate) fn forget_backoff(&self, id: OrderId) {
        self.backoff.lock().remove(&id);
    }

    /// Makes an order whose charge failed wait before its next attempt: `backoff_min`
    /// doubling per consecutive failure up to `backoff_max`, the wait drawn from its upper
    /// half so orders that failed together spread out. The wait is kept here (the sweep
    /// checks it without a read) and recorded on the order ([`Change::Deferred`]: its
    /// failed attempts and `retry_after`), so a restarted settler neither forgets it nor
    /// starts the doubling over; `order.failed_attempts` is what the store held when the
    /// order was read.
    pub(crate) async fn defer(&self, order: &Order) {
        let id = order.new.order_id;
        let now = Instant::now();
        let drawn = {
            let mut map = self.backoff.lock();
            let entry = map.entry(id).or_insert(Backoff {
                due: now,
                failures: 0,
            });
            entry.failures = entry.failures.max(order.failed_attempts).saturating_add(1);
            let max = self.backoff_max.max(self.backoff_min);
            let wait = self
                .backoff_min
                .saturating_mul(1u32 << (entry.failures - 1).min(20))
                .min(max);
            let millis = wait.as_millis().min(u128::from(u64::MAX)) as u64;
            let drawn = rand::rng().random_range(millis / 2..=millis.max(1));
            entry.due = now + Duration::from_millis(drawn);
            drawn
        };
        let deferred = Change::Deferred {
            id,
            retry_after: Timestamp::now().plus_millis(i64::try_from(drawn).unwrap_or(i64::MAX)),
        };
        if let Err(e) = self.write(vec![deferred]).await {
            tracing::warn!(order_id = %id, error = %e, "backoff not recorded; kept in memory only");
        }
    }

    /// Forgets backoffs that were due long ago: their orders were finished elsewhere.
    pub(crate) fn prune_backoff(&self, now: Instant) {
        let keep = self.payment_ttl.max(self.backoff_max);
        self.backoff
            .lock()
            .retain(|_, b| now.saturating_duration_since(b.due) < keep);
    }

    /// Whether a `payment_pending` order entered that status longer than `payment_ttl` ago
    /// (as its history tells; an order read without history never is).
    pub(crate) fn past_ttl(&self, order: &Order) -> bool {
        let Some(entered) = order
            .history
            .iter()
            .rev()
            .find(|h| h.status == OrderStatus::PaymentPending)
            .map(|h| h.at)
        else {
            return false;
        };
        let ttl = i64::try_from(self.payment_ttl.as_millis()).unwrap_or(i64::MAX);
        entered < Timestamp::now().plus_millis(-ttl)
    }

    pub(crate) async fn reload(&self, id: OrderId) -> Option<Order> {
        match self.store.get_order(id).await {
            Ok(Some(order)) => Some(order),
            Ok(None) => {
                tracing::error!(order_id = %id, "order vanished from the store");
                None
            }
            Err(e) => {
                tracing::warn!(order_id = %id, error = %storage::ErrorChain(&e), "order read failed; left for the sweep");
                None
            }
        }
    }

    /// Writes one order's changes with the next store batch; per change, whether it
    /// applied.
    pub(crate) async fn write(&self, changes: Vec<Change>) -> Result<Vec<bool>, String> {
        self.writes
            .call(changes)
            .await
            .unwrap_or_else(|| Err("settler stopping".into()))
    }

    /// The one status step every stage takes: moves `order` to `to` (recording
    /// `charge_id`) together with `follow_ups` (its `Released` / `Notified`, written in
    /// the same batch so they land with the final status). `Some(true)`: moved, `order`
    /// updated and counted. `Some(false)`: the order had moved on (a replayed record,
    /// another worker): `order` is reloaded from the store. `None`: the write failed and
    /// the sweep takes the order up again.
    pub(crate) async fn step(
        &self,
        order: &mut Order,
        to: OrderStatus,
        charge_id: Option<String>,
        follow_ups: Vec<Change>,
    ) -> Option<bool> {
        let id = order.new.order_id;
        let mut changes = Vec::with_capacity(1 + follow_ups.len());
        changes.push(Change::Status {
            id,
            from: order.status,
            to,
            charge_id: charge_id.clone(),
        });
        changes.extend(follow_ups);
        let applied = match self.write(changes.clone()).await {
            Ok(applied) => applied,
            Err(e) => {
                tracing::warn!(order_id = %id, error = %e, "status write failed; left for the sweep");
                return None;
            }
        };
        self.count_follow_ups(&changes[1..], &applied[1..]);
        if !applied.first().copied().unwrap_or(false) {
            *order = self.reload(id).await?;
            return Some(false);
        }
        self.changed();
        let counter = match to {
            OrderStatus::Paid => Some((&self.counters().paid, Event::Paid)),
            OrderStatus::PaymentFailed => {
                Some((&self.counters().payment_failed, Event::PaymentFailed))
            }
            OrderStatus::Expired => Some((&self.counters().expired, Event::Expired)),
            _ => None,
        };
        if let Some((c, event)) = counter {
            SettlerStats::add(c, 1);
            metrics().event(event, 1);
        }
        metrics().transition(order.status, to, 1);
        let now = Timestamp::now();
        if to == OrderStatus::Paid {
            let micros = now.micros().saturating_sub(order.new.accepted_at.micros());
            metrics().paid_delay.observe(micros.max(0) as f64 / 1e6);
        }
        order.status = to;
        if charge_id.is_some() {
            order.charge_id = charge_id;
        }
        for (change, done) in changes[1..].iter().zip(&applied[1..]) {
            match change {
                Change::Released(_) if *done => order.released_at = Some(now),
                Change::Notified(_) if *done => order.notified_at = Some(now),
                _ => {}
            }
        }
        Some(true)
    }

    /// Counts the `Released` / `Notified` changes that applied.
    pub(crate) fn count_follow_ups(&self, changes: &[Change], applied: &[bool]) {
        for (change, done) in changes.iter().zip(applied) {
            match change {
                Change::Released(_) if *done => {
                    SettlerStats::add(&self.counters().released, 1);
                    metrics().event(Event::Released, 1);
                }
                Change::Notified(_) if *done => {
                    SettlerStats::add(&self.counters().notified, 1);
                    metrics().event(Event::Notified, 1);
                }
                _ => {}
            }
        }
    }

    /// Gives a failed or expired order's stock back (with the next admission batch);
    /// `true` if it is back (now or before).
    pub(crate) async fn release_stock(&self, order: &Order) -> bool {
        let id = order.new.order_id;
        match self.releases.call(order.clone()).await {
            Some(Ok(_)) => true,
            Some(Err(e)) => {
                tracing::warn!(order_id = %id, error = %e, "stock release failed; left for the sweep");
                false
            }
            None => false,
        }
    }

    /// Tells the buyer the order's outcome unless its breaker is open; `true` if the
    /// provider took the notification.
    pub(crate) async fn notify(&self, order: &Order, status: OrderStatus) -> bool {
        let id = order.new.order_id;
        let Some(kind) = NotificationKind::for_status(status) else {
            return false;
        };
        let Some(permit) = self.notify_breaker.try_acquire() else {
            tracing::debug!(order_id = %id, "notification circuit open; left in the outbox");
            return false;
        };
        let sent = self
            .notifications
            .notify(id, &order.new.user_id, kind)
            .await;
        permit.record(&sent);
        match sent {
            Ok(()) => true,
            Err(e) => {
                SettlerStats::add(&self.counters().provider_errors, 1);
                tracing::warn!(order_id = %id, error = %storage::ErrorChain(&e), "notification failed; left for the sweep");
                false
            }
        }
    }
}

/// An order claimed by one task; dropping it lets others claim the order again.
pub(crate) struct Claim {
    core: Arc<Core>,
    pub(crate) id: OrderId,
}

impl Drop for Claim {
    fn drop(&mut self) {
        self.core.in_flight.lock().remove(&self.id);
        self.core
            .counters()
            .in_flight
            .fetch_sub(1, Ordering::Relaxed);
    }
}

/// Claims an order for this task, unless another task of this process has it.
pub(crate) fn claim(core: &Arc<Core>, id: OrderId) -> Option<Claim> {
    if !core.in_flight.lock().insert(id) {
        return None;
    }
    core.counters().in_flight.fetch_add(1, Ordering::Relaxed);
    Some(Claim {
        core: Arc::clone(core),
        id,
    })
}

/// Work handed to the charge stage.
pub(crate) enum Work {
    /// Just persisted by the intake: the record's data is at hand, no read needed.
    Fresh(NewOrder),
    /// Found by the sweep: read the order's current state first.
    Recover,
}

/// An order to drive, with its claim.
pub(crate) struct Job {
    pub(crate) claim: Claim,
    pub(crate) work: Work,
}

pub(crate) fn fresh_order(new: NewOrder) -> Order {
    Order {
        new,
        status: OrderStatus::Persisted,
        history: Vec::new(),
        charge_id: None,
        released_at: None,
        notified_at: None,
        refund: None,
        failed_attempts: 0,
        retry_after: None,
        receipt_key: None,
        refund_note_key: None,
    }
}
