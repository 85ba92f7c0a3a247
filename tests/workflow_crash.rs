//! The engine under kill -9 of the real binary, on SQLite and PostgreSQL:
//! an attempt in flight is resumed after a restart (same Idempotency-Key),
//! and events acknowledged just before a kill all get their one run.

mod common;

use std::collections::HashSet;
use std::time::{Duration, Instant};

use common::sink::Sink;
use common::{
    Delivery, ServerProcess, TestDb, client, deliver_to, ended_body, runs_of, workflow_dir,
};
use serde_json::Value;

/// A sink, a workflow posting to one of its paths, and a log directory.
struct Fixture {
    sink: Sink,
    _workflows: tempfile::TempDir,
    wf_env: String,
    logs: tempfile::TempDir,
}

impl Fixture {
    async fn new(path: &str) -> Self {
        let sink = Sink::start().await;
        let workflows = workflow_dir(&[(
            "wf.yaml",
            &format!(
                "on: {{ event: conversation.ended }}\nsteps:\n  - id: post\n    http: {{ url: \"{}\" }}\n",
                sink.url(path)
            ),
        )]);
        Self {
            wf_env: workflows.path().display().to_string(),
            _workflows: workflows,
            sink,
            logs: tempfile::tempdir().unwrap(),
        }
    }

    fn env(&self) -> [(&str, &str); 1] {
        [("SWITCHBOARD_WORKFLOWS", self.wf_env.as_str())]
    }
}

async fn wait_all_succeeded(base: &str, n: usize, secs: u64) -> Vec<Value> {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        let runs = runs_of(base).await;
        if runs.len() >= n && runs.iter().all(|r| r["status"] == "succeeded") {
            return runs;
        }
        assert!(
            Instant::now() < deadline,
            "runs not all succeeded within {secs}s: {runs:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn an_attempt_in_flight_at_kill_9_is_resumed(db: &TestDb) {
    let fx = Fixture::new("/slow-once/3000/crm").await;
    let (sink, logs, env) = (&fx.sink, fx.logs.path(), fx.env());
    let mut server = ServerProcess::start(db, logs, &env).await;
    let r = deliver_to(
        &client(),
        &server.webhook_url(),
        &ended_body("ev_inflight", "conv_i", "completed"),
        Delivery::default(),
    )
    .await;
    assert_eq!(r.status(), 200);
    let first = sink.wait_for("/slow-once", 1, 10).await;
    server.kill9(); // while the sink is still answering the first attempt
    let restarted = Instant::now();
    let server = ServerProcess::start(db, logs, &env).await;
    let both = sink.wait_for("/slow-once", 2, 15).await;
    let resumed_after = both[1].at.duration_since(restarted);
    assert!(
        resumed_after < Duration::from_secs(10),
        "resumed {resumed_after:?} after the restart"
    );
    assert_eq!(
        both[1].headers["idempotency-key"],
        first[0].headers["idempotency-key"]
    );
    let runs = wait_all_succeeded(&server.base(), 1, 10).await;
    assert_eq!(runs.len(), 1);
}

async fn events_acknowledged_before_kill_9_all_get_one_run(db: &TestDb) {
    let fx = Fixture::new("/ok/crm").await;
    let (sink, logs, env) = (&fx.sink, fx.logs.path(), fx.env());
    let mut server = ServerProcess::start(db, logs, &env).await;
    let http = client();
    let url = server.webhook_url();
    let sends = (0..20).map(|i| {
        let http = http.clone();
        let url = url.clone();
        async move {
            deliver_to(
                &http,
                &url,
                &ended_body(&format!("ev_k9_{i}"), &format!("conv_k9_{i}"), "completed"),
                Delivery::default(),
            )
            .await
            .status()
            .as_u16()
        }
    });
    let statuses = futures::future::join_all(sends).await;
    server.kill9();
    assert!(statuses.iter().all(|s| *s == 200), "{statuses:?}");
    let server = ServerProcess::start(db, logs, &env).await;
    let runs = wait_all_succeeded(&server.base(), 20, 20).await;
    assert_eq!(runs.len(), 20, "one run per event, none twice");
    let events: HashSet<&str> = runs
        .iter()
        .map(|r| r["event_id"].as_str().unwrap())
        .collect();
    assert_eq!(events.len(), 20);
    let keys: HashSet<String> = sink
        .received_on("/ok/crm")
        .iter()
        .map(|r| r.headers["idempotency-key"].clone())
        .collect();
    assert_eq!(keys.len(), 20, "the sink saw every run's key");
}

on_both_backends!(
    an_attempt_in_flight_at_kill_9_is_resumed,
    events_acknowledged_before_kill_9_all_get_one_run,
);

/// Two instances on one PostgreSQL: `serve` and `serve`, plus a `worker`;
/// every run executes exactly once across them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_instances_share_the_work_without_duplicates() {
    let Some(db) = TestDb::postgres().await else {
        return;
    };
    let fx = Fixture::new("/ok/crm").await;
    let (sink, logs, env) = (&fx.sink, fx.logs.path(), fx.env());
    let a = ServerProcess::start(&db, logs, &env).await;
    let b = ServerProcess::start(&db, logs, &env).await;
    let mut worker = ServerProcess::start_worker(&db, logs, &env).await;
    let http = client();
    let sends = (0..60).map(|i| {
        let http = http.clone();
        let url = if i % 2 == 0 {
            a.webhook_url()
        } else {
            b.webhook_url()
        };
        async move {
            deliver_to(
                &http,
                &url,
                &ended_body(
                    &format!("ev_two_{i}"),
                    &format!("conv_two_{i}"),
                    "completed",
                ),
                Delivery::default(),
            )
            .await
            .status()
            .as_u16()
        }
    });
    assert!(
        futures::future::join_all(sends)
            .await
            .iter()
            .all(|s| *s == 200)
    );
    let runs = wait_all_succeeded(&a.base(), 60, 20).await;
    assert_eq!(runs.len(), 60);
    let received = sink.received_on("/ok/crm");
    let keys: HashSet<String> = received
        .iter()
        .map(|r| r.headers["idempotency-key"].clone())
        .collect();
    assert_eq!(keys.len(), 60);
    assert_eq!(received.len(), 60, "no run was attempted twice");
    // The log is one gap-free sequence across both instances.
    let events = common::all_events(&http, &b.base()).await;
    let seqs: Vec<i64> = events
        .iter()
        .map(|e| e["sequence"].as_i64().unwrap())
        .collect();
    assert_eq!(seqs, (1..=60).collect::<Vec<_>>());
    let _ = worker.kill();
    let _ = worker.wait();
}

/// On PostgreSQL, a run held by an instance that dies is taken over by a surviving one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_a_surviving_instance_takes_over_a_dead_ones_run() {
    let Some(db) = TestDb::postgres().await else {
        return;
    };
    let fx = Fixture::new("/slow-once/3000/crm").await;
    let (sink, logs, env) = (&fx.sink, fx.logs.path(), fx.env());
    let mut a = ServerProcess::start(&db, logs, &env).await;
    let r = deliver_to(
        &client(),
        &a.webhook_url(),
        &ended_body("ev_takeover", "conv_t", "completed"),
        Delivery::default(),
    )
    .await;
    assert_eq!(r.status(), 200);
    let first = sink.wait_for("/slow-once", 1, 10).await; // instance A holds the run
    let b = ServerProcess::start(&db, logs, &env).await;
    a.kill9();
    let killed = Instant::now();
    let both = sink.wait_for("/slow-once", 2, 35).await;
    let took = both[1].at.duration_since(killed);
    assert!(took < Duration::from_secs(30), "taken over after {took:?}");
    assert_eq!(
        both[1].headers["idempotency-key"],
        first[0].headers["idempotency-key"]
    );
    wait_all_succeeded(&b.base(), 1, 10).await;
}
