#!/usr/bin/env bash
# Installs the real Celery client (and worker) from PyPI, for the tests and the benchmark of
# Gantry's Celery bridge (docs/celery.md).
#
#   bash scripts/celery-client.sh        # prints the venv's python on its last line
#
# The venv lives outside the checkout ($GANTRY_CELERY_VENV, default
# $HOME/.cache/gantry/celery-venv); pip keeps the wheels in its own cache, so a new venv
# installs in seconds after the first time.
set -euo pipefail

# shellcheck source=scripts/venv.sh
source "$(dirname "$0")/venv.sh"

CELERY_VERSION=5.5.3
pinned_venv celery-client "${GANTRY_CELERY_VENV:-$HOME/.cache/gantry/celery-venv}" celery "$CELERY_VERSION" \
    'celery, kombu'
