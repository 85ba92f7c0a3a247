//! SQL shared by both backends. The statements are the same text on SQLite
//! and PostgreSQL; [`QueryBuilder`] supplies each dialect's placeholders.
//! The backend modules only add what really differs (locking, connection
//! setup, migrations).

use std::collections::{HashMap, HashSet};

use chrono::{DateTime, Utc};
use sqlx::{Database, Encode, QueryBuilder, Type, types::Json};

use super::batch::{Existing, Insert};
use super::model::{EventQuery, EventRef, NewEvent, Order, StoredEvent, Verification};
use super::projection::ConversationState;
use super::sanitize;

/// The columns of [`EventRow`], in order.
pub(crate) const EVENT_COLUMNS: &str = "seq, event_id, idempotency_key, event_type, conversation_id, \
     stream_version, agent_id, livemode, created_at, received_at, signed_url, x_timestamp, x_signature";

pub(crate) const LAST_SEQ: &str = "SELECT COALESCE(MAX(seq), 0) FROM events";

/// An `events` row without its body.
#[derive(sqlx::FromRow)]
pub(crate) struct EventRow {
    seq: i64,
    event_id: String,
    idempotency_key: String,
    event_type: String,
    conversation_id: Option<String>,
    stream_version: Option<i64>,
    agent_id: Option<String>,
    livemode: Option<bool>,
    created_at: Option<String>,
    received_at: DateTime<Utc>,
    signed_url: String,
    x_timestamp: String,
    x_signature: String,
}

impl From<EventRow> for StoredEvent {
    fn from(r: EventRow) -> Self {
        StoredEvent {
            seq: r.seq,
            event_id: r.event_id,
            idempotency_key: r.idempotency_key,
            event_type: r.event_type,
            conversation_id: r.conversation_id,
            stream_version: r.stream_version,
            agent_id: r.agent_id,
            livemode: r.livemode,
            created_at: r.created_at,
            received_at: r.received_at,
            verification: Verification {
                signed_url: r.signed_url,
                timestamp: r.x_timestamp,
                signature: r.x_signature,
            },
        }
    }
}

/// An `events` row with its body.
#[derive(sqlx::FromRow)]
pub(crate) struct EventRowWithBody {
    #[sqlx(flatten)]
    event: EventRow,
    raw_body: Vec<u8>,
}

impl From<EventRowWithBody> for super::model::StoredEventWithBody {
    fn from(r: EventRowWithBody) -> Self {
        Self {
            event: r.event.into(),
            raw_body: r.raw_body,
        }
    }
}

/// A stored event that may collide with a batch.
#[derive(sqlx::FromRow)]
pub(crate) struct CandidateRow {
    seq: i64,
    event_id: String,
    event_type: String,
    idempotency_key: String,
    received_at: DateTime<Utc>,
}

/// Selects stored events sharing an envelope id, or a key within the window, with the batch.
pub(crate) fn candidates<DB: Database>(batch: &[NewEvent]) -> QueryBuilder<DB>
where
    for<'t> &'t str: Encode<'t, DB> + Type<DB>,
{
    // Two index lookups joined by UNION ALL: with OR, PostgreSQL may scan the table.
    // The 24 h window of keys is applied by `existing`, not here: every recent event
    // matches `received_at >= cutoff`, and a plan that used that range scanned them all
    // (measured: 160 ms per batch at 40,000 events on PostgreSQL).
    let mut qb = QueryBuilder::new(
        "SELECT seq, event_id, event_type, idempotency_key, received_at FROM events WHERE event_id IN (",
    );
    let mut ids = qb.separated(", ");
    for e in batch {
        ids.push_bind(e.envelope.id.as_str());
    }
    qb.push(
        ") UNION ALL SELECT seq, event_id, event_type, idempotency_key, received_at FROM events \
         WHERE idempotency_key IN (",
    );
    let mut keys = qb.separated(", ");
    for e in batch {
        keys.push_bind(e.idempotency_key.as_str());
    }
    qb.push(")");
    qb
}

/// Sorts candidate rows into what they collide on.
pub(crate) fn existing(
    batch: &[NewEvent],
    rows: Vec<CandidateRow>,
    key_cutoff: DateTime<Utc>,
) -> Existing {
    let ids: HashSet<&str> = batch.iter().map(|e| e.envelope.id.as_str()).collect();
    let keys: HashSet<&str> = batch.iter().map(|e| e.idempotency_key.as_str()).collect();
    let mut existing = Existing::default();
    for row in rows {
        let reference = EventRef {
            seq: row.seq,
            event_id: row.event_id.clone(),
            event_type: row.event_type,
        };
        if keys.contains(row.idempotency_key.as_str()) && row.received_at >= key_cutoff {
            existing
                .by_key
                .insert(row.idempotency_key, reference.clone());
        }
        if ids.contains(row.event_id.as_str()) {
            existing.by_event_id.insert(row.event_id, reference);
        }
    }
    existing
}

/// Selects the stored projections of the conversations in a batch, or `None` if it has none.
pub(crate) fn conversations_of<DB: Database>(batch: &[NewEvent]) -> Option<QueryBuilder<DB>>
where
    for<'t> &'t str: Encode<'t, DB> + Type<DB>,
{
    let ids: HashSet<&str> = batch
        .iter()
        .filter_map(|e| e.envelope.conversation_id.as_ref().map(|c| c.as_str()))
        .collect();
    if ids.is_empty() {
        return None;
    }
    let mut qb = QueryBuilder::new("SELECT state FROM conversations WHERE conversation_id IN (");
    let mut sep = qb.separated(", ");
    for id in ids {
        sep.push_bind(id);
    }
    qb.push(")");
    Some(qb)
}

/// Indexes loaded projections by conversation id.
pub(crate) fn by_conversation(
    states: Vec<Json<ConversationState>>,
) -> HashMap<String, ConversationState> {
    states
        .into_iter()
        .map(|Json(s)| (s.conversation_id.clone(), s))
        .collect()
}

/// Inserts new events of a plan, or `None` if there are none.
pub(crate) fn insert_events<DB: Database>(inserts: &[Insert<'_>]) -> Option<QueryBuilder<DB>>
where
    for<'t> &'t str: Encode<'t, DB> + Type<DB>,
    for<'t> i64: Encode<'t, DB> + Type<DB>,
    for<'t> Option<i64>: Encode<'t, DB> + Type<DB>,
    for<'t> Option<&'t str>: Encode<'t, DB> + Type<DB>,
    for<'t> Option<bool>: Encode<'t, DB> + Type<DB>,
    for<'t> DateTime<Utc>: Encode<'t, DB> + Type<DB>,
    for<'t> &'t [u8]: Encode<'t, DB> + Type<DB>,
    for<'t> String: Encode<'t, DB> + Type<DB>,
    for<'t> Option<String>: Encode<'t, DB> + Type<DB>,
{
    if inserts.is_empty() {
        return None;
    }
    let mut qb = QueryBuilder::new(format!("INSERT INTO events ({EVENT_COLUMNS}, raw_body) "));
    qb.push_values(inserts, |mut row, insert| {
        let e = insert.event;
        let env = &e.envelope;
        row.push_bind(insert.seq)
            .push_bind(env.id.as_str())
            .push_bind(e.idempotency_key.as_str())
            .push_bind(sanitize::text(&env.event_type).into_owned())
            .push_bind(env.conversation_id.as_ref().map(|c| c.as_str()))
            .push_bind(insert.stream_version)
            .push_bind(env.agent_id.as_ref().map(|a| a.as_str()))
            .push_bind(env.livemode)
            .push_bind(sanitize::opt_text(env.created_at.as_deref()).map(|c| c.into_owned()))
            .push_bind(e.received_at)
            .push_bind(e.verification.signed_url.as_str())
            .push_bind(e.verification.timestamp.as_str())
            .push_bind(e.verification.signature.as_str())
            .push_bind(e.raw_body.as_slice());
    });
    Some(qb)
}

/// Writes projections (insert or replace), or `None` if there are none.
pub(crate) fn upsert_conversations<'a, DB: Database>(
    states: impl IntoIterator<Item = &'a ConversationState>,
) -> Option<QueryBuilder<DB>>
where
    for<'t> &'t str: Encode<'t, DB> + Type<DB>,
    for<'t> i64: Encode<'t, DB> + Type<DB>,
    for<'t> Option<&'t str>: Encode<'t, DB> + Type<DB>,
    for<'t> Option<DateTime<Utc>>: Encode<'t, DB> + Type<DB>,
    for<'t> Json<&'t ConversationState>: Encode<'t, DB> + Type<DB>,
{
    let mut states = states.into_iter().peekable();
    states.peek()?;
    let mut qb = QueryBuilder::new(
        "INSERT INTO conversations (conversation_id, agent_id, status, last_seq, last_received_at, state) ",
    );
    qb.push_values(states, |mut row, s| {
        row.push_bind(s.conversation_id.as_str())
            .push_bind(s.agent_id.as_deref())
            .push_bind(s.status.as_deref())
            .push_bind(s.last_seq)
            .push_bind(s.last_received_at)
            .push_bind(Json(s));
    });
    qb.push(
        " ON CONFLICT (conversation_id) DO UPDATE SET agent_id = excluded.agent_id, \
         status = excluded.status, last_seq = excluded.last_seq, \
         last_received_at = excluded.last_received_at, state = excluded.state",
    );
    Some(qb)
}

/// Records match decisions, or `None` if there are none.
pub(crate) fn insert_decisions<DB: Database>(
    decisions: &[super::model::MatchRecord],
) -> Option<QueryBuilder<DB>>
where
    for<'t> &'t str: Encode<'t, DB> + Type<DB>,
    for<'t> i64: Encode<'t, DB> + Type<DB>,
    for<'t> bool: Encode<'t, DB> + Type<DB>,
    for<'t> Option<String>: Encode<'t, DB> + Type<DB>,
{
    if decisions.is_empty() {
        return None;
    }
    let mut qb =
        QueryBuilder::new("INSERT INTO match_decisions (event_seq, workflow, matched, reason) ");
    qb.push_values(decisions, |mut row, d| {
        row.push_bind(d.event_seq)
            .push_bind(d.workflow.as_str())
            .push_bind(d.matched)
            .push_bind(sanitize::opt_text(d.reason.as_deref()).map(|c| c.into_owned()));
    });
    Some(qb)
}

/// Stores setup answers computed in the transaction, or `None` if there are none.
pub(crate) fn insert_answers<DB: Database>(
    answers: &[(i64, String, super::model::PreparedAnswer)],
) -> Option<QueryBuilder<DB>>
where
    for<'t> &'t str: Encode<'t, DB> + Type<DB>,
    for<'t> i64: Encode<'t, DB> + Type<DB>,
    for<'t> bool: Encode<'t, DB> + Type<DB>,
    for<'t> Option<&'t str>: Encode<'t, DB> + Type<DB>,
    for<'t> DateTime<Utc>: Encode<'t, DB> + Type<DB>,
{
    if answers.is_empty() {
        return None;
    }
    let now = chrono::Utc::now();
    let mut qb = QueryBuilder::new(
        "INSERT INTO setup_answers (event_seq, event_id, workflow, used_fallback, reason, body, lookups, \
         duration_ms, created_at) ",
    );
    qb.push_values(answers, |mut row, (seq, id, a)| {
        row.push_bind(*seq)
            .push_bind(id.as_str())
            .push_bind(a.workflow.as_deref())
            .push_bind(a.fallback_reason.is_some())
            .push_bind(a.fallback_reason.as_deref())
            .push_bind(a.body.as_str())
            .push("'[]'")
            .push_bind(0i64)
            .push_bind(now);
    });
    Some(qb)
}

/// Creates runs (scheduled now), or `None` if there are none; with `lease`,
/// leased to its owner (status `running`, fencing token 1) until the lease
/// expires: by the database's clock (PostgreSQL), or this host's (SQLite).
pub(crate) fn insert_runs<DB: Database>(
    runs: &[super::model::NewRun],
    lease: Option<&super::model::LocalLease>,
    db_clock: bool,
) -> Option<QueryBuilder<DB>>
where
    for<'t> f64: Encode<'t, DB> + Type<DB>,
    for<'t> &'t str: Encode<'t, DB> + Type<DB>,
    for<'t> i64: Encode<'t, DB> + Type<DB>,
    for<'t> Option<&'t str>: Encode<'t, DB> + Type<DB>,
    for<'t> DateTime<Utc>: Encode<'t, DB> + Type<DB>,
    for<'t> Json<serde_json::Value>: Encode<'t, DB> + Type<DB>,
{
    if runs.is_empty() {
        return None;
    }
    let mut qb = QueryBuilder::new(
        "INSERT INTO runs (run_id, workflow, event_seq, event_id, conversation_id, status, wait_reason, \
         next_attempt_at, context, step_results, created_at, updated_at, trace_context, version",
    );
    qb.push(if lease.is_some() {
        ", lease_owner, lease_until, lease_token) "
    } else {
        ") "
    });
    // A leased run is this process's at once; a run held by order (store/order.rs)
    // is created waiting, due only when released; the rest are scheduled now.
    qb.push_values(runs, |mut row, r| {
        let (status, reason, due) = if lease.is_some() {
            ("'running'", "NULL", r.created_at)
        } else if r.starts_now() {
            ("'scheduled'", "NULL", r.created_at)
        } else {
            ("'waiting'", "'order'", super::order::held_until())
        };
        row.push_bind(r.run_id.as_str())
            .push_bind(r.workflow.as_str())
            .push_bind(r.event_seq)
            .push_bind(r.event_id.as_str())
            .push_bind(r.conversation_id.as_deref())
            .push(status)
            .push(reason)
            .push_bind(due)
            .push_bind(Json(sanitize::json(&r.context).into_owned()))
            .push("'{}'")
            .push_bind(r.created_at)
            .push_bind(r.created_at)
            .push_bind(r.trace_context.as_deref())
            .push_bind(r.version.as_deref());
        if let Some(lease) = lease {
            row.push_bind(lease.owner.as_str());
            if db_clock {
                row.push("clock_timestamp() + make_interval(secs => ")
                    .push_bind_unseparated(lease.lease.as_secs_f64())
                    .push_unseparated(")");
            } else {
                row.push_bind(super::runs_sql::local_lease_until(lease.lease));
            }
            row.push("1");
        }
    });
    qb.push(" ON CONFLICT DO NOTHING");
    Some(qb)
}

/// Appends the filters of `q` (not its cursor) to a `WHERE 1 = 1` query.
fn push_event_filters<DB: Database>(qb: &mut QueryBuilder<DB>, q: &EventQuery)
where
    for<'t> &'t str: Encode<'t, DB> + Type<DB>,
    for<'t> DateTime<Utc>: Encode<'t, DB> + Type<DB>,
{
    if let Some(t) = &q.event_type {
        qb.push(" AND event_type = ").push_bind(t.as_str());
    }
    if let Some(c) = &q.conversation_id {
        qb.push(" AND conversation_id = ").push_bind(c.as_str());
    }
    if let Some(a) = &q.agent_id {
        qb.push(" AND agent_id = ").push_bind(a.as_str());
    }
    if let Some(t) = q.received_after {
        qb.push(" AND received_at > ").push_bind(t);
    }
    if let Some(t) = q.received_before {
        qb.push(" AND received_at < ").push_bind(t);
    }
}

/// Lists events by filter, keyset-paginated on the sequence.
pub(crate) fn list_events<DB: Database>(q: &EventQuery) -> QueryBuilder<DB>
where
    for<'t> &'t str: Encode<'t, DB> + Type<DB>,
    for<'t> i64: Encode<'t, DB> + Type<DB>,
    for<'t> DateTime<Utc>: Encode<'t, DB> + Type<DB>,
{
    let mut qb = QueryBuilder::new(format!("SELECT {EVENT_COLUMNS} FROM events WHERE 1 = 1"));
    push_event_filters(&mut qb, q);
    let (cmp, dir) = match q.order {
        Order::NewestFirst => ("<", "DESC"),
        Order::OldestFirst => (">", "ASC"),
    };
    if let Some(cursor) = q.cursor {
        qb.push(format!(" AND seq {cmp} ")).push_bind(cursor);
    }
    qb.push(format!(" ORDER BY seq {dir} LIMIT "))
        .push_bind(i64::from(q.limit.max(1)));
    qb
}

/// Counts events by filter.
pub(crate) fn count_events<DB: Database>(q: &EventQuery) -> QueryBuilder<DB>
where
    for<'t> &'t str: Encode<'t, DB> + Type<DB>,
    for<'t> DateTime<Utc>: Encode<'t, DB> + Type<DB>,
{
    let mut qb = QueryBuilder::new("SELECT COUNT(*) FROM events WHERE 1 = 1");
    push_event_filters(&mut qb, q);
    qb
}

/// One conversation's events with bodies, in log order, up to `as_of`.
pub(crate) fn conversation_log<DB: Database>(
    conversation_id: &str,
    as_of: Option<i64>,
) -> QueryBuilder<DB>
where
    for<'t> &'t str: Encode<'t, DB> + Type<DB>,
    for<'t> i64: Encode<'t, DB> + Type<DB>,
{
    let mut qb = QueryBuilder::new(format!(
        "SELECT {EVENT_COLUMNS}, raw_body FROM events WHERE conversation_id = "
    ));
    qb.push_bind(conversation_id);
    if let Some(seq) = as_of {
        qb.push(" AND seq <= ").push_bind(seq);
    }
    qb.push(" ORDER BY seq ASC");
    qb
}

/// Reads the log in pages, for rebuilding projections.
pub(crate) fn log_page<DB: Database>(after_seq: i64, limit: i64) -> QueryBuilder<DB>
where
    for<'t> i64: Encode<'t, DB> + Type<DB>,
{
    let mut qb = QueryBuilder::new(format!(
        "SELECT {EVENT_COLUMNS}, raw_body FROM events WHERE conversation_id IS NOT NULL AND seq > "
    ));
    qb.push_bind(after_seq)
        .push(" ORDER BY seq ASC LIMIT ")
        .push_bind(limit);
    qb
}

/// The append flow, the same on both backends once the transaction is open
/// and the log is locked: find collisions, plan, insert, update projections.
/// A macro rather than a generic function because sqlx's executor bounds
/// over a generic database are heavier than the code they would share.
macro_rules! append_in_tx {
    ($db:ty, $tx:expr, $batch:expr, $dispatcher:expr, $notify:expr, $order_lock:expr, $local:expr) => {{
        use sqlx::types::Json;
        use $crate::store::{batch, projection::ConversationState, sql};
        let tx = $tx;
        let batch = $batch;
        let cutoff = chrono::Utc::now() - $crate::store::IDEMPOTENCY_WINDOW;
        let last_seq: i64 = sqlx::query_scalar(sql::LAST_SEQ)
            .fetch_one(&mut **tx)
            .await?;
        // One `dedupe` span per delivery, over the lookup of earlier deliveries.
        let dedupe: Vec<tracing::Span> = batch
            .iter()
            .map(|e| {
                tracing::info_span!(
                    parent: &e.span,
                    "dedupe",
                    batch = batch.len(),
                    operator.event.id = %e.envelope.id,
                    operator.conversation.id = e.envelope.conversation_id.as_ref().map(|c| c.as_str()),
                    operator.agent.id = e.envelope.agent_id.as_ref().map(|a| a.as_str()),
                )
            })
            .collect();
        let rows = sql::candidates::<$db>(batch)
            .build_query_as::<sql::CandidateRow>()
            .fetch_all(&mut **tx)
            .await?;
        let existing = sql::existing(batch, rows, cutoff);
        drop(dedupe);
        let states = match sql::conversations_of::<$db>(batch) {
            Some(mut qb) => sql::by_conversation(
                qb.build_query_scalar::<Json<ConversationState>>()
                    .fetch_all(&mut **tx)
                    .await?,
            ),
            None => Default::default(),
        };
        // Durable waits (store/waits.rs): the waits of these conversations, and their states before the batch.
        let waits = $crate::store::waits::waits_of_batch_in_tx!($db, tx, batch);
        // (Only the conversations that have waits are copied and folded again.)
        let states_for_waits = (!waits.is_empty()).then(|| {
            let with_waits: std::collections::HashSet<&str> =
                waits.iter().map(|w| w.conversation_id.as_str()).collect();
            states
                .iter()
                .filter(|(c, _)| with_waits.contains(c.as_str()))
                .map(|(c, s)| (c.clone(), s.clone()))
                .collect::<std::collections::HashMap<_, _>>()
        });
        let mut plan = batch::plan(batch, existing, last_seq, states, $dispatcher);
        // Per-conversation order (store/order.rs): which new runs are held behind an earlier one.
        $crate::store::order::hold_in_tx!($db, tx, &mut plan.runs, $order_lock);
        // Each multi-row insert is cut into statements under the database's
        // bind-parameter limit (a batch of 256 events each matching many
        // workflows would pass it), all in the same transaction.
        let db_name = <$db as sqlx::Database>::NAME;
        let rows = |binds| batch::rows_per_statement(db_name, binds);
        for chunk in plan.inserts.chunks(rows(batch::EVENT_BINDS)) {
            if let Some(mut qb) = sql::insert_events::<$db>(chunk) {
                qb.build().execute(&mut **tx).await?;
            }
        }
        let conversations: Vec<&ConversationState> = plan.conversations.values().collect();
        for chunk in conversations.chunks(rows(batch::CONVERSATION_BINDS)) {
            if let Some(mut qb) = sql::upsert_conversations::<$db>(chunk.iter().copied()) {
                qb.build().execute(&mut **tx).await?;
            }
        }
        for chunk in plan.decisions.chunks(rows(batch::DECISION_BINDS)) {
            if let Some(mut qb) = sql::insert_decisions::<$db>(chunk) {
                qb.build().execute(&mut **tx).await?;
            }
        }
        for chunk in plan.answers.chunks(rows(batch::ANSWER_BINDS)) {
            if let Some(mut qb) = sql::insert_answers::<$db>(chunk) {
                qb.build().execute(&mut **tx).await?;
            }
        }
        // The first runs go to this process's own workers, leased to them here
        // (as many as they have free slots); the rest are claimed.
        let local: Option<&$crate::store::LocalLease> = $local;
        let db_clock = $notify.is_some();
        // Only runs due now (not held by order) can be handed over.
        let max = local.map_or(0, |l| l.max);
        let (mut mine, mut others): (Vec<$crate::store::model::NewRun>, Vec<$crate::store::model::NewRun>) =
            (Vec::new(), Vec::new());
        for r in &plan.runs {
            if r.starts_now() && mine.len() < max {
                mine.push(r.clone());
            } else {
                others.push(r.clone());
            }
        }
        for chunk in mine.chunks(rows(batch::RUN_BINDS + 2)) {
            if let Some(mut qb) = sql::insert_runs::<$db>(chunk, local, db_clock) {
                qb.build().execute(&mut **tx).await?;
            }
        }
        for chunk in others.chunks(rows(batch::RUN_BINDS)) {
            if let Some(mut qb) = sql::insert_runs::<$db>(chunk, None, db_clock) {
                qb.build().execute(&mut **tx).await?;
            }
        }
        // Durable waits: match the new events, in this transaction (exactly once).
        let resumed = match states_for_waits {
            Some(states) => $crate::store::waits::match_waits_in_tx!(tx, &plan.inserts, &waits, states),
            None => 0,
        };
        // Runs held by order are not due and leased runs are handed over: neither wakes anyone.
        let due_now = others.iter().filter(|r| r.starts_now()).count();
        if due_now > 0 || resumed > 0 {
            let notify: Option<&str> = $notify;
            if let Some(notify) = notify {
                sqlx::query(notify).execute(&mut **tx).await?;
            }
        }
        let handed: Vec<$crate::store::runs::Run> = match local {
            Some(l) => mine.iter().map(|r| r.leased(l)).collect(),
            None => Vec::new(),
        };
        (plan.outcomes, due_now + resumed, handed)
    }};
}
pub(crate) use append_in_tx;

/// Implements [`super::EventStore`] for a backend: the read methods are the
/// same on both (they read through `self.reader`); the backend supplies the
/// rest (`backend`, `migrate`, `append_batch`, `rebuild_projections`).
macro_rules! impl_event_store {
    ($store:ty, $db:ty, { $($specific:tt)* }) => {
        #[async_trait::async_trait]
        impl $crate::store::EventStore for $store {
        $($specific)*

        async fn stats(
            &self,
            now: chrono::DateTime<chrono::Utc>,
        ) -> Result<$crate::store::StoreStats, $crate::store::StoreError> {
            // Index reads only, however many runs are parked (store/gauges.rs).
            let (events, waiting, oldest, active, held, due_parked): (
                Option<i64>,
                i64,
                Option<chrono::DateTime<chrono::Utc>>,
                i64,
                i64,
                i64,
            ) = sqlx::query_as(sqlx::AssertSqlSafe(
                $crate::store::gauges::stats_sql(self.backend()),
            ))
            .bind(now)
            .fetch_one(&self.reader)
            .await?;
            let size_bytes: i64 = sqlx::query_scalar(Self::SIZE_SQL)
                .fetch_one(&self.reader)
                .await?;
            Ok($crate::store::StoreStats {
                events: events.unwrap_or(0),
                runs_waiting: waiting,
                oldest_waiting_since: oldest.filter(|t| *t <= now),
                // Due later (backoff, a destination's hold) or held by a worker; runs
                // parked at a wait step or by order are not pending (`switchboard_runs_waiting`).
                runs_pending: (active + held - (waiting - due_parked)).max(0),
                size_bytes,
            })
        }

        async fn get_event(
            &self,
            event_id: &str,
        ) -> Result<Option<$crate::store::StoredEventWithBody>, $crate::store::StoreError> {
            let sql = format!(
                "SELECT {}, raw_body FROM events WHERE event_id = $1",
                $crate::store::sql::EVENT_COLUMNS
            );
            let row: Option<$crate::store::sql::EventRowWithBody> =
                sqlx::query_as(sqlx::AssertSqlSafe(sql))
                    .bind(event_id)
                    .fetch_optional(&self.reader)
                    .await?;
            Ok(row.map(Into::into))
        }

        async fn list_events(
            &self,
            query: &$crate::store::EventQuery,
        ) -> Result<Vec<$crate::store::StoredEvent>, $crate::store::StoreError> {
            let rows = $crate::store::sql::list_events::<$db>(query)
                .build_query_as::<$crate::store::sql::EventRow>()
                .fetch_all(&self.reader)
                .await?;
            Ok(rows.into_iter().map(Into::into).collect())
        }

        async fn conversation_log(
            &self,
            conversation_id: &str,
            as_of: Option<i64>,
        ) -> Result<Vec<$crate::store::StoredEventWithBody>, $crate::store::StoreError> {
            let rows = $crate::store::sql::conversation_log::<$db>(conversation_id, as_of)
                .build_query_as::<$crate::store::sql::EventRowWithBody>()
                .fetch_all(&self.reader)
                .await?;
            Ok(rows.into_iter().map(Into::into).collect())
        }

        async fn conversation(
            &self,
            conversation_id: &str,
        ) -> Result<Option<$crate::store::projection::ConversationState>, $crate::store::StoreError> {
            let state: Option<sqlx::types::Json<$crate::store::projection::ConversationState>> =
                sqlx::query_scalar("SELECT state FROM conversations WHERE conversation_id = $1")
                    .bind(conversation_id)
                    .fetch_optional(&self.reader)
                    .await?;
            Ok(state.map(|s| s.0))
        }

        async fn count_events(
            &self,
            query: &$crate::store::EventQuery,
        ) -> Result<i64, $crate::store::StoreError> {
            Ok($crate::store::sql::count_events::<$db>(query)
                .build_query_scalar()
                .fetch_one(&self.reader)
                .await?)
        }

        async fn list_conversations(
            &self,
            q: &$crate::store::ConversationQuery,
        ) -> Result<Vec<$crate::store::projection::ConversationState>, $crate::store::StoreError> {
            let mut qb = sqlx::QueryBuilder::<$db>::new("SELECT state FROM conversations WHERE 1 = 1");
            if let Some(s) = &q.status {
                qb.push(" AND status = ").push_bind(s.as_str());
            }
            if let Some(a) = &q.agent_id {
                qb.push(" AND agent_id = ").push_bind(a.as_str());
            }
            if let Some(seq) = q.before_seq {
                qb.push(" AND last_seq < ").push_bind(seq);
            }
            qb.push(" ORDER BY last_seq DESC LIMIT ").push_bind(i64::from(q.limit.max(1)));
            let states: Vec<sqlx::types::Json<$crate::store::projection::ConversationState>> =
                qb.build_query_scalar().fetch_all(&self.reader).await?;
            Ok(states.into_iter().map(|s| s.0).collect())
        }

        async fn ping(&self) -> Result<(), $crate::store::StoreError> {
            sqlx::query("SELECT 1").execute(&self.reader).await?;
            Ok(())
        }

        async fn record_sent_setup_answer(
            &self,
            a: &$crate::store::runs::SetupAnswer,
        ) -> Result<(), $crate::store::StoreError> {
            use $crate::store::sanitize;
            sqlx::query(
                "INSERT INTO setup_answers (event_seq, event_id, workflow, used_fallback, reason, body, lookups, \
                 duration_ms, created_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9) \
                 ON CONFLICT (event_seq) DO UPDATE SET workflow = excluded.workflow, \
                 used_fallback = excluded.used_fallback, reason = excluded.reason, body = excluded.body, \
                 duration_ms = excluded.duration_ms, created_at = excluded.created_at",
            )
            .bind(a.event_seq)
            .bind(&a.event_id)
            .bind(sanitize::opt_text(a.workflow.as_deref()).map(|w| w.into_owned()))
            .bind(a.used_fallback)
            .bind(sanitize::opt_text(a.reason.as_deref()).map(|r| r.into_owned()))
            .bind(sanitize::text(&a.body).into_owned())
            .bind(sqlx::types::Json(sanitize::json(&a.lookups.0).into_owned()))
            .bind(a.duration_ms)
            .bind(a.created_at)
            .execute(&self.writer)
            .await?;
            Ok(())
        }
        }
    };
}
pub(crate) use impl_event_store;

/// Folds the whole log into fresh projections inside `$tx` (projections
/// deleted first). Evaluates to the number of events read.
macro_rules! rebuild_in_tx {
    ($db:ty, $tx:expr) => {{
        use std::collections::HashMap;
        use $crate::store::{projection::ConversationState, sql};
        let tx = $tx;
        sqlx::query("DELETE FROM conversations")
            .execute(&mut **tx)
            .await?;
        let mut states: HashMap<String, ConversationState> = HashMap::new();
        let mut after = 0i64;
        let mut read = 0u64;
        loop {
            let page: Vec<sql::EventRowWithBody> = sql::log_page::<$db>(after, 1000)
                .build_query_as()
                .fetch_all(&mut **tx)
                .await?;
            if page.is_empty() {
                break;
            }
            for row in page {
                let item: $crate::store::StoredEventWithBody = row.into();
                after = item.event.seq;
                read += 1;
                if let Some(conv) = &item.event.conversation_id {
                    states
                        .entry(conv.clone())
                        .or_insert_with(|| ConversationState::new(conv.as_str()))
                        .apply_stored(&item)?;
                }
            }
        }
        let all: Vec<&ConversationState> = states.values().collect();
        for chunk in all.chunks(500) {
            if let Some(mut qb) = sql::upsert_conversations::<$db>(chunk.iter().copied()) {
                qb.build().execute(&mut **tx).await?;
            }
        }
        read
    }};
}
pub(crate) use rebuild_in_tx;
