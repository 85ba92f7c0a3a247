-- Held runs of a destination with a rate or a concurrency cap, shared by instances (issue 14):
-- a run held by its destination is queued here by (created_at, run_id) with its turn, so that
-- every instance lets the oldest held run go first and schedules a newly held run behind every
-- older one, whichever instance held it. A run leaves the queue when it is let through; an entry
-- whose turn passed long ago (a cancelled run) is forgotten.
CREATE TABLE destination_queue (
    name       TEXT NOT NULL,
    created_at TIMESTAMPTZ NOT NULL,
    run_id     TEXT NOT NULL,
    turn       TIMESTAMPTZ NOT NULL,
    PRIMARY KEY (name, created_at, run_id)
);
