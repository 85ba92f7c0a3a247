//! Executes `wait` and `wait_for` steps durably: a run that reaches one is
//! parked in the database (status `waiting`, no lease, no worker, nothing in
//! memory) with its wait recorded in `run_waits`
//! ([`crate::store::waits`]); it is claimed again like any due run, at its
//! resume time, at its timeout, or at once when an event matched (matched
//! inside the transaction that appended the event). The claiming worker ends
//! the wait and saves the step's result in one transaction, so a wait ends
//! exactly once across crashes and restarts. The step's span runs from when
//! the run reached the step to when it resumed.

use chrono::{DateTime, Utc};
use opentelemetry::KeyValue;
use serde_json::Value;

use super::trace::{RunTrace, StepEnd};
use super::{Engine, RunState, now};
use crate::store::runs::{Run, RunUpdate};
use crate::store::waits::{FinishWait, NewWait, WaitOutcome};
use crate::workflow::wait::{WaitStep, event_result, timer_result};
use crate::workflow::{Step, Workflow};

/// What the drive loop does after a wait step.
pub(super) enum WaitFlow {
    /// The step is done: go on with the next one (`state` moved past it).
    Next,
    /// The run is parked, ended, or held by another worker: stop driving it.
    Stop,
}

fn at_or_capped(from: DateTime<Utc>, d: std::time::Duration) -> DateTime<Utc> {
    let last = DateTime::from_timestamp(253_402_300_799, 0).expect("a valid time");
    chrono::TimeDelta::from_std(d)
        .ok()
        .and_then(|d| from.checked_add_signed(d))
        .map_or(last, |t| t.min(last))
}

impl Engine {
    /// Runs a wait step of a claimed run: ends its wait if it matched or is
    /// due (saving the result), else parks the run at the step.
    pub(super) async fn wait_step(
        &self,
        run: &Run,
        trace: &RunTrace,
        wf: &Workflow,
        step: &Step,
        wait: &WaitStep,
        state: &mut RunState,
    ) -> Result<WaitFlow, crate::store::StoreError> {
        // A run claimed without a wait reason of a wait step was never parked
        // since (parking sets it, with its `run_waits` row, in one transaction):
        // it reaches the step now, without a look for a wait to end.
        if !matches!(run.wait_reason.as_deref(), Some("timer" | "event")) {
            self.begin(run, step, wait, state).await?;
            return Ok(WaitFlow::Stop);
        }
        let index = state.step_index;
        let before = state.clone();
        // The step's result and the run's next state, built from how the wait ended.
        let next_id = wf.steps.get(index as usize + 1).map(|s| s.id.clone());
        let make = move |outcome: &WaitOutcome| -> RunUpdate {
            let mut s = before.clone();
            let waited_ms = (now() - outcome.wait.started_at).num_milliseconds().max(0);
            let result = match outcome.wait.kind.as_str() {
                "timer" => timer_result(waited_ms),
                _ => event_result(outcome.envelope.clone(), waited_ms),
            };
            s.results.insert(outcome.wait.step_id.clone(), result);
            s.step_index += 1;
            s.attempt = 0;
            s.step_id = next_id.clone();
            if next_id.is_some() {
                s.running()
            } else {
                s.succeeded()
            }
        };
        match self
            .store
            .finish_wait(
                &run.run_id,
                &step.id,
                &self.owner,
                run.lease_token,
                now(),
                &make,
            )
            .await?
        {
            FinishWait::Done(outcome, update) => {
                state.step_index = update.step_index;
                state.step_id = update.step_id.clone();
                state.attempt = 0;
                state.results = update.step_results.as_object().cloned().unwrap_or_default();
                let timed_out = outcome.wait.kind == "event" && outcome.envelope.is_none();
                tracing::info!(
                    run_id = %run.run_id,
                    step = %step.id,
                    matched = outcome.wait.matched_event_id.as_deref().unwrap_or(""),
                    timed_out,
                    "wait ended"
                );
                // One span from when the run reached the step to now (it resumed).
                let mut extra = vec![
                    KeyValue::new("switchboard.wait.kind", outcome.wait.kind.clone()),
                    KeyValue::new("switchboard.wait.timed_out", timed_out),
                ];
                if let Some(id) = &outcome.wait.matched_event_id {
                    extra.push(KeyValue::new("switchboard.wait.event.id", id.clone()));
                }
                trace.emit_step_with(
                    run,
                    StepEnd {
                        index,
                        step_id: &step.id,
                        started: outcome.wait.started_at,
                        attempts: 0,
                        skipped: false,
                        error: None,
                    },
                    extra,
                );
                if update.status.is_final() {
                    self.finished(run, trace, &update);
                    return Ok(WaitFlow::Stop);
                }
                Ok(WaitFlow::Next)
            }
            FinishWait::Pending(_) | FinishWait::LeaseLost => Ok(WaitFlow::Stop),
            FinishWait::NotWaiting => {
                self.begin(run, step, wait, state).await?;
                Ok(WaitFlow::Stop)
            }
        }
    }

    /// Parks the run at its wait step.
    async fn begin(
        &self,
        run: &Run,
        step: &Step,
        wait: &WaitStep,
        state: &RunState,
    ) -> Result<(), crate::store::StoreError> {
        let started = now();
        let new = match wait {
            WaitStep::Timer { duration } => NewWait {
                run_id: run.run_id.clone(),
                step_id: step.id.clone(),
                kind: "timer",
                conversation_id: None,
                event_type: None,
                after_seq: run.event_seq,
                matcher: Value::Null,
                started_at: started,
                until: at_or_capped(started, *duration),
            },
            WaitStep::Event(w) => NewWait {
                run_id: run.run_id.clone(),
                step_id: step.id.clone(),
                kind: "event",
                conversation_id: run.conversation_id.clone(),
                event_type: Some(w.event.clone()),
                after_seq: run.event_seq,
                matcher: serde_json::to_value(w).unwrap_or(Value::Null),
                started_at: started,
                until: at_or_capped(started, w.timeout),
            },
        };
        let update = state.waiting(new.until, new.kind.to_owned());
        match self
            .store
            .begin_wait(&self.owner, run.lease_token, &update, &new, started)
            .await?
        {
            None => {
                tracing::warn!(run_id = %run.run_id, "lost the lease on a run; leaving it to its new worker");
            }
            Some(matched) => {
                tracing::info!(
                    run_id = %run.run_id,
                    step = %step.id,
                    reason = new.kind,
                    until = %new.until,
                    matched_already = matched,
                    "run waiting"
                );
                if matched {
                    self.wake.notify_one();
                }
            }
        }
        Ok(())
    }
}
