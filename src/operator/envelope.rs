//! Operator's event envelope: parsed tolerantly from the raw body.
//!
//! The envelope (`id`, `created_at`, `agent_id`, `livemode`,
//! `conversation_id`, `experimental`, `payload`) is the same for every event;
//! the event type is `payload.type`. Unknown fields are ignored at every
//! level and the payload is kept as JSON, so unknown event types are stored
//! intact. [`EventKind`] decodes the payloads we act on, in a second step.

use serde::Deserialize;
use serde_json::Value;

use crate::domain::{AgentId, ConversationId, EventId, IdError};

/// Why a verified body is not an Operator envelope (answered with 400).
#[derive(Debug, thiserror::Error)]
pub enum EnvelopeError {
    #[error("body is not valid JSON: {0}")]
    InvalidJson(String),
    #[error("body is not an Operator envelope: {0}")]
    NotAnEnvelope(String),
}

#[derive(Deserialize)]
struct RawEnvelope {
    id: Option<Value>,
    created_at: Option<Value>,
    agent_id: Option<Value>,
    livemode: Option<Value>,
    conversation_id: Option<Value>,
    payload: Option<Value>,
}

/// The envelope fields we index and route on. The raw body is kept beside it.
#[derive(Clone, Debug, PartialEq)]
pub struct Envelope {
    pub id: EventId,
    pub event_type: String,
    pub conversation_id: Option<ConversationId>,
    pub agent_id: Option<AgentId>,
    pub livemode: Option<bool>,
    /// `created_at` exactly as sent (RFC 3339 in every known case).
    pub created_at: Option<String>,
    pub payload: Value,
}

fn opt_string(v: Option<Value>, field: &str) -> Result<Option<String>, EnvelopeError> {
    match v {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(other) => Err(EnvelopeError::NotAnEnvelope(format!(
            "`{field}` must be a string, got {}",
            json_kind(&other)
        ))),
    }
}

fn bad_id(field: &str) -> impl Fn(IdError) -> EnvelopeError + '_ {
    move |e| EnvelopeError::NotAnEnvelope(format!("`{field}` {e}"))
}

pub(crate) fn json_kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

impl Envelope {
    /// Parses a raw body. Requires `id` and `payload.type`; everything else is optional.
    pub fn parse(body: &[u8]) -> Result<Self, EnvelopeError> {
        let value: Value =
            serde_json::from_slice(body).map_err(|e| EnvelopeError::InvalidJson(e.to_string()))?;
        if !value.is_object() {
            return Err(EnvelopeError::NotAnEnvelope(format!(
                "expected a JSON object, got {}",
                json_kind(&value)
            )));
        }
        let raw: RawEnvelope = serde_json::from_value(value)
            .map_err(|e| EnvelopeError::NotAnEnvelope(e.to_string()))?;
        let id = opt_string(raw.id, "id")?
            .ok_or_else(|| EnvelopeError::NotAnEnvelope("missing `id`".into()))?;
        let id = EventId::parse(id).map_err(bad_id("id"))?;
        let payload = match raw.payload {
            Some(p @ Value::Object(_)) => p,
            Some(other) => {
                return Err(EnvelopeError::NotAnEnvelope(format!(
                    "`payload` must be an object, got {}",
                    json_kind(&other)
                )));
            }
            None => return Err(EnvelopeError::NotAnEnvelope("missing `payload`".into())),
        };
        let event_type = match payload.get("type") {
            Some(Value::String(t)) if !t.trim().is_empty() => t.clone(),
            _ => {
                return Err(EnvelopeError::NotAnEnvelope(
                    "`payload.type` must be a non-empty string".into(),
                ));
            }
        };
        let conversation_id = opt_string(raw.conversation_id, "conversation_id")?
            .map(ConversationId::parse)
            .transpose()
            .map_err(bad_id("conversation_id"))?;
        let agent_id = opt_string(raw.agent_id, "agent_id")?
            .map(AgentId::parse)
            .transpose()
            .map_err(bad_id("agent_id"))?;
        let livemode = match raw.livemode {
            None | Some(Value::Null) => None,
            Some(Value::Bool(b)) => Some(b),
            Some(other) => {
                return Err(EnvelopeError::NotAnEnvelope(format!(
                    "`livemode` must be a boolean, got {}",
                    json_kind(&other)
                )));
            }
        };
        let created_at = opt_string(raw.created_at, "created_at")?;
        Ok(Self {
            id,
            event_type,
            conversation_id,
            agent_id,
            livemode,
            created_at,
            payload,
        })
    }

    /// Decodes the payload into the events we act on.
    pub fn kind(&self) -> EventKind {
        EventKind::decode(&self.event_type, &self.payload)
    }
}

/// The status a `conversation.ended` event reports (unknown values kept as text).
pub const ENDED_STATUSES: [&str; 5] = ["completed", "failed", "busy", "no-answer", "voicemail"];

/// The event payloads Switchboard understands; anything else is `Other`.
#[derive(Clone, Debug, PartialEq)]
pub enum EventKind {
    Setup {
        direction: Option<String>,
        channel_type: Option<String>,
    },
    Ended {
        status: Option<String>,
        failure_reason: Option<String>,
    },
    CustomFieldUpdated {
        key: Option<String>,
        value: Value,
        /// `None`: the payload did not say; `Some(Null)`: it said "was not set".
        previous_value: Option<Value>,
    },
    Other,
}

fn str_field(payload: &Value, names: &[&str]) -> Option<String> {
    names
        .iter()
        .find_map(|n| payload.get(*n).and_then(Value::as_str).map(str::to_owned))
}

fn any_field(payload: &Value, names: &[&str]) -> Option<Value> {
    names.iter().find_map(|n| payload.get(*n).cloned())
}

impl EventKind {
    pub const SETUP: &'static str = "conversation.setup";
    pub const ENDED: &'static str = "conversation.ended";
    pub const CUSTOM_FIELDS_UPDATED: &'static str = "conversation.custom_fields.updated";

    /// Decodes tolerantly: `name`/`field` are accepted for `key`, `new_value`
    /// for `value` and `old_value` for `previous_value` (see webhooks.md §3.3).
    pub fn decode(event_type: &str, payload: &Value) -> Self {
        match event_type {
            Self::SETUP => EventKind::Setup {
                direction: str_field(payload, &["direction"]),
                channel_type: payload
                    .get("channel")
                    .and_then(|c| c.get("type"))
                    .and_then(Value::as_str)
                    .map(str::to_owned),
            },
            Self::ENDED => EventKind::Ended {
                status: str_field(payload, &["status"]),
                failure_reason: str_field(payload, &["failure_reason"]),
            },
            Self::CUSTOM_FIELDS_UPDATED => EventKind::CustomFieldUpdated {
                key: str_field(payload, &["key", "name", "field"]),
                value: any_field(payload, &["value", "new_value"]).unwrap_or(Value::Null),
                previous_value: any_field(payload, &["previous_value", "old_value"]),
            },
            _ => EventKind::Other,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture(name: &str) -> Vec<u8> {
        std::fs::read(format!(
            "{}/tests/fixtures/{name}",
            env!("CARGO_MANIFEST_DIR")
        ))
        .unwrap()
    }

    #[test]
    fn parses_every_fixture() {
        for (file, ty) in [
            ("conversation_setup_inbound_phone.json", EventKind::SETUP),
            ("conversation_setup_outbound_phone.json", EventKind::SETUP),
            ("conversation_ended_completed.json", EventKind::ENDED),
            ("conversation_ended_failed.json", EventKind::ENDED),
            ("conversation_ended_busy.json", EventKind::ENDED),
            ("conversation_ended_no_answer.json", EventKind::ENDED),
            ("conversation_ended_voicemail.json", EventKind::ENDED),
            (
                "conversation_custom_fields_updated_first_set.json",
                EventKind::CUSTOM_FIELDS_UPDATED,
            ),
            (
                "conversation_custom_fields_updated_changed.json",
                EventKind::CUSTOM_FIELDS_UPDATED,
            ),
        ] {
            let env = Envelope::parse(&fixture(file)).unwrap_or_else(|e| panic!("{file}: {e}"));
            assert_eq!(env.event_type, ty, "{file}");
            assert!(env.id.as_str().starts_with("ev_"));
            assert!(env.conversation_id.is_some());
        }
    }

    #[test]
    fn decodes_payloads_tolerantly() {
        let env = Envelope::parse(&fixture("conversation_ended_failed.json")).unwrap();
        assert_eq!(
            env.kind(),
            EventKind::Ended {
                status: Some("failed".into()),
                failure_reason: Some("number_invalid".into())
            }
        );
        let p = serde_json::json!({"type": "conversation.custom_fields.updated", "name": "k", "new_value": 3, "old_value": null});
        assert_eq!(
            EventKind::decode(EventKind::CUSTOM_FIELDS_UPDATED, &p),
            EventKind::CustomFieldUpdated {
                key: Some("k".into()),
                value: serde_json::json!(3),
                previous_value: Some(Value::Null)
            }
        );
        let first = Envelope::parse(&fixture(
            "conversation_custom_fields_updated_first_set.json",
        ))
        .unwrap();
        match first.kind() {
            EventKind::CustomFieldUpdated {
                previous_value,
                value,
                ..
            } => {
                assert_eq!(previous_value, None);
                assert_eq!(value, serde_json::json!("Zoë Ramírez"));
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn unknown_types_and_fields_are_accepted() {
        let env = Envelope::parse(
            br#"{"id":"ev_1","payload":{"type":"agent.future","x":1},"new_top":true}"#,
        )
        .unwrap();
        assert_eq!(env.event_type, "agent.future");
        assert_eq!(env.kind(), EventKind::Other);
        assert_eq!(env.conversation_id, None);
    }

    #[test]
    fn rejects_what_is_not_an_envelope() {
        for (body, needle) in [
            (&b"not json"[..], "not valid JSON"),
            (b"[1,2]", "expected a JSON object"),
            (b"{}", "missing `id`"),
            (br#"{"id":"ev_1"}"#, "missing `payload`"),
            (
                br#"{"id":"ev_1","payload":[]}"#,
                "`payload` must be an object",
            ),
            (br#"{"id":"ev_1","payload":{}}"#, "`payload.type`"),
            (
                br#"{"id":5,"payload":{"type":"x"}}"#,
                "`id` must be a string",
            ),
            (br#"{"id":"","payload":{"type":"x"}}"#, "`id`"),
            (
                br#"{"id":"ev_1","livemode":"yes","payload":{"type":"x"}}"#,
                "`livemode`",
            ),
            (br#"{"id":"ev\u0000","payload":{"type":"x"}}"#, "control"),
        ] {
            let err = Envelope::parse(body).unwrap_err().to_string();
            assert!(err.contains(needle), "{err} should mention {needle}");
        }
    }
}
