//! The `local` runtime's job directory, the executor's side of its protocol.
//!
//! The dispatcher creates `<job_dir>/`, writes `task.json`, takes an exclusive `flock` on
//! `<job_dir>/lock` and passes that open file as the executor's **stdin**: the lock is held
//! exactly as long as the executor process lives, which is how the dispatcher tells a running
//! executor from a dead one. So the executor never reads from, closes or hands on its stdin
//! (fd 0); the engines give their programs a pipe instead. The dispatcher also sends the
//! executor's stderr to `<job_dir>/executor.log`.
//!
//! The executor writes two files, each atomically (`<name>.tmp`, then rename), so a reader
//! sees either nothing or the whole file:
//!
//! - `started`, first thing: `{"pid": 1234, "started_at": "<RFC 3339>"}`;
//! - `exit.json`, last thing: the [`ExitReport`] (`published`, `status`, `error`,
//!   `finished_at`). It is missing only when the executor died (or the echo engine's
//!   `exit_code` knob simulated that).

use std::path::{Path, PathBuf};

use anyhow::Context;
use chrono::Utc;
use serde_json::json;
use tokio::io::AsyncWriteExt;
use tracing::instrument;

use crate::report::ExitReport;

/// A job directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct JobDir {
    path: PathBuf,
}

impl JobDir {
    pub(crate) fn new(path: PathBuf) -> JobDir {
        JobDir { path }
    }

    /// `engine.pgid`: the command engine's process group while it runs, so the runtime can
    /// stop the program if this executor dies before it (the program has its own group).
    pub(crate) fn engine_group_file(&self) -> PathBuf {
        self.path.join("engine.pgid")
    }

    /// Writes `started` with this process's id and the time.
    ///
    /// # Errors
    /// The directory is missing or not writable.
    #[instrument(skip_all, fields(job_dir = %self.path.display()))]
    pub(crate) async fn write_started(&self) -> anyhow::Result<()> {
        let started = json!({"pid": std::process::id(), "started_at": Utc::now()});
        write_atomically(&self.path.join("started"), &serde_json::to_vec(&started)?).await
    }

    /// Writes `exit.json`.
    ///
    /// # Errors
    /// The directory is missing or not writable.
    #[instrument(skip_all, fields(job_dir = %self.path.display()))]
    pub(crate) async fn write_exit(&self, report: &ExitReport) -> anyhow::Result<()> {
        write_atomically(&self.path.join("exit.json"), &serde_json::to_vec(report)?).await
    }
}

/// Writes `bytes` to `<path>.tmp`, flushes it to disk and renames it to `path`.
async fn write_atomically(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    let mut file = tokio::fs::File::create(&tmp).await.with_context(|| {
        format!(
            "cannot create {}; does the job directory exist and is it writable?",
            tmp.display()
        )
    })?;
    file.write_all(bytes)
        .await
        .with_context(|| format!("cannot write {}", tmp.display()))?;
    file.sync_all()
        .await
        .with_context(|| format!("cannot flush {} to disk", tmp.display()))?;
    drop(file);
    tokio::fs::rename(&tmp, path)
        .await
        .with_context(|| format!("cannot rename {} to {}", tmp.display(), path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use gantry_shared::message::ResultStatus;
    use serde_json::Value;

    fn files(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }

    #[tokio::test]
    async fn exit_json_is_written_whole_with_no_temporary_file_left() {
        let dir = tempfile::tempdir().unwrap();
        let job = JobDir::new(dir.path().to_owned());
        let report = ExitReport::new(
            false,
            ResultStatus::Expired,
            Some("no queue is bound".into()),
        );
        job.write_exit(&report).await.unwrap();
        assert_eq!(files(dir.path()), ["exit.json"]);
        let json: Value =
            serde_json::from_slice(&std::fs::read(dir.path().join("exit.json")).unwrap()).unwrap();
        assert_eq!(json["published"], false);
        assert_eq!(json["status"], "expired");
        assert_eq!(json["error"], "no queue is bound");
        assert!(
            json["finished_at"]
                .as_str()
                .unwrap()
                .parse::<chrono::DateTime<Utc>>()
                .is_ok()
        );
        assert_eq!(json.as_object().unwrap().len(), 4);
    }

    #[tokio::test]
    async fn a_published_exit_json_has_no_error() {
        let dir = tempfile::tempdir().unwrap();
        let job = JobDir::new(dir.path().to_owned());
        job.write_exit(&ExitReport::new(true, ResultStatus::Succeeded, None))
            .await
            .unwrap();
        let json: Value =
            serde_json::from_slice(&std::fs::read(dir.path().join("exit.json")).unwrap()).unwrap();
        assert_eq!(json["published"], true);
        assert_eq!(json["status"], "succeeded");
        assert!(json.get("error").is_none());
    }

    #[tokio::test]
    async fn started_names_this_process() {
        let dir = tempfile::tempdir().unwrap();
        JobDir::new(dir.path().to_owned())
            .write_started()
            .await
            .unwrap();
        let json: Value =
            serde_json::from_slice(&std::fs::read(dir.path().join("started")).unwrap()).unwrap();
        assert_eq!(json["pid"], std::process::id());
        assert!(json["started_at"].is_string());
        assert_eq!(files(dir.path()), ["started"]);
    }

    #[tokio::test]
    async fn a_missing_job_dir_is_an_error_that_names_the_file() {
        let job = JobDir::new("/nonexistent/gantry-job".into());
        let err = job.write_started().await.unwrap_err();
        assert!(format!("{err:#}").contains("/nonexistent/gantry-job/started.tmp"));
    }
}
