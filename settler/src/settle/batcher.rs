//! Group commit for calls made one order at a time: concurrent callers' requests are
//! gathered and sent as one batch (one store transaction, one admission round trip).
//!
//! One task owns the batch function. It waits for a first request, takes whatever else is
//! queued (up to `max`), runs the batch and answers every caller; requests that arrive
//! while a batch runs make up the next one. So an idle system pays no added latency and a
//! busy one pays each commit or round trip once per batch, not once per order.

use std::future::Future;
use tokio::sync::{mpsc, oneshot};

type Item<Req, Resp> = (Req, oneshot::Sender<Resp>);

/// A handle to a batching task; cloning it is cheap. The task ends when every handle is
/// dropped.
#[derive(Debug)]
pub(crate) struct Batcher<Req, Resp> {
    tx: mpsc::Sender<Item<Req, Resp>>,
}

impl<Req, Resp> Clone for Batcher<Req, Resp> {
    fn clone(&self) -> Self {
        Batcher {
            tx: self.tx.clone(),
        }
    }
}

impl<Req: Send + 'static, Resp: Send + 'static> Batcher<Req, Resp> {
    /// Starts the task on the current runtime. `run` gets a batch of at most `max`
    /// requests and must return one response per request, in order.
    pub(crate) fn spawn<F, Fut>(max: usize, run: F) -> Self
    where
        F: Fn(Vec<Req>) -> Fut + Send + 'static,
        Fut: Future<Output = Vec<Resp>> + Send,
    {
        let max = max.max(1);
        // Bounded: a caller waits for room rather than the queue growing without bound.
        let (tx, mut rx) = mpsc::channel::<Item<Req, Resp>>(max.saturating_mul(4));
        tokio::spawn(async move {
            let mut batch = Vec::with_capacity(max);
            while rx.recv_many(&mut batch, max).await > 0 {
                let (reqs, replies): (Vec<Req>, Vec<oneshot::Sender<Resp>>) =
                    batch.drain(..).unzip();
                let resps = run(reqs).await;
                debug_assert_eq!(resps.len(), replies.len());
                for (reply, resp) in replies.into_iter().zip(resps) {
                    // The caller may have gone (shutdown); its result is in the store.
                    let _ = reply.send(resp);
                }
            }
        });
        Batcher { tx }
    }

    /// Sends one request with the next batch and waits for its response; `None` if the
    /// batching task is gone.
    pub(crate) async fn call(&self, req: Req) -> Option<Resp> {
        let (reply, answer) = oneshot::channel();
        self.tx.send((req, reply)).await.ok()?;
        answer.await.ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    #[tokio::test]
    async fn concurrent_calls_share_batches_and_get_their_own_answers() {
        let batches = Arc::new(AtomicUsize::new(0));
        let counted = Arc::clone(&batches);
        let (gate_tx, gate_rx) = tokio::sync::watch::channel(false);
        let b: Batcher<u32, u32> = Batcher::spawn(64, move |reqs: Vec<u32>| {
            counted.fetch_add(1, Ordering::SeqCst);
            let mut gate = gate_rx.clone();
            async move {
                // The first batch waits until the others queued up behind it.
                let _ = gate.wait_for(|open| *open).await;
                reqs.into_iter().map(|r| r * 2).collect()
            }
        });
        let calls: Vec<_> = (0..100u32)
            .map(|i| {
                let b = b.clone();
                tokio::spawn(async move { (i, b.call(i).await) })
            })
            .collect();
        // Every call is queued or in the first batch before the gate opens.
        tokio::task::yield_now().await;
        gate_tx.send(true).expect("gate");
        for c in calls {
            let (i, answer) = c.await.expect("task");
            assert_eq!(answer, Some(i * 2));
        }
        let n = batches.load(Ordering::SeqCst);
        assert!((2..100).contains(&n), "100 calls in {n} batches");
    }
}
