#!/usr/bin/env bash
# End-to-end demo: applies the RabbitMQ topology, starts a dispatcher with the
# local runtime, submits 20 echo tasks, waits for each to succeed, and prints
# their timeline from PostgreSQL. Then LLM work: a chat task for the `openai`
# engine, answered by a real model server on CPU (llama.cpp's, with a tiny
# random model) that the executor starts inside its job, its tokens streamed to
# the terminal as they are generated, then its result with usage.
#
#   bash scripts/demo.sh
#
# Runs scripts/setup.sh first (needs root or sudo), and scripts/llm-server.sh,
# whose first run compiles llama.cpp (10 to 20 minutes on two cores; later runs
# reuse the build from $HOME/.cache).
set -euo pipefail

cd "$(dirname "$0")/.."

TASKS=20
STOP_WAIT_SECS=20

say() { printf 'demo: %s\n' "$*"; }

say "setup"
bash scripts/setup.sh

say "building release binaries"
cargo build --release --locked --bins

say "installing the CPU model server (the first run compiles llama.cpp: 10 to 20 minutes)"
LLM_PYTHON="$(bash scripts/llm-server.sh | tail -n 1)"

export GANTRY_AMQP_URL='amqp://guest:guest@127.0.0.1:5672/%2f'
export GANTRY_DATABASE_URL='postgres://gantry:gantry@127.0.0.1:5432/gantry'
export GANTRY_PREFIX=gantry-demo

GANTRY=target/release/gantry
DISPATCHER=target/release/gantry-dispatcher

tmp="$(mktemp -d)"
dispatcher_pid=""

# Sends SIGTERM to the dispatcher and waits (bounded) for it to exit.
stop_dispatcher() {
    [[ -n "$dispatcher_pid" ]] || return 0
    local pid="$dispatcher_pid" status=0 i
    dispatcher_pid=""
    if kill -0 "$pid" 2>/dev/null; then
        say "stopping dispatcher (SIGTERM to pid $pid)"
        kill -TERM "$pid" 2>/dev/null || true
        for ((i = 0; i < STOP_WAIT_SECS * 10; i++)); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.1
        done
        if kill -0 "$pid" 2>/dev/null; then
            say "dispatcher still running after ${STOP_WAIT_SECS}s; sending SIGKILL"
            kill -KILL "$pid" 2>/dev/null || true
        fi
    fi
    wait "$pid" 2>/dev/null || status=$?
    say "dispatcher exited with status $status"
}

# shellcheck disable=SC2317 # invoked by the EXIT trap
on_exit() {
    local rc=$?
    trap - EXIT
    stop_dispatcher || true
    if [[ $rc -ne 0 ]]; then
        if [[ -s "$tmp/dispatcher.log" ]]; then
            say "FAILED (exit $rc); last lines of $tmp/dispatcher.log:"
            tail -n 60 "$tmp/dispatcher.log" | sed 's/^/    /'
        else
            say "FAILED (exit $rc)"
        fi
        say "logs kept in $tmp"
    else
        rm -rf "$tmp"
    fi
    exit "$rc"
}
trap on_exit EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# The catalog: `echo`, and `chat`, an openai class whose jobs each start the model server.
model="$tmp/tiny.gguf"
"$LLM_PYTHON" tests/llm/make_model.py "$model" >/dev/null
export GANTRY_CATALOG="$tmp/catalog.yaml"
cat >"$GANTRY_CATALOG" <<YAML
executors:
  echo:
    engine: { kind: echo }
    max_active_jobs: 8
  chat:
    engine:
      kind: openai
      model: tiny
      server: ["$LLM_PYTHON", "-m", "llama_cpp.server", "--model", "$model",
               "--model_alias", "{model}", "--host", "127.0.0.1", "--port", "{port}",
               "--n_ctx", "512", "--interrupt_requests", "False"]
      startup_timeout: 2m
    max_active_jobs: 2
YAML
say "catalog: $GANTRY_CATALOG (classes echo and chat)"

say "applying topology (prefix $GANTRY_PREFIX)"
"$GANTRY" topology apply

# The dispatcher would create the schema at start too; `gantry wait` below only reads it.
say "creating the Postgres schema (if missing)"
"$GANTRY" db migrate

say "starting dispatcher (runtime local, log $tmp/dispatcher.log)"
"$DISPATCHER" --runtime local --state-dir "$tmp/state" >"$tmp/dispatcher.log" 2>&1 &
dispatcher_pid=$!

uuid_re='^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$'
ids=()
say "submitting $TASKS tasks"
for ((i = 1; i <= TASKS; i++)); do
    out="$("$GANTRY" submit --executor echo --task demo.echo --payload "{\"n\":$i,\"sleep_ms\":200}")"
    id="$(printf '%s\n' "$out" | sed '/^[[:space:]]*$/d' | tail -n 1 | tr -d '[:space:]')"
    if [[ ! "$id" =~ $uuid_re ]]; then
        say "submit #$i did not print a task id; it printed: $out"
        exit 1
    fi
    ids+=("$id")
done
say "submitted ${#ids[@]} tasks"

if ! kill -0 "$dispatcher_pid" 2>/dev/null; then
    say "the dispatcher is not running"
    exit 1
fi

succeeded=0
failed=0
for id in "${ids[@]}"; do
    if out="$("$GANTRY" wait "$id" --timeout 60s 2>&1)"; then
        succeeded=$((succeeded + 1))
    else
        rc=$?
        failed=$((failed + 1))
        say "task $id did not succeed (gantry wait exit $rc): $out"
    fi
done

id_array="{$(
    IFS=,
    printf '%s' "${ids[*]}"
)}"
psql "$GANTRY_DATABASE_URL" -X -v ON_ERROR_STOP=1 -P pager=off -c "
SELECT task_id,
       state,
       attempt,
       received_at,
       finished_at,
       round(extract(epoch FROM (finished_at - received_at)) * 1000)::bigint AS duration_ms
  FROM tasks
 WHERE task_id = ANY('$id_array'::uuid[])
 ORDER BY received_at"

if ((failed > 0)); then
    say "$succeeded/$TASKS succeeded, $failed did not"
    exit 1
fi
say "$succeeded/$TASKS succeeded"

say "LLM work: a chat task, its tokens streamed as they come, then its result"
chat_out="$tmp/chat.json"
"$GANTRY" submit --executor chat --task llm.chat \
    --payload '{"messages":[{"role":"user","content":"hi"}],"max_tokens":16}' \
    --wait --stream --json >"$chat_out"
chat_id="$(sed -n 's/.*"task_id": *"\([^"]*\)".*/\1/p' "$chat_out" | head -n 1)"
say "the result, as stored:"
sed 's/^/    /' "$chat_out"
"$GANTRY" status "$chat_id"

stop_dispatcher
exit 0
