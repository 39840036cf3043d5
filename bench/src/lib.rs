//! flashsale benchmarks. `benches/hot_paths.rs` and `benches/redis_admission.rs` are the
//! criterion micro-benchmarks; the `e2e` binary (`src/bin/e2e.rs`) measures the whole
//! system and its ceilings with the open-loop load generator of [`loadgen`]. See
//! `bench/README.md`.

pub mod chart;
pub mod cpu;
pub mod diagnose;
pub mod loadgen;
pub mod report;
pub mod search;
pub mod settle;
pub mod systems;
