//! The API's server: [`serve`] runs [`Ingest`] on the one HTTP server loop of
//! [`httpd::server`] (accept loop, connection cap, header-read and idle timeouts, head
//! limits, hyper's own answers as problem+json, graceful shutdown), re-exported here for
//! the callers that configure it.

use crate::api::Ingest;
use http::Request;
use hyper::body::Incoming;
use std::sync::Arc;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

pub use httpd::server::{
    serve_with, Handler, Hangup, Reply, ServerConfig, DEFAULT_MAX_HEADERS, DEFAULT_MAX_HEADER_BYTES,
};

impl Handler for Ingest {
    async fn handle(&self, req: Request<Incoming>) -> Result<Reply, Hangup> {
        Ok(Ingest::handle(self, req).await)
    }
}

/// Serves the API on `listener` until `shutdown` is cancelled; the `open_connections`
/// gauge of the ingest metrics follows the connections open.
pub async fn serve(
    listener: TcpListener,
    ingest: Arc<Ingest>,
    config: ServerConfig,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let open = ingest.metrics.open_connections.clone();
    serve_with(listener, ingest, Some(open), config, shutdown).await
}
