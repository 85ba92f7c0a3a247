//! The lease statements shared by the two leased tables, `runs` and
//! `replays`, for both backends: a row is held by one instance at a time
//! (`lease_owner`, `lease_until`, a fencing `lease_token` that every claim
//! increments) while its `status` is `running`. [`Leased`] names what differs
//! between the tables; the statements are built from it (with
//! [`lease_sql`] / [`now_sql`]: the database's clock on PostgreSQL, this
//! host's on SQLite) and run by the helpers `impl_run_store!` gives each store.

use super::runs_sql::{REPLAY_COLUMNS, RUN_COLUMNS, lease_sql, now_sql};

/// A leased table.
pub(crate) struct Leased {
    table: &'static str,
    /// The id column.
    id: &'static str,
    /// What a claim returns.
    columns: &'static str,
    /// Which rows a claim may take (free or lapsed), each condition with the
    /// column its rows are taken in the order of; `{now}` stands for now as
    /// lease comparisons read it, `$3` is now as this host sees it. Each
    /// condition is read by an ordered scan of its own that stops at the
    /// limit: one `OR` over both of the runs' conditions was planned as a
    /// bitmap scan and a sort of every due run, a cost that grew with the
    /// backlog (3 ms per claim with 2,500 runs queued, on PostgreSQL).
    /// On SQLite each scan names its partial index (`INDEXED BY`): without
    /// statistics its planner chose `runs_by_status` and read every waiting run.
    claimable: &'static [(&'static str, &'static str, Option<&'static str>)],
    /// What a claim sets besides the lease (`$3` is now).
    claim_set: &'static str,
    /// Checked again on the rows the claim's subquery picked (or empty).
    claim_recheck: &'static str,
    /// What handing a lease back sets (`{now}` as in `claimable`).
    release_set: &'static str,
}

/// The runs: due runs (scheduled, retrying, waiting) and running ones whose lease lapsed.
pub(crate) const RUNS: Leased = Leased {
    table: "runs",
    id: "run_id",
    columns: RUN_COLUMNS,
    claimable: &[
        (
            "status IN ('scheduled', 'retrying', 'waiting') AND next_attempt_at <= $3",
            "next_attempt_at",
            Some("runs_due"),
        ),
        (
            "status = 'running' AND lease_until < {now}",
            "lease_until",
            Some("runs_leased"),
        ),
    ],
    claim_set: "status = 'running', updated_at = $3, ",
    claim_recheck: "",
    // The lease ends now: the claim above takes the run again.
    release_set: "lease_until = {now}",
};

/// The bulk replays: running ones whose lease is free or lapsed.
pub(crate) const REPLAYS: Leased = Leased {
    table: "replays",
    id: "replay_id",
    columns: REPLAY_COLUMNS,
    claimable: &[(
        "status = 'running' AND (lease_until IS NULL OR lease_until < {now})",
        "created_at",
        None,
    )],
    claim_set: "",
    claim_recheck: " AND status = 'running'",
    release_set: "lease_owner = NULL, lease_until = NULL",
};

impl Leased {
    /// Claims up to `$4` claimable rows for owner `$1` with lease `$2` (see
    /// [`lease_sql`]), `$3` being now; returns them. `lock_clause` keeps
    /// instances from claiming the same row (PostgreSQL).
    pub(crate) fn claim_sql(&self, db_clock: bool, lock_clause: &str) -> String {
        let Self {
            table,
            id,
            columns,
            claim_set,
            claim_recheck,
            ..
        } = self;
        let now = now_sql(db_clock, 3);
        let sources: Vec<String> = self
            .claimable
            .iter()
            .enumerate()
            .map(|(i, (cond, key, index))| {
                let indexed = match index {
                    Some(index) if !db_clock => format!(" INDEXED BY {index}"),
                    _ => String::new(),
                };
                format!(
                    "c{i} AS (SELECT {id}, {key} AS k FROM {table}{indexed} WHERE {} ORDER BY {key} LIMIT $4 {lock_clause})",
                    cond.replace("{now}", &now)
                )
            })
            .collect();
        let union: Vec<String> = (0..sources.len())
            .map(|i| format!("SELECT {id}, k FROM c{i}"))
            .collect();
        format!(
            "WITH {} UPDATE {table} SET {claim_set}lease_owner = $1, lease_until = {}, lease_token = lease_token + 1 \
             WHERE {id} IN (SELECT {id} FROM ({}) AS c ORDER BY k LIMIT $4){claim_recheck} RETURNING {columns}",
            sources.join(", "),
            lease_sql(db_clock, 2),
            union.join(" UNION ALL "),
        )
    }

    /// An UPDATE of `set` on the row `$first` if owner `$first + 1` still
    /// holds it with token `$first + 2` (the fence of every leased write).
    pub(crate) fn fenced_update(&self, set: &str, first: usize) -> String {
        format!(
            "UPDATE {} SET {set} WHERE {} = ${first} AND lease_owner = ${} AND lease_token = ${} \
             AND status = 'running'",
            self.table,
            self.id,
            first + 1,
            first + 2
        )
    }

    /// Extends the lease by `$1` (see [`lease_sql`]) of row `$2` held by `$3` with token `$4`.
    pub(crate) fn renew_sql(&self, db_clock: bool) -> String {
        self.fenced_update(&format!("lease_until = {}", lease_sql(db_clock, 1)), 2)
    }

    /// Hands back every lease of owner `$2` (`$1` is now).
    pub(crate) fn release_sql(&self, db_clock: bool) -> String {
        format!(
            "UPDATE {} SET {} WHERE lease_owner = $2 AND status = 'running'",
            self.table,
            self.release_set.replace("{now}", &now_sql(db_clock, 1))
        )
    }
}

/// Binds a lease to `$q` as [`lease_sql`] reads it: seconds (the database's
/// clock) or the expiry this host computes.
macro_rules! bind_lease {
    ($q:expr, $lease:expr, $db_clock:expr) => {{
        let lease: std::time::Duration = $lease;
        if $db_clock {
            $q.bind(lease.as_secs_f64())
        } else {
            $q.bind($crate::store::runs_sql::local_lease_until(lease))
        }
    }};
}
pub(crate) use bind_lease;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_run_statements_are_the_ones_written_for_runs() {
        let claim = RUNS.claim_sql(false, "");
        assert!(claim.starts_with(
            "WITH c0 AS (SELECT run_id, next_attempt_at AS k FROM runs INDEXED BY runs_due WHERE \
             status IN ('scheduled', 'retrying', 'waiting') AND next_attempt_at <= $3 \
             ORDER BY next_attempt_at LIMIT $4 ), \
             c1 AS (SELECT run_id, lease_until AS k FROM runs INDEXED BY runs_leased WHERE status = 'running' AND lease_until < $3 \
             ORDER BY lease_until LIMIT $4 ) \
             UPDATE runs SET status = 'running', updated_at = $3, lease_owner = $1, lease_until = $2, \
             lease_token = lease_token + 1 WHERE run_id IN (SELECT run_id FROM \
             (SELECT run_id, k FROM c0 UNION ALL SELECT run_id, k FROM c1) AS c ORDER BY k LIMIT $4) \
             RETURNING run_id, "
        ), "{claim}");
        assert_eq!(
            RUNS.release_sql(true),
            "UPDATE runs SET lease_until = clock_timestamp() WHERE lease_owner = $2 AND status = 'running'"
        );
        assert_eq!(
            RUNS.renew_sql(true),
            "UPDATE runs SET lease_until = clock_timestamp() + make_interval(secs => $1) \
             WHERE run_id = $2 AND lease_owner = $3 AND lease_token = $4 AND status = 'running'"
        );
    }

    #[test]
    fn the_replay_statements_are_the_ones_written_for_replays() {
        let claim = REPLAYS.claim_sql(true, "FOR UPDATE SKIP LOCKED");
        assert!(claim.starts_with(
            "WITH c0 AS (SELECT replay_id, created_at AS k FROM replays WHERE \
             status = 'running' AND (lease_until IS NULL OR lease_until < clock_timestamp()) \
             ORDER BY created_at LIMIT $4 FOR UPDATE SKIP LOCKED) \
             UPDATE replays SET lease_owner = $1, lease_until = clock_timestamp() + make_interval(secs => $2), \
             lease_token = lease_token + 1 WHERE replay_id IN (SELECT replay_id FROM \
             (SELECT replay_id, k FROM c0) AS c ORDER BY k LIMIT $4) AND status = 'running' RETURNING replay_id, "
        ), "{claim}");
        assert_eq!(
            REPLAYS.release_sql(false),
            "UPDATE replays SET lease_owner = NULL, lease_until = NULL WHERE lease_owner = $2 AND status = 'running'"
        );
        assert_eq!(
            REPLAYS.fenced_update("status = 'succeeded'", 2),
            "UPDATE replays SET status = 'succeeded' WHERE replay_id = $2 AND lease_owner = $3 \
             AND lease_token = $4 AND status = 'running'"
        );
    }
}
