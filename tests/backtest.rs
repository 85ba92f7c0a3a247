//! Backtests on SQLite and PostgreSQL: matches, non-matches with reasons,
//! rendered requests with secrets masked, history as of each event; the
//! sink receives nothing. Also the `switchboard backtest` command.

mod common;

use common::sink::Sink;
use common::{TestApp, TestDb, ended_body};
use serde_json::{Value, json};

fn field(id: &str, conv: &str, value: &str) -> Vec<u8> {
    json!({"id": id, "conversation_id": conv, "livemode": true, "created_at": "2025-07-14T15:00:00Z",
        "payload": {"type": "conversation.custom_fields.updated", "key": "lead_status", "value": value}})
    .to_string()
    .into_bytes()
}

async fn backtest(app: &TestApp, body: Value) -> (u16, Value) {
    let resp = app
        .client
        .post(app.url("/api/v1/workflows/backtest"))
        .bearer_auth(common::TOKEN)
        .json(&body)
        .send()
        .await
        .unwrap();
    let status = resp.status().as_u16();
    (status, resp.json().await.unwrap())
}

async fn a_backtest_reports_matches_reasons_and_requests_and_sends_nothing(db: &TestDb) {
    let sink = Sink::start().await;
    let app = TestApp::spawn(db).await;
    app.deliver(&ended_body("ev_b1", "conv_b1", "completed"))
        .await;
    app.deliver(&ended_body("ev_b2", "conv_b2", "busy")).await;
    app.deliver(&field("ev_l1", "conv_l", "new")).await;
    app.deliver(&field("ev_l2", "conv_l", "qualified")).await;
    app.deliver(&field("ev_l3", "conv_l", "lost")).await;

    let wf = format!(
        "name: crm-draft\non: {{ event: conversation.ended, status: completed }}\nsecrets: [CRM_TOKEN_BT]\nsteps:\n  - id: first\n    http:\n      url: \"{}\"\n      headers: {{ Authorization: \"Bearer {{{{ secrets.CRM_TOKEN_BT }}}}\" }}\n      json: {{ conv: \"{{{{ event.conversation_id }}}}\" }}\n  - id: second\n    http: {{ url: \"{}/{{{{ steps.first.json.id }}}}\" }}\n",
        sink.url("/ok/crm"),
        sink.url("/ok/next")
    );
    let (status, report) = backtest(&app, json!({"workflow": wf})).await;
    assert_eq!(status, 200, "{report}");
    assert_eq!(report["workflow"], "crm-draft");
    assert_eq!(
        (report["evaluated"].as_u64(), report["matched"].as_u64()),
        (Some(2), Some(1))
    );
    let events = report["events"].as_array().unwrap();
    assert_eq!(events[0]["event_id"], "ev_b1");
    assert_eq!(events[0]["matched"], true);
    let first = &events[0]["requests"][0]["request"];
    assert_eq!(first["method"], "POST");
    assert_eq!(first["url"], sink.url("/ok/crm"));
    assert_eq!(first["headers"]["Authorization"], "Bearer ***");
    assert_eq!(first["body"], json!({"conv": "conv_b1"}));
    assert!(
        events[0]["requests"][1]["note"]
            .as_str()
            .unwrap()
            .contains("earlier step")
    );
    assert_eq!(
        events[1]["reason"],
        "status is `busy`, not one of [completed]"
    );

    // A transition judged with the conversation as it was at each event.
    let transition = "on: { event: conversation.custom_fields.updated, field: lead_status, from: new, to: qualified }\nsteps: []\n";
    let (_, report) = backtest(
        &app,
        json!({"workflow": transition, "conversation_id": "conv_l"}),
    )
    .await;
    let verdicts: Vec<(bool, String)> = report["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["matched"].as_bool().unwrap(),
                e["reason"].as_str().unwrap_or("").to_owned(),
            )
        })
        .collect();
    assert_eq!(
        verdicts,
        vec![
            (
                false,
                "`lead_status` was null (not set), not one of [\"new\"]".to_owned()
            ),
            (true, String::new()),
            (
                false,
                "`lead_status` was \"qualified\", not one of [\"new\"]".to_owned()
            ),
        ]
    );

    let (status, err) = backtest(
        &app,
        json!({"workflow": "on: { event: conversation.ended }\nstepz: []\n"}),
    )
    .await;
    assert_eq!(status, 422);
    assert!(
        err["error"]["message"]
            .as_str()
            .unwrap()
            .contains("backtest.yaml:2:1"),
        "{err}"
    );
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    assert!(sink.received().is_empty(), "a backtest sends nothing");

    // The same from the command line, against the same database.
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("draft.yaml");
    std::fs::write(&file, &wf).unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_switchboard"))
        .args(["backtest", "--since", "1h", "--limit", "10"])
        .arg(&file)
        .env("SWITCHBOARD_DATABASE_URL", db.url())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("on 2 stored conversation.ended event(s): 1 would have run"),
        "{stdout}"
    );
    assert!(stdout.contains("✓ #1 ev_b1 (conv_b1)"), "{stdout}");
    assert!(
        stdout.contains("✗ #2 ev_b2 (conv_b2): status is `busy`"),
        "{stdout}"
    );
    assert!(sink.received().is_empty());
}

on_both_backends!(a_backtest_reports_matches_reasons_and_requests_and_sends_nothing,);
