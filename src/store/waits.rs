//! The index of runs waiting at a `wait` / `wait_for` step (table
//! `run_waits`), for both backends.
//!
//! A run starts waiting in one transaction that parks it (status `waiting`,
//! no lease, due at its resume time or timeout) and records what it waits
//! for; a `wait_for` first looks, in that same transaction and under the
//! append lock, for a matching event already stored after the run's
//! trigger. Every later event is matched inside the transaction that
//! appends it ([`match_waits_in_tx`], called from the append flow), which
//! marks the wait matched and makes the run due now. The worker that then
//! claims the run ends the wait and saves the step's result in one
//! transaction ([`WaitStore::finish_wait`]), so a wait ends exactly once,
//! whatever crashes in between.

use chrono::{DateTime, Utc};
use serde_json::Value;

use super::StoreError;
use super::runs::RunUpdate;

/// A wait to record when a run reaches a wait step.
#[derive(Clone, Debug)]
pub struct NewWait {
    pub run_id: String,
    pub step_id: String,
    /// `timer` or `event` (also the run's `wait_reason`).
    pub kind: &'static str,
    pub conversation_id: Option<String>,
    pub event_type: Option<String>,
    /// Only events after this place in the log count (the run's trigger).
    pub after_seq: i64,
    /// The `wait_for` as JSON ([`crate::workflow::wait::WaitFor`]); `null` for a timer.
    pub matcher: Value,
    pub started_at: DateTime<Utc>,
    /// The resume time (timer) or the timeout (event).
    pub until: DateTime<Utc>,
}

/// A recorded wait.
#[derive(Clone, Debug, sqlx::FromRow)]
pub struct RunWait {
    pub run_id: String,
    pub step_id: String,
    pub kind: String,
    pub conversation_id: Option<String>,
    pub event_type: Option<String>,
    pub after_seq: i64,
    pub matcher: String,
    pub started_at: DateTime<Utc>,
    pub until_at: DateTime<Utc>,
    pub matched_event_id: Option<String>,
    pub matched_seq: Option<i64>,
    pub matched_at: Option<DateTime<Utc>>,
}

impl RunWait {
    /// The `wait_for` this row waits on (`None` for a timer).
    pub fn wait_for(&self) -> Option<crate::workflow::wait::WaitFor> {
        serde_json::from_str(&self.matcher).ok()
    }
}

pub(crate) const WAIT_COLUMNS: &str = "run_id, step_id, kind, conversation_id, event_type, after_seq, matcher, \
     started_at, until_at, matched_event_id, matched_seq, matched_at";

/// How a due wait ended.
#[derive(Clone, Debug)]
pub struct WaitOutcome {
    pub wait: RunWait,
    /// The envelope of the event that matched (`None`: a timer, or timed out).
    pub envelope: Option<Value>,
}

/// What [`WaitStore::finish_wait`] found.
#[derive(Debug)]
pub enum FinishWait {
    /// The run has no wait recorded: it reaches its wait step now.
    NotWaiting,
    /// Neither matched nor due yet: the run was parked again until then.
    Pending(DateTime<Utc>),
    /// Another worker holds the run.
    LeaseLost,
    /// The wait ended and the update was saved.
    Done(Box<WaitOutcome>, Box<RunUpdate>),
}

/// Runs reaching a wait step, queued for one transaction (group commit):
/// a burst of runs parking costs one commit (one fsync on SQLite) per
/// batch, not one each. Each store holds one.
#[derive(Default)]
pub struct WaitBatch {
    queue: std::sync::Mutex<Vec<QueuedWait>>,
    /// Held while a batch is written; the next holder writes what queued meanwhile.
    pub(crate) turn: tokio::sync::Mutex<()>,
}

/// Most waits written in one transaction.
const MAX_WAITS: usize = 256;

impl WaitBatch {
    pub(crate) fn push(&self, wait: QueuedWait) {
        self.queue.lock().expect("wait queue").push(wait);
    }

    /// How many waits are queued.
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.queue.lock().expect("wait queue").len()
    }

    /// Up to [`MAX_WAITS`] queued waits, oldest first.
    pub(crate) fn take(&self) -> Vec<QueuedWait> {
        let mut queue = self.queue.lock().expect("wait queue");
        let n = queue.len().min(MAX_WAITS);
        queue.drain(..n).collect()
    }
}

/// A [`WaitStore::begin_wait`] waiting for its transaction.
pub(crate) struct QueuedWait {
    pub owner: String,
    pub token: i64,
    pub update: RunUpdate,
    pub wait: NewWait,
    pub now: DateTime<Utc>,
    pub reply: tokio::sync::oneshot::Sender<Result<Option<bool>, StoreError>>,
}

/// Builds the run's update from how its wait ended.
pub type MakeUpdate<'a> = &'a (dyn Fn(&WaitOutcome) -> RunUpdate + Send + Sync);

#[async_trait::async_trait]
pub trait WaitStore: Send + Sync + 'static {
    /// Parks a run leased by `owner`/`token` at a wait step: saves `update`
    /// (status `waiting`) and records `wait`; a `wait_for` that an already
    /// stored event after the trigger matches is recorded as matched and the
    /// run is due now. `None` when the lease was lost, else whether it matched already.
    async fn begin_wait(
        &self,
        owner: &str,
        token: i64,
        update: &RunUpdate,
        wait: &NewWait,
        now: DateTime<Utc>,
    ) -> Result<Option<bool>, StoreError>;

    /// Ends the wait of a claimed run at `step_id` if it matched or is due,
    /// saving `make_update(outcome)` in the same transaction.
    async fn finish_wait(
        &self,
        run_id: &str,
        step_id: &str,
        owner: &str,
        token: i64,
        now: DateTime<Utc>,
        make_update: MakeUpdate<'_>,
    ) -> Result<FinishWait, StoreError>;

    /// The recorded wait of a run, if any.
    async fn run_wait(&self, run_id: &str) -> Result<Option<RunWait>, StoreError>;

    /// Forgets the wait of a run that is no longer waiting (cancelled).
    async fn remove_wait(&self, run_id: &str) -> Result<(), StoreError>;

    /// For a run held by order: the earlier runs of its workflow and
    /// conversation that have not ended, in log order, with their status.
    async fn held_behind(&self, run_id: &str) -> Result<Vec<(String, String)>, StoreError>;

    /// Runs waiting (at a step, or held by order) now, and when the oldest started waiting.
    async fn wait_stats(&self) -> Result<(i64, Option<DateTime<Utc>>), StoreError>;
}

/// A stored event as the wait lookups read it: (seq, event id, type, raw body, received_at).
pub type LoggedEvent = (i64, String, String, Vec<u8>, DateTime<Utc>);

/// Folds a conversation's stored events (`(seq, type, raw body, received_at)`,
/// in log order) and returns the first event after `after_seq` that `wait` matches.
pub(crate) fn first_match(
    conversation_id: &str,
    events: &[LoggedEvent],
    wait: &crate::workflow::wait::WaitFor,
    after_seq: i64,
) -> Option<(i64, String)> {
    use super::projection::ConversationState;
    use crate::operator::envelope::Envelope;
    use crate::workflow::matching::EventFacts;
    let mut state = ConversationState::new(conversation_id);
    for (seq, event_id, event_type, body, received_at) in events {
        let Ok(envelope) = Envelope::parse(body) else {
            continue;
        };
        let before = state.clone();
        state.apply(*seq, &envelope, *received_at);
        if *seq <= after_seq || *event_type != wait.event {
            continue;
        }
        let json: Value = serde_json::from_slice(body).unwrap_or_default();
        let facts = EventFacts {
            envelope: &envelope,
            event_json: &json,
            before: Some(&before),
            after: Some(&state),
        };
        if wait.matches(&facts) {
            return Some((*seq, event_id.clone()));
        }
    }
    None
}

/// An unmatched `wait_for` as the append's matcher reads it.
#[derive(Clone, Debug, sqlx::FromRow, serde::Deserialize)]
pub struct PendingWait {
    pub run_id: String,
    pub conversation_id: String,
    pub event_type: String,
    pub after_seq: i64,
    /// The `wait_for` as JSON ([`crate::workflow::wait::WaitFor`]).
    pub matcher: String,
}

/// [`PendingWait`]s from SQLite's one-row JSON array of
/// `[run_id, conversation_id, event_type, after_seq, matcher]`.
pub(crate) fn pending_from_json(rows: &str) -> Result<Vec<PendingWait>, StoreError> {
    let rows: Vec<(String, String, String, i64, String)> = serde_json::from_str(rows)
        .map_err(|e| StoreError::Corrupt(format!("waits of a batch: {e}")))?;
    Ok(rows
        .into_iter()
        .map(
            |(run_id, conversation_id, event_type, after_seq, matcher)| PendingWait {
                run_id,
                conversation_id,
                event_type,
                after_seq,
                matcher,
            },
        )
        .collect())
}

/// Matches the events of a batch being appended against the waits of their
/// conversations: `waits` are the unmatched event waits read before the
/// plan, `states` the conversations' projections before the batch (only
/// those of conversations with waits are needed). Returns the matches to
/// write: (run id, event id, seq).
///
/// The waits are indexed by (conversation, event type), so each event costs
/// a hash look-up plus the waits of its own conversation and type: an event
/// of a conversation nobody waits on costs nothing more, whatever the batch
/// holds. Only conversations with waits are folded (their state before and
/// after each event is what `wait_for` compares).
pub(crate) fn match_batch(
    inserts: &[super::batch::Insert<'_>],
    waits: &[PendingWait],
    mut states: std::collections::HashMap<String, super::projection::ConversationState>,
) -> Vec<(String, String, i64)> {
    use std::collections::{HashMap, HashSet};

    use super::projection::ConversationState;
    use crate::workflow::matching::EventFacts;
    use crate::workflow::wait::WaitFor;
    let mut matched: Vec<(String, String, i64)> = Vec::new();
    // (conversation, event type) → its waits; every conversation with a wait.
    let mut by_key: HashMap<(&str, &str), Vec<(&PendingWait, WaitFor)>> = HashMap::new();
    let mut waiting: HashSet<&str> = HashSet::new();
    for w in waits {
        let Ok(wait_for) = serde_json::from_str::<WaitFor>(&w.matcher) else {
            continue;
        };
        waiting.insert(&w.conversation_id);
        by_key
            .entry((&w.conversation_id, &w.event_type))
            .or_default()
            .push((w, wait_for));
    }
    if by_key.is_empty() {
        return matched;
    }
    let mut done: HashSet<&str> = HashSet::new();
    for insert in inserts {
        let env = &insert.event.envelope;
        let Some(conv) = env.conversation_id.as_ref().map(|c| c.as_str()) else {
            continue;
        };
        if !waiting.contains(conv) {
            continue;
        }
        let state = states
            .entry(conv.to_owned())
            .or_insert_with(|| ConversationState::new(conv));
        let candidates: Vec<&(&PendingWait, WaitFor)> = by_key
            .get(&(conv, env.event_type.as_str()))
            .map(|ws| {
                ws.iter()
                    .filter(|(w, _)| w.after_seq < insert.seq && !done.contains(w.run_id.as_str()))
                    .collect()
            })
            .unwrap_or_default();
        if candidates.is_empty() {
            // Still folded: a later event of the batch is compared with this state.
            state.apply(insert.seq, env, insert.event.received_at);
            continue;
        }
        let before = state.clone();
        state.apply(insert.seq, env, insert.event.received_at);
        // The body as JSON is read by `when` only: parsed only for a wait that has one.
        let json: Value = if candidates.iter().any(|(_, w)| w.when.is_some()) {
            serde_json::from_slice(&insert.event.raw_body).unwrap_or_default()
        } else {
            Value::Null
        };
        let facts = EventFacts {
            envelope: env,
            event_json: &json,
            before: Some(&before),
            after: Some(state),
        };
        for (w, wait_for) in candidates {
            if wait_for.matches(&facts) {
                done.insert(w.run_id.as_str());
                matched.push((w.run_id.clone(), env.id.to_string(), insert.seq));
            }
        }
    }
    matched
}

/// Selects the unmatched event waits of conversations `ids` (not empty) and
/// event types `types`, read inside the append transaction with the other
/// reads of its plan (one probe of `run_waits_by_event` per conversation),
/// as [`PendingWait`]s ([`pending_of`]).
///
/// On SQLite the rows come back as one JSON array in one row: sqlx hands
/// each row of a result from its SQLite worker thread to the task over a
/// channel, so a row per waiting conversation cost a hand-over between
/// threads per event of the batch (bench `waits`: that, not the index probe,
/// was most of the extra CPU per event beside 100,000 waiting runs).
pub(crate) fn waits_of<DB: sqlx::Database>(
    qb: &mut sqlx::QueryBuilder<DB>,
    ids: &[&str],
    types: &[&str],
) where
    for<'t> &'t str: sqlx::Encode<'t, DB> + sqlx::Type<DB>,
{
    // Both columns of the partial index `run_waits_by_event`.
    qb.push(if DB::NAME == "SQLite" {
        "SELECT json_group_array(json_array(run_id, conversation_id, event_type, after_seq, matcher)) \
         FROM run_waits WHERE matched_seq IS NULL AND kind = 'event' AND conversation_id IN "
    } else {
        "SELECT run_id, conversation_id, event_type, after_seq, matcher \
         FROM run_waits WHERE matched_seq IS NULL AND kind = 'event' AND conversation_id IN "
    });
    super::sql::push_list(qb, ids.iter().copied());
    qb.push(" AND event_type IN ");
    super::sql::push_list(qb, types.iter().copied());
}

/// The [`PendingWait`]s of [`waits_of`]'s rows on `$db`.
macro_rules! pending_of {
    ($db:ty, $rows:expr) => {{
        let rows: Vec<<$db as sqlx::Database>::Row> = $rows;
        if <$db as sqlx::Database>::NAME == "SQLite" {
            match rows.first() {
                Some(row) => $crate::store::waits::pending_from_json(&sqlx::Row::try_get::<
                    String,
                    _,
                >(row, 0)?)?,
                None => Vec::new(),
            }
        } else {
            rows.iter()
                .map(sqlx::FromRow::from_row)
                .collect::<Result<Vec<$crate::store::waits::PendingWait>, _>>()?
        }
    }};
}
pub(crate) use pending_of;

/// Inside the append transaction, after the events are inserted: marks the
/// waits they match and makes those runs due now. Returns how many resumed.
macro_rules! match_waits_in_tx {
    ($tx:expr, $inserts:expr, $waits:expr, $states:expr) => {{
        let now = chrono::Utc::now();
        let mut resumed = 0usize;
        for (run_id, event_id, seq) in $crate::store::waits::match_batch($inserts, $waits, $states) {
            let r = sqlx::query(
                "UPDATE run_waits SET matched_event_id = $1, matched_seq = $2, matched_at = $3 \
                 WHERE run_id = $4 AND matched_seq IS NULL",
            )
            .bind(&event_id)
            .bind(seq)
            .bind(now)
            .bind(&run_id)
            .execute(&mut **$tx)
            .await?;
            if r.rows_affected() == 1 {
                sqlx::query(
                    "UPDATE runs SET next_attempt_at = $1, updated_at = $1 WHERE run_id = $2 AND status = 'waiting'",
                )
                .bind(now)
                .bind(&run_id)
                .execute(&mut **$tx)
                .await?;
                resumed += 1;
            }
        }
        resumed
    }};
}
pub(crate) use match_waits_in_tx;

/// Implements [`WaitStore`]: `$append_lock` is the advisory lock that serializes
/// with appends (PostgreSQL; SQLite has one writer connection),
/// `$row_lock` the row-lock clause of a SELECT. The run's own writes are the
/// run store's (`impl_run_store!`: `save_in_tx`, `hold_in`).
macro_rules! impl_wait_store {
    ($store:ty, $db:ty, $append_lock:expr, $row_lock:expr) => {
        impl $store {
            /// Writes queued waits in one transaction and answers each; if that
            /// fails, one by one, so that one bad wait does not fail its neighbours.
            async fn write_waits(&self, jobs: Vec<$crate::store::waits::QueuedWait>) {
                let parked = self.park_in_one_tx(&jobs).await;
                match parked {
                    Ok(results) => {
                        for (job, r) in jobs.into_iter().zip(results) {
                            let _ = job.reply.send(Ok(r));
                        }
                    }
                    Err(e) if jobs.len() == 1 => {
                        let job = jobs.into_iter().next().expect("one wait");
                        let _ = job.reply.send(Err(e));
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, batch = jobs.len(), "batched waits failed; parking one by one");
                        for job in jobs {
                            let one = self
                                .park_in_one_tx(std::slice::from_ref(&job))
                                .await
                                .map(|r| r[0]);
                            let _ = job.reply.send(one);
                        }
                    }
                }
            }

            /// Parks each run of `jobs` at its wait step (see [`WaitStore::begin_wait`])
            /// in one transaction: `None` for a run whose lease was lost (nothing
            /// written for it), else whether its `wait_for` matched already.
            async fn park_in_one_tx(
                &self,
                jobs: &[$crate::store::waits::QueuedWait],
            ) -> Result<Vec<Option<bool>>, $crate::store::StoreError> {
                let mut tx = self.writer.begin().await?;
                if jobs.iter().any(|j| j.wait.kind == "event") {
                    let lock: Option<i64> = $append_lock;
                    if let Some(lock) = lock {
                        sqlx::query("SELECT pg_advisory_xact_lock($1)")
                            .bind(lock)
                            .execute(&mut *tx)
                            .await?;
                    }
                }
                let mut results = Vec::with_capacity(jobs.len());
                for job in jobs {
                    let (owner, token, u, w, now) = (job.owner.as_str(), job.token, &job.update, &job.wait, job.now);
                    // An event already stored after the trigger counts (no lost race:
                    // appends wait for this transaction, or were committed before it).
                    let mut matched: Option<(i64, String)> = None;
                    if let (Some(conv), Some(wait_for)) = (
                        w.conversation_id.as_deref(),
                        serde_json::from_value::<$crate::workflow::wait::WaitFor>(w.matcher.clone()).ok(),
                    ) {
                        let events: Vec<$crate::store::waits::LoggedEvent> =
                            sqlx::query_as(
                                "SELECT seq, event_id, event_type, raw_body, received_at FROM events \
                                 WHERE conversation_id = $1 ORDER BY seq",
                            )
                            .bind(conv)
                            .fetch_all(&mut *tx)
                            .await?;
                        matched = $crate::store::waits::first_match(conv, &events, &wait_for, w.after_seq);
                    }
                    // Parked with the run store's one save: waiting, no lease, due at once if matched.
                    let parked = $crate::store::runs::RunUpdate {
                        status: $crate::store::runs::RunStatus::Waiting,
                        next_attempt_at: if matched.is_some() { now } else { w.until },
                        lease: None,
                        last_error: None,
                        finished_at: None,
                        wait_reason: Some(w.kind.to_owned()),
                        ..u.clone()
                    };
                    if !Self::save_in_tx(&mut tx, &w.run_id, owner, token, None, &parked, now).await? {
                        // Lost the lease: nothing written for this run.
                        results.push(None);
                        continue;
                    }
                    sqlx::query("DELETE FROM run_waits WHERE run_id = $1")
                        .bind(&w.run_id)
                        .execute(&mut *tx)
                        .await?;
                    sqlx::query(
                        "INSERT INTO run_waits (run_id, step_id, kind, conversation_id, event_type, after_seq, \
                         matcher, started_at, until_at, matched_event_id, matched_seq, matched_at) \
                         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)",
                    )
                    .bind(&w.run_id)
                    .bind(&w.step_id)
                    .bind(w.kind)
                    .bind(w.conversation_id.as_deref())
                    .bind(w.event_type.as_deref())
                    .bind(w.after_seq)
                    .bind(w.matcher.to_string())
                    .bind(w.started_at)
                    .bind(w.until)
                    .bind(matched.as_ref().map(|m| m.1.clone()))
                    .bind(matched.as_ref().map(|m| m.0))
                    .bind(matched.as_ref().map(|_| now))
                    .execute(&mut *tx)
                    .await?;
                    results.push(Some(matched.is_some()));
                }
                tx.commit().await?;
                Ok(results)
            }
        }

        #[async_trait::async_trait]
        impl $crate::store::waits::WaitStore for $store {
            async fn begin_wait(
                &self,
                owner: &str,
                token: i64,
                u: &$crate::store::runs::RunUpdate,
                w: &$crate::store::waits::NewWait,
                now: chrono::DateTime<chrono::Utc>,
            ) -> Result<Option<bool>, $crate::store::StoreError> {
                // Group commit: whoever gets the turn writes every wait queued by
                // then in one transaction (see [`WaitBatch`]).
                let (reply, answer) = tokio::sync::oneshot::channel();
                self.waits.push($crate::store::waits::QueuedWait {
                    owner: owner.to_owned(),
                    token,
                    update: u.clone(),
                    wait: w.clone(),
                    now,
                    reply,
                });
                {
                    let _turn = self.waits.turn.lock().await;
                    let jobs = self.waits.take();
                    if !jobs.is_empty() {
                        self.write_waits(jobs).await;
                    }
                }
                answer.await.unwrap_or(Err($crate::store::StoreError::Closed))
            }

            async fn finish_wait(
                &self,
                run_id: &str,
                step_id: &str,
                owner: &str,
                token: i64,
                now: chrono::DateTime<chrono::Utc>,
                make_update: $crate::store::waits::MakeUpdate<'_>,
            ) -> Result<$crate::store::waits::FinishWait, $crate::store::StoreError> {
                use $crate::store::waits::{FinishWait, RunWait, WaitOutcome};
                let mut tx = self.writer.begin().await?;
                // The wait may end the run (a last step): the order lock comes before any row lock.
                $crate::store::order::lock_order_in_tx!(&mut tx, run_id, Self::ORDER_LOCK);
                let row: Option<RunWait> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
                    "SELECT {} FROM run_waits WHERE run_id = $1 AND step_id = $2 {}",
                    $crate::store::waits::WAIT_COLUMNS,
                    $row_lock
                )))
                .bind(run_id)
                .bind(step_id)
                .fetch_optional(&mut *tx)
                .await?;
                let Some(wait) = row else {
                    tx.rollback().await?;
                    return Ok(FinishWait::NotWaiting);
                };
                if wait.matched_seq.is_none() && wait.until_at > now {
                    // Not over yet: parked again until then (as `hold_run`).
                    let held =
                        Self::hold_in(&mut *tx, run_id, owner, token, wait.until_at, &wait.kind, now).await?;
                    tx.commit().await?;
                    return Ok(if held {
                        FinishWait::Pending(wait.until_at)
                    } else {
                        FinishWait::LeaseLost
                    });
                }
                let envelope = match &wait.matched_event_id {
                    Some(id) => {
                        let body: Option<Vec<u8>> =
                            sqlx::query_scalar("SELECT raw_body FROM events WHERE event_id = $1")
                                .bind(id)
                                .fetch_optional(&mut *tx)
                                .await?;
                        Some(
                            body.and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
                                .unwrap_or(serde_json::Value::Null),
                        )
                    }
                    None => None,
                };
                let outcome = WaitOutcome { wait, envelope };
                // The wait is over: the run store's one save (no attempt), its wait reason cleared.
                let u = $crate::store::runs::RunUpdate {
                    wait_reason: None,
                    ..make_update(&outcome)
                };
                if !Self::save_in_tx(&mut tx, run_id, owner, token, None, &u, now).await? {
                    tx.rollback().await?;
                    return Ok(FinishWait::LeaseLost);
                }
                sqlx::query("DELETE FROM run_waits WHERE run_id = $1")
                    .bind(run_id)
                    .execute(&mut *tx)
                    .await?;
                if u.status.is_final() {
                    $crate::store::order::release_next_in_tx!(&mut tx, &[run_id], now, Self::NOTIFY_RUNS);
                }
                tx.commit().await?;
                Ok(FinishWait::Done(Box::new(outcome), Box::new(u)))
            }

            async fn run_wait(
                &self,
                run_id: &str,
            ) -> Result<Option<$crate::store::waits::RunWait>, $crate::store::StoreError> {
                Ok(sqlx::query_as(sqlx::AssertSqlSafe(format!(
                    "SELECT {} FROM run_waits WHERE run_id = $1",
                    $crate::store::waits::WAIT_COLUMNS
                )))
                .bind(run_id)
                .fetch_optional(&self.reader)
                .await?)
            }

            async fn remove_wait(&self, run_id: &str) -> Result<(), $crate::store::StoreError> {
                sqlx::query(
                    "DELETE FROM run_waits WHERE run_id = $1 AND NOT EXISTS \
                     (SELECT 1 FROM runs WHERE runs.run_id = $1 AND runs.status IN ('waiting', 'running'))",
                )
                .bind(run_id)
                .execute(&self.writer)
                .await?;
                Ok(())
            }

            async fn held_behind(
                &self,
                run_id: &str,
            ) -> Result<Vec<(String, String)>, $crate::store::StoreError> {
                Ok(sqlx::query_as(sqlx::AssertSqlSafe(format!(
                    "SELECT h.run_id, h.status FROM runs h JOIN runs me \
                       ON h.workflow = me.workflow AND h.conversation_id = me.conversation_id \
                     WHERE me.run_id = $1 AND h.replay_of IS NULL AND h.status IN {} \
                       AND h.event_seq < me.event_seq ORDER BY h.event_seq",
                    $crate::store::order::UNFINISHED
                )))
                .bind(run_id)
                .fetch_all(&self.reader)
                .await?)
            }

            async fn wait_stats(
                &self,
            ) -> Result<(i64, Option<chrono::DateTime<chrono::Utc>>), $crate::store::StoreError> {
                // Runs at a wait step, and runs held by order (waiting since created):
                // index reads only (store/gauges.rs).
                let (waiting, at_step, in_order): (
                    i64,
                    Option<chrono::DateTime<chrono::Utc>>,
                    Option<chrono::DateTime<chrono::Utc>>,
                ) = sqlx::query_as(sqlx::AssertSqlSafe(
                    $crate::store::gauges::wait_stats_sql(<Self as $crate::store::EventStore>::backend(self)),
                ))
                .fetch_one(&self.reader)
                .await?;
                let oldest = match (at_step, in_order) {
                    (Some(a), Some(b)) => Some(a.min(b)),
                    (a, b) => a.or(b),
                };
                Ok((waiting, oldest))
            }
        }
    };
}
pub(crate) use impl_wait_store;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::batch::Insert;
    use crate::store::model::NewEvent;

    fn field_event(id: &str, conv: &str, value: &str) -> NewEvent {
        let body = serde_json::json!({
            "id": id,
            "conversation_id": conv,
            "payload": {"type": "conversation.custom_fields.updated", "key": "lead_status", "value": value}
        })
        .to_string();
        NewEvent::of_body(body, id)
    }

    fn wait(run: &str, conv: &str, after_seq: i64, from: &str, to: &str) -> PendingWait {
        let matcher = serde_json::json!({
            "event": "conversation.custom_fields.updated",
            "field": "lead_status",
            "from": [from],
            "to": [to],
            "timeout": 60_000
        });
        PendingWait {
            run_id: run.into(),
            conversation_id: conv.into(),
            event_type: "conversation.custom_fields.updated".into(),
            after_seq,
            matcher: matcher.to_string(),
        }
    }

    #[test]
    fn reads_the_pending_waits_of_sqlites_one_row() {
        let w = pending_from_json(
            r#"[["run_1","conv_a","conversation.ended",7,"{\"event\":\"conversation.ended\"}"]]"#,
        )
        .unwrap();
        assert_eq!(w.len(), 1);
        assert_eq!((w[0].run_id.as_str(), w[0].after_seq), ("run_1", 7));
        assert!(pending_from_json("[]").unwrap().is_empty());
    }

    #[test]
    fn matches_each_wait_once_against_the_state_before_and_after_its_event() {
        let events = [
            field_event("ev_1", "conv_a", "new"),
            field_event("ev_2", "conv_b", "qualified"),
            field_event("ev_3", "conv_a", "qualified"), // new → qualified within the batch
            field_event("ev_4", "conv_a", "new"),
            field_event("ev_5", "conv_a", "qualified"), // again: run_a has matched already
            field_event("ev_6", "conv_z", "qualified"), // nobody waits on conv_z
        ];
        let inserts: Vec<Insert<'_>> = events
            .iter()
            .enumerate()
            .map(|(i, event)| Insert {
                event,
                seq: 10 + i as i64,
                stream_version: None,
            })
            .collect();
        let waits = vec![
            wait("run_a", "conv_a", 5, "new", "qualified"),
            // Only events after its trigger (seq 11, ev_2) count.
            wait("run_b", "conv_b", 11, "new", "qualified"),
            // Matches ev_5 only (ev_3 comes before its trigger, seq 13).
            wait("run_a2", "conv_a", 13, "new", "qualified"),
            wait("run_c", "conv_c", 5, "new", "qualified"),
        ];
        let matched = match_batch(&inserts, &waits, Default::default());
        assert_eq!(
            matched,
            vec![
                ("run_a".to_owned(), "ev_3".to_owned(), 12),
                ("run_a2".to_owned(), "ev_5".to_owned(), 14),
            ]
        );
    }
}
