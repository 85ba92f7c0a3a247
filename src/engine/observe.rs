//! What the engine tells the outside once a run's progress is saved: the
//! attempt and run metrics (`/metrics`), and the step and run spans (the
//! event's trace), in one place.

use std::time::Duration;

use super::Engine;
use super::trace::{RunTrace, StepEnd};
use crate::store::runs::{Attempt, Run, RunStatus, RunUpdate};

impl Engine {
    /// Metrics and spans after a saved attempt: the attempt is counted; a
    /// step that ended (succeeded, or failed for good) and a run that
    /// ended are emitted.
    pub(super) async fn observe(
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
    pub(super) fn finished(&self, run: &Run, trace: &RunTrace, update: &RunUpdate) {
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
}
