//! Composition: builds each part from its configured backend and runs them together.
//!
//! `flashsale serve`, `flashsale demo` and the integration tests all start the system
//! through [`App::start`] with an already-bound listener. With the embedded log, the
//! settler runs in the same process (the log file belongs to one process).

use crate::config::{Config, EMBEDDED};
use anyhow::{bail, Context};
use async_trait::async_trait;
use ingest::admission::{Admission, EmbeddedAdmission};
use ingest::api::{ApiConfig, Ingest};
use ingest::auth::Auth;
use ingest::model::OrderRef;
use ingest::redis_admission::RedisAdmission;
use ingest::server::{self, ServerConfig};
use sequencer::embedded::{FileLog, FileLogOptions};
use sequencer::OrderLog;
use settler::mock::{MockConfig, MockProvider};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
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
        let oref = OrderRef {
            order_id: order.new.order_id,
            user: order.new.user_id.clone(),
            quantity: order.new.quantity,
            key: order.new.idempotency_key.clone(),
        };
        self.0
            .release(&order.new.sale_id, &oref)
            .await
            .map_err(|e| settler::Error::Release(e.to_string()))
    }
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
    shutdown: CancellationToken,
    server: JoinHandle<std::io::Result<()>>,
    settler: Option<JoinHandle<Result<(), settler::Error>>>,
    mock: Option<MockProvider>,
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

    /// Stops accepting, drains in-flight requests, stops the settler.
    pub async fn stop(self) -> anyhow::Result<()> {
        self.shutdown.cancel();
        self.server.await.context("server task")??;
        if let Some(s) = self.settler {
            s.await.context("settler task")??;
        }
        if let Some(m) = self.mock {
            m.stop().await;
        }
        Ok(())
    }

    /// Waits until the shutdown token is cancelled (by a signal), then stops.
    pub async fn wait(self) -> anyhow::Result<()> {
        self.shutdown.cancelled().await;
        self.stop().await
    }
}

fn unsupported(key: &str, url: &str) -> anyhow::Error {
    let available = if key == "admission.url" {
        "\"embedded\" or redis://host:port/db"
    } else {
        "only \"embedded\" (the distributed backend of this part is not implemented yet)"
    };
    anyhow::anyhow!("{key} = {url:?}: not supported; use {available}")
}

/// Rebuilds the embedded admission counters after a restart: sales from the catalog,
/// accepted orders from the log, releases from the store.
async fn recover_admission(
    admission: &EmbeddedAdmission,
    store: &dyn OrderStore,
    log: &FileLog,
) -> anyhow::Result<()> {
    for sale in store.list_sales().await? {
        admission.restore_sale(&sale);
    }
    let mut from = 0;
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
            let oref = OrderRef {
                order_id: r.order_id,
                user: r.user_id.clone(),
                quantity: r.quantity,
                key: r.idempotency_key.clone(),
            };
            if let Err(err) =
                admission.restore_accepted(&r.sale_id, &oref, &r.fingerprint, r.sequence)
            {
                tracing::warn!(error = %err, order = %r.order_id, "log record of an unknown sale");
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
        let oref = OrderRef {
            order_id: o.new.order_id,
            user: o.new.user_id.clone(),
            quantity: o.new.quantity,
            key: o.new.idempotency_key.clone(),
        };
        let _ = admission.restore_release(&o.new.sale_id, &oref);
    }
    if replayed > 0 {
        tracing::info!(
            orders = replayed,
            released = released.len(),
            "admission counters rebuilt from the log and the store"
        );
    }
    Ok(())
}

/// Entry point of the composition.
#[derive(Debug)]
pub struct App;

impl App {
    /// Builds every part from `config` and serves the API on `listener`.
    pub async fn start(config: &Config, listener: TcpListener) -> anyhow::Result<Running> {
        let auth = Auth::new(&config.auth.to_auth_config()?).context("auth")?;
        let redis_admission = config.admission.url.starts_with("redis://");
        if !redis_admission && config.admission.url != EMBEDDED {
            return Err(unsupported("admission.url", &config.admission.url));
        }
        for (key, url) in [
            ("log.url", &config.log.url),
            ("store.url", &config.store.url),
        ] {
            if url != EMBEDDED {
                return Err(unsupported(key, url));
            }
        }

        let store = SqliteStore::open(config.data_dir.join("flashsale.db"))
            .with_context(|| format!("opening the store in {}", config.data_dir.display()))?;
        let store: Arc<dyn OrderStore> = Arc::new(store);

        let log = FileLog::open(
            config.data_dir.join("log"),
            FileLogOptions {
                fsync: config.log.fsync,
                max_batch: config.log.max_batch,
                queue_capacity: config.log.queue_capacity,
            },
        )
        .with_context(|| format!("opening the order log in {}", config.data_dir.display()))?;

        let admission: Arc<dyn Admission> = if redis_admission {
            // Redis keeps the counters across restarts of this process; a sale whose keys
            // Redis lost answers 503 until `flashsale reconcile` rebuilds them.
            Arc::new(
                RedisAdmission::connect(
                    &config.admission.url,
                    &config.admission.key_prefix,
                    config.admission.decision_timeout,
                )
                .await
                .with_context(|| format!("admission.url: cannot use {}", config.admission.url))?,
            )
        } else {
            let embedded = EmbeddedAdmission::new();
            recover_admission(&embedded, store.as_ref(), &log).await?;
            Arc::new(embedded)
        };

        let mut mock = None;
        let provider_url = |configured: &str| {
            (configured != EMBEDDED).then(|| configured.trim_end_matches('/').to_owned())
        };
        let payment_url = provider_url(&config.providers.payment_url);
        let notification_url = provider_url(&config.providers.notification_url);
        let needs_mock = payment_url.is_none() || notification_url.is_none();
        if needs_mock {
            let m = MockProvider::start(MockConfig {
                latency: config.providers.mock_latency,
                decline_rate: config.providers.mock_decline_rate,
                error_rate: config.providers.mock_error_rate,
                ..MockConfig::default()
            })
            .await
            .context("starting the built-in mock provider")?;
            mock = Some(m);
        }
        let mock_url = mock.as_ref().map(MockProvider::url).unwrap_or_default();
        let payment_url = payment_url.unwrap_or_else(|| mock_url.clone());
        let notification_url = notification_url.unwrap_or(mock_url);

        let ingest = Arc::new(Ingest::new(
            Arc::clone(&admission),
            Arc::new(log.clone()) as Arc<dyn OrderLog>,
            Arc::clone(&store),
            auth,
            ApiConfig {
                order_body_limit: config.server.order_body_limit,
                decision_timeout: config.admission.decision_timeout,
                body_read_timeout: config.server.body_read_timeout,
                ..ApiConfig::default()
            },
        ));

        let shutdown = CancellationToken::new();
        let (settler, settler_stats) = if config.settler.enabled {
            let from = store
                .checkpoint(&config.settler.consumer, 0)
                .await?
                .unwrap_or(0);
            // The store says it has read further than the log holds: the log lost
            // acknowledged records. Starting would skip new orders; refuse instead.
            if from > log.len() {
                bail!(
                    "the store's checkpoint ({from}) is past the end of the order log ({} records) \
                     in {}: the log lost records; restore it before starting",
                    log.len(),
                    config.data_dir.display()
                );
            }
            let settler_config = settler::SettlerConfig {
                batch_size: config.settler.batch_size,
                poll_wait: config.settler.poll_wait,
                charge_concurrency: config.settler.charge_concurrency,
                consumer_name: config.settler.consumer.clone(),
                payment_url: payment_url.clone(),
                notification_url,
                provider_timeout: config.providers.timeout,
                ..settler::SettlerConfig::default()
            };
            let dead_letter = settler::FileDeadLetter::open(config.data_dir.join("dead-letter"))
                .context("opening the dead-letter file")?;
            let s = settler::Settler::new(
                Arc::clone(&store),
                Box::new(log.consumer(from)),
                Arc::new(AdmissionRelease(Arc::clone(&admission))),
                Arc::new(dead_letter),
                settler_config,
            )?;
            let stats = s.stats();
            let token = shutdown.child_token();
            (Some(tokio::spawn(s.run(token))), Some(stats))
        } else {
            (None, None)
        };

        let addr = listener.local_addr()?;
        let server_config = ServerConfig {
            max_connections: config.server.max_connections,
            header_read_timeout: config.server.header_read_timeout,
            idle_timeout: config.server.idle_timeout,
            shutdown_grace: config.server.shutdown_grace,
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
            payment_url,
            settler_stats,
            shutdown,
            server,
            settler,
            mock,
        })
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
