#!/usr/bin/env bash
# Prepares this machine for running Gantry's tests and demo:
#   - installs RabbitMQ and PostgreSQL (Debian/Ubuntu, apt) when missing,
#   - starts them when they are not running (with or without systemd),
#   - creates the PostgreSQL role and database `gantry` (password `gantry`,
#     CREATEDB) and verifies a password login over TCP,
#   - checks that the RabbitMQ guest user can log in on 127.0.0.1:5672,
#   - checks that the Rust toolchain (cargo) is installed.
#
# Safe to run repeatedly. Needs root, or sudo when run as another user.
# The resulting URLs are fixed:
#   GANTRY_AMQP_URL=amqp://guest:guest@127.0.0.1:5672/%2f
#   GANTRY_DATABASE_URL=postgres://gantry:gantry@127.0.0.1:5432/gantry
#
# Optional overrides (for pointing the PostgreSQL part at another cluster):
#   GANTRY_SETUP_PG_VERSION   PostgreSQL major version (default: newest installed)
#   GANTRY_SETUP_PG_CLUSTER   cluster name (default: main)
#   GANTRY_SETUP_PG_PORT      TCP port (default: 5432)
#   GANTRY_SETUP_AMQP_PORT    RabbitMQ AMQP port to check (default: 5672)
#   GANTRY_SETUP_SKIP_RABBITMQ=1  skip the RabbitMQ part
set -euo pipefail

export DEBIAN_FRONTEND=noninteractive
export PATH="$PATH:/usr/local/sbin:/usr/sbin:/sbin"

PG_CLUSTER="${GANTRY_SETUP_PG_CLUSTER:-main}"
PG_PORT="${GANTRY_SETUP_PG_PORT:-5432}"
PG_ROLE=gantry
PG_PASSWORD=gantry
PG_DB=gantry
AMQP_PORT="${GANTRY_SETUP_AMQP_PORT:-5672}"
WAIT_SECS=90

say() { printf 'setup: %s\n' "$*"; }
die() {
    printf 'setup: ERROR: %s\n' "$*" >&2
    exit 1
}
have() { command -v "$1" >/dev/null 2>&1; }

# --- privileges ---------------------------------------------------------------

if [[ $EUID -eq 0 ]]; then
    as_root() { "$@"; }
    as_postgres() { runuser -u postgres -- "$@"; }
elif have sudo; then
    as_root() { sudo -- "$@"; }
    as_postgres() { sudo -u postgres -- "$@"; }
else
    die "must run as root, or with sudo installed (try: su -c 'bash $0')"
fi

if [[ -d /run/systemd/system ]]; then
    HAVE_SYSTEMD=1
else
    HAVE_SYSTEMD=0
fi

# --- Rust toolchain -----------------------------------------------------------

find_cargo() {
    if have cargo; then
        command -v cargo
        return 0
    fi
    local home
    for home in "${HOME:-}" "$(getent passwd "${SUDO_USER:-}" 2>/dev/null | cut -d: -f6)"; do
        if [[ -n "$home" && -x "$home/.cargo/bin/cargo" ]]; then
            printf '%s\n' "$home/.cargo/bin/cargo"
            return 0
        fi
    done
    return 1
}

if cargo_bin="$(find_cargo)"; then
    say "cargo found: $("$cargo_bin" --version 2>/dev/null || echo "$cargo_bin")"
else
    die "cargo not found. Install the Rust toolchain first (https://rustup.rs), e.g.:
  curl --proto '=https' --tlsv1.2 -sSf https://sh.rustup.rs | sh -s -- -y
then open a new shell (or: source \"\$HOME/.cargo/env\") and run this script again."
fi

# --- packages -----------------------------------------------------------------

APT_UPDATED=0
apt_install() {
    have apt-get || die "apt-get not found; install manually: $*"
    if [[ $APT_UPDATED -eq 0 ]]; then
        say "apt-get update"
        as_root apt-get update -qq
        APT_UPDATED=1
    fi
    say "installing: $*"
    as_root env DEBIAN_FRONTEND=noninteractive \
        apt-get install -y -qq --no-install-recommends "$@" </dev/null
}

newest_pg_version() {
    local dir="$1"
    [[ -d "$dir" ]] || return 0
    find "$dir" -mindepth 1 -maxdepth 1 -type d -printf '%f\n' 2>/dev/null |
        grep -E '^[0-9]+(\.[0-9]+)?$' | sort -V | tail -n 1
}

if [[ "${GANTRY_SETUP_SKIP_RABBITMQ:-0}" != 1 ]]; then
    if have rabbitmq-server && have rabbitmqctl; then
        say "rabbitmq-server is installed"
    else
        apt_install rabbitmq-server
    fi
fi

pg_pkgs=()
if ! have pg_ctlcluster || [[ -z "$(newest_pg_version /usr/lib/postgresql)" ]]; then
    pg_pkgs+=(postgresql)
fi
if ! have psql || ! have pg_isready; then
    pg_pkgs+=(postgresql-client)
fi
if [[ ${#pg_pkgs[@]} -gt 0 ]]; then
    apt_install "${pg_pkgs[@]}"
else
    say "postgresql is installed"
fi

# --- helpers ------------------------------------------------------------------

tcp_open() { # host port
    # shellcheck disable=SC2016 # $1/$2 expand in the inner shell
    timeout 3 bash -c 'exec 3<>"/dev/tcp/$1/$2"' _ "$1" "$2" >/dev/null 2>&1
}

# --- RabbitMQ -----------------------------------------------------------------

start_rabbitmq() {
    if tcp_open 127.0.0.1 "$AMQP_PORT"; then
        say "rabbitmq is running (port $AMQP_PORT answers)"
        return 0
    fi
    if as_root rabbitmqctl -q status >/dev/null 2>&1; then
        say "rabbitmq node is up but port $AMQP_PORT does not answer yet; waiting"
    elif [[ $HAVE_SYSTEMD -eq 1 ]]; then
        say "starting rabbitmq (systemctl)"
        as_root systemctl start rabbitmq-server
    else
        say "starting rabbitmq (rabbitmq-server -detached)"
        # Keep the daemon off our stdout/stderr so callers capturing our output
        # do not wait for it.
        as_root rabbitmq-server -detached </dev/null >/dev/null 2>&1 ||
            die "rabbitmq-server -detached failed; see /var/log/rabbitmq/"
    fi

    local deadline=$((SECONDS + WAIT_SECS))
    while ((SECONDS < deadline)); do
        as_root timeout 30 rabbitmqctl -q await_startup -t 20 </dev/null >/dev/null 2>&1 || true
        if tcp_open 127.0.0.1 "$AMQP_PORT"; then
            say "rabbitmq is up (port $AMQP_PORT answers)"
            return 0
        fi
        sleep 1
    done
    die "rabbitmq did not open port $AMQP_PORT within ${WAIT_SECS}s; see /var/log/rabbitmq/"
}

check_rabbitmq_login() {
    if as_root rabbitmqctl -q authenticate_user guest guest </dev/null >/dev/null 2>&1; then
        say "rabbitmq user guest/guest authenticates"
    else
        die "rabbitmq user guest with password guest does not authenticate.
Gantry's URL is amqp://guest:guest@127.0.0.1:5672/%2f; restore the user with:
  rabbitmqctl add_user guest guest && rabbitmqctl set_permissions -p / guest '.*' '.*' '.*'"
    fi
}

if [[ "${GANTRY_SETUP_SKIP_RABBITMQ:-0}" != 1 ]]; then
    start_rabbitmq
    check_rabbitmq_login
fi

# --- PostgreSQL ---------------------------------------------------------------

PG_VERSION="${GANTRY_SETUP_PG_VERSION:-}"
if [[ -z "$PG_VERSION" ]]; then
    # Prefer a version that already has our cluster; else the newest installed.
    for v in $(find /etc/postgresql -mindepth 1 -maxdepth 1 -type d -printf '%f\n' 2>/dev/null | sort -rV); do
        if [[ -f "/etc/postgresql/$v/$PG_CLUSTER/postgresql.conf" ]]; then
            PG_VERSION="$v"
            break
        fi
    done
fi
if [[ -z "$PG_VERSION" ]]; then
    PG_VERSION="$(newest_pg_version /usr/lib/postgresql)"
fi
[[ -n "$PG_VERSION" ]] || die "no PostgreSQL server found under /usr/lib/postgresql"

if [[ ! -f "/etc/postgresql/$PG_VERSION/$PG_CLUSTER/postgresql.conf" ]]; then
    say "creating postgresql cluster $PG_VERSION/$PG_CLUSTER on port $PG_PORT"
    as_root pg_createcluster "$PG_VERSION" "$PG_CLUSTER" -p "$PG_PORT" </dev/null
fi

cluster_port="$(pg_lsclusters -h 2>/dev/null | awk -v v="$PG_VERSION" -v c="$PG_CLUSTER" '$1 == v && $2 == c { print $3 }')"
if [[ -n "$cluster_port" && "$cluster_port" != "$PG_PORT" ]]; then
    die "postgresql cluster $PG_VERSION/$PG_CLUSTER is configured for port $cluster_port, expected $PG_PORT.
Change 'port' in /etc/postgresql/$PG_VERSION/$PG_CLUSTER/postgresql.conf and restart it."
fi

pg_ready() { pg_isready -q -h 127.0.0.1 -p "$PG_PORT" -t 3 >/dev/null 2>&1; }

start_postgres() {
    if pg_ready; then
        say "postgresql $PG_VERSION/$PG_CLUSTER is running (127.0.0.1:$PG_PORT)"
        return 0
    fi
    if as_root pg_ctlcluster "$PG_VERSION" "$PG_CLUSTER" status >/dev/null 2>&1; then
        say "postgresql $PG_VERSION/$PG_CLUSTER is running but not ready on 127.0.0.1:$PG_PORT; waiting"
    elif [[ $HAVE_SYSTEMD -eq 1 ]]; then
        say "starting postgresql $PG_VERSION/$PG_CLUSTER (systemctl)"
        as_root systemctl start "postgresql@$PG_VERSION-$PG_CLUSTER"
    else
        say "starting postgresql $PG_VERSION/$PG_CLUSTER (pg_ctlcluster)"
        as_root pg_ctlcluster --skip-systemctl-redirect "$PG_VERSION" "$PG_CLUSTER" start </dev/null ||
            die "pg_ctlcluster $PG_VERSION $PG_CLUSTER start failed; see /var/log/postgresql/postgresql-$PG_VERSION-$PG_CLUSTER.log"
    fi

    local deadline=$((SECONDS + WAIT_SECS))
    while ((SECONDS < deadline)); do
        if pg_ready; then
            say "postgresql $PG_VERSION/$PG_CLUSTER is up (127.0.0.1:$PG_PORT)"
            return 0
        fi
        sleep 1
    done
    die "postgresql did not accept connections on 127.0.0.1:$PG_PORT within ${WAIT_SECS}s.
Check listen_addresses/port in /etc/postgresql/$PG_VERSION/$PG_CLUSTER/postgresql.conf
and /var/log/postgresql/postgresql-$PG_VERSION-$PG_CLUSTER.log"
}

ensure_role_and_db() {
    say "ensuring postgresql role '$PG_ROLE' (LOGIN CREATEDB) and database '$PG_DB'"
    # Over the Unix socket as the postgres OS user (peer authentication), so this
    # works on a fresh machine where TCP logins need a password.
    # cd / : the postgres user may not be allowed into the current directory.
    (cd / && as_postgres psql -X -q -v ON_ERROR_STOP=1 -p "$PG_PORT" -d postgres \
        -v role="$PG_ROLE" -v pw="$PG_PASSWORD" -v db="$PG_DB") <<'SQL'
SET client_min_messages = warning;
SET password_encryption = 'scram-sha-256';
SELECT format('CREATE ROLE %I', :'role')
 WHERE NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = :'role')
\gexec
ALTER ROLE :"role" WITH LOGIN CREATEDB PASSWORD :'pw';
SELECT format('CREATE DATABASE %I OWNER %I', :'db', :'role')
 WHERE NOT EXISTS (SELECT 1 FROM pg_database WHERE datname = :'db')
\gexec
ALTER DATABASE :"db" OWNER TO :"role";
SQL
}

check_pg_login() {
    local url="postgres://$PG_ROLE:$PG_PASSWORD@127.0.0.1:$PG_PORT/$PG_DB"
    local out
    if out="$(cd / && PGPASSWORD="$PG_PASSWORD" PGCONNECT_TIMEOUT=10 \
        psql "$url" -X -q -At -v ON_ERROR_STOP=1 \
        -c "SELECT 'createdb=' || rolcreatedb FROM pg_roles WHERE rolname = current_user" 2>&1)"; then
        if [[ "$out" == "createdb=true" ]]; then
            say "postgresql password login over TCP works: postgres://$PG_ROLE:***@127.0.0.1:$PG_PORT/$PG_DB"
        else
            die "logged in as $PG_ROLE over TCP, but the role lacks CREATEDB (got: $out)"
        fi
    else
        die "password login over TCP failed: psql postgres://$PG_ROLE:***@127.0.0.1:$PG_PORT/$PG_DB
$out
Check the 'host' lines in /etc/postgresql/$PG_VERSION/$PG_CLUSTER/pg_hba.conf
(127.0.0.1/32 must allow scram-sha-256, md5, or trust)."
    fi
}

start_postgres
ensure_role_and_db
check_pg_login

say "ready: amqp://guest:guest@127.0.0.1:$AMQP_PORT/%2f and postgres://$PG_ROLE:$PG_PASSWORD@127.0.0.1:$PG_PORT/$PG_DB"
