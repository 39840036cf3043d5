//! Keeps embedded admission and the embedded log bounded while a process runs.
//!
//! One task on the settler's runtime (never on the HTTP workers):
//!
//! - every second: drops refilled token buckets ([`EmbeddedAdmission::maintain`], which
//!   also sets `flashsale_admission_entries`), and retires every sale that ended more than
//!   `admission.retention` ago and is settled (the store holds at least as many orders of
//!   it as admission accepted, none of them `persisted` or `payment_pending`);
//! - every `log.checkpoint_interval`, and once more at shutdown: writes the admission
//!   checkpoint ([`ingest::checkpoint`]) at the log's end, then deletes the log segments
//!   wholly before both that checkpoint and the settler's committed position (the store's
//!   checkpoint). This task is the only one that deletes segments.

use anyhow::Context;
use ingest::admission::EmbeddedAdmission;
use ingest::model::OrderRef;
use sequencer::embedded::FileLog;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use storage::{OrderStatus, OrderStore, Timestamp};
use tokio_util::sync::CancellationToken;

/// The maintenance task's parts and settings.
pub struct Maintenance {
    /// The admission state it bounds and checkpoints.
    pub admission: Arc<EmbeddedAdmission>,
    /// Where the settled totals and the settler's checkpoint are read.
    pub store: Arc<dyn OrderStore>,
    /// The log it checkpoints against and deletes segments of.
    pub log: FileLog,
    /// The log's directory (the checkpoint file lives there).
    pub log_dir: PathBuf,
    /// The settler's consumer name (its checkpoint in the store).
    pub consumer: String,
    /// `admission.retention`.
    pub retention: Duration,
    /// `log.checkpoint_interval`.
    pub checkpoint_interval: Duration,
    /// Offset up to which records were marked durable (the last checkpoint's).
    pub covered: u64,
}

impl Maintenance {
    /// Runs until `shutdown`, then writes a last checkpoint.
    pub async fn run(mut self, shutdown: CancellationToken) {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut checkpoint =
            tokio::time::interval(self.checkpoint_interval.max(Duration::from_millis(10)));
        checkpoint.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        checkpoint.tick().await;
        loop {
            tokio::select! {
                () = shutdown.cancelled() => break,
                _ = tick.tick() => self.bound().await,
                _ = checkpoint.tick() => {
                    if let Err(e) = self.checkpoint().await {
                        tracing::error!(error = %format!("{e:#}"), "admission checkpoint failed");
                    }
                }
            }
        }
        if let Err(e) = self.checkpoint().await {
            tracing::error!(error = %format!("{e:#}"), "admission checkpoint at shutdown failed");
        }
    }

    /// Drops refilled buckets and retires ended, settled sales.
    pub async fn bound(&self) {
        let now = Timestamp::now().micros();
        self.admission.maintain(now);
        let retention = i64::try_from(self.retention.as_micros()).unwrap_or(i64::MAX);
        for (sale, accepted) in self.admission.ended_sales(now, retention) {
            let totals = match self.store.sale_totals(&sale).await {
                Ok(t) => t,
                Err(e) => {
                    tracing::warn!(error = %storage::ErrorChain(&e), %sale, "cannot read a sale's totals; not retired");
                    continue;
                }
            };
            let open = totals.get(OrderStatus::Persisted).orders
                + totals.get(OrderStatus::PaymentPending).orders;
            if open == 0 && totals.orders >= accepted {
                self.admission.retire(&sale);
                tracing::info!(%sale, "sale ended and settled; its admission entries dropped");
            }
        }
    }

    /// Writes the admission checkpoint at the log's end and deletes settled segments.
    /// Returns the checkpoint's offset.
    pub async fn checkpoint(&mut self) -> anyhow::Result<u64> {
        let end = self.log.len();
        // Every record before `end` is durable: mark it so, so the snapshot keeps it.
        let mut from = self.covered.max(self.log.start_offset());
        while from < end {
            let entries = self.log.read_from(from, 4096)?;
            if entries.is_empty() {
                break;
            }
            for e in &entries {
                if e.position.offset >= end {
                    break;
                }
                if let Ok(r) = sequencer::decode(&e.payload) {
                    self.admission.mark_durable(&r.sale_id, &OrderRef::from(&r));
                }
            }
            from += entries.len() as u64;
        }
        let admission = Arc::clone(&self.admission);
        let dir = self.log_dir.clone();
        tokio::task::spawn_blocking(move || {
            let checkpoint = admission.checkpoint(end);
            ingest::checkpoint::write(&dir, &checkpoint)
        })
        .await
        .context("checkpoint task")??;
        self.covered = end;
        let settled = self.store.checkpoint(&self.consumer, 0).await?.unwrap_or(0);
        let deleted = self.log.delete_before(end.min(settled))?;
        tracing::debug!(offset = end, deleted, "admission checkpoint written");
        Ok(end)
    }
}
