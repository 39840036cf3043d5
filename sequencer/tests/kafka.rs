//! The Kafka log against a real tansu broker: topics are created and checked, appends are
//! acknowledged with their partition and offset, spread over every partition, and a
//! consumer group reads each record back once.
#![cfg(feature = "kafka")]

use sequencer::kafka::{create_topics, KafkaConfig, KafkaConsumer, KafkaLog};
use sequencer::{decode, LogConsumer, OrderLog, OrderRecord, RECORD_VERSION};
use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};
use storage::{Currency, OrderId, SaleId, Timestamp, UserId};

fn record(i: u64) -> OrderRecord {
    OrderRecord {
        v: RECORD_VERSION,
        order_id: OrderId::new(),
        sale_id: SaleId::parse("kafka-sale").expect("id"),
        user_id: UserId::parse(format!("u{i}")).expect("user"),
        quantity: 1,
        amount_minor: 100,
        currency: Currency::parse("EUR").expect("eur"),
        sequence: i,
        idempotency_key: format!("k{i}"),
        fingerprint: "f".into(),
        payment_token: "tok".into(),
        accepted_at: Timestamp::now(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn appends_spread_over_partitions_and_are_read_back_once() {
    let broker = testkit::TansuBroker::start();
    let config = KafkaConfig {
        bootstrap: broker.bootstrap(),
        topic_prefix: "t1.".into(),
        partitions: 4,
        ..KafkaConfig::default()
    };
    let log = Arc::new(KafkaLog::new(&config).expect("producer"));
    let missing = log.check_topics().await.expect_err("no topics yet");
    assert!(
        missing.to_string().contains("flashsale migrate"),
        "{missing}"
    );
    let created = create_topics(&config).await.expect("create topics");
    assert_eq!(created.len(), 3, "{created:?}");
    assert!(
        create_topics(&config).await.expect("again").is_empty(),
        "creating is idempotent"
    );
    log.check_topics().await.expect("topics exist");

    const N: u64 = 2_000;
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..N {
        let log = Arc::clone(&log);
        tasks.spawn(async move {
            let r = record(i);
            let pos = log.append(&r).await.expect("append");
            (r.order_id, pos)
        });
    }
    let mut sent: HashMap<OrderId, (u32, u64)> = HashMap::new();
    while let Some(r) = tasks.join_next().await {
        let (id, pos) = r.expect("join");
        sent.insert(id, (pos.partition, pos.offset));
    }
    let partitions: HashSet<u32> = sent.values().map(|(p, _)| *p).collect();
    assert_eq!(partitions.len(), 4, "every partition gets records");
    for (id, (p, _)) in &sent {
        let want = sequencer::partition::partition_for(id.to_string().as_bytes(), 4);
        assert_eq!(
            *p, want,
            "the default partitioner (murmur2 of the key) placed {id}"
        );
    }

    let mut consumer = KafkaConsumer::new(&config, "settler-test").expect("consumer");
    let mut seen: HashMap<OrderId, u32> = HashMap::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    while (seen.len() as u64) < N {
        assert!(Instant::now() < deadline, "read back {} of {N}", seen.len());
        let batch = consumer
            .poll(500, Duration::from_millis(500))
            .await
            .expect("poll");
        for e in &batch {
            let r = decode(&e.payload).expect("decodes");
            assert_eq!(
                sent.get(&r.order_id),
                Some(&(e.position.partition, e.position.offset))
            );
            *seen.entry(r.order_id).or_default() += 1;
        }
        consumer
            .commit(&batch.iter().map(|e| e.position).collect::<Vec<_>>())
            .await
            .expect("commit");
    }
    assert!(seen.values().all(|n| *n == 1), "each record read once");
}
