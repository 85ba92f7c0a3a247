//! Workflow versions (issue 16), end to end on both backends: every loaded
//! definition is stored by its hash, a run executes the version it matched
//! (across reloads, and on an instance that does not have it loaded), and
//! the admin API serves the versions.

mod common;

use std::time::{Duration, Instant};

use common::sink::Sink;
use common::{ServerProcess, TestApp, TestDb, client, deliver_to, ended_body, retrying_steps};
use switchboard::store::runs::RunStatus;

/// A run retrying step `c` of `[a, b, c]` completes `c` after a reload that
/// removed `a`, and after one that removed the whole workflow.
async fn a_run_keeps_its_version_across_reloads(db: &TestDb) {
    let sink = Sink::start().await;
    let (app, dir) = TestApp::with_workflows(
        db,
        &[(
            "steps.yaml",
            &retrying_steps(&sink, &["a", "b", "c"], "/flaky/2/c1", "2500ms"),
        )],
    )
    .await;
    app.deliver(&ended_body("ev_v1", "conv_v1", "completed"))
        .await;
    sink.wait_for("/flaky/2/c1", 1, 10).await;
    std::fs::write(
        dir.path().join("steps.yaml"),
        retrying_steps(&sink, &["b", "c"], "/flaky/2/c1", "2500ms"),
    )
    .unwrap();
    let (status, body) = app.admin_post("/api/v1/workflows/reload").await;
    assert_eq!(status, 200, "{body}");
    let (status, list) = app.admin_get("/api/v1/workflows").await;
    assert_eq!(status, 200, "{list}");
    assert_eq!(
        list[0]["runs_in_flight_on_older_versions"], 1,
        "the retrying run is on the old version: {list}"
    );
    let runs = app.wait_runs_final(1, 20).await;
    assert_eq!(
        runs[0].status,
        RunStatus::Succeeded,
        "{:?}",
        runs[0].last_error
    );
    assert_eq!(sink.received_on("/flaky/2/c1").len(), 3);
    assert_eq!(sink.received_on("/ok/a").len(), 1, "a ran once, before");

    // The whole workflow removed while a run retries its last step.
    std::fs::write(
        dir.path().join("steps.yaml"),
        retrying_steps(&sink, &["a", "b", "c"], "/flaky/2/c2", "2500ms"),
    )
    .unwrap();
    let (status, body) = app.admin_post("/api/v1/workflows/reload").await;
    assert_eq!(status, 200, "{body}");
    app.deliver(&ended_body("ev_v2", "conv_v2", "completed"))
        .await;
    sink.wait_for("/flaky/2/c2", 1, 10).await;
    std::fs::remove_file(dir.path().join("steps.yaml")).unwrap();
    let (status, body) = app.admin_post("/api/v1/workflows/reload").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["workflows"], serde_json::json!([]));
    let runs = app.wait_runs_final(2, 20).await;
    let second = runs.iter().find(|r| r.event_id == "ev_v2").unwrap();
    assert_eq!(
        second.status,
        RunStatus::Succeeded,
        "{:?}",
        second.last_error
    );
    assert_eq!(sink.received_on("/flaky/2/c2").len(), 3);
}

/// A run created by an instance that has the workflow is executed by one
/// that has no workflow loaded at all (the definition comes from the database).
async fn an_instance_without_the_workflow_executes_its_runs(db: &TestDb) {
    let sink = Sink::start().await;
    let wf = common::workflow_dir(&[(
        "x.yaml",
        &format!(
            "on: {{ event: conversation.ended }}\nsteps:\n  - id: post\n    retry: {{ max_attempts: 3, backoff: fixed, initial_delay: 2s }}\n    http: {{ url: \"{}\" }}\n",
            sink.url("/flaky/1/x")
        ),
    )]);
    let logs = tempfile::tempdir().unwrap();
    let wf_env = wf.path().display().to_string();
    let mut a = ServerProcess::start(db, logs.path(), &[("SWITCHBOARD_WORKFLOWS", &wf_env)]).await;
    let r = deliver_to(
        &client(),
        &a.webhook_url(),
        &ended_body("ev_x", "conv_x", "completed"),
        Default::default(),
    )
    .await;
    assert!(r.status().is_success());
    sink.wait_for("/flaky/1/x", 1, 10).await;
    // Wait until A has saved the failed attempt (the run waits to retry), then kill A.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let runs = common::runs_of(&a.base()).await;
        if let Some(run) = runs.first()
            && run["status"] == "retrying"
        {
            assert!(run["version"].is_string(), "{run}");
            break;
        }
        assert!(Instant::now() < deadline, "not retrying: {runs:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    a.kill9();
    // B has no workflow loaded.
    let b = TestApp::spawn(db).await;
    let (_, list) = b.admin_get("/api/v1/workflows").await;
    assert_eq!(list, serde_json::json!([]));
    let runs = b.wait_runs_final(1, 20).await;
    assert_eq!(
        runs[0].status,
        RunStatus::Succeeded,
        "{:?}",
        runs[0].last_error
    );
    assert_eq!(sink.received_on("/flaky/1/x").len(), 2);
}

/// The same definition (comments, whitespace, key order aside) is one
/// version; a changed one is a new version; the endpoints serve both.
async fn versions_are_content_addressed_and_served(db: &TestDb) {
    let sink = Sink::start().await;
    let first = format!(
        "on: {{ event: conversation.ended }}\nsteps:\n  - id: post\n    http: {{ url: \"{}\" }}\n",
        sink.url("/ok/v")
    );
    let (app, dir) = TestApp::with_workflows(db, &[("v.yaml", &first)]).await;
    let (status, versions) = app.admin_get("/api/v1/workflows/v/versions").await;
    assert_eq!(status, 200, "{versions}");
    assert_eq!(versions.as_array().unwrap().len(), 1, "{versions}");
    let hash = versions[0]["hash"].as_str().unwrap().to_owned();
    assert_eq!(hash.len(), 64);
    assert_eq!(versions[0]["current"], true);
    assert_eq!(versions[0]["runs_in_flight"], 0);

    // Reformatted, commented, keys reordered: the same version.
    let same = format!(
        "# a comment\nsteps:\n  - http:\n      url:   \"{}\"\n    id: post\non:\n  event: conversation.ended\n",
        sink.url("/ok/v")
    );
    std::fs::write(dir.path().join("v.yaml"), &same).unwrap();
    let (status, body) = app.admin_post("/api/v1/workflows/reload").await;
    assert_eq!(status, 200, "{body}");
    let (_, versions) = app.admin_get("/api/v1/workflows/v/versions").await;
    assert_eq!(versions.as_array().unwrap().len(), 1, "{versions}");
    let (_, list) = app.admin_get("/api/v1/workflows").await;
    assert_eq!(list[0]["version"], hash.as_str());

    // A run records the version it matched.
    app.deliver(&ended_body("ev_v", "conv_v", "completed"))
        .await;
    let runs = app.wait_runs_final(1, 10).await;
    assert_eq!(runs[0].version.as_deref(), Some(hash.as_str()));
    let (_, run) = app
        .admin_get(&format!("/api/v1/runs/{}", runs[0].run_id))
        .await;
    assert_eq!(run["version"], hash.as_str());

    // A changed definition is a new version, current now.
    let changed = first.replace("/ok/v", "/ok/v2");
    std::fs::write(dir.path().join("v.yaml"), &changed).unwrap();
    let (status, body) = app.admin_post("/api/v1/workflows/reload").await;
    assert_eq!(status, 200, "{body}");
    let (_, versions) = app.admin_get("/api/v1/workflows/v/versions").await;
    let versions = versions.as_array().unwrap().clone();
    assert_eq!(versions.len(), 2, "{versions:?}");
    assert_eq!(versions[0]["hash"], hash.as_str());
    assert_eq!(versions[0]["current"], false);
    assert_eq!(versions[1]["current"], true);
    let new_hash = versions[1]["hash"].as_str().unwrap().to_owned();
    assert_ne!(new_hash, hash);

    // The definitions as first loaded.
    let (status, v) = app
        .admin_get(&format!("/api/v1/workflows/v/versions/{hash}"))
        .await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["definition"], first.as_str());
    assert_eq!(v["workflow"], "v");
    let (_, v) = app
        .admin_get(&format!("/api/v1/workflows/v/versions/{new_hash}"))
        .await;
    assert_eq!(v["definition"], changed.as_str());

    // Unknown hash, unknown workflow, another workflow's hash: 404 with the error shape.
    let (status, e) = app.admin_get("/api/v1/workflows/v/versions/0000").await;
    assert_eq!(status, 404, "{e}");
    assert_eq!(e["error"]["code"], "not_found");
    let (status, e) = app.admin_get("/api/v1/workflows/nope/versions").await;
    assert_eq!(status, 404, "{e}");
    let (status, _) = app
        .admin_get(&format!("/api/v1/workflows/nope/versions/{hash}"))
        .await;
    assert_eq!(status, 404);
}

/// A run whose version is not in the database fails with a clear message
/// (and does not fall back to whatever is loaded under its name).
async fn a_run_whose_version_is_missing_fails_clearly(db: &TestDb) {
    let sink = Sink::start().await;
    let wf = format!(
        "on: {{ event: conversation.ended }}\nsteps:\n  - id: post\n    retry: {{ max_attempts: 3, backoff: fixed, initial_delay: 2s }}\n    http: {{ url: \"{}\" }}\n",
        sink.url("/flaky/1/m")
    );
    let (app, _dir) = TestApp::with_workflows(db, &[("m.yaml", &wf)]).await;
    app.deliver(&ended_body("ev_m", "conv_m", "completed"))
        .await;
    sink.wait_for("/flaky/1/m", 1, 10).await;
    let missing = "f".repeat(64);
    db.exec(&[&format!(
        "UPDATE runs SET version = '{missing}' WHERE event_id = 'ev_m'"
    )])
    .await;
    let runs = app.wait_runs_final(1, 15).await;
    assert_eq!(runs[0].status, RunStatus::Failed);
    let err = runs[0].last_error.clone().unwrap_or_default();
    assert!(
        err.contains(&format!("version {missing} of workflow `m` is not stored")),
        "{err}"
    );
    assert_eq!(sink.received_on("/flaky/1/m").len(), 1, "not sent again");
}

on_both_backends!(
    a_run_whose_version_is_missing_fails_clearly,
    a_run_keeps_its_version_across_reloads,
    an_instance_without_the_workflow_executes_its_runs,
    versions_are_content_addressed_and_served,
);
