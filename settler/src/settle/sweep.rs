//! The sweep: picks up what a crash, an outage, a full queue, a backoff or a failed write
//! left behind, expires stale orders and retries owed refunds.

use super::core::{claim, Core, Job, Work};
use super::stats::SettlerStats;
use crate::breaker::BreakerState;
use crate::metrics::{metrics, CHARGE_QUEUE, NOTIFICATIONS_BACKLOG};
use std::sync::Arc;
use std::time::{Duration, Instant};
use storage::{OrderStatus, Timestamp};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// Settings of the sweep.
pub(crate) struct SweepSettings {
    pub(crate) interval: Duration,
    pub(crate) limit: usize,
}

/// Finds unfinished orders and queues those no task has claimed: stale pending orders
/// (expiry), orders to charge that are not waiting out a backoff, and owed follow-ups;
/// retries owed refunds first. While the circuit is open it queues only follow-ups; once
/// the cool-down is over, an owed refund or one or two orders to charge, the first of
/// which becomes the probe.
pub(crate) async fn sweep(
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
                _ = core.retry_refunds(limit) => {}
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
                Err(e) => {
                    tracing::warn!(error = %storage::ErrorChain(&e), "sweep: stale pending orders not read")
                }
            }
            // The store leaves out the orders whose recorded backoff is not over (so a restart
            // does not send them all at once to a provider that refuses them); read past
            // those waiting out a backoff recorded here only (its write failed), so they
            // cannot fill every read and starve the rest.
            let waiting = core.waiting();
            let read = limit.saturating_add(waiting).min(limit.saturating_mul(16));
            let open = [OrderStatus::Persisted, OrderStatus::PaymentPending];
            match core.store.orders_due(&open, Timestamp::now(), read).await {
                Ok(orders) => ids.extend(
                    orders
                        .iter()
                        .map(|o| o.new.order_id)
                        .filter(|id| core.is_due(*id, now))
                        .take(take),
                ),
                Err(e) => {
                    tracing::warn!(error = %storage::ErrorChain(&e), "sweep: unsettled orders not read")
                }
            }
        }
        match core.store.unfinished_followups(limit).await {
            Ok(orders) => {
                // The notification outbox as this read sees it (at most `limit`).
                let unnotified = orders.iter().filter(|o| o.notified_at.is_none()).count();
                metrics().set_backlog(NOTIFICATIONS_BACKLOG, unnotified);
                ids.extend(orders.iter().map(|o| o.new.order_id));
            }
            Err(e) => {
                tracing::warn!(error = %storage::ErrorChain(&e), "sweep: follow-ups not read")
            }
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
            metrics().set_queue_depth(CHARGE_QUEUE, jobs.max_capacity() - jobs.capacity());
        }
        SettlerStats::add(&core.counters().sweeps, 1);
    }
}
