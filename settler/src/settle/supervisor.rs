//! Liveness of the settle loop: which stage is up, the restart policy when one dies, and
//! what the process (readiness, metrics) sees of it.
//!
//! A stage dies when its task panics or ends before shutdown. The settler then stops the
//! other stages (orders under way get `shutdown_grace`), waits out a backoff, and starts
//! every stage again on a fresh [`core`](super::core) with a consumer opened afresh by its
//! [`ConsumerSource`]: from the store's checkpoint (embedded log) or the group's committed
//! offsets (Kafka), so nothing read but not yet persisted is skipped, and the persisting
//! being idempotent, nothing is persisted twice. While a stage is down,
//! [`SettlerHealth::down`] names it (the process's `/readyz` answers 503) and
//! `flashsale_settler_stage_up{stage}` is 0. At the death after [`MAX_RESTARTS`]
//! restarts in a row (a run of [`HEALTHY_RUN`] resets the count) the settler gives up and
//! [`Settler::run`](super::Settler::run) returns [`Error::StageFailed`](crate::Error):
//! the process stops, non-zero.

use crate::metrics::metrics;
use async_trait::async_trait;
use sequencer::LogConsumer;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;

/// Restarts in a row; the next death makes the settler give up (the process stops).
pub const MAX_RESTARTS: u32 = 5;
/// A run of the stages this long resets the count of consecutive deaths.
pub const HEALTHY_RUN: Duration = Duration::from_secs(60);
/// Wait before the first restart; it doubles per consecutive death up to
/// [`RESTART_BACKOFF_MAX`] (0.1 + 0.2 + 0.4 + 0.8 + 1.6 s before giving up).
pub const RESTART_BACKOFF: Duration = Duration::from_millis(100);
/// Longest wait before a restart.
pub const RESTART_BACKOFF_MAX: Duration = Duration::from_secs(5);

/// The wait before restart number `attempt` (1-based).
pub(crate) fn backoff(attempt: u32) -> Duration {
    RESTART_BACKOFF
        .saturating_mul(1u32 << attempt.saturating_sub(1).min(16))
        .min(RESTART_BACKOFF_MAX)
}

/// How many stages there are.
const STAGES: usize = 5;

/// A stage of the settle loop, as `flashsale_settler_stage_up{stage}`, the restarts
/// counter and readiness name it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Stage {
    /// Polls the log, persists, hands over.
    Intake,
    /// Charges, releases, notifies.
    Charge,
    /// Picks up what was left behind, expires.
    Sweep,
    /// Drains the outbox of status changes.
    Publisher,
    /// Writes the documents (receipts, refund notes) settled orders are owed (only with
    /// [`Settler::with_documents`](super::Settler::with_documents)).
    Receipts,
}

impl Stage {
    /// Every stage.
    pub const ALL: [Stage; STAGES] = [
        Stage::Intake,
        Stage::Charge,
        Stage::Sweep,
        Stage::Publisher,
        Stage::Receipts,
    ];

    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Stage::Intake => "intake",
            Stage::Charge => "charge",
            Stage::Sweep => "sweep",
            Stage::Publisher => "publisher",
            Stage::Receipts => "receipts",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

impl std::fmt::Display for Stage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Opens the settler's log consumer again for a restart: where the last committed
/// position is (the store's checkpoint, the consumer group's offsets).
#[async_trait]
pub trait ConsumerSource: Send + Sync + 'static {
    /// A consumer positioned at the last committed position.
    async fn open(&self) -> Result<Box<dyn LogConsumer>, String>;
}

struct HealthState {
    up: [AtomicBool; STAGES],
    failed: AtomicBool,
    restarts: AtomicU64,
    faults: watch::Sender<[bool; STAGES]>,
}

/// What the process sees of the settle loop: which stage is down, whether it gave up, how
/// often it restarted. A shared handle, cheap to clone and to read (no I/O).
#[derive(Clone)]
pub struct SettlerHealth(Arc<HealthState>);

impl std::fmt::Debug for SettlerHealth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SettlerHealth")
            .field("down", &self.down())
            .field("failed", &self.failed())
            .field("restarts", &self.restarts())
            .finish()
    }
}

impl Default for SettlerHealth {
    fn default() -> Self {
        // Up until seen dead: a settler about to start is not a dead one.
        SettlerHealth(Arc::new(HealthState {
            up: std::array::from_fn(|_| AtomicBool::new(true)),
            failed: AtomicBool::new(false),
            restarts: AtomicU64::new(0),
            faults: watch::Sender::new([false; STAGES]),
        }))
    }
}

impl SettlerHealth {
    /// The first stage that is down (dead and not restarted yet, or given up), if any.
    pub fn down(&self) -> Option<Stage> {
        Stage::ALL
            .into_iter()
            .find(|s| !self.0.up[s.index()].load(Ordering::Acquire))
    }

    /// Whether the settler gave up (a stage died again after [`MAX_RESTARTS`] restarts in
    /// a row).
    pub fn failed(&self) -> bool {
        self.0.failed.load(Ordering::Acquire)
    }

    /// Restarts since the settler started.
    pub fn restarts(&self) -> u64 {
        self.0.restarts.load(Ordering::Acquire)
    }

    pub(crate) fn set_up(&self, stage: Stage, up: bool) {
        self.0.up[stage.index()].store(up, Ordering::Release);
        metrics().set_stage_up(stage.as_str(), up);
    }

    pub(crate) fn restarted(&self, stage: Stage) {
        self.0.restarts.fetch_add(1, Ordering::AcqRel);
        metrics().stage_restarted(stage.as_str());
    }

    pub(crate) fn give_up(&self) {
        self.0.failed.store(true, Ordering::Release);
    }

    /// Fault injection for tests: every run of `stage` panics from now on, until
    /// [`clear_faults`](Self::clear_faults). Nothing outside the process can call it.
    #[doc(hidden)]
    pub fn inject_fault(&self, stage: Stage) {
        self.0.faults.send_modify(|f| f[stage.index()] = true);
    }

    /// Ends what [`inject_fault`](Self::inject_fault) started.
    #[doc(hidden)]
    pub fn clear_faults(&self) {
        self.0.faults.send_modify(|f| *f = [false; STAGES]);
    }

    /// Runs `stage`'s future, panicking as soon as a fault is injected into it.
    pub(crate) async fn guard<F: std::future::Future<Output = ()>>(&self, stage: Stage, fut: F) {
        let mut faults = self.0.faults.subscribe();
        let faulted = async move { faults.wait_for(|f| f[stage.index()]).await.is_ok() };
        tokio::select! {
            biased;
            true = faulted => panic!("fault injected into the settler's {stage} stage"),
            () = fut => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_backoff_doubles_up_to_its_cap() {
        let waits: Vec<_> = (1..=MAX_RESTARTS).map(backoff).collect();
        assert_eq!(
            waits,
            [100, 200, 400, 800, 1600]
                .map(Duration::from_millis)
                .to_vec()
        );
        assert_eq!(backoff(40), RESTART_BACKOFF_MAX);
    }

    #[test]
    fn health_names_the_first_stage_down() {
        let h = SettlerHealth::default();
        assert_eq!(h.down(), None, "up until seen dead");
        h.set_up(Stage::Sweep, false);
        h.set_up(Stage::Publisher, false);
        assert_eq!(h.down(), Some(Stage::Sweep));
        h.set_up(Stage::Sweep, true);
        assert_eq!(h.down(), Some(Stage::Publisher));
        h.set_up(Stage::Publisher, true);
        assert_eq!(h.down(), None);
    }
}
