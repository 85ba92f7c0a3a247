-- Destination protection (issue 14). On SQLite one process runs the engine, so the
-- rate, the concurrency cap and the breaker live in that process's memory; these tables
-- exist so both databases have the same migrations (PostgreSQL shares state through them).
CREATE TABLE destination_state (
    name          TEXT PRIMARY KEY,
    tat           TEXT,
    breaker_state TEXT NOT NULL DEFAULT 'closed',
    failures      INTEGER NOT NULL DEFAULT 0,
    breaker_until TEXT,
    cool_down_ms  INTEGER NOT NULL DEFAULT 0,
    paused_until  TEXT,
    updated_by    TEXT
);
CREATE TABLE destination_slots (
    name       TEXT NOT NULL,
    slot       INTEGER NOT NULL,
    holder     TEXT,
    expires_at TEXT,
    PRIMARY KEY (name, slot)
);
CREATE TABLE destination_sends (
    name TEXT NOT NULL,
    at   TEXT NOT NULL
);
CREATE INDEX destination_sends_by_time ON destination_sends (name, at);
