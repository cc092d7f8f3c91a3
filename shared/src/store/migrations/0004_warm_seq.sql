-- Evidence of an attempt that ran on a warm executor (one job serving many tasks of its
-- class): the attempt's place among the tasks handed to that job, from 1. NULL for an
-- attempt that had a job of its own.
ALTER TABLE tasks ADD COLUMN warm_seq integer;
