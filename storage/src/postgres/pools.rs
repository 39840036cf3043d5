//! The connection pools: one deadpool pool per database (the catalog and each shard) with
//! its timeouts, which database a call goes to ([`Db`]; an order's shard by jump hash of its
//! id, see [`crate::shard`]), and the query helpers the other parts run their SQL through.

use super::{Inner, PgStore};
use crate::metrics;
use crate::shard;
use crate::{model::OrderId, BoxError, Error, Result};
use deadpool_postgres::{Manager, ManagerConfig, Object, Pool, RecyclingMethod, Runtime};
use futures_util::future::try_join_all;
use std::sync::{Arc, Weak};
use std::time::Duration;
use tokio_postgres::types::ToSql;
use tokio_postgres::{NoTls, Row};

/// How long opening a connection to a database may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// How long a call may wait for a pooled connection (and for creating or recycling one).
pub const POOL_TIMEOUT: Duration = Duration::from_secs(2);

/// Which database a call went to, for error messages (URLs may hold passwords: never shown).
#[derive(Debug, Clone, Copy)]
pub(super) enum Db {
    Catalog,
    Shard(usize),
}

impl std::fmt::Display for Db {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Db::Catalog => f.write_str("catalog database"),
            Db::Shard(i) => write!(f, "shard {i}"),
        }
    }
}

/// `db` failed with `e` (the error names the database, never its URL).
pub(super) fn unavailable(db: Db, e: impl Into<BoxError>) -> Error {
    Error::unavailable(db.to_string(), e)
}

pub(super) fn pg_config(url: &str, db: Db) -> Result<tokio_postgres::Config> {
    let mut cfg: tokio_postgres::Config = url
        .parse()
        .map_err(|e| Error::unavailable(format!("{db}: bad database URL"), e))?;
    cfg.connect_timeout(CONNECT_TIMEOUT);
    if cfg.get_application_name().is_none() {
        cfg.application_name("flashsale");
    }
    Ok(cfg)
}

fn make_pool(url: &str, db: Db, size: usize) -> Result<Pool> {
    let manager = Manager::from_config(
        pg_config(url, db)?,
        NoTls,
        ManagerConfig {
            recycling_method: RecyclingMethod::Fast,
        },
    );
    Pool::builder(manager)
        .max_size(size.max(1))
        .wait_timeout(Some(POOL_TIMEOUT))
        .create_timeout(Some(POOL_TIMEOUT))
        .recycle_timeout(Some(POOL_TIMEOUT))
        .runtime(Runtime::Tokio1)
        .build()
        .map_err(|e| unavailable(db, e))
}

impl PgStore {
    /// Opens a pool of at most `pool_size` connections to the catalog and to each shard
    /// (shard `i` is `shard_urls[i]`), and checks that every database answers and is
    /// migrated. Refuses with [`Error::Unavailable`] otherwise.
    pub async fn connect(
        catalog_url: &str,
        shard_urls: &[String],
        pool_size: usize,
    ) -> Result<PgStore> {
        if shard_urls.is_empty() {
            return Err(Error::unavailable_msg(
                "the sharded Postgres store needs at least one shard URL",
            ));
        }
        let shards = shard_urls
            .iter()
            .enumerate()
            .map(|(i, url)| make_pool(url, Db::Shard(i), pool_size))
            .collect::<Result<Vec<_>>>()?;
        let store = PgStore {
            inner: Arc::new(Inner {
                catalog: make_pool(catalog_url, Db::Catalog, pool_size)?,
                shards,
            }),
        };
        let pool: Weak<Inner> = Arc::downgrade(&store.inner);
        metrics::watch_pool(pool);
        store.check_schemas().await?;
        Ok(store)
    }

    /// How many shards the store has.
    pub fn shard_count(&self) -> usize {
        self.inner.shards.len()
    }

    /// The shard holding order `id`.
    pub fn shard_of(&self, id: OrderId) -> usize {
        // At most u32::MAX shards exist in practice; more would be a configuration error.
        let n = u32::try_from(self.shard_count()).unwrap_or(u32::MAX);
        shard::shard_of(id, n) as usize
    }

    pub(super) fn pool(&self, db: Db) -> &Pool {
        match db {
            Db::Catalog => &self.inner.catalog,
            Db::Shard(i) => &self.inner.shards[i],
        }
    }

    pub(super) async fn client(&self, db: Db) -> Result<Object> {
        self.pool(db).get().await.map_err(|e| unavailable(db, e))
    }

    pub(super) async fn query(
        &self,
        db: Db,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Vec<Row>> {
        let client = self.client(db).await?;
        let stmt = client
            .prepare_cached(sql)
            .await
            .map_err(|e| unavailable(db, e))?;
        client
            .query(&stmt, params)
            .await
            .map_err(|e| unavailable(db, e))
    }

    pub(super) async fn execute(
        &self,
        db: Db,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<u64> {
        let client = self.client(db).await?;
        let stmt = client
            .prepare_cached(sql)
            .await
            .map_err(|e| unavailable(db, e))?;
        client
            .execute(&stmt, params)
            .await
            .map_err(|e| unavailable(db, e))
    }

    /// Runs the same query on every shard at once; the rows per shard, in shard order.
    pub(super) async fn query_every_shard(
        &self,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Vec<Vec<Row>>> {
        try_join_all((0..self.shard_count()).map(|i| self.query(Db::Shard(i), sql, params))).await
    }
}

/// Every database answers.
pub(super) async fn ping(store: &PgStore) -> Result<()> {
    let mut pings = vec![store.query(Db::Catalog, "SELECT 1", &[])];
    for i in 0..store.shard_count() {
        pings.push(store.query(Db::Shard(i), "SELECT 1", &[]));
    }
    try_join_all(pings).await.map(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_urls_are_refused_without_echoing_them() {
        let err = make_pool("postgres://u:secret@host:notaport/db", Db::Shard(3), 4)
            .expect_err("bad port");
        let text = err.to_string();
        assert!(text.contains("shard 3"), "{text}");
        assert!(!text.contains("secret"), "{text}");
        // The parser's error is kept as the cause, and the whole chain echoes no URL either.
        let source = std::error::Error::source(&err).expect("a source");
        assert!(source.is::<tokio_postgres::Error>(), "{source:?}");
        let chain = crate::ErrorChain(&err).to_string();
        assert!(!chain.contains("secret"), "{chain}");
    }
}
