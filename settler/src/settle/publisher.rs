//! The publisher: drains the store's outbox of status changes into the [`EventSink`].

use super::core::Core;
use super::pause;
use super::stats::SettlerStats;
use crate::events::EventSink;
use crate::metrics::{metrics, EVENTS_BACKLOG};
use std::sync::Arc;
use std::time::Duration;
use storage::{OrderId, OrderStatus};
use tokio_util::sync::CancellationToken;

/// Hands what the outbox holds to `sink`, batch by batch, marking each published once the
/// sink took it. `false` if a step failed (the rest waits for the next round). The events
/// backlog gauge is what each read found (at most `batch`), 0 once a short batch is out.
pub(crate) async fn publish_pending(core: &Core, sink: &dyn EventSink, batch: usize) -> bool {
    loop {
        let events = match core.store.unpublished_events(batch).await {
            Ok(events) => events,
            Err(e) => {
                tracing::warn!(error = %storage::ErrorChain(&e), "publisher: outbox not read");
                return false;
            }
        };
        metrics().set_backlog(EVENTS_BACKLOG, events.len());
        if events.is_empty() {
            return true;
        }
        if let Err(e) = sink.publish(&events).await {
            tracing::warn!(error = %storage::ErrorChain(&e), events = events.len(), "publisher: events not published; retrying later");
            return false;
        }
        let keys: Vec<(OrderId, OrderStatus)> =
            events.iter().map(|e| (e.order_id, e.status)).collect();
        if let Err(e) = core.store.mark_published(&keys).await {
            // Published but not marked: they go out again (at least once).
            tracing::warn!(error = %storage::ErrorChain(&e), "publisher: published events not marked");
            return false;
        }
        SettlerStats::add(&core.counters().events_published, events.len() as u64);
        if events.len() < batch {
            metrics().set_backlog(EVENTS_BACKLOG, 0);
            return true;
        }
    }
}

/// Publishes status changes soon after they happen (woken by the core) and every
/// `interval`, until shutdown; after a failure it waits `interval`.
pub(crate) async fn publisher(
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
