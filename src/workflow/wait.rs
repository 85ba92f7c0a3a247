//! Durable waits in a workflow: `wait` (a duration) and `wait_for` (a later
//! event of the run's conversation, with a timeout) steps, and the
//! workflow's `order:` key. Here are their checked form, how an arriving
//! event is matched against a `wait_for` (the same rules as `on:`, through
//! [`super::matching::decide_on`]), and the text shown for a waiting run.
//! Execution is in `crate::engine::wait`; the index of waiting runs in
//! `crate::store::waits`.

use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::Trigger;
use super::matching::{Decision, EventFacts, decide_on};
use crate::operator::envelope::EventKind;

/// What a wait step waits for.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum WaitStep {
    /// `wait: 1h`: resume after this long.
    Timer {
        #[serde(with = "super::duration_text")]
        duration: Duration,
    },
    /// `wait_for:`: resume on a matching later event of the conversation, or time out.
    Event(WaitFor),
}

/// A checked `wait_for`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct WaitFor {
    /// The event type awaited.
    pub event: String,
    /// `status` (conversation.ended) as a list.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<Vec<String>>,
    /// `field` (conversation.custom_fields.updated).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub field: Option<String>,
    /// `from` values (`null` means "was not set"); `None` means any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from: Option<Vec<Value>>,
    /// `to` values; `None` means any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub to: Option<Vec<Value>>,
    /// `when`: an expression over the arriving `event` (and `conversation`, `change`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub when: Option<String>,
    /// How long to wait at most (serialized as milliseconds).
    #[serde(with = "millis")]
    pub timeout: Duration,
}

mod millis {
    use serde::{Deserialize, Deserializer, Serializer};
    use std::time::Duration;
    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
    }
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        Ok(Duration::from_millis(u64::deserialize(d)?))
    }
}

impl WaitFor {
    /// The `on:`-style trigger this wait matches with.
    pub fn trigger(&self) -> Trigger {
        match self.event.as_str() {
            EventKind::ENDED => Trigger::Ended {
                statuses: self.status.clone(),
            },
            EventKind::CUSTOM_FIELDS_UPDATED => Trigger::FieldChanged {
                field: self.field.clone().unwrap_or_default(),
                from: self.from.clone(),
                to: self.to.clone(),
            },
            other => Trigger::Event(other.to_owned()),
        }
    }

    /// Whether an arriving event (as of its place in the log) resumes the wait.
    pub fn decide(&self, facts: &EventFacts<'_>) -> Decision {
        decide_on(&self.event, &self.trigger(), self.when.as_deref(), facts)
    }

    /// Whether an arriving event (as of its place in the log) resumes the wait.
    pub fn matches(&self, facts: &EventFacts<'_>) -> bool {
        self.decide(facts).matched()
    }

    /// What the wait waits for, in words (shown by the admin API).
    pub fn describe(&self) -> String {
        let mut s = self.event.clone();
        if let Some(list) = &self.status {
            s.push_str(&format!(" with status {}", list.join(" or ")));
        }
        if let Some(f) = &self.field {
            s.push_str(&format!(" of field `{f}`"));
        }
        let show = |v: &[Value]| {
            v.iter()
                .map(Value::to_string)
                .collect::<Vec<_>>()
                .join(" or ")
        };
        if let Some(from) = &self.from {
            s.push_str(&format!(" from {}", show(from)));
        }
        if let Some(to) = &self.to {
            s.push_str(&format!(" to {}", show(to)));
        }
        if let Some(w) = &self.when {
            s.push_str(&format!(" when `{w}`"));
        }
        s
    }
}

/// `order:`: whether runs of one workflow for one conversation run one after another.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Order {
    /// Each run of a conversation starts after the previous one ended (the default).
    #[default]
    Conversation,
    /// Runs of one conversation may overlap.
    None,
}

/// Parses a wait duration: a number and a unit (`ms`, `s`, `m`, `h`, `d`), or
/// anything humantime reads (`1h 30m`); zero is refused.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    match humantime::parse_duration(text.trim()) {
        Ok(d) if d.is_zero() => Err("must be longer than zero".into()),
        Ok(d) => Ok(d),
        Err(e) => Err(format!("`{text}` is not a duration ({e})")),
    }
}

/// The result a resolved `wait_for` leaves in `steps.<id>`.
pub fn event_result(envelope: Option<Value>, waited_ms: i64) -> Value {
    let timed_out = envelope.is_none();
    serde_json::json!({
        "event": envelope.unwrap_or(Value::Null),
        "timed_out": timed_out,
        "waited_ms": waited_ms,
    })
}

/// The result a finished `wait` leaves in `steps.<id>`.
pub fn timer_result(waited_ms: i64) -> Value {
    serde_json::json!({ "waited_ms": waited_ms, "timed_out": false, "event": Value::Null })
}
