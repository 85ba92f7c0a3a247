-- Workflow runs, their attempts, and why each workflow did or did not match each event.

-- One row per (event, workflow) considered when the event was appended, written in the same transaction.
CREATE TABLE match_decisions (
    event_seq  INTEGER NOT NULL,
    workflow   TEXT    NOT NULL,
    matched    BOOLEAN NOT NULL,
    reason     TEXT,                         -- the condition that failed, when not matched
    PRIMARY KEY (event_seq, workflow)
);

-- A run is also its own job: the worker claims due runs with a lease.
CREATE TABLE runs (
    run_id          TEXT    PRIMARY KEY,
    workflow        TEXT    NOT NULL,
    event_seq       INTEGER NOT NULL,
    event_id        TEXT    NOT NULL,
    conversation_id TEXT,
    replay_of       TEXT,                    -- the run this one replays, if any
    status          TEXT    NOT NULL,        -- scheduled, running, retrying, succeeded, failed, cancelled
    step_index      INTEGER NOT NULL DEFAULT 0,
    attempt         INTEGER NOT NULL DEFAULT 0,  -- attempts made at the current step (reset by a manual retry)
    attempts_total  INTEGER NOT NULL DEFAULT 0,  -- attempts made by the run in all
    next_attempt_at TEXT NOT NULL,
    lease_owner     TEXT,
    lease_until     TEXT,
    context         TEXT NOT NULL,         -- {event, conversation} as of the event
    step_results    TEXT NOT NULL,         -- {step id: {status, headers, json, body}}
    trace_context   TEXT,                    -- W3C traceparent of the webhook that caused the run
    last_error      TEXT,
    created_at      TEXT NOT NULL,
    updated_at      TEXT NOT NULL,
    finished_at     TEXT
);

-- Exactly one run per (workflow, event); replays are extra runs.
CREATE UNIQUE INDEX runs_once ON runs (workflow, event_id) WHERE replay_of IS NULL;
CREATE INDEX runs_due ON runs (next_attempt_at) WHERE status IN ('scheduled', 'retrying');
CREATE INDEX runs_leased ON runs (lease_until) WHERE status = 'running';
CREATE INDEX runs_recent ON runs (created_at, run_id);
CREATE INDEX runs_by_workflow ON runs (workflow, created_at);
CREATE INDEX runs_by_status ON runs (status, created_at);
CREATE INDEX runs_by_event ON runs (event_id);
CREATE INDEX runs_by_conversation ON runs (conversation_id, created_at);

-- Every HTTP attempt, append-only; secrets are masked before they get here.
CREATE TABLE attempts (
    run_id           TEXT    NOT NULL,
    number           INTEGER NOT NULL,      -- 1, 2, … across the whole run
    step_index       INTEGER NOT NULL,
    step_id          TEXT    NOT NULL,
    attempt          INTEGER NOT NULL,      -- 1, 2, … at this step
    started_at       TEXT NOT NULL,
    duration_ms      INTEGER NOT NULL,
    request          TEXT NOT NULL,       -- method, url, headers, body as sent (secrets as ***)
    response_status  INTEGER,
    response_headers TEXT,
    response_body    TEXT,                  -- first 64 KiB
    outcome          TEXT    NOT NULL,      -- succeeded, retrying, failed
    error_class      TEXT,                  -- dns, connect, tls, timeout, http_4xx, http_5xx, template, secret, request
    error_message    TEXT,
    next_delay_ms    INTEGER,               -- backoff before the next attempt, when retrying
    PRIMARY KEY (run_id, number)
);
