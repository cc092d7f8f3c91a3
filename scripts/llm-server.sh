#!/usr/bin/env bash
# Installs a real OpenAI-compatible model server that runs on CPU, for the tests and the
# benchmark of the `openai` engine: the server of llama-cpp-python, and the `gguf` package
# that writes the tiny test model (see tests/llm/make_model.py).
#
#   bash scripts/llm-server.sh        # prints the venv's python on its last line
#
# The venv lives outside the checkout ($GANTRY_LLM_VENV, default
# $HOME/.cache/gantry/llm-venv) because PyPI has only the source of llama-cpp-python: the
# first install compiles llama.cpp (10 to 20 minutes on two cores). pip keeps the wheel it
# built in its own cache, so even a new venv installs in seconds afterwards.
set -euo pipefail

# shellcheck source=scripts/venv.sh
source "$(dirname "$0")/venv.sh"

LLAMA_CPP_PYTHON_VERSION=0.3.36
GGUF_VERSION=0.19.0
venv="${GANTRY_LLM_VENV:-$HOME/.cache/gantry/llm-venv}"
stamp="$venv/.gantry-llm-$LLAMA_CPP_PYTHON_VERSION-$GGUF_VERSION"

say() { printf 'llm-server: %s\n' "$*" >&2; }

if [[ ! -f "$stamp" ]]; then
    make_venv "$venv"
    say "installing llama-cpp-python[server]==$LLAMA_CPP_PYTHON_VERSION and gguf==$GGUF_VERSION into $venv"
    say "(the first install compiles llama.cpp: 10 to 20 minutes on two cores; later ones reuse pip's wheel)"
    # Not tuned to this CPU: the wheel pip caches must run on the next machine too.
    CMAKE_ARGS="-DGGML_NATIVE=OFF" "$venv/bin/pip" install --quiet \
        "llama-cpp-python[server]==$LLAMA_CPP_PYTHON_VERSION" "gguf==$GGUF_VERSION"
    touch "$stamp"
fi
"$venv/bin/python" -c 'import llama_cpp, gguf' || {
    say "the venv at $venv is broken; remove it and run again"
    exit 1
}
echo "$venv/bin/python"
