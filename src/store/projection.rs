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

use crate::webhook::envelope::{Envelope, EventKind};

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

    /// Applies one event, in log order.
    ///
    /// Operator guarantees no ordering, so: `conversation.ended` is terminal
    /// for the status (a late setup does not revert it), and a custom-field
    /// update older (by `created_at`) than the field's current value does not
    /// replace it.
    pub fn apply(&mut self, seq: i64, envelope: &Envelope, received_at: DateTime<Utc>) {
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
        match envelope.kind() {
            EventKind::Setup {
                direction,
                channel_type,
            } => {
                if !self.ended {
                    self.status = Some(STATUS_SETUP.to_owned());
                }
                self.direction = direction.or(self.direction.take());
                self.channel_type = channel_type.or(self.channel_type.take());
            }
            EventKind::Ended {
                status,
                failure_reason,
            } => {
                self.ended = true;
                self.status = status.or(self.status.take());
                self.failure_reason = failure_reason;
            }
            EventKind::CustomFieldUpdated {
                key: Some(key),
                value,
                ..
            } => {
                let newer = match self.custom_fields.get(&key) {
                    Some(current) => {
                        match (
                            parse_time(envelope.created_at.as_deref()),
                            parse_time(current.created_at.as_deref()),
                        ) {
                            (Some(new), Some(old)) => new >= old,
                            _ => true,
                        }
                    }
                    None => true,
                };
                if newer {
                    self.custom_fields.insert(
                        key,
                        CustomField {
                            value,
                            seq,
                            created_at: envelope.created_at.clone(),
                        },
                    );
                }
            }
            EventKind::CustomFieldUpdated { key: None, .. } | EventKind::Other => {}
        }
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
