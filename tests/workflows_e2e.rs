//! Workflows end to end, on SQLite and PostgreSQL: the real server, real
//! HTTP to a local sink, runs and attempts read back.

mod common;

use common::sink::Sink;
use common::{TestApp, TestDb, ended_body};
use switchboard::store::runs::RunStatus;

fn on_ended(sink: &Sink, path: &str, extra: &str) -> String {
    format!(
        "on:\n  event: conversation.ended\n  status: [completed, voicemail]\nsteps:\n  - id: post\n    http:\n      url: \"{}\"\n      json:\n        conversation: \"{{{{ event.conversation_id }}}}\"\n        live: \"{{{{ event.livemode }}}}\"\n{extra}",
        sink.url(path)
    )
}

async fn a_status_filter_that_matches_and_one_that_does_not(db: &TestDb) {
    let sink = Sink::start().await;
    let (app, _dir) =
        TestApp::with_workflows(db, &[("crm.yaml", &on_ended(&sink, "/ok/crm", ""))]).await;
    assert_eq!(
        app.deliver(&ended_body("ev_m1", "conv_1", "completed"))
            .await
            .status(),
        200
    );
    assert_eq!(
        app.deliver(&ended_body("ev_m2", "conv_2", "busy"))
            .await
            .status(),
        200
    );
    let got = sink.wait_for("/ok/crm", 1, 10).await;
    let runs = app.wait_runs_final(1, 10).await;
    assert_eq!(runs.len(), 1, "only the completed call runs");
    assert_eq!(runs[0].status(), Some(RunStatus::Succeeded));
    assert_eq!(
        got[0].json(),
        serde_json::json!({"conversation": "conv_1", "live": true})
    );
    assert_eq!(
        got[0].headers["idempotency-key"],
        format!("{}:post", runs[0].run_id)
    );
    assert!(got[0].headers["user-agent"].starts_with("switchboard/"));
    assert!(got[0].headers["traceparent"].starts_with("00-"));
    let busy = app.store.get_event("ev_m2").await.unwrap().unwrap();
    let decisions = app.store.decisions(busy.event.seq).await.unwrap();
    assert_eq!(decisions.len(), 1);
    assert!(!decisions[0].matched);
    assert_eq!(
        decisions[0].reason.as_deref(),
        Some("status is `busy`, not one of [completed, voicemail]")
    );
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    assert_eq!(sink.received().len(), 1, "nothing else was sent");
}

on_both_backends!(a_status_filter_that_matches_and_one_that_does_not,);
