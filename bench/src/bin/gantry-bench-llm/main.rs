//! `gantry-bench-llm`: what Gantry adds to an LLM request. The same chat request goes
//! straight to an OpenAI-compatible model server and through Gantry (submit → dispatcher →
//! a `gantry-executor` process whose `openai` engine asks the same server → result stored
//! in Postgres), at the same concurrency, in the same process.
//!
//! The server is llama.cpp's (llama-cpp-python, on CPU) serving the tests' tiny model
//! (`gantry_tests::llm`); it answers one request at a time and always writes `max_tokens`.
//! The dispatcher runs in this process on the `local` runtime. In rounds, odd rounds direct
//! first, even rounds through Gantry first:
//!
//! - whole answers: `--requests` each way, `--concurrency` at a time;
//! - streamed answers: `--streamed` each way, the time to the first piece of text;
//!
//! then `--server-starts` tasks, one at a time, of a class that starts its own server.
//!
//! What Gantry adds is measured per task: its time from the submit to the result read from
//! Postgres, less the executor's own time for its request to the server (the output's
//! `timings.generation_ms`); for streaming, the first piece received less the executor's
//! `timings.time_to_first_token_ms`. The difference of the medians each way is printed too,
//! but with a server that answers one request at a time it also holds how long requests
//! queued on it, which differs each way. Rounds are pooled: throughput is all requests over
//! all time, percentiles are over all samples.
//!
//! Build the binaries first, in release: `cargo build --release --bins`, then
//! `target/release/gantry-bench-llm`.

mod direct;
mod gantry;
mod sample;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Result, anyhow, ensure};
use clap::Parser;
use gantry_bench::{Cpu, Figures, percentiles};
use gantry_producer::Producer;
use gantry_shared::llm::LlmRequest;
use gantry_tests::TestEnv;
use gantry_tests::llm::{self, LlmServer, MODEL_NAME};
use serde_json::{Value, json};
use tokio::task::JoinSet;

use crate::sample::{STAGE_NAMES, Sample};

/// Measures LLM requests through Gantry against the same requests sent straight to the
/// model server.
#[derive(Debug, Parser)]
struct Args {
    /// Requests per round, each way, for whole answers.
    #[arg(long, default_value_t = 200)]
    requests: usize,
    /// Requests in flight at once, each way (and the class's max_active_jobs).
    #[arg(long, default_value_t = 4)]
    concurrency: usize,
    /// Requests per round, each way, streamed.
    #[arg(long, default_value_t = 50)]
    streamed: usize,
    /// Tasks, one at a time, of a class whose executor starts its own server.
    #[arg(long, default_value_t = 3)]
    server_starts: usize,
    /// Rounds; odd rounds go direct first, even rounds through Gantry first.
    #[arg(long, default_value_t = 2)]
    rounds: usize,
    /// max_tokens of every request (the model always writes that many).
    #[arg(long, default_value_t = 16)]
    max_tokens: u64,
}

/// The class served by the server this benchmark runs.
const SHARED: &str = "chat";
/// The class whose executor starts a server of its own for each task.
const OWN_SERVER: &str = "chat-own-server";

/// One measured batch: every request's sample, how long the batch took, and the CPU time
/// it cost (µs, by process group; the model server is the watched process).
#[derive(Debug, Default)]
struct Run {
    samples: Vec<Sample>,
    elapsed: Duration,
    cpu: Cpu,
}

impl Run {
    /// The runs of every round as one: their samples, and the sum of their durations.
    fn pooled<'a>(runs: impl Iterator<Item = &'a Run>) -> Run {
        runs.fold(Run::default(), |mut all, run| {
            all.samples.extend(&run.samples);
            all.elapsed += run.elapsed;
            all.cpu = Cpu {
                this: all.cpu.this + run.cpu.this,
                watched: all.cpu.watched + run.cpu.watched,
                rabbitmq: all.cpu.rabbitmq + run.cpu.rabbitmq,
                postgres: all.cpu.postgres + run.cpu.postgres,
                other: all.cpu.other + run.cpu.other,
            };
            all
        })
    }

    fn figures(&self, pick: impl Fn(&Sample) -> Option<Duration>) -> Figures {
        let values: Vec<Duration> = self.samples.iter().filter_map(pick).collect();
        Figures::of(self.samples.len(), self.elapsed, values)
    }

    fn latency(&self) -> Figures {
        self.figures(|s| Some(s.latency))
    }

    fn first_token(&self) -> Figures {
        self.figures(|s| s.first_token)
    }
}

/// A round: whole answers and streamed ones, each way.
struct Round {
    direct: Run,
    gantry: Run,
    direct_streamed: Run,
    gantry_streamed: Run,
}

/// What the runs share: the server, the request, the client.
struct Bench {
    port: u16,
    server_pid: u32,
    payload: Value,
    producer: Arc<Producer>,
    concurrency: usize,
    max_tokens: u64,
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    println!(
        "gantry-bench-llm: {} requests ({} streamed) per round each way, {} at a time, \
         max_tokens {}, {} rounds, {} server starts",
        args.requests,
        args.streamed,
        args.concurrency,
        args.max_tokens,
        args.rounds,
        args.server_starts
    );
    // Installs the server and writes the model the first time: not part of its start.
    let argv = tokio::task::spawn_blocking(llm::server_argv).await??;
    let starting = Instant::now();
    let server = LlmServer::start().await?;
    let by_hand = starting.elapsed();
    let catalog = format!(
        "executors:\n  {SHARED}:\n    engine: {{ kind: openai, model: {MODEL_NAME}, endpoint: \"{}\" }}\n    max_active_jobs: {}\n  {OWN_SERVER}:\n    engine: {{ kind: openai, model: {MODEL_NAME}, server: {}, startup_timeout: 120s }}\n    max_active_jobs: 1\n",
        server.base_url(),
        args.concurrency,
        serde_json::to_string(&argv)?
    );
    let env = TestEnv::new(Some(&catalog)).await?;
    let outcome = run(&args, &server, &env).await;
    env.cleanup().await?;
    let (rounds, starts) = outcome?;
    report(&args, &rounds, &starts, by_hand);
    Ok(())
}

async fn run(args: &Args, server: &LlmServer, env: &TestEnv) -> Result<(Vec<Round>, Run)> {
    let dispatcher = env.dispatcher().await?;
    let bench = Bench {
        port: server.port(),
        server_pid: server.pid(),
        payload: json!({
            "messages": [{"role": "user", "content": "hi"}],
            "max_tokens": args.max_tokens,
            "temperature": 0,
        }),
        producer: Arc::new(env.producer().await?),
        concurrency: args.concurrency.max(1),
        max_tokens: args.max_tokens,
    };
    // Warm-up, not measured: the server's first answers, the executor's first start.
    bench.direct(bench.concurrency, false).await?;
    bench.gantry(bench.concurrency, false).await?;

    let mut rounds = Vec::with_capacity(args.rounds);
    for round in 1..=args.rounds.max(1) {
        let gantry_first = round % 2 == 0;
        let (direct, gantry) = bench.both(args.requests, false, gantry_first).await?;
        let (direct_streamed, gantry_streamed) =
            bench.both(args.streamed, true, gantry_first).await?;
        println!(
            "round {round} ({} first): direct {:.1} req/s, gantry {:.1} req/s, ratio {:.2}; \
             first token p50 direct {:.0} ms, gantry {:.0} ms",
            if gantry_first { "gantry" } else { "direct" },
            direct.latency().per_second,
            gantry.latency().per_second,
            gantry.latency().per_second / direct.latency().per_second,
            ms(direct_streamed.first_token().p50),
            ms(gantry_streamed.first_token().p50),
        );
        rounds.push(Round {
            direct,
            gantry,
            direct_streamed,
            gantry_streamed,
        });
    }

    let mut starts = Run::default();
    let began = Instant::now();
    for _ in 0..args.server_starts {
        let sample = gantry::ask(&bench.producer, OWN_SERVER, bench.payload.clone(), false).await?;
        bench.check(&[sample])?;
        starts.samples.push(sample);
    }
    starts.elapsed = began.elapsed();

    bench.producer.close().await;
    dispatcher.stop().await?;
    Ok((rounds, starts))
}

impl Bench {
    /// `n` requests each way, direct first or through Gantry first.
    async fn both(&self, n: usize, stream: bool, gantry_first: bool) -> Result<(Run, Run)> {
        if gantry_first {
            let gantry = self.gantry(n, stream).await?;
            Ok((self.direct(n, stream).await?, gantry))
        } else {
            let direct = self.direct(n, stream).await?;
            Ok((direct, self.gantry(n, stream).await?))
        }
    }

    /// `n` requests straight to the server, with the body the executor would send.
    async fn direct(&self, n: usize, stream: bool) -> Result<Run> {
        let request = LlmRequest::from_payload(&self.payload, MODEL_NAME)
            .map_err(|e| anyhow!("the benchmark's payload: {e}"))?;
        let body = Arc::new(serde_json::to_vec(&request.body(MODEL_NAME, stream))?);
        let (port, path) = (self.port, request.kind().path());
        let run = self
            .at_concurrency(n, move || {
                let body = body.clone();
                async move { direct::post(port, path, &body, stream).await }
            })
            .await?;
        self.check(&run.samples)?;
        Ok(run)
    }

    /// `n` tasks of the class served by the same server.
    async fn gantry(&self, n: usize, stream: bool) -> Result<Run> {
        let (producer, payload) = (self.producer.clone(), self.payload.clone());
        let run = self
            .at_concurrency(n, move || {
                let (producer, payload) = (producer.clone(), payload.clone());
                async move { gantry::ask(&producer, SHARED, payload, stream).await }
            })
            .await?;
        self.check(&run.samples)?;
        Ok(run)
    }

    /// Runs `n` calls of `work`, `concurrency` at a time (each worker starts its next call
    /// when its last one is done), and times the whole.
    async fn at_concurrency<F, Fut>(&self, n: usize, work: F) -> Result<Run>
    where
        F: Fn() -> Fut + Clone + Send + 'static,
        Fut: Future<Output = Result<Sample>> + Send + 'static,
    {
        let left = Arc::new(AtomicUsize::new(n));
        let cpu = Cpu::watching(Some(self.server_pid));
        let start = Instant::now();
        let mut workers = JoinSet::new();
        for _ in 0..self.concurrency {
            let (left, work) = (left.clone(), work.clone());
            workers.spawn(async move {
                let mut samples = Vec::new();
                while left
                    .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |l| l.checked_sub(1))
                    .is_ok()
                {
                    samples.push(work().await?);
                }
                anyhow::Ok(samples)
            });
        }
        let mut samples = Vec::with_capacity(n);
        while let Some(worker) = workers.join_next().await {
            samples.extend(worker??);
        }
        Ok(Run {
            samples,
            elapsed: start.elapsed(),
            cpu: Cpu::watching(Some(self.server_pid)).per_message(cpu, 1),
        })
    }

    /// Every answer is `max_tokens` long (the model never stops by itself), so each way
    /// did the same work.
    fn check(&self, samples: &[Sample]) -> Result<()> {
        for s in samples {
            ensure!(
                s.completion_tokens == self.max_tokens,
                "an answer of {} tokens, not {}",
                s.completion_tokens,
                self.max_tokens
            );
        }
        Ok(())
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// One line: name, p50 and p99 of `values`.
fn print_spread(name: &str, values: Vec<Duration>) {
    let (p50, p99) = percentiles(values);
    println!(
        "{name:<55} {:>12}   p50 {:>9.2} ms   p99 {:>9.2} ms",
        "",
        ms(p50),
        ms(p99)
    );
}

/// What a Gantry sample adds to the executor's own measure at the server, `at_server`.
fn added(run: &Run, at_server: impl Fn(&Sample) -> Option<(Duration, Duration)>) -> Vec<Duration> {
    run.samples
        .iter()
        .filter_map(at_server)
        .map(|(whole, server)| whole.saturating_sub(server))
        .collect()
}

fn report(args: &Args, rounds: &[Round], starts: &Run, by_hand: Duration) {
    let pool = |pick: fn(&Round) -> &Run| Run::pooled(rounds.iter().map(pick));
    let (direct, gantry) = (pool(|r| &r.direct), pool(|r| &r.gantry));
    let (direct_streamed, gantry_streamed) =
        (pool(|r| &r.direct_streamed), pool(|r| &r.gantry_streamed));
    let rounds_said = format!("{} rounds pooled", rounds.len());

    println!(
        "\nwhole answers ({} requests each way, {} at a time, {rounds_said}):",
        direct.samples.len(),
        args.concurrency
    );
    let (d, g) = (direct.latency(), gantry.latency());
    d.print("direct: POST /v1/chat/completions → answer");
    g.print("gantry: submit → result stored in Postgres");
    print_spread(
        "  the server's time in gantry's (generation_ms)",
        gantry
            .samples
            .iter()
            .filter_map(|s| s.executor.map(|t| t.generation))
            .collect(),
    );
    print_spread(
        "added per task: end to end − generation_ms",
        added(&gantry, |s| s.executor.map(|t| (s.latency, t.generation))),
    );
    for (i, name) in STAGE_NAMES.iter().enumerate() {
        print_spread(
            name,
            gantry
                .samples
                .iter()
                .filter_map(|s| Some(s.stages?[i]))
                .collect(),
        );
    }
    println!(
        "ratio gantry/direct throughput: {:.2}",
        g.per_second / d.per_second
    );
    println!(
        "gantry − direct latency: p50 {:+.2} ms, p99 {:+.2} ms",
        ms(g.p50) - ms(d.p50),
        ms(g.p99) - ms(d.p99)
    );

    println!(
        "\nstreamed, time to first token ({} requests each way, {} at a time, {rounds_said}):",
        direct_streamed.samples.len(),
        args.concurrency
    );
    let (d, g) = (direct_streamed.first_token(), gantry_streamed.first_token());
    d.print("direct: POST (stream) → first piece of text");
    g.print("gantry: submit_streaming → first Progress");
    print_spread(
        "  the server's in gantry's (time_to_first_token_ms)",
        gantry_streamed
            .samples
            .iter()
            .filter_map(|s| s.executor.and_then(|t| t.first_token))
            .collect(),
    );
    print_spread(
        "added per task: first Progress − time_to_first_token_ms",
        added(&gantry_streamed, |s| {
            Some((s.first_token?, s.executor?.first_token?))
        }),
    );
    println!(
        "gantry − direct first token: p50 {:+.2} ms, p99 {:+.2} ms",
        ms(g.p50) - ms(d.p50),
        ms(g.p99) - ms(d.p99)
    );
    print_spread(
        "gantry streamed: submit → stream finished",
        gantry_streamed.samples.iter().map(|s| s.latency).collect(),
    );

    println!(
        "\nCPU per request (ms): this process (the client, the dispatcher, its executors), \
         the model server, RabbitMQ, Postgres, the rest of the machine"
    );
    for (name, run) in [
        ("whole answers, direct", &direct),
        ("whole answers, gantry", &gantry),
        ("streamed, direct", &direct_streamed),
        ("streamed, gantry", &gantry_streamed),
    ] {
        let c = run.cpu.per_message(Cpu::default(), run.samples.len());
        println!(
            "  {name:<24} {:>7.2} {:>7.2} {:>7.2} {:>7.2} {:>7.2}",
            c.this / 1e3,
            c.watched / 1e3,
            c.rabbitmq / 1e3,
            c.postgres / 1e3,
            c.other / 1e3
        );
    }
    println!(
        "\nserver start ({} tasks one at a time, each executor starting its own server):",
        starts.samples.len()
    );
    for (i, s) in starts.samples.iter().enumerate() {
        if let Some(t) = s.executor {
            println!(
                "  task {}: server_start_ms {:>6.0}, generation_ms {:>5.0}, end to end {:>6.0} ms, \
                 the rest {:>4.0} ms",
                i + 1,
                ms(t.server_start),
                ms(t.generation),
                ms(s.latency),
                ms(s.latency
                    .saturating_sub(t.server_start)
                    .saturating_sub(t.generation))
            );
        }
    }
    println!(
        "  the same server started by this process (spawn → GET /v1/models answers): {:.0} ms",
        ms(by_hand)
    );
}
