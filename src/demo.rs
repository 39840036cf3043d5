//! `flashsale demo`: a whole sale on one machine, through the real HTTP endpoint.
//!
//! Starts everything (embedded backends by default) on loopback in a fresh data directory,
//! creates a sale, drives a burst of buyers (with retries that reuse their Idempotency-Key
//! and a share of bad requests), waits until every accepted order is settled, and checks
//! each invariant of the architecture against what the buyers were told, the store, the
//! admission counters and the payment provider's audit.

use crate::app::{wait_until, App, Running};
use crate::config::Config;
use anyhow::Context;
use hdrhistogram::Histogram;
use ingest::api::SaleStats;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::Serialize;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use storage::{OrderId, OrderStatus, SaleId};

/// What the demo is asked to do.
#[derive(Debug, Clone)]
pub struct DemoOptions {
    /// Units on sale.
    pub stock: u32,
    /// Distinct buyers.
    pub users: u32,
    /// Requests in the burst.
    pub requests: u32,
    /// Requests in flight at once.
    pub concurrency: usize,
    /// Share of charges the mock provider declines.
    pub decline_rate: f64,
    /// Most units per user.
    pub per_user_limit: u32,
    /// Stock buckets of the sale (spread over a Redis Cluster's slots).
    pub stock_buckets: u32,
    /// Share of requests that retry an earlier one with the same key and body.
    pub retry_share: f64,
    /// Share of requests that are malformed.
    pub bad_share: f64,
    /// Seed of the request plan.
    pub seed: u64,
    /// Show a progress bar.
    pub progress: bool,
    /// Longest wait for settlement.
    pub settle_timeout: Duration,
}

impl Default for DemoOptions {
    fn default() -> Self {
        DemoOptions {
            stock: 10_000,
            users: 20_000,
            requests: 50_000,
            concurrency: 64,
            decline_rate: 0.1,
            per_user_limit: 2,
            stock_buckets: 1,
            retry_share: 0.05,
            bad_share: 0.02,
            seed: 7,
            progress: true,
            settle_timeout: Duration::from_secs(300),
        }
    }
}

/// Latency percentiles in milliseconds.
#[derive(Debug, Clone, Serialize)]
pub struct Latency {
    /// Median.
    pub p50: f64,
    /// 90th percentile.
    pub p90: f64,
    /// 99th percentile.
    pub p99: f64,
    /// Slowest.
    pub max: f64,
}

/// The demo's findings.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// Sale id.
    pub sale_id: String,
    /// Units on sale.
    pub stock: u32,
    /// Requests sent.
    pub requests: u64,
    /// Distinct orders accepted (202).
    pub accepted: u64,
    /// Units in accepted orders.
    pub accepted_units: u64,
    /// Retries answered 202 with their first answer.
    pub replayed: u64,
    /// Refusals by code.
    pub rejected: BTreeMap<String, u64>,
    /// Orders in the store.
    pub persisted: u64,
    /// Orders paid.
    pub paid: u64,
    /// Orders whose payment failed.
    pub payment_failed: u64,
    /// Orders whose stock went back.
    pub released: u64,
    /// Receipts written (orders that recorded their receipt's key).
    pub receipts: u64,
    /// Units not sold at the end.
    pub stock_left: i64,
    /// Latency of every request as the buyer saw it.
    pub latency_ms: Latency,
    /// Requests answered per second during the burst.
    pub throughput_per_s: f64,
    /// Length of the burst in seconds.
    pub burst_s: f64,
    /// Time from the end of the burst until every order settled, in seconds.
    pub settle_s: f64,
    /// Each invariant: holds or not.
    pub invariants: BTreeMap<String, bool>,
    /// Why an invariant failed, for the ones that did.
    pub failures: Vec<String>,
}

impl Report {
    /// Whether every invariant holds.
    pub fn passed(&self) -> bool {
        self.invariants.values().all(|v| *v)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Bad {
    MalformedJson,
    ZeroQuantity,
    NegativeQuantity,
    TooMany,
    MissingKey,
    WrongSignature,
    UnknownField,
}

impl Bad {
    const ALL: [Bad; 7] = [
        Bad::MalformedJson,
        Bad::ZeroQuantity,
        Bad::NegativeQuantity,
        Bad::TooMany,
        Bad::MissingKey,
        Bad::WrongSignature,
        Bad::UnknownField,
    ];

    fn expected(self) -> (u16, &'static str) {
        match self {
            Bad::MalformedJson => (400, "malformed_json"),
            Bad::ZeroQuantity | Bad::NegativeQuantity | Bad::TooMany => (422, "invalid_quantity"),
            Bad::MissingKey => (400, "missing_idempotency_key"),
            Bad::WrongSignature => (401, "invalid_token"),
            Bad::UnknownField => (422, "invalid_body"),
        }
    }
}

#[derive(Debug, Clone)]
enum Plan {
    Buy {
        user: u32,
        quantity: u32,
        key: String,
    },
    Retry {
        of: usize,
    },
    /// The same user and Idempotency-Key as an earlier buy, with another body.
    Reuse {
        of: usize,
    },
    Bad {
        user: u32,
        kind: Bad,
    },
}

#[derive(Debug, Clone, Default)]
struct Outcome {
    status: u16,
    code: Option<String>,
    order_id: Option<OrderId>,
    quantity: u32,
}

fn plan(opts: &DemoOptions) -> Vec<Plan> {
    let mut rng = StdRng::seed_from_u64(opts.seed);
    let mut out: Vec<Plan> = Vec::with_capacity(opts.requests as usize);
    let mut buys: Vec<usize> = Vec::new();
    for i in 0..opts.requests as usize {
        let roll: f64 = rng.random();
        if roll < opts.bad_share {
            let kind = Bad::ALL[rng.random_range(0..Bad::ALL.len())];
            out.push(Plan::Bad {
                user: rng.random_range(0..opts.users),
                kind,
            });
        } else if roll < opts.bad_share + opts.retry_share && !buys.is_empty() {
            // Retry a recent request, as a client that timed out would; one in five reuses
            // the key with a different body, which must be refused.
            let lo = buys.len().saturating_sub(256);
            let of = buys[rng.random_range(lo..buys.len())];
            out.push(if rng.random_bool(0.2) {
                Plan::Reuse { of }
            } else {
                Plan::Retry { of }
            });
        } else {
            let quantity = if rng.random_bool(0.3) { 2 } else { 1 };
            out.push(Plan::Buy {
                user: rng.random_range(0..opts.users),
                quantity: quantity.min(opts.per_user_limit),
                key: format!("demo-{i}"),
            });
            buys.push(i);
        }
    }
    out
}

fn user_name(u: u32) -> String {
    format!("buyer-{u}")
}

struct Driver {
    client: reqwest::Client,
    base: String,
    sale_id: SaleId,
    tokens: Vec<String>,
    bad_token: String,
    plan: Vec<Plan>,
}

impl Driver {
    async fn send(&self, i: usize) -> Outcome {
        let mut payment = "tok_visa";
        let (user, quantity, key, bad) = match &self.plan[i] {
            Plan::Buy {
                user,
                quantity,
                key,
            } => (*user, *quantity, key.clone(), None),
            Plan::Retry { of } | Plan::Reuse { of } => match &self.plan[*of] {
                Plan::Buy {
                    user,
                    quantity,
                    key,
                } => {
                    if matches!(self.plan[i], Plan::Reuse { .. }) {
                        payment = "tok_other_card";
                    }
                    (*user, *quantity, key.clone(), None)
                }
                _ => return Outcome::default(),
            },
            Plan::Bad { user, kind } => (*user, 1, format!("bad-{i}"), Some(*kind)),
        };
        let url = format!("{}/v1/sales/{}/orders", self.base, self.sale_id);
        let token = match bad {
            Some(Bad::WrongSignature) => &self.bad_token,
            _ => &self.tokens[user as usize],
        };
        let body = match bad {
            Some(Bad::MalformedJson) => "{\"quantity\": 1, \"payment_token\": ".to_owned(),
            Some(Bad::ZeroQuantity) => r#"{"quantity":0,"payment_token":"tok_visa"}"#.to_owned(),
            Some(Bad::NegativeQuantity) => {
                r#"{"quantity":-1,"payment_token":"tok_visa"}"#.to_owned()
            }
            Some(Bad::TooMany) => r#"{"quantity":99,"payment_token":"tok_visa"}"#.to_owned(),
            Some(Bad::UnknownField) => {
                r#"{"quantity":1,"payment_token":"tok_visa","coupon":"x"}"#.to_owned()
            }
            _ => format!(r#"{{"quantity":{quantity},"payment_token":"{payment}"}}"#),
        };
        let mut req = self
            .client
            .post(url)
            .bearer_auth(token)
            .header("content-type", "application/json")
            .body(body);
        if bad != Some(Bad::MissingKey) {
            req = req.header("idempotency-key", key);
        }
        match req.send().await {
            Ok(resp) => {
                let status = resp.status().as_u16();
                let v: serde_json::Value = resp.json().await.unwrap_or_default();
                Outcome {
                    status,
                    code: v.get("code").and_then(|c| c.as_str()).map(str::to_owned),
                    order_id: v
                        .get("order_id")
                        .and_then(|c| c.as_str())
                        .and_then(|s| s.parse().ok()),
                    quantity,
                }
            }
            Err(e) => Outcome {
                status: 0,
                code: Some(format!("transport: {e}")),
                order_id: None,
                quantity,
            },
        }
    }
}

/// Runs the demo on `config` (its backends; data in a fresh temporary directory).
pub async fn run(mut config: Config, opts: &DemoOptions) -> anyhow::Result<Report> {
    let data = tempfile::Builder::new()
        .prefix("flashsale-demo-")
        .tempdir()
        .context("creating the demo's data directory")?;
    config.data_dir = data.path().to_path_buf();
    config.providers.mock_decline_rate = opts.decline_rate;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    #[cfg(feature = "kafka")]
    if let Some(kafka) = config.log.kafka() {
        // A whole sale in one command: the topics are created if missing (as `migrate` does).
        sequencer::kafka::create_topics(&kafka)
            .await
            .with_context(|| format!("log.url = {:?}: creating the topics", config.log.url))?;
    }
    if config.store.postgres()?.is_some() || config.store.wants_scylla() {
        // Likewise the store's schema: every Postgres shard, or the Scylla keyspace
        // (idempotent; without the `scylla` feature this refuses the URL by name).
        crate::app::migrate_store(&config).await?;
    }
    let running = App::start(&config, listener).await?;
    let report = drive(&config, &running, opts).await;
    running.stop().await?;
    report
}

async fn drive(config: &Config, running: &Running, opts: &DemoOptions) -> anyhow::Result<Report> {
    use secrecy::ExposeSecret;
    let base = running.url();
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(opts.concurrency)
        .timeout(Duration::from_secs(30))
        .build()?;
    let operator = config.auth.operator_token.expose_secret().to_owned();

    let sale_id = SaleId::generate();
    let resp = client
        .post(format!("{base}/v1/sales"))
        .bearer_auth(&operator)
        .json(&serde_json::json!({
            "id": sale_id,
            "sku": "demo-sneaker",
            "stock": opts.stock,
            "price_cents": 1999,
            "currency": "EUR",
            "per_user_limit": opts.per_user_limit,
            "max_quantity_per_order": opts.per_user_limit,
            "user_rate": {"per_second": 5, "burst": 10},
            "stock_buckets": opts.stock_buckets,
        }))
        .send()
        .await?;
    anyhow::ensure!(
        resp.status().as_u16() == 201,
        "creating the sale failed: {} {}",
        resp.status(),
        resp.text().await.unwrap_or_default()
    );

    let auth = config.auth.to_auth_config()?;
    let ttl = Duration::from_secs(3600);
    let tokens = (0..opts.users)
        .map(|u| ingest::auth::issue_token(&auth, &user_name(u), ttl))
        .collect::<Result<Vec<_>, _>>()?;
    let mut wrong = auth.clone();
    wrong.jwt_secret = secrecy::SecretString::from("not-the-configured-secret");
    let bad_token = ingest::auth::issue_token(&wrong, &user_name(0), ttl)?;
    let plan = plan(opts);
    let total = plan.len();
    let driver = Arc::new(Driver {
        client,
        base: base.clone(),
        sale_id: sale_id.clone(),
        tokens,
        bad_token,
        plan,
    });

    let bar = if opts.progress {
        indicatif::ProgressBar::new(total as u64)
    } else {
        indicatif::ProgressBar::hidden()
    };
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{spinner} burst [{bar:40}] {pos}/{len} requests ({per_sec}, {elapsed})",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
        .progress_chars("=> "),
    );
    let next = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let mut workers = tokio::task::JoinSet::new();
    for _ in 0..opts.concurrency.max(1) {
        let driver = Arc::clone(&driver);
        let next = Arc::clone(&next);
        let bar = bar.clone();
        workers.spawn(async move {
            let mut hist = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)
                .map_err(|e| anyhow::anyhow!("histogram: {e}"))?;
            let mut results = Vec::new();
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= driver.plan.len() {
                    break;
                }
                let t = Instant::now();
                let outcome = driver.send(i).await;
                hist.saturating_record(t.elapsed().as_micros() as u64);
                bar.inc(1);
                results.push((i, outcome));
            }
            anyhow::Ok((hist, results))
        });
    }
    let mut hist = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)
        .map_err(|e| anyhow::anyhow!("histogram: {e}"))?;
    let mut outcomes = vec![Outcome::default(); total];
    while let Some(res) = workers.join_next().await {
        let (h, results) = res??;
        hist.add(&h)
            .map_err(|e| anyhow::anyhow!("histogram: {e}"))?;
        for (i, o) in results {
            outcomes[i] = o;
        }
    }
    let burst = started.elapsed();
    bar.finish_and_clear();

    // What the buyers were told.
    let mut failures = Vec::new();
    let mut accepted: HashMap<OrderId, (u32, u32)> = HashMap::new(); // id -> (user, qty)
    let mut rejected: BTreeMap<String, u64> = BTreeMap::new();
    let mut replayed = 0u64;
    let mut idempotent = true;
    let mut bad_ok = true;
    for (i, o) in outcomes.iter().enumerate() {
        match &driver.plan[i] {
            Plan::Bad { kind, .. } => {
                let (status, code) = kind.expected();
                if o.status != status || o.code.as_deref() != Some(code) {
                    bad_ok = false;
                    failures.push(format!(
                        "bad request {kind:?} got {} {:?}, expected {status} {code}",
                        o.status, o.code
                    ));
                }
            }
            Plan::Retry { of } => {
                let first = &outcomes[*of];
                if let (Some(a), Some(b)) = (first.order_id, o.order_id) {
                    if a != b {
                        idempotent = false;
                        failures.push(format!(
                            "retry of request {of} got order {b}, first got {a}"
                        ));
                    }
                    replayed += 1;
                }
            }
            Plan::Reuse { .. } | Plan::Buy { .. } => {}
        }
        if o.status == 202 {
            let origin = match &driver.plan[i] {
                Plan::Retry { of } | Plan::Reuse { of } => &driver.plan[*of],
                p => p,
            };
            if let (Some(id), Plan::Buy { user, .. } | Plan::Bad { user, .. }) =
                (o.order_id, origin)
            {
                accepted.insert(id, (*user, o.quantity));
            }
        } else {
            let code = o
                .code
                .clone()
                .unwrap_or_else(|| format!("http_{}", o.status));
            *rejected.entry(code).or_default() += 1;
        }
    }

    // A key reused with another body never yields a second order: a buy and its reuse
    // are never both accepted. (A reuse of a refused buy is decided afresh, since only
    // acceptances store an answer; the report counts the reuses refused as conflicts.)
    for (i, o) in outcomes.iter().enumerate() {
        if let Plan::Reuse { of } = driver.plan[i] {
            let first = &outcomes[of];
            if first.status == 202 && o.status == 202 {
                idempotent = false;
                failures.push(format!(
                    "key of request {of} reused with another body made a second order: {:?} and {:?}",
                    first.order_id, o.order_id
                ));
            }
        }
    }

    // Wait until every accepted order is settled (final and notified).
    let settle_started = Instant::now();
    let ingest = Arc::clone(&running.ingest);
    let expected = accepted.len() as u64;
    // The settler's in-memory counters say when the end is near; only then is the store's
    // aggregate (a scan of the sale's orders) asked, so waiting does not take the CPU the
    // settler needs (and, in case the counters miss something, every 50th poll).
    let settler_stats = running.settler_stats.clone();
    let mut polls = 0u32;
    let settled = wait_until(opts.settle_timeout, || {
        let ingest = Arc::clone(&ingest);
        let store = Arc::clone(&running.store);
        let sale_id = sale_id.clone();
        polls = polls.wrapping_add(1);
        let near = polls.is_multiple_of(50)
            || settler_stats.as_ref().is_none_or(|s| {
                let s = s.snapshot();
                s.persisted >= expected && s.paid + s.payment_failed + s.expired >= expected
            });
        async move {
            if !near {
                return false;
            }
            let totals_final = match ingest.sale_stats(&sale_id).await {
                Ok(s) => {
                    s.persisted >= expected
                        && s.paid + s.payment_failed + s.expired == s.persisted
                        && s.released == s.payment_failed + s.expired
                }
                Err(_) => false,
            };
            // The buyer is told after the final status is written: wait for that too.
            totals_final
                && store.orders_of_sale(&sale_id).await.is_ok_and(|orders| {
                    orders
                        .iter()
                        .all(|o| o.status.is_final() && o.notified_at.is_some())
                })
        }
    })
    .await;
    // Receipts are written after the payment: wait (within the same deadline) until no
    // order is owed its document.
    let documents_done = !config.receipts.enabled
        || wait_until(
            opts.settle_timeout.saturating_sub(settle_started.elapsed()),
            || {
                let store = Arc::clone(&running.store);
                async move { store.documents_owed(1).await.is_ok_and(|o| o.is_empty()) }
            },
        )
        .await;
    let settle = settle_started.elapsed();
    let stats: SaleStats = running
        .ingest
        .sale_stats(&sale_id)
        .await
        .map_err(|e| anyhow::anyhow!("stats: {}", e.detail))?;
    let orders = running.store.orders_of_sale(&sale_id).await?;
    let audit = mock_provider::fetch_audit(&running.payment_url).await?;

    let mut inv = BTreeMap::new();
    // 1. No oversell.
    // Units held by what the buyers were told (every 202), less what went back.
    let released: HashSet<OrderId> = orders
        .iter()
        .filter(|o| o.released_at.is_some() || o.status.releases_stock())
        .map(|o| o.new.order_id)
        .collect();
    let held: u64 = accepted
        .iter()
        .filter(|(id, _)| !released.contains(id))
        .map(|(_, (_, q))| u64::from(*q))
        .sum();
    let no_oversell = held <= stats.stock;
    if !no_oversell {
        failures.push(format!("{held} units held of a stock of {}", stats.stock));
    }
    inv.insert("no_oversell".into(), no_oversell);
    // 2. No loss: every 202 is persisted exactly once.
    let stored: HashMap<OrderId, &storage::Order> =
        orders.iter().map(|o| (o.new.order_id, o)).collect();
    let missing = accepted
        .keys()
        .filter(|id| !stored.contains_key(id))
        .count();
    // With no crash in the demo, the store holds exactly the acknowledged orders.
    let unacknowledged = stored
        .keys()
        .filter(|id| !accepted.contains_key(id))
        .count();
    let no_loss = missing == 0 && unacknowledged == 0;
    if !no_loss {
        failures.push(format!(
            "{missing} acknowledged orders are not in the store; {unacknowledged} stored orders were never acknowledged"
        ));
    }
    inv.insert("no_loss".into(), no_loss);
    // 3. Per-user limit.
    let mut by_user: HashMap<&str, u32> = HashMap::new();
    for o in orders.iter().filter(|o| !o.status.releases_stock()) {
        *by_user.entry(o.new.user_id.as_str()).or_default() += o.new.quantity;
    }
    let over: Vec<_> = by_user
        .iter()
        .filter(|(_, q)| **q > opts.per_user_limit)
        .collect();
    if !over.is_empty() {
        failures.push(format!("{} users over the per-user limit", over.len()));
    }
    inv.insert("per_user_limit".into(), over.is_empty());
    // 4. Idempotency: retries got their first answer; one order per (user, key).
    let keys: HashSet<(&str, &str)> = orders
        .iter()
        .map(|o| (o.new.user_id.as_str(), o.new.idempotency_key.as_str()))
        .collect();
    if keys.len() != orders.len() {
        idempotent = false;
        failures.push("two orders share a user and an Idempotency-Key".into());
    }
    inv.insert("idempotency".into(), idempotent);
    // 5. Conservation. Every unit of stock is paid for, pending, or left (released units
    // went back to what is left and may have sold again); every accepted unit ended paid,
    // pending or released.
    let units_in = |f: &dyn Fn(OrderStatus) -> bool| -> u64 {
        orders
            .iter()
            .filter(|o| f(o.status))
            .map(|o| u64::from(o.new.quantity))
            .sum()
    };
    let paid_units = units_in(&|s| s == OrderStatus::Paid);
    let pending_units = units_in(&|s| !s.is_final());
    let released_units: u64 = orders
        .iter()
        .filter(|o| o.released_at.is_some())
        .map(|o| u64::from(o.new.quantity))
        .sum();
    let stored_units: u64 = orders.iter().map(|o| u64::from(o.new.quantity)).sum();
    let conservation = settled
        && (paid_units + pending_units) as i64 + stats.stock_left == stats.stock as i64
        && paid_units + pending_units + released_units == stored_units;
    if !conservation {
        failures.push(format!(
            "stock {}: paid {paid_units} + pending {pending_units} + left {}; accepted {stored_units} units: paid + pending + released {released_units}",
            stats.stock, stats.stock_left
        ));
    }
    inv.insert("conservation".into(), conservation);
    // 6. One charge per order.
    let mut one_charge = true;
    for o in &orders {
        let a = audit.orders.get(&o.new.order_id.to_string());
        if a.is_none() && audit.pruned > 0 {
            // Dropped at the audit's cap (a sale larger than `audit_cap`): not checkable.
            continue;
        }
        let ok_charges = a.map_or(0, |a| a.successful_charges);
        let expected = u64::from(o.status == OrderStatus::Paid);
        if ok_charges != expected {
            one_charge = false;
            failures.push(format!(
                "order {} ({}) has {ok_charges} successful charges",
                o.new.order_id, o.status
            ));
            break;
        }
    }
    inv.insert("one_charge_per_order".into(), one_charge);
    // 7. Bad input gets a clear error and changes nothing: no order carries its key.
    let from_bad = orders
        .iter()
        .filter(|o| o.new.idempotency_key.starts_with("bad-"))
        .count();
    if from_bad > 0 {
        bad_ok = false;
        failures.push(format!("{from_bad} orders were created by bad requests"));
    }
    inv.insert("bad_input_rejected".into(), bad_ok);
    // Every accepted order reached a final status and its buyer was notified.
    let all_settled = settled
        && orders
            .iter()
            .all(|o| o.status.is_final() && o.notified_at.is_some());
    if !all_settled {
        failures.push(format!(
            "not every order settled within {:?}",
            opts.settle_timeout
        ));
    }
    inv.insert("all_settled".into(), all_settled);
    // One receipt per paid order, none for another.
    let receipts = orders.iter().filter(|o| o.receipt_key.is_some()).count() as u64;
    if config.receipts.enabled {
        let paid = orders.iter().filter(|o| o.status == OrderStatus::Paid);
        let paid_count = paid.clone().count() as u64;
        let unreceipted = paid.filter(|o| o.receipt_key.is_none()).count();
        let stray = orders
            .iter()
            .filter(|o| o.status != OrderStatus::Paid && o.receipt_key.is_some())
            .count();
        let ok = documents_done && unreceipted == 0 && stray == 0 && receipts == paid_count;
        if !ok {
            failures.push(format!(
                "receipts: {receipts} written for {paid_count} paid orders ({unreceipted} paid \
                 without one, {stray} of orders not paid; documents done: {documents_done})"
            ));
        }
        inv.insert("receipts".into(), ok);
    }

    let ms = |v: u64| v as f64 / 1000.0;
    Ok(Report {
        sale_id: sale_id.to_string(),
        stock: opts.stock,
        requests: total as u64,
        accepted: accepted.len() as u64,
        accepted_units: accepted.values().map(|(_, q)| u64::from(*q)).sum(),
        replayed,
        rejected,
        persisted: stats.persisted,
        paid: stats.paid,
        payment_failed: stats.payment_failed,
        released: stats.released,
        receipts,
        stock_left: stats.stock_left,
        latency_ms: Latency {
            p50: ms(hist.value_at_quantile(0.5)),
            p90: ms(hist.value_at_quantile(0.9)),
            p99: ms(hist.value_at_quantile(0.99)),
            max: ms(hist.max()),
        },
        throughput_per_s: total as f64 / burst.as_secs_f64(),
        burst_s: burst.as_secs_f64(),
        settle_s: settle.as_secs_f64(),
        invariants: inv,
        failures,
    })
}

/// The report as a person reads it.
pub fn render(r: &Report) -> String {
    use std::fmt::Write;
    let mut s = String::new();
    let _ = writeln!(s, "flashsale demo: sale {} (stock {})", r.sale_id, r.stock);
    let _ = writeln!(s);
    let _ = writeln!(s, "  requests          {:>10}", r.requests);
    let _ = writeln!(
        s,
        "  accepted          {:>10}  orders ({} units; {} retries answered with their first answer)",
        r.accepted, r.accepted_units, r.replayed
    );
    let rejected: u64 = r.rejected.values().sum();
    let _ = writeln!(s, "  rejected          {rejected:>10}");
    for (code, n) in &r.rejected {
        let _ = writeln!(s, "    {code:<24}{n:>8}");
    }
    let _ = writeln!(s, "  persisted         {:>10}", r.persisted);
    let _ = writeln!(s, "  paid              {:>10}", r.paid);
    let _ = writeln!(s, "  payment failed    {:>10}", r.payment_failed);
    let _ = writeln!(s, "  released          {:>10}", r.released);
    let _ = writeln!(s, "  receipts          {:>10}", r.receipts);
    let _ = writeln!(s, "  stock left        {:>10}", r.stock_left);
    let _ = writeln!(s);
    let _ = writeln!(
        s,
        "  latency (ms)      p50 {:.2}  p90 {:.2}  p99 {:.2}  max {:.2}",
        r.latency_ms.p50, r.latency_ms.p90, r.latency_ms.p99, r.latency_ms.max
    );
    let _ = writeln!(
        s,
        "  throughput        {:.0} requests/s over {:.2} s; settled {:.2} s after the burst",
        r.throughput_per_s, r.burst_s, r.settle_s
    );
    let _ = writeln!(s);
    let _ = writeln!(s, "  invariants");
    for (name, ok) in &r.invariants {
        let _ = writeln!(s, "    {:<24}{}", name, if *ok { "PASS" } else { "FAIL" });
    }
    for f in &r.failures {
        let _ = writeln!(s, "    ! {f}");
    }
    s
}
