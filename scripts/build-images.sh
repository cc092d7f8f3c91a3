#!/usr/bin/env bash
# Builds and pushes Gantry's images: the dispatcher, the executor registry service, the
# executor base (CUDA + vLLM, rebuilt by hand only) and the executor. `scripts/build-images.sh --help` explains; docs/docker.md
# has the whole story (pins, tags, labels, rollback, troubleshooting).
set -euo pipefail

usage() {
    cat <<'EOF'
Usage: scripts/build-images.sh [FLAGS] [IMAGE...]

Builds Gantry's images from this git checkout, tags each one `latest` and the commit's
12-character SHA (git rev-parse --short=12 HEAD), or the one tag given with --tag, pushes
the tags and prints each with its digest: pin the digest (…@sha256:…) in the catalog's
`image:` or in deploy/.

IMAGE is one or more of (default: dispatcher registry executor; with --platform, the first
two):
  dispatcher      docker/Dockerfile.dispatcher (size budget: 100 MB)
  registry        docker/Dockerfile.registry, the executor registry service (100 MB)
  executor        docker/Dockerfile.executor, FROM an existing executor base
                  (<registry>/executor-base:<--base-tag>, pulled first)
  executor-base   docker/Dockerfile.executor-base: CUDA 12.8.0 + cuDNN, vLLM 0.8.5 in
                  /opt/venv. Never built unless asked for: it is rebuilt by hand.

Flags:
  --with-base        Also build and push the executor base first; the executor is then built
                     on the base's SHA tag just pushed. Same as naming executor-base.
  --base-tag TAG     The existing base tag the executor builds on (default: latest), e.g. the
                     SHA tag of an older base. Not with --with-base.
  --registry REG     Where the images go: REG/dispatcher, REG/registry, REG/executor-base,
                     REG/executor (default: $GANTRY_IMAGE_REGISTRY, else
                     registry.example.com/gantry).
  --tag TAG          Tag the images TAG only (e.g. a release, 1.4.0), not latest and the SHA.
                     The executor then builds on executor-base:TAG if the base is built too.
  --platform LIST    Build for these platforms at once, e.g. linux/amd64,linux/arm64, with
                     docker buildx (or podman --manifest): a multi-platform image, pushed as
                     one index. With --no-push, docker writes it to target/images/ as an OCI
                     archive. Dispatcher and registry only: the executor images are amd64.
  --max-size MB      The size budget of the dispatcher's and the registry's images, checked
                     after each single-platform build (default: 100). Over it: exit 1.
  --engine ENGINE    docker or podman (default: $CONTAINER_ENGINE, else docker if it is on
                     PATH, else podman).
  --no-push          Build and tag only; nothing is pulled or pushed, no digests. The
                     executor builds on the base image the engine has locally.
  --dry-run          Print the commands, one per line prefixed with `+ `, and run none of
                     them. Needs no engine installed.
  -h, --help         This help.

Examples:
  scripts/build-images.sh                          # dispatcher + executor on executor-base:latest
  scripts/build-images.sh --with-base              # refresh the base first (manual, rare)
  scripts/build-images.sh executor-base            # only the base (make executor-base)
  scripts/build-images.sh executor --base-tag 0123456789ab   # executor on an older base
  scripts/build-images.sh --dry-run --engine podman --registry ghcr.io/acme/gantry
  scripts/build-images.sh --no-push --tag dev-local dispatcher   # make build-image
  scripts/build-images.sh --tag 1.4.0 --platform linux/amd64,linux/arm64 dispatcher registry

Make: `make images`, `make images-dry-run`, `make executor-base`; extra flags go in
IMAGES_ARGS, e.g. `make images IMAGES_ARGS="--engine podman --no-push"`. `make help` lists
the targets that build one image by VERSION (build-image, push-image, build-multiarch, …).
Exit status: 0 done, 1 a command or a check failed, 2 bad flags.
EOF
}

# Bad flags: exit 2 with the reason and where the help is.
usage_error() {
    printf 'build-images: %s\n' "$*" >&2
    printf "Run 'scripts/build-images.sh --help' for the flags.\n" >&2
    exit 2
}

fail() {
    printf 'build-images: %s\n' "$*" >&2
    exit 1
}

registry=${GANTRY_IMAGE_REGISTRY:-registry.example.com/gantry}
engine=${CONTAINER_ENGINE:-}
engine_from="CONTAINER_ENGINE"
with_base=false
base_tag=""
tag=""
platforms=""
max_size_mb=100
push=true
dry_run=false
images=()

# set_flag FLAG [VALUE]: the value of --registry, --engine or --base-tag; exits 2 without one.
set_flag() {
    if (($# < 2)) || [[ -z $2 || $2 == -* ]]; then
        usage_error "$1 needs a value"
    fi
    case $1 in
    --registry) registry=$2 ;;
    --engine) engine=$2 engine_from="--engine" ;;
    --base-tag) base_tag=$2 ;;
    --tag) tag=$2 ;;
    --platform) platforms=$2 ;;
    --max-size) max_size_mb=$2 ;;
    esac
}

while (($# > 0)); do
    case $1 in
    -h | --help)
        usage
        exit 0
        ;;
    --registry | --engine | --base-tag | --tag | --platform | --max-size)
        set_flag "$@"
        shift
        ;;
    --registry=* | --engine=* | --base-tag=* | --tag=* | --platform=* | --max-size=*)
        set_flag "${1%%=*}" "${1#*=}"
        ;;
    --with-base) with_base=true ;;
    --no-push) push=false ;;
    --dry-run) dry_run=true ;;
    -*) usage_error "unknown flag: $1" ;;
    dispatcher | registry | executor | executor-base) images+=("$1") ;;
    *) usage_error "unknown image: $1 (the images are dispatcher, registry, executor and executor-base)" ;;
    esac
    shift
done

if ((${#images[@]} == 0)); then
    if [[ -n $platforms ]]; then
        images=(dispatcher registry)
    else
        images=(dispatcher registry executor)
    fi
fi
build_dispatcher=false
build_registry=false
build_base=$with_base
build_executor=false
for image in "${images[@]}"; do
    case $image in
    dispatcher) build_dispatcher=true ;;
    registry) build_registry=true ;;
    executor-base) build_base=true ;;
    executor) build_executor=true ;;
    esac
done

registry=${registry%/}
if [[ ! $registry =~ ^[a-z0-9][a-z0-9._:/-]*$ ]]; then
    usage_error "registry '$registry' is not a lowercase host[:port][/path], e.g. registry.example.com/gantry"
fi
if [[ -n $base_tag ]]; then
    if $build_base; then
        usage_error "--base-tag names an existing base; with --with-base (or executor-base) the executor builds on the base just built"
    fi
    if ! $build_executor; then
        usage_error "--base-tag is the base of the executor, which is not being built"
    fi
    if [[ ! $base_tag =~ ^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$ ]]; then
        usage_error "--base-tag '$base_tag' is not an image tag (letters, digits, _ . -)"
    fi
fi
base_tag=${base_tag:-latest}
if [[ -n $tag && ! $tag =~ ^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$ ]]; then
    usage_error "--tag '$tag' is not an image tag (letters, digits, _ . -)"
fi
if [[ -n $platforms ]]; then
    if [[ ! $platforms =~ ^[a-z0-9]+/[a-z0-9]+(/[a-z0-9]+)?(,[a-z0-9]+/[a-z0-9]+(/[a-z0-9]+)?)*$ ]]; then
        usage_error "--platform '$platforms' is not a comma-separated list such as linux/amd64,linux/arm64"
    fi
    if $build_base || $build_executor; then
        usage_error "--platform builds the dispatcher and the registry only: the executor images are linux/amd64 (CUDA and vLLM for x86_64 GPU nodes); name dispatcher and/or registry"
    fi
fi
if [[ ! $max_size_mb =~ ^[1-9][0-9]{0,5}$ ]]; then
    usage_error "--max-size '$max_size_mb' is not a size in MB (a whole number, 1 or more)"
fi

if [[ -z $engine ]]; then
    if command -v docker >/dev/null 2>&1; then
        engine=docker
    elif command -v podman >/dev/null 2>&1; then
        engine=podman
    elif $dry_run; then
        engine=docker
    else
        fail "neither docker nor podman is on PATH: install one, or see the commands with --dry-run"
    fi
elif [[ $engine != docker && $engine != podman ]]; then
    usage_error "$engine_from must be docker or podman, not '$engine'"
elif ! $dry_run && ! command -v "$engine" >/dev/null 2>&1; then
    fail "$engine ($engine_from) is not on PATH"
fi

# The workspace root: the build context of the dispatcher and the executor.
here=${BASH_SOURCE[0]%/*}
[[ $here == "${BASH_SOURCE[0]}" ]] && here=.
cd "$here/.."

if ! revision=$(git rev-parse --verify HEAD 2>/dev/null); then
    fail "$PWD is not a git checkout with a commit: the images are tagged with its SHA"
fi
sha=$(git rev-parse --short=12 HEAD)
if [[ -n $(git status --porcelain --untracked-files=no 2>/dev/null) ]]; then
    printf 'build-images: warning: uncommitted changes; the images tagged %s will contain them\n' "$sha" >&2
fi
build_time=$(date -u +%Y-%m-%dT%H:%M:%SZ)
# podman writes the digest of each push here (--digestfile), buildx its metadata: the
# digest the registry got.
digest_dir=target/image-digests
# Multi-platform builds that are not pushed (docker): OCI archives.
archive_dir=target/images

# $1 as the shell would need it: bare when it is safe, else in single quotes.
quote() {
    if [[ $1 =~ ^[A-Za-z0-9_./:=@,+%-]+$ ]]; then
        printf '%s' "$1"
    else
        printf "'%s'" "${1//\'/\'\\\'\'}"
    fi
}

# Prints a command: `+ ` and its words, quoted as needed.
show() {
    local line="+" word
    for word in "$@"; do
        line+=" $(quote "$word")"
    done
    printf '%s\n' "$line"
}

# Prints the command, then runs it unless --dry-run; a failure stops the script (exit 1).
run() {
    show "$@"
    if ! $dry_run; then
        "$@" || fail "$1 $2 failed (exit $?); nothing after it was run"
    fi
}

# Lines "tag digest" of every push, for the summary.
pushed=()
# The template of `docker inspect` that lists an image's repository digests, one a line.
repo_digests='{{range .RepoDigests}}{{println .}}{{end}}'

# The tags of every image, in the order they are pushed: the SHA, then latest; or --tag.
if [[ -n $tag ]]; then
    tags=("$tag")
else
    tags=("$sha" latest)
fi
# podman writes an OCI image by default, which has no HEALTHCHECK: the docker format keeps it.
format=()
[[ $engine == podman ]] && format=(--format docker)

# build_image NAME DOCKERFILE CONTEXT [ENGINE ARGS...]: one build, tagged with every tag.
build_image() {
    local name=$1 file=$2 context=$3 t
    shift 3
    local tagged=()
    for t in "${tags[@]}"; do
        tagged+=(-t "$registry/$name:$t")
    done
    run "$engine" build "${format[@]}" -f "$file" "${tagged[@]}" "$@" "$context"
}

# pushed_line REF DIGEST_REF: records and prints one pushed tag and its digest.
pushed_line() {
    printf 'pushed %s %s\n' "$1" "$2"
    pushed+=("$1 $2")
}

# push_image NAME: pushes each tag and prints it with its digest.
push_image() {
    local name=$1 t ref digest
    $push || return 0
    for t in "${tags[@]}"; do
        ref=$registry/$name:$t
        if [[ $engine == podman ]]; then
            $dry_run || mkdir -p "$digest_dir"
            run podman push --digestfile "$digest_dir/$name-$t" "$ref"
            $dry_run && continue
            digest=$registry/$name@$(<"$digest_dir/$name-$t")
        else
            run docker push "$ref"
            # Every repository digest of the image; ours is the one of this repository.
            show docker inspect --format "$repo_digests" "$ref"
            $dry_run && continue
            digest=$(docker inspect --format "$repo_digests" "$ref" |
                grep -m1 "^$registry/$name@sha256:" || true)
            [[ -n $digest ]] || fail "pushed $ref but docker reports no digest for $registry/$name"
        fi
        pushed_line "$ref" "$digest"
    done
}

# check_size NAME: the image just built (its first tag) within --max-size MB, as `docker
# images` counts (10^6 bytes), or exit 1.
check_size() {
    local ref=$registry/$1:${tags[0]} bytes
    show "$engine" image inspect --format '{{.Size}}' "$ref"
    $dry_run && return 0
    bytes=$("$engine" image inspect --format '{{.Size}}' "$ref") ||
        fail "cannot read the size of $ref"
    [[ $bytes =~ ^[0-9]+$ ]] || fail "$engine gave '$bytes' as the size of $ref"
    if ((bytes > max_size_mb * 1000000)); then
        fail "$ref is $((bytes / 1000000)) MB, over its budget of $max_size_mb MB: see docs/docker.md (Size) for what to look at; --max-size changes the budget"
    fi
    printf 'size %s %s MB (budget %s MB)\n' "$ref" "$(((bytes + 999999) / 1000000))" "$max_size_mb"
}

# build_multiarch NAME DOCKERFILE [ENGINE ARGS...]: one build for every --platform, pushed
# as one index (or, with --no-push, written to target/images/ by docker).
build_multiarch() {
    local name=$1 file=$2 t digest
    shift 2
    local tagged=()
    for t in "${tags[@]}"; do
        tagged+=(-t "$registry/$name:$t")
    done
    if [[ $engine == podman ]]; then
        # One manifest list, filled by one build per platform, pushed with all its images.
        run podman build "${format[@]}" --platform "$platforms" -f "$file" \
            --manifest "$registry/$name:${tags[0]}" "$@" .
        $push || return 0
        $dry_run || mkdir -p "$digest_dir"
        for t in "${tags[@]}"; do
            run podman manifest push --all --digestfile "$digest_dir/$name-$t" \
                "$registry/$name:${tags[0]}" "docker://$registry/$name:$t"
            $dry_run || pushed_line "$registry/$name:$t" "$registry/$name@$(<"$digest_dir/$name-$t")"
        done
        return 0
    fi
    if ! $push; then
        # A multi-platform image cannot be loaded into docker's own image store.
        $dry_run || mkdir -p "$archive_dir"
        run docker buildx build --platform "$platforms" -f "$file" "${tagged[@]}" "$@" \
            --output "type=oci,dest=$archive_dir/$name-${tags[0]}.oci.tar" .
        return 0
    fi
    $dry_run || mkdir -p "$digest_dir"
    run docker buildx build --platform "$platforms" -f "$file" "${tagged[@]}" "$@" \
        --push --metadata-file "$digest_dir/$name.json" .
    $dry_run && return 0
    digest=$(grep -o '"containerimage.digest": *"sha256:[0-9a-f]*"' "$digest_dir/$name.json" |
        grep -o 'sha256:[0-9a-f]*' || true)
    [[ -n $digest ]] || fail "pushed $registry/$name but buildx wrote no digest to $digest_dir/$name.json"
    for t in "${tags[@]}"; do
        pushed_line "$registry/$name:$t" "$registry/$name@$digest"
    done
}

# service_image NAME DOCKERFILE: the dispatcher or the registry, with its labels given here
# (their Dockerfiles label only what does not change).
service_image() {
    local labels=(--label "org.opencontainers.image.created=$build_time"
        --label "org.opencontainers.image.revision=$revision")
    if [[ -n $platforms ]]; then
        build_multiarch "$1" "$2" "${labels[@]}"
    else
        build_image "$1" "$2" . "${labels[@]}"
        check_size "$1"
        push_image "$1"
    fi
}

if $build_dispatcher; then
    service_image dispatcher docker/Dockerfile.dispatcher
fi
if $build_registry; then
    service_image registry docker/Dockerfile.registry
fi

if $build_base; then
    # The base copies nothing from its context: docker/ is enough (not the whole workspace).
    build_image executor-base docker/Dockerfile.executor-base docker \
        --build-arg "BUILD_TIME=$build_time" \
        --build-arg "GIT_REVISION=$revision"
    push_image executor-base
    base_ref=$registry/executor-base:${tags[0]}
else
    base_ref=$registry/executor-base:$base_tag
fi

if $build_executor; then
    if ! $build_base && $push; then
        # The registry's base, not a stale local copy of the same tag.
        show "$engine" pull "$base_ref"
        if ! $dry_run && ! "$engine" pull "$base_ref"; then
            fail "no base image $base_ref: build one with --with-base (or make executor-base), or name an existing one with --base-tag"
        fi
    fi
    build_image executor docker/Dockerfile.executor . \
        --build-arg "EXECUTOR_BASE=$base_ref" \
        --build-arg "BUILD_TIME=$build_time" \
        --build-arg "GIT_REVISION=$revision"
    push_image executor
fi

if ! $dry_run; then
    if $push; then
        printf '\nPushed (tag, then the digest to pin):\n'
        printf '  %s\n' "${pushed[@]}"
    else
        printf '\nBuilt, not pushed (--no-push): tags %s\n' "${tags[*]}"
    fi
fi
