//! Admin API beyond events and runs, on SQLite and PostgreSQL: conversations
//! (now and as of a log position), cancelling a run, reloading workflows.

mod common;

use std::time::Duration;

use common::sink::Sink;
use common::{TestApp, TestDb, ended_body};
use serde_json::json;

fn field(id: &str, conv: &str, key: &str, value: serde_json::Value) -> Vec<u8> {
    json!({"id": id, "conversation_id": conv, "agent_id": "ca_api@v2", "livemode": true, "created_at": format!("2025-07-14T15:00:0{}Z", id.len() % 10),
        "payload": {"type": "conversation.custom_fields.updated", "key": key, "value": value}})
    .to_string()
    .into_bytes()
}

async fn conversations_now_and_as_of_a_point_in_the_log(db: &TestDb) {
    let app = TestApp::spawn(db).await;
    let conv = "conv_Qao75vrxIqo";
    app.deliver(&common::fixture("conversation_setup_inbound_phone.json"))
        .await; // seq 1
    app.deliver(&field("ev_f1", conv, "lead_status", json!("new")))
        .await; // seq 2
    app.deliver(&field("ev_f22", conv, "lead_status", json!("contacted")))
        .await; // seq 3
    app.deliver(&common::fixture("conversation_ended_completed.json"))
        .await; // seq 4
    app.deliver(&field("ev_f333", conv, "lead_status", json!("qualified")))
        .await; // seq 5
    app.deliver(&ended_body("ev_other", "conv_other", "busy"))
        .await; // seq 6

    let (status, now) = app
        .admin_get(&format!("/api/v1/conversations/{conv}"))
        .await;
    assert_eq!(status, 200, "{now}");
    assert_eq!(now["status"], "completed");
    assert_eq!(now["direction"], "inbound");
    assert_eq!(now["custom_fields"]["lead_status"], "qualified");
    assert_eq!(now["event_count"], 5);
    let history: Vec<&str> = now["custom_field_history"]["lead_status"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["value"].as_str().unwrap())
        .collect();
    assert_eq!(history, vec!["new", "contacted", "qualified"]);
    assert_eq!(now["events"].as_array().unwrap().len(), 5);

    let (_, then) = app
        .admin_get(&format!("/api/v1/conversations/{conv}?as_of=3"))
        .await;
    assert_eq!(then["as_of"], 3);
    assert_eq!(then["status"], "setup");
    assert_eq!(then["custom_fields"]["lead_status"], "contacted");
    assert_eq!(
        then["custom_field_history"]["lead_status"]
            .as_array()
            .unwrap()
            .len(),
        2
    );
    assert_eq!(then["events"].as_array().unwrap().len(), 3);

    let (_, list) = app.admin_get("/api/v1/conversations").await;
    let ids: Vec<&str> = list["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, vec!["conv_other", conv], "most recently active first");
    let (_, busy) = app.admin_get("/api/v1/conversations?status=busy").await;
    assert_eq!(busy["data"].as_array().unwrap().len(), 1);
    let (_, by_agent) = app
        .admin_get("/api/v1/conversations?agent_id=ca_api@v2")
        .await;
    assert_eq!(by_agent["data"][0]["id"], conv);
    let (_, page) = app.admin_get("/api/v1/conversations?limit=1").await;
    let cursor = page["next_cursor"].as_str().unwrap().to_owned();
    let (_, page2) = app
        .admin_get(&format!("/api/v1/conversations?limit=1&cursor={cursor}"))
        .await;
    assert_eq!(page2["data"][0]["id"], conv);

    let (status, err) = app.admin_get("/api/v1/conversations/conv_nope").await;
    assert_eq!(
        (status, err["error"]["code"].as_str()),
        (404, Some("not_found"))
    );
    let r = app
        .client
        .get(app.url("/api/v1/conversations"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
}

async fn a_waiting_run_can_be_cancelled(db: &TestDb) {
    let sink = Sink::start().await;
    let wf = format!(
        "on: {{ event: conversation.ended }}\nsteps:\n  - id: post\n    http: {{ url: \"{}\" }}\n    retry: {{ max_attempts: 5, backoff: fixed, initial_delay: 2s }}\n",
        sink.url("/status/503/x")
    );
    let (app, _dir) = TestApp::with_workflows(db, &[("c.yaml", &wf)]).await;
    app.deliver(&ended_body("ev_cancel", "conv_cancel", "completed"))
        .await;
    sink.wait_for("/status/503", 1, 10).await;
    let run_id = loop {
        let (_, page) = app.admin_get("/api/v1/runs?status=retrying").await;
        if let Some(id) = page["data"][0]["id"].as_str() {
            break id.to_owned();
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let (status, run) = app
        .admin_post(&format!("/api/v1/runs/{run_id}/cancel"))
        .await;
    assert_eq!(status, 200, "{run}");
    assert_eq!(run["status"], "cancelled");
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert_eq!(
        sink.received_on("/status/503").len(),
        1,
        "no attempt after the cancel"
    );
    let (status, _) = app
        .admin_post(&format!("/api/v1/runs/{run_id}/cancel"))
        .await;
    assert_eq!(status, 409);
    let (status, _) = app.admin_post("/api/v1/runs/run_nope/cancel").await;
    assert_eq!(status, 404);
}

async fn reloading_broken_workflows_keeps_the_old_set(db: &TestDb) {
    let sink = Sink::start().await;
    let first = format!(
        "on: {{ event: conversation.ended }}\nsteps:\n  - id: a\n    http: {{ url: \"{}\" }}\n",
        sink.url("/ok/first")
    );
    let (app, dir) = TestApp::with_workflows(db, &[("first.yaml", &first)]).await;
    std::fs::write(
        dir.path().join("broken.yaml"),
        "on: { event: conversation.ended }\nstepz: []\n",
    )
    .unwrap();
    let (status, err) = app.admin_post("/api/v1/workflows/reload").await;
    assert_eq!(status, 422, "{err}");
    assert_eq!(err["error"]["code"], "invalid_workflows");
    assert!(
        err["error"]["message"]
            .as_str()
            .unwrap()
            .contains("broken.yaml:2:1"),
        "{err}"
    );
    let (_, list) = app.admin_get("/api/v1/workflows").await;
    assert_eq!(
        list.as_array().unwrap().len(),
        1,
        "the old set stays in force"
    );
    app.deliver(&ended_body("ev_r1", "conv_r1", "completed"))
        .await;
    sink.wait_for("/ok/first", 1, 10).await;

    std::fs::remove_file(dir.path().join("broken.yaml")).unwrap();
    let second = format!(
        "on: {{ event: conversation.ended }}\nsteps:\n  - id: b\n    http: {{ url: \"{}\" }}\n",
        sink.url("/ok/second")
    );
    std::fs::write(dir.path().join("second.yaml"), second).unwrap();
    let (status, body) = app.admin_post("/api/v1/workflows/reload").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["workflows"], json!(["first", "second"]));
    app.deliver(&ended_body("ev_r2", "conv_r2", "completed"))
        .await;
    sink.wait_for("/ok/second", 1, 10).await;
}

async fn the_docs_ui_and_the_spec_are_served_without_a_token(db: &TestDb) {
    let app = TestApp::spawn(db).await;
    let docs = app.client.get(app.url("/docs")).send().await.unwrap();
    assert_eq!(docs.status(), 200);
    let html = docs.text().await.unwrap();
    assert!(html.contains("swagger-ui"), "Swagger UI page");
    let spec: serde_json::Value = app
        .client
        .get(app.url("/openapi.json"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        spec,
        serde_json::from_str::<serde_json::Value>(&switchboard::api::spec_json()).unwrap()
    );
    assert!(spec["components"]["securitySchemes"]["AdminAuth"]["scheme"] == "bearer");
}

on_both_backends!(
    the_docs_ui_and_the_spec_are_served_without_a_token,
    conversations_now_and_as_of_a_point_in_the_log,
    a_waiting_run_can_be_cancelled,
    reloading_broken_workflows_keeps_the_old_set,
);
