//! The statements that look for due runs: which runs a claim takes, and
//! when the next run falls due. A worker runs them whenever it looks for
//! work (at least once a second while idle), so each must read only the
//! rows it returns, however many runs are parked: on SQLite they name their
//! partial indexes (`runs_due`, `runs_leased`) with `INDEXED BY`. Without
//! ANALYZE statistics SQLite's planner chose `runs_by_status` for
//! `status IN (…)` and read every waiting run, twice a second (measured with
//! 100,000 waiting runs: the idle server's CPU, and runs reaching their wait
//! step at ~60/s while a backlog was due). The claim's lapsed-lease branch
//! is its own limited sub-select, so neither branch sorts more than `limit`
//! rows. PostgreSQL keeps one statement with `FOR UPDATE SKIP LOCKED` (its
//! planner has statistics, and its plan uses the same partial indexes).

use super::Backend;

/// The ids of the runs a claim takes: due runs (`scheduled`, `retrying`,
/// `waiting` with `next_attempt_at <= $3`) and running runs whose lease
/// lapsed (`lease_until` before `lease_now`), earliest `next_attempt_at`
/// first, at most `$4`, locked with `lock_clause` (PostgreSQL).
pub fn claimable_sql(backend: Backend, lease_now: &str, lock_clause: &str) -> String {
    match backend {
        Backend::Sqlite => format!(
            "SELECT run_id FROM (\
               SELECT run_id, next_attempt_at FROM (SELECT run_id, next_attempt_at FROM runs INDEXED BY runs_due \
                 WHERE status IN ('scheduled', 'retrying', 'waiting') AND next_attempt_at <= $3 \
                 ORDER BY next_attempt_at LIMIT $4) \
               UNION ALL \
               SELECT run_id, next_attempt_at FROM (SELECT run_id, next_attempt_at FROM runs INDEXED BY runs_leased \
                 WHERE status = 'running' AND lease_until < {lease_now} ORDER BY lease_until LIMIT $4)\
             ) ORDER BY next_attempt_at LIMIT $4"
        ),
        Backend::Postgres => format!(
            "SELECT run_id FROM runs \
             WHERE (status IN ('scheduled', 'retrying', 'waiting') AND next_attempt_at <= $3) \
                OR (status = 'running' AND lease_until < {lease_now}) \
             ORDER BY next_attempt_at LIMIT $4 {lock_clause}"
        ),
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
