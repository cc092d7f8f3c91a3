-- What Gantry keeps of a task that came from a Celery client, beside the task itself: the
-- client's reply queue (results go back there in the format of Celery's rpc:// backend),
-- the Celery context the task message has no field for, and where the deadline came from.
-- A row here is what marks a task's reply as Celery's; it is written by the Celery bridge
-- before the task is published, so every later step (result, revoke, dead letter, replay)
-- finds it.
CREATE TABLE celery_tasks (
    task_id       uuid PRIMARY KEY,
    reply_to      text,
    root_id       text,
    parent_id     text,
    group_id      text,
    retries       integer NOT NULL DEFAULT 0,
    eta           timestamptz,
    deadline_from text NOT NULL,
    received_at   timestamptz NOT NULL DEFAULT now()
);
