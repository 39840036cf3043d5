//! Where documents are kept: any object store (`object_store`): the local disk
//! (`file://...`), an S3 API (`s3://bucket/prefix`: AWS, MinIO, SeaweedFS, Ceph) or memory
//! (`memory://`, tests). Written create-if-absent, so a replay or a second settler never
//! overwrites a document.

use bytes::Bytes;
use futures_util::TryStreamExt;
use object_store::aws::AmazonS3Builder;
use object_store::local::LocalFileSystem;
use object_store::memory::InMemory;
use object_store::path::Path;
use object_store::prefix::PrefixStore;
use object_store::{
    Attribute, Attributes, BackoffConfig, ClientOptions, ObjectStore, ObjectStoreExt, PutMode,
    PutOptions, PutPayload, RetryConfig,
};
use std::sync::Arc;
use std::time::Duration;

/// The key [`Archive::probe`] asks for; it is never written.
pub const PROBE_KEY: &str = ".flashsale-probe";

/// S3: how long a connection may take to open.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// S3: how long one request may take.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// S3: how long a failing request is retried, and how often.
const RETRY_TIMEOUT: Duration = Duration::from_secs(5);
const MAX_RETRIES: usize = 2;

/// `[receipts]` settings of the object store.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ArchiveConfig {
    /// `file:///abs/dir`, `s3://bucket[/prefix]` or `memory://`.
    pub url: String,
    /// S3: the endpoint (`http://127.0.0.1:8333`); empty for AWS.
    pub endpoint: String,
    /// S3: the region.
    pub region: String,
    /// S3: the access key id (empty: from `AWS_ACCESS_KEY_ID`).
    pub access_key_id: String,
    /// S3: the secret access key (empty: from `AWS_SECRET_ACCESS_KEY`).
    pub secret_access_key: String,
    /// S3: allow a plain-HTTP endpoint.
    pub allow_http: bool,
}

/// What a create-if-absent write found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stored {
    /// This call wrote the object.
    Written,
    /// An object with that key was there already (a replay, or another settler).
    AlreadyThere,
}

/// Why the archive failed.
#[derive(Debug, thiserror::Error)]
pub enum ArchiveError {
    /// A setting is wrong: `setting` names it.
    #[error("{setting}: {reason}")]
    Config {
        /// The setting, e.g. `receipts.url`.
        setting: &'static str,
        /// What is wrong with it.
        reason: String,
    },
    /// The object store refused the credentials.
    #[error("receipts.access_key_id / receipts.secret_access_key: the object store refused the credentials: {0}")]
    Credentials(#[source] object_store::Error),
    /// The object store failed or could not be reached (retry later).
    #[error("object store unavailable: {0}")]
    Unavailable(#[source] object_store::Error),
}

/// The document archive.
pub struct Archive {
    store: Arc<dyn ObjectStore>,
    /// Whether the backend keeps attributes (the content type): not the local disk.
    attributes: bool,
    /// What the archive is, for logs (no secrets).
    describe: String,
}

impl std::fmt::Debug for Archive {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Archive")
            .field("at", &self.describe)
            .finish_non_exhaustive()
    }
}

fn config_error(setting: &'static str, reason: impl Into<String>) -> ArchiveError {
    ArchiveError::Config {
        setting,
        reason: reason.into(),
    }
}

/// One error of the store, sorted: refused credentials, or an outage to retry.
fn classify(err: object_store::Error) -> ArchiveError {
    match err {
        object_store::Error::PermissionDenied { .. }
        | object_store::Error::Unauthenticated { .. } => ArchiveError::Credentials(err),
        other => ArchiveError::Unavailable(other),
    }
}

/// `a/b/` → the path `a/b`; rejects empty or `..` segments.
fn prefix_path(setting: &'static str, prefix: &str) -> Result<Option<Path>, ArchiveError> {
    let trimmed = prefix.trim_matches('/');
    if trimmed.is_empty() {
        return Ok(None);
    }
    Path::parse(trimmed)
        .map(Some)
        .map_err(|e| config_error(setting, format!("bad key prefix {trimmed:?}: {e}")))
}

fn with_prefix(store: Arc<dyn ObjectStore>, prefix: Option<Path>) -> Arc<dyn ObjectStore> {
    match prefix {
        Some(prefix) => Arc::new(PrefixStore::new(store, prefix)),
        None => store,
    }
}

fn key_path(key: &str) -> Result<Path, ArchiveError> {
    Path::parse(key).map_err(|e| config_error("receipts key", format!("bad key {key:?}: {e}")))
}

fn or_env(value: &str, var: &str) -> String {
    if value.is_empty() {
        std::env::var(var).unwrap_or_default()
    } else {
        value.to_owned()
    }
}

impl Archive {
    /// Opens the archive `config` names (no I/O but creating a missing local directory;
    /// see [`Archive::probe`]).
    pub fn open(config: &ArchiveConfig) -> Result<Archive, ArchiveError> {
        let url = config.url.trim();
        if let Some(rest) = url.strip_prefix("memory://") {
            let store: Arc<dyn ObjectStore> = Arc::new(InMemory::new());
            return Ok(Archive {
                store: with_prefix(store, prefix_path("receipts.url", rest)?),
                attributes: true,
                describe: url.to_owned(),
            });
        }
        if let Some(dir) = url.strip_prefix("file://") {
            if !dir.starts_with('/') {
                return Err(config_error(
                    "receipts.url",
                    format!("{url:?}: a file:// URL needs an absolute directory, as file:///var/lib/flashsale/receipts"),
                ));
            }
            std::fs::create_dir_all(dir).map_err(|e| {
                config_error(
                    "receipts.url",
                    format!("cannot create the directory {dir}: {e}"),
                )
            })?;
            let store = LocalFileSystem::new_with_prefix(dir)
                .map_err(|e| config_error("receipts.url", format!("{url:?}: {e}")))?;
            return Ok(Archive {
                store: Arc::new(store),
                attributes: false,
                describe: url.to_owned(),
            });
        }
        if let Some(rest) = url.strip_prefix("s3://") {
            let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
            if bucket.is_empty() {
                return Err(config_error(
                    "receipts.url",
                    format!("{url:?}: no bucket; expected s3://bucket[/prefix]"),
                ));
            }
            let mut builder = AmazonS3Builder::new()
                .with_bucket_name(bucket)
                .with_access_key_id(or_env(&config.access_key_id, "AWS_ACCESS_KEY_ID"))
                .with_secret_access_key(or_env(&config.secret_access_key, "AWS_SECRET_ACCESS_KEY"))
                // Client options replace the builder's whole set: `allow_http` goes in here.
                .with_client_options(
                    ClientOptions::new()
                        .with_allow_http(config.allow_http)
                        .with_connect_timeout(CONNECT_TIMEOUT)
                        .with_timeout(REQUEST_TIMEOUT),
                )
                .with_retry(RetryConfig {
                    backoff: BackoffConfig {
                        init_backoff: Duration::from_millis(100),
                        max_backoff: Duration::from_secs(1),
                        base: 2.0,
                    },
                    max_retries: MAX_RETRIES,
                    retry_timeout: RETRY_TIMEOUT,
                });
            if !config.region.is_empty() {
                builder = builder.with_region(&config.region);
            }
            if !config.endpoint.is_empty() {
                if config.endpoint.starts_with("http://") && !config.allow_http {
                    return Err(config_error(
                        "receipts.endpoint",
                        format!(
                            "{}: a plain-HTTP endpoint needs receipts.allow_http = true",
                            config.endpoint
                        ),
                    ));
                }
                builder = builder
                    .with_endpoint(&config.endpoint)
                    .with_virtual_hosted_style_request(false);
            }
            let store = builder
                .build()
                .map_err(|e| config_error("receipts.url", format!("{url:?}: {e}")))?;
            let store: Arc<dyn ObjectStore> = Arc::new(store);
            return Ok(Archive {
                store: with_prefix(store, prefix_path("receipts.url", prefix)?),
                attributes: true,
                describe: url.to_owned(),
            });
        }
        Err(config_error(
            "receipts.url",
            format!(
                "{url:?}: unsupported; expected file:///abs/dir, s3://bucket[/prefix] or memory://"
            ),
        ))
    }

    /// One request that proves the store answers and takes the credentials: a HEAD of
    /// [`PROBE_KEY`], which does not exist.
    pub async fn probe(&self) -> Result<(), ArchiveError> {
        match self.store.head(&Path::from(PROBE_KEY)).await {
            Ok(_) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(classify(e)),
        }
    }

    /// Writes `bytes` under `key` unless an object is there already.
    pub async fn put_new(&self, key: &str, bytes: Vec<u8>) -> Result<Stored, ArchiveError> {
        let path = key_path(key)?;
        let mut attributes = Attributes::new();
        if self.attributes {
            attributes.insert(Attribute::ContentType, "application/pdf".into());
        }
        let opts = PutOptions {
            mode: PutMode::Create,
            attributes,
            ..PutOptions::default()
        };
        match self
            .store
            .put_opts(&path, PutPayload::from(bytes), opts)
            .await
        {
            Ok(_) => Ok(Stored::Written),
            Err(object_store::Error::AlreadyExists { .. }) => Ok(Stored::AlreadyThere),
            Err(e) => Err(classify(e)),
        }
    }

    /// The object under `key`, if any.
    pub async fn get(&self, key: &str) -> Result<Option<Bytes>, ArchiveError> {
        let path = key_path(key)?;
        match self.store.get(&path).await {
            Ok(got) => got.bytes().await.map(Some).map_err(classify),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(classify(e)),
        }
    }

    /// Every key under `prefix` (keys relative to the archive's own prefix), sorted.
    pub async fn keys(&self, prefix: &str) -> Result<Vec<String>, ArchiveError> {
        let prefix = prefix_path("receipts key prefix", prefix)?;
        let listed: Vec<_> = self
            .store
            .list(prefix.as_ref())
            .try_collect()
            .await
            .map_err(classify)?;
        let mut keys: Vec<String> = listed
            .into_iter()
            .map(|meta| meta.location.to_string())
            .collect();
        keys.sort();
        Ok(keys)
    }
}
