//! flashsale: the one binary's library. Configuration, composition of the parts, the demo
//! and the command-line client; the parts themselves live in the workspace crates
//! (`storage`, `sequencer`, `ingest`, `settler`).

pub mod app;
pub mod cli;
pub mod config;
pub mod demo;
pub mod maintain;
pub mod metrics;
pub mod receipt;
pub mod reconcile;
