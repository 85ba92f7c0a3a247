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
