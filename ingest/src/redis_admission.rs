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
    AbortOutcome, AdmitRequest, Answer, Counters, Decision, OrderRef, Rejection, Snapshot,
};
use crate::sold_out::{self, FlagKeys, SoldOutFlags};
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
    Cluster(ClusterConnection),
}

impl redis::aio::ConnectionLike for Conn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> redis::RedisFuture<'a, Value> {
        match self {
            Conn::Node(c) => c.req_packed_command(cmd),
            Conn::Cluster(c) => c.req_packed_command(cmd),
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
            Conn::Cluster(c) => c.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Conn::Node(c) => c.get_db(),
            Conn::Cluster(c) => c.get_db(),
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
    fn release_call(&self, sale: &SaleId, order: &OrderRef, mode: &str) -> Cmd {
        let k = self.keys(sale);
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
            (pubsub, Conn::Cluster(conn))
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
                admit: Script::new(include_str!("lua/admit.lua")),
                create: Script::new(include_str!("lua/create.lua")),
                release: Script::new(include_str!("lua/release.lua")),
                confirm: Script::new(include_str!("lua/confirm.lua")),
                add_stock: Script::new(include_str!("lua/add_stock.lua")),
                claim: Script::new(include_str!("lua/claim.lua")),
            }),
            prefix: prefix.to_owned(),
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
        let base = format!("{}{{{}}}", self.prefix, sale.as_str());
        Keys {
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
    /// decided at, so the model tests can replay the same decision.
    pub async fn admit_at(&self, sale: &SaleId, req: &AdmitRequest) -> Result<(Decision, i64)> {
        self.decide(sale, req).await.map(|(d, now, _)| (d, now))
    }

    /// One decision; also the units left when the answer is `sold_out`.
    async fn decide(
        &self,
        sale: &SaleId,
        req: &AdmitRequest,
    ) -> Result<(Decision, i64, Option<i64>)> {
        let k = self.keys(sale);
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
        Ok((decision, now, left))
    }

    async fn release_mode(&self, sale: &SaleId, order: &OrderRef, mode: &str) -> Result<i64> {
        let k = self.keys(sale);
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
        let mut conn = self.conn.clone();
        let v: Option<i64> = redis::cmd("HGET")
            .arg(self.keys(sale).units)
            .arg(user.as_str())
            .query_async(&mut conn)
            .await
            .map_err(unavailable)?;
        Ok(v.unwrap_or(0).max(0) as u32)
    }

    /// Units held by every user of a sale (users holding none left out), sorted.
    pub async fn all_units(&self, sale: &SaleId) -> Result<Vec<(UserId, u32)>> {
        let mut conn = self.conn.clone();
        let map: std::collections::HashMap<String, i64> = redis::cmd("HGETALL")
            .arg(self.keys(sale).units)
            .query_async(&mut conn)
            .await
            .map_err(unavailable)?;
        let mut out: Vec<(UserId, u32)> = map
            .into_iter()
            .filter(|(_, n)| *n > 0)
            .filter_map(|(u, n)| UserId::parse(u).ok().map(|u| (u, n as u32)))
            .collect();
        out.sort();
        Ok(out)
    }

    /// Ids of the orders whose units went back (released by the settler or aborted by
    /// ingest), sorted.
    pub async fn released(&self, sale: &SaleId) -> Result<Vec<OrderId>> {
        let mut conn = self.conn.clone();
        let ids: Vec<String> = redis::cmd("SMEMBERS")
            .arg(self.keys(sale).released)
            .query_async(&mut conn)
            .await
            .map_err(unavailable)?;
        let mut out: Vec<OrderId> = ids.iter().filter_map(|s| s.parse().ok()).collect();
        out.sort();
        Ok(out)
    }

    /// Replaces a sale's keys with `state` in one MULTI/EXEC (reconciliation: after Redis
    /// lost its data, or when its counters drifted from the order store). Rejection
    /// counters are kept when present; token buckets start full.
    pub async fn restore(&self, sale: &Sale, state: &Snapshot) -> Result<()> {
        let k = self.keys(&sale.id);
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
        for key in [
            &k.sale,
            &k.units,
            &k.buckets,
            &k.idem,
            &k.rejected,
            &k.released,
            &k.claimed,
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
        let mut conn = self.conn.clone();
        let _: i64 = redis::cmd("HINCRBY")
            .arg(self.keys(sale).sale)
            .arg("skew")
            .arg(us)
            .query_async(&mut conn)
            .await
            .map_err(unavailable)?;
        Ok(())
    }
}

#[async_trait]
impl Admission for RedisAdmission {
    async fn create_sale(&self, sale: &Sale) -> Result<()> {
        let k = self.keys(&sale.id);
        let mut conn = self.conn.clone();
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
            .arg(sale.stock)
            .arg(sale.per_user_limit)
            .arg(sale.user_rate.per_second)
            .arg(sale.user_rate.burst)
            .arg(sale.starts_at.micros())
            .arg(sale.ends_at.micros())
            .arg(sale.ends_at.millis().saturating_add(KEEP_AFTER_END_MS))
            .invoke_async(&mut conn)
            .await
            .map_err(unavailable)?;
        if created == 1 {
            Ok(())
        } else {
            Err(Error::SaleExists(sale.id.clone()))
        }
    }

    async fn add_stock(&self, sale: &SaleId, units: u32) -> Result<()> {
        let mut conn = self.conn.clone();
        let n: i64 = self
            .scripts
            .add_stock
            .key(self.keys(sale).sale)
            .arg(units)
            .arg(sold_out::channel(&self.prefix, sale))
            .invoke_async(&mut conn)
            .await
            .map_err(unavailable)?;
        if n == 1 {
            Ok(())
        } else {
            Err(missing(sale))
        }
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
        if left == Some(0) {
            let k = self.keys(sale);
            let keys = FlagKeys {
                sale: k.sale,
                units: k.units,
            };
            flags.learn(sale, epoch, self.conn.clone(), keys);
        }
        Ok(decision)
    }

    async fn confirm(&self, sale: &SaleId, order: &OrderRef) -> Result<()> {
        let timer = metrics::admission(Backend::Redis, AdmissionOp::Confirm);
        let mut conn = self.conn.clone();
        let confirmed: Result<i64> = self
            .scripts
            .confirm
            .key(self.keys(sale).idem)
            .arg(order.user.as_str())
            .arg(&order.key)
            .arg(order.order_id.to_string())
            .invoke_async(&mut conn)
            .await
            .map_err(unavailable);
        timer.result(confirmed).map(drop)
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

    async fn claim(&self, sale: &SaleId, order_id: OrderId) -> Result<bool> {
        let timer = metrics::admission(Backend::Redis, AdmissionOp::Claim);
        let k = self.keys(sale);
        let mut conn = self.conn.clone();
        let claimed: Result<i64> = self
            .scripts
            .claim
            .key(&k.sale)
            .key(&k.released)
            .key(&k.claimed)
            .arg(order_id.to_string())
            .invoke_async(&mut conn)
            .await
            .map_err(unavailable);
        timer.result(claimed.and_then(|n| match n {
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
        let calls = orders
            .iter()
            .map(|(sale, order)| {
                let idem = self.keys(sale).idem;
                let mut cmd = evalsha(&self.scripts.confirm, &[&idem]);
                cmd.arg(order.user.as_str())
                    .arg(&order.key)
                    .arg(order.order_id.to_string());
                (sale.to_string(), cmd)
            })
            .collect();
        let results: Vec<Result<()>> = self
            .eval_each(&self.scripts.confirm, calls)
            .await
            .into_iter()
            .map(|r| int_reply(r).map(|_| ()))
            .collect();
        timer.finish(failed(&results));
        results
    }

    async fn claim_batch(&self, orders: &[(SaleId, OrderId)]) -> Vec<Result<bool>> {
        let timer = metrics::admission(Backend::Redis, AdmissionOp::Claim);
        let calls = orders
            .iter()
            .map(|(sale, id)| {
                let k = self.keys(sale);
                let mut cmd = evalsha(&self.scripts.claim, &[&k.sale, &k.released, &k.claimed]);
                cmd.arg(id.to_string());
                (sale.to_string(), cmd)
            })
            .collect();
        let results: Vec<Result<bool>> = self
            .eval_each(&self.scripts.claim, calls)
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
        let calls = orders
            .iter()
            .map(|(sale, order)| (sale.to_string(), self.release_call(sale, order, "release")))
            .collect();
        let results: Vec<Result<bool>> = self
            .eval_each(&self.scripts.release, calls)
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
        let k = self.keys(sale);
        let mut conn = self.conn.clone();
        let (fields, rejected): (
            std::collections::HashMap<String, i64>,
            std::collections::HashMap<String, i64>,
        ) = redis::pipe()
            .cmd("HGETALL")
            .arg(&k.sale)
            .cmd("HGETALL")
            .arg(&k.rejected)
            .query_async(&mut conn)
            .await
            .map_err(unavailable)?;
        if fields.get("ready") != Some(&1) {
            return Ok(None);
        }
        let get = |f: &str| fields.get(f).copied().unwrap_or(0);
        let mut rejected: Vec<(String, u64)> = rejected
            .into_iter()
            .filter(|(code, n)| code != "\n" && *n > 0)
            .map(|(code, n)| (code, n as u64))
            .collect();
        rejected.sort();
        Ok(Some(Counters {
            stock: get("stock") as u64,
            stock_left: get("left"),
            accepted_orders: get("acc_o") as u64,
            accepted_units: get("acc_u") as u64,
            released_units: get("rel_u") as u64,
            rejected,
        }))
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
