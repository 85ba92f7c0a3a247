//! The run driver's step machine, pure: given a run's state and what
//! happened to a step (an attempt's outcome, a hold), the run's next state,
//! as the [`RunUpdate`] to save. Executing the step (HTTP, in
//! [`super::http`]), saving (batched, [`super::save`]), tracing and metrics
//! live around it in [`super`], never in here.
//!
//! Transitions: a success moves to the next step (`running`, lease kept) or
//! ends the run (`succeeded`); a retryable failure with attempts left
//! schedules the next attempt (`retrying`, due after the backoff, lease
//! released); any other failure ends the run (`failed`); a hold or a wait
//! pauses it (`waiting` with a reason, lease released, no attempt counted);
//! a failed circuit-breaker probe is recorded but not counted, and the run
//! waits (`circuit_open`) for the next probe.

use std::time::Duration;

use chrono::{DateTime, Utc};
use serde_json::Value;

use super::{LEASE, after, backoff, http, now};
use crate::store::runs::{Run, RunStatus, RunUpdate};
use crate::workflow::{Step, Workflow};

/// What one attempt at a step came to.
pub(crate) enum Outcome {
    /// The step's result (what later steps read as `steps.<id>`).
    Succeeded(Value),
    Failed(http::Failure),
}

/// The run's next state after an attempt.
pub(crate) struct Next {
    pub update: RunUpdate,
    /// The attempt's recorded outcome: `succeeded`, `retrying`, `failed` or `probe_failed`.
    pub outcome: &'static str,
    /// The backoff before the next attempt, when there is one.
    pub retry_in: Option<Duration>,
    /// The worker stops driving the run (it ended, or waits for its next attempt).
    pub stop: bool,
}

/// The transition after an attempt at `step` (counted in `state` already);
/// `jitter` in [0, 1) draws the backoff.
pub(crate) fn after_attempt(
    state: &mut RunState,
    wf: &Workflow,
    step: &Step,
    outcome: Outcome,
    jitter: f64,
) -> Next {
    match outcome {
        Outcome::Succeeded(result) => {
            state.results.insert(step.id.clone(), result);
            state.step_index += 1;
            state.attempt = 0;
            state.at(wf);
            let done = state.step_index as usize >= wf.steps.len();
            Next {
                update: if done {
                    state.succeeded()
                } else {
                    state.running()
                },
                outcome: "succeeded",
                retry_in: None,
                stop: done,
            }
        }
        Outcome::Failed(f) if f.retryable && (state.attempt as u32) < step.retry.max_attempts => {
            let delay = backoff::delay(&step.retry, state.attempt as u32, f.retry_after, jitter);
            Next {
                update: state.retrying(after(delay), format!("step `{}`: {}", step.id, f.message)),
                outcome: "retrying",
                retry_in: Some(delay),
                stop: true,
            }
        }
        Outcome::Failed(f) => {
            let why = if f.retryable {
                format!(
                    "step `{}`: {} (after {} attempts)",
                    step.id, f.message, state.attempt
                )
            } else {
                format!("step `{}`: {}", step.id, f.message)
            };
            Next {
                update: state.failed(why),
                outcome: "failed",
                retry_in: None,
                stop: true,
            }
        }
    }
}

/// Destinations (issue 14): the attempt was its destination's circuit-breaker
/// probe, it failed, and the breaker opened again until `until`. The probe
/// is the breaker's, not the run's own try: it is recorded (outcome
/// `probe_failed`) but not counted against `max_attempts`, and the run waits
/// (`circuit_open`) for the next probe time instead of retrying or failing.
pub(crate) fn after_failed_probe(
    state: &mut RunState,
    step: &Step,
    f: &http::Failure,
    until: DateTime<Utc>,
) -> Next {
    state.attempt = (state.attempt - 1).max(0);
    Next {
        update: RunUpdate {
            last_error: Some(format!(
                "step `{}`: {} (as its destination's circuit-breaker probe; not counted against max_attempts)",
                step.id, f.message
            )),
            ..state.waiting(until.max(now()), "circuit_open".into())
        },
        outcome: "probe_failed",
        retry_in: None,
        stop: true,
    }
}

/// The mutable part of a run while a worker drives it.
#[derive(Clone)]
pub(crate) struct RunState {
    pub step_index: i64,
    pub step_id: Option<String>,
    pub attempt: i64,
    pub attempts_total: i64,
    pub results: serde_json::Map<String, Value>,
}

impl From<&Run> for RunState {
    fn from(run: &Run) -> Self {
        Self {
            step_index: run.step_index,
            step_id: run.step_id.clone(),
            attempt: run.attempt,
            attempts_total: run.attempts_total,
            results: run.step_results.0.as_object().cloned().unwrap_or_default(),
        }
    }
}

impl RunState {
    /// Records the id of the step at `step_index` (none once past the last).
    pub fn at(&mut self, wf: &Workflow) {
        self.step_id = wf.steps.get(self.step_index as usize).map(|s| s.id.clone());
    }

    fn update(
        &self,
        status: RunStatus,
        next: DateTime<Utc>,
        lease: Option<Duration>,
        error: Option<String>,
    ) -> RunUpdate {
        RunUpdate {
            status,
            step_index: self.step_index,
            step_id: self.step_id.clone(),
            attempt: self.attempt,
            attempts_total: self.attempts_total,
            next_attempt_at: next,
            lease,
            step_results: Value::Object(self.results.clone()),
            last_error: error,
            finished_at: status.is_final().then(now),
            wait_reason: None,
        }
    }

    /// The `Wait` transition: the run pauses, holding no lease and no
    /// worker, and is due again at `until` (a claim takes it then, on any
    /// instance); no attempt is recorded and none is counted.
    pub fn waiting(&self, until: DateTime<Utc>, reason: String) -> RunUpdate {
        RunUpdate {
            wait_reason: Some(reason),
            ..self.update(RunStatus::Waiting, until, None, None)
        }
    }

    pub fn running(&self) -> RunUpdate {
        self.update(RunStatus::Running, now(), Some(LEASE), None)
    }

    pub fn succeeded(&self) -> RunUpdate {
        self.update(RunStatus::Succeeded, now(), None, None)
    }

    pub fn retrying(&self, at: DateTime<Utc>, error: String) -> RunUpdate {
        self.update(RunStatus::Retrying, at, None, Some(error))
    }

    pub fn failed(&self, error: String) -> RunUpdate {
        self.update(RunStatus::Failed, now(), None, Some(error))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn workflow(steps: usize) -> Workflow {
        let mut yaml = String::from("on:\n  event: conversation.ended\nsteps:\n");
        for i in 0..steps {
            yaml.push_str(&format!(
                "  - id: s{i}\n    http:\n      url: \"https://example.com/{i}\"\n    retry:\n      max_attempts: 2\n"
            ));
        }
        crate::workflow::compile::compile(std::path::Path::new("w.yaml"), &yaml)
            .map(|(wf, _)| wf)
            .expect("compiles")
    }

    fn fresh() -> RunState {
        RunState {
            step_index: 0,
            step_id: Some("s0".into()),
            attempt: 1,
            attempts_total: 1,
            results: Default::default(),
        }
    }

    fn failure(retryable: bool) -> Outcome {
        Outcome::Failed(http::Failure {
            class: http::ErrorClass::Http5xx,
            message: "HTTP 503".into(),
            retryable,
            retry_after: None,
        })
    }

    #[test]
    fn a_success_moves_on_keeping_the_lease_and_the_last_one_ends_the_run() {
        let wf = workflow(2);
        let mut state = fresh();
        let next = after_attempt(
            &mut state,
            &wf,
            &wf.steps[0],
            Outcome::Succeeded(Value::Null),
            0.5,
        );
        assert_eq!((next.outcome, next.stop), ("succeeded", false));
        assert_eq!(next.update.status, RunStatus::Running);
        assert_eq!(next.update.lease, Some(LEASE));
        assert_eq!(next.update.step_id.as_deref(), Some("s1"));
        assert_eq!(next.update.attempt, 0);
        state.attempt = 1;
        let next = after_attempt(
            &mut state,
            &wf,
            &wf.steps[1],
            Outcome::Succeeded(Value::Null),
            0.5,
        );
        assert_eq!((next.outcome, next.stop), ("succeeded", true));
        assert_eq!(next.update.status, RunStatus::Succeeded);
        assert_eq!(next.update.lease, None);
        assert!(next.update.finished_at.is_some());
    }

    #[test]
    fn a_retryable_failure_retries_until_max_attempts_then_fails() {
        let wf = workflow(1);
        let mut state = fresh();
        let next = after_attempt(&mut state, &wf, &wf.steps[0], failure(true), 0.5);
        assert_eq!((next.outcome, next.stop), ("retrying", true));
        assert_eq!(next.update.status, RunStatus::Retrying);
        assert_eq!(
            next.update.lease, None,
            "the lease is released while it waits"
        );
        assert!(next.retry_in.is_some());
        assert!(next.update.next_attempt_at > now());
        state.attempt = 2;
        let next = after_attempt(&mut state, &wf, &wf.steps[0], failure(true), 0.5);
        assert_eq!(next.outcome, "failed");
        assert_eq!(next.update.status, RunStatus::Failed);
        assert_eq!(
            next.update.last_error.as_deref(),
            Some("step `s0`: HTTP 503 (after 2 attempts)")
        );
    }

    #[test]
    fn a_failed_probe_at_the_last_attempt_waits_uncounted_instead_of_failing() {
        let wf = workflow(1);
        let mut state = fresh();
        // max_attempts: 2, and this attempt (the probe, counted in `state` already) was the last.
        state.attempt = 2;
        state.attempts_total = 2;
        let until = now() + chrono::TimeDelta::seconds(5);
        let Outcome::Failed(f) = failure(true) else {
            unreachable!()
        };
        let next = after_failed_probe(&mut state, &wf.steps[0], &f, until);
        assert_eq!((next.outcome, next.stop), ("probe_failed", true));
        assert_eq!(next.update.status, RunStatus::Waiting);
        assert_eq!(next.update.wait_reason.as_deref(), Some("circuit_open"));
        assert_eq!(next.update.next_attempt_at, until);
        assert_eq!(next.update.attempt, 1, "the probe is not counted");
        assert_eq!(next.update.attempts_total, 2, "but it was made");
        assert!(next.update.last_error.unwrap().contains("probe"));
    }

    #[test]
    fn a_permanent_failure_fails_at_once_and_a_wait_releases_the_lease() {
        let wf = workflow(1);
        let mut state = fresh();
        let next = after_attempt(&mut state, &wf, &wf.steps[0], failure(false), 0.5);
        assert_eq!(next.update.status, RunStatus::Failed);
        assert_eq!(
            next.update.last_error.as_deref(),
            Some("step `s0`: HTTP 503")
        );
        let until = now() + chrono::TimeDelta::seconds(60);
        let wait = fresh().waiting(until, "rate_limited".into());
        assert_eq!(wait.status, RunStatus::Waiting);
        assert_eq!(wait.next_attempt_at, until);
        assert_eq!(wait.lease, None);
        assert_eq!(wait.wait_reason.as_deref(), Some("rate_limited"));
        assert_eq!(wait.finished_at, None);
    }
}
