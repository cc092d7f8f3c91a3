//! The real OpenAI-compatible model server the tests and the benchmark of the `openai`
//! engine run against: the server of llama-cpp-python, on CPU, serving a tiny llama model
//! with random weights that `tests/llm/make_model.py` writes.
//!
//! - [`python`]: the Python of the venv that has the server (`scripts/llm-server.sh`
//!   installs it the first time: it compiles llama.cpp, 10 to 20 minutes).
//! - [`tiny_model`]: the model file, written once into `$HOME/.cache/gantry`.
//! - [`server_argv`]: the server's command as a catalog holds it, `{port}` and `{model}`
//!   left for the executor to fill.
//! - [`LlmServer`]: the server started on a free port, ready, killed when dropped.
//!
//! The model's text means nothing but is deterministic: greedy decoding gives the same
//! text for the same request, it never ends a completion by itself (a completion runs to
//! `max_tokens`, finish_reason "length", or to a stop sequence), and it only writes
//! printable ASCII.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;

use crate::venv::{cache_dir, workspace};

/// The name the tests serve the tiny model under (`--model_alias`, the catalog's `{model}`).
pub const MODEL_NAME: &str = "tiny";

/// Longest [`LlmServer::start`] waits for the server to answer: it imports its Python
/// packages and loads the model, a few seconds on an idle machine.
const READY_PATIENCE: Duration = Duration::from_secs(90);

/// Longest one request to the server may take: a full context of the tiny model is well
/// under a second of work.
const REQUEST_PATIENCE: Duration = Duration::from_secs(60);

/// The Python that runs the model server: `GANTRY_LLM_PYTHON` if set, else the venv of
/// `scripts/llm-server.sh` (run once per test process; the first run on a machine installs
/// the server and takes 10 to 20 minutes, and its progress goes to stderr).
///
/// # Errors
/// The script fails (its output says why), or `HOME` is not set.
pub fn python() -> Result<PathBuf> {
    static PYTHON: OnceLock<std::result::Result<PathBuf, String>> = OnceLock::new();
    PYTHON
        .get_or_init(|| find_python().map_err(|e| format!("{e:#}")))
        .clone()
        .map_err(|e| anyhow!(e))
}

fn find_python() -> Result<PathBuf> {
    crate::venv::python_of(
        "scripts/llm-server.sh",
        "GANTRY_LLM_PYTHON",
        "has llama-cpp-python[server] and gguf",
    )
}

/// The tiny model's GGUF file, written by `tests/llm/make_model.py` the first time into
/// `$HOME/.cache/gantry/tiny-llama-<hash of the script>.gguf` (through a temporary file
/// renamed into place, so processes that write it at once do no harm).
///
/// # Errors
/// No [`python`], or the script fails (its stderr is in the error).
pub fn tiny_model() -> Result<PathBuf> {
    static MODEL: OnceLock<std::result::Result<PathBuf, String>> = OnceLock::new();
    MODEL
        .get_or_init(|| make_tiny_model().map_err(|e| format!("{e:#}")))
        .clone()
        .map_err(|e| anyhow!(e))
}

fn make_tiny_model() -> Result<PathBuf> {
    let script = workspace().join("tests/llm/make_model.py");
    let source = std::fs::read(&script).with_context(|| format!("reading {}", script.display()))?;
    let dir = cache_dir()?;
    let path = dir.join(format!("tiny-llama-{:016x}.gguf", fnv1a(&source)));
    if path.is_file() {
        return Ok(path);
    }
    let python = python()?;
    let partial = tempfile::Builder::new()
        .prefix(".tiny-llama-")
        .suffix(".gguf")
        .tempfile_in(&dir)
        .with_context(|| format!("creating a file in {}", dir.display()))?;
    let out = Command::new(&python)
        .arg(&script)
        .arg(partial.path())
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running {}", python.display()))?;
    if !out.status.success() {
        bail!(
            "{} {} failed ({}); is the venv complete? (bash scripts/llm-server.sh)\n{}",
            python.display(),
            script.display(),
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    // Readable by whoever runs the server, as a model file usually is.
    partial
        .as_file()
        .set_permissions(std::fs::Permissions::from_mode(0o644))?;
    partial
        .persist(&path)
        .with_context(|| format!("moving the model to {}", path.display()))?;
    Ok(path)
}

/// The model server's command as the catalog holds it: `{port}` and `{model}` are left for
/// the executor to fill (the tests serve the model as [`MODEL_NAME`]).
///
/// # Errors
/// No [`python`] or no [`tiny_model`].
pub fn server_argv() -> Result<Vec<String>> {
    let python = python()?;
    let model = tiny_model()?;
    Ok([
        python.to_string_lossy().as_ref(),
        "-m",
        "llama_cpp.server",
        "--model",
        model.to_string_lossy().as_ref(),
        "--model_alias",
        "{model}",
        "--host",
        "127.0.0.1",
        "--port",
        "{port}",
        "--n_ctx",
        "512",
        "--interrupt_requests",
        "False",
    ]
    .map(str::to_owned)
    .to_vec())
}

/// A model server process serving the tiny model as [`MODEL_NAME`] on a free port of
/// 127.0.0.1, in a process group of its own; dropping it kills the group.
pub struct LlmServer {
    child: Child,
    port: u16,
    log: tempfile::NamedTempFile,
}

impl LlmServer {
    /// Starts the server and waits until it answers `GET /v1/models`.
    ///
    /// # Errors
    /// No [`python`] or [`tiny_model`], or the server exits or does not answer within 90
    /// seconds (the tail of its log is in the error).
    pub async fn start() -> Result<LlmServer> {
        let argv = tokio::task::spawn_blocking(server_argv).await??;
        let port = free_port()?;
        let argv: Vec<String> = argv
            .iter()
            .map(|a| {
                a.replace("{port}", &port.to_string())
                    .replace("{model}", MODEL_NAME)
            })
            .collect();
        let log = tempfile::Builder::new()
            .prefix("gantry-llm-server-")
            .suffix(".log")
            .tempfile()?;
        let child = Command::new(&argv[0])
            .args(&argv[1..])
            .process_group(0)
            .stdin(Stdio::null())
            .stdout(log.reopen()?)
            .stderr(log.reopen()?)
            .spawn()
            .with_context(|| format!("starting {}", argv.join(" ")))?;
        let mut server = LlmServer { child, port, log };
        let start = Instant::now();
        loop {
            if let Some(status) = server.child.try_wait()? {
                bail!(
                    "the model server exited ({status}) before it answered:\n{}",
                    server.log_tail()
                );
            }
            if let Ok(r) = server.get("/v1/models").await
                && r.status == 200
            {
                return Ok(server);
            }
            if start.elapsed() > READY_PATIENCE {
                bail!(
                    "the model server did not answer GET /v1/models within \
                     {READY_PATIENCE:?}:\n{}",
                    server.log_tail()
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// `http://127.0.0.1:PORT`, without a trailing slash.
    pub fn base_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// The server's process id, which is also its process group's.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// What the server wrote to stdout and stderr so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(self.log.path()).unwrap_or_default()
    }

    fn log_tail(&self) -> String {
        let text = self.log_text();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    }

    /// `GET path` (e.g. `/v1/models`).
    ///
    /// # Errors
    /// The server cannot be reached, or its answer is not HTTP.
    pub async fn get(&self, path: &str) -> Result<HttpResponse> {
        let (port, path) = (self.port, path.to_owned());
        tokio::task::spawn_blocking(move || http(port, "GET", &path, None)).await?
    }

    /// `POST path` with a JSON body (e.g. `/v1/chat/completions`).
    ///
    /// # Errors
    /// The server cannot be reached, or its answer is not HTTP.
    pub async fn post_json(&self, path: &str, body: &serde_json::Value) -> Result<HttpResponse> {
        let (port, path, body) = (self.port, path.to_owned(), serde_json::to_vec(body)?);
        tokio::task::spawn_blocking(move || http(port, "POST", &path, Some(&body))).await?
    }
}

impl Drop for LlmServer {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = killpg(Pid::from_raw(self.child.id() as i32), Signal::SIGKILL);
            let _ = self.child.wait();
        }
    }
}

/// An answer of the model server: its status and its body (chunks joined, so a stream's
/// body is its `data: ...` lines).
#[derive(Debug)]
pub struct HttpResponse {
    pub status: u16,
    pub body: String,
}

impl HttpResponse {
    /// The body as JSON.
    ///
    /// # Errors
    /// The body is not JSON.
    pub fn json(&self) -> Result<serde_json::Value> {
        serde_json::from_str(&self.body)
            .with_context(|| format!("a body that is not JSON ({}): {}", self.status, self.body))
    }
}

/// One HTTP/1.1 request to 127.0.0.1:`port` on a connection of its own, read to its end.
fn http(port: u16, method: &str, path: &str, body: Option<&[u8]>) -> Result<HttpResponse> {
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let mut conn = TcpStream::connect_timeout(&addr, REQUEST_PATIENCE)?;
    conn.set_read_timeout(Some(REQUEST_PATIENCE))?;
    conn.set_write_timeout(Some(REQUEST_PATIENCE))?;
    let mut head =
        format!("{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n");
    if let Some(body) = body {
        head.push_str(&format!(
            "Content-Type: application/json\r\nContent-Length: {}\r\n",
            body.len()
        ));
    }
    head.push_str("\r\n");
    conn.write_all(head.as_bytes())?;
    conn.write_all(body.unwrap_or_default())?;
    let mut raw = Vec::new();
    conn.read_to_end(&mut raw)
        .with_context(|| format!("reading the answer to {method} {path}"))?;

    let end = find(&raw, b"\r\n\r\n").context("an answer without the end of its headers")?;
    let head = String::from_utf8_lossy(&raw[..end]);
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .with_context(|| format!("an answer without a status: {head}"))?;
    let chunked = head.lines().any(|l| {
        let l = l.to_ascii_lowercase();
        l.starts_with("transfer-encoding:") && l.contains("chunked")
    });
    let body = &raw[end + 4..];
    let body = if chunked {
        dechunk(body)?
    } else {
        body.to_vec()
    };
    Ok(HttpResponse {
        status,
        body: String::from_utf8(body).context("a body that is not UTF-8")?,
    })
}

/// The data of a chunked body.
fn dechunk(mut rest: &[u8]) -> Result<Vec<u8>> {
    let mut data = Vec::new();
    loop {
        let line = find(rest, b"\r\n").context("a chunked body cut short")?;
        let size = std::str::from_utf8(&rest[..line])?;
        let size = size.split(';').next().unwrap_or_default().trim();
        let size =
            usize::from_str_radix(size, 16).with_context(|| format!("chunk size {size:?}"))?;
        rest = &rest[line + 2..];
        if size == 0 {
            return Ok(data);
        }
        data.extend_from_slice(rest.get(..size).context("a chunk cut short")?);
        rest = rest.get(size + 2..).context("a chunk cut short")?;
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// A port nobody listens on now (the server binds it a moment later).
fn free_port() -> Result<u16> {
    Ok(TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?
        .local_addr()?
        .port())
}

/// FNV-1a, 64 bits: a name for the model that changes with its script, the same in every
/// build.
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

#[cfg(test)]
mod tests {
    use super::dechunk;

    #[test]
    fn chunked_bodies_are_joined() -> anyhow::Result<()> {
        let body = b"5\r\nhello\r\n7;x=y\r\n, world\r\n0\r\n\r\n";
        assert_eq!(dechunk(body)?, b"hello, world");
        assert!(dechunk(b"5\r\nhel").is_err());
        Ok(())
    }
}
