//! The command line: `serve`, `demo`, `token`, `sale`, `mock-provider`, `migrate`,
//! `settle`, `reconcile`, `receipt`. Flags override the configuration file and the environment.

use crate::app::{self, App};
use crate::config::{self, Config};
use crate::demo::{self, DemoOptions};
use anyhow::{bail, Context};
use clap::{Args, Parser, Subcommand};
use figment::value::Value;
use secrecy::ExposeSecret;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

/// flashsale: a flash-sale order ingestion pipeline.
#[derive(Debug, Parser)]
#[command(name = "flashsale", version, about)]
pub struct Cli {
    /// Configuration file (TOML). Default: flashsale.toml when present.
    #[arg(long, global = true, env = "FLASHSALE_CONFIG")]
    pub config: Option<PathBuf>,
    /// The command.
    #[command(subcommand)]
    pub command: Command,
}

/// Backend selection shared by `serve` and `demo`.
#[derive(Debug, Args, Default)]
pub struct Backends {
    /// Admission backend: `embedded`, `redis://...` or `redis+cluster://...` (admission.url).
    #[arg(long)]
    pub admission: Option<String>,
    /// Order log: `embedded` or `kafka://host:port` (log.url).
    #[arg(long)]
    pub log: Option<String>,
    /// Order store: `embedded`, `postgres://...,postgres://...` or
    /// `scylla://host:port[,host:port]/keyspace` (store.url).
    #[arg(long)]
    pub store: Option<String>,
    /// Payment provider base URL or `embedded` (providers.payment_url).
    #[arg(long)]
    pub payment_url: Option<String>,
    /// Notification provider base URL or `embedded` (providers.notification_url).
    #[arg(long)]
    pub notification_url: Option<String>,
}

impl Backends {
    fn overrides(&self) -> Vec<(&'static str, Value)> {
        let mut o = Vec::new();
        let mut push = |k: &'static str, v: &Option<String>| {
            if let Some(v) = v {
                o.push((k, Value::from(v.clone())));
            }
        };
        push("admission.url", &self.admission);
        push("log.url", &self.log);
        push("store.url", &self.store);
        push("providers.payment_url", &self.payment_url);
        push("providers.notification_url", &self.notification_url);
        o
    }
}

/// Sub-commands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the API (and, with the embedded log, the settler) until SIGINT or SIGTERM.
    Serve {
        /// Address to listen on (server.listen).
        #[arg(long)]
        listen: Option<SocketAddr>,
        /// Data directory of the embedded backends (data_dir).
        #[arg(long)]
        data_dir: Option<PathBuf>,
        /// Backends.
        #[command(flatten)]
        backends: Backends,
    },
    /// Run the settler alone (needs a Kafka log; `serve` runs it itself otherwise).
    Settle {
        /// Backends.
        #[command(flatten)]
        backends: Backends,
    },
    /// Run a whole sale on this machine and report.
    Demo {
        /// Units on sale.
        #[arg(long, default_value_t = 10_000)]
        stock: u32,
        /// Distinct buyers.
        #[arg(long, default_value_t = 20_000)]
        users: u32,
        /// Requests in the burst.
        #[arg(long, default_value_t = 50_000)]
        requests: u32,
        /// Requests in flight at once.
        #[arg(long, default_value_t = 64)]
        concurrency: usize,
        /// Share of charges the mock provider declines (0..1).
        #[arg(long, default_value_t = 0.1)]
        decline_rate: f64,
        /// Most units per user.
        #[arg(long, default_value_t = 2)]
        per_user_limit: u32,
        /// Stock buckets of the sale: its stock and buyers split over this many Redis
        /// counters (each its own Cluster slot), lending each other units.
        #[arg(long, default_value_t = 1)]
        stock_buckets: u32,
        /// Seed of the request plan.
        #[arg(long, default_value_t = 7)]
        seed: u64,
        /// Print the report as one JSON object.
        #[arg(long)]
        json: bool,
        /// Backends.
        #[command(flatten)]
        backends: Backends,
    },
    /// Print a buyer JWT signed with the configured secret.
    Token {
        /// The user id (`sub`).
        #[arg(long)]
        user: String,
        /// Validity.
        #[arg(long, default_value = "1h", value_parser = humantime::parse_duration)]
        ttl: Duration,
    },
    /// Operator client of the sale routes.
    Sale {
        /// Base URL of the API.
        #[arg(long, default_value = "http://127.0.0.1:8080", global = true)]
        url: String,
        /// What to do.
        #[command(subcommand)]
        action: SaleAction,
    },
    /// Run the mock payment and notification provider.
    MockProvider {
        /// Address to listen on.
        #[arg(long, default_value = "127.0.0.1:8090")]
        listen: SocketAddr,
        /// Fixed latency of every call.
        #[arg(long, default_value = "0ms", value_parser = humantime::parse_duration)]
        latency: Duration,
        /// Extra random latency, uniform up to this.
        #[arg(long, default_value = "0ms", value_parser = humantime::parse_duration)]
        jitter: Duration,
        /// Share of charges declined.
        #[arg(long, default_value_t = 0.0)]
        decline_rate: f64,
        /// Share of calls answered 500.
        #[arg(long, default_value_t = 0.0)]
        error_rate: f64,
        /// Share of calls that take `--slow-latency` instead (a slow tail).
        #[arg(long, default_value_t = 0.0)]
        slow_rate: f64,
        /// Latency of the slow tail.
        #[arg(long, default_value = "500ms", value_parser = humantime::parse_duration)]
        slow_latency: Duration,
        /// Share of calls that hang (nothing recorded) until the client times out.
        #[arg(long, default_value_t = 0.0)]
        timeout_rate: f64,
        /// Share of calls recorded (charged, notified) whose answer is lost: the connection
        /// closes without a reply.
        #[arg(long, default_value_t = 0.0)]
        lost_answer_rate: f64,
        /// Start down: every call answered 503 (change it at run time with
        /// `POST /v1/admin/config`).
        #[arg(long)]
        down: bool,
        /// Most orders whose detail the audit keeps; past it the oldest are dropped (the
        /// totals stay exact).
        #[arg(long, default_value_t = mock_provider::config::DEFAULT_AUDIT_CAP)]
        audit_cap: usize,
    },
    /// Check the invariants across Redis, the log and the store; rebuild a sale's admission
    /// counters from the store and repair them on request. Exits 1 when an invariant is
    /// left broken.
    Reconcile {
        /// The sale (default: every sale in the store).
        #[arg(long)]
        sale: Option<String>,
        /// Rewrite the counters where they differ (missing counters are always rebuilt).
        #[arg(long)]
        repair: bool,
        /// Data directory of the embedded store (data_dir).
        #[arg(long)]
        data_dir: Option<PathBuf>,
        /// Admission backend (admission.url).
        #[arg(long)]
        admission: Option<String>,
        /// Order store (store.url): `embedded`, `postgres://...,postgres://...` or
        /// `scylla://host:port[,host:port]/keyspace`.
        #[arg(long)]
        store: Option<String>,
        /// Order log (log.url); with kafka://, the settler's lag is checked.
        #[arg(long)]
        log: Option<String>,
        /// A payment provider with an audit (`flashsale mock-provider`): check one
        /// successful charge per paid order and none kept for a released one.
        #[arg(long)]
        payment_url: Option<String>,
    },
    /// Write an order's PDF receipt (or refund note) from the receipts archive to a file.
    /// Exits 1 when the order is unknown or has no receipt yet.
    Receipt {
        /// The order id.
        order_id: String,
        /// Where to write the PDF.
        #[arg(short, long)]
        output: PathBuf,
        /// Data directory of the embedded store (data_dir).
        #[arg(long)]
        data_dir: Option<PathBuf>,
        /// Order store (store.url).
        #[arg(long)]
        store: Option<String>,
    },
    /// Apply the store's schema migrations (every Postgres shard and the catalog, or the
    /// Scylla keyspace, created if missing) and create the Kafka topics.
    Migrate {
        /// Data directory of the embedded store (data_dir).
        #[arg(long)]
        data_dir: Option<PathBuf>,
        /// Order store (store.url): `embedded`, `postgres://...,postgres://...` or
        /// `scylla://host:port[,host:port]/keyspace`.
        #[arg(long)]
        store: Option<String>,
        /// Order log (log.url); with kafka://, its topics are created.
        #[arg(long)]
        log: Option<String>,
        /// Admission backend (admission.url); with redis:// or redis+cluster://, the
        /// scripts are loaded (on every primary of a cluster) and a cluster's slots checked.
        #[arg(long)]
        admission: Option<String>,
    },
}

/// Sale actions.
#[derive(Debug, Subcommand)]
pub enum SaleAction {
    /// Create a sale.
    Create {
        /// Sale id (default: generated).
        #[arg(long)]
        id: Option<String>,
        /// Item on sale.
        #[arg(long, default_value = "sku-1")]
        sku: String,
        /// Units on sale.
        #[arg(long)]
        stock: u32,
        /// Unit price in minor units.
        #[arg(long, default_value_t = 1999)]
        price_cents: i64,
        /// Currency.
        #[arg(long, default_value = "EUR")]
        currency: String,
        /// Most units per user.
        #[arg(long, default_value_t = 1)]
        per_user_limit: u32,
        /// Most units per order (default: the per-user limit).
        #[arg(long)]
        max_quantity_per_order: Option<u32>,
        /// Per-user requests per second.
        #[arg(long, default_value_t = 5)]
        rate: u32,
        /// Per-user burst.
        #[arg(long, default_value_t = 10)]
        burst: u32,
        /// Opening instant, RFC 3339 (default: now).
        #[arg(long)]
        starts_at: Option<String>,
        /// Closing instant, RFC 3339 (default: a day after opening).
        #[arg(long)]
        ends_at: Option<String>,
    },
    /// Show a sale.
    Get {
        /// Sale id.
        id: String,
    },
    /// Show a sale's stats.
    Stats {
        /// Sale id.
        id: String,
    },
    /// Add stock to a sale.
    AddStock {
        /// Sale id.
        id: String,
        /// Units to add.
        #[arg(long)]
        quantity: u32,
    },
}

fn load(
    cli_config: &Option<PathBuf>,
    overrides: &[(&'static str, Value)],
) -> anyhow::Result<Config> {
    let cfg = config::load(cli_config.as_deref(), overrides)?;
    app::check(&cfg)?;
    Ok(cfg)
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(_) => {
                    let _ = ctrl_c.await;
                    return;
                }
            };
        tokio::select! {
            _ = ctrl_c => {},
            _ = term.recv() => {},
        }
    }
    #[cfg(not(unix))]
    {
        let _ = ctrl_c.await;
    }
}

async fn print_response(resp: reqwest::Response) -> anyhow::Result<()> {
    let status = resp.status();
    let body: serde_json::Value = resp.json().await.unwrap_or_default();
    println!("{}", serde_json::to_string_pretty(&body)?);
    if !status.is_success() {
        bail!("the API answered {status}");
    }
    Ok(())
}

/// Runs the parsed command line; returns the process exit code.
pub async fn run(cli: Cli) -> anyhow::Result<i32> {
    match cli.command {
        Command::Serve {
            listen,
            data_dir,
            backends,
        } => {
            let mut o = backends.overrides();
            if let Some(l) = listen {
                o.push(("server.listen", Value::from(l.to_string())));
            }
            if let Some(d) = data_dir {
                o.push(("data_dir", Value::from(d.display().to_string())));
            }
            let cfg = load(&cli.config, &o)?;
            let listener = tokio::net::TcpListener::bind(cfg.server.listen)
                .await
                .with_context(|| format!("server.listen: cannot bind {}", cfg.server.listen))?;
            let running = App::start(&cfg, listener).await?;
            // The line tests and scripts wait for.
            println!("flashsale listening on http://{}", running.addr);
            let token = running.shutdown_token();
            tokio::spawn(async move {
                shutdown_signal().await;
                tracing::info!("shutdown requested; draining");
                token.cancel();
            });
            running.wait().await?;
            Ok(0)
        }
        Command::Settle { backends } => {
            let cfg = load(&cli.config, &backends.overrides())?;
            // Metrics never stop settlement: an address in use (another settler on this
            // host) leaves this one without a listener, loudly.
            let addr = cfg.metrics.settle_listen;
            let metrics = match tokio::net::TcpListener::bind(addr).await {
                Ok(listener) => Some(listener),
                Err(e) => {
                    tracing::error!(
                        error = %e,
                        "metrics.settle_listen: cannot bind {addr}; settling without a \
                         metrics listener"
                    );
                    None
                }
            };
            let metrics_url = metrics
                .as_ref()
                .and_then(|l| l.local_addr().ok())
                .map_or_else(|| "off".to_owned(), |a| format!("http://{a}/metrics"));
            let token = tokio_util::sync::CancellationToken::new();
            let t = token.clone();
            tokio::spawn(async move {
                shutdown_signal().await;
                tracing::info!("shutdown requested; finishing orders under way");
                t.cancel();
            });
            // One line (tests and scripts read it): the log and where the metrics are.
            println!(
                "flashsale settler running (log {}, metrics {metrics_url})",
                cfg.log.url
            );
            App::settle(&cfg, metrics, token).await?;
            Ok(0)
        }
        Command::Demo {
            stock,
            users,
            requests,
            concurrency,
            decline_rate,
            per_user_limit,
            stock_buckets,
            seed,
            json,
            backends,
        } => {
            anyhow::ensure!(
                (0.0..=1.0).contains(&decline_rate),
                "--decline-rate must be between 0 and 1"
            );
            anyhow::ensure!(
                stock > 0 && users > 0 && requests > 0,
                "--stock, --users and --requests must be positive"
            );
            let cfg = load(&cli.config, &backends.overrides())?;
            let opts = DemoOptions {
                stock,
                users,
                requests,
                concurrency,
                decline_rate,
                per_user_limit,
                stock_buckets,
                seed,
                progress: !json,
                ..DemoOptions::default()
            };
            if !json {
                eprintln!(
                    "flashsale demo: {requests} requests from {users} buyers for {stock} units \
                     (admission {}, log {}, store {})",
                    cfg.admission.url, cfg.log.url, cfg.store.url
                );
            }
            let report = demo::run(cfg, &opts).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                print!("{}", demo::render(&report));
            }
            Ok(if report.passed() { 0 } else { 1 })
        }
        Command::Token { user, ttl } => {
            let cfg = load(&cli.config, &[])?;
            storage::UserId::parse(user.clone()).map_err(|e| anyhow::anyhow!("--user: {e}"))?;
            let token = ingest::auth::issue_token(&cfg.auth.to_auth_config()?, &user, ttl)?;
            println!("{token}");
            Ok(0)
        }
        Command::Sale { url, action } => {
            let cfg = load(&cli.config, &[])?;
            let operator = cfg.auth.operator_token.expose_secret().to_owned();
            let client = reqwest::Client::builder()
                .timeout(Duration::from_secs(10))
                .build()?;
            let url = url.trim_end_matches('/');
            let resp = match action {
                SaleAction::Create {
                    id,
                    sku,
                    stock,
                    price_cents,
                    currency,
                    per_user_limit,
                    max_quantity_per_order,
                    rate,
                    burst,
                    starts_at,
                    ends_at,
                } => {
                    client
                        .post(format!("{url}/v1/sales"))
                        .bearer_auth(&operator)
                        .json(&serde_json::json!({
                            "id": id, "sku": sku, "stock": stock, "price_cents": price_cents,
                            "currency": currency, "per_user_limit": per_user_limit,
                            "max_quantity_per_order": max_quantity_per_order,
                            "user_rate": {"per_second": rate, "burst": burst},
                            "starts_at": starts_at, "ends_at": ends_at,
                        }))
                        .send()
                        .await?
                }
                SaleAction::Get { id } => client.get(format!("{url}/v1/sales/{id}")).send().await?,
                SaleAction::Stats { id } => {
                    client
                        .get(format!("{url}/v1/sales/{id}/stats"))
                        .bearer_auth(&operator)
                        .send()
                        .await?
                }
                SaleAction::AddStock { id, quantity } => {
                    client
                        .post(format!("{url}/v1/sales/{id}/stock"))
                        .bearer_auth(&operator)
                        .json(&serde_json::json!({ "quantity": quantity }))
                        .send()
                        .await?
                }
            };
            print_response(resp).await?;
            Ok(0)
        }
        Command::MockProvider {
            listen,
            latency,
            jitter,
            decline_rate,
            error_rate,
            slow_rate,
            slow_latency,
            timeout_rate,
            lost_answer_rate,
            down,
            audit_cap,
        } => {
            let listener = tokio::net::TcpListener::bind(listen)
                .await
                .with_context(|| format!("--listen: cannot bind {listen}"))?;
            let addr = listener.local_addr()?;
            println!("flashsale mock provider listening on http://{addr}");
            let token = tokio_util::sync::CancellationToken::new();
            let t = token.clone();
            tokio::spawn(async move {
                shutdown_signal().await;
                t.cancel();
            });
            mock_provider::serve(
                listener,
                mock_provider::MockConfig {
                    latency,
                    latency_jitter: jitter,
                    decline_rate,
                    error_rate,
                    slow_rate,
                    slow_latency,
                    timeout_rate,
                    lost_answer_rate,
                    down,
                    audit_cap,
                    ..mock_provider::MockConfig::default()
                },
                token,
            )
            .await?;
            Ok(0)
        }
        Command::Reconcile {
            sale,
            repair,
            data_dir,
            admission,
            store,
            log,
            payment_url,
        } => {
            let mut o = Vec::new();
            if let Some(d) = data_dir {
                o.push(("data_dir", Value::from(d.display().to_string())));
            }
            for (key, v) in [
                ("admission.url", admission),
                ("store.url", store),
                ("log.url", log),
            ] {
                if let Some(v) = v {
                    o.push((key, Value::from(v)));
                }
            }
            let cfg = load(&cli.config, &o)?;
            let findings =
                crate::reconcile::run(&cfg, sale.as_deref(), repair, payment_url.as_deref())
                    .await?;
            print!("{}", crate::reconcile::render(&findings));
            let broken = findings.iter().any(crate::reconcile::Finding::is_broken);
            Ok(if broken { 1 } else { 0 })
        }
        Command::Receipt {
            order_id,
            output,
            data_dir,
            store,
        } => {
            let mut o = Vec::new();
            if let Some(d) = data_dir {
                o.push(("data_dir", Value::from(d.display().to_string())));
            }
            if let Some(s) = store {
                o.push(("store.url", Value::from(s)));
            }
            let cfg = load(&cli.config, &o)?;
            crate::receipt::run(&cfg, &order_id, &output).await
        }
        Command::Migrate {
            data_dir,
            store,
            log,
            admission,
        } => {
            let mut o = Vec::new();
            if let Some(a) = admission {
                o.push(("admission.url", Value::from(a)));
            }
            if let Some(d) = data_dir {
                o.push(("data_dir", Value::from(d.display().to_string())));
            }
            if let Some(s) = store {
                o.push(("store.url", Value::from(s)));
            }
            if let Some(l) = log {
                o.push(("log.url", Value::from(l)));
            }
            let cfg = load(&cli.config, &o)?;
            #[cfg(not(feature = "kafka"))]
            if cfg.log.wants_kafka() {
                bail!("{}", crate::app::no_kafka(&cfg.log.url));
            }
            #[cfg(feature = "kafka")]
            if let Some(kafka) = cfg.log.kafka() {
                let created = sequencer::kafka::create_topics(&kafka)
                    .await
                    .with_context(|| format!("log.url = {:?}", cfg.log.url))?;
                for t in kafka.topics() {
                    let state = if created.contains(&t) {
                        "created"
                    } else {
                        "exists"
                    };
                    println!("topic {t}: {state}");
                }
            }
            if ingest::redis_admission::is_redis_url(&cfg.admission.url) {
                let redis = ingest::redis_admission::RedisAdmission::connect(
                    &cfg.admission.url,
                    &cfg.admission.key_prefix,
                    cfg.admission
                        .decision_timeout
                        .max(std::time::Duration::from_secs(2)),
                )
                .await
                .with_context(|| format!("admission.url: cannot use {}", cfg.admission.url))?;
                let prepared = redis
                    .prepare()
                    .await
                    .with_context(|| format!("admission.url = {:?}", cfg.admission.url))?;
                println!("admission: {prepared}");
            }
            println!("{}", crate::app::migrate_store(&cfg).await?);
            Ok(0)
        }
    }
}
