//! Replays on SQLite and PostgreSQL: one event, in bulk with progress, never
//! duplicating a run still in flight.

mod common;

use std::time::{Duration, Instant};

use common::sink::Sink;
use common::{TestApp, TestDb, ended_body};
use serde_json::{Value, json};

async fn post(app: &TestApp, path: &str, body: Value) -> (u16, Value) {
    let resp = app
        .client
        .post(app.url(path))
        .bearer_auth(common::TOKEN)
        .json(&body)
        .send()
        .await
        .unwrap();
    let status = resp.status().as_u16();
    (status, resp.json().await.unwrap_or(Value::Null))
}

fn workflow(sink: &Sink, path: &str, retry: &str) -> String {
    format!(
        "on: {{ event: conversation.ended }}\nsteps:\n  - id: post\n    http: {{ url: \"{}\" }}\n{retry}",
        sink.url(path)
    )
}

async fn replaying_an_event_creates_a_new_run_with_new_keys(db: &TestDb) {
    let sink = Sink::start().await;
    let (app, _dir) =
        TestApp::with_workflows(db, &[("crm.yaml", &workflow(&sink, "/ok/crm", ""))]).await;
    app.deliver(&ended_body("ev_rp", "conv_rp", "completed"))
        .await;
    let original = app.wait_runs_final(1, 10).await.remove(0);
    let (status, outcomes) = post(&app, "/api/v1/events/ev_rp/replay", json!({})).await;
    assert_eq!(status, 200, "{outcomes}");
    let new_id = outcomes[0]["new_run_id"].as_str().unwrap().to_owned();
    assert_eq!(outcomes[0]["original_run_id"], original.run_id.as_str());
    let runs = app.wait_runs_final(2, 10).await;
    assert!(runs.iter().all(|r| r.status == "succeeded"));
    let got = sink.wait_for("/ok/crm", 2, 5).await;
    assert_ne!(
        got[0].headers["idempotency-key"], got[1].headers["idempotency-key"],
        "a replay has new keys"
    );
    assert_eq!(
        got[0].body, got[1].body,
        "and sees the context of the first time"
    );
    let (_, run) = app.admin_get(&format!("/api/v1/runs/{new_id}")).await;
    assert_eq!(run["replay_of"], original.run_id.as_str());
    let (status, _) = post(&app, "/api/v1/events/ev_nope/replay", json!({})).await;
    assert_eq!(status, 404);
    let (_, none) = post(
        &app,
        "/api/v1/events/ev_rp/replay",
        json!({"workflows": ["other"]}),
    )
    .await;
    assert_eq!(none, json!([]));
}

async fn a_run_still_in_flight_is_not_replayed(db: &TestDb) {
    let sink = Sink::start().await;
    let wf = workflow(
        &sink,
        "/status/503/x",
        "    retry: { max_attempts: 5, backoff: fixed, initial_delay: 10s }\n",
    );
    let (app, _dir) = TestApp::with_workflows(db, &[("w.yaml", &wf)]).await;
    app.deliver(&ended_body("ev_fl", "conv_fl", "completed"))
        .await;
    sink.wait_for("/status/503", 1, 10).await;
    let (status, outcomes) = post(&app, "/api/v1/events/ev_fl/replay", json!({})).await;
    assert_eq!(status, 200);
    assert!(outcomes[0]["new_run_id"].is_null());
    assert!(
        outcomes[0]["skipped"]
            .as_str()
            .unwrap()
            .contains("in flight")
    );
    let (_, page) = app.admin_get("/api/v1/runs").await;
    assert_eq!(page["data"].as_array().unwrap().len(), 1);
}

async fn a_bulk_replay_of_failed_runs_reports_progress(db: &TestDb) {
    let sink = Sink::start().await;
    let (app, _dir) = TestApp::with_workflows(
        db,
        &[
            ("bad.yaml", &workflow(&sink, "/status/400/x", "")),
            ("good.yaml", &workflow(&sink, "/ok/good", "")),
        ],
    )
    .await;
    for i in 0..4 {
        app.deliver(&ended_body(
            &format!("ev_bulk{i}"),
            &format!("conv_bulk{i}"),
            "completed",
        ))
        .await;
    }
    app.wait_runs_final(8, 10).await;
    let (status, replay) = post(
        &app,
        "/api/v1/replays",
        json!({"type": "conversation.ended", "only_failed": true}),
    )
    .await;
    assert_eq!(status, 200, "{replay}");
    assert_eq!(replay["total"], 4);
    let id = replay["id"].as_str().unwrap().to_owned();
    let deadline = Instant::now() + Duration::from_secs(10);
    let done = loop {
        let (_, r) = app.admin_get(&format!("/api/v1/replays/{id}")).await;
        if r["status"] == "succeeded" {
            break r;
        }
        assert!(Instant::now() < deadline, "replay did not finish: {r}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(
        (
            done["done"].as_i64(),
            done["runs_created"].as_i64(),
            done["failed"].as_i64()
        ),
        (Some(4), Some(4), Some(0))
    );
    let runs = app.wait_runs_final(12, 10).await;
    let replays: Vec<_> = runs.iter().filter(|r| r.replay_of.is_some()).collect();
    assert_eq!(replays.len(), 4);
    assert!(
        replays.iter().all(|r| r.workflow == "bad"),
        "only the failed runs were replayed"
    );
    let (status, _) = app
        .admin_post(&format!("/api/v1/replays/{id}/cancel"))
        .await;
    assert_eq!(status, 409, "a finished replay cannot be cancelled");
    let (status, _) = app.admin_get("/api/v1/replays/rpl_nope").await;
    assert_eq!(status, 404);
}

async fn a_running_bulk_replay_can_be_cancelled(db: &TestDb) {
    let app = TestApp::spawn(db).await;
    // A replay row as `POST /replays` leaves it while it works (no worker on it here).
    let replay = switchboard::store::runs::Replay {
        replay_id: "rpl_test".into(),
        filter: sqlx::types::Json(json!({})),
        status: "running".into(),
        total: 10,
        done: 3,
        runs_created: 3,
        skipped: 0,
        failed: 0,
        cursor_seq: 3,
        created_at: chrono::Utc::now(),
        finished_at: None,
        mode: "rerun".into(),
        // Leased to an instance that never comes back within the test.
        lease_owner: Some("elsewhere".into()),
        lease_until: Some(chrono::Utc::now() + chrono::TimeDelta::hours(1)),
        lease_token: 1,
    };
    app.store.create_replay(&replay).await.unwrap();
    let (status, body) = app.admin_post("/api/v1/replays/rpl_test/cancel").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["status"], "cancelled");
    assert!(!body["finished_at"].is_null());
    // Its worker's next progress save is refused, so it stops.
    let mut next = replay.clone();
    next.done = 4;
    assert!(!app.store.save_replay(&next).await.unwrap());
    let (_, after) = app.admin_get("/api/v1/replays/rpl_test").await;
    assert_eq!(
        (after["status"].as_str(), after["done"].as_i64()),
        (Some("cancelled"), Some(3))
    );
}

on_both_backends!(
    a_running_bulk_replay_can_be_cancelled,
    replaying_an_event_creates_a_new_run_with_new_keys,
    a_run_still_in_flight_is_not_replayed,
    a_bulk_replay_of_failed_runs_reports_progress,
);
