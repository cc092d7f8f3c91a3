//! What the tests reach on this machine: the broker and the Postgres server (from
//! `GANTRY_AMQP_URL` and `GANTRY_DATABASE_URL`, else the local defaults), a queue's state,
//! and the workspace's built binaries.

use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use anyhow::{Context, Result};
use gantry_shared::amqp;
use gantry_shared::config::{DEFAULT_AMQP_URL, DEFAULT_DATABASE_URL};

/// Longest a test waits for something that should happen at once.
pub const PATIENCE: Duration = Duration::from_secs(20);

/// The broker every test uses (`GANTRY_AMQP_URL`, else this machine's).
pub fn amqp_url() -> String {
    std::env::var("GANTRY_AMQP_URL").unwrap_or_else(|_| DEFAULT_AMQP_URL.into())
}

/// The Postgres server and role tests use (`GANTRY_DATABASE_URL`, else this machine's).
pub fn admin_database_url() -> String {
    std::env::var("GANTRY_DATABASE_URL").unwrap_or_else(|_| DEFAULT_DATABASE_URL.into())
}

/// A built binary of the workspace (`cargo build --bins` first), found beside the running
/// test or benchmark executable, or in `GANTRY_BIN_DIR`.
pub fn bin_path(name: &str) -> PathBuf {
    if let Ok(dir) = std::env::var("GANTRY_BIN_DIR") {
        return Path::new(&dir).join(name);
    }
    let exe = std::env::current_exe().expect("the test knows its own path");
    let mut dir = exe
        .parent()
        .expect("the test has a directory")
        .to_path_buf();
    if dir.ends_with("deps") {
        dir.pop();
    }
    let path = dir.join(name);
    assert!(
        path.is_file(),
        "{} is missing: run `cargo build --workspace --bins` first",
        path.display()
    );
    path
}

/// The same URL with another database (its query parameters kept).
pub(crate) fn with_database(url: &str, database: &str) -> Result<String> {
    tokio_postgres::Config::from_str(url).context("GANTRY_DATABASE_URL is not a Postgres URL")?;
    let (base, query) = match url.split_once('?') {
        Some((base, query)) => (base, format!("?{query}")),
        None => (url, String::new()),
    };
    let authority = base.find("://").map_or(0, |i| i + 3);
    let host_end = base[authority..]
        .find('/')
        .map_or(base.len(), |i| authority + i);
    Ok(format!("{}/{database}{query}", &base[..host_end]))
}

/// `(ready messages, consumers)` of a queue, by a passive declare (it takes nothing).
pub async fn queue_state(queue: &str) -> Result<(u32, u32)> {
    let conn = amqp::connect(&amqp_url().into(), "gantry-tests", Duration::from_secs(10)).await?;
    let channel = conn.create_channel().await?;
    let q = amqp::peek_queue(&channel, queue, Duration::from_secs(10)).await?;
    let _ = conn.close(200, "ok".into()).await;
    Ok((q.message_count(), q.consumer_count()))
}

#[cfg(test)]
mod tests {
    use super::with_database;

    #[test]
    fn database_names_are_swapped_in_urls() -> anyhow::Result<()> {
        assert_eq!(
            with_database("postgres://u:p@h:5432/gantry", "postgres")?,
            "postgres://u:p@h:5432/postgres"
        );
        assert_eq!(
            with_database("postgres://u@h/gantry?sslmode=disable", "x")?,
            "postgres://u@h/x?sslmode=disable"
        );
        assert_eq!(with_database("postgres://h", "x")?, "postgres://h/x");
        Ok(())
    }

    #[test]
    fn a_database_url_that_is_not_postgres_is_refused() {
        let e = with_database("mysql://h/gantry", "x").expect_err("not a Postgres URL");
        assert!(
            e.to_string()
                .contains("GANTRY_DATABASE_URL is not a Postgres URL"),
            "{e:#}"
        );
    }
}
