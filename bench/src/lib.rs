//! flashsale benchmarks. `benches/hot_paths.rs` measures the pure hot paths with criterion;
//! the end-to-end harness (ceilings and ratios in one run) arrives with the benchmark issue.
