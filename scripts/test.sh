#!/usr/bin/env bash
# Gantry's full check: formatting, lints, dependency policy, build, and the
# unit + integration tests against a local RabbitMQ and PostgreSQL.
#
#   bash scripts/test.sh
#
# Runs scripts/setup.sh first (needs root or sudo), so RabbitMQ and PostgreSQL
# are installed, running, and the `gantry` database role exists.
set -euo pipefail

cd "$(dirname "$0")/.."

if [[ "${CI:-}" == "true" ]]; then
    export CARGO_TERM_COLOR=never
fi

step() { printf '\n==> test: %s\n' "$*"; }

step "setup"
bash scripts/setup.sh

export GANTRY_AMQP_URL='amqp://guest:guest@127.0.0.1:5672/%2f'
# The tests create their own fresh databases with this role (it has CREATEDB).
export GANTRY_DATABASE_URL='postgres://gantry:gantry@127.0.0.1:5432/gantry'

step "kubernetes-validate (checks rendered Jobs against the official schemas)"
if ! command -v kubernetes-validate >/dev/null 2>&1; then
    # A venv of our own: Debian's system Python refuses `pip install` (PEP 668).
    venv="$PWD/target/tools-venv"
    if [[ ! -x "$venv/bin/kubernetes-validate" ]]; then
        python3 -m venv "$venv" 2>/dev/null || {
            echo "test: installing python3-venv"
            apt-get install -y --no-install-recommends python3-venv >/dev/null
            python3 -m venv "$venv"
        }
        "$venv/bin/pip" install --quiet kubernetes-validate
    fi
    export GANTRY_KUBERNETES_VALIDATE="$venv/bin/kubernetes-validate"
fi
"${GANTRY_KUBERNETES_VALIDATE:-kubernetes-validate}" --version

step "container registry and skopeo (the executor registry service's tests push real images)"
# Each test starts its own registry on a free port; a service the package may start on
# :5000 is never used.
if ! command -v docker-registry >/dev/null 2>&1 || ! command -v skopeo >/dev/null 2>&1; then
    echo "test: installing docker-registry and skopeo"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        docker-registry skopeo </dev/null >/dev/null
fi
docker-registry --version
skopeo --version

step "prometheus (a test scrapes a running dispatcher with a Prometheus of its own)"
if ! command -v prometheus >/dev/null 2>&1 && [[ -z "${GANTRY_PROMETHEUS:-}" ]]; then
    # Debian's package; the test starts its own server on a free port, whatever the
    # package's service does on :9090.
    echo "test: installing prometheus"
    DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends prometheus >/dev/null
fi
"${GANTRY_PROMETHEUS:-prometheus}" --version 2>&1 | head -n 1

step "model server for the openai engine's tests (the first install compiles llama.cpp)"
GANTRY_LLM_PYTHON="$(bash scripts/llm-server.sh | tail -n 1)"
export GANTRY_LLM_PYTHON
"$GANTRY_LLM_PYTHON" -c 'import llama_cpp; print("llama-cpp-python", llama_cpp.__version__)'

step "the Celery client for the Celery bridge's tests (celery 5 from PyPI, in a venv)"
GANTRY_CELERY_PYTHON="$(bash scripts/celery-client.sh | tail -n 1)"
export GANTRY_CELERY_PYTHON
"$GANTRY_CELERY_PYTHON" -c 'import celery; print("celery", celery.__version__)'

step "an OTLP receiver for the span export's tests (oteltest from PyPI, in a venv)"
GANTRY_OTEL_PYTHON="$(bash scripts/otel-receiver.sh | tail -n 1)"
export GANTRY_OTEL_PYTHON
"$GANTRY_OTEL_PYTHON" -c 'import oteltest.version as v; print("oteltest", v.__version__)'

step "cargo fmt --check"
cargo fmt --all -- --check

step "cargo clippy"
cargo clippy --workspace --all-targets --locked -- -D warnings

step "cargo deny"
if ! cargo deny --version >/dev/null 2>&1; then
    echo "test: cargo-deny is not installed; installing it (the first install takes a few minutes)"
    cargo install --locked cargo-deny
fi
# Licenses, bans and sources need nothing from the network. The advisory check needs the
# RustSec database from GitHub; where that is out of reach (an offline CI machine), a copy
# fetched earlier is used, and with none at all the step says so instead of failing.
cargo deny check licenses bans sources
if cargo deny check advisories 2>/tmp/gantry-deny-advisories.log; then
    echo "test: advisories ok"
elif grep -q "failed to fetch advisory database" /tmp/gantry-deny-advisories.log; then
    if compgen -G "$HOME/.cargo/advisory-dbs/advisory-db-*/crates" >/dev/null; then
        cargo deny --offline check advisories
        echo "test: advisories ok (against the copy fetched earlier; the RustSec database is out of reach)"
    else
        echo "test: WARNING: advisories NOT checked: the RustSec database cannot be fetched from here"
    fi
else
    cat /tmp/gantry-deny-advisories.log
    exit 1
fi

step "cargo build (binaries used by the integration tests)"
cargo build --workspace --bins --locked

if cargo nextest --version >/dev/null 2>&1; then
    step "cargo nextest run"
    cargo nextest run --workspace --locked --no-fail-fast
    step "doc tests"
    cargo test --workspace --doc --locked
else
    step "cargo test (cargo-nextest not installed)"
    cargo test --workspace --locked --no-fail-fast
fi

# These restart the RabbitMQ and PostgreSQL every other test uses, so they run alone,
# after everything else.
step "resilience: server restarts under a running dispatcher"
cargo test -p gantry-tests --test resilience --locked -- --ignored --test-threads=1

# The fault suite: each fault (process kills, server restarts, API faults, pod failures,
# duplicate deliveries) against a fresh world; it fails on a lost task or an attempt that
# ran twice. It restarts RabbitMQ and Postgres too, so it also runs alone.
step "fault suite: every task terminal, no attempt run twice"
target/debug/gantry-faults --tasks 16

printf '\ntest: all checks passed\n'
