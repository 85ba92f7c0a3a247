-- Bulk replays: a filter over the log, worked through in the background, resumable after a restart.
CREATE TABLE replays (
    replay_id    TEXT    PRIMARY KEY,
    filter       TEXT NOT NULL,          -- what to replay (time range, type, workflow, only failed)
    status       TEXT    NOT NULL,         -- running, succeeded, cancelled
    total        INTEGER NOT NULL,         -- events matching the filter when it started
    done         INTEGER NOT NULL DEFAULT 0,
    runs_created INTEGER NOT NULL DEFAULT 0,
    skipped      INTEGER NOT NULL DEFAULT 0,  -- events whose runs were still in flight, or had none to replay
    failed       INTEGER NOT NULL DEFAULT 0,  -- events whose replay could not be created
    cursor_seq   INTEGER NOT NULL DEFAULT 0,  -- last event sequence handled
    created_at   TEXT NOT NULL,
    finished_at  TEXT
);
