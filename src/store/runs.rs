//! Workflow runs and their attempts: the durable queue the engine works
//! from. A run row is its own job: `status` and `next_attempt_at` say when it
//! is due, and a worker holds it with a short, renewed lease, so a run whose
//! worker died (kill -9, lost machine) is taken over when the lease lapses.

use std::collections::BTreeMap;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::{MatchRecord, StoreError};

/// The states of a run.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RunStatus {
    /// Created, waiting for its first attempt.
    Scheduled,
    /// A worker holds it and is attempting a step.
    Running,
    /// A step failed with a retryable error; the next attempt is at `next_attempt_at`.
    Retrying,
    /// Paused, holding no worker and no lease, until `next_attempt_at` or
    /// until what `wait_reason` names lets it go on.
    Waiting,
    /// Every step succeeded (or was skipped by its `if`).
    Succeeded,
    /// A step failed for good (non-retryable error or attempts exhausted).
    Failed,
    /// Cancelled by an operator while waiting.
    Cancelled,
}

impl TryFrom<String> for RunStatus {
    type Error = String;

    fn try_from(s: String) -> Result<Self, String> {
        Self::parse(&s).ok_or_else(|| format!("`{s}` is not a run status"))
    }
}

impl std::fmt::Display for RunStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl PartialEq<&str> for RunStatus {
    fn eq(&self, other: &&str) -> bool {
        self.as_str() == *other
    }
}

impl RunStatus {
    pub const ALL: [RunStatus; 7] = [
        RunStatus::Scheduled,
        RunStatus::Running,
        RunStatus::Retrying,
        RunStatus::Waiting,
        RunStatus::Succeeded,
        RunStatus::Failed,
        RunStatus::Cancelled,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            RunStatus::Scheduled => "scheduled",
            RunStatus::Running => "running",
            RunStatus::Retrying => "retrying",
            RunStatus::Waiting => "waiting",
            RunStatus::Succeeded => "succeeded",
            RunStatus::Failed => "failed",
            RunStatus::Cancelled => "cancelled",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|st| st.as_str() == s)
    }

    pub fn is_final(self) -> bool {
        matches!(
            self,
            RunStatus::Succeeded | RunStatus::Failed | RunStatus::Cancelled
        )
    }
}

/// One run, as stored.
#[derive(Clone, Debug, PartialEq, sqlx::FromRow)]
pub struct Run {
    pub run_id: String,
    pub workflow: String,
    pub event_seq: i64,
    pub event_id: String,
    pub conversation_id: Option<String>,
    pub replay_of: Option<String>,
    #[sqlx(try_from = "String")]
    pub status: RunStatus,
    pub step_index: i64,
    /// The id of the step the run is at (`None` before this was recorded,
    /// and once every step is done); a run resumes at its step by this id.
    pub step_id: Option<String>,
    pub attempt: i64,
    pub attempts_total: i64,
    pub next_attempt_at: DateTime<Utc>,
    pub lease_owner: Option<String>,
    pub lease_until: Option<DateTime<Utc>>,
    /// The fencing token of the current claim: raised by every claim, checked
    /// by every save and renewal, so a worker whose claim was superseded
    /// (even in the same process) writes nothing.
    pub lease_token: i64,
    pub context: sqlx::types::Json<Value>,
    pub step_results: sqlx::types::Json<Value>,
    pub trace_context: Option<String>,
    pub last_error: Option<String>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    pub finished_at: Option<DateTime<Utc>>,
    /// The workflow version (content hash) the run executes; `None` for runs
    /// created before versions were recorded (they execute the workflow loaded under their name).
    pub version: Option<String>,
    /// Why a `waiting` run waits: `timer`, `event`, `order`, `rate_limited`,
    /// `concurrency`, `circuit_open`, `paused_until` (`None` unless waiting).
    pub wait_reason: Option<String>,
}

impl Run {
    /// The status (always `Some`; kept for callers written when it was text).
    pub fn status(&self) -> Option<RunStatus> {
        Some(self.status)
    }
}

/// One HTTP attempt, as recorded (secrets already masked).
#[derive(Clone, Debug, PartialEq, sqlx::FromRow)]
pub struct Attempt {
    pub run_id: String,
    pub number: i64,
    pub step_index: i64,
    pub step_id: String,
    pub attempt: i64,
    pub started_at: DateTime<Utc>,
    pub duration_ms: i64,
    pub request: sqlx::types::Json<Value>,
    pub response_status: Option<i64>,
    pub response_headers: Option<sqlx::types::Json<Value>>,
    pub response_body: Option<String>,
    pub outcome: String,
    pub error_class: Option<String>,
    pub error_message: Option<String>,
    pub next_delay_ms: Option<i64>,
}

/// The new state of a run after a step or an attempt.
#[derive(Clone, Debug, PartialEq)]
pub struct RunUpdate {
    pub status: RunStatus,
    pub step_index: i64,
    pub step_id: Option<String>,
    pub attempt: i64,
    pub attempts_total: i64,
    pub next_attempt_at: DateTime<Utc>,
    /// `Some` while the worker keeps the run (status running): the lease is
    /// extended by this much from now, by the database's clock; `None` releases it.
    pub lease: Option<std::time::Duration>,
    pub step_results: Value,
    pub last_error: Option<String>,
    pub finished_at: Option<DateTime<Utc>>,
    /// Why the run waits (status `waiting`; `None` otherwise, which clears it).
    pub wait_reason: Option<String>,
}

/// What [`RunStore::save_progress_batch`] did: one answer per save (false
/// where the lease was lost), and how many runs held by order the runs that
/// ended released (due now: the caller wakes its workers).
#[derive(Clone, Debug, Default)]
pub struct SavedBatch {
    pub saved: Vec<bool>,
    pub released: usize,
}

/// One save of a run's progress, for [`RunStore::save_progress_batch`].
#[derive(Clone, Debug)]
pub struct Save {
    pub run_id: String,
    pub owner: String,
    /// The fencing token of the claim (or local lease) that holds the run.
    pub token: i64,
    pub attempt: Option<Attempt>,
    pub update: RunUpdate,
}

/// What a text or JSON column stores for `text`: every NUL (U+0000, which
/// PostgreSQL refuses in TEXT and JSONB) becomes U+FFFD, on both backends.
pub fn storable_text(text: &str) -> std::borrow::Cow<'_, str> {
    if text.contains('\0') {
        std::borrow::Cow::Owned(text.replace('\0', "\u{FFFD}"))
    } else {
        std::borrow::Cow::Borrowed(text)
    }
}

/// [`storable_text`] for every string (and key) inside a JSON value.
pub fn storable_json(v: &Value) -> std::borrow::Cow<'_, Value> {
    fn has_nul(v: &Value) -> bool {
        match v {
            Value::String(s) => s.contains('\0'),
            Value::Array(items) => items.iter().any(has_nul),
            Value::Object(map) => map.iter().any(|(k, v)| k.contains('\0') || has_nul(v)),
            _ => false,
        }
    }
    fn clean(v: &Value) -> Value {
        match v {
            Value::String(s) => Value::String(storable_text(s).into_owned()),
            Value::Array(items) => Value::Array(items.iter().map(clean).collect()),
            Value::Object(map) => Value::Object(
                map.iter()
                    .map(|(k, v)| (storable_text(k).into_owned(), clean(v)))
                    .collect(),
            ),
            other => other.clone(),
        }
    }
    if has_nul(v) {
        std::borrow::Cow::Owned(clean(v))
    } else {
        std::borrow::Cow::Borrowed(v)
    }
}

/// Filters and keyset pagination for listing runs (newest first).
#[derive(Clone, Debug, Default)]
pub struct RunQuery {
    pub workflow: Option<String>,
    pub status: Option<RunStatus>,
    pub conversation_id: Option<String>,
    pub event_id: Option<String>,
    /// Only runs older than this (created_at, run_id).
    pub before: Option<(DateTime<Utc>, String)>,
    pub limit: u32,
}

/// What a manual retry or cancel did.
#[derive(Clone, Debug, PartialEq)]
pub enum RunChange {
    /// Done; the run as it is now.
    Changed(Box<Run>),
    NotFound,
    /// The run is not in a state that allows it; this is its status.
    WrongState(String),
}

/// The run queue and its history.
#[async_trait]
pub trait RunStore: Send + Sync + 'static {
    /// Takes up to `limit` runs that are due (or whose lease lapsed) for `owner`,
    /// each with a new fencing token. Lease expiry is computed and compared by
    /// the database's clock on PostgreSQL (instances may disagree about the
    /// time); SQLite, shared only by processes on one host, uses that host's clock.
    async fn claim_due(
        &self,
        owner: &str,
        now: DateTime<Utc>,
        lease: std::time::Duration,
        limit: u32,
    ) -> Result<Vec<Run>, StoreError>;

    /// Extends the lease of the claim `token`; false if the run is no longer held by it.
    async fn renew_lease(
        &self,
        run_id: &str,
        owner: &str,
        token: i64,
        lease: std::time::Duration,
    ) -> Result<bool, StoreError>;

    /// Records an attempt (if any) and the run's new state, atomically, if the
    /// claim `token` still holds the run. False if the lease was lost (nothing
    /// written). Text and JSON are stored as [`storable_text`] makes them.
    async fn save_progress(
        &self,
        run_id: &str,
        owner: &str,
        token: i64,
        attempt: Option<&Attempt>,
        update: &RunUpdate,
        now: DateTime<Utc>,
    ) -> Result<bool, StoreError>;

    /// Several [`RunStore::save_progress`] in one transaction (one commit for
    /// all): one answer per save, false where the lease was lost (that save
    /// wrote nothing). An error fails them all (nothing written).
    async fn save_progress_batch(
        &self,
        saves: &[Save],
        now: DateTime<Utc>,
    ) -> Result<SavedBatch, StoreError>;

    /// Destinations (issue 14): parks a claimed run without an attempt: status
    /// `waiting` with `reason`, due again at `until`, its lease released. False
    /// if the claim `token` no longer holds the run (nothing written).
    async fn hold_run(
        &self,
        run_id: &str,
        owner: &str,
        token: i64,
        until: DateTime<Utc>,
        reason: &str,
        now: DateTime<Utc>,
    ) -> Result<bool, StoreError>;

    /// Destinations (issue 14): makes every run waiting for one of `reasons`
    /// due now (a breaker was reset or closed), oldest first (`next_attempt_at`
    /// becomes the run's `created_at`, at most `now`); returns how many.
    async fn wake_held(&self, reasons: &[&str], now: DateTime<Utc>) -> Result<u64, StoreError>;

    /// Ends every lease `owner` holds now, so other workers take its runs at
    /// once (graceful shutdown). Returns how many runs were handed back.
    async fn release_leases(&self, owner: &str, now: DateTime<Utc>) -> Result<u64, StoreError>;

    /// When the next run falls due or the next lease lapses.
    async fn next_wakeup(&self) -> Result<Option<DateTime<Utc>>, StoreError>;

    async fn list_runs(&self, query: &RunQuery) -> Result<Vec<Run>, StoreError>;

    async fn get_run(&self, run_id: &str) -> Result<Option<Run>, StoreError>;

    async fn attempts(&self, run_id: &str) -> Result<Vec<Attempt>, StoreError>;

    /// Restarts a failed run at its failed step, due now.
    async fn retry_run(&self, run_id: &str, now: DateTime<Utc>) -> Result<RunChange, StoreError>;

    /// Cancels a run that waits (scheduled or retrying): it will not be attempted again.
    async fn cancel_run(&self, run_id: &str, now: DateTime<Utc>) -> Result<RunChange, StoreError>;

    /// Replays an event: for each of its original runs (of `workflows`, if given; only failed
    /// ones if `only_failed`), a new run marked `replay_of` it, unless a run of that workflow for
    /// this event is still in flight.
    /// The new run executes `versions[workflow]` (the version loaded now) when given, else
    /// the original run's version.
    async fn replay_event(
        &self,
        event_id: &str,
        workflows: Option<&[String]>,
        only_failed: bool,
        versions: &BTreeMap<String, String>,
        now: DateTime<Utc>,
    ) -> Result<Vec<ReplayOutcome>, StoreError>;

    async fn create_replay(&self, replay: &Replay) -> Result<(), StoreError>;

    async fn get_replay(&self, replay_id: &str) -> Result<Option<Replay>, StoreError>;

    /// Replays still running (to resume after a restart).
    async fn running_replays(&self) -> Result<Vec<Replay>, StoreError>;

    /// Saves progress; `status` and `finished_at` when it ends. False if it was cancelled meanwhile.
    async fn save_replay(&self, replay: &Replay) -> Result<bool, StoreError>;

    /// Cancels a running replay; false if it is not running.
    async fn cancel_replay(&self, replay_id: &str, now: DateTime<Utc>) -> Result<bool, StoreError>;

    /// Leases up to `limit` running replays whose lease is free or lapsed (on
    /// PostgreSQL by the database's clock) to `owner`; each gets a new fencing token.
    async fn claim_replays(
        &self,
        owner: &str,
        now: DateTime<Utc>,
        lease: std::time::Duration,
        limit: u32,
    ) -> Result<Vec<Replay>, StoreError>;

    /// Works one page of a replay in one transaction: renews the lease, creates
    /// the page's runs and advances the progress (`done` by `events`, the cursor to
    /// `last_seq`). `None` (nothing written) when the lease is no longer
    /// `owner`'s with `token` or the replay is no longer running.
    #[allow(clippy::too_many_arguments)]
    async fn commit_replay_page(
        &self,
        replay_id: &str,
        owner: &str,
        token: i64,
        lease: std::time::Duration,
        events: i64,
        last_seq: i64,
        page: &ReplayPage<'_>,
        now: DateTime<Utc>,
    ) -> Result<Option<Replay>, StoreError>;

    /// Marks a replay `succeeded` if `owner` still holds it with `token`.
    async fn finish_replay(
        &self,
        replay_id: &str,
        owner: &str,
        token: i64,
        now: DateTime<Utc>,
    ) -> Result<bool, StoreError>;

    /// Ends `owner`'s replay leases now (graceful shutdown), so another instance takes over at once.
    async fn release_replay_leases(
        &self,
        owner: &str,
        now: DateTime<Utc>,
    ) -> Result<u64, StoreError>;

    /// Every workflow's verdict on one event.
    async fn decisions(&self, event_seq: i64) -> Result<Vec<MatchRecord>, StoreError>;

    /// Stores a setup answer unless one exists; returns the one stored (first writer wins).
    async fn save_setup_answer(&self, answer: &SetupAnswer) -> Result<SetupAnswer, StoreError>;

    /// The stored answer to a setup event.
    async fn setup_answer(&self, event_seq: i64) -> Result<Option<SetupAnswer>, StoreError>;

    /// Runs by state, created since `since`, per workflow: (workflow, status, count).
    async fn run_counts_since(
        &self,
        since: DateTime<Utc>,
    ) -> Result<Vec<(String, String, i64)>, StoreError>;

    /// Stores workflow versions not stored yet (by hash; existing ones are kept as they are).
    async fn save_workflow_versions(&self, versions: &[WorkflowVersion]) -> Result<(), StoreError>;

    /// One stored version by its hash.
    async fn workflow_version(&self, hash: &str) -> Result<Option<WorkflowVersion>, StoreError>;

    /// A workflow's versions, oldest first, each with its runs in flight
    /// (not finished): (version without definition, runs in flight).
    async fn workflow_versions(
        &self,
        workflow: &str,
    ) -> Result<Vec<(WorkflowVersion, i64)>, StoreError>;

    /// Runs in flight (not finished) per workflow and version: (workflow, version, count).
    async fn in_flight_by_version(&self) -> Result<Vec<(String, Option<String>, i64)>, StoreError>;
}

/// One stored workflow definition, content-addressed.
#[derive(Clone, Debug, PartialEq, sqlx::FromRow)]
pub struct WorkflowVersion {
    pub hash: String,
    pub workflow: String,
    /// The file it was first loaded from.
    pub file: String,
    /// The YAML as first loaded (empty in listings).
    pub definition: String,
    /// First loaded at.
    pub created_at: DateTime<Utc>,
}

/// The answer to one `conversation.setup` event.
#[derive(Clone, Debug, PartialEq, sqlx::FromRow)]
pub struct SetupAnswer {
    pub event_seq: i64,
    pub event_id: String,
    /// The workflow that answered; `None` when none matched.
    pub workflow: Option<String>,
    pub used_fallback: bool,
    /// Why the fallback was used.
    pub reason: Option<String>,
    /// The exact response body.
    pub body: String,
    /// Every lookup attempt, like run attempts (secrets masked).
    pub lookups: sqlx::types::Json<Value>,
    pub duration_ms: i64,
    pub created_at: DateTime<Utc>,
}

/// What replaying one event did for one of its original runs.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ReplayOutcome {
    pub workflow: String,
    /// The run replayed.
    pub original_run_id: String,
    /// The new run (with new Idempotency-Keys), when one was created.
    pub new_run_id: Option<String>,
    /// The workflow version the new run executes (the one loaded at replay time).
    pub version: Option<String>,
    /// Why none was created.
    pub skipped: Option<String>,
}

/// One page of a bulk replay, committed with the replay's progress.
#[derive(Clone, Copy, Debug)]
pub enum ReplayPage<'a> {
    /// Mode `rerun`: replay these events' runs (as [`RunStore::replay_event`]).
    Rerun {
        event_ids: &'a [String],
        workflows: Option<&'a [String]>,
        only_failed: bool,
        versions: &'a BTreeMap<String, String>,
    },
    /// Mode `dispatch`: create these runs unless the workflow already has its run
    /// for the event, and record the verdicts (a recorded match is kept).
    Dispatch {
        runs: &'a [super::NewRun],
        decisions: &'a [MatchRecord],
        /// Events of the page that could not be judged.
        failed: i64,
    },
}

/// A bulk replay and its progress.
#[derive(Clone, Debug, PartialEq, sqlx::FromRow)]
pub struct Replay {
    pub replay_id: String,
    pub filter: sqlx::types::Json<Value>,
    /// `running`, `succeeded` or `cancelled`.
    pub status: String,
    pub total: i64,
    pub done: i64,
    pub runs_created: i64,
    pub skipped: i64,
    pub failed: i64,
    pub cursor_seq: i64,
    pub created_at: DateTime<Utc>,
    pub finished_at: Option<DateTime<Utc>>,
    /// `rerun` or `dispatch`.
    pub mode: String,
    /// The instance driving it, until `lease_until`.
    pub lease_owner: Option<String>,
    pub lease_until: Option<DateTime<Utc>>,
    /// Fencing token: raised by every claim; progress is saved only with the current one.
    pub lease_token: i64,
}
