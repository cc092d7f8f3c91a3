//! Tests against the RabbitMQ on this machine (`GANTRY_AMQP_URL`, default
//! `amqp://guest:guest@127.0.0.1:5672/%2f`; `scripts/setup.sh` starts it). Each test declares
//! its own topology under a unique prefix and deletes it afterwards.

use std::future::pending;
use std::path::Path;
use std::time::Duration;

use clap::Parser;
use gantry_shared::amqp;
use gantry_shared::config::{self, Config};
use gantry_shared::message::{ExecutorClass, FieldTableExt, ResultStatus, TaskResult, headers};
use gantry_shared::topology::{QueueSettings, Topology};
use lapin::options::{
    BasicGetOptions, ExchangeDeclareOptions, ExchangeDeleteOptions, QueueDeleteOptions,
};
use lapin::types::FieldTable;
use lapin::{Channel, Connection, ExchangeKind};
use serde_json::{Value, json};

use crate::cli::Args;
use crate::engine::test_support::task;
use crate::run::{Outcome, Settings, run};

const TIMEOUT: Duration = Duration::from_secs(10);

/// The configuration of a test: the local broker and a fresh prefix.
fn test_config() -> Config {
    Config {
        amqp_url: config::env("GANTRY_AMQP_URL")
            .unwrap_or_else(|| config::DEFAULT_AMQP_URL.into())
            .into(),
        prefix: format!("t-{}", uuid::Uuid::new_v4().simple()),
        broker_timeout: TIMEOUT,
        ..Config::default()
    }
}

async fn open(config: &Config) -> (Connection, Channel) {
    let conn = amqp::connect(&config.amqp_url, "gantry-executor tests", TIMEOUT)
        .await
        .unwrap_or_else(|e| {
            panic!("these tests need RabbitMQ ({e}); start it with `bash scripts/setup.sh`")
        });
    let channel = conn.create_channel().await.unwrap();
    (conn, channel)
}

/// Settings parsed from flags, as the binary would see them, for a task file in `dir`.
fn settings_from_flags(dir: &Path, extra: &[&str]) -> Settings {
    let dir_arg = dir.display().to_string();
    let task_file = dir.join("task.json").display().to_string();
    let termination_log = dir.join("termination-log").display().to_string();
    let mut argv = vec![
        "gantry-executor",
        "--engine",
        "echo",
        "--task-file",
        &task_file,
        "--job-dir",
        &dir_arg,
        "--termination-log",
        &termination_log,
    ];
    argv.extend_from_slice(extra);
    Args::try_parse_from(argv).unwrap().into_settings().unwrap()
}

fn read_json(path: &Path) -> Value {
    serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap()
}

#[tokio::test]
async fn an_echo_result_reaches_the_results_queue() {
    let config = test_config();
    let topology = Topology::new(&config.prefix).unwrap();
    let class = ExecutorClass::parse("echo").unwrap();
    let (_conn, channel) = open(&config).await;
    topology
        .apply(
            &channel,
            std::slice::from_ref(&class),
            &QueueSettings::default(),
        )
        .await
        .unwrap();

    let (results, queue) = (channel.clone(), topology.results_queue());
    let scenario = async move {
        let dir = tempfile::tempdir().unwrap();
        let payload = json!({"prompt": "hello", "stderr": "echo engine says hi"});
        let task = task(payload.clone());
        std::fs::write(
            dir.path().join("task.json"),
            serde_json::to_vec(&task).unwrap(),
        )
        .unwrap();
        let trace = gantry_shared::message::traceparent::generate();
        let settings = settings_from_flags(
            dir.path(),
            &[
                "--job-name",
                "gantry-test-a1",
                "--dispatch-id",
                "d-1",
                "--traceparent",
                &trace,
            ],
        );

        let outcome = run(&settings, &config, pending()).await;
        assert!(matches!(outcome, Outcome::Published(_)), "{outcome:?}");
        assert_eq!(outcome.exit_code(), 0);

        let message = results
            .basic_get(queue.into(), BasicGetOptions { no_ack: true })
            .await
            .unwrap()
            .expect("the result is in the results queue");
        let props = &message.delivery.properties;
        let result = TaskResult::from_amqp(props, &message.delivery.data).unwrap();
        assert_eq!(result.task_id, task.task_id);
        assert_eq!(result.status, ResultStatus::Succeeded);
        assert_eq!(result.output, Some(payload));
        assert_eq!(result.error, None);
        assert_eq!(result.attempt.get(), 1);
        assert_eq!(
            result.reported_by,
            gantry_shared::message::ReportedBy::Executor
        );
        assert_eq!(result.evidence.job_name.as_deref(), Some("gantry-test-a1"));
        assert_eq!(result.evidence.dispatch_id.as_deref(), Some("d-1"));
        assert_eq!(
            result.evidence.terminal_reason.as_deref(),
            Some("completed")
        );
        assert!(result.started_at.is_some_and(|s| s <= result.finished_at));
        assert_eq!(
            props.correlation_id().as_ref().map(|c| c.to_string()),
            Some(task.task_id.to_string())
        );
        let table = props.headers().clone().unwrap_or_default();
        assert_eq!(table.get_str(headers::TRACEPARENT), Some(trace.as_str()));
        assert_eq!(message.delivery.routing_key.as_str(), "echo");

        let exit = read_json(&dir.path().join("exit.json"));
        assert_eq!(exit["published"], true);
        assert_eq!(exit["status"], "succeeded");
        assert!(dir.path().join("started").exists());
        let termination = std::fs::read_to_string(dir.path().join("termination-log")).unwrap();
        assert_eq!(serde_json::from_str::<Value>(&termination).unwrap(), exit);
    };
    let finished = tokio::spawn(scenario).await;
    delete_topology(&channel, &topology, &class).await;
    if let Err(panic) = finished {
        std::panic::resume_unwind(panic.into_panic());
    }
}

#[tokio::test]
async fn a_result_no_queue_takes_is_not_published_and_exits_3() {
    let config = test_config();
    let topology = Topology::new(&config.prefix).unwrap();
    let (_conn, channel) = open(&config).await;
    let exchange = topology.results_exchange();
    channel
        .exchange_declare(
            exchange.as_str().into(),
            ExchangeKind::Fanout,
            ExchangeDeclareOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();

    let scenario = async move {
        let dir = tempfile::tempdir().unwrap();
        let body = serde_json::to_vec(&task(json!({"fail": "nope"}))).unwrap();
        std::fs::write(dir.path().join("task.json"), body).unwrap();
        let settings = settings_from_flags(dir.path(), &[]);
        let outcome = run(&settings, &config, pending()).await;
        let Outcome::NotPublished { result, error } = &outcome else {
            panic!("expected NotPublished, got {outcome:?}");
        };
        assert_eq!(result.status, ResultStatus::Failed);
        assert!(error.contains("no queue is bound"), "{error}");
        assert_eq!(outcome.exit_code(), 3);
        let exit = read_json(&dir.path().join("exit.json"));
        assert_eq!(exit["published"], false);
        assert_eq!(exit["status"], "failed");
        assert!(
            exit["error"]
                .as_str()
                .unwrap()
                .contains("no queue is bound")
        );
    };
    let finished = tokio::spawn(scenario).await;
    let _ = channel
        .exchange_delete(exchange.as_str().into(), ExchangeDeleteOptions::default())
        .await;
    if let Err(panic) = finished {
        std::panic::resume_unwind(panic.into_panic());
    }
}

/// Deletes every queue and exchange `Topology::apply` declared for `class`.
async fn delete_topology(channel: &Channel, topology: &Topology, class: &ExecutorClass) {
    let mut queues = vec![
        topology.task_queue(class),
        topology.results_queue(),
        topology.dead_queue(),
        topology.dead_audit_queue(),
    ];
    queues.extend(
        QueueSettings::default()
            .retry_delays
            .iter()
            .map(|d| topology.retry_queue(*d)),
    );
    for queue in queues {
        if let Err(e) = channel
            .queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
            .await
        {
            eprintln!("cannot delete queue {queue}: {e}");
        }
    }
    for exchange in [
        topology.tasks_exchange(),
        topology.retry_exchange(),
        topology.results_exchange(),
        topology.dlx(),
    ] {
        if let Err(e) = channel
            .exchange_delete(exchange.as_str().into(), ExchangeDeleteOptions::default())
            .await
        {
            eprintln!("cannot delete exchange {exchange}: {e}");
        }
    }
}
