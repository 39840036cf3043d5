//! Confirms idempotency answers off the request path, in batches.
//!
//! Once an accepted order's record is durable, its answer must be marked confirmed in the
//! admission backend so that retries get it replayed. The buyer does not wait for that: the
//! order path hands the confirmation to [`Confirmer::confirm`] and answers 202. A task
//! drains what is queued and sends it in one [`Admission::confirm_batch`] (one round trip
//! with Redis). Until a confirmation lands, a retry of the order is answered
//! `request_in_progress` by the backend, and by this instance with the order's 202 (see
//! `api/orders.rs`: it remembers the durable answers it gave).
//!
//! Bounded: the queue holds at most `capacity` confirmations; when it is full the caller
//! confirms inline (back-pressure, nothing dropped). A failed confirmation is retried with
//! exponential backoff a bounded number of times, then logged and left to reconcile.
//! [`Confirmer::shutdown`] sends what is queued before it returns; a confirmation handed
//! over after that is sent inline.

use crate::admission::Admission;
use crate::model::OrderRef;
use parking_lot::Mutex;
use std::sync::Arc;
use std::time::Duration;
use storage::SaleId;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// Settings of the confirmer.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ConfirmConfig {
    /// Most confirmations queued.
    pub capacity: usize,
    /// Most confirmations sent in one batch.
    pub batch_max: usize,
    /// Attempts of a failed confirmation (the first one included).
    pub attempts: u32,
    /// Wait before the second attempt; doubled before each further one.
    pub backoff: Duration,
}

type Item = (SaleId, OrderRef);

enum State {
    /// Not started: the task starts with the first confirmation (inside the runtime).
    Idle(mpsc::Receiver<Item>),
    Running(JoinHandle<()>),
    Stopped,
}

/// The background confirmer (see the module documentation).
pub(crate) struct Confirmer {
    admission: Arc<dyn Admission>,
    config: ConfirmConfig,
    tx: mpsc::Sender<Item>,
    state: Mutex<State>,
    closing: CancellationToken,
}

impl Confirmer {
    pub(crate) fn new(admission: Arc<dyn Admission>, config: ConfirmConfig) -> Self {
        let config = ConfirmConfig {
            capacity: config.capacity.max(1),
            batch_max: config.batch_max.max(1),
            attempts: config.attempts.max(1),
            ..config
        };
        let (tx, rx) = mpsc::channel(config.capacity);
        Confirmer {
            admission,
            config,
            tx,
            state: Mutex::new(State::Idle(rx)),
            closing: CancellationToken::new(),
        }
    }

    fn start(&self) {
        let mut state = self.state.lock();
        if matches!(*state, State::Idle(_)) {
            let State::Idle(rx) = std::mem::replace(&mut *state, State::Stopped) else {
                return;
            };
            *state = State::Running(tokio::spawn(run(
                Arc::clone(&self.admission),
                rx,
                self.closing.clone(),
                self.config,
            )));
        }
    }

    /// Hands the confirmation of a durable order over; returns once it is queued, or, when
    /// the queue is full or shut down, once it was sent inline.
    pub(crate) async fn confirm(&self, sale: SaleId, order: OrderRef) {
        self.start();
        let item = match self.tx.try_send((sale, order)) {
            Ok(()) => return,
            Err(
                mpsc::error::TrySendError::Full(item) | mpsc::error::TrySendError::Closed(item),
            ) => item,
        };
        let (sale, order) = item;
        if let Err(e) = self.admission.confirm(&sale, &order).await {
            tracing::warn!(error = %storage::ErrorChain(&e), order = %order.order_id, "inline confirm failed; retries answer in-progress until reconcile");
        }
    }

    /// Stops taking confirmations into the queue and returns once every queued one was
    /// sent (or given up after its retries).
    pub(crate) async fn shutdown(&self) {
        self.closing.cancel();
        let state = std::mem::replace(&mut *self.state.lock(), State::Stopped);
        if let State::Running(task) = state {
            if let Err(e) = task.await {
                tracing::error!(error = %e, "the confirmer task failed");
            }
        }
    }
}

async fn run(
    admission: Arc<dyn Admission>,
    mut rx: mpsc::Receiver<Item>,
    closing: CancellationToken,
    config: ConfirmConfig,
) {
    let mut batch = Vec::with_capacity(config.batch_max);
    loop {
        let first = if closing.is_cancelled() {
            // Refuse new items (senders confirm inline), drain what is queued.
            rx.close();
            rx.recv().await
        } else {
            tokio::select! {
                item = rx.recv() => item,
                () = closing.cancelled() => continue,
            }
        };
        let Some(first) = first else { break };
        batch.push(first);
        while batch.len() < config.batch_max {
            match rx.try_recv() {
                Ok(item) => batch.push(item),
                Err(_) => break,
            }
        }
        send(admission.as_ref(), std::mem::take(&mut batch), config).await;
    }
}

/// Sends one batch, retrying the failed confirmations with backoff.
async fn send(admission: &dyn Admission, mut batch: Vec<Item>, config: ConfirmConfig) {
    let mut wait = config.backoff;
    for attempt in 1..=config.attempts {
        let results = admission.confirm_batch(&batch).await;
        let mut error = None;
        let mut results = results.into_iter();
        batch.retain(|_| match results.next() {
            Some(Ok(())) => false,
            Some(Err(e)) => {
                error = Some(storage::ErrorChain(&e).to_string());
                true
            }
            None => {
                error = Some("no result".to_owned());
                true
            }
        });
        let Some(error) = error else { return };
        if attempt == config.attempts {
            for (_, order) in &batch {
                tracing::error!(%error, order = %order.order_id, "confirm given up; retries answer in-progress until reconcile");
            }
            return;
        }
        tracing::warn!(%error, failed = batch.len(), attempt, "confirm batch failed; retrying");
        tokio::time::sleep(wait).await;
        wait = wait.saturating_mul(2);
    }
}
