-- Bulk replays are leased jobs: one instance drives a replay at a time (owner, expiry,
-- fencing token; another takes over when the lease lapses). `mode` is `rerun` (new runs
-- of the runs an event started) or `dispatch` (the runs today's workflows would start).
ALTER TABLE replays ADD COLUMN mode TEXT NOT NULL DEFAULT 'rerun';
ALTER TABLE replays ADD COLUMN lease_owner TEXT;
ALTER TABLE replays ADD COLUMN lease_until TIMESTAMPTZ;
ALTER TABLE replays ADD COLUMN lease_token BIGINT NOT NULL DEFAULT 0;
CREATE INDEX replays_running ON replays (lease_until) WHERE status = 'running';
-- The replay that created a run: a replay creates at most one run per (workflow, event),
-- however often a page is worked through.
ALTER TABLE runs ADD COLUMN replay_id TEXT;
CREATE UNIQUE INDEX runs_replayed_once ON runs (replay_id, workflow, event_id) WHERE replay_id IS NOT NULL;
