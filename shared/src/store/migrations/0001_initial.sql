-- Tasks: one row per task, its current state and the evidence of its latest attempt.
CREATE TABLE tasks (
    task_id          uuid PRIMARY KEY,
    task             text NOT NULL,
    executor         text NOT NULL,
    state            text NOT NULL,
    attempt          integer NOT NULL CHECK (attempt >= 1),
    reply_to         text,
    idempotency_key  text,
    traceparent      text,
    deadline         timestamptz NOT NULL,
    submitted_at     timestamptz NOT NULL,
    received_at      timestamptz NOT NULL DEFAULT now(),
    dispatched_at    timestamptz,
    started_at       timestamptz,
    finished_at      timestamptz,
    dispatch_id      text,
    job_name         text,
    pod_name         text,
    node             text,
    terminal_reason  text,
    result           jsonb,
    error            jsonb,
    forwarded_at     timestamptz,
    updated_at       timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX tasks_state_idx ON tasks (state, executor);

-- Every transition, append-only; idempotent on (task_id, attempt, event).
CREATE TABLE task_events (
    id       bigserial PRIMARY KEY,
    task_id  uuid NOT NULL,
    attempt  integer NOT NULL,
    event    text NOT NULL,
    detail   jsonb,
    at       timestamptz NOT NULL DEFAULT now(),
    UNIQUE (task_id, attempt, event)
);

-- Every dead letter seen on the audit queue.
CREATE TABLE dead_letters (
    id              uuid PRIMARY KEY,
    message_id      text,
    task_id         uuid,
    task            text,
    executor        text,
    reason          text NOT NULL,
    reason_kind     text NOT NULL,
    death           jsonb,
    headers         jsonb NOT NULL,
    body            bytea NOT NULL,
    body_truncated  boolean NOT NULL DEFAULT false,
    dead_at         timestamptz NOT NULL,
    recorded_at     timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX dead_letters_dead_at_idx ON dead_letters (dead_at DESC);
CREATE INDEX dead_letters_task_idx ON dead_letters (task_id);
