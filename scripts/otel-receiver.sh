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
pinned_venv otel-receiver "${GANTRY_OTEL_VENV:-$HOME/.cache/gantry/otel-venv}" oteltest "$OTELTEST_VERSION" \
    'oteltest.sink, opentelemetry.proto'
