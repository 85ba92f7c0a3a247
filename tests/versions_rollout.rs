//! Workflow versions in a rolling deploy (issue 16, "Measured"): two real
//! instances with different workflow directories share one PostgreSQL and
//! every run succeeds whichever executes it; a run retrying its last step
//! finishes it after reloads that removed an earlier step or the whole
//! workflow, and after a restart on an instance that has none loaded.

mod common;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use common::sink::Sink;
use common::{ServerProcess, TestApp, TestDb, client, deliver_to, ended_body, retrying_steps};
use switchboard::store::runs::{Run, RunQuery, RunStatus};

/// Every run in the database (up to 1,000), read through the store.
async fn all_runs(store: &dyn switchboard::store::EventStore) -> Vec<Run> {
    store
        .list_runs(&RunQuery {
            limit: 1000,
            ..Default::default()
        })
        .await
        .unwrap()
}

/// `switchboard_runs_finished_total{state="succeeded",workflow=...}` in a Prometheus text.
fn succeeded_in(metrics: &str, workflow: &str) -> u64 {
    metrics
        .lines()
        .filter(|l| {
            l.starts_with("switchboard_runs_finished_total{")
                && l.contains("state=\"succeeded\"")
                && l.contains(&format!("workflow=\"{workflow}\""))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>() as u64
}

async fn metrics_at(base: &str) -> String {
    client()
        .get(format!("{base}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
}

/// A (`serve`, workflow `x` loaded) and B (`worker`, no workflow at all) on one
/// PostgreSQL: 500 `x` runs created by A all succeed, whichever instance executes
/// them; the sink sees each Idempotency-Key once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_instances_with_different_workflows_run_every_run() {
    let Some(db) = TestDb::postgres().await else {
        return;
    };
    const RUNS: usize = 500;
    let sink = Sink::start().await;
    // A slow-ish sink and a small A, so that B claims a share of the runs.
    let wf = common::workflow_dir(&[(
        "x.yaml",
        &format!(
            "on: {{ event: conversation.ended }}\nsteps:\n  - id: post\n    http: {{ method: POST, url: \"{}\", json: {{ event: \"{{{{ event.id }}}}\" }} }}\n",
            sink.url("/slow/20/x")
        ),
    )]);
    let logs = tempfile::tempdir().unwrap();
    let wf_env = wf.path().display().to_string();
    let a = ServerProcess::start(
        &db,
        logs.path(),
        &[
            ("SWITCHBOARD_WORKFLOWS", &wf_env),
            ("SWITCHBOARD_WORKER_CONCURRENCY", "2"),
        ],
    )
    .await;
    let empty = common::no_workflows(logs.path());
    let b_metrics = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let mut b = ServerProcess::start_worker(
        &db,
        logs.path(),
        &[
            ("SWITCHBOARD_WORKFLOWS", &empty.display().to_string()),
            ("SWITCHBOARD_WORKER_CONCURRENCY", "8"),
            ("SWITCHBOARD_METRICS_LISTEN", &b_metrics.to_string()),
        ],
    )
    .await;

    // 500 deliveries to A, 16 at a time.
    let http = client();
    let url = a.webhook_url();
    let mut pending = futures::stream::FuturesUnordered::new();
    use futures::StreamExt;
    for i in 0..RUNS {
        let (http, url) = (http.clone(), url.clone());
        pending.push(async move {
            let r = deliver_to(
                &http,
                &url,
                &ended_body(&format!("ev_r{i}"), &format!("conv_r{i}"), "completed"),
                Default::default(),
            )
            .await;
            assert!(r.status().is_success(), "delivery {i}: {}", r.status());
        });
        if pending.len() >= 16 {
            pending.next().await;
        }
    }
    while pending.next().await.is_some() {}

    let store = switchboard::store::connect(db.url()).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    let runs = loop {
        let runs = all_runs(store.as_ref()).await;
        let done = runs
            .iter()
            .filter(|r| r.status().is_some_and(|s| s.is_final()))
            .count();
        if runs.len() >= RUNS && done == runs.len() {
            break runs;
        }
        assert!(
            Instant::now() < deadline,
            "{done} of {} runs final after 60 s",
            runs.len()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(runs.len(), RUNS);
    let failed: Vec<_> = runs
        .iter()
        .filter(|r| r.status() != Some(RunStatus::Succeeded))
        .map(|r| (&r.event_id, &r.status, &r.last_error))
        .collect();
    assert!(
        failed.is_empty(),
        "{} runs did not succeed: {:?}",
        failed.len(),
        &failed[..failed.len().min(5)]
    );
    assert!(runs.iter().all(|r| r.version.is_some()));

    // The sink: every event once, every Idempotency-Key once.
    let received = sink.received_on("/slow/20/x");
    let mut keys: HashMap<String, usize> = HashMap::new();
    let mut events: HashMap<String, usize> = HashMap::new();
    for r in &received {
        *keys
            .entry(
                r.headers
                    .get("idempotency-key")
                    .cloned()
                    .unwrap_or_default(),
            )
            .or_default() += 1;
        *events
            .entry(r.json()["event"].as_str().unwrap_or_default().to_owned())
            .or_default() += 1;
    }
    assert_eq!(received.len(), RUNS, "one request per run");
    assert_eq!(keys.len(), RUNS, "distinct Idempotency-Keys");
    assert!(
        !keys.contains_key(""),
        "every request has an Idempotency-Key"
    );
    assert_eq!(events.len(), RUNS, "every event delivered");

    // Both instances executed runs: B (no workflow loaded) a real share.
    let by_a = succeeded_in(&metrics_at(&a.base()).await, "x");
    let by_b = succeeded_in(&metrics_at(&format!("http://{b_metrics}")).await, "x");
    assert_eq!(by_a + by_b, RUNS as u64, "A {by_a} + B {by_b}");
    assert!(
        by_b > 0,
        "B executed no run (A {by_a}): the test did not exercise an instance without the workflow"
    );
    eprintln!("A executed {by_a} runs, B {by_b}");
    let _ = b.kill();
    let _ = b.wait();
}

/// Waits until the run of `event` is `retrying` (its failed attempt saved).
async fn wait_retrying(app: &TestApp, event: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let runs = all_runs(app.store.as_ref()).await;
        if runs
            .iter()
            .any(|r| r.event_id == event && r.status() == Some(RunStatus::Retrying))
        {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "run of {event} not retrying: {:?}",
            runs.iter()
                .map(|r| (&r.event_id, &r.status))
                .collect::<Vec<_>>()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The requests for step `c` at `path`: three attempts, one Idempotency-Key.
fn assert_c_completed(sink: &Sink, path: &str) {
    let c = sink.received_on(path);
    assert_eq!(c.len(), 3, "two failures, then success");
    let keys: std::collections::HashSet<_> = c
        .iter()
        .map(|r| r.headers.get("idempotency-key").cloned())
        .collect();
    assert_eq!(
        keys.len(),
        1,
        "every attempt of c has the same key: {keys:?}"
    );
    assert!(
        keys.iter()
            .all(|k| k.as_deref().is_some_and(|k| k.ends_with(":c")))
    );
}

/// A run retrying step `c` of `[a, b, c]` completes `c` after a reload removed `a`;
/// another completes `c` after a reload removed the whole workflow and a restart
/// onto an instance with no workflow loaded (the version comes from the database).
async fn a_retrying_run_completes_after_reloads(db: &TestDb) {
    let sink = Sink::start().await;
    let (app, dir) = TestApp::with_workflows(
        db,
        &[(
            "w.yaml",
            &retrying_steps(&sink, &["a", "b", "c"], "/flaky/2/c1", "1500ms"),
        )],
    )
    .await;
    app.deliver(&ended_body("ev_c1", "conv_c1", "completed"))
        .await;
    sink.wait_for("/flaky/2/c1", 1, 10).await;
    wait_retrying(&app, "ev_c1").await;
    // Reload without `a`: the run is at `c`, index 2 of its version, 1 of the new one.
    std::fs::write(
        dir.path().join("w.yaml"),
        retrying_steps(&sink, &["b", "c"], "/flaky/2/c1", "1500ms"),
    )
    .unwrap();
    let (status, body) = app.admin_post("/api/v1/workflows/reload").await;
    assert_eq!(status, 200, "{body}");
    let runs = app.wait_runs_final(1, 20).await;
    assert_eq!(
        runs[0].status(),
        Some(RunStatus::Succeeded),
        "{:?}",
        runs[0].last_error
    );
    assert_c_completed(&sink, "/flaky/2/c1");
    assert_eq!(sink.received_on("/ok/a").len(), 1, "a ran once, before");
    assert_eq!(sink.received_on("/ok/b").len(), 1, "b ran once, before");

    // The whole workflow removed while a run retries `c`, then a restart with none loaded.
    std::fs::write(
        dir.path().join("w.yaml"),
        retrying_steps(&sink, &["a", "b", "c"], "/flaky/2/c2", "1500ms"),
    )
    .unwrap();
    let (status, body) = app.admin_post("/api/v1/workflows/reload").await;
    assert_eq!(status, 200, "{body}");
    app.deliver(&ended_body("ev_c2", "conv_c2", "completed"))
        .await;
    sink.wait_for("/flaky/2/c2", 1, 10).await;
    wait_retrying(&app, "ev_c2").await;
    std::fs::remove_file(dir.path().join("w.yaml")).unwrap();
    let (status, body) = app.admin_post("/api/v1/workflows/reload").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["workflows"], serde_json::json!([]));
    // Second attempt on this instance (cached version), third after a restart (cold).
    sink.wait_for("/flaky/2/c2", 2, 10).await;
    wait_retrying(&app, "ev_c2").await;
    drop(app);
    let mut s = common::settings(db);
    s.workflows_dir = dir.path().to_owned();
    let app = TestApp::spawn_with(s).await;
    let runs = app.wait_runs_final(2, 20).await;
    let second = runs.iter().find(|r| r.event_id == "ev_c2").unwrap();
    assert_eq!(
        second.status(),
        Some(RunStatus::Succeeded),
        "{:?}",
        second.last_error
    );
    assert_c_completed(&sink, "/flaky/2/c2");
    assert_eq!(sink.received_on("/ok/a").len(), 2);
    assert_eq!(sink.received_on("/ok/b").len(), 2);
}

on_both_backends!(a_retrying_run_completes_after_reloads);
