# Common tasks. The scripts are the source of truth; these are shortcuts.

GANTRY_AMQP_URL ?= amqp://guest:guest@127.0.0.1:5672/%2f
GANTRY_DATABASE_URL ?= postgres://gantry:gantry@127.0.0.1:5432/gantry
export GANTRY_AMQP_URL GANTRY_DATABASE_URL

.PHONY: setup test demo fmt lint deny bench bench-kube faults

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
