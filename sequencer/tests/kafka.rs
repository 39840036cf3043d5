//! The Kafka log against a real tansu broker: topics are created and checked, appends are
//! acknowledged with their partition and offset, spread over every partition, and a
//! consumer group reads each record back once; the consumer reports its lag per assigned
//! partition from librdkafka's statistics, and appends are timed.
#![cfg(feature = "kafka")]

mod common;

use sequencer::kafka::{create_topics, KafkaConfig, KafkaConsumer, KafkaLog};
use sequencer::{decode, LogConsumer, OrderLog, OrderRecord};
use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};
use storage::OrderId;

fn record(i: u64) -> OrderRecord {
    common::record("kafka-sale", i)
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_consumer_reports_lag_until_it_commits_and_appends_are_timed() {
    let broker = testkit::TansuBroker::start();
    let config = KafkaConfig {
        bootstrap: broker.bootstrap(),
        topic_prefix: "lag.".into(),
        partitions: 3,
        ..KafkaConfig::default()
    };
    create_topics(&config).await.expect("create topics");
    let log = KafkaLog::new(&config).expect("producer");
    const N: u64 = 120;
    for i in 0..N {
        log.append(&record(i)).await.expect("append");
    }
    let mut registry = prometheus_client::registry::Registry::default();
    sequencer::metrics::register(&mut registry);
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &registry).expect("encode");
    let appends: f64 = text
        .lines()
        .find_map(|l| l.strip_prefix("flashsale_log_append_duration_seconds_count{log=\"kafka\"} "))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0);
    assert!(appends >= N as f64, "{text}");

    // Read everything without committing: the lag shows every partition behind.
    let mut consumer = KafkaConsumer::new(&config, "lag-test").expect("consumer");
    let mut read = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut seen_lag = Vec::new();
    while (read.len() as u64) < N || seen_lag.len() < 3 {
        assert!(
            Instant::now() < deadline,
            "read {} of {N}, lag {seen_lag:?}",
            read.len()
        );
        let batch = consumer
            .poll(500, Duration::from_millis(200))
            .await
            .expect("poll");
        read.extend(batch.iter().map(|e| e.position));
        seen_lag = consumer.lag();
    }
    let behind: u64 = seen_lag.iter().map(|l| l.records()).sum();
    assert!(
        behind > 0,
        "nothing committed yet, yet no lag: {seen_lag:?}"
    );
    assert!(behind <= N, "{seen_lag:?}");

    // Commit everything: the lag goes to zero on every partition.
    consumer.commit(&read).await.expect("commit");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let lag = consumer.lag();
        if lag.len() == 3 && lag.iter().all(|l| l.records() == 0) {
            break;
        }
        assert!(Instant::now() < deadline, "lag after commit: {lag:?}");
        consumer
            .poll(10, Duration::from_millis(100))
            .await
            .expect("poll");
    }
}
