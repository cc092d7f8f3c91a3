-- The task as received, so a retry or a replay can publish it again.
ALTER TABLE tasks ADD COLUMN envelope jsonb;

-- What operators did with each dead letter.
ALTER TABLE dead_letters
    ADD COLUMN replayed_at timestamptz,
    ADD COLUMN replay_count integer NOT NULL DEFAULT 0,
    ADD COLUMN purged_at timestamptz;
CREATE INDEX dead_letters_kind_idx ON dead_letters (reason_kind, dead_at DESC);
CREATE INDEX dead_letters_executor_idx ON dead_letters (executor, dead_at DESC);
