//! Replays on SQLite and PostgreSQL: one event, in bulk with progress, never
//! duplicating a run still in flight.

mod common;

use std::time::{Duration, Instant};

use common::sink::Sink;
use common::{TestApp, TestDb, ended_body};
use serde_json::{Value, json};

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
    let (status, outcomes) = app
        .admin_post_json("/api/v1/events/ev_rp/replay", json!({}))
        .await;
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
    let (status, _) = app
        .admin_post_json("/api/v1/events/ev_nope/replay", json!({}))
        .await;
    assert_eq!(status, 404);
    let (_, none) = app
        .admin_post_json(
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
    let (status, outcomes) = app
        .admin_post_json("/api/v1/events/ev_fl/replay", json!({}))
        .await;
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
    let (status, replay) = app
        .admin_post_json(
            "/api/v1/replays",
            json!({"type": "conversation.ended", "only_failed": true}),
        )
        .await;
    assert_eq!(status, 200, "{replay}");
    assert_eq!(replay["total"], 4);
    let id = replay["id"].as_str().unwrap().to_owned();
    let done = app.wait_replay(&id, 10).await;
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

/// Replays use the workflow version loaded at replay time (and say so);
/// a retry keeps the run's own version.
async fn a_replay_runs_the_current_version_and_a_retry_its_own(db: &TestDb) {
    let sink = Sink::start().await;
    let (app, dir) = TestApp::with_workflows(
        db,
        &[
            ("good.yaml", &workflow(&sink, "/ok/v1", "")),
            ("bad.yaml", &workflow(&sink, "/status/400/v1", "")),
        ],
    )
    .await;
    app.deliver(&ended_body("ev_ver", "conv_ver", "completed"))
        .await;
    let originals = app.wait_runs_final(2, 10).await;
    let version_of = |list: &Value, name: &str| {
        list.as_array()
            .unwrap()
            .iter()
            .find(|w| w["name"] == name)
            .unwrap()["version"]
            .as_str()
            .unwrap()
            .to_owned()
    };
    let (_, list) = app.admin_get("/api/v1/workflows").await;
    let (good_v1, bad_v1) = (version_of(&list, "good"), version_of(&list, "bad"));
    std::fs::write(dir.path().join("good.yaml"), workflow(&sink, "/ok/v2", "")).unwrap();
    std::fs::write(
        dir.path().join("bad.yaml"),
        workflow(&sink, "/status/400/v2", ""),
    )
    .unwrap();
    let (status, body) = app.admin_post("/api/v1/workflows/reload").await;
    assert_eq!(status, 200, "{body}");
    let (_, list) = app.admin_get("/api/v1/workflows").await;
    let (good_v2, bad_v2) = (version_of(&list, "good"), version_of(&list, "bad"));
    assert_ne!(good_v1, good_v2);
    // One event's replay.
    let (status, outcomes) = app
        .admin_post_json(
            "/api/v1/events/ev_ver/replay",
            json!({"workflows": ["good"]}),
        )
        .await;
    assert_eq!(status, 200, "{outcomes}");
    assert_eq!(outcomes[0]["version"], good_v2.as_str(), "{outcomes}");
    let new_id = outcomes[0]["new_run_id"].as_str().unwrap().to_owned();
    sink.wait_for("/ok/v2", 1, 10).await;
    // The sink sees the request before the run's final state is saved.
    app.wait_runs_final(3, 10).await;
    let (_, run) = app.admin_get(&format!("/api/v1/runs/{new_id}")).await;
    assert_eq!(run["version"], good_v2.as_str());
    assert_eq!(run["status"], "succeeded");
    // A retry of the failed original keeps its version (and posts where v1 did).
    let bad = originals.iter().find(|r| r.workflow == "bad").unwrap();
    assert_eq!(bad.version.as_deref(), Some(bad_v1.as_str()));
    let (status, body) = app
        .admin_post(&format!("/api/v1/runs/{}/retry", bad.run_id))
        .await;
    assert_eq!(status, 200, "{body}");
    sink.wait_for("/status/400/v1", 2, 10).await;
    // Until its failure is saved the retried run is in flight, and a bulk
    // replay skips an event whose run of the workflow is still in flight.
    app.wait_runs_final(3, 10).await;
    let (_, run) = app.admin_get(&format!("/api/v1/runs/{}", bad.run_id)).await;
    assert_eq!(run["version"], bad_v1.as_str(), "a retry keeps its version");
    // A bulk replay says which versions its runs execute, and they do.
    let (status, replay) = app
        .admin_post_json("/api/v1/replays", json!({"workflows": ["bad"]}))
        .await;
    assert_eq!(status, 200, "{replay}");
    assert_eq!(
        replay["versions"],
        json!({"bad": bad_v2, "good": good_v2}),
        "{replay}"
    );
    sink.wait_for("/status/400/v2", 1, 10).await;
    assert!(sink.received_on("/status/400/v1").len() == 2);
}

/// The lease on a replay: one holder at a time, a fencing token on every
/// page, takeover once it lapses, and a cancelled replay takes no more pages.
async fn a_replay_is_leased_to_one_instance_at_a_time(db: &TestDb) {
    use switchboard::store::runs::{Replay, ReplayPage};
    let store = switchboard::store::connect(db.url()).await.unwrap();
    store.migrate().await.unwrap();
    let now = chrono::Utc::now;
    let lease = Duration::from_secs(30);
    let replay = Replay {
        replay_id: "rpl_lease".into(),
        filter: sqlx::types::Json(json!({})),
        status: "running".into(),
        total: 3,
        done: 0,
        runs_created: 0,
        skipped: 0,
        failed: 0,
        cursor_seq: 0,
        created_at: now(),
        finished_at: None,
        mode: "rerun".into(),
        lease_owner: None,
        lease_until: None,
        lease_token: 0,
    };
    store.create_replay(&replay).await.unwrap();
    let versions = Default::default();
    let page = ReplayPage::Rerun {
        event_ids: &[],
        workflows: None,
        only_failed: false,
        versions: &versions,
    };
    let a = store.claim_replays("a", now(), lease, 5).await.unwrap();
    assert_eq!(
        (a.len(), a[0].lease_owner.as_deref(), a[0].lease_token),
        (1, Some("a"), 1)
    );
    assert!(
        store
            .claim_replays("b", now(), lease, 5)
            .await
            .unwrap()
            .is_empty(),
        "held by a"
    );
    assert!(
        store
            .commit_replay_page("rpl_lease", "b", 1, lease, 1, 1, &page, now())
            .await
            .unwrap()
            .is_none(),
        "b does not hold it"
    );
    let saved = store
        .commit_replay_page("rpl_lease", "a", 1, lease, 1, 1, &page, now())
        .await
        .unwrap()
        .expect("a holds it");
    assert_eq!((saved.done, saved.cursor_seq, saved.skipped), (1, 1, 1));
    // a's lease lapses (its last page renewed it for no time): b takes over.
    store
        .commit_replay_page("rpl_lease", "a", 1, Duration::ZERO, 1, 2, &page, now())
        .await
        .unwrap()
        .unwrap();
    tokio::time::sleep(Duration::from_millis(20)).await;
    let b = store.claim_replays("b", now(), lease, 5).await.unwrap();
    assert_eq!((b.len(), b[0].lease_token, b[0].done), (1, 2, 2));
    assert!(
        store
            .commit_replay_page("rpl_lease", "a", 1, lease, 1, 3, &page, now())
            .await
            .unwrap()
            .is_none(),
        "a's old token is fenced off"
    );
    assert!(
        !store
            .finish_replay("rpl_lease", "a", 1, now())
            .await
            .unwrap()
    );
    // Handed back at shutdown: claimable at once.
    assert_eq!(store.release_replay_leases("b", now()).await.unwrap(), 1);
    let c = store.claim_replays("c", now(), lease, 5).await.unwrap();
    assert_eq!(c[0].lease_token, 3);
    assert!(store.cancel_replay("rpl_lease", now()).await.unwrap());
    assert!(
        store
            .commit_replay_page("rpl_lease", "c", 3, lease, 1, 3, &page, now())
            .await
            .unwrap()
            .is_none(),
        "a cancelled replay takes no more pages"
    );
    assert!(
        !store
            .finish_replay("rpl_lease", "c", 3, now())
            .await
            .unwrap()
    );
    let r = store.get_replay("rpl_lease").await.unwrap().unwrap();
    assert_eq!((r.status.as_str(), r.done), ("cancelled", 2));
}

/// Two instances on one database: one of them drives the replay, once.
async fn two_instances_drive_one_replay_once(db: &TestDb) {
    const EVENTS: usize = 300;
    let sink = Sink::start().await;
    let wf = workflow(&sink, "/ok/two", "");
    let (a, _da) = TestApp::with_workflows(db, &[("w.yaml", &wf)]).await;
    let (b, _db) = TestApp::with_workflows(db, &[("w.yaml", &wf)]).await;
    for chunk in (0..EVENTS).collect::<Vec<_>>().chunks(25) {
        let bodies: Vec<Vec<u8>> = chunk
            .iter()
            .map(|i| ended_body(&format!("ev_two{i}"), &format!("conv_two{i}"), "completed"))
            .collect();
        futures::future::join_all(bodies.iter().map(|body| a.deliver(body))).await;
    }
    a.wait_runs_final(EVENTS, 60).await;
    let (status, replay) = b.admin_post_json("/api/v1/replays", json!({})).await;
    assert_eq!(status, 200, "{replay}");
    let id = replay["id"].as_str().unwrap().to_owned();
    let done = a.wait_replay(&id, 60).await;
    assert_eq!(
        (
            done["done"].as_i64(),
            done["runs_created"].as_i64(),
            done["skipped"].as_i64()
        ),
        (Some(EVENTS as i64), Some(EVENTS as i64), Some(0)),
        "{done}"
    );
    let stored = a.store.get_replay(&id).await.unwrap().unwrap();
    assert_eq!(stored.lease_token, 1, "claimed once: no second driver");
    let runs = a.wait_runs_final(2 * EVENTS, 60).await;
    let replayed: std::collections::HashSet<_> =
        runs.iter().filter_map(|r| r.replay_of.clone()).collect();
    assert_eq!(replayed.len(), EVENTS);
    assert_eq!(runs.len(), 2 * EVENTS);
}

/// The replay workers are supervised (task `replays`): stopped, they are
/// restarted, and a replay created meanwhile is driven to its end.
async fn the_replay_workers_are_restarted_when_they_stop(db: &TestDb) {
    let app = TestApp::spawn(db).await;
    assert!(
        app.supervisor.abort("replays"),
        "the replay workers run under the supervisor"
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    while app.supervisor.restarts("replays") == 0 {
        assert!(
            Instant::now() < deadline,
            "the replay workers were not seen stopping"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (status, replay) = app
        .admin_post_json("/api/v1/replays", json!({"type": "conversation.ended"}))
        .await;
    assert_eq!(status, 200, "{replay}");
    let id = replay["id"].as_str().unwrap().to_owned();
    app.wait_replay(&id, 20).await;
    assert_eq!(app.supervisor.restarts("replays"), 1);
}

on_both_backends!(
    the_replay_workers_are_restarted_when_they_stop,
    a_replay_runs_the_current_version_and_a_retry_its_own,
    a_replay_is_leased_to_one_instance_at_a_time,
    two_instances_drive_one_replay_once,
    a_running_bulk_replay_can_be_cancelled,
    replaying_an_event_creates_a_new_run_with_new_keys,
    a_run_still_in_flight_is_not_replayed,
    a_bulk_replay_of_failed_runs_reports_progress,
);
