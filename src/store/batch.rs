//! The part of an append that is the same on every database: deciding, for
//! a batch, which deliveries are new and which repeat a stored (or an
//! earlier, same-batch) delivery; numbering the new ones; and folding them
//! into the conversation projections; and how many rows one statement may
//! carry so that no statement passes its database's bind-parameter limit.

use std::collections::HashMap;

use super::model::{
    AppendOutcome, Dispatcher, DuplicateOf, EventRef, MatchRecord, NewEvent, NewRun, PreparedAnswer,
};
use super::projection::ConversationState;

/// Most bind parameters one statement may carry: PostgreSQL counts them in
/// 16 bits (65,535); SQLite's `SQLITE_MAX_VARIABLE_NUMBER` is 32,766.
pub(crate) fn max_binds(database: &str) -> usize {
    if database.eq_ignore_ascii_case("sqlite") {
        32_766
    } else {
        65_535
    }
}

/// Bind parameters per row of each multi-row insert in [`super::sql`]
/// (checked against the builders by a test there).
pub(crate) const EVENT_BINDS: usize = 14;
pub(crate) const CONVERSATION_BINDS: usize = 6;
pub(crate) const DECISION_BINDS: usize = 4;
pub(crate) const ANSWER_BINDS: usize = 8;
pub(crate) const RUN_BINDS: usize = 11;

/// How many rows of `binds_per_row` parameters fit in one statement on `database`.
pub(crate) fn rows_per_statement(database: &str, binds_per_row: usize) -> usize {
    (max_binds(database) / binds_per_row).max(1)
}

/// Stored events that share an envelope id or a (recent) idempotency key with the batch.
#[derive(Default)]
pub(crate) struct Existing {
    pub by_event_id: HashMap<String, EventRef>,
    pub by_key: HashMap<String, EventRef>,
}

/// One event the batch will insert.
pub(crate) struct Insert<'a> {
    pub event: &'a NewEvent,
    pub seq: i64,
    pub stream_version: Option<i64>,
}

/// What to write for a batch.
pub(crate) struct Plan<'a> {
    pub inserts: Vec<Insert<'a>>,
    pub outcomes: Vec<AppendOutcome>,
    /// Projections touched by the batch, after applying it.
    pub conversations: HashMap<String, ConversationState>,
    /// Every workflow's verdict on every new event.
    pub decisions: Vec<MatchRecord>,
    /// The runs the new events start.
    pub runs: Vec<NewRun>,
    /// Setup answers known without lookups: (sequence, event id, answer).
    pub answers: Vec<(i64, String, PreparedAnswer)>,
}

/// Plans a batch. `last_seq` is the highest stored sequence; `conversations`
/// holds the stored projections of the conversations in the batch.
pub(crate) fn plan<'a>(
    batch: &'a [NewEvent],
    mut existing: Existing,
    last_seq: i64,
    mut conversations: HashMap<String, ConversationState>,
    dispatcher: &dyn Dispatcher,
) -> Plan<'a> {
    let mut next_seq = last_seq + 1;
    let mut inserts = Vec::new();
    let mut decisions = Vec::new();
    let mut runs = Vec::new();
    let mut answers = Vec::new();
    let mut outcomes = Vec::with_capacity(batch.len());
    for event in batch {
        let key = event.idempotency_key.as_str();
        let id = event.envelope.id.as_str();
        if let Some(original) = existing.by_key.get(key) {
            outcomes.push(AppendOutcome::Duplicate {
                original: original.clone(),
                of: DuplicateOf::IdempotencyKey,
            });
            continue;
        }
        if let Some(original) = existing.by_event_id.get(id) {
            outcomes.push(AppendOutcome::Duplicate {
                original: original.clone(),
                of: DuplicateOf::EventId,
            });
            continue;
        }
        let seq = next_seq;
        next_seq += 1;
        let mut before = None;
        let stream_version = event.envelope.conversation_id.as_ref().map(|conv| {
            let state = conversations
                .entry(conv.to_string())
                .or_insert_with(|| ConversationState::new(conv.as_str()));
            before = Some(state.clone());
            state.apply(seq, &event.envelope, event.received_at);
            state.event_count
        });
        let after = event
            .envelope
            .conversation_id
            .as_ref()
            .and_then(|c| conversations.get(c.as_str()));
        if event.envelope.event_type == crate::operator::envelope::EventKind::SETUP
            && let Some(answer) = dispatcher.setup_answer(event, after)
        {
            answers.push((seq, id.to_owned(), answer));
        }
        let decisions_of_event = dispatcher.dispatch(event, before.as_ref(), after);
        let dispatch = dispatch_span(event, &decisions_of_event);
        let trace_context = crate::telemetry::traceparent(&dispatch);
        for d in decisions_of_event {
            if d.matched {
                runs.push(NewRun {
                    run_id: format!("run_{}", uuid::Uuid::new_v4().simple()),
                    workflow: d.workflow.clone(),
                    event_seq: seq,
                    event_id: id.to_owned(),
                    conversation_id: event
                        .envelope
                        .conversation_id
                        .as_ref()
                        .map(|c| c.to_string()),
                    context: d.context.unwrap_or_default(),
                    created_at: event.received_at,
                    trace_context: trace_context.clone(),
                    version: d.version.clone(),
                    ordered: d.ordered,
                    held: false,
                });
            }
            decisions.push(MatchRecord {
                event_seq: seq,
                workflow: d.workflow,
                matched: d.matched,
                reason: d.reason,
            });
        }
        let reference = EventRef {
            seq,
            event_id: id.to_owned(),
            event_type: event.envelope.event_type.clone(),
        };
        existing.by_key.insert(key.to_owned(), reference.clone());
        existing
            .by_event_id
            .insert(id.to_owned(), reference.clone());
        outcomes.push(AppendOutcome::Appended {
            event: reference,
            stream_version,
        });
        inserts.push(Insert {
            event,
            seq,
            stream_version,
        });
    }
    conversations.retain(|_, state| state.last_seq > last_seq);
    Plan {
        inserts,
        outcomes,
        conversations,
        decisions,
        runs,
        answers,
    }
}

/// The `dispatch` span of a new event, under its `webhook` span: each
/// workflow's verdict is a span event; matched workflows are also attributes.
fn dispatch_span(event: &NewEvent, decisions: &[super::model::DispatchDecision]) -> tracing::Span {
    let matched: Vec<&str> = decisions
        .iter()
        .filter(|d| d.matched)
        .map(|d| d.workflow.as_str())
        .collect();
    let span = tracing::info_span!(
        parent: &event.span,
        "dispatch",
        operator.event.id = %event.envelope.id,
        operator.event.type = %event.envelope.event_type,
        operator.conversation.id = event.envelope.conversation_id.as_ref().map(|c| c.as_str()),
        operator.agent.id = event.envelope.agent_id.as_ref().map(|a| a.as_str()),
        switchboard.workflows.evaluated = decisions.len(),
        switchboard.workflows.matched = %matched.join(","),
    );
    if crate::telemetry::tracing_enabled() {
        use tracing_opentelemetry::OpenTelemetrySpanExt;
        for d in decisions {
            span.add_event(
                "match decision",
                vec![
                    opentelemetry::KeyValue::new("switchboard.workflow", d.workflow.clone()),
                    opentelemetry::KeyValue::new("switchboard.matched", d.matched),
                    opentelemetry::KeyValue::new(
                        "switchboard.reason",
                        d.reason.clone().unwrap_or_default(),
                    ),
                ],
            );
        }
    }
    span
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::model::NoWorkflows;

    fn new_event(id: &str, key: &str) -> NewEvent {
        let body = format!(
            r#"{{"id":"{id}","conversation_id":"conv_1","payload":{{"type":"conversation.ended","status":"completed"}}}}"#
        );
        NewEvent::of_body(body, key)
    }

    #[test]
    fn numbers_new_events_and_folds_duplicates_within_the_batch() {
        let batch = vec![
            new_event("ev_a", "k1"),
            new_event("ev_a", "k1"), // same delivery, retried concurrently
            new_event("ev_a", "k2"), // same event, new key
            new_event("ev_b", "k3"),
        ];
        let plan = plan(
            &batch,
            Existing::default(),
            41,
            HashMap::new(),
            &NoWorkflows,
        );
        assert_eq!(plan.inserts.len(), 2);
        assert_eq!(plan.inserts[0].seq, 42);
        assert_eq!(plan.inserts[1].seq, 43);
        assert_eq!(plan.inserts[1].stream_version, Some(2));
        assert!(matches!(
            &plan.outcomes[1],
            AppendOutcome::Duplicate { original, of: DuplicateOf::IdempotencyKey } if original.seq == 42
        ));
        assert!(matches!(
            &plan.outcomes[2],
            AppendOutcome::Duplicate { original, of: DuplicateOf::EventId } if original.seq == 42
        ));
        assert_eq!(plan.conversations["conv_1"].event_count, 2);
    }

    #[test]
    fn stored_duplicates_write_nothing() {
        let batch = vec![new_event("ev_a", "k1")];
        let mut existing = Existing::default();
        let stored = EventRef {
            seq: 7,
            event_id: "ev_a".into(),
            event_type: "conversation.ended".into(),
        };
        existing.by_event_id.insert("ev_a".into(), stored.clone());
        let plan = plan(&batch, existing, 9, HashMap::new(), &NoWorkflows);
        assert!(plan.inserts.is_empty());
        assert!(plan.conversations.is_empty());
        assert_eq!(plan.outcomes[0].event(), &stored);
    }

    #[test]
    fn bind_counts_match_the_insert_builders() {
        use crate::store::model::{MatchRecord, NewRun, PreparedAnswer};
        use crate::store::sql;
        // One row of each insert, in PostgreSQL's numbered placeholders.
        fn binds(write: impl FnOnce(&mut sql::Statements<sqlx::Postgres>)) -> usize {
            let mut w = sql::Statements::writes();
            write(&mut w);
            let texts = w.texts();
            assert_eq!(texts.len(), 1, "one statement");
            texts[0].matches('$').count()
        }
        let event = new_event("ev_a", "k1");
        let insert = Insert {
            event: &event,
            seq: 1,
            stream_version: Some(1),
        };
        assert_eq!(
            binds(|w| sql::insert_events(w, std::slice::from_ref(&insert))),
            EVENT_BINDS
        );
        let state = ConversationState::new("conv_1");
        assert_eq!(
            binds(|w| sql::upsert_conversations(w, &[&state])),
            CONVERSATION_BINDS
        );
        let decision = MatchRecord {
            event_seq: 1,
            workflow: "w".into(),
            matched: true,
            reason: None,
        };
        assert_eq!(
            binds(|w| sql::insert_decisions(w, &[decision])),
            DECISION_BINDS
        );
        let answer = PreparedAnswer {
            workflow: None,
            body: "{}".into(),
            fallback_reason: None,
        };
        assert_eq!(
            binds(|w| sql::insert_answers(w, &[(1, "ev_a".into(), answer)])),
            ANSWER_BINDS
        );
        let run = NewRun {
            run_id: "r".into(),
            workflow: "w".into(),
            event_seq: 1,
            event_id: "ev_a".into(),
            conversation_id: None,
            context: serde_json::json!({}),
            created_at: chrono::Utc::now(),
            trace_context: None,
            version: None,
            ordered: true,
            held: false,
        };
        assert_eq!(
            binds(|w| sql::insert_runs(w, &[run], None, false)),
            RUN_BINDS
        );
        // 256 events, each matching 40 workflows, fit in statements under both limits.
        for db in ["PostgreSQL", "SQLite"] {
            let per_statement = rows_per_statement(db, RUN_BINDS);
            assert!(per_statement * RUN_BINDS <= max_binds(db));
            assert!(per_statement < 256 * 40);
        }
    }
}
