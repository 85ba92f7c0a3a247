-- Destination protection shared by instances (issue 14): the token bucket (GCRA's
-- theoretical arrival time), the circuit breaker and a Retry-After pause per destination,
-- and concurrency slots as rows whose holder expires (a killed holder frees its slot).
CREATE TABLE destination_state (
    name          TEXT PRIMARY KEY,
    tat           TIMESTAMPTZ,
    breaker_state TEXT NOT NULL DEFAULT 'closed',
    failures      INTEGER NOT NULL DEFAULT 0,
    breaker_until TIMESTAMPTZ,
    cool_down_ms  BIGINT NOT NULL DEFAULT 0,
    paused_until  TIMESTAMPTZ,
    updated_by    TEXT
);
CREATE TABLE destination_slots (
    name       TEXT NOT NULL,
    slot       INTEGER NOT NULL,
    holder     TEXT,
    expires_at TIMESTAMPTZ,
    PRIMARY KEY (name, slot)
);
-- When each request of a rate-limited destination was let through, for the sliding window
-- (at most N in any period); rows older than the period are deleted as new ones come.
CREATE TABLE destination_sends (
    name TEXT NOT NULL,
    at   TIMESTAMPTZ NOT NULL
);
CREATE INDEX destination_sends_by_time ON destination_sends (name, at);
