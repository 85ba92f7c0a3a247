//! The pure part of answering `conversation.setup`: which workflow answers,
//! and rendering an answer. Used inside the append transaction for answers
//! without lookups (so they are stored with their event, in one commit) and
//! by the setup responder for answers with lookups.

use serde_json::{Map, Value};

use super::matching::{EventFacts, decide};
use super::{Workflow, WorkflowSet, template};
use crate::webhook::envelope::EventKind;

/// The smallest valid answer.
pub const EMPTY_ANSWER: &str = r#"{"context":{}}"#;

/// An answer and how it was produced.
#[derive(Clone, Debug, PartialEq)]
pub struct Produced {
    /// The workflow that answered; `None` when none matched.
    pub workflow: Option<String>,
    pub body: String,
    /// Why the fallback was used, when it was.
    pub fallback_reason: Option<String>,
}

impl Produced {
    pub fn empty() -> Self {
        Self {
            workflow: None,
            body: EMPTY_ANSWER.to_owned(),
            fallback_reason: None,
        }
    }
}

/// The setup workflows that answer (`respond`/`fallback`), in file-name order.
pub fn answering(set: &WorkflowSet) -> impl Iterator<Item = &Workflow> {
    set.workflows
        .iter()
        .filter(|w| w.event == EventKind::SETUP && (w.respond.is_some() || w.fallback.is_some()))
}

/// The first answering workflow whose `when` holds, if any.
pub fn choose<'a>(set: &'a WorkflowSet, facts: &EventFacts<'_>) -> Option<&'a Workflow> {
    answering(set).find(|w| decide(w, facts).matched())
}

/// Renders an answer template into the response body: `context` (an object)
/// and `override_config` only when it renders non-empty.
pub fn answer_body(template_value: &Value, ctx: &Value) -> Result<String, String> {
    let rendered =
        template::render_json(template_value, ctx).map_err(|e| format!("respond: {e}"))?;
    let context = match rendered.get("context") {
        Some(Value::Object(c)) => Value::Object(c.clone()),
        None | Some(Value::Null) => Value::Object(Map::new()),
        Some(other) => {
            return Err(format!(
                "respond: `context` rendered to {other}, not an object"
            ));
        }
    };
    let mut body = Map::new();
    body.insert("context".into(), context);
    if let Some(Value::Object(oc)) = rendered.get("override_config")
        && !oc.is_empty()
    {
        body.insert("override_config".into(), Value::Object(oc.clone()));
    }
    Ok(Value::Object(body).to_string())
}

/// The answer once `respond` failed for `reason`: the fallback, else `{"context": {}}`.
pub fn fallback(wf: &Workflow, ctx: &Value, reason: String) -> Produced {
    let body = wf
        .fallback
        .as_ref()
        .and_then(|f| answer_body(f, ctx).ok())
        .unwrap_or_else(|| EMPTY_ANSWER.to_owned());
    Produced {
        workflow: Some(wf.name.clone()),
        body,
        fallback_reason: Some(reason),
    }
}

/// Renders `respond` (or the fallback when it fails) of a workflow without lookups.
pub fn render(wf: &Workflow, ctx: &Value) -> Produced {
    match wf.respond.as_ref().map(|r| answer_body(r, ctx)) {
        Some(Ok(body)) => Produced {
            workflow: Some(wf.name.clone()),
            body,
            fallback_reason: None,
        },
        Some(Err(reason)) => fallback(wf, ctx, reason),
        None => fallback(wf, ctx, "the workflow has only a fallback".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn answers_keep_types_and_drop_empty_override_config() {
        let ctx = json!({"steps": {"l": {"json": {"name": "Zoë", "vip": true}}}});
        let body = answer_body(
            &json!({"context": {"$customer": {"name": "{{ steps.l.json.name }}"}, "vip": "{{ steps.l.json.vip }}"}, "override_config": {}}),
            &ctx,
        )
        .unwrap();
        assert_eq!(
            body,
            r#"{"context":{"$customer":{"name":"Zoë"},"vip":true}}"#
        );
        assert!(answer_body(&json!({"context": "{{ steps.l.json.name }}"}), &ctx).is_err());
        assert!(answer_body(&json!({"context": {"x": "{{ steps.missing.json }}"}}), &ctx).is_err());
    }
}
