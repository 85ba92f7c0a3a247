//! The conversation projection: a fold of one conversation's events.
//!
//! It is never written on its own: the appender applies each new event to it
//! inside the transaction that stores the event, and `rebuild` folds the log
//! again from scratch. Reading it "as of" a sequence is the same fold, stopped
//! early.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::sanitize;
use super::{StoreError, StoredEventWithBody};
use crate::operator::envelope::{Envelope, EventKind};

/// Status before `conversation.ended` arrives, once `conversation.setup` was seen.
pub const STATUS_SETUP: &str = "setup";

/// The current value of one custom field, with where it came from.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CustomField {
    pub value: Value,
    /// Sequence of the event that set it.
    pub seq: i64,
    /// That event's `created_at`, as sent.
    pub created_at: Option<String>,
}

/// A custom-field update, as the fold sees it (see [`ConversationState::field_update`]).
#[derive(Clone, Debug, PartialEq)]
pub struct FieldUpdate {
    pub key: String,
    /// The value the event sets.
    pub value: Value,
    /// The value before it: the payload's `previous_value` when Operator
    /// sent it, else the field's current value, else null ("was not set").
    pub previous: Value,
    /// The field's current value, when it is newer (by `created_at`) than
    /// this update: the projection keeps it and the update changes nothing.
    pub older_than: Option<CustomField>,
}

/// Folds one conversation's log (in log order) into its state; `None` if the log is empty.
pub fn fold_log(
    conversation_id: &str,
    log: &[StoredEventWithBody],
) -> Result<Option<ConversationState>, StoreError> {
    if log.is_empty() {
        return Ok(None);
    }
    let mut state = ConversationState::new(conversation_id);
    for item in log {
        state.apply_stored(item)?;
    }
    Ok(Some(state))
}

/// The state of a conversation after some prefix of its events.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ConversationState {
    pub conversation_id: String,
    pub agent_id: Option<String>,
    /// `setup`, then the ended status (`completed`, `failed`, `busy`, `no-answer`, `voicemail`).
    pub status: Option<String>,
    pub failure_reason: Option<String>,
    pub direction: Option<String>,
    pub channel_type: Option<String>,
    pub livemode: Option<bool>,
    pub ended: bool,
    pub custom_fields: BTreeMap<String, CustomField>,
    pub event_count: i64,
    pub first_seq: i64,
    pub last_seq: i64,
    pub last_received_at: Option<DateTime<Utc>>,
}

fn parse_time(s: Option<&str>) -> Option<DateTime<chrono::FixedOffset>> {
    s.and_then(|s| DateTime::parse_from_rfc3339(s).ok())
}

impl ConversationState {
    pub fn new(conversation_id: impl Into<String>) -> Self {
        Self {
            conversation_id: conversation_id.into(),
            ..Self::default()
        }
    }

    /// Applies one event, in log order. This is the one conversation fold:
    /// the append, a rebuild, reads "as of" a sequence, the API's history
    /// and backtests all go through it ([`fold_log`], [`Self::apply_stored`]).
    ///
    /// Operator guarantees no ordering, so: `conversation.ended` is terminal
    /// for the status (a late setup does not revert it), and a custom-field
    /// update older (by `created_at`) than the field's current value does not
    /// replace it ([`Self::field_update`] is that rule; matching uses it too).
    /// Strings are kept with NUL replaced ([`super::sanitize`]), as stored.
    pub fn apply(&mut self, seq: i64, envelope: &Envelope, received_at: DateTime<Utc>) {
        let update = self.field_update(envelope);
        if self.event_count == 0 {
            self.first_seq = seq;
        }
        self.event_count += 1;
        self.last_seq = seq;
        self.last_received_at = Some(received_at);
        if let Some(agent) = &envelope.agent_id {
            self.agent_id = Some(agent.to_string());
        }
        if envelope.livemode.is_some() {
            self.livemode = envelope.livemode;
        }
        let clean = |s: Option<String>| s.map(|s| sanitize::text(&s).into_owned());
        match envelope.kind() {
            EventKind::Setup {
                direction,
                channel_type,
            } => {
                if !self.ended {
                    self.status = Some(STATUS_SETUP.to_owned());
                }
                self.direction = clean(direction).or(self.direction.take());
                self.channel_type = clean(channel_type).or(self.channel_type.take());
            }
            EventKind::Ended {
                status,
                failure_reason,
            } => {
                self.ended = true;
                self.status = clean(status).or(self.status.take());
                self.failure_reason = clean(failure_reason);
            }
            EventKind::CustomFieldUpdated { .. } | EventKind::Other => {}
        }
        if let Some(update) = update
            && update.older_than.is_none()
        {
            self.custom_fields.insert(
                update.key,
                CustomField {
                    value: update.value,
                    seq,
                    created_at: clean(envelope.created_at.clone()),
                },
            );
        }
    }

    /// What a `conversation.custom_fields.updated` event does to this state
    /// (`None` for other events, or an update without a key). The order rule
    /// lives here only: an update whose `created_at` is older than the
    /// field's current value's does not replace it (`older_than` says so).
    pub fn field_update(&self, envelope: &Envelope) -> Option<FieldUpdate> {
        let EventKind::CustomFieldUpdated {
            key: Some(key),
            value,
            previous_value,
        } = envelope.kind()
        else {
            return None;
        };
        let key = sanitize::text(&key).into_owned();
        let current = self.custom_fields.get(&key);
        let older_than = current
            .filter(|current| {
                match (
                    parse_time(envelope.created_at.as_deref()),
                    parse_time(current.created_at.as_deref()),
                ) {
                    (Some(new), Some(old)) => new < old,
                    _ => false,
                }
            })
            .cloned();
        let previous = match previous_value {
            Some(p) => sanitize::json(&p).into_owned(),
            None => current.map(|c| c.value.clone()).unwrap_or(Value::Null),
        };
        Some(FieldUpdate {
            value: sanitize::json(&value).into_owned(),
            key,
            previous,
            older_than,
        })
    }

    /// Applies one stored event (parsing its raw body); returns its envelope.
    pub fn apply_stored(&mut self, item: &StoredEventWithBody) -> Result<Envelope, StoreError> {
        let envelope = Envelope::parse(&item.raw_body)
            .map_err(|e| StoreError::Corrupt(format!("event {}: {e}", item.event.event_id)))?;
        self.apply(item.event.seq, &envelope, item.event.received_at);
        Ok(envelope)
    }

    /// The value a field had in this state (`None` if never set).
    pub fn field(&self, key: &str) -> Option<&Value> {
        self.custom_fields.get(key).map(|f| &f.value)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(body: serde_json::Value) -> Envelope {
        Envelope::parse(body.to_string().as_bytes()).unwrap()
    }

    fn field_update(id: &str, at: &str, key: &str, value: serde_json::Value) -> Envelope {
        env(
            serde_json::json!({"id": id, "created_at": at, "conversation_id": "conv_1",
            "payload": {"type": "conversation.custom_fields.updated", "key": key, "value": value}}),
        )
    }

    #[test]
    fn folds_setup_end_and_fields() {
        let now = Utc::now();
        let mut s = ConversationState::new("conv_1");
        s.apply(1, &env(serde_json::json!({"id":"ev_1","agent_id":"ca_a@v1","conversation_id":"conv_1","livemode":true,
            "payload":{"type":"conversation.setup","direction":"inbound","channel":{"type":"phone"}}})), now);
        assert_eq!(s.status.as_deref(), Some(STATUS_SETUP));
        s.apply(
            5,
            &env(serde_json::json!({"id":"ev_2","conversation_id":"conv_1",
            "payload":{"type":"conversation.ended","status":"completed"}})),
            now,
        );
        // A late, re-delivered setup does not reopen an ended conversation.
        s.apply(
            6,
            &env(serde_json::json!({"id":"ev_3","conversation_id":"conv_1",
            "payload":{"type":"conversation.setup"}})),
            now,
        );
        assert_eq!(s.status.as_deref(), Some("completed"));
        assert_eq!(s.direction.as_deref(), Some("inbound"));
        assert_eq!(s.channel_type.as_deref(), Some("phone"));
        assert_eq!(s.agent_id.as_deref(), Some("ca_a@v1"));
        assert_eq!((s.event_count, s.first_seq, s.last_seq), (3, 1, 6));
    }

    #[test]
    fn an_older_field_update_arriving_late_does_not_win() {
        let now = Utc::now();
        let mut s = ConversationState::new("conv_1");
        s.apply(
            1,
            &field_update("ev_1", "2025-07-14T15:00:02Z", "k", "new".into()),
            now,
        );
        s.apply(
            2,
            &field_update("ev_2", "2025-07-14T15:00:01Z", "k", "old".into()),
            now,
        );
        assert_eq!(s.field("k"), Some(&serde_json::json!("new")));
        s.apply(
            3,
            &field_update("ev_3", "2025-07-14T15:00:03+00:00", "k", 7.into()),
            now,
        );
        assert_eq!(s.field("k"), Some(&serde_json::json!(7)));
        assert_eq!(s.custom_fields["k"].seq, 3);
    }
}
