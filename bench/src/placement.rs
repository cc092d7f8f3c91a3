//! Where a benchmark's processes run on this machine's CPUs.
//!
//! On a machine of two cores shared by everything, a benchmark's ratio adds up the CPU
//! of every process of the run: the Kubernetes API double then takes its CPU from the
//! same two cores as the dispatcher, the broker and the database, which no deployment
//! does (the API server runs on the control plane's machines). [`Split`] gives the side
//! a baseline measures a CPU of its own and everything else the other CPUs, for the
//! baseline and the run compared with it alike, and puts the machine back as it was.

use std::sync::Mutex;

use anyhow::{Context, Result, bail};
use nix::sched::{CpuSet, sched_getaffinity, sched_setaffinity};
use nix::unistd::Pid;

/// One CPU for the isolated side, the others for the rest; restores the services it
/// pinned when dropped (or at [`Split::restore`]).
pub struct Split {
    isolated: usize,
    rest: Vec<usize>,
    /// Threads of services moved to the rest, with the CPUs they had.
    moved: Mutex<Vec<(Pid, CpuSet)>>,
}

impl Split {
    /// Takes the last CPU this process may use for the isolated side and pins the calling
    /// thread, and so every thread and process it starts from now on, to the others.
    ///
    /// # Errors
    /// Fewer than two CPUs, or the affinity cannot be read or set.
    pub fn new() -> Result<Split> {
        let allowed = sched_getaffinity(Pid::from_raw(0)).context("reading this process's CPUs")?;
        let cpus: Vec<usize> = (0..CpuSet::count())
            .filter(|&c| allowed.is_set(c).unwrap_or(false))
            .collect();
        let Some((&isolated, rest)) = cpus.split_last() else {
            bail!("this process may use no CPU");
        };
        if rest.is_empty() {
            bail!("one CPU only: nothing to split (use --placement shared)");
        }
        let split = Split {
            isolated,
            rest: rest.to_vec(),
            moved: Mutex::new(Vec::new()),
        };
        pin_current_thread(&split.rest_set()?).context("pinning this thread")?;
        Ok(split)
    }

    /// The isolated CPU, as a set.
    ///
    /// # Errors
    /// A CPU number beyond what a set holds.
    pub fn isolated_set(&self) -> Result<CpuSet> {
        set_of(&[self.isolated])
    }

    fn rest_set(&self) -> Result<CpuSet> {
        set_of(&self.rest)
    }

    /// Moves every thread of every running process whose name is `comm` (`beam.smp`,
    /// `postgres`) to the rest; returns how many threads moved. Processes those start
    /// later inherit it (a Postgres backend is forked by the postmaster).
    ///
    /// # Errors
    /// No such process, or one that may not be moved (run as its owner or as root, or
    /// with `--placement shared`).
    pub fn move_service(&self, comm: &str) -> Result<usize> {
        let rest = self.rest_set()?;
        let mut moved = 0;
        for pid in processes(comm)? {
            let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
                continue;
            };
            for task in tasks.flatten() {
                let Some(tid) = task.file_name().to_str().and_then(|t| t.parse().ok()) else {
                    continue;
                };
                let tid = Pid::from_raw(tid);
                let Ok(before) = sched_getaffinity(tid) else {
                    continue; // gone meanwhile
                };
                sched_setaffinity(tid, &rest).with_context(|| {
                    format!("moving thread {tid} of {comm} (pid {pid}) to CPUs {:?}; run as root, or use --placement shared", self.rest)
                })?;
                self.lock().push((tid, before));
                moved += 1;
            }
        }
        if moved == 0 {
            bail!("no running process is named {comm:?}");
        }
        Ok(moved)
    }

    /// Pins every thread of process `pid` (one the benchmark started: a collector that a
    /// deployment would run on other machines) to the isolated CPU, beside the double.
    ///
    /// # Errors
    /// The process is gone, or its affinity cannot be set.
    pub fn isolate_process(&self, pid: u32) -> Result<()> {
        let set = self.isolated_set()?;
        let tasks = std::fs::read_dir(format!("/proc/{pid}/task"))
            .with_context(|| format!("reading the threads of process {pid}"))?;
        for task in tasks.flatten() {
            if let Some(tid) = task.file_name().to_str().and_then(|t| t.parse().ok()) {
                // A thread gone meanwhile has nothing to pin.
                let _ = sched_setaffinity(Pid::from_raw(tid), &set);
            }
        }
        Ok(())
    }

    /// Puts the moved threads back on the CPUs they had.
    pub fn restore(&self) {
        for (tid, before) in self.lock().drain(..) {
            let _ = sched_setaffinity(tid, &before);
        }
    }

    /// How the CPUs are shared, for the report.
    pub fn describe(&self, isolated: &str, rest: &str) -> String {
        format!(
            "{isolated} on CPU {}; {rest} on CPU {}",
            self.isolated,
            self.rest
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(", ")
        )
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<(Pid, CpuSet)>> {
        self.moved.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Drop for Split {
    fn drop(&mut self) {
        self.restore();
    }
}

/// Pins the calling thread to `set` (for a runtime's `on_thread_start`).
///
/// # Errors
/// The affinity cannot be set.
pub fn pin_current_thread(set: &CpuSet) -> nix::Result<()> {
    sched_setaffinity(Pid::from_raw(0), set)
}

fn set_of(cpus: &[usize]) -> Result<CpuSet> {
    let mut set = CpuSet::new();
    for &c in cpus {
        set.set(c).with_context(|| format!("CPU {c}"))?;
    }
    Ok(set)
}

/// The pids of the running processes named `comm`.
fn processes(comm: &str) -> Result<Vec<i32>> {
    let mut pids = Vec::new();
    for entry in std::fs::read_dir("/proc")
        .context("reading /proc")?
        .flatten()
    {
        let Some(pid) = entry.file_name().to_str().and_then(|p| p.parse().ok()) else {
            continue;
        };
        let name = std::fs::read_to_string(entry.path().join("comm")).unwrap_or_default();
        if name.trim_end() == comm {
            pids.push(pid);
        }
    }
    Ok(pids)
}
