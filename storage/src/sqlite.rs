//! The embedded order store on SQLite: WAL journal, group commit, migrations by
//! `rusqlite_migration`.
//!
//! # Writes: one writer thread, group commit
//!
//! One thread owns the write connection. Every write call (`create_sale`, `add_stock`,
//! `persist_batch`, `apply_batch`, `transition`, `mark_released`, `mark_notified`,
//! `mark_published`) becomes a command on a bounded queue ([`WRITE_QUEUE`] commands; a
//! caller waits for room when it is full). The writer takes what is queued, up to
//! [`MAX_GROUP`] commands, and runs them in order in **one** transaction, each inside its
//! own savepoint: a command that fails (say [`Error::SaleExists`]) is rolled back alone and
//! its caller gets its error, while the others commit together (one commit for the group).
//! If the commit fails, every command of the group gets the error and nothing of the group
//! is kept. Callers wait for their answer on a oneshot channel; a caller that goes away
//! does not cancel its command. The thread ends (and the store is dropped) when the last
//! clone of the store is dropped; dropping waits for the group under way.
//!
//! # Reads
//!
//! Reads use [`READERS`] separate read-only connections on tokio's blocking pool, never
//! queued behind the writer: WAL lets readers see the last commit while a write is under
//! way. A call that reads several statements (`get_order`) reads one snapshot.
//!
//! # Durability: WAL with `synchronous = NORMAL`
//!
//! The order log is the source of truth for accepted orders: it fsyncs a record before any
//! 202 is sent. The store is derived from it, so it does not need to fsync every commit:
//! with WAL and `synchronous = NORMAL`, a commit survives a process crash (`kill -9`, the
//! WAL is in the OS's hands), and a power loss loses at most the last commits, which the
//! log replays on restart: persisting is idempotent and the log checkpoint is in the same
//! transaction as the orders it covers (so it is lost with them and the records are read
//! again), and status changes lost that way are derived again by the sweep (an order found
//! `persisted` or `payment_pending` is looked up at the provider before it is charged
//! again, and notifications are keyed per order and outcome, so a repeated one reaches the
//! buyer once). The database is never corrupted by a power loss in this mode, only behind.
//! The catalog (sales, stock additions) is not in the log, so a group holding a catalog
//! write commits with `synchronous = FULL`: an answered catalog change is on the disk.

use crate::batch::{self, Current, Deltas};
use crate::metrics::{self, PoolSource, PoolStatus};
use crate::{
    model::*, BoxError, Change, Checkpoint, Error, Order, OrderStore, Result, Sale, SaleId,
    SaleTotals, StatusCount,
};
use async_trait::async_trait;
use rusqlite::{params, Connection, OpenFlags, OptionalExtension, Row};
use rusqlite_migration::{Migrations, M};
use std::collections::HashMap;
use std::panic::AssertUnwindSafe;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, TryLockError, Weak};
use std::thread::JoinHandle;
use tokio::sync::{mpsc, oneshot};

/// How many write commands may wait for the writer; callers wait for room beyond that.
pub const WRITE_QUEUE: usize = 1024;
/// At most this many commands share one transaction (one commit).
pub const MAX_GROUP: usize = 256;
/// Read connections.
pub const READERS: usize = 2;

/// What the charge-id triggers of migration 0003 raise.
const CHARGE_ID_TOO_LONG: &str = "orders.charge_id is longer than 200 characters";

fn migrations() -> Migrations<'static> {
    Migrations::new(vec![
        M::up(include_str!("../migrations/0001_initial.sql")),
        M::up(include_str!("../migrations/0002_outbox.sql")),
        M::up(include_str!("../migrations/0003_sweep_indexes.sql")),
        M::up(include_str!("../migrations/0004_sale_totals.sql")),
        M::up(include_str!("../migrations/0005_refunds_and_retries.sql")),
        M::up(include_str!("../migrations/0006_documents.sql")),
    ])
}

/// The embedded database (or the thread or task around it) failed with `e`.
fn unavailable(e: impl Into<BoxError>) -> Error {
    Error::unavailable("embedded database", e)
}

/// A database error of a write: the charge-id limit becomes [`Error::Invalid`].
fn write_error(e: rusqlite::Error) -> Error {
    if e.to_string().contains(CHARGE_ID_TOO_LONG) {
        Error::Invalid(InvalidValue {
            field: "charge_id",
            reason: "longer than 200 characters",
        })
    } else {
        unavailable(e)
    }
}

fn writer_stopped() -> Error {
    Error::unavailable_msg("the store's writer has stopped")
}

/// How much the writer has done: groups (transactions) and commands run in them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WriterStats {
    /// Transactions committed or attempted.
    pub groups: u64,
    /// Commands run in them.
    pub commands: u64,
}

/// SQLite-backed [`OrderStore`]. Cheap to clone (clones share the writer and readers).
#[derive(Clone)]
pub struct SqliteStore {
    inner: Arc<Inner>,
}

struct Inner {
    path: PathBuf,
    /// `None` only while dropping.
    writer: Option<mpsc::Sender<Box<dyn Command>>>,
    thread: Option<JoinHandle<()>>,
    readers: Vec<Mutex<Connection>>,
    next_reader: AtomicUsize,
    stats: Arc<Stats>,
}

#[derive(Default)]
struct Stats {
    groups: AtomicU64,
    commands: AtomicU64,
}

impl Drop for Inner {
    fn drop(&mut self) {
        // Closing the queue ends the writer once it has run what was queued.
        self.writer.take();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl std::fmt::Debug for SqliteStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqliteStore")
            .field("path", &self.inner.path)
            .finish()
    }
}

fn configure(conn: &Connection) -> Result<()> {
    conn.busy_timeout(std::time::Duration::from_secs(5))
        .map_err(unavailable)?;
    conn.pragma_update(None, "foreign_keys", "ON")
        .map_err(unavailable)
}

impl SqliteStore {
    /// Opens (creating if needed) the database at `path`, applies pending migrations and
    /// starts the writer thread.
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref().to_path_buf();
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(unavailable)?;
        }
        let mut conn = Connection::open(&path).map_err(unavailable)?;
        configure(&conn)?;
        conn.pragma_update(None, "journal_mode", "WAL")
            .map_err(unavailable)?;
        // NORMAL: see the module documentation (the order log replays what a power loss
        // takes).
        conn.pragma_update(None, "synchronous", "NORMAL")
            .map_err(unavailable)?;
        migrations().to_latest(&mut conn).map_err(unavailable)?;
        let readers = (0..READERS)
            .map(|_| {
                let reader = Connection::open_with_flags(
                    &path,
                    OpenFlags::SQLITE_OPEN_READ_WRITE
                        | OpenFlags::SQLITE_OPEN_URI
                        | OpenFlags::SQLITE_OPEN_NO_MUTEX,
                )
                .map_err(unavailable)?;
                configure(&reader)?;
                reader
                    .pragma_update(None, "query_only", "ON")
                    .map_err(unavailable)?;
                Ok(Mutex::new(reader))
            })
            .collect::<Result<Vec<_>>>()?;
        let (tx, rx) = mpsc::channel(WRITE_QUEUE);
        let stats = Arc::new(Stats::default());
        let thread_stats = Arc::clone(&stats);
        let thread = std::thread::Builder::new()
            .name("sqlite-writer".into())
            .spawn(move || writer_loop(&conn, rx, &thread_stats))
            .map_err(unavailable)?;
        let inner = Arc::new(Inner {
            path,
            writer: Some(tx),
            thread: Some(thread),
            readers,
            next_reader: AtomicUsize::new(0),
            stats,
        });
        let pool: Weak<Inner> = Arc::downgrade(&inner);
        metrics::watch_pool(pool);
        Ok(SqliteStore { inner })
    }

    /// Where the database lives.
    pub fn path(&self) -> &Path {
        &self.inner.path
    }

    /// What the writer has done so far (how well writes are grouped).
    pub fn writer_stats(&self) -> WriterStats {
        WriterStats {
            groups: self.inner.stats.groups.load(Ordering::Relaxed),
            commands: self.inner.stats.commands.load(Ordering::Relaxed),
        }
    }

    /// Runs `f` on the writer, in the next group's transaction (inside a savepoint of its
    /// own); returns once the group committed.
    async fn write<T, F>(&self, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> Result<T> + Send + 'static,
    {
        self.submit(false, f).await
    }

    /// As [`write`](Self::write), for writes the order log does not hold (the catalog:
    /// sales and stock additions): their group commits with `synchronous = FULL`, so an
    /// answered catalog change survives a power loss too.
    async fn durable_write<T, F>(&self, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> Result<T> + Send + 'static,
    {
        self.submit(true, f).await
    }

    async fn submit<T, F>(&self, durable: bool, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> Result<T> + Send + 'static,
    {
        let (reply, answer) = oneshot::channel();
        let job: Box<dyn Command> = Box::new(Job {
            durable,
            work: Some(f),
            result: None,
            reply,
        });
        let writer = self.inner.writer.as_ref().ok_or_else(writer_stopped)?;
        writer.send(job).await.map_err(|_| writer_stopped())?;
        answer.await.map_err(|_| writer_stopped())?
    }

    /// Runs `f` on a read connection on the blocking pool.
    async fn read<T, F>(&self, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&mut Connection) -> Result<T> + Send + 'static,
    {
        let inner = Arc::clone(&self.inner);
        tokio::task::spawn_blocking(move || {
            let mut conn = inner.reader();
            f(&mut conn)
        })
        .await
        .map_err(unavailable)?
    }
}

/// The readers as the pool, the writer's queue as the callers waiting.
impl PoolSource for Inner {
    fn pool_status(&self) -> PoolStatus {
        let idle = self
            .readers
            .iter()
            .filter(|r| matches!(r.try_lock(), Ok(_) | Err(TryLockError::Poisoned(_))))
            .count() as u64;
        let waiting = self
            .writer
            .as_ref()
            .map_or(0, |w| w.max_capacity() - w.capacity()) as u64;
        PoolStatus {
            in_use: self.readers.len() as u64 - idle,
            idle,
            waiting,
        }
    }
}

impl Inner {
    /// A free reader if there is one, else wait for one in turn.
    fn reader(&self) -> MutexGuard<'_, Connection> {
        for r in &self.readers {
            if let Ok(guard) = r.try_lock() {
                return guard;
            }
        }
        let i = self.next_reader.fetch_add(1, Ordering::Relaxed) % self.readers.len();
        // A read that panicked leaves nothing half-done on its connection (a transaction
        // is rolled back as it unwinds): the connection can be used again.
        self.readers[i]
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }
}

/// One write call on the writer's queue.
trait Command: Send {
    /// Runs the call on the write connection (inside its savepoint); whether it succeeded.
    fn run(&mut self, conn: &Connection) -> bool;
    /// Answers the caller once the group's fate is known: `Ok` if it committed, else why
    /// not. A call that failed by itself gets its own error either way.
    fn finish(self: Box<Self>, group: std::result::Result<(), &str>);
    /// Whether its commit must reach the disk before it is answered (see `durable`).
    fn durable(&self) -> bool;
}

struct Job<T, F> {
    durable: bool,
    work: Option<F>,
    result: Option<Result<T>>,
    reply: oneshot::Sender<Result<T>>,
}

impl<T, F> Command for Job<T, F>
where
    T: Send,
    F: FnOnce(&Connection) -> Result<T> + Send,
{
    fn durable(&self) -> bool {
        self.durable
    }

    fn run(&mut self, conn: &Connection) -> bool {
        let Some(work) = self.work.take() else {
            return false;
        };
        let result = work(conn);
        let ok = result.is_ok();
        self.result = Some(result);
        ok
    }

    fn finish(self: Box<Self>, group: std::result::Result<(), &str>) {
        let answer = match (self.result, group) {
            (Some(Err(e)), _) => Err(e),
            (Some(Ok(v)), Ok(())) => Ok(v),
            (Some(Ok(_)), Err(why)) | (None, Err(why)) => {
                Err(Error::unavailable_msg(why.to_owned()))
            }
            (None, Ok(())) => Err(Error::unavailable_msg("the write failed in the store")),
        };
        // The caller may have gone away: its write happened (or not) all the same.
        let _ = self.reply.send(answer);
    }
}

fn writer_loop(conn: &Connection, mut queue: mpsc::Receiver<Box<dyn Command>>, stats: &Stats) {
    let mut group = Vec::with_capacity(MAX_GROUP);
    while let Some(first) = queue.blocking_recv() {
        group.push(first);
        while group.len() < MAX_GROUP {
            match queue.try_recv() {
                Ok(command) => group.push(command),
                Err(_) => break,
            }
        }
        stats.groups.fetch_add(1, Ordering::Relaxed);
        stats
            .commands
            .fetch_add(group.len() as u64, Ordering::Relaxed);
        let durable = group.iter().any(|c| c.durable());
        if durable {
            // Outside a transaction, so it applies to the group's commit.
            let _ = conn.execute_batch("PRAGMA synchronous = FULL");
        }
        run_group(conn, group.drain(..));
        if durable {
            let _ = conn.execute_batch("PRAGMA synchronous = NORMAL");
        }
    }
}

/// Fails every command of `done` (run in a transaction that is gone) with `why`.
fn fail_all(done: &mut Vec<Box<dyn Command>>, why: &str) {
    for command in done.drain(..) {
        command.finish(Err(why));
    }
}

/// Runs a group of commands in one transaction, each in its own savepoint, and commits.
fn run_group(conn: &Connection, group: impl Iterator<Item = Box<dyn Command>>) {
    // Commands run in the open transaction, waiting for its commit.
    let mut done: Vec<Box<dyn Command>> = Vec::new();
    for mut command in group {
        if conn.is_autocommit() {
            if let Err(e) = conn.execute_batch("BEGIN IMMEDIATE") {
                command.finish(Err(&format!("cannot start a transaction: {e}")));
                continue;
            }
        }
        if let Err(e) = conn.execute_batch("SAVEPOINT command") {
            command.finish(Err(&format!("cannot start a savepoint: {e}")));
            continue;
        }
        let ok = std::panic::catch_unwind(AssertUnwindSafe(|| command.run(conn))).unwrap_or(false);
        if conn.is_autocommit() {
            // SQLite rolled the whole transaction back (an I/O error, a full disk): the
            // commands before this one lost their writes too.
            let why = "the store's transaction was rolled back (I/O error?)";
            fail_all(&mut done, why);
            command.finish(Err(why));
            continue;
        }
        let end = if ok {
            conn.execute_batch("RELEASE command")
        } else {
            conn.execute_batch("ROLLBACK TO command; RELEASE command")
        };
        if let Err(e) = end {
            // The command cannot be kept or undone alone: give up the whole group.
            let why = format!("cannot end a savepoint: {e}");
            if !conn.is_autocommit() {
                let _ = conn.execute_batch("ROLLBACK");
            }
            fail_all(&mut done, &why);
            command.finish(Err(&why));
            continue;
        }
        done.push(command);
    }
    if conn.is_autocommit() {
        return;
    }
    match conn.execute_batch("COMMIT") {
        Ok(()) => {
            for command in done {
                command.finish(Ok(()));
            }
        }
        Err(e) => {
            if !conn.is_autocommit() {
                let _ = conn.execute_batch("ROLLBACK");
            }
            fail_all(&mut done, &format!("commit failed: {e}"));
        }
    }
}

fn sale_from_row(body: String, stock: i64) -> Result<Sale> {
    let mut sale: Sale = serde_json::from_str(&body).map_err(|e| Error::Corrupt(e.to_string()))?;
    sale.stock = u32::try_from(stock).map_err(|e| Error::Corrupt(e.to_string()))?;
    Ok(sale)
}

const ORDER_COLUMNS: &str = "order_id, sale_id, user_id, quantity, amount_minor, currency, \
     sequence, idempotency_key, payment_token, status, accepted_at, charge_id, released_at, \
     notified_at, refund_state, failed_attempts, retry_after, receipt_key, refund_note_key";

fn corrupt(e: impl std::fmt::Display) -> Error {
    Error::Corrupt(e.to_string())
}

fn order_from_row(row: &Row<'_>) -> Result<Order> {
    let get_s = |i: usize| row.get::<_, String>(i).map_err(corrupt);
    let new = NewOrder {
        order_id: get_s(0)?.parse().map_err(corrupt)?,
        sale_id: SaleId::parse(get_s(1)?).map_err(corrupt)?,
        user_id: UserId::parse(get_s(2)?).map_err(corrupt)?,
        quantity: row.get(3).map_err(corrupt)?,
        amount: Money {
            minor: row.get(4).map_err(corrupt)?,
            currency: Currency::parse(&get_s(5)?).map_err(corrupt)?,
        },
        sequence: row.get::<_, i64>(6).map_err(corrupt)? as u64,
        idempotency_key: get_s(7)?,
        payment_token: get_s(8)?,
        accepted_at: Timestamp(row.get(10).map_err(corrupt)?),
    };
    Ok(Order {
        new,
        status: get_s(9)?.parse().map_err(corrupt)?,
        history: Vec::new(),
        charge_id: row.get(11).map_err(corrupt)?,
        released_at: row
            .get::<_, Option<i64>>(12)
            .map_err(corrupt)?
            .map(Timestamp),
        notified_at: row
            .get::<_, Option<i64>>(13)
            .map_err(corrupt)?
            .map(Timestamp),
        refund: row
            .get::<_, Option<String>>(14)
            .map_err(corrupt)?
            .map(|s| s.parse())
            .transpose()
            .map_err(corrupt)?,
        failed_attempts: row.get(15).map_err(corrupt)?,
        retry_after: row
            .get::<_, Option<i64>>(16)
            .map_err(corrupt)?
            .map(Timestamp),
        receipt_key: row.get(17).map_err(corrupt)?,
        refund_note_key: row.get(18).map_err(corrupt)?,
    })
}

fn query_orders(conn: &Connection, sql: &str, params: impl rusqlite::Params) -> Result<Vec<Order>> {
    let mut stmt = conn.prepare_cached(sql).map_err(unavailable)?;
    let mut rows = stmt.query(params).map_err(unavailable)?;
    let mut out = Vec::new();
    while let Some(row) = rows.next().map_err(unavailable)? {
        out.push(order_from_row(row)?);
    }
    Ok(out)
}

fn status_list(statuses: &[OrderStatus]) -> String {
    // Statuses come from the enum, never from input: safe to inline as literals.
    statuses
        .iter()
        .map(|s| format!("'{}'", s.as_str()))
        .collect::<Vec<_>>()
        .join(",")
}

/// The statuses the partial index `orders_open` holds.
const OPEN: [OrderStatus; 2] = [OrderStatus::Persisted, OrderStatus::PaymentPending];

/// `orders_in_status`: orders in `statuses`, oldest accepted first (`?1` = limit). When
/// every status asked for is an open one, the query repeats the index's own condition so
/// SQLite can use `orders_open` (it proves a partial index usable only from terms that
/// appear in the query as they appear in the index).
fn orders_in_status_sql(statuses: &[OrderStatus]) -> String {
    orders_in_status_where(statuses, "")
}

/// `orders_due` (`?1` = limit, `?2` = now): `orders_in_status`, less the orders waiting out
/// a deferral.
fn orders_due_sql(statuses: &[OrderStatus]) -> String {
    orders_in_status_where(statuses, " AND (retry_after IS NULL OR retry_after <= ?2)")
}

/// `documents_owed` (`?1` = limit), through `orders_documents_owed`.
fn documents_owed_sql() -> String {
    format!(
        "SELECT {ORDER_COLUMNS} FROM orders INDEXED BY orders_documents_owed \
         WHERE (status = 'paid' AND receipt_key IS NULL) \
            OR (refund_state = 'refunded' AND refund_note_key IS NULL) \
         ORDER BY accepted_at LIMIT ?1"
    )
}

/// `refunds_owed` (`?1` = limit), through `orders_refunds_owed`.
fn refunds_owed_sql() -> String {
    format!(
        "SELECT {ORDER_COLUMNS} FROM orders INDEXED BY orders_refunds_owed \
         WHERE refund_state = 'owed' ORDER BY accepted_at LIMIT ?1"
    )
}

fn orders_in_status_where(statuses: &[OrderStatus], and: &str) -> String {
    let open = !statuses.is_empty() && statuses.iter().all(|s| OPEN.contains(s));
    let (index, guard) = if open {
        (
            " INDEXED BY orders_open",
            "status IN ('persisted', 'payment_pending') AND ",
        )
    } else {
        ("", "")
    };
    format!(
        "SELECT {ORDER_COLUMNS} FROM orders{index} WHERE {guard}status IN ({}){and} \
         ORDER BY accepted_at LIMIT ?1",
        status_list(statuses)
    )
}

/// `unfinished_followups` (`?1` = limit); the condition is `orders_followups`'s.
fn followups_sql() -> String {
    format!(
        "SELECT {ORDER_COLUMNS} FROM orders INDEXED BY orders_followups WHERE \
         (status IN ('payment_failed', 'expired') AND released_at IS NULL) OR \
         (status IN ('paid', 'payment_failed', 'expired') AND notified_at IS NULL) \
         ORDER BY accepted_at LIMIT ?1"
    )
}

/// `pending_since` (`?1` = before, `?2` = limit), through `orders_pending`.
fn pending_sql() -> String {
    format!(
        "SELECT {ORDER_COLUMNS} FROM orders INDEXED BY orders_pending \
         WHERE status = 'payment_pending' AND updated_at < ?1 ORDER BY updated_at LIMIT ?2"
    )
}

/// `unpublished_events` (`?1` = limit), through `order_history_unpublished`.
const UNPUBLISHED_SQL: &str = "SELECT h.order_id, o.sale_id, o.user_id, o.quantity, h.status, \
     h.at, o.charge_id FROM order_history h INDEXED BY order_history_unpublished \
     JOIN orders o ON o.order_id = h.order_id \
     WHERE h.published = 0 ORDER BY h.at, h.rowid LIMIT ?1";

/// Applies a batch of changes on the write connection (inside the command's savepoint):
/// reads the touched rows, plans ([`batch::plan`]), writes one update per changed order
/// and the history rows.
fn apply_changes(c: &Connection, changes: &[Change], now: i64) -> Result<Vec<bool>> {
    let mut current = HashMap::new();
    let mut orders = HashMap::new();
    {
        let mut select = c
            .prepare_cached(
                "SELECT status, released_at IS NOT NULL, notified_at IS NOT NULL, sale_id, \
                 quantity, refund_state, failed_attempts, receipt_key IS NOT NULL, \
                 refund_note_key IS NOT NULL FROM orders WHERE order_id = ?1",
            )
            .map_err(unavailable)?;
        for id in batch::touched(changes) {
            let row = select
                .query_row(params![id.to_string()], |r| {
                    Ok((
                        r.get::<_, String>(0)?,
                        r.get::<_, bool>(1)?,
                        r.get::<_, bool>(2)?,
                        r.get::<_, String>(3)?,
                        r.get::<_, u32>(4)?,
                        r.get::<_, Option<String>>(5)?,
                        r.get::<_, u32>(6)?,
                        r.get::<_, bool>(7)?,
                        r.get::<_, bool>(8)?,
                    ))
                })
                .optional()
                .map_err(unavailable)?;
            if let Some((
                status,
                released,
                notified,
                sale,
                quantity,
                refund,
                failed_attempts,
                receipt,
                refund_note,
            )) = row
            {
                current.insert(
                    id,
                    Current {
                        status: status.parse().map_err(corrupt)?,
                        released,
                        notified,
                        refund: refund.map(|r| r.parse()).transpose().map_err(corrupt)?,
                        failed_attempts,
                        receipt,
                        refund_note,
                    },
                );
                orders.insert(id, (sale, quantity));
            }
        }
    }
    let plan = batch::plan(changes, &current, now);
    let totals = batch::totals_of_plan(&plan, &current, &orders);
    if !plan.updates.is_empty() {
        let mut update = c
            .prepare_cached(
                "UPDATE orders SET status = ?2, updated_at = coalesce(?3, updated_at), \
                 charge_id = coalesce(?4, charge_id), released_at = coalesce(?5, released_at), \
                 notified_at = coalesce(?6, notified_at), \
                 refund_state = coalesce(?7, refund_state), \
                 failed_attempts = coalesce(?8, failed_attempts), \
                 retry_after = coalesce(?9, retry_after), \
                 receipt_key = coalesce(?10, receipt_key), \
                 refund_note_key = coalesce(?11, refund_note_key) WHERE order_id = ?1",
            )
            .map_err(unavailable)?;
        for u in &plan.updates {
            update
                .execute(params![
                    u.id.to_string(),
                    u.status.as_str(),
                    u.updated_at,
                    u.charge_id,
                    u.released_at,
                    u.notified_at,
                    u.refund_str(),
                    u.failed_attempts,
                    u.retry_after,
                    u.receipt_key,
                    u.refund_note_key,
                ])
                .map_err(write_error)?;
        }
    }
    if !plan.history.is_empty() {
        let mut history = c
            .prepare_cached(
                "INSERT INTO order_history (order_id, status, at) VALUES (?1, ?2, ?3) \
                 ON CONFLICT DO NOTHING",
            )
            .map_err(unavailable)?;
        for h in &plan.history {
            history
                .execute(params![h.id.to_string(), h.status.as_str(), h.at])
                .map_err(write_error)?;
        }
    }
    write_totals(c, &totals)?;
    Ok(plan.applied)
}

/// Adds `deltas` to the `sale_totals` rows (inside the caller's transaction).
fn write_totals(c: &Connection, deltas: &Deltas) -> Result<()> {
    if deltas.is_empty() {
        return Ok(());
    }
    let mut upsert = c
        .prepare_cached(
            "INSERT INTO sale_totals (sale_id, status, orders, units, released_orders, \
             released_units) VALUES (?1, ?2, ?3, ?4, ?5, ?6) \
             ON CONFLICT (sale_id, status) DO UPDATE SET \
             orders = orders + excluded.orders, units = units + excluded.units, \
             released_orders = released_orders + excluded.released_orders, \
             released_units = released_units + excluded.released_units",
        )
        .map_err(unavailable)?;
    for ((sale, status), d) in deltas {
        upsert
            .execute(params![
                sale,
                status,
                d.orders,
                d.units,
                d.released_orders,
                d.released_units
            ])
            .map_err(unavailable)?;
    }
    Ok(())
}

impl SqliteStore {
    /// One change, as the single-order calls make it.
    async fn apply_one(&self, change: Change) -> Result<bool> {
        let applied = self.apply_batch(std::slice::from_ref(&change)).await?;
        Ok(applied.first().copied().unwrap_or(false))
    }
}

#[async_trait]
impl OrderStore for SqliteStore {
    async fn create_sale(&self, sale: &Sale) -> Result<()> {
        let sale = sale.clone();
        self.durable_write(move |c| {
            let body = serde_json::to_string(&sale).map_err(corrupt)?;
            let n = c
                .prepare_cached(
                    "INSERT INTO sales (id, body, stock, created_at) VALUES (?1, ?2, ?3, ?4) \
                     ON CONFLICT (id) DO NOTHING",
                )
                .map_err(unavailable)?
                .execute(params![
                    sale.id.as_str(),
                    body,
                    sale.stock,
                    sale.created_at.millis()
                ])
                .map_err(unavailable)?;
            if n == 0 {
                return Err(Error::SaleExists(sale.id));
            }
            Ok(())
        })
        .await
    }

    async fn get_sale(&self, id: &SaleId) -> Result<Option<Sale>> {
        let id = id.clone();
        self.read(move |c| {
            let row: Option<(String, i64)> = c
                .prepare_cached("SELECT body, stock FROM sales WHERE id = ?1")
                .map_err(unavailable)?
                .query_row(params![id.as_str()], |r| Ok((r.get(0)?, r.get(1)?)))
                .optional()
                .map_err(unavailable)?;
            row.map(|(b, s)| sale_from_row(b, s)).transpose()
        })
        .await
    }

    async fn list_sales(&self) -> Result<Vec<Sale>> {
        self.read(|c| {
            let mut stmt = c
                .prepare_cached("SELECT body, stock FROM sales ORDER BY created_at")
                .map_err(unavailable)?;
            let rows = stmt
                .query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?)))
                .map_err(unavailable)?;
            let mut out = Vec::new();
            for row in rows {
                let (b, s) = row.map_err(unavailable)?;
                out.push(sale_from_row(b, s)?);
            }
            Ok(out)
        })
        .await
    }

    async fn add_stock(&self, id: &SaleId, units: u32) -> Result<Sale> {
        let id = id.clone();
        self.durable_write(move |c| {
            let n = c
                .prepare_cached(
                    "UPDATE sales SET stock = stock + ?2 WHERE id = ?1 AND stock + ?2 <= ?3",
                )
                .map_err(unavailable)?
                .execute(params![id.as_str(), units, MAX_STOCK])
                .map_err(unavailable)?;
            let row: Option<(String, i64)> = c
                .prepare_cached("SELECT body, stock FROM sales WHERE id = ?1")
                .map_err(unavailable)?
                .query_row(params![id.as_str()], |r| Ok((r.get(0)?, r.get(1)?)))
                .optional()
                .map_err(unavailable)?;
            match (n, row) {
                (1, Some((b, s))) => sale_from_row(b, s),
                (_, Some(_)) => Err(Error::Invalid(InvalidValue {
                    field: "quantity",
                    reason: "the sale's stock would exceed 100000000 units",
                })),
                (_, None) => Err(Error::UnknownSale(id)),
            }
        })
        .await
    }

    async fn persist_batch(
        &self,
        orders: &[NewOrder],
        checkpoint: Option<&Checkpoint>,
    ) -> Result<usize> {
        let orders = orders.to_vec();
        let checkpoint = checkpoint.cloned();
        self.write(move |c| {
            let now = Timestamp::now().millis();
            let mut inserted = 0;
            let mut totals = Deltas::new();
            let mut ins = c
                .prepare_cached(
                    "INSERT INTO orders (order_id, sale_id, user_id, quantity, amount_minor, \
                     currency, sequence, idempotency_key, payment_token, status, \
                     accepted_at, updated_at) \
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, 'persisted', ?10, ?11) \
                     ON CONFLICT (order_id) DO NOTHING",
                )
                .map_err(unavailable)?;
            let mut hist = c
                .prepare_cached(
                    "INSERT INTO order_history (order_id, status, at) VALUES (?1, ?2, ?3) \
                     ON CONFLICT DO NOTHING",
                )
                .map_err(unavailable)?;
            for o in &orders {
                let id = o.order_id.to_string();
                let n = ins
                    .execute(params![
                        id,
                        o.sale_id.as_str(),
                        o.user_id.as_str(),
                        o.quantity,
                        o.amount.minor,
                        o.amount.currency.as_str(),
                        o.sequence as i64,
                        o.idempotency_key,
                        o.payment_token,
                        o.accepted_at.millis(),
                        now,
                    ])
                    .map_err(unavailable)?;
                if n == 1 {
                    inserted += 1;
                    batch::persisted(&mut totals, o.sale_id.as_str(), o.quantity);
                    hist.execute(params![id, "accepted", o.accepted_at.millis()])
                        .map_err(unavailable)?;
                    hist.execute(params![id, "persisted", now])
                        .map_err(unavailable)?;
                }
            }
            write_totals(c, &totals)?;
            if let Some(cp) = &checkpoint {
                c.prepare_cached(
                    "INSERT INTO consumer_offsets (consumer, partition, next_offset) \
                     VALUES (?1, ?2, ?3) ON CONFLICT (consumer, partition) \
                     DO UPDATE SET next_offset = max(next_offset, excluded.next_offset)",
                )
                .map_err(unavailable)?
                .execute(params![cp.consumer, cp.partition, cp.next_offset as i64])
                .map_err(unavailable)?;
            }
            Ok(inserted)
        })
        .await
    }

    async fn checkpoint(&self, consumer: &str, partition: u32) -> Result<Option<u64>> {
        let consumer = consumer.to_owned();
        self.read(move |c| {
            c.prepare_cached(
                "SELECT next_offset FROM consumer_offsets WHERE consumer = ?1 AND partition = ?2",
            )
            .map_err(unavailable)?
            .query_row(params![consumer, partition], |r| r.get::<_, i64>(0))
            .optional()
            .map(|o| o.map(|v| v as u64))
            .map_err(unavailable)
        })
        .await
    }

    async fn transition(
        &self,
        id: OrderId,
        from: OrderStatus,
        to: OrderStatus,
        charge_id: Option<&str>,
    ) -> Result<bool> {
        transition(from, to)?;
        self.apply_one(Change::Status {
            id,
            from,
            to,
            charge_id: charge_id.map(str::to_owned),
        })
        .await
    }

    async fn apply_batch(&self, changes: &[Change]) -> Result<Vec<bool>> {
        if changes.is_empty() {
            return Ok(Vec::new());
        }
        batch::check_document_keys(changes)?;
        let changes = changes.to_vec();
        self.write(move |c| apply_changes(c, &changes, Timestamp::now().millis()))
            .await
    }

    async fn mark_released(&self, id: OrderId) -> Result<bool> {
        self.apply_one(Change::Released(id)).await
    }

    async fn mark_notified(&self, id: OrderId) -> Result<bool> {
        self.apply_one(Change::Notified(id)).await
    }

    async fn get_order(&self, id: OrderId) -> Result<Option<Order>> {
        self.read(move |c| {
            // One read transaction: the order and its history from one snapshot.
            let tx = c.transaction().map_err(unavailable)?;
            let id = id.to_string();
            let sql = format!("SELECT {ORDER_COLUMNS} FROM orders WHERE order_id = ?1");
            let Some(mut order) = query_orders(&tx, &sql, params![id])?.pop() else {
                return Ok(None);
            };
            {
                let mut stmt = tx
                    .prepare_cached(
                        "SELECT status, at FROM order_history WHERE order_id = ?1 \
                         ORDER BY at, rowid",
                    )
                    .map_err(unavailable)?;
                let rows = stmt
                    .query_map(params![id], |r| {
                        Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?))
                    })
                    .map_err(unavailable)?;
                for row in rows {
                    let (s, at) = row.map_err(unavailable)?;
                    order.history.push(HistoryEntry {
                        status: s.parse().map_err(corrupt)?,
                        at: Timestamp(at),
                    });
                }
            }
            order.history.sort_by_key(|h| (h.at, h.status));
            Ok(Some(order))
        })
        .await
    }

    async fn orders_in_status(&self, statuses: &[OrderStatus], limit: usize) -> Result<Vec<Order>> {
        let sql = orders_in_status_sql(statuses);
        self.read(move |c| query_orders(c, &sql, params![limit as i64]))
            .await
    }

    async fn orders_due(
        &self,
        statuses: &[OrderStatus],
        now: Timestamp,
        limit: usize,
    ) -> Result<Vec<Order>> {
        let sql = orders_due_sql(statuses);
        self.read(move |c| query_orders(c, &sql, params![limit as i64, now.millis()]))
            .await
    }

    async fn refunds_owed(&self, limit: usize) -> Result<Vec<Order>> {
        self.read(move |c| query_orders(c, &refunds_owed_sql(), params![limit as i64]))
            .await
    }

    async fn unfinished_followups(&self, limit: usize) -> Result<Vec<Order>> {
        self.read(move |c| query_orders(c, &followups_sql(), params![limit as i64]))
            .await
    }

    async fn documents_owed(&self, limit: usize) -> Result<Vec<Order>> {
        self.read(move |c| query_orders(c, &documents_owed_sql(), params![limit as i64]))
            .await
    }

    async fn orders_of_sale(&self, sale: &SaleId) -> Result<Vec<Order>> {
        let sale = sale.clone();
        let sql =
            format!("SELECT {ORDER_COLUMNS} FROM orders WHERE sale_id = ?1 ORDER BY sequence");
        self.read(move |c| query_orders(c, &sql, params![sale.as_str()]))
            .await
    }

    async fn sale_totals(&self, sale: &SaleId) -> Result<SaleTotals> {
        let sale = sale.clone();
        self.read(move |c| {
            let mut totals = SaleTotals::default();
            // Kept by every write (see `write_totals`): a few rows, whatever the orders.
            let mut stmt = c
                .prepare_cached(
                    "SELECT status, orders, units, released_orders, released_units \
                     FROM sale_totals WHERE sale_id = ?1 AND orders <> 0 ORDER BY status",
                )
                .map_err(unavailable)?;
            let mut rows = stmt.query(params![sale.as_str()]).map_err(unavailable)?;
            while let Some(r) = rows.next().map_err(unavailable)? {
                let status: OrderStatus = r
                    .get::<_, String>(0)
                    .map_err(corrupt)?
                    .parse()
                    .map_err(corrupt)?;
                let orders = r.get::<_, i64>(1).map_err(corrupt)? as u64;
                let units = r.get::<_, i64>(2).map_err(corrupt)? as u64;
                totals.released_orders += r.get::<_, i64>(3).map_err(corrupt)? as u64;
                totals.released_units += r.get::<_, i64>(4).map_err(corrupt)? as u64;
                totals.orders += orders;
                totals.units += units;
                totals.by_status.push(StatusCount {
                    status,
                    orders,
                    units,
                });
            }
            Ok(totals)
        })
        .await
    }

    async fn pending_since(&self, before: Timestamp, limit: usize) -> Result<Vec<Order>> {
        self.read(move |c| query_orders(c, &pending_sql(), params![before.millis(), limit as i64]))
            .await
    }

    async fn unpublished_events(&self, limit: usize) -> Result<Vec<OrderEvent>> {
        self.read(move |c| {
            let mut stmt = c.prepare_cached(UNPUBLISHED_SQL).map_err(unavailable)?;
            let mut rows = stmt.query(params![limit as i64]).map_err(unavailable)?;
            let mut out = Vec::new();
            while let Some(r) = rows.next().map_err(unavailable)? {
                let get_s = |i: usize| r.get::<_, String>(i).map_err(corrupt);
                let status: OrderStatus = get_s(4)?.parse().map_err(corrupt)?;
                out.push(OrderEvent {
                    order_id: get_s(0)?.parse().map_err(corrupt)?,
                    sale_id: SaleId::parse(get_s(1)?).map_err(corrupt)?,
                    user_id: UserId::parse(get_s(2)?).map_err(corrupt)?,
                    quantity: r.get(3).map_err(corrupt)?,
                    status,
                    at: Timestamp(r.get(5).map_err(corrupt)?),
                    charge_id: if status == OrderStatus::Paid {
                        r.get(6).map_err(corrupt)?
                    } else {
                        None
                    },
                });
            }
            Ok(out)
        })
        .await
    }

    async fn mark_published(&self, events: &[(OrderId, OrderStatus)]) -> Result<usize> {
        let events = events.to_vec();
        self.write(move |c| {
            let mut stmt = c
                .prepare_cached(
                    "UPDATE order_history SET published = 1 \
                     WHERE order_id = ?1 AND status = ?2 AND published = 0",
                )
                .map_err(unavailable)?;
            let mut n = 0;
            for (id, status) in &events {
                n += stmt
                    .execute(params![id.to_string(), status.as_str()])
                    .map_err(unavailable)?;
            }
            Ok(n)
        })
        .await
    }

    async fn ping(&self) -> Result<()> {
        if self.inner.writer.as_ref().is_none_or(|w| w.is_closed()) {
            return Err(writer_stopped());
        }
        self.read(|c| c.query_row("SELECT 1", [], |_| Ok(())).map_err(unavailable))
            .await
    }
}

// Behaviour tests: storage/tests/conformance.rs runs the same checks on SQLite and Postgres.

#[cfg(test)]
mod tests {
    use super::*;
    use OrderStatus::*;

    fn query_plan(c: &Connection, sql: &str) -> String {
        let mut stmt = c
            .prepare(&format!("EXPLAIN QUERY PLAN {sql}"))
            .expect("explain");
        // The plan does not depend on the values: bind 0 to every parameter.
        for i in 1..=stmt.parameter_count() {
            stmt.raw_bind_parameter(i, 0).expect("bind");
        }
        let mut rows = stmt.raw_query();
        let mut plan = Vec::new();
        while let Some(row) = rows.next().expect("plan row") {
            plan.push(row.get::<_, String>(3).expect("detail"));
        }
        plan.join("; ")
    }

    /// Every sweep query reads through its partial index (never a scan of the orders, never
    /// a sort), with and without planner statistics.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn sweep_queries_use_partial_indexes() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = SqliteStore::open(dir.path().join("db.sqlite")).expect("open");
        // Mostly settled orders, as after a sale: the sweeps must not read those.
        let now = Timestamp::now();
        let orders: Vec<_> = (0..500u64)
            .map(|i| NewOrder {
                order_id: OrderId::new(),
                sale_id: SaleId::parse("s").expect("sale"),
                user_id: UserId::parse(format!("u{i}")).expect("user"),
                quantity: 1,
                amount: Money {
                    minor: 100,
                    currency: Currency::parse("EUR").expect("eur"),
                },
                sequence: i,
                idempotency_key: format!("k{i}"),
                payment_token: "tok".into(),
                accepted_at: now,
            })
            .collect();
        store.persist_batch(&orders, None).await.expect("persist");
        let mut changes = Vec::new();
        for o in &orders[20..] {
            let id = o.order_id;
            changes.push(Change::Status {
                id,
                from: Persisted,
                to: PaymentPending,
                charge_id: None,
            });
            changes.push(Change::Status {
                id,
                from: PaymentPending,
                to: Paid,
                charge_id: Some("ch".into()),
            });
            changes.push(Change::Notified(id));
        }
        let applied = store.apply_batch(&changes).await.expect("settle");
        assert!(applied.iter().all(|a| *a));
        let queries = [
            (orders_in_status_sql(&OPEN), "orders_open"),
            (orders_in_status_sql(&[Persisted]), "orders_open"),
            (orders_due_sql(&OPEN), "orders_open"),
            (refunds_owed_sql(), "orders_refunds_owed"),
            (documents_owed_sql(), "orders_documents_owed"),
            (followups_sql(), "orders_followups"),
            (pending_sql(), "orders_pending"),
            (UNPUBLISHED_SQL.to_owned(), "order_history_unpublished"),
        ];
        for analyzed in [false, true] {
            if analyzed {
                store
                    .write(|c| c.execute_batch("ANALYZE").map_err(unavailable))
                    .await
                    .expect("analyze");
            }
            let c = store.inner.reader();
            for (sql, index) in &queries {
                let plan = query_plan(&c, sql);
                eprintln!("analyzed={analyzed} {index}: {plan}");
                assert!(plan.contains(&format!("INDEX {index}")), "{sql}: {plan}");
                assert!(!plan.contains("TEMP B-TREE"), "{sql}: {plan}");
            }
        }
    }

    /// A command that fails rolls back alone; the rest of its group commits.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_failing_command_does_not_undo_its_group() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = SqliteStore::open(dir.path().join("db.sqlite")).expect("open");
        let writes: Vec<_> = (0..64)
            .map(|i| {
                let store = store.clone();
                tokio::spawn(async move {
                    store
                        .write(move |c| {
                            c.execute(
                                "INSERT INTO consumer_offsets VALUES ('w', ?1, 1)",
                                params![i],
                            )
                            .map_err(unavailable)?;
                            if i % 2 == 1 {
                                return Err(Error::Corrupt("refused".into()));
                            }
                            Ok(i)
                        })
                        .await
                })
            })
            .collect();
        for (i, w) in writes.into_iter().enumerate() {
            let r = w.await.expect("task");
            assert_eq!(r.is_ok(), i % 2 == 0, "{i}: {r:?}");
        }
        for i in 0..64u32 {
            let cp = store.checkpoint("w", i).await.expect("read");
            assert_eq!(cp.is_some(), i % 2 == 0, "{i}");
        }
        let stats = store.writer_stats();
        assert_eq!(stats.commands, 64, "{stats:?}");
        assert!(stats.groups >= 1 && stats.groups <= 64, "{stats:?}");
    }
}
