//! Backtests: how a workflow (new or edited) would have behaved on the
//! events already stored. Each event is judged as of its own place in the
//! log (the conversation as it was then), and the requests the workflow
//! would have sent are rendered with secrets masked. Nothing is sent.

use serde::Serialize;
use serde_json::{Value, json};

use super::matching::{EventFacts, base_context, decide};
use super::{Workflow, answer, template};
use crate::engine::http;
use crate::operator::envelope::Envelope;
use crate::store::projection::{ConversationState, fold_log};
use crate::store::{EventQuery, EventStore, Order, StoreError};

/// Which stored events to test against.
#[derive(Clone, Debug, Default)]
pub struct BacktestFilter {
    pub received_after: Option<chrono::DateTime<chrono::Utc>>,
    pub received_before: Option<chrono::DateTime<chrono::Utc>>,
    pub conversation_id: Option<String>,
    /// At most this many events (most recent), 1 to 1000.
    pub limit: u32,
}

/// A request the workflow would have sent.
#[derive(Clone, Debug, Serialize)]
pub struct WouldSend {
    pub step_id: String,
    /// `{method, url, headers, body}` with secrets as `***`; absent when it could not be rendered.
    pub request: Option<Value>,
    /// Why it could not be rendered (e.g. it needs an earlier step's response) or was skipped.
    pub note: Option<String>,
}

/// The verdict on one event.
#[derive(Clone, Debug, Serialize)]
pub struct BacktestResult {
    pub event_id: String,
    pub sequence: i64,
    pub conversation_id: Option<String>,
    pub received_at: chrono::DateTime<chrono::Utc>,
    pub matched: bool,
    /// Why it would not have run.
    pub reason: Option<String>,
    pub requests: Vec<WouldSend>,
    /// For setup workflows without lookups: the answer it would have given.
    pub answer: Option<Value>,
}

/// Evaluates `wf` against the stored events of its event type.
pub async fn run(
    store: &dyn EventStore,
    wf: &Workflow,
    filter: &BacktestFilter,
) -> Result<Vec<BacktestResult>, StoreError> {
    let mut events = store
        .list_events(&EventQuery {
            event_type: Some(wf.event.clone()),
            conversation_id: filter.conversation_id.clone(),
            received_after: filter.received_after,
            received_before: filter.received_before,
            order: Order::NewestFirst,
            limit: filter.limit.clamp(1, 1000),
            ..Default::default()
        })
        .await?;
    events.reverse();
    let mut results = Vec::with_capacity(events.len());
    for event in events {
        // The conversation as it was: its log up to and including this event.
        let log = match &event.conversation_id {
            Some(c) => store.conversation_log(c, Some(event.seq)).await?,
            None => Vec::new(),
        };
        let Some(raw) = store.get_event(&event.event_id).await? else {
            continue;
        };
        let envelope =
            Envelope::parse(&raw.raw_body).map_err(|e| StoreError::Corrupt(e.to_string()))?;
        let event_json: Value = serde_json::from_slice(&raw.raw_body).unwrap_or_default();
        // The one fold: the state before this event (its log minus itself), then with it.
        let (before, after) = match (&event.conversation_id, log.split_last()) {
            (Some(c), Some((last, earlier))) if last.event.seq == event.seq => {
                let before =
                    fold_log(c, earlier)?.unwrap_or_else(|| ConversationState::new(c.as_str()));
                let mut after = before.clone();
                after.apply_stored(last)?;
                (Some(before), Some(after))
            }
            _ => (None, None),
        };
        let facts = EventFacts {
            envelope: &envelope,
            event_json: &event_json,
            before: before.as_ref(),
            after: after.as_ref(),
        };
        let decision = decide(wf, &facts);
        let mut result = BacktestResult {
            event_id: event.event_id.clone(),
            sequence: event.seq,
            conversation_id: event.conversation_id.clone(),
            received_at: event.received_at,
            matched: decision.matched(),
            reason: decision.reason().map(str::to_owned),
            requests: Vec::new(),
            answer: None,
        };
        if decision.matched() {
            let mut ctx = base_context(&facts);
            let secrets: serde_json::Map<String, Value> = wf
                .secrets
                .iter()
                .map(|s| (s.clone(), Value::String("***".into())))
                .collect();
            ctx["secrets"] = Value::Object(secrets);
            ctx["steps"] = json!({});
            ctx["run"] = json!({"id": "run_backtest", "attempt": 1, "workflow": wf.name});
            for step in &wf.steps {
                if let Some(cond) = &step.condition {
                    match template::truthy(cond, &ctx) {
                        Ok(true) => {}
                        Ok(false) => {
                            result.requests.push(WouldSend {
                                step_id: step.id.clone(),
                                request: None,
                                note: Some(format!("skipped: `if: {cond}` is false")),
                            });
                            continue;
                        }
                        Err(e) => {
                            result.requests.push(WouldSend {
                                step_id: step.id.clone(),
                                request: None,
                                note: Some(format!(
                                    "`if` cannot be evaluated without live responses: {e}"
                                )),
                            });
                            continue;
                        }
                    }
                }
                match http::render(&step.http, &ctx) {
                    Ok(req) => result.requests.push(WouldSend {
                        step_id: step.id.clone(),
                        request: Some(req.record()),
                        note: None,
                    }),
                    Err((_, message)) => result.requests.push(WouldSend {
                        step_id: step.id.clone(),
                        request: None,
                        note: Some(format!(
                            "not rendered (it may need an earlier step's response): {message}"
                        )),
                    }),
                }
            }
            if wf.respond.is_some() && wf.steps.is_empty() {
                let produced = answer::render(wf, &ctx);
                result.answer = serde_json::from_str(&produced.body).ok();
            }
        }
        results.push(result);
    }
    Ok(results)
}
