//! Per-conversation order (`order: conversation`, the default): the runs of
//! one workflow for one conversation start in log order, each only after the
//! previous one ended (succeeded, failed or cancelled).
//!
//! - At creation, inside the append transaction, [`hold_new_runs`] decides
//!   which new runs are held: those with an earlier unfinished run of the same
//!   workflow and conversation (stored, or earlier in the same batch). A held
//!   run is created `waiting` with `wait_reason = 'order'`, due only when
//!   released ([`held_until`]); it is never handed to a worker at creation
//!   ([`NewRun::starts_now`] is false).
//! - Every transaction that ends a run (the engine's saves, the end of a
//!   wait, the API's cancel) releases, in the same transaction, the earliest
//!   unfinished run of that workflow and conversation if it is held: it
//!   becomes `scheduled`, due now ([`release_next_in_tx`]).
//! - Across instances (PostgreSQL) both sides take a transaction-scoped
//!   advisory lock per (workflow, conversation) before they look, so an append
//!   and a finishing run never both conclude that the other will do the
//!   release. Ending transactions take it before any row lock; appends take
//!   theirs after the append lock, so the order of locks is the same
//!   everywhere (no deadlock).
//!
//! Only original runs take part (`replay_of IS NULL`): a replay runs at once
//! and holds nothing back. A manual retry of a failed or cancelled run starts
//! at once as well; until it ends it holds back runs not started yet.

use std::collections::HashSet;

use chrono::{DateTime, TimeZone, Utc};

use super::model::NewRun;

/// The statuses of a run that has not ended.
pub(crate) const UNFINISHED: &str = "('scheduled', 'running', 'retrying', 'waiting')";

/// When a run held by order is due: never, until released.
pub fn held_until() -> DateTime<Utc> {
    Utc.with_ymd_and_hms(9999, 1, 1, 0, 0, 0)
        .single()
        .expect("a valid date")
}

/// The (workflow, conversation) pairs of new runs that keep order, sorted, once each.
pub(crate) fn keys(runs: &[NewRun]) -> Vec<(String, String)> {
    let mut keys: Vec<(String, String)> = runs
        .iter()
        .filter(|r| r.ordered)
        .filter_map(|r| Some((r.workflow.clone(), r.conversation_id.clone()?)))
        .collect();
    keys.sort();
    keys.dedup();
    keys
}

/// THE decision, at run creation: which new runs (in log order) are held by
/// order. `unfinished` holds the (workflow, conversation) pairs with an
/// original run that has not ended, read under the pair's lock. A run is
/// held when its workflow keeps order, it has a conversation, and an earlier
/// run of that pair is unfinished (stored, or earlier in this batch).
/// Whoever hands new runs to workers must skip held ones.
pub(crate) fn hold_new_runs(runs: &mut [NewRun], unfinished: &HashSet<(String, String)>) {
    let mut seen: HashSet<(String, String)> = HashSet::new();
    for run in runs.iter_mut() {
        run.held = false;
        if !run.ordered {
            continue;
        }
        let Some(conv) = run.conversation_id.clone() else {
            continue;
        };
        let key = (run.workflow.clone(), conv);
        run.held = unfinished.contains(&key) || seen.contains(&key);
        seen.insert(key);
    }
}

/// PostgreSQL: the (workflow, conversation) pairs with an unfinished
/// original run among conversations `$1`..`$n`, read by one index probe of
/// `runs_in_order` per conversation: the LATERAL subquery is fenced by
/// `OFFSET 0`, so it is a nested loop whatever the statistics say. A plain
/// `conversation_id IN (…)` was planned, on a table without statistics, as a
/// bitmap scan of every unfinished run filtered by conversation: inside the
/// append transaction (holding the append lock) with 78,000 runs waiting,
/// 91 ms per batch of 100 conversations, against 5.9 ms for this form
/// (`EXPLAIN ANALYZE`, bench `waits`).
pub fn unfinished_of_conversations_pg(n: usize) -> String {
    let values: Vec<String> = (1..=n).map(|i| format!("(${i})")).collect();
    format!(
        "SELECT r.workflow, c.id FROM (VALUES {}) AS c(id) CROSS JOIN LATERAL \
         (SELECT DISTINCT workflow FROM runs WHERE conversation_id = c.id AND replay_of IS NULL \
         AND status IN {UNFINISHED} OFFSET 0) AS r",
        values.join(", ")
    )
}

/// SQLite: the (workflow, conversation) pairs with an unfinished original
/// run among conversations `ids` (not empty).
pub(crate) fn unfinished_of<DB: sqlx::Database>(qb: &mut sqlx::QueryBuilder<DB>, ids: &[&str])
where
    for<'t> &'t str: sqlx::Encode<'t, DB> + sqlx::Type<DB>,
{
    qb.push(format!(
        "SELECT DISTINCT workflow, conversation_id FROM runs WHERE replay_of IS NULL AND status IN {UNFINISHED} \
         AND conversation_id IN "
    ));
    super::sql::push_list(qb, ids.iter().copied());
}

/// Inside the append transaction, before the runs are inserted: locks the
/// ordered pairs (`$lock`: PostgreSQL), reads which have unfinished runs,
/// and marks the held runs of `$runs` ([`hold_new_runs`]).
macro_rules! hold_in_tx {
    ($db:ty, $tx:expr, $runs:expr, $lock:expr) => {{
        let runs: &mut [$crate::store::model::NewRun] = $runs;
        let keys = $crate::store::order::keys(runs);
        if !keys.is_empty() {
            let lock: bool = $lock;
            // Binds per statement stay far under both limits: a batch is at most
            // 256 events; chunks of 1000 pairs.
            for chunk in keys.chunks(1000) {
                if lock {
                    let mut qb = sqlx::QueryBuilder::<$db>::new(
                        "SELECT pg_advisory_xact_lock(hashtext(k.w), hashtext(k.c)) FROM (",
                    );
                    qb.push_values(chunk, |mut row, (w, c)| {
                        row.push_bind(w.as_str()).push_bind(c.as_str());
                    });
                    qb.push(") AS k(w, c)");
                    qb.build().execute(&mut **$tx).await?;
                }
            }
            let mut convs: Vec<&str> = keys.iter().map(|(_, c)| c.as_str()).collect();
            convs.sort();
            convs.dedup();
            let mut unfinished: std::collections::HashSet<(String, String)> =
                std::collections::HashSet::new();
            for chunk in convs.chunks(1000) {
                let rows: Vec<(String, String)> = if lock {
                    // PostgreSQL (the backend that locks): one probe per conversation.
                    let sql = $crate::store::order::unfinished_of_conversations_pg(chunk.len());
                    let mut q = sqlx::query_as::<$db, (String, String)>(sqlx::AssertSqlSafe(sql));
                    for c in chunk {
                        q = q.bind(*c);
                    }
                    q.fetch_all(&mut **$tx).await?
                } else {
                    let mut qb = sqlx::QueryBuilder::<$db>::new("");
                    $crate::store::order::unfinished_of(&mut qb, chunk);
                    qb.build_query_as().fetch_all(&mut **$tx).await?
                };
                unfinished.extend(rows);
            }
            $crate::store::order::hold_new_runs(runs, &unfinished);
        }
    }};
}
pub(crate) use hold_in_tx;

/// First thing in a transaction that may end run `$run_id`: takes the
/// advisory lock of its (workflow, conversation) on PostgreSQL (`$lock`).
macro_rules! lock_order_in_tx {
    ($tx:expr, $run_id:expr, $lock:expr) => {{
        let lock: bool = $lock;
        if lock {
            sqlx::query(
                "SELECT pg_advisory_xact_lock(hashtext(workflow), hashtext(conversation_id)) FROM runs \
                 WHERE run_id = $1 AND conversation_id IS NOT NULL",
            )
            .bind($run_id)
            .execute(&mut **$tx)
            .await?;
        }
    }};
}
pub(crate) use lock_order_in_tx;

/// Releases the next run held by order behind each of `count` runs that
/// ended (`$first + 1` is now, the run ids follow): the first unfinished run
/// of each one's (workflow, conversation), if it is held by order.
pub(crate) fn release_next_sql(first: usize, count: usize) -> String {
    let list = (0..count)
        .map(|i| format!("${}", first + i + 2))
        .collect::<Vec<_>>()
        .join(", ");
    format!(
        "UPDATE runs SET status = 'scheduled', wait_reason = NULL, next_attempt_at = ${now}, updated_at = ${now} \
         WHERE status = 'waiting' AND wait_reason = 'order' AND run_id IN (\
           SELECT (SELECT h.run_id FROM runs h \
                   WHERE h.conversation_id = f.conversation_id AND h.workflow = f.workflow \
                     AND h.replay_of IS NULL AND h.status IN {UNFINISHED} \
                   ORDER BY h.event_seq LIMIT 1) \
           FROM runs f WHERE f.conversation_id IS NOT NULL AND f.run_id IN ({list}))",
        now = first + 1,
    )
}

/// In the transaction that ended the runs `$run_ids` (`&[&str]`, after
/// their updates): releases, for each, the earliest unfinished original run
/// of its workflow and conversation if it is held by order (it becomes
/// `scheduled`, due `$now`), and notifies the workers (`$notify`:
/// PostgreSQL's NOTIFY). One statement for a whole batch of saves.
/// Evaluates to how many runs were released.
///
/// The held run is found by a subquery per finished run whose workflow and
/// conversation are its outer row's values, so it is an index lookup in
/// `runs_in_order` whatever the planner's statistics say (a join was once
/// planned as a walk of the whole index on a table not yet analysed: 11 ms
/// per finished run with 2,400 runs queued).
macro_rules! release_next_in_tx {
    ($tx:expr, $run_ids:expr, $now:expr, $notify:expr) => {{
        let ids: &[&str] = $run_ids;
        let mut released = 0u64;
        for chunk in ids.chunks(1000) {
            let sql = $crate::store::order::release_next_sql(0, chunk.len());
            let mut q = sqlx::query(sqlx::AssertSqlSafe(sql)).bind($now);
            for id in chunk {
                q = q.bind(*id);
            }
            released += q.execute(&mut **$tx).await?.rows_affected();
        }
        let notify: Option<&str> = $notify;
        if released > 0
            && let Some(notify) = notify
        {
            sqlx::query(notify).execute(&mut **$tx).await?;
        }
        released
    }};
}
pub(crate) use release_next_in_tx;

#[cfg(test)]
mod tests {
    use super::*;

    fn run(workflow: &str, conv: Option<&str>, ordered: bool) -> NewRun {
        NewRun {
            run_id: format!("run_{workflow}"),
            workflow: workflow.into(),
            event_seq: 1,
            event_id: "ev".into(),
            conversation_id: conv.map(Into::into),
            context: serde_json::json!({}),
            created_at: Utc::now(),
            trace_context: None,
            version: None,
            ordered,
            held: false,
        }
    }

    #[test]
    fn held_behind_stored_or_earlier_in_the_batch_only_when_ordered() {
        let mut runs = vec![
            run("a", Some("c1"), true),  // first of (a, c1): starts
            run("a", Some("c1"), true),  // behind the first
            run("a", Some("c2"), true),  // other conversation: starts
            run("b", Some("c1"), false), // order: none
            run("b", Some("c1"), false),
            run("a", None, true),       // no conversation
            run("d", Some("c3"), true), // an unfinished stored run of (d, c3)
        ];
        let unfinished = HashSet::from([("d".to_owned(), "c3".to_owned())]);
        hold_new_runs(&mut runs, &unfinished);
        let held: Vec<bool> = runs.iter().map(|r| r.held).collect();
        assert_eq!(held, [false, true, false, false, false, false, true]);
        assert!(!runs[0].held && runs[0].starts_now() && !runs[1].starts_now());
        assert_eq!(keys(&runs).len(), 3);
    }
}
