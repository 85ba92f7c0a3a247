-- Runs resume at their step by id, and every claim gets a fencing token.
ALTER TABLE runs ADD COLUMN step_id TEXT;                              -- the step the run is at (NULL: use step_index)
ALTER TABLE runs ADD COLUMN lease_token INTEGER NOT NULL DEFAULT 0;   -- raised by every claim; saves and renewals must match it
