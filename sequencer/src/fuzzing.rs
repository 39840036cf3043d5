//! The checks of the sequencer fuzz targets (`fuzz/fuzz_targets/record.rs` and
//! `embedded_log.rs`).
//!
//! Each takes arbitrary bytes, runs them through the real code and panics when a property
//! fails, not only when the code does. The fuzz targets call them under libFuzzer on
//! nightly; `tests/fuzz_corpus.rs` replays the checked-in corpus through the same functions
//! on stable, so a finding stays fixed.

use crate::embedded::{segment_path, FileLog, FileLogOptions};
use crate::{decode, encode, Error, LogConsumer, OrderRecord, RECORD_VERSION};
use std::sync::OnceLock;
use std::time::Duration;
use storage::{Currency, OrderId, SaleId, Timestamp, UserId};

/// The record codec: a record that decodes encodes, decodes back to itself and encodes to
/// the same bytes again (decode(encode(x)) == x, and encoding is canonical); a refusal is
/// `Malformed` or `UnsupportedVersion`, never a panic. The same bytes are also read as the
/// fields of a record built in code (ids, amounts, strings and an accepted_at anywhere in
/// the range a timestamp can take), which must round-trip the same way.
pub fn record(data: &[u8]) {
    if let Ok(r) = decode(data) {
        assert_eq!(r.v, RECORD_VERSION);
        round_trip(&r);
        assert_eq!(r.key().parse::<OrderId>().ok(), Some(r.order_id));
        let order = r.to_new_order();
        assert_eq!((order.order_id, order.quantity), (r.order_id, r.quantity));
    }
    round_trip(&built(data));
}

fn round_trip(r: &OrderRecord) {
    let bytes = encode(r).expect("a valid record encodes");
    let back = decode(&bytes).expect("an encoded record decodes");
    assert_eq!(&back, r, "decode(encode(x)) != x");
    assert_eq!(
        encode(&back).expect("encode"),
        bytes,
        "encoding is not canonical"
    );
}

/// A record whose every field comes from `data`, within what the types allow.
fn built(data: &[u8]) -> OrderRecord {
    let mut fixed = [0u8; 56];
    let n = data.len().min(fixed.len());
    fixed[..n].copy_from_slice(&data[..n]);
    let mut strings = data[n..].split(|&b| b == 0).map(String::from_utf8_lossy);
    let mut next = || strings.next().unwrap_or_default().into_owned();
    let word = |at: usize| u64::from_le_bytes(fixed[at..at + 8].try_into().unwrap_or_default());
    let order_id = format!("{:016x}{:016x}", word(0), word(8))
        .parse()
        .unwrap_or_default();
    let span = (Timestamp::MAX.0 - Timestamp::MIN.0 + 1) as u64;
    let letter = |b: u8| char::from(b'A' + b % 26);
    let currency: String = fixed[53..56].iter().map(|&b| letter(b)).collect();
    OrderRecord {
        v: RECORD_VERSION,
        order_id,
        sale_id: SaleId::parse(next()).unwrap_or_else(|_| SaleId::generate()),
        user_id: UserId::parse(next()).unwrap_or_else(|_| fallback_user()),
        quantity: u32::from_le_bytes(fixed[48..52].try_into().unwrap_or_default()),
        amount_minor: word(16) as i64,
        currency: Currency::parse(&currency).expect("three upper-case letters"),
        sequence: word(24),
        idempotency_key: next(),
        fingerprint: next(),
        payment_token: next(),
        accepted_at: Timestamp(Timestamp::MIN.0 + (word(32) % span) as i64),
    }
}

fn fallback_user() -> UserId {
    UserId::parse("user").expect("valid user id")
}

fn runtime() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .expect("runtime")
    })
}

fn frame(payload: &[u8]) -> Vec<u8> {
    let mut f = Vec::with_capacity(8 + payload.len());
    f.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    f.extend_from_slice(&crc32fast::hash(payload).to_le_bytes());
    f.extend_from_slice(payload);
    f
}

/// The embedded log reading a log file it did not write: `data` becomes the log file, and
/// [`FileLog::open`] either refuses it as `Corrupt` and leaves it untouched, or opens it
/// with every record readable (by [`FileLog::read_from`] and by a consumer polling in small
/// batches, the same records), the file cut to exactly the frames of those records (a
/// prefix of `data`), and the next append landing after them at the next offset.
pub fn embedded_log(data: &[u8]) {
    let dir = tempfile::tempdir().expect("tempdir");
    // The live (first) segment: the one a log scans on open.
    let path = segment_path(dir.path(), 0);
    std::fs::write(&path, data).expect("write log file");
    let options = FileLogOptions {
        fsync: false,
        max_batch: 16,
        queue_capacity: 16,
        ..FileLogOptions::default()
    };
    let log = match FileLog::open(dir.path(), options) {
        Ok(log) => log,
        Err(Error::Corrupt(_)) => {
            let after = std::fs::read(&path).expect("read log file");
            assert!(after == data, "a log refused as corrupt was changed");
            return;
        }
        Err(e) => panic!("opening a log file failed other than as corrupt: {e}"),
    };
    let n = log.len();
    let entries = log.read_from(0, usize::MAX).expect("read every record");
    assert_eq!(entries.len() as u64, n);
    let mut kept = Vec::new();
    for (i, e) in entries.iter().enumerate() {
        assert_eq!((e.position.partition, e.position.offset), (0, i as u64));
        kept.extend_from_slice(&frame(&e.payload));
    }
    let file = std::fs::read(&path).expect("read log file");
    assert!(
        file == kept,
        "the opened file is not exactly its records' frames"
    );
    assert!(
        data.starts_with(&kept),
        "the records are not a prefix of the file"
    );

    runtime().block_on(async {
        // Poll only while records are there: a poll past the end waits on the runtime's
        // timer (a millisecond tick), which would slow the target down tenfold.
        let mut consumer = log.consumer(0);
        let mut polled = Vec::new();
        while (polled.len() as u64) < n {
            let batch = consumer.poll(3, Duration::ZERO).await.expect("poll");
            assert!(
                !batch.is_empty(),
                "a consumer stopped before the end of the log"
            );
            polled.extend(batch);
        }
        assert_eq!(polled.len(), entries.len());
        assert!(log.read_from(n, 10).expect("read past the end").is_empty());
        for (p, e) in polled.iter().zip(&entries) {
            assert_eq!((p.position, &p.payload), (e.position, &e.payload));
        }
        let payload = b"appended after a fuzzed log".to_vec();
        let pos = log.append_raw(payload.clone()).await.expect("append");
        assert_eq!(pos.offset, n, "the append did not follow the records read");
        let read = log.read_from(n, 10).expect("read the append");
        assert_eq!(read.len(), 1);
        assert_eq!(&read[0].payload[..], &payload[..]);
    });
    kept.extend_from_slice(&frame(b"appended after a fuzzed log"));
    let file = std::fs::read(&path).expect("read log file");
    assert!(
        file == kept,
        "the append did not land right after the records"
    );
}
