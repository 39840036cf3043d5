//! Configuration: one TOML file, every key overridable by `FLASHSALE_*` environment
//! variables (sections split by `__`, e.g. `FLASHSALE_SERVER__LISTEN`) and by flags.
//!
//! Precedence, lowest first: built-in defaults, the file (`--config`, `FLASHSALE_CONFIG`, or
//! `flashsale.toml` in the working directory when present), the environment, flags. Each
//! backend (admission, log, store, providers) is chosen on its own by its `url`, so
//! embedded and distributed parts can be mixed.

use anyhow::Context;
use figment::providers::{Env, Format, Serialized, Toml};
use figment::Figment;
use secrecy::SecretString;
use serde::Deserialize;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// The word that selects the in-process backend of a part.
pub const EMBEDDED: &str = "embedded";

/// The whole configuration.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Directory of the embedded log and store.
    pub data_dir: PathBuf,
    /// The HTTP server.
    pub server: ServerSection,
    /// Buyer and operator authentication.
    pub auth: AuthSection,
    /// The admission backend.
    pub admission: AdmissionSection,
    /// The order log.
    pub log: LogSection,
    /// The order store.
    pub store: StoreSection,
    /// The settler.
    pub settler: SettlerSection,
    /// Payment and notification providers.
    pub providers: ProvidersSection,
    /// Metrics listeners.
    pub metrics: MetricsSection,
    /// Receipts and refund notes (PDF) in object storage.
    pub receipts: ReceiptsSection,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            data_dir: PathBuf::from("data"),
            server: ServerSection::default(),
            auth: AuthSection::default(),
            admission: AdmissionSection::default(),
            log: LogSection::default(),
            store: StoreSection::default(),
            settler: SettlerSection::default(),
            providers: ProvidersSection::default(),
            metrics: MetricsSection::default(),
            receipts: ReceiptsSection::default(),
        }
    }
}

/// `[server]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerSection {
    /// Address to listen on.
    pub listen: SocketAddr,
    /// Most open connections.
    pub max_connections: usize,
    /// Deadline for a request's headers.
    #[serde(with = "humantime_serde")]
    pub header_read_timeout: Duration,
    /// Deadline to receive a request body once its head arrived (408 past it).
    #[serde(with = "humantime_serde")]
    pub body_read_timeout: Duration,
    /// Idle keep-alive connections are closed after this (in effect the smaller of this and
    /// `header_read_timeout`, which also bounds the wait for the next request).
    #[serde(with = "humantime_serde")]
    pub idle_timeout: Duration,
    /// Grace period of a graceful shutdown.
    #[serde(with = "humantime_serde")]
    pub shutdown_grace: Duration,
    /// Largest order body in bytes.
    pub order_body_limit: usize,
    /// Most bytes in a request head (request line and header fields); more get 431.
    pub max_header_bytes: usize,
    /// Most header fields in a request; more get 431.
    pub max_headers: usize,
}

impl Default for ServerSection {
    fn default() -> Self {
        ServerSection {
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            max_connections: 10_000,
            header_read_timeout: Duration::from_secs(5),
            body_read_timeout: Duration::from_secs(5),
            idle_timeout: Duration::from_secs(5),
            shutdown_grace: Duration::from_secs(10),
            order_body_limit: 4096,
            max_header_bytes: ingest::server::DEFAULT_MAX_HEADER_BYTES,
            max_headers: ingest::server::DEFAULT_MAX_HEADERS,
        }
    }
}

/// `[auth]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuthSection {
    /// HMAC secret of buyer JWTs (at least 16 bytes).
    pub jwt_secret: SecretString,
    /// Required `iss` claim.
    pub issuer: String,
    /// Required `aud` claim.
    pub audience: String,
    /// Accepted JWT algorithms.
    pub algorithms: Vec<String>,
    /// Tolerated clock skew on `exp`.
    #[serde(with = "humantime_serde")]
    pub leeway: Duration,
    /// Bearer token of the operator routes.
    pub operator_token: SecretString,
}

/// Development secret, used only when none is configured; `serve` warns about it.
pub const DEV_JWT_SECRET: &str = "flashsale-dev-secret-change-me";
/// Development operator token, likewise.
pub const DEV_OPERATOR_TOKEN: &str = "flashsale-dev-operator-token";

impl Default for AuthSection {
    fn default() -> Self {
        AuthSection {
            jwt_secret: SecretString::from(DEV_JWT_SECRET),
            issuer: "flashsale".into(),
            audience: "flashsale-buyers".into(),
            algorithms: vec!["HS256".into()],
            leeway: Duration::from_secs(5),
            operator_token: SecretString::from(DEV_OPERATOR_TOKEN),
        }
    }
}

impl AuthSection {
    /// Whether the JWT secret is still the development default.
    pub fn jwt_secret_is_default(&self) -> bool {
        use secrecy::ExposeSecret;
        self.jwt_secret.expose_secret() == DEV_JWT_SECRET
    }

    /// The verifier's settings; names the key that is wrong.
    pub fn to_auth_config(&self) -> anyhow::Result<ingest::auth::AuthConfig> {
        let algorithms = self
            .algorithms
            .iter()
            .map(|a| {
                a.parse::<jsonwebtoken::Algorithm>()
                    .map_err(|_| anyhow::anyhow!("auth.algorithms: unknown algorithm {a:?}"))
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        Ok(ingest::auth::AuthConfig {
            jwt_secret: self.jwt_secret.clone(),
            issuer: self.issuer.clone(),
            audience: self.audience.clone(),
            algorithms,
            leeway: self.leeway,
            operator_token: self.operator_token.clone(),
        })
    }
}

/// `[admission]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdmissionSection {
    /// `embedded`, a `redis://` URL, or a cluster's `redis+cluster://host:port[,host:port...]`
    /// (distributed backend).
    pub url: String,
    /// Prefix of every Redis key (`{prefix}{sale_id}:...`), so several deployments can share
    /// one Redis.
    pub key_prefix: String,
    /// Deadline of one decision; past it the buyer gets 503.
    #[serde(with = "humantime_serde")]
    pub decision_timeout: Duration,
    /// Redis: how long an instance's sold-out flag of a sale lives at most (flags are also
    /// dropped as soon as units come back); `0s` turns the flags off.
    #[serde(with = "humantime_serde")]
    pub sold_out_ttl: Duration,
    /// Embedded: most orders one sale accepts (bounds its idempotency answers, users'
    /// units, released and claimed sets); past it orders get 503 `capacity_exceeded`.
    pub max_orders_per_sale: u64,
    /// Embedded: most token buckets one sale keeps at once (refilled ones are dropped);
    /// a new buyer meeting a full map gets 503 `capacity_exceeded` with `Retry-After`.
    pub max_buckets_per_sale: usize,
    /// Embedded: how long after its end a settled sale keeps its idempotency answers (and
    /// every other per-user and per-order entry) before they are dropped.
    #[serde(with = "humantime_serde")]
    pub retention: Duration,
}

impl Default for AdmissionSection {
    fn default() -> Self {
        AdmissionSection {
            url: EMBEDDED.into(),
            key_prefix: "fs:".into(),
            decision_timeout: Duration::from_millis(250),
            sold_out_ttl: Duration::from_secs(1),
            max_orders_per_sale: 1_000_000,
            max_buckets_per_sale: 1_000_000,
            retention: Duration::from_secs(3600),
        }
    }
}

/// `[log]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogSection {
    /// `embedded`, or a `kafka://host:port[,host:port]` bootstrap list.
    pub url: String,
    /// Flush the embedded log to disk before answering 202.
    pub fsync: bool,
    /// Most records per group commit.
    pub max_batch: usize,
    /// Most appends waiting for the disk.
    pub queue_capacity: usize,
    /// Embedded: a segment file is sealed and a new one started past this size (bytes).
    pub segment_bytes: u64,
    /// Embedded: how often the admission checkpoint is written (and settled segments
    /// deleted).
    #[serde(with = "humantime_serde")]
    pub checkpoint_interval: Duration,
    /// Kafka: prefix of every topic name.
    pub topic_prefix: String,
    /// Kafka: partitions of each topic `flashsale migrate` creates.
    pub partitions: u32,
    /// Kafka: replication factor of the topics `flashsale migrate` creates.
    pub replication: u32,
    /// Kafka: `linger.ms` of the producer.
    #[serde(with = "humantime_serde")]
    pub linger: Duration,
    /// Kafka: `batch.size` of the producer in bytes.
    pub batch_size: usize,
    /// Kafka: longest wait for a delivery report before the buyer gets 503.
    #[serde(with = "humantime_serde")]
    pub delivery_timeout: Duration,
    /// Kafka: `fetch.wait.max.ms` of the settler's consumer, the longest a fetch waits for
    /// records (default 20 ms; librdkafka's own is 500 ms, which tansu waits out in full,
    /// so every order waited about half a second between its 202 and its settlement).
    #[serde(with = "humantime_serde")]
    pub fetch_wait: Duration,
}

impl Default for LogSection {
    fn default() -> Self {
        LogSection {
            url: EMBEDDED.into(),
            fsync: true,
            max_batch: 4096,
            queue_capacity: 65_536,
            segment_bytes: 64 << 20,
            checkpoint_interval: Duration::from_secs(60),
            topic_prefix: String::new(),
            partitions: 12,
            replication: 1,
            linger: Duration::from_millis(1),
            batch_size: 256 * 1024,
            delivery_timeout: Duration::from_secs(5),
            fetch_wait: Duration::from_millis(20),
        }
    }
}

impl LogSection {
    /// Whether `url` names a Kafka log.
    pub fn wants_kafka(&self) -> bool {
        self.url.starts_with("kafka://")
    }

    /// The Kafka settings, when `url` is `kafka://host:port[,host:port]`.
    #[cfg(feature = "kafka")]
    pub fn kafka(&self) -> Option<sequencer::kafka::KafkaConfig> {
        let bootstrap = self.url.strip_prefix("kafka://")?;
        Some(sequencer::kafka::KafkaConfig {
            bootstrap: bootstrap.trim_end_matches('/').to_owned(),
            topic_prefix: self.topic_prefix.clone(),
            partitions: self.partitions.clamp(1, 10_000) as i32,
            replication: self.replication.clamp(1, 100) as i32,
            linger: self.linger,
            batch_size: self.batch_size,
            delivery_timeout: self.delivery_timeout,
            fetch_wait: self.fetch_wait,
        })
    }
}

/// `[store]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StoreSection {
    /// `embedded` (SQLite in `data_dir`), `postgres://...` shard URLs separated by commas, or
    /// `scylla://host:port[,host:port]/keyspace`.
    pub url: String,
    /// Postgres: the catalog database (sales, consumer offsets); empty means the first
    /// shard's database.
    pub catalog_url: String,
    /// Postgres: connections per database.
    pub pool_size: usize,
    /// Deadline of every store call: one that has not returned by then fails as the store
    /// being unavailable (503 on the order path, a retry by the settler's sweep), so a
    /// hung database (stopped, not gone) cannot hold a caller until TCP gives up.
    #[serde(with = "humantime_serde")]
    pub call_timeout: Duration,
    /// Scylla: consistency level of every read and write (`one`, `local_one`, `quorum`,
    /// `local_quorum`, `each_quorum`, `all`).
    pub consistency: String,
    /// Scylla: replication of the keyspace `flashsale migrate` creates (an existing one is
    /// left as it is): `SimpleStrategy:N` or `NetworkTopologyStrategy:dc1=3,dc2=3`.
    pub replication: String,
    /// Scylla: deadline of one request to the cluster.
    #[serde(with = "humantime_serde")]
    pub request_timeout: Duration,
}

impl Default for StoreSection {
    fn default() -> Self {
        StoreSection {
            url: EMBEDDED.into(),
            catalog_url: String::new(),
            pool_size: 16,
            call_timeout: Duration::from_secs(5),
            consistency: "local_quorum".into(),
            replication: "SimpleStrategy:1".into(),
            request_timeout: Duration::from_secs(2),
        }
    }
}

/// The databases of a sharded Postgres store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PostgresUrls {
    /// The catalog database.
    pub catalog: String,
    /// One database per shard, in shard order.
    pub shards: Vec<String>,
}

impl StoreSection {
    /// The Postgres databases when `url` names them; `None` for the embedded store.
    pub fn postgres(&self) -> anyhow::Result<Option<PostgresUrls>> {
        let is_pg = |u: &str| u.starts_with("postgres://") || u.starts_with("postgresql://");
        if !is_pg(&self.url) {
            return Ok(None);
        }
        let shards: Vec<String> = self
            .url
            .split(',')
            .map(str::trim)
            .filter(|u| !u.is_empty())
            .map(str::to_owned)
            .collect();
        if let Some(bad) = shards.iter().find(|u| !is_pg(u)) {
            anyhow::bail!("store.url: {bad:?} is not a postgres:// URL");
        }
        let catalog = if self.catalog_url.is_empty() {
            shards[0].clone()
        } else if is_pg(&self.catalog_url) {
            self.catalog_url.clone()
        } else {
            anyhow::bail!(
                "store.catalog_url: {:?} is not a postgres:// URL",
                self.catalog_url
            );
        };
        Ok(Some(PostgresUrls { catalog, shards }))
    }

    /// Whether `url` names a Scylla store (`scylla://...`), in any build.
    pub fn wants_scylla(&self) -> bool {
        self.url.starts_with("scylla://")
    }

    /// The Scylla store's settings when `url` is `scylla://host:port[,host:port]/keyspace`
    /// (with `consistency`, `replication` and `request_timeout`); `None` for another store.
    /// Errors name the key that is wrong.
    #[cfg(feature = "scylla")]
    pub fn scylla(&self) -> anyhow::Result<Option<storage::scylla::ScyllaConfig>> {
        use storage::scylla::ScyllaConfig;
        if !ScyllaConfig::is_scylla_url(&self.url) {
            return Ok(None);
        }
        let mut config = ScyllaConfig::from_url(&self.url)
            .map_err(|e| anyhow::anyhow!("store.url: {}", e.reason))?;
        config.consistency = self
            .consistency
            .parse()
            .map_err(|e: storage::InvalidValue| {
                anyhow::anyhow!(
                    "store.consistency: {} (not {:?})",
                    e.reason,
                    self.consistency
                )
            })?;
        config.replication = self
            .replication
            .parse()
            .map_err(|e: storage::InvalidValue| {
                anyhow::anyhow!(
                    "store.replication: {} (not {:?})",
                    e.reason,
                    self.replication
                )
            })?;
        anyhow::ensure!(
            !self.request_timeout.is_zero(),
            "store.request_timeout: must be above zero (every request would fail)"
        );
        config.request_timeout = self.request_timeout;
        Ok(Some(config))
    }
}

/// `[settler]`: the settler's own settings type (one definition, in the settler crate);
/// the provider endpoints in it are filled from `[providers]`.
pub type SettlerSection = settler::SettlerConfig;

/// `[providers]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ProvidersSection {
    /// Payment provider base URL, or `embedded` to start the built-in mock on loopback.
    pub payment_url: String,
    /// Notification provider base URL, or `embedded` (the same built-in mock).
    pub notification_url: String,
    /// Deadline of one provider call.
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
    /// Decline rate of the built-in mock.
    pub mock_decline_rate: f64,
    /// Error rate of the built-in mock.
    pub mock_error_rate: f64,
    /// Latency of the built-in mock.
    #[serde(with = "humantime_serde")]
    pub mock_latency: Duration,
}

impl Default for ProvidersSection {
    fn default() -> Self {
        ProvidersSection {
            payment_url: EMBEDDED.into(),
            notification_url: EMBEDDED.into(),
            timeout: Duration::from_secs(2),
            mock_decline_rate: 0.0,
            mock_error_rate: 0.0,
            mock_latency: Duration::ZERO,
        }
    }
}

/// `[metrics]`: where the processes without an API of their own serve `GET /metrics`
/// (`serve` answers it on its API listener).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MetricsSection {
    /// The metrics listener of `flashsale settle`.
    pub settle_listen: SocketAddr,
}

impl Default for MetricsSection {
    fn default() -> Self {
        MetricsSection {
            settle_listen: SocketAddr::from(([127, 0, 0, 1], 9464)),
        }
    }
}

/// `[receipts]`: where the settler keeps the PDF receipts of paid orders and the refund
/// notes of refunded late charges (any object store: the local disk or an S3 API).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ReceiptsSection {
    /// Whether the settler writes receipts (and the API serves them).
    pub enabled: bool,
    /// `file:///abs/dir`, `s3://bucket[/prefix]`; empty means `file://{data_dir}/receipts`.
    pub url: String,
    /// S3: the endpoint (e.g. `http://127.0.0.1:8333`); empty for AWS.
    pub endpoint: String,
    /// S3: the region.
    pub region: String,
    /// S3: the access key id; empty means `AWS_ACCESS_KEY_ID`.
    pub access_key_id: String,
    /// S3: the secret access key; empty means `AWS_SECRET_ACCESS_KEY`.
    pub secret_access_key: SecretString,
    /// S3: allow a plain-HTTP endpoint.
    pub allow_http: bool,
    /// The seller named on every document.
    pub seller: String,
}

impl Default for ReceiptsSection {
    fn default() -> Self {
        ReceiptsSection {
            enabled: true,
            url: String::new(),
            endpoint: String::new(),
            region: "us-east-1".into(),
            access_key_id: String::new(),
            secret_access_key: SecretString::from(""),
            allow_http: false,
            seller: "flashsale".into(),
        }
    }
}

impl ReceiptsSection {
    /// The archive's settings: an empty `url` becomes `file://{data_dir}/receipts`, with
    /// `data_dir` made absolute. Errors name the key.
    pub fn archive_config(
        &self,
        data_dir: &Path,
    ) -> anyhow::Result<receipts::archive::ArchiveConfig> {
        use secrecy::ExposeSecret;
        let url = if self.url.trim().is_empty() {
            let dir = std::path::absolute(data_dir.join("receipts")).with_context(|| {
                format!(
                    "receipts.url: cannot make {}/receipts absolute",
                    data_dir.display()
                )
            })?;
            format!("file://{}", dir.display())
        } else {
            self.url.trim().to_owned()
        };
        Ok(receipts::archive::ArchiveConfig {
            url,
            endpoint: self.endpoint.clone(),
            region: self.region.clone(),
            access_key_id: self.access_key_id.clone(),
            secret_access_key: self.secret_access_key.expose_secret().to_owned(),
            allow_http: self.allow_http,
        })
    }
}

/// Top-level keys the environment may set; other `FLASHSALE_*` variables (such as
/// `FLASHSALE_CONFIG` or test switches) are not configuration keys.
const SECTIONS: &[&str] = &[
    "data_dir",
    "server",
    "auth",
    "admission",
    "log",
    "store",
    "settler",
    "providers",
    "metrics",
    "receipts",
];

/// Loads the configuration: defaults, then `file` (or `flashsale.toml` if it exists), then
/// `FLASHSALE_*` variables, then `overrides` (dotted key, value) from flags.
pub fn load(
    file: Option<&Path>,
    overrides: &[(&str, figment::value::Value)],
) -> anyhow::Result<Config> {
    let mut fig = Figment::new();
    match file {
        Some(path) => {
            anyhow::ensure!(
                path.exists(),
                "config file {} does not exist",
                path.display()
            );
            fig = fig.merge(Toml::file(path));
        }
        None if Path::new("flashsale.toml").exists() => {
            fig = fig.merge(Toml::file("flashsale.toml"));
        }
        None => {}
    }
    fig = fig.merge(Env::prefixed("FLASHSALE_").split("__").filter(|k| {
        // Keys are still upper-case here; figment lowercases them afterwards.
        let first = k.as_str().split('.').next().unwrap_or_default();
        SECTIONS.iter().any(|s| first.eq_ignore_ascii_case(s))
    }));
    for (key, value) in overrides {
        fig = fig.merge(Serialized::default(key, value.clone()));
    }
    fig.extract::<Config>()
        .context("invalid configuration (the message names the key)")
}

#[cfg(test)]
#[allow(clippy::result_large_err)] // figment's Jail closures return figment::Error
mod tests {
    use super::*;
    use secrecy::ExposeSecret;

    #[test]
    fn file_env_and_flags_layer_in_order() {
        figment::Jail::expect_with(|jail| {
            jail.create_file(
                "f.toml",
                r#"
                data_dir = "/tmp/x"
                [server]
                listen = "127.0.0.1:9000"
                idle_timeout = "30s"
                [auth]
                jwt_secret = "from-file-secret-123"
                "#,
            )?;
            jail.set_env("FLASHSALE_SERVER__LISTEN", "127.0.0.1:9001");
            jail.set_env("FLASHSALE_ADMISSION__DECISION_TIMEOUT", "100ms");
            jail.set_env("FLASHSALE_CONFIG", "ignored");
            jail.set_env("FLASHSALE_METRICS__SETTLE_LISTEN", "127.0.0.1:9999");
            let cfg = load(
                Some(Path::new("f.toml")),
                &[("log.fsync", figment::value::Value::from(false))],
            )
            .map_err(|e| e.to_string())?;
            assert_eq!(cfg.server.listen.port(), 9001);
            assert_eq!(cfg.server.idle_timeout, Duration::from_secs(30));
            assert_eq!(cfg.admission.decision_timeout, Duration::from_millis(100));
            assert_eq!(cfg.data_dir, PathBuf::from("/tmp/x"));
            assert_eq!(cfg.auth.jwt_secret.expose_secret(), "from-file-secret-123");
            assert!(!cfg.log.fsync);
            assert_eq!(cfg.metrics.settle_listen.port(), 9999);
            assert!(
                !format!("{cfg:?}").contains("from-file-secret-123"),
                "secrets never print"
            );
            Ok(())
        });
    }

    #[test]
    fn unknown_keys_are_named() {
        figment::Jail::expect_with(|jail| {
            jail.create_file("f.toml", "[server]\nlisten_addr = \"x\"\n")?;
            let err = load(Some(Path::new("f.toml")), &[]).expect_err("must fail");
            assert!(format!("{err:#}").contains("listen_addr"), "{err:#}");
            Ok(())
        });
    }

    #[test]
    fn a_scylla_url_is_recognised_in_any_build() {
        let store = |url: &str| StoreSection {
            url: url.into(),
            ..StoreSection::default()
        };
        assert!(store("scylla://127.0.0.1:9042/flashsale").wants_scylla());
        assert!(!store(EMBEDDED).wants_scylla());
        assert!(!store("postgres://h/db").wants_scylla());
    }

    #[cfg(feature = "scylla")]
    #[test]
    fn the_scylla_settings_come_from_the_url_and_the_store_keys() {
        use storage::scylla::{Consistency, Replication};
        figment::Jail::expect_with(|jail| {
            jail.create_file(
                "f.toml",
                r#"
                [store]
                url = "scylla://10.0.0.1:9042,10.0.0.2:9042/orders"
                consistency = "QUORUM"
                replication = "NetworkTopologyStrategy:dc1=3,dc2=2"
                request_timeout = "750ms"
                "#,
            )?;
            let cfg = load(Some(Path::new("f.toml")), &[]).map_err(|e| e.to_string())?;
            let scylla = cfg
                .store
                .scylla()
                .map_err(|e| e.to_string())?
                .expect("a scylla:// url");
            assert_eq!(scylla.nodes, vec!["10.0.0.1:9042", "10.0.0.2:9042"]);
            assert_eq!(scylla.keyspace, "orders");
            assert_eq!(scylla.consistency, Consistency::Quorum);
            assert_eq!(
                scylla.replication,
                Replication::NetworkTopology(vec![("dc1".into(), 3), ("dc2".into(), 2)])
            );
            assert_eq!(scylla.request_timeout, Duration::from_millis(750));
            Ok(())
        });

        let store = |url: &str| StoreSection {
            url: url.into(),
            ..StoreSection::default()
        };
        // The defaults of the keys.
        let scylla = store("scylla://127.0.0.1:9042/flashsale")
            .scylla()
            .expect("valid")
            .expect("scylla");
        assert_eq!(scylla.consistency, Consistency::LocalQuorum);
        assert_eq!(scylla.replication, Replication::Simple(1));
        assert_eq!(scylla.request_timeout, Duration::from_secs(2));
        // Other stores are not Scylla's.
        for other in [
            EMBEDDED,
            "postgres://h/db",
            "postgresql://h/db,postgres://g/db",
        ] {
            assert!(
                store(other).scylla().expect("no error").is_none(),
                "{other}"
            );
        }
    }

    #[cfg(feature = "scylla")]
    #[test]
    fn bad_scylla_settings_name_their_key() {
        let url = "scylla://127.0.0.1:9042/flashsale";
        let err = |s: StoreSection| format!("{:#}", s.scylla().expect_err("must fail"));
        for bad_url in [
            "scylla://127.0.0.1:9042",
            "scylla:///flashsale",
            "scylla://host/flashsale",
            "scylla://h:9042/bad-keyspace",
        ] {
            let e = err(StoreSection {
                url: bad_url.into(),
                ..StoreSection::default()
            });
            assert!(e.starts_with("store.url: "), "{bad_url}: {e}");
        }
        let e = err(StoreSection {
            url: url.into(),
            consistency: "two".into(),
            ..StoreSection::default()
        });
        assert!(
            e.starts_with("store.consistency: must be one of one, local_one, quorum"),
            "{e}"
        );
        assert!(e.contains("\"two\""), "{e}");
        for bad in [
            "SimpleStrategy",
            "SimpleStrategy:0",
            "Other:1",
            "NetworkTopologyStrategy:",
        ] {
            let e = err(StoreSection {
                url: url.into(),
                replication: bad.into(),
                ..StoreSection::default()
            });
            assert!(
                e.starts_with("store.replication: must be SimpleStrategy:N"),
                "{bad}: {e}"
            );
        }
        let e = err(StoreSection {
            url: url.into(),
            request_timeout: Duration::ZERO,
            ..StoreSection::default()
        });
        assert!(
            e.starts_with("store.request_timeout: must be above zero"),
            "{e}"
        );
    }

    #[test]
    fn the_scylla_keys_are_store_keys() {
        figment::Jail::expect_with(|jail| {
            jail.set_env("FLASHSALE_STORE__CONSISTENCY", "one");
            jail.set_env("FLASHSALE_STORE__REQUEST_TIMEOUT", "3s");
            let cfg = load(None, &[]).map_err(|e| e.to_string())?;
            assert_eq!(cfg.store.consistency, "one");
            assert_eq!(cfg.store.replication, "SimpleStrategy:1");
            assert_eq!(cfg.store.request_timeout, Duration::from_secs(3));
            jail.set_env("FLASHSALE_STORE__REQUEST_TIMEOUT", "soon");
            let err = load(None, &[]).expect_err("not a duration");
            let err = format!("{err:#}");
            assert!(
                err.to_lowercase().contains("store.request_timeout"),
                "{err}"
            );
            Ok(())
        });
    }
}

#[cfg(test)]
#[allow(clippy::result_large_err)] // figment's Jail closures return figment::Error
mod receipts_tests {
    use super::*;
    use secrecy::ExposeSecret;

    #[test]
    fn the_defaults_keep_receipts_on_the_local_disk_under_data_dir() {
        let section = ReceiptsSection::default();
        assert!(section.enabled);
        assert_eq!(section.region, "us-east-1");
        assert_eq!(section.seller, "flashsale");
        assert!(!section.allow_http);
        let archive = section
            .archive_config(Path::new("some/data"))
            .expect("valid");
        let path = archive.url.strip_prefix("file://").expect("a file:// url");
        assert!(Path::new(path).is_absolute(), "{path}");
        assert!(path.ends_with("some/data/receipts"), "{path}");
        assert!(archive.access_key_id.is_empty() && archive.secret_access_key.is_empty());
    }

    #[test]
    fn the_keys_come_from_the_file_and_the_environment_and_the_secret_never_prints() {
        figment::Jail::expect_with(|jail| {
            jail.create_file(
                "f.toml",
                r#"
                [receipts]
                url = "s3://my-bucket/receipts"
                endpoint = "http://127.0.0.1:8333"
                region = "eu-west-1"
                access_key_id = "AKIAFILE"
                allow_http = true
                seller = "Shop Ltd"
                "#,
            )?;
            jail.set_env(
                "FLASHSALE_RECEIPTS__SECRET_ACCESS_KEY",
                "very-secret-key-42",
            );
            jail.set_env("FLASHSALE_RECEIPTS__REGION", "us-west-2");
            let cfg = load(Some(Path::new("f.toml")), &[]).map_err(|e| e.to_string())?;
            let r = &cfg.receipts;
            assert!(r.enabled);
            assert_eq!(r.url, "s3://my-bucket/receipts");
            assert_eq!(r.endpoint, "http://127.0.0.1:8333");
            assert_eq!(r.region, "us-west-2");
            assert_eq!(r.access_key_id, "AKIAFILE");
            assert_eq!(r.secret_access_key.expose_secret(), "very-secret-key-42");
            assert!(r.allow_http);
            assert_eq!(r.seller, "Shop Ltd");
            assert!(
                !format!("{cfg:?}").contains("very-secret-key-42"),
                "secrets never print"
            );
            let archive = r.archive_config(&cfg.data_dir).map_err(|e| e.to_string())?;
            assert_eq!(archive.url, "s3://my-bucket/receipts");
            assert_eq!(archive.secret_access_key, "very-secret-key-42");
            jail.set_env("FLASHSALE_RECEIPTS__ENABLED", "false");
            let cfg = load(Some(Path::new("f.toml")), &[]).map_err(|e| e.to_string())?;
            assert!(!cfg.receipts.enabled);
            Ok(())
        });
    }

    #[test]
    fn an_unknown_receipts_key_is_named() {
        figment::Jail::expect_with(|jail| {
            jail.create_file("f.toml", "[receipts]\nbucket = \"x\"\n")?;
            let err = load(Some(Path::new("f.toml")), &[]).expect_err("must fail");
            assert!(format!("{err:#}").contains("bucket"), "{err:#}");
            Ok(())
        });
    }
}

#[cfg(test)]
mod example_file {
    use super::*;

    #[test]
    fn the_shipped_example_lists_the_defaults() {
        let path = Path::new(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/deploy/flashsale.toml"
        ));
        let text = std::fs::read_to_string(path).expect("deploy/flashsale.toml");
        let from_file: Config = Figment::new()
            .merge(Toml::string(&text))
            .extract()
            .expect("the example parses");
        let defaults = Config::default();
        assert_eq!(format!("{from_file:?}"), format!("{defaults:?}"));
    }
}
