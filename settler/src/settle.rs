//! The settle loop: from the log to a paid (or released) and notified order, exactly once,
//! with every status change published.
//!
//! Four tasks share one core (store, provider clients, circuit breaker, in-flight set,
//! counters):
//! - **intake**: polls a batch from the [`LogConsumer`], decodes each record (an
//!   undecodable one goes to the [`DeadLetter`] sink and the partition moves on), persists
//!   the batch with the log checkpoint in the same transaction, commits the consumer's
//!   position, then offers the orders to the charge stage. It never waits for charging:
//!   when the hand-over queue (`charge_queue`) is full or the circuit is open, the order is
//!   left `persisted` for the sweep (counted as `deferred`), so persisting goes on at full
//!   speed through a provider outage.
//! - **charge stage**: at most `charge_concurrency` orders at once, each claimed at
//!   admission and moved `persisted -> payment_pending`, charged (Idempotency-Key = order
//!   id; retries with jittered exponential backoff; a charge whose request timed out is
//!   looked up before it is sent again), moved to `paid` or `payment_failed`, its stock
//!   released once (failed) and its buyer notified, every step recorded in the store.
//! - **sweep** (at start and every `sweep_interval`): retries refunds of late charges that
//!   failed, expires stale orders, and picks up what a crash, an outage, a full queue or a
//!   store error left behind: `persisted` and `payment_pending` orders (a pending one is
//!   looked up at the provider before it is charged) and final orders whose release or
//!   notification is still owed.
//! - **publisher**: drains the store's outbox of status changes into the [`EventSink`]
//!   (`flashsale.order-events.v1`), soon after each change and every `publish_interval`;
//!   see [`events`](crate::events).
//!
//! **Circuit breaker.** Every payment-provider call of the charge stage and the sweep asks
//! the [`CircuitBreaker`] first. After `circuit_failure_threshold` consecutive calls that
//! failed with a timeout, a transport error or a 5xx (after their own retries), the circuit
//! opens: nothing is charged, no order is failed or expired, orders stay `persisted` or
//! `payment_pending`. After `circuit_cool_down` the sweep lets one order through as a probe;
//! its success closes the circuit and the sweep takes up the backlog.
//!
//! **Fairness.** An order whose charge failed (the provider refused the request with a 4xx,
//! or kept failing) waits before its next attempt, from `sweep_interval` doubling up to
//! `order_retry_max`, with jitter (kept in memory; a restart tries everything once). The
//! sweep reads past the orders waiting, so a pile of orders the provider refuses cannot
//! starve the others; the expiry ends them.
//!
//! **Expiry.** An order in `payment_pending` for longer than `payment_ttl` is looked up at
//! the provider instead of being charged again: a charge found settles it (`paid` or
//! `payment_failed`); none found moves it `payment_pending -> expired`, its stock is
//! released once and its buyer told. A charge that succeeds for an order already void
//! (another worker expired it) is refunded; a refund that fails is retried by the sweep
//! (in memory only, see [`StatsSnapshot::refunds_owed`]).
//!
//! **Notifications go through an outbox.** The order row's `notified_at` is the outbox: it
//! is NULL from the moment the order enters a final status (the same transaction as the
//! status change) until the notification provider accepted the notification, which is
//! recorded by setting it. So a notification owed survives any crash (the sweep finds
//! it), and the provider's idempotency key `"{order_id}:{outcome}"` makes a repeat after a
//! crash between sending and recording a no-op: one notification per order and outcome.
//!
//! An in-flight set (claimed from hand-over until the order's work ends) keeps two tasks
//! from working on one order. The store's conditional status moves keep two *processes*
//! from moving one order twice, and the provider's idempotency key (the order id) makes a
//! repeated charge return the first outcome.

use crate::breaker::{BreakerState, CircuitBreaker, Permit};
use crate::dead_letter::DeadLetter;
use crate::events::{EventSink, TracingEventSink};
use crate::provider::{
    ChargeOutcome, NotificationClient, NotificationKind, PaymentClient, ProviderError, RetryPolicy,
};
use crate::{Error, Result};
use async_trait::async_trait;
use parking_lot::Mutex;
use rand::Rng;
use sequencer::{LogConsumer, LogEntry, LogPosition};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use storage::{Checkpoint, NewOrder, Order, OrderId, OrderStatus, OrderStore, Timestamp};
use tokio::sync::mpsc::error::TrySendError;
use tokio::sync::{mpsc, Notify, Semaphore};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

/// Gives the stock of a failed or expired order back to admission. Implemented by the
/// binary on top of the admission backend; the settler never admits.
#[async_trait]
pub trait StockRelease: Send + Sync + 'static {
    /// Returns `order.quantity` units to `order.sale_id` for `order.user_id`. `Ok(true)` if
    /// this call released them, `Ok(false)` if they had been released before: a crash
    /// between the release and the store's record of it repeats the call, so it must be
    /// idempotent per order id. Failures are [`Error::Release`]; the order is retried by
    /// the next sweep.
    async fn release(&self, order: &Order) -> Result<bool>;

    /// Takes an order read from the log before it is charged: `Ok(true)` to go on,
    /// `Ok(false)` if ingest aborted its admission first (the buyer got 503 and the stock
    /// went back), in which case the order is cancelled (`expired`) without a charge.
    async fn claim(&self, order: &Order) -> Result<bool>;
}

/// Settings of the settler. Durations are humantime strings (`"50ms"`) in TOML and JSON.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SettlerConfig {
    /// Most records read and persisted in one batch (default 512).
    pub batch_size: usize,
    /// Longest a poll waits for the first record (default 50 ms).
    #[serde(with = "humantime_serde")]
    pub poll_wait: Duration,
    /// Most orders charged (and released, notified) at once (default 64).
    pub charge_concurrency: usize,
    /// Capacity of the hand-over queue from the intake (and the sweep) to the charge stage
    /// (default 4096). A persisted order that finds it full is left for the sweep.
    pub charge_queue: usize,
    /// Name under which the log checkpoint is stored (the consumer group).
    pub consumer_name: String,
    /// Base URL of the payment provider.
    pub payment_url: String,
    /// Base URL of the notification provider.
    pub notification_url: String,
    /// Timeout of one provider request (default 2 s).
    #[serde(with = "humantime_serde")]
    pub provider_timeout: Duration,
    /// Attempts per provider call, the first included, before the order is left for the
    /// next sweep (default 4).
    pub retry_max_attempts: usize,
    /// Delay before the first retry of a provider call; it doubles per retry, with jitter
    /// (default 50 ms).
    #[serde(with = "humantime_serde")]
    pub retry_min_delay: Duration,
    /// Longest delay between two attempts of a provider call (default 2 s).
    #[serde(with = "humantime_serde")]
    pub retry_max_delay: Duration,
    /// Consecutive payment-provider calls failing with a timeout, transport error or 5xx
    /// (each after its retries) that open the circuit (default 5).
    pub circuit_failure_threshold: u32,
    /// How long an open circuit refuses calls before one probe is let through
    /// (default 5 s).
    #[serde(with = "humantime_serde")]
    pub circuit_cool_down: Duration,
    /// Longest an order whose charge failed waits before the sweep tries it again; the
    /// wait starts at `sweep_interval` and doubles per failure, with jitter (default 1 min).
    #[serde(with = "humantime_serde")]
    pub order_retry_max: Duration,
    /// How long an order may stay `payment_pending` before it expires (default 15 min).
    #[serde(with = "humantime_serde")]
    pub payment_ttl: Duration,
    /// How often unfinished orders are looked for (default 1 s).
    #[serde(with = "humantime_serde")]
    pub sweep_interval: Duration,
    /// Most orders of each kind one sweep picks up (default 1000).
    pub sweep_limit: usize,
    /// How often the outbox of status changes is drained when no change wakes the
    /// publisher (default 1 s); also the wait after a failed publish.
    #[serde(with = "humantime_serde")]
    pub publish_interval: Duration,
    /// Most events handed to the event sink at once (default 500).
    pub publish_batch: usize,
    /// How long orders under way may take to finish after shutdown is asked for; then they
    /// are abandoned (the next start's sweep finishes them). Default 5 s.
    #[serde(with = "humantime_serde")]
    pub shutdown_grace: Duration,
}

impl Default for SettlerConfig {
    fn default() -> Self {
        SettlerConfig {
            batch_size: 512,
            poll_wait: Duration::from_millis(50),
            charge_concurrency: 64,
            charge_queue: 4096,
            consumer_name: "settler".into(),
            payment_url: "http://127.0.0.1:8090".into(),
            notification_url: "http://127.0.0.1:8090".into(),
            provider_timeout: Duration::from_secs(2),
            retry_max_attempts: 4,
            retry_min_delay: Duration::from_millis(50),
            retry_max_delay: Duration::from_secs(2),
            circuit_failure_threshold: 5,
            circuit_cool_down: Duration::from_secs(5),
            order_retry_max: Duration::from_secs(60),
            payment_ttl: Duration::from_secs(15 * 60),
            sweep_interval: Duration::from_secs(1),
            sweep_limit: 1000,
            publish_interval: Duration::from_secs(1),
            publish_batch: 500,
            shutdown_grace: Duration::from_secs(5),
        }
    }
}

impl SettlerConfig {
    fn retry(&self) -> RetryPolicy {
        RetryPolicy {
            max_attempts: self.retry_max_attempts.max(1),
            min_delay: self.retry_min_delay,
            max_delay: self.retry_max_delay,
        }
    }
}

/// Progress of one settler process since it started (counts of what *it* did), as read
/// from [`SettlerStats::snapshot`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatsSnapshot {
    /// Orders newly written to the store (replays of stored ones not counted).
    pub persisted: u64,
    /// Persisted orders not handed to the charge stage (queue full or circuit open): left
    /// `persisted` for the sweep.
    pub deferred: u64,
    /// Orders moved to `paid`.
    pub paid: u64,
    /// Orders moved to `payment_failed`.
    pub payment_failed: u64,
    /// Orders moved to `expired` (past `payment_ttl`, or aborted by ingest).
    pub expired: u64,
    /// Orders whose stock release was recorded.
    pub released: u64,
    /// Orders whose notification was recorded.
    pub notified: u64,
    /// Late successful charges refunded because the order was already void.
    pub refunded: u64,
    /// Refunds of late charges that failed and wait for a retry by the sweep (now). Kept in
    /// memory only: the store records no late charge of a void order, so a restart
    /// forgets them.
    pub refunds_owed: u64,
    /// Records sent to the dead-letter sink.
    pub dead_lettered: u64,
    /// Provider calls that failed after their retries (the order waits for a sweep).
    pub provider_errors: u64,
    /// Orders claimed right now (queued for or in the charge stage).
    pub in_flight: u64,
    /// Whether the payment provider's circuit is open (or half-open) now.
    pub circuit_open: bool,
    /// How often the circuit opened.
    pub circuit_opened_total: u64,
    /// Status-change events handed to the event sink.
    pub events_published: u64,
    /// Sweep passes completed.
    pub sweeps: u64,
}

#[derive(Debug, Default)]
struct Counters {
    persisted: AtomicU64,
    deferred: AtomicU64,
    paid: AtomicU64,
    payment_failed: AtomicU64,
    expired: AtomicU64,
    released: AtomicU64,
    notified: AtomicU64,
    refunded: AtomicU64,
    refunds_owed: AtomicU64,
    dead_lettered: AtomicU64,
    provider_errors: AtomicU64,
    in_flight: AtomicU64,
    events_published: AtomicU64,
    sweeps: AtomicU64,
}

/// The progress counters of a settler: a shared handle, cheap to clone, that stays valid
/// while and after the settler runs.
#[derive(Debug, Clone, Default)]
pub struct SettlerStats {
    counters: Arc<Counters>,
    breaker: Option<CircuitBreaker>,
}

impl SettlerStats {
    /// The counters now.
    pub fn snapshot(&self) -> StatsSnapshot {
        let c = &self.counters;
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        StatsSnapshot {
            persisted: get(&c.persisted),
            deferred: get(&c.deferred),
            paid: get(&c.paid),
            payment_failed: get(&c.payment_failed),
            expired: get(&c.expired),
            released: get(&c.released),
            notified: get(&c.notified),
            refunded: get(&c.refunded),
            refunds_owed: get(&c.refunds_owed),
            dead_lettered: get(&c.dead_lettered),
            provider_errors: get(&c.provider_errors),
            in_flight: get(&c.in_flight),
            circuit_open: self.breaker.as_ref().is_some_and(|b| !b.is_closed()),
            circuit_opened_total: self
                .breaker
                .as_ref()
                .map_or(0, CircuitBreaker::opened_total),
            events_published: get(&c.events_published),
            sweeps: get(&c.sweeps),
        }
    }

    fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }
}

/// When an order whose charge failed may be tried again.
#[derive(Debug, Clone, Copy)]
struct Backoff {
    due: Instant,
    failures: u32,
}

/// State shared by the intake, the charge stage, the sweep and the publisher.
struct Core {
    store: Arc<dyn OrderStore>,
    release: Arc<dyn StockRelease>,
    payments: PaymentClient,
    notifications: NotificationClient,
    breaker: CircuitBreaker,
    /// The notification provider's own breaker: while it is open, notifications wait in
    /// the outbox instead of being sent to a provider that is down.
    notify_breaker: CircuitBreaker,
    in_flight: Mutex<HashSet<OrderId>>,
    /// Orders whose last charge failed, until they may be tried again.
    backoff: Mutex<HashMap<OrderId, Backoff>>,
    /// Late charges of void orders whose refund failed: order id to charge id.
    refunds_owed: Mutex<HashMap<OrderId, String>>,
    /// Woken on every status change, so the publisher runs soon after.
    events_ready: Notify,
    stats: SettlerStats,
    payment_ttl: Duration,
    backoff_min: Duration,
    backoff_max: Duration,
}

impl Core {
    fn counters(&self) -> &Counters {
        &self.stats.counters
    }
}

/// An order claimed by one task; dropping it lets others claim the order again.
struct Claim {
    core: Arc<Core>,
    id: OrderId,
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

/// Work handed to the charge stage.
enum Work {
    /// Just persisted by the intake: the record's data is at hand, no read needed.
    Fresh(NewOrder),
    /// Found by the sweep: read the order's current state first.
    Recover,
}

struct Job {
    claim: Claim,
    work: Work,
}

/// Bound on status steps for one order in one job; a legal life has at most three.
const MAX_STEPS: usize = 8;

fn claim(core: &Arc<Core>, id: OrderId) -> Option<Claim> {
    if !core.in_flight.lock().insert(id) {
        return None;
    }
    core.counters().in_flight.fetch_add(1, Ordering::Relaxed);
    Some(Claim {
        core: Arc::clone(core),
        id,
    })
}

fn fresh_order(new: NewOrder) -> Order {
    Order {
        new,
        status: OrderStatus::Persisted,
        history: Vec::new(),
        charge_id: None,
        released_at: None,
        notified_at: None,
    }
}

impl Core {
    /// Tells the publisher a status changed.
    fn changed(&self) {
        self.events_ready.notify_one();
    }

    fn note_refunds_owed(&self, owed: &HashMap<OrderId, String>) {
        self.counters()
            .refunds_owed
            .store(owed.len() as u64, Ordering::Relaxed);
    }

    /// Whether the sweep may try the order's charge again.
    fn is_due(&self, id: OrderId, now: Instant) -> bool {
        self.backoff.lock().get(&id).is_none_or(|b| b.due <= now)
    }

    /// Makes an order whose charge failed wait before its next attempt: `backoff_min`
    /// doubling per consecutive failure up to `backoff_max`, the wait drawn from its upper
    /// half so orders that failed together spread out.
    fn defer(&self, id: OrderId) {
        let now = Instant::now();
        let mut map = self.backoff.lock();
        let entry = map.entry(id).or_insert(Backoff {
            due: now,
            failures: 0,
        });
        entry.failures = entry.failures.saturating_add(1);
        let max = self.backoff_max.max(self.backoff_min);
        let wait = self
            .backoff_min
            .saturating_mul(1u32 << (entry.failures - 1).min(20))
            .min(max);
        let millis = wait.as_millis().min(u128::from(u64::MAX)) as u64;
        let drawn = rand::rng().random_range(millis / 2..=millis.max(1));
        entry.due = now + Duration::from_millis(drawn);
    }

    /// Forgets backoffs that were due long ago: their orders were finished elsewhere.
    fn prune_backoff(&self, now: Instant) {
        let keep = self.payment_ttl.max(self.backoff_max);
        self.backoff
            .lock()
            .retain(|_, b| now.saturating_duration_since(b.due) < keep);
    }

    /// Whether a `payment_pending` order entered that status longer than `payment_ttl` ago
    /// (as its history tells; an order read without history never is).
    fn past_ttl(&self, order: &Order) -> bool {
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

    async fn reload(&self, id: OrderId) -> Option<Order> {
        match self.store.get_order(id).await {
            Ok(Some(order)) => Some(order),
            Ok(None) => {
                tracing::error!(order_id = %id, "order vanished from the store");
                None
            }
            Err(e) => {
                tracing::warn!(order_id = %id, error = %e, "order read failed; left for the sweep");
                None
            }
        }
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
                    let next = match self.release.claim(&order).await {
                        Ok(true) => OrderStatus::PaymentPending,
                        Ok(false) => {
                            tracing::warn!(order_id = %id, "admission was aborted before the record landed; cancelling the order");
                            OrderStatus::Expired
                        }
                        Err(e) => {
                            tracing::warn!(order_id = %id, error = %e, "claim failed; left for the sweep");
                            return;
                        }
                    };
                    match self
                        .store
                        .transition(id, OrderStatus::Persisted, next, None)
                        .await
                    {
                        Ok(true) => {
                            self.changed();
                            order.status = next;
                            recovering = false;
                            if next == OrderStatus::Expired {
                                SettlerStats::add(&self.counters().expired, 1);
                            } else {
                                // Entered now: not past its TTL.
                                order.history.clear();
                            }
                        }
                        // Moved on already (a replayed record, another worker): act on what
                        // the store holds.
                        Ok(false) => match self.reload(id).await {
                            Some(o) => {
                                order = o;
                                recovering = true;
                            }
                            None => return,
                        },
                        Err(e) => {
                            tracing::warn!(order_id = %id, error = %e, "status write failed; left for the sweep");
                            return;
                        }
                    }
                }
                OrderStatus::PaymentPending => {
                    let Some(p) = permit.take() else {
                        return;
                    };
                    let expiring = recovering && self.past_ttl(&order);
                    match self
                        .settle_charge(&mut order, recovering, expiring, p)
                        .await
                    {
                        Some(()) => recovering = true,
                        None => return,
                    }
                }
                OrderStatus::Paid | OrderStatus::PaymentFailed | OrderStatus::Expired => {
                    self.backoff.lock().remove(&id);
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
        let outcome = match charged {
            Ok(Some(outcome)) => outcome,
            Ok(None) => return self.expire(order).await,
            Err(e) => {
                SettlerStats::add(&self.counters().provider_errors, 1);
                self.defer(id);
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
            ChargeOutcome::Succeeded { charge_id } => (OrderStatus::Paid, Some(charge_id.as_str())),
            ChargeOutcome::Declined => (OrderStatus::PaymentFailed, None),
        };
        match self
            .store
            .transition(id, OrderStatus::PaymentPending, to, charge_id)
            .await
        {
            Ok(true) => {
                self.changed();
                let counter = if to == OrderStatus::Paid {
                    &self.counters().paid
                } else {
                    &self.counters().payment_failed
                };
                SettlerStats::add(counter, 1);
                order.status = to;
                order.charge_id = charge_id.map(str::to_owned);
                Some(())
            }
            Ok(false) => {
                // Someone else settled it (e.g. it expired meanwhile).
                let current = self.reload(id).await?;
                if let ChargeOutcome::Succeeded { charge_id } = &outcome {
                    if current.status.releases_stock() {
                        self.refund(id, charge_id, None).await;
                    }
                }
                *order = current;
                Some(())
            }
            Err(e) => {
                tracing::warn!(order_id = %id, error = %e, "status write failed; left for the sweep");
                None
            }
        }
    }

    /// `payment_pending -> expired` for an order past its TTL with no charge at the
    /// provider.
    async fn expire(&self, order: &mut Order) -> Option<()> {
        let id = order.new.order_id;
        match self
            .store
            .transition(id, OrderStatus::PaymentPending, OrderStatus::Expired, None)
            .await
        {
            Ok(true) => {
                self.changed();
                SettlerStats::add(&self.counters().expired, 1);
                tracing::info!(order_id = %id, "order not paid in time; expired");
                order.status = OrderStatus::Expired;
                Some(())
            }
            Ok(false) => {
                *order = self.reload(id).await?;
                Some(())
            }
            Err(e) => {
                tracing::warn!(order_id = %id, error = %e, "status write failed; left for the sweep");
                None
            }
        }
    }

    /// A charge that succeeded for an order already void: give the money back (invariant:
    /// at most one successful charge per order, none kept for a released order). The
    /// refund's key is `"{order_id}:refund"`, so retrying it refunds once. A refund that
    /// fails with a retryable error is kept for the sweep to retry; `permit` (the sweep's
    /// retries) learns the provider's health.
    async fn refund(&self, id: OrderId, charge_id: &str, permit: Option<Permit>) {
        let result = self.payments.refund(id, charge_id).await;
        if let Some(p) = permit {
            p.record(&result);
        }
        let mut owed = self.refunds_owed.lock();
        match result {
            Ok(_) => {
                owed.remove(&id);
                SettlerStats::add(&self.counters().refunded, 1);
                tracing::warn!(order_id = %id, charge_id, "late charge of a void order refunded");
            }
            Err(e) if e.is_retryable() => {
                owed.insert(id, charge_id.to_owned());
                SettlerStats::add(&self.counters().provider_errors, 1);
                tracing::error!(order_id = %id, charge_id, error = %e, "refund of a late charge failed; the sweep retries it");
            }
            Err(e) => {
                owed.remove(&id);
                SettlerStats::add(&self.counters().provider_errors, 1);
                tracing::error!(order_id = %id, charge_id, error = %e, "refund of a late charge refused; an operator must settle it");
            }
        }
        self.note_refunds_owed(&owed);
    }

    /// Retries the refunds that failed, while the circuit lets calls through.
    async fn retry_refunds(&self) {
        let owed: Vec<(OrderId, String)> = self
            .refunds_owed
            .lock()
            .iter()
            .map(|(id, charge)| (*id, charge.clone()))
            .collect();
        for (id, charge_id) in owed {
            let Some(permit) = self.breaker.try_acquire() else {
                return;
            };
            self.refund(id, &charge_id, Some(permit)).await;
        }
    }

    /// Releases the stock of a failed or expired order and notifies the buyer, each only if
    /// still owed, and records both. The notification goes through the outbox that
    /// `notified_at` is (see the module docs): sent while NULL, then recorded.
    async fn follow_up(&self, order: &Order) {
        let id = order.new.order_id;
        if order.status.releases_stock() && order.released_at.is_none() {
            match self.release.release(order).await {
                Ok(_) => match self.store.mark_released(id).await {
                    Ok(true) => SettlerStats::add(&self.counters().released, 1),
                    Ok(false) => {}
                    Err(e) => {
                        tracing::warn!(order_id = %id, error = %e, "release not recorded; left for the sweep");
                    }
                },
                Err(e) => {
                    tracing::warn!(order_id = %id, error = %e, "stock release failed; left for the sweep")
                }
            }
        }
        if order.notified_at.is_some() {
            return;
        }
        let Some(kind) = NotificationKind::for_status(order.status) else {
            return;
        };
        let Some(permit) = self.notify_breaker.try_acquire() else {
            tracing::debug!(order_id = %id, "notification circuit open; left in the outbox");
            return;
        };
        let sent = self
            .notifications
            .notify(id, &order.new.user_id, kind)
            .await;
        permit.record(&sent);
        match sent {
            Ok(()) => match self.store.mark_notified(id).await {
                Ok(true) => SettlerStats::add(&self.counters().notified, 1),
                Ok(false) => {}
                Err(e) => {
                    tracing::warn!(order_id = %id, error = %e, "notification not recorded; left for the sweep");
                }
            },
            Err(e) => {
                SettlerStats::add(&self.counters().provider_errors, 1);
                tracing::warn!(order_id = %id, error = %e, "notification failed; left for the sweep");
            }
        }
    }
}

/// Waits `delay` unless shutdown comes first; `false` on shutdown.
async fn pause(shutdown: &CancellationToken, delay: Duration) -> bool {
    tokio::select! {
        biased;
        _ = shutdown.cancelled() => false,
        _ = tokio::time::sleep(delay) => true,
    }
}

/// Runs `op` until it succeeds, backing off between failures; `None` on shutdown.
async fn until_done<T, E, F, Fut>(
    shutdown: &CancellationToken,
    what: &'static str,
    mut op: F,
) -> Option<T>
where
    E: std::fmt::Display,
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = std::result::Result<T, E>>,
{
    let mut delay = Duration::from_millis(20);
    loop {
        match op().await {
            Ok(v) => return Some(v),
            Err(e) => {
                tracing::warn!(error = %e, what, retry_in = ?delay, "settler step failed; retrying")
            }
        }
        if !pause(shutdown, delay).await {
            return None;
        }
        delay = (delay * 2).min(Duration::from_secs(5));
    }
}

/// The log-reading stage.
struct Intake {
    core: Arc<Core>,
    consumer: Box<dyn LogConsumer>,
    dead_letter: Arc<dyn DeadLetter>,
    jobs: mpsc::Sender<Job>,
    consumer_name: String,
    batch_size: usize,
    poll_wait: Duration,
}

impl Intake {
    async fn run(mut self, shutdown: &CancellationToken) {
        let mut failures = 0u32;
        loop {
            let polled = tokio::select! {
                biased;
                _ = shutdown.cancelled() => return,
                polled = self.consumer.poll(self.batch_size, self.poll_wait) => polled,
            };
            let entries = match polled {
                Ok(entries) => {
                    failures = 0;
                    entries
                }
                Err(e) => {
                    failures = failures.saturating_add(1);
                    let delay = Duration::from_millis(20 << failures.min(8));
                    tracing::warn!(error = %e, retry_in = ?delay, "log poll failed");
                    if !pause(shutdown, delay).await {
                        return;
                    }
                    continue;
                }
            };
            if entries.is_empty() {
                continue;
            }
            let Some(orders) = self.settle_batch(&entries, shutdown).await else {
                return;
            };
            // Hand the orders over without waiting: charging must never hold persisting up.
            // What is not handed over stays `persisted` for the sweep.
            for order in orders {
                if !self.core.breaker.is_closed() {
                    SettlerStats::add(&self.core.counters().deferred, 1);
                    continue;
                }
                let Some(claim) = claim(&self.core, order.order_id) else {
                    continue; // the sweep has it
                };
                let job = Job {
                    claim,
                    work: Work::Fresh(order),
                };
                match self.jobs.try_send(job) {
                    Ok(()) => {}
                    // The job (and its claim) is dropped.
                    Err(TrySendError::Full(_)) => {
                        SettlerStats::add(&self.core.counters().deferred, 1)
                    }
                    Err(TrySendError::Closed(_)) => return,
                }
            }
        }
    }

    /// Dead-letters what does not decode, persists the rest with the checkpoint and commits
    /// the consumer. `None` if shutdown came before the batch was durable.
    async fn settle_batch(
        &mut self,
        entries: &[LogEntry],
        shutdown: &CancellationToken,
    ) -> Option<Vec<NewOrder>> {
        // Per partition: its orders and the next offset to read.
        let mut partitions: BTreeMap<u32, (Vec<NewOrder>, u64)> = BTreeMap::new();
        for entry in entries {
            let slot = partitions
                .entry(entry.position.partition)
                .or_insert_with(|| (Vec::new(), 0));
            slot.1 = slot.1.max(entry.position.offset + 1);
            match sequencer::decode(&entry.payload) {
                Ok(record) => slot.0.push(record.to_new_order()),
                Err(error) => {
                    let sink = &self.dead_letter;
                    until_done(shutdown, "dead-letter", || sink.send(entry, &error)).await?;
                    SettlerStats::add(&self.core.counters().dead_lettered, 1);
                }
            }
        }
        let mut orders = Vec::with_capacity(entries.len());
        for (partition, (batch, next_offset)) in partitions {
            let checkpoint = Checkpoint {
                consumer: self.consumer_name.clone(),
                partition,
                next_offset,
            };
            let store = &self.core.store;
            let (batch_ref, cp) = (&batch, &checkpoint);
            let inserted = until_done(shutdown, "persist", || {
                store.persist_batch(batch_ref, Some(cp))
            })
            .await?;
            SettlerStats::add(&self.core.counters().persisted, inserted as u64);
            if inserted > 0 {
                self.core.changed();
            }
            orders.extend(batch);
        }
        let positions: Vec<LogPosition> = entries.iter().map(|e| e.position).collect();
        if let Err(e) = self.consumer.commit(&positions).await {
            // The store holds the checkpoint and persisting is idempotent: a redelivery
            // after this costs time, not correctness.
            tracing::warn!(error = %e, "log commit failed");
        }
        Some(orders)
    }
}

/// Runs jobs with bounded concurrency until shutdown, then gives those under way `grace`.
async fn charge_stage(
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
        let core = Arc::clone(&core);
        running.spawn(async move {
            let _permit = permit;
            core.run_job(job).await;
        });
    }
    // Queued jobs are dropped (their claims with them): the orders are durable and the next
    // sweep or start picks them up.
    drop(jobs);
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

/// Settings of the sweep.
struct SweepSettings {
    interval: Duration,
    limit: usize,
}

/// Finds unfinished orders and queues those no task has claimed: stale pending orders
/// (expiry), orders to charge that are not waiting out a backoff, and owed follow-ups;
/// retries owed refunds first. While the circuit is open it queues only follow-ups; once
/// the cool-down is over, an owed refund or one or two orders to charge, the first of
/// which becomes the probe.
async fn sweep(
    core: Arc<Core>,
    jobs: mpsc::Sender<Job>,
    settings: SweepSettings,
    shutdown: CancellationToken,
) {
    let SweepSettings { interval, limit } = settings;
    let mut ticker = tokio::time::interval(interval.max(Duration::from_millis(1)));
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            biased;
            _ = shutdown.cancelled() => return,
            _ = ticker.tick() => {}
        }
        let now = Instant::now();
        core.prune_backoff(now);
        let mut ids = Vec::new();
        if core.breaker.state() != BreakerState::Open {
            // Half-open: the first call that asks is the probe, be it a refund or a charge.
            tokio::select! {
                biased;
                _ = shutdown.cancelled() => return,
                _ = core.retry_refunds() => {}
            }
        }
        let breaker = core.breaker.state();
        if breaker != BreakerState::Open {
            // Half-open: queue few, one of them becomes the probe.
            let take = if breaker == BreakerState::Closed {
                limit
            } else {
                1
            };
            // Expiry first: these orders are looked up, never charged again, and ignore
            // their backoff.
            let ttl = i64::try_from(core.payment_ttl.as_millis()).unwrap_or(i64::MAX);
            let cutoff = Timestamp::now().plus_millis(-ttl);
            match core.store.pending_since(cutoff, take).await {
                Ok(orders) => ids.extend(orders.iter().map(|o| o.new.order_id)),
                Err(e) => tracing::warn!(error = %e, "sweep: stale pending orders not read"),
            }
            // Read past the orders waiting out a backoff (the oldest, as they keep failing),
            // so they cannot fill every read and starve the rest.
            let waiting = core.backoff.lock().len();
            let read = limit.saturating_add(waiting).min(limit.saturating_mul(16));
            match core
                .store
                .orders_in_status(&[OrderStatus::Persisted, OrderStatus::PaymentPending], read)
                .await
            {
                Ok(orders) => ids.extend(
                    orders
                        .iter()
                        .map(|o| o.new.order_id)
                        .filter(|id| core.is_due(*id, now))
                        .take(take),
                ),
                Err(e) => tracing::warn!(error = %e, "sweep: unsettled orders not read"),
            }
        }
        match core.store.unfinished_followups(limit).await {
            Ok(orders) => ids.extend(orders.iter().map(|o| o.new.order_id)),
            Err(e) => tracing::warn!(error = %e, "sweep: follow-ups not read"),
        }
        for id in ids {
            let Some(claim) = claim(&core, id) else {
                continue;
            };
            let job = Job {
                claim,
                work: Work::Recover,
            };
            tokio::select! {
                biased;
                _ = shutdown.cancelled() => return,
                sent = jobs.send(job) => if sent.is_err() { return },
            }
        }
        SettlerStats::add(&core.counters().sweeps, 1);
    }
}

/// Hands what the outbox holds to `sink`, batch by batch, marking each published once the
/// sink took it. `false` if a step failed (the rest waits for the next round).
async fn publish_pending(core: &Core, sink: &dyn EventSink, batch: usize) -> bool {
    loop {
        let events = match core.store.unpublished_events(batch).await {
            Ok(events) => events,
            Err(e) => {
                tracing::warn!(error = %e, "publisher: outbox not read");
                return false;
            }
        };
        if events.is_empty() {
            return true;
        }
        if let Err(e) = sink.publish(&events).await {
            tracing::warn!(error = %e, events = events.len(), "publisher: events not published; retrying later");
            return false;
        }
        let keys: Vec<(OrderId, OrderStatus)> =
            events.iter().map(|e| (e.order_id, e.status)).collect();
        if let Err(e) = core.store.mark_published(&keys).await {
            // Published but not marked: they go out again (at least once).
            tracing::warn!(error = %e, "publisher: published events not marked");
            return false;
        }
        SettlerStats::add(&core.counters().events_published, events.len() as u64);
        if events.len() < batch {
            return true;
        }
    }
}

/// Publishes status changes soon after they happen (woken by the core) and every
/// `interval`, until shutdown; after a failure it waits `interval`.
async fn publisher(
    core: Arc<Core>,
    sink: Arc<dyn EventSink>,
    interval: Duration,
    batch: usize,
    shutdown: CancellationToken,
) {
    let interval = interval.max(Duration::from_millis(1));
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            biased;
            _ = shutdown.cancelled() => return,
            _ = core.events_ready.notified() => {}
            _ = ticker.tick() => {}
        }
        let published = tokio::select! {
            biased;
            _ = shutdown.cancelled() => return,
            ok = publish_pending(&core, &*sink, batch) => ok,
        };
        if !published && !pause(&shutdown, interval).await {
            return;
        }
    }
}

/// The settler: reads the order log and settles every order in it exactly once.
pub struct Settler {
    core: Arc<Core>,
    consumer: Box<dyn LogConsumer>,
    dead_letter: Arc<dyn DeadLetter>,
    sink: Arc<dyn EventSink>,
    config: SettlerConfig,
}

impl std::fmt::Debug for Settler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Settler")
            .field("config", &self.config)
            .finish()
    }
}

impl Settler {
    /// A settler reading `consumer` (positioned at the store's checkpoint for
    /// `config.consumer_name`), writing to `store`, releasing stock through `release` and
    /// keeping undecodable records in `dead_letter` (a [`FileDeadLetter`](crate::FileDeadLetter),
    /// or [`LogDeadLetter`](crate::LogDeadLetter) to only log them). Status changes go to a
    /// [`TracingEventSink`] unless [`with_event_sink`](Self::with_event_sink) names
    /// another. Fails if a provider URL is invalid.
    pub fn new(
        store: Arc<dyn OrderStore>,
        consumer: Box<dyn LogConsumer>,
        release: Arc<dyn StockRelease>,
        dead_letter: Arc<dyn DeadLetter>,
        config: SettlerConfig,
    ) -> Result<Self> {
        let retry = config.retry();
        let breaker =
            CircuitBreaker::new(config.circuit_failure_threshold, config.circuit_cool_down);
        let core = Core {
            store,
            release,
            payments: PaymentClient::new(&config.payment_url, config.provider_timeout, retry)?,
            notifications: NotificationClient::new(
                &config.notification_url,
                config.provider_timeout,
                retry,
            )?,
            in_flight: Mutex::new(HashSet::new()),
            backoff: Mutex::new(HashMap::new()),
            refunds_owed: Mutex::new(HashMap::new()),
            events_ready: Notify::new(),
            stats: SettlerStats {
                counters: Arc::default(),
                breaker: Some(breaker.clone()),
            },
            breaker,
            notify_breaker: CircuitBreaker::new(
                config.circuit_failure_threshold,
                config.circuit_cool_down,
            ),
            payment_ttl: config.payment_ttl,
            backoff_min: config.sweep_interval.max(Duration::from_millis(1)),
            backoff_max: config.order_retry_max,
        };
        Ok(Settler {
            core: Arc::new(core),
            consumer,
            dead_letter,
            sink: Arc::new(TracingEventSink::default()),
            config,
        })
    }

    /// Publishes status changes to `sink` instead of only logging them.
    pub fn with_event_sink(mut self, sink: Arc<dyn EventSink>) -> Self {
        self.sink = sink;
        self
    }

    /// This settler's progress counters (a shared handle, valid after `run` consumed it).
    pub fn stats(&self) -> SettlerStats {
        self.core.stats.clone()
    }

    /// The circuit breaker in front of the payment provider (a shared handle).
    pub fn circuit_breaker(&self) -> CircuitBreaker {
        self.core.breaker.clone()
    }

    /// Settles until `shutdown` is cancelled: stops reading, lets orders under way finish
    /// and publishes their changes within `shutdown_grace` each, then returns. Errors only
    /// if one of its tasks panicked.
    pub async fn run(self, shutdown: CancellationToken) -> Result<()> {
        let Settler {
            core,
            consumer,
            dead_letter,
            sink,
            config,
        } = self;
        // Cancelled by the caller or when the intake ends on its own (the charge stage
        // ended: a panic).
        let stop = shutdown.child_token();
        let (jobs, queue) = mpsc::channel(config.charge_queue.max(1));
        let stage = tokio::spawn(charge_stage(
            Arc::clone(&core),
            queue,
            config.charge_concurrency,
            config.shutdown_grace,
            stop.clone(),
        ));
        let sweeper = tokio::spawn(sweep(
            Arc::clone(&core),
            jobs.clone(),
            SweepSettings {
                interval: config.sweep_interval,
                limit: config.sweep_limit.max(1),
            },
            stop.clone(),
        ));
        let publish_batch = config.publish_batch.max(1);
        let publishing = tokio::spawn(publisher(
            Arc::clone(&core),
            Arc::clone(&sink),
            config.publish_interval,
            publish_batch,
            stop.clone(),
        ));
        let intake = Intake {
            core: Arc::clone(&core),
            consumer,
            dead_letter,
            jobs,
            consumer_name: config.consumer_name,
            batch_size: config.batch_size.max(1),
            poll_wait: config.poll_wait,
        };
        intake.run(&stop).await;
        stop.cancel();
        let swept = sweeper.await;
        let staged = stage.await;
        let published = publishing.await;
        // The last changes of the orders that finished during the grace.
        if tokio::time::timeout(
            config.shutdown_grace,
            publish_pending(&core, &*sink, publish_batch),
        )
        .await
        .is_err()
        {
            tracing::warn!("shutdown grace over; unpublished events wait for the next start");
        }
        swept.map_err(Error::Task)?;
        staged.map_err(Error::Task)?;
        published.map_err(Error::Task)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_reads_humantime_and_refuses_unknown_keys() {
        let c: SettlerConfig = serde_json::from_str(
            r#"{"poll_wait":"10ms","sweep_interval":"250ms","charge_concurrency":8}"#,
        )
        .expect("config");
        assert_eq!(c.poll_wait, Duration::from_millis(10));
        assert_eq!(c.sweep_interval, Duration::from_millis(250));
        assert_eq!(c.charge_concurrency, 8);
        assert_eq!(c.batch_size, 512);
        assert_eq!(c.payment_ttl, Duration::from_secs(900));
        assert!(serde_json::from_str::<SettlerConfig>(r#"{"batch":1}"#).is_err());
        let c: SettlerConfig = serde_json::from_str(
            r#"{"payment_ttl":"10m","circuit_cool_down":"2s","circuit_failure_threshold":3}"#,
        )
        .expect("config");
        assert_eq!(c.payment_ttl, Duration::from_secs(600));
        assert_eq!(c.circuit_cool_down, Duration::from_secs(2));
        assert_eq!(c.circuit_failure_threshold, 3);
    }
}
