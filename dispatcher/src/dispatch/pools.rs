//! The warm executors of every class as the dispatcher sees them ([`Pools`]): which tasks
//! each holds, which can take one more, which are due to drain. Only `super::warm` changes
//! them; see it for the whole story.

use std::collections::HashMap;
use std::sync::{Mutex, MutexGuard};
use std::time::Instant;

use gantry_shared::catalog::{ExecutorSpec, WarmSpec};
use gantry_shared::message::{Attempt, Evidence, ExecutorClass, JobName, Task, TaskId};
use tokio::sync::{Notify, OwnedSemaphorePermit};

use crate::metrics::InUse;

/// The warm executors of every class.
#[derive(Default)]
pub(crate) struct Pools {
    classes: Mutex<HashMap<ExecutorClass, Vec<Executor>>>,
    /// Woken when a slot frees or an executor gets ready.
    pub(super) changed: Notify,
}

/// One warm executor as the dispatcher sees it.
struct Executor {
    name: JobName,
    warm: WarmSpec,
    /// Its queues are declared and its job started.
    ready: bool,
    /// Told to drain (or adopted at start): takes no more tasks.
    draining: bool,
    /// Its job runs, as the runtime said (kept where jobs do not run at start): a task
    /// handed to it now is recorded `running` by its hand-off.
    running: bool,
    /// Tasks handed to it in its life.
    handed: u32,
    in_hand: HashMap<TaskId, Held>,
    born: Instant,
    idle_since: Instant,
    /// Counts it in `gantry_capacity_in_use` while the dispatcher knows it.
    in_use: Option<InUse>,
}

/// A task in hand on an executor, holding one unit of its class's capacity.
struct Held {
    attempt: Attempt,
    /// The evidence of its claim, once it was published to the executor's queue.
    claim: Option<Evidence>,
    permit: Option<OwnedSemaphorePermit>,
}

/// Where a task was placed.
pub(super) struct Placed {
    pub(super) job: JobName,
    pub(super) seq: u32,
    /// The executor is new: the hand-off starts it.
    pub(super) new: bool,
}

impl Executor {
    fn new(name: JobName, warm: WarmSpec) -> Executor {
        let now = Instant::now();
        Executor {
            name,
            warm,
            ready: false,
            draining: false,
            running: false,
            handed: 0,
            in_hand: HashMap::new(),
            born: now,
            idle_since: now,
            in_use: None,
        }
    }

    pub(super) fn has_slot(&self) -> bool {
        self.ready
            && !self.draining
            && self.in_hand.len() < usize::from(self.warm.max_concurrency)
            && self.handed < self.warm.max_tasks_per_job
            && self.born.elapsed() < self.warm.max_job_lifetime
    }

    /// Whether it should be told to drain now.
    pub(super) fn due(&self) -> bool {
        !self.draining
            && self.ready
            && ((self.in_hand.is_empty() && self.idle_since.elapsed() >= self.warm.idle_timeout)
                || self.handed >= self.warm.max_tasks_per_job
                || self.born.elapsed() >= self.warm.max_job_lifetime)
    }

    pub(super) fn hold(
        &mut self,
        task: TaskId,
        attempt: Attempt,
        permit: OwnedSemaphorePermit,
    ) -> u32 {
        self.handed += 1;
        self.in_hand.insert(
            task,
            Held {
                attempt,
                claim: None,
                permit: Some(permit),
            },
        );
        self.handed
    }
}

impl Pools {
    fn lock(&self) -> MutexGuard<'_, HashMap<ExecutorClass, Vec<Executor>>> {
        self.classes.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Places `task` on the fullest ready executor of `class` with a free slot, or on a new
    /// one if the class has room; gives the permit to the task's slot. `None` (permit
    /// returned) when every slot is taken.
    pub(super) fn place(
        &self,
        class: &ExecutorClass,
        spec: &ExecutorSpec,
        warm: WarmSpec,
        task: &Task,
        permit: OwnedSemaphorePermit,
    ) -> std::result::Result<Placed, OwnedSemaphorePermit> {
        let mut classes = self.lock();
        let executors = classes.entry(class.clone()).or_default();
        let fullest = executors
            .iter_mut()
            .filter(|e| e.has_slot())
            .max_by_key(|e| e.in_hand.len());
        if let Some(executor) = fullest {
            let seq = executor.hold(task.id, task.attempt, permit);
            return Ok(Placed {
                job: executor.name.clone(),
                seq,
                new: false,
            });
        }
        let starting = executors.iter().any(|e| !e.ready);
        if starting || executors.len() >= spec.max_active_jobs as usize {
            return Err(permit);
        }
        let mut executor = Executor::new(JobName::for_warm(class), warm);
        let seq = executor.hold(task.id, task.attempt, permit);
        let job = executor.name.clone();
        executors.push(executor);
        Ok(Placed {
            job,
            seq,
            new: true,
        })
    }

    /// Counts the executor `job` as a unit of its class's capacity in use, until it is
    /// forgotten.
    pub(super) fn count_in_use(&self, job: &JobName, in_use: InUse) {
        if let Some(executor) = self.find(&mut self.lock(), job) {
            executor.in_use = Some(in_use);
        }
    }

    /// Marks an executor started: it takes tasks.
    pub(super) fn ready(&self, job: &JobName) {
        if let Some(executor) = self.find(&mut self.lock(), job) {
            executor.ready = true;
        }
        self.changed.notify_waiters();
    }

    fn find<'a>(
        &self,
        classes: &'a mut HashMap<ExecutorClass, Vec<Executor>>,
        job: &JobName,
    ) -> Option<&'a mut Executor> {
        classes
            .values_mut()
            .flat_map(|executors| executors.iter_mut())
            .find(|e| &e.name == job)
    }

    /// Notes that `task` was published to its executor's queue, with its claim's evidence;
    /// whether the executor runs already (then the hand-off records the task `running`,
    /// otherwise [`Pools::runs`] hands it to [`follow_warm`] to record).
    pub(super) fn published(&self, task: TaskId, claim: &Evidence) -> bool {
        let mut classes = self.lock();
        let Some(executor) = classes
            .values_mut()
            .flat_map(|executors| executors.iter_mut())
            .find(|e| e.in_hand.contains_key(&task))
        else {
            return false;
        };
        if let Some(held) = executor.in_hand.get_mut(&task) {
            held.claim = Some(claim.clone());
        }
        executor.running
    }

    /// Marks the executor `job` running; the tasks published to it so far, to be recorded
    /// `running`, each with its class and the evidence of its claim.
    pub(super) fn runs(&self, job: &JobName) -> Vec<(ExecutorClass, TaskId, Attempt, Evidence)> {
        let mut classes = self.lock();
        for (class, executors) in classes.iter_mut() {
            if let Some(executor) = executors.iter_mut().find(|e| &e.name == job) {
                executor.running = true;
                return executor
                    .in_hand
                    .iter()
                    .filter_map(|(id, held)| {
                        let claim = held.claim.clone()?;
                        Some((class.clone(), *id, held.attempt, claim))
                    })
                    .collect();
            }
        }
        Vec::new()
    }

    /// Frees the slot of `task` (its attempt ended, or its hand-off was undone); the
    /// executor it was on.
    pub(crate) fn release(&self, task: TaskId) -> Option<JobName> {
        let mut classes = self.lock();
        let executor = classes
            .values_mut()
            .flat_map(|executors| executors.iter_mut())
            .find(|e| e.in_hand.contains_key(&task))?;
        executor.in_hand.remove(&task);
        if executor.in_hand.is_empty() {
            executor.idle_since = Instant::now();
        }
        let job = executor.name.clone();
        drop(classes);
        self.changed.notify_waiters();
        Some(job)
    }

    /// Every task in hand, with its attempt.
    pub(crate) fn held(&self) -> Vec<(TaskId, Attempt)> {
        self.lock()
            .values()
            .flat_map(|executors| executors.iter())
            .flat_map(|e| e.in_hand.iter().map(|(id, h)| (*id, h.attempt)))
            .collect()
    }

    /// Forgets an executor that ended; the attempts it still held.
    pub(super) fn remove(&self, job: &JobName) -> Vec<(TaskId, Attempt)> {
        let mut classes = self.lock();
        let mut held = Vec::new();
        for executors in classes.values_mut() {
            if let Some(i) = executors.iter().position(|e| &e.name == job) {
                let executor = executors.swap_remove(i);
                held = executor
                    .in_hand
                    .into_iter()
                    .map(|(id, h)| (id, h.attempt))
                    .collect();
            }
        }
        drop(classes);
        self.changed.notify_waiters();
        held
    }

    /// Forgets a new executor that may not be started after all (its class has no room
    /// across dispatchers); the unit of capacity of the task placed on it.
    pub(super) fn withdraw(&self, job: &JobName) -> Option<OwnedSemaphorePermit> {
        let mut classes = self.lock();
        let mut permit = None;
        for executors in classes.values_mut() {
            if let Some(i) = executors.iter().position(|e| &e.name == job) {
                let executor = executors.swap_remove(i);
                permit = executor.in_hand.into_values().find_map(|h| h.permit);
            }
        }
        permit
    }

    /// Takes an executor found at start: it drains, holding `held` (with a unit of
    /// capacity each where one is free).
    pub(super) fn adopt(
        &self,
        class: ExecutorClass,
        job: JobName,
        held: Vec<(TaskId, Attempt, Option<OwnedSemaphorePermit>)>,
    ) {
        let mut executor = Executor::new(job, WarmSpec::default());
        executor.ready = true;
        executor.draining = true;
        for (id, attempt, permit) in held {
            executor.in_hand.insert(
                id,
                Held {
                    attempt,
                    claim: None,
                    permit,
                },
            );
        }
        self.lock().entry(class).or_default().push(executor);
    }

    /// Marks the executors due to end as draining; their names.
    pub(super) fn retire_due(&self) -> Vec<JobName> {
        let mut classes = self.lock();
        let mut due = Vec::new();
        for executor in classes.values_mut().flat_map(|e| e.iter_mut()) {
            if executor.due() {
                executor.draining = true;
                due.push(executor.name.clone());
            }
        }
        due
    }
}
