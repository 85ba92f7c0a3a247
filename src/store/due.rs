//! The statements that look for due runs: which runs a claim takes, and
//! when the next run falls due. A worker runs them whenever it looks for
//! work (at least once a second while idle), so each must read only the
//! rows it returns, however many runs are parked: on SQLite they name their
//! partial indexes (`runs_due`, `runs_leased`) with `INDEXED BY`. Without
//! ANALYZE statistics SQLite's planner chose `runs_by_status` for
//! `status IN (…)` and read every waiting run, twice a second (measured with
//! 100,000 waiting runs: the idle server's CPU, and runs reaching their wait
//! step at ~60/s while a backlog was due). Each branch of the claim is its
//! own limited scan, so neither sorts more than `limit` rows; PostgreSQL's
//! planner has statistics and needs no hint.

use super::Backend;

/// The statement a worker's claim runs (built in [`super::leased`]): due
/// runs (`scheduled`, `retrying`, `waiting` with `next_attempt_at <= $3`)
/// and running runs whose lease lapsed, each read by an ordered scan of its
/// own index that stops at the limit `$4`; `$1` is the owner, `$2` the lease.
pub fn claim_sql(backend: Backend) -> String {
    match backend {
        Backend::Sqlite => super::leased::RUNS.claim_sql(false, ""),
        Backend::Postgres => super::leased::RUNS.claim_sql(true, "FOR UPDATE SKIP LOCKED"),
    }
}

/// The earliest `next_attempt_at` of a run not running, and the earliest
/// lease expiry of a running one (one row, two nullable times).
pub fn next_wakeup_sql(backend: Backend) -> &'static str {
    match backend {
        Backend::Sqlite => {
            "SELECT (SELECT MIN(next_attempt_at) FROM runs INDEXED BY runs_due \
                     WHERE status IN ('scheduled', 'retrying', 'waiting')), \
                    (SELECT MIN(lease_until) FROM runs INDEXED BY runs_leased WHERE status = 'running')"
        }
        Backend::Postgres => {
            "SELECT (SELECT MIN(next_attempt_at) FROM runs WHERE status IN ('scheduled', 'retrying', 'waiting')), \
                    (SELECT MIN(lease_until) FROM runs WHERE status = 'running')"
        }
    }
}
