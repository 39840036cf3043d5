//! flashsale load tests: goose scenarios (`rush`, `steady`, `retry-storm`, `browse-buy`)
//! against any running flashsale endpoint, followed by a check of the sale's invariants.
//!
//! # Running it
//!
//! ```text
//! loadtest [FLASHSALE OPTIONS] [-- GOOSE OPTIONS]
//! cargo run -p loadtest -- --scenario rush --stock 500 -- -u 50 -t 10s
//! ```
//!
//! The binary has two sets of options. Its own (`loadtest --help`) say what to test:
//! the scenario, the endpoint, the sale and the secrets; each can also be set by an
//! environment variable (`FLASHSALE_LOADTEST_SCENARIO`, `FLASHSALE_LOADTEST_HOST`,
//! `FLASHSALE_LOADTEST_SALE`, `FLASHSALE_LOADTEST_STOCK`, ...), and the secrets read the
//! same variables the server does (`FLASHSALE_AUTH__JWT_SECRET`,
//! `FLASHSALE_AUTH__OPERATOR_TOKEN`, `FLASHSALE_AUTH__ISSUER`, `FLASHSALE_AUTH__AUDIENCE`),
//! so one environment configures both. Everything after `--` goes to goose unchanged
//! (`loadtest -- --help` lists goose's options): `-u` users, `-r` users started per
//! second, `-t` run time, `--iterations`, `--throttle-requests`, `--report-file`, ...
//!
//! Goose options left out get the load test's defaults (see [`cli::apply_goose_defaults`]):
//! the host of `--host`, 32 users, all started within a second (rush: at 1000/s), a 20 s
//! run, metrics kept from the first request (`--no-reset-metrics`), `--throttle-requests`
//! of `--rate` for `steady`, and the reports `<report-dir>/<scenario>.html` and
//! `<report-dir>/<scenario>.json` (default `target/loadtest/`).
//!
//! # Scenarios
//!
//! Each iteration of a goose user is one visit of a new buyer (`sub` = `<run>-b<n>`, a
//! JWT signed with the configured secret, issuer and audience; `--buyers N` reuses N
//! buyers in turn, so returning buyers meet the per-user limit).
//!
//! - `rush`: the sale opens `--rush-delay` (2 s) after it is created (or at an existing
//!   sale's `starts_at`); every user waits for that instant, then buys as fast as it can
//!   (`-- --iterations 1`: each user buys once). Users start at 1000 per second, so keep
//!   the delay above users / 1000 s; the wait is part of goose's `-t`.
//! - `steady`: a constant arrival rate of `--rate` orders per second across all users,
//!   with goose's `--throttle-requests` (a leaky bucket shared by every user, which the
//!   order requests wait on as goose's own requests do); enough users are needed to
//!   sustain it (users ≥ rate × latency). The rate is capped, not forced: a server
//!   slower than that lowers it (closed loop), which goose's report shows.
//! - `retry-storm`: each request has a `--retry-timeout` deadline (50 ms); a client that
//!   times out, or is told `request_in_progress`, sends the same body with the same
//!   Idempotency-Key again, up to `--max-attempts`. A `--resend-rate` share of the
//!   accepted orders is sent once more after its answer, as a client that lost it would.
//!   Every 202 for one key must carry the same order id.
//! - `browse-buy`: GET the sale, POST an order, then poll GET /v1/orders/{id} every
//!   `--poll-interval` until it is final (paid, payment_failed, expired) or
//!   `--poll-deadline` passes (an error).
//!
//! # Validation and the end of the run
//!
//! An order answered 202, 403, 409 or 429 is an expected outcome, counted by status and
//! problem `code`; anything else (5xx, 400, 401, 404, 422, a transport error, a timeout
//! outside retry-storm's planned ones) is an error, failed in goose's metrics with its
//! reason. Orders are recorded as goose custom requests (method `POST`, time to the
//! response headers) so that a refusal is a success in goose's tables; the reads go
//! through goose's `request` and `set_failure`. retry-storm's timed-out attempts are
//! failures in goose's tables ("timed out after 50ms, retried") but not errors of the
//! run; a key with no answer after `--max-attempts` is. Once goose has written its reports, the load test waits for the sale to
//! settle, fetches `GET /v1/sales/{id}/stats` and checks the invariants of
//! [`invariants::check`]; it prints a PASS/FAIL table, writes it to
//! `<report-dir>/<scenario>-checks.json` and exits 1 when one fails (2 when the run
//! could not start).

pub mod auth;
pub mod cli;
pub mod invariants;
pub mod observe;
pub mod scenarios;
pub mod setup;
