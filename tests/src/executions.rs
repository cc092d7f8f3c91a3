//! Evidence of every execution, left by the work itself: a class whose command records each
//! run as a file `<task_id>.a<attempt>.<pid>` in a directory, before it does anything else.
//! Counting the files per `(task, attempt)` says how many times each attempt ran, whatever
//! the dispatcher's own bookkeeping says.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use serde_json::Value;

/// The program the class runs (the `command` engine: the task on stdin, the output on
/// stdout): it records the execution, sleeps `payload.sleep_ms`, and returns the payload.
const PROGRAM: &str = r#"
import json, os, sys, time
task = json.load(sys.stdin)
payload = task.get("payload") or {}
where = payload.get("executions")
if where:
    name = "%s.a%d.%d" % (task["task_id"], task["attempt"], os.getpid())
    with open(os.path.join(where, name), "x") as f:
        f.write(str(time.time()))
time.sleep(payload.get("sleep_ms", 0) / 1000)
json.dump(payload, sys.stdout)
"#;

/// A directory of execution records.
pub struct Executions {
    dir: PathBuf,
}

impl Executions {
    /// Records go to `dir` (created).
    ///
    /// # Errors
    /// The directory cannot be made.
    pub fn new(dir: &Path) -> Result<Executions> {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("creating the execution records' {}", dir.display()))?;
        Ok(Executions {
            dir: dir.to_path_buf(),
        })
    }

    /// The catalog's `engine:` value (YAML flow style) of a class that records executions.
    pub fn engine() -> String {
        let argv = serde_json::json!(["python3", "-c", PROGRAM]);
        format!("{{ kind: command, command: {argv} }}")
    }

    /// A payload that asks for a record here and a run of `sleep_ms`.
    pub fn payload(&self, sleep_ms: u64) -> Value {
        serde_json::json!({"executions": self.dir, "sleep_ms": sleep_ms})
    }

    /// How many times each `(task id, attempt)` ran.
    ///
    /// # Errors
    /// The directory cannot be read.
    pub fn counts(&self) -> Result<BTreeMap<(String, u32), usize>> {
        let mut counts = BTreeMap::new();
        for entry in std::fs::read_dir(&self.dir)? {
            let name = entry?.file_name().to_string_lossy().into_owned();
            let mut parts = name.splitn(3, '.');
            let (Some(task), Some(attempt)) = (parts.next(), parts.next()) else {
                continue;
            };
            let Some(attempt) = attempt.strip_prefix('a').and_then(|a| a.parse().ok()) else {
                continue;
            };
            *counts.entry((task.to_owned(), attempt)).or_default() += 1;
        }
        Ok(counts)
    }

    /// The attempts that ran more than once, with how many times.
    ///
    /// # Errors
    /// The directory cannot be read.
    pub fn run_twice(&self) -> Result<Vec<((String, u32), usize)>> {
        Ok(self.counts()?.into_iter().filter(|(_, n)| *n > 1).collect())
    }
}
