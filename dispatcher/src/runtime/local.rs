//! The `local` runtime: each job is a `gantry-executor` child process on this machine, with
//! the same contract and deadlines as a Kubernetes Job.
//!
//! Each job has a directory `<state_dir>/jobs/<job name>/`:
//!
//! - `task.json`: the task envelope the executor reads;
//! - `lock`: locked (`flock`) by the dispatcher and handed to the executor as its stdin, so
//!   the lock is held exactly as long as the executor lives, even after the dispatcher dies;
//! - `pid`, `executor.log` (the executor's stdout and stderr);
//! - `started`, then `exit.json`: written by the executor when it starts and after it
//!   published (or failed to publish) its result;
//! - `engine.pgid`: the command engine's process group while the program runs (it has a
//!   group of its own), so a program whose executor died is stopped too;
//! - `handled`: written once the dispatcher has dealt with the job's end.
//!
//! A warm executor's directory has `warm.json` (its class and deadline) in place of
//! `task.json`; the rest is the same.
//!
//! From these a restarted dispatcher tells a job that never started (lock free, no
//! `started`: start it), one that runs (lock held: adopt it) and one that ended (lock free,
//! `started`: read `exit.json`), so it never runs a task twice and never loses one. Jobs run
//! in their own process group: they outlive a dispatcher that is killed, as Jobs outlive a
//! controller. Adopted jobs are not children, so their end is noticed by polling the lock.

use std::fs::{self, File, OpenOptions, TryLockError};
use std::io::{self, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, SystemTime};

use chrono::{DateTime, Utc};
use gantry_shared::catalog::{ExecutorSpec, WarmSpec};
use gantry_shared::message::{
    Attempt, Evidence, ExecutorClass, JobName, Task, TaskEnvelope, TaskId,
};
use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use serde::{Deserialize, Serialize};
use tokio::process::Child;
use tracing::{debug, info, instrument, warn};

use super::contract::{End, Job, JobEnd, Runtime};
use crate::{Error, Result};

/// The local runtime, owning one state directory.
pub(crate) struct LocalRuntime {
    jobs_dir: PathBuf,
    executor_bin: PathBuf,
    node: String,
    env: Vec<(String, String)>,
    deadline_grace: Duration,
    kill_grace: Duration,
    retention: Duration,
    /// Identifies this state directory in dispatch ids, so reconciliation only touches
    /// tasks it dispatched itself.
    instance: String,
    /// Held for the life of the dispatcher: one dispatcher per state directory.
    _state_lock: File,
}

/// One job of this runtime.
pub(crate) struct LocalJob {
    pub(crate) name: JobName,
    pub(crate) task_id: TaskId,
    pub(crate) attempt: Attempt,
    pub(crate) executor: String,
    pub(crate) deadline: DateTime<Utc>,
    /// When the executor started (or, for a new job, just before it was spawned).
    pub(crate) started_at: Option<DateTime<Utc>>,
    dir: PathBuf,
    child: Option<Child>,
}

/// What starting a job found.
pub(crate) enum Started {
    /// A new executor process runs the job.
    Created(LocalJob),
    /// The job already runs (a redelivery, or adopted after a restart).
    Running(LocalJob),
    /// The job already ran to its end; it needs no new process.
    Ended(LocalJob),
}

enum Phase {
    NotStarted,
    Running,
    Ended,
    Handled,
}

/// What a warm executor's directory says of it (`warm.json`).
#[derive(Serialize, Deserialize)]
struct WarmReport {
    executor: String,
    deadline: DateTime<Utc>,
}

/// The warm executor whose directory is `dir`, if it is one.
fn read_warm(dir: &Path) -> Option<LocalJob> {
    let bytes = fs::read(dir.join("warm.json")).ok()?;
    let report: WarmReport = serde_json::from_slice(&bytes).ok()?;
    let name = dir.file_name()?.to_str()?;
    Some(LocalJob {
        name: JobName::recorded(name),
        task_id: TaskId::from(uuid::Uuid::nil()),
        attempt: Attempt::FIRST,
        executor: report.executor,
        deadline: report.deadline,
        started_at: read_started_at(dir),
        dir: dir.to_path_buf(),
        child: None,
    })
}

#[derive(Deserialize)]
struct ExitReport {
    published: bool,
}

#[derive(Deserialize)]
struct StartedReport {
    started_at: DateTime<Utc>,
}

/// When the executor of a job said it started, if it did.
fn read_started_at(dir: &Path) -> Option<DateTime<Utc>> {
    let bytes = fs::read(dir.join("started")).ok()?;
    serde_json::from_slice::<StartedReport>(&bytes)
        .ok()
        .map(|r| r.started_at)
}

/// Settings of the local runtime.
pub(crate) struct LocalOptions {
    pub(crate) state_dir: PathBuf,
    pub(crate) executor_bin: PathBuf,
    pub(crate) node: String,
    pub(crate) env: Vec<(String, String)>,
    pub(crate) deadline_grace: Duration,
    pub(crate) kill_grace: Duration,
    pub(crate) retention: Duration,
}

impl LocalRuntime {
    /// Opens (creating) the state directory and takes its lock.
    ///
    /// # Errors
    /// The directory cannot be created, another dispatcher holds it, or the executor
    /// program is missing.
    pub(crate) fn open(o: LocalOptions) -> Result<LocalRuntime> {
        let io_err = |source| Error::StateDir {
            path: o.state_dir.display().to_string(),
            source,
        };
        let jobs_dir = o.state_dir.join("jobs");
        fs::create_dir_all(&jobs_dir).map_err(io_err)?;
        let lock = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(o.state_dir.join("dispatcher.lock"))
            .map_err(io_err)?;
        match lock.try_lock() {
            Ok(()) => {}
            Err(TryLockError::WouldBlock) => {
                return Err(Error::StateDirBusy(o.state_dir.display().to_string()));
            }
            Err(TryLockError::Error(e)) => return Err(io_err(e)),
        }
        let instance = instance_id(&o.state_dir).map_err(io_err)?;
        if !o.executor_bin.is_file() {
            return Err(Error::ExecutorMissing(o.executor_bin.display().to_string()));
        }
        Ok(LocalRuntime {
            jobs_dir,
            executor_bin: o.executor_bin,
            node: o.node,
            env: o.env,
            deadline_grace: o.deadline_grace,
            kill_grace: o.kill_grace,
            retention: o.retention,
            instance,
            _state_lock: lock,
        })
    }

    /// Starts the job of `task`, or finds it if it exists.
    ///
    /// # Errors
    /// The job directory cannot be written or the executor cannot be started.
    #[instrument(skip_all, fields(task_id = %task.id, attempt = %task.attempt))]
    fn start_job(&self, task: &Task, spec: &ExecutorSpec, dispatch_id: &str) -> Result<Started> {
        let name = JobName::for_task(task.id, task.attempt);
        let dir = self.jobs_dir.join(name.as_str());
        let job = LocalJob {
            name: name.clone(),
            task_id: task.id,
            attempt: task.attempt,
            executor: task.executor.to_string(),
            deadline: task.deadline,
            started_at: read_started_at(&dir),
            dir: dir.clone(),
            child: None,
        };
        let job_err = |e: io::Error| Error::Job {
            job: name.to_string(),
            message: e.to_string(),
        };
        match fs::create_dir(&dir) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                match phase(&dir).map_err(job_err)? {
                    Phase::Running => return Ok(Started::Running(job)),
                    Phase::Ended | Phase::Handled => return Ok(Started::Ended(job)),
                    Phase::NotStarted => {}
                }
            }
            Err(e) => return Err(job_err(e)),
        }
        write_atomic(
            &dir.join("task.json"),
            &serde_json::to_vec(&task.envelope()).map_err(|e| Error::Job {
                job: name.to_string(),
                message: e.to_string(),
            })?,
        )
        .map_err(job_err)?;
        let lock = open_lock(&dir).map_err(job_err)?;
        match lock.try_lock() {
            Ok(()) => {}
            // Another handler of a duplicate delivery is starting it right now.
            Err(TryLockError::WouldBlock) => return Ok(Started::Running(job)),
            Err(TryLockError::Error(e)) => return Err(job_err(e)),
        }
        if dir.join("started").exists() || dir.join("exit.json").exists() {
            return Ok(Started::Ended(job));
        }
        let spawned_at = Utc::now();
        let child = self.spawn(task, spec, dispatch_id, &dir, &name, lock)?;
        info!(job = %name, pid = child.id(), "job started");
        Ok(Started::Created(LocalJob {
            child: Some(child),
            started_at: Some(spawned_at),
            ..job
        }))
    }

    fn spawn(
        &self,
        task: &Task,
        spec: &ExecutorSpec,
        dispatch_id: &str,
        dir: &Path,
        name: &JobName,
        lock: File,
    ) -> Result<Child> {
        let mut cmd = self.command(spec, dir, name);
        cmd.env("GANTRY_TASK_FILE", dir.join("task.json"))
            .env("GANTRY_DISPATCH_ID", dispatch_id);
        if let Some(tp) = &task.traceparent {
            cmd.env("GANTRY_TRACEPARENT", tp);
        }
        if let Some(reply_to) = &task.reply_to {
            cmd.env("GANTRY_REPLY_TO", reply_to);
        }
        self.launch(cmd, dir, name, lock)
    }

    /// The executor's command line for a job in `dir`, as every job of `spec` has it.
    fn command(&self, spec: &ExecutorSpec, dir: &Path, name: &JobName) -> tokio::process::Command {
        let mut cmd = tokio::process::Command::new(&self.executor_bin);
        cmd.envs(self.env.iter().map(|(k, v)| (k, v)))
            .env("GANTRY_JOB_DIR", dir)
            .env("GANTRY_TERMINATION_LOG", dir.join("termination-log"))
            .env("GANTRY_JOB_NAME", name.as_str())
            .env("GANTRY_POD_NAME", name.as_str())
            .env("GANTRY_NODE_NAME", &self.node);
        cmd.envs(spec.engine.executor_env());
        cmd
    }

    /// Starts `cmd` holding the job's `lock`, logging to `executor.log`, in a process group
    /// of its own.
    fn launch(
        &self,
        mut cmd: tokio::process::Command,
        dir: &Path,
        name: &JobName,
        lock: File,
    ) -> Result<Child> {
        let job_err = |e: io::Error| Error::Job {
            job: name.to_string(),
            message: e.to_string(),
        };
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join("executor.log"))
            .map_err(job_err)?;
        cmd.stdin(Stdio::from(lock))
            .stdout(Stdio::from(log.try_clone().map_err(job_err)?))
            .stderr(Stdio::from(log))
            .process_group(0)
            .kill_on_drop(false);
        let child = cmd.spawn().map_err(|e| match e.kind() {
            io::ErrorKind::NotFound => {
                Error::ExecutorMissing(self.executor_bin.display().to_string())
            }
            _ => job_err(e),
        })?;
        // Dropping the command closes this process's copy of the lock: from here on only
        // the executor holds it.
        drop(cmd);
        if let Some(pid) = child.id() {
            let _ = fs::write(dir.join("pid"), pid.to_string());
        }
        Ok(child)
    }

    /// Starts a warm executor: its directory holds `warm.json` (its class and deadline)
    /// instead of `task.json`.
    #[instrument(skip_all, fields(job = %name))]
    fn start_warm_job(
        &self,
        name: &JobName,
        class: &ExecutorClass,
        spec: &ExecutorSpec,
        warm: &WarmSpec,
        queue: &str,
    ) -> Result<LocalJob> {
        let dir = self.jobs_dir.join(name.as_str());
        let job_err = |e: io::Error| Error::Job {
            job: name.to_string(),
            message: e.to_string(),
        };
        fs::create_dir(&dir).map_err(job_err)?;
        let deadline = Utc::now()
            + chrono::Duration::from_std(warm.job_deadline())
                .unwrap_or(chrono::Duration::days(365));
        let about = WarmReport {
            executor: class.to_string(),
            deadline,
        };
        let about = serde_json::to_vec(&about).map_err(|e| Error::Job {
            job: name.to_string(),
            message: e.to_string(),
        })?;
        write_atomic(&dir.join("warm.json"), &about).map_err(job_err)?;
        let lock = open_lock(&dir).map_err(job_err)?;
        lock.try_lock().map_err(|e| Error::Job {
            job: name.to_string(),
            message: format!("cannot lock the new job directory: {e}"),
        })?;
        let mut cmd = self.command(spec, &dir, name);
        let (key, value) = warm.executor_env();
        cmd.env("GANTRY_WARM_QUEUE", queue).env(key, value);
        let started_at = Utc::now();
        let child = self.launch(cmd, &dir, name, lock)?;
        info!(pid = child.id(), "warm executor started");
        Ok(LocalJob {
            name: name.clone(),
            task_id: TaskId::from(uuid::Uuid::nil()),
            attempt: Attempt::FIRST,
            executor: class.to_string(),
            deadline,
            started_at: Some(started_at),
            dir,
            child: Some(child),
        })
    }

    /// SIGTERM to the job's process group, SIGKILL after the grace period if it holds on.
    async fn stop(&self, dir: &Path, pid: Option<u32>) {
        let Some(pid) = pid.or_else(|| read_pid(dir)) else {
            return;
        };
        warn!(pid, dir = %dir.display(), "stopping the job");
        let _ = killpg(Pid::from_raw(pid as i32), Signal::SIGTERM);
        let deadline = tokio::time::Instant::now() + self.kill_grace;
        while lock_held(dir) && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        if lock_held(dir) {
            self.kill(dir, Some(pid));
        }
    }

    fn kill(&self, dir: &Path, pid: Option<u32>) {
        if let Some(pid) = pid.or_else(|| read_pid(dir)) {
            let _ = killpg(Pid::from_raw(pid as i32), Signal::SIGKILL);
        }
        kill_engine_group(dir);
    }
}

/// The state directory's own id, made once and kept in `instance-id`.
impl Runtime for LocalRuntime {
    type Job = LocalJob;

    fn instance(&self) -> &str {
        &self.instance
    }

    /// A local job runs no image.
    async fn resolve_image(&self, _task: &Task, spec: &ExecutorSpec) -> Result<ExecutorSpec> {
        Ok(spec.clone())
    }

    async fn start_warm(
        &self,
        name: &JobName,
        class: &ExecutorClass,
        spec: &ExecutorSpec,
        warm: &WarmSpec,
        queue: &str,
    ) -> Result<LocalJob> {
        self.start_warm_job(name, class, spec, warm, queue)
    }

    async fn start(
        &self,
        task: &Task,
        spec: &ExecutorSpec,
        dispatch_id: &str,
    ) -> Result<(LocalJob, bool)> {
        Ok(match self.start_job(task, spec, dispatch_id)? {
            Started::Created(job) => (job, false),
            Started::Running(job) | Started::Ended(job) => (job, true),
        })
    }

    /// The runtime evidence of a job.
    fn evidence(&self, name: &JobName) -> Evidence {
        Evidence {
            job_name: Some(name.to_string()),
            pod_name: Some(name.to_string()),
            node: Some(self.node.clone()),
            ..Evidence::default()
        }
    }

    fn runs_at_start(&self) -> bool {
        true
    }

    /// Waits for the job to end, stopping it if it outlives its deadline (plus grace).
    async fn wait(&self, mut job: LocalJob) -> JobEnd {
        let kill_at = instant_at(job.deadline) + self.deadline_grace;
        let mut stopped_at_deadline = false;
        let exit = match job.child.take() {
            Some(mut child) => {
                let status = tokio::select! {
                    status = child.wait() => status,
                    _ = tokio::time::sleep_until(kill_at) => {
                        stopped_at_deadline = true;
                        self.stop(&job.dir, child.id()).await;
                        let grace = tokio::time::timeout(self.kill_grace, child.wait()).await;
                        match grace {
                            Ok(status) => status,
                            Err(_) => {
                                self.kill(&job.dir, child.id());
                                child.wait().await
                            }
                        }
                    }
                };
                match status {
                    Ok(s) => describe(s),
                    Err(e) => format!("unknown ({e})"),
                }
            }
            None => {
                loop {
                    if !lock_held(&job.dir) {
                        break;
                    }
                    if !stopped_at_deadline && tokio::time::Instant::now() >= kill_at {
                        stopped_at_deadline = true;
                        self.stop(&job.dir, None).await;
                    }
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                "exited while the dispatcher was away".into()
            }
        };
        let published = fs::read(job.dir.join("exit.json"))
            .ok()
            .and_then(|b| serde_json::from_slice::<ExitReport>(&b).ok())
            .is_some_and(|r| r.published);
        if !published {
            // The executor died before its program: the program has its own process group,
            // recorded in engine.pgid while it runs. Stop it so nothing outlives the job.
            kill_engine_group(&job.dir);
        }
        let end = if published {
            End::Published
        } else if stopped_at_deadline {
            End::Deadline
        } else {
            End::Crashed
        };
        JobEnd {
            task_id: job.task_id,
            attempt: job.attempt,
            job_name: job.name.clone(),
            end,
            exit,
            log_tail: tail(&job.dir.join("executor.log"), 2048),
            evidence: self.evidence(&job.name),
        }
    }

    /// Stops a job that was cancelled.
    async fn cancel(&self, name: &JobName) -> Result<()> {
        let dir = self.jobs_dir.join(name.as_str());
        if lock_held(&dir) {
            self.stop(&dir, None).await;
        }
        Ok(())
    }

    /// Marks a job's end as dealt with; its directory is removed after the retention time.
    fn mark_handled(&self, name: &JobName) {
        let dir = self.jobs_dir.join(name.as_str());
        if !dir.is_dir() {
            return;
        }
        let path = dir.join("handled");
        if let Err(e) = fs::write(&path, b"") {
            warn!(path = %path.display(), error = %e, "cannot mark job handled");
        }
    }

    /// Removes handled job directories older than the retention time.
    fn sweep(&self) {
        let Ok(entries) = fs::read_dir(&self.jobs_dir) else {
            return;
        };
        let now = SystemTime::now();
        for dir in entries.flatten().map(|e| e.path()) {
            let old = fs::metadata(dir.join("handled"))
                .and_then(|m| m.modified())
                .is_ok_and(|t| now.duration_since(t).unwrap_or_default() > self.retention);
            if old {
                debug!(dir = %dir.display(), "removing finished job directory");
                let _ = fs::remove_dir_all(&dir);
            }
        }
    }

    /// Jobs found in the state directory that are not yet handled: running ones to adopt
    /// and ended ones whose end must be dealt with. Jobs that never started are not jobs
    /// (see [`LocalRuntime::knows`]): reconciliation fails their attempts as lost.
    fn scan(&self) -> Result<Vec<(LocalJob, bool)>> {
        let io_err = |source| Error::StateDir {
            path: self.jobs_dir.display().to_string(),
            source,
        };
        let mut found = Vec::new();
        for entry in fs::read_dir(&self.jobs_dir).map_err(io_err)? {
            let dir = entry.map_err(io_err)?.path();
            let running = match phase(&dir) {
                Ok(Phase::Running) => true,
                Ok(Phase::Ended) => false,
                Ok(Phase::NotStarted | Phase::Handled) => continue,
                Err(e) => {
                    warn!(dir = %dir.display(), error = %e, "unreadable job directory; skipped");
                    continue;
                }
            };
            if let Some(job) = read_warm(&dir) {
                found.push((job, running));
                continue;
            }
            let envelope: TaskEnvelope = match fs::read(dir.join("task.json"))
                .map_err(|e| e.to_string())
                .and_then(|b| serde_json::from_slice(&b).map_err(|e| e.to_string()))
            {
                Ok(env) => env,
                Err(e) => {
                    warn!(dir = %dir.display(), error = %e, "job directory without a readable task; skipped");
                    continue;
                }
            };
            let Some(attempt) = Attempt::new(envelope.attempt) else {
                warn!(dir = %dir.display(), "job directory whose task has attempt 0; skipped");
                continue;
            };
            let job = LocalJob {
                name: JobName::for_task(envelope.task_id, attempt),
                task_id: envelope.task_id,
                attempt,
                executor: envelope.executor,
                deadline: envelope.deadline,
                started_at: read_started_at(&dir),
                dir,
                child: None,
            };
            found.push((job, running));
        }
        Ok(found)
    }

    /// Whether the job exists here: its directory holds an executor that started (running,
    /// ended or handled). A directory whose executor never started is an attempt that was
    /// claimed and never ran (the dispatcher stopped in between): it does not count.
    fn knows(&self, name: &JobName) -> bool {
        let dir = self.jobs_dir.join(name.as_str());
        dir.is_dir() && !matches!(phase(&dir), Ok(Phase::NotStarted))
    }
}

impl Job for LocalJob {
    fn name(&self) -> &JobName {
        &self.name
    }

    fn task_id(&self) -> TaskId {
        self.task_id
    }

    fn attempt(&self) -> Attempt {
        self.attempt
    }

    fn executor(&self) -> &str {
        &self.executor
    }

    fn started_at(&self) -> Option<DateTime<Utc>> {
        self.started_at
    }
}

fn instance_id(state_dir: &Path) -> io::Result<String> {
    let path = state_dir.join("instance-id");
    match fs::read_to_string(&path) {
        Ok(id) if !id.trim().is_empty() => Ok(id.trim().to_owned()),
        _ => {
            let id = uuid::Uuid::new_v4().simple().to_string()[..12].to_owned();
            write_atomic(&path, id.as_bytes())?;
            Ok(id)
        }
    }
}

fn phase(dir: &Path) -> io::Result<Phase> {
    if dir.join("handled").exists() {
        return Ok(Phase::Handled);
    }
    if lock_held(dir) {
        return Ok(Phase::Running);
    }
    if dir.join("started").exists() || dir.join("exit.json").exists() {
        Ok(Phase::Ended)
    } else {
        Ok(Phase::NotStarted)
    }
}

fn open_lock(dir: &Path) -> io::Result<File> {
    OpenOptions::new()
        .create(true)
        .truncate(false)
        .read(true)
        .write(true)
        .open(dir.join("lock"))
}

/// Whether some process (the executor) holds the job's lock.
fn lock_held(dir: &Path) -> bool {
    match open_lock(dir) {
        Ok(f) => matches!(f.try_lock(), Err(TryLockError::WouldBlock)),
        Err(_) => false,
    }
}

/// SIGKILLs the command engine's process group, if the executor left its id behind.
fn kill_engine_group(dir: &Path) {
    let file = dir.join("engine.pgid");
    let Some(pgid) = fs::read_to_string(&file)
        .ok()
        .and_then(|s| s.trim().parse::<i32>().ok())
    else {
        return;
    };
    if pgid > 1 && killpg(Pid::from_raw(pgid), Signal::SIGKILL).is_ok() {
        warn!(pgid, dir = %dir.display(), "stopped the program its executor left running");
    }
    let _ = fs::remove_file(file);
}

fn read_pid(dir: &Path) -> Option<u32> {
    fs::read_to_string(dir.join("pid"))
        .ok()?
        .trim()
        .parse()
        .ok()
}

fn write_atomic(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let tmp = path.with_extension("tmp");
    fs::write(&tmp, bytes)?;
    fs::rename(tmp, path)
}

fn tail(path: &Path, max: u64) -> String {
    let Ok(mut f) = File::open(path) else {
        return String::new();
    };
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    let _ = f.seek(SeekFrom::Start(len.saturating_sub(max)));
    let mut buf = Vec::new();
    let _ = f.read_to_end(&mut buf);
    String::from_utf8_lossy(&buf).trim().to_owned()
}

fn describe(status: std::process::ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("exit code {code}"),
        (None, Some(sig)) => format!("killed by signal {sig}"),
        _ => "unknown".into(),
    }
}

/// The tokio instant of a wall-clock time (now, if it is past).
fn instant_at(t: DateTime<Utc>) -> tokio::time::Instant {
    let left = (t - Utc::now()).to_std().unwrap_or(Duration::ZERO);
    tokio::time::Instant::now() + left
}
