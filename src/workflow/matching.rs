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

/// The context `when` is evaluated in (and a run starts from): `event`,
/// `conversation` and, for a custom field update, `change`.
pub fn base_context(facts: &EventFacts<'_>) -> Value {
    let mut ctx =
        json!({"event": facts.event_json, "conversation": conversation_json(facts.after)});
    if let Some(change) = change_json(facts) {
        ctx["change"] = change;
    }
    ctx
}

/// A custom field's value before this event, and where it came from: the
/// payload's `previous_value` when Operator sent one, else the conversation's
/// history (`null` when the field was not set).
fn previous_of(
    facts: &EventFacts<'_>,
    field: &str,
    previous_value: Option<Value>,
) -> (Value, &'static str) {
    match previous_value {
        Some(v) => (v, "payload"),
        None => (
            facts
                .before
                .and_then(|s| s.field(field).cloned())
                .unwrap_or(Value::Null),
            "history",
        ),
    }
}

/// `change` as templates see it on `conversation.custom_fields.updated`:
/// `{field, from, to, from_source}`, exactly the transition matching judged.
pub fn change_json(facts: &EventFacts<'_>) -> Option<Value> {
    let EventKind::CustomFieldUpdated {
        key,
        value,
        previous_value,
    } = facts.envelope.kind()
    else {
        return None;
    };
    let from_source = if previous_value.is_some() {
        "payload"
    } else {
        "history"
    };
    // The projection's own rule, as `decide` uses it.
    let unseen = ConversationState::default();
    if let Some(update) = facts.before.unwrap_or(&unseen).field_update(facts.envelope) {
        return Some(
            json!({"field": update.key, "from": update.previous, "to": update.value, "from_source": from_source}),
        );
    }
    let key = key.unwrap_or_default();
    let (from, from_source) = previous_of(facts, &key, previous_value);
    Some(json!({"field": key, "from": from, "to": value, "from_source": from_source}))
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
    decide_on(&wf.event, &wf.trigger, wf.when.as_deref(), facts)
}

/// [`decide`] for an event type, a trigger and a `when` (also used by `wait_for` steps).
pub fn decide_on(
    event: &str,
    trigger: &Trigger,
    when: Option<&str>,
    facts: &EventFacts<'_>,
) -> Decision {
    let env = facts.envelope;
    if env.event_type != event {
        return Decision::Skipped(format!(
            "event type is {}, workflow is on {}",
            env.event_type, event
        ));
    }
    match (trigger, env.kind()) {
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
    if let Some(when) = when {
        match template::truthy(when, &base_context(facts)) {
            Ok(true) => {}
            Ok(false) => return Decision::Skipped(format!("`when: {when}` is false")),
            Err(e) => return Decision::Skipped(format!("`when` could not be evaluated: {e}")),
        }
    }
    Decision::Matched
}
