# Common tasks. The scripts are the source of truth; these are shortcuts.

GANTRY_AMQP_URL ?= amqp://guest:guest@127.0.0.1:5672/%2f
GANTRY_DATABASE_URL ?= postgres://gantry:gantry@127.0.0.1:5432/gantry
export GANTRY_AMQP_URL GANTRY_DATABASE_URL

.PHONY: setup test demo fmt lint deny bench bench-kube faults images images-dry-run executor-base bench-llm bench-celery

setup:
	bash scripts/setup.sh

test:
	bash scripts/test.sh

demo:
	bash scripts/demo.sh

fmt:
	cargo fmt --all

lint:
	cargo clippy --workspace --all-targets --locked -- -D warnings

deny:
	cargo deny check

bench: setup
	cargo run --release --locked -p gantry-bench --bin gantry-bench

# The kubernetes runtime against the API double; the dispatcher binary must be built too.
bench-kube: setup
	cargo build --release --locked --bins
	target/release/gantry-bench-kube --tasks 5000 --active 10000 --rounds 3 \
		--writes-per-second 10000 --max-waiting 64

# The fault suite: every fault against a fresh world, one table; exits 1 on a lost task or an
# attempt run twice. Restarts RabbitMQ and Postgres: run it alone.
faults: setup
	cargo build --locked --bins
	target/debug/gantry-faults

# Images (docs/docker.md): the dispatcher and the executor, tagged latest and the git SHA, the
# executor on the existing executor-base:latest. Flags of scripts/build-images.sh go in
# IMAGES_ARGS, e.g. make images IMAGES_ARGS="--engine podman --base-tag 0123456789ab".
images:
	bash scripts/build-images.sh $(IMAGES_ARGS)

# The commands `make images` would run, without running them (no docker or podman needed).
images-dry-run:
	bash scripts/build-images.sh --dry-run $(IMAGES_ARGS)

# Rebuilds and pushes the executor base (CUDA + vLLM). Manual only: nothing runs it on a
# schedule; rebuild the executor on it afterwards (make images).
executor-base:
	bash scripts/build-images.sh $(IMAGES_ARGS) executor-base

# LLM requests straight to a llama.cpp server and through Gantry (docs/benchmarks.md); the
# executor binary must be built too. The first run installs the server (scripts/llm-server.sh).
bench-llm: setup
	cargo build --release --locked --bins
	target/release/gantry-bench-llm

# The same Celery client against a Celery worker (prefork -c 2, acks late) and against
# Gantry's Celery bridge (docs/benchmarks.md). The first run installs celery in a venv
# (scripts/celery-client.sh).
bench-celery: setup
	cargo build --release --locked --bins
	target/release/gantry-bench-celery
