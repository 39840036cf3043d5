//! The Kafka order log: an idempotent rdkafka producer (`acks=all`, lz4) and a consumer-group
//! reader, for any Kafka-protocol broker (Apache Kafka, Redpanda, tansu).
//!
//! Records are keyed by order id and placed by Kafka's default partitioner (murmur2, see
//! [`crate::partition`]), carry a `content-type` header, and are acknowledged only once the
//! broker's delivery report says they are written. The consumer never commits an offset on
//! its own: the settler commits after the store has committed the batch.

use crate::{
    Error, LogConsumer, LogEntry, LogPosition, OrderLog, OrderRecord, Result, CONTENT_TYPE,
};
use async_trait::async_trait;
use bytes::Bytes;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{CommitMode, Consumer, StreamConsumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, Message, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use std::collections::BTreeMap;
use std::time::Duration;

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

fn unavailable(e: impl std::fmt::Display) -> Error {
    Error::Unavailable(e.to_string())
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
                return Err(Error::Unavailable(format!("creating topic {name}: {code}")))
            }
        }
    }
    Ok(created)
}

/// The producer side: [`OrderLog`] on Kafka.
pub struct KafkaLog {
    producer: parking_lot::RwLock<FutureProducer>,
    recreated: parking_lot::Mutex<std::time::Instant>,
    topic: String,
    config: KafkaConfig,
}

fn producer(config: &KafkaConfig) -> Result<FutureProducer> {
    ClientConfig::new()
        .set("bootstrap.servers", &config.bootstrap)
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("compression.type", "lz4")
        // librdkafka's own default is CRC32; murmur2 is what the Java client uses.
        .set("partitioner", "murmur2_random")
        .set("linger.ms", config.linger.as_millis().to_string())
        .set("batch.size", config.batch_size.to_string())
        .set(
            "message.timeout.ms",
            config.delivery_timeout.as_millis().max(1).to_string(),
        )
        .create()
        .map_err(unavailable)
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
        Ok(KafkaLog {
            producer: parking_lot::RwLock::new(producer(config)?),
            recreated: parking_lot::Mutex::new(std::time::Instant::now()),
            topic: config.orders_topic(),
            config: config.clone(),
        })
    }

    /// Replaces a producer the broker no longer takes records from (a fatal error, or an
    /// idempotence state the broker lost), at most once per delivery timeout.
    fn recreate(&self, why: &str) {
        let mut last = self.recreated.lock();
        if last.elapsed() < self.config.delivery_timeout {
            return;
        }
        match producer(&self.config) {
            Ok(p) => {
                tracing::warn!(why, "recreating the Kafka producer");
                *self.producer.write() = p;
                *last = std::time::Instant::now();
            }
            Err(e) => tracing::error!(error = %e, "recreating the Kafka producer failed"),
        }
    }

    /// Fails with the names of the pipeline's topics the broker does not have (a missing
    /// topic is a clear error at start-up, not a hang).
    pub async fn check_topics(&self) -> Result<()> {
        let producer = self.producer.read().clone();
        let wanted = self.config.topics();
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
                Err(Error::Unavailable(format!(
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
        let producer = self.producer.read().clone();
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
        let producer = self.producer.read().clone();
        let sent = producer.send(record, self.config.delivery_timeout).await;
        if let Err((e, _)) = &sent {
            let fatal = producer.client().fatal_error().is_some();
            let refused = !matches!(
                e,
                KafkaError::MessageProduction(
                    RDKafkaErrorCode::MessageTimedOut | RDKafkaErrorCode::QueueFull
                )
            );
            if fatal || refused {
                self.recreate(&e.to_string());
            }
        }
        match sent {
            Ok(d) => Ok(LogPosition {
                partition: d.partition as u32,
                offset: d.offset as u64,
            }),
            // Refused before it could have been written: safe to undo the admission.
            Err((
                KafkaError::MessageProduction(
                    code @ (RDKafkaErrorCode::QueueFull
                    | RDKafkaErrorCode::MessageSizeTooLarge
                    | RDKafkaErrorCode::UnknownTopic
                    | RDKafkaErrorCode::UnknownTopicOrPartition
                    | RDKafkaErrorCode::UnknownPartition
                    | RDKafkaErrorCode::InvalidMessage),
                ),
                _,
            )) => Err(Error::Unavailable(format!(
                "the broker did not take the record: {code}"
            ))),
            // Anything else (a delivery timeout above all) may have been written.
            Err((e, _)) => Err(Error::Indeterminate(e.to_string())),
        }
    }

    /// Waits until every record handed to the producer is delivered or failed.
    pub fn flush(&self, timeout: Duration) -> Result<()> {
        let producer = self.producer.read().clone();
        producer.flush(timeout).map_err(unavailable)
    }
}

#[async_trait]
impl OrderLog for KafkaLog {
    async fn append(&self, record: &OrderRecord) -> Result<LogPosition> {
        let payload = crate::encode(record)?;
        self.send(&self.topic, &record.key(), &payload).await
    }

    async fn ping(&self) -> Result<()> {
        self.check_topics().await
    }
}

/// The consumer side: [`LogConsumer`] on a Kafka consumer group.
pub struct KafkaConsumer {
    consumer: StreamConsumer,
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
        let consumer: StreamConsumer = ClientConfig::new()
            .set("bootstrap.servers", &config.bootstrap)
            .set("group.id", group)
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            .set("auto.offset.reset", "earliest")
            .set("session.timeout.ms", "6000")
            .set("heartbeat.interval.ms", "500")
            .set("max.poll.interval.ms", "60000")
            .create()
            .map_err(unavailable)?;
        consumer.subscribe(&[topic]).map_err(unavailable)?;
        Ok(KafkaConsumer { consumer })
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
            .ok_or_else(|| Error::Unavailable("the consumer has no subscription".into()))?;
        let mut next: BTreeMap<u32, u64> = BTreeMap::new();
        for p in positions {
            let e = next.entry(p.partition).or_default();
            *e = (*e).max(p.offset + 1);
        }
        let mut tpl = TopicPartitionList::new();
        for (partition, offset) in next {
            tpl.add_partition_offset(&topic, partition as i32, Offset::Offset(offset as i64))
                .map_err(unavailable)?;
        }
        self.consumer
            .commit(&tpl, CommitMode::Async)
            .map_err(unavailable)
    }
}
