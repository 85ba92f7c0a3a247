-- The answer given to each conversation.setup event, byte for byte, and how it was produced.
-- Written once; a retried delivery gets it back instead of computing a second one.
CREATE TABLE setup_answers (
    event_seq     INTEGER PRIMARY KEY,
    event_id      TEXT    NOT NULL UNIQUE,
    workflow      TEXT,                 -- the workflow that answered; NULL: none matched
    used_fallback BOOLEAN NOT NULL,
    reason        TEXT,                 -- why the fallback was used
    body          TEXT    NOT NULL,     -- the exact response body
    lookups       TEXT NOT NULL,      -- every lookup attempt, like run attempts (secrets masked)
    duration_ms   INTEGER NOT NULL,
    created_at    TEXT NOT NULL
);
