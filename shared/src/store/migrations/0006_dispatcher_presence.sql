-- The dispatcher process that claimed an attempt with a job of its own: the key of the
-- session advisory lock that process holds while it lives. A claim whose process no longer
-- holds its lock is taken over by a live dispatcher, which follows the attempt's job or
-- fails the attempt as lost. NULL for warm attempts and for claims made before this column.
ALTER TABLE tasks ADD COLUMN dispatcher bigint;
CREATE INDEX tasks_dispatcher_idx ON tasks (dispatcher)
    WHERE state IN ('dispatched', 'running');
