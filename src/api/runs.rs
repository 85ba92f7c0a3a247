//! Runs and their attempts: list, inspect, retry. And the loaded workflows.

use std::collections::BTreeMap;
use std::sync::Arc;

use chrono::{DateTime, Utc};
use poem::web::Data;
use poem_openapi::param::{Path, Query};
use poem_openapi::payload::Json;
use poem_openapi::{Object, OpenApi, Tags};
use serde_json::Value;

use super::auth::AdminAuth;
use super::error::ApiError;
use crate::store::EventStore;
use crate::store::runs::{Attempt, Run, RunChange, RunQuery, RunStatus};
use crate::workflow::registry::Registry;

#[derive(Tags)]
enum RunTags {
    /// Workflow runs: one per (workflow, event) that matched, with every HTTP attempt.
    Runs,
    /// Bulk replays: every event a filter selects, replayed in the background.
    Replays,
    /// The workflows loaded from SWITCHBOARD_WORKFLOWS.
    Workflows,
}

/// One run.
#[derive(Object, Debug)]
pub struct RunSummary {
    /// `run_…`.
    pub id: String,
    pub workflow: String,
    /// The workflow version the run executes (the hash of its definition, see
    /// `GET /workflows/{name}/versions/{hash}`); absent for runs created before versions were recorded.
    #[oai(skip_serializing_if_is_none)]
    pub version: Option<String>,
    /// `scheduled`, `running`, `retrying`, `waiting`, `succeeded`, `failed` or `cancelled`.
    pub status: String,
    /// The event that started it (`ev_…`).
    pub event_id: String,
    /// That event's place in the log.
    pub event_sequence: i64,
    pub conversation_id: Option<String>,
    /// The run this one replays, if it is a replay.
    pub replay_of: Option<String>,
    /// Index of the step it is at (0-based); equals the step count once done.
    pub step_index: i64,
    /// The id of the step it is at (absent once every step is done); a run
    /// resumes at this step even if the workflow's steps were reordered.
    #[oai(skip_serializing_if_is_none)]
    pub step: Option<String>,
    /// Attempts made at that step (absent before the first and once the run succeeded).
    #[oai(skip_serializing_if_is_none)]
    pub attempt: Option<i64>,
    /// Attempts made in all.
    pub attempts_total: i64,
    /// When the next attempt is due (while scheduled or retrying).
    pub next_attempt_at: Option<DateTime<Utc>>,
    /// Why the last attempt failed, or why the run failed.
    pub last_error: Option<String>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    pub finished_at: Option<DateTime<Utc>>,
    /// Why a `waiting` run waits: `timer` (a `wait` step), `event` (a `wait_for` step) or
    /// `order` (behind an earlier run of its workflow and conversation: see `waiting_for.behind`).
    #[oai(skip_serializing_if_is_none)]
    pub wait_reason: Option<String>,
    /// When a `waiting` run goes on: the end of its `wait`, or the timeout of its `wait_for`.
    #[oai(skip_serializing_if_is_none)]
    pub resume_at: Option<DateTime<Utc>>,
    /// What a run at a `wait` / `wait_for` step waits for.
    #[oai(skip_serializing_if_is_none)]
    pub waiting_for: Option<WaitView>,
}

/// What a `waiting` run waits for: a `wait` or `wait_for` step, or (`order`) an earlier run of its conversation.
#[derive(Object, Debug)]
pub struct WaitView {
    /// The step's id (`timer`, `event`).
    #[oai(skip_serializing_if_is_none)]
    pub step: Option<String>,
    /// `timer`, `event`, or `order` (held behind an earlier run of the same workflow and conversation).
    pub kind: String,
    /// `order`: the run holding the line, the earliest of this workflow and conversation not ended (`run_…`).
    #[oai(skip_serializing_if_is_none)]
    pub behind: Option<String>,
    /// `order`: how many earlier runs of this workflow and conversation have not ended.
    #[oai(skip_serializing_if_is_none)]
    pub ahead: Option<i64>,
    /// The event type awaited (`wait_for`).
    #[oai(skip_serializing_if_is_none)]
    pub event: Option<String>,
    /// What it waits for, in words.
    pub description: String,
    /// When the run reached the step (`order`: when it was created).
    pub since: DateTime<Utc>,
    /// The resume time (`wait`) or the timeout (`wait_for`); none for `order`.
    #[oai(skip_serializing_if_is_none)]
    pub until: Option<DateTime<Utc>>,
    /// The event that matched, when the run is about to resume on it (`ev_…`).
    #[oai(skip_serializing_if_is_none)]
    pub matched_event_id: Option<String>,
}

impl From<&crate::store::waits::RunWait> for WaitView {
    fn from(w: &crate::store::waits::RunWait) -> Self {
        let description = match w.wait_for() {
            Some(f) => format!(
                "{} of conversation {}, after event #{}",
                f.describe(),
                w.conversation_id.as_deref().unwrap_or("-"),
                w.after_seq
            ),
            None => format!("the time {}", w.until_at.to_rfc3339()),
        };
        Self {
            step: Some(w.step_id.clone()),
            kind: w.kind.clone(),
            behind: None,
            ahead: None,
            event: w.event_type.clone(),
            description,
            since: w.started_at,
            until: Some(w.until_at),
            matched_event_id: w.matched_event_id.clone(),
        }
    }
}

/// Fills in what waiting runs wait for (one lookup per waiting run).
async fn with_waits(
    store: &Arc<dyn EventStore>,
    mut runs: Vec<RunSummary>,
) -> Result<Vec<RunSummary>, crate::store::StoreError> {
    for r in &mut runs {
        if r.status != "waiting" {
            continue;
        }
        if r.wait_reason.as_deref() == Some("order") {
            // Held by per-conversation order (store/order.rs).
            let ahead = store.held_behind(&r.id).await?;
            let description = match ahead.first() {
                Some((head, status)) => format!(
                    "the end of run {head} ({status}), the earliest run of workflow {} for conversation {} \
                     not ended; {} run(s) ahead of this one",
                    r.workflow,
                    r.conversation_id.as_deref().unwrap_or("-"),
                    ahead.len()
                ),
                None => "nothing any more: it is about to be released".to_owned(),
            };
            r.waiting_for = Some(WaitView {
                step: None,
                kind: "order".into(),
                behind: ahead.first().map(|(id, _)| id.clone()),
                ahead: Some(ahead.len() as i64),
                event: None,
                description,
                since: r.created_at,
                until: None,
                matched_event_id: None,
            });
        } else if let Some(w) = store.run_wait(&r.id).await? {
            r.waiting_for = Some((&w).into());
        }
    }
    Ok(runs)
}

impl From<&Run> for RunSummary {
    fn from(r: &Run) -> Self {
        // A run held by order has no due time: it starts when released.
        let held = r.status == RunStatus::Waiting && r.wait_reason.as_deref() == Some("order");
        let waiting = !held
            && matches!(
                r.status(),
                Some(RunStatus::Scheduled | RunStatus::Retrying | RunStatus::Waiting)
            );
        Self {
            id: r.run_id.clone(),
            workflow: r.workflow.clone(),
            version: r.version.clone(),
            status: r.status.as_str().to_owned(),
            event_id: r.event_id.clone(),
            event_sequence: r.event_seq,
            conversation_id: r.conversation_id.clone(),
            replay_of: r.replay_of.clone(),
            step_index: r.step_index,
            step: r.step_id.clone(),
            attempt: (r.attempt > 0 && r.status != RunStatus::Succeeded).then_some(r.attempt),
            attempts_total: r.attempts_total,
            next_attempt_at: waiting.then_some(r.next_attempt_at),
            last_error: r.last_error.clone(),
            created_at: r.created_at,
            updated_at: r.updated_at,
            finished_at: r.finished_at,
            wait_reason: (r.status == RunStatus::Waiting)
                .then(|| r.wait_reason.clone())
                .flatten(),
            resume_at: (r.status == RunStatus::Waiting && !held).then_some(r.next_attempt_at),
            waiting_for: None,
        }
    }
}

/// One HTTP attempt (secrets appear as `***`).
#[derive(Object, Debug)]
pub struct AttemptView {
    /// 1, 2, … across the run.
    pub number: i64,
    pub step_id: String,
    pub step_index: i64,
    /// 1, 2, … at this step.
    pub attempt: i64,
    pub started_at: DateTime<Utc>,
    pub duration_ms: i64,
    /// `{method, url, headers, body}` exactly as sent: every header, `User-Agent`,
    /// `Idempotency-Key` and `traceparent` included (secrets as `***`).
    pub request: Value,
    pub response_status: Option<i64>,
    pub response_headers: Option<Value>,
    /// The first 64 KiB of the response body.
    pub response_body: Option<String>,
    /// `succeeded`, `retrying`, `failed`, or `probe_failed` (the destination's
    /// circuit-breaker probe failed: not counted against `max_attempts`, the run waits
    /// for the next probe).
    pub outcome: String,
    /// `dns`, `connect`, `tls`, `timeout`, `http_3xx`, `http_4xx`, `http_5xx`, `template`, `secret`,
    /// `egress`, `store`, `request`.
    pub error_class: Option<String>,
    pub error_message: Option<String>,
    /// The backoff chosen before the next attempt.
    pub next_delay_ms: Option<i64>,
}

impl From<Attempt> for AttemptView {
    fn from(a: Attempt) -> Self {
        Self {
            number: a.number,
            step_id: a.step_id,
            step_index: a.step_index,
            attempt: a.attempt,
            started_at: a.started_at,
            duration_ms: a.duration_ms,
            request: a.request.0,
            response_status: a.response_status,
            response_headers: a.response_headers.map(|h| h.0),
            response_body: a.response_body,
            outcome: a.outcome,
            error_class: a.error_class,
            error_message: a.error_message,
            next_delay_ms: a.next_delay_ms,
        }
    }
}

/// A run with its steps' results and every attempt.
#[derive(Object, Debug)]
pub struct RunDetail {
    #[oai(flatten)]
    pub run: RunSummary,
    /// What each finished step returned (`{status, headers, json, body}`, or `{skipped: true}`).
    pub step_results: Value,
    pub attempts: Vec<AttemptView>,
}

#[derive(Object, Debug)]
pub struct RunPage {
    pub data: Vec<RunSummary>,
    /// Pass as `cursor` for the next page; absent on the last page.
    pub next_cursor: Option<String>,
}

/// A loaded workflow.
#[derive(Object, Debug)]
pub struct WorkflowView {
    pub name: String,
    pub description: Option<String>,
    pub file: String,
    /// `on.event`.
    pub event: String,
    /// The checked definition (trigger, when, steps, retry policies); secret values never appear.
    pub definition: Value,
    /// Always true for a loaded workflow (invalid files are refused at load).
    pub valid: bool,
    /// Runs created in the last 24 hours, by status.
    pub runs_last_24h: BTreeMap<String, i64>,
    /// The version loaded now (the hash of its definition).
    pub version: String,
    /// Runs not finished yet that execute another version of this workflow
    /// (or none recorded: runs created before versions were).
    pub runs_in_flight_on_older_versions: i64,
}

/// One stored version of a workflow.
#[derive(Object, Debug)]
pub struct WorkflowVersionView {
    /// The hash of the workflow's name and its normalised YAML.
    pub hash: String,
    pub workflow: String,
    /// The file it was first loaded from.
    pub file: String,
    /// When this definition was first loaded.
    pub first_loaded_at: DateTime<Utc>,
    /// Whether it is the version loaded now by the instance that answers.
    pub current: bool,
    /// Runs not finished yet that execute this version.
    pub runs_in_flight: i64,
}

/// One stored version of a workflow, with its definition.
#[derive(Object, Debug)]
pub struct WorkflowVersionDetail {
    pub hash: String,
    pub workflow: String,
    pub file: String,
    pub first_loaded_at: DateTime<Utc>,
    /// The YAML as first loaded.
    pub definition: String,
}

/// A backtest: a workflow file's text and which stored events to try it on.
#[derive(Object, Debug)]
pub struct BacktestRequest {
    /// The workflow, as YAML (a new one, or an edited copy of a loaded one), e.g.
    /// `on: {event: conversation.ended, status: completed}` with its `steps:`.
    pub workflow: String,
    /// Only events received after this instant.
    pub received_after: Option<DateTime<Utc>>,
    /// Only events received before this instant.
    pub received_before: Option<DateTime<Utc>>,
    /// Only this conversation's events.
    pub conversation_id: Option<String>,
    /// At most this many (most recent) events, 1 to 1000; default 100.
    pub limit: Option<u32>,
}

/// A request the workflow would have sent.
#[derive(Object, Debug)]
pub struct WouldSendView {
    pub step_id: String,
    /// `{method, url, headers, body}`, secrets as `***`.
    pub request: Option<Value>,
    /// Why it was not rendered or was skipped.
    pub note: Option<String>,
}

/// The verdict on one stored event.
#[derive(Object, Debug)]
pub struct BacktestEventView {
    pub event_id: String,
    pub sequence: i64,
    pub conversation_id: Option<String>,
    pub received_at: DateTime<Utc>,
    pub matched: bool,
    /// Why it would not have run.
    pub reason: Option<String>,
    pub requests: Vec<WouldSendView>,
    /// Setup workflows without lookups: the answer it would have given.
    pub answer: Option<Value>,
}

/// What a workflow would have done.
#[derive(Object, Debug)]
pub struct BacktestReport {
    pub workflow: String,
    pub event_type: String,
    pub evaluated: u32,
    pub matched: u32,
    /// Oldest first.
    pub events: Vec<BacktestEventView>,
    /// Validator warnings.
    pub warnings: Vec<String>,
}

/// Which runs of an event to replay.
#[derive(Object, Debug, Default)]
pub struct ReplayEventRequest {
    /// Only runs of these workflows (default: all the event started).
    pub workflows: Option<Vec<String>>,
}

/// What replaying one run did.
#[derive(Object, Debug)]
pub struct ReplayOutcomeView {
    pub workflow: String,
    /// The run replayed.
    pub original_run_id: String,
    /// The new run (new Idempotency-Keys), if created.
    pub new_run_id: Option<String>,
    /// The workflow version the new run executes: the one loaded now (the
    /// original run's own if the workflow is no longer loaded).
    pub version: Option<String>,
    /// Why none was created (e.g. a run for it is still in flight).
    pub skipped: Option<String>,
}

/// What a bulk replay replays.
#[derive(Object, Debug, Default)]
pub struct ReplayRequest {
    /// `rerun` (default): a new run of each run the selected events started (new
    /// Idempotency-Keys, `replay_of` set). `dispatch`: judge the selected events
    /// against the workflows loaded now, each as of its place in the log, and
    /// create the runs that do not exist yet (exactly one per workflow and event).
    pub mode: Option<String>,
    /// Only events of this type.
    #[oai(rename = "type")]
    pub event_type: Option<String>,
    pub received_after: Option<DateTime<Utc>>,
    pub received_before: Option<DateTime<Utc>>,
    /// Only runs of these workflows (`dispatch`: only these loaded workflows).
    pub workflows: Option<Vec<String>>,
    /// Only events whose runs failed (`rerun` only).
    #[oai(default)]
    pub only_failed: bool,
}

/// A bulk replay and its progress.
#[derive(Object, Debug)]
pub struct ReplayView {
    /// `rpl_…`.
    pub id: String,
    /// `running`, `succeeded` or `cancelled`.
    pub status: String,
    /// `rerun` or `dispatch`.
    pub mode: String,
    pub filter: Value,
    /// The workflow version each new run executes (workflow → version hash):
    /// the versions loaded when the replay started, whichever instance drives it.
    pub versions: std::collections::BTreeMap<String, String>,
    /// Events the filter selected when it started.
    pub total: i64,
    /// Events handled so far.
    pub done: i64,
    pub runs_created: i64,
    /// Events with nothing to replay (no matching run, or one still in flight).
    pub skipped: i64,
    /// Events whose replay could not be created.
    pub failed: i64,
    pub created_at: DateTime<Utc>,
    pub finished_at: Option<DateTime<Utc>>,
}

impl From<crate::store::runs::Replay> for ReplayView {
    fn from(r: crate::store::runs::Replay) -> Self {
        let versions = r
            .filter
            .0
            .get("versions")
            .and_then(|v| serde_json::from_value(v.clone()).ok())
            .unwrap_or_default();
        Self {
            id: r.replay_id,
            status: r.status,
            mode: r.mode,
            versions,
            filter: r.filter.0,
            total: r.total,
            done: r.done,
            runs_created: r.runs_created,
            skipped: r.skipped,
            failed: r.failed,
            created_at: r.created_at,
            finished_at: r.finished_at,
        }
    }
}

/// The workflows in force after a reload.
#[derive(Object, Debug)]
pub struct ReloadResult {
    /// Names of the loaded workflows.
    pub workflows: Vec<String>,
    /// Warnings from the validator.
    pub warnings: Vec<String>,
}

pub struct RunsApi;

fn encode_cursor(r: &Run) -> String {
    format!(
        "{}|{}",
        r.created_at
            .to_rfc3339_opts(chrono::SecondsFormat::Micros, true),
        r.run_id
    )
}

fn decode_cursor(c: &str) -> Result<(DateTime<Utc>, String), ApiError> {
    let bad = || super::params::bad_cursor(c);
    let (at, id) = c.split_once('|').ok_or_else(bad)?;
    let at = DateTime::parse_from_rfc3339(at)
        .map_err(|_| bad())?
        .to_utc();
    Ok((at, id.to_owned()))
}

#[OpenApi(prefix_path = "/api/v1")]
impl RunsApi {
    /// List runs, newest first.
    #[allow(clippy::too_many_arguments)]
    #[oai(path = "/runs", method = "get", tag = "RunTags::Runs")]
    async fn list_runs(
        &self,
        _auth: AdminAuth,
        store: Data<&Arc<dyn EventStore>>,
        /// Only this workflow.
        workflow: Query<Option<String>>,
        /// Only this status.
        status: Query<Option<String>>,
        /// Only runs of this conversation.
        conversation_id: Query<Option<String>>,
        /// Only runs started by this event (`ev_…`).
        event_id: Query<Option<String>>,
        /// `next_cursor` of the previous page.
        cursor: Query<Option<String>>,
        /// Page size, 1 to 500.
        #[oai(
            default = "default_limit",
            validator(minimum(value = "1"), maximum(value = "500"))
        )]
        limit: Query<u32>,
    ) -> Result<Json<RunPage>, ApiError> {
        let status = match status.0 {
            None => None,
            Some(s) => Some(
                RunStatus::parse(&s)
                    .ok_or_else(|| super::params::unknown_value("status", &s, &RUN_STATUSES))?,
            ),
        };
        let query = RunQuery {
            workflow: workflow.0,
            status,
            conversation_id: conversation_id.0,
            event_id: event_id.0,
            before: cursor.0.as_deref().map(decode_cursor).transpose()?,
            limit: limit.0,
        };
        let runs = store.list_runs(&query).await?;
        let next_cursor = (runs.len() == limit.0 as usize)
            .then(|| runs.last().map(encode_cursor))
            .flatten();
        Ok(Json(RunPage {
            data: with_waits(&store, runs.iter().map(Into::into).collect()).await?,
            next_cursor,
        }))
    }

    /// One run with its steps' results and every attempt.
    #[oai(path = "/runs/:id", method = "get", tag = "RunTags::Runs")]
    async fn get_run(
        &self,
        _auth: AdminAuth,
        store: Data<&Arc<dyn EventStore>>,
        /// The run id (`run_…`).
        id: Path<String>,
    ) -> Result<Json<RunDetail>, ApiError> {
        let Some(run) = store.get_run(&id).await? else {
            return Err(ApiError::not_found("run", &id));
        };
        let attempts = store.attempts(&id).await?;
        Ok(Json(RunDetail {
            run: with_waits(&store, vec![(&run).into()])
                .await?
                .pop()
                .expect("one run"),
            step_results: run.step_results.0.clone(),
            attempts: attempts.into_iter().map(Into::into).collect(),
        }))
    }

    /// Start a failed run again from the step that failed (due now). 409 unless it failed or was cancelled.
    #[oai(path = "/runs/:id/retry", method = "post", tag = "RunTags::Runs")]
    async fn retry_run(
        &self,
        _auth: AdminAuth,
        store: Data<&Arc<dyn EventStore>>,
        wake: Data<&Arc<tokio::sync::Notify>>,
        /// The run id (`run_…`).
        id: Path<String>,
    ) -> Result<Json<RunSummary>, ApiError> {
        match store.retry_run(&id, Utc::now()).await? {
            RunChange::Changed(run) => {
                wake.notify_one();
                Ok(Json(run.as_ref().into()))
            }
            RunChange::NotFound => Err(ApiError::not_found("run", &id)),
            RunChange::WrongState(status) => Err(ApiError::conflict(format!(
                "run `{}` is {status}; only failed or cancelled runs can be retried",
                id.0
            ))),
        }
    }

    /// Cancel a run that waits for its first attempt, a retry, or at a `wait` / `wait_for` step. 409 if it is running or finished.
    #[oai(path = "/runs/:id/cancel", method = "post", tag = "RunTags::Runs")]
    async fn cancel_run(
        &self,
        _auth: AdminAuth,
        store: Data<&Arc<dyn EventStore>>,
        wake: Data<&Arc<tokio::sync::Notify>>,
        /// The run id (`run_…`).
        id: Path<String>,
    ) -> Result<Json<RunSummary>, ApiError> {
        match store.cancel_run(&id, Utc::now()).await? {
            RunChange::Changed(run) => {
                // A cancelled run no longer waits (durable waits: store/waits.rs), and the
                // next run of its conversation held by order may have been released.
                store.remove_wait(&id).await?;
                wake.notify_one();
                Ok(Json(run.as_ref().into()))
            }
            RunChange::NotFound => Err(ApiError::not_found("run", &id)),
            RunChange::WrongState(status) => Err(ApiError::conflict(format!(
                "run `{}` is {status}; only scheduled, retrying or waiting runs can be cancelled",
                id.0
            ))),
        }
    }

    /// Replay (`mode: rerun`, the default) or re-dispatch (`mode: dispatch`)
    /// every event a filter selects, in the background: one instance drives it
    /// at a time (leased; taken over if that instance dies), page by page, and
    /// no event is handled twice. New runs execute the workflow versions loaded
    /// now (`versions` in the response).
    #[oai(path = "/replays", method = "post", tag = "RunTags::Replays")]
    async fn start_replay(
        &self,
        _auth: AdminAuth,
        store: Data<&Arc<dyn EventStore>>,
        registry: Data<&Arc<Registry>>,
        body: Json<ReplayRequest>,
    ) -> Result<Json<ReplayView>, ApiError> {
        use crate::engine::replay::{self, Mode};
        let mode = match body.mode.as_deref() {
            None => Mode::Rerun,
            Some(m) => Mode::parse(m).map_err(ApiError::bad_request)?,
        };
        let set = registry.current();
        let versions = match mode {
            Mode::Rerun => replay::loaded_versions(&set, None),
            Mode::Dispatch => {
                if body.only_failed {
                    return Err(ApiError::bad_request(
                        "`only_failed` applies to `mode: rerun` (it selects events by their runs); \
                         `mode: dispatch` creates the runs that do not exist yet: drop `only_failed`",
                    ));
                }
                let loaded = replay::loaded_versions(&set, None);
                if let Some(unknown) = body
                    .workflows
                    .iter()
                    .flatten()
                    .find(|w| !loaded.contains_key(w.as_str()))
                {
                    return Err(ApiError::bad_request(format!(
                        "`workflows` names `{unknown}`, which is not loaded (loaded: {}); \
                         `mode: dispatch` runs the workflows loaded now: add it to the workflows directory and reload first",
                        if loaded.is_empty() {
                            "none".to_owned()
                        } else {
                            loaded.keys().cloned().collect::<Vec<_>>().join(", ")
                        }
                    )));
                }
                let versions = replay::loaded_versions(&set, body.workflows.as_deref());
                if versions.is_empty() {
                    return Err(ApiError::bad_request(
                        "no workflow that starts runs is loaded, so `mode: dispatch` would create nothing; \
                         add workflows to the workflows directory and reload (POST /api/v1/workflows/reload) first",
                    ));
                }
                versions
            }
        };
        let filter = replay::ReplayFilter {
            event_type: body.event_type.clone(),
            received_after: body.received_after,
            received_before: body.received_before,
            workflows: body.workflows.clone(),
            only_failed: body.only_failed,
            versions,
        };
        let replay = replay::create(store.as_ref(), mode, filter, None).await?;
        Ok(Json(replay.into()))
    }

    /// A bulk replay's progress.
    #[oai(path = "/replays/:id", method = "get", tag = "RunTags::Replays")]
    async fn get_replay(
        &self,
        _auth: AdminAuth,
        store: Data<&Arc<dyn EventStore>>,
        /// The replay id (`rpl_…`).
        id: Path<String>,
    ) -> Result<Json<ReplayView>, ApiError> {
        match store.get_replay(&id).await? {
            Some(r) => Ok(Json(r.into())),
            None => Err(ApiError::not_found("replay", &id)),
        }
    }

    /// Cancel a running bulk replay (runs it already created stay). 409 if it is not running.
    #[oai(
        path = "/replays/:id/cancel",
        method = "post",
        tag = "RunTags::Replays"
    )]
    async fn cancel_replay(
        &self,
        _auth: AdminAuth,
        store: Data<&Arc<dyn EventStore>>,
        /// The replay id (`rpl_…`).
        id: Path<String>,
    ) -> Result<Json<ReplayView>, ApiError> {
        let cancelled = store.cancel_replay(&id, Utc::now()).await?;
        match store.get_replay(&id).await? {
            None => Err(ApiError::not_found("replay", &id)),
            Some(r) if cancelled => Ok(Json(r.into())),
            Some(r) => Err(ApiError::conflict(format!(
                "replay `{}` is {}, not running",
                id.0, r.status
            ))),
        }
    }

    /// Re-read the workflow directory. Invalid files: 422 with the validator's messages, and
    /// the workflows in force stay as they were.
    #[oai(
        path = "/workflows/reload",
        method = "post",
        tag = "RunTags::Workflows"
    )]
    async fn reload_workflows(
        &self,
        _auth: AdminAuth,
        store: Data<&Arc<dyn EventStore>>,
        registry: Data<&Arc<Registry>>,
    ) -> Result<Json<ReloadResult>, ApiError> {
        let dir = registry.current().dir.clone();
        match crate::workflow::WorkflowSet::load(&dir) {
            Ok(set) => {
                crate::workflow::registry::record_versions(store.as_ref(), &set).await?;
                let names = set.workflows.iter().map(|w| w.name.clone()).collect();
                let warnings = set.warnings.iter().map(|d| d.to_string()).collect();
                registry.replace(set);
                tracing::info!(dir = %dir.display(), "workflows reloaded");
                Ok(Json(ReloadResult {
                    workflows: names,
                    warnings,
                }))
            }
            Err(diagnostics) => Err(ApiError::Invalid(super::error::ErrorBody::new(
                "invalid_workflows",
                crate::workflow::diagnostic::render_all(&diagnostics),
            ))),
        }
    }

    /// Try a workflow on stored events without sending anything: for each event (as of its own
    /// place in the log), whether it would have run and why not, and the requests it would have
    /// sent, rendered with secrets masked. 422 if the workflow does not validate.
    #[oai(
        path = "/workflows/backtest",
        method = "post",
        tag = "RunTags::Workflows"
    )]
    async fn backtest(
        &self,
        _auth: AdminAuth,
        store: Data<&Arc<dyn EventStore>>,
        body: Json<BacktestRequest>,
    ) -> Result<Json<BacktestReport>, ApiError> {
        use crate::workflow::backtest;
        let (wf, warnings) = crate::workflow::compile::compile(
            std::path::Path::new("backtest.yaml"),
            &body.workflow,
        )
        .map_err(|d| {
            ApiError::Invalid(super::error::ErrorBody::new(
                "invalid_workflow",
                crate::workflow::diagnostic::render_all(&d),
            ))
        })?;
        let filter = backtest::BacktestFilter {
            received_after: body.received_after,
            received_before: body.received_before,
            conversation_id: body.conversation_id.clone(),
            limit: body.limit.unwrap_or(100),
        };
        let results = backtest::run(store.as_ref(), &wf, &filter).await?;
        Ok(Json(BacktestReport {
            workflow: wf.name.clone(),
            event_type: wf.event.clone(),
            evaluated: results.len() as u32,
            matched: results.iter().filter(|r| r.matched).count() as u32,
            events: results
                .into_iter()
                .map(|r| BacktestEventView {
                    event_id: r.event_id,
                    sequence: r.sequence,
                    conversation_id: r.conversation_id,
                    received_at: r.received_at,
                    matched: r.matched,
                    reason: r.reason,
                    requests: r
                        .requests
                        .into_iter()
                        .map(|w| WouldSendView {
                            step_id: w.step_id,
                            request: w.request,
                            note: w.note,
                        })
                        .collect(),
                    answer: r.answer,
                })
                .collect(),
            warnings: warnings.iter().map(|w| w.to_string()).collect(),
        }))
    }

    /// A workflow's stored versions (every definition loaded under its name, oldest first),
    /// with the runs in flight on each. 404 if none is stored.
    #[oai(
        path = "/workflows/:name/versions",
        method = "get",
        tag = "RunTags::Workflows"
    )]
    async fn workflow_versions(
        &self,
        _auth: AdminAuth,
        store: Data<&Arc<dyn EventStore>>,
        registry: Data<&Arc<Registry>>,
        name: Path<String>,
    ) -> Result<Json<Vec<WorkflowVersionView>>, ApiError> {
        let versions = store.workflow_versions(&name.0).await?;
        if versions.is_empty() {
            return Err(ApiError::not_found(
                "workflow with stored versions",
                &name.0,
            ));
        }
        let set = registry.current();
        let current = set.get(&name.0).map(|w| w.version.clone());
        Ok(Json(
            versions
                .into_iter()
                .map(|(v, n)| WorkflowVersionView {
                    current: current.as_deref() == Some(v.hash.as_str()),
                    hash: v.hash,
                    workflow: v.workflow,
                    file: v.file,
                    first_loaded_at: v.created_at,
                    runs_in_flight: n,
                })
                .collect(),
        ))
    }

    /// One stored version of a workflow with its definition (the YAML as first loaded).
    /// 404 if no version of that workflow has this hash.
    #[oai(
        path = "/workflows/:name/versions/:hash",
        method = "get",
        tag = "RunTags::Workflows"
    )]
    async fn workflow_version(
        &self,
        _auth: AdminAuth,
        store: Data<&Arc<dyn EventStore>>,
        name: Path<String>,
        hash: Path<String>,
    ) -> Result<Json<WorkflowVersionDetail>, ApiError> {
        match store.workflow_version(&hash.0).await? {
            Some(v) if v.workflow == name.0 => Ok(Json(WorkflowVersionDetail {
                hash: v.hash,
                workflow: v.workflow,
                file: v.file,
                first_loaded_at: v.created_at,
                definition: v.definition,
            })),
            _ => Err(ApiError::not_found(
                &format!("version of workflow `{}`", name.0),
                &hash.0,
            )),
        }
    }

    /// The loaded workflows, with their runs of the last 24 hours by status.
    #[oai(path = "/workflows", method = "get", tag = "RunTags::Workflows")]
    async fn list_workflows(
        &self,
        _auth: AdminAuth,
        store: Data<&Arc<dyn EventStore>>,
        registry: Data<&Arc<Registry>>,
    ) -> Result<Json<Vec<WorkflowView>>, ApiError> {
        let counts = store
            .run_counts_since(Utc::now() - chrono::TimeDelta::hours(24))
            .await?;
        let in_flight = store.in_flight_by_version().await?;
        let set = registry.current();
        Ok(Json(
            set.workflows
                .iter()
                .map(|w| WorkflowView {
                    version: w.version.clone(),
                    runs_in_flight_on_older_versions: in_flight
                        .iter()
                        .filter(|(wf, v, _)| wf == &w.name && v.as_deref() != Some(&w.version))
                        .map(|(_, _, n)| *n)
                        .sum(),
                    name: w.name.clone(),
                    description: w.description.clone(),
                    file: w.file.display().to_string(),
                    event: w.event.clone(),
                    definition: serde_json::to_value(w).unwrap_or(Value::Null),
                    valid: true,
                    runs_last_24h: counts
                        .iter()
                        .filter(|(wf, _, _)| wf == &w.name)
                        .map(|(_, status, n)| (status.clone(), *n))
                        .collect(),
                })
                .collect(),
        ))
    }
}

/// The values `GET /runs?status=` accepts.
const RUN_STATUSES: [&str; 7] = [
    "scheduled",
    "running",
    "retrying",
    "waiting",
    "succeeded",
    "failed",
    "cancelled",
];

fn default_limit() -> u32 {
    50
}
