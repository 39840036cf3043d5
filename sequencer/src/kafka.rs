//! The Kafka order log: an idempotent rdkafka producer (`acks=all`, lz4) and a consumer-group
//! reader, for any Kafka-protocol broker (Apache Kafka, Redpanda, tansu).
//!
//! Records are keyed by order id and placed by Kafka's default partitioner (murmur2, see
//! [`crate::partition`]), carry a `content-type` header, and are acknowledged only once the
//! broker's delivery report says they are written. The consumer never commits an offset on
//! its own: the settler commits after the store has committed the batch.
//!
//! The consumer also works around brokers that serve a fetch only from whole batches: tansu
//! 0.6.0 answers a fetch at an offset inside a record batch with the batches *after* it,
//! silently skipping the rest of that batch (and, for the last batch of a partition,
//! answering nothing until more records arrive). A committed offset is usually inside a
//! batch, so a consumer resuming from it (a restart, a rebalance) lost records. Here the
//! consumer resumes [`MAX_BATCH_RECORDS`] before its committed offset (the producer caps its
//! batches at that many records, so the batch holding the committed offset is served whole),
//! drops what it had already returned, and reads again from further back whenever a
//! partition's offsets jump.
//!
//! Metrics ([`crate::metrics`]): every order append's latency and failure (`log="kafka"`);
//! from librdkafka's statistics (`statistics.interval.ms` = 1000) the producers' queue
//! (`msg_cnt`) and request retries (`txretries`), and for the consumer the end offset
//! (`hi_offset`) and committed offset of each assigned partition, which
//! [`LogConsumer::lag`] reports.

use crate::metrics::{metrics, KAFKA};
use crate::{
    Error, LogConsumer, LogEntry, LogPosition, OrderLog, OrderRecord, PartitionLag, Result,
    CONTENT_TYPE,
};
use async_trait::async_trait;
use bytes::Bytes;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{
    BaseConsumer, CommitMode, Consumer, ConsumerContext, RebalanceProtocol, StreamConsumer,
};
use rdkafka::error::{KafkaError, KafkaResult, RDKafkaErrorCode};
use rdkafka::message::{BorrowedMessage, Header, Message, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer, PurgeConfig};
use rdkafka::types::RDKafkaRespErr;
use rdkafka::{ClientConfig, ClientContext, Offset, TopicPartitionList};
use serde::Deserialize;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use storage::BoxError;

/// The rdkafka crate this log is built on (for benchmarks of producer variants).
pub use rdkafka;

/// Most records the producer puts in one batch (`batch.num.messages`). The consumer resumes
/// this many records before a committed offset so that the batch holding it is read whole.
pub const MAX_BATCH_RECORDS: i64 = 1_000;

/// How often librdkafka reports its statistics (`statistics.interval.ms`).
const STATISTICS_INTERVAL_MS: &str = "1000";

/// Settings of the Kafka log.
#[derive(Debug, Clone)]
pub struct KafkaConfig {
    /// Bootstrap servers, `host:port[,host:port]`.
    pub bootstrap: String,
    /// Prefix of every topic name (e.g. `staging.`).
    pub topic_prefix: String,
    /// Partitions of each topic when `migrate` creates them.
    pub partitions: i32,
    /// Replication factor when `migrate` creates them.
    pub replication: i32,
    /// `linger.ms`: how long the producer waits to fill a batch.
    pub linger: Duration,
    /// `batch.size` in bytes.
    pub batch_size: usize,
    /// Longest wait for a delivery report; past it the append fails.
    pub delivery_timeout: Duration,
    /// `fetch.wait.max.ms` of the consumer: the longest a fetch waits for records. Some
    /// brokers (tansu 0.6.0) hold every fetch this long even when records arrive, so it
    /// bounds the time from append to consumption.
    pub fetch_wait: Duration,
}

impl Default for KafkaConfig {
    fn default() -> Self {
        KafkaConfig {
            bootstrap: "127.0.0.1:9092".into(),
            topic_prefix: String::new(),
            partitions: 12,
            replication: 1,
            linger: Duration::from_millis(1),
            batch_size: 256 * 1024,
            delivery_timeout: Duration::from_secs(5),
            fetch_wait: Duration::from_millis(20),
        }
    }
}

impl KafkaConfig {
    /// Accepted orders.
    pub fn orders_topic(&self) -> String {
        format!("{}flashsale.orders.v1", self.topic_prefix)
    }

    /// Order status changes, for downstream consumers.
    pub fn events_topic(&self) -> String {
        format!("{}flashsale.order-events.v1", self.topic_prefix)
    }

    /// Records the settler cannot decode or settle.
    pub fn dlq_topic(&self) -> String {
        format!("{}flashsale.orders.dlq.v1", self.topic_prefix)
    }

    /// Every topic of the pipeline.
    pub fn topics(&self) -> [String; 3] {
        [self.orders_topic(), self.events_topic(), self.dlq_topic()]
    }
}

/// The Kafka client (or the blocking task around it) failed with `e`.
fn unavailable(e: impl Into<BoxError>) -> Error {
    Error::unavailable("kafka", e)
}

/// Creates the pipeline's topics (existing ones are left alone); returns those created.
pub async fn create_topics(config: &KafkaConfig) -> Result<Vec<String>> {
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", &config.bootstrap)
        .create()
        .map_err(unavailable)?;
    let names = config.topics();
    let topics: Vec<NewTopic<'_>> = names
        .iter()
        .map(|n| {
            NewTopic::new(
                n,
                config.partitions,
                TopicReplication::Fixed(config.replication),
            )
        })
        .collect();
    let results = admin
        .create_topics(
            &topics,
            &AdminOptions::new().operation_timeout(Some(Duration::from_secs(10))),
        )
        .await
        .map_err(unavailable)?;
    let mut created = Vec::new();
    for r in results {
        match r {
            Ok(name) => created.push(name),
            Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((name, code)) => {
                return Err(Error::unavailable(format!("creating topic {name}"), code))
            }
        }
    }
    Ok(created)
}

/// The parts of librdkafka's statistics JSON read here (the rest is skipped).
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct RawStats {
    msg_cnt: u64,
    brokers: HashMap<String, RawBroker>,
    topics: HashMap<String, RawTopic>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct RawBroker {
    txretries: u64,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct RawTopic {
    partitions: HashMap<String, RawPartition>,
}

/// One partition as librdkafka last saw it; negative offsets are unknown.
#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(default)]
struct RawPartition {
    partition: i32,
    lo_offset: i64,
    hi_offset: i64,
    committed_offset: i64,
}

impl Default for RawPartition {
    fn default() -> Self {
        // librdkafka's "invalid offset".
        RawPartition {
            partition: -1,
            lo_offset: -1001,
            hi_offset: -1001,
            committed_offset: -1001,
        }
    }
}

fn decode_stats(json: &[u8]) -> Option<RawStats> {
    match serde_json::from_slice(json) {
        Ok(stats) => Some(stats),
        Err(e) => {
            tracing::debug!(error = %e, "librdkafka statistics did not decode");
            None
        }
    }
}

/// What a producer learnt about its broker connections (shared by its context and the
/// [`KafkaLog`] using it).
#[derive(Debug)]
struct Connection {
    /// A record of this producer was delivered: the broker holds its producer id.
    delivered: AtomicBool,
    /// A broker connection failed after a record was delivered (a broker crash or restart,
    /// a partition): the broker may have lost this producer's idempotence state.
    stale: AtomicBool,
    /// Wakes the [`KafkaLog`]'s watcher when the producer goes stale.
    wake: std::sync::mpsc::SyncSender<()>,
}

impl Connection {
    fn new(wake: std::sync::mpsc::SyncSender<()>) -> Self {
        Connection {
            delivered: AtomicBool::new(false),
            stale: AtomicBool::new(false),
            wake,
        }
    }

    /// Whether the producer must be replaced before it sends again. tansu 0.6.0 on SQLite
    /// panics when a producer goes on under its old producer id after a broker restart
    /// (and then refuses every produce, from any producer), so a producer that lost a
    /// broker connection after it had delivered is not used again.
    fn stale(&self) -> bool {
        self.stale.load(Ordering::Acquire)
    }

    /// librdkafka reported `error`: a lost broker connection makes a producer that had
    /// delivered stale (one that never delivered has no producer id to lose).
    fn failed(&self, error: &KafkaError) {
        let lost = matches!(
            error.rdkafka_error_code(),
            Some(RDKafkaErrorCode::BrokerTransportFailure | RDKafkaErrorCode::AllBrokersDown)
        );
        if lost && self.delivered.load(Ordering::Acquire) {
            self.stale.store(true, Ordering::Release);
            // Full: a wake-up is pending already.
            let _ = self.wake.try_send(());
        }
    }
}

/// A producer's context: turns its statistics into the queue gauge and the retry counter,
/// and notes a lost broker connection. Each producer adds what changed since its last
/// report, so the gauge is the sum over the process's producers and the counter never
/// goes back when a producer is replaced.
#[derive(Debug)]
struct ProducerStats {
    /// `(msg_cnt, txretries)` of the last report.
    last: parking_lot::Mutex<(i64, u64)>,
    connection: Arc<Connection>,
}

impl ProducerStats {
    fn new(connection: Arc<Connection>) -> Self {
        ProducerStats {
            last: parking_lot::Mutex::default(),
            connection,
        }
    }
}

impl ClientContext for ProducerStats {
    fn error(&self, error: KafkaError, reason: &str) {
        self.connection.failed(&error);
        tracing::warn!(%error, reason, "Kafka producer");
    }

    fn stats_raw(&self, json: &[u8]) {
        let Some(stats) = decode_stats(json) else {
            return;
        };
        let queued = i64::try_from(stats.msg_cnt).unwrap_or(i64::MAX);
        let retries: u64 = stats.brokers.values().map(|b| b.txretries).sum();
        let m = metrics();
        let mut last = self.last.lock();
        m.kafka_queue_messages.inc_by(queued - last.0);
        m.kafka_retries.inc_by(retries.saturating_sub(last.1));
        *last = (queued, retries.max(last.1));
    }
}

impl Drop for ProducerStats {
    fn drop(&mut self) {
        metrics().kafka_queue_messages.dec_by(self.last.get_mut().0);
    }
}

/// The producer side: [`OrderLog`] on Kafka.
///
/// tansu 0.6.0 on SQLite panics when a producer goes on under its old producer id after a
/// broker restart (and then refuses every produce, from any producer), so a producer that
/// lost a broker connection after it had delivered is never used again, and what it still
/// holds is purged before it can reconnect: a watcher thread replaces it as soon as the
/// connection fails (not at the next send, which may come after the broker is back and
/// librdkafka has re-sent the queue under the old id), and a record is only ever queued on
/// the producer in use under the read lock that the replacement takes for writing, so no
/// record reaches a replaced producer after its purge.
pub struct KafkaLog {
    producers: Arc<Producers>,
    topic: String,
}

/// The producer in use and how to replace it (shared with the watcher thread).
struct Producers {
    current: parking_lot::RwLock<Current>,
    recreated: parking_lot::Mutex<std::time::Instant>,
    config: KafkaConfig,
    wake: std::sync::mpsc::SyncSender<()>,
}

/// The producer in use and what its context learnt.
#[derive(Clone)]
struct Current {
    producer: FutureProducer<ProducerStats>,
    connection: Arc<Connection>,
}

fn producer(config: &KafkaConfig, wake: std::sync::mpsc::SyncSender<()>) -> Result<Current> {
    let connection = Arc::new(Connection::new(wake));
    let context = ProducerStats::new(Arc::clone(&connection));
    let producer = ClientConfig::new()
        .set("bootstrap.servers", &config.bootstrap)
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("compression.type", "lz4")
        // librdkafka's own default is CRC32; murmur2 is what the Java client uses.
        .set("partitioner", "murmur2_random")
        .set("linger.ms", config.linger.as_millis().to_string())
        .set("batch.size", config.batch_size.to_string())
        .set("batch.num.messages", MAX_BATCH_RECORDS.to_string())
        .set(
            "message.timeout.ms",
            config.delivery_timeout.as_millis().max(1).to_string(),
        )
        .set("statistics.interval.ms", STATISTICS_INTERVAL_MS)
        .create_with_context(context)
        .map_err(unavailable)?;
    Ok(Current {
        producer,
        connection,
    })
}

/// Replaces the producer as soon as its connection goes stale (woken by its context; every
/// second it also checks), until the [`KafkaLog`] is dropped.
fn watch(producers: &std::sync::Weak<Producers>, woken: &std::sync::mpsc::Receiver<()>) {
    loop {
        if let Err(std::sync::mpsc::RecvTimeoutError::Disconnected) =
            woken.recv_timeout(Duration::from_secs(1))
        {
            return;
        }
        let Some(producers) = producers.upgrade() else {
            return;
        };
        let current = producers.current.read().clone();
        if current.connection.stale() {
            producers.recreate(
                &current,
                "a broker connection failed after records were delivered",
                false,
            );
        }
    }
}

impl Producers {
    /// Replaces the producer `stale` (if it is still the one in use) by a new one, with a
    /// new producer id, and purges what the old one still holds, so that nothing is sent
    /// again under the old id: its queued records fail as never sent, those in flight as
    /// indeterminate. `rate_limited`: at most once per delivery timeout.
    fn recreate(&self, stale: &Current, why: &str, rate_limited: bool) {
        let mut last = self.recreated.lock();
        if !Arc::ptr_eq(&self.current.read().connection, &stale.connection)
            || (rate_limited && last.elapsed() < self.config.delivery_timeout)
        {
            return;
        }
        match producer(&self.config, self.wake.clone()) {
            Ok(p) => {
                tracing::warn!(why, "recreating the Kafka producer");
                // Taken for writing: no send is queueing on the old producer meanwhile, and
                // none queues on it after (see `KafkaLog::send`).
                let old = std::mem::replace(&mut *self.current.write(), p);
                *last = std::time::Instant::now();
                drop(last);
                old.producer
                    .purge(PurgeConfig::default().queue().inflight());
                metrics().kafka_producer_recreated.inc();
            }
            Err(e) => tracing::error!(error = %e, "recreating the Kafka producer failed"),
        }
    }
}

impl std::fmt::Debug for KafkaLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KafkaLog")
            .field("topic", &self.topic)
            .finish_non_exhaustive()
    }
}

impl KafkaLog {
    /// An idempotent producer of accepted orders.
    pub fn new(config: &KafkaConfig) -> Result<Self> {
        let (wake, woken) = std::sync::mpsc::sync_channel(1);
        let producers = Arc::new(Producers {
            current: parking_lot::RwLock::new(producer(config, wake.clone())?),
            recreated: parking_lot::Mutex::new(std::time::Instant::now()),
            config: config.clone(),
            wake,
        });
        let watched = Arc::downgrade(&producers);
        std::thread::Builder::new()
            .name("kafka-producer-watch".into())
            .spawn(move || watch(&watched, &woken))
            .map_err(unavailable)?;
        Ok(KafkaLog {
            producers,
            topic: config.orders_topic(),
        })
    }

    fn current(&self) -> Current {
        self.producers.current.read().clone()
    }

    /// Fails with the names of the pipeline's topics the broker does not have (a missing
    /// topic is a clear error at start-up, not a hang).
    pub async fn check_topics(&self) -> Result<()> {
        let producer = self.current().producer;
        let wanted = self.producers.config.topics();
        tokio::task::spawn_blocking(move || {
            let metadata = producer
                .client()
                .fetch_metadata(None, Duration::from_secs(5))
                .map_err(unavailable)?;
            let have: Vec<&str> = metadata.topics().iter().map(|t| t.name()).collect();
            let missing: Vec<&String> = wanted
                .iter()
                .filter(|t| !have.contains(&t.as_str()))
                .collect();
            if missing.is_empty() {
                Ok(())
            } else {
                Err(Error::unavailable_msg(format!(
                    "the broker lacks topics {missing:?}: run `flashsale migrate`"
                )))
            }
        })
        .await
        .map_err(unavailable)?
    }

    /// The end offset (high watermark: the offset the next record gets) of every partition
    /// of `topic`, by partition.
    pub async fn end_offsets(&self, topic: &str) -> Result<Vec<(u32, u64)>> {
        let producer = self.current().producer;
        let topic = topic.to_owned();
        tokio::task::spawn_blocking(move || {
            let timeout = Duration::from_secs(5);
            let metadata = producer
                .client()
                .fetch_metadata(Some(&topic), timeout)
                .map_err(unavailable)?;
            let partitions: Vec<i32> = metadata
                .topics()
                .iter()
                .filter(|t| t.name() == topic)
                .flat_map(|t| t.partitions().iter().map(|p| p.id()))
                .collect();
            let mut out = Vec::with_capacity(partitions.len());
            for p in partitions {
                let (_, high) = producer
                    .client()
                    .fetch_watermarks(&topic, p, timeout)
                    .map_err(unavailable)?;
                out.push((p as u32, high.max(0) as u64));
            }
            out.sort_unstable();
            Ok(out)
        })
        .await
        .map_err(unavailable)?
    }

    /// Sends `payload` under `key` to `topic` and waits for its delivery report.
    pub async fn send(&self, topic: &str, key: &str, payload: &[u8]) -> Result<LogPosition> {
        let headers = OwnedHeaders::new().insert(Header {
            key: "content-type",
            value: Some(CONTENT_TYPE),
        });
        let record = FutureRecord::to(topic)
            .key(key)
            .payload(payload)
            .headers(headers);
        let current = self.current();
        if current.connection.stale() {
            self.producers.recreate(
                &current,
                "a broker connection failed after records were delivered",
                false,
            );
        }
        let (current, sent) = self.queue_and_wait(record).await;
        match &sent {
            Ok(_) => current.connection.delivered.store(true, Ordering::Release),
            Err(e) => {
                let fatal = current.producer.client().fatal_error().is_some();
                let refused = !matches!(
                    e,
                    KafkaError::MessageProduction(
                        RDKafkaErrorCode::MessageTimedOut
                            | RDKafkaErrorCode::QueueFull
                            | RDKafkaErrorCode::PurgeQueue
                            | RDKafkaErrorCode::PurgeInflight
                    )
                );
                if fatal || refused {
                    self.producers.recreate(&current, &e.to_string(), true);
                }
            }
        }
        match sent {
            Ok(d) => Ok(LogPosition {
                partition: d.partition as u32,
                offset: d.offset as u64,
            }),
            // Refused before it could have been written: safe to undo the admission.
            Err(
                e @ KafkaError::MessageProduction(
                    RDKafkaErrorCode::QueueFull
                    | RDKafkaErrorCode::PurgeQueue
                    | RDKafkaErrorCode::MessageSizeTooLarge
                    | RDKafkaErrorCode::UnknownTopic
                    | RDKafkaErrorCode::UnknownTopicOrPartition
                    | RDKafkaErrorCode::UnknownPartition
                    | RDKafkaErrorCode::InvalidMessage,
                ),
            ) => Err(Error::unavailable("the broker did not take the record", e)),
            // Anything else (a delivery timeout above all) may have been written.
            Err(e) => Err(Error::Indeterminate {
                context: "the delivery failed".into(),
                source: Box::new(e),
            }),
        }
    }

    /// Queues `record` on the producer in use, under the read lock a replacement takes for
    /// writing (so it is on the producer that is current, or purged with the one replaced),
    /// and waits for its delivery report. A full queue is retried every 100 ms for up to the
    /// delivery timeout. Returns the producer it was queued on.
    async fn queue_and_wait(
        &self,
        mut record: FutureRecord<'_, str, [u8]>,
    ) -> (
        Current,
        std::result::Result<rdkafka::producer::future_producer::Delivery, KafkaError>,
    ) {
        let start = Instant::now();
        loop {
            let (current, queued) = {
                let current = self.producers.current.read();
                (current.clone(), current.producer.send_result(record))
            };
            match queued {
                Ok(delivery) => {
                    let sent = match delivery.await {
                        Ok(Ok(d)) => Ok(d),
                        Ok(Err((e, _))) => Err(e),
                        // The producer dropped the report: as good as purged in flight.
                        Err(_) => Err(KafkaError::MessageProduction(
                            RDKafkaErrorCode::PurgeInflight,
                        )),
                    };
                    return (current, sent);
                }
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), r))
                    if start.elapsed() < self.producers.config.delivery_timeout =>
                {
                    record = r;
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err((e, _)) => return (current, Err(e)),
            }
        }
    }

    /// Waits until every record handed to the producer is delivered or failed; fails
    /// naming how many records it still holds when `timeout` passes first.
    pub fn flush(&self, timeout: Duration) -> Result<()> {
        let producer = self.current().producer;
        producer.flush(timeout).map_err(|e| {
            Error::unavailable(
                format!("{} record(s) left undelivered", producer.in_flight_count()),
                e,
            )
        })
    }
}

#[async_trait]
impl OrderLog for KafkaLog {
    async fn append(&self, record: &OrderRecord) -> Result<LogPosition> {
        let start = Instant::now();
        let appended = match crate::encode(record) {
            Ok(payload) => self.send(&self.topic, &record.key(), &payload).await,
            Err(e) => Err(e.into()),
        };
        metrics().append(KAFKA, start.elapsed(), appended.is_ok());
        appended
    }

    async fn ping(&self) -> Result<()> {
        self.check_topics().await
    }
}

/// Where the consumer stands on one partition.
#[derive(Debug, Default, Clone, Copy)]
struct Cursor {
    /// The offset of the next record to return (everything below was returned, or was
    /// committed before this consumer got the partition); `None` until known.
    next: Option<i64>,
    /// How far before `next` the current re-read started (0: not re-reading).
    back: i64,
    /// Whether the re-read has served a record below `next` (the broker read from at or
    /// before `next`, so a jump after it is a real gap, not a skipped batch).
    saw_below: bool,
}

type Cursors = Arc<parking_lot::Mutex<HashMap<(String, i32), Cursor>>>;

/// A topic's partition.
type TopicPartition = (String, i32);

/// What [`LogConsumer::lag`] reads: the partitions assigned, librdkafka's last statistics
/// of each, and what this consumer committed (shared by the consumer and its context).
#[derive(Debug, Default)]
struct LagState {
    assigned: parking_lot::Mutex<BTreeSet<TopicPartition>>,
    partitions: parking_lot::Mutex<HashMap<TopicPartition, RawPartition>>,
    committed: parking_lot::Mutex<HashMap<TopicPartition, i64>>,
}

impl LagState {
    fn assign(&self, tpl: &TopicPartitionList, incremental: bool) {
        let mut assigned = self.assigned.lock();
        if !incremental {
            assigned.clear();
        }
        assigned.extend(
            tpl.elements()
                .iter()
                .map(|e| (e.topic().to_owned(), e.partition())),
        );
    }

    fn revoke(&self, tpl: Option<&TopicPartitionList>) {
        let mut assigned = self.assigned.lock();
        match tpl {
            Some(tpl) => {
                for e in tpl.elements() {
                    assigned.remove(&(e.topic().to_owned(), e.partition()));
                }
            }
            None => assigned.clear(),
        }
    }

    fn statistics(&self, json: &[u8]) {
        let Some(stats) = decode_stats(json) else {
            return;
        };
        let mut partitions = self.partitions.lock();
        partitions.clear();
        for (topic, t) in stats.topics {
            for p in t.partitions.into_values().filter(|p| p.partition >= 0) {
                partitions.insert((topic.clone(), p.partition), p);
            }
        }
    }

    fn lag(&self) -> Vec<PartitionLag> {
        let assigned = self.assigned.lock().clone();
        let partitions = self.partitions.lock();
        let committed = self.committed.lock();
        let mut out = Vec::with_capacity(assigned.len());
        for key in &assigned {
            let Some(p) = partitions.get(key) else {
                continue;
            };
            if p.hi_offset < 0 {
                continue;
            }
            let done = committed
                .get(key)
                .copied()
                .unwrap_or(-1)
                .max(p.committed_offset);
            // Nothing committed yet: a new group reads from the earliest record.
            let done = if done >= 0 { done } else { p.lo_offset.max(0) };
            out.push(PartitionLag {
                partition: key.1 as u32,
                end_offset: p.hi_offset as u64,
                committed: done as u64,
            });
        }
        out.sort_by_key(|l| l.partition);
        out
    }
}

/// What to do with a record a poll received.
#[derive(Debug, PartialEq, Eq)]
enum Admit {
    /// Return it.
    Take,
    /// Already returned (a re-read): drop it.
    Drop,
    /// Records before it were skipped: drop it and read again from this offset.
    ReadFrom(i64),
}

impl Cursor {
    fn admit(&mut self, offset: i64) -> Admit {
        let Some(next) = self.next else {
            self.next = Some(offset + 1);
            return Admit::Take;
        };
        if offset < next {
            if self.back > 0 {
                self.saw_below = true;
            }
            return Admit::Drop;
        }
        // The broker served from at or before `next` and still jumped (or even offset 0
        // was tried): offsets are really missing (compaction, transaction markers).
        let genuine = offset == next || (self.back > 0 && (self.saw_below || self.back >= next));
        if genuine {
            *self = Cursor {
                next: Some(offset + 1),
                back: 0,
                saw_below: false,
            };
            return Admit::Take;
        }
        self.back = if self.back == 0 {
            MAX_BATCH_RECORDS
        } else {
            self.back.saturating_mul(2)
        };
        self.saw_below = false;
        Admit::ReadFrom((next - self.back).max(0))
    }
}

/// Starts every assigned partition [`MAX_BATCH_RECORDS`] before the offset to resume from
/// (the committed one, or what this consumer already returned), so that a broker serving
/// whole batches only still serves the batch holding it.
struct ResumeContext {
    cursors: Cursors,
    lag: Arc<LagState>,
}

impl ClientContext for ResumeContext {
    fn stats_raw(&self, json: &[u8]) {
        self.lag.statistics(json);
    }
}

impl ResumeContext {
    fn resume_points(&self, consumer: &BaseConsumer<Self>, tpl: &mut TopicPartitionList) {
        let committed = match consumer.committed_offsets(tpl.clone(), Duration::from_secs(10)) {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(error = %e, "reading the committed offsets at assignment failed");
                return;
            }
        };
        let mut cursors = self.cursors.lock();
        for e in committed.elements() {
            let key = (e.topic().to_owned(), e.partition());
            let cursor = cursors.entry(key).or_default();
            let committed = match e.offset() {
                Offset::Offset(o) if o >= 0 => Some(o),
                _ => None,
            };
            cursor.next = cursor.next.max(committed);
            cursor.back = 0;
            cursor.saw_below = false;
            if let Some(next) = cursor.next {
                let from = (next - (MAX_BATCH_RECORDS - 1)).max(0);
                if let Err(err) =
                    tpl.set_partition_offset(e.topic(), e.partition(), Offset::Offset(from))
                {
                    tracing::warn!(error = %err, "setting a start offset failed");
                }
            }
        }
    }
}

impl ConsumerContext for ResumeContext {
    /// Commits are asynchronous: their outcome arrives here. A failed one is counted and
    /// logged; its records are read again after a restart or rebalance (persisting them is
    /// idempotent), and the next commit covers them.
    fn commit_callback(&self, result: KafkaResult<()>, offsets: &TopicPartitionList) {
        let failed: Vec<String> = offsets
            .elements()
            .iter()
            .filter_map(|e| {
                e.error()
                    .err()
                    .map(|err| format!("{}/{}: {err}", e.topic(), e.partition()))
            })
            .collect();
        match result {
            // Nothing to commit is not a failure.
            Err(KafkaError::ConsumerCommit(RDKafkaErrorCode::NoOffset)) => {}
            Ok(()) if failed.is_empty() => metrics().kafka_commit(true),
            Ok(()) => {
                metrics().kafka_commit(false);
                tracing::warn!(partitions = ?failed, "committing consumer offsets failed for some partitions");
            }
            Err(e) => {
                metrics().kafka_commit(false);
                tracing::warn!(error = %e, partitions = ?failed, "committing consumer offsets failed");
            }
        }
    }

    fn rebalance(
        &self,
        consumer: &BaseConsumer<Self>,
        err: RDKafkaRespErr,
        tpl: &mut TopicPartitionList,
    ) {
        let cooperative = matches!(
            consumer.rebalance_protocol(),
            RebalanceProtocol::Cooperative
        );
        let done = match err {
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__ASSIGN_PARTITIONS => {
                self.resume_points(consumer, tpl);
                self.lag.assign(tpl, cooperative);
                if cooperative {
                    consumer.incremental_assign(tpl)
                } else {
                    consumer.assign(tpl)
                }
            }
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__REVOKE_PARTITIONS if cooperative => {
                self.lag.revoke(Some(tpl));
                consumer.incremental_unassign(tpl)
            }
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__REVOKE_PARTITIONS => {
                self.lag.revoke(None);
                consumer.unassign()
            }
            other => {
                tracing::error!(error = ?other, "consumer group rebalance failed");
                self.lag.revoke(None);
                consumer.unassign()
            }
        };
        if let Err(e) = done {
            tracing::error!(error = %e, "applying a consumer group rebalance failed");
        }
    }
}

/// The consumer side: [`LogConsumer`] on a Kafka consumer group.
pub struct KafkaConsumer {
    consumer: StreamConsumer<ResumeContext>,
    cursors: Cursors,
    lag: Arc<LagState>,
}

impl std::fmt::Debug for KafkaConsumer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KafkaConsumer").finish_non_exhaustive()
    }
}

impl KafkaConsumer {
    /// Joins `group` on the orders topic. Offsets are stored only by [`LogConsumer::commit`];
    /// a new group starts at the earliest record.
    pub fn new(config: &KafkaConfig, group: &str) -> Result<Self> {
        Self::for_topic(config, group, &config.orders_topic())
    }

    /// Joins `group` on `topic` (the dead-letter topic, for inspection and replay).
    pub fn for_topic(config: &KafkaConfig, group: &str, topic: &str) -> Result<Self> {
        let cursors = Cursors::default();
        let lag = Arc::new(LagState::default());
        let consumer: StreamConsumer<ResumeContext> = ClientConfig::new()
            .set("bootstrap.servers", &config.bootstrap)
            .set("group.id", group)
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            .set("auto.offset.reset", "earliest")
            .set("session.timeout.ms", "6000")
            .set("heartbeat.interval.ms", "500")
            .set(
                "fetch.wait.max.ms",
                config.fetch_wait.as_millis().clamp(1, 300_000).to_string(),
            )
            .set("max.poll.interval.ms", "60000")
            .set("statistics.interval.ms", STATISTICS_INTERVAL_MS)
            .create_with_context(ResumeContext {
                cursors: Arc::clone(&cursors),
                lag: Arc::clone(&lag),
            })
            .map_err(unavailable)?;
        consumer.subscribe(&[topic]).map_err(unavailable)?;
        metrics().kafka_commits_init();
        Ok(KafkaConsumer {
            consumer,
            cursors,
            lag,
        })
    }

    /// Whether `m` is returned; a jump in offsets makes the partition read again from
    /// further back (see the module documentation).
    fn admit(&self, m: &BorrowedMessage<'_>) -> bool {
        let key = (m.topic().to_owned(), m.partition());
        let admit = self
            .cursors
            .lock()
            .entry(key)
            .or_default()
            .admit(m.offset());
        match admit {
            Admit::Take => true,
            Admit::Drop => false,
            Admit::ReadFrom(from) => {
                tracing::warn!(
                    topic = m.topic(),
                    partition = m.partition(),
                    offset = m.offset(),
                    from,
                    "the broker skipped records; reading the partition again"
                );
                if let Err(e) = self.consumer.seek(
                    m.topic(),
                    m.partition(),
                    Offset::Offset(from),
                    Duration::ZERO,
                ) {
                    tracing::error!(error = %e, "seeking back failed");
                }
                false
            }
        }
    }
}

#[async_trait]
impl LogConsumer for KafkaConsumer {
    async fn poll(&mut self, max: usize, wait: Duration) -> Result<Vec<LogEntry>> {
        let mut out = Vec::new();
        let deadline = tokio::time::Instant::now() + wait;
        while out.len() < max {
            // Wait for the first record up to `wait`; then take what is already there.
            let left = if out.is_empty() {
                deadline.saturating_duration_since(tokio::time::Instant::now())
            } else {
                Duration::from_millis(1)
            };
            match tokio::time::timeout(left, self.consumer.recv()).await {
                Err(_) => break,
                Ok(Err(e)) => {
                    if out.is_empty() {
                        return Err(unavailable(e));
                    }
                    break;
                }
                Ok(Ok(m)) if !self.admit(&m) => {}
                Ok(Ok(m)) => out.push(LogEntry {
                    position: LogPosition {
                        partition: m.partition() as u32,
                        offset: m.offset() as u64,
                    },
                    payload: Bytes::copy_from_slice(m.payload().unwrap_or_default()),
                }),
            }
        }
        Ok(out)
    }

    async fn commit(&mut self, positions: &[LogPosition]) -> Result<()> {
        let topic = self
            .consumer
            .subscription()
            .map_err(unavailable)?
            .elements()
            .first()
            .map(|e| e.topic().to_owned())
            .ok_or_else(|| Error::unavailable_msg("the consumer has no subscription"))?;
        let mut next: BTreeMap<u32, u64> = BTreeMap::new();
        for p in positions {
            let e = next.entry(p.partition).or_default();
            *e = (*e).max(p.offset + 1);
        }
        let mut tpl = TopicPartitionList::new();
        for (&partition, &offset) in &next {
            tpl.add_partition_offset(&topic, partition as i32, Offset::Offset(offset as i64))
                .map_err(unavailable)?;
        }
        self.consumer
            .commit(&tpl, CommitMode::Async)
            .map_err(unavailable)?;
        let mut committed = self.lag.committed.lock();
        for (partition, offset) in next {
            let e = committed
                .entry((topic.clone(), partition as i32))
                .or_insert(-1);
            *e = (*e).max(offset as i64);
        }
        Ok(())
    }

    fn lag(&self) -> Vec<PartitionLag> {
        self.lag.lag()
    }
}

#[cfg(test)]
mod tests {
    use super::{
        Admit, Connection, Cursor, Cursors, LagState, ProducerStats, ResumeContext,
        MAX_BATCH_RECORDS,
    };
    use crate::PartitionLag;
    use rdkafka::consumer::ConsumerContext;
    use rdkafka::error::{KafkaError, RDKafkaErrorCode};
    use rdkafka::{ClientContext, Offset, TopicPartitionList};
    use std::sync::atomic::Ordering;
    use std::sync::Arc;

    #[test]
    fn commit_outcomes_are_counted_and_an_empty_commit_is_no_failure() {
        let ok = "flashsale_kafka_consumer_commits_total{outcome=\"ok\"}";
        let failed = "flashsale_kafka_consumer_commits_total{outcome=\"failed\"}";
        let sample = crate::metrics::sample;
        let (ok0, failed0) = (sample(ok), sample(failed));
        let context = ResumeContext {
            cursors: Cursors::default(),
            lag: Arc::default(),
        };
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition_offset("orders", 0, Offset::Offset(5))
            .expect("offset");
        context.commit_callback(Ok(()), &tpl);
        context.commit_callback(
            Err(KafkaError::ConsumerCommit(
                RDKafkaErrorCode::RequestTimedOut,
            )),
            &tpl,
        );
        context.commit_callback(
            Err(KafkaError::ConsumerCommit(RDKafkaErrorCode::NoOffset)),
            &tpl,
        );
        assert_eq!(sample(ok), ok0 + 1.0);
        assert_eq!(
            sample(failed),
            failed0 + 1.0,
            "a timed-out commit, not the empty one"
        );
    }

    #[test]
    fn a_producer_is_stale_once_it_lost_a_broker_after_it_delivered() {
        let lost = || KafkaError::Global(RDKafkaErrorCode::BrokerTransportFailure);
        let (wake, woken) = std::sync::mpsc::sync_channel(1);
        let connection = Arc::new(Connection::new(wake.clone()));
        let context = ProducerStats::new(Arc::clone(&connection));
        context.error(lost(), "Connect to ipv4#127.0.0.1:9092 failed");
        connection.delivered.store(true, Ordering::Release);
        assert!(
            !connection.stale(),
            "failing to connect before it delivered leaves no producer id to lose"
        );
        context.error(
            KafkaError::Global(RDKafkaErrorCode::MessageTimedOut),
            "something else",
        );
        assert!(!connection.stale(), "only a lost connection counts");
        context.error(lost(), "Disconnected (after 98ms in state UP)");
        assert!(connection.stale());
        assert!(woken.try_recv().is_ok(), "going stale wakes the watcher");
        let other = Arc::new(Connection::new(wake));
        other.delivered.store(true, Ordering::Release);
        ProducerStats::new(Arc::clone(&other)).error(
            KafkaError::Global(RDKafkaErrorCode::AllBrokersDown),
            "1/1 brokers are down",
        );
        assert!(other.stale());
    }

    #[test]
    fn lag_comes_from_the_statistics_of_assigned_partitions() {
        let lag = LagState::default();
        let stats = br#"{"name":"c","type":"consumer","msg_cnt":0,"topics":{"orders":{
            "topic":"orders","partitions":{
              "0":{"partition":0,"lo_offset":0,"hi_offset":120,"committed_offset":100},
              "1":{"partition":1,"lo_offset":5,"hi_offset":40,"committed_offset":-1001},
              "2":{"partition":2,"lo_offset":0,"hi_offset":70,"committed_offset":10},
              "-1":{"partition":-1,"lo_offset":-1001,"hi_offset":-1001,"committed_offset":-1001}
            }}}}"#;
        lag.statistics(stats);
        assert!(lag.lag().is_empty(), "nothing assigned yet");
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition("orders", 0);
        tpl.add_partition("orders", 1);
        lag.assign(&tpl, false);
        assert_eq!(
            lag.lag(),
            vec![
                PartitionLag {
                    partition: 0,
                    end_offset: 120,
                    committed: 100
                },
                // Nothing committed: a new group starts at the earliest record.
                PartitionLag {
                    partition: 1,
                    end_offset: 40,
                    committed: 5
                },
            ]
        );
        // What this consumer committed counts before the statistics catch up.
        lag.committed.lock().insert(("orders".into(), 0), 115);
        assert_eq!(lag.lag()[0].records(), 5);
        lag.revoke(Some(&tpl));
        assert!(lag.lag().is_empty(), "revoked partitions are not reported");
    }

    #[test]
    fn producer_statistics_move_the_queue_gauge_and_the_retry_counter() {
        // No real producer runs in this test binary, so the process's values move only here.
        let m = crate::metrics::metrics();
        let (queued, retries) = (m.kafka_queue_messages.get(), m.kafka_retries.get());
        let stats = ProducerStats::new(Arc::new(Connection::new(
            std::sync::mpsc::sync_channel(1).0,
        )));
        stats.stats_raw(
            br#"{"msg_cnt":7,"brokers":{"a:9092/1":{"txretries":2},"b:9092/2":{"txretries":1}}}"#,
        );
        assert_eq!(m.kafka_queue_messages.get(), queued + 7);
        assert_eq!(m.kafka_retries.get(), retries + 3);
        stats.stats_raw(br#"{"msg_cnt":2,"brokers":{"a:9092/1":{"txretries":4}}}"#);
        assert_eq!(m.kafka_queue_messages.get(), queued + 2);
        assert_eq!(m.kafka_retries.get(), retries + 4, "a counter only adds");
        stats.stats_raw(b"not json");
        assert_eq!(*stats.last.lock(), (2, 4), "garbage changes nothing");
        drop(stats);
        assert_eq!(
            m.kafka_queue_messages.get(),
            queued,
            "a dropped producer's queue leaves the gauge"
        );
    }

    #[test]
    fn a_cursor_takes_records_in_order_and_drops_records_it_returned() {
        let mut c = Cursor::default();
        assert_eq!(
            c.admit(5),
            Admit::Take,
            "the first record sets the position"
        );
        assert_eq!(c.admit(6), Admit::Take);
        assert_eq!(c.admit(3), Admit::Drop, "a re-read record");
        assert_eq!(c.admit(7), Admit::Take);
    }

    #[test]
    fn a_jump_reads_again_from_further_back_until_the_broker_serves_the_missing_batch() {
        let mut c = Cursor {
            next: Some(5_000),
            ..Cursor::default()
        };
        assert_eq!(c.admit(5_003), Admit::ReadFrom(5_000 - MAX_BATCH_RECORDS));
        // The broker skipped the batch again: twice as far back.
        assert_eq!(
            c.admit(5_003),
            Admit::ReadFrom(5_000 - 2 * MAX_BATCH_RECORDS)
        );
        assert_eq!(c.admit(4_990), Admit::Drop);
        assert_eq!(c.admit(5_000), Admit::Take);
        assert_eq!(c.admit(5_001), Admit::Take);
    }

    #[test]
    fn a_real_gap_is_accepted_once_the_broker_served_from_before_it() {
        let mut c = Cursor {
            next: Some(10),
            ..Cursor::default()
        };
        assert_eq!(c.admit(12), Admit::ReadFrom(0));
        assert_eq!(c.admit(9), Admit::Drop);
        assert_eq!(c.admit(12), Admit::Take, "offsets 10 and 11 do not exist");
        assert_eq!(c.admit(13), Admit::Take);
        let mut d = Cursor {
            next: Some(10),
            ..Cursor::default()
        };
        assert_eq!(d.admit(12), Admit::ReadFrom(0));
        assert_eq!(d.admit(12), Admit::Take, "read from offset 0 already");
    }
}
