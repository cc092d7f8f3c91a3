//! Dispatchers side by side on one namespace and one database, as the Deployment of two
//! replicas runs them, against the Kubernetes API double: one killed, a rolling update, a
//! warm class. Each dispatcher is a `gantry-dispatcher` process.

use std::time::Duration;

use gantry_kube_double::{KubeDouble, Script};
use gantry_producer::Producer;
use gantry_shared::message::{ExecutorClass, TaskId};
use gantry_shared::store::TaskState;
use gantry_tests::executions::Executions;
use gantry_tests::replicas::{Claims, ended_once, presence};
use gantry_tests::{Dispatcher, TestEnv};

const IMAGE: &str = "registry.example.com/executor-echo@sha256:1111111111111111111111111111111111111111111111111111111111111111";

/// `max_active_jobs` of the class `echo`.
const MAX_ACTIVE: i64 = 3;

/// The world of these tests: the double, the environment, the record of executions, a
/// producer.
struct World {
    double: KubeDouble,
    env: TestEnv,
    executions: Executions,
    producer: Producer,
}

/// Classes `echo` (`max_active_jobs: 3`, `extra` appended to it) and `slow` (2), both
/// recording their executions; `slow` Jobs always run their container, and so do `echo`'s
/// unless `evicted` says to evict their first attempts.
async fn world(extra: &str, evicted: bool) -> anyhow::Result<World> {
    let double = KubeDouble::start().await;
    let executor = gantry_tests::bin_path("gantry-executor");
    double.set_image_entrypoint(IMAGE, vec![executor.display().to_string()]);
    double.script_jobs_labelled("gantry.dev/executor", "slow", Script::Run);
    if evicted {
        double.script_jobs_labelled("gantry.dev/attempt", "1", Script::Evict);
    }
    let engine = Executions::engine();
    let catalog = format!(
        "executors:\n  echo:\n    engine: {engine}\n    image: {IMAGE}\n    max_active_jobs: {MAX_ACTIVE}\n    retry: {{ max_attempts: 4, min_delay: 1s, max_delay: 1s }}\n{extra}  slow:\n    engine: {engine}\n    image: {IMAGE}\n    max_active_jobs: 2\n"
    );
    let env = TestEnv::new(Some(&catalog)).await?;
    let executions = Executions::new(&env.dir.path().join("executions"))?;
    gantry_tests::point_at_double(&double, &env)?;
    let producer = env.producer().await?;
    Ok(World {
        double,
        env,
        executions,
        producer,
    })
}

impl World {
    /// One more dispatcher on the double, ready.
    fn dispatcher(&self, extra: &[(&str, &str)]) -> anyhow::Result<Dispatcher> {
        let kubeconfig = self.env.dir.path().join("kubeconfig").display().to_string();
        let mut vars = vec![
            ("GANTRY_RUNTIME", "kubernetes"),
            ("KUBECONFIG", kubeconfig.as_str()),
        ];
        vars.extend_from_slice(extra);
        Dispatcher::start(&self.env, &vars)
    }

    /// Submits `n` tasks of `class` that each run for `sleep_ms`.
    async fn submit(&self, class: &str, n: usize, sleep_ms: u64) -> anyhow::Result<Vec<TaskId>> {
        let mut ids = Vec::with_capacity(n);
        for _ in 0..n {
            let spec = gantry_shared::message::TaskSpec {
                executor: ExecutorClass::parse(class)?,
                ..gantry_tests::echo_spec("replicas.work", self.executions.payload(sleep_ms))?
            };
            ids.push(self.producer.submit(spec).await?);
        }
        Ok(ids)
    }

    /// Two `slow` tasks of 40 s, running on the one dispatcher there is so far: they
    /// outlive it by far more than another dispatcher takes to notice it is gone.
    async fn slow_pair(&self) -> anyhow::Result<Vec<TaskId>> {
        let ids = self.submit("slow", 2, 40_000).await?;
        for id in &ids {
            gantry_tests::eventually("a slow task to run", Duration::from_secs(30), || async {
                let state = self.producer.status(*id).await?.map(|r| r.state);
                Ok((state == Some(TaskState::Running)).then_some(()))
            })
            .await?;
        }
        Ok(ids)
    }

    /// Waits until `jobs` Jobs were created, then until `dispatcher` holds a claim of
    /// `echo` (seen by `claims`).
    async fn holding(
        &self,
        jobs: u64,
        dispatcher: &Dispatcher,
        claims: &Claims,
    ) -> anyhow::Result<()> {
        self.double
            .wait_for("Jobs created", Duration::from_secs(120), |d| {
                (d.jobs_created() >= jobs).then_some(())
            })
            .await?;
        let id = presence(&dispatcher.log_text()).expect("the dispatcher logs its presence");
        gantry_tests::eventually(
            "an echo Job claimed by the dispatcher",
            Duration::from_secs(60),
            || async { Ok((claims.held_by(id) > 0).then_some(())) },
        )
        .await
    }

    /// Checks that every task of `ids` ended once and ran once, that at most
    /// `max_active_jobs` attempts of `echo` held a Job at once, claimed by `claimants`
    /// dispatchers at least, and that the double saw one Job per attempt not lost and at
    /// most `processes` × `max_active_jobs` `echo` Jobs active at once (beside `slow` ones).
    async fn check(
        &self,
        ids: &[TaskId],
        claims: Claims,
        claimants: usize,
        processes: usize,
    ) -> anyhow::Result<()> {
        let attempts = ended_once(&self.producer, ids, &self.executions).await?;
        let seen = claims.stop().await?;
        assert!(
            seen.most_active <= MAX_ACTIVE,
            "at most {MAX_ACTIVE} attempts held a Job at once: {seen:?}"
        );
        assert!(
            seen.dispatchers.len() >= claimants,
            "{claimants} dispatchers claimed: {seen:?}"
        );
        let peak = self.double.peak_active_jobs();
        assert!(
            peak <= processes * MAX_ACTIVE as usize + 2,
            "at most {processes} × max_active_jobs echo Jobs active, beside 2 slow ones: {peak}"
        );
        assert!(peak >= MAX_ACTIVE as usize, "the capacity was used: {peak}");
        assert_eq!(
            self.double.jobs_created(),
            attempts.made - attempts.lost,
            "one Job per attempt that was not lost ({attempts:?})"
        );
        Ok(())
    }
}

/// Whether some log of `dispatchers` says it took over a gone dispatcher's attempt.
fn took_over(dispatchers: &[&Dispatcher]) -> bool {
    dispatchers.iter().any(|d| {
        d.log_text()
            .contains("taking over an attempt whose dispatcher is gone")
    })
}

/// Two dispatchers share `echo` (`max_active_jobs: 3`); every first attempt of its 64 tasks
/// is evicted, so half the results are published on the Jobs' behalf and retried by
/// whichever recorder takes them. The first dispatcher also runs the two long `slow` tasks,
/// and is SIGKILLed mid-run: the survivor takes over what it claimed (its Jobs followed to
/// their end, its claims without a Job failed as lost and retried). Every task ends once and
/// runs once; at most 3 attempts of `echo` hold a Job at any moment, and the cluster never
/// has more than 2 × 3 of its Jobs active (a Job lingers past its attempt's end while its
/// pod exits; each dispatcher holds its own Jobs to 3 until they end).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_dispatchers_one_killed_run_every_task_once_within_the_shared_capacity()
-> anyhow::Result<()> {
    let w = world("", true).await?;
    let first = w.dispatcher(&[])?;
    let mut ids = w.slow_pair().await?;
    let second = w.dispatcher(&[])?;
    let claims = Claims::watch(&w.env.database_url, "echo").await?;
    ids.extend(w.submit("echo", 64, 1000).await?);
    w.holding(40, &first, &claims).await?;
    first.kill_hard()?;

    w.check(&ids, claims, 2, 2).await?;
    assert!(
        took_over(&[&second]),
        "the survivor took over the killed dispatcher's claims"
    );
    w.producer.close().await;
    w.env.cleanup().await
}

/// A rolling update of two dispatchers, as the Deployment's strategy makes it (`maxSurge:
/// 1`, `maxUnavailable: 0`): a new one starts and is ready, then an old one is stopped
/// (SIGTERM, exit 0), twice, while 48 tasks run. The stopped ones' Jobs, the two long `slow`
/// tasks among them, are taken over by the dispatchers left; every task ends once and runs
/// once, and `max_active_jobs` holds across all four.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rolling_update_of_two_dispatchers_loses_and_duplicates_nothing() -> anyhow::Result<()> {
    let w = world("", false).await?;
    let old_a = w.dispatcher(&[])?;
    let mut ids = w.slow_pair().await?;
    let old_b = w.dispatcher(&[])?;
    let claims = Claims::watch(&w.env.database_url, "echo").await?;
    ids.extend(w.submit("echo", 48, 1000).await?);

    w.holding(12, &old_a, &claims).await?;
    let new_a = w.dispatcher(&[])?;
    assert!(old_a.terminate(Duration::from_secs(60))?.success());
    w.holding(24, &new_a, &claims).await?;
    let new_b = w.dispatcher(&[])?;
    assert!(old_b.terminate(Duration::from_secs(60))?.success());

    w.check(&ids, claims, 2, 3).await?;
    assert!(
        took_over(&[&new_a, &new_b]),
        "the new dispatchers took over the stopped ones' Jobs"
    );
    w.producer.close().await;
    w.env.cleanup().await
}

/// A warm class's `max_active_jobs` holds across two dispatchers: they never run more warm
/// Jobs of it at once than it says, between them (counted per dispatcher, they ran up to
/// twice as many), and every task succeeds on one of them. A dispatcher that has no
/// executor of the class while the other has them all hands its deliveries back after
/// `max_hold`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_dispatchers_never_run_more_warm_jobs_than_max_active_jobs_between_them()
-> anyhow::Result<()> {
    let warm = "    warm: { max_concurrency: 4, max_tasks_per_job: 1000, idle_timeout: 3s, max_job_lifetime: 1h }\n";
    let w = world(warm, false).await?;
    let hold = [("GANTRY_MAX_HOLD", "2s")];
    let _first = w.dispatcher(&hold)?;
    let _second = w.dispatcher(&hold)?;
    let ids = w.submit("echo", 40, 300).await?;
    for id in &ids {
        let record = w.producer.wait(*id, Duration::from_secs(120)).await?;
        assert_eq!(record.state, TaskState::Succeeded, "{:?}", record.error);
    }
    let peak = w.double.peak_active_jobs();
    assert!(
        peak <= MAX_ACTIVE as usize,
        "at most max_active_jobs warm Jobs at once: {peak}"
    );
    assert!(
        w.executions.run_twice()?.is_empty(),
        "no task ran twice: {:?}",
        w.executions.counts()?
    );
    assert_eq!(w.executions.counts()?.len(), ids.len(), "every task ran");
    w.producer.close().await;
    w.env.cleanup().await
}
