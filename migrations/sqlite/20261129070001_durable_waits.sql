-- Durable waits (`wait`, `wait_for` steps): one row per run waiting at such a step.
-- The run itself is `waiting` (wait_reason `timer` or `event`) and due again at
-- next_attempt_at: the resume time of a `wait`, the timeout of a `wait_for`, or now
-- once an event matched. An event is matched inside the transaction that appends it
-- (looked up by conversation and event type), so a resume happens exactly once.
CREATE TABLE run_waits (
    run_id           TEXT    PRIMARY KEY,
    step_id          TEXT    NOT NULL,
    kind             TEXT    NOT NULL,      -- timer, event
    conversation_id  TEXT,                  -- event: the run's conversation
    event_type       TEXT,                  -- event: the type awaited
    after_seq        INTEGER  NOT NULL,      -- event: only events after this place in the log (the trigger)
    matcher          TEXT    NOT NULL,      -- JSON: what is awaited (src/workflow/wait.rs)
    started_at       TEXT NOT NULL,     -- when the run reached the step
    until_at         TEXT NOT NULL,     -- the resume time (timer) or the timeout (event)
    matched_event_id TEXT,                  -- event: the event that resumed it
    matched_seq      INTEGER,
    matched_at       TEXT
);

CREATE INDEX run_waits_by_event ON run_waits (conversation_id, event_type) WHERE matched_seq IS NULL;
