//! What the dispatcher shows of itself over HTTP, as a test reads it: its address from its
//! log ([`Dispatcher::http_addr`]), one request ([`get`]), and a real Prometheus server
//! scraping it ([`Prometheus`]), queried through its HTTP API.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde_json::Value;

use crate::dispatchers::Dispatcher;

/// What the dispatcher logs once it serves HTTP, before the address.
const SERVING: &str = "serving /livez, /readyz and /metrics";

impl Dispatcher {
    /// The address the dispatcher serves `/livez`, `/readyz` and `/metrics` on, from its log.
    ///
    /// # Errors
    /// The log does not say it (HTTP turned off).
    pub fn http_addr(&self) -> Result<SocketAddr> {
        http_addr_in(&self.log_text()).context("the dispatcher's log names no HTTP address")
    }
}

/// The address in a dispatcher's log line `serving /livez, /readyz and /metrics addr=…`.
pub fn http_addr_in(log: &str) -> Option<SocketAddr> {
    let line = log.lines().find(|l| l.contains(SERVING))?;
    let (_, rest) = line.split_once("addr=")?;
    rest.split_whitespace().next()?.parse().ok()
}

/// `GET path` from `addr` over HTTP/1.0: the status code and the body.
///
/// # Errors
/// No connection, or an answer that is not HTTP.
pub async fn get(addr: SocketAddr, path: &str) -> Result<(u16, String)> {
    let path = path.to_owned();
    tokio::task::spawn_blocking(move || get_blocking(addr, &path)).await?
}

fn get_blocking(addr: SocketAddr, path: &str) -> Result<(u16, String)> {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5))
        .with_context(|| format!("connecting to {addr}"))?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    // HTTP/1.0: the server closes the connection after one answer, without chunking it.
    write!(stream, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n")?;
    let mut answer = Vec::new();
    stream.read_to_end(&mut answer)?;
    let answer = String::from_utf8(answer).context("the answer is not UTF-8")?;
    let (head, body) = answer
        .split_once("\r\n\r\n")
        .with_context(|| format!("not an HTTP answer: {answer:?}"))?;
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .with_context(|| format!("no status in {head:?}"))?;
    Ok((status, body.to_owned()))
}

/// A Prometheus server of the test's own: its configuration and its storage in a
/// temporary directory, on a free port of 127.0.0.1, scraping its targets every second.
/// Killed when dropped.
pub struct Prometheus {
    child: Child,
    addr: SocketAddr,
    log: PathBuf,
    _dir: tempfile::TempDir,
}

impl Prometheus {
    /// Starts `prometheus` (`GANTRY_PROMETHEUS`, else the one on `PATH`; Debian's package
    /// `prometheus`, which scripts/test.sh installs) scraping `targets` under the job
    /// `gantry-dispatcher`, and waits until it is ready.
    ///
    /// # Errors
    /// It cannot be started, or is not ready within a minute.
    pub async fn scraping(targets: &[SocketAddr]) -> Result<Prometheus> {
        let dir = tempfile::tempdir()?;
        let targets: Vec<String> = targets.iter().map(|t| format!("\"{t}\"")).collect();
        let config = dir.path().join("prometheus.yml");
        std::fs::write(
            &config,
            format!(
                "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nscrape_configs:\n  - job_name: gantry-dispatcher\n    scrape_interval: 1s\n    scrape_timeout: 1s\n    static_configs:\n      - targets: [{}]\n",
                targets.join(", ")
            ),
        )?;
        let program = std::env::var("GANTRY_PROMETHEUS").unwrap_or_else(|_| "prometheus".into());
        // A free port, found by binding it; should another process take it before
        // Prometheus does, Prometheus exits, and the next try takes another.
        for _ in 0..3 {
            let addr = free_port()?;
            let log = dir.path().join(format!("prometheus-{}.log", addr.port()));
            let out = std::fs::File::create(&log)?;
            let mut child = Command::new(&program)
                .arg(format!("--config.file={}", config.display()))
                .arg(format!(
                    "--storage.tsdb.path={}",
                    dir.path().join("data").display()
                ))
                .arg(format!("--web.listen-address={addr}"))
                .stdin(Stdio::null())
                .stdout(out.try_clone()?)
                .stderr(out)
                .spawn()
                .with_context(|| {
                    format!("cannot run {program}; install it (apt-get install prometheus), as scripts/test.sh does, or set GANTRY_PROMETHEUS")
                })?;
            let ready = until_ready(addr, &mut child).await;
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            match ready {
                Ok(()) => {
                    return Ok(Prometheus {
                        child,
                        addr,
                        log,
                        _dir: dir,
                    });
                }
                Err(_) if text.contains("address already in use") => continue,
                Err(e) => {
                    let _ = child.kill();
                    let _ = child.wait();
                    return Err(e.context(text));
                }
            }
        }
        bail!("no free port for Prometheus after three tries")
    }

    /// The server's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The instant vector of `query` now: each series' labels and value.
    ///
    /// # Errors
    /// Prometheus refuses the query or does not answer.
    pub async fn query(&self, query: &str) -> Result<Vec<(BTreeMap<String, String>, f64)>> {
        let (status, body) = get(
            self.addr,
            &format!("/api/v1/query?query={}", percent_encode(query)),
        )
        .await?;
        let answer: Value = serde_json::from_str(&body)
            .with_context(|| format!("Prometheus answered {status}: {body}"))?;
        if answer["status"] != "success" {
            bail!("Prometheus refused {query:?}: {body}");
        }
        let mut series = Vec::new();
        for item in answer["data"]["result"].as_array().into_iter().flatten() {
            let labels = item["metric"]
                .as_object()
                .into_iter()
                .flatten()
                .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_owned()))
                .collect();
            let value = item["value"][1]
                .as_str()
                .and_then(|v| v.parse().ok())
                .with_context(|| format!("no value in {item}"))?;
            series.push((labels, value));
        }
        Ok(series)
    }

    /// The single value of `query` now (the sum of its series), `None` while it has none.
    ///
    /// # Errors
    /// As [`Prometheus::query`].
    pub async fn value(&self, query: &str) -> Result<Option<f64>> {
        let series = self.query(query).await?;
        Ok((!series.is_empty()).then(|| series.iter().map(|(_, v)| v).sum()))
    }

    /// Prometheus's own log so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Waits until Prometheus at `addr` says it is ready, or its process exits.
async fn until_ready(addr: SocketAddr, child: &mut Child) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Ok((200, _)) = get(addr, "/-/ready").await {
            return Ok(());
        }
        if let Some(status) = child.try_wait()? {
            bail!("Prometheus exited ({status}) before it was ready");
        }
        if Instant::now() > deadline {
            bail!("Prometheus was not ready within a minute");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn free_port() -> Result<SocketAddr> {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?;
    Ok(listener.local_addr()?)
}

/// `text` for a URL's query: every byte but letters, digits and `-._~` as `%XX`.
fn percent_encode(text: &str) -> String {
    text.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                char::from(b).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}
