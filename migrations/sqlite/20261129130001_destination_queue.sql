-- Held runs of a destination, shared by instances (issue 14). On SQLite one process runs the
-- engine and keeps this queue in memory; the table exists so both databases have the same
-- migrations (PostgreSQL shares the queue through it).
CREATE TABLE destination_queue (
    name       TEXT NOT NULL,
    created_at TEXT NOT NULL,
    run_id     TEXT NOT NULL,
    turn       TEXT NOT NULL,
    PRIMARY KEY (name, created_at, run_id)
);
