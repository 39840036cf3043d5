//! Composition: builds each part from its configured backend and runs them together.
//!
//! `flashsale serve`, `flashsale demo` and the integration tests all start the system
//! through [`App::start`] with an already-bound listener. With the embedded log, the
//! settler runs in the same process (the log file belongs to one process).
//!
//! Each process has one metrics registry ([`crate::metrics::process_registry`]): `serve`
//! adds its API's families and the per-sale gauges and renders it on `GET /metrics` of
//! the API; `settle` renders it on a listener of its own.

use crate::config::{Config, EMBEDDED};
use crate::maintain::Maintenance;
use crate::metrics::{process_registry, serve_metrics, RuntimeWatch};
use anyhow::{bail, Context};
use async_trait::async_trait;
use ingest::admission::{Admission, EmbeddedAdmission};
use ingest::api::{ApiConfig, Ingest};
use ingest::auth::Auth;
use ingest::model::{Limits, OrderRef};
use ingest::redis_admission::RedisAdmission;
use ingest::server::{self, ServerConfig};
use mock_provider::{MockConfig, MockProvider};
use prometheus_client::registry::Registry;
use sequencer::embedded::{FileLog, FileLogOptions};
#[cfg(feature = "kafka")]
use sequencer::kafka::{KafkaConfig, KafkaConsumer, KafkaLog};
use sequencer::{LogConsumer, OrderLog};
use settler::DeadLetter;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use storage::metrics::Metered;
use storage::postgres::PgStore;
#[cfg(feature = "scylla")]
use storage::scylla::{ScyllaConfig, ScyllaStore};
use storage::sqlite::SqliteStore;
use storage::{Order, OrderStatus, OrderStore};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// Gives stock back through the admission backend: the settler's only way to touch it.
struct AdmissionRelease(Arc<dyn Admission>);

#[async_trait]
impl settler::StockRelease for AdmissionRelease {
    async fn release(&self, order: &Order) -> Result<bool, settler::Error> {
        self.0
            .release(&order.new.sale_id, &OrderRef::from(order))
            .await
            .map_err(|e| settler::Error::Release(storage::ErrorChain(&e).to_string()))
    }

    async fn claim(&self, order: &Order) -> Result<bool, settler::Error> {
        self.0
            .claim(&order.new.sale_id, &OrderRef::from(order))
            .await
            .map_err(|e| settler::Error::Release(storage::ErrorChain(&e).to_string()))
    }

    async fn release_batch(&self, orders: &[Order]) -> Vec<Result<bool, settler::Error>> {
        let refs: Vec<_> = orders
            .iter()
            .map(|o| (o.new.sale_id.clone(), OrderRef::from(o)))
            .collect();
        self.0
            .release_batch(&refs)
            .await
            .into_iter()
            .map(|r| r.map_err(|e| settler::Error::Release(storage::ErrorChain(&e).to_string())))
            .collect()
    }

    async fn claim_batch(&self, orders: &[Order]) -> Vec<Result<bool, settler::Error>> {
        let refs: Vec<_> = orders
            .iter()
            .map(|o| (o.new.sale_id.clone(), OrderRef::from(o)))
            .collect();
        self.0
            .claim_batch(&refs)
            .await
            .into_iter()
            .map(|r| r.map_err(|e| settler::Error::Release(storage::ErrorChain(&e).to_string())))
            .collect()
    }
}

/// The API's read access to the receipts archive.
struct ArchiveReader(Arc<receipts::archive::Archive>);

#[async_trait]
impl ingest::api::DocumentReader for ArchiveReader {
    async fn get(&self, key: &str) -> Result<Option<bytes::Bytes>, ingest::api::DocumentError> {
        self.0
            .get(key)
            .await
            .map_err(|e| ingest::api::DocumentError(storage::ErrorChain(&e).to_string()))
    }
}

/// Opens the receipts archive `[receipts]` names, or `None` when receipts are off, and
/// probes it once: refused credentials or a wrong setting fail (naming the settings); an
/// unreachable store is only a warning (documents queue in the store until it is back).
pub async fn open_archive(
    config: &Config,
) -> anyhow::Result<Option<Arc<receipts::archive::Archive>>> {
    use receipts::archive::{Archive, ArchiveError};
    if !config.receipts.enabled {
        return Ok(None);
    }
    let settings = config.receipts.archive_config(&config.data_dir)?;
    let archive = Archive::open(&settings).map_err(|e| match e {
        ArchiveError::Config { .. } => anyhow::anyhow!("{e}"),
        other => anyhow::Error::new(other).context("receipts.url: cannot open the archive"),
    })?;
    match archive.probe().await {
        Ok(()) => {}
        Err(e @ ArchiveError::Credentials(_)) => {
            bail!(
                "{} (set them, or AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY)",
                storage::ErrorChain(&e)
            );
        }
        Err(e @ ArchiveError::Config { .. }) => bail!("{e}"),
        Err(e @ ArchiveError::Unavailable(_)) => {
            tracing::warn!(
                error = %storage::ErrorChain(&e),
                url = %settings.url,
                "the receipts archive is unreachable; receipts wait in the store until it is back"
            );
        }
    }
    Ok(Some(Arc::new(archive)))
}

/// A running system.
pub struct Running {
    /// Where the API listens.
    pub addr: SocketAddr,
    /// The order store (for reports and tests).
    pub store: Arc<dyn OrderStore>,
    /// The API (for stats).
    pub ingest: Arc<Ingest>,
    /// Base URL of the payment provider the settler calls.
    pub payment_url: String,
    /// Counters of the settler, when it runs here.
    pub settler_stats: Option<settler::SettlerStats>,
    /// Liveness of the settler's stages, when it runs here (what `/readyz` reports).
    pub settler_health: Option<settler::SettlerHealth>,
    /// The process's metrics registry (what `GET /metrics` renders).
    pub registry: Arc<Registry>,
    #[cfg(feature = "kafka")]
    kafka: Option<Arc<KafkaLog>>,
    shutdown: CancellationToken,
    server: JoinHandle<std::io::Result<()>>,
    settler: Option<JoinHandle<Result<(), settler::Error>>>,
    /// Embedded admission's maintenance (writes a last checkpoint when stopped).
    maintenance: Option<JoinHandle<()>>,
    mock: Option<MockProvider>,
    /// Dropped last: the settler and the mock provider run on it.
    settler_rt: SettlerRuntime,
}

impl std::fmt::Debug for Running {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Running").field("addr", &self.addr).finish()
    }
}

impl Running {
    /// Base URL of the API.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// A token that stops the system when cancelled.
    pub fn shutdown_token(&self) -> CancellationToken {
        self.shutdown.clone()
    }

    /// Stops accepting, drains in-flight requests, stops the settler. Fails (after
    /// stopping everything) when the producer was left with undelivered records or the
    /// settler failed.
    pub async fn stop(self) -> anyhow::Result<()> {
        self.shutdown.cancel();
        self.server.await.context("server task")??;
        // Confirmations still queued by answered orders reach admission.
        self.ingest.shutdown().await;
        #[cfg(feature = "kafka")]
        let flushed = match self.kafka {
            // Records handed to the producer by requests that finished are delivered.
            Some(kafka) => flush_producer(kafka).await,
            None => Ok(()),
        };
        #[cfg(not(feature = "kafka"))]
        let flushed: anyhow::Result<()> = Ok(());
        let settled = match self.settler {
            Some(s) => s
                .await
                .context("settler task")
                .and_then(|r| r.context("settler")),
            None => Ok(()),
        };
        let maintained = match self.maintenance {
            Some(m) => m.await.context("maintenance task"),
            None => Ok(()),
        };
        if let Some(m) = self.mock {
            m.stop().await;
        }
        drop(self.settler_rt);
        flushed.and(settled).and(maintained)
    }

    /// Waits until the shutdown token is cancelled (by a signal), then stops. When the
    /// in-process settler gives up first (a stage kept dying), stops everything and fails:
    /// `serve` exits non-zero rather than answer 202 for orders nothing settles.
    pub async fn wait(mut self) -> anyhow::Result<()> {
        let Some(settler) = self.settler.as_mut() else {
            self.shutdown.cancelled().await;
            return self.stop().await;
        };
        let ended = tokio::select! {
            () = self.shutdown.cancelled() => None,
            ended = settler => Some(ended),
        };
        let Some(ended) = ended else {
            return self.stop().await;
        };
        self.settler = None;
        let failure = match ended {
            Ok(Ok(())) => anyhow::anyhow!("the settler stopped on its own"),
            Ok(Err(e)) => anyhow::Error::new(e),
            Err(e) => anyhow::Error::new(e).context("settler task"),
        };
        tracing::error!(error = %format!("{failure:#}"), "the in-process settler failed; stopping");
        if let Err(e) = self.stop().await {
            tracing::error!(error = %format!("{e:#}"), "stopping after the settler failed");
        }
        Err(failure.context("the in-process settler failed; serve stopped"))
    }
}

/// Delivers what the producer still holds (at most 10 s); fails naming how many records
/// were left undelivered, so `serve` exits non-zero.
#[cfg(feature = "kafka")]
async fn flush_producer(kafka: Arc<KafkaLog>) -> anyhow::Result<()> {
    let flushed = tokio::task::spawn_blocking(move || kafka.flush(Duration::from_secs(10)))
        .await
        .context("flushing the Kafka producer")?;
    flushed.map_err(|e| {
        tracing::error!(error = %storage::ErrorChain(&e), "records left undelivered at shutdown");
        anyhow::Error::new(e).context("flushing the Kafka producer at shutdown")
    })
}

fn unsupported(key: &str, url: &str) -> anyhow::Error {
    let available = if key == "admission.url" {
        "\"embedded\", redis://host:port/db or redis+cluster://host:port[,host:port...]"
    } else if key == "store.url" {
        "\"embedded\", postgres://...[,postgres://...] (one per shard) or \
         scylla://host:port[,host:port]/keyspace"
    } else {
        "only \"embedded\" (the distributed backend of this part is not implemented yet)"
    };
    anyhow::anyhow!("{key} = {url:?}: not supported; use {available}")
}

/// Rebuilds the embedded admission counters after a restart: sales from the catalog, their
/// state from the admission checkpoint, accepted orders from the log after it, releases
/// from the store. Returns the offset the checkpoint covered.
async fn recover_admission(
    admission: &EmbeddedAdmission,
    store: &dyn OrderStore,
    log: &FileLog,
    log_dir: &std::path::Path,
) -> anyhow::Result<u64> {
    let catalog = store.list_sales().await?;
    let checkpoint = ingest::checkpoint::read(log_dir).with_context(|| {
        format!(
            "reading the admission checkpoint in {} (move it aside to rebuild from the whole \
             log, which works only while no segment was deleted)",
            log_dir.display()
        )
    })?;
    let covered = match checkpoint {
        Some(c) => {
            let offset = c.log_offset;
            admission.restore_checkpoint(c, &catalog);
            offset
        }
        None => {
            for sale in &catalog {
                admission.restore_sale(sale);
            }
            0
        }
    };
    if covered < log.start_offset() {
        bail!(
            "the order log in {} starts at offset {} but the admission checkpoint covers only \
             the records before {covered}: the records between are gone; restore the \
             checkpoint file ({})",
            log_dir.display(),
            log.start_offset(),
            ingest::checkpoint::CHECKPOINT_FILE
        );
    }
    if covered > log.len() {
        bail!(
            "the admission checkpoint in {} covers {covered} records but the order log ends at \
             {}: the log lost records; restore it before starting",
            log_dir.display(),
            log.len()
        );
    }
    let mut from = covered;
    let mut replayed = 0u64;
    loop {
        let entries = log.read_from(from, 4096)?;
        if entries.is_empty() {
            break;
        }
        from += entries.len() as u64;
        for e in entries {
            let Ok(r) = sequencer::decode(&e.payload) else {
                continue; // the settler dead-letters it
            };
            if let Err(err) = admission.restore_accepted(
                &r.sale_id,
                &OrderRef::from(&r),
                &r.fingerprint,
                r.sequence,
            ) {
                crate::metrics::recovery_skipped(crate::metrics::SKIPPED_RECORD);
                tracing::warn!(error = %storage::ErrorChain(&err), order = %r.order_id, "log record of an unknown sale");
            }
            replayed += 1;
        }
    }
    let released = store
        .orders_in_status(
            &[OrderStatus::PaymentFailed, OrderStatus::Expired],
            usize::MAX,
        )
        .await?;
    for o in &released {
        // A release whose sale the catalog lacks has no counters to give units back to
        // (its log records were skipped above for the same reason): counted and logged,
        // and recovery goes on, since refusing to start would not bring the sale back.
        if let Err(err) = admission.restore_release(&o.new.sale_id, &OrderRef::from(o)) {
            crate::metrics::recovery_skipped(crate::metrics::SKIPPED_RELEASE);
            tracing::warn!(error = %storage::ErrorChain(&err), order = %o.new.order_id, "release of an unknown sale");
        }
    }
    if replayed > 0 || covered > 0 {
        tracing::info!(
            checkpoint = covered,
            orders = replayed,
            released = released.len(),
            "admission counters rebuilt from the checkpoint, the log after it and the store"
        );
    }
    Ok(covered)
}

/// The order log of this process: the embedded file or a Kafka topic.
enum LogParts {
    Embedded(FileLog),
    #[cfg(feature = "kafka")]
    Kafka {
        log: Arc<KafkaLog>,
        config: KafkaConfig,
    },
}

impl LogParts {
    async fn open(config: &Config) -> anyhow::Result<LogParts> {
        #[cfg(feature = "kafka")]
        if let Some(kafka) = config.log.kafka() {
            let log = Arc::new(KafkaLog::new(&kafka).context("log.url")?);
            log.check_topics()
                .await
                .with_context(|| format!("log.url = {:?}", config.log.url))?;
            return Ok(LogParts::Kafka { log, config: kafka });
        }
        if config.log.wants_kafka() {
            bail!("{}", no_kafka(&config.log.url));
        }
        if config.log.url != EMBEDDED {
            return Err(unsupported("log.url", &config.log.url));
        }
        let log = FileLog::open(
            config.data_dir.join("log"),
            FileLogOptions {
                fsync: config.log.fsync,
                max_batch: config.log.max_batch,
                queue_capacity: config.log.queue_capacity,
                segment_bytes: config.log.segment_bytes,
            },
        )
        .with_context(|| format!("opening the order log in {}", config.data_dir.display()))?;
        Ok(LogParts::Embedded(log))
    }

    fn order_log(&self) -> Arc<dyn OrderLog> {
        match self {
            LogParts::Embedded(log) => Arc::new(log.clone()),
            #[cfg(feature = "kafka")]
            LogParts::Kafka { log, .. } => Arc::clone(log) as Arc<dyn OrderLog>,
        }
    }

    /// Where the settler's reader opens: the store's checkpoint (embedded) or the consumer
    /// group's committed offsets (Kafka). Opened again when the settler restarts.
    fn consumer_source(
        &self,
        store: &Arc<dyn OrderStore>,
        name: &str,
        data_dir: &std::path::Path,
    ) -> ConsumerSpec {
        match self {
            LogParts::Embedded(log) => ConsumerSpec::Embedded {
                log: log.clone(),
                store: Arc::clone(store),
                name: name.to_owned(),
                data_dir: data_dir.to_path_buf(),
            },
            #[cfg(feature = "kafka")]
            LogParts::Kafka { config, .. } => ConsumerSpec::Kafka {
                config: config.clone(),
                group: name.to_owned(),
            },
        }
    }

    /// The settler's side of the log: the same file, or a producer of its own for the
    /// events and dead-letter topics.
    fn settler_producer(&self) -> anyhow::Result<LogParts> {
        match self {
            LogParts::Embedded(log) => Ok(LogParts::Embedded(log.clone())),
            #[cfg(feature = "kafka")]
            LogParts::Kafka { config, .. } => Ok(LogParts::Kafka {
                log: Arc::new(KafkaLog::new(config).context("settler producer")?),
                config: config.clone(),
            }),
        }
    }

    fn dead_letter(&self, data_dir: &std::path::Path) -> anyhow::Result<Arc<dyn DeadLetter>> {
        match self {
            LogParts::Embedded(_) => Ok(Arc::new(
                settler::FileDeadLetter::open(data_dir.join("dead-letter"))
                    .context("opening the dead-letter file")?,
            )),
            #[cfg(feature = "kafka")]
            LogParts::Kafka { log, config } => Ok(Arc::new(KafkaDeadLetter {
                log: Arc::clone(log),
                topic: config.dlq_topic(),
            })),
        }
    }

    /// Where status changes are published: the events topic with Kafka; with the embedded
    /// log there is no topic, and they are traced.
    fn event_sink(&self) -> Arc<dyn settler::EventSink> {
        match self {
            LogParts::Embedded(_) => Arc::new(settler::TracingEventSink::default()),
            #[cfg(feature = "kafka")]
            LogParts::Kafka { log, config } => Arc::new(KafkaEventSink {
                log: Arc::clone(log),
                topic: config.events_topic(),
            }),
        }
    }

    #[cfg(feature = "kafka")]
    fn kafka(&self) -> Option<Arc<KafkaLog>> {
        match self {
            LogParts::Kafka { log, .. } => Some(Arc::clone(log)),
            LogParts::Embedded(_) => None,
        }
    }
}

/// How the settler's log consumer is opened, at start and at each restart.
enum ConsumerSpec {
    Embedded {
        log: FileLog,
        store: Arc<dyn OrderStore>,
        name: String,
        data_dir: std::path::PathBuf,
    },
    #[cfg(feature = "kafka")]
    Kafka { config: KafkaConfig, group: String },
}

impl ConsumerSpec {
    async fn consumer(&self) -> anyhow::Result<Box<dyn LogConsumer>> {
        match self {
            ConsumerSpec::Embedded {
                log,
                store,
                name,
                data_dir,
            } => {
                let from = store.checkpoint(name, 0).await?.unwrap_or(0);
                // The store has read further than the log holds: the log lost
                // acknowledged records. Starting would skip new orders; refuse instead.
                if from > log.len() {
                    bail!(
                        "the store's checkpoint ({from}) is past the end of the order log ({} \
                         records) in {}: the log lost records; restore it before starting",
                        log.len(),
                        data_dir.display()
                    );
                }
                // The store is older than the log's first segment (restored from a
                // backup?): the records between were deleted as settled.
                if from < log.start_offset() {
                    bail!(
                        "the store's checkpoint ({from}) is before the first record the order \
                         log in {} still holds ({}): segments were deleted as settled; \
                         restore the store that settled them",
                        data_dir.display(),
                        log.start_offset()
                    );
                }
                Ok(Box::new(log.consumer(from)))
            }
            #[cfg(feature = "kafka")]
            ConsumerSpec::Kafka { config, group } => Ok(Box::new(
                KafkaConsumer::new(config, group).context("settler consumer")?,
            )),
        }
    }
}

#[async_trait]
impl settler::ConsumerSource for ConsumerSpec {
    async fn open(&self) -> Result<Box<dyn LogConsumer>, String> {
        self.consumer().await.map_err(|e| format!("{e:#}"))
    }
}

/// The error for a Kafka URL in a build without the `kafka` feature.
pub fn no_kafka(url: &str) -> String {
    format!(
        "log.url = {url:?}: this binary was built without Kafka support; build it with \
         `--features kafka` (needs cmake, pkg-config and the curl, ssl and zlib headers)"
    )
}

/// The error for a Scylla store URL in a build without the `scylla` feature (the URL is not
/// repeated: the error names the key).
pub fn no_scylla() -> String {
    "store.url: a scylla:// store, but this binary was built without the `scylla` feature; \
     build it with `--features scylla`"
        .to_owned()
}

/// Where a Scylla store is, for error messages: its nodes and keyspace (a URL with
/// credentials in it is never printed).
#[cfg(feature = "scylla")]
fn scylla_place(scylla: &ScyllaConfig) -> String {
    format!(
        "keyspace {} on {}",
        scylla.keyspace,
        scylla
            .nodes
            .iter()
            .map(|n| n.rsplit('@').next().unwrap_or(n))
            .collect::<Vec<_>>()
            .join(",")
    )
}

/// Status changes go to `flashsale.order-events.v1`, keyed by order id (so one order's
/// events stay in order on one partition), encoded by [`settler::encode_event`].
#[cfg(feature = "kafka")]
struct KafkaEventSink {
    log: Arc<KafkaLog>,
    topic: String,
}

#[cfg(feature = "kafka")]
#[async_trait]
impl settler::EventSink for KafkaEventSink {
    async fn publish(&self, events: &[storage::OrderEvent]) -> Result<(), settler::Error> {
        // All in flight at once (the producer batches them); the batch counts as published
        // only when every delivery report is in.
        let sends = events.iter().map(|e| {
            let payload = settler::encode_event(e);
            let key = e.order_id.to_string();
            async move { self.log.send(&self.topic, &key, &payload).await }
        });
        for r in futures_util::future::join_all(sends).await {
            r.map_err(|e| settler::Error::Publish(storage::ErrorChain(&e).to_string()))?;
        }
        Ok(())
    }
}

/// Undecodable records go to the dead-letter topic, keyed by where they were read.
#[cfg(feature = "kafka")]
struct KafkaDeadLetter {
    log: Arc<KafkaLog>,
    topic: String,
}

#[cfg(feature = "kafka")]
#[async_trait]
impl DeadLetter for KafkaDeadLetter {
    async fn send(
        &self,
        entry: &sequencer::LogEntry,
        error: &sequencer::RecordError,
    ) -> std::io::Result<()> {
        let key = format!("{}-{}", entry.position.partition, entry.position.offset);
        tracing::warn!(%error, key, "record sent to the dead-letter topic");
        self.log
            .send(&self.topic, &key, &entry.payload)
            .await
            .map(drop)
            .map_err(std::io::Error::other)
    }
}

/// Opens the configured order store: SQLite in `data_dir`, sharded Postgres or Scylla (both
/// migrated beforehand by `flashsale migrate`). Every call is timed
/// (`flashsale_store_duration_seconds`).
pub async fn open_store(config: &Config) -> anyhow::Result<Arc<dyn OrderStore>> {
    if config.store.call_timeout.is_zero() {
        anyhow::bail!("store.call_timeout must be above zero (every store call would fail)");
    }
    if let Some(pg) = config.store.postgres()? {
        let store = PgStore::connect(&pg.catalog, &pg.shards, config.store.pool_size)
            .await
            .with_context(|| format!("store.url: cannot use {}", config.store.url))?;
        return Ok(Arc::new(Metered::new(store, config.store.call_timeout)));
    }
    #[cfg(feature = "scylla")]
    if let Some(scylla) = config.store.scylla()? {
        let store = ScyllaStore::connect(&scylla)
            .await
            .with_context(|| format!("store.url: cannot use the {}", scylla_place(&scylla)))?;
        return Ok(Arc::new(Metered::new(store, config.store.call_timeout)));
    }
    #[cfg(not(feature = "scylla"))]
    if config.store.wants_scylla() {
        bail!("{}", no_scylla());
    }
    if config.store.url != EMBEDDED {
        return Err(unsupported("store.url", &config.store.url));
    }
    let store = SqliteStore::open(config.data_dir.join("flashsale.db"))
        .with_context(|| format!("opening the store in {}", config.data_dir.display()))?;
    Ok(Arc::new(Metered::new(store, config.store.call_timeout)))
}

/// Brings the configured store to the latest schema; returns what was migrated, in words.
pub async fn migrate_store(config: &Config) -> anyhow::Result<String> {
    if let Some(pg) = config.store.postgres()? {
        PgStore::migrate(&pg.catalog, &pg.shards)
            .await
            .with_context(|| format!("store.url = {:?}", config.store.url))?;
        return Ok(format!(
            "store: catalog and {} shard(s) are at the latest schema",
            pg.shards.len()
        ));
    }
    #[cfg(feature = "scylla")]
    if let Some(scylla) = config.store.scylla()? {
        let applied = ScyllaStore::migrate(&scylla)
            .await
            .with_context(|| format!("store.url: cannot migrate the {}", scylla_place(&scylla)))?;
        let what = if applied.is_empty() {
            "nothing to apply".to_owned()
        } else {
            format!("applied versions {applied:?}")
        };
        return Ok(format!(
            "store: keyspace {} at the latest schema ({what})",
            scylla.keyspace
        ));
    }
    #[cfg(not(feature = "scylla"))]
    if config.store.wants_scylla() {
        bail!("{}", no_scylla());
    }
    if config.store.url != EMBEDDED {
        return Err(unsupported("store.url", &config.store.url));
    }
    let path = config.data_dir.join("flashsale.db");
    SqliteStore::open(&path)?;
    Ok(format!("store {} is at the latest schema", path.display()))
}

/// The admission backend, and with embedded admission its maintenance task (not started).
async fn open_admission(
    config: &Config,
    store: &Arc<dyn OrderStore>,
    log: &LogParts,
) -> anyhow::Result<(Arc<dyn Admission>, Option<Maintenance>)> {
    if ingest::redis_admission::is_redis_url(&config.admission.url) {
        // Redis keeps the counters across restarts of this process; a sale whose keys
        // Redis lost answers 503 until `flashsale reconcile` rebuilds them.
        let redis = RedisAdmission::connect(
            &config.admission.url,
            &config.admission.key_prefix,
            config.admission.decision_timeout,
        )
        .await
        .with_context(|| format!("admission.url: cannot use {}", config.admission.url))?;
        if config.admission.sold_out_ttl.is_zero() {
            return Ok((Arc::new(redis), None));
        }
        return Ok((
            Arc::new(redis.with_sold_out_flags(config.admission.sold_out_ttl)),
            None,
        ));
    }
    if config.admission.url != EMBEDDED {
        return Err(unsupported("admission.url", &config.admission.url));
    }
    // Without the `kafka` feature the embedded log is the only one.
    #[cfg_attr(not(feature = "kafka"), allow(clippy::infallible_destructuring_match))]
    let file = match log {
        LogParts::Embedded(file) => file,
        #[cfg(feature = "kafka")]
        LogParts::Kafka { .. } => bail!(
            "admission.url = \"embedded\" with log.url = {:?}: embedded admission rebuilds its \
             counters from the embedded log after a restart; use redis:// admission with a \
             Kafka log",
            config.log.url
        ),
    };
    let embedded = Arc::new(EmbeddedAdmission::with_limits(Limits {
        max_orders: config.admission.max_orders_per_sale,
        max_buckets: config.admission.max_buckets_per_sale,
    }));
    let log_dir = config.data_dir.join("log");
    let covered = recover_admission(&embedded, store.as_ref(), file, &log_dir).await?;
    let maintenance = Maintenance {
        admission: Arc::clone(&embedded),
        store: Arc::clone(store),
        log: file.clone(),
        log_dir,
        consumer: config.settler.consumer.clone(),
        retention: config.admission.retention,
        checkpoint_interval: config.log.checkpoint_interval,
        covered,
    };
    Ok((embedded, Some(maintenance)))
}

/// Provider URLs, with the built-in mock started where `embedded` is configured.
struct Providers {
    payment_url: String,
    notification_url: String,
    mock: Option<MockProvider>,
}

async fn providers(config: &Config) -> anyhow::Result<Providers> {
    let configured = |url: &str| (url != EMBEDDED).then(|| url.trim_end_matches('/').to_owned());
    let payment_url = configured(&config.providers.payment_url);
    let notification_url = configured(&config.providers.notification_url);
    let mock = if payment_url.is_none() || notification_url.is_none() {
        Some(
            MockProvider::start(MockConfig {
                latency: config.providers.mock_latency,
                decline_rate: config.providers.mock_decline_rate,
                error_rate: config.providers.mock_error_rate,
                ..MockConfig::default()
            })
            .await
            .context("starting the built-in mock provider")?,
        )
    } else {
        None
    };
    let mock_url = mock.as_ref().map(MockProvider::url).unwrap_or_default();
    Ok(Providers {
        payment_url: payment_url.unwrap_or_else(|| mock_url.clone()),
        notification_url: notification_url.unwrap_or(mock_url),
        mock,
    })
}

async fn build_settler(
    config: &Config,
    store: &Arc<dyn OrderStore>,
    log: &LogParts,
    admission: Arc<dyn Admission>,
    providers: &Providers,
    archive: Option<Arc<receipts::archive::Archive>>,
) -> anyhow::Result<settler::Settler> {
    let settler_config = settler::SettlerConfig {
        payment_url: providers.payment_url.clone(),
        notification_url: providers.notification_url.clone(),
        provider_timeout: config.providers.timeout,
        ..config.settler.clone()
    };
    // The settler's own producer: event and dead-letter sends never queue in front of
    // order appends.
    let producer = log.settler_producer()?;
    let source = log.consumer_source(store, &config.settler.consumer, &config.data_dir);
    let settler = settler::Settler::new(
        Arc::clone(store),
        source.consumer().await?,
        Arc::new(AdmissionRelease(admission)),
        producer.dead_letter(&config.data_dir)?,
        settler_config,
    )?
    .with_event_sink(producer.event_sink())
    .with_consumer_source(Arc::new(source));
    Ok(match archive {
        Some(archive) => settler.with_documents(settler::Documents {
            archive,
            seller: config.receipts.seller.clone(),
        }),
        None => settler,
    })
}

/// The admission backend the settler uses: its own Redis connection (claims and releases
/// never queue behind order decisions); the embedded backend is shared (no connection).
async fn settler_admission(
    config: &Config,
    ingest_side: &Arc<dyn Admission>,
) -> anyhow::Result<Arc<dyn Admission>> {
    if ingest::redis_admission::is_redis_url(&config.admission.url) {
        let redis = RedisAdmission::connect(
            &config.admission.url,
            &config.admission.key_prefix,
            config.admission.decision_timeout,
        )
        .await
        .with_context(|| format!("admission.url: cannot use {}", config.admission.url))?;
        return Ok(Arc::new(redis));
    }
    Ok(Arc::clone(ingest_side))
}

/// A runtime of its own for the settler and the built-in mock provider inside `serve` and
/// `demo`, its threads reniced by `settler.nice`: settlement never runs on the threads
/// that answer orders, and when both want the CPU the order path wins. Shut down in the
/// background when dropped (it may be dropped on an async thread).
struct SettlerRuntime(Option<tokio::runtime::Runtime>);

impl SettlerRuntime {
    fn new(threads: usize, nice: u8) -> anyhow::Result<Self> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(threads.max(1))
            .max_blocking_threads(8)
            .thread_name("fs-settler")
            .on_thread_start(move || lower_priority(nice))
            .enable_all()
            .build()
            .context("starting the settler's runtime")?;
        Ok(SettlerRuntime(Some(rt)))
    }

    pub(crate) fn handle(&self) -> tokio::runtime::Handle {
        match &self.0 {
            Some(rt) => rt.handle().clone(),
            None => tokio::runtime::Handle::current(),
        }
    }
}

impl Drop for SettlerRuntime {
    fn drop(&mut self) {
        if let Some(rt) = self.0.take() {
            rt.shutdown_background();
        }
    }
}

/// Adds `nice` to the calling thread's nice value (Linux keeps one per thread). A refusal
/// leaves the thread as it was: slower to yield, never wrong.
fn lower_priority(nice: u8) {
    use thread_priority::{
        set_thread_priority_and_policy, thread_native_id, NormalThreadSchedulePolicy,
        ThreadPriority, ThreadPriorityValue, ThreadSchedulePolicy,
    };
    if nice == 0 {
        return;
    }
    // thread-priority maps 0..=99 onto nice 19..=-20.
    let nice = f32::from(nice.min(19));
    let value = (99.0 * (1.0 - (nice + 20.0) / 39.0))
        .round()
        .clamp(0.0, 99.0) as u8;
    let Ok(value) = ThreadPriorityValue::try_from(value) else {
        return;
    };
    if let Err(e) = set_thread_priority_and_policy(
        thread_native_id(),
        ThreadPriority::Crossplatform(value),
        ThreadSchedulePolicy::Normal(NormalThreadSchedulePolicy::Other),
    ) {
        tracing::debug!(error = ?e, "settler thread keeps its priority");
    }
}

/// Entry point of the composition.
#[derive(Debug)]
pub struct App;

impl App {
    /// Builds every part from `config` and serves the API on `listener`; runs the settler
    /// in the same process when `settler.enabled`. Refuses `settler.enabled = false` with
    /// the embedded log: no other process can settle it (`flashsale settle` needs Kafka).
    pub async fn start(config: &Config, listener: TcpListener) -> anyhow::Result<Running> {
        if !config.settler.enabled && config.log.url == EMBEDDED {
            bail!(
                "settler.enabled = false with log.url = {:?}: nothing would settle the orders \
                 this process accepts (only `serve` can read the embedded log, and \
                 `flashsale settle` needs a Kafka log); set settler.enabled = true or use a \
                 kafka:// log.url with `flashsale settle` running",
                config.log.url
            );
        }
        Self::start_parts(config, listener, config.settler.enabled).await
    }

    /// Starts without the settler whatever `settler.enabled` says, the embedded log
    /// included, where the orders wait in the log until a later start with the settler:
    /// for benchmarks and tests that fill the log first. `serve` never calls it.
    pub async fn start_unsettled(
        config: &Config,
        listener: TcpListener,
    ) -> anyhow::Result<Running> {
        Self::start_parts(config, listener, false).await
    }

    async fn start_parts(
        config: &Config,
        listener: TcpListener,
        with_settler: bool,
    ) -> anyhow::Result<Running> {
        let auth = Auth::new(&config.auth.to_auth_config()?).context("auth")?;
        let redis_admission = ingest::redis_admission::is_redis_url(&config.admission.url);
        if !redis_admission && config.admission.url != EMBEDDED {
            return Err(unsupported("admission.url", &config.admission.url));
        }
        let store = open_store(config).await?;
        let log = LogParts::open(config).await?;
        let (admission, maintenance) = open_admission(config, &store, &log).await?;
        // The settler and the built-in mock provider run on their own runtime.
        let settler_rt = SettlerRuntime::new(config.settler.threads, config.settler.nice)?;
        let providers = {
            let config = config.clone();
            settler_rt
                .handle()
                .spawn(async move { providers(&config).await })
                .await
                .context("starting the providers")??
        };

        let archive = open_archive(config).await?;
        // Built here (spawned below) so that `/readyz` can report its stages.
        let settler = if with_settler {
            let release = settler_admission(config, &admission).await?;
            Some(build_settler(config, &store, &log, release, &providers, archive.clone()).await?)
        } else {
            None
        };
        let settler_health = settler.as_ref().map(settler::Settler::health);

        let ingest = Ingest::new(
            Arc::clone(&admission),
            log.order_log(),
            Arc::clone(&store),
            auth,
            ApiConfig {
                order_body_limit: config.server.order_body_limit,
                decision_timeout: config.admission.decision_timeout,
                body_read_timeout: config.server.body_read_timeout,
                ..ApiConfig::default()
            },
        );
        // One registry for the process: every part's families, the API's, the per-sale
        // gauges, and both runtimes (the HTTP one answering orders, the settler's).
        let http_rt = RuntimeWatch::new("http", tokio::runtime::Handle::current());
        let settler_watch = RuntimeWatch::new("settler", settler_rt.handle());
        let mut registry = process_registry("serve", vec![http_rt.clone(), settler_watch.clone()]);
        let ingest = match archive {
            Some(archive) => ingest.with_documents(Arc::new(ArchiveReader(archive))),
            None => ingest,
        };
        let ingest = match settler_health.clone() {
            Some(health) => {
                ingest.with_readiness(Arc::new(move || health.down().map(settler::Stage::as_str)))
            }
            None => ingest,
        };
        let api_metrics = ingest::metrics::Metrics::default();
        api_metrics.register(&mut registry);
        registry.register_collector(Box::new(ingest.sale_gauges()));
        let registry = Arc::new(registry);
        let ingest = Arc::new(ingest.with_metrics(api_metrics, Arc::clone(&registry)));

        let shutdown = CancellationToken::new();
        http_rt.start_probe(shutdown.clone());
        settler_watch.start_probe(shutdown.clone());
        // The per-sale gauges are refreshed off the HTTP workers.
        settler_rt
            .handle()
            .spawn(Arc::clone(&ingest).run_sale_gauges(shutdown.clone()));
        // Bounded memory and the admission checkpoint, off the HTTP workers.
        let maintenance = maintenance.map(|m| settler_rt.handle().spawn(m.run(shutdown.clone())));
        let settler_stats = settler.as_ref().map(settler::Settler::stats);
        let settler = settler.map(|s| settler_watch.spawn(s.run(shutdown.child_token())));

        let addr = listener.local_addr()?;
        let server_config = ServerConfig {
            max_connections: config.server.max_connections,
            header_read_timeout: config.server.header_read_timeout,
            idle_timeout: config.server.idle_timeout,
            shutdown_grace: config.server.shutdown_grace,
            max_header_bytes: config.server.max_header_bytes,
            max_headers: config.server.max_headers,
            task_monitor: Some(http_rt.monitor().clone()),
        };
        let server = tokio::spawn(server::serve(
            listener,
            Arc::clone(&ingest),
            server_config,
            shutdown.clone(),
        ));
        if config.auth.jwt_secret_is_default() {
            tracing::warn!(
                "auth.jwt_secret is the development default; set FLASHSALE_AUTH__JWT_SECRET"
            );
        }
        Ok(Running {
            addr,
            store,
            ingest,
            payment_url: providers.payment_url,
            settler_stats,
            settler_health,
            registry,
            #[cfg(feature = "kafka")]
            kafka: log.kafka(),
            shutdown,
            server,
            settler,
            maintenance,
            mock: providers.mock,
            settler_rt,
        })
    }

    /// Runs the settler alone (`flashsale settle`) until `shutdown` is cancelled, serving
    /// the process's metrics on `metrics` when given. Needs a log other processes can
    /// write: Kafka.
    pub async fn settle(
        config: &Config,
        metrics: Option<TcpListener>,
        shutdown: CancellationToken,
    ) -> anyhow::Result<()> {
        let runtime = RuntimeWatch::new("settler", tokio::runtime::Handle::current());
        let registry = Arc::new(process_registry("settle", vec![runtime.clone()]));
        // Stopped once the settler has finished, so its last state can still be scraped.
        let metrics_stop = CancellationToken::new();
        runtime.start_probe(metrics_stop.clone());
        let metrics_server = metrics.map(|listener| {
            tokio::spawn(serve_metrics(
                listener,
                Arc::clone(&registry),
                metrics_stop.clone(),
            ))
        });
        let settled = Self::run_settler(config, &runtime, shutdown).await;
        metrics_stop.cancel();
        if let Some(server) = metrics_server {
            server.await.context("metrics listener")??;
        }
        settled
    }

    async fn run_settler(
        config: &Config,
        runtime: &RuntimeWatch,
        shutdown: CancellationToken,
    ) -> anyhow::Result<()> {
        let store = open_store(config).await?;
        let log = LogParts::open(config).await?;
        if matches!(log, LogParts::Embedded(_)) {
            bail!(
                "log.url = \"embedded\": the embedded log belongs to the `serve` process, which \
                 runs the settler itself; `settle` needs a Kafka log (kafka://host:port)"
            );
        }
        // A Kafka log: embedded admission (and so its maintenance) is refused above.
        let (admission, _) = open_admission(config, &store, &log).await?;
        let providers = providers(config).await?;
        let archive = open_archive(config).await?;
        let s = build_settler(config, &store, &log, admission, &providers, archive).await?;
        runtime
            .spawn(s.run(shutdown))
            .await
            .context("settler task")??;
        if let Some(m) = providers.mock {
            m.stop().await;
        }
        Ok(())
    }
}

/// Waits for `cond` to hold, checking every 20 ms, until `deadline` passes.
pub async fn wait_until<F, Fut>(deadline: Duration, mut cond: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let end = tokio::time::Instant::now() + deadline;
    loop {
        if cond().await {
            return true;
        }
        if tokio::time::Instant::now() >= end {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Fails with a message naming the bad key when a value is out of range.
pub fn check(config: &Config) -> anyhow::Result<()> {
    if config.server.order_body_limit == 0 {
        bail!("server.order_body_limit must be positive");
    }
    if !(1024..=256 * 1024).contains(&config.server.max_header_bytes) {
        bail!("server.max_header_bytes must be between 1024 and 262144");
    }
    if !(1..=10_000).contains(&config.server.max_headers) {
        bail!("server.max_headers must be between 1 and 10000");
    }
    if config.settler.batch_size == 0 {
        bail!("settler.batch_size must be positive");
    }
    if !(0.0..=1.0).contains(&config.providers.mock_decline_rate) {
        bail!("providers.mock_decline_rate must be between 0 and 1");
    }
    if !(0.0..=1.0).contains(&config.providers.mock_error_rate) {
        bail!("providers.mock_error_rate must be between 0 and 1");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use sequencer::{OrderRecord, RECORD_VERSION};
    use storage::{Currency, OrderId, SaleId, Timestamp, UserId};

    /// The value of `series` in a fresh process registry (0 when absent).
    fn sample(series: &str) -> f64 {
        let registry = process_registry("test", Vec::new());
        let (text, _) = ingest::metrics::render(&registry, false);
        text.lines()
            .find_map(|l| {
                l.strip_prefix(series)?
                    .strip_prefix(' ')?
                    .trim()
                    .parse()
                    .ok()
            })
            .unwrap_or(0.0)
    }

    #[tokio::test]
    async fn recovery_counts_and_skips_a_record_and_a_release_of_a_sale_the_catalog_lacks() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = SqliteStore::open(dir.path().join("db.sqlite")).expect("store");
        let log = FileLog::open(dir.path().join("log"), FileLogOptions::default()).expect("log");
        let record = OrderRecord {
            v: RECORD_VERSION,
            order_id: OrderId::new(),
            sale_id: SaleId::parse("ghost").expect("sale id"),
            user_id: UserId::parse("u1").expect("user id"),
            quantity: 1,
            amount_minor: 100,
            currency: Currency::parse("EUR").expect("currency"),
            sequence: 0,
            idempotency_key: "k1".into(),
            fingerprint: "f".repeat(32),
            payment_token: "tok_visa".into(),
            accepted_at: Timestamp::now(),
        };
        log.append(&record).await.expect("append");
        store
            .persist_batch(&[record.to_new_order()], None)
            .await
            .expect("persist");
        assert!(store
            .transition(
                record.order_id,
                OrderStatus::Persisted,
                OrderStatus::Expired,
                None
            )
            .await
            .expect("expire"));
        let records = r#"flashsale_recovery_skipped_total{what="log_record"}"#;
        let releases = r#"flashsale_recovery_skipped_total{what="release"}"#;
        let (r0, l0) = (sample(records), sample(releases));

        let admission = EmbeddedAdmission::new();
        recover_admission(&admission, &store, &log, &dir.path().join("log"))
            .await
            .expect("recovery goes on");
        assert_eq!(sample(records), r0 + 1.0);
        assert_eq!(sample(releases), l0 + 1.0);
    }
}

#[cfg(test)]
mod store_url_tests {
    use super::*;

    fn config(url: &str) -> Config {
        let mut config = Config::default();
        config.store.url = url.into();
        config.data_dir = std::env::temp_dir().join("flashsale-never-created");
        config
    }

    #[cfg(not(feature = "scylla"))]
    #[tokio::test]
    async fn a_scylla_store_without_the_feature_is_refused_by_name() {
        let config = config("scylla://127.0.0.1:9042/flashsale");
        let opened = open_store(&config).await.err().expect("refused");
        let migrated = migrate_store(&config).await.expect_err("refused");
        for err in [opened, migrated] {
            let err = format!("{err:#}");
            assert!(err.starts_with("store.url: "), "{err}");
            assert!(err.contains("without the `scylla` feature"), "{err}");
        }
    }

    #[cfg(feature = "scylla")]
    #[tokio::test]
    async fn bad_scylla_settings_are_refused_before_connecting() {
        let mut config = config("scylla://127.0.0.1:9/flashsale");
        config.store.consistency = "most".into();
        let err = open_store(&config).await.err().expect("refused");
        assert!(
            format!("{err:#}").starts_with("store.consistency: "),
            "{err:#}"
        );
        let err = migrate_store(&config).await.expect_err("refused");
        assert!(
            format!("{err:#}").starts_with("store.consistency: "),
            "{err:#}"
        );
    }

    #[tokio::test]
    async fn an_unknown_store_url_lists_the_stores() {
        let err = open_store(&config("mysql://h/db"))
            .await
            .err()
            .expect("refused");
        let err = format!("{err:#}");
        assert!(err.starts_with("store.url = "), "{err}");
        assert!(
            err.contains("postgres://") && err.contains("scylla://"),
            "{err}"
        );
    }
}
