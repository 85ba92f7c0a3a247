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
//!
//! The deadline bounds the whole request, storing included
//! ([`SetupResponder::respond_to`]): the work (append, lookups, saving the
//! answer) runs in a task of its own; when the deadline passes first, the
//! fallback is answered and the task goes on storing, then records that
//! this fallback is the answer that was sent, and that it was sent first.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chrono::{SubsecRound, Utc};
use serde_json::{Map, Value, json};
use tokio::sync::watch;

use super::http;
use super::{backoff, read_secrets, with_steps};
use crate::operator::envelope::Envelope;
use crate::store::projection::ConversationState;
use crate::store::runs::SetupAnswer;
use crate::store::{AppendOutcome, EventStore, NewEvent};
use crate::workflow::answer::{self, Produced};
use crate::workflow::matching::{EventFacts, base_context};
use crate::workflow::registry::Registry;
use crate::workflow::{Workflow, template};
use tracing::Instrument;
use tracing::field::Empty;

pub use crate::workflow::answer::EMPTY_ANSWER;
/// Memory for cached lookup responses unless configured (`SWITCHBOARD_SETUP_CACHE_BYTES`).
pub const DEFAULT_CACHE_BYTES: usize = 32 * 1024 * 1024;

/// The default `deadline` of a setup workflow.
const DEFAULT_DEADLINE: Duration = Duration::from_secs(2);

/// How many more times (once a second) an event answered at its deadline is
/// appended when the store refuses it.
const STORE_RETRIES: u32 = 30;
/// The longest one store call of the setup path may take: a database that
/// hangs must not keep an answer's task (and its in-flight entry) forever.
const STORE_CALL: Duration = Duration::from_secs(5);

/// `call`, or an `Unavailable` error after [`STORE_CALL`].
async fn bounded<T>(
    call: impl std::future::Future<Output = Result<T, crate::store::StoreError>>,
) -> Result<T, crate::store::StoreError> {
    tokio::time::timeout(STORE_CALL, call)
        .await
        .unwrap_or_else(|_| {
            Err(crate::store::StoreError::Unavailable(format!(
                "no answer from the database within {}",
                humantime::format_duration(STORE_CALL)
            )))
        })
}

/// What a handler does for one setup delivery.
pub enum Slot {
    /// Computes (or loads) the answer and publishes it; the entry leaves the
    /// in-flight table when this guard is dropped, whatever happens.
    Leader(InflightGuard),
    /// Another delivery of the same event is computing it in this process: wait.
    Follower(watch::Receiver<Option<Arc<str>>>),
}

/// The leader's hold on an in-flight entry: publishes the answer, and removes
/// the entry when dropped (also when the work panics or is cancelled), so
/// followers never wait on an entry nobody will finish.
pub struct InflightGuard {
    responder: Arc<SetupResponder>,
    event_id: String,
    tx: watch::Sender<Option<Arc<str>>>,
}

impl InflightGuard {
    /// Publishes the answer to the deliveries waiting for it.
    pub fn publish(&self, body: Arc<str>) {
        let _ = self.tx.send(Some(body));
    }
}

impl Drop for InflightGuard {
    fn drop(&mut self) {
        if let Ok(mut inflight) = self.responder.inflight.lock() {
            inflight.remove(&self.event_id);
        }
    }
}

/// An answer to one setup delivery.
pub struct SetupReply {
    pub body: Arc<str>,
    /// The event was stored before (a retried delivery).
    pub duplicate: bool,
}

/// Appends a delivery (the webhook handler's append, with its spans and metrics).
pub type AppendFn = Arc<
    dyn Fn(
            NewEvent,
        ) -> std::pin::Pin<
            Box<
                dyn std::future::Future<Output = Result<AppendOutcome, crate::store::StoreError>>
                    + Send,
            >,
        > + Send
        + Sync,
>;

/// Where the background work of one setup delivery is, shared with the
/// request waiting for it. Every transition happens under its lock, so the
/// request and the work agree on which answer was sent.
enum Progress {
    Working {
        /// When the request must be answered.
        deadline_at: Instant,
        /// The chosen workflow's fallback, once known.
        fallback: Option<Produced>,
        /// Whether the event is committed.
        committed: bool,
    },
    /// The work finished first: the request answers with this.
    Done(Option<Result<SetupReply, crate::store::StoreError>>),
    /// The deadline came first: this was sent; the work must store it.
    SentEarly {
        body: Arc<str>,
        reason: String,
        workflow: Option<String>,
        /// How long after the arrival it was sent.
        sent_after: Duration,
    },
}

pub struct SetupResponder {
    registry: Arc<Registry>,
    store: Arc<dyn EventStore>,
    client: http::Client,
    cache: Mutex<LookupCache>,
    inflight: Mutex<HashMap<String, watch::Receiver<Option<Arc<str>>>>>,
}

/// One setup event to answer.
pub struct SetupEvent<'a> {
    pub seq: i64,
    /// When the delivery arrived: the deadline counts from here.
    pub started: Instant,
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
            cache: Mutex::new(LookupCache::new(DEFAULT_CACHE_BYTES)),
            inflight: Mutex::default(),
        }
    }

    /// Bounds the lookup cache to `bytes` (default [`DEFAULT_CACHE_BYTES`]).
    pub fn with_cache_bytes(self, bytes: usize) -> Self {
        *self.cache.lock().expect("cache lock") = LookupCache::new(bytes);
        self
    }

    /// Joins the computation of `event_id`'s answer in this process.
    pub fn join(self: &Arc<Self>, event_id: &str) -> Slot {
        let mut inflight = self.inflight.lock().expect("inflight lock");
        if let Some(rx) = inflight.get(event_id) {
            return Slot::Follower(rx.clone());
        }
        let (tx, rx) = watch::channel(None);
        inflight.insert(event_id.to_owned(), rx);
        Slot::Leader(InflightGuard {
            responder: self.clone(),
            event_id: event_id.to_owned(),
            tx,
        })
    }

    /// How long a setup request may take before the answering workflow is
    /// known: the shortest `deadline` among the setup workflows that answer
    /// (2 s, the default, when there are none).
    fn first_deadline(&self) -> Duration {
        let set = self.registry.current();
        answer::answering(&set)
            .map(|w| w.deadline)
            .min()
            .unwrap_or(DEFAULT_DEADLINE)
    }

    /// Answers one `conversation.setup` delivery by its deadline, counted
    /// from `started` (its arrival), whatever the store does: the append,
    /// the lookups and the answer's save run in a task of their own. If the
    /// deadline passes first, the fallback is answered now and the task goes
    /// on: it stores the event, then records this fallback as the answer
    /// sent (and that it was sent before the event or its answer was
    /// stored). Err only when the store refused the event before the deadline.
    pub async fn respond_to(
        self: &Arc<Self>,
        event: NewEvent,
        append: AppendFn,
        started: Instant,
    ) -> Result<SetupReply, crate::store::StoreError> {
        let event_id = event.envelope.id.to_string();
        let first_deadline = started + self.first_deadline();
        match self.join(&event_id) {
            Slot::Follower(rx) => {
                match tokio::time::timeout_at(first_deadline.into(), Self::wait(rx)).await {
                    Ok(Some(body)) => Ok(SetupReply {
                        body,
                        duplicate: true,
                    }),
                    // The leader gave up (its store failed): this delivery tries again.
                    Ok(None) => Box::pin(self.respond_to(event, append, started)).await,
                    Err(_) => Ok(SetupReply {
                        body: self.early_fallback(&event, None).body.into(),
                        duplicate: true,
                    }),
                }
            }
            Slot::Leader(guard) => {
                let progress = Arc::new(Mutex::new(Progress::Working {
                    deadline_at: first_deadline,
                    fallback: None,
                    committed: false,
                }));
                let (done_tx, mut done_rx) = watch::channel(false);
                // Deliveries waiting on this one get the fallback too, once it is sent.
                let publisher = guard.tx.clone();
                let work = self.clone().work(
                    event.clone(),
                    started,
                    append,
                    progress.clone(),
                    guard,
                    done_tx,
                );
                tokio::spawn(work.instrument(tracing::Span::current()));
                loop {
                    let deadline_at = match &*progress.lock().expect("progress lock") {
                        Progress::Working { deadline_at, .. } => *deadline_at,
                        _ => Instant::now(),
                    };
                    let finished =
                        tokio::time::timeout_at(deadline_at.into(), done_rx.wait_for(|d| *d)).await;
                    let mut state = progress.lock().expect("progress lock");
                    match &mut *state {
                        Progress::Done(reply) => {
                            return reply
                                .take()
                                .unwrap_or(Err(crate::store::StoreError::Closed));
                        }
                        Progress::SentEarly { body, .. } => {
                            return Ok(SetupReply {
                                body: body.clone(),
                                duplicate: false,
                            });
                        }
                        Progress::Working {
                            deadline_at: now_due,
                            fallback,
                            committed,
                        } => {
                            if finished.is_ok_and(|r| r.is_err()) {
                                // The work ended without a result (it panicked).
                                return Err(crate::store::StoreError::Closed);
                            }
                            if *now_due > Instant::now() {
                                continue; // the chosen workflow's own deadline is later
                            }
                            let produced = fallback
                                .take()
                                .unwrap_or_else(|| self.early_fallback(&event, None));
                            let reason = format!(
                                "the deadline of {} passed before {}",
                                humantime::format_duration(
                                    now_due.saturating_duration_since(started)
                                ),
                                if *committed {
                                    "the answer was ready and stored: this fallback was sent first"
                                } else {
                                    "the event was stored: this fallback was sent before the event's commit"
                                },
                            );
                            let body: Arc<str> = produced.body.into();
                            tracing::warn!(event_id, "setup answered with the fallback: {reason}");
                            crate::prometheus::setup_fallback(produced.workflow.as_deref());
                            let _ = publisher.send(Some(body.clone()));
                            *state = Progress::SentEarly {
                                body: body.clone(),
                                reason,
                                workflow: produced.workflow,
                                sent_after: started.elapsed(),
                            };
                            return Ok(SetupReply {
                                body,
                                duplicate: false,
                            });
                        }
                    }
                }
            }
        }
    }

    /// The fallback of the workflow that would answer, judged without the
    /// conversation's stored state (when the store has not given it yet).
    fn early_fallback(
        &self,
        event: &NewEvent,
        conversation: Option<&ConversationState>,
    ) -> Produced {
        let set = self.registry.current();
        let event_json: Value = serde_json::from_slice(&event.raw_body).unwrap_or_default();
        let facts = EventFacts {
            envelope: &event.envelope,
            event_json: &event_json,
            before: None,
            after: conversation,
        };
        match answer::choose(&set, &facts) {
            Some(wf) => answer::fallback(wf, &base_context(&facts), String::new()),
            None => Produced::empty(),
        }
    }

    /// The work behind one setup delivery: append, answer (stored or new),
    /// and, when the request was answered early, record what was sent.
    #[allow(clippy::too_many_arguments)]
    async fn work(
        self: Arc<Self>,
        event: NewEvent,
        started: Instant,
        append: AppendFn,
        progress: Arc<Mutex<Progress>>,
        guard: InflightGuard,
        done: watch::Sender<bool>,
    ) {
        let envelope = event.envelope.clone();
        let raw_body = event.raw_body.clone();
        let outcome = self.append_until_stored(&event, &append, &progress).await;
        let finish = |reply: Result<SetupReply, crate::store::StoreError>| {
            let mut state = progress.lock().expect("progress lock");
            match &*state {
                Progress::SentEarly { body, .. } => Some(body.clone()),
                _ => {
                    if let Ok(r) = &reply {
                        guard.publish(r.body.clone());
                    }
                    *state = Progress::Done(Some(reply));
                    let _ = done.send(true);
                    None
                }
            }
        };
        let outcome = match outcome {
            Ok(o) => o,
            Err(e) => {
                finish(Err(e));
                return;
            }
        };
        if let Progress::Working { committed, .. } = &mut *progress.lock().expect("progress lock") {
            *committed = true;
        }
        let setup_event = SetupEvent {
            seq: outcome.event().seq,
            started,
            envelope: &envelope,
            raw_body: &raw_body,
        };
        let sent_early = || {
            matches!(
                &*progress.lock().expect("progress lock"),
                Progress::SentEarly { .. }
            )
        };
        if !sent_early() {
            let reply = self
                .answer(&setup_event, &progress)
                .await
                .map(|body| SetupReply {
                    body,
                    duplicate: outcome.is_duplicate(),
                });
            if finish(reply).is_none() {
                return; // answered in time, with this reply
            }
        }
        // The deadline passed first: record the answer that was sent.
        let (body, reason, workflow, sent_after) = match &*progress.lock().expect("progress lock") {
            Progress::SentEarly {
                body,
                reason,
                workflow,
                sent_after,
            } => (body.clone(), reason.clone(), workflow.clone(), *sent_after),
            _ => return,
        };
        {
            guard.publish(body.clone());
            let record = SetupAnswer {
                event_seq: setup_event.seq,
                event_id: envelope.id.to_string(),
                workflow,
                used_fallback: true,
                reason: Some(reason),
                body: body.to_string(),
                lookups: sqlx::types::Json(Value::Array(Vec::new())),
                duration_ms: sent_after.as_millis() as i64,
                created_at: Utc::now().trunc_subsecs(6),
            };
            // A retried delivery whose answer was stored before keeps that record.
            let recorded = if outcome.is_duplicate() {
                bounded(self.store.save_setup_answer(&record))
                    .await
                    .map(drop)
            } else {
                bounded(self.store.record_sent_setup_answer(&record)).await
            };
            if let Err(e) = recorded {
                tracing::error!(error = %e, event_id = %envelope.id, "the setup answer sent at the deadline could not be recorded; a retried delivery may get a different answer");
            }
        }
    }

    /// Appends the event. Before the request is answered, a failure is
    /// returned (the request answers 503, Operator retries); once the
    /// fallback was sent (200), the write is not abandoned: it is tried again,
    /// once a second, for up to [`STORE_RETRIES`] times.
    async fn append_until_stored(
        &self,
        event: &NewEvent,
        append: &AppendFn,
        progress: &Mutex<Progress>,
    ) -> Result<AppendOutcome, crate::store::StoreError> {
        let mut tries = 0;
        loop {
            let result = append(event.clone()).await;
            let answered = matches!(
                &*progress.lock().expect("progress lock"),
                Progress::SentEarly { .. }
            );
            match result {
                Ok(outcome) => return Ok(outcome),
                Err(e) if answered && tries < STORE_RETRIES => {
                    tries += 1;
                    tracing::warn!(error = %e, event_id = %event.envelope.id, tries, "a setup event answered at its deadline is not stored yet; trying again");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
                Err(e) => {
                    if answered {
                        tracing::error!(error = %e, event_id = %event.envelope.id, "a setup event answered at its deadline could not be stored: it is lost");
                    }
                    return Err(e);
                }
            }
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
    async fn answer(
        &self,
        event: &SetupEvent<'_>,
        progress: &Mutex<Progress>,
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
        self.answer_in(event, &span, progress)
            .instrument(span.clone())
            .await
    }

    async fn answer_in(
        &self,
        event: &SetupEvent<'_>,
        span: &tracing::Span,
        progress: &Mutex<Progress>,
    ) -> Result<Arc<str>, crate::store::StoreError> {
        let stored = bounded(self.store.setup_answer(event.seq)).await.unwrap_or_else(|e| {
            tracing::warn!(error = %e, event_id = %event.envelope.id, "could not read a stored setup answer; computing it");
            None
        });
        if let Some(stored) = stored {
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
        let produced = self.produce(event, &lookups, progress).await;
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
        let body = produced.body.clone();
        let saved = bounded(self.store.save_setup_answer(&SetupAnswer {
            event_seq: event.seq,
            event_id: event.envelope.id.to_string(),
            workflow: produced.workflow,
            used_fallback: produced.fallback_reason.is_some(),
            reason: produced.fallback_reason,
            body: produced.body,
            lookups: sqlx::types::Json(Value::Array(lookups)),
            duration_ms: started.elapsed().as_millis() as i64,
            created_at: Utc::now().trunc_subsecs(6),
        }))
        .await;
        match saved {
            Ok(stored) => Ok(stored.body.into()),
            Err(e) => {
                // The answer is still sent: a failed save must not cost the caller its answer.
                tracing::error!(error = %e, event_id = %event.envelope.id, "the setup answer could not be stored; it is sent anyway, and a retried delivery may get a different answer");
                Ok(body.into())
            }
        }
    }

    async fn produce(
        &self,
        event: &SetupEvent<'_>,
        lookups: &Arc<Mutex<Vec<Value>>>,
        progress: &Mutex<Progress>,
    ) -> Produced {
        let set = self.registry.current();
        if answer::answering(&set).next().is_none() {
            return Produced::empty();
        }
        let event_json: Value = serde_json::from_slice(event.raw_body).unwrap_or_default();
        let conversation = match &event.envelope.conversation_id {
            Some(c) => bounded(self.store.conversation(c.as_str()))
                .await
                .ok()
                .flatten(),
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
        // The workflow's deadline, counted from the request's arrival, now bounds the request.
        let mut deadline_at = Instant::now() + wf.deadline;
        if let Progress::Working {
            deadline_at: request_deadline,
            fallback,
            ..
        } = &mut *progress.lock().expect("progress lock")
        {
            *request_deadline = event.started + wf.deadline;
            deadline_at = deadline_at.min(*request_deadline);
            *fallback = Some(answer::fallback(wf, &base, String::new()));
        }
        match tokio::time::timeout_at(
            deadline_at.into(),
            self.respond(wf, &base, lookups, deadline_at),
        )
        .await
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
                // Destinations (issue 14): an open breaker answers with the fallback at once.
                let permit = crate::destinations::admit_lookup(
                    &self.registry.gate,
                    real.url.as_str(),
                    deadline_at,
                )
                .await
                .map_err(|why| format!("lookup `{}`: {why}", step.id))?;
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
                // Destinations (issue 14): the outcome feeds the breaker and Retry-After pauses.
                if let Some(permit) = permit {
                    permit.report(&crate::destinations::gate::Outcome::of_exchange(&ex));
                }
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
        answer::answer_body(respond, &ctx).map_err(|e| masker.text(&e))
    }

    fn cached(&self, key: &str) -> Option<http::Response> {
        self.cache.lock().expect("cache lock").get(key)
    }

    fn remember(&self, key: String, ttl: Duration, resp: http::Response) {
        self.cache
            .lock()
            .expect("cache lock")
            .insert(key, Instant::now() + ttl, resp);
    }
}

/// Cached lookup responses, bounded by their size in bytes (key, body and
/// headers): expired entries go first, then the oldest inserted.
struct LookupCache {
    capacity: usize,
    used: usize,
    entries: HashMap<String, (Instant, http::Response, usize)>,
    /// Keys in insertion order (a key re-inserted appears again; stale positions are skipped).
    order: std::collections::VecDeque<(String, u64)>,
    generation: u64,
    generations: HashMap<String, u64>,
}

impl LookupCache {
    fn new(capacity: usize) -> Self {
        Self {
            capacity,
            used: 0,
            entries: HashMap::new(),
            order: Default::default(),
            generation: 0,
            generations: HashMap::new(),
        }
    }

    /// What one entry costs: its key, body (twice when it was parsed as
    /// JSON, for the parsed copy) and headers, plus a fixed overhead.
    fn cost(key: &str, resp: &http::Response) -> usize {
        key.len()
            + resp.body.len() * if resp.json.is_some() { 2 } else { 1 }
            + resp
                .headers
                .iter()
                .map(|(k, v)| k.len() + v.len() + 16)
                .sum::<usize>()
            + 128
    }

    fn get(&self, key: &str) -> Option<http::Response> {
        self.entries
            .get(key)
            .filter(|(expires, _, _)| *expires > Instant::now())
            .map(|(_, r, _)| r.clone())
    }

    fn remove(&mut self, key: &str) {
        if let Some((_, _, cost)) = self.entries.remove(key) {
            self.used -= cost;
            self.generations.remove(key);
        }
    }

    fn insert(&mut self, key: String, expires: Instant, resp: http::Response) {
        let cost = Self::cost(&key, &resp);
        self.remove(&key);
        if cost > self.capacity {
            return; // larger than the whole cache: not kept
        }
        if self.used + cost > self.capacity {
            let now = Instant::now();
            let expired: Vec<String> = self
                .entries
                .iter()
                .filter(|(_, (e, _, _))| *e <= now)
                .map(|(k, _)| k.clone())
                .collect();
            for k in expired {
                self.remove(&k);
            }
        }
        while self.used + cost > self.capacity {
            let Some((oldest, generation)) = self.order.pop_front() else {
                break;
            };
            if self.generations.get(&oldest) == Some(&generation) {
                self.remove(&oldest);
            }
        }
        if self.order.len() > 2 * self.entries.len() + 64 {
            let generations = &self.generations;
            self.order.retain(|(k, g)| generations.get(k) == Some(g));
        }
        self.generation += 1;
        self.generations.insert(key.clone(), self.generation);
        self.order.push_back((key.clone(), self.generation));
        self.used += cost;
        self.entries.insert(key, (expires, resp, cost));
    }

    #[cfg(test)]
    fn used(&self) -> usize {
        self.used
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

#[cfg(test)]
mod tests {
    use super::*;

    fn response(body_len: usize) -> http::Response {
        http::Response {
            status: 200,
            headers: Default::default(),
            body: "x".repeat(body_len),
            json: None,
        }
    }

    #[test]
    fn the_lookup_cache_is_bounded_by_bytes_and_drops_the_oldest() {
        let mut cache = LookupCache::new(10_000);
        let later = Instant::now() + Duration::from_secs(60);
        for i in 0..100 {
            cache.insert(format!("k{i}"), later, response(1_000));
            assert!(cache.used() <= 10_000, "{} bytes", cache.used());
        }
        assert!(cache.get("k99").is_some(), "the newest is kept");
        assert!(cache.get("k0").is_none(), "the oldest went first");
        // A response larger than the whole cache is not kept, and evicts nothing.
        cache.insert("huge".into(), later, response(20_000));
        assert!(cache.get("huge").is_none());
        assert!(cache.get("k99").is_some());
        // Re-inserting a key replaces it without counting it twice.
        let used = cache.used();
        cache.insert("k99".into(), later, response(1_000));
        assert_eq!(cache.used(), used);
    }
}
