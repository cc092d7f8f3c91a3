//! Embedded migrations, applied in one transaction under an advisory lock.

use tracing::info;

use super::{Store, pg};
use crate::{Error, Result};

struct Migration {
    version: i32,
    name: &'static str,
    sql: &'static str,
}

const MIGRATIONS: &[Migration] = &[
    Migration {
        version: 1,
        name: "initial",
        sql: include_str!("migrations/0001_initial.sql"),
    },
    Migration {
        version: 2,
        name: "retries and replay",
        sql: include_str!("migrations/0002_retries_and_replay.sql"),
    },
    Migration {
        version: 3,
        name: "dead letter fillfactor",
        sql: include_str!("migrations/0003_dead_letter_fillfactor.sql"),
    },
];

/// Arbitrary constant naming Gantry's migration lock.
const LOCK_KEY: i64 = 0x6761_6e74_7279;

impl Store {
    pub(super) async fn migrate(&self) -> Result<()> {
        let mut client = self.client().await?;
        let tx = client.transaction().await.map_err(pg("begin"))?;
        tx.execute("SELECT pg_advisory_xact_lock($1)", &[&LOCK_KEY])
            .await
            .map_err(pg("migration lock"))?;
        tx.batch_execute(
            "CREATE TABLE IF NOT EXISTS gantry_migrations (
                 version integer PRIMARY KEY,
                 name text NOT NULL,
                 applied_at timestamptz NOT NULL DEFAULT now())",
        )
        .await
        .map_err(pg("create gantry_migrations"))?;
        let row = tx
            .query_one(
                "SELECT coalesce(max(version), 0) FROM gantry_migrations",
                &[],
            )
            .await
            .map_err(pg("read schema version"))?;
        let current: i32 = row.get(0);
        let known = MIGRATIONS.last().map_or(0, |m| m.version);
        if current > known {
            return Err(Error::SchemaTooNew {
                found: current,
                known,
            });
        }
        for m in MIGRATIONS.iter().filter(|m| m.version > current) {
            let fail = |source| Error::Migration {
                version: m.version,
                name: m.name,
                source,
            };
            tx.batch_execute(m.sql).await.map_err(fail)?;
            tx.execute(
                "INSERT INTO gantry_migrations (version, name) VALUES ($1, $2)",
                &[&m.version, &m.name],
            )
            .await
            .map_err(fail)?;
            info!(version = m.version, name = m.name, "applied migration");
        }
        tx.commit().await.map_err(pg("commit migrations"))?;
        Ok(())
    }
}
