-- The append-only event log and the conversation projection (PostgreSQL).

CREATE TABLE events (
    seq             BIGINT      PRIMARY KEY,      -- global, gap-free, assigned under an advisory lock
    event_id        TEXT        NOT NULL UNIQUE,  -- envelope id (ev_…)
    idempotency_key TEXT        NOT NULL,         -- X-Idempotency-Key of the first delivery
    event_type      TEXT        NOT NULL,         -- payload.type
    conversation_id TEXT,
    stream_version  BIGINT,                       -- 1, 2, … within the conversation
    agent_id        TEXT,
    livemode        BOOLEAN,
    created_at      TEXT,                         -- as sent by Operator
    received_at     TIMESTAMPTZ NOT NULL,
    signed_url      TEXT        NOT NULL,         -- what the signature was checked against
    x_timestamp     TEXT        NOT NULL,
    x_signature     TEXT        NOT NULL,
    raw_body        BYTEA       NOT NULL,         -- byte for byte as received
    UNIQUE (conversation_id, stream_version)
);

CREATE INDEX events_idempotency_key ON events (idempotency_key);
CREATE INDEX events_conversation ON events (conversation_id, seq);
CREATE INDEX events_type ON events (event_type, seq);
CREATE INDEX events_agent ON events (agent_id, seq);
CREATE INDEX events_received_at ON events (received_at);

CREATE FUNCTION switchboard_refuse_change() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'events are append-only: % is not allowed', TG_OP;
END
$$;

CREATE TRIGGER events_refuse_update_delete BEFORE UPDATE OR DELETE ON events
    FOR EACH ROW EXECUTE FUNCTION switchboard_refuse_change();
CREATE TRIGGER events_refuse_truncate BEFORE TRUNCATE ON events
    FOR EACH STATEMENT EXECUTE FUNCTION switchboard_refuse_change();

-- Derived from events only (see src/store/projection.rs); `switchboard rebuild-projections` refolds it.
CREATE TABLE conversations (
    conversation_id  TEXT        PRIMARY KEY,
    agent_id         TEXT,
    status           TEXT,
    last_seq         BIGINT      NOT NULL,
    last_received_at TIMESTAMPTZ,
    state            JSONB       NOT NULL         -- ConversationState
);

CREATE INDEX conversations_recent ON conversations (last_seq);
CREATE INDEX conversations_status ON conversations (status, last_seq);
CREATE INDEX conversations_agent ON conversations (agent_id, last_seq);
