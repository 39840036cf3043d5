//! The intake: reads the log in batches, dead-letters what does not decode, persists the
//! rest with the checkpoint, commits the consumer and hands the orders to the charge
//! stage, waiting for room in its queue. It also samples the consumer's lag once a second
//! (`flashsale_settler_lag_records`), between polls and while it waits for room.

use super::core::{claim, Core, Job, Work};
use super::stats::SettlerStats;
use super::{pause, until_done};
use crate::dead_letter::DeadLetter;
use crate::metrics::{metrics, Event, CHARGE_QUEUE};
use sequencer::{LogConsumer, LogEntry, LogPosition};
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;
use storage::{Checkpoint, NewOrder, OrderStatus};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// How often the lag is sampled.
const LAG_SAMPLE_INTERVAL: Duration = Duration::from_secs(1);

/// The lag gauge's sampling: the partitions of the last sample and when the next is due.
pub(crate) struct LagSampler {
    reported: BTreeSet<u32>,
    next: Instant,
}

impl LagSampler {
    pub(crate) fn new() -> Self {
        LagSampler {
            reported: BTreeSet::new(),
            next: Instant::now(),
        }
    }

    /// Samples `consumer`'s lag if a sample is due.
    fn maybe_sample(&mut self, consumer: &dyn LogConsumer) {
        let now = Instant::now();
        if now >= self.next {
            metrics().set_lag(&mut self.reported, &consumer.lag());
            self.next = now + LAG_SAMPLE_INTERVAL;
        }
    }
}

/// The log-reading stage.
pub(crate) struct Intake {
    pub(crate) core: Arc<Core>,
    pub(crate) consumer: Box<dyn LogConsumer>,
    pub(crate) dead_letter: Arc<dyn DeadLetter>,
    pub(crate) jobs: mpsc::Sender<Job>,
    pub(crate) consumer_name: String,
    pub(crate) batch_size: usize,
    pub(crate) poll_wait: Duration,
    pub(crate) lag: LagSampler,
}

impl Intake {
    pub(crate) async fn run(mut self, shutdown: &CancellationToken) {
        let mut failures = 0u32;
        metrics().set_queue_depth(CHARGE_QUEUE, 0);
        loop {
            self.lag.maybe_sample(&*self.consumer);
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
                    tracing::warn!(error = %storage::ErrorChain(&e), retry_in = ?delay, "log poll failed");
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
            // Hand the orders over, waiting for room in the charge queue: a full queue holds
            // the intake back (the orders wait in the log, where the lag shows them) rather
            // than leaving them to the sweep, whose per-order reads and interval would cap
            // the settler's rate. While the circuit is open nothing is handed over, so
            // persisting runs at full speed through a provider outage and the sweep takes
            // the orders up once it closes. The whole batch is claimed first, so the sweep
            // cannot pick up an order persisted but not yet queued.
            if !self.core.breaker.is_closed() {
                SettlerStats::add(&self.core.counters().deferred, orders.len() as u64);
                metrics().event(Event::Deferred, orders.len() as u64);
                continue;
            }
            let claimed: Vec<Job> = orders
                .into_iter()
                .filter_map(|order| {
                    // `None`: the sweep has it.
                    claim(&self.core, order.order_id).map(|claim| Job {
                        claim,
                        work: Work::Fresh(order),
                    })
                })
                .collect();
            for job in claimed {
                let send = self.jobs.send(job);
                tokio::pin!(send);
                loop {
                    tokio::select! {
                        biased;
                        // The jobs not queued are dropped with their claims; the orders are
                        // persisted and the next start's sweep takes them up.
                        _ = shutdown.cancelled() => return,
                        sent = &mut send => if sent.is_err() { return } else { break },
                        // A full queue can hold the intake for long: keep the lag current.
                        _ = tokio::time::sleep_until(self.lag.next) => {
                            self.lag.maybe_sample(&*self.consumer);
                        }
                    }
                }
                metrics().set_queue_depth(
                    CHARGE_QUEUE,
                    self.jobs.max_capacity() - self.jobs.capacity(),
                );
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
                    metrics().dead_letters.inc();
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
            let inserted = until_done(shutdown, "persist", || async move {
                let persisted = store.persist_batch(batch_ref, Some(cp)).await;
                persisted.map_err(|e| storage::ErrorChain(&e).to_string())
            })
            .await?;
            SettlerStats::add(&self.core.counters().persisted, inserted as u64);
            metrics().event(Event::Persisted, inserted as u64);
            metrics().transition(
                OrderStatus::Accepted,
                OrderStatus::Persisted,
                inserted as u64,
            );
            if inserted > 0 {
                self.core.changed();
            }
            orders.extend(batch);
        }
        let positions: Vec<LogPosition> = entries.iter().map(|e| e.position).collect();
        if let Err(e) = self.consumer.commit(&positions).await {
            // The store holds the checkpoint and persisting is idempotent: a redelivery
            // after this costs time, not correctness.
            tracing::warn!(error = %storage::ErrorChain(&e), "log commit failed");
        }
        Some(orders)
    }
}
