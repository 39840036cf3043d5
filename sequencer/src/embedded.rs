//! The embedded order log: one append-only file with group commit.
//!
//! Appends go through a bounded channel to one writer thread. The writer takes every record
//! waiting (up to `max_batch`), writes their frames with one `write`, calls `fdatasync` once,
//! and only then completes the appends: many buyers share one disk flush, and no append
//! returns before its record is on disk. A frame is `len: u32 LE | crc32: u32 LE | payload`;
//! on open, a torn or corrupt tail (a crash mid-write) is cut off, since no append of it
//! ever returned. The file is locked so that two processes never write one log.
//!
//! Metrics ([`crate::metrics`]): every append's latency and failure (`log="embedded"`),
//! the records of each group commit and the time of its `fdatasync`.

use crate::metrics::{metrics, EMBEDDED};
use crate::{
    encode, Error, LogConsumer, LogEntry, LogPosition, OrderLog, OrderRecord, PartitionLag, Result,
};
use async_trait::async_trait;
use bytes::Bytes;
use crossbeam_channel::{Receiver, Sender, TrySendError};
use parking_lot::RwLock;
use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{oneshot, watch};

const FRAME_HEADER: usize = 8;
/// Largest payload a frame may carry; anything larger is a corrupt length.
const MAX_RECORD: usize = 1 << 20;
pub(crate) const FILE_NAME: &str = "orders-0.log";

/// Settings of the embedded log.
#[derive(Debug, Clone)]
pub struct FileLogOptions {
    /// Flush to disk before completing appends. Turning it off loses acknowledged orders
    /// on power loss (not on a killed process); for benchmarks only.
    pub fsync: bool,
    /// Most records written with one flush.
    pub max_batch: usize,
    /// Most appends waiting for the writer; past it appends fail fast (503).
    pub queue_capacity: usize,
}

impl Default for FileLogOptions {
    fn default() -> Self {
        FileLogOptions {
            fsync: true,
            max_batch: 4096,
            queue_capacity: 65_536,
        }
    }
}

/// How long a consumer's poll waits for its batch to fill once the first record is there.
const BATCH_LINGER: Duration = Duration::from_millis(2);

struct Pending {
    payload: Vec<u8>,
    reply: oneshot::Sender<Result<u64>>,
}

struct Shared {
    /// File position of every committed frame, by offset.
    index: RwLock<Vec<u64>>,
    /// Set when a failed write could not be undone: the log takes no more records.
    failed: AtomicBool,
    reader: File,
    committed: watch::Sender<u64>,
}

/// The embedded [`OrderLog`]: durable, single partition.
#[derive(Clone)]
pub struct FileLog {
    tx: Sender<Pending>,
    shared: Arc<Shared>,
    path: PathBuf,
}

impl std::fmt::Debug for FileLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FileLog").field("path", &self.path).finish()
    }
}

/// Longest tail a crash can leave: one group commit of `max_batch` frames is written with
/// one `write`, so a torn tail is far shorter than this.
const MAX_TORN_TAIL: u64 = 64 << 20;

/// Whether any intact frame starts after `from` (so the damage at `from` is not a tail).
fn valid_frame_after(file: &mut File, from: u64, len: u64) -> std::io::Result<bool> {
    let mut tail = Vec::with_capacity((len - from) as usize);
    file.seek(SeekFrom::Start(from))?;
    file.read_to_end(&mut tail)?;
    for p in 1..tail.len().saturating_sub(FRAME_HEADER - 1) {
        let h = &tail[p..p + FRAME_HEADER];
        let n = u32::from_le_bytes([h[0], h[1], h[2], h[3]]) as usize;
        let crc = u32::from_le_bytes([h[4], h[5], h[6], h[7]]);
        let body = p + FRAME_HEADER;
        if n > 0
            && n <= MAX_RECORD
            && body + n <= tail.len()
            && crc32fast::hash(&tail[body..body + n]) == crc
        {
            return Ok(true);
        }
    }
    Ok(false)
}

/// Scans frames from the start; returns their positions and the end of the last good one.
fn scan(file: &mut File) -> std::io::Result<(Vec<u64>, u64)> {
    let len = file.metadata()?.len();
    file.seek(SeekFrom::Start(0))?;
    let mut reader = std::io::BufReader::with_capacity(1 << 20, &mut *file);
    let mut index = Vec::new();
    let mut pos = 0u64;
    let mut header = [0u8; FRAME_HEADER];
    let mut payload = Vec::new();
    while pos + FRAME_HEADER as u64 <= len {
        reader.read_exact(&mut header)?;
        let n = u32::from_le_bytes([header[0], header[1], header[2], header[3]]) as usize;
        let crc = u32::from_le_bytes([header[4], header[5], header[6], header[7]]);
        if n > MAX_RECORD || pos + (FRAME_HEADER + n) as u64 > len {
            break;
        }
        payload.resize(n, 0);
        reader.read_exact(&mut payload)?;
        if crc32fast::hash(&payload) != crc {
            break;
        }
        index.push(pos);
        pos += (FRAME_HEADER + n) as u64;
    }
    Ok((index, pos))
}

impl FileLog {
    /// Opens (creating if needed) the log in `dir`, cutting off a torn tail, and starts the
    /// writer thread. Fails if another process holds the log.
    pub fn open(dir: impl AsRef<Path>, options: FileLogOptions) -> Result<Self> {
        let dir = dir.as_ref();
        std::fs::create_dir_all(dir)?;
        let path = dir.join(FILE_NAME);
        let mut file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .read(true)
            .write(true)
            .open(&path)?;
        file.try_lock().map_err(|e| {
            Error::Unavailable(format!(
                "log {} is in use by another process: {e}",
                path.display()
            ))
        })?;
        let (index, end) = scan(&mut file)?;
        let len = file.metadata()?.len();
        if end < len {
            // Only a torn tail (the last group commit, cut short by a crash, never
            // acknowledged) may be cut. A bad frame followed by good ones is damage to
            // acknowledged orders: refuse to start rather than drop them.
            if len - end > MAX_TORN_TAIL || valid_frame_after(&mut file, end, len)? {
                return Err(Error::Corrupt(format!(
                    "{} is damaged at byte {end} of {len} with records after the damage; \
                     refusing to cut acknowledged orders (restore the file or move it aside)",
                    path.display()
                )));
            }
            tracing::warn!(path = %path.display(), at = end, "cutting torn tail of the order log");
            file.set_len(end)?;
            file.sync_all()?;
        }
        file.seek(SeekFrom::Start(end))?;
        let reader = File::open(&path)?;
        let (committed, _) = watch::channel(index.len() as u64);
        let shared = Arc::new(Shared {
            index: RwLock::new(index),
            failed: AtomicBool::new(false),
            reader,
            committed,
        });
        let (tx, rx) = crossbeam_channel::bounded(options.queue_capacity.max(1));
        let writer_shared = Arc::clone(&shared);
        std::thread::Builder::new()
            .name("order-log-writer".into())
            .spawn(move || writer(file, end, rx, writer_shared, options))?;
        Ok(FileLog { tx, shared, path })
    }

    /// Number of records durable in the log.
    pub fn len(&self) -> u64 {
        *self.shared.committed.borrow()
    }

    /// Whether the log holds no record.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Reads up to `max` records from `from` without waiting: one read of the whole span
    /// (frames are contiguous), payloads sliced out of it without copies.
    pub fn read_from(&self, from: u64, max: usize) -> Result<Vec<LogEntry>> {
        let (positions, span_end) = {
            let index = self.shared.index.read();
            let start = (from as usize).min(index.len());
            let end = start.saturating_add(max).min(index.len());
            (index[start..end].to_vec(), index.get(end).copied())
        };
        let (Some(&first), Some(&last)) = (positions.first(), positions.last()) else {
            return Ok(Vec::new());
        };
        let span_end = match span_end {
            Some(end) => end,
            None => {
                // The last committed frame ends where its header says.
                let mut header = [0u8; FRAME_HEADER];
                self.shared.reader.read_exact_at(&mut header, last)?;
                let n = u32::from_le_bytes([header[0], header[1], header[2], header[3]]);
                last + FRAME_HEADER as u64 + u64::from(n)
            }
        };
        let len = usize::try_from(span_end - first).map_err(|_| {
            std::io::Error::new(std::io::ErrorKind::InvalidData, "log span too large")
        })?;
        let mut buf = vec![0u8; len];
        self.shared.reader.read_exact_at(&mut buf, first)?;
        let buf = Bytes::from(buf);
        let mut out = Vec::with_capacity(positions.len());
        for (i, pos) in positions.into_iter().enumerate() {
            let at = (pos - first) as usize;
            let header = buf.get(at..at + FRAME_HEADER).ok_or_else(|| {
                std::io::Error::new(std::io::ErrorKind::InvalidData, "frame past the span")
            })?;
            let n = u32::from_le_bytes([header[0], header[1], header[2], header[3]]) as usize;
            let body = at + FRAME_HEADER;
            if body + n > buf.len() {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    "frame past the span",
                )
                .into());
            }
            out.push(LogEntry {
                position: LogPosition {
                    partition: 0,
                    offset: from + i as u64,
                },
                payload: buf.slice(body..body + n),
            });
        }
        Ok(out)
    }

    /// A consumer that starts at `from` (the settler's stored checkpoint).
    pub fn consumer(&self, from: u64) -> FileLogConsumer {
        FileLogConsumer {
            log: self.clone(),
            next: from,
            checkpoint: from,
            committed: self.shared.committed.subscribe(),
        }
    }

    /// Appends raw bytes (tests use it to write records the settler cannot decode).
    pub async fn append_raw(&self, payload: Vec<u8>) -> Result<LogPosition> {
        let start = Instant::now();
        let appended = self.append_raw_inner(payload).await;
        metrics().append(EMBEDDED, start.elapsed(), appended.is_ok());
        appended
    }

    async fn append_raw_inner(&self, payload: Vec<u8>) -> Result<LogPosition> {
        let (reply, rx) = oneshot::channel();
        match self.tx.try_send(Pending { payload, reply }) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) => {
                return Err(Error::Unavailable("order log queue is full".into()))
            }
            Err(TrySendError::Disconnected(_)) => {
                return Err(Error::Unavailable("order log is closed".into()))
            }
        }
        let offset = rx
            .await
            .map_err(|_| Error::Unavailable("order log writer stopped".into()))??;
        Ok(LogPosition {
            partition: 0,
            offset,
        })
    }
}

fn writer(
    mut file: File,
    mut end: u64,
    rx: Receiver<Pending>,
    shared: Arc<Shared>,
    options: FileLogOptions,
) {
    let mut batch: Vec<Pending> = Vec::with_capacity(options.max_batch);
    let mut buf: Vec<u8> = Vec::with_capacity(1 << 20);
    let mut failed: Option<String> = None;
    while let Ok(first) = rx.recv() {
        batch.push(first);
        while batch.len() < options.max_batch {
            match rx.try_recv() {
                Ok(p) => batch.push(p),
                Err(_) => break,
            }
        }
        if let Some(why) = &failed {
            for p in batch.drain(..) {
                let _ = p.reply.send(Err(Error::Unavailable(why.clone())));
            }
            continue;
        }
        buf.clear();
        let mut positions = Vec::with_capacity(batch.len());
        for p in &batch {
            positions.push(end + buf.len() as u64);
            buf.extend_from_slice(&(p.payload.len() as u32).to_le_bytes());
            buf.extend_from_slice(&crc32fast::hash(&p.payload).to_le_bytes());
            buf.extend_from_slice(&p.payload);
        }
        metrics().group_commit_records.observe(batch.len() as f64);
        let written = file.write_all(&buf).and_then(|()| {
            if options.fsync {
                let start = Instant::now();
                let synced = file.sync_data();
                metrics()
                    .fsync_duration
                    .observe(start.elapsed().as_secs_f64());
                synced
            } else {
                Ok(())
            }
        });
        if let Err(e) = written {
            // None of the batch is acknowledged, so none of it may stay: cut the file back
            // to the last acknowledged frame. If even that fails, stop taking records so
            // that nothing is ever acknowledged after frames that were refused.
            let why = format!("order log write failed: {e}");
            for p in batch.drain(..) {
                let _ = p.reply.send(Err(Error::Unavailable(why.clone())));
            }
            let cut = file
                .set_len(end)
                .and_then(|()| file.sync_all())
                .and_then(|()| file.seek(SeekFrom::Start(end)).map(drop));
            match cut {
                Ok(()) => {
                    tracing::error!(error = %e, "order log write failed; batch refused and cut off")
                }
                Err(cut_err) => {
                    tracing::error!(error = %e, cut_error = %cut_err, "order log write failed and could not be cut back; log closed for appends");
                    shared.failed.store(true, Ordering::Relaxed);
                    failed = Some(why);
                }
            }
            continue;
        }
        end += buf.len() as u64;
        let first_offset = {
            let mut index = shared.index.write();
            let first = index.len() as u64;
            index.extend_from_slice(&positions);
            first
        };
        shared
            .committed
            .send_replace(first_offset + batch.len() as u64);
        for (i, p) in batch.drain(..).enumerate() {
            let _ = p.reply.send(Ok(first_offset + i as u64));
        }
    }
}

#[async_trait]
impl OrderLog for FileLog {
    async fn append(&self, record: &OrderRecord) -> Result<LogPosition> {
        self.append_raw(encode(record)?).await
    }

    async fn ping(&self) -> Result<()> {
        if self.shared.failed.load(Ordering::Relaxed) {
            return Err(Error::Unavailable(
                "order log closed after a write it could not undo".into(),
            ));
        }
        if self.tx.is_full() {
            return Err(Error::Unavailable("order log queue is full".into()));
        }
        Ok(())
    }
}

/// Reads the embedded log from an offset. Its checkpoint lives in the order store, written
/// in the same transaction as the batch, so [`LogConsumer::commit`] only remembers it (for
/// [`LogConsumer::lag`]).
pub struct FileLogConsumer {
    log: FileLog,
    next: u64,
    /// The next offset after what was committed (the stored checkpoint).
    checkpoint: u64,
    committed: watch::Receiver<u64>,
}

impl std::fmt::Debug for FileLogConsumer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FileLogConsumer")
            .field("next", &self.next)
            .finish()
    }
}

#[async_trait]
impl LogConsumer for FileLogConsumer {
    async fn poll(&mut self, max: usize, wait: Duration) -> Result<Vec<LogEntry>> {
        let next = self.next;
        if *self.committed.borrow_and_update() <= next {
            let timed_out = tokio::time::timeout(wait, self.committed.wait_for(|c| *c > next))
                .await
                .is_err();
            if timed_out {
                return Ok(Vec::new());
            }
            // Records arrive in group commits of a few at moderate rates: let the batch
            // fill for a moment (at most `BATCH_LINGER`) rather than take them one by one.
            let want = next.saturating_add(max as u64);
            let _filled = tokio::time::timeout(
                BATCH_LINGER.min(wait),
                self.committed.wait_for(|c| *c >= want),
            )
            .await
            .is_ok();
        }
        let entries = self.log.read_from(next, max)?;
        self.next += entries.len() as u64;
        Ok(entries)
    }

    async fn commit(&mut self, positions: &[LogPosition]) -> Result<()> {
        if let Some(last) = positions.iter().map(|p| p.offset).max() {
            self.checkpoint = self.checkpoint.max(last + 1);
        }
        Ok(())
    }

    fn lag(&self) -> Vec<PartitionLag> {
        vec![PartitionLag {
            partition: 0,
            end_offset: self.log.len(),
            committed: self.checkpoint,
        }]
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::{decode, sample};

    #[tokio::test]
    async fn appends_are_durable_and_read_back_in_order() {
        let dir = tempfile::tempdir().expect("tempdir");
        let log = FileLog::open(dir.path(), FileLogOptions::default()).expect("open");
        let mut handles = Vec::new();
        for i in 0..500 {
            let log = log.clone();
            handles.push(tokio::spawn(async move { log.append(&sample(i)).await }));
        }
        let mut offsets = Vec::new();
        for h in handles {
            offsets.push(h.await.expect("join").expect("append").offset);
        }
        offsets.sort_unstable();
        assert_eq!(offsets, (0..500).collect::<Vec<_>>());
        let mut consumer = log.consumer(0);
        let mut seen = 0;
        while seen < 500 {
            let batch = consumer
                .poll(128, Duration::from_secs(5))
                .await
                .expect("poll");
            assert!(!batch.is_empty(), "records must be readable");
            for e in batch {
                assert_eq!(e.position.offset, seen);
                decode(&e.payload).expect("decodes");
                seen += 1;
            }
        }
        assert!(consumer
            .poll(10, Duration::from_millis(20))
            .await
            .expect("poll")
            .is_empty());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn appends_record_latency_group_commits_and_fsyncs_and_the_consumer_reports_lag() {
        use crate::metrics::sample as metric;
        let appends = "flashsale_log_append_duration_seconds_count{log=\"embedded\"}";
        let commits = "flashsale_log_group_commit_records_count";
        let fsyncs = "flashsale_log_fsync_duration_seconds_count";
        let records = "flashsale_log_group_commit_records_sum";
        let before = [appends, commits, fsyncs, records].map(metric);
        let dir = tempfile::tempdir().expect("tempdir");
        let log = FileLog::open(dir.path(), FileLogOptions::default()).expect("open");
        let mut handles = Vec::new();
        for i in 0..50 {
            let log = log.clone();
            handles.push(tokio::spawn(async move { log.append(&sample(i)).await }));
        }
        for h in handles {
            h.await.expect("join").expect("append");
        }
        let after = [appends, commits, fsyncs, records].map(metric);
        // Other tests of this process may append meanwhile: at least ours are counted.
        assert!(
            after[0] - before[0] >= 50.0,
            "appends {before:?} -> {after:?}"
        );
        assert!(
            after[1] - before[1] >= 1.0,
            "group commits {before:?} -> {after:?}"
        );
        assert!(
            after[2] - before[2] >= 1.0,
            "fsyncs {before:?} -> {after:?}"
        );
        assert!(
            after[3] - before[3] >= 50.0,
            "records committed {before:?} -> {after:?}"
        );

        let mut consumer = log.consumer(5);
        let lag = consumer.lag();
        assert_eq!(
            lag,
            vec![PartitionLag {
                partition: 0,
                end_offset: 50,
                committed: 5
            }]
        );
        assert_eq!(lag[0].records(), 45);
        let batch = consumer
            .poll(10, Duration::from_secs(5))
            .await
            .expect("poll");
        assert_eq!(consumer.lag()[0].records(), 45, "read is not committed");
        consumer
            .commit(&batch.iter().map(|e| e.position).collect::<Vec<_>>())
            .await
            .expect("commit");
        assert_eq!(consumer.lag()[0].committed, 15);
        assert_eq!(consumer.lag()[0].records(), 35);
    }

    #[tokio::test]
    async fn reopening_cuts_a_torn_tail_and_keeps_the_rest() {
        let dir = tempfile::tempdir().expect("tempdir");
        {
            let log = FileLog::open(dir.path(), FileLogOptions::default()).expect("open");
            for i in 0..10 {
                log.append(&sample(i)).await.expect("append");
            }
            assert!(
                FileLog::open(dir.path(), FileLogOptions::default()).is_err(),
                "a second writer must be refused"
            );
        }
        // Simulate a crash mid-write: half a frame at the end.
        let path = dir.path().join(FILE_NAME);
        let mut f = OpenOptions::new().append(true).open(&path).expect("open");
        f.write_all(&[200, 0, 0, 0, 1, 2, 3, 4, 5]).expect("write");
        drop(f);
        // The writer thread of the first log may still hold the lock briefly.
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        let log = loop {
            match FileLog::open(dir.path(), FileLogOptions::default()) {
                Ok(l) => break l,
                Err(e) if std::time::Instant::now() > deadline => panic!("reopen: {e}"),
                Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
            }
        };
        assert_eq!(log.len(), 10);
        let pos = log.append(&sample(10)).await.expect("append");
        assert_eq!(pos.offset, 10);
        assert_eq!(log.read_from(0, 100).expect("read").len(), 11);
    }

    #[tokio::test]
    async fn damage_before_intact_records_refuses_to_open() {
        let dir = tempfile::tempdir().expect("tempdir");
        {
            let log = FileLog::open(dir.path(), FileLogOptions::default()).expect("open");
            for i in 0..10 {
                log.append(&sample(i)).await.expect("append");
            }
        }
        // Flip a byte inside the third record's payload.
        let path = dir.path().join(FILE_NAME);
        let mut bytes = std::fs::read(&path).expect("read");
        let third = {
            let mut pos = 0usize;
            for _ in 0..2 {
                let n = u32::from_le_bytes([
                    bytes[pos],
                    bytes[pos + 1],
                    bytes[pos + 2],
                    bytes[pos + 3],
                ]);
                pos += FRAME_HEADER + n as usize;
            }
            pos
        };
        bytes[third + FRAME_HEADER + 5] ^= 0xff;
        std::fs::write(&path, &bytes).expect("write");
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        let err = loop {
            match FileLog::open(dir.path(), FileLogOptions::default()) {
                Err(Error::Corrupt(e)) => break e,
                Err(Error::Unavailable(_)) if std::time::Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(10)).await
                }
                Err(e) => panic!("unexpected error {e}"),
                Ok(_) => panic!("a damaged log with records after the damage must not open"),
            }
        };
        assert!(err.contains("refusing"), "{err}");
        assert_eq!(
            std::fs::read(&path).expect("read").len(),
            bytes.len(),
            "nothing was cut"
        );
    }
}
