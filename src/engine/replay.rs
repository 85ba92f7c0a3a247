//! Bulk replays and re-dispatch: work through the events a filter selects,
//! oldest first, one page at a time. Mode `rerun` creates new runs of the
//! runs each event started (new Idempotency-Keys, `replay_of`); mode
//! `dispatch` judges each event, as of its place in the log, against the
//! workflow versions in force when the replay was started and creates the
//! runs that do not exist yet (one per workflow and event, ever).
//!
//! A replay is a leased job (see [`super::replay_backend`]): one instance
//! drives it at a time, and each page — its runs and the replay's progress —
//! is one transaction that only commits while the driver still holds the
//! lease with its fencing token. A crash mid-page therefore loses the whole
//! page, never half of it: whoever takes over redoes it, and no event is
//! replayed twice.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use serde::{Deserialize, Serialize};
use tokio::sync::Notify;

use crate::operator::envelope::Envelope;
use crate::store::projection::ConversationState;
use crate::store::runs::{Replay, ReplayPage};
use crate::store::{EventQuery, EventStore, MatchRecord, NewRun, Order, StoreError};
use crate::workflow::backtest::EventAsOf;
use crate::workflow::{Workflow, WorkflowSet};

/// A replay's lease: renewed by every page's commit; another instance takes
/// the replay over once it lapses.
pub const LEASE: Duration = Duration::from_secs(10);

/// Events per page (one transaction each).
pub const PAGE: u32 = 100;

/// What a bulk replay does with the events it selects.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// New runs of the runs each event started (the default).
    Rerun,
    /// The runs the workflows in force now would start, where they do not exist yet.
    Dispatch,
}

impl Mode {
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Rerun => "rerun",
            Mode::Dispatch => "dispatch",
        }
    }

    /// Parses a mode, with an error that lists the valid ones.
    pub fn parse(s: &str) -> Result<Self, String> {
        match s {
            "rerun" => Ok(Mode::Rerun),
            "dispatch" => Ok(Mode::Dispatch),
            other => Err(format!(
                "`mode` is `{other}`; use `rerun` (new runs of the runs each event started, the default) \
                 or `dispatch` (create the runs the workflows loaded now would start, where they do not exist yet)"
            )),
        }
    }
}

/// What a bulk replay selects.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ReplayFilter {
    pub event_type: Option<String>,
    pub received_after: Option<chrono::DateTime<Utc>>,
    pub received_before: Option<chrono::DateTime<Utc>>,
    /// Only runs of these workflows.
    pub workflows: Option<Vec<String>>,
    /// Only events whose (original) runs failed (mode `rerun`).
    #[serde(default)]
    pub only_failed: bool,
    /// The workflow versions in force when the replay started (name → hash):
    /// what its new runs execute, whichever instance drives it.
    #[serde(default)]
    pub versions: BTreeMap<String, String>,
}

impl ReplayFilter {
    fn query(&self, after_seq: i64, limit: u32) -> EventQuery {
        EventQuery {
            event_type: self.event_type.clone(),
            received_after: self.received_after,
            received_before: self.received_before,
            cursor: Some(after_seq),
            order: Order::OldestFirst,
            limit,
            ..Default::default()
        }
    }
}

/// The versions of the workflows in `set` that runs can start (of `only`, if given).
pub fn loaded_versions(set: &WorkflowSet, only: Option<&[String]>) -> BTreeMap<String, String> {
    set.workflows
        .iter()
        .filter(|w| w.respond.is_none() && w.fallback.is_none())
        .filter(|w| only.is_none_or(|o| o.contains(&w.name)))
        .map(|w| (w.name.clone(), w.version.clone()))
        .collect()
}

/// Wakes the replay workers of this process (a replay was created).
pub(crate) static REPLAYS_CREATED: Notify = Notify::const_new();

/// Saves a new replay: counts what it selects; the replay workers pick it up
/// (or, with `owner`, it is created leased to the caller, which drives it
/// itself with [`Driver::drive`]).
pub async fn create(
    store: &dyn EventStore,
    mode: Mode,
    filter: ReplayFilter,
    owner: Option<&str>,
) -> Result<Replay, StoreError> {
    let total = store.count_events(&filter.query(0, 1)).await?;
    let replay = Replay {
        replay_id: format!("rpl_{}", uuid::Uuid::new_v4().simple()),
        filter: sqlx::types::Json(serde_json::to_value(&filter).unwrap_or_default()),
        status: "running".into(),
        total,
        done: 0,
        runs_created: 0,
        skipped: 0,
        failed: 0,
        cursor_seq: 0,
        created_at: Utc::now(),
        finished_at: None,
        mode: mode.as_str().to_owned(),
        lease_owner: owner.map(str::to_owned),
        lease_until: owner
            .map(|_| Utc::now() + chrono::TimeDelta::from_std(LEASE).unwrap_or_default()),
        lease_token: i64::from(owner.is_some()),
    };
    store.create_replay(&replay).await?;
    REPLAYS_CREATED.notify_waiters();
    Ok(replay)
}

/// How a drive ended.
#[derive(Debug)]
pub enum Ended {
    /// Every selected event was handled.
    Finished(Box<Replay>),
    /// Cancelled, taken over by another instance, or the process is stopping.
    Stopped,
}

/// Drives leased replays, page by page.
pub struct Driver {
    pub store: Arc<dyn EventStore>,
    /// Wakes this process's run workers when a page created runs.
    pub wake: Arc<Notify>,
    pub owner: String,
    /// Set when the process stops: the drive ends after the page in progress.
    pub stopping: Arc<std::sync::atomic::AtomicBool>,
}

impl Driver {
    /// Works through `replay` (leased to this driver's owner) until it is
    /// finished, cancelled or lost; `progress` sees it after every page.
    pub async fn drive(
        &self,
        mut replay: Replay,
        progress: &(dyn Fn(&Replay) + Send + Sync),
    ) -> Result<Ended, StoreError> {
        let filter: ReplayFilter =
            serde_json::from_value(replay.filter.0.clone()).unwrap_or_default();
        let mode = Mode::parse(&replay.mode).unwrap_or(Mode::Rerun);
        let workflows = match mode {
            Mode::Rerun => Vec::new(),
            Mode::Dispatch => self.compile_versions(&filter.versions).await?,
        };
        let token = replay.lease_token;
        loop {
            if self.stopping.load(std::sync::atomic::Ordering::SeqCst) {
                return Ok(Ended::Stopped);
            }
            let page = self
                .store
                .list_events(&filter.query(replay.cursor_seq, PAGE))
                .await?;
            let Some(last) = page.last() else {
                return Ok(
                    if self
                        .store
                        .finish_replay(&replay.replay_id, &self.owner, token, Utc::now())
                        .await?
                    {
                        replay.status = "succeeded".into();
                        tracing::info!(replay_id = %replay.replay_id, runs = replay.runs_created, "replay finished");
                        Ended::Finished(Box::new(replay))
                    } else {
                        Ended::Stopped
                    },
                );
            };
            let last_seq = last.seq;
            let events = page.len() as i64;
            let (runs, decisions, failed);
            let event_ids: Vec<String>;
            let work = match mode {
                Mode::Rerun => {
                    event_ids = page.iter().map(|e| e.event_id.clone()).collect();
                    ReplayPage::Rerun {
                        event_ids: &event_ids,
                        workflows: filter.workflows.as_deref(),
                        only_failed: filter.only_failed,
                        versions: &filter.versions,
                    }
                }
                Mode::Dispatch => {
                    (runs, decisions, failed) = self.judge(&workflows, &page).await?;
                    ReplayPage::Dispatch {
                        runs: &runs,
                        decisions: &decisions,
                        failed,
                    }
                }
            };
            match self
                .store
                .commit_replay_page(
                    &replay.replay_id,
                    &self.owner,
                    token,
                    LEASE,
                    events,
                    last_seq,
                    &work,
                    Utc::now(),
                )
                .await?
            {
                None => {
                    tracing::info!(replay_id = %replay.replay_id, "replay cancelled or taken over; stopped driving it");
                    return Ok(Ended::Stopped);
                }
                Some(saved) => {
                    if saved.runs_created > replay.runs_created {
                        self.wake.notify_one();
                    }
                    replay = saved;
                    progress(&replay);
                }
            }
        }
    }

    /// The workflows a dispatch judges with: its stored versions, compiled.
    async fn compile_versions(
        &self,
        versions: &BTreeMap<String, String>,
    ) -> Result<Vec<Workflow>, StoreError> {
        let mut out = Vec::new();
        for (name, hash) in versions {
            let Some(stored) = self.store.workflow_version(hash).await? else {
                tracing::error!(workflow = %name, version = %hash, "workflow version not stored; the dispatch skips this workflow");
                continue;
            };
            match crate::workflow::compile::compile(
                std::path::Path::new(&stored.file),
                &stored.definition,
            ) {
                Ok((mut wf, _)) => {
                    wf.version = hash.clone();
                    out.push(wf);
                }
                Err(d) => tracing::error!(
                    workflow = %name, version = %hash,
                    "workflow version no longer compiles; the dispatch skips this workflow:\n{}",
                    crate::workflow::diagnostic::render_all(&d)
                ),
            }
        }
        Ok(out)
    }

    /// The page's events to judge (those some workflow listens to), each with
    /// its conversation as of its place in the log: each conversation of the
    /// page is read once (up to its last event in the page) and folded once.
    /// `Err(event id)` for an event that cannot be read back.
    async fn as_of(
        &self,
        workflows: &[Workflow],
        page: &[crate::store::StoredEvent],
    ) -> Result<Vec<(usize, Result<EventAsOf, String>)>, StoreError> {
        use std::collections::{HashMap, HashSet};
        let wanted: Vec<usize> = (0..page.len())
            .filter(|&i| workflows.iter().any(|w| w.event == page[i].event_type))
            .collect();
        let mut upto: HashMap<&str, i64> = HashMap::new();
        for &i in &wanted {
            if let Some(c) = &page[i].conversation_id {
                let last = upto.entry(c.as_str()).or_insert(page[i].seq);
                *last = (*last).max(page[i].seq);
            }
        }
        let seqs: HashSet<i64> = wanted.iter().map(|&i| page[i].seq).collect();
        let mut folded: HashMap<i64, Result<EventAsOf, String>> = HashMap::new();
        for (c, last) in upto {
            let log = self.store.conversation_log(c, Some(last)).await?;
            let mut state = Some(ConversationState::new(c));
            for item in &log {
                let before = state.clone();
                if let Some(s) = state.as_mut()
                    && let Err(e) = s.apply_stored(item)
                {
                    tracing::warn!(conversation_id = %c, seq = item.event.seq, error = %e, "cannot fold conversation");
                    state = None; // this and every later event of it cannot be judged
                }
                if !seqs.contains(&item.event.seq) {
                    continue;
                }
                let judged = match (&before, &state, Envelope::parse(&item.raw_body)) {
                    (Some(before), Some(after), Ok(envelope)) => Ok(EventAsOf {
                        envelope,
                        event_json: serde_json::from_slice(&item.raw_body).unwrap_or_default(),
                        before: Some(before.clone()),
                        after: Some(after.clone()),
                    }),
                    _ => Err(item.event.event_id.clone()),
                };
                folded.insert(item.event.seq, judged);
            }
        }
        let mut out = Vec::with_capacity(wanted.len());
        for i in wanted {
            let judged = match folded.remove(&page[i].seq) {
                Some(j) => j,
                // Not in a conversation's log (no conversation): read on its own.
                None => match crate::workflow::backtest::event_as_of(self.store.as_ref(), &page[i])
                    .await
                {
                    Ok(Some(j)) => Ok(j),
                    Ok(None) => continue,
                    Err(StoreError::Corrupt(_)) => Err(page[i].event_id.clone()),
                    Err(e) => return Err(e),
                },
            };
            out.push((i, judged));
        }
        Ok(out)
    }

    /// Today's verdicts on a page of events: the runs to create, the decisions
    /// to record, and how many events could not be judged.
    async fn judge(
        &self,
        workflows: &[Workflow],
        page: &[crate::store::StoredEvent],
    ) -> Result<(Vec<NewRun>, Vec<MatchRecord>, i64), StoreError> {
        use crate::workflow::matching::{base_context, decide};
        let (mut runs, mut decisions, mut failed) = (Vec::new(), Vec::new(), 0);
        let now = Utc::now();
        for (i, judged) in self.as_of(workflows, page).await? {
            let event = &page[i];
            let judged = match judged {
                Ok(j) => j,
                Err(id) => {
                    tracing::warn!(event_id = %id, "cannot judge event: it does not read back");
                    failed += 1;
                    continue;
                }
            };
            let facts = judged.facts();
            for wf in workflows.iter().filter(|w| w.event == event.event_type) {
                let decision = decide(wf, &facts);
                if decision.matched() {
                    runs.push(NewRun {
                        run_id: format!("run_{}", uuid::Uuid::new_v4().simple()),
                        workflow: wf.name.clone(),
                        event_seq: event.seq,
                        event_id: event.event_id.clone(),
                        conversation_id: event.conversation_id.clone(),
                        context: base_context(&facts),
                        created_at: now,
                        trace_context: None,
                        version: Some(wf.version.clone()),
                        // Dispatched runs, like replays, are not held by
                        // `order: conversation` (README "Order").
                        ordered: false,
                        held: false,
                    });
                }
                decisions.push(MatchRecord {
                    event_seq: event.seq,
                    workflow: wf.name.clone(),
                    matched: decision.matched(),
                    reason: decision.reason().map(str::to_owned),
                });
            }
        }
        Ok((runs, decisions, failed))
    }

    /// [`Self::drive`], supervised: a store error (the database is away) is logged and the drive starts again from the last committed
    /// page after a pause (1 s, doubling to 30 s), for as long as this
    /// driver still holds the replay and the process is not stopping.
    pub async fn drive_supervised(&self, replay: Replay) {
        let id = replay.replay_id.clone();
        let token = replay.lease_token;
        let mut current = Some(replay);
        let mut pause = Duration::from_secs(1);
        loop {
            let replay = match current.take() {
                Some(r) => r,
                None => match self.store.get_replay(&id).await {
                    Ok(Some(r))
                        if r.status == "running"
                            && r.lease_token == token
                            && r.lease_owner.as_deref() == Some(self.owner.as_str()) =>
                    {
                        r
                    }
                    Ok(_) => return, // finished, cancelled or taken over meanwhile
                    Err(e) => {
                        if self.stopping.load(std::sync::atomic::Ordering::SeqCst) {
                            return; // the process stops: another instance takes the replay over
                        }
                        tracing::error!(replay_id = %id, error = %e, "replay interrupted; retrying in {}", humantime::format_duration(pause));
                        tokio::time::sleep(pause).await;
                        pause = (pause * 2).min(Duration::from_secs(30));
                        continue;
                    }
                },
            };
            let error = match self.drive(replay, &|_| {}).await {
                Ok(_) => return,
                Err(e) => e.to_string(),
            };
            if self.stopping.load(std::sync::atomic::Ordering::SeqCst) {
                return;
            }
            tracing::error!(replay_id = %id, error = %error, "replay interrupted; resuming from its last saved page in {}", humantime::format_duration(pause));
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_secs(30));
        }
    }
}
