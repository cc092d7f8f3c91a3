//! Servers with TLS listeners, for the tests of `amqps://` and Postgres over TLS: a
//! throwaway CA and the certificates it signs (by the `openssl` command), a RabbitMQ node and
//! a Postgres cluster of the test's own, each on free ports in a temporary directory and
//! stopped when dropped. This machine's shared broker and Postgres are not touched.

use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use tempfile::TempDir;

/// How long a server may take to listen: a RabbitMQ node boots in 5 to 15 seconds.
const STARTUP: Duration = Duration::from_secs(90);

/// A certificate authority made for one test, and the certificates it signs.
pub struct Ca {
    /// The CA's certificate (PEM): what a client trusts.
    pub cert: PathBuf,
    key: PathBuf,
    dir: PathBuf,
}

/// A server's certificate and key (PEM), signed by a [`Ca`].
pub struct ServerCert {
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl Ca {
    /// A new CA (P-256) named `name`, its files in `dir`. Two CAs of the same name differ in
    /// their keys: one does not vouch for what the other signed.
    ///
    /// # Errors
    /// `openssl` is missing or fails.
    pub fn new(dir: &Path, file_stem: &str, name: &str) -> Result<Ca> {
        let ca = Ca {
            cert: dir.join(format!("{file_stem}.pem")),
            key: dir.join(format!("{file_stem}.key")),
            dir: dir.to_owned(),
        };
        openssl(&[
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-days",
            "2",
            "-subj",
            &format!("/CN={name}"),
            "-keyout",
            path_str(&ca.key)?,
            "-out",
            path_str(&ca.cert)?,
        ])?;
        Ok(ca)
    }

    /// A server certificate for the names and addresses in `names` (`DNS:localhost`,
    /// `IP:127.0.0.1`), signed by this CA.
    ///
    /// # Errors
    /// `openssl` fails.
    pub fn issue(&self, file_stem: &str, names: &[&str]) -> Result<ServerCert> {
        let server = ServerCert {
            cert: self.dir.join(format!("{file_stem}.pem")),
            key: self.dir.join(format!("{file_stem}.key")),
        };
        let request = self.dir.join(format!("{file_stem}.csr"));
        let extensions = self.dir.join(format!("{file_stem}.ext"));
        std::fs::write(
            &extensions,
            format!(
                "subjectAltName={}\nbasicConstraints=CA:FALSE\nkeyUsage=digitalSignature\nextendedKeyUsage=serverAuth\n",
                names.join(",")
            ),
        )?;
        openssl(&[
            "req",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-subj",
            "/CN=gantry test server",
            "-keyout",
            path_str(&server.key)?,
            "-out",
            path_str(&request)?,
        ])?;
        openssl(&[
            "x509",
            "-req",
            "-days",
            "2",
            "-in",
            path_str(&request)?,
            "-CA",
            path_str(&self.cert)?,
            "-CAkey",
            path_str(&self.key)?,
            "-CAcreateserial",
            "-extfile",
            path_str(&extensions)?,
            "-out",
            path_str(&server.cert)?,
        ])?;
        Ok(server)
    }
}

fn openssl(args: &[&str]) -> Result<()> {
    let out = Command::new("openssl")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .context("running openssl (Debian: the openssl package)")?;
    if !out.status.success() {
        bail!(
            "openssl {} failed: {}",
            args.first().copied().unwrap_or_default(),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

fn path_str(path: &Path) -> Result<&str> {
    path.to_str()
        .with_context(|| format!("{} is not UTF-8", path.display()))
}

/// A port nothing listens on now.
fn free_port() -> Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// A server process of the test's own: stopped (`stop`, then SIGKILL after a few seconds)
/// when dropped, its files with it.
struct Server {
    what: &'static str,
    child: Child,
    stop: Signal,
    log: PathBuf,
    /// Removed once the server has stopped (fields drop after [`Drop::drop`]).
    _dir: TempDir,
}

impl Server {
    /// Waits until the server listens on `port`, or says why it never will.
    fn wait_listening(&mut self, port: u16) -> Result<()> {
        let deadline = Instant::now() + STARTUP;
        loop {
            if TcpStream::connect(("127.0.0.1", port)).is_ok() {
                return Ok(());
            }
            if let Some(status) = self.child.try_wait()? {
                bail!(
                    "{} exited ({status}) before listening on {port}:\n{}",
                    self.what,
                    self.log_tail()
                );
            }
            if Instant::now() > deadline {
                bail!(
                    "{} not listening on {port} after {STARTUP:?}:\n{}",
                    self.what,
                    self.log_tail()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn log_tail(&self) -> String {
        let log = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let pid = Pid::from_raw(i32::try_from(self.child.id()).unwrap_or(i32::MAX));
        let _ = kill(pid, self.stop);
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if !matches!(self.child.try_wait(), Ok(None)) {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A RabbitMQ node of the test's own with only a TLS listener (`guest`/`guest`, vhost `/`),
/// run from Debian's `rabbitmq-server` beside this machine's node.
pub struct TlsRabbitMq {
    /// The TLS listener's port, on 127.0.0.1.
    pub port: u16,
    _server: Server,
}

impl TlsRabbitMq {
    /// Starts the node with `cert` and waits until it listens.
    ///
    /// # Errors
    /// The node does not start (its log says why).
    pub fn start(cert: &ServerCert) -> Result<TlsRabbitMq> {
        let dir = world_readable_tempdir("gantry-tls-rabbitmq-")?;
        let base = dir.path();
        let port = free_port()?;
        let dist_port = free_port()?;
        std::fs::write(
            base.join("rabbitmq.conf"),
            format!(
                "listeners.tcp = none\n\
                 listeners.ssl.default = 127.0.0.1:{port}\n\
                 ssl_options.certfile = {}\n\
                 ssl_options.keyfile = {}\n\
                 ssl_options.verify = verify_none\n\
                 ssl_options.fail_if_no_peer_cert = false\n",
                cert.cert.display(),
                cert.key.display()
            ),
        )?;
        std::fs::write(base.join("enabled_plugins"), "[].\n")?;
        std::fs::write(base.join("rabbitmq-env.conf"), "")?;
        let log = base.join("server.log");
        let program = ["/usr/lib/rabbitmq/bin/rabbitmq-server", "rabbitmq-server"]
            .into_iter()
            .find(|p| Path::new(p).is_file())
            .unwrap_or("rabbitmq-server");
        let child = Command::new(program)
            .current_dir(base)
            // The Erlang cookie is made here, not in the home of whoever runs the tests.
            .env("HOME", base)
            // Not /etc/rabbitmq's node name, listeners and plugins: this node's own.
            .env("RABBITMQ_CONF_ENV_FILE", base.join("rabbitmq-env.conf"))
            .env(
                "RABBITMQ_NODENAME",
                format!("gantry-tls-{}-{port}@localhost", std::process::id()),
            )
            .env("RABBITMQ_DIST_PORT", dist_port.to_string())
            .env("RABBITMQ_CONFIG_FILE", base.join("rabbitmq"))
            .env(
                "RABBITMQ_ENABLED_PLUGINS_FILE",
                base.join("enabled_plugins"),
            )
            .env("RABBITMQ_MNESIA_BASE", base.join("mnesia"))
            .env("RABBITMQ_LOG_BASE", base.join("log"))
            .env("ERL_CRASH_DUMP", base.join("erl_crash.dump"))
            .env(
                "RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS",
                "-kernel inet_dist_use_interface {127,0,0,1}",
            )
            // The script then runs the Erlang VM in its own place (`exec`), so the child
            // is the node itself, and stopping it stops the node.
            .env("RUNNING_UNDER_SYSTEMD", "true")
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(&log)?)
            .stderr(std::fs::File::create(base.join("server.err"))?)
            .spawn()
            .with_context(|| format!("starting {program}"))?;
        let mut server = Server {
            what: "the TLS RabbitMQ node",
            child,
            stop: Signal::SIGKILL,
            log,
            _dir: dir,
        };
        server.wait_listening(port)?;
        Ok(TlsRabbitMq {
            port,
            _server: server,
        })
    }

    /// The node's URL, reached at `host`, with `query` (`cacertfile=…`) if not empty.
    pub fn url(&self, host: &str, query: &str) -> String {
        let query = if query.is_empty() {
            String::new()
        } else {
            format!("?{query}")
        };
        format!("amqps://guest:guest@{host}:{}/%2f{query}", self.port)
    }
}

/// A Postgres cluster of the test's own that takes only TLS connections (`hostssl`,
/// password of role `gantry`), run from the newest `/usr/lib/postgresql/*/bin`; as the
/// `postgres` user when the tests run as root.
pub struct TlsPostgres {
    /// Its port, on 127.0.0.1.
    pub port: u16,
    password: String,
    _server: Server,
}

impl TlsPostgres {
    /// Creates the cluster, starts it with `cert`, and waits until it listens.
    ///
    /// # Errors
    /// `initdb` or the server fails (its log says why).
    pub fn start(cert: &ServerCert) -> Result<TlsPostgres> {
        let dir = world_readable_tempdir("gantry-tls-postgres-")?;
        let base = dir.path();
        let bin = postgres_bin_dir()?;
        let password = uuid::Uuid::new_v4().simple().to_string();
        let port = free_port()?;
        // The server wants its key readable by it alone.
        let cert_file = base.join("server.pem");
        let key_file = base.join("server.key");
        std::fs::copy(&cert.cert, &cert_file)?;
        std::fs::copy(&cert.key, &key_file)?;
        std::fs::write(base.join("password"), &password)?;
        std::fs::write(
            base.join("pg_hba.conf"),
            "hostssl all all 127.0.0.1/32 scram-sha-256\n",
        )?;
        let owner = server_user()?;
        if let Some((uid, gid)) = owner {
            let chown = Command::new("chown")
                .arg("-R")
                .arg(format!("{uid}:{gid}"))
                .arg(base)
                .status()?;
            if !chown.success() {
                bail!("chown of {} failed", base.display());
            }
        }
        std::fs::set_permissions(
            &key_file,
            std::os::unix::fs::PermissionsExt::from_mode(0o600),
        )?;

        let data = base.join("data");
        let mut initdb = Command::new(bin.join("initdb"));
        initdb
            .arg("-D")
            .arg(&data)
            .args(["-U", "gantry", "-E", "UTF8", "--no-sync"])
            .args(["--auth-local=trust", "--auth-host=scram-sha-256"])
            .arg(format!("--pwfile={}", base.join("password").display()));
        as_server_user(&mut initdb, owner);
        let out = initdb.output().context("running initdb")?;
        if !out.status.success() {
            bail!("initdb failed: {}", String::from_utf8_lossy(&out.stderr));
        }

        let log = base.join("server.log");
        let mut postgres = Command::new(bin.join("postgres"));
        postgres
            .arg("-D")
            .arg(&data)
            .args(["-p", &port.to_string()])
            .args(["-c", "listen_addresses=127.0.0.1"])
            .arg("-c")
            .arg(format!("unix_socket_directories={}", base.display()))
            .arg("-c")
            .arg(format!("hba_file={}", base.join("pg_hba.conf").display()))
            .args(["-c", "ssl=on"])
            .arg("-c")
            .arg(format!("ssl_cert_file={}", cert_file.display()))
            .arg("-c")
            .arg(format!("ssl_key_file={}", key_file.display()))
            .args(["-c", "fsync=off"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log)?);
        as_server_user(&mut postgres, owner);
        let child = postgres.spawn().context("starting postgres")?;
        let mut server = Server {
            what: "the TLS Postgres server",
            child,
            // Immediate shutdown: the postmaster stops its backends and exits.
            stop: Signal::SIGQUIT,
            log,
            _dir: dir,
        };
        server.wait_listening(port)?;
        Ok(TlsPostgres {
            port,
            password,
            _server: server,
        })
    }

    /// The URL of database `postgres` as role `gantry`, reached at `host`, with `query`
    /// (`sslmode=verify-full&sslrootcert=…`).
    pub fn url(&self, host: &str, query: &str) -> String {
        format!(
            "postgres://gantry:{}@{host}:{}/postgres?{query}",
            self.password, self.port
        )
    }
}

/// A temporary directory that the `postgres` user can enter.
fn world_readable_tempdir(prefix: &str) -> Result<TempDir> {
    let dir = tempfile::Builder::new().prefix(prefix).tempdir()?;
    std::fs::set_permissions(
        dir.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )?;
    Ok(dir)
}

/// The newest Postgres server binaries (`GANTRY_POSTGRES_BIN` overrides).
fn postgres_bin_dir() -> Result<PathBuf> {
    if let Ok(dir) = std::env::var("GANTRY_POSTGRES_BIN") {
        return Ok(dir.into());
    }
    let version = std::fs::read_dir("/usr/lib/postgresql")
        .context("no /usr/lib/postgresql (Debian's postgresql package); set GANTRY_POSTGRES_BIN")?
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .max_by_key(|v| v.parse::<u32>().unwrap_or(0))
        .context("no server under /usr/lib/postgresql")?;
    Ok(Path::new("/usr/lib/postgresql").join(version).join("bin"))
}

/// The `postgres` user's ids when running as root (Postgres refuses to run as root), or
/// `None` to run as whoever runs the tests.
fn server_user() -> Result<Option<(u32, u32)>> {
    let id = |args: &[&str]| -> Result<u32> {
        let out = Command::new("id").args(args).output()?;
        if !out.status.success() {
            bail!("running as root, and there is no postgres user to run Postgres as");
        }
        Ok(String::from_utf8_lossy(&out.stdout).trim().parse()?)
    };
    if id(&["-u"])? != 0 {
        return Ok(None);
    }
    Ok(Some((id(&["-u", "postgres"])?, id(&["-g", "postgres"])?)))
}

fn as_server_user(cmd: &mut Command, owner: Option<(u32, u32)>) {
    if let Some((uid, gid)) = owner {
        std::os::unix::process::CommandExt::uid(cmd, uid);
        std::os::unix::process::CommandExt::gid(cmd, gid);
    }
}
