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

/// Statements of a transaction, run in as few round trips as the database
/// allows. SQLite runs a multi-statement query in one call to its
/// connection's thread (each `?` binds the next value, across the
/// statements), and each such call costs two thread switches: at the rates
/// users run, those switches are most of a delivery's CPU (BENCHMARKS.md,
/// "CPU at low rates"). PostgreSQL's extended protocol takes one statement
/// per query: there writes that return nothing become the data-modifying
/// CTEs of one statement (`WITH s1 AS (INSERT …), s2 AS (INSERT …) SELECT 1`,
/// under its 65,535 parameters), and reads are a query each, in order.
///
/// sqlx 0.9 marks several statements in one SQLite query as deprecated (and
/// keeps running them); every append's test fails if a later version stops.
pub(crate) struct Statements<DB: Database> {
    /// Each query, with how many parameters it binds.
    queries: Vec<(QueryBuilder<DB>, usize)>,
    count: usize,
    join: Join,
}

/// How [`Statements`] puts statements together.
#[derive(Clone, Copy, PartialEq)]
enum Join {
    /// A query each.
    Apart,
    /// `a; b; c` (SQLite).
    Semicolons,
    /// `WITH s1 AS (a), s2 AS (b) SELECT 1` (PostgreSQL writes).
    Ctes,
}

impl<DB: Database> Statements<DB> {
    /// For reads: joined on SQLite, a query each on PostgreSQL.
    pub(crate) fn reads() -> Self {
        Self::new(if DB::NAME == "SQLite" {
            Join::Semicolons
        } else {
            Join::Apart
        })
    }

    /// For writes that return nothing: joined on both.
    pub(crate) fn writes() -> Self {
        Self::new(if DB::NAME == "SQLite" {
            Join::Semicolons
        } else {
            Join::Ctes
        })
    }

    fn new(join: Join) -> Self {
        Self {
            queries: Vec::new(),
            count: 0,
            join,
        }
    }

    /// The builder to write the next statement into (whole, one statement,
    /// binding `binds` parameters: with more than one query can take, it
    /// starts the next).
    pub(crate) fn statement(&mut self, binds: usize) -> &mut QueryBuilder<DB> {
        self.count += 1;
        let fits = |total: usize| total + binds <= super::batch::max_binds(DB::NAME);
        match self.queries.last_mut() {
            Some((last, total)) if self.join == Join::Semicolons => {
                // SQLite's limit is per statement.
                *total += binds;
                last.push("; ");
            }
            Some((last, total)) if self.join == Join::Ctes && fits(*total) => {
                *total += binds;
                last.push(format!("), s{} AS (", self.count));
            }
            _ => {
                let start = if self.join == Join::Ctes {
                    format!("WITH s{} AS (", self.count)
                } else {
                    String::new()
                };
                self.queries.push((QueryBuilder::new(start), binds));
            }
        }
        &mut self.queries.last_mut().expect("a query was just pushed").0
    }

    /// The queries, closed.
    fn built(self) -> impl Iterator<Item = QueryBuilder<DB>> {
        let join = self.join;
        self.queries.into_iter().map(move |(mut query, _)| {
            if join == Join::Ctes {
                query.push(") SELECT 1");
            }
            query
        })
    }

    /// The queries' texts (a query can hold several statements on SQLite).
    #[cfg(test)]
    pub(crate) fn texts(self) -> Vec<String> {
        self.built().map(|q| q.sql().as_str().to_owned()).collect()
    }

    /// Runs every statement, in order.
    pub(crate) async fn execute(self, conn: &mut DB::Connection) -> Result<(), sqlx::Error>
    where
        for<'c> &'c mut DB::Connection: sqlx::Executor<'c, Database = DB>,
        DB::Arguments: sqlx::IntoArguments<DB>,
    {
        for mut query in self.built() {
            query.build().execute(&mut *conn).await?;
        }
        Ok(())
    }

    /// Runs every statement, in order: the rows of each.
    pub(crate) async fn fetch(
        self,
        conn: &mut DB::Connection,
    ) -> Result<Vec<Vec<DB::Row>>, sqlx::Error>
    where
        for<'c> &'c mut DB::Connection: sqlx::Executor<'c, Database = DB>,
        DB::Arguments: sqlx::IntoArguments<DB>,
    {
        use futures_util::TryStreamExt;
        debug_assert!(self.join != Join::Ctes, "reads are not CTEs");
        let count = self.count;
        let mut results: Vec<Vec<DB::Row>> = Vec::with_capacity(count);
        for mut query in self.built() {
            let mut current = Vec::new();
            let mut steps = sqlx::Executor::fetch_many(&mut *conn, query.build());
            // Rows, then the statement's result; then the next statement's.
            while let Some(step) = steps.try_next().await? {
                match step {
                    sqlx::Either::Right(row) => current.push(row),
                    sqlx::Either::Left(_) => results.push(std::mem::take(&mut current)),
                }
            }
        }
        debug_assert_eq!(results.len(), count, "one result per statement");
        Ok(results)
    }
}

/// The distinct conversations of a batch, sorted.
pub(crate) fn conversation_ids(batch: &[NewEvent]) -> Vec<&str> {
    let mut ids: Vec<&str> = batch
        .iter()
        .filter_map(|e| e.envelope.conversation_id.as_ref().map(|c| c.as_str()))
        .collect();
    ids.sort_unstable();
    ids.dedup();
    ids
}

/// Writes `$n` placeholders' list `(…)` of `values` (an `IN` list).
pub(crate) fn push_list<'v, DB: Database>(
    qb: &mut QueryBuilder<DB>,
    values: impl IntoIterator<Item = &'v str>,
) where
    for<'t> &'t str: Encode<'t, DB> + Type<DB>,
{
    qb.push("(");
    let mut sep = qb.separated(", ");
    for v in values {
        sep.push_bind(v);
    }
    qb.push(")");
}

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
pub(crate) fn candidates<DB: Database>(qb: &mut QueryBuilder<DB>, batch: &[NewEvent])
where
    for<'t> &'t str: Encode<'t, DB> + Type<DB>,
{
    // Two index lookups joined by UNION ALL: with OR, PostgreSQL may scan the table.
    // The 24 h window of keys is applied by `existing`, not here: every recent event
    // matches `received_at >= cutoff`, and a plan that used that range scanned them all
    // (measured: 160 ms per batch at 40,000 events on PostgreSQL).
    qb.push(
        "SELECT seq, event_id, event_type, idempotency_key, received_at FROM events WHERE event_id IN ",
    );
    push_list(qb, batch.iter().map(|e| e.envelope.id.as_str()));
    qb.push(
        " UNION ALL SELECT seq, event_id, event_type, idempotency_key, received_at FROM events \
         WHERE idempotency_key IN ",
    );
    push_list(qb, batch.iter().map(|e| e.idempotency_key.as_str()));
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

/// Selects the stored projections of conversations `ids` (not empty).
pub(crate) fn conversations_of<DB: Database>(qb: &mut QueryBuilder<DB>, ids: &[&str])
where
    for<'t> &'t str: Encode<'t, DB> + Type<DB>,
{
    qb.push("SELECT state FROM conversations WHERE conversation_id IN ");
    push_list(qb, ids.iter().copied());
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

/// Inserts new events of a plan (nothing if there are none).
pub(crate) fn insert_events<DB: Database>(w: &mut Statements<DB>, inserts: &[Insert<'_>])
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
        return;
    }
    let qb = w.statement(inserts.len() * super::batch::EVENT_BINDS);
    qb.push(format!("INSERT INTO events ({EVENT_COLUMNS}, raw_body) "));
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
}

/// Writes projections (insert or replace; nothing if there are none).
pub(crate) fn upsert_conversations<DB: Database>(
    w: &mut Statements<DB>,
    states: &[&ConversationState],
) where
    for<'t> &'t str: Encode<'t, DB> + Type<DB>,
    for<'t> i64: Encode<'t, DB> + Type<DB>,
    for<'t> Option<&'t str>: Encode<'t, DB> + Type<DB>,
    for<'t> Option<DateTime<Utc>>: Encode<'t, DB> + Type<DB>,
    for<'t> Json<&'t ConversationState>: Encode<'t, DB> + Type<DB>,
{
    if states.is_empty() {
        return;
    }
    let qb = w.statement(states.len() * super::batch::CONVERSATION_BINDS);
    qb.push(
        "INSERT INTO conversations (conversation_id, agent_id, status, last_seq, last_received_at, state) ",
    );
    qb.push_values(states, |mut row, s| {
        row.push_bind(s.conversation_id.as_str())
            .push_bind(s.agent_id.as_deref())
            .push_bind(s.status.as_deref())
            .push_bind(s.last_seq)
            .push_bind(s.last_received_at)
            .push_bind(Json(*s));
    });
    qb.push(
        " ON CONFLICT (conversation_id) DO UPDATE SET agent_id = excluded.agent_id, \
         status = excluded.status, last_seq = excluded.last_seq, \
         last_received_at = excluded.last_received_at, state = excluded.state",
    );
}

/// Records match decisions (nothing if there are none).
pub(crate) fn insert_decisions<DB: Database>(
    w: &mut Statements<DB>,
    decisions: &[super::model::MatchRecord],
) where
    for<'t> &'t str: Encode<'t, DB> + Type<DB>,
    for<'t> i64: Encode<'t, DB> + Type<DB>,
    for<'t> bool: Encode<'t, DB> + Type<DB>,
    for<'t> Option<String>: Encode<'t, DB> + Type<DB>,
{
    if decisions.is_empty() {
        return;
    }
    let qb = w.statement(decisions.len() * super::batch::DECISION_BINDS);
    qb.push("INSERT INTO match_decisions (event_seq, workflow, matched, reason) ");
    qb.push_values(decisions, |mut row, d| {
        row.push_bind(d.event_seq)
            .push_bind(d.workflow.as_str())
            .push_bind(d.matched)
            .push_bind(sanitize::opt_text(d.reason.as_deref()).map(|c| c.into_owned()));
    });
}

/// Stores setup answers computed in the transaction (nothing if there are none).
pub(crate) fn insert_answers<DB: Database>(
    w: &mut Statements<DB>,
    answers: &[(i64, String, super::model::PreparedAnswer)],
) where
    for<'t> &'t str: Encode<'t, DB> + Type<DB>,
    for<'t> i64: Encode<'t, DB> + Type<DB>,
    for<'t> bool: Encode<'t, DB> + Type<DB>,
    for<'t> Option<&'t str>: Encode<'t, DB> + Type<DB>,
    for<'t> DateTime<Utc>: Encode<'t, DB> + Type<DB>,
{
    if answers.is_empty() {
        return;
    }
    let now = chrono::Utc::now();
    let qb = w.statement(answers.len() * super::batch::ANSWER_BINDS);
    qb.push(
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
}

/// Creates runs (scheduled now; nothing if there are none); with `lease`,
/// leased to its owner (status `running`, fencing token 1) until the lease
/// expires: by the database's clock (PostgreSQL), or this host's (SQLite).
pub(crate) fn insert_runs<DB: Database>(
    w: &mut Statements<DB>,
    runs: &[super::model::NewRun],
    lease: Option<&super::model::LocalLease>,
    db_clock: bool,
) where
    for<'t> f64: Encode<'t, DB> + Type<DB>,
    for<'t> &'t str: Encode<'t, DB> + Type<DB>,
    for<'t> i64: Encode<'t, DB> + Type<DB>,
    for<'t> Option<&'t str>: Encode<'t, DB> + Type<DB>,
    for<'t> DateTime<Utc>: Encode<'t, DB> + Type<DB>,
    for<'t> Json<serde_json::Value>: Encode<'t, DB> + Type<DB>,
{
    if runs.is_empty() {
        return;
    }
    let per_run = super::batch::RUN_BINDS + if lease.is_some() { 2 } else { 0 };
    let qb = w.statement(runs.len() * per_run);
    qb.push(
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
        // The reads the plan needs: one round trip on SQLite (see [`sql::Statements`]).
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
        let convs = sql::conversation_ids(batch);
        let mut types: Vec<&str> = batch.iter().map(|e| e.envelope.event_type.as_str()).collect();
        types.sort_unstable();
        types.dedup();
        let mut reads = sql::Statements::<$db>::reads();
        reads.statement(0).push(sql::LAST_SEQ);
        sql::candidates(reads.statement(2 * batch.len()), batch);
        if !convs.is_empty() {
            sql::conversations_of(reads.statement(convs.len()), &convs);
            $crate::store::waits::waits_of(reads.statement(convs.len() + types.len()), &convs, &types);
        }
        let mut results = reads.fetch(&mut **tx).await?.into_iter();
        let mut next = || results.next().unwrap_or_default();
        let last_seq: i64 = match next().first() {
            Some(row) => sqlx::Row::try_get(row, 0)?,
            None => 0,
        };
        let rows = next()
            .iter()
            .map(sqlx::FromRow::from_row)
            .collect::<Result<Vec<sql::CandidateRow>, _>>()?;
        let existing = sql::existing(batch, rows, cutoff);
        drop(dedupe);
        let (states, waits) = if convs.is_empty() {
            (Default::default(), Vec::new())
        } else {
            let states = sql::by_conversation(
                next()
                    .iter()
                    .map(|row| sqlx::Row::try_get::<Json<ConversationState>, _>(row, 0))
                    .collect::<Result<Vec<_>, _>>()?,
            );
            // Durable waits (store/waits.rs): the waits of these conversations.
            let waits = $crate::store::waits::pending_of!($db, next());
            (states, waits)
        };
        // The waits' conversations' states before the batch (only those with waits
        // are copied and folded again).
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
        // One round trip for all of them on SQLite (see [`sql::Statements`]).
        let mut writes = sql::Statements::<$db>::writes();
        for chunk in plan.inserts.chunks(rows(batch::EVENT_BINDS)) {
            sql::insert_events(&mut writes, chunk);
        }
        let conversations: Vec<&ConversationState> = plan.conversations.values().collect();
        for chunk in conversations.chunks(rows(batch::CONVERSATION_BINDS)) {
            sql::upsert_conversations(&mut writes, chunk);
        }
        for chunk in plan.decisions.chunks(rows(batch::DECISION_BINDS)) {
            sql::insert_decisions(&mut writes, chunk);
        }
        for chunk in plan.answers.chunks(rows(batch::ANSWER_BINDS)) {
            sql::insert_answers(&mut writes, chunk);
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
            sql::insert_runs(&mut writes, chunk, local, db_clock);
        }
        for chunk in others.chunks(rows(batch::RUN_BINDS)) {
            sql::insert_runs(&mut writes, chunk, None, db_clock);
        }
        writes.execute(&mut **tx).await?;
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
        let mut writes = sql::Statements::<$db>::writes();
        for chunk in all.chunks(500) {
            sql::upsert_conversations(&mut writes, chunk);
        }
        writes.execute(&mut **tx).await?;
        read
    }};
}
pub(crate) use rebuild_in_tx;
