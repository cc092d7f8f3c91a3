//! `gantry-registry`: the executor registry service binary. See `gantry-registry --help`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use gantry_registry::{Settings, Source};
use gantry_shared::{probe, telemetry};

/// Watches container registries for executor images and serves the dispatcher a catalog
/// of them, each pinned to its digest.
///
/// For every repository <namespace>/executor-<class> of an allowed registry and namespace
/// (a source), the newest release tag (1.4.2, v2) whose image carries the required labels
/// becomes the class's image, as repository@sha256:…. Images without the labels or outside
/// the sources are refused, with the reason in the log and the audit log.
///
/// Settings come from defaults, then the YAML file given by --config (or
/// GANTRY_REGISTRY_CONFIG), then GANTRY_REGISTRY_* environment variables, then these flags.
#[derive(Debug, Parser)]
#[command(name = "gantry-registry", version, after_help = AFTER_HELP)]
struct Args {
    /// YAML settings file of this service (its own; not the shared GANTRY_CONFIG file)
    #[arg(long, env = "GANTRY_REGISTRY_CONFIG", value_name = "FILE")]
    config: Option<PathBuf>,
    /// Address to serve on; overrides GANTRY_REGISTRY_LISTEN [default: 0.0.0.0:8080]
    #[arg(long, value_name = "ADDR")]
    listen: Option<SocketAddr>,
    /// A registry and namespace to watch: https://[user:password@]host[:port][/namespace].
    /// Repeat for more, first wins per class; replaces GANTRY_REGISTRY_SOURCES. Put
    /// passwords in the environment or the file rather than on a command line.
    #[arg(long = "source", value_name = "URL", value_parser = Source::parse)]
    sources: Vec<Source>,
    /// Refresh once, print the catalog and the refusals as JSON, and exit (1 if a registry
    /// could not be read): to check a registry and its images' labels by hand.
    #[arg(long, conflicts_with = "probe")]
    once: bool,
    /// Ask the service this configuration runs (GET /health on its listen address, over
    /// loopback) whether it serves a catalog; exit 0 if so (ok or degraded), 1 if not
    /// (starting, or no answer). The image's HEALTHCHECK, which needs no curl in the image.
    #[arg(long)]
    probe: bool,
}

const AFTER_HELP: &str = "\
Endpoints:
  GET  /executors/{class}    the class's image and capabilities; 404 if it has none
  GET  /executors            every class, and the images refused with their reasons
  POST /executors/refresh    refresh now; answers what was added, changed, removed
  GET  /health               ok | degraded (a registry unreadable: the last catalog is
                             served) | starting (503 until every registry was listed once)

Labels of an executor image (docs/registry.md):
  dev.gantry.executor.tasks   required  task names it handles, comma-separated
  dev.gantry.executor.owner   required  the team or address that answers for it
  dev.gantry.executor.gpu     optional  GPUs one task needs (default 0)
  dev.gantry.executor.model   optional  the model it serves
  dev.gantry.executor.class   optional  must be the class its repository names

Settings (file key, environment variable, default):
  listen            GANTRY_REGISTRY_LISTEN             0.0.0.0:8080
  sources           GANTRY_REGISTRY_SOURCES            (required; comma-separated URLs)
  classes           GANTRY_REGISTRY_CLASSES            (none: list each registry) classes
                                                       read by name, for registries that
                                                       do not serve /v2/_catalog
  refresh_interval  GANTRY_REGISTRY_REFRESH_INTERVAL   1m
  cache_ttl         GANTRY_REGISTRY_CACHE_TTL          1h   what was read per digest
  request_timeout   GANTRY_REGISTRY_TIMEOUT            10s  per registry request
  max_tags          GANTRY_REGISTRY_MAX_TAGS           20   release tags tried, newest first
  audit_log         GANTRY_REGISTRY_AUDIT_LOG          -    a file, or - for standard output
  log_format        GANTRY_LOG_FORMAT                  text

Examples:
  GANTRY_REGISTRY_SOURCES=https://registry.example.com/ml gantry-registry
  gantry-registry --once --source http://127.0.0.1:5000/team
  curl -X POST http://gantry-registry:8080/executors/refresh
  gantry-registry --probe     # exit 0 when GET /health says ok or degraded

The dispatcher uses it with GANTRY_EXECUTOR_REGISTRY=http://gantry-registry:8080.
On SIGTERM or Ctrl-C it stops accepting connections, lets the answers in flight finish,
and exits 0. More: docs/registry.md.";

fn main() -> ExitCode {
    let args = Args::parse();
    if args.probe {
        return match probe(&args) {
            Ok(answer) => {
                println!("{answer}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("gantry-registry --probe: {e:#}");
                ExitCode::FAILURE
            }
        };
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("gantry-registry: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(serve(args)) {
        Ok(code) => code,
        Err(e) => {
            tracing::error!(error = format!("{e:#}"), "gantry-registry failed");
            eprintln!("gantry-registry: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// `GET /health` of the service these settings describe.
fn probe(args: &Args) -> anyhow::Result<String> {
    let file = args.config.as_deref().filter(|p| !p.as_os_str().is_empty());
    let settings = Settings::load(file).context("loading settings")?;
    let addr = probe::target(args.listen.unwrap_or(settings.listen));
    let (status, body) = probe::get(addr, "/health", Duration::from_secs(3))
        .with_context(|| format!("http://{addr}/health: no answer"))?;
    anyhow::ensure!(
        status == 200,
        "http://{addr}/health answered {status}: {body}"
    );
    Ok(body)
}

async fn serve(args: Args) -> anyhow::Result<ExitCode> {
    let file = args.config.filter(|p| !p.as_os_str().is_empty());
    let mut settings = Settings::load(file.as_deref()).context("loading settings")?;
    telemetry::init_with_default(settings.log_format, "info");
    if let Some(v) = args.listen {
        settings.listen = v;
    }
    if !args.sources.is_empty() {
        settings.sources = args.sources;
    }
    if args.once {
        // Standard output is the catalog's: no audit lines in it.
        settings.audit_log = String::new();
        let (catalog, complete) = gantry_registry::once(settings).await?;
        println!("{}", serde_json::to_string_pretty(&catalog)?);
        return Ok(if complete {
            ExitCode::SUCCESS
        } else {
            ExitCode::FAILURE
        });
    }
    gantry_registry::run(settings, shutdown_signal()).await?;
    Ok(ExitCode::SUCCESS)
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
