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

# pinned_venv TOOL DIR PACKAGE VERSION IMPORTS: makes sure the venv at DIR has
# PACKAGE==VERSION (installed once, remembered by a stamp file), checks that `import IMPORTS`
# works there, and prints the venv's python. TOOL names the script in its messages.
pinned_venv() {
    local tool="$1" venv="$2" package="$3" version="$4" imports="$5"
    local stamp="$venv/.gantry-$package-$version"
    if [[ ! -f "$stamp" ]]; then
        make_venv "$venv"
        printf '%s: installing %s==%s into %s\n' "$tool" "$package" "$version" "$venv" >&2
        "$venv/bin/pip" install --quiet "$package==$version"
        touch "$stamp"
    fi
    "$venv/bin/python" -c "import $imports" || {
        printf '%s: the venv at %s is broken; remove it and run again\n' "$tool" "$venv" >&2
        exit 1
    }
    echo "$venv/bin/python"
}
