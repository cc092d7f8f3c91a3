//! Embedded migrations, applied in one transaction under an advisory lock; and the check
//! of a schema that must already be in place, which changes nothing.

use tracing::info;

use deadpool_postgres::Object;

use super::sql::pg;
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
    Migration {
        version: 4,
        name: "warm executor evidence",
        sql: include_str!("migrations/0004_warm_seq.sql"),
    },
    Migration {
        version: 5,
        name: "celery tasks",
        sql: include_str!("migrations/0005_celery.sql"),
    },
    Migration {
        version: 6,
        name: "dispatcher presence",
        sql: include_str!("migrations/0006_dispatcher_presence.sql"),
    },
];

/// The schema version this binary knows: its newest migration.
pub const SCHEMA_VERSION: i32 = MIGRATIONS[MIGRATIONS.len() - 1].version;

/// Arbitrary constant naming Gantry's migration lock.
const LOCK_KEY: i64 = 0x6761_6e74_7279;

/// What [`Store::connect_and_migrate`](super::Store::connect_and_migrate) found and did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Migrated {
    /// The database's name.
    pub database: String,
    /// The schema version found: 0 for a database without Gantry's schema.
    pub found: i32,
    /// The migrations applied, oldest first, as `(version, name)`; none when the schema was
    /// current. The schema is at [`SCHEMA_VERSION`] now.
    pub applied: Vec<(i32, &'static str)>,
}

/// Applies, under the migration lock, the migrations the database `database` lacks.
pub(super) async fn apply(client: &mut Object, database: String) -> Result<Migrated> {
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
    if current > SCHEMA_VERSION {
        return Err(Error::SchemaTooNew {
            found: current,
            known: SCHEMA_VERSION,
        });
    }
    let mut applied = Vec::new();
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
        applied.push((m.version, m.name));
    }
    tx.commit().await.map_err(pg("commit migrations"))?;
    Ok(Migrated {
        database,
        found: current,
        applied,
    })
}

/// Checks, reading only, that the database `database` has Gantry's schema at
/// [`SCHEMA_VERSION`].
pub(super) async fn check(client: &Object, database: String) -> Result<()> {
    // `to_regclass` finds the table the way the migrations created it (through the
    // search path), and answers NULL instead of failing when there is none.
    let row = client
        .query_one("SELECT to_regclass('gantry_migrations') IS NOT NULL", &[])
        .await
        .map_err(pg("look for gantry_migrations"))?;
    let found: i32 = if row.get(0) {
        client
            .query_one(
                "SELECT coalesce(max(version), 0) FROM gantry_migrations",
                &[],
            )
            .await
            .map_err(pg("read schema version"))?
            .get(0)
    } else {
        0
    };
    match found {
        0 => Err(Error::SchemaMissing { database }),
        found if found < SCHEMA_VERSION => Err(Error::SchemaBehind {
            database,
            found,
            known: SCHEMA_VERSION,
        }),
        found if found > SCHEMA_VERSION => Err(Error::SchemaTooNew {
            found,
            known: SCHEMA_VERSION,
        }),
        _ => Ok(()),
    }
}
