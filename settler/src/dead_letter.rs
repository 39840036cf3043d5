//! Where log records go that the settler cannot decode, so that one bad record never stops
//! its partition.
//!
//! A record is handed to the [`DeadLetter`] sink before the checkpoint moves past it, so it
//! is kept at least once (a crash in between keeps it twice). [`FileDeadLetter`] is the
//! embedded sink: one JSON line per record in `dead-letter.jsonl`. [`LogDeadLetter`] only
//! logs, for a settler that was given no place to keep them.

use async_trait::async_trait;
use parking_lot::Mutex;
use sequencer::{LogEntry, RecordError};
use serde::Serialize;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use storage::Timestamp;

/// Name of the file [`FileDeadLetter`] appends to.
pub const DEAD_LETTER_FILE: &str = "dead-letter.jsonl";

/// A place for records that cannot be decoded.
#[async_trait]
pub trait DeadLetter: Send + Sync + 'static {
    /// Keeps `entry`, which failed to decode with `error`; returns once it is kept.
    async fn send(&self, entry: &LogEntry, error: &RecordError) -> std::io::Result<()>;
}

/// One line of `dead-letter.jsonl`.
#[derive(Serialize)]
struct Line<'a> {
    at: Timestamp,
    partition: u32,
    offset: u64,
    error: String,
    /// The payload as text when it is UTF-8.
    #[serde(skip_serializing_if = "Option::is_none")]
    payload: Option<&'a str>,
    /// The payload in hex when it is not.
    #[serde(skip_serializing_if = "Option::is_none")]
    payload_hex: Option<String>,
}

fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        out.push(char::from(DIGITS[usize::from(b >> 4)]));
        out.push(char::from(DIGITS[usize::from(b & 0xf)]));
    }
    out
}

fn encode_line(entry: &LogEntry, error: &RecordError) -> std::io::Result<Vec<u8>> {
    let text = std::str::from_utf8(&entry.payload).ok();
    let line = Line {
        at: Timestamp::now(),
        partition: entry.position.partition,
        offset: entry.position.offset,
        error: error.to_string(),
        payload: text,
        payload_hex: if text.is_none() {
            Some(hex(&entry.payload))
        } else {
            None
        },
    };
    let mut bytes = serde_json::to_vec(&line)?;
    bytes.push(b'\n');
    Ok(bytes)
}

/// The embedded dead-letter sink: appends one JSON line per record to
/// `DIR/dead-letter.jsonl` and flushes it to disk before returning.
pub struct FileDeadLetter {
    path: PathBuf,
    file: Arc<Mutex<File>>,
    count: AtomicU64,
}

impl std::fmt::Debug for FileDeadLetter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FileDeadLetter")
            .field("path", &self.path)
            .field("count", &self.count())
            .finish()
    }
}

impl FileDeadLetter {
    /// Opens (creating if needed) `dir/dead-letter.jsonl` for appending.
    pub fn open(dir: impl AsRef<Path>) -> std::io::Result<Self> {
        let dir = dir.as_ref();
        std::fs::create_dir_all(dir)?;
        let path = dir.join(DEAD_LETTER_FILE);
        let file = OpenOptions::new().create(true).append(true).open(&path)?;
        Ok(FileDeadLetter {
            path,
            file: Arc::new(Mutex::new(file)),
            count: AtomicU64::new(0),
        })
    }

    /// The file records are appended to.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Records kept by this sink since it was opened.
    pub fn count(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }
}

#[async_trait]
impl DeadLetter for FileDeadLetter {
    async fn send(&self, entry: &LogEntry, error: &RecordError) -> std::io::Result<()> {
        let line = encode_line(entry, error)?;
        let file = Arc::clone(&self.file);
        tokio::task::spawn_blocking(move || {
            let mut file = file.lock();
            file.write_all(&line)?;
            file.sync_data()
        })
        .await
        .map_err(std::io::Error::other)??;
        self.count.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(
            partition = entry.position.partition,
            offset = entry.position.offset,
            error = %error,
            "undecodable record dead-lettered"
        );
        Ok(())
    }
}

/// A sink that only logs the record (at error level, payload included) and counts it.
#[derive(Debug, Default)]
pub struct LogDeadLetter {
    count: AtomicU64,
}

impl LogDeadLetter {
    /// Records logged so far.
    pub fn count(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }
}

#[async_trait]
impl DeadLetter for LogDeadLetter {
    async fn send(&self, entry: &LogEntry, error: &RecordError) -> std::io::Result<()> {
        let line = encode_line(entry, error)?;
        self.count.fetch_add(1, Ordering::Relaxed);
        tracing::error!(
            record = %String::from_utf8_lossy(&line).trim_end(),
            "undecodable record dropped: no dead-letter sink configured"
        );
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sequencer::LogPosition;

    #[tokio::test]
    async fn appends_one_line_per_record() {
        let dir = tempfile::tempdir().expect("tempdir");
        let sink = FileDeadLetter::open(dir.path()).expect("open");
        for (offset, payload) in [(3u64, &b"not json"[..]), (4, &[0xff, 0x00][..])] {
            let entry = LogEntry {
                position: LogPosition {
                    partition: 0,
                    offset,
                },
                payload: bytes::Bytes::copy_from_slice(payload),
            };
            let error = sequencer::decode(&entry.payload).expect_err("must not decode");
            sink.send(&entry, &error).await.expect("send");
        }
        assert_eq!(sink.count(), 2);
        let text = std::fs::read_to_string(sink.path()).expect("read");
        let lines: Vec<serde_json::Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).expect("json"))
            .collect();
        assert_eq!(lines.len(), 2);
        assert_eq!(lines[0]["offset"], 3);
        assert_eq!(lines[0]["payload"], "not json");
        assert_eq!(lines[1]["payload_hex"], "ff00");
    }
}
