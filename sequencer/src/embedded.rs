//! The embedded order log: append-only segment files with group commit.
//!
//! Appends go through a bounded channel to one writer thread. The writer takes every record
//! waiting (up to `max_batch`), writes their frames with one `write`, calls `fdatasync` once,
//! and only then completes the appends: many buyers share one disk flush, and no append
//! returns before its record is on disk. A frame is `len: u32 LE | crc32: u32 LE | payload`;
//! on open, a torn or corrupt tail (a crash mid-write) is cut off, since no append of it
//! ever returned. The directory is locked so that two processes never write one log.
//!
//! Segments: the log is a sequence of files `{base:020}.seg`, each holding the records from
//! offset `base` on. Past `segment_bytes` (checked after each group commit, so a group
//! never spans two files) the writer seals the segment: it writes its index file
//! `{base:020}.idx` (record count, byte length, the position of every
//! [`SPARSE`]-th record, crc32) and starts the next segment. Memory holds only that sparse
//! index per segment (a reader scans at most `SPARSE - 1` frames to its offset), and on
//! open a sealed segment whose index matches its length is not read at all; only the live
//! (last) segment is scanned. [`FileLog::delete_before`] deletes sealed segments wholly
//! before an offset; offsets never change, and [`FileLog::start_offset`] says where the log
//! starts now.
//!
//! Older versions wrote one file, `orders-0.log`, with the same frames: it is migrated on
//! open by renaming it to the first segment (`00000000000000000000.seg`).
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
/// The single file of logs written before segments; migrated on open.
const LEGACY_FILE: &str = "orders-0.log";
const LOCK_FILE: &str = "lock";
/// One record in this many has its position in memory (and in a sealed segment's index).
pub const SPARSE: u64 = 64;
/// How much a read takes from the file at once.
const READ_CHUNK: u64 = 1 << 20;
const INDEX_MAGIC: &[u8; 8] = b"FSLOGIX1";

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
    /// A segment is sealed, and the next one started, once it holds this many bytes.
    pub segment_bytes: u64,
}

impl Default for FileLogOptions {
    fn default() -> Self {
        FileLogOptions {
            fsync: true,
            max_batch: 4096,
            queue_capacity: 65_536,
            segment_bytes: 64 << 20,
        }
    }
}

/// How long a consumer's poll waits for its batch to fill once the first record is there.
const BATCH_LINGER: Duration = Duration::from_millis(2);

struct Pending {
    payload: Vec<u8>,
    reply: oneshot::Sender<Result<u64>>,
}

/// One segment file as readers see it.
#[derive(Clone)]
struct Segment {
    base: u64,
    /// Committed records.
    count: u64,
    /// Committed bytes.
    bytes: u64,
    /// Position of records `base`, `base + SPARSE`, ...
    sparse: Vec<u32>,
    file: Arc<File>,
    path: PathBuf,
}

impl Segment {
    fn end(&self) -> u64 {
        self.base + self.count
    }
}

struct Shared {
    /// The segments, oldest first; the last one is written.
    segments: RwLock<Vec<Segment>>,
    /// Set when a failed write could not be undone: the log takes no more records.
    failed: AtomicBool,
    committed: watch::Sender<u64>,
}

/// The embedded [`OrderLog`]: durable, single partition.
#[derive(Clone)]
pub struct FileLog {
    tx: Sender<Pending>,
    shared: Arc<Shared>,
    dir: PathBuf,
}

impl std::fmt::Debug for FileLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FileLog").field("dir", &self.dir).finish()
    }
}

/// Longest tail a crash can leave: one group commit of `max_batch` frames is written with
/// one `write`, so a torn tail is far shorter than this.
const MAX_TORN_TAIL: u64 = 64 << 20;

/// The file of the segment whose first record has offset `base`.
pub(crate) fn segment_path(dir: &Path, base: u64) -> PathBuf {
    dir.join(format!("{base:020}.seg"))
}

fn index_path(dir: &Path, base: u64) -> PathBuf {
    dir.join(format!("{base:020}.idx"))
}

fn corrupt(msg: impl Into<String>) -> Error {
    Error::Corrupt(msg.into())
}

fn invalid(msg: &'static str) -> Error {
    std::io::Error::new(std::io::ErrorKind::InvalidData, msg).into()
}

/// An append refused because writing the log failed with `e`.
fn write_failed(e: &Arc<std::io::Error>) -> Error {
    Error::unavailable("order log write failed", Arc::clone(e))
}

fn sync_dir(dir: &Path) -> std::io::Result<()> {
    File::open(dir)?.sync_all()
}

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

/// What a scan of a segment found.
struct Scanned {
    count: u64,
    sparse: Vec<u32>,
    /// End of the last intact frame.
    end: u64,
}

/// Scans frames from the start of a segment.
fn scan(file: &mut File) -> std::io::Result<Scanned> {
    let len = file.metadata()?.len();
    file.seek(SeekFrom::Start(0))?;
    let mut reader = std::io::BufReader::with_capacity(1 << 20, &mut *file);
    let mut sparse = Vec::new();
    let mut count = 0u64;
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
        if count.is_multiple_of(SPARSE) {
            sparse.push(pos as u32);
        }
        count += 1;
        pos += (FRAME_HEADER + n) as u64;
    }
    Ok(Scanned {
        count,
        sparse,
        end: pos,
    })
}

/// Writes a sealed segment's index: magic, count, bytes, sparse positions, crc32.
fn write_index(path: &Path, count: u64, bytes: u64, sparse: &[u32]) -> std::io::Result<()> {
    let mut buf = Vec::with_capacity(28 + 4 * sparse.len());
    buf.extend_from_slice(INDEX_MAGIC);
    buf.extend_from_slice(&count.to_le_bytes());
    buf.extend_from_slice(&bytes.to_le_bytes());
    for p in sparse {
        buf.extend_from_slice(&p.to_le_bytes());
    }
    let crc = crc32fast::hash(&buf);
    buf.extend_from_slice(&crc.to_le_bytes());
    let tmp = path.with_extension("idx.tmp");
    let mut f = File::create(&tmp)?;
    f.write_all(&buf)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)
}

/// Reads a sealed segment's index if it is intact and describes `len` bytes.
fn read_index(path: &Path, len: u64) -> Option<Scanned> {
    let buf = std::fs::read(path).ok()?;
    if buf.len() < 28 || &buf[..8] != INDEX_MAGIC || (buf.len() - 28) % 4 != 0 {
        return None;
    }
    let (body, crc) = buf.split_at(buf.len() - 4);
    if crc32fast::hash(body) != u32::from_le_bytes(crc.try_into().ok()?) {
        return None;
    }
    let count = u64::from_le_bytes(body[8..16].try_into().ok()?);
    let bytes = u64::from_le_bytes(body[16..24].try_into().ok()?);
    let sparse: Vec<u32> = body[24..]
        .chunks_exact(4)
        .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect();
    (bytes == len && sparse.len() as u64 == count.div_ceil(SPARSE)).then_some(Scanned {
        count,
        sparse,
        end: bytes,
    })
}

/// The segment bases in `dir`, sorted.
fn list_segments(dir: &Path) -> std::io::Result<Vec<u64>> {
    let mut bases = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let name = entry?.file_name();
        let Some(name) = name.to_str() else { continue };
        if let Some(base) = name.strip_suffix(".seg") {
            if let Ok(base) = base.parse::<u64>() {
                bases.push(base);
            }
        }
    }
    bases.sort_unstable();
    Ok(bases)
}

/// Renames the single file of an older version to the first segment (same frames).
fn migrate_legacy(dir: &Path, bases: &[u64]) -> Result<bool> {
    let legacy = dir.join(LEGACY_FILE);
    if !legacy.exists() {
        return Ok(false);
    }
    if !bases.is_empty() {
        return Err(corrupt(format!(
            "{} holds both {LEGACY_FILE} (the single-file log of an older version) and \
             segment files; move one of them aside",
            dir.display()
        )));
    }
    tracing::info!(dir = %dir.display(), "migrating the single-file order log to segments");
    std::fs::rename(&legacy, segment_path(dir, 0))?;
    sync_dir(dir)?;
    Ok(true)
}

/// Opens a sealed segment: from its index when it matches, else by a scan, which must
/// find the whole file intact (damage inside a sealed segment cannot be a torn tail).
fn open_sealed(dir: &Path, base: u64) -> Result<Segment> {
    let path = segment_path(dir, base);
    let mut file = File::open(&path)?;
    let len = file.metadata()?.len();
    let found = match read_index(&index_path(dir, base), len) {
        Some(found) => found,
        None => {
            let found = scan(&mut file)?;
            if found.end != len {
                return Err(corrupt(format!(
                    "{} is damaged at byte {} of {len}, and it is not the last segment; \
                     refusing to cut acknowledged orders (restore the file or move the log \
                     aside)",
                    path.display(),
                    found.end
                )));
            }
            write_index(&index_path(dir, base), found.count, len, &found.sparse)?;
            found
        }
    };
    Ok(Segment {
        base,
        count: found.count,
        bytes: found.end,
        sparse: found.sparse,
        file: Arc::new(file),
        path,
    })
}

/// Opens the live segment for writing, cutting a torn tail off.
fn open_live(dir: &Path, base: u64) -> Result<(Segment, File)> {
    let path = segment_path(dir, base);
    let mut file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .read(true)
        .write(true)
        .open(&path)?;
    let found = scan(&mut file)?;
    let len = file.metadata()?.len();
    if found.end < len {
        // Only a torn tail (the last group commit, cut short by a crash, never
        // acknowledged) may be cut. A bad frame followed by good ones is damage to
        // acknowledged orders: refuse to start rather than drop them.
        if len - found.end > MAX_TORN_TAIL || valid_frame_after(&mut file, found.end, len)? {
            return Err(corrupt(format!(
                "{} is damaged at byte {} of {len} with records after the damage; \
                 refusing to cut acknowledged orders (restore the file or move it aside)",
                path.display(),
                found.end
            )));
        }
        tracing::warn!(path = %path.display(), at = found.end, "cutting torn tail of the order log");
        file.set_len(found.end)?;
        file.sync_all()?;
    }
    file.seek(SeekFrom::Start(found.end))?;
    let reader = File::open(&path)?;
    Ok((
        Segment {
            base,
            count: found.count,
            bytes: found.end,
            sparse: found.sparse,
            file: Arc::new(reader),
            path,
        },
        file,
    ))
}

impl FileLog {
    /// Opens (creating if needed) the log in `dir`, migrating a single-file log of an older
    /// version, cutting off a torn tail, and starts the writer thread. Fails if another
    /// process holds the log.
    pub fn open(dir: impl AsRef<Path>, mut options: FileLogOptions) -> Result<Self> {
        // Positions inside a segment are u32.
        options.segment_bytes = options.segment_bytes.clamp(1, 1 << 30);
        let dir = dir.as_ref();
        std::fs::create_dir_all(dir)?;
        let lock = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(dir.join(LOCK_FILE))?;
        lock.try_lock().map_err(|e| {
            Error::unavailable(
                format!("log {} is in use by another process", dir.display()),
                e,
            )
        })?;
        let mut bases = list_segments(dir)?;
        if migrate_legacy(dir, &bases)? {
            bases = vec![0];
        }
        if bases.is_empty() {
            bases.push(0);
        }
        let mut segments = Vec::with_capacity(bases.len());
        let last = bases.len() - 1;
        for &base in &bases[..last] {
            segments.push(open_sealed(dir, base)?);
        }
        let (live, file) = open_live(dir, bases[last])?;
        segments.push(live);
        for pair in segments.windows(2) {
            if pair[0].end() != pair[1].base {
                return Err(corrupt(format!(
                    "{} ends at offset {} but the next segment starts at {}: a segment is \
                     missing or damaged",
                    pair[0].path.display(),
                    pair[0].end(),
                    pair[1].base
                )));
            }
        }
        let end = segments.last().map_or(0, Segment::end);
        let (committed, _) = watch::channel(end);
        let shared = Arc::new(Shared {
            segments: RwLock::new(segments),
            failed: AtomicBool::new(false),
            committed,
        });
        let (tx, rx) = crossbeam_channel::bounded(options.queue_capacity.max(1));
        let writer_shared = Arc::clone(&shared);
        let writer_dir = dir.to_path_buf();
        std::thread::Builder::new()
            .name("order-log-writer".into())
            .spawn(move || {
                // The lock lives as long as the writer.
                let _lock = lock;
                writer(file, writer_dir, rx, writer_shared, options)
            })?;
        Ok(FileLog {
            tx,
            shared,
            dir: dir.to_path_buf(),
        })
    }

    /// The offset the next record gets (records ever appended, deleted ones included).
    pub fn len(&self) -> u64 {
        *self.shared.committed.borrow()
    }

    /// Whether the log never held a record.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The first offset still held (records before it were deleted with their segments).
    pub fn start_offset(&self) -> u64 {
        self.shared.segments.read().first().map_or(0, |s| s.base)
    }

    /// Segment files held now.
    pub fn segment_count(&self) -> usize {
        self.shared.segments.read().len()
    }

    /// Deletes every sealed segment whose records are all before `offset` (the live
    /// segment stays). Returns how many were deleted. Readers holding one keep reading it.
    pub fn delete_before(&self, offset: u64) -> Result<usize> {
        let gone: Vec<Segment> = {
            let mut segments = self.shared.segments.write();
            let n = segments
                .iter()
                .take(segments.len().saturating_sub(1))
                .take_while(|s| s.end() <= offset)
                .count();
            segments.drain(..n).collect()
        };
        for s in &gone {
            std::fs::remove_file(&s.path)?;
            let _ = std::fs::remove_file(index_path(&self.dir, s.base));
            tracing::info!(segment = %s.path.display(), "deleted a settled segment of the order log");
        }
        if !gone.is_empty() {
            sync_dir(&self.dir)?;
        }
        Ok(gone.len())
    }

    /// Reads up to `max` records from `from` without waiting (fewer at a segment's end; an
    /// empty answer means `from` is the end of the log). Fails for an offset before
    /// [`start_offset`](Self::start_offset).
    pub fn read_from(&self, from: u64, max: usize) -> Result<Vec<LogEntry>> {
        let (file, mut pos, mut skip, want, span_end) = {
            let segments = self.shared.segments.read();
            let start = segments.first().map_or(0, |s| s.base);
            if from < start {
                return Err(Error::unavailable_msg(format!(
                    "offset {from} was deleted; the log starts at {start}"
                )));
            }
            let i = segments
                .partition_point(|s| s.base <= from)
                .saturating_sub(1);
            let Some(seg) = segments.get(i) else {
                return Ok(Vec::new());
            };
            if from >= seg.end() || max == 0 {
                return Ok(Vec::new());
            }
            let rel = from - seg.base;
            let slot = (rel / SPARSE) as usize;
            let pos = u64::from(
                *seg.sparse
                    .get(slot)
                    .ok_or_else(|| invalid("sparse index"))?,
            );
            let want = (seg.end() - from).min(max as u64) as usize;
            // The wanted records end before the next indexed record after them starts: read
            // no further than that.
            let next_slot = (rel + want as u64).div_ceil(SPARSE) as usize;
            let span_end = seg
                .sparse
                .get(next_slot)
                .map_or(seg.bytes, |p| u64::from(*p).min(seg.bytes));
            (
                Arc::clone(&seg.file),
                pos,
                rel - slot as u64 * SPARSE,
                want,
                span_end,
            )
        };
        let mut out = Vec::with_capacity(want);
        while out.len() < want && pos < span_end {
            let len = (span_end - pos).min(READ_CHUNK) as usize;
            let mut buf = vec![0u8; len];
            file.read_exact_at(&mut buf, pos)?;
            let mut buf = Bytes::from(buf);
            let mut at = 0usize;
            while out.len() < want {
                let Some(header) = buf.get(at..at + FRAME_HEADER) else {
                    break;
                };
                let n = u32::from_le_bytes([header[0], header[1], header[2], header[3]]) as usize;
                if n > MAX_RECORD {
                    return Err(invalid("frame length past the largest record"));
                }
                let body = at + FRAME_HEADER;
                if body + n > buf.len() {
                    if at > 0 {
                        break;
                    }
                    // A frame larger than one chunk: read it whole.
                    if pos + (FRAME_HEADER + n) as u64 > span_end {
                        return Err(invalid("frame past the span the index gives"));
                    }
                    let mut whole = vec![0u8; FRAME_HEADER + n];
                    file.read_exact_at(&mut whole, pos)?;
                    buf = Bytes::from(whole);
                }
                if skip > 0 {
                    skip -= 1;
                } else {
                    out.push(LogEntry {
                        position: LogPosition {
                            partition: 0,
                            offset: from + out.len() as u64,
                        },
                        payload: buf.slice(body..body + n),
                    });
                }
                at = body + n;
            }
            if at == 0 {
                return Err(invalid("no frame where the index says"));
            }
            pos += at as u64;
        }
        if out.len() < want {
            return Err(invalid("segment ends before its committed records"));
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
                return Err(Error::unavailable_msg("order log queue is full"))
            }
            Err(TrySendError::Disconnected(_)) => {
                return Err(Error::unavailable_msg("order log is closed"))
            }
        }
        let offset = rx
            .await
            .map_err(|_| Error::unavailable_msg("order log writer stopped"))??;
        Ok(LogPosition {
            partition: 0,
            offset,
        })
    }
}

/// The writer's live segment.
struct Live {
    file: File,
    base: u64,
    count: u64,
    end: u64,
}

/// Seals the live segment (its index written) and starts the next one.
fn roll(dir: &Path, live: &mut Live, shared: &Shared) -> std::io::Result<()> {
    let sparse = {
        let segments = shared.segments.read();
        segments
            .last()
            .map(|s| s.sparse.clone())
            .unwrap_or_default()
    };
    write_index(&index_path(dir, live.base), live.count, live.end, &sparse)?;
    let base = live.base + live.count;
    let path = segment_path(dir, base);
    let file = OpenOptions::new()
        .create(true)
        .truncate(true)
        .read(true)
        .write(true)
        .open(&path)?;
    let reader = match sync_dir(dir).and_then(|()| File::open(&path)) {
        Ok(reader) => reader,
        Err(e) => {
            // Not started: the sealed segment stays the live one.
            let _ = std::fs::remove_file(&path);
            return Err(e);
        }
    };
    shared.segments.write().push(Segment {
        base,
        count: 0,
        bytes: 0,
        sparse: Vec::new(),
        file: Arc::new(reader),
        path,
    });
    *live = Live {
        file,
        base,
        count: 0,
        end: 0,
    };
    Ok(())
}

fn writer(
    file: File,
    dir: PathBuf,
    rx: Receiver<Pending>,
    shared: Arc<Shared>,
    options: FileLogOptions,
) {
    let mut live = {
        let segments = shared.segments.read();
        let last = segments.last().expect("a log has a live segment");
        Live {
            file,
            base: last.base,
            count: last.count,
            end: last.bytes,
        }
    };
    let mut batch: Vec<Pending> = Vec::with_capacity(options.max_batch);
    let mut buf: Vec<u8> = Vec::with_capacity(1 << 20);
    // The write error that closed the log, given to every later append as its cause.
    let mut failed: Option<Arc<std::io::Error>> = None;
    while let Ok(first) = rx.recv() {
        batch.push(first);
        while batch.len() < options.max_batch {
            match rx.try_recv() {
                Ok(p) => batch.push(p),
                Err(_) => break,
            }
        }
        if let Some(e) = &failed {
            for p in batch.drain(..) {
                let _ = p.reply.send(Err(write_failed(e)));
            }
            continue;
        }
        buf.clear();
        let mut sparse = Vec::new();
        for (i, p) in batch.iter().enumerate() {
            if (live.count + i as u64).is_multiple_of(SPARSE) {
                sparse.push((live.end + buf.len() as u64) as u32);
            }
            buf.extend_from_slice(&(p.payload.len() as u32).to_le_bytes());
            buf.extend_from_slice(&crc32fast::hash(&p.payload).to_le_bytes());
            buf.extend_from_slice(&p.payload);
        }
        metrics().group_commit_records.observe(batch.len() as f64);
        let written = live.file.write_all(&buf).and_then(|()| {
            if options.fsync {
                let start = Instant::now();
                let synced = live.file.sync_data();
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
            let e = Arc::new(e);
            for p in batch.drain(..) {
                let _ = p.reply.send(Err(write_failed(&e)));
            }
            let end = live.end;
            let cut = live
                .file
                .set_len(end)
                .and_then(|()| live.file.sync_all())
                .and_then(|()| live.file.seek(SeekFrom::Start(end)).map(drop));
            match cut {
                Ok(()) => {
                    tracing::error!(error = %e, "order log write failed; batch refused and cut off")
                }
                Err(cut_err) => {
                    tracing::error!(error = %e, cut_error = %cut_err, "order log write failed and could not be cut back; log closed for appends");
                    shared.failed.store(true, Ordering::Relaxed);
                    failed = Some(e);
                }
            }
            continue;
        }
        live.end += buf.len() as u64;
        live.count += batch.len() as u64;
        let first_offset = {
            let mut segments = shared.segments.write();
            let seg = segments.last_mut().expect("a log has a live segment");
            let first = seg.end();
            seg.count = live.count;
            seg.bytes = live.end;
            seg.sparse.extend_from_slice(&sparse);
            first
        };
        shared
            .committed
            .send_replace(first_offset + batch.len() as u64);
        for (i, p) in batch.drain(..).enumerate() {
            let _ = p.reply.send(Ok(first_offset + i as u64));
        }
        if live.end >= options.segment_bytes {
            if let Err(e) = roll(&dir, &mut live, &shared) {
                // The full segment keeps taking records; the next group commit retries.
                tracing::error!(error = %e, "could not start a new segment of the order log");
            }
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
            return Err(Error::unavailable_msg(
                "order log closed after a write it could not undo",
            ));
        }
        if self.tx.is_full() {
            return Err(Error::unavailable_msg("order log queue is full"));
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
        let path = segment_path(dir.path(), 0);
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
        let path = segment_path(dir.path(), 0);
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
                Err(Error::Unavailable { .. }) if std::time::Instant::now() < deadline => {
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

    fn small_segments() -> FileLogOptions {
        FileLogOptions {
            segment_bytes: 4096,
            ..FileLogOptions::default()
        }
    }

    async fn reopen(dir: &Path, options: FileLogOptions) -> FileLog {
        // The writer thread of the previous log may still hold the lock briefly.
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        loop {
            match FileLog::open(dir, options.clone()) {
                Ok(l) => break l,
                Err(e) if std::time::Instant::now() > deadline => panic!("reopen: {e}"),
                Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
            }
        }
    }

    fn offsets_of(log: &FileLog, from: u64) -> Vec<u64> {
        let mut out = Vec::new();
        let mut next = from;
        loop {
            let batch = log.read_from(next, 37).expect("read");
            if batch.is_empty() {
                break out;
            }
            for e in batch {
                assert_eq!(e.position.offset, next);
                let r = decode(&e.payload).expect("decodes");
                assert_eq!(r.sequence, sample(next).sequence, "record at {next}");
                out.push(next);
                next += 1;
            }
        }
    }

    #[tokio::test]
    async fn segments_roll_read_back_from_every_offset_and_settled_ones_are_deleted() {
        let dir = tempfile::tempdir().expect("tempdir");
        let log = FileLog::open(dir.path(), small_segments()).expect("open");
        for i in 0..400 {
            log.append(&sample(i)).await.expect("append");
        }
        let segments = log.segment_count();
        assert!(segments > 5, "4 KiB segments: {segments}");
        assert_eq!(offsets_of(&log, 0), (0..400).collect::<Vec<_>>());
        for from in [1, 63, 64, 65, 130, 399] {
            assert_eq!(
                log.read_from(from, 1).expect("read")[0].position.offset,
                from
            );
        }
        drop(log);
        // Sealed segments reopen from their index; offsets survive.
        let log = reopen(dir.path(), small_segments()).await;
        assert_eq!(log.len(), 400);
        assert_eq!(log.segment_count(), segments);
        let indexes = std::fs::read_dir(dir.path())
            .expect("dir")
            .filter(|e| {
                e.as_ref()
                    .expect("entry")
                    .file_name()
                    .to_string_lossy()
                    .ends_with(".idx")
            })
            .count();
        assert_eq!(indexes, segments - 1, "every sealed segment has its index");
        assert_eq!(offsets_of(&log, 0), (0..400).collect::<Vec<_>>());
        // Delete what is wholly before offset 200; the segment holding 200 stays.
        let deleted = log.delete_before(200).expect("delete");
        assert!(deleted >= 2, "{deleted}");
        let start = log.start_offset();
        assert!(start > 0 && start <= 200, "{start}");
        assert!(
            log.read_from(start - 1, 1).is_err(),
            "deleted offsets are refused"
        );
        assert_eq!(offsets_of(&log, start), (start..400).collect::<Vec<_>>());
        log.delete_before(u64::MAX).expect("delete");
        assert_eq!(log.segment_count(), 1, "the live segment always stays");
        let pos = log.append(&sample(400)).await.expect("append");
        assert_eq!(pos.offset, 400);
        drop(log);
        let log = reopen(dir.path(), small_segments()).await;
        assert_eq!((log.start_offset() <= 400, log.len()), (true, 401));
        assert_eq!(
            log.read_from(400, 10).expect("read")[0].position.offset,
            400
        );
    }

    #[tokio::test]
    async fn a_single_file_log_of_an_older_version_is_migrated_on_open() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut bytes = Vec::new();
        for i in 0..100 {
            let payload = encode(&sample(i)).expect("encode");
            bytes.extend_from_slice(&(payload.len() as u32).to_le_bytes());
            bytes.extend_from_slice(&crc32fast::hash(&payload).to_le_bytes());
            bytes.extend_from_slice(&payload);
        }
        std::fs::write(dir.path().join(LEGACY_FILE), &bytes).expect("write");
        let log = FileLog::open(dir.path(), FileLogOptions::default()).expect("open");
        assert_eq!(log.len(), 100);
        assert!(!dir.path().join(LEGACY_FILE).exists());
        assert!(segment_path(dir.path(), 0).exists());
        assert_eq!(offsets_of(&log, 0), (0..100).collect::<Vec<_>>());
        assert_eq!(log.append(&sample(100)).await.expect("append").offset, 100);
    }
}
