//! flashsale sequencer: the order record format, partitioning, and the order log.
//!
//! Ingest appends an accepted order with [`OrderLog::append`] and answers the buyer 202 only
//! once that returns: the record is durable. The settler reads records back through a
//! [`LogConsumer`]. The log is the only hand-off between admission and settlement.
//! [`fuzzing`] holds the checks of the fuzz targets.

pub mod embedded;
pub mod fuzzing;
#[cfg(feature = "kafka")]
pub mod kafka;
pub mod metrics;
pub mod partition;
pub mod record;

use async_trait::async_trait;
use bytes::Bytes;
use std::borrow::Cow;
use std::time::Duration;
use storage::BoxError;

pub use record::{decode, encode, OrderRecord, RecordError, CONTENT_TYPE, RECORD_VERSION};

/// Errors of the order log.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The log cannot take the record now (backend down, queue full, closed); nothing was
    /// written, or it is unknown whether it was.
    #[error("log unavailable: {context}")]
    Unavailable {
        /// What failed.
        context: Cow<'static, str>,
        /// The backend's error, if there is one ([`std::error::Error::source`]).
        #[source]
        source: Option<BoxError>,
    },
    /// An I/O error of the embedded log.
    #[error("log i/o: {0}")]
    Io(#[from] std::io::Error),
    /// The record may or may not have been written (a delivery timed out after sending).
    /// Ingest aborts the admission; should the record land, the settler's claim of it
    /// fails and it cancels the order instead of charging it.
    #[error("order log outcome unknown: {context}")]
    Indeterminate {
        /// What was being done.
        context: Cow<'static, str>,
        /// The backend's error ([`std::error::Error::source`]).
        #[source]
        source: BoxError,
    },
    /// The embedded log file is damaged in a way that would lose acknowledged records.
    #[error("order log corrupt: {0}")]
    Corrupt(String),
    /// A record could not be encoded.
    #[error(transparent)]
    Record(#[from] RecordError),
}

impl Error {
    /// [`Error::Unavailable`] caused by `source`: `context` says what failed.
    pub fn unavailable(context: impl Into<Cow<'static, str>>, source: impl Into<BoxError>) -> Self {
        Error::Unavailable {
            context: context.into(),
            source: Some(source.into()),
        }
    }

    /// [`Error::Unavailable`] with no underlying error: `context` says it all.
    pub fn unavailable_msg(context: impl Into<Cow<'static, str>>) -> Self {
        Error::Unavailable {
            context: context.into(),
            source: None,
        }
    }
}

/// Result alias of this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Where a record sits in the log.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct LogPosition {
    /// Partition of the topic (0 for the embedded log).
    pub partition: u32,
    /// Offset inside the partition.
    pub offset: u64,
}

/// A record as read back: its position and its undecoded bytes, so a reader can send what
/// it cannot decode to a dead-letter place instead of stopping.
#[derive(Debug, Clone)]
pub struct LogEntry {
    /// Where it sits.
    pub position: LogPosition,
    /// The encoded record.
    pub payload: Bytes,
}

/// The producer side of the order log.
#[async_trait]
pub trait OrderLog: Send + Sync + 'static {
    /// Appends an accepted order; returns once the record is durable.
    async fn append(&self, record: &OrderRecord) -> Result<LogPosition>;
    /// Cheap check that the log can take records.
    async fn ping(&self) -> Result<()>;
}

/// How far a consumer is behind on one partition it reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PartitionLag {
    /// The partition.
    pub partition: u32,
    /// The log end offset: the offset the next record appended to the partition gets.
    pub end_offset: u64,
    /// The consumer's committed position: the next offset it reads after a restart.
    pub committed: u64,
}

impl PartitionLag {
    /// Records in the log past the committed position (0 if the end offset lags behind,
    /// as a broker's reported end may).
    pub fn records(&self) -> u64 {
        self.end_offset.saturating_sub(self.committed)
    }
}

/// The consumer side of the order log.
#[async_trait]
pub trait LogConsumer: Send + 'static {
    /// Up to `max` records after the last ones returned, waiting up to `wait` for the first.
    async fn poll(&mut self, max: usize, wait: Duration) -> Result<Vec<LogEntry>>;
    /// Marks everything up to and including `positions` as done. Called only after the
    /// store committed them.
    async fn commit(&mut self, positions: &[LogPosition]) -> Result<()>;
    /// Per partition this consumer reads now: the log end offset and its committed
    /// position, as last known. Cheap and without I/O (the embedded log knows its length;
    /// the Kafka consumer answers from the statistics librdkafka reports every second), so
    /// the settler may sample it often; it does once a second. A consumer that cannot tell
    /// returns nothing.
    fn lag(&self) -> Vec<PartitionLag> {
        Vec::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::error::Error as _;

    #[test]
    fn errors_built_from_a_failure_expose_it() {
        let io = || std::io::Error::new(std::io::ErrorKind::BrokenPipe, "broker gone");
        let err = Error::unavailable("producing", io());
        assert_eq!(err.to_string(), "log unavailable: producing");
        let source = err.source().expect("a source");
        assert!(
            source.downcast_ref::<std::io::Error>().is_some(),
            "{source}"
        );
        assert_eq!(
            storage::ErrorChain(&err).to_string(),
            "log unavailable: producing: broker gone"
        );
        let err = Error::Indeterminate {
            context: "delivery".into(),
            source: Box::new(io()),
        };
        assert_eq!(
            err.source().map(|s| s.to_string()).as_deref(),
            Some("broker gone")
        );
        assert!(Error::unavailable_msg("order log queue is full")
            .source()
            .is_none());
    }
}
