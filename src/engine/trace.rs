//! The spans of a run: `run` → `step` → `attempt`, in the trace of the
//! webhook that caused the run.
//!
//! A run may be worked on by several processes (after a backoff, a crash
//! or a hand-over), so `run` and `step` cannot be ordinary in-process
//! spans. Their ids are derived from the run id and step, attempts are
//! made as children of those ids, and the `run` and `step` spans are
//! emitted once they finish ([`crate::telemetry::emit_span`]).
//! The `attempt` span is an ordinary `tracing` span (an HTTP client span
//! with the OpenTelemetry HTTP attributes); its context is the outbound
//! `traceparent`, so the receiving service joins the trace.

use std::time::SystemTime;

use chrono::{DateTime, Utc};
use opentelemetry::KeyValue;
use opentelemetry::trace::SpanContext;
use tracing::Span;
use tracing::field::Empty;

use super::http;
use crate::store::runs::Run;
use crate::telemetry::{self, EmittedSpan};

/// How a step ended, for its span.
pub struct StepEnd<'a> {
    pub index: i64,
    pub step_id: &'a str,
    /// When its first attempt began (or when it was skipped).
    pub started: DateTime<Utc>,
    pub attempts: i64,
    pub skipped: bool,
    /// Why it failed for good.
    pub error: Option<String>,
}

/// The trace context of one run.
pub struct RunTrace {
    /// The `dispatch` span that created the run (or a derived root).
    parent: SpanContext,
    /// The `run` span's own context (derived id).
    run: SpanContext,
    ids: Vec<KeyValue>,
}

impl RunTrace {
    pub fn new(run: &Run) -> Self {
        let parent = telemetry::run_parent(run.trace_context.as_deref(), &run.event_id);
        let own = telemetry::child_context(
            &parent,
            telemetry::derived_span_id(&format!("run:{}", run.run_id)),
        );
        let event = &run.context.0["event"];
        let mut ids = vec![
            KeyValue::new("operator.event.id", run.event_id.clone()),
            KeyValue::new("switchboard.workflow", run.workflow.clone()),
            KeyValue::new("switchboard.run.id", run.run_id.clone()),
        ];
        if let Some(c) = &run.conversation_id {
            ids.push(KeyValue::new("operator.conversation.id", c.clone()));
        }
        if let Some(a) = event["agent_id"].as_str() {
            ids.push(KeyValue::new("operator.agent.id", a.to_owned()));
        }
        Self {
            parent,
            run: own,
            ids,
        }
    }

    /// The trace the run belongs to, even when spans are not exported.
    pub fn root(&self) -> &SpanContext {
        &self.parent
    }

    fn step_context(&self, run: &Run, index: i64, step_id: &str) -> SpanContext {
        telemetry::child_context(
            &self.run,
            telemetry::derived_span_id(&format!("step:{}:{index}:{step_id}", run.run_id)),
        )
    }

    /// The live span of one HTTP attempt, a child of its step.
    pub fn attempt_span(
        &self,
        run: &Run,
        index: i64,
        step_id: &str,
        attempt: i64,
        request: &http::Prepared,
    ) -> Span {
        let span = client_span(request, step_id, attempt);
        span.record("operator.event.id", run.event_id.as_str());
        if let Some(c) = &run.conversation_id {
            span.record("operator.conversation.id", c.as_str());
        }
        if let Some(a) = run.context.0["event"]["agent_id"].as_str() {
            span.record("operator.agent.id", a);
        }
        span.record("switchboard.workflow", run.workflow.as_str());
        span.record("switchboard.run.id", run.run_id.as_str());
        telemetry::set_parent_context(&span, &self.step_context(run, index, step_id));
        span
    }

    /// Destinations (issue 14): an attempt held by its destination, as a
    /// short `attempt.held` span (child of its step) with a `held` event that
    /// names the destination, the reason and when the run tries again.
    pub fn held(
        &self,
        run: &Run,
        index: i64,
        step_id: &str,
        destination: &str,
        reason: &str,
        until: DateTime<Utc>,
    ) {
        if !telemetry::tracing_enabled() {
            return;
        }
        let span = tracing::info_span!(
            "attempt.held",
            switchboard.run.id = run.run_id.as_str(),
            switchboard.step = step_id,
            switchboard.destination = destination,
            switchboard.held.reason = reason,
        );
        telemetry::set_parent_context(&span, &self.step_context(run, index, step_id));
        tracing::info!(parent: &span, destination, reason, until = %until.to_rfc3339(), "held");
    }

    /// Emits a finished step (`error` when the step failed for good).
    pub fn emit_step(&self, run: &Run, end: StepEnd<'_>) {
        self.emit_step_with(run, end, Vec::new());
    }

    /// [`Self::emit_step`] with more attributes (a wait step's: see `super::wait`).
    pub fn emit_step_with(&self, run: &Run, end: StepEnd<'_>, extra: Vec<KeyValue>) {
        if !telemetry::tracing_enabled() {
            return;
        }
        let StepEnd {
            index,
            step_id,
            started,
            attempts,
            skipped,
            error,
        } = end;
        let mut attributes = self.ids.clone();
        attributes.extend([
            KeyValue::new("switchboard.step", step_id.to_owned()),
            KeyValue::new("switchboard.step.index", index),
            KeyValue::new("switchboard.step.attempts", attempts),
            KeyValue::new("switchboard.step.skipped", skipped),
        ]);
        attributes.extend(extra);
        telemetry::emit_span(EmittedSpan {
            name: "step".into(),
            context: self.step_context(run, index, step_id),
            parent: self.run.span_id(),
            start: started.into(),
            end: SystemTime::now(),
            attributes,
            error,
        });
    }

    /// Emits the finished run.
    pub fn emit_run(&self, run: &Run, status: &str, attempts: i64, error: Option<String>) {
        if !telemetry::tracing_enabled() {
            return;
        }
        let mut attributes = self.ids.clone();
        attributes.extend([
            KeyValue::new("switchboard.run.status", status.to_owned()),
            KeyValue::new("switchboard.run.attempts", attempts),
        ]);
        if let Some(of) = &run.replay_of {
            attributes.push(KeyValue::new("switchboard.run.replay_of", of.clone()));
        }
        telemetry::emit_span(EmittedSpan {
            name: "run".into(),
            context: self.run.clone(),
            parent: self.parent.span_id(),
            start: run.created_at.into(),
            end: SystemTime::now(),
            attributes,
            error,
        });
    }
}

/// An `attempt` span: one outbound HTTP request (a client span with the
/// OpenTelemetry HTTP attributes; the URL as recorded, secrets masked).
/// Child of the current span unless given another parent.
pub fn client_span(request: &http::Prepared, step_id: &str, attempt: i64) -> Span {
    let shown = reqwest::Url::parse(&request.shown_url).ok();
    tracing::info_span!(
        "attempt",
        otel.kind = "client",
        otel.status_code = Empty,
        http.request.method = request.real.method.as_str(),
        url.full = request.shown_url.as_str(),
        server.address = shown.as_ref().and_then(|u| u.host_str()).unwrap_or_default(),
        server.port = request.real.url.port_or_known_default(),
        http.response.status_code = Empty,
        error.type = Empty,
        operator.event.id = Empty,
        operator.conversation.id = Empty,
        operator.agent.id = Empty,
        switchboard.workflow = Empty,
        switchboard.run.id = Empty,
        switchboard.step = step_id,
        switchboard.attempt = attempt,
        switchboard.retry.delay_ms = Empty,
    )
}

/// Records an attempt's result on its span, after the OpenTelemetry HTTP conventions.
pub fn record_result(
    span: &Span,
    result: &Result<http::Response, (http::ErrorClass, String)>,
    failure: Option<&http::Failure>,
) {
    if let Ok(resp) = result {
        span.record("http.response.status_code", resp.status);
    }
    if let Some(f) = failure {
        span.record("otel.status_code", "ERROR");
        // The status code for an HTTP error, else the error class (semantic conventions).
        let error_type = match result {
            Ok(resp) => resp.status.to_string(),
            Err(_) => f.class.as_str().to_owned(),
        };
        span.record("error.type", error_type.as_str());
    }
}
