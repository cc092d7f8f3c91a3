//! A real container registry for the executor registry service's tests: Debian's
//! `docker-registry` (the CNCF distribution registry) started per test on a free port with
//! its own storage, images built here as OCI layouts (a layer, a config with labels, a
//! manifest or a multi-platform index, sha256-addressed) and pushed with `skopeo`, and a
//! `gantry-registry` process in front of it, with a small HTTP client for its API.
//!
//! `apt-get install docker-registry skopeo` first (scripts/test.sh does).

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use tempfile::TempDir;

use crate::servers::bin_path;

/// A `docker-registry serve` process with its own port and storage.
pub struct ContainerRegistry {
    dir: TempDir,
    port: u16,
    child: Option<Child>,
}

impl ContainerRegistry {
    /// Starts a registry on a free port of 127.0.0.1 and waits until it answers `/v2/`.
    ///
    /// # Errors
    /// `docker-registry` is not installed or does not come up.
    pub fn start() -> Result<ContainerRegistry> {
        let dir = tempfile::tempdir()?;
        let port = free_port()?;
        let config = format!(
            "version: 0.1\nlog:\n  level: warn\nstorage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\nhttp:\n  addr: 127.0.0.1:{port}\n",
            dir.path().join("storage").display()
        );
        std::fs::write(dir.path().join("config.yml"), config)?;
        let mut registry = ContainerRegistry {
            dir,
            port,
            child: None,
        };
        registry.up()?;
        Ok(registry)
    }

    fn up(&mut self) -> Result<()> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("registry.log"))?;
        let child = Command::new("docker-registry")
            .arg("serve")
            .arg(self.dir.path().join("config.yml"))
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("starting docker-registry; install it with `apt-get install docker-registry skopeo` (scripts/test.sh does)")?;
        self.child = Some(child);
        let url = format!("http://{}/v2/", self.host());
        wait_until(
            &format!("the registry at {url}"),
            Duration::from_secs(30),
            || Ok(matches!(http("GET", &url), Ok((200, _)))),
        )
    }

    /// `127.0.0.1:PORT`, as image references name it.
    pub fn host(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// Stops it (SIGTERM, then SIGKILL); its storage stays for [`ContainerRegistry::restart`].
    ///
    /// # Errors
    /// The process cannot be signalled.
    pub fn stop(&mut self) -> Result<()> {
        if let Some(mut child) = self.child.take() {
            kill(Pid::from_raw(i32::try_from(child.id())?), Signal::SIGTERM)?;
            let start = Instant::now();
            while child.try_wait()?.is_none() {
                if start.elapsed() > Duration::from_secs(10) {
                    child.kill()?;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        Ok(())
    }

    /// Starts it again on the same port with the same storage.
    ///
    /// # Errors
    /// As [`ContainerRegistry::start`].
    pub fn restart(&mut self) -> Result<()> {
        self.stop()?;
        self.up()
    }

    /// Pushes the image of an OCI layout (all of its platforms, for an index) as
    /// `repository:tag` with `skopeo copy`.
    ///
    /// # Errors
    /// `skopeo` is not installed or fails.
    pub fn push(&self, image: &Layout, repository: &str, tag: &str) -> Result<()> {
        let dest = format!("docker://{}/{repository}:{tag}", self.host());
        let out = Command::new("skopeo")
            .args(["--insecure-policy", "copy", "--all", "--dest-tls-verify=false", "--quiet"])
            .arg(format!("oci:{}:latest", image.dir.display()))
            .arg(&dest)
            .stdin(Stdio::null())
            .output()
            .context("running skopeo; install it with `apt-get install docker-registry skopeo` (scripts/test.sh does)")?;
        if !out.status.success() {
            bail!(
                "skopeo copy to {dest} failed ({}): {}",
                out.status,
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(())
    }
}

impl Drop for ContainerRegistry {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// An image written as an OCI layout, tagged `latest` in it.
pub struct Layout {
    _dir: TempDir,
    dir: PathBuf,
    /// The digest of its manifest, or of its index: what a pinned reference names.
    pub digest: String,
}

impl Layout {
    /// An image for linux/amd64 with these labels; `marker` makes its layer (and so its
    /// digest) its own.
    ///
    /// # Errors
    /// A file cannot be written, or `tar` fails.
    pub fn image(labels: &[(&str, &str)], marker: &str) -> Result<Layout> {
        Layout::write(|blobs| {
            let (digest, size) = manifest(blobs, "amd64", labels, marker)?;
            Ok(descriptor(
                "application/vnd.oci.image.manifest.v1+json",
                &digest,
                size,
            ))
        })
    }

    /// A multi-platform image: an OCI index of one manifest per `(architecture, labels)`,
    /// all for linux.
    ///
    /// # Errors
    /// As [`Layout::image`].
    pub fn index(platforms: &[(&str, &[(&str, &str)])], marker: &str) -> Result<Layout> {
        Layout::write(|blobs| {
            let mut manifests = Vec::new();
            for (arch, labels) in platforms {
                let (digest, size) = manifest(blobs, arch, labels, &format!("{marker}-{arch}"))?;
                let mut d = descriptor("application/vnd.oci.image.manifest.v1+json", &digest, size);
                d["platform"] = json!({"os": "linux", "architecture": arch});
                manifests.push(d);
            }
            let index = json!({
                "schemaVersion": 2,
                "mediaType": "application/vnd.oci.image.index.v1+json",
                "manifests": manifests,
            });
            let (digest, size) = blobs.put(index.to_string().as_bytes())?;
            Ok(descriptor(
                "application/vnd.oci.image.index.v1+json",
                &digest,
                size,
            ))
        })
    }

    fn write(top: impl FnOnce(&Blobs) -> Result<Value>) -> Result<Layout> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().to_path_buf();
        let blobs = Blobs(path.join("blobs/sha256"));
        std::fs::create_dir_all(&blobs.0)?;
        let mut entry = top(&blobs)?;
        let digest = entry["digest"]
            .as_str()
            .context("a descriptor has a digest")?
            .to_owned();
        entry["annotations"] = json!({"org.opencontainers.image.ref.name": "latest"});
        std::fs::write(path.join("oci-layout"), r#"{"imageLayoutVersion":"1.0.0"}"#)?;
        std::fs::write(
            path.join("index.json"),
            json!({"schemaVersion": 2, "manifests": [entry]}).to_string(),
        )?;
        Ok(Layout {
            _dir: dir,
            dir: path,
            digest,
        })
    }
}

/// The blobs directory of a layout.
struct Blobs(PathBuf);

impl Blobs {
    /// Writes a blob under its digest: `(digest, size)`.
    fn put(&self, bytes: &[u8]) -> Result<(String, usize)> {
        let digest = sha256(bytes);
        std::fs::write(self.0.join(&digest["sha256:".len()..]), bytes)?;
        Ok((digest, bytes.len()))
    }
}

/// A layer (a tar.gz of one file saying `marker`), a config with `labels`, and their
/// manifest: its `(digest, size)`.
fn manifest(
    blobs: &Blobs,
    arch: &str,
    labels: &[(&str, &str)],
    marker: &str,
) -> Result<(String, usize)> {
    let work = tempfile::tempdir()?;
    std::fs::write(work.path().join("marker.txt"), format!("{marker}\n"))?;
    let tar = run(Command::new("tar")
        .args([
            "--owner=0",
            "--group=0",
            "--numeric-owner",
            "--mtime=@0",
            "-cf",
            "-",
            "-C",
        ])
        .arg(work.path())
        .arg("marker.txt"))?;
    let gz = run_with_input(Command::new("gzip").args(["-n", "-c"]), &tar)?;
    let (layer, layer_size) = blobs.put(&gz)?;
    let labels: serde_json::Map<String, Value> = labels
        .iter()
        .map(|(k, v)| ((*k).to_owned(), json!(v)))
        .collect();
    let config = json!({
        "architecture": arch,
        "os": "linux",
        "config": {"Labels": labels, "Cmd": ["/bin/true"]},
        "rootfs": {"type": "layers", "diff_ids": [sha256(&tar)]},
    });
    let (config, config_size) = blobs.put(config.to_string().as_bytes())?;
    let manifest = json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": descriptor("application/vnd.oci.image.config.v1+json", &config, config_size),
        "layers": [descriptor("application/vnd.oci.image.layer.v1.tar+gzip", &layer, layer_size)],
    });
    blobs.put(manifest.to_string().as_bytes())
}

fn descriptor(media_type: &str, digest: &str, size: usize) -> Value {
    json!({"mediaType": media_type, "digest": digest, "size": size})
}

fn sha256(bytes: &[u8]) -> String {
    let hex: String = Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    format!("sha256:{hex}")
}

fn run(command: &mut Command) -> Result<Vec<u8>> {
    let out = command.stdin(Stdio::null()).output()?;
    if !out.status.success() {
        bail!(
            "{command:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(out.stdout)
}

fn run_with_input(command: &mut Command, input: &[u8]) -> Result<Vec<u8>> {
    let mut child = command
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()?;
    child
        .stdin
        .take()
        .context("a piped stdin")?
        .write_all(input)?;
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!("{command:?} failed");
    }
    Ok(out.stdout)
}

/// A running `gantry-registry`.
pub struct RegistryService {
    child: Option<Child>,
    /// `http://127.0.0.1:PORT`.
    pub url: String,
    pub log: PathBuf,
    pub audit: PathBuf,
    _dir: TempDir,
}

impl RegistryService {
    /// Starts `gantry-registry` watching `sources` (comma-separated URLs), refreshing every
    /// `period`, and waits until it listens.
    ///
    /// # Errors
    /// The binary is missing (`cargo build --bins`), or it exits or never listens.
    pub fn start(sources: &str, period: &str) -> Result<RegistryService> {
        RegistryService::start_with(sources, period, &[])
    }

    /// [`RegistryService::start`] with more environment variables.
    ///
    /// # Errors
    /// As [`RegistryService::start`].
    pub fn start_with(
        sources: &str,
        period: &str,
        env: &[(&str, &str)],
    ) -> Result<RegistryService> {
        let dir = tempfile::tempdir()?;
        let log = dir.path().join("gantry-registry.log");
        let audit = dir.path().join("audit.jsonl");
        let out = std::fs::File::create(&log)?;
        let mut child = Command::new(bin_path("gantry-registry"))
            .env("GANTRY_REGISTRY_LISTEN", "127.0.0.1:0")
            .env("GANTRY_REGISTRY_SOURCES", sources)
            .env("GANTRY_REGISTRY_REFRESH_INTERVAL", period)
            .env("GANTRY_REGISTRY_TIMEOUT", "2s")
            .env("GANTRY_REGISTRY_AUDIT_LOG", &audit)
            .env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()),
            )
            .env("NO_COLOR", "1")
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .spawn()
            .context("starting gantry-registry")?;
        let start = Instant::now();
        let url = loop {
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            if let Some(addr) = text
                .lines()
                .find(|l| l.contains("gantry-registry listening"))
                .and_then(|l| l.split("addr=").nth(1))
                .and_then(|rest| rest.split_whitespace().next())
            {
                break format!("http://{addr}");
            }
            if let Some(status) = child.try_wait()? {
                bail!("gantry-registry exited ({status}) before listening:\n{text}");
            }
            if start.elapsed() > Duration::from_secs(30) {
                let _ = child.kill();
                bail!("gantry-registry did not listen within 30s:\n{text}");
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        Ok(RegistryService {
            child: Some(child),
            url,
            log,
            audit,
            _dir: dir,
        })
    }

    /// `gantry-registry --probe` (the image's health check) against this service, told to
    /// listen on every interface at its port, as in the image: its exit code, standard
    /// output and standard error.
    ///
    /// # Errors
    /// The binary cannot be run.
    pub fn probe(&self) -> Result<(Option<i32>, String, String)> {
        let port = self
            .url
            .rsplit(':')
            .next()
            .context("the service's URL has a port")?;
        let out = Command::new(bin_path("gantry-registry"))
            .arg("--probe")
            .env_remove("GANTRY_REGISTRY_CONFIG")
            .env("GANTRY_REGISTRY_LISTEN", format!("0.0.0.0:{port}"))
            .output()
            .context("running gantry-registry --probe")?;
        Ok((
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        ))
    }

    /// `(status, JSON body)` of a request to the service's API.
    ///
    /// # Errors
    /// No answer, or one that is not JSON.
    pub fn call(&self, method: &str, path: &str) -> Result<(u16, Value)> {
        let (status, body) = http(method, &format!("{}{path}", self.url))?;
        let json = serde_json::from_str(&body)
            .with_context(|| format!("{method} {path} answered {status} with no JSON: {body}"))?;
        Ok((status, json))
    }

    /// Waits until `/health` answers 200 (every source listed once).
    ///
    /// # Errors
    /// It does not within 30 s.
    pub fn wait_loaded(&self) -> Result<()> {
        wait_until(
            "gantry-registry to load its catalog",
            Duration::from_secs(30),
            || Ok(matches!(self.call("GET", "/health"), Ok((200, _)))),
        )
        .with_context(|| self.log_text())
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits until the service's log has a line containing `needle`.
    ///
    /// # Errors
    /// No such line within 30 s.
    pub fn wait_for_log(&self, needle: &str) -> Result<()> {
        wait_until(
            &format!("gantry-registry to log `{needle}`"),
            Duration::from_secs(30),
            || Ok(self.log_text().contains(needle)),
        )
    }

    /// The audit log's lines.
    ///
    /// # Errors
    /// A line is not JSON.
    pub fn audit_lines(&self) -> Result<Vec<Value>> {
        std::fs::read_to_string(&self.audit)
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str(l).with_context(|| format!("audit line {l:?}")))
            .collect()
    }

    /// SIGTERM, then its exit status (bounded) and its log.
    ///
    /// # Errors
    /// It does not exit within 15 s.
    pub fn terminate(mut self) -> Result<(ExitStatus, String)> {
        let mut child = self.child.take().context("running")?;
        kill(Pid::from_raw(i32::try_from(child.id())?), Signal::SIGTERM)?;
        let start = Instant::now();
        loop {
            if let Some(status) = child.try_wait()? {
                return Ok((status, self.log_text()));
            }
            if start.elapsed() > Duration::from_secs(15) {
                let _ = child.kill();
                bail!(
                    "gantry-registry did not exit within 15s of SIGTERM:\n{}",
                    self.log_text()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for RegistryService {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// A free TCP port of 127.0.0.1 (free when asked).
fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// Re-checks `probe` every 50 ms until it holds or `timeout` passes.
fn wait_until(
    what: &str,
    timeout: Duration,
    mut probe: impl FnMut() -> Result<bool>,
) -> Result<()> {
    let start = Instant::now();
    while !probe()? {
        if start.elapsed() > timeout {
            bail!("timed out after {timeout:?} waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(())
}

/// One HTTP/1.0 request to `http://host:port/path`: `(status, body)`.
fn http(method: &str, url: &str) -> Result<(u16, String)> {
    let rest = url.strip_prefix("http://").context("an http:// URL")?;
    let (host, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
    let path = if path.is_empty() { "/" } else { path };
    let mut stream = TcpStream::connect(host)?;
    stream.set_read_timeout(Some(Duration::from_secs(30)))?;
    write!(
        stream,
        "{method} {path} HTTP/1.0\r\nHost: {host}\r\nAccept: application/json\r\nContent-Length: 0\r\n\r\n"
    )?;
    let mut answer = String::new();
    stream.read_to_string(&mut answer)?;
    let (head, body) = answer.split_once("\r\n\r\n").unwrap_or((&answer, ""));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .with_context(|| format!("no status in {head:?}"))?;
    Ok((status, body.to_owned()))
}
