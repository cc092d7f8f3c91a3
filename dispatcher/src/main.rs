//! `gantry-dispatcher`: the service binary. See `gantry-dispatcher --help`.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use gantry_dispatcher::Role;
use gantry_dispatcher::settings::{RuntimeKind, Settings};
use gantry_shared::cli::GlobalArgs;
use gantry_shared::config::Config;
use gantry_shared::probe;
use gantry_shared::telemetry;

/// Consumes Gantry tasks from RabbitMQ and runs each as a job; records every result and
/// dead letter in Postgres.
///
/// Configuration comes from defaults, then the YAML file given by --config (or
/// GANTRY_CONFIG; shared settings and a `dispatcher:` section), then GANTRY_* environment
/// variables, then these flags.
#[derive(Debug, Parser)]
#[command(name = "gantry-dispatcher", version, after_help = AFTER_HELP, args_conflicts_with_subcommands = true)]
struct Args {
    #[command(subcommand)]
    command: Option<Command>,
    /// `--config`, `--amqp-url`, `--database-url`, `--prefix`: as every Gantry binary.
    #[command(flatten)]
    global: GlobalArgs,
    /// Where jobs run: `local` runs each as a child process on this machine.
    #[arg(long, value_name = "RUNTIME")]
    runtime: Option<RuntimeKind>,
    /// Roles of this process (repeat or comma-separate): `dispatch`, `record`. Default: both.
    #[arg(long = "role", value_name = "ROLE", value_delimiter = ',')]
    roles: Vec<Role>,
    /// Executor catalog (YAML), reloaded on SIGHUP. Default: the built-in catalog with the
    /// class `echo`, unless dispatcher.catalog_configmap names a ConfigMap to watch.
    #[arg(long, value_name = "FILE")]
    catalog: Option<PathBuf>,
    /// Directory for the local runtime's jobs; one dispatcher per directory.
    #[arg(long, value_name = "DIR")]
    state_dir: Option<PathBuf>,
    /// The gantry-executor program (default: beside this program, else on PATH).
    #[arg(long, value_name = "FILE")]
    executor_bin: Option<PathBuf>,
}

#[derive(Debug, clap::Subcommand)]
enum Command {
    /// Print the Job and Secret a task would get on the kubernetes runtime, as YAML, without
    /// contacting anything (for a warm class: the Job of a warm executor serving it).
    #[command(
        after_help = "Example:\n  gantry-dispatcher render-job --task task.json --catalog catalog.yaml | kubectl apply --dry-run=server -f -"
    )]
    RenderJob {
        /// The task: a `gantry.task/v1` message body (JSON); `-` reads standard input.
        #[arg(long, value_name = "FILE")]
        task: PathBuf,
        /// YAML configuration file (its `dispatcher.kubernetes` section shapes the Job).
        #[arg(long, env = "GANTRY_CONFIG", value_name = "FILE")]
        config: Option<PathBuf>,
        /// Executor catalog (YAML) naming the class's image, GPUs, selector, tolerations.
        #[arg(long, value_name = "FILE")]
        catalog: Option<PathBuf>,
        /// Namespace of the Job (default: dispatcher.kubernetes.namespace, else `default`).
        #[arg(long, value_name = "NAMESPACE")]
        namespace: Option<String>,
    },
    /// Ask this dispatcher's own HTTP endpoint (http_addr, GANTRY_HTTP_ADDR) whether it is
    /// ready (/readyz; with --live, alive: /livez) and exit 0 if so, 1 if not: the image's
    /// HEALTHCHECK, which needs no curl in the image.
    Probe {
        /// Ask /livez (the dispatcher's loops run) instead of /readyz (it takes tasks).
        #[arg(long)]
        live: bool,
        /// YAML configuration file, for its `dispatcher.http_addr`.
        #[arg(long, env = "GANTRY_CONFIG", value_name = "FILE")]
        config: Option<PathBuf>,
    },
}

const AFTER_HELP: &str = "\
Examples:
  gantry-dispatcher --runtime local
  gantry-dispatcher --role record                  # a recorder-only replica
  GANTRY_PREFIX=staging gantry-dispatcher --catalog catalog.yaml

On SIGTERM or Ctrl-C the dispatcher stops consuming, finishes the hand-offs in flight,
and exits 0. Running jobs keep running; the next start adopts them. On SIGHUP it reloads
its catalog file (a catalog ConfigMap is watched instead).

More: docs/configuration.md and docs/architecture.md.";

fn main() -> ExitCode {
    let args = Args::parse();
    if let Some(Command::Probe { live, config }) = &args.command {
        return match probe(config.as_deref(), *live) {
            Ok(answer) => {
                println!("{answer}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("gantry-dispatcher probe: {e:#}");
                ExitCode::FAILURE
            }
        };
    }
    if let Some(Command::RenderJob {
        task,
        config,
        catalog,
        namespace,
    }) = args.command
    {
        return match render(&task, config, catalog, namespace) {
            Ok(yaml) => {
                print!("{yaml}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("gantry-dispatcher render-job: {e:#}");
                ExitCode::from(2)
            }
        };
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("gantry-dispatcher: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(serve(args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = format!("{e:#}"), "gantry-dispatcher failed");
            eprintln!("gantry-dispatcher: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn render(
    task: &std::path::Path,
    config: Option<PathBuf>,
    catalog: Option<PathBuf>,
    namespace: Option<String>,
) -> anyhow::Result<String> {
    let common = Config::load(config.as_deref()).context("loading configuration")?;
    let mut dispatcher = Settings::load(config.as_deref()).context("loading configuration")?;
    if let Some(c) = catalog {
        dispatcher.catalog = Some(c);
    }
    let namespace = namespace
        .or_else(|| dispatcher.kubernetes.namespace.clone())
        .unwrap_or_else(|| "default".into());
    let settings =
        Settings::resolve(common, dispatcher, config).context("loading the executor catalog")?;
    let text = if task.as_os_str() == "-" {
        std::io::read_to_string(std::io::stdin()).context("reading the task from standard input")?
    } else {
        std::fs::read_to_string(task).with_context(|| format!("reading {}", task.display()))?
    };
    let envelope = serde_json::from_str(&text)
        .with_context(|| format!("{} is not a gantry.task/v1 message body", task.display()))?;
    Ok(gantry_dispatcher::render_job(
        &settings,
        envelope,
        &namespace,
        chrono::Utc::now(),
    )?)
}

/// `GET /readyz` (or `/livez`) of the endpoint this configuration serves, on loopback.
fn probe(config: Option<&std::path::Path>, live: bool) -> anyhow::Result<String> {
    let dispatcher = Settings::load(config).context("loading configuration")?;
    let bound = dispatcher.http_addr.0.context(
        "http_addr (GANTRY_HTTP_ADDR) is off: there is no endpoint to probe; set it, e.g. to 0.0.0.0:8380",
    )?;
    let path = if live { "/livez" } else { "/readyz" };
    let addr = probe::target(bound);
    let (status, body) = probe::get(addr, path, Duration::from_secs(3))
        .with_context(|| format!("http://{addr}{path}: no answer"))?;
    anyhow::ensure!(
        status == 200,
        "http://{addr}{path} answered {status}: {body}"
    );
    Ok(body)
}

async fn serve(args: Args) -> anyhow::Result<()> {
    let config_file = args.global.config_file().map(PathBuf::from);
    let common = args.global.load().context("loading configuration")?;
    let traces = telemetry::init_service(
        common.log_format,
        telemetry::SERVICE_FILTER,
        "gantry-dispatcher",
        common.otlp_endpoint.as_deref(),
    );
    let mut dispatcher = Settings::load(config_file.as_deref()).context("loading configuration")?;
    if let Some(v) = args.runtime {
        dispatcher.runtime = v;
    }
    if !args.roles.is_empty() {
        dispatcher.roles = args.roles;
    }
    if let Some(v) = args.catalog {
        dispatcher.catalog = Some(v);
    }
    if let Some(v) = args.state_dir {
        dispatcher.state_dir = v;
    }
    if let Some(v) = args.executor_bin {
        dispatcher.executor_bin = Some(v);
    }
    let settings = Settings::resolve(common, dispatcher, config_file)
        .context("loading the executor catalog")?;
    let served = gantry_dispatcher::run(settings, shutdown_signal()).await;
    traces.shutdown().await;
    served?;
    Ok(())
}

/// Resolves on SIGTERM or SIGINT.
async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(error = %e, "cannot listen for SIGTERM");
            return std::future::pending().await;
        }
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}
