-- The gauges of waiting runs (src/store/gauges.rs) read indexes only, however many runs
-- are parked: counts by reason (parked at a wait step or by order, or held by a
-- destination) and their due times from `runs_waiting`; the oldest wait at a step from
-- `run_waits_started`. A breaker's wake-up (`status = 'waiting' AND wait_reason = …`)
-- reads `runs_waiting` too.
CREATE INDEX runs_waiting ON runs (wait_reason, next_attempt_at, created_at) WHERE status = 'waiting';
CREATE INDEX run_waits_started ON run_waits (started_at);
