#!/bin/sh
# Reduces the Cargo workspace in the current directory to its skeleton: the manifests and
# Cargo.lock as they are, every .rs file replaced by `fn main() {}`, every other file gone.
# The Dockerfiles build the skeleton first, which compiles the dependencies and nothing of
# Gantry's own: that layer is reused until a manifest or Cargo.lock changes (or a source
# file is added, moved or removed), so a change to the code recompiles only the workspace.
set -eu
find . -type f ! -name Cargo.toml ! -name Cargo.lock ! -name '*.rs' -exec rm -f {} +
find . -type f -name '*.rs' | while IFS= read -r file; do
    echo 'fn main() {}' >"$file"
done
