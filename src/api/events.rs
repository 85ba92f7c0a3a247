//! `GET /api/v1/events` and `GET /api/v1/events/{id}`: the stored log, read back;
//! `POST /api/v1/events/{id}/replay`: run an event's workflows again.

use std::sync::Arc;

use chrono::{DateTime, Utc};
use poem::web::Data;
use poem_openapi::param::{Path, Query};
use poem_openapi::payload::Json;
use poem_openapi::{Enum, Object, OpenApi, Tags};

use super::auth::AdminAuth;
use super::error::ApiError;
use super::params::OptionalJson;
use super::runs::ReplayEventRequest;
use crate::store::{EventQuery, EventStore, Order, StoredEvent, StoredEventWithBody};

#[derive(Tags)]
enum EventTags {
    /// The append-only log of verified Operator deliveries.
    Events,
}

/// Reading direction over the global sequence.
#[derive(Enum, Clone, Copy, Debug, Default, PartialEq, Eq)]
#[oai(rename_all = "snake_case")]
pub enum EventOrder {
    #[default]
    NewestFirst,
    OldestFirst,
}

/// The headers a delivery was verified with.
#[derive(Object, Debug)]
pub struct VerificationInfo {
    /// The URL the signature was checked against (`SWITCHBOARD_PUBLIC_URL`, or rebuilt from the request).
    pub signed_url: String,
    /// `X-Timestamp` as received.
    pub timestamp: String,
    /// `X-Signature` as received.
    pub signature: String,
}

/// One stored event.
#[derive(Object, Debug)]
pub struct EventSummary {
    /// Place in the global log: gap-free, increasing in commit order.
    pub sequence: i64,
    /// Operator's event id (`ev_…`).
    pub id: String,
    /// `payload.type`, e.g. `conversation.ended`.
    #[oai(rename = "type")]
    pub event_type: String,
    pub conversation_id: Option<String>,
    /// Place in the conversation's own stream (1, 2, …).
    pub stream_version: Option<i64>,
    /// The agent version (`ca_…@vN`).
    pub agent_id: Option<String>,
    pub livemode: Option<bool>,
    /// `created_at` as Operator sent it.
    pub created_at: Option<String>,
    /// When Switchboard stored it.
    pub received_at: DateTime<Utc>,
    /// `X-Idempotency-Key` of the delivery that stored it.
    pub idempotency_key: String,
}

impl From<StoredEvent> for EventSummary {
    fn from(e: StoredEvent) -> Self {
        Self {
            sequence: e.seq,
            id: e.event_id,
            event_type: e.event_type,
            conversation_id: e.conversation_id,
            stream_version: e.stream_version,
            agent_id: e.agent_id,
            livemode: e.livemode,
            created_at: e.created_at,
            received_at: e.received_at,
            idempotency_key: e.idempotency_key,
        }
    }
}

/// Why a workflow did or did not run for an event.
#[derive(Object, Debug)]
pub struct MatchDecisionView {
    pub workflow: String,
    pub matched: bool,
    /// The condition that failed, when not matched.
    pub reason: Option<String>,
}

/// How a `conversation.setup` event was answered.
#[derive(Object, Debug)]
pub struct SetupAnswerView {
    /// The workflow that answered; absent when none matched (the answer was `{"context": {}}`).
    pub workflow: Option<String>,
    pub used_fallback: bool,
    /// Why the fallback was used: a lookup or template failed, or the deadline passed.
    pub reason: Option<String>,
    /// The answer exactly as sent (and re-sent to retries).
    pub body: serde_json::Value,
    /// Every lookup attempt: request (secrets masked), status, error class, duration; `cached` when served from the cache.
    pub lookups: serde_json::Value,
    pub duration_ms: i64,
}

/// One stored event with its body.
#[derive(Object, Debug)]
pub struct EventDetail {
    #[oai(flatten)]
    pub event: EventSummary,
    pub verification: VerificationInfo,
    /// Every workflow on this event type: matched, or why not (decided when the event was stored).
    pub match_decisions: Vec<MatchDecisionView>,
    /// The runs this event started.
    pub runs: Vec<super::runs::RunSummary>,
    /// For conversation.setup: the answer and how it was produced.
    pub setup_answer: Option<SetupAnswerView>,
    /// The body as JSON.
    pub body: serde_json::Value,
    /// The body exactly as received (the signed bytes).
    pub raw_body: String,
}

/// A page of events.
#[derive(Object, Debug)]
pub struct EventPage {
    pub data: Vec<EventSummary>,
    /// Pass as `cursor` to get the next page; absent on the last page.
    pub next_cursor: Option<String>,
}

pub struct EventsApi;

fn parse_cursor(cursor: Option<String>) -> Result<Option<i64>, ApiError> {
    cursor
        .map(|c| c.parse::<i64>().map_err(|_| super::params::bad_cursor(&c)))
        .transpose()
}

#[OpenApi(prefix_path = "/api/v1", tag = "EventTags::Events")]
impl EventsApi {
    /// List stored events, filtered, newest first by default; paginate with `cursor`.
    #[allow(clippy::too_many_arguments)]
    #[oai(path = "/events", method = "get")]
    async fn list_events(
        &self,
        _auth: AdminAuth,
        store: Data<&Arc<dyn EventStore>>,
        /// Only this event type (`payload.type`).
        #[oai(name = "type")]
        event_type: Query<Option<String>>,
        /// Only this conversation.
        conversation_id: Query<Option<String>>,
        /// Only this agent version (`ca_…@vN`).
        agent_id: Query<Option<String>>,
        /// Only events received after this instant (RFC 3339).
        received_after: Query<Option<DateTime<Utc>>>,
        /// Only events received before this instant (RFC 3339).
        received_before: Query<Option<DateTime<Utc>>>,
        /// `next_cursor` of the previous page.
        cursor: Query<Option<String>>,
        /// Reading direction.
        order: Query<Option<EventOrder>>,
        /// Page size, 1 to 500.
        #[oai(
            default = "default_limit",
            validator(minimum(value = "1"), maximum(value = "500"))
        )]
        limit: Query<u32>,
    ) -> Result<Json<EventPage>, ApiError> {
        let query = EventQuery {
            event_type: event_type.0,
            conversation_id: conversation_id.0,
            agent_id: agent_id.0,
            received_after: received_after.0,
            received_before: received_before.0,
            cursor: parse_cursor(cursor.0)?,
            order: match order.0.unwrap_or_default() {
                EventOrder::NewestFirst => Order::NewestFirst,
                EventOrder::OldestFirst => Order::OldestFirst,
            },
            limit: limit.0,
        };
        let events = store.list_events(&query).await?;
        let next_cursor = (events.len() == query.limit as usize)
            .then(|| events.last().map(|e| e.seq.to_string()))
            .flatten();
        Ok(Json(EventPage {
            data: events.into_iter().map(Into::into).collect(),
            next_cursor,
        }))
    }

    /// One event by its Operator id (`ev_…`): raw body, verification headers, match decisions, runs, setup answer.
    #[oai(path = "/events/:id", method = "get")]
    async fn get_event(
        &self,
        _auth: AdminAuth,
        store: Data<&Arc<dyn EventStore>>,
        /// Operator's event id.
        id: Path<String>,
    ) -> Result<Json<EventDetail>, ApiError> {
        let Some(StoredEventWithBody { event, raw_body }) = store.get_event(&id).await? else {
            return Err(ApiError::not_found("event", &id));
        };
        let raw_body = String::from_utf8_lossy(&raw_body).into_owned();
        let body = serde_json::from_str(&raw_body).unwrap_or(serde_json::Value::Null);
        let match_decisions = store
            .decisions(event.seq)
            .await?
            .into_iter()
            .map(|d| MatchDecisionView {
                workflow: d.workflow,
                matched: d.matched,
                reason: d.reason,
            })
            .collect();
        let runs = store
            .list_runs(&crate::store::runs::RunQuery {
                event_id: Some(event.event_id.clone()),
                limit: 500,
                ..Default::default()
            })
            .await?
            .iter()
            .map(Into::into)
            .collect();
        let setup_answer = store
            .setup_answer(event.seq)
            .await?
            .map(|a| SetupAnswerView {
                workflow: a.workflow,
                used_fallback: a.used_fallback,
                reason: a.reason,
                body: serde_json::from_str(&a.body).unwrap_or(serde_json::Value::Null),
                lookups: a.lookups.0,
                duration_ms: a.duration_ms,
            });
        let verification = VerificationInfo {
            signed_url: event.verification.signed_url.clone(),
            timestamp: event.verification.timestamp.clone(),
            signature: event.verification.signature.clone(),
        };
        Ok(Json(EventDetail {
            event: event.into(),
            verification,
            match_decisions,
            runs,
            setup_answer,
            body,
            raw_body,
        }))
    }

    /// Replay one event: a new run (new Idempotency-Keys, marked `replay_of`) for each run it
    /// started, with the context it saw the first time, executing the workflow version loaded
    /// now (`version`); never while a run of the same workflow for it is still in flight.
    #[oai(path = "/events/:id/replay", method = "post")]
    async fn replay_event(
        &self,
        _auth: AdminAuth,
        store: Data<&Arc<dyn EventStore>>,
        wake: Data<&Arc<tokio::sync::Notify>>,
        registry: Data<&Arc<crate::workflow::registry::Registry>>,
        /// Operator's event id (`ev_…`).
        id: Path<String>,
        /// Optional: `{"workflows": [...]}`; no body (or `{}`) replays every run the event started.
        body: OptionalJson<ReplayEventRequest>,
    ) -> Result<Json<Vec<super::runs::ReplayOutcomeView>>, ApiError> {
        if store.get_event(&id).await?.is_none() {
            return Err(ApiError::not_found("event", &id));
        }
        let outcomes = store
            .replay_event(
                &id,
                body.0.and_then(|b| b.workflows).as_deref(),
                false,
                &crate::engine::replay::loaded_versions(&registry.current(), None),
                Utc::now(),
            )
            .await?;
        wake.notify_one();
        Ok(Json(
            outcomes
                .into_iter()
                .map(|o| super::runs::ReplayOutcomeView {
                    workflow: o.workflow,
                    original_run_id: o.original_run_id,
                    new_run_id: o.new_run_id,
                    version: o.version,
                    skipped: o.skipped,
                })
                .collect(),
        ))
    }
}

fn default_limit() -> u32 {
    50
}
