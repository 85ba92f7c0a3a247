//! Validator messages and trigger matching.

use std::path::Path;

use serde_json::{Value, json};

use super::matching::{Decision, EventFacts, decide};
use super::*;
use crate::store::projection::ConversationState;
use crate::webhook::envelope::Envelope;

fn check(yaml: &str) -> Result<Workflow, Vec<Diagnostic>> {
    compile::compile(Path::new("wf/test.yaml"), yaml).map(|(w, _)| w)
}

fn errors(yaml: &str) -> Vec<String> {
    check(yaml)
        .expect_err("should not validate")
        .into_iter()
        .filter(|d| d.is_error())
        .map(|d| d.to_string())
        .collect()
}

const GOOD: &str = r#"
description: Post finished calls to the CRM
on:
  event: conversation.ended
  status: [completed, voicemail]
when: event.livemode
secrets: [CRM_TOKEN]
steps:
  - id: post-call
    if: event.payload.status != "voicemail"
    http:
      url: "https://crm.example.com/calls/{{ event.conversation_id }}"
      headers: { Authorization: "Bearer {{ secrets.CRM_TOKEN }}" }
      query: { source: operator }
      json:
        conversation: "{{ event.conversation_id }}"
        live: "{{ event.livemode }}"
    timeout: 10s
    retry:
      max_attempts: 5
      backoff: exponential
      initial_delay: 1s
      max_delay: 10m
  - id: notify
    http:
      method: post
      url: "https://hooks.example.com/{{ steps['post-call'].json.id }}"
      body: "done {{ steps['post-call'].status }}"
      content_type: text/plain
"#;

#[test]
fn the_documented_example_validates() {
    let wf = check(GOOD).unwrap();
    assert_eq!(wf.name, "test");
    assert_eq!(
        wf.trigger,
        Trigger::Ended {
            statuses: Some(vec!["completed".into(), "voicemail".into()])
        }
    );
    assert_eq!(wf.steps.len(), 2);
    assert_eq!(wf.steps[1].http.method, "POST");
    assert_eq!(wf.steps[0].retry.max_delay, Duration::from_secs(600));
    assert_eq!(wf.steps[1].retry, RetryPolicy::default());
}

#[test]
fn unknown_keys_are_errors_with_a_position() {
    let e = errors("on:\n  event: conversation.ended\nstepz: []\n");
    assert_eq!(e.len(), 1);
    assert!(e[0].starts_with("wf/test.yaml:3:"), "{}", e[0]);
    assert!(e[0].contains("stepz"), "{}", e[0]);
}

#[test]
fn messages_name_line_column_and_caret() {
    let yaml = "on:\n  event: conversation.ended\n  status: finished\nsteps:\n  - id: a\n    http: { url: \"https://x/{{ steps.b.json }}\" }\n  - id: a\n    timeout: soon\n    http: { url: \"https://x/{{ secrets.NOPE }}\" }\n";
    let e = errors(yaml).join("\n");
    assert!(
        e.contains("wf/test.yaml:3:11: error: `finished` is not a conversation.ended status"),
        "{e}"
    );
    assert!(e.contains("3 |   status: finished\n  |           ^"), "{e}");
    assert!(e.contains("steps.b, but no step has id `b`"), "{e}");
    assert!(e.contains("step id `a` is used twice"), "{e}");
    assert!(e.contains("`timeout`: `soon` is not a duration"), "{e}");
    assert!(e.contains("secrets.NOPE, which is not declared"), "{e}");
}

#[test]
fn steps_can_only_read_earlier_steps() {
    let yaml = "on: { event: conversation.ended }\nsteps:\n  - id: first\n    http: { url: \"https://x/{{ steps.second.json.id }}\" }\n  - id: second\n    http: { url: \"https://x\" }\n";
    let e = errors(yaml).join("\n");
    assert!(e.contains("steps.second, which runs later"), "{e}");
}

#[test]
fn templates_and_expressions_must_compile() {
    let e = errors("on: { event: conversation.ended }\nwhen: event.livemode ==\nsteps:\n  - id: a\n    http: { url: \"https://x/{{ oops\" }\n").join("\n");
    assert!(e.contains("`when` does not compile"), "{e}");
    assert!(e.contains("`http.url` does not compile"), "{e}");
}

#[test]
fn trigger_rules() {
    let e = errors("on: { event: conversation.custom_fields.updated }\n").join("\n");
    assert!(e.contains("needs `on.field`"), "{e}");
    let e = errors("on: { event: conversation.ended, field: x }\n").join("\n");
    assert!(e.contains("`on.field` only applies"), "{e}");
    let e = errors("on: { event: conversation.ended }\nrespond: { context: {} }\n").join("\n");
    assert!(e.contains("`respond` is only for"), "{e}");
    let e = errors("on: { event: conversation.ended }\nsteps:\n  - id: a\n    http: { url: \"https://x\" }\n    retry: { max_attempts: 0, backoff: linear }\n").join("\n");
    assert!(e.contains("at least 1") && e.contains("`linear`"), "{e}");
}

#[test]
fn setup_deadline_shorter_than_a_step_is_a_warning() {
    let yaml = "on: { event: conversation.setup }\ndeadline: 1s\nsteps:\n  - id: lookup\n    http: { url: \"https://x\", method: GET }\n    timeout: 2s\nrespond: { context: { a: \"{{ steps.lookup.json.a }}\" } }\n";
    let (_, warnings) = compile::compile(Path::new("s.yaml"), yaml).unwrap();
    assert!(
        warnings
            .iter()
            .any(|w| w.message.contains("deadline is 1s")),
        "{warnings:?}"
    );
}

#[test]
fn duplicate_names_across_files() {
    let a = (
        PathBuf::from("a.yaml"),
        "name: same\non: { event: conversation.ended }\n".to_owned(),
    );
    let b = (
        PathBuf::from("b.yaml"),
        "name: same\non: { event: conversation.ended }\n".to_owned(),
    );
    let e = WorkflowSet::from_sources(Path::new("."), vec![a, b]).unwrap_err();
    assert!(
        e[0].to_string()
            .starts_with("b.yaml:1:1: error: workflow name `same` is already used by a.yaml"),
        "{}",
        e[0]
    );
}

fn envelope(payload: Value) -> (Envelope, Value) {
    let body =
        json!({"id": "ev_1", "conversation_id": "conv_1", "livemode": true, "payload": payload});
    (Envelope::parse(body.to_string().as_bytes()).unwrap(), body)
}

fn decide_on(yaml: &str, payload: Value, before: Option<&ConversationState>) -> Decision {
    let wf = check(yaml).unwrap();
    let (env, json) = envelope(payload);
    decide(
        &wf,
        &EventFacts {
            envelope: &env,
            event_json: &json,
            before,
            after: before,
        },
    )
}

#[test]
fn status_filters() {
    let yaml = "on: { event: conversation.ended, status: [completed, voicemail] }\n";
    assert!(
        decide_on(
            yaml,
            json!({"type": "conversation.ended", "status": "completed"}),
            None
        )
        .matched()
    );
    let d = decide_on(
        yaml,
        json!({"type": "conversation.ended", "status": "busy"}),
        None,
    );
    assert_eq!(
        d.reason(),
        Some("status is `busy`, not one of [completed, voicemail]")
    );
    let d = decide_on(yaml, json!({"type": "conversation.setup"}), None);
    assert!(
        d.reason()
            .unwrap()
            .contains("event type is conversation.setup")
    );
    let when = "on: { event: conversation.ended }\nwhen: not event.livemode\n";
    assert_eq!(
        decide_on(when, json!({"type": "conversation.ended"}), None).reason(),
        Some("`when: not event.livemode` is false")
    );
}

#[test]
fn field_transitions() {
    let yaml = "on: { event: conversation.custom_fields.updated, field: lead_status, from: [new, contacted], to: qualified }\n";
    let upd = |prev: Option<&str>, value: &str| {
        let mut p = json!({"type": "conversation.custom_fields.updated", "key": "lead_status", "value": value});
        if let Some(prev) = prev {
            p["previous_value"] = json!(prev);
        }
        p
    };
    assert!(decide_on(yaml, upd(Some("new"), "qualified"), None).matched());
    assert!(
        decide_on(yaml, upd(Some("lost"), "qualified"), None)
            .reason()
            .unwrap()
            .contains("was \"lost\"")
    );
    assert!(
        decide_on(yaml, upd(Some("new"), "lost"), None)
            .reason()
            .unwrap()
            .contains("became \"lost\"")
    );
    // Without previous_value, the projection supplies it.
    let mut state = ConversationState::new("conv_1");
    let (setter, _) = envelope(
        json!({"type": "conversation.custom_fields.updated", "key": "lead_status", "value": "contacted"}),
    );
    state.apply(1, &setter, chrono::Utc::now());
    assert!(decide_on(yaml, upd(None, "qualified"), Some(&state)).matched());
    assert!(
        decide_on(yaml, upd(None, "qualified"), None)
            .reason()
            .unwrap()
            .contains("was null (not set)")
    );
    // A value that did not really change never fires.
    let any = "on: { event: conversation.custom_fields.updated, field: lead_status }\n";
    assert!(
        decide_on(any, upd(Some("x"), "x"), None)
            .reason()
            .unwrap()
            .contains("did not change")
    );
    // `from: null` means "was not set".
    let first =
        "on: { event: conversation.custom_fields.updated, field: lead_status, from: null }\n";
    assert!(decide_on(first, upd(None, "new"), None).matched());
    assert!(!decide_on(first, upd(None, "new"), Some(&state)).matched());
    assert!(
        decide_on(
            any,
            json!({"type": "conversation.custom_fields.updated", "key": "other", "value": 1}),
            None
        )
        .reason()
        .unwrap()
        .contains("`other` changed")
    );
}

#[test]
fn change_is_the_transition_matching_used() {
    let change_of = |payload: Value, before: Option<&ConversationState>| {
        let (env, json) = envelope(payload);
        let facts = EventFacts {
            envelope: &env,
            event_json: &json,
            before,
            after: before,
        };
        (
            super::matching::change_json(&facts),
            super::matching::base_context(&facts).get("change").cloned(),
        )
    };
    let upd = |prev: Option<Value>, value: &str| {
        let mut p = json!({"type": "conversation.custom_fields.updated", "key": "lead_status", "value": value});
        if let Some(prev) = prev {
            p["previous_value"] = prev;
        }
        p
    };
    let mut state = ConversationState::new("conv_1");
    let (setter, _) = envelope(upd(None, "contacted"));
    state.apply(1, &setter, chrono::Utc::now());
    // From the payload, even when history says otherwise; an explicit null is "was not set".
    let (change, in_ctx) = change_of(upd(Some(json!("new")), "qualified"), Some(&state));
    assert_eq!(
        change,
        Some(
            json!({"field": "lead_status", "from": "new", "to": "qualified", "from_source": "payload"})
        )
    );
    assert_eq!(in_ctx, change);
    let (change, _) = change_of(upd(Some(Value::Null), "qualified"), Some(&state));
    assert_eq!(change.unwrap()["from"], Value::Null);
    // Left out: from history, or null when the field was never set.
    let (change, _) = change_of(upd(None, "qualified"), Some(&state));
    assert_eq!(
        change,
        Some(
            json!({"field": "lead_status", "from": "contacted", "to": "qualified", "from_source": "history"})
        )
    );
    let (change, _) = change_of(upd(None, "qualified"), None);
    assert_eq!(change.unwrap()["from"], Value::Null);
    // Other events have no `change`.
    let (change, in_ctx) = change_of(
        json!({"type": "conversation.ended", "status": "completed"}),
        None,
    );
    assert_eq!((change, in_ctx), (None, None));
}

#[test]
fn an_unknown_name_points_at_itself_not_at_the_same_word_earlier() {
    let mut e = errors(
        "on: { event: conversation.ended }\nwhen: event.id == \"evnt\" and evnt.x\nsteps:\n  - id: a\n    http: { url: 'https://x/evnt/{{ evnt.id }}' }\n    if: >\n      event.id ==\n        evnt.id\n",
    );
    assert_eq!(e.len(), 3, "{e:?}");
    e.sort();
    assert!(
        e[0].starts_with("wf/test.yaml:2:30: error: `when`: unknown variable `evnt`"),
        "{}",
        e[0]
    );
    assert!(
        e[1].starts_with("wf/test.yaml:5:37: error: `http.url`: unknown variable `evnt`"),
        "{}",
        e[1]
    );
    // A folded scalar: found on the template's own line.
    assert!(
        e[2].starts_with("wf/test.yaml:8:9: error: `if`: unknown variable `evnt`"),
        "{}",
        e[2]
    );
}

#[test]
fn the_version_hash_ignores_comments_whitespace_and_key_order_but_not_content() {
    use super::compile::version_hash;
    let a = "on: { event: conversation.ended }\nsteps:\n  - id: a\n    http: { url: \"http://127.0.0.1/a\" }\n";
    let b = "# comment\nsteps:\n  - http:\n      url:  'http://127.0.0.1/a'\n    id: a\non:\n  event: conversation.ended\n";
    let c = a.replace("/a\"", "/b\"");
    assert_eq!(version_hash("w", a), version_hash("w", b));
    assert_ne!(version_hash("w", a), version_hash("w", &c));
    assert_ne!(
        version_hash("w", a),
        version_hash("x", a),
        "the name is part of it"
    );
    assert_eq!(version_hash("w", a).len(), 64);
}
