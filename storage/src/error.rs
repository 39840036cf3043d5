//! The order store's error, the boxed cause an `Unavailable` error carries ([`BoxError`],
//! shared by the other crates' errors), and [`ErrorChain`], which shows an error with its
//! causes on one line (for logs).

use crate::model::{IllegalTransition, InvalidValue, SaleId};
use std::borrow::Cow;
use std::fmt;

/// The cause an `Unavailable` error carries: the backend's own error, as it came.
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// Errors of the order store.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The backend could not be reached or failed; the operation may be retried.
    #[error("store unavailable: {context}")]
    Unavailable {
        /// What failed: the database or the step (never a URL: it may hold a password).
        context: Cow<'static, str>,
        /// The backend's error, if there is one ([`std::error::Error::source`]).
        #[source]
        source: Option<BoxError>,
    },
    /// A sale with this id exists already.
    #[error("sale {0} exists already")]
    SaleExists(SaleId),
    /// No sale with this id.
    #[error("unknown sale {0}")]
    UnknownSale(SaleId),
    /// Stored data that does not decode: a bug or a tampered database.
    #[error("corrupt stored data: {0}")]
    Corrupt(String),
    /// A move the status machine refuses.
    #[error(transparent)]
    IllegalTransition(#[from] IllegalTransition),
    /// A value the model refuses (nothing was changed).
    #[error(transparent)]
    Invalid(#[from] InvalidValue),
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

/// Shows an error and then each of its sources, `outer: inner: root`, on one line (as
/// `anyhow`'s `{:#}` does). For logs: `tracing::warn!(error = %ErrorChain(&e), ...)`, where
/// `error = %e` would show the outer error only.
///
/// A source whose text the error before it already ends with is not repeated (some errors,
/// tokio-postgres's among them, print their cause in their own message as well).
#[derive(Debug, Clone, Copy)]
pub struct ErrorChain<'a>(pub &'a (dyn std::error::Error + 'static));

impl fmt::Display for ErrorChain<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut shown = self.0.to_string();
        f.write_str(&shown)?;
        let mut next = self.0.source();
        while let Some(e) = next {
            let text = e.to_string();
            if !shown.ends_with(&text) {
                write!(f, ": {text}")?;
            }
            shown = text;
            next = e.source();
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::error::Error as _;

    #[test]
    fn unavailable_exposes_its_cause() {
        let io = std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "refused");
        let err = Error::unavailable("shard 1", io);
        assert_eq!(err.to_string(), "store unavailable: shard 1");
        let source = err.source().expect("a source");
        assert_eq!(source.to_string(), "refused");
        assert!(source.downcast_ref::<std::io::Error>().is_some());
        assert_eq!(
            ErrorChain(&err).to_string(),
            "store unavailable: shard 1: refused"
        );
        assert!(Error::unavailable_msg("writer stopped").source().is_none());
    }

    #[test]
    fn a_chain_does_not_repeat_a_cause_already_shown() {
        #[derive(Debug, thiserror::Error)]
        #[error("db error: {0}")]
        struct Echoing(#[source] std::io::Error);
        let err = Error::unavailable("shard 0", Echoing(std::io::Error::other("gone")));
        assert_eq!(
            ErrorChain(&err).to_string(),
            "store unavailable: shard 0: db error: gone"
        );
    }
}
