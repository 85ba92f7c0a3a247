-- Runs can wait: for a time (`wait`), for an event of their conversation (`wait_for`),
-- behind an earlier run of their conversation (`order`), or held by a destination's
-- protection (rate_limited, concurrency, circuit_open, paused_until). A waiting run holds
-- no lease; `next_attempt_at` is when it is due again (its resume time or timeout).
ALTER TABLE runs ADD COLUMN wait_reason TEXT;   -- why a `waiting` run waits (NULL otherwise)
DROP INDEX runs_due;
CREATE INDEX runs_due ON runs (next_attempt_at) WHERE status IN ('scheduled', 'retrying', 'waiting');
