//! One attempt at a step: render the request (secrets read from the
//! environment, masked in the record), take a request slot, send it with its
//! `Idempotency-Key` and `traceparent`, and turn the outcome into the
//! attempt record and the run's next state (the step machine in
//! [`super::driver`]), reporting it to the destination's gate.

use std::collections::HashMap;

use serde_json::{Value, json};
use tracing::Instrument;

use super::driver::{self, RunState};
use super::http::{self, ErrorClass};
use super::trace::RunTrace;
use super::{Engine, now, slots};
use crate::store::runs::{Attempt, Run, RunUpdate};
use crate::workflow::{Step, Workflow};

impl Engine {
    /// Makes one attempt at `step`; returns the attempt record, the run's new
    /// state, and whether the run stops here (for now or for good).
    #[allow(clippy::too_many_arguments)]
    pub(super) async fn attempt(
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
        // A request slot, for the request only (dropped once its response is
        // read): the run's save does not hold it.
        let slot = slots::acquire(&self.requests).await;
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
        drop(slot);
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
