//! Where documents are kept: any object store (`object_store`): the local disk
//! (`file://...`), an S3 API (`s3://bucket/prefix`: AWS, MinIO, SeaweedFS, Ceph) or memory
//! (`memory://`, tests). Written create-if-absent, so a replay or a second settler never
//! overwrites a document.
//!
//! (Skeleton: the signatures are fixed; the bodies are being written.)

use bytes::Bytes;

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
#[derive(Debug)]
pub struct Archive {
    _private: (),
}

impl Archive {
    /// Opens the archive `config` names (no I/O; see [`Archive::probe`]).
    pub fn open(config: &ArchiveConfig) -> Result<Archive, ArchiveError> {
        let _ = config;
        Err(ArchiveError::Config {
            setting: "receipts.url",
            reason: "not implemented yet".into(),
        })
    }

    /// One request that proves the store answers and takes the credentials.
    pub async fn probe(&self) -> Result<(), ArchiveError> {
        Ok(())
    }

    /// Writes `bytes` under `key` unless an object is there already.
    pub async fn put_new(&self, key: &str, bytes: Vec<u8>) -> Result<Stored, ArchiveError> {
        let _ = (key, bytes);
        Ok(Stored::Written)
    }

    /// The object under `key`, if any.
    pub async fn get(&self, key: &str) -> Result<Option<Bytes>, ArchiveError> {
        let _ = key;
        Ok(None)
    }

    /// Every key under `prefix` (keys relative to the archive's own prefix).
    pub async fn keys(&self, prefix: &str) -> Result<Vec<String>, ArchiveError> {
        let _ = prefix;
        Ok(Vec::new())
    }
}
