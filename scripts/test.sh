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

step "cargo fmt --check"
cargo fmt --all -- --check

step "cargo clippy"
cargo clippy --workspace --all-targets --locked -- -D warnings

step "cargo deny"
if ! cargo deny --version >/dev/null 2>&1; then
    echo "test: cargo-deny is not installed; installing it (the first install takes a few minutes)"
    cargo install --locked cargo-deny
fi
cargo deny check

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

printf '\ntest: all checks passed\n'
