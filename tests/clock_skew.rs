//! Two live instances whose clocks disagree (issue 11, defect 2): a worker
//! whose clock runs 20 s ahead (libfaketime) must not take a run another
//! instance is executing. PostgreSQL only: lease expiry is the database's
//! clock there; SQLite is shared only by processes on one host, one clock.
//! Skipped (with a note) where libfaketime is not installed.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::sink::Sink;
use common::{Delivery, ServerProcess, TestDb, client, deliver_to, ended_body, workflow_dir};
use serde_json::Value;

const LIBFAKETIME: &str = "/usr/lib/x86_64-linux-gnu/faketime/libfaketimeMT.so.1";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_a_worker_with_a_clock_ahead_does_not_take_a_running_run() {
    if !Path::new(LIBFAKETIME).exists() {
        eprintln!("skipped: {LIBFAKETIME} is missing (apt-get install -y faketime)");
        return;
    }
    let Some(db) = TestDb::postgres().await else {
        return;
    };
    let sink = Sink::start().await;
    let workflows = workflow_dir(&[(
        "slow.yaml",
        &format!(
            "on: {{ event: conversation.ended }}\nsteps:\n  - id: post\n    timeout: 15s\n    http: {{ url: \"{}\" }}\n",
            sink.url("/slow/6000/skew")
        ),
    )]);
    let wf = workflows.path().display().to_string();
    let logs = tempfile::tempdir().unwrap();
    let server = ServerProcess::start(&db, logs.path(), &[("SWITCHBOARD_WORKFLOWS", &wf)]).await;
    let r = deliver_to(
        &client(),
        &server.webhook_url(),
        &ended_body("ev_skew", "conv_skew", "completed"),
        Delivery::default(),
    )
    .await;
    assert_eq!(r.status(), 200);
    sink.wait_for("/slow/", 1, 10).await; // the server holds the run and waits for the sink
    let mut ahead = ServerProcess::start_worker(
        &db,
        logs.path(),
        &[
            ("SWITCHBOARD_WORKFLOWS", &wf),
            ("SWITCHBOARD_LOG_FORMAT", "json"),
            ("LD_PRELOAD", LIBFAKETIME),
            ("FAKETIME", "+20s"),
            ("FAKETIME_DONT_FAKE_MONOTONIC", "1"),
        ],
    )
    .await;
    // The worker's clock really is ahead: its log says so.
    let worker_log = std::fs::read_dir(logs.path())
        .unwrap()
        .filter_map(|e| e.ok())
        .find(|e| e.file_name().to_string_lossy().starts_with("worker-"))
        .unwrap()
        .path();
    let first: Value = std::fs::read_to_string(&worker_log)
        .unwrap()
        .lines()
        .find_map(|l| serde_json::from_str(l).ok())
        .expect("a JSON log line");
    let logged: chrono::DateTime<chrono::Utc> =
        first["timestamp"].as_str().unwrap().parse().unwrap();
    assert!(
        logged > chrono::Utc::now() + chrono::TimeDelta::seconds(15),
        "the worker's clock is not ahead: {first}"
    );
    // Well past a lease by the skewed clock, while the server still works on the run.
    let deadline = Instant::now() + Duration::from_secs(20);
    let run = loop {
        let run = common::runs_of(&server.base())
            .await
            .first()
            .cloned()
            .unwrap_or_default();
        if run["status"] == "succeeded" {
            break run;
        }
        assert!(Instant::now() < deadline, "{run}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let _ = ahead.kill();
    let _ = ahead.wait();
    assert_eq!(
        sink.received_on("/slow/").len(),
        1,
        "the worker with the clock ahead sent the request again"
    );
    assert_eq!(run["attempts_total"], 1);
}
