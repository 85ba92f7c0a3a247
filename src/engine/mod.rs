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

pub mod backend;
pub mod backoff;
mod driver;
pub mod http;
mod monitor;
pub mod replay;
pub mod replay_backend;
pub mod save;
pub mod setup;
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
use crate::store::runs::{Attempt, Run, RunStatus, RunUpdate};
use crate::workflow::registry::Registry;
use crate::workflow::{Step, Workflow, template};
use driver::RunState;
use http::ErrorClass;
use trace::{RunTrace, StepEnd};
use tracing::Instrument;

/// How long a claimed run stays with its worker without a renewal.
pub const LEASE: Duration = Duration::from_secs(5);
const RENEW_EVERY: Duration = Duration::from_millis(1500);
/// How often a progress save is tried before the attempt is recorded as a `store` failure.
const SAVE_TRIES: u32 = 3;
const SAVE_RETRY_DELAY: Duration = Duration::from_millis(300);

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
    concurrency: usize,
    /// One permit per run executing now (tower's concurrency limit holds them).
    permits: Arc<Semaphore>,
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
            permits: Arc::new(Semaphore::new(concurrency.max(1))),
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
        let in_flight = self.concurrency - self.permits.available_permits();
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

    /// Drives one claimed run. The lease is renewed inside the run's own
    /// future, so renewal ends with the run, a panic included (a panic is
    /// caught and recorded as the run's failure).
    async fn execute(self: &Arc<Self>, run: Run) {
        let run_id = run.run_id.clone();
        // (A run resumed from a wait at its first step is not a new start.)
        if run.attempts_total == 0 && run.step_index == 0 && run.wait_reason.is_none() {
            crate::prometheus::run_started(&run.workflow);
        }
        // Boxed: spawning moves the future, and a run's is large.
        let work = {
            let me = self.clone();
            let run = run.clone();
            Box::pin(async move { me.drive(run).await })
        };
        // Renews the lease; ends with `true` when the lease is lost (taken over,
        // or not renewed for nearly a whole lease), so the work stops before
        // another worker may send the same step.
        let renew = async {
            let mut renewed = std::time::Instant::now();
            loop {
                tokio::time::sleep(RENEW_EVERY).await;
                match self
                    .store
                    .renew_lease(&run.run_id, &self.owner, run.lease_token, LEASE)
                    .await
                {
                    Ok(true) => renewed = std::time::Instant::now(),
                    Ok(false) => return true,
                    Err(e) => {
                        tracing::warn!(run_id, error = %e, "could not renew lease");
                        if renewed.elapsed() + RENEW_EVERY >= LEASE {
                            return true;
                        }
                    }
                }
            }
        };
        match supervised(work, renew).await {
            Supervised::Done(Ok(())) => {}
            Supervised::Done(Err(e)) => {
                tracing::error!(run_id, error = %e, "run interrupted by a store error; it resumes when its lease lapses");
            }
            Supervised::Panicked(why) => self.fail_on_panic(&run, why).await,
            Supervised::LeaseLost => {
                tracing::warn!(
                    run_id,
                    "lost the lease on a run; stopped working on it (its new worker goes on, with the same Idempotency-Key)"
                );
            }
        }
    }

    /// Records a panic in the engine as the run's failure (as of its last save).
    async fn fail_on_panic(&self, claimed: &Run, why: String) {
        let run = self
            .store
            .get_run(&claimed.run_id)
            .await
            .ok()
            .flatten()
            .unwrap_or_else(|| claimed.clone());
        let trace = RunTrace::new(&run);
        let state = RunState::from(&run);
        let update = state.failed(format!(
            "the engine failed while running step `{}`: {why}",
            state.step_id.as_deref().unwrap_or("?")
        ));
        match self.save(claimed, None, &update).await {
            Ok(true) => self.finished(&run, &trace, &update),
            Ok(false) => {}
            Err(e) => {
                tracing::error!(run_id = %run.run_id, error = %e, "run panicked ({why}) and its failure could not be stored; it resumes when its lease lapses")
            }
        }
    }

    /// Saves progress; false when the lease was lost (another claim has the run).
    async fn save(
        &self,
        run: &Run,
        attempt: Option<&Attempt>,
        update: &RunUpdate,
    ) -> Result<bool, crate::store::StoreError> {
        let mut tries = 0;
        let saved = loop {
            tries += 1;
            let save = crate::store::runs::Save {
                run_id: run.run_id.clone(),
                owner: self.owner.clone(),
                token: run.lease_token,
                attempt: attempt.cloned(),
                update: update.clone(),
            };
            match self.saver.save(save).await {
                Ok(saved) => break saved,
                Err(e) if tries < SAVE_TRIES => {
                    tracing::warn!(run_id = %run.run_id, error = %e, tries, "could not save a run's progress; trying again");
                    tokio::time::sleep(SAVE_RETRY_DELAY * tries).await;
                }
                Err(e) => return Err(e),
            }
        };
        if !saved {
            tracing::warn!(run_id = %run.run_id, "lost the lease on a run; leaving it to its new worker");
        }
        Ok(saved)
    }

    /// Saves an attempt and its outcome. If that keeps failing, the attempt is
    /// recorded as a failure of class `store` (without the response that
    /// could not be stored) and the run fails: a request is never sent again
    /// only because its outcome could not be written. Returns the update
    /// that was saved, or `None` when the lease was lost.
    async fn save_attempt(
        &self,
        run: &Run,
        before: &RunState,
        mut attempt: Attempt,
        update: RunUpdate,
    ) -> Result<Option<(Attempt, RunUpdate)>, crate::store::StoreError> {
        let e = match self.save(run, Some(&attempt), &update).await {
            Ok(true) => return Ok(Some((attempt, update))),
            Ok(false) => return Ok(None),
            Err(e) => e,
        };
        let why = format!(
            "the outcome of the attempt could not be stored ({e}); the request is not sent again"
        );
        tracing::error!(run_id = %run.run_id, step = %attempt.step_id, "{why}");
        attempt.outcome = "failed".into();
        attempt.error_class = Some(ErrorClass::Store.as_str().into());
        attempt.error_message = Some(why.clone());
        attempt.response_headers = None;
        attempt.response_body = None;
        attempt.next_delay_ms = None;
        let mut state = before.clone();
        state.attempt = attempt.attempt;
        state.attempts_total = attempt.number;
        let update = state.failed(format!("step `{}`: {why}", attempt.step_id));
        Ok(self
            .save(run, Some(&attempt), &update)
            .await?
            .then_some((attempt, update)))
    }

    async fn drive(&self, run: Run) -> Result<(), crate::store::StoreError> {
        let set = self.registry.current();
        let trace = RunTrace::new(&run);
        let mut state = RunState::from(&run);
        // The version the run matched: the loaded one when the hash is the same,
        // else the stored one; runs without a version use the workflow loaded under their name.
        let held: Arc<Workflow>;
        let loaded = set.get(&run.workflow);
        let wf: &Workflow = match (&run.version, loaded) {
            (Some(hash), Some(wf)) if &wf.version == hash => wf,
            (Some(hash), _) => match self.stored_version(&run.workflow, hash).await? {
                Ok(wf) => {
                    held = wf;
                    &held
                }
                Err(why) => {
                    let update = state.failed(why);
                    if self.save(&run, None, &update).await? {
                        self.finished(&run, &trace, &update);
                    }
                    return Ok(());
                }
            },
            (None, Some(wf)) => wf,
            (None, None) => {
                let update =
                    state.failed(format!("workflow `{}` is no longer loaded", run.workflow));
                if self.save(&run, None, &update).await? {
                    self.finished(&run, &trace, &update);
                }
                return Ok(());
            }
        };
        // Resume at the step by its id (the index only for runs saved before ids were).
        if let Some(id) = state.step_id.clone() {
            match wf.steps.iter().position(|s| s.id == id) {
                Some(i) => state.step_index = i as i64,
                None => {
                    let update = state.failed(format!(
                        "step `{id}` is no longer in workflow `{}`; the run cannot resume (replay the event to run the workflow as it is now)",
                        run.workflow
                    ));
                    if self.save(&run, None, &update).await? {
                        self.finished(&run, &trace, &update);
                    }
                    return Ok(());
                }
            }
        }
        state.at(wf);
        let secrets = read_secrets(wf);
        let masker = http::Masker::new(secrets.values().flatten());
        while let Some(step) = wf.steps.get(state.step_index as usize) {
            let ctx = self.context(&run, &state, &secrets);
            if let Some(cond) = &step.condition {
                // Conditions see the real values (they yield booleans).
                match template::truthy(cond, &ctx) {
                    Ok(true) => {}
                    Ok(false) => {
                        state
                            .results
                            .insert(step.id.clone(), json!({"skipped": true}));
                        let index = state.step_index;
                        state.step_index += 1;
                        state.attempt = 0;
                        state.at(wf);
                        if !self.save(&run, None, &state.running()).await? {
                            return Ok(());
                        }
                        trace.emit_step(
                            &run,
                            StepEnd {
                                index,
                                step_id: &step.id,
                                started: now(),
                                attempts: 0,
                                skipped: true,
                                error: None,
                            },
                        );
                        continue;
                    }
                    Err(e) => {
                        let update = state
                            .failed(masker.text(&format!("step `{}`: `if` failed: {e}", step.id)));
                        if self.save(&run, None, &update).await? {
                            trace.emit_step(
                                &run,
                                StepEnd {
                                    index: state.step_index,
                                    step_id: &step.id,
                                    started: now(),
                                    attempts: 0,
                                    skipped: false,
                                    error: update.last_error.clone(),
                                },
                            );
                            self.finished(&run, &trace, &update);
                        }
                        return Ok(());
                    }
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
            // Destinations (issue 14): the gate, right before the attempt. A hold parks the
            // run (waiting, no attempt recorded, lease released); it resumes by itself.
            let permit = match crate::destinations::admit_step(
                &self.registry.gate,
                step,
                &ctx,
                &run,
            )
            .await
            {
                Some(crate::destinations::gate::Admit::Hold(hold)) => {
                    crate::destinations::hold_run(
                        &*self.store,
                        &run,
                        &self.owner,
                        &trace,
                        (index, &step.id),
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

    /// Metrics and spans after a saved attempt: the attempt is counted; a
    /// step that ended (succeeded, or failed for good) and a run that
    /// ended are emitted.
    async fn observe(
        &self,
        run: &Run,
        trace: &RunTrace,
        index: i64,
        attempt: &Attempt,
        update: &RunUpdate,
    ) {
        crate::prometheus::attempt(
            &run.workflow,
            &attempt.outcome,
            attempt.error_class.as_deref(),
            Duration::from_millis(attempt.duration_ms.max(0) as u64),
        );
        let step_ended = update.step_index > index || update.status == RunStatus::Failed;
        if step_ended && crate::telemetry::tracing_enabled() {
            // The step began with its first attempt, maybe in another process.
            let started = if attempt.attempt <= 1 {
                attempt.started_at
            } else {
                self.store
                    .attempts(&run.run_id)
                    .await
                    .ok()
                    .and_then(|all| {
                        all.iter()
                            .filter(|a| a.step_index == index)
                            .map(|a| a.started_at)
                            .min()
                    })
                    .unwrap_or(attempt.started_at)
            };
            let failed = update.status == RunStatus::Failed;
            trace.emit_step(
                run,
                StepEnd {
                    index,
                    step_id: &attempt.step_id,
                    started,
                    attempts: attempt.attempt,
                    skipped: false,
                    error: update.last_error.clone().filter(|_| failed),
                },
            );
        }
        if update.status.is_final() {
            self.finished(run, trace, update);
        }
    }

    /// A run reached a final state: count it and emit its span; a failure
    /// is logged once, at WARN, with its cause (secrets masked, by name only).
    fn finished(&self, run: &Run, trace: &RunTrace, update: &RunUpdate) {
        if update.status == RunStatus::Failed {
            tracing::warn!(
                run_id = %run.run_id,
                workflow = %run.workflow,
                step = update.step_id.as_deref().unwrap_or("-"),
                error = update.last_error.as_deref().unwrap_or(""),
                "run failed: {}",
                update.last_error.as_deref().unwrap_or("")
            );
        }
        crate::prometheus::run_finished(&run.workflow, update.status.as_str());
        trace.emit_run(
            run,
            update.status.as_str(),
            update.attempts_total,
            update.last_error.clone(),
        );
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

    /// Makes one attempt at `step`; returns the attempt record, the run's new
    /// state, and whether the run stops here (for now or for good).
    #[allow(clippy::too_many_arguments)]
    async fn attempt(
        &self,
        run: &Run,
        trace: &RunTrace,
        wf: &Workflow,
        step: &Step,
        state: &mut RunState,
        ctx: &Value,
        secrets: &HashMap<String, Option<String>>,
        masker: &http::Masker,
        permit: Option<crate::destinations::gate::Permit>,
    ) -> (Attempt, RunUpdate, bool) {
        state.attempt += 1;
        state.attempts_total += 1;
        let started = now();
        let mut record = Attempt {
            run_id: run.run_id.clone(),
            number: state.attempts_total,
            step_index: state.step_index,
            step_id: step.id.clone(),
            attempt: state.attempt,
            started_at: started,
            duration_ms: 0,
            request: sqlx::types::Json(Value::Null),
            response_status: None,
            response_headers: None,
            response_body: None,
            outcome: String::new(),
            error_class: None,
            error_message: None,
            next_delay_ms: None,
        };
        let mut missing: Vec<&str> = secrets
            .iter()
            .filter(|(_, v)| v.is_none())
            .map(|(k, _)| k.as_str())
            .collect();
        missing.sort_unstable();
        let prepared = if let Some(name) = missing.first() {
            Err(http::Failure {
                class: ErrorClass::Secret,
                message: format!(
                    "secret {name} is declared but its environment variable is not set"
                ),
                retryable: false,
                retry_after: None,
            })
        } else {
            // Rendered once, with the real values; only the record is masked.
            http::prepare(&step.http, ctx, masker)
        };
        let prepared = match prepared {
            Ok(p) => p,
            Err(f) => {
                record.outcome = "failed".into();
                record.error_class = Some(f.class.as_str().into());
                record.error_message = Some(f.message.clone());
                let update = state.failed(format!("step `{}`: {}", step.id, f.message));
                return (record, update, true);
            }
        };
        let span = trace.attempt_span(run, state.step_index, &step.id, state.attempt, &prepared);
        let extra = [
            ("idempotency-key", format!("{}:{}", run.run_id, step.id)),
            (
                "traceparent",
                crate::telemetry::outbound_traceparent(&span, trace.root()),
            ),
        ];
        let ex = http::exchange(&self.client, &prepared, &extra, step.timeout, masker)
            .instrument(span.clone())
            .await;
        let _entered = span.enter();
        record.duration_ms = ex.duration_ms;
        record.request = sqlx::types::Json(ex.request);
        if let Some(resp) = &ex.response {
            record.response_status = Some(i64::from(resp.status));
            record.response_headers = Some(sqlx::types::Json(json!(resp.headers)));
            record.response_body = Some(resp.body.clone());
        }
        let outcome = match ex.failure {
            None => {
                let resp = ex.response.expect("no failure means a response");
                tracing::debug!(run_id = %run.run_id, step = %step.id, status = resp.status, "step succeeded");
                driver::Outcome::Succeeded(resp.as_step_result())
            }
            Some(f) => {
                record.error_class = Some(f.class.as_str().into());
                record.error_message = Some(f.message.clone());
                driver::Outcome::Failed(f)
            }
        };
        // Destinations (issue 14): the outcome feeds the breaker and Retry-After pauses;
        // a failed probe is recorded but not counted (the run waits for the next one).
        let reported = permit
            .map(|p| p.report(&crate::destinations::gate::Outcome::of_attempt(&record)))
            .unwrap_or_default();
        let next = match (outcome, reported.probe_failed_until) {
            (driver::Outcome::Failed(f), Some(until)) if f.retryable => {
                driver::after_failed_probe(state, step, &f, until)
            }
            (outcome, _) => driver::after_attempt(state, wf, step, outcome, rand::random::<f64>()),
        };
        record.outcome = next.outcome.into();
        if let Some(delay) = next.retry_in {
            record.next_delay_ms = Some(i64::try_from(delay.as_millis()).unwrap_or(i64::MAX));
            span.record(
                "switchboard.retry.delay_ms",
                u64::try_from(delay.as_millis()).unwrap_or(u64::MAX),
            );
            tracing::info!(run_id = %run.run_id, step = %step.id, attempt = state.attempt, error = record.error_class.as_deref().unwrap_or(""), delay = %humantime::format_duration(delay), "attempt failed; retrying");
        }
        (record, next.update, next.stop)
    }
}

/// The appender leases runs it creates to this engine (its free slots and a
/// queue as deep as the slots) and hands them over here.
impl crate::store::RunHandoff for Engine {
    fn lease(&self) -> Option<crate::store::LocalLease> {
        if self.stop.borrow().is_some() {
            return None; // shutting down: leave new runs to a claim
        }
        // The free slots, plus a queue as deep as the slots: at full load a
        // run created here waits in memory for a slot rather than being
        // stored `scheduled` and claimed back (a claim transaction per few
        // runs). A run that waits longer than half its lease is left to a
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

/// Runs `work` in a task of its own with `renew` alongside, and returns its
/// output, or the message of its panic. `renew` ends when `work` ends,
/// however it ends; if `renew` finishes first (the lease is lost), `work`
/// goes on alone (its saves are refused by the fencing token).
/// How a run's work under [`supervised`] ended.
enum Supervised<T> {
    Done(T),
    Panicked(String),
    /// The renewal lost the lease: the work was stopped.
    LeaseLost,
}

async fn supervised<T: Send + 'static>(
    work: impl std::future::Future<Output = T> + Send + 'static,
    renew: impl std::future::Future<Output = bool>,
) -> Supervised<T> {
    // Aborted if this future is dropped (the monitor drops runs still going past the grace).
    let mut task = AbortOnDrop(tokio::spawn(work));
    let task = &mut task.0;
    tokio::pin!(renew);
    let mut renewing = true;
    let joined = loop {
        tokio::select! {
            joined = &mut *task => break joined,
            lost = &mut renew, if renewing => {
                renewing = false;
                if lost {
                    task.abort();
                    let _ = (&mut *task).await;
                    return Supervised::LeaseLost;
                }
            }
        }
    };
    match joined {
        Ok(v) => Supervised::Done(v),
        Err(e) => Supervised::Panicked(match e.try_into_panic() {
            Ok(p) => p
                .downcast_ref::<&str>()
                .map(|s| (*s).to_owned())
                .or_else(|| p.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "a panic".into()),
            Err(e) => e.to_string(),
        }),
    }
}

/// Aborts the task when dropped.
struct AbortOnDrop<T>(tokio::task::JoinHandle<T>);

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
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
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[tokio::test]
    async fn renewal_ends_with_the_run_and_a_panic_is_caught() {
        let renewals = Arc::new(AtomicUsize::new(0));
        let counter = renewals.clone();
        let renew = async move {
            loop {
                counter.fetch_add(1, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(5)).await;
                if counter.load(Ordering::SeqCst) == usize::MAX {
                    return false;
                }
            }
        };
        let work = async {
            tokio::time::sleep(Duration::from_millis(50)).await;
            let _ = after(Duration::MAX);
            panic!("boom in step");
        };
        let outcome: Supervised<()> = supervised(work, renew).await;
        assert!(matches!(&outcome, Supervised::Panicked(why) if why == "boom in step"));
        let seen = renewals.load(Ordering::SeqCst);
        assert!(seen > 1, "renewed while the run worked");
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(
            renewals.load(Ordering::SeqCst),
            seen,
            "renewal outlived the run"
        );
    }

    #[tokio::test]
    async fn a_lost_lease_stops_the_work() {
        let stopped = Arc::new(AtomicUsize::new(0));
        struct Flag(Arc<AtomicUsize>);
        impl Drop for Flag {
            fn drop(&mut self) {
                self.0.fetch_add(1, Ordering::SeqCst);
            }
        }
        let flag = Flag(stopped.clone());
        let work = async move {
            let _flag = flag;
            tokio::time::sleep(Duration::from_secs(30)).await; // an HTTP call in flight
        };
        let renew = async {
            tokio::time::sleep(Duration::from_millis(20)).await;
            true // another worker took the run over
        };
        let outcome = supervised(work, renew).await;
        assert!(matches!(outcome, Supervised::LeaseLost));
        assert_eq!(stopped.load(Ordering::SeqCst), 1, "the work was dropped");
    }

    #[test]
    fn a_huge_delay_is_capped_not_a_panic() {
        let t = after(Duration::from_secs(300_000 * 366 * 86_400));
        assert_eq!(t.format("%Y").to_string(), "9999");
    }
}
