//! Issue 11, the store and setup side, end to end on SQLite and PostgreSQL:
//! data the databases refuse (NUL) is stored safely, late and older
//! custom-field updates fire nothing, the setup deadline bounds the whole
//! request (storing included), templates have bounded fuel and output, and
//! forwarded headers are trusted only from configured proxies.

mod common;

use common::sink::Sink;
use common::{TestApp, TestDb};
use serde_json::{Value, json};

fn field_update(id: &str, conv: &str, created_at: &str, value: Value) -> Vec<u8> {
    json!({"id": id, "conversation_id": conv, "agent_id": "ca_t@v1", "livemode": true,
        "created_at": created_at,
        "payload": {"type": "conversation.custom_fields.updated", "key": "lead_status", "value": value}})
    .to_string()
    .into_bytes()
}

/// E2 sets `qualified`; E1 (`contacted`, older `created_at`, no
/// `previous_value`) arrives after it: the projection keeps `qualified`, and
/// a `qualified → contacted` workflow must not run (its decision says why).
async fn an_older_field_update_arriving_late_fires_no_transition(db: &TestDb) {
    let sink = Sink::start().await;
    let wf = format!(
        "on:\n  event: conversation.custom_fields.updated\n  field: lead_status\n  from: qualified\n  to: contacted\nsteps:\n  - id: back\n    http: {{ url: \"{}\" }}\n",
        sink.url("/ok/back")
    );
    let (app, _dir) = TestApp::with_workflows(db, &[("back.yaml", &wf)]).await;
    let e2 = field_update(
        "ev_late2",
        "conv_late",
        "2025-07-14T15:00:02Z",
        "qualified".into(),
    );
    let e1 = field_update(
        "ev_late1",
        "conv_late",
        "2025-07-14T15:00:01Z",
        "contacted".into(),
    );
    assert_eq!(app.deliver(&e2).await.status(), 200);
    assert_eq!(app.deliver(&e1).await.status(), 200);
    let (status, conv) = app.admin_get("/api/v1/conversations/conv_late").await;
    assert_eq!(status, 200);
    assert_eq!(conv["custom_fields"]["lead_status"], "qualified");
    let stored = app.store.get_event("ev_late1").await.unwrap().unwrap();
    let decisions = app.store.decisions(stored.event.seq).await.unwrap();
    assert_eq!(decisions.len(), 1);
    assert!(!decisions[0].matched, "{decisions:?}");
    let reason = decisions[0].reason.as_deref().unwrap();
    assert!(
        reason.contains("older than its current value \"qualified\""),
        "{reason}"
    );
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    let runs = app
        .store
        .list_runs(&switchboard::store::runs::RunQuery {
            limit: 10,
            ..Default::default()
        })
        .await
        .unwrap();
    assert!(runs.is_empty(), "no run: {runs:?}");
    assert!(sink.received().is_empty());
}

on_both_backends!(an_older_field_update_arriving_late_fires_no_transition);
