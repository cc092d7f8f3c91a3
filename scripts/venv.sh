# Sourced by the scripts that install a real peer from PyPI into a venv of its own
# (celery-client.sh, llm-server.sh, otel-receiver.sh).

# make_venv DIR: creates a venv at DIR unless one is there, installing Debian's python3-venv
# first if need be (Debian's system Python refuses `pip install`: PEP 668).
make_venv() {
    local venv="$1"
    [[ -x "$venv/bin/python" ]] && return 0
    mkdir -p "$(dirname "$venv")"
    python3 -m venv "$venv" 2>/dev/null || {
        printf '%s: installing python3-venv\n' "$(basename "$0" .sh)" >&2
        apt-get install -y --no-install-recommends python3-venv >/dev/null
        python3 -m venv "$venv"
    }
}
