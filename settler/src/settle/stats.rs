//! What one settler process did since it started.

use crate::breaker::CircuitBreaker;
use serde::{Deserialize, Serialize};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

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
    /// Refunds of late charges the store holds as owed, as the sweep's last read saw them
    /// (less those settled since): they wait for a retry by the sweep.
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
    /// Store write batches (each one transaction per database).
    pub write_batches: u64,
    /// Changes written in those batches.
    pub writes: u64,
    /// Documents (receipts, refund notes) written to the archive and recorded on their
    /// order by the receipts stage.
    pub documents: u64,
}

#[derive(Debug, Default)]
pub(crate) struct Counters {
    pub(crate) persisted: AtomicU64,
    pub(crate) deferred: AtomicU64,
    pub(crate) paid: AtomicU64,
    pub(crate) payment_failed: AtomicU64,
    pub(crate) expired: AtomicU64,
    pub(crate) released: AtomicU64,
    pub(crate) notified: AtomicU64,
    pub(crate) refunded: AtomicU64,
    pub(crate) refunds_owed: AtomicU64,
    pub(crate) dead_lettered: AtomicU64,
    pub(crate) provider_errors: AtomicU64,
    pub(crate) in_flight: AtomicU64,
    pub(crate) events_published: AtomicU64,
    pub(crate) sweeps: AtomicU64,
    pub(crate) write_batches: AtomicU64,
    pub(crate) writes: AtomicU64,
    pub(crate) documents: AtomicU64,
}

/// The progress counters of a settler: a shared handle, cheap to clone, that stays valid
/// while and after the settler runs.
#[derive(Debug, Clone, Default)]
pub struct SettlerStats {
    pub(crate) counters: Arc<Counters>,
    pub(crate) breaker: Option<CircuitBreaker>,
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
            write_batches: get(&c.write_batches),
            writes: get(&c.writes),
            documents: get(&c.documents),
        }
    }

    pub(crate) fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }
}
