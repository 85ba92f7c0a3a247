//! [`super::runs::RunStore`] for both backends: the statements are the same
//! text (placeholders from [`sqlx::QueryBuilder`] or `$n`, which SQLite also
//! reads); PostgreSQL adds `FOR UPDATE SKIP LOCKED` so instances never claim
//! the same run, and commits claims without waiting for the WAL flush: a
//! claim lost in a crash only returns the run to the queue, which the lease
//! does anyway.

pub(crate) const RUN_COLUMNS: &str = "run_id, workflow, event_seq, event_id, conversation_id, replay_of, status, \
     step_index, step_id, attempt, attempts_total, next_attempt_at, lease_owner, lease_until, lease_token, context, \
     step_results, trace_context, last_error, created_at, updated_at, finished_at, version, wait_reason";

/// Lease expiry as SQL: `$n` seconds from the database's clock (PostgreSQL),
/// or `$n` as a time computed by this host (SQLite: one host, one clock).
pub(crate) fn lease_sql(db_clock: bool, n: usize) -> String {
    if db_clock {
        format!("clock_timestamp() + make_interval(secs => ${n})")
    } else {
        format!("${n}")
    }
}

/// "Now" for lease comparisons: the database's clock, or the bound `$n`.
pub(crate) fn now_sql(db_clock: bool, n: usize) -> String {
    if db_clock {
        "clock_timestamp()".to_owned()
    } else {
        format!("${n}")
    }
}

/// The local expiry of a lease (SQLite).
pub(crate) fn local_lease_until(lease: std::time::Duration) -> chrono::DateTime<chrono::Utc> {
    use chrono::SubsecRound;
    chrono::Utc::now().trunc_subsecs(6)
        + chrono::TimeDelta::from_std(lease).unwrap_or(chrono::TimeDelta::MAX)
}

pub(crate) const ATTEMPT_COLUMNS: &str = "run_id, number, step_index, step_id, attempt, started_at, duration_ms, \
     request, response_status, response_headers, response_body, outcome, error_class, error_message, next_delay_ms";

/// Values a save's UPDATE of its run takes ([`save_update_sql`]).
pub(crate) const SAVE_BINDS: usize = 16;
/// Values an attempt's INSERT takes ([`attempt_insert_sql`]).
pub(crate) const ATTEMPT_BINDS: usize = 15;

/// A save's fenced UPDATE of its run, its parameters numbered from `$first + 1`
/// (bound by `bind_save!`).
pub(crate) fn save_update_sql(db_clock: bool, first: usize) -> String {
    let p = |n: usize| format!("${}", first + n);
    super::leased::RUNS.fenced_update(
        &format!(
            "status = {}, step_index = {}, attempt = {}, attempts_total = {}, next_attempt_at = {}, \
             lease_owner = CASE WHEN {keep} THEN lease_owner ELSE NULL END, \
             lease_until = CASE WHEN {keep} THEN {} ELSE NULL END, step_results = {}, last_error = {}, \
             finished_at = {}, updated_at = {}, step_id = {}, wait_reason = {}",
            p(1),
            p(2),
            p(3),
            p(4),
            p(5),
            lease_sql(db_clock, first + 7),
            p(8),
            p(9),
            p(10),
            p(11),
            p(15),
            p(16),
            keep = p(6),
        ),
        first + 12,
    )
}

/// When an attempt's INSERT ([`attempt_insert_sql`]) writes.
#[derive(Clone, Copy)]
pub(crate) enum AttemptIf {
    /// Always (its save's UPDATE ran before and matched).
    Always,
    /// If the statement before it changed a row (SQLite's `changes()`): the
    /// attempt of a save whose fenced UPDATE matched, in the same query.
    Changed,
    /// For each row of the CTE `u`, the save's UPDATE … RETURNING (PostgreSQL).
    Updated,
}

/// An attempt's INSERT, its parameters numbered from `$first + 1`.
pub(crate) fn attempt_insert_sql(first: usize, when: AttemptIf) -> String {
    let values = (1..=ATTEMPT_BINDS)
        .map(|n| format!("${}", first + n))
        .collect::<Vec<_>>()
        .join(", ");
    match when {
        AttemptIf::Always => format!("INSERT INTO attempts ({ATTEMPT_COLUMNS}) VALUES ({values})"),
        AttemptIf::Changed => {
            format!("INSERT INTO attempts ({ATTEMPT_COLUMNS}) SELECT {values} WHERE changes() = 1")
        }
        AttemptIf::Updated => {
            format!("INSERT INTO attempts ({ATTEMPT_COLUMNS}) SELECT {values} FROM u")
        }
    }
}

/// Binds a save's values for [`save_update_sql`].
macro_rules! bind_update {
    ($q:expr, $run_id:expr, $owner:expr, $token:expr, $u:expr, $now:expr, $db_clock:expr) => {{
        use $crate::store::runs::{storable_json, storable_text};
        let u: &$crate::store::runs::RunUpdate = $u;
        let q = $q
            .bind(u.status.as_str())
            .bind(u.step_index)
            .bind(u.attempt)
            .bind(u.attempts_total)
            .bind(u.next_attempt_at)
            .bind(u.lease.is_some());
        let q = $crate::store::leased::bind_lease!(q, u.lease.unwrap_or_default(), $db_clock);
        q.bind(sqlx::types::Json(storable_json(&u.step_results).as_ref()))
            .bind(u.last_error.as_deref().map(storable_text))
            .bind(u.finished_at)
            .bind($now)
            .bind($run_id)
            .bind($owner)
            .bind($token)
            .bind(u.step_id.as_deref())
            .bind(u.wait_reason.as_deref())
    }};
}
pub(crate) use bind_update;

/// Binds an attempt's values for [`attempt_insert_sql`].
macro_rules! bind_attempt {
    ($q:expr, $a:expr) => {{
        use $crate::store::runs::{storable_json, storable_text};
        let a: &$crate::store::runs::Attempt = $a;
        $q.bind(&a.run_id)
            .bind(a.number)
            .bind(a.step_index)
            .bind(storable_text(&a.step_id))
            .bind(a.attempt)
            .bind(a.started_at)
            .bind(a.duration_ms)
            .bind(sqlx::types::Json(storable_json(&a.request.0).as_ref()))
            .bind(a.response_status)
            .bind(
                a.response_headers
                    .as_ref()
                    .map(|h| sqlx::types::Json(storable_json(&h.0).into_owned())),
            )
            .bind(a.response_body.as_deref().map(storable_text))
            .bind(&a.outcome)
            .bind(a.error_class.as_deref())
            .bind(a.error_message.as_deref().map(storable_text))
            .bind(a.next_delay_ms)
    }};
}
pub(crate) use bind_attempt;

pub(crate) const REPLAY_COLUMNS: &str = "replay_id, filter, status, total, done, runs_created, skipped, failed, \
     cursor_seq, created_at, finished_at, mode, lease_owner, lease_until, lease_token";

macro_rules! impl_run_store {
    ($store:ty, $db:ty, $lock_clause:expr, $claim_prelude:expr, $row_lock:expr, $db_clock:expr) => {
        impl $store {
            /// [`Self::save_batch_in_tx`] on SQLite, in one query: per save its
            /// UPDATE then its attempt's INSERT (written only if the UPDATE matched:
            /// `changes()`), then the release of the runs held behind those that end.
            /// One round trip to the connection's thread instead of up to three per
            /// save (see [`crate::store::sql::Statements`]).
            async fn save_joined_in_tx(
                tx: &mut sqlx::Transaction<'static, $db>,
                saves: &[$crate::store::runs::Save],
                now: chrono::DateTime<chrono::Utc>,
            ) -> Result<$crate::store::runs::SavedBatch, $crate::store::StoreError> {
                use futures_util::TryStreamExt;
                use $crate::store::runs_sql::{attempt_insert_sql, save_update_sql, AttemptIf, ATTEMPT_BINDS, SAVE_BINDS};
                let mut saved = Vec::with_capacity(saves.len());
                let mut released = 0;
                // Parameters are numbered across the query: at most 500 saves keep the
                // highest (500 × 32) under SQLite's limit of 32,766.
                for chunk in saves.chunks(500) {
                    let mut sql = String::new();
                    let mut first = 0;
                    for s in chunk {
                        sql.push_str(&save_update_sql($db_clock, first));
                        first += SAVE_BINDS;
                        if s.attempt.is_some() {
                            sql.push_str("; ");
                            sql.push_str(&attempt_insert_sql(first, AttemptIf::Changed));
                            first += ATTEMPT_BINDS;
                        }
                        sql.push_str("; ");
                    }
                    // A run held behind one whose save did not match stays held: the
                    // release takes the first unfinished run of its pair, which is then
                    // still the one whose lease was lost.
                    let ending: Vec<&str> = chunk
                        .iter()
                        .filter(|s| s.update.status.is_final())
                        .map(|s| s.run_id.as_str())
                        .collect();
                    if !ending.is_empty() {
                        sql.push_str(&$crate::store::order::release_next_sql(first, ending.len()));
                    }
                    let mut q = sqlx::query(sqlx::AssertSqlSafe(sql)).persistent(chunk.len() == 1);
                    for s in chunk {
                        q = $crate::store::runs_sql::bind_update!(
                            q,
                            s.run_id.as_str(),
                            s.owner.as_str(),
                            s.token,
                            &s.update,
                            now,
                            $db_clock
                        );
                        if let Some(a) = &s.attempt {
                            q = $crate::store::runs_sql::bind_attempt!(q, a);
                        }
                    }
                    if !ending.is_empty() {
                        q = q.bind(now);
                        for id in &ending {
                            q = q.bind(*id);
                        }
                    }
                    // Rows changed by each statement, in order.
                    let changed: Vec<u64> = sqlx::Executor::fetch_many(&mut **tx, q)
                        .try_filter_map(|step| async move { Ok(step.left().map(|r| r.rows_affected())) })
                        .try_collect()
                        .await?;
                    let mut changed = changed.into_iter();
                    for s in chunk {
                        saved.push(changed.next() == Some(1));
                        if s.attempt.is_some() {
                            changed.next();
                        }
                    }
                    if !ending.is_empty() {
                        released += changed.next().unwrap_or(0) as usize;
                    }
                }
                Ok($crate::store::runs::SavedBatch { saved, released })
            }

            /// A batch of saves inside `tx` ([`RunStore::save_progress_batch`]'s
            /// work, which SQLite also does inside an append's transaction).
            pub(crate) async fn save_batch_in_tx(
                tx: &mut sqlx::Transaction<'static, $db>,
                saves: &[$crate::store::runs::Save],
                now: chrono::DateTime<chrono::Utc>,
            ) -> Result<$crate::store::runs::SavedBatch, $crate::store::StoreError> {
                // Runs that end release the next one held by order (store/order.rs): first
                // the order locks of their (workflow, conversation) pairs, all of them, in
                // the appends' order (bytewise), before any row lock.
                let ending: Vec<&str> = saves
                    .iter()
                    .filter(|s| s.update.status.is_final())
                    .map(|s| s.run_id.as_str())
                    .collect();
                if Self::ORDER_LOCK && !ending.is_empty() {
                    let mut qb = sqlx::QueryBuilder::<$db>::new(
                        "SELECT pg_advisory_xact_lock(hashtext(k.w), hashtext(k.c)) FROM (\
                         SELECT DISTINCT workflow COLLATE \"C\" AS w, conversation_id COLLATE \"C\" AS c FROM runs \
                         WHERE conversation_id IS NOT NULL AND run_id IN (",
                    );
                    let mut sep = qb.separated(", ");
                    for id in &ending {
                        sep.push_bind(*id);
                    }
                    qb.push(") ORDER BY 1, 2) AS k");
                    qb.build().execute(&mut **tx).await?;
                }
                if <$db as sqlx::Database>::NAME == "SQLite" {
                    return Self::save_joined_in_tx(tx, saves, now).await;
                }
                let mut saved = Vec::with_capacity(saves.len());
                let mut ended: Vec<&str> = Vec::new();
                for s in saves {
                    // A save whose lease was lost writes nothing (its UPDATE matches no row).
                    let ok = Self::save_in_tx(tx, &s.run_id, &s.owner, s.token, s.attempt.as_ref(), &s.update, now)
                        .await?;
                    if ok && s.update.status.is_final() {
                        ended.push(s.run_id.as_str());
                    }
                    saved.push(ok);
                }
                let released = if ended.is_empty() {
                    0
                } else {
                    $crate::store::order::release_next_in_tx!(tx, &ended, now, Self::NOTIFY_RUNS) as usize
                };
                Ok($crate::store::runs::SavedBatch { saved, released })
            }

            /// One save inside `tx`: the run's new state if the claim `token` still
            /// holds it, then its attempt; false (nothing written) if the lease was lost.
            async fn save_in_tx(
                tx: &mut sqlx::Transaction<'static, $db>,
                run_id: &str,
                owner: &str,
                token: i64,
                attempt: Option<&$crate::store::runs::Attempt>,
                u: &$crate::store::runs::RunUpdate,
                now: chrono::DateTime<chrono::Utc>,
            ) -> Result<bool, $crate::store::StoreError> {
                use $crate::store::runs_sql::{attempt_insert_sql, save_update_sql, AttemptIf, SAVE_BINDS};
                let update = save_update_sql($db_clock, 0);
                if let (Some(a), false) = (attempt, <$db as sqlx::Database>::NAME == "SQLite") {
                    // PostgreSQL: both in one statement, the attempt written for the row updated.
                    let sql = format!(
                        "WITH u AS ({update} RETURNING 1), a AS ({}) SELECT COUNT(*) FROM u",
                        attempt_insert_sql(SAVE_BINDS, AttemptIf::Updated)
                    );
                    let q = sqlx::query(sqlx::AssertSqlSafe(sql));
                    let q = $crate::store::runs_sql::bind_update!(q, run_id, owner, token, u, now, $db_clock);
                    let q = $crate::store::runs_sql::bind_attempt!(q, a);
                    let row = q.fetch_one(&mut **tx).await?;
                    return Ok(sqlx::Row::try_get::<i64, _>(&row, 0)? == 1);
                }
                let q = sqlx::query(sqlx::AssertSqlSafe(update));
                let q = $crate::store::runs_sql::bind_update!(q, run_id, owner, token, u, now, $db_clock);
                if q.execute(&mut **tx).await?.rows_affected() != 1 {
                    return Ok(false);
                }
                if let Some(a) = attempt {
                    let insert = attempt_insert_sql(0, AttemptIf::Always);
                    let q = sqlx::query(sqlx::AssertSqlSafe(insert));
                    $crate::store::runs_sql::bind_attempt!(q, a).execute(&mut **tx).await?;
                }
                Ok(true)
            }

            /// Claims up to `limit` free or lapsed rows of the leased table `t` for
            /// `owner` (see [`crate::store::leased`]).
            async fn claim_leased<'c, O>(
                ex: impl sqlx::Executor<'c, Database = $db>,
                t: &$crate::store::leased::Leased,
                owner: &str,
                now: chrono::DateTime<chrono::Utc>,
                lease: std::time::Duration,
                limit: u32,
            ) -> Result<Vec<O>, $crate::store::StoreError>
            where
                O: for<'r> sqlx::FromRow<'r, <$db as sqlx::Database>::Row> + Send + Unpin,
            {
                let q = sqlx::query_as::<$db, O>(sqlx::AssertSqlSafe(t.claim_sql($db_clock, $lock_clause)))
                    .bind(owner);
                let q = $crate::store::leased::bind_lease!(q, lease, $db_clock);
                Ok(q.bind(now).bind(i64::from(limit)).fetch_all(ex).await?)
            }

            /// Extends `owner`'s lease (with `token`) on row `id` of `t`; false if it lost it.
            async fn renew_leased<'c>(
                ex: impl sqlx::Executor<'c, Database = $db>,
                t: &$crate::store::leased::Leased,
                id: &str,
                owner: &str,
                token: i64,
                lease: std::time::Duration,
            ) -> Result<bool, $crate::store::StoreError> {
                let q = sqlx::query::<$db>(sqlx::AssertSqlSafe(t.renew_sql($db_clock)));
                let q = $crate::store::leased::bind_lease!(q, lease, $db_clock);
                let r = q.bind(id).bind(owner).bind(token).execute(ex).await?;
                Ok(r.rows_affected() == 1)
            }

            /// Hands back every lease `owner` holds on `t`; how many.
            async fn release_leased(
                &self,
                t: &$crate::store::leased::Leased,
                owner: &str,
                now: chrono::DateTime<chrono::Utc>,
            ) -> Result<u64, $crate::store::StoreError> {
                let r = sqlx::query(sqlx::AssertSqlSafe(t.release_sql($db_clock)))
                    .bind(now)
                    .bind(owner)
                    .execute(&self.writer)
                    .await?;
                Ok(r.rows_affected())
            }

            /// [`RunStore::hold_run`] on `ex` (also a wait not over yet, in its transaction).
            #[allow(clippy::too_many_arguments)]
            async fn hold_in<'c>(
                ex: impl sqlx::Executor<'c, Database = $db>,
                run_id: &str,
                owner: &str,
                token: i64,
                until: chrono::DateTime<chrono::Utc>,
                reason: &str,
                now: chrono::DateTime<chrono::Utc>,
            ) -> Result<bool, $crate::store::StoreError> {
                let r = sqlx::query::<$db>(sqlx::AssertSqlSafe($crate::store::leased::RUNS.fenced_update(
                    "status = 'waiting', wait_reason = $1, next_attempt_at = $2, \
                     lease_owner = NULL, lease_until = NULL, updated_at = $3",
                    4,
                )))
                .bind(reason)
                .bind(until)
                .bind(now)
                .bind(run_id)
                .bind(owner)
                .bind(token)
                .execute(ex)
                .await?;
                Ok(r.rows_affected() == 1)
            }

            /// Applies a state change guarded by the run's current status (`$1` is now,
            /// `$2` the run id) and says what happened.
            async fn change_run(
                &self,
                sql: &'static str,
                run_id: &str,
                now: chrono::DateTime<chrono::Utc>,
            ) -> Result<$crate::store::runs::RunChange, $crate::store::StoreError> {
                use $crate::store::runs::RunChange;
                let r = sqlx::query(sql).bind(now).bind(run_id).execute(&self.writer).await?;
                let run = $crate::store::runs::RunStore::get_run(self, run_id).await?;
                Ok(match (r.rows_affected(), run) {
                    (_, None) => RunChange::NotFound,
                    (1, Some(run)) => RunChange::Changed(Box::new(run)),
                    (_, Some(run)) => RunChange::WrongState(run.status.as_str().to_owned()),
                })
            }

            /// [`RunStore::replay_event`] inside a transaction; `replay_id` marks the
            /// runs a bulk replay creates (at most one per workflow and event).
            #[allow(clippy::too_many_arguments)]
            async fn replay_event_in(
                tx: &mut sqlx::Transaction<'static, $db>,
                event_id: &str,
                workflows: Option<&[String]>,
                only_failed: bool,
                versions: &std::collections::BTreeMap<String, String>,
                replay_id: Option<&str>,
                now: chrono::DateTime<chrono::Utc>,
            ) -> Result<Vec<$crate::store::runs::ReplayOutcome>, $crate::store::StoreError> {
                use $crate::store::runs::{ReplayOutcome, Run};
                let originals: Vec<Run> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
                    "SELECT {} FROM runs WHERE event_id = $1 AND replay_of IS NULL ORDER BY workflow {}",
                    $crate::store::runs_sql::RUN_COLUMNS,
                    $row_lock
                )))
                .bind(event_id)
                .fetch_all(&mut **tx)
                .await?;
                let mut outcomes = Vec::new();
                for original in originals {
                    if workflows.is_some_and(|w| !w.contains(&original.workflow)) {
                        continue;
                    }
                    if only_failed && original.status != $crate::store::runs::RunStatus::Failed {
                        continue;
                    }
                    let in_flight: i64 = sqlx::query_scalar(
                        "SELECT COUNT(*) FROM runs WHERE event_id = $1 AND workflow = $2 \
                         AND status IN ('scheduled', 'running', 'retrying', 'waiting')",
                    )
                    .bind(event_id)
                    .bind(&original.workflow)
                    .fetch_one(&mut **tx)
                    .await?;
                    if in_flight > 0 {
                        outcomes.push(ReplayOutcome {
                            workflow: original.workflow.clone(),
                            original_run_id: original.run_id.clone(),
                            new_run_id: None,
                            version: None,
                            skipped: Some("a run of this workflow for this event is still in flight".into()),
                        });
                        continue;
                    }
                    // The version loaded now; a workflow no longer loaded keeps the original's.
                    let version = versions
                        .get(&original.workflow)
                        .cloned()
                        .or_else(|| original.version.clone());
                    let run_id = format!("run_{}", uuid::Uuid::new_v4().simple());
                    let inserted = sqlx::query(
                        "INSERT INTO runs (run_id, workflow, event_seq, event_id, conversation_id, replay_of, status, \
                         next_attempt_at, context, step_results, trace_context, created_at, updated_at, version, replay_id) \
                         VALUES ($1, $2, $3, $4, $5, $6, 'scheduled', $7, $8, '{}', $9, $7, $7, $10, $11) \
                         ON CONFLICT DO NOTHING",
                    )
                    .bind(&run_id)
                    .bind(&original.workflow)
                    .bind(original.event_seq)
                    .bind(&original.event_id)
                    .bind(original.conversation_id.as_deref())
                    .bind(&original.run_id)
                    .bind(now)
                    .bind(&original.context)
                    .bind(original.trace_context.as_deref())
                    .bind(version.as_deref())
                    .bind(replay_id)
                    .execute(&mut **tx)
                    .await?
                    .rows_affected();
                    outcomes.push(if inserted == 1 {
                        ReplayOutcome {
                            workflow: original.workflow.clone(),
                            original_run_id: original.run_id.clone(),
                            new_run_id: Some(run_id),
                            version,
                            skipped: None,
                        }
                    } else {
                        ReplayOutcome {
                            workflow: original.workflow.clone(),
                            original_run_id: original.run_id.clone(),
                            new_run_id: None,
                            version: None,
                            skipped: Some("this replay already created its run".into()),
                        }
                    });
                }
                Ok(outcomes)
            }
        }

        #[async_trait::async_trait]
        impl $crate::store::runs::RunStore for $store {
            async fn claim_due(
                &self,
                owner: &str,
                now: chrono::DateTime<chrono::Utc>,
                lease: std::time::Duration,
                limit: u32,
            ) -> Result<Vec<$crate::store::runs::Run>, $crate::store::StoreError> {
                let mut tx = self.writer.begin().await?;
                let prelude: Option<&str> = $claim_prelude;
                if let Some(prelude) = prelude {
                    sqlx::query(prelude).execute(&mut *tx).await?;
                }
                let runs =
                    Self::claim_leased(&mut *tx, &$crate::store::leased::RUNS, owner, now, lease, limit).await?;
                tx.commit().await?;
                Ok(runs)
            }

            async fn renew_lease(
                &self,
                run_id: &str,
                owner: &str,
                token: i64,
                lease: std::time::Duration,
            ) -> Result<bool, $crate::store::StoreError> {
                Self::renew_leased(&self.writer, &$crate::store::leased::RUNS, run_id, owner, token, lease).await
            }

            async fn release_leases(
                &self,
                owner: &str,
                now: chrono::DateTime<chrono::Utc>,
            ) -> Result<u64, $crate::store::StoreError> {
                self.release_leased(&$crate::store::leased::RUNS, owner, now).await
            }

            async fn wake_held(
                &self,
                reasons: &[&str],
                now: chrono::DateTime<chrono::Utc>,
            ) -> Result<u64, $crate::store::StoreError> {
                let mut woken = 0;
                for reason in reasons {
                    // Due at once, oldest first: the claim takes them by next_attempt_at.
                    woken += sqlx::query(
                        "UPDATE runs SET next_attempt_at = CASE WHEN created_at < $1 THEN created_at ELSE $1 END \
                         WHERE status = 'waiting' AND wait_reason = $2 AND next_attempt_at > $1",
                    )
                    .bind(now)
                    .bind(*reason)
                    .execute(&self.writer)
                    .await?
                    .rows_affected();
                }
                Ok(woken)
            }

            async fn hold_run(
                &self,
                run_id: &str,
                owner: &str,
                token: i64,
                until: chrono::DateTime<chrono::Utc>,
                reason: &str,
                now: chrono::DateTime<chrono::Utc>,
            ) -> Result<bool, $crate::store::StoreError> {
                Self::hold_in(&self.writer, run_id, owner, token, until, reason, now).await
            }

            async fn save_progress(
                &self,
                run_id: &str,
                owner: &str,
                token: i64,
                attempt: Option<&$crate::store::runs::Attempt>,
                u: &$crate::store::runs::RunUpdate,
                now: chrono::DateTime<chrono::Utc>,
            ) -> Result<bool, $crate::store::StoreError> {
                let save = $crate::store::runs::Save {
                    run_id: run_id.to_owned(),
                    owner: owner.to_owned(),
                    token,
                    attempt: attempt.cloned(),
                    update: u.clone(),
                };
                Ok(self
                    .save_progress_batch(std::slice::from_ref(&save), now)
                    .await?
                    .saved
                    .first()
                    .copied()
                    .unwrap_or(false))
            }

            async fn save_progress_batch(
                &self,
                saves: &[$crate::store::runs::Save],
                now: chrono::DateTime<chrono::Utc>,
            ) -> Result<$crate::store::runs::SavedBatch, $crate::store::StoreError> {
                let mut tx = self.writer.begin().await?;
                // Same as claims: progress is at-least-once anyway (a lost save means the
                // attempt is made again, with the same Idempotency-Key).
                let prelude: Option<&str> = $claim_prelude;
                if let Some(prelude) = prelude {
                    sqlx::query(prelude).execute(&mut *tx).await?;
                }
                let batch = Self::save_batch_in_tx(&mut tx, saves, now).await?;
                tx.commit().await?;
                Ok(batch)
            }

            async fn next_wakeup(
                &self,
            ) -> Result<Option<chrono::DateTime<chrono::Utc>>, $crate::store::StoreError> {
                // One statement, one round trip.
                let (due, lapse): (Option<chrono::DateTime<chrono::Utc>>, Option<chrono::DateTime<chrono::Utc>>) =
                    sqlx::query_as($crate::store::due::next_wakeup_sql(
                        $crate::store::EventStore::backend(self),
                    ))
                    .fetch_one(&self.reader)
                    .await?;
                Ok(match (due, lapse) {
                    (Some(a), Some(b)) => Some(a.min(b)),
                    (a, b) => a.or(b),
                })
            }

            async fn list_runs(
                &self,
                q: &$crate::store::runs::RunQuery,
            ) -> Result<Vec<$crate::store::runs::Run>, $crate::store::StoreError> {
                let mut qb = sqlx::QueryBuilder::<$db>::new(format!(
                    "SELECT {} FROM runs WHERE 1 = 1",
                    $crate::store::runs_sql::RUN_COLUMNS
                ));
                if let Some(w) = &q.workflow {
                    qb.push(" AND workflow = ").push_bind(w.as_str());
                }
                if let Some(s) = q.status {
                    qb.push(" AND status = ").push_bind(s.as_str());
                }
                if let Some(c) = &q.conversation_id {
                    qb.push(" AND conversation_id = ").push_bind(c.as_str());
                }
                if let Some(e) = &q.event_id {
                    qb.push(" AND event_id = ").push_bind(e.as_str());
                }
                if let Some((at, id)) = &q.before {
                    qb.push(" AND (created_at < ")
                        .push_bind(*at)
                        .push(" OR (created_at = ")
                        .push_bind(*at)
                        .push(" AND run_id < ")
                        .push_bind(id.as_str())
                        .push("))");
                }
                qb.push(" ORDER BY created_at DESC, run_id DESC LIMIT ")
                    .push_bind(i64::from(q.limit.max(1)));
                Ok(qb.build_query_as().fetch_all(&self.reader).await?)
            }

            async fn get_run(
                &self,
                run_id: &str,
            ) -> Result<Option<$crate::store::runs::Run>, $crate::store::StoreError> {
                Ok(sqlx::query_as(sqlx::AssertSqlSafe(format!(
                    "SELECT {} FROM runs WHERE run_id = $1",
                    $crate::store::runs_sql::RUN_COLUMNS
                )))
                .bind(run_id)
                .fetch_optional(&self.reader)
                .await?)
            }

            async fn attempts(
                &self,
                run_id: &str,
            ) -> Result<Vec<$crate::store::runs::Attempt>, $crate::store::StoreError> {
                Ok(sqlx::query_as(sqlx::AssertSqlSafe(format!(
                    "SELECT {} FROM attempts WHERE run_id = $1 ORDER BY number",
                    $crate::store::runs_sql::ATTEMPT_COLUMNS
                )))
                .bind(run_id)
                .fetch_all(&self.reader)
                .await?)
            }

            async fn retry_run(
                &self,
                run_id: &str,
                now: chrono::DateTime<chrono::Utc>,
            ) -> Result<$crate::store::runs::RunChange, $crate::store::StoreError> {
                self.change_run(
                    "UPDATE runs SET status = 'scheduled', attempt = 0, next_attempt_at = $1, last_error = NULL, \
                     finished_at = NULL, lease_owner = NULL, lease_until = NULL, updated_at = $1 \
                     WHERE run_id = $2 AND status IN ('failed', 'cancelled')",
                    run_id,
                    now,
                )
                .await
            }

            async fn cancel_run(
                &self,
                run_id: &str,
                now: chrono::DateTime<chrono::Utc>,
            ) -> Result<$crate::store::runs::RunChange, $crate::store::StoreError> {
                use $crate::store::runs::RunChange;
                // One transaction: the cancel, and the release of the next run held by order.
                let mut tx = self.writer.begin().await?;
                $crate::store::order::lock_order_in_tx!(&mut tx, run_id, Self::ORDER_LOCK);
                let r = sqlx::query(
                    "UPDATE runs SET status = 'cancelled', finished_at = $1, updated_at = $1, \
                     last_error = COALESCE(last_error, 'cancelled') \
                     WHERE run_id = $2 AND status IN ('scheduled', 'retrying', 'waiting')",
                )
                .bind(now)
                .bind(run_id)
                .execute(&mut *tx)
                .await?;
                if r.rows_affected() == 1 {
                    $crate::store::order::release_next_in_tx!(&mut tx, &[run_id], now, Self::NOTIFY_RUNS);
                }
                tx.commit().await?;
                let run = $crate::store::runs::RunStore::get_run(self, run_id).await?;
                Ok(match (r.rows_affected(), run) {
                    (_, None) => RunChange::NotFound,
                    (1, Some(run)) => RunChange::Changed(Box::new(run)),
                    (_, Some(run)) => RunChange::WrongState(run.status.as_str().to_owned()),
                })
            }

            async fn replay_event(
                &self,
                event_id: &str,
                workflows: Option<&[String]>,
                only_failed: bool,
                versions: &std::collections::BTreeMap<String, String>,
                now: chrono::DateTime<chrono::Utc>,
            ) -> Result<Vec<$crate::store::runs::ReplayOutcome>, $crate::store::StoreError> {
                let mut tx = self.writer.begin().await?;
                let outcomes =
                    Self::replay_event_in(&mut tx, event_id, workflows, only_failed, versions, None, now).await?;
                tx.commit().await?;
                Ok(outcomes)
            }

            async fn create_replay(&self, r: &$crate::store::runs::Replay) -> Result<(), $crate::store::StoreError> {
                sqlx::query(sqlx::AssertSqlSafe(format!(
                    "INSERT INTO replays ({}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15)",
                    $crate::store::runs_sql::REPLAY_COLUMNS
                )))
                .bind(&r.replay_id)
                .bind(&r.filter)
                .bind(&r.status)
                .bind(r.total)
                .bind(r.done)
                .bind(r.runs_created)
                .bind(r.skipped)
                .bind(r.failed)
                .bind(r.cursor_seq)
                .bind(r.created_at)
                .bind(r.finished_at)
                .bind(&r.mode)
                .bind(r.lease_owner.as_deref())
                .bind(r.lease_until)
                .bind(r.lease_token)
                .execute(&self.writer)
                .await?;
                Ok(())
            }

            async fn get_replay(
                &self,
                replay_id: &str,
            ) -> Result<Option<$crate::store::runs::Replay>, $crate::store::StoreError> {
                Ok(sqlx::query_as(sqlx::AssertSqlSafe(format!(
                    "SELECT {} FROM replays WHERE replay_id = $1",
                    $crate::store::runs_sql::REPLAY_COLUMNS
                )))
                .bind(replay_id)
                .fetch_optional(&self.reader)
                .await?)
            }

            async fn running_replays(&self) -> Result<Vec<$crate::store::runs::Replay>, $crate::store::StoreError> {
                Ok(sqlx::query_as(sqlx::AssertSqlSafe(format!(
                    "SELECT {} FROM replays WHERE status = 'running'",
                    $crate::store::runs_sql::REPLAY_COLUMNS
                )))
                .fetch_all(&self.reader)
                .await?)
            }

            async fn save_replay(&self, r: &$crate::store::runs::Replay) -> Result<bool, $crate::store::StoreError> {
                let res = sqlx::query(
                    "UPDATE replays SET status = $1, done = $2, runs_created = $3, skipped = $4, failed = $5, \
                     cursor_seq = $6, finished_at = $7 WHERE replay_id = $8 AND status = 'running'",
                )
                .bind(&r.status)
                .bind(r.done)
                .bind(r.runs_created)
                .bind(r.skipped)
                .bind(r.failed)
                .bind(r.cursor_seq)
                .bind(r.finished_at)
                .bind(&r.replay_id)
                .execute(&self.writer)
                .await?;
                Ok(res.rows_affected() == 1)
            }

            async fn cancel_replay(
                &self,
                replay_id: &str,
                now: chrono::DateTime<chrono::Utc>,
            ) -> Result<bool, $crate::store::StoreError> {
                let res = sqlx::query(
                    "UPDATE replays SET status = 'cancelled', finished_at = $1 WHERE replay_id = $2 AND status = 'running'",
                )
                .bind(now)
                .bind(replay_id)
                .execute(&self.writer)
                .await?;
                Ok(res.rows_affected() == 1)
            }

            async fn claim_replays(
                &self,
                owner: &str,
                now: chrono::DateTime<chrono::Utc>,
                lease: std::time::Duration,
                limit: u32,
            ) -> Result<Vec<$crate::store::runs::Replay>, $crate::store::StoreError> {
                Self::claim_leased(&self.writer, &$crate::store::leased::REPLAYS, owner, now, lease, limit).await
            }

            async fn commit_replay_page(
                &self,
                replay_id: &str,
                owner: &str,
                token: i64,
                lease: std::time::Duration,
                events: i64,
                last_seq: i64,
                page: &$crate::store::runs::ReplayPage<'_>,
                now: chrono::DateTime<chrono::Utc>,
            ) -> Result<Option<$crate::store::runs::Replay>, $crate::store::StoreError> {
                use $crate::store::runs::ReplayPage;
                let mut tx = self.writer.begin().await?;
                // The fence first: it also locks the replay's row until this page commits.
                let held =
                    Self::renew_leased(&mut *tx, &$crate::store::leased::REPLAYS, replay_id, owner, token, lease)
                        .await?;
                if !held {
                    tx.rollback().await?;
                    return Ok(None);
                }
                let (mut created, mut with_runs, mut failed) = (0i64, 0i64, 0i64);
                match *page {
                    ReplayPage::Rerun { event_ids, workflows, only_failed, versions } => {
                        for event_id in event_ids {
                            let outcomes = Self::replay_event_in(
                                &mut tx, event_id, workflows, only_failed, versions, Some(replay_id), now,
                            )
                            .await?;
                            let n = outcomes.iter().filter(|o| o.new_run_id.is_some()).count() as i64;
                            created += n;
                            with_runs += i64::from(n > 0);
                        }
                    }
                    ReplayPage::Dispatch { runs, decisions, failed: unjudged } => {
                        failed = unjudged;
                        let mut events_with_runs = std::collections::HashSet::new();
                        for r in runs {
                            let inserted = sqlx::query(
                                "INSERT INTO runs (run_id, workflow, event_seq, event_id, conversation_id, status, \
                                 next_attempt_at, context, step_results, created_at, updated_at, trace_context, version, replay_id) \
                                 VALUES ($1, $2, $3, $4, $5, 'scheduled', $6, $7, '{}', $6, $6, $8, $9, $10) \
                                 ON CONFLICT DO NOTHING",
                            )
                            .bind(r.run_id.as_str())
                            .bind(r.workflow.as_str())
                            .bind(r.event_seq)
                            .bind(r.event_id.as_str())
                            .bind(r.conversation_id.as_deref())
                            .bind(r.created_at)
                            .bind(sqlx::types::Json($crate::store::sanitize::json(&r.context).into_owned()))
                            .bind(r.trace_context.as_deref())
                            .bind(r.version.as_deref())
                            .bind(replay_id)
                            .execute(&mut *tx)
                            .await?
                            .rows_affected();
                            if inserted == 1 {
                                created += 1;
                                events_with_runs.insert(r.event_id.as_str());
                            }
                        }
                        with_runs = events_with_runs.len() as i64;
                        for d in decisions {
                            // A recorded match is kept (its run exists); a recorded skip takes today's verdict.
                            sqlx::query(
                                "INSERT INTO match_decisions (event_seq, workflow, matched, reason) VALUES ($1, $2, $3, $4) \
                                 ON CONFLICT (event_seq, workflow) DO UPDATE SET matched = excluded.matched, \
                                 reason = excluded.reason WHERE NOT match_decisions.matched",
                            )
                            .bind(d.event_seq)
                            .bind(d.workflow.as_str())
                            .bind(d.matched)
                            .bind($crate::store::sanitize::opt_text(d.reason.as_deref()).map(|c| c.into_owned()))
                            .execute(&mut *tx)
                            .await?;
                        }
                    }
                }
                if $db_clock && created > 0 {
                    // Other instances' workers wake at once (LISTEN/NOTIFY), as for appended runs.
                    sqlx::query("SELECT pg_notify('switchboard_runs', '')").execute(&mut *tx).await?;
                }
                let skipped = (events - with_runs - failed).max(0);
                let progress = sqlx::query_as(sqlx::AssertSqlSafe(format!(
                    "UPDATE replays SET done = done + $1, runs_created = runs_created + $2, skipped = skipped + $3, \
                     failed = failed + $4, cursor_seq = $5 WHERE replay_id = $6 RETURNING {}",
                    $crate::store::runs_sql::REPLAY_COLUMNS
                )))
                .bind(events)
                .bind(created)
                .bind(skipped)
                .bind(failed)
                .bind(last_seq)
                .bind(replay_id)
                .fetch_one(&mut *tx)
                .await?;
                tx.commit().await?;
                Ok(Some(progress))
            }

            async fn finish_replay(
                &self,
                replay_id: &str,
                owner: &str,
                token: i64,
                now: chrono::DateTime<chrono::Utc>,
            ) -> Result<bool, $crate::store::StoreError> {
                let res = sqlx::query(sqlx::AssertSqlSafe($crate::store::leased::REPLAYS.fenced_update(
                    "status = 'succeeded', finished_at = $1, lease_owner = NULL, lease_until = NULL",
                    2,
                )))
                .bind(now)
                .bind(replay_id)
                .bind(owner)
                .bind(token)
                .execute(&self.writer)
                .await?;
                Ok(res.rows_affected() == 1)
            }

            async fn release_replay_leases(
                &self,
                owner: &str,
                now: chrono::DateTime<chrono::Utc>,
            ) -> Result<u64, $crate::store::StoreError> {
                self.release_leased(&$crate::store::leased::REPLAYS, owner, now).await
            }

            async fn decisions(
                &self,
                event_seq: i64,
            ) -> Result<Vec<$crate::store::MatchRecord>, $crate::store::StoreError> {
                let rows: Vec<(i64, String, bool, Option<String>)> = sqlx::query_as(
                    "SELECT event_seq, workflow, matched, reason FROM match_decisions WHERE event_seq = $1 ORDER BY workflow",
                )
                .bind(event_seq)
                .fetch_all(&self.reader)
                .await?;
                Ok(rows
                    .into_iter()
                    .map(|(event_seq, workflow, matched, reason)| $crate::store::MatchRecord {
                        event_seq,
                        workflow,
                        matched,
                        reason,
                    })
                    .collect())
            }

            async fn save_setup_answer(
                &self,
                a: &$crate::store::runs::SetupAnswer,
            ) -> Result<$crate::store::runs::SetupAnswer, $crate::store::StoreError> {
                sqlx::query(
                    "INSERT INTO setup_answers (event_seq, event_id, workflow, used_fallback, reason, body, lookups, \
                     duration_ms, created_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9) ON CONFLICT DO NOTHING",
                )
                .bind(a.event_seq)
                .bind(&a.event_id)
                .bind(a.workflow.as_deref())
                .bind(a.used_fallback)
                .bind(a.reason.as_deref())
                .bind(&a.body)
                .bind(&a.lookups)
                .bind(a.duration_ms)
                .bind(a.created_at)
                .execute(&self.writer)
                .await?;
                let stored = sqlx::query_as(
                    "SELECT event_seq, event_id, workflow, used_fallback, reason, body, lookups, duration_ms, created_at \
                     FROM setup_answers WHERE event_seq = $1",
                )
                .bind(a.event_seq)
                .fetch_one(&self.writer)
                .await?;
                Ok(stored)
            }

            async fn setup_answer(
                &self,
                event_seq: i64,
            ) -> Result<Option<$crate::store::runs::SetupAnswer>, $crate::store::StoreError> {
                Ok(sqlx::query_as(
                    "SELECT event_seq, event_id, workflow, used_fallback, reason, body, lookups, duration_ms, created_at \
                     FROM setup_answers WHERE event_seq = $1",
                )
                .bind(event_seq)
                .fetch_optional(&self.reader)
                .await?)
            }

            async fn run_counts_since(
                &self,
                since: chrono::DateTime<chrono::Utc>,
            ) -> Result<Vec<(String, String, i64)>, $crate::store::StoreError> {
                Ok(sqlx::query_as(
                    "SELECT workflow, status, COUNT(*) FROM runs WHERE created_at >= $1 GROUP BY workflow, status",
                )
                .bind(since)
                .fetch_all(&self.reader)
                .await?)
            }

            async fn save_workflow_versions(
                &self,
                versions: &[$crate::store::runs::WorkflowVersion],
            ) -> Result<(), $crate::store::StoreError> {
                let mut tx = self.writer.begin().await?;
                for v in versions {
                    sqlx::query(
                        "INSERT INTO workflow_versions (hash, workflow, file, definition, created_at) \
                         VALUES ($1, $2, $3, $4, $5) ON CONFLICT DO NOTHING",
                    )
                    .bind(&v.hash)
                    .bind(&v.workflow)
                    .bind(&v.file)
                    .bind($crate::store::runs::storable_text(&v.definition).as_ref())
                    .bind(v.created_at)
                    .execute(&mut *tx)
                    .await?;
                }
                tx.commit().await?;
                Ok(())
            }

            async fn workflow_version(
                &self,
                hash: &str,
            ) -> Result<Option<$crate::store::runs::WorkflowVersion>, $crate::store::StoreError> {
                Ok(sqlx::query_as(
                    "SELECT hash, workflow, file, definition, created_at FROM workflow_versions WHERE hash = $1",
                )
                .bind(hash)
                .fetch_optional(&self.reader)
                .await?)
            }

            async fn workflow_versions(
                &self,
                workflow: &str,
            ) -> Result<Vec<($crate::store::runs::WorkflowVersion, i64)>, $crate::store::StoreError> {
                let rows: Vec<(String, String, String, chrono::DateTime<chrono::Utc>, i64)> = sqlx::query_as(
                    "SELECT v.hash, v.workflow, v.file, v.created_at, \
                     (SELECT COUNT(*) FROM runs r WHERE r.version = v.hash \
                      AND r.status IN ('scheduled', 'running', 'retrying', 'waiting')) \
                     FROM workflow_versions v WHERE v.workflow = $1 ORDER BY v.created_at, v.hash",
                )
                .bind(workflow)
                .fetch_all(&self.reader)
                .await?;
                Ok(rows
                    .into_iter()
                    .map(|(hash, workflow, file, created_at, n)| {
                        (
                            $crate::store::runs::WorkflowVersion {
                                hash,
                                workflow,
                                file,
                                definition: String::new(),
                                created_at,
                            },
                            n,
                        )
                    })
                    .collect())
            }

            async fn in_flight_by_version(
                &self,
            ) -> Result<Vec<(String, Option<String>, i64)>, $crate::store::StoreError> {
                Ok(sqlx::query_as(
                    "SELECT workflow, version, COUNT(*) FROM runs \
                     WHERE status IN ('scheduled', 'running', 'retrying', 'waiting') GROUP BY workflow, version",
                )
                .fetch_all(&self.reader)
                .await?)
            }
        }
    };
}
pub(crate) use impl_run_store;
