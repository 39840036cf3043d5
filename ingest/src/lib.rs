//! flashsale ingest: the HTTP front end that admits orders.
//!
//! [`server::serve`] runs the hyper server on a bound listener; [`api`] holds the routes (a
//! module per concern: orders, sales, health, bodies, answers);
//! [`admission`] the `Admission` trait and its embedded backend; `confirmer` confirms
//! idempotency answers off the request path, in batches; `sale_cache` serves sale
//! definitions stale-while-revalidate; [`redis_admission`] the
//! Redis backend (Lua scripts in `src/lua/`) and [`sold_out`] its per-instance sold-out
//! flags; [`model`] the decision
//! rules every backend agrees with; [`checkpoint`] the embedded backend's checkpoint; [`auth`] buyer JWTs and the operator token;
//! [`problem`] the error answers and their stable codes; [`fuzzing`] the checks of the fuzz
//! targets.

pub mod admission;
pub mod api;
pub mod auth;
pub mod checkpoint;
mod confirmer;
pub mod fuzzing;
pub mod metrics;
pub mod model;
pub mod problem;
pub mod redis_admission;
mod sale_cache;
pub mod server;
pub mod sold_out;
pub mod stock_buckets;
