//! The settle loop: from the log to a paid (or released) and notified order, exactly once.
//!
//! Three tasks share one core (store, provider clients, in-flight set, counters):
//! - intake: polls a batch from the [`LogConsumer`], decodes each record (an undecodable one
//!   goes to the [`DeadLetter`] sink and the partition moves on), persists the batch with the
//!   log checkpoint in the same transaction, commits the consumer's position, then hands the
//!   orders to the charge stage through a bounded channel;
//! - charge stage: at most `charge_concurrency` orders at once, each moved
//!   `persisted -> payment_pending`, charged, moved to `paid` or `payment_failed`, its stock
//!   released (failed) and its buyer notified, every step recorded in the store;
//! - sweep (at start and every `sweep_interval`): picks up what a crash, a provider outage or
//!   a store error left behind: `persisted` and `payment_pending` orders (a pending one is
//!   looked up at the provider before it is charged) and final orders whose release or
//!   notification is still owed.
//!
//! An in-flight set (claimed from hand-over until the order's work ends) keeps two tasks
//! from working on one order. The store's conditional status moves keep two *processes*
//! from charging one order twice, and the provider's idempotency key (the order id) makes a
//! repeated charge return the first outcome. A provider that is down never fails an order:
//! it stays `payment_pending` until the provider answers.

use crate::dead_letter::DeadLetter;
use crate::provider::{
    ChargeOutcome, NotificationClient, NotificationKind, PaymentClient, RetryPolicy,
};
use crate::{Error, Result};
use async_trait::async_trait;
use parking_lot::Mutex;
use sequencer::{LogConsumer, LogEntry, LogPosition};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use storage::{Checkpoint, NewOrder, Order, OrderId, OrderStatus, OrderStore};
use tokio::sync::{mpsc, Semaphore};
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
    /// Most records read and persisted in one batch; also the capacity of the hand-over
    /// channel to the charge stage.
    pub batch_size: usize,
    /// Longest a poll waits for the first record.
    #[serde(with = "humantime_serde")]
    pub poll_wait: Duration,
    /// Most orders charged (and released, notified) at once.
    pub charge_concurrency: usize,
    /// Name under which the log checkpoint is stored (the consumer group).
    pub consumer_name: String,
    /// Base URL of the payment provider.
    pub payment_url: String,
    /// Base URL of the notification provider.
    pub notification_url: String,
    /// Timeout of one provider request.
    #[serde(with = "humantime_serde")]
    pub provider_timeout: Duration,
    /// Attempts per provider call, the first included, before the order is left for the
    /// next sweep.
    pub retry_max_attempts: usize,
    /// Delay before the first retry of a provider call; it doubles per retry, with jitter.
    #[serde(with = "humantime_serde")]
    pub retry_min_delay: Duration,
    /// Longest delay between two attempts of a provider call.
    #[serde(with = "humantime_serde")]
    pub retry_max_delay: Duration,
    /// How often unfinished orders are looked for.
    #[serde(with = "humantime_serde")]
    pub sweep_interval: Duration,
    /// Most orders of each kind one sweep picks up.
    pub sweep_limit: usize,
    /// How long orders under way may take to finish after shutdown is asked for; then they
    /// are abandoned (the next start's sweep finishes them).
    #[serde(with = "humantime_serde")]
    pub shutdown_grace: Duration,
}

impl Default for SettlerConfig {
    fn default() -> Self {
        SettlerConfig {
            batch_size: 512,
            poll_wait: Duration::from_millis(50),
            charge_concurrency: 64,
            consumer_name: "settler".into(),
            payment_url: "http://127.0.0.1:8090".into(),
            notification_url: "http://127.0.0.1:8090".into(),
            provider_timeout: Duration::from_secs(2),
            retry_max_attempts: 4,
            retry_min_delay: Duration::from_millis(50),
            retry_max_delay: Duration::from_secs(2),
            sweep_interval: Duration::from_secs(1),
            sweep_limit: 1000,
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
    /// Orders moved to `paid`.
    pub paid: u64,
    /// Orders moved to `payment_failed`.
    pub payment_failed: u64,
    /// Orders whose stock release was recorded.
    pub released: u64,
    /// Orders whose notification was recorded.
    pub notified: u64,
    /// Late successful charges refunded because the order was already void.
    pub refunded: u64,
    /// Records sent to the dead-letter sink.
    pub dead_lettered: u64,
    /// Provider calls that failed after their retries (the order waits for a sweep).
    pub provider_errors: u64,
    /// Orders claimed right now (queued for or in the charge stage).
    pub in_flight: u64,
}

#[derive(Debug, Default)]
struct Counters {
    persisted: AtomicU64,
    paid: AtomicU64,
    payment_failed: AtomicU64,
    released: AtomicU64,
    notified: AtomicU64,
    refunded: AtomicU64,
    dead_lettered: AtomicU64,
    provider_errors: AtomicU64,
    in_flight: AtomicU64,
}

/// The progress counters of a settler: a shared handle, cheap to clone, that stays valid
/// while and after the settler runs.
#[derive(Debug, Clone, Default)]
pub struct SettlerStats(Arc<Counters>);

impl SettlerStats {
    /// The counters now.
    pub fn snapshot(&self) -> StatsSnapshot {
        let c = &self.0;
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        StatsSnapshot {
            persisted: get(&c.persisted),
            paid: get(&c.paid),
            payment_failed: get(&c.payment_failed),
            released: get(&c.released),
            notified: get(&c.notified),
            refunded: get(&c.refunded),
            dead_lettered: get(&c.dead_lettered),
            provider_errors: get(&c.provider_errors),
            in_flight: get(&c.in_flight),
        }
    }

    fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }
}

/// State shared by the intake, the charge stage and the sweep.
struct Core {
    store: Arc<dyn OrderStore>,
    release: Arc<dyn StockRelease>,
    payments: PaymentClient,
    notifications: NotificationClient,
    in_flight: Mutex<HashSet<OrderId>>,
    stats: SettlerStats,
}

/// An order claimed by one task; dropping it lets others claim the order again.
struct Claim {
    core: Arc<Core>,
    id: OrderId,
}

impl Drop for Claim {
    fn drop(&mut self) {
        self.core.in_flight.lock().remove(&self.id);
        self.core.stats.0.in_flight.fetch_sub(1, Ordering::Relaxed);
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
const MAX_STEPS: usize = 6;

fn claim(core: &Arc<Core>, id: OrderId) -> Option<Claim> {
    if !core.in_flight.lock().insert(id) {
        return None;
    }
    core.stats.0.in_flight.fetch_add(1, Ordering::Relaxed);
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
    /// charged already, so its charge is looked up before it is sent.
    async fn drive(&self, mut order: Order, mut recovering: bool) {
        let id = order.new.order_id;
        for _ in 0..MAX_STEPS {
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
                    if next == OrderStatus::Expired {
                        match self
                            .store
                            .transition(id, OrderStatus::Persisted, OrderStatus::Expired, None)
                            .await
                        {
                            Ok(true) => order.status = OrderStatus::Expired,
                            Ok(false) => match self.reload(id).await {
                                Some(o) => order = o,
                                None => return,
                            },
                            Err(e) => {
                                tracing::warn!(order_id = %id, error = %e, "status write failed; left for the sweep");
                                return;
                            }
                        }
                        continue;
                    }
                    match self
                        .store
                        .transition(
                            id,
                            OrderStatus::Persisted,
                            OrderStatus::PaymentPending,
                            None,
                        )
                        .await
                    {
                        Ok(true) => {
                            order.status = OrderStatus::PaymentPending;
                            recovering = false;
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
                    match self.settle_charge(&mut order, recovering).await {
                        Some(()) => recovering = true,
                        None => return,
                    }
                }
                OrderStatus::Paid | OrderStatus::PaymentFailed | OrderStatus::Expired => {
                    self.follow_up(&order).await;
                    return;
                }
            }
        }
        tracing::error!(order_id = %id, status = %order.status, "order did not settle in bounded steps");
    }

    /// Charges a `payment_pending` order and records the outcome in `order`. `None` if the
    /// order must wait (provider or store failed).
    async fn settle_charge(&self, order: &mut Order, recovering: bool) -> Option<()> {
        let id = order.new.order_id;
        let charged = if recovering {
            match self.payments.lookup(&PaymentClient::charge_key(id)).await {
                Ok(Some(outcome)) => Ok(outcome),
                Ok(None) => self.payments.charge(&order.new).await,
                Err(e) => Err(e),
            }
        } else {
            self.payments.charge(&order.new).await
        };
        let outcome = match charged {
            Ok(outcome) => outcome,
            Err(e) => {
                SettlerStats::add(&self.stats.0.provider_errors, 1);
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
                let counter = if to == OrderStatus::Paid {
                    &self.stats.0.paid
                } else {
                    &self.stats.0.payment_failed
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
                        self.refund(id, charge_id).await;
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

    /// A charge that succeeded for an order already void: give the money back (invariant:
    /// at most one successful charge per order, none kept for a released order).
    async fn refund(&self, id: OrderId, charge_id: &str) {
        match self.payments.refund(id, charge_id).await {
            Ok(_) => {
                SettlerStats::add(&self.stats.0.refunded, 1);
                tracing::warn!(order_id = %id, charge_id, "late charge of a void order refunded");
            }
            Err(e) => {
                SettlerStats::add(&self.stats.0.provider_errors, 1);
                tracing::error!(order_id = %id, charge_id, error = %e, "refund of a late charge failed; reconcile must pick it up");
            }
        }
    }

    /// Releases the stock of a failed or expired order and notifies the buyer, each only if
    /// still owed, and records both.
    async fn follow_up(&self, order: &Order) {
        let id = order.new.order_id;
        if order.status.releases_stock() && order.released_at.is_none() {
            match self.release.release(order).await {
                Ok(_) => match self.store.mark_released(id).await {
                    Ok(true) => SettlerStats::add(&self.stats.0.released, 1),
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
        match self
            .notifications
            .notify(id, &order.new.user_id, kind)
            .await
        {
            Ok(()) => match self.store.mark_notified(id).await {
                Ok(true) => SettlerStats::add(&self.stats.0.notified, 1),
                Ok(false) => {}
                Err(e) => {
                    tracing::warn!(order_id = %id, error = %e, "notification not recorded; left for the sweep");
                }
            },
            Err(e) => {
                SettlerStats::add(&self.stats.0.provider_errors, 1);
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
            for order in orders {
                let Some(claim) = claim(&self.core, order.order_id) else {
                    continue; // the sweep has it
                };
                let job = Job {
                    claim,
                    work: Work::Fresh(order),
                };
                tokio::select! {
                    biased;
                    _ = shutdown.cancelled() => return,
                    sent = self.jobs.send(job) => if sent.is_err() { return },
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
                    SettlerStats::add(&self.core.stats.0.dead_lettered, 1);
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
            SettlerStats::add(&self.core.stats.0.persisted, inserted as u64);
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

/// Finds unfinished orders and queues those no task has claimed.
async fn sweep(
    core: Arc<Core>,
    jobs: mpsc::Sender<Job>,
    interval: Duration,
    limit: usize,
    shutdown: CancellationToken,
) {
    let mut ticker = tokio::time::interval(interval.max(Duration::from_millis(1)));
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            biased;
            _ = shutdown.cancelled() => return,
            _ = ticker.tick() => {}
        }
        let mut ids = Vec::new();
        match core
            .store
            .orders_in_status(
                &[OrderStatus::Persisted, OrderStatus::PaymentPending],
                limit,
            )
            .await
        {
            Ok(orders) => ids.extend(orders.iter().map(|o| o.new.order_id)),
            Err(e) => tracing::warn!(error = %e, "sweep: unsettled orders not read"),
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
    }
}

/// The settler: reads the order log and settles every order in it exactly once.
pub struct Settler {
    core: Arc<Core>,
    consumer: Box<dyn LogConsumer>,
    dead_letter: Arc<dyn DeadLetter>,
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
    /// or [`LogDeadLetter`](crate::LogDeadLetter) to only log them). Fails if a provider URL
    /// is invalid.
    pub fn new(
        store: Arc<dyn OrderStore>,
        consumer: Box<dyn LogConsumer>,
        release: Arc<dyn StockRelease>,
        dead_letter: Arc<dyn DeadLetter>,
        config: SettlerConfig,
    ) -> Result<Self> {
        let retry = config.retry();
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
            stats: SettlerStats::default(),
        };
        Ok(Settler {
            core: Arc::new(core),
            consumer,
            dead_letter,
            config,
        })
    }

    /// This settler's progress counters (a shared handle, valid after `run` consumed it).
    pub fn stats(&self) -> SettlerStats {
        self.core.stats.clone()
    }

    /// Settles until `shutdown` is cancelled: stops reading, lets orders under way finish
    /// within `shutdown_grace`, then returns. Errors only if one of its tasks panicked.
    pub async fn run(self, shutdown: CancellationToken) -> Result<()> {
        let Settler {
            core,
            consumer,
            dead_letter,
            config,
        } = self;
        // Cancelled by the caller or when a stage ends on its own (a panic).
        let stop = shutdown.child_token();
        let (jobs, queue) = mpsc::channel(config.batch_size.max(1));
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
            config.sweep_interval,
            config.sweep_limit.max(1),
            stop.clone(),
        ));
        let intake = Intake {
            core,
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
        swept.map_err(Error::Task)?;
        staged.map_err(Error::Task)?;
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
        assert!(serde_json::from_str::<SettlerConfig>(r#"{"batch":1}"#).is_err());
    }
}
