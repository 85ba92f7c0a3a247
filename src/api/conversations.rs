//! Conversations: the projection of each conversation's events, now or as it
//! was at any point of the log (`as_of`), with custom-field history.

use std::collections::BTreeMap;
use std::sync::Arc;

use chrono::{DateTime, Utc};
use poem::web::Data;
use poem_openapi::param::{Path, Query};
use poem_openapi::payload::Json;
use poem_openapi::{Object, OpenApi, Tags};
use serde_json::Value;

use super::auth::AdminAuth;
use super::error::ApiError;
use super::events::EventSummary;
use super::runs::RunSummary;
use crate::operator::envelope::{ENDED_STATUSES, EventKind};
use crate::store::projection::ConversationState;
use crate::store::runs::RunQuery;
use crate::store::{ConversationQuery, EventStore};

#[derive(Tags)]
enum ConversationTags {
    /// Conversations, as folded from their events.
    Conversations,
}

/// A conversation's current state.
#[derive(Object, Debug)]
pub struct ConversationSummary {
    /// `conv_…`.
    pub id: String,
    pub agent_id: Option<String>,
    /// `setup` until `conversation.ended`, then its status (`completed`, `failed`, `busy`, `no-answer`, `voicemail`).
    pub status: Option<String>,
    pub failure_reason: Option<String>,
    pub direction: Option<String>,
    pub channel_type: Option<String>,
    pub livemode: Option<bool>,
    /// Events in its stream.
    pub event_count: i64,
    /// Sequence of its latest event.
    pub last_sequence: i64,
    pub last_received_at: Option<DateTime<Utc>>,
    /// Current custom field values.
    pub custom_fields: BTreeMap<String, Value>,
}

impl From<&ConversationState> for ConversationSummary {
    fn from(s: &ConversationState) -> Self {
        Self {
            id: s.conversation_id.clone(),
            agent_id: s.agent_id.clone(),
            status: s.status.clone(),
            failure_reason: s.failure_reason.clone(),
            direction: s.direction.clone(),
            channel_type: s.channel_type.clone(),
            livemode: s.livemode,
            event_count: s.event_count,
            last_sequence: s.last_seq,
            last_received_at: s.last_received_at,
            custom_fields: s
                .custom_fields
                .iter()
                .map(|(k, v)| (k.clone(), v.value.clone()))
                .collect(),
        }
    }
}

/// One value a custom field took.
#[derive(Object, Debug)]
pub struct FieldChange {
    pub value: Value,
    /// The event that set it.
    pub event_id: String,
    pub sequence: i64,
    /// That event's `created_at`.
    pub created_at: Option<String>,
}

/// A conversation, with its fields' history, events and runs.
#[derive(Object, Debug)]
pub struct ConversationDetail {
    #[oai(flatten)]
    pub conversation: ConversationSummary,
    /// The log position this view is as of (absent: now).
    pub as_of: Option<i64>,
    /// Every value each custom field took, in log order.
    pub custom_field_history: BTreeMap<String, Vec<FieldChange>>,
    /// Its events, in log order.
    pub events: Vec<EventSummary>,
    /// Runs its events started (up to `as_of`), oldest first.
    pub runs: Vec<RunSummary>,
}

#[derive(Object, Debug)]
pub struct ConversationPage {
    pub data: Vec<ConversationSummary>,
    /// Pass as `cursor` for the next page; absent on the last page.
    pub next_cursor: Option<String>,
}

pub struct ConversationsApi;

#[OpenApi(prefix_path = "/api/v1", tag = "ConversationTags::Conversations")]
impl ConversationsApi {
    /// List conversations, most recently active first.
    #[oai(path = "/conversations", method = "get")]
    async fn list_conversations(
        &self,
        _auth: AdminAuth,
        store: Data<&Arc<dyn EventStore>>,
        /// Only this status (`setup`, `completed`, `failed`, `busy`, `no-answer`, `voicemail`).
        status: Query<Option<String>>,
        /// Only this agent version (`ca_…@vN`).
        agent_id: Query<Option<String>>,
        /// `next_cursor` of the previous page.
        cursor: Query<Option<String>>,
        /// Page size, 1 to 500.
        #[oai(
            default = "default_limit",
            validator(minimum(value = "1"), maximum(value = "500"))
        )]
        limit: Query<u32>,
    ) -> Result<Json<ConversationPage>, ApiError> {
        let before_seq = cursor
            .0
            .map(|c| c.parse::<i64>().map_err(|_| super::params::bad_cursor(&c)))
            .transpose()?;
        if let Some(s) = status.0.as_deref()
            && !CONVERSATION_STATUSES.contains(&s)
        {
            return Err(super::params::unknown_value(
                "status",
                s,
                &CONVERSATION_STATUSES,
            ));
        }
        let states = store
            .list_conversations(&ConversationQuery {
                status: status.0,
                agent_id: agent_id.0,
                before_seq,
                limit: limit.0,
            })
            .await?;
        let next_cursor = (states.len() == limit.0 as usize)
            .then(|| states.last().map(|s| s.last_seq.to_string()))
            .flatten();
        Ok(Json(ConversationPage {
            data: states.iter().map(Into::into).collect(),
            next_cursor,
        }))
    }

    /// One conversation: its projection (now, or `as_of` a log sequence), every custom field's
    /// history, its events and its runs.
    #[oai(path = "/conversations/:id", method = "get")]
    async fn get_conversation(
        &self,
        _auth: AdminAuth,
        store: Data<&Arc<dyn EventStore>>,
        /// The conversation id (`conv_…`).
        id: Path<String>,
        /// A log sequence: the conversation as it was once that event was stored.
        as_of: Query<Option<i64>>,
    ) -> Result<Json<ConversationDetail>, ApiError> {
        let log = store.conversation_log(&id, as_of.0).await?;
        if log.is_empty() {
            return Err(ApiError::not_found("conversation", &id));
        }
        let mut state = ConversationState::new(id.0.clone());
        let mut history: BTreeMap<String, Vec<FieldChange>> = BTreeMap::new();
        let mut events = Vec::with_capacity(log.len());
        for item in log {
            let envelope = state.apply_stored(&item)?;
            if let EventKind::CustomFieldUpdated {
                key: Some(key),
                value,
                ..
            } = envelope.kind()
            {
                history.entry(key).or_default().push(FieldChange {
                    value,
                    event_id: item.event.event_id.clone(),
                    sequence: item.event.seq,
                    created_at: item.event.created_at.clone(),
                });
            }
            events.push(item.event.into());
        }
        let mut runs = store
            .list_runs(&RunQuery {
                conversation_id: Some(id.0.clone()),
                limit: 500,
                ..Default::default()
            })
            .await?;
        runs.retain(|r| as_of.0.is_none_or(|seq| r.event_seq <= seq));
        runs.reverse();
        Ok(Json(ConversationDetail {
            conversation: (&state).into(),
            as_of: as_of.0,
            custom_field_history: history,
            events,
            runs: runs.iter().map(Into::into).collect(),
        }))
    }
}

/// The values `GET /conversations?status=` accepts: `setup`, then the ended statuses.
const CONVERSATION_STATUSES: [&str; 6] = [
    crate::store::projection::STATUS_SETUP,
    ENDED_STATUSES[0],
    ENDED_STATUSES[1],
    ENDED_STATUSES[2],
    ENDED_STATUSES[3],
    ENDED_STATUSES[4],
];

fn default_limit() -> u32 {
    50
}
