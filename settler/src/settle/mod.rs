//! The settle loop: from the log to a paid (or released) and notified order, exactly once,
//! with every status change published.
//!
//! Stages, each a module, joined by bounded queues and sharing one [`core`]:
//! - [`intake`]: polls a batch from the [`LogConsumer`], decodes each record (an
//!   undecodable one goes to the [`DeadLetter`] sink and the partition moves on), persists
//!   the batch with the log checkpoint, commits the consumer's position, then offers the
//!   orders to the charge stage without waiting: when the hand-over queue
//!   (`charge_queue`) is full or the circuit is open, the order is left `persisted` for the
//!   sweep (counted as `deferred`), so persisting goes on at full speed through a provider
//!   outage.
//! - [`charge`]: at most `charge_concurrency` orders at once, each claimed at admission and
//!   moved `persisted -> payment_pending`, charged (Idempotency-Key = order id; retries with
//!   jittered exponential backoff; a charge whose request timed out is looked up before it
//!   is sent again), its stock released (failed), moved to `paid` or `payment_failed`
//!   (with `released_at` in the same write), then its buyer notified.
//! - [`sweep`] (at start and every `sweep_interval`): retries refunds of late charges that
//!   failed, expires stale orders, and picks up what a crash, an outage, a full queue or a
//!   store error left behind.
//! - [`publisher`]: drains the store's outbox of status changes into the [`EventSink`]
//!   (`flashsale.order-events.v1`), soon after each change and every `publish_interval`.
//! - [`receipts`] (only with [`Settler::with_documents`]): writes the receipt of each paid
//!   order and the refund note of each refunded late charge to the archive, soon after
//!   each change and every `receipts_interval`; an archive outage delays documents, never
//!   settlement.
//!
//! **Batches.** Every store write and every admission call of the charge stage goes
//! through a group-commit [`batcher`]: the changes of all orders under way are written in
//! one [`OrderStore::apply_batch`] (one transaction per database), and their claims and
//! releases go to admission in one call each ([`StockRelease::claim_batch`],
//! [`StockRelease::release_batch`]). An idle settler adds no wait; a busy one pays each
//! commit and round trip once per batch. [`core::Core::step`] is the one status step every
//! stage takes.
//!
//! **Circuit breaker.** Every payment-provider call asks the [`CircuitBreaker`] first.
//! After `circuit_failure_threshold` consecutive calls that failed with a timeout, a
//! transport error or a 5xx (after their own retries), the circuit opens: nothing is
//! charged, no order is failed or expired, orders stay `persisted` or `payment_pending`.
//! After `circuit_cool_down` the sweep lets one order through as a probe; its success
//! closes the circuit and the sweep takes up the backlog.
//!
//! **Fairness.** An order whose charge failed waits before its next attempt, from
//! `sweep_interval` doubling up to `order_retry_max`, with jitter. The wait is recorded on
//! the order (its failed attempts and `retry_after`, [`storage::Change::Deferred`]) and the
//! sweep reads only the orders that are due ([`OrderStore::orders_due`]), so a pile of
//! orders the provider refuses cannot starve the others, and a restarted settler neither
//! sends them all again at once nor starts their doubling over; the expiry ends them.
//!
//! **Expiry.** An order in `payment_pending` for longer than `payment_ttl` is looked up at
//! the provider instead of being charged again: a charge found settles it; none found
//! moves it `payment_pending -> expired`, its stock is released once and its buyer told. A
//! charge that succeeds for an order already void (another worker expired it) is refunded
//! through an outbox on the order: `refund_state = owed` with the charge id is written
//! before the provider is asked, `refunded` (or `refused`, which reconcile reports) after;
//! the sweep retries what the store holds as owed ([`OrderStore::refunds_owed`]), so a
//! refund owed survives a restart.
//!
//! **Notifications go through an outbox.** The order row's `notified_at` is the outbox:
//! NULL from the write that makes the order final until the notification provider took
//! the notification (recorded by a later, batched write). The buyer is told only after the
//! final status is written, because another process may have moved the order to another
//! outcome meanwhile (an expiry); a crash between telling and recording repeats the
//! notification with the same provider key `"{order_id}:{outcome}"`, which the provider
//! answers once. A failed notification leaves `notified_at` NULL for the sweep.
//!
//! **Metrics** ([`crate::metrics`]): the step counts its transitions and events (`paid`,
//! `payment_failed`, `expired`, `released`, `notified`) and the paid delay; the intake the
//! persisted, deferred and dead-lettered records and, once a second, the consumer's lag per
//! partition ([`LogConsumer::lag`]); the hand-over queue's depth is set on each send and
//! receive; the publisher and the sweep set the outbox backlogs from the reads they make
//! anyway (never a query per scrape).
//!
//! **Liveness** (`supervisor.rs`): every stage runs as a task of its own. One that panics
//! or ends before shutdown is dead: the others are stopped, and after a backoff every
//! stage starts again on a fresh core, reading from the last committed position through a
//! [`ConsumerSource`]. [`SettlerHealth`] names the stage that is down (the process's
//! `/readyz` answers 503 meanwhile) and `flashsale_settler_stage_up{stage}` is 0; at the
//! death after [`MAX_RESTARTS`] restarts in a row, [`Settler::run`] returns
//! [`Error::StageFailed`] and the process stops.
//!
//! An in-flight set (claimed from hand-over until the order's work ends) keeps two tasks
//! from working on one order. The store's conditional status moves keep two *processes*
//! from moving one order twice, and the provider's idempotency key (the order id) makes a
//! repeated charge return the first outcome.

mod batcher;
mod charge;
mod config;
mod core;
mod intake;
mod publisher;
mod receipts;
mod stats;
mod supervisor;
mod sweep;

pub use config::SettlerConfig;
pub use stats::{SettlerStats, StatsSnapshot};
pub use supervisor::{
    ConsumerSource, SettlerHealth, Stage, HEALTHY_RUN, MAX_RESTARTS, RESTART_BACKOFF,
    RESTART_BACKOFF_MAX,
};

use crate::breaker::CircuitBreaker;
use crate::dead_letter::DeadLetter;
use crate::events::{EventSink, TracingEventSink};
use crate::provider::{NotificationClient, PaymentClient};
use crate::{Error, Result};
use async_trait::async_trait;
use sequencer::LogConsumer;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;
use storage::{Order, OrderStore};
use tokio::sync::mpsc;
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

    /// [`release`](Self::release) of many orders in one call; one result per order, in
    /// order. The default calls `release` per order.
    async fn release_batch(&self, orders: &[Order]) -> Vec<Result<bool>> {
        let mut out = Vec::with_capacity(orders.len());
        for order in orders {
            out.push(self.release(order).await);
        }
        out
    }

    /// [`claim`](Self::claim) of many orders in one call; one result per order, in order.
    /// The default calls `claim` per order.
    async fn claim_batch(&self, orders: &[Order]) -> Vec<Result<bool>> {
        let mut out = Vec::with_capacity(orders.len());
        for order in orders {
            out.push(self.claim(order).await);
        }
        out
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

/// The settler: reads the order log and settles every order in it exactly once.
pub struct Settler {
    store: Arc<dyn OrderStore>,
    release: Arc<dyn StockRelease>,
    payments: PaymentClient,
    notifications: NotificationClient,
    breaker: CircuitBreaker,
    stats: SettlerStats,
    consumer: Box<dyn LogConsumer>,
    source: Option<Arc<dyn ConsumerSource>>,
    dead_letter: Arc<dyn DeadLetter>,
    sink: Arc<dyn EventSink>,
    health: SettlerHealth,
    config: SettlerConfig,
    documents: Option<Documents>,
}

/// The receipts stage's settings: where documents go and what they say (see
/// [`Settler::with_documents`]).
#[derive(Debug, Clone)]
pub struct Documents {
    /// The object store documents are written to.
    pub archive: Arc<::receipts::Archive>,
    /// The seller's name on every document.
    pub seller: String,
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
    /// `config.consumer`), writing to `store`, releasing stock through `release` and
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
        Ok(Settler {
            store,
            release,
            payments: PaymentClient::new(&config.payment_url, config.provider_timeout, retry)?
                .with_circuit(breaker.clone()),
            notifications: NotificationClient::new(
                &config.notification_url,
                config.provider_timeout,
                retry,
            )?,
            stats: SettlerStats {
                counters: Arc::default(),
                breaker: Some(breaker.clone()),
            },
            breaker,
            consumer,
            source: None,
            dead_letter,
            sink: Arc::new(TracingEventSink::default()),
            health: SettlerHealth::default(),
            config,
            documents: None,
        })
    }

    /// Writes a receipt for every paid order (a refund note for every refunded late charge)
    /// to `documents.archive`, off the order path (the receipts stage). Without it, no
    /// documents are written.
    pub fn with_documents(mut self, documents: Documents) -> Self {
        self.documents = Some(documents);
        self
    }

    /// Publishes status changes to `sink` instead of only logging them.
    pub fn with_event_sink(mut self, sink: Arc<dyn EventSink>) -> Self {
        self.sink = sink;
        self
    }

    /// This settler's progress counters (a shared handle, valid after `run` consumed it).
    pub fn stats(&self) -> SettlerStats {
        self.stats.clone()
    }

    /// The circuit breaker in front of the payment provider (a shared handle).
    pub fn circuit_breaker(&self) -> CircuitBreaker {
        self.breaker.clone()
    }

    /// Opens the consumer again when the settler restarts after a stage died. Without
    /// one, the first death of a stage stops the settler.
    pub fn with_consumer_source(mut self, source: Arc<dyn ConsumerSource>) -> Self {
        self.source = Some(source);
        self
    }

    /// Which stage is down, whether the settler gave up (a shared handle, valid after
    /// `run` consumed the settler).
    pub fn health(&self) -> SettlerHealth {
        self.health.clone()
    }

    /// Settles until `shutdown` is cancelled: stops reading, lets orders under way finish
    /// and publishes their changes within `shutdown_grace` each, then returns. A stage
    /// that dies (a panic, or an end before shutdown) is restarted with every other stage,
    /// after a backoff, from the last committed position (see [`SettlerHealth`]); it returns
    /// [`Error::StageFailed`] when a stage dies again after [`MAX_RESTARTS`] restarts in a
    /// row (or at the first death without a [`ConsumerSource`]). Its tasks run on the runtime that polls
    /// this future.
    pub async fn run(self, shutdown: CancellationToken) -> Result<()> {
        let Settler {
            store,
            release,
            payments,
            notifications,
            breaker,
            stats,
            consumer,
            source,
            dead_letter,
            sink,
            health,
            config,
            documents,
        } = self;
        let notify_breaker = CircuitBreaker::for_provider(
            crate::metrics::NOTIFICATION,
            config.circuit_failure_threshold,
            config.circuit_cool_down,
        );
        let parts = || core::CoreParts {
            store: Arc::clone(&store),
            release: Arc::clone(&release),
            payments: payments.clone(),
            notifications: notifications.clone().with_circuit(notify_breaker.clone()),
            notify_breaker: notify_breaker.clone(),
            breaker: breaker.clone(),
            stats: stats.clone(),
            payment_ttl: config.payment_ttl,
            sweep_interval: config.sweep_interval,
            order_retry_max: config.order_retry_max,
            write_batch: config.write_batch,
            admission_batch: config.admission_batch,
        };
        let stages = Stages {
            dead_letter,
            sink,
            health: health.clone(),
            config: &config,
            documents,
        };
        let mut consumer = Some(consumer);
        let mut deaths = 0u32;
        loop {
            let consumer = match (consumer.take(), &source) {
                (Some(c), _) => c,
                (None, Some(source)) => {
                    match until_done(&shutdown, "reopening the log consumer", || source.open())
                        .await
                    {
                        Some(c) => c,
                        None => return Ok(()),
                    }
                }
                (None, None) => unreachable!("a settler without a source never restarts"),
            };
            let started = tokio::time::Instant::now();
            let Some(death) = stages.run(parts(), consumer, &shutdown).await else {
                return Ok(());
            };
            if started.elapsed() >= HEALTHY_RUN {
                deaths = 0;
            }
            deaths += 1;
            if deaths > MAX_RESTARTS || source.is_none() {
                health.give_up();
                tracing::error!(
                    stage = %death.stage,
                    reason = %death.reason,
                    deaths,
                    "a settler stage keeps dying; the settler gives up"
                );
                return Err(Error::StageFailed {
                    stage: death.stage,
                    deaths,
                    reason: death.reason,
                });
            }
            health.restarted(death.stage);
            let wait = supervisor::backoff(deaths);
            tracing::error!(
                stage = %death.stage,
                reason = %death.reason,
                deaths,
                restart_in = ?wait,
                "a settler stage died; restarting the settle loop from the last committed \
                 position"
            );
            if !pause(&shutdown, wait).await {
                return Ok(());
            }
        }
    }
}

/// A stage that died: which, and why.
struct Death {
    stage: Stage,
    reason: String,
}

/// What every run of the stages shares.
struct Stages<'a> {
    dead_letter: Arc<dyn DeadLetter>,
    sink: Arc<dyn EventSink>,
    health: SettlerHealth,
    config: &'a SettlerConfig,
    documents: Option<Documents>,
}

impl Stages<'_> {
    /// Runs every stage on a fresh core until shutdown (`None`) or until one dies: then
    /// stops the others and names it.
    async fn run(
        &self,
        parts: core::CoreParts,
        consumer: Box<dyn LogConsumer>,
        shutdown: &CancellationToken,
    ) -> Option<Death> {
        let config = self.config;
        let core = core::Core::start(parts);
        // Cancelled by the caller or when a stage ends on its own.
        let stop = shutdown.child_token();
        let (jobs, queue) = mpsc::channel(config.charge_queue.max(1));
        let mut tasks = JoinSet::new();
        let mut names = HashMap::new();
        let mut spawn = |stage: Stage, fut: BoxFuture| {
            let health = self.health.clone();
            let id = tasks
                .spawn(async move { health.guard(stage, fut).await })
                .id();
            names.insert(id, stage);
            self.health.set_up(stage, true);
        };
        spawn(
            Stage::Charge,
            Box::pin(charge::charge_stage(
                Arc::clone(&core),
                queue,
                config.charge_concurrency,
                config.shutdown_grace,
                stop.clone(),
            )),
        );
        spawn(
            Stage::Sweep,
            Box::pin(sweep::sweep(
                Arc::clone(&core),
                jobs.clone(),
                sweep::SweepSettings {
                    interval: config.sweep_interval,
                    limit: config.sweep_limit.max(1),
                },
                stop.clone(),
            )),
        );
        let publish_batch = config.publish_batch.max(1);
        spawn(
            Stage::Publisher,
            Box::pin(publisher::publisher(
                Arc::clone(&core),
                Arc::clone(&self.sink),
                config.publish_interval,
                publish_batch,
                stop.clone(),
            )),
        );
        if let Some(documents) = &self.documents {
            spawn(
                Stage::Receipts,
                Box::pin(receipts::receipts(
                    Arc::clone(&core),
                    documents.clone(),
                    receipts::ReceiptSettings {
                        interval: config.receipts_interval,
                        batch: config.receipts_batch.max(1),
                    },
                    stop.clone(),
                )),
            );
        }
        let intake = intake::Intake {
            core: Arc::clone(&core),
            consumer,
            dead_letter: Arc::clone(&self.dead_letter),
            jobs,
            consumer_name: config.consumer.clone(),
            batch_size: config.batch_size.max(1),
            poll_wait: config.poll_wait,
            lag: intake::LagSampler::new(),
        };
        let intake_stop = stop.clone();
        spawn(
            Stage::Intake,
            Box::pin(async move { intake.run(&intake_stop).await }),
        );

        // The first stage to end stops the others. A stage that ends before that, or
        // panics, died; a panic names the culprit before a stage that ended because of it
        // (the intake ends when the charge stage is gone).
        let mut died: Vec<(Stage, Option<String>)> = Vec::new();
        while let Some(ended) = tasks.join_next_with_id().await {
            let (id, panic) = match ended {
                Ok((id, ())) => (id, None),
                Err(e) => (e.id(), Some(panic_message(e))),
            };
            let stage = names.get(&id).copied().unwrap_or(Stage::Intake);
            if panic.is_some() || !stop.is_cancelled() {
                self.health.set_up(stage, false);
                died.push((stage, panic));
            }
            stop.cancel();
        }
        let death = died
            .iter()
            .position(|(_, panic)| panic.is_some())
            .or((!died.is_empty()).then_some(0))
            .map(|i| {
                let (stage, panic) = died.swap_remove(i);
                Death {
                    stage,
                    reason: panic.unwrap_or_else(|| "ended before shutdown".to_owned()),
                }
            });
        if death.is_none() {
            // The last changes of the orders that finished during the grace.
            if tokio::time::timeout(
                config.shutdown_grace,
                publisher::publish_pending(&core, &*self.sink, publish_batch),
            )
            .await
            .is_err()
            {
                tracing::warn!("shutdown grace over; unpublished events wait for the next start");
            }
        }
        death
    }
}

type BoxFuture = std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>;

/// The message of a panicked task (`cancelled` if it was aborted).
fn panic_message(e: tokio::task::JoinError) -> String {
    match e.try_into_panic() {
        Ok(payload) => payload
            .downcast_ref::<&str>()
            .map(|s| (*s).to_owned())
            .or_else(|| payload.downcast_ref::<String>().cloned())
            .map_or_else(|| "panicked".to_owned(), |m| format!("panicked: {m}")),
        Err(_) => "cancelled".to_owned(),
    }
}
