//! The engine: workers that take due runs from the store and execute their
//! steps as HTTP actions, with retries and backoff scheduled in the database.
//!
//! A worker holds a run with a lease of [`LEASE`], renewed inside the run's
//! own task while it works, so a crashed process's runs are taken over once
//! the lease lapses (within seconds, by this process after a restart or by
//! another instance). Each claim carries a fencing token that every save and
//! renewal must match; on PostgreSQL lease expiry is the database's clock.
//! Every state change is saved before the next action: a kill -9 loses at
//! most the attempt in flight, which is sent again with the same
//! `Idempotency-Key`; an outcome that cannot be saved is recorded as a
//! `store` failure rather than sent again. A run resumes at its step by id.
//! New runs wake the workers at once (in-process, and through
//! LISTEN/NOTIFY on PostgreSQL); polling is only a safety net.
//!
//! A run's path through the files: [`worker`] (apalis-core's monitor) takes
//! it from [`backend`] (our leased `runs` table, or in memory when this
//! process created it); [`execute`] supervises it (lease renewal, panics);
//! [`Engine::drive`] here walks its steps, asking [`driver`] (the pure step
//! machine: state + outcome → next state) what comes next; [`wait`] parks it
//! at a wait step; [`attempt`] sends one request under a request slot
//! ([`slots`]); [`save`] group-commits its progress; [`observe`] emits its
//! metrics and spans once a save is durable.

mod attempt;
pub mod backend;
pub mod backoff;
mod driver;
mod execute;
pub mod http;
mod monitor;
mod observe;
pub mod replay;
pub mod replay_backend;
pub mod save;
pub mod setup;
pub mod slots;
mod spawned;
pub mod trace;
pub mod versions;
pub mod wait;
mod worker;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, SubsecRound, Utc};
use serde_json::{Value, json};
use tokio::sync::{Notify, Semaphore};

use crate::store::EventStore;
use crate::store::runs::Run;
use crate::workflow::registry::Registry;
use crate::workflow::{Step, Workflow, template};
use driver::RunState;
use trace::{RunTrace, StepEnd};

/// How long a claimed run stays with its worker without a renewal.
pub const LEASE: Duration = Duration::from_secs(5);
const RENEW_EVERY: Duration = Duration::from_millis(1500);
/// How often a progress save is tried before the attempt is recorded as a `store` failure.
const SAVE_TRIES: u32 = 3;
const SAVE_RETRY_DELAY: Duration = Duration::from_millis(300);
/// Runs in flight per request slot: a run whose request has been answered
/// waits for its save to commit (a share of the next group commit) without
/// holding a request slot, so slots turn over at the speed of the requests,
/// not of the commits.
const RUNS_PER_REQUEST_SLOT: usize = 4;

/// What the gate answers before an attempt is sent.
#[derive(Clone, Debug, PartialEq)]
pub enum GateAnswer {
    /// Send it.
    Go,
    /// Do not send it now: the run goes `waiting` with `reason` (e.g.
    /// `rate_limited`, `circuit_open`) until `until`, releasing its lease;
    /// no attempt is recorded and none is counted against `max_attempts`.
    Hold {
        until: DateTime<Utc>,
        reason: String,
    },
}

/// Asked right before each HTTP attempt (after the step's `if`), e.g. by
/// per-destination rate limits and circuit breakers.
#[async_trait::async_trait]
pub trait Gate: Send + Sync + 'static {
    async fn check(&self, run: &Run, step: &Step) -> GateAnswer;
}

/// The default gate: every attempt goes.
pub struct AlwaysGo;

#[async_trait::async_trait]
impl Gate for AlwaysGo {
    async fn check(&self, _run: &Run, _step: &Step) -> GateAnswer {
        GateAnswer::Go
    }
}

/// What comes after a check before a step's attempt.
enum StepFlow {
    /// Go on with this step.
    Go,
    /// This step is done (skipped): on to the next one.
    Next,
    /// The run stopped (ended, or its lease was lost).
    Stop,
}

/// The `User-Agent` of every outbound request.
pub fn user_agent() -> String {
    format!("switchboard/{}", env!("CARGO_PKG_VERSION"))
}

pub struct Engine {
    store: Arc<dyn EventStore>,
    registry: Arc<Registry>,
    client: http::Client,
    wake: Arc<Notify>,
    owner: String,
    /// Outbound requests in flight at once (`SWITCHBOARD_WORKER_CONCURRENCY`).
    concurrency: usize,
    /// One permit per run executing now (tower's concurrency limit holds
    /// them): [`RUNS_PER_REQUEST_SLOT`] per request slot.
    permits: Arc<Semaphore>,
    /// One permit per outbound request in flight, held from just before the
    /// request is sent until its response is read (not while it is saved).
    requests: Arc<Semaphore>,
    /// Asked before every attempt (default: always go).
    gate: Arc<dyn Gate>,
    /// Group-commits run saves.
    saver: save::Saver,
    /// Runs this process leased to itself when it created them, in memory.
    local: backend::LocalRuns,
    /// Set (to the grace period) when shutdown begins.
    stop: tokio::sync::watch::Sender<Option<Duration>>,
    /// Set when the monitor has returned (every worker stopped).
    stopped: tokio::sync::watch::Sender<bool>,
    /// Workflow versions not in the loaded set, compiled from the database, by hash (bounded).
    versions: versions::VersionCache,
}

fn now() -> DateTime<Utc> {
    Utc::now().trunc_subsecs(6)
}

/// `d` from now; a delay past the year 9999 (say `max_delay: 300000y`) is capped there.
fn after(d: Duration) -> DateTime<Utc> {
    let last = DateTime::from_timestamp(253_402_300_799, 0).expect("a valid time");
    chrono::TimeDelta::from_std(d)
        .ok()
        .and_then(|d| now().checked_add_signed(d))
        .map_or(last, |t| t.min(last))
}

impl Engine {
    pub fn new(
        store: Arc<dyn EventStore>,
        registry: Arc<Registry>,
        wake: Arc<Notify>,
        concurrency: usize,
    ) -> Self {
        Self {
            saver: save::Saver::new(),
            gate: Arc::new(AlwaysGo),
            store,
            registry,
            client: http::client(),
            wake,
            // Unique per process: a restarted process never mistakes an old lease for its own.
            owner: format!("{}-{}", hostname(), uuid::Uuid::new_v4().simple()),
            concurrency: concurrency.max(1),
            permits: Arc::new(Semaphore::new(concurrency.max(1) * RUNS_PER_REQUEST_SLOT)),
            requests: Arc::new(Semaphore::new(concurrency.max(1))),
            local: backend::LocalRuns::default(),
            stop: tokio::sync::watch::Sender::new(None),
            stopped: tokio::sync::watch::Sender::new(false),
            versions: versions::VersionCache::default(),
        }
    }

    /// Replaces the gate asked before every attempt (per-destination rate
    /// limits, circuit breakers).
    pub fn with_gate(mut self, gate: Arc<dyn Gate>) -> Self {
        self.gate = gate;
        self
    }

    /// The stored version `hash` of a workflow, compiled with the same
    /// compiler as the loaded ones (cached by hash); `Err` says why it cannot run.
    async fn stored_version(
        &self,
        name: &str,
        hash: &str,
    ) -> Result<Result<Arc<Workflow>, String>, crate::store::StoreError> {
        if let Some(wf) = self.versions.get(hash) {
            return Ok(Ok(wf));
        }
        let Some(stored) = self.store.workflow_version(hash).await? else {
            return Ok(Err(format!(
                "version {hash} of workflow `{name}` is not stored in the database; the run cannot execute (replay the event to run the workflow as it is now)"
            )));
        };
        match crate::workflow::compile::compile(
            std::path::Path::new(&stored.file),
            &stored.definition,
        ) {
            Ok((mut wf, _)) => {
                // The stored hash is the address, whatever this compiler would compute.
                wf.version = hash.to_owned();
                let wf = Arc::new(wf);
                self.versions.insert(hash, wf.clone());
                Ok(Ok(wf))
            }
            Err(d) => Ok(Err(format!(
                "version {hash} of workflow `{name}` no longer compiles; the run cannot execute:\n{}",
                crate::workflow::diagnostic::render_all(&d)
            ))),
        }
    }

    /// Graceful shutdown: the monitor stops its workers claiming runs, lets
    /// the runs in flight finish within `grace`, and past it drops them; then
    /// every lease this process still holds is handed back (their leases end
    /// now, so another instance, or this one after a restart, takes them at
    /// once; an interrupted attempt is sent again with the same
    /// Idempotency-Key). Returns how many runs were handed back.
    pub async fn shutdown(&self, grace: Duration) -> u64 {
        let in_flight = self.run_slots() - self.permits.available_permits();
        if in_flight > 0 {
            tracing::info!(in_flight, grace = %humantime::format_duration(grace), "waiting for runs in flight");
        }
        self.stop.send_replace(Some(grace));
        let mut stopped = self.stopped.subscribe();
        // The monitor returns within the grace (or just after it, when it drops the workers).
        let _ =
            tokio::time::timeout(grace + Duration::from_secs(2), stopped.wait_for(|s| *s)).await;
        // After the monitor returned: past the grace, `poll_close` is not called.
        match self.store.release_leases(&self.owner, now()).await {
            Ok(0) => 0,
            Ok(n) => {
                tracing::warn!(
                    runs = n,
                    "grace period over; runs in flight handed back to other workers"
                );
                n
            }
            Err(e) => {
                tracing::error!(error = %e, "could not hand back runs in flight; they resume when their leases lapse");
                0
            }
        }
    }

    pub fn owner(&self) -> &str {
        &self.owner
    }

    /// How many runs may be in flight at once.
    fn run_slots(&self) -> usize {
        self.concurrency * RUNS_PER_REQUEST_SLOT
    }

    /// Runs the workers under apalis-core's [`Monitor`](apalis_core::monitor::Monitor)
    /// until [`Engine::shutdown`] (or until the task is dropped).
    pub fn spawn(self: Arc<Self>) -> tokio::task::JoinHandle<()> {
        // Saves are written by their own task unless the appender took them.
        self.saver.start(self.store.clone(), self.wake.clone());
        // A restart after a crash is running again (shutdown waits for it).
        self.stopped.send_replace(false);
        tokio::spawn(async move {
            let monitor = worker::monitor(self.clone());
            if let Err(e) = monitor::run_until_stopped(monitor, self.stop.subscribe()).await {
                tracing::error!(error = %e, "the workers stopped with an error");
            }
            self.stopped.send_replace(true);
        })
    }

    /// Executes a run's steps from where it stands: each step's `if`, its
    /// wait, the destination's gate, the attempt and its save, until the run
    /// ends or stops (to wait, to retry later, or because its lease was lost).
    async fn drive(&self, run: Run) -> Result<(), crate::store::StoreError> {
        let set = self.registry.current();
        let trace = RunTrace::new(&run);
        let mut state = RunState::from(&run);
        // The version the run matched: the loaded one when the hash is the same,
        // else the stored one; runs without a version use the workflow loaded under their name.
        let held: Arc<Workflow>;
        let wf: &Workflow = match (&run.version, set.get(&run.workflow)) {
            (Some(hash), Some(wf)) if &wf.version == hash => wf,
            (Some(hash), _) => match self.stored_version(&run.workflow, hash).await? {
                Ok(wf) => {
                    held = wf;
                    &held
                }
                Err(why) => return self.end_failed(&run, &trace, &state, why).await,
            },
            (None, Some(wf)) => wf,
            (None, None) => {
                let why = format!("workflow `{}` is no longer loaded", run.workflow);
                return self.end_failed(&run, &trace, &state, why).await;
            }
        };
        // Resume at the step by its id (the index only for runs saved before ids were).
        if let Some(id) = state.step_id.clone() {
            match wf.steps.iter().position(|s| s.id == id) {
                Some(i) => state.step_index = i as i64,
                None => {
                    let why = format!(
                        "step `{id}` is no longer in workflow `{}`; the run cannot resume (replay the event to run the workflow as it is now)",
                        run.workflow
                    );
                    return self.end_failed(&run, &trace, &state, why).await;
                }
            }
        }
        state.at(wf);
        let secrets = read_secrets(wf);
        let masker = http::Masker::new(secrets.values().flatten());
        while let Some(step) = wf.steps.get(state.step_index as usize) {
            let ctx = self.context(&run, &state, &secrets);
            if let Some(cond) = &step.condition {
                match self
                    .condition(&run, &trace, wf, step, cond, &ctx, &masker, &mut state)
                    .await?
                {
                    StepFlow::Go => {}
                    StepFlow::Next => continue,
                    StepFlow::Stop => return Ok(()),
                }
            }
            // Durable waits (wait.rs): `wait` / `wait_for` steps park the run or end its wait.
            if let Some(w) = &step.wait {
                match self
                    .wait_step(&run, &trace, wf, step, w, &mut state)
                    .await?
                {
                    wait::WaitFlow::Next => continue,
                    wait::WaitFlow::Stop => return Ok(()),
                }
            }
            // The gate, right before an attempt is sent: a held attempt is not
            // made, not recorded and not counted; the run waits until `until`.
            if let GateAnswer::Hold { until, reason } = self.gate.check(&run, step).await {
                tracing::info!(run_id = %run.run_id, step = %step.id, reason, until = %until, "attempt held; the run waits");
                let update = state.waiting(until, reason);
                self.save(&run, None, &update).await?;
                return Ok(());
            }
            let index = state.step_index;
            // Destinations (issue 14): a hold parks the run (waiting, no attempt
            // recorded, lease released); it resumes by itself.
            let permit = match crate::destinations::admit_step(
                &self.registry.gate,
                step,
                &ctx,
                &run,
            )
            .await
            {
                Some(crate::destinations::gate::Admit::Hold(hold)) => {
                    let at = (index, step.id.as_str());
                    crate::destinations::hold_run(
                        &*self.store,
                        &run,
                        &self.owner,
                        &trace,
                        at,
                        &hold,
                    )
                    .await?;
                    return Ok(());
                }
                Some(crate::destinations::gate::Admit::Go(permit)) => Some(permit),
                None => None,
            };
            let before = state.clone();
            let (attempt, update, done) = self
                .attempt(
                    &run, &trace, wf, step, &mut state, &ctx, &secrets, &masker, permit,
                )
                .await;
            let Some((attempt, update)) = self.save_attempt(&run, &before, attempt, update).await?
            else {
                return Ok(());
            };
            self.observe(&run, &trace, index, &attempt, &update).await;
            if done || update.status.is_final() {
                return Ok(());
            }
        }
        let update = state.succeeded();
        if self.save(&run, None, &update).await? {
            self.finished(&run, &trace, &update);
        }
        Ok(())
    }

    /// Ends the run as failed for `why` (if its lease still holds).
    async fn end_failed(
        &self,
        run: &Run,
        trace: &RunTrace,
        state: &RunState,
        why: String,
    ) -> Result<(), crate::store::StoreError> {
        let update = state.failed(why);
        if self.save(run, None, &update).await? {
            self.finished(run, trace, &update);
        }
        Ok(())
    }

    /// A step's `if`: true goes on to the step; false skips it (saved, with a
    /// span for the skipped step); an error fails the run.
    #[allow(clippy::too_many_arguments)]
    async fn condition(
        &self,
        run: &Run,
        trace: &RunTrace,
        wf: &Workflow,
        step: &Step,
        cond: &str,
        ctx: &Value,
        masker: &http::Masker,
        state: &mut RunState,
    ) -> Result<StepFlow, crate::store::StoreError> {
        // Conditions see the real values (they yield booleans).
        let (skipped, error) = match template::truthy(cond, ctx) {
            Ok(true) => return Ok(StepFlow::Go),
            Ok(false) => (true, None),
            Err(e) => (false, Some(e)),
        };
        let index = state.step_index;
        let update = match &error {
            None => {
                state
                    .results
                    .insert(step.id.clone(), json!({"skipped": true}));
                state.step_index += 1;
                state.attempt = 0;
                state.at(wf);
                state.running()
            }
            Some(e) => state.failed(masker.text(&format!("step `{}`: `if` failed: {e}", step.id))),
        };
        if !self.save(run, None, &update).await? {
            return Ok(StepFlow::Stop);
        }
        let end = StepEnd {
            index,
            step_id: &step.id,
            started: now(),
            attempts: 0,
            skipped,
            error: update.last_error.clone().filter(|_| error.is_some()),
        };
        trace.emit_step(run, end);
        if error.is_some() {
            self.finished(run, trace, &update);
            return Ok(StepFlow::Stop);
        }
        Ok(StepFlow::Next)
    }

    fn context(
        &self,
        run: &Run,
        state: &RunState,
        secrets: &HashMap<String, Option<String>>,
    ) -> Value {
        let mut ctx = with_steps(&run.context.0, &state.results, secrets);
        if let Value::Object(map) = &mut ctx {
            map.insert(
                "run".into(),
                json!({"id": run.run_id, "attempt": state.attempt + 1, "workflow": run.workflow}),
            );
        }
        ctx
    }
}

/// The appender leases runs it creates to this engine (its free slots and a
/// queue as deep as the slots) and hands them over here.
impl crate::store::RunHandoff for Engine {
    fn lease(&self) -> Option<crate::store::LocalLease> {
        if self.stop.borrow().is_some() {
            return None; // shutting down: leave new runs to a claim
        }
        // The free run slots, plus a queue as deep as the request slots: at
        // full load a run created here waits in memory for a slot rather than
        // being stored `scheduled` and claimed back (a claim transaction per
        // few runs). A run that waits longer than half its lease is left to a
        // claim ([`backend::RunsBackend`]).
        let max =
            (self.permits.available_permits() + self.concurrency).saturating_sub(self.local.len());
        (max > 0).then(|| crate::store::LocalLease {
            owner: self.owner.clone(),
            lease: LEASE,
            max,
        })
    }

    fn hand_over(&self, runs: Vec<Run>) {
        self.local.push(runs);
    }

    fn take_saves(&self) -> Option<crate::store::saves::SaveQueue> {
        if self.store.shares_commits() {
            self.saver.take()
        } else {
            None
        }
    }
}

/// The template context: `base` (`event`, `conversation`) with `steps` and `secrets`
/// (their real values: requests are rendered once and masked afterwards, see
/// [`http::Masker`]; unset secrets are left out).
pub(crate) fn with_steps(
    base: &Value,
    results: &serde_json::Map<String, Value>,
    secrets: &HashMap<String, Option<String>>,
) -> Value {
    let mut ctx = base.clone();
    if let Value::Object(map) = &mut ctx {
        map.insert("steps".into(), Value::Object(results.clone()));
        let secrets: serde_json::Map<String, Value> = secrets
            .iter()
            .filter_map(|(k, v)| Some((k.clone(), Value::String(v.clone()?))))
            .collect();
        map.insert("secrets".into(), Value::Object(secrets));
    }
    ctx
}

/// Reads the workflow's declared secrets from the environment (`None`: not set).
pub(crate) fn read_secrets(wf: &Workflow) -> HashMap<String, Option<String>> {
    wf.secrets
        .iter()
        .map(|name| (name.clone(), std::env::var(name).ok()))
        .collect()
}

fn hostname() -> String {
    std::env::var("HOSTNAME")
        .ok()
        .filter(|h| !h.is_empty())
        .or_else(|| {
            std::fs::read_to_string("/etc/hostname")
                .ok()
                .map(|h| h.trim().to_owned())
        })
        .unwrap_or_else(|| "switchboard".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_huge_delay_is_capped_not_a_panic() {
        let t = after(Duration::from_secs(300_000 * 366 * 86_400));
        assert_eq!(t.format("%Y").to_string(), "9999");
    }
}
