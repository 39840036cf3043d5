//! A consumer group reading while a burst is produced reads every acknowledged record, the
//! last ones of each partition included, within a bound after the burst, against a real
//! tansu broker. (The end offsets tansu 0.6.0 reports through ListOffsets are printed for
//! comparison: it answers "latest" with the base offset of the last batch plus one, short
//! of the real end when that batch holds more than one record.)
#![cfg(feature = "kafka")]

mod common;

use sequencer::kafka::{create_topics, KafkaConfig, KafkaConsumer, KafkaLog};
use sequencer::{decode, LogConsumer, LogPosition, OrderLog, OrderRecord};
use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

fn record(i: u64) -> OrderRecord {
    common::record("tail-sale", i)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_reading_during_a_burst_reads_every_acknowledged_record() {
    const PARTITIONS: i32 = 12;
    const N: u64 = 6_000;
    const CONCURRENCY: u64 = 64;
    let broker = testkit::TansuBroker::start();
    let config = KafkaConfig {
        bootstrap: broker.bootstrap(),
        partitions: PARTITIONS,
        ..KafkaConfig::default()
    };
    create_topics(&config).await.expect("topics");
    let log = Arc::new(KafkaLog::new(&config).expect("producer"));

    // The settler's way: a group consumer polling and committing while the burst runs.
    let seen: Arc<parking_lot::Mutex<BTreeSet<LogPosition>>> = Arc::default();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let reader = {
        let (config, seen, stop) = (config.clone(), Arc::clone(&seen), Arc::clone(&stop));
        tokio::spawn(async move {
            let mut consumer = KafkaConsumer::new(&config, "tail").expect("consumer");
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let batch = consumer
                    .poll(500, Duration::from_millis(200))
                    .await
                    .expect("poll");
                for e in &batch {
                    decode(&e.payload).expect("decodes");
                    seen.lock().insert(e.position);
                }
                if !batch.is_empty() {
                    consumer
                        .commit(&batch.iter().map(|e| e.position).collect::<Vec<_>>())
                        .await
                        .expect("commit");
                }
            }
        })
    };

    let acked = burst(&log, N, CONCURRENCY).await;
    let burst_end = Instant::now();
    let ends = log
        .end_offsets(&config.orders_topic())
        .await
        .expect("end offsets");

    // Every acknowledged record is read within a bound after the burst.
    let deadline = burst_end + Duration::from_secs(20);
    while Instant::now() < deadline && !acked.iter().all(|a| seen.lock().contains(a)) {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    reader.await.expect("reader");
    let seen = seen.lock().clone();

    let mut report = String::new();
    for p in 0..PARTITIONS as u32 {
        let a: Vec<u64> = acked
            .iter()
            .filter(|x| x.partition == p)
            .map(|x| x.offset)
            .collect();
        let s: BTreeSet<u64> = seen
            .iter()
            .filter(|x| x.partition == p)
            .map(|x| x.offset)
            .collect();
        let missing: Vec<u64> = a.iter().filter(|o| !s.contains(o)).copied().collect();
        let end = ends.iter().find(|e| e.0 == p).map(|e| e.1);
        report.push_str(&format!(
            "p{p}: acked {} (max {:?}) seen {} end_offset {:?} missing {:?}\n",
            a.len(),
            a.iter().max(),
            s.len(),
            end,
            missing
        ));
    }
    eprintln!("{report}");
    assert!(acked.iter().all(|a| seen.contains(a)), "{report}");
}

/// Appends `n` records from `concurrency` senders; the positions acknowledged.
async fn burst(log: &Arc<KafkaLog>, n: u64, concurrency: u64) -> BTreeSet<LogPosition> {
    let next = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..concurrency {
        let (log, next) = (Arc::clone(log), Arc::clone(&next));
        tasks.spawn(async move {
            let mut acked = Vec::new();
            loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if i >= n {
                    return acked;
                }
                acked.push(log.append(&record(i)).await.expect("append"));
            }
        });
    }
    let mut acked = BTreeSet::new();
    while let Some(r) = tasks.join_next().await {
        acked.extend(r.expect("join"));
    }
    acked
}
