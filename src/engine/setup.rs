//! Answers `conversation.setup` from the setup workflows (those with
//! `respond:`), inline, under a hard deadline.
//!
//! The first workflow (in file-name order) whose `when` holds answers. Its
//! steps are lookups run with the same HTTP action code as runs, retried
//! only within the deadline; its `respond` is rendered with their results.
//! When a lookup or a template fails, or the deadline passes, `fallback`
//! (or `{"context": {}}`) is sent at once. Each answer is stored with its
//! event, so a retried delivery gets the same bytes without new lookups;
//! a retry that arrives while the first is still computing waits for it.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chrono::{SubsecRound, Utc};
use serde_json::{Map, Value, json};
use tokio::sync::watch;

use super::http;
use super::{backoff, read_secrets, with_steps};
use crate::store::EventStore;
use crate::store::runs::SetupAnswer;
use crate::webhook::envelope::Envelope;
use crate::workflow::answer::{self, Produced};
use crate::workflow::matching::{EventFacts, base_context};
use crate::workflow::registry::Registry;
use crate::workflow::{Workflow, template};
use tracing::Instrument;
use tracing::field::Empty;

pub use crate::workflow::answer::EMPTY_ANSWER;
const CACHE_CAPACITY: usize = 10_000;

/// What a handler does for one setup delivery.
pub enum Slot {
    /// Computes (or loads) the answer and publishes it.
    Leader(watch::Sender<Option<Arc<str>>>),
    /// Another delivery of the same event is computing it in this process: wait.
    Follower(watch::Receiver<Option<Arc<str>>>),
}

pub struct SetupResponder {
    registry: Arc<Registry>,
    store: Arc<dyn EventStore>,
    client: http::Client,
    cache: Mutex<HashMap<String, (Instant, http::Response)>>,
    inflight: Mutex<HashMap<String, watch::Receiver<Option<Arc<str>>>>>,
}

/// One setup event to answer.
pub struct SetupEvent<'a> {
    pub seq: i64,
    pub envelope: &'a Envelope,
    pub raw_body: &'a [u8],
}

impl SetupResponder {
    pub fn new(registry: Arc<Registry>, store: Arc<dyn EventStore>) -> Self {
        let client = http::client();
        Self {
            registry,
            store,
            client,
            cache: Mutex::default(),
            inflight: Mutex::default(),
        }
    }

    /// Joins the computation of `event_id`'s answer in this process.
    pub fn join(&self, event_id: &str) -> Slot {
        let mut inflight = self.inflight.lock().expect("inflight lock");
        if let Some(rx) = inflight.get(event_id) {
            return Slot::Follower(rx.clone());
        }
        let (tx, rx) = watch::channel(None);
        inflight.insert(event_id.to_owned(), rx);
        Slot::Leader(tx)
    }

    /// Publishes the answer (or gives up, with `None`) and leaves the slot.
    pub fn finish(
        &self,
        event_id: &str,
        tx: watch::Sender<Option<Arc<str>>>,
        body: Option<Arc<str>>,
    ) {
        self.inflight
            .lock()
            .expect("inflight lock")
            .remove(event_id);
        if body.is_some() {
            let _ = tx.send(body);
        }
    }

    /// Waits for the leader's answer; `None` if the leader gave up.
    pub async fn wait(mut rx: watch::Receiver<Option<Arc<str>>>) -> Option<Arc<str>> {
        loop {
            if let Some(body) = rx.borrow().clone() {
                return Some(body);
            }
            rx.changed().await.ok()?;
        }
    }

    /// The stored answer, or a new one computed and stored (the first stored wins).
    pub async fn answer(
        &self,
        event: &SetupEvent<'_>,
    ) -> Result<Arc<str>, crate::store::StoreError> {
        let span = tracing::info_span!(
            "setup",
            operator.event.id = %event.envelope.id,
            operator.conversation.id = event.envelope.conversation_id.as_ref().map(|c| c.as_str()),
            operator.agent.id = event.envelope.agent_id.as_ref().map(|a| a.as_str()),
            switchboard.workflow = Empty,
            switchboard.setup.deadline_ms = Empty,
            switchboard.setup.fallback = Empty,
            switchboard.setup.reason = Empty,
            switchboard.setup.stored = Empty,
        );
        self.answer_in(event, &span).instrument(span.clone()).await
    }

    async fn answer_in(
        &self,
        event: &SetupEvent<'_>,
        span: &tracing::Span,
    ) -> Result<Arc<str>, crate::store::StoreError> {
        if let Some(stored) = self.store.setup_answer(event.seq).await? {
            // Computed before (in the event's own commit, or by an earlier delivery).
            span.record("switchboard.setup.stored", true);
            if let Some(w) = &stored.workflow {
                span.record("switchboard.workflow", w.as_str());
            }
            span.record("switchboard.setup.fallback", stored.used_fallback);
            return Ok(stored.body.into());
        }
        let started = Instant::now();
        let lookups = Arc::new(Mutex::new(Vec::new()));
        let produced = self.produce(event, &lookups).await;
        let lookups = std::mem::take(&mut *lookups.lock().expect("lookups lock"));
        if let Some(w) = &produced.workflow {
            span.record("switchboard.workflow", w.as_str());
        }
        span.record(
            "switchboard.setup.fallback",
            produced.fallback_reason.is_some(),
        );
        if let Some(reason) = &produced.fallback_reason {
            span.record("switchboard.setup.reason", reason.as_str());
            tracing::warn!(event_id = %event.envelope.id, workflow = produced.workflow.as_deref().unwrap_or("-"), "setup answered with the fallback: {reason}");
            crate::prometheus::setup_fallback(produced.workflow.as_deref());
        }
        let saved = self
            .store
            .save_setup_answer(&SetupAnswer {
                event_seq: event.seq,
                event_id: event.envelope.id.to_string(),
                workflow: produced.workflow,
                used_fallback: produced.fallback_reason.is_some(),
                reason: produced.fallback_reason,
                body: produced.body,
                lookups: sqlx::types::Json(Value::Array(lookups)),
                duration_ms: started.elapsed().as_millis() as i64,
                created_at: Utc::now().trunc_subsecs(6),
            })
            .await;
        Ok(saved?.body.into())
    }

    async fn produce(&self, event: &SetupEvent<'_>, lookups: &Arc<Mutex<Vec<Value>>>) -> Produced {
        let set = self.registry.current();
        if answer::answering(&set).next().is_none() {
            return Produced::empty();
        }
        let event_json: Value = serde_json::from_slice(event.raw_body).unwrap_or_default();
        let conversation = match &event.envelope.conversation_id {
            Some(c) => self.store.conversation(c.as_str()).await.ok().flatten(),
            None => None,
        };
        let facts = EventFacts {
            envelope: event.envelope,
            event_json: &event_json,
            before: None,
            after: conversation.as_ref(),
        };
        let Some(wf) = answer::choose(&set, &facts) else {
            return Produced::empty();
        };
        let base = base_context(&facts);
        tracing::Span::current().record(
            "switchboard.setup.deadline_ms",
            wf.deadline.as_millis() as u64,
        );
        let deadline_at = Instant::now() + wf.deadline;
        match tokio::time::timeout(wf.deadline, self.respond(wf, &base, lookups, deadline_at)).await
        {
            Ok(Ok(body)) => Produced {
                workflow: Some(wf.name.clone()),
                body,
                fallback_reason: None,
            },
            Ok(Err(reason)) => answer::fallback(wf, &base, reason),
            Err(_) => answer::fallback(
                wf,
                &base,
                format!(
                    "the deadline of {} passed",
                    humantime::format_duration(wf.deadline)
                ),
            ),
        }
    }

    /// Runs the lookups, then renders `respond`. Err: why the fallback is needed.
    async fn respond(
        &self,
        wf: &Workflow,
        base: &Value,
        lookups: &Arc<Mutex<Vec<Value>>>,
        deadline_at: Instant,
    ) -> Result<String, String> {
        let secrets = read_secrets(wf);
        if let Some((name, _)) = secrets.iter().find(|(_, v)| v.is_none()) {
            return Err(format!(
                "secret {name} is declared but its environment variable is not set"
            ));
        }
        let masker = http::Masker::new(secrets.values().flatten());
        let mut results = Map::new();
        for step in &wf.steps {
            let ctx = with_steps(base, &results, &secrets);
            if let Some(cond) = &step.condition
                && !template::truthy(cond, &ctx)
                    .map_err(|e| masker.text(&format!("step `{}`: {e}", step.id)))?
            {
                results.insert(step.id.clone(), json!({"skipped": true}));
                continue;
            }
            let prepared = http::prepare(&step.http, &ctx, &masker)
                .map_err(|f| format!("step `{}`: {}", step.id, f.message))?;
            let real = &prepared.real;
            let record = masker.value(&real.record(&[]));
            let cache_key = step.cache.map(|_| {
                format!(
                    "{}\n{}\n{:?}\n{:?}",
                    real.method, real.url, real.headers, real.body
                )
            });
            if let Some(key) = &cache_key
                && let Some(resp) = self.cached(key)
            {
                lookups.lock().expect("lookups lock").push(json!({
                    "step_id": step.id, "attempt": 0, "request": record, "response_status": resp.status, "cached": true,
                }));
                results.insert(step.id.clone(), resp.as_step_result());
                continue;
            }
            let mut attempt = 0u32;
            loop {
                attempt += 1;
                let span = super::trace::client_span(&prepared, &step.id, i64::from(attempt));
                span.record("switchboard.workflow", wf.name.as_str());
                if let Some(id) = base["event"]["id"].as_str() {
                    span.record("operator.event.id", id);
                }
                let extra = [
                    (
                        "idempotency-key",
                        format!(
                            "setup:{}:{}",
                            base["event"]["id"].as_str().unwrap_or_default(),
                            step.id
                        ),
                    ),
                    (
                        "traceparent",
                        crate::telemetry::outbound_traceparent(
                            &span,
                            &crate::telemetry::run_parent(
                                None,
                                base["event"]["id"].as_str().unwrap_or_default(),
                            ),
                        ),
                    ),
                ];
                let ex = http::exchange(&self.client, &prepared, &extra, step.timeout, &masker)
                    .instrument(span.clone())
                    .await;
                lookups.lock().expect("lookups lock").push(json!({
                    "step_id": step.id,
                    "attempt": attempt,
                    "request": ex.request,
                    "response_status": ex.response.as_ref().map(|r| r.status),
                    "response_body": ex.response.as_ref().map(|r| r.body.clone()),
                    "error_class": ex.failure.as_ref().map(|f| f.class.as_str()),
                    "error_message": ex.failure.as_ref().map(|f| f.message.clone()),
                    "duration_ms": ex.duration_ms,
                }));
                let (result, failure) = (ex.response.ok_or(()), ex.failure);
                match (result, failure) {
                    (Ok(resp), None) => {
                        if let Some(key) = cache_key {
                            self.remember(key, step.cache.unwrap_or_default(), resp.clone());
                        }
                        results.insert(step.id.clone(), resp.as_step_result());
                        break;
                    }
                    (_, Some(f))
                        if f.retryable
                            && attempt < step.retry.max_attempts
                            && Instant::now()
                                + retry_delay(&step.retry, attempt, f.retry_after)
                                < deadline_at =>
                    {
                        // Only a retry that can start before the deadline is worth waiting for.
                        tokio::time::sleep(retry_delay(&step.retry, attempt, f.retry_after)).await;
                        tracing::debug!(step = %step.id, attempt, "setup lookup failed ({}); retrying", f.message);
                    }
                    (_, Some(http::Failure { message, .. })) => {
                        return Err(format!("lookup `{}` failed: {message}", step.id));
                    }
                    (Err(_), None) => unreachable!("an error always has a failure"),
                }
            }
        }
        let ctx = with_steps(base, &results, &secrets);
        let respond = wf
            .respond
            .as_ref()
            .ok_or("the workflow has only a fallback")?;
        answer::answer_body(respond, &ctx)
    }

    fn cached(&self, key: &str) -> Option<http::Response> {
        let cache = self.cache.lock().expect("cache lock");
        cache
            .get(key)
            .filter(|(expires, _)| *expires > Instant::now())
            .map(|(_, r)| r.clone())
    }

    fn remember(&self, key: String, ttl: Duration, resp: http::Response) {
        let mut cache = self.cache.lock().expect("cache lock");
        if cache.len() >= CACHE_CAPACITY {
            let now = Instant::now();
            cache.retain(|_, (expires, _)| *expires > now);
            if cache.len() >= CACHE_CAPACITY {
                cache.clear();
            }
        }
        cache.insert(key, (Instant::now() + ttl, resp));
    }
}

/// The backoff before a lookup's next attempt. Lookups use the step's policy
/// without jitter, so the deadline check above and the sleep agree.
fn retry_delay(
    policy: &crate::workflow::RetryPolicy,
    attempt: u32,
    retry_after: Option<Duration>,
) -> Duration {
    backoff::delay(policy, attempt, retry_after, 1.0)
}
