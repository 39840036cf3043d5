//! The Scylla schema: versioned CQL files (`migrations/scylla/V<n>__<name>.cql`, embedded),
//! applied in order by `migrate` and recorded in `schema_migrations`; `connect` refuses a
//! keyspace that is behind.

use super::{unavailable, Session};
use crate::{Error, Result, Timestamp};

/// The migrations, in version order: (version, name, CQL).
pub(crate) const MIGRATIONS: &[(i32, &str, &str)] = &[
    (
        1,
        "orders",
        include_str!("../../migrations/scylla/V1__orders.cql"),
    ),
    (
        2,
        "stock_buckets",
        include_str!("../../migrations/scylla/V2__stock_buckets.cql"),
    ),
];

/// The version this build reads and writes.
pub(crate) fn latest() -> i32 {
    MIGRATIONS.last().map_or(0, |m| m.0)
}

/// The statements of a CQL file: `--` comments dropped, split at `;`.
pub(crate) fn statements(cql: &str) -> Vec<String> {
    let text: String = cql
        .lines()
        .map(|l| l.split_once("--").map_or(l, |(code, _)| code))
        .collect::<Vec<_>>()
        .join("\n");
    text.split(';')
        .map(|s| s.split_whitespace().collect::<Vec<_>>().join(" "))
        .filter(|s| !s.is_empty())
        .collect()
}

const MIGRATIONS_TABLE: &str = "CREATE TABLE IF NOT EXISTS schema_migrations \
     (version int PRIMARY KEY, name text, applied_at bigint)";

/// The versions recorded in the keyspace (empty if it has none yet).
pub(crate) async fn applied(session: &Session, keyspace: &str) -> Result<Vec<i32>> {
    let rows = session
        .query_unpaged(
            format!("SELECT version FROM {keyspace}.schema_migrations"),
            &[],
        )
        .await
        .map_err(|e| unavailable("reading the schema version", e))?
        .into_rows_result()
        .map_err(|e| unavailable("reading the schema version", e))?;
    let mut versions: Vec<i32> = rows
        .rows::<(i32,)>()
        .map_err(|e| unavailable("reading the schema version", e))?
        .filter_map(|r| r.ok().map(|(v,)| v))
        .collect();
    versions.sort_unstable();
    Ok(versions)
}

/// Creates the keyspace if missing (with `replication`), then applies every migration not
/// recorded yet; returns the versions applied now. Every statement is idempotent (`IF NOT
/// EXISTS`), so two `migrate` runs at once, or one stopped halfway, end in the same schema.
pub(crate) async fn migrate(
    session: &Session,
    keyspace: &str,
    replication: &str,
) -> Result<Vec<u32>> {
    let run = |cql: String| async move {
        session
            .query_unpaged(cql.clone(), &[])
            .await
            .map(drop)
            .map_err(|e| unavailable(format!("migration statement failed: {cql}"), e))
    };
    run(format!(
        "CREATE KEYSPACE IF NOT EXISTS {keyspace} WITH replication = {replication}"
    ))
    .await?;
    run(MIGRATIONS_TABLE.replace(
        "schema_migrations",
        &format!("{keyspace}.schema_migrations"),
    ))
    .await?;
    let done = applied(session, keyspace).await?;
    let mut now_applied = Vec::new();
    for (version, name, cql) in MIGRATIONS {
        if done.contains(version) {
            continue;
        }
        for stmt in statements(cql) {
            run(qualify(&stmt, keyspace)).await?;
        }
        session
            .query_unpaged(
                format!(
                    "INSERT INTO {keyspace}.schema_migrations (version, name, applied_at) \
                     VALUES (?, ?, ?)"
                ),
                (*version, *name, Timestamp::now().millis()),
            )
            .await
            .map_err(|e| unavailable("recording a migration", e))?;
        now_applied.push(*version as u32);
    }
    // On a cluster, wait until every node has the new tables (a single node, or a server
    // without peers, has nothing to wait for).
    if !now_applied.is_empty() {
        if let Err(e) = session.await_schema_agreement().await {
            tracing::info!(error = %e, "schema agreement not awaited");
        }
    }
    Ok(now_applied)
}

const CREATE: &str = "CREATE TABLE IF NOT EXISTS ";

/// `CREATE TABLE IF NOT EXISTS t` → `... keyspace.t`. Migrations only create tables (a
/// column is added as a table beside, keyed like its row: every statement stays
/// idempotent, and the harness's CQL server has no `ALTER TABLE`).
fn qualify(stmt: &str, keyspace: &str) -> String {
    match stmt.strip_prefix(CREATE) {
        Some(rest) => format!("{CREATE}{keyspace}.{rest}"),
        None => stmt.to_owned(),
    }
}

/// Refuses a keyspace that is not at this build's schema.
pub(crate) async fn check(session: &Session, keyspace: &str) -> Result<()> {
    let versions = applied(session, keyspace).await.map_err(|e| match e {
        Error::Unavailable { source, .. } => Error::Unavailable {
            context: format!(
                "keyspace {keyspace} has no flashsale schema (run `flashsale migrate`)"
            )
            .into(),
            source,
        },
        other => other,
    })?;
    let at = versions.last().copied().unwrap_or(0);
    if at < latest() {
        return Err(Error::unavailable_msg(format!(
            "keyspace {keyspace} is at schema version {at}, this build needs {}: run `flashsale migrate`",
            latest()
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_migration_splits_into_statements_the_keyspace_qualifies() {
        for (_, _, cql) in MIGRATIONS {
            let stmts = statements(cql);
            assert!(!stmts.is_empty());
            for s in &stmts {
                assert!(s.starts_with(CREATE), "{s}");
                assert!(!s.contains("--"), "{s}");
                assert!(qualify(s, "ks").starts_with(&format!("{CREATE}ks.")));
            }
        }
        assert_eq!(latest(), 2);
    }
}
