//! Kafka producer variants against a testkit tansu broker (memory storage): which producer
//! acknowledges an order fastest while still answering only after the broker has the record.
//!
//! Every variant uses the order log's producer settings (idempotent, `acks=all`, lz4,
//! murmur2, `batch.size` 256 KiB) and differs in
//! - the producer: rdkafka's `FutureProducer`, or a `ThreadedProducer` whose
//!   `ProducerContext::delivery` completes a tokio oneshot carried as the delivery opaque;
//! - `linger.ms` (0, 1, 5) and `batch.num.messages`.
//!
//! Each variant sends `SENDS` order records from 64 and from 512 concurrent senders, each
//! waiting for its delivery report; it reports the throughput and the p50/p99 of that wait,
//! the median of `REPS` repetitions (each repetition on a fresh broker, variants in the same
//! order). Run: `cargo bench -p bench --features kafka --bench kafka_produce`. Without a
//! `tansu` binary it prints why and does nothing.
//!
//! On a 2-core machine the two producers were within the run-to-run noise of each other
//! (the `FutureProducer` is itself a `ThreadedProducer` completing a oneshot), so the order
//! log keeps the `FutureProducer`; `linger.ms=5` adds its 5 ms to every delivery wait (a
//! third of the throughput at 64 senders), 0 and 1 are alike, and `batch.num.messages`
//! (64, 1,000, the default) made no measurable difference.

use sequencer::kafka::rdkafka::{
    config::ClientConfig,
    error::KafkaError,
    message::{Header, Message, OwnedHeaders},
    producer::{
        BaseRecord, DeliveryResult, FutureProducer, FutureRecord, Producer, ProducerContext,
        ThreadedProducer,
    },
    ClientContext,
};
use sequencer::kafka::{create_topics, KafkaConfig};
use sequencer::{OrderRecord, CONTENT_TYPE, RECORD_VERSION};
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use storage::{Currency, OrderId, SaleId, Timestamp, UserId};

const SENDS: usize = 20_000;
const REPS: usize = 3;
const CONCURRENCY: [usize; 2] = [64, 512];
const PARTITIONS: i32 = 12;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Future,
    Callback,
}

#[derive(Clone, Copy, Debug)]
struct Variant {
    kind: Kind,
    linger_ms: u32,
    batch_num_messages: Option<u32>,
}

impl Variant {
    fn name(&self) -> String {
        let kind = match self.kind {
            Kind::Future => "FutureProducer",
            Kind::Callback => "ThreadedProducer+oneshot",
        };
        match self.batch_num_messages {
            Some(n) => format!("{kind} linger={} batch.num={n}", self.linger_ms),
            None => format!("{kind} linger={}", self.linger_ms),
        }
    }
}

fn variants() -> Vec<Variant> {
    let mut out = Vec::new();
    for kind in [Kind::Future, Kind::Callback] {
        for linger_ms in [0, 1, 5] {
            out.push(Variant {
                kind,
                linger_ms,
                batch_num_messages: None,
            });
        }
        for n in [64, 1_000] {
            out.push(Variant {
                kind,
                linger_ms: 1,
                batch_num_messages: Some(n),
            });
        }
    }
    out
}

/// The order log's producer settings (see `sequencer::kafka`), with the variant's own.
fn client_config(bootstrap: &str, v: &Variant) -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", bootstrap)
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("compression.type", "lz4")
        .set("partitioner", "murmur2_random")
        .set("linger.ms", v.linger_ms.to_string())
        .set("batch.size", (256 * 1024).to_string())
        .set("message.timeout.ms", "5000");
    if let Some(n) = v.batch_num_messages {
        c.set("batch.num.messages", n.to_string());
    }
    c
}

type Delivered = Result<(i32, i64), KafkaError>;

/// Completes the oneshot each record carries with its delivery report.
struct OneshotContext;

impl ClientContext for OneshotContext {}

impl ProducerContext for OneshotContext {
    type DeliveryOpaque = Box<tokio::sync::oneshot::Sender<Delivered>>;

    fn delivery(&self, result: &DeliveryResult<'_>, tx: Self::DeliveryOpaque) {
        let _ = tx.send(match result {
            Ok(m) => Ok((m.partition(), m.offset())),
            Err((e, _)) => Err(e.clone()),
        });
    }
}

enum AnyProducer {
    Future(FutureProducer),
    Callback(ThreadedProducer<OneshotContext>),
}

fn headers() -> OwnedHeaders {
    OwnedHeaders::new().insert(Header {
        key: "content-type",
        value: Some(CONTENT_TYPE),
    })
}

impl AnyProducer {
    fn new(bootstrap: &str, v: &Variant) -> AnyProducer {
        let config = client_config(bootstrap, v);
        match v.kind {
            Kind::Future => AnyProducer::Future(config.create().expect("future producer")),
            Kind::Callback => AnyProducer::Callback(
                config
                    .create_with_context(OneshotContext)
                    .expect("threaded producer"),
            ),
        }
    }

    /// Sends and waits for the delivery report.
    async fn send(&self, topic: &str, key: &str, payload: &[u8]) -> Delivered {
        match self {
            AnyProducer::Future(p) => {
                let record = FutureRecord::to(topic)
                    .key(key)
                    .payload(payload)
                    .headers(headers());
                p.send(record, Duration::from_secs(5))
                    .await
                    .map(|d| (d.partition, d.offset))
                    .map_err(|(e, _)| e)
            }
            AnyProducer::Callback(p) => {
                let (tx, rx) = tokio::sync::oneshot::channel();
                let record = BaseRecord::with_opaque_to(topic, Box::new(tx))
                    .key(key)
                    .payload(payload)
                    .headers(headers());
                p.send(record).map_err(|(e, _)| e)?;
                rx.await.expect("the producer dropped a delivery report")
            }
        }
    }

    fn flush(&self) {
        let _ = match self {
            AnyProducer::Future(p) => p.flush(Duration::from_secs(10)),
            AnyProducer::Callback(p) => p.flush(Duration::from_secs(10)),
        };
    }
}

fn payload(i: usize) -> Vec<u8> {
    sequencer::encode(&OrderRecord {
        v: RECORD_VERSION,
        order_id: OrderId::new(),
        sale_id: SaleId::parse("bench-sale").expect("id"),
        user_id: UserId::parse(format!("u{i}")).expect("user"),
        quantity: 1,
        amount_minor: 100,
        currency: Currency::parse("EUR").expect("eur"),
        sequence: i as u64,
        idempotency_key: format!("k{i}"),
        fingerprint: "f".repeat(64),
        payment_token: "tok_visa".into(),
        accepted_at: Timestamp::now(),
    })
    .expect("encode")
}

#[derive(Clone, Copy, Debug)]
struct Sample {
    per_second: f64,
    p50: Duration,
    p99: Duration,
}

/// `total` sends from `concurrency` senders, each waiting for its delivery report.
async fn run(producer: &Arc<AnyProducer>, topic: &str, concurrency: usize, total: usize) -> Sample {
    let next = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..concurrency {
        let (producer, next, topic) = (Arc::clone(producer), Arc::clone(&next), topic.to_owned());
        tasks.spawn(async move {
            let mut waits = Vec::new();
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= total {
                    return waits;
                }
                let (key, payload) = (OrderId::new().to_string(), payload(i));
                let sent = Instant::now();
                producer
                    .send(&topic, &key, &payload)
                    .await
                    .expect("delivered");
                waits.push(sent.elapsed());
            }
        });
    }
    let mut waits = Vec::with_capacity(total);
    while let Some(w) = tasks.join_next().await {
        waits.extend(w.expect("sender"));
    }
    let elapsed = started.elapsed();
    waits.sort_unstable();
    let at = |q: f64| waits[((waits.len() as f64 * q) as usize).min(waits.len() - 1)];
    Sample {
        per_second: total as f64 / elapsed.as_secs_f64(),
        p50: at(0.50),
        p99: at(0.99),
    }
}

fn tansu_binary() -> Option<PathBuf> {
    let home = std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo/bin/tansu"));
    home.filter(|p| p.is_file()).or_else(|| {
        std::env::var_os("PATH").and_then(|p| {
            std::env::split_paths(&p)
                .map(|d| d.join("tansu"))
                .find(|p| p.is_file())
        })
    })
}

fn median<T: Copy, K: PartialOrd>(mut xs: Vec<T>, key: impl Fn(&T) -> K) -> T {
    xs.sort_by(|a, b| key(a).partial_cmp(&key(b)).expect("comparable"));
    xs[xs.len() / 2]
}

fn main() {
    if tansu_binary().is_none() {
        println!(
            "kafka_produce: skipped, no `tansu` binary (~/.cargo/bin or PATH): run scripts/test.sh"
        );
        return;
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let variants = variants();
    // samples[variant][concurrency] = one Sample per repetition
    let mut samples = vec![vec![Vec::new(); CONCURRENCY.len()]; variants.len()];
    runtime.block_on(async {
        for rep in 0..REPS {
            let broker = testkit::TansuBroker::start();
            let config = KafkaConfig {
                bootstrap: broker.bootstrap(),
                topic_prefix: "bench.".into(),
                partitions: PARTITIONS,
                ..KafkaConfig::default()
            };
            create_topics(&config).await.expect("topics");
            let topic = config.orders_topic();
            for (vi, v) in variants.iter().enumerate() {
                let producer = Arc::new(AnyProducer::new(&config.bootstrap, v));
                // Connection, producer id and metadata before the clock starts.
                run(&producer, &topic, 16, 200).await;
                for (ci, c) in CONCURRENCY.iter().enumerate() {
                    let s = run(&producer, &topic, *c, SENDS).await;
                    eprintln!(
                        "rep {rep} {:<45} c={c:<4} {:>8.0}/s p50 {:>7.2?} p99 {:>7.2?}",
                        v.name(),
                        s.per_second,
                        s.p50,
                        s.p99
                    );
                    samples[vi][ci].push(s);
                }
                producer.flush();
            }
        }
    });
    println!(
        "\nmedians of {REPS} repetitions, {SENDS} sends each, tansu memory storage, {PARTITIONS} partitions\n"
    );
    println!(
        "| producer | concurrency | sends/s | p50 delivery wait | p99 delivery wait |\n|---|---:|---:|---:|---:|"
    );
    for (vi, v) in variants.iter().enumerate() {
        for (ci, c) in CONCURRENCY.iter().enumerate() {
            let reps = samples[vi][ci].clone();
            let per_second = median(reps.clone(), |s| s.per_second).per_second;
            let p50 = median(reps.clone(), |s| s.p50).p50;
            let p99 = median(reps, |s| s.p99).p99;
            println!(
                "| {} | {c} | {per_second:.0} | {:.2} ms | {:.2} ms |",
                v.name(),
                p50.as_secs_f64() * 1e3,
                p99.as_secs_f64() * 1e3
            );
        }
    }
}
