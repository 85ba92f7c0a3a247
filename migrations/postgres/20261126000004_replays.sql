-- Bulk replays: a filter over the log, worked through in the background, resumable after a restart.
CREATE TABLE replays (
    replay_id    TEXT    PRIMARY KEY,
    filter       JSONB NOT NULL,          -- what to replay (time range, type, workflow, only failed)
    status       TEXT    NOT NULL,         -- running, succeeded, cancelled
    total        BIGINT NOT NULL,         -- events matching the filter when it started
    done         BIGINT NOT NULL DEFAULT 0,
    runs_created BIGINT NOT NULL DEFAULT 0,
    skipped      BIGINT NOT NULL DEFAULT 0,  -- events whose runs were still in flight, or had none to replay
    failed       BIGINT NOT NULL DEFAULT 0,  -- events whose replay could not be created
    cursor_seq   BIGINT NOT NULL DEFAULT 0,  -- last event sequence handled
    created_at   TIMESTAMPTZ NOT NULL,
    finished_at  TIMESTAMPTZ
);
