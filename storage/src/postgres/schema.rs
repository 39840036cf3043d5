//! The schema: the refinery migrations embedded from `migrations/postgres/` (one set for the
//! catalog, one for the shards), [`PgStore::migrate`], and the checks at connect that every
//! database is migrated and the catalog records the configured number of shards.

use super::pools::{pg_config, unavailable, Db};
use super::{corrupt, PgStore};
use crate::{Error, Result};
use futures_util::future::try_join_all;
use tokio_postgres::NoTls;

mod catalog_schema {
    refinery::embed_migrations!("migrations/postgres/catalog");
}
mod shard_schema {
    refinery::embed_migrations!("migrations/postgres/shard");
}

impl Db {
    /// refinery's history table of this kind of database. The catalog and a shard may be
    /// one database (the default `catalog_url` is the first shard's), so each schema keeps
    /// its own history.
    fn history_table(self) -> &'static str {
        match self {
            Db::Catalog => "flashsale_catalog_schema_history",
            Db::Shard(_) => "flashsale_shard_schema_history",
        }
    }
}

/// The highest schema version of a set of embedded migrations.
fn latest_version(runner: &refinery::Runner) -> i64 {
    runner
        .get_migrations()
        .iter()
        .map(|m| i64::from(m.version()))
        .max()
        .unwrap_or(0)
}

async fn migrate_one(url: &str, db: Db, mut runner: refinery::Runner) -> Result<()> {
    runner.set_migration_table_name(db.history_table());
    let (mut client, connection) = pg_config(url, db)?
        .connect(NoTls)
        .await
        .map_err(|e| unavailable(db, e))?;
    let conn = tokio::spawn(async move {
        if let Err(e) = connection.await {
            tracing::debug!(error = %e, "migration connection ended");
        }
    });
    // Two `flashsale migrate` at once must not both create the tables: one waits.
    let result = async {
        client
            .execute(
                "SELECT pg_advisory_lock(hashtext('flashsale migrate'))",
                &[],
            )
            .await
            .map_err(|e| unavailable(db, e))?;
        let report = runner
            .run_async(&mut client)
            .await
            .map_err(|e| Error::unavailable(format!("{db}: migration failed"), e));
        let _ = client
            .execute(
                "SELECT pg_advisory_unlock(hashtext('flashsale migrate'))",
                &[],
            )
            .await;
        for m in report?.applied_migrations() {
            tracing::info!(database = %db, migration = %m, "applied migration");
        }
        Ok(())
    }
    .await;
    drop(client);
    let _ = conn.await;
    result
}

impl PgStore {
    /// Applies the pending migrations to the catalog and to every shard. Idempotent: a
    /// database already at the latest schema is left as it is.
    pub async fn migrate(catalog_url: &str, shard_urls: &[String]) -> Result<()> {
        migrate_one(
            catalog_url,
            Db::Catalog,
            catalog_schema::migrations::runner(),
        )
        .await?;
        for (i, url) in shard_urls.iter().enumerate() {
            migrate_one(url, Db::Shard(i), shard_schema::migrations::runner()).await?;
        }
        // The first migrate records the number of shards; later ones must agree.
        let (client, connection) = pg_config(catalog_url, Db::Catalog)?
            .connect(NoTls)
            .await
            .map_err(|e| unavailable(Db::Catalog, e))?;
        let conn = tokio::spawn(connection);
        let shards = i32::try_from(shard_urls.len()).unwrap_or(i32::MAX);
        let recorded = async {
            client
                .execute(
                    "INSERT INTO store_layout (id, shards) VALUES (1, $1) \
                     ON CONFLICT (id) DO NOTHING",
                    &[&shards],
                )
                .await?;
            client
                .query_one("SELECT shards FROM store_layout WHERE id = 1", &[])
                .await?
                .try_get::<_, i32>(0)
        }
        .await
        .map_err(|e| unavailable(Db::Catalog, e));
        drop(client);
        let _ = conn.await;
        let recorded = recorded?;
        if recorded != shards {
            return Err(Error::unavailable_msg(format!(
                "the catalog records {recorded} shard(s) but {shards} are configured: adding \
                 shards moves orders (see storage/src/shard.rs); nothing was changed"
            )));
        }
        Ok(())
    }

    /// Refuses a database that is not migrated to this build's schema, or a shard list
    /// whose length differs from the one the catalog recorded.
    pub(super) async fn check_schemas(&self) -> Result<()> {
        let catalog_want = latest_version(&catalog_schema::migrations::runner());
        let shard_want = latest_version(&shard_schema::migrations::runner());
        let mut checks = vec![self.check_schema(Db::Catalog, catalog_want)];
        for i in 0..self.shard_count() {
            checks.push(self.check_schema(Db::Shard(i), shard_want));
        }
        try_join_all(checks).await?;
        self.check_layout().await
    }

    /// Refuses a shard list whose length differs from the one the catalog recorded.
    async fn check_layout(&self) -> Result<()> {
        let rows = self
            .query(
                Db::Catalog,
                "SELECT shards FROM store_layout WHERE id = 1",
                &[],
            )
            .await?;
        let recorded: Option<i32> = rows
            .first()
            .map(|r| r.try_get(0))
            .transpose()
            .map_err(corrupt)?;
        match recorded {
            Some(n) if usize::try_from(n).ok() == Some(self.shard_count()) => Ok(()),
            Some(n) => Err(Error::unavailable_msg(format!(
                "the catalog records {n} shard(s) but {} are configured: order ids would be \
                 looked for on the wrong shards (adding shards: see storage/src/shard.rs)",
                self.shard_count()
            ))),
            None => Err(Error::unavailable_msg(
                "the catalog records no shard layout: run `flashsale migrate` first",
            )),
        }
    }

    async fn check_schema(&self, db: Db, want: i64) -> Result<()> {
        let client = self.client(db).await?;
        let row = client
            .query_one("SELECT to_regclass($1) IS NOT NULL", &[&db.history_table()])
            .await
            .map_err(|e| unavailable(db, e))?;
        let have: i64 = if row.try_get::<_, bool>(0).map_err(corrupt)? {
            client
                .query_one(
                    &format!(
                        "SELECT coalesce(max(version), 0)::int8 FROM {}",
                        db.history_table()
                    ),
                    &[],
                )
                .await
                .map_err(|e| unavailable(db, e))?
                .try_get(0)
                .map_err(corrupt)?
        } else {
            0
        };
        if have < want {
            return Err(Error::unavailable_msg(format!(
                "{db} is not migrated (schema version {have}, this build needs {want}): run \
                 `flashsale migrate` first"
            )));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_schemas_are_embedded() {
        assert_eq!(latest_version(&catalog_schema::migrations::runner()), 2);
        assert_eq!(latest_version(&shard_schema::migrations::runner()), 5);
    }
}
