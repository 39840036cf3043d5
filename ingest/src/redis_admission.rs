//! The Redis admission backend: one `EVALSHA` decides each order.
//!
//! The Lua scripts in `src/lua/` implement the rules of [`crate::model`] (the model tests
//! run both on the same inputs and compare). Every key of a sale carries the hash tag
//! `{sale_id}`, so one sale lives on one Redis Cluster slot and its scripts stay atomic.
//! Scripts are cached by SHA and reloaded on `NOSCRIPT` (the `redis` crate's `Script`; on a
//! cluster `SCRIPT LOAD` goes to every primary).
//!
//! Two kinds of Redis: one node (`redis://host:port/db`, a reconnecting
//! `ConnectionManager`) or a Redis Cluster (`redis+cluster://host:port[,host:port...]`,
//! the crate's async cluster client: it learns the slot map from any seed node, routes each
//! `EVALSHA` to the primary of its keys' slot, follows `MOVED`/`ASK`, and refreshes the map
//! after a failover or a resharding).
//!
//! Batches ([`Admission::confirm_batch`], [`Admission::claim_batch`],
//! [`Admission::release_batch`]) send one `EVALSHA` per order in one pipeline: one round
//! trip whatever the number of orders on one node; on a cluster one pipeline per sale
//! (a pipeline must stay in one slot), sent concurrently. A `NOSCRIPT` answer loads the
//! script and sends the calls it refused again.
//!
//! A sale whose keys are missing (never written, or lost with a Redis restart) is never
//! read as full stock: the scripts answer "missing", which ingest turns into 503 until the
//! counters are rebuilt from the order store.

use crate::admission::{Admission, Error, Result};
use crate::metrics::{self, AdmissionOp, Backend};
use crate::model::{
    AbortOutcome, AdmitRequest, Answer, BucketAnswer, Counters, Decision, OrderRef, Rejection,
    Snapshot,
};
use crate::sold_out::{self, FlagKeys, SoldOutFlags};
use crate::stock_buckets::{self, home_bucket};
use async_trait::async_trait;
use redis::aio::ConnectionManager;
use redis::cluster_async::ClusterConnection;
use redis::{Cmd, Script, ServerErrorKind, Value};
use std::sync::Arc;
use std::time::Duration;
use storage::{BoxError, OrderId, Sale, SaleId, UserId};

/// How long a sale's keys outlive its end (idempotency answers must outlive retries).
const KEEP_AFTER_END_MS: i64 = 7 * 24 * 3600 * 1000;

struct Scripts {
    lend: Script,
    borrow: Script,
    admit: Script,
    create: Script,
    release: Script,
    confirm: Script,
    add_stock: Script,
    claim: Script,
}

/// The URL scheme of a Redis Cluster: `redis+cluster://host:port[,host:port...]`.
pub const CLUSTER_SCHEME: &str = "redis+cluster://";

/// Whether `url` names a Redis backend (one node or a cluster).
pub fn is_redis_url(url: &str) -> bool {
    url.starts_with("redis://") || url.starts_with("rediss://") || url.starts_with(CLUSTER_SCHEME)
}

/// The seed nodes of a `redis+cluster://[user:password@]host:port[,host:port...][/]` URL,
/// each as a `redis://` URL with the same credentials.
pub fn cluster_nodes(url: &str) -> std::result::Result<Vec<String>, String> {
    let rest = url
        .strip_prefix(CLUSTER_SCHEME)
        .ok_or_else(|| format!("{url}: not a {CLUSTER_SCHEME} URL"))?;
    let rest = rest.split(['/', '?']).next().unwrap_or_default();
    let (auth, hosts) = match rest.rsplit_once('@') {
        Some((auth, hosts)) => (format!("{auth}@"), hosts),
        None => (String::new(), rest),
    };
    let nodes: Vec<String> = hosts
        .split(',')
        .map(str::trim)
        .filter(|h| !h.is_empty())
        .map(|h| format!("redis://{auth}{h}/"))
        .collect();
    if nodes.is_empty() {
        return Err(format!(
            "{CLUSTER_SCHEME}: no node named (expected {CLUSTER_SCHEME}host:port[,host:port...])"
        ));
    }
    Ok(nodes)
}

/// A connection to one Redis node or to a Redis Cluster; cheap to clone (both multiplex
/// one connection per node behind a handle).
#[derive(Clone)]
pub(crate) enum Conn {
    Node(ConnectionManager),
    Cluster(Arc<ClusterHandle>),
}

/// Calls in a row that failed on the connection (timeout, I/O, dropped) before the
/// cluster connection is replaced.
const CLUSTER_FAILURES_BEFORE_RESET: u32 = 8;
/// The least time between two replacements.
const CLUSTER_RESET_EVERY: Duration = Duration::from_secs(3);

/// The cluster connection with a way out of a stuck one. The crate's async cluster client
/// recovers from a lost node by itself, but after a primary came back on the same address
/// it was seen (redis 1.8.1) to stay inside its slot refresh forever, every command timing
/// out, in some processes and not others. So after
/// [`CLUSTER_FAILURES_BEFORE_RESET`] calls in a row fail on the connection, a new
/// connection is built from the seeds in the background and swapped in (at most every
/// [`CLUSTER_RESET_EVERY`]); calls in flight finish on the old one.
pub(crate) struct ClusterHandle {
    client: redis::cluster::ClusterClient,
    conn: std::sync::RwLock<ClusterConnection>,
    failures: std::sync::atomic::AtomicU32,
    resetting: std::sync::atomic::AtomicBool,
    last_reset: std::sync::Mutex<std::time::Instant>,
}

impl ClusterHandle {
    fn current(&self) -> ClusterConnection {
        self.conn
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// Counts a call's outcome; starts a replacement after too many connection failures.
    fn observe<T>(self: &Arc<Self>, outcome: &redis::RedisResult<T>) {
        use std::sync::atomic::Ordering::{AcqRel, Relaxed};
        match outcome {
            Ok(_) => self.failures.store(0, Relaxed),
            Err(e) if e.is_timeout() || e.is_io_error() || e.is_connection_dropped() => {
                let n = self.failures.fetch_add(1, AcqRel) + 1;
                let due = self
                    .last_reset
                    .lock()
                    .map(|t| t.elapsed() >= CLUSTER_RESET_EVERY)
                    .unwrap_or(true);
                if n >= CLUSTER_FAILURES_BEFORE_RESET && due && !self.resetting.swap(true, AcqRel) {
                    let me = Arc::clone(self);
                    tokio::spawn(async move { me.reset().await });
                }
            }
            // A server's error answer: the connection works.
            Err(_) => self.failures.store(0, Relaxed),
        }
    }

    async fn reset(self: Arc<Self>) {
        use std::sync::atomic::Ordering::{Relaxed, Release};
        tracing::warn!("Redis Cluster: calls keep failing; replacing the cluster connection");
        let fresh =
            tokio::time::timeout(Duration::from_secs(5), self.client.get_async_connection()).await;
        match fresh {
            Ok(Ok(conn)) => {
                *self
                    .conn
                    .write()
                    .unwrap_or_else(std::sync::PoisonError::into_inner) = conn;
                self.failures.store(0, Relaxed);
            }
            Ok(Err(e)) => tracing::warn!(error = %e, "Redis Cluster: no new connection yet"),
            Err(_) => tracing::warn!("Redis Cluster: no new connection within 5 s"),
        }
        if let Ok(mut t) = self.last_reset.lock() {
            *t = std::time::Instant::now();
        }
        self.resetting.store(false, Release);
    }
}

impl redis::aio::ConnectionLike for Conn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> redis::RedisFuture<'a, Value> {
        match self {
            Conn::Node(c) => c.req_packed_command(cmd),
            Conn::Cluster(h) => {
                let h = Arc::clone(h);
                Box::pin(async move {
                    let mut c = h.current();
                    let r = c.req_packed_command(cmd).await;
                    h.observe(&r);
                    r
                })
            }
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a redis::Pipeline,
        offset: usize,
        count: usize,
    ) -> redis::RedisFuture<'a, Vec<Value>> {
        match self {
            Conn::Node(c) => c.req_packed_commands(pipeline, offset, count),
            Conn::Cluster(h) => {
                let h = Arc::clone(h);
                Box::pin(async move {
                    let mut c = h.current();
                    let r = c.req_packed_commands(pipeline, offset, count).await;
                    h.observe(&r);
                    r
                })
            }
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Conn::Node(c) => c.get_db(),
            Conn::Cluster(h) => h.current().get_db(),
        }
    }
}

/// [`Admission`] on Redis.
#[derive(Clone)]
pub struct RedisAdmission {
    /// Clients of the nodes a subscription may use (one node: that one; a cluster: every
    /// seed node, tried in turn).
    pubsub: Vec<redis::Client>,
    conn: Conn,
    scripts: std::sync::Arc<Scripts>,
    prefix: String,
    /// Stock buckets per sale (fixed when a sale is created), read from the sale's first
    /// bucket once and kept a while.
    bucket_counts: moka::sync::Cache<SaleId, u32>,
    flags: Option<std::sync::Arc<SoldOutFlags>>,
}

impl std::fmt::Debug for RedisAdmission {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisAdmission")
            .field("prefix", &self.prefix)
            .finish_non_exhaustive()
    }
}

/// Redis failed with `e`.
fn unavailable(e: impl Into<BoxError>) -> Error {
    Error::unavailable("redis", e)
}

/// The sale's keys are absent or half-written: never read that as full stock.
fn missing(sale: &SaleId) -> Error {
    Error::unavailable_msg(format!(
        "the counters of sale {sale} are missing from Redis; run `flashsale reconcile --sale {sale}`"
    ))
}

/// The keys of one sale, all with the hash tag `{sale_id}`.
struct Keys {
    sale: String,
    units: String,
    /// No longer written (buckets are keys of their own, see `bucket_prefix`); still
    /// created and deleted with the sale so older data goes with it.
    buckets: String,
    /// A user's bucket is `{bucket_prefix}{user}`, expiring once it has refilled.
    bucket_prefix: String,
    idem: String,
    rejected: String,
    released: String,
    claimed: String,
    /// Stock buckets: units lent and not yet received (`transfer id -> to:units`).
    lent: String,
    /// Stock buckets: transfers received (each applied once).
    borrowed: String,
}

fn as_string(v: &Value) -> Option<String> {
    match v {
        Value::BulkString(b) => String::from_utf8(b.clone()).ok(),
        Value::SimpleString(s) => Some(s.clone()),
        Value::Int(i) => Some(i.to_string()),
        _ => None,
    }
}

fn as_i64(v: &Value) -> Option<i64> {
    match v {
        Value::Int(i) => Some(*i),
        other => as_string(other).and_then(|s| s.parse().ok()),
    }
}

/// The `EVALSHA` of `script` over `keys`; the caller adds the arguments.
fn evalsha<K: redis::ToRedisArgs>(script: &Script, keys: &[K]) -> Cmd {
    let mut cmd = redis::cmd("EVALSHA");
    cmd.arg(script.get_hash()).arg(keys.len()).arg(keys);
    cmd
}

/// How many calls of a batch failed.
fn failed<T>(results: &[Result<T>]) -> u64 {
    results.iter().filter(|r| r.is_err()).count() as u64
}

/// An integer reply of a script call in a batch.
fn int_reply(reply: Result<Value>) -> Result<i64> {
    let v = reply?;
    as_i64(&v).ok_or_else(|| Error::unavailable_msg(format!("unexpected script reply {v:?}")))
}

impl RedisAdmission {
    /// Sends `calls` (each an `EVALSHA` of `script`) in one pipeline: one round trip. One
    /// reply per call, in order; a call's server error is its own result and does not fail
    /// the others. Calls refused with `NOSCRIPT` (after a Redis restart or `SCRIPT FLUSH`)
    /// are sent again once the script is loaded.
    async fn eval_each(&self, script: &Script, calls: Vec<(String, Cmd)>) -> Vec<Result<Value>> {
        if matches!(self.conn, Conn::Node(_)) {
            return self
                .eval_pipeline(script, calls.into_iter().map(|(_, c)| c).collect())
                .await;
        }
        // A cluster pipeline stays in one slot: one per group (the calls of one sale share
        // its hash tag), all sent at once.
        let n = calls.len();
        let mut groups: std::collections::HashMap<String, (Vec<usize>, Vec<Cmd>)> =
            std::collections::HashMap::new();
        for (i, (group, cmd)) in calls.into_iter().enumerate() {
            let g = groups.entry(group).or_default();
            g.0.push(i);
            g.1.push(cmd);
        }
        let sent = groups
            .into_values()
            .map(|(at, cmds)| async move { (at, self.eval_pipeline(script, cmds).await) });
        let mut out: Vec<Option<Result<Value>>> = (0..n).map(|_| None).collect();
        for (at, replies) in futures_util::future::join_all(sent).await {
            for (i, r) in at.into_iter().zip(replies) {
                out[i] = Some(r);
            }
        }
        out.into_iter()
            .map(|r| r.unwrap_or_else(|| Err(Error::unavailable_msg("no reply"))))
            .collect()
    }

    /// [`eval_each`](Self::eval_each) of calls that share one node (and on a cluster one
    /// slot): one pipeline.
    async fn eval_pipeline(&self, script: &Script, calls: Vec<Cmd>) -> Vec<Result<Value>> {
        let n = calls.len();
        if n == 0 {
            return Vec::new();
        }
        let mut out: Vec<Option<Result<Value>>> = (0..n).map(|_| None).collect();
        let mut pipe = redis::pipe();
        pipe.ignore_errors();
        for call in calls {
            pipe.add_command(call);
        }
        let mut todo: Vec<usize> = (0..n).collect();
        let mut conn = self.conn.clone();
        for round in 0..2 {
            let replies: Vec<Value> = match pipe.query_async(&mut conn).await {
                Ok(r) => r,
                Err(e) => {
                    let e = Arc::new(e);
                    for &i in &todo {
                        out[i] = Some(Err(unavailable(Arc::clone(&e))));
                    }
                    break;
                }
            };
            if replies.len() != todo.len() {
                for &i in &todo {
                    out[i] = Some(Err(Error::unavailable_msg(
                        "a pipeline answered a different number of replies",
                    )));
                }
                break;
            }
            let mut again = Vec::new();
            for (&i, reply) in todo.iter().zip(replies) {
                match reply {
                    Value::ServerError(e)
                        if round == 0 && e.kind() == Some(ServerErrorKind::NoScript) =>
                    {
                        again.push(i);
                    }
                    Value::ServerError(e) => {
                        out[i] = Some(Err(unavailable(redis::RedisError::from(e))));
                    }
                    v => out[i] = Some(Ok(v)),
                }
            }
            if again.is_empty() {
                break;
            }
            if let Err(e) = script.load_async(&mut conn).await {
                let e = Arc::new(e);
                for &i in &again {
                    out[i] = Some(Err(unavailable(Arc::clone(&e))));
                }
                break;
            }
            let cmds: Vec<&Cmd> = pipe.cmd_iter().collect();
            let mut retry = redis::pipe();
            retry.ignore_errors();
            for (pos, &i) in todo.iter().enumerate() {
                if again.contains(&i) {
                    retry.add_command(cmds[pos].clone());
                }
            }
            pipe = retry;
            todo = again;
        }
        out.into_iter()
            .map(|r| r.unwrap_or_else(|| Err(Error::unavailable_msg("no reply"))))
            .collect()
    }

    /// The `EVALSHA` of `release.lua` for one order in `mode` (`release` or `abort`).
    fn release_call(&self, sale: &SaleId, bucket: u32, order: &OrderRef, mode: &str) -> Cmd {
        let k = self.keys_of(sale, bucket);
        let mut cmd = evalsha(
            &self.scripts.release,
            &[&k.sale, &k.units, &k.released, &k.idem, &k.claimed],
        );
        cmd.arg(order.order_id.to_string())
            .arg(order.user.as_str())
            .arg(order.quantity)
            .arg(mode)
            .arg(&order.key)
            .arg(sold_out::channel(&self.prefix, sale));
        cmd
    }

    /// Connects to `url` (`redis://host:port/db`, or a cluster's
    /// `redis+cluster://host:port[,host:port...]`); keys start with `prefix` (e.g. `fs:`).
    /// Each command gets `response_timeout`; connections reconnect by themselves.
    pub async fn connect(url: &str, prefix: &str, response_timeout: Duration) -> Result<Self> {
        let connect_timeout = response_timeout.max(Duration::from_millis(500));
        let (pubsub, conn) = if url.starts_with(CLUSTER_SCHEME) {
            let nodes = cluster_nodes(url).map_err(Error::unavailable_msg)?;
            let pubsub = nodes
                .iter()
                .map(|n| redis::Client::open(n.as_str()))
                .collect::<redis::RedisResult<Vec<_>>>()
                .map_err(unavailable)?;
            let client = redis::cluster::ClusterClientBuilder::new(nodes)
                .response_timeout(response_timeout)
                .connection_timeout(connect_timeout)
                // MOVED/ASK and a failover's refused calls are retried this many times,
                // with the crate's short exponential wait between them.
                .retries(3)
                .build()
                .map_err(unavailable)?;
            let conn = client.get_async_connection().await.map_err(unavailable)?;
            (
                pubsub,
                Conn::Cluster(Arc::new(ClusterHandle {
                    client,
                    conn: std::sync::RwLock::new(conn),
                    failures: std::sync::atomic::AtomicU32::new(0),
                    resetting: std::sync::atomic::AtomicBool::new(false),
                    last_reset: std::sync::Mutex::new(std::time::Instant::now()),
                })),
            )
        } else {
            let client = redis::Client::open(url).map_err(unavailable)?;
            let config = redis::aio::ConnectionManagerConfig::new()
                .set_response_timeout(Some(response_timeout))
                .set_connection_timeout(Some(connect_timeout))
                .set_number_of_retries(1);
            let conn = ConnectionManager::new_with_config(client.clone(), config)
                .await
                .map_err(unavailable)?;
            (vec![client], Conn::Node(conn))
        };
        Ok(RedisAdmission {
            pubsub,
            conn,
            scripts: std::sync::Arc::new(Scripts {
                lend: Script::new(include_str!("lua/lend.lua")),
                borrow: Script::new(include_str!("lua/borrow.lua")),
                admit: Script::new(include_str!("lua/admit.lua")),
                create: Script::new(include_str!("lua/create.lua")),
                release: Script::new(include_str!("lua/release.lua")),
                confirm: Script::new(include_str!("lua/confirm.lua")),
                add_stock: Script::new(include_str!("lua/add_stock.lua")),
                claim: Script::new(include_str!("lua/claim.lua")),
            }),
            prefix: prefix.to_owned(),
            bucket_counts: moka::sync::Cache::builder()
                .max_capacity(100_000)
                .time_to_live(Duration::from_secs(600))
                .build(),
            flags: None,
        })
    }

    /// Turns on the per-instance sold-out flags (see [`crate::sold_out`]); a flag lives at
    /// most `ttl`. Starts a task that keeps a subscription to the sales' events channels.
    pub fn with_sold_out_flags(mut self, ttl: Duration) -> Self {
        self.flags = Some(std::sync::Arc::new(SoldOutFlags::start(
            self.pubsub.clone(),
            self.conn.clone(),
            &self.prefix,
            ttl,
        )));
        self
    }

    /// Sold-out answers this instance gave without a Redis call (0 without flags).
    pub fn sold_out_answered_locally(&self) -> u64 {
        self.flags.as_ref().map_or(0, |f| f.answered_locally())
    }

    fn keys(&self, sale: &SaleId) -> Keys {
        self.keys_of(sale, 0)
    }

    /// The hash tag of a sale's bucket: `{sale}` for the first (a sale of one bucket has
    /// only that one), `{sale#b}` for the others (`#` is never in a sale id).
    fn base(&self, sale: &SaleId, bucket: u32) -> String {
        if bucket == 0 {
            format!("{}{{{}}}", self.prefix, sale.as_str())
        } else {
            format!("{}{{{}#{bucket}}}", self.prefix, sale.as_str())
        }
    }

    /// The keys of one stock bucket of a sale.
    fn keys_of(&self, sale: &SaleId, bucket: u32) -> Keys {
        let base = self.base(sale, bucket);
        Keys {
            lent: format!("{base}:lent"),
            borrowed: format!("{base}:borrowed"),
            sale: format!("{base}:sale"),
            units: format!("{base}:units"),
            buckets: format!("{base}:buckets"),
            bucket_prefix: format!("{base}:b:"),
            idem: format!("{base}:idem"),
            rejected: format!("{base}:rejected"),
            released: format!("{base}:released"),
            claimed: format!("{base}:claimed"),
        }
    }

    /// Decides one attempt and also returns the instant (Redis clock, microseconds) it was
    /// decided at (the first ask's, for a sale of several buckets), so the model tests can
    /// replay the same decision.
    pub async fn admit_at(&self, sale: &SaleId, req: &AdmitRequest) -> Result<(Decision, i64)> {
        self.decide(sale, req).await.map(|(d, now, _)| (d, now))
    }

    /// Stock buckets of `sale`: kept from its creation, else read from its first bucket
    /// (a sale whose first bucket is missing is missing).
    pub async fn bucket_count(&self, sale: &SaleId) -> Result<u32> {
        self.stored_bucket_count(sale)
            .await?
            .ok_or_else(|| missing(sale))
    }

    /// [`bucket_count`](Self::bucket_count), `None` when the sale's first bucket is missing.
    async fn stored_bucket_count(&self, sale: &SaleId) -> Result<Option<u32>> {
        if let Some(n) = self.bucket_counts.get(sale) {
            return Ok(Some(n));
        }
        let mut conn = self.conn.clone();
        let (ready, nb): (Option<i64>, Option<i64>) = redis::cmd("HMGET")
            .arg(self.keys(sale).sale)
            .arg(&["ready", "nb"])
            .query_async(&mut conn)
            .await
            .map_err(unavailable)?;
        if ready != Some(1) {
            return Ok(None);
        }
        // Sales created before stock buckets have no `nb`: one bucket.
        let n = nb.and_then(|n| u32::try_from(n).ok()).unwrap_or(1).max(1);
        self.bucket_counts.insert(sale.clone(), n);
        Ok(Some(n))
    }

    /// The bucket keeping `user`'s state in `sale`, and the sale's bucket count. A sale
    /// whose first bucket is missing is taken as one bucket: every script then finds its
    /// keys missing and answers so (or, confirming, confirms nothing), as before buckets.
    async fn bucket_of(&self, sale: &SaleId, user: &UserId) -> Result<(u32, u32)> {
        let n = self.stored_bucket_count(sale).await?.unwrap_or(1);
        Ok((home_bucket(user, n), n))
    }

    /// One decision; also the units left when the answer is `sold_out`. A sale of several
    /// buckets asks the buyer's bucket, borrows when it is short, and asks again (see
    /// [`crate::stock_buckets`]).
    async fn decide(
        &self,
        sale: &SaleId,
        req: &AdmitRequest,
    ) -> Result<(Decision, i64, Option<i64>)> {
        let (b, n) = self.bucket_of(sale, &req.user).await?;
        if n == 1 {
            let (answer, now, left) = self.decide_in(sale, 0, req, "").await?;
            return match answer {
                BucketAnswer::Decided(d) => Ok((d, now, left)),
                BucketAnswer::Short { .. } => Err(Error::unavailable_msg(
                    "a sale of one bucket answered short",
                )),
            };
        }
        let (answer, now, _) = self.decide_in(sale, b, req, "first").await?;
        // Units seen in the whole sale when this bucket was short (None: not asked).
        let mut seen = None;
        let decided = match answer {
            BucketAnswer::Decided(d) => d,
            BucketAnswer::Short { left } => {
                seen = Some(
                    self.borrow(sale, n, b, left, i64::from(req.quantity))
                        .await?,
                );
                match self.decide_in(sale, b, req, "retry").await?.0 {
                    BucketAnswer::Decided(d) => d,
                    BucketAnswer::Short { .. } => Decision::Rejected(Rejection::SoldOut),
                }
            }
        };
        let global = |a: Answer| Answer {
            sequence: stock_buckets::global_sequence(a.sequence, b, n),
            ..a
        };
        let decided = match decided {
            Decision::Accepted(a) => Decision::Accepted(global(a)),
            Decision::Replayed(a) => Decision::Replayed(global(a)),
            other => other,
        };
        // The sold-out flag is worth learning only when every bucket was seen empty (the
        // flag's own read checks every bucket again before it is set).
        let left = match decided {
            Decision::Rejected(Rejection::SoldOut) => seen.filter(|&units| units == 0),
            _ => None,
        };
        Ok((decided, now, left))
    }

    /// Moves units into bucket `home` (holding `left`) from the sale's other buckets,
    /// richest first, until it holds `want` or none has any (the model's
    /// `BucketedSale::borrow`). A bucket that cannot be read is skipped, but if the units
    /// found are still short the error is returned: `sold_out` only when every bucket was
    /// seen empty. Returns the units seen in the whole sale (the home bucket's and the
    /// others' as read).
    async fn borrow(&self, sale: &SaleId, n: u32, home: u32, left: i64, want: i64) -> Result<i64> {
        let reads = (0..n).map(|b| async move {
            if b == home {
                return Ok(left);
            }
            let mut conn = self.conn.clone();
            let (ready, l): (Option<i64>, Option<i64>) = redis::cmd("HMGET")
                .arg(self.keys_of(sale, b).sale)
                .arg(&["ready", "left"])
                .query_async(&mut conn)
                .await
                .map_err(unavailable)?;
            match ready {
                Some(1) => Ok(l.unwrap_or(0)),
                _ => Err(missing(sale)),
            }
        });
        let lefts = futures_util::future::join_all(reads).await;
        let mut unread = None;
        let known: Vec<i64> = lefts
            .into_iter()
            .map(|r| {
                r.unwrap_or_else(|e| {
                    unread = Some(e);
                    0
                })
            })
            .collect();
        let seen = known.iter().sum();
        let mut have = left;
        for d in stock_buckets::donors(&known, home) {
            if have >= want {
                break;
            }
            let id = OrderId::new().to_string();
            let (from, to) = (self.keys_of(sale, d), self.keys_of(sale, home));
            let mut conn = self.conn.clone();
            let take: i64 = self
                .scripts
                .lend
                .key(&from.sale)
                .key(&from.lent)
                .arg(&id)
                .arg(want - have)
                .arg(home)
                .invoke_async(&mut conn)
                .await
                .map_err(unavailable)?;
            if take <= 0 {
                continue;
            }
            // Lent: from here the units are the home bucket's. A failure leaves the
            // transfer in the lender's `lent` hash, which reconcile completes (never by
            // giving the units back: the borrow may have landed).
            let _: i64 = self
                .scripts
                .borrow
                .key(&to.sale)
                .key(&to.borrowed)
                .arg(&id)
                .arg(take)
                .arg(sold_out::channel(&self.prefix, sale))
                .invoke_async(&mut conn)
                .await
                .map_err(unavailable)?;
            let _: redis::RedisResult<i64> = redis::cmd("HDEL")
                .arg(&from.lent)
                .arg(&id)
                .query_async(&mut conn)
                .await;
            have += take;
        }
        match unread {
            Some(e) if have < want => Err(e),
            _ => Ok(seen),
        }
    }

    /// Completes the transfers between `sale`'s buckets that a caller left half-done (lent,
    /// perhaps not received): each is received once (`borrow.lua` ignores a transfer it
    /// has) and its entry dropped. Returns how many there were.
    pub async fn complete_transfers(&self, sale: &SaleId) -> Result<usize> {
        let n = self.bucket_count(sale).await?;
        let mut done = 0;
        let mut conn = self.conn.clone();
        for b in 0..n {
            let from = self.keys_of(sale, b);
            let lent: std::collections::HashMap<String, String> = redis::cmd("HGETALL")
                .arg(&from.lent)
                .query_async(&mut conn)
                .await
                .map_err(unavailable)?;
            for (id, what) in lent.into_iter().filter(|(id, _)| id != "\n") {
                let Some((to, take)) = what
                    .split_once(':')
                    .and_then(|(t, n)| Some((t.parse::<u32>().ok()?, n.parse::<i64>().ok()?)))
                else {
                    continue;
                };
                let to = self.keys_of(sale, to);
                let got: i64 = self
                    .scripts
                    .borrow
                    .key(&to.sale)
                    .key(&to.borrowed)
                    .arg(&id)
                    .arg(take)
                    .arg(sold_out::channel(&self.prefix, sale))
                    .invoke_async(&mut conn)
                    .await
                    .map_err(unavailable)?;
                if got < 0 {
                    return Err(missing(sale));
                }
                let _: i64 = redis::cmd("HDEL")
                    .arg(&from.lent)
                    .arg(&id)
                    .query_async(&mut conn)
                    .await
                    .map_err(unavailable)?;
                done += 1;
            }
        }
        Ok(done)
    }

    /// One ask of one bucket (`ask`: see `admit.lua`); also the Redis instant and, for
    /// `sold_out`, the bucket's units left.
    async fn decide_in(
        &self,
        sale: &SaleId,
        bucket: u32,
        req: &AdmitRequest,
        ask: &str,
    ) -> Result<(BucketAnswer, i64, Option<i64>)> {
        let k = self.keys_of(sale, bucket);
        let mut conn = self.conn.clone();
        let reply: Vec<Value> = self
            .scripts
            .admit
            .key(&k.sale)
            .key(&k.units)
            .key(format!("{}{}", k.bucket_prefix, req.user.as_str()))
            .key(&k.idem)
            .key(&k.rejected)
            .arg(req.user.as_str())
            .arg(req.quantity)
            .arg(&req.key)
            .arg(&req.fingerprint)
            .arg(req.order_id.to_string())
            .arg(ask)
            .invoke_async(&mut conn)
            .await
            .map_err(unavailable)?;
        let bad = || Error::unavailable_msg("unexpected admission script reply");
        let kind = reply.first().and_then(as_string).ok_or_else(bad)?;
        let now = reply.last().and_then(as_i64).ok_or_else(bad)?;
        let answer = |r: &[Value]| -> Result<Answer> {
            let order_id: OrderId = r
                .get(1)
                .and_then(as_string)
                .and_then(|s| s.parse().ok())
                .ok_or_else(bad)?;
            Ok(Answer {
                order_id,
                sequence: r.get(2).and_then(as_i64).ok_or_else(bad)? as u64,
                quantity: r.get(3).and_then(as_i64).ok_or_else(bad)? as u32,
            })
        };
        let mut left = None;
        let decision = match kind.as_str() {
            "accepted" => Decision::Accepted(answer(&reply)?),
            "replayed" => Decision::Replayed(answer(&reply)?),
            "in_progress" => Decision::InProgress,
            "missing" => return Err(missing(sale)),
            "short" => {
                let left = reply.get(1).and_then(as_i64).ok_or_else(bad)?;
                return Ok((BucketAnswer::Short { left }, now, None));
            }
            "rejected" => {
                let code = reply.get(1).and_then(as_string).ok_or_else(bad)?;
                Decision::Rejected(match code.as_str() {
                    "idempotency_conflict" => Rejection::IdempotencyConflict,
                    "sale_not_active" => Rejection::NotActive,
                    "rate_limited" => Rejection::RateLimited {
                        retry_after_s: reply.get(2).and_then(as_i64).ok_or_else(bad)? as u32,
                    },
                    "limit_exceeded" => Rejection::LimitExceeded,
                    "sold_out" => {
                        left = reply.get(3).and_then(as_i64);
                        Rejection::SoldOut
                    }
                    _ => return Err(bad()),
                })
            }
            _ => return Err(bad()),
        };
        Ok((BucketAnswer::Decided(decision), now, left))
    }

    async fn release_mode(&self, sale: &SaleId, order: &OrderRef, mode: &str) -> Result<i64> {
        let (b, _) = self.bucket_of(sale, &order.user).await?;
        let k = self.keys_of(sale, b);
        let mut conn = self.conn.clone();
        let n: i64 = self
            .scripts
            .release
            .key(&k.sale)
            .key(&k.units)
            .key(&k.released)
            .key(&k.idem)
            .key(&k.claimed)
            .arg(order.order_id.to_string())
            .arg(order.user.as_str())
            .arg(order.quantity)
            .arg(mode)
            .arg(&order.key)
            .arg(sold_out::channel(&self.prefix, sale))
            .invoke_async(&mut conn)
            .await
            .map_err(unavailable)?;
        match n {
            -1 => Err(missing(sale)),
            n => Ok(n),
        }
    }

    /// Units a user holds in a sale.
    pub async fn units_of(&self, sale: &SaleId, user: &UserId) -> Result<u32> {
        let (b, _) = self.bucket_of(sale, user).await?;
        let mut conn = self.conn.clone();
        let v: Option<i64> = redis::cmd("HGET")
            .arg(self.keys_of(sale, b).units)
            .arg(user.as_str())
            .query_async(&mut conn)
            .await
            .map_err(unavailable)?;
        Ok(v.unwrap_or(0).max(0) as u32)
    }

    /// Units held by every user of a sale (users holding none left out), sorted.
    pub async fn all_units(&self, sale: &SaleId) -> Result<Vec<(UserId, u32)>> {
        let n = self.bucket_count(sale).await?;
        let mut conn = self.conn.clone();
        let mut out: Vec<(UserId, u32)> = Vec::new();
        for b in 0..n {
            let map: std::collections::HashMap<String, i64> = redis::cmd("HGETALL")
                .arg(self.keys_of(sale, b).units)
                .query_async(&mut conn)
                .await
                .map_err(unavailable)?;
            out.extend(
                map.into_iter()
                    .filter(|(_, n)| *n > 0)
                    .filter_map(|(u, n)| UserId::parse(u).ok().map(|u| (u, n as u32))),
            );
        }
        out.sort();
        Ok(out)
    }

    /// Ids of the orders whose units went back (released by the settler or aborted by
    /// ingest), sorted.
    pub async fn released(&self, sale: &SaleId) -> Result<Vec<OrderId>> {
        let n = self.bucket_count(sale).await?;
        let mut conn = self.conn.clone();
        let mut out: Vec<OrderId> = Vec::new();
        for b in 0..n {
            let ids: Vec<String> = redis::cmd("SMEMBERS")
                .arg(self.keys_of(sale, b).released)
                .query_async(&mut conn)
                .await
                .map_err(unavailable)?;
            out.extend(ids.iter().filter_map(|s| s.parse::<OrderId>().ok()));
        }
        out.sort();
        Ok(out)
    }

    /// Replaces a sale's keys with `state` (reconciliation: after Redis lost its data, or
    /// when its counters drifted from the order store), one MULTI/EXEC per stock bucket; a
    /// sale of several buckets gets `state` split over them
    /// ([`stock_buckets::split_snapshot`]: each buyer's state in their bucket, the units
    /// left spread evenly) and its half-done transfers dropped. Rejection counters are
    /// kept when present; token buckets start full.
    pub async fn restore(&self, sale: &Sale, state: &Snapshot) -> Result<()> {
        let n = sale.stock_buckets.max(1);
        let parts = if n == 1 {
            vec![state.clone()]
        } else {
            stock_buckets::split_snapshot(state, n)
        };
        for (b, part) in parts.iter().enumerate() {
            self.restore_bucket(sale, b as u32, n, part).await?;
        }
        self.bucket_counts.insert(sale.id.clone(), n);
        Ok(())
    }

    /// [`restore`](Self::restore) of one bucket.
    async fn restore_bucket(
        &self,
        sale: &Sale,
        bucket: u32,
        n: u32,
        state: &Snapshot,
    ) -> Result<()> {
        let k = self.keys_of(&sale.id, bucket);
        let mut conn = self.conn.clone();
        let rejected: std::collections::HashMap<String, i64> = redis::cmd("HGETALL")
            .arg(&k.rejected)
            .query_async(&mut conn)
            .await
            .map_err(unavailable)?;
        let expire_at = sale.ends_at.millis().saturating_add(KEEP_AFTER_END_MS);
        let c = &state.counters;
        let mut p = redis::pipe();
        p.atomic();
        p.cmd("DEL")
            .arg(&k.sale)
            .arg(&k.units)
            .arg(&k.buckets)
            .arg(&k.idem)
            .arg(&k.rejected)
            .arg(&k.released)
            .arg(&k.claimed)
            .arg(&k.lent)
            .arg(&k.borrowed)
            .ignore();
        p.cmd("HSET")
            .arg(&k.sale)
            .arg(&[
                ("stock", state.rules.stock.to_string()),
                ("left", c.stock_left.to_string()),
                ("limit", state.rules.per_user_limit.to_string()),
                ("rate", state.rules.rate_per_second.to_string()),
                ("burst", state.rules.burst.to_string()),
                ("starts", state.rules.starts_at_us.to_string()),
                ("ends", state.rules.ends_at_us.to_string()),
                ("seq", state.next_sequence.to_string()),
                ("acc_o", c.accepted_orders.to_string()),
                ("acc_u", c.accepted_units.to_string()),
                ("rel_u", c.released_units.to_string()),
                ("skew", "0".to_owned()),
                ("nb", n.to_string()),
                ("ready", "1".to_owned()),
            ])
            .ignore();
        p.cmd("HSET").arg(&k.units).arg("\n").arg(0).ignore();
        for (user, units) in &state.units {
            p.cmd("HSET")
                .arg(&k.units)
                .arg(user.as_str())
                .arg(units)
                .ignore();
        }
        p.cmd("HSET").arg(&k.buckets).arg("\n").arg("0:0").ignore();
        p.cmd("HSET").arg(&k.idem).arg("\n").arg("").ignore();
        for (user, key, e) in &state.answers {
            p.cmd("HSET")
                .arg(&k.idem)
                .arg(format!("{}\n{key}", user.as_str()))
                .arg(format!(
                    "{}|{}|{}|{}|{}",
                    e.fingerprint,
                    e.answer.order_id,
                    e.answer.sequence,
                    e.answer.quantity,
                    u8::from(e.confirmed)
                ))
                .ignore();
        }
        p.cmd("HSET").arg(&k.rejected).arg("\n").arg(0).ignore();
        for (code, n) in rejected.iter().filter(|(c, _)| c.as_str() != "\n") {
            p.cmd("HSET").arg(&k.rejected).arg(code).arg(n).ignore();
        }
        p.cmd("SADD").arg(&k.released).arg("\n").ignore();
        for id in &state.released {
            p.cmd("SADD").arg(&k.released).arg(id.to_string()).ignore();
        }
        p.cmd("SADD").arg(&k.claimed).arg("\n").ignore();
        for id in &state.claimed {
            p.cmd("SADD").arg(&k.claimed).arg(id.to_string()).ignore();
        }
        p.cmd("HSET").arg(&k.lent).arg("\n").arg("").ignore();
        p.cmd("SADD").arg(&k.borrowed).arg("\n").ignore();
        for key in [
            &k.sale,
            &k.units,
            &k.buckets,
            &k.idem,
            &k.rejected,
            &k.released,
            &k.claimed,
            &k.lent,
            &k.borrowed,
        ] {
            p.cmd("PEXPIREAT").arg(key).arg(expire_at).ignore();
        }
        // Instances drop their sold-out flag of the sale.
        p.cmd("PUBLISH")
            .arg(sold_out::channel(&self.prefix, &sale.id))
            .arg("stock")
            .ignore();
        p.query_async::<()>(&mut conn).await.map_err(unavailable)
    }

    /// One script call per order of `orders`, each built by `call` for the order's bucket,
    /// sent as [`eval_each`](Self::eval_each) sends them (grouped by bucket on a cluster);
    /// an order whose bucket cannot be found fails alone.
    async fn batch(
        &self,
        script: &Script,
        orders: &[(SaleId, OrderRef)],
        call: impl Fn(&SaleId, u32, &OrderRef) -> Cmd,
    ) -> Vec<Result<Value>> {
        let mut out: Vec<Option<Result<Value>>> = (0..orders.len()).map(|_| None).collect();
        let mut sent = Vec::new();
        let mut calls = Vec::new();
        for (i, (sale, order)) in orders.iter().enumerate() {
            match self.route(sale, &order.user).await {
                Ok((group, b)) => {
                    sent.push(i);
                    calls.push((group, call(sale, b, order)));
                }
                Err(e) => out[i] = Some(Err(e)),
            }
        }
        for (i, r) in sent.into_iter().zip(self.eval_each(script, calls).await) {
            out[i] = Some(r);
        }
        out.into_iter()
            .map(|r| r.unwrap_or_else(|| Err(Error::unavailable_msg("no reply"))))
            .collect()
    }

    /// Readies Redis for sales (`flashsale migrate`): loads every script (on a cluster, on
    /// every primary) and, on a cluster, checks that it is healthy and serves every slot.
    /// Returns what it found, in words.
    pub async fn prepare(&self) -> Result<String> {
        let mut conn = self.conn.clone();
        let s = &self.scripts;
        for script in [
            &s.admit,
            &s.create,
            &s.release,
            &s.confirm,
            &s.add_stock,
            &s.claim,
        ] {
            script.load_async(&mut conn).await.map_err(unavailable)?;
        }
        let Conn::Cluster(_) = &self.conn else {
            return Ok("Redis (one node): scripts loaded".into());
        };
        let info: String = redis::cmd("CLUSTER")
            .arg("INFO")
            .query_async(&mut conn)
            .await
            .map_err(unavailable)?;
        let field = |name: &str| {
            info.lines()
                .find_map(|l| l.trim().strip_prefix(name)?.strip_prefix(':'))
                .unwrap_or("?")
                .to_owned()
        };
        let (state, slots, size) = (
            field("cluster_state"),
            field("cluster_slots_ok"),
            field("cluster_size"),
        );
        if state != "ok" || slots != "16384" {
            return Err(Error::unavailable_msg(format!(
                "the Redis Cluster is not ready: cluster_state {state}, {slots} of 16384 \
                 slots served"
            )));
        }
        Ok(format!(
            "Redis Cluster of {size} primaries serving all 16384 slots: scripts loaded on \
             every primary"
        ))
    }

    /// Test hook: moves the sale's clock forward by `us` microseconds (the scripts add this
    /// skew to Redis `TIME`). Production never sets it.
    pub async fn advance_clock(&self, sale: &SaleId, us: i64) -> Result<()> {
        let n = self.bucket_count(sale).await?;
        let mut conn = self.conn.clone();
        for b in 0..n {
            let _: i64 = redis::cmd("HINCRBY")
                .arg(self.keys_of(sale, b).sale)
                .arg("skew")
                .arg(us)
                .query_async(&mut conn)
                .await
                .map_err(unavailable)?;
        }
        Ok(())
    }

    /// `(slot group, bucket)` of an order: the pipeline group of a batch call (one per
    /// bucket's hash tag) and the bucket to call.
    async fn route(&self, sale: &SaleId, user: &UserId) -> Result<(String, u32)> {
        let (b, _) = self.bucket_of(sale, user).await?;
        Ok((self.base(sale, b), b))
    }
}

#[async_trait]
impl Admission for RedisAdmission {
    async fn create_sale(&self, sale: &Sale) -> Result<()> {
        let n = sale.stock_buckets.max(1);
        let mut conn = self.conn.clone();
        // The first bucket decides whether the sale exists; the others follow.
        for (b, stock) in stock_buckets::split(u64::from(sale.stock), n)
            .into_iter()
            .enumerate()
        {
            let k = self.keys_of(&sale.id, b as u32);
            let created: i64 = self
                .scripts
                .create
                .key(&k.sale)
                .key(&k.units)
                .key(&k.buckets)
                .key(&k.idem)
                .key(&k.rejected)
                .key(&k.released)
                .key(&k.claimed)
                .key(&k.lent)
                .key(&k.borrowed)
                .arg(stock)
                .arg(sale.per_user_limit)
                .arg(sale.user_rate.per_second)
                .arg(sale.user_rate.burst)
                .arg(sale.starts_at.micros())
                .arg(sale.ends_at.micros())
                .arg(sale.ends_at.millis().saturating_add(KEEP_AFTER_END_MS))
                .arg(n)
                .invoke_async(&mut conn)
                .await
                .map_err(unavailable)?;
            if created != 1 && b == 0 {
                return Err(Error::SaleExists(sale.id.clone()));
            }
        }
        self.bucket_counts.insert(sale.id.clone(), n);
        Ok(())
    }

    async fn add_stock(&self, sale: &SaleId, units: u32) -> Result<()> {
        let n = self.bucket_count(sale).await?;
        let mut conn = self.conn.clone();
        for (b, add) in stock_buckets::split(u64::from(units), n)
            .into_iter()
            .enumerate()
        {
            if add == 0 {
                continue;
            }
            let done: i64 = self
                .scripts
                .add_stock
                .key(self.keys_of(sale, b as u32).sale)
                .arg(add)
                .arg(sold_out::channel(&self.prefix, sale))
                .invoke_async(&mut conn)
                .await
                .map_err(unavailable)?;
            if done != 1 {
                return Err(missing(sale));
            }
        }
        Ok(())
    }

    async fn admit(&self, sale: &SaleId, req: &AdmitRequest) -> Result<Decision> {
        let Some(flags) = &self.flags else {
            let timer = metrics::admission(Backend::Redis, AdmissionOp::Admit);
            return timer
                .result(self.decide(sale, req).await)
                .map(|(d, _, _)| d);
        };
        if flags.answer_locally(sale, req) {
            return Ok(Decision::Rejected(Rejection::SoldOut));
        }
        let epoch = flags.epoch();
        let timer = metrics::admission(Backend::Redis, AdmissionOp::Admit);
        let (decision, _, left) = timer.result(self.decide(sale, req).await)?;
        // The decision stands whatever happens here: a failed read only skips learning.
        let learn = match left {
            Some(0) => self.stored_bucket_count(sale).await.ok().flatten(),
            _ => None,
        };
        if let Some(n) = learn {
            let keys = FlagKeys {
                buckets: (0..n)
                    .map(|b| {
                        let k = self.keys_of(sale, b);
                        [k.sale, k.units, k.lent]
                    })
                    .collect(),
            };
            flags.learn(sale, epoch, self.conn.clone(), keys);
        }
        Ok(decision)
    }

    async fn confirm(&self, sale: &SaleId, order: &OrderRef) -> Result<()> {
        let timer = metrics::admission(Backend::Redis, AdmissionOp::Confirm);
        let confirmed = async {
            let (b, _) = self.bucket_of(sale, &order.user).await?;
            let mut conn = self.conn.clone();
            self.scripts
                .confirm
                .key(self.keys_of(sale, b).idem)
                .arg(order.user.as_str())
                .arg(&order.key)
                .arg(order.order_id.to_string())
                .invoke_async::<i64>(&mut conn)
                .await
                .map_err(unavailable)
        };
        timer.result(confirmed.await).map(drop)
    }

    async fn abort(&self, sale: &SaleId, order: &OrderRef) -> Result<AbortOutcome> {
        let timer = metrics::admission(Backend::Redis, AdmissionOp::Abort);
        Ok(
            match timer.result(self.release_mode(sale, order, "abort").await)? {
                1 => AbortOutcome::Undone,
                2 => AbortOutcome::AlreadyClaimed,
                _ => AbortOutcome::Nothing,
            },
        )
    }

    async fn claim(&self, sale: &SaleId, order: &OrderRef) -> Result<bool> {
        let timer = metrics::admission(Backend::Redis, AdmissionOp::Claim);
        let claimed = async {
            let (b, _) = self.bucket_of(sale, &order.user).await?;
            let k = self.keys_of(sale, b);
            let mut conn = self.conn.clone();
            self.scripts
                .claim
                .key(&k.sale)
                .key(&k.released)
                .key(&k.claimed)
                .arg(order.order_id.to_string())
                .invoke_async::<i64>(&mut conn)
                .await
                .map_err(unavailable)
        };
        timer.result(claimed.await.and_then(|n| match n {
            -1 => Err(missing(sale)),
            n => Ok(n == 1),
        }))
    }

    async fn release(&self, sale: &SaleId, order: &OrderRef) -> Result<bool> {
        let timer = metrics::admission(Backend::Redis, AdmissionOp::Release);
        timer
            .result(self.release_mode(sale, order, "release").await)
            .map(|n| n == 1)
    }

    async fn confirm_batch(&self, orders: &[(SaleId, OrderRef)]) -> Vec<Result<()>> {
        let timer = metrics::admission(Backend::Redis, AdmissionOp::Confirm);
        let results: Vec<Result<()>> = self
            .batch(&self.scripts.confirm, orders, |sale, b, order| {
                let mut cmd = evalsha(&self.scripts.confirm, &[&self.keys_of(sale, b).idem]);
                cmd.arg(order.user.as_str())
                    .arg(&order.key)
                    .arg(order.order_id.to_string());
                cmd
            })
            .await
            .into_iter()
            .map(|r| int_reply(r).map(|_| ()))
            .collect();
        timer.finish(failed(&results));
        results
    }

    async fn claim_batch(&self, orders: &[(SaleId, OrderRef)]) -> Vec<Result<bool>> {
        let timer = metrics::admission(Backend::Redis, AdmissionOp::Claim);
        let results: Vec<Result<bool>> = self
            .batch(&self.scripts.claim, orders, |sale, b, order| {
                let k = self.keys_of(sale, b);
                let mut cmd = evalsha(&self.scripts.claim, &[&k.sale, &k.released, &k.claimed]);
                cmd.arg(order.order_id.to_string());
                cmd
            })
            .await
            .into_iter()
            .zip(orders)
            .map(|(r, (sale, _))| match int_reply(r)? {
                -1 => Err(missing(sale)),
                n => Ok(n == 1),
            })
            .collect();
        timer.finish(failed(&results));
        results
    }

    async fn release_batch(&self, orders: &[(SaleId, OrderRef)]) -> Vec<Result<bool>> {
        let timer = metrics::admission(Backend::Redis, AdmissionOp::Release);
        let results: Vec<Result<bool>> = self
            .batch(&self.scripts.release, orders, |sale, b, order| {
                self.release_call(sale, b, order, "release")
            })
            .await
            .into_iter()
            .zip(orders)
            .map(|(r, (sale, _))| match int_reply(r)? {
                -1 => Err(missing(sale)),
                n => Ok(n == 1),
            })
            .collect();
        timer.finish(failed(&results));
        results
    }

    async fn counters(&self, sale: &SaleId) -> Result<Option<Counters>> {
        let Some(n) = self.stored_bucket_count(sale).await? else {
            return Ok(None);
        };
        let mut parts = Vec::with_capacity(n as usize);
        let mut in_flight = 0;
        for b in 0..n {
            let k = self.keys_of(sale, b);
            let mut conn = self.conn.clone();
            let (fields, rejected, lent): (
                std::collections::HashMap<String, i64>,
                std::collections::HashMap<String, i64>,
                Vec<String>,
            ) = redis::pipe()
                .cmd("HGETALL")
                .arg(&k.sale)
                .cmd("HGETALL")
                .arg(&k.rejected)
                .cmd("HVALS")
                .arg(&k.lent)
                .query_async(&mut conn)
                .await
                .map_err(unavailable)?;
            if fields.get("ready") != Some(&1) {
                return Ok(None);
            }
            // Units lent and not yet received are still the sale's.
            in_flight += lent
                .iter()
                .filter_map(|v| v.split_once(':')?.1.parse::<i64>().ok())
                .sum::<i64>();
            let get = |f: &str| fields.get(f).copied().unwrap_or(0);
            parts.push(Counters {
                stock: get("stock") as u64,
                stock_left: get("left"),
                accepted_orders: get("acc_o") as u64,
                accepted_units: get("acc_u") as u64,
                released_units: get("rel_u") as u64,
                rejected: rejected
                    .into_iter()
                    .filter(|(code, n)| code != "\n" && *n > 0)
                    .map(|(code, n)| (code, n as u64))
                    .collect(),
            });
        }
        let mut total = stock_buckets::sum_counters(parts);
        total.stock_left += in_flight;
        Ok(Some(total))
    }

    async fn ping(&self) -> Result<()> {
        let mut conn = self.conn.clone();
        let _: String = redis::cmd("PING")
            .query_async(&mut conn)
            .await
            .map_err(unavailable)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::error::Error as _;

    #[test]
    fn a_redis_failure_is_kept_as_the_cause() {
        let cause = redis::RedisError::from(std::io::Error::other("connection reset"));
        let err = unavailable(Arc::new(cause));
        let source = err.source().expect("a source");
        assert!(
            source.downcast_ref::<Arc<redis::RedisError>>().is_some(),
            "{source:?}"
        );
        let chain = storage::ErrorChain(&err).to_string();
        assert!(
            chain.starts_with("admission unavailable: redis: "),
            "{chain}"
        );
        assert!(chain.contains("connection reset"), "{chain}");
    }
}
