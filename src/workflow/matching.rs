//! Does a workflow run for an event, and if not, why not. Pure: the caller
//! supplies the event and the conversation as it was before and after it.

use serde_json::{Value, json};

use super::{Trigger, Workflow, template};
use crate::operator::envelope::{Envelope, EventKind};
use crate::store::projection::ConversationState;

/// One event, with the conversation around it.
pub struct EventFacts<'a> {
    pub envelope: &'a Envelope,
    /// The whole body as JSON (what templates see as `event`).
    pub event_json: &'a Value,
    /// The projection before this event (for a custom field's previous value).
    pub before: Option<&'a ConversationState>,
    /// The projection including this event (what templates see as `conversation`).
    pub after: Option<&'a ConversationState>,
}

/// The outcome of matching one workflow against one event.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decision {
    Matched,
    /// Not matched; the reason names the condition that failed.
    Skipped(String),
}

impl Decision {
    pub fn matched(&self) -> bool {
        matches!(self, Decision::Matched)
    }

    pub fn reason(&self) -> Option<&str> {
        match self {
            Decision::Matched => None,
            Decision::Skipped(r) => Some(r),
        }
    }
}

/// `conversation` as templates see it.
pub fn conversation_json(state: Option<&ConversationState>) -> Value {
    match state {
        None => json!({"status": null, "custom_fields": {}}),
        Some(s) => json!({
            "id": s.conversation_id,
            "status": s.status,
            "agent_id": s.agent_id,
            "direction": s.direction,
            "livemode": s.livemode,
            "failure_reason": s.failure_reason,
            "custom_fields": s.custom_fields.iter().map(|(k, v)| (k.clone(), v.value.clone())).collect::<serde_json::Map<_, _>>(),
        }),
    }
}

/// The context `when` is evaluated in: `event` and `conversation`.
pub fn base_context(facts: &EventFacts<'_>) -> Value {
    json!({"event": facts.event_json, "conversation": conversation_json(facts.after)})
}

fn show(v: &Value) -> String {
    match v {
        Value::Null => "null (not set)".into(),
        other => other.to_string(),
    }
}

fn show_list(v: &[Value]) -> String {
    v.iter().map(show).collect::<Vec<_>>().join(", ")
}

/// Decides whether `wf` runs for this event.
pub fn decide(wf: &Workflow, facts: &EventFacts<'_>) -> Decision {
    let env = facts.envelope;
    if env.event_type != wf.event {
        return Decision::Skipped(format!(
            "event type is {}, workflow is on {}",
            env.event_type, wf.event
        ));
    }
    match (&wf.trigger, env.kind()) {
        (
            Trigger::Ended {
                statuses: Some(list),
            },
            EventKind::Ended { status, .. },
        ) => {
            let status = status.unwrap_or_default();
            if !list.contains(&status) {
                return Decision::Skipped(format!(
                    "status is `{status}`, not one of [{}]",
                    list.join(", ")
                ));
            }
        }
        (Trigger::FieldChanged { field, from, to }, EventKind::CustomFieldUpdated { key, .. }) => {
            let key = key.unwrap_or_default();
            if &key != field {
                return Decision::Skipped(format!("custom field `{key}` changed, not `{field}`"));
            }
            // The projection's own rule decides what the update did (and what it replaced).
            let unseen = ConversationState::default();
            let Some(update) = facts.before.unwrap_or(&unseen).field_update(env) else {
                return Decision::Skipped("the update names no custom field".into());
            };
            let (previous, value) = (update.previous, update.value);
            if let Some(current) = &update.older_than {
                return Decision::Skipped(format!(
                    "this update of `{field}` (created_at {}) is older than its current value {} \
                     (created_at {}, event #{}): the conversation keeps that value, so nothing changed",
                    env.created_at.as_deref().unwrap_or("unknown"),
                    show(&current.value),
                    current.created_at.as_deref().unwrap_or("unknown"),
                    current.seq,
                ));
            }
            if previous == value {
                return Decision::Skipped(format!(
                    "`{field}` did not change (still {})",
                    show(&value)
                ));
            }
            if let Some(from) = from
                && !from.contains(&previous)
            {
                return Decision::Skipped(format!(
                    "`{field}` was {}, not one of [{}]",
                    show(&previous),
                    show_list(from)
                ));
            }
            if let Some(to) = to
                && !to.contains(&value)
            {
                return Decision::Skipped(format!(
                    "`{field}` became {}, not one of [{}]",
                    show(&value),
                    show_list(to)
                ));
            }
        }
        _ => {}
    }
    if let Some(when) = &wf.when {
        match template::truthy(when, &base_context(facts)) {
            Ok(true) => {}
            Ok(false) => return Decision::Skipped(format!("`when: {when}` is false")),
            Err(e) => return Decision::Skipped(format!("`when` could not be evaluated: {e}")),
        }
    }
    Decision::Matched
}
