-- The append-only event log and the conversation projection (SQLite).

CREATE TABLE events (
    seq             INTEGER PRIMARY KEY,          -- global, gap-free, assigned by the appender
    event_id        TEXT    NOT NULL UNIQUE,      -- envelope id (ev_…)
    idempotency_key TEXT    NOT NULL,             -- X-Idempotency-Key of the first delivery
    event_type      TEXT    NOT NULL,             -- payload.type
    conversation_id TEXT,
    stream_version  INTEGER,                      -- 1, 2, … within the conversation
    agent_id        TEXT,
    livemode        BOOLEAN,
    created_at      TEXT,                         -- as sent by Operator
    received_at     TEXT    NOT NULL,
    signed_url      TEXT    NOT NULL,             -- what the signature was checked against
    x_timestamp     TEXT    NOT NULL,
    x_signature     TEXT    NOT NULL,
    raw_body        BLOB    NOT NULL,             -- byte for byte as received
    UNIQUE (conversation_id, stream_version)
);

CREATE INDEX events_idempotency_key ON events (idempotency_key);
CREATE INDEX events_conversation ON events (conversation_id, seq);
CREATE INDEX events_type ON events (event_type, seq);
CREATE INDEX events_agent ON events (agent_id, seq);
CREATE INDEX events_received_at ON events (received_at);

CREATE TRIGGER events_refuse_update BEFORE UPDATE ON events
BEGIN
    SELECT RAISE(ABORT, 'events are append-only: UPDATE is not allowed');
END;

CREATE TRIGGER events_refuse_delete BEFORE DELETE ON events
BEGIN
    SELECT RAISE(ABORT, 'events are append-only: DELETE is not allowed');
END;

-- Derived from events only (see src/store/projection.rs); `switchboard rebuild-projections` refolds it.
CREATE TABLE conversations (
    conversation_id  TEXT    PRIMARY KEY,
    agent_id         TEXT,
    status           TEXT,
    last_seq         INTEGER NOT NULL,
    last_received_at TEXT,
    state            TEXT    NOT NULL             -- JSON of ConversationState
);

CREATE INDEX conversations_recent ON conversations (last_seq);
CREATE INDEX conversations_status ON conversations (status, last_seq);
CREATE INDEX conversations_agent ON conversations (agent_id, last_seq);
