#!/usr/bin/env bash
# Installs a real OTLP receiver from PyPI (oteltest's sink: OTLP/HTTP with the official
# opentelemetry-proto decoding), for the tests of Gantry's span export (docs/observability.md).
#
#   bash scripts/otel-receiver.sh        # prints the venv's python on its last line
#
# The venv lives outside the checkout ($GANTRY_OTEL_VENV, default
# $HOME/.cache/gantry/otel-venv); pip keeps the wheels in its own cache, so a new venv
# installs in seconds after the first time.
set -euo pipefail

# shellcheck source=scripts/venv.sh
source "$(dirname "$0")/venv.sh"

OTELTEST_VERSION=0.49.0
venv="${GANTRY_OTEL_VENV:-$HOME/.cache/gantry/otel-venv}"
stamp="$venv/.gantry-oteltest-$OTELTEST_VERSION"

say() { printf 'otel-receiver: %s\n' "$*" >&2; }

if [[ ! -f "$stamp" ]]; then
    make_venv "$venv"
    say "installing oteltest==$OTELTEST_VERSION into $venv"
    "$venv/bin/pip" install --quiet "oteltest==$OTELTEST_VERSION"
    touch "$stamp"
fi
"$venv/bin/python" -c 'import oteltest.sink, opentelemetry.proto' || {
    say "the venv at $venv is broken; remove it and run again"
    exit 1
}
echo "$venv/bin/python"
