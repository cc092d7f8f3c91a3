# Common tasks. The scripts are the source of truth; these are shortcuts.

GANTRY_AMQP_URL ?= amqp://guest:guest@127.0.0.1:5672/%2f
GANTRY_DATABASE_URL ?= postgres://gantry:gantry@127.0.0.1:5432/gantry
export GANTRY_AMQP_URL GANTRY_DATABASE_URL

.PHONY: help setup test demo fmt lint deny bench bench-kube bench-observability bench-warm faults images images-dry-run executor-base bench-llm bench-celery \
	build-image push-image build-multiarch push-multiarch run-local test-image logs stop clean image-settings

help: ## These targets and the settings of the image targets
	@printf 'Targets (make TARGET [SETTING=value ...]):\n'
	@grep -E '^[a-z][a-z-]*:.*## ' $(MAKEFILE_LIST) | sed -E 's/^([a-z-]+):.*## (.*)/\1|\2/' | \
		awk -F'|' '{ printf "  %-18s %s\n", $$1, $$2 }'
	@printf '\nSettings of the image targets (now):\n'
	@printf '  IMAGE=%s  dispatcher or registry\n' '$(IMAGE)'
	@printf '  VERSION=%s  the tag\n' '$(VERSION)'
	@printf '  IMAGE_REPOSITORY=%s  images are IMAGE_REPOSITORY/IMAGE:VERSION\n' '$(IMAGE_REPOSITORY)'
	@printf '  PLATFORMS=%s  of build-multiarch and push-multiarch\n' '$(PLATFORMS)'
	@printf '  CONTAINER_ENGINE=%s  docker, else podman, found on PATH\n' '$(CONTAINER_ENGINE)'
	@printf '\nMore: docs/docker.md (images), scripts/*.sh --help.\n'

setup: ## Start or check RabbitMQ and Postgres for the tests
	bash scripts/setup.sh

test: ## Every check: format, lints, licences, the tests
	bash scripts/test.sh

demo: ## A task through the whole system, on this machine
	bash scripts/demo.sh

fmt: ## cargo fmt
	cargo fmt --all

lint: ## cargo clippy, warnings as errors
	cargo clippy --workspace --all-targets --locked -- -D warnings

deny: ## cargo deny check
	cargo deny check

bench: setup ## Throughput benchmark (docs/benchmarks.md)
	cargo run --release --locked -p gantry-bench --bin gantry-bench

# The kubernetes runtime against the API double; the dispatcher binary must be built too.
bench-kube: setup ## The kubernetes runtime against the API double
	cargo build --release --locked --bins
	target/release/gantry-bench-kube --tasks 5000 --active 10000 --rounds 3 \
		--writes-per-second 10000 --max-waiting 64

# What metrics and traces cost the kubernetes runtime: each round observed and not.
bench-observability: setup ## The kubernetes runtime with metrics and traces on and off
	cargo build --release --locked --bins
	target/release/gantry-bench-kube --tasks 5000 --active 0 --rounds 5 \
		--writes-per-second 10000 --max-waiting 64 --observability

# One job per task against warm executors, for an engine that takes 20 s to start and tasks
# of 1 s (docs/benchmarks.md); then the warm echo class against a bare RabbitMQ loop.
bench-warm: setup ## One job per task against warm executors (docs/benchmarks.md)
	cargo build --release --locked --bins
	target/release/gantry-bench-warm --tasks 500 --rate 5 --start-delay 20s --work 1s
	target/release/gantry-bench --tasks 5000 --concurrency 16 --max-active 2 --warm 64

# The fault suite: every fault against a fresh world, one table; exits 1 on a lost task or an
# attempt run twice. Restarts RabbitMQ and Postgres: run it alone.
faults: setup ## The fault suite (restarts RabbitMQ and Postgres)
	cargo build --locked --bins
	target/debug/gantry-faults

# Images (docs/docker.md): the dispatcher and the executor, tagged latest and the git SHA, the
# executor on the existing executor-base:latest. Flags of scripts/build-images.sh go in
# IMAGES_ARGS, e.g. make images IMAGES_ARGS="--engine podman --base-tag 0123456789ab".
images: ## Release images: dispatcher, registry, executor; tags latest + SHA; push
	bash scripts/build-images.sh $(IMAGES_ARGS)

# The commands `make images` would run, without running them (no docker or podman needed).
images-dry-run: ## The commands of make images, not run
	bash scripts/build-images.sh --dry-run $(IMAGES_ARGS)

# Rebuilds and pushes the executor base (CUDA + vLLM). Manual only: nothing runs it on a
# schedule; rebuild the executor on it afterwards (make images).
executor-base: ## Rebuild and push the executor base (manual only)
	bash scripts/build-images.sh $(IMAGES_ARGS) executor-base

# LLM requests straight to a llama.cpp server and through Gantry (docs/benchmarks.md); the
# executor binary must be built too. The first run installs the server (scripts/llm-server.sh).
bench-llm: setup ## LLM requests direct and through Gantry
	cargo build --release --locked --bins
	target/release/gantry-bench-llm

# One image by version (docs/docker.md): the dispatcher's or the registry's, as
# IMAGE_REPOSITORY/IMAGE:VERSION. Every build goes through scripts/build-images.sh (its flags
# in IMAGES_ARGS: IMAGES_ARGS=--dry-run prints its commands); the container targets
# (run-local, test-image, logs, stop, clean) are the engine's commands, which `make -n
# TARGET` prints without running them.
IMAGE ?= dispatcher
VERSION ?= dev-local
IMAGE_REPOSITORY ?= $(or $(GANTRY_IMAGE_REGISTRY),registry.example.com/gantry)
PLATFORMS ?= linux/amd64,linux/arm64
CONTAINER_ENGINE ?= $(shell if command -v docker >/dev/null 2>&1; then echo docker; \
	elif command -v podman >/dev/null 2>&1; then echo podman; else echo docker; fi)
IMAGE_REF = $(IMAGE_REPOSITORY)/$(IMAGE):$(VERSION)
CONTAINER = gantry-$(IMAGE)-local
BUILD_IMAGE = bash scripts/build-images.sh --engine $(CONTAINER_ENGINE) \
	--registry $(IMAGE_REPOSITORY) --tag $(VERSION) $(IMAGES_ARGS)

# How run-local starts each image: on the host's network, so that RabbitMQ, Postgres, a
# registry and a kind cluster on 127.0.0.1 are reachable, and serving on loopback only;
# with a read-only root filesystem, as deploy/ runs it. The dispatcher runs on the
# kubernetes runtime against $$KUBECONFIG (default ~/.kube/config), mounted read-only and
# read as your own user (the image's 65532 could not read a 0600 file of yours). --mount,
# unlike -v, fails when the file is missing instead of creating a directory in its place.
KUBECONFIG_FILE ?= $(or $(firstword $(subst :, ,$(KUBECONFIG))),$(HOME)/.kube/config)
REGISTRY_SOURCES ?= http://127.0.0.1:5000
RUN_dispatcher = -e GANTRY_AMQP_URL -e GANTRY_DATABASE_URL -e GANTRY_HTTP_ADDR=127.0.0.1:8380 \
	--mount type=bind,src=$(KUBECONFIG_FILE),dst=/etc/gantry/kubeconfig,readonly \
	-e KUBECONFIG=/etc/gantry/kubeconfig \
	--user $(shell id -u):$(shell id -g)
ARGS_dispatcher = --runtime=kubernetes
RUN_registry = -e GANTRY_REGISTRY_SOURCES=$(REGISTRY_SOURCES) -e GANTRY_REGISTRY_LISTEN=127.0.0.1:8080
ARGS_registry =
# The image's own health check command (its HEALTHCHECK).
PROBE_dispatcher = probe
PROBE_registry = --probe

image-settings:
	@case '$(IMAGE)' in dispatcher | registry) ;; *) \
		echo "make: IMAGE=$(IMAGE): the images built by VERSION are dispatcher and registry (the executor's: make images)" >&2; \
		exit 2 ;; esac

build-image: image-settings ## Build IMAGE for this machine as IMAGE_REPOSITORY/IMAGE:VERSION; checks its size budget
	$(BUILD_IMAGE) --no-push $(IMAGE)

push-image: image-settings ## Build (cached) and push IMAGE_REPOSITORY/IMAGE:VERSION; prints its digest
	$(BUILD_IMAGE) $(IMAGE)

build-multiarch: image-settings ## Build IMAGE for PLATFORMS (buildx); docker writes target/images/IMAGE-VERSION.oci.tar
	$(BUILD_IMAGE) --no-push --platform $(PLATFORMS) $(IMAGE)

push-multiarch: image-settings ## Build IMAGE for PLATFORMS and push it as one multi-platform image
	$(BUILD_IMAGE) --platform $(PLATFORMS) $(IMAGE)

run-local: image-settings ## Start IMAGE_REPOSITORY/IMAGE:VERSION in the background as the container gantry-IMAGE-local
	-$(CONTAINER_ENGINE) rm -f $(CONTAINER) >/dev/null 2>&1
	$(CONTAINER_ENGINE) run -d --name $(CONTAINER) --network host --read-only \
		$(RUN_$(IMAGE)) $(IMAGE_REF) $(ARGS_$(IMAGE))

# The last line: nothing serves in a fresh container, so its probe must say so and exit 1.
test-image: image-settings ## Check the built image: its binary runs, as 65532, with a health check that answers
	$(CONTAINER_ENGINE) run --rm $(IMAGE_REF) --version
	test "$$($(CONTAINER_ENGINE) image inspect --format '{{.Config.User}}' $(IMAGE_REF))" = 65532:65532
	$(CONTAINER_ENGINE) image inspect --format '{{json .Config.Healthcheck.Test}}' $(IMAGE_REF) | \
		grep -F '"$(PROBE_$(IMAGE))"'
	! $(CONTAINER_ENGINE) run --rm --network none $(IMAGE_REF) $(PROBE_$(IMAGE))

logs: image-settings ## Follow the log of gantry-IMAGE-local
	$(CONTAINER_ENGINE) logs -f $(CONTAINER)

stop: image-settings ## Stop and remove gantry-IMAGE-local
	$(CONTAINER_ENGINE) rm -f $(CONTAINER)

clean: image-settings ## stop, then remove IMAGE_REPOSITORY/IMAGE:VERSION and target/images, target/image-digests
	-$(CONTAINER_ENGINE) rm -f $(CONTAINER)
	-$(CONTAINER_ENGINE) rmi $(IMAGE_REF)
	rm -rf target/images target/image-digests

# The same Celery client against a Celery worker (prefork -c 2, acks late) and against
# Gantry's Celery bridge (docs/benchmarks.md). The first run installs celery in a venv
# (scripts/celery-client.sh).
bench-celery: setup ## The Celery bridge beside a Celery worker (docs/benchmarks.md)
	cargo build --release --locked --bins
	target/release/gantry-bench-celery
