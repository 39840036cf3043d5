//! Liveness of the settle loop: a stage that dies is seen (health, metrics), the loop is
//! restarted from the last committed position and settles everything exactly once; a
//! stage that keeps dying makes the settler give up with an error naming it.
//!
//! The stages die of real inputs: an event sink or a log consumer that panics.

mod common;

use async_trait::async_trait;
use common::{eventually, record, Harness, DEADLINE};
use mock_provider::MockConfig;
use sequencer::embedded::FileLog;
use sequencer::{LogConsumer, LogEntry, LogPosition};
use settler::{ConsumerSource, EventSink, RecordingEventSink, Settler, Stage};
use std::collections::HashSet;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;
use storage::{OrderEvent, OrderStatus, OrderStore};
use tokio_util::sync::CancellationToken;

/// Panics on its first `panics` calls, then records like [`RecordingEventSink`].
#[derive(Default)]
struct PanickingSink {
    panics: usize,
    calls: AtomicUsize,
    inner: RecordingEventSink,
}

#[async_trait]
impl EventSink for PanickingSink {
    async fn publish(&self, events: &[OrderEvent]) -> settler::Result<()> {
        if self.calls.fetch_add(1, Ordering::SeqCst) < self.panics {
            panic!("the event sink broke");
        }
        self.inner.publish(events).await
    }
}

/// Opens the file log's consumer at the store's checkpoint, as `serve` does; counts opens.
struct Reopen {
    log: FileLog,
    store: Arc<dyn OrderStore>,
    name: String,
    opened: AtomicUsize,
    /// The consumer of the first open panics on this poll (1-based), once.
    panic_on_poll: Option<usize>,
}

#[async_trait]
impl ConsumerSource for Reopen {
    async fn open(&self) -> Result<Box<dyn LogConsumer>, String> {
        let first = self.opened.fetch_add(1, Ordering::SeqCst) == 0;
        let from = self
            .store
            .checkpoint(&self.name, 0)
            .await
            .map_err(|e| e.to_string())?
            .unwrap_or(0);
        let inner = Box::new(self.log.consumer(from));
        Ok(match (first, self.panic_on_poll) {
            (true, Some(n)) => Box::new(PanickingConsumer {
                inner,
                polls: 0,
                panic_on: n,
            }),
            _ => inner,
        })
    }
}

/// Reads like the consumer it wraps, but panics on poll number `panic_on`, after the
/// records of the polls before it were persisted and committed.
struct PanickingConsumer {
    inner: Box<dyn LogConsumer>,
    polls: usize,
    panic_on: usize,
}

#[async_trait]
impl LogConsumer for PanickingConsumer {
    async fn poll(&mut self, max: usize, wait: Duration) -> sequencer::Result<Vec<LogEntry>> {
        let got = self.inner.poll(max, wait).await?;
        if !got.is_empty() {
            self.polls += 1;
            assert!(self.polls != self.panic_on, "the log consumer broke");
        }
        Ok(got)
    }

    async fn commit(&mut self, positions: &[LogPosition]) -> sequencer::Result<()> {
        self.inner.commit(positions).await
    }
}

async fn settler_with(
    h: &Harness,
    config: settler::SettlerConfig,
    sink: Arc<dyn EventSink>,
    source: Arc<Reopen>,
) -> Settler {
    let consumer = source.open().await.expect("consumer");
    Settler::new(
        Arc::clone(&h.store) as Arc<dyn OrderStore>,
        consumer,
        Arc::clone(&h.release) as Arc<dyn settler::StockRelease>,
        Arc::clone(&h.dead_letter) as Arc<dyn settler::DeadLetter>,
        config,
    )
    .expect("settler")
    .with_event_sink(sink)
    .with_consumer_source(source)
}

fn reopen(h: &Harness, name: &str, panic_on_poll: Option<usize>) -> Arc<Reopen> {
    Arc::new(Reopen {
        log: h.log.clone(),
        store: Arc::clone(&h.store) as Arc<dyn OrderStore>,
        name: name.to_owned(),
        opened: AtomicUsize::new(0),
        panic_on_poll,
    })
}

/// The value of one series of the settler's families (0 when absent).
fn sample(series: &str) -> f64 {
    let mut registry = prometheus_client::registry::Registry::default();
    settler::metrics::register(&mut registry);
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &registry).expect("encodes");
    text.lines()
        .find_map(|l| {
            l.strip_prefix(series)?
                .strip_prefix(' ')?
                .trim()
                .parse()
                .ok()
        })
        .unwrap_or(0.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_publisher_that_died_is_restarted_and_every_change_is_published() {
    let h = Harness::new(MockConfig::default()).await;
    let config = h.config();
    let records = h
        .append((0..40).map(|i| record(i, "tok_visa")).collect())
        .await;
    let sink = Arc::new(PanickingSink {
        panics: 1,
        ..PanickingSink::default()
    });
    let restarts = r#"flashsale_settler_stage_restarts_total{stage="publisher"}"#;
    let before = sample(restarts);
    let source = reopen(&h, &config.consumer, None);
    let settler = settler_with(&h, config, Arc::clone(&sink) as _, Arc::clone(&source)).await;
    let health = settler.health();
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(settler.run(shutdown.clone()));

    h.wait_settled(records.len()).await;
    // Every order's `paid` change reaches the sink: the publisher runs again.
    let ids: HashSet<_> = records.iter().map(|r| r.order_id).collect();
    eventually("every paid change published", DEADLINE, || async {
        let paid: HashSet<_> = sink
            .inner
            .events()
            .iter()
            .filter(|e| e.status == OrderStatus::Paid)
            .map(|e| e.order_id)
            .collect();
        paid == ids
    })
    .await;
    assert!(health.restarts() >= 1, "{health:?}");
    assert_eq!(health.down(), None, "up again: {health:?}");
    assert!(!health.failed());
    assert!(sample(restarts) >= before + 1.0, "the restart is counted");
    assert!(
        source.opened.load(Ordering::SeqCst) >= 2,
        "the restart opened the consumer again"
    );
    h.check_exactly_once(&records).await;
    shutdown.cancel();
    tokio::time::timeout(DEADLINE, task)
        .await
        .expect("stops")
        .expect("joins")
        .expect("Ok after the restart");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_intake_that_died_resumes_from_the_checkpoint_and_settles_exactly_once() {
    let h = Harness::new(MockConfig::default()).await;
    let config = settler::SettlerConfig {
        batch_size: 10,
        ..h.config()
    };
    let records = h
        .append((0..60).map(|i| record(i, "tok_visa")).collect())
        .await;
    // The second poll panics: its records were read but not persisted.
    let source = reopen(&h, &config.consumer, Some(2));
    let sink = Arc::new(RecordingEventSink::default());
    let settler = settler_with(&h, config, sink as _, Arc::clone(&source)).await;
    let health = settler.health();
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(settler.run(shutdown.clone()));
    h.wait_settled(records.len()).await;
    h.check_exactly_once(&records).await;
    assert_eq!(health.restarts(), 1, "{health:?}");
    assert_eq!(health.down(), None);
    shutdown.cancel();
    tokio::time::timeout(DEADLINE, task)
        .await
        .expect("stops")
        .expect("joins")
        .expect("Ok");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stage_that_keeps_dying_makes_the_settler_give_up_naming_it() {
    let h = Harness::new(MockConfig::default()).await;
    let config = h.config();
    h.append(vec![record(1, "tok_visa")]).await;
    let sink = Arc::new(PanickingSink {
        panics: usize::MAX,
        ..PanickingSink::default()
    });
    let source = reopen(&h, &config.consumer, None);
    let settler = settler_with(&h, config, sink as _, source).await;
    let health = settler.health();
    let shutdown = CancellationToken::new();
    let ended = tokio::time::timeout(DEADLINE, settler.run(shutdown.clone()))
        .await
        .expect("the settler gives up within the deadline");
    match ended {
        Err(settler::Error::StageFailed { stage, deaths, .. }) => {
            assert_eq!(stage, Stage::Publisher);
            assert_eq!(deaths, settler::settle::MAX_RESTARTS + 1);
        }
        other => panic!("expected StageFailed, got {other:?}"),
    }
    assert!(health.failed());
    assert_eq!(health.down(), Some(Stage::Publisher));
    assert_eq!(
        health.restarts(),
        u64::from(settler::settle::MAX_RESTARTS),
        "{health:?}"
    );
    assert_eq!(
        sample(r#"flashsale_settler_stage_up{stage="publisher"}"#),
        0.0,
        "the gauge shows the stage down"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_consumer_source_the_first_death_stops_the_settler() {
    let h = Harness::new(MockConfig::default()).await;
    h.append(vec![record(1, "tok_visa")]).await;
    let sink = Arc::new(PanickingSink {
        panics: usize::MAX,
        ..PanickingSink::default()
    });
    let settler = h.settler(h.config(), Some(sink as _)).await;
    let ended = tokio::time::timeout(DEADLINE, settler.run(CancellationToken::new()))
        .await
        .expect("the settler stops within the deadline");
    assert!(
        matches!(
            ended,
            Err(settler::Error::StageFailed {
                stage: Stage::Publisher,
                deaths: 1,
                ..
            })
        ),
        "{ended:?}"
    );
}
