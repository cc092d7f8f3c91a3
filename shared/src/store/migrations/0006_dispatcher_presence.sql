-- The dispatcher process that claimed an attempt with a job of its own: the key of the
-- session advisory lock that process holds while it lives. A claim whose process no longer
-- holds its lock is taken over by a live dispatcher, which follows the attempt's job or
-- fails the attempt as lost. NULL for warm attempts and for claims made before this column.
ALTER TABLE tasks ADD COLUMN dispatcher bigint;
CREATE INDEX tasks_dispatcher_idx ON tasks (dispatcher)
    WHERE state IN ('dispatched', 'running');

-- The warm executors that exist, each counted against its class's max_active_jobs across
-- every dispatcher, and the dispatcher that follows it (taken over as its claims are). A
-- row is made before the executor's job is started and removed when its end is handled.
CREATE TABLE warm_executors (
    job_name text PRIMARY KEY,
    executor text NOT NULL,
    instance text NOT NULL,
    dispatcher bigint NOT NULL,
    started_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX warm_executors_executor_idx ON warm_executors (executor);
