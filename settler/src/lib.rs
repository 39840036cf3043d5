//! flashsale settler: everything that happens to an order after admission.
//!
//! The [`settle::Settler`] reads accepted orders from the log, persists them in batches
//! (with the log checkpoint in the same transaction), charges them at the payment provider,
//! releases the stock of failed ones back to admission and notifies the buyer, each exactly
//! once, and publishes every status change. [`provider`] holds the HTTP clients of the
//! payment and notification providers, [`breaker`] the circuit breaker in front of the
//! payment provider, [`events`] the publishing of status changes to
//! `flashsale.order-events.v1`, and [`dead_letter`] the place records go that cannot be
//! decoded. (The mock of both providers is the `mock-provider` crate.)
//! [`metrics`] names the Prometheus families of all of them once; [`metrics::register`]
//! adds them to a process's registry.

#![warn(missing_docs)]

pub mod breaker;
pub mod dead_letter;
pub mod events;
pub mod metrics;
pub mod provider;
pub mod settle;

pub use breaker::{BreakerState, CircuitBreaker};
pub use dead_letter::{DeadLetter, FileDeadLetter, LogDeadLetter};
pub use events::{encode_event, EventSink, RecordingEventSink, TracingEventSink};
pub use provider::{
    ChargeOutcome, NotificationClient, NotificationKind, PaymentClient, ProviderError,
};
pub use settle::{
    ConsumerSource, Documents, Settler, SettlerConfig, SettlerHealth, SettlerStats, Stage,
    StatsSnapshot, StockRelease,
};

/// Errors of the settler.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The order store failed.
    #[error(transparent)]
    Store(#[from] storage::Error),
    /// A provider could not be reached or refused a request.
    #[error(transparent)]
    Provider(#[from] ProviderError),
    /// Returning stock to the admission backend failed (what [`StockRelease`]
    /// implementations return).
    #[error("stock release failed: {0}")]
    Release(String),
    /// An [`EventSink`] could not publish (the events are offered again later).
    #[error("event publishing failed: {0}")]
    Publish(String),
    /// A settler task panicked or was cancelled unexpectedly.
    #[error("settler task failed: {0}")]
    Task(#[from] tokio::task::JoinError),
    /// A stage kept dying: the settler gave up after restarting it
    /// [`settle::MAX_RESTARTS`] times in a row.
    #[error(
        "the settler's {stage} stage died {deaths} times in a row (last: {reason}); \
         the settler gave up"
    )]
    StageFailed {
        /// The stage whose last death made the settler give up.
        stage: settle::Stage,
        /// Consecutive deaths.
        deaths: u32,
        /// What ended it the last time (a panic's message).
        reason: String,
    },
}

/// Result alias of this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;
