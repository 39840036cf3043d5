//! httpd: the one HTTP/1.1 server of flashsale's processes and its error answers.
//!
//! [`server`] is the accept loop (connection cap, head and idle timeouts, graceful drain)
//! that serves any [`Handler`]; [`protocol`] wraps each connection so hyper's own answers
//! come out as problem+json too; [`problem`] is the one problem+json type, [`Problem`].

pub mod problem;
pub mod protocol;
pub mod server;

pub use problem::{Code, Problem};
pub use server::{
    serve_with, Handler, Hangup, Reply, ServerConfig, DEFAULT_MAX_HEADERS, DEFAULT_MAX_HEADER_BYTES,
};
