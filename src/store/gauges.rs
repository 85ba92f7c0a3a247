//! The statements behind the store's gauges on `/metrics` (read at most once
//! a second, on a scrape). Each reads indexes only, and only the rows it
//! counts: with 100,000 runs parked at wait steps a scrape must not read
//! every waiting run's row (the gauges used to count them through the table,
//! joined with `run_waits`). The partial index `runs_waiting` (on
//! `wait_reason, next_attempt_at, created_at` of the `waiting` runs) serves
//! the counts of waiting runs by reason; `run_waits_started` the oldest wait.
//! On SQLite the statements name their indexes (`INDEXED BY`): without
//! ANALYZE statistics its planner may pick `runs_by_status` and read every
//! waiting run from the table.

use super::Backend;

/// Why a parked run waits, as in `runs.wait_reason`: a `wait` / `wait_for`
/// step, or behind an earlier run of its conversation. (The other reasons
/// are a destination's holds: those runs are in backoff.)
pub const PARKED: &str = "('timer', 'event', 'order')";

/// `FROM runs` with the index `index` named on SQLite.
fn runs(backend: Backend, index: &str) -> String {
    match backend {
        Backend::Sqlite => format!("runs INDEXED BY {index}"),
        Backend::Postgres => "runs".to_owned(),
    }
}

/// One row: the last sequence; runs due now; the earliest due time of a run
/// not running; runs scheduled, retrying or running; runs held by a
/// destination (waiting for another reason than [`PARKED`]); parked runs due
/// now (a matched `wait_for`, a timer over: not yet claimed). `$1` is now.
pub fn stats_sql(backend: Backend) -> String {
    let holds: Vec<String> = crate::destinations::HoldReason::ALL
        .iter()
        .map(|r| format!("'{}'", r.as_str()))
        .collect();
    format!(
        "SELECT (SELECT MAX(seq) FROM events), \
         (SELECT COUNT(*) FROM {due} WHERE status IN ('scheduled', 'retrying', 'waiting') AND next_attempt_at <= $1), \
         (SELECT MIN(next_attempt_at) FROM {due} WHERE status IN ('scheduled', 'retrying', 'waiting')), \
         (SELECT COUNT(*) FROM {by_status} WHERE status IN ('scheduled', 'retrying', 'running')), \
         (SELECT COUNT(*) FROM {waiting} WHERE status = 'waiting' AND wait_reason IN ({holds})), \
         (SELECT COUNT(*) FROM {waiting} WHERE status = 'waiting' AND wait_reason IN {PARKED} AND next_attempt_at <= $1)",
        due = runs(backend, "runs_due"),
        by_status = runs(backend, "runs_by_status"),
        waiting = runs(backend, "runs_waiting"),
        holds = holds.join(", "),
    )
}

/// One row: runs waiting at a wait step or held by order; when the oldest
/// wait at a step began (the first `run_waits` row by `started_at` whose run
/// is still waiting or resuming: a row left by a run ended otherwise is
/// skipped); when the oldest run held by order was created.
pub fn wait_stats_sql(backend: Backend) -> String {
    format!(
        "SELECT (SELECT COUNT(*) FROM {waiting} WHERE status = 'waiting' AND wait_reason IN {PARKED}), \
         (SELECT w.started_at FROM {run_waits} JOIN runs r ON r.run_id = w.run_id \
          WHERE r.status IN ('waiting', 'running') ORDER BY w.started_at LIMIT 1), \
         (SELECT MIN(created_at) FROM {waiting} WHERE status = 'waiting' AND wait_reason = 'order')",
        waiting = runs(backend, "runs_waiting"),
        run_waits = match backend {
            Backend::Sqlite => "run_waits AS w INDEXED BY run_waits_started",
            Backend::Postgres => "run_waits AS w",
        },
    )
}
