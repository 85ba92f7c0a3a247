//! Re-dispatch (`POST /api/v1/replays` with `mode: dispatch`, `switchboard
//! dispatch`) on SQLite and PostgreSQL: stored events judged against the
//! workflows loaded now get exactly the runs that do not exist yet, however
//! many dispatches run at once on however many instances; and bulk replays
//! are leased jobs that a kill -9 mid-page never makes replay an event twice.

mod common;

use std::collections::HashSet;
use std::time::{Duration, Instant};

use common::sink::Sink;
use common::{
    Delivery, Probe, ServerProcess, TestApp, TestDb, client, deliver_to, ended_body, new_event,
    runs_of, workflow_dir,
};
use serde_json::{Value, json};
use switchboard::store::{NewEvent, NoWorkflows};

/// A workflow on `conversation.ended` with status `completed`, posting to `path`.
fn completed_workflow(sink: &Sink, path: &str) -> String {
    format!(
        "on: {{ event: conversation.ended, status: [completed] }}\nsteps:\n  - id: post\n    http: {{ url: \"{}\" }}\n",
        sink.url(path)
    )
}

/// Stores `n` `conversation.ended` events through the store (no workflow
/// loaded: nothing matches); every 4th is `completed`. Returns the ids of those.
async fn store_events(db: &TestDb, prefix: &str, n: usize) -> HashSet<String> {
    let store = switchboard::store::connect(db.url()).await.unwrap();
    store.migrate().await.unwrap();
    let mut completed = HashSet::new();
    let events: Vec<NewEvent> = (0..n)
        .map(|i| {
            let id = format!("ev_{prefix}_{i}");
            let status = if i % 4 == 0 { "completed" } else { "failed" };
            if status == "completed" {
                completed.insert(id.clone());
            }
            let body = ended_body(&id, &format!("conv_{prefix}_{}", i % 500), status);
            new_event(body, &format!("key-{prefix}-{i}"))
        })
        .collect();
    for batch in events.chunks(1000) {
        store.append_batch(batch, &NoWorkflows).await.unwrap();
    }
    completed
}

/// Starts a server in its own process on these workflows, logging into `logs`
/// (again for a restart).
async fn serve(
    db: &TestDb,
    workflows: &tempfile::TempDir,
    logs: &tempfile::TempDir,
) -> ServerProcess {
    let wf_env = workflows.path().display().to_string();
    ServerProcess::start(
        db,
        logs.path(),
        &[("SWITCHBOARD_WORKFLOWS", wf_env.as_str())],
    )
    .await
}

/// Asks `server` for a replay with `body`; its id.
async fn start_replay(server: &ServerProcess, body: Value) -> String {
    let resp = client()
        .post(format!("{}/api/v1/replays", server.base()))
        .bearer_auth(common::TOKEN)
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    resp.json::<Value>().await.unwrap()["id"]
        .as_str()
        .unwrap()
        .to_owned()
}

/// Kills the server (kill -9) in the middle of a replay's page: times one
/// page (100 events), then kills half a page's time into the next one.
/// Returns the events done at the kill.
async fn kill_mid_page(probe: &Probe, done_sql: &str, server: &mut ServerProcess) -> i64 {
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut first_page_at = None;
    loop {
        let done = probe.count(done_sql).await;
        match first_page_at {
            None if done >= 100 => first_page_at = Some((Instant::now(), done)),
            Some((at, before)) if done > before => {
                tokio::time::sleep(at.elapsed() / 2).await;
                server.kill9();
                return probe.count(done_sql).await;
            }
            _ => {}
        }
        assert!(Instant::now() < deadline, "the replay made no progress");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

/// Stores these bodies through the store (no workflow loaded), in order.
async fn store_bodies(db: &TestDb, bodies: &[Vec<u8>]) {
    let store = switchboard::store::connect(db.url()).await.unwrap();
    store.migrate().await.unwrap();
    let events: Vec<NewEvent> = bodies
        .iter()
        .enumerate()
        .map(|(i, body)| new_event(body.clone(), &format!("key-body-{i}")))
        .collect();
    store.append_batch(&events, &NoWorkflows).await.unwrap();
}

/// 10,000 stored events, a workflow added afterwards, two dispatches at once
/// on two instances: each matching event gets exactly one run, and the sink
/// sees each Idempotency-Key once.
async fn two_concurrent_dispatches_create_each_missing_run_once(db: &TestDb) {
    const EVENTS: usize = 10_000;
    let completed = store_events(db, "d", EVENTS).await;
    let sink = Sink::start().await;
    let files = [("late.yaml", completed_workflow(&sink, "/ok/late"))];
    let files: Vec<(&str, &str)> = files.iter().map(|(f, y)| (*f, y.as_str())).collect();
    let (a, _dir_a) = TestApp::with_workflows(db, &files).await;
    let (b, _dir_b) = TestApp::with_workflows(db, &files).await;
    assert_eq!(db.count("SELECT COUNT(*) FROM runs").await, 0);
    let body = json!({"mode": "dispatch", "type": "conversation.ended"});
    let ((sa, ra), (sb, rb)) = tokio::join!(
        a.admin_post_json("/api/v1/replays", body.clone()),
        b.admin_post_json("/api/v1/replays", body.clone())
    );
    assert_eq!((sa, sb), (200, 200), "{ra} {rb}");
    assert_eq!(ra["mode"], "dispatch");
    assert_eq!(ra["total"], EVENTS as i64);
    let (_, list) = a.admin_get("/api/v1/workflows").await;
    assert_eq!(
        ra["versions"]["late"], list[0]["version"],
        "the response says which version the runs execute"
    );
    let da = a.wait_replay(ra["id"].as_str().unwrap(), 240).await;
    let db_ = a.wait_replay(rb["id"].as_str().unwrap(), 240).await;
    for d in [&da, &db_] {
        assert_eq!(d["done"], EVENTS as i64, "{d}");
        assert_eq!(d["failed"], 0, "{d}");
    }
    assert_eq!(
        da["runs_created"].as_i64().unwrap() + db_["runs_created"].as_i64().unwrap(),
        completed.len() as i64,
        "between them, one run per matching event: {da} {db_}"
    );
    let want = completed.len() as i64;
    assert_eq!(db.count("SELECT COUNT(*) FROM runs").await, want);
    assert_eq!(
        db.count("SELECT COUNT(DISTINCT event_id) FROM runs").await,
        want
    );
    assert_eq!(
        db.count("SELECT COUNT(*) FROM runs r JOIN workflow_versions v ON v.hash = r.version WHERE v.workflow = 'late'"
        )
        .await,
        want,
        "every run records the version it matched"
    );
    // Decisions recorded for the new verdicts, both ways.
    assert_eq!(
        db.count("SELECT COUNT(*) FROM match_decisions WHERE matched")
            .await,
        want
    );
    assert_eq!(
        db.count("SELECT COUNT(*) FROM match_decisions WHERE NOT matched AND reason LIKE '%status is `failed`%'"
        )
        .await,
        EVENTS as i64 - want
    );
    // Every run executes, once.
    let deadline = Instant::now() + Duration::from_secs(300);
    while db
        .count("SELECT COUNT(*) FROM runs WHERE status = 'succeeded'")
        .await
        < want
    {
        assert!(Instant::now() < deadline, "runs did not all succeed");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let got = sink.received_on("/ok/late");
    let keys: HashSet<&str> = got
        .iter()
        .map(|r| r.headers["idempotency-key"].as_str())
        .collect();
    assert_eq!(got.len() as i64, want, "each run posted once");
    assert_eq!(keys.len() as i64, want, "each Idempotency-Key once");
    let run_events: HashSet<String> = {
        let store = switchboard::store::connect(db.url()).await.unwrap();
        let mut ids = HashSet::new();
        let mut before = None;
        loop {
            let page = store
                .list_runs(&switchboard::store::runs::RunQuery {
                    limit: 1000,
                    before: before.clone(),
                    ..Default::default()
                })
                .await
                .unwrap();
            let Some(last) = page.last() else { break };
            before = Some((last.created_at, last.run_id.clone()));
            ids.extend(page.iter().map(|r| r.event_id.clone()));
        }
        ids
    };
    assert_eq!(
        run_events, completed,
        "exactly the matching events have runs"
    );
    // A third dispatch finds nothing left to create.
    let (_, rc) = a.admin_post_json("/api/v1/replays", body).await;
    let dc = a.wait_replay(rc["id"].as_str().unwrap(), 240).await;
    assert_eq!(dc["runs_created"], 0, "{dc}");
    assert_eq!(dc["skipped"], EVENTS as i64, "{dc}");
}

/// Bad `mode` values and combinations are refused with a message that says what to do.
async fn dispatch_requests_are_validated(db: &TestDb) {
    let sink = Sink::start().await;
    let (app, _dir) =
        TestApp::with_workflows(db, &[("late.yaml", &completed_workflow(&sink, "/ok/x"))]).await;
    let (status, body) = app
        .admin_post_json("/api/v1/replays", json!({"mode": "redispatch"}))
        .await;
    assert_eq!(status, 400, "{body}");
    let message = body["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("`mode` is `redispatch`")
            && message.contains("`rerun`")
            && message.contains("`dispatch`"),
        "{message}"
    );
    let (status, body) = app
        .admin_post_json(
            "/api/v1/replays",
            json!({"mode": "dispatch", "only_failed": true}),
        )
        .await;
    assert_eq!(status, 400, "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("`only_failed` applies to `mode: rerun`"),
        "{body}"
    );
    let (status, body) = app
        .admin_post_json(
            "/api/v1/replays",
            json!({"mode": "dispatch", "workflows": ["nope"]}),
        )
        .await;
    assert_eq!(status, 400, "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("`nope`, which is not loaded (loaded: late)"),
        "{body}"
    );
    let empty = TestApp::spawn(db).await;
    let (status, body) = empty
        .admin_post_json("/api/v1/replays", json!({"mode": "dispatch"}))
        .await;
    assert_eq!(status, 400, "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("no workflow that starts runs is loaded"),
        "{body}"
    );
    // The default is `rerun`.
    let (status, body) = app.admin_post_json("/api/v1/replays", json!({})).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["mode"], "rerun");
}

fn run_cli(db: &TestDb, workflows: &std::path::Path, args: &[&str]) -> (bool, String, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_switchboard"))
        .arg("dispatch")
        .args(args)
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("SWITCHBOARD_DATABASE_URL", db.url())
        .env("SWITCHBOARD_WORKFLOWS", workflows)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// `switchboard dispatch --dry-run` prints the backtest and creates nothing;
/// without it, it creates the missing runs (once) and prints the counts.
async fn the_dispatch_command(db: &TestDb) {
    let completed = store_events(db, "cli", 40).await;
    let sink = Sink::start().await;
    let dir = workflow_dir(&[("late.yaml", &completed_workflow(&sink, "/ok/cli"))]);
    let (ok, out, err) = run_cli(db, dir.path(), &["--since", "1d", "--dry-run"]);
    assert!(ok, "{out}{err}");
    assert!(
        out.contains(
            "backtest of `late` on 40 stored conversation.ended event(s): 10 would have run"
        ),
        "{out}"
    );
    assert!(out.contains("✓ #1 ev_cli_0"), "{out}");
    assert!(out.contains("status is `failed`"), "{out}");
    assert!(out.contains("dry run: nothing was created"), "{out}");
    assert_eq!(db.count("SELECT COUNT(*) FROM runs").await, 0);
    assert_eq!(db.count("SELECT COUNT(*) FROM replays").await, 0);
    let (ok, out, err) = run_cli(db, dir.path(), &["--since", "1d", "--workflow", "nope"]);
    assert!(!ok);
    assert!(
        err.contains("--workflow nope: no such workflow starting runs") && err.contains("late"),
        "{err}"
    );
    let (ok, out2, err) = run_cli(db, dir.path(), &["--since", "1d", "--workflow", "late"]);
    assert!(ok, "{out}{out2}{err}");
    assert!(out2.contains("40 stored event(s) selected"), "{out2}");
    assert!(
        out2.contains("finished: 40 event(s), 10 run(s) created, 30 event(s) without a new run"),
        "{out2}"
    );
    assert!(err.contains("40/40 events, 10 run(s) created"), "{err}");
    let (ok, out3, err) = run_cli(db, dir.path(), &["--since", "1d"]);
    assert!(ok, "{out3}{err}");
    assert!(
        out3.contains("finished: 40 event(s), 0 run(s) created"),
        "run twice, nothing twice: {out3}"
    );
    assert_eq!(db.count("SELECT COUNT(*) FROM runs").await, 10);
    // A server on the database executes them.
    let (app, _dir) =
        TestApp::with_workflows(db, &[("late.yaml", &completed_workflow(&sink, "/ok/cli"))]).await;
    let runs = app.wait_runs_final(10, 30).await;
    assert!(runs.iter().all(|r| r.status == "succeeded"));
    let ids: HashSet<String> = runs.iter().map(|r| r.event_id.clone()).collect();
    assert_eq!(ids, completed);
}

/// A bulk replay killed with kill -9 mid-way and taken over after a restart
/// replays every event exactly once.
async fn a_bulk_replay_killed_mid_way_replays_no_event_twice(db: &TestDb) {
    const EVENTS: usize = 600;
    let sink = Sink::start().await;
    let workflows = workflow_dir(&[(
        "wf.yaml",
        &format!(
            "on: {{ event: conversation.ended }}\nsteps:\n  - id: post\n    http: {{ url: \"{}\" }}\n",
            sink.url("/ok/k9")
        ),
    )]);
    let logs = tempfile::tempdir().unwrap();
    let mut server = serve(db, &workflows, &logs).await;
    let http = client();
    let url = server.webhook_url();
    for chunk in (0..EVENTS).collect::<Vec<_>>().chunks(32) {
        let sends = chunk.iter().map(|i| {
            let (http, url) = (http.clone(), url.clone());
            async move {
                deliver_to(
                    &http,
                    &url,
                    &ended_body(&format!("ev_rk_{i}"), &format!("conv_rk_{i}"), "completed"),
                    Delivery::default(),
                )
                .await
                .status()
                .as_u16()
            }
        });
        let statuses = futures::future::join_all(sends).await;
        assert!(statuses.iter().all(|s| *s == 200), "{statuses:?}");
    }
    let deadline = Instant::now() + Duration::from_secs(120);
    while db
        .count("SELECT COUNT(*) FROM runs WHERE status = 'succeeded'")
        .await
        < EVENTS as i64
    {
        assert!(Instant::now() < deadline, "original runs did not finish");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let id = start_replay(&server, json!({})).await;
    let probe = Probe::open(db).await;
    let done_sql = format!("SELECT done FROM replays WHERE replay_id = '{id}'");
    let done_at_kill = kill_mid_page(&probe, &done_sql, &mut server).await;
    assert!(
        done_at_kill < EVENTS as i64,
        "killed after it finished ({done_at_kill}); the test did not interrupt it"
    );
    let replayed_at_kill = db
        .count("SELECT COUNT(*) FROM runs WHERE replay_of IS NOT NULL")
        .await;
    let server = serve(db, &workflows, &logs).await;
    let deadline = Instant::now() + Duration::from_secs(90);
    let done = loop {
        let finished = probe
            .count(&format!(
                "SELECT COUNT(*) FROM replays WHERE replay_id = '{id}' AND status = 'succeeded'"
            ))
            .await;
        let done = probe
            .count(&format!(
                "SELECT done FROM replays WHERE replay_id = '{id}'"
            ))
            .await;
        if finished == 1 {
            break done;
        }
        assert!(
            Instant::now() < deadline,
            "the replay was not taken over after the restart (done {done}); log:\n{}",
            std::fs::read_to_string(&server.log).unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(done, EVENTS as i64, "each event counted once");
    assert_eq!(
        db.count("SELECT COUNT(*) FROM runs WHERE replay_of IS NOT NULL")
            .await,
        EVENTS as i64,
        "one replay run per event ({replayed_at_kill} existed at the kill)"
    );
    assert_eq!(
        db.count("SELECT COUNT(DISTINCT replay_of) FROM runs WHERE replay_of IS NOT NULL")
            .await,
        EVENTS as i64
    );
    assert_eq!(
        db.count(&format!(
            "SELECT runs_created FROM replays WHERE replay_id = '{id}'"
        ))
        .await,
        EVENTS as i64
    );
    let deadline = Instant::now() + Duration::from_secs(120);
    while db
        .count("SELECT COUNT(*) FROM runs WHERE status = 'succeeded'")
        .await
        < 2 * EVENTS as i64
    {
        assert!(Instant::now() < deadline, "replay runs did not finish");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let runs = runs_of(&server.base()).await;
    assert!(!runs.is_empty());
    let keys: HashSet<String> = sink
        .received_on("/ok/k9")
        .iter()
        .map(|r| r.headers["idempotency-key"].clone())
        .collect();
    assert_eq!(
        keys.len(),
        2 * EVENTS,
        "every original and every replay run posted, with its own key"
    );
}

/// A dispatch killed with kill -9 mid-way is taken over after the restart and
/// creates each missing run once, with exact counts.
async fn a_dispatch_killed_mid_way_creates_each_run_once(db: &TestDb) {
    const EVENTS: usize = 2_000;
    let completed = store_events(db, "k", EVENTS).await;
    let sink = Sink::start().await;
    let workflows = workflow_dir(&[("late.yaml", &completed_workflow(&sink, "/ok/kd"))]);
    let logs = tempfile::tempdir().unwrap();
    let mut server = serve(db, &workflows, &logs).await;
    let id = start_replay(&server, json!({"mode": "dispatch"})).await;
    let probe = Probe::open(db).await;
    let done_sql = format!("SELECT done FROM replays WHERE replay_id = '{id}'");
    let done_at_kill = kill_mid_page(&probe, &done_sql, &mut server).await;
    assert!(
        done_at_kill < EVENTS as i64,
        "killed after it finished; the test did not interrupt it"
    );
    let server = serve(db, &workflows, &logs).await;
    let deadline = Instant::now() + Duration::from_secs(120);
    let finished =
        format!("SELECT COUNT(*) FROM replays WHERE replay_id = '{id}' AND status = 'succeeded'");
    while probe.count(&finished).await == 0 {
        assert!(
            Instant::now() < deadline,
            "the dispatch was not taken over after the restart; log:\n{}",
            std::fs::read_to_string(&server.log).unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let want = completed.len() as i64;
    assert_eq!(
        probe.count(&done_sql).await,
        EVENTS as i64,
        "each event counted once"
    );
    assert_eq!(
        probe
            .count(&format!(
                "SELECT runs_created FROM replays WHERE replay_id = '{id}'"
            ))
            .await,
        want
    );
    assert_eq!(probe.count("SELECT COUNT(*) FROM runs").await, want);
    assert_eq!(
        probe
            .count("SELECT COUNT(DISTINCT event_id) FROM runs")
            .await,
        want
    );
    let deadline = Instant::now() + Duration::from_secs(120);
    while probe
        .count("SELECT COUNT(*) FROM runs WHERE status = 'succeeded'")
        .await
        < want
    {
        assert!(Instant::now() < deadline, "runs did not all succeed");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let keys: HashSet<String> = sink
        .received_on("/ok/kd")
        .iter()
        .map(|r| r.headers["idempotency-key"].clone())
        .collect();
    assert_eq!(keys.len() as i64, want);
}

/// SIGTERM hands a replay in progress back (no lease left to lapse); the
/// next instance finishes it.
async fn sigterm_hands_a_replay_back(db: &TestDb) {
    const EVENTS: usize = 2_000;
    let completed = store_events(db, "t", EVENTS).await;
    let sink = Sink::start().await;
    let workflows = workflow_dir(&[("late.yaml", &completed_workflow(&sink, "/ok/t"))]);
    let logs = tempfile::tempdir().unwrap();
    let mut server = serve(db, &workflows, &logs).await;
    let id = start_replay(&server, json!({"mode": "dispatch"})).await;
    let probe = Probe::open(db).await;
    let done_sql = format!("SELECT done FROM replays WHERE replay_id = '{id}'");
    let deadline = Instant::now() + Duration::from_secs(60);
    while probe.count(&done_sql).await < 100 {
        assert!(Instant::now() < deadline, "the dispatch made no progress");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    server.terminate();
    assert!(server.wait_exit(Duration::from_secs(20)).await.success());
    // Both monitors stopped gracefully, and no task ended as one the supervisor would restart.
    let log = std::fs::read_to_string(&server.log).unwrap_or_default();
    assert!(log.contains("replay workers stopped gracefully"), "{log}");
    assert!(!log.contains("restarting it"), "{log}");
    assert!(!log.contains("workers stopped with an error"), "{log}");
    assert_eq!(
        probe
            .count(&format!(
                "SELECT COUNT(*) FROM replays WHERE replay_id = '{id}' AND status = 'running' AND lease_owner IS NULL"
            ))
            .await,
        1,
        "handed back unfinished (done {}); log:\n{}",
        probe.count(&done_sql).await,
        std::fs::read_to_string(&server.log).unwrap_or_default()
    );
    let _server = serve(db, &workflows, &logs).await;
    let finished =
        format!("SELECT COUNT(*) FROM replays WHERE replay_id = '{id}' AND status = 'succeeded'");
    let deadline = Instant::now() + Duration::from_secs(120);
    while probe.count(&finished).await == 0 {
        assert!(Instant::now() < deadline, "not finished after the restart");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(probe.count(&done_sql).await, EVENTS as i64);
    assert_eq!(
        probe
            .count("SELECT COUNT(DISTINCT event_id) FROM runs")
            .await,
        completed.len() as i64
    );
    assert_eq!(
        probe.count("SELECT COUNT(*) FROM runs").await,
        completed.len() as i64
    );
}

/// A dispatch judges each event as of its own place in the log (the
/// conversation as it was then), exactly as a backtest does: a transition
/// `new → qualified` matches only where the field really moved from `new`.
async fn a_dispatch_judges_each_event_as_of_its_place_in_the_log(db: &TestDb) {
    use common::field_body;
    let at = |s: u32| format!("2025-07-14T15:10:{s:02}.000Z");
    let bodies = vec![
        field_body("ev_f1", "conv_fa", &at(1), "lead_status", json!("new")),
        field_body(
            "ev_f2",
            "conv_fb",
            &at(2),
            "lead_status",
            json!("qualified"),
        ),
        field_body(
            "ev_f3",
            "conv_fa",
            &at(3),
            "lead_status",
            json!("qualified"),
        ),
        field_body("ev_f4", "conv_fa", &at(4), "lead_status", json!("new")),
        ended_body("ev_f5", "conv_fb", "completed"),
        field_body(
            "ev_f6",
            "conv_fa",
            &at(6),
            "lead_status",
            json!("qualified"),
        ),
        field_body(
            "ev_f7",
            "conv_fa",
            &at(7),
            "lead_status",
            json!("qualified"),
        ),
    ];
    store_bodies(db, &bodies).await;
    let sink = Sink::start().await;
    let yaml = format!(
        "on: {{ event: conversation.custom_fields.updated, field: lead_status, from: new, to: qualified }}
steps:
  - id: post
    http: {{ url: \"{}\" }}
",
        sink.url("/ok/moved")
    );
    let (app, _dir) = TestApp::with_workflows(db, &[("moved.yaml", &yaml)]).await;
    let (status, backtest) = app
        .admin_post_json("/api/v1/workflows/backtest", json!({"workflow": yaml}))
        .await;
    assert_eq!(status, 200, "{backtest}");
    let would: HashSet<String> = backtest["events"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["matched"] == true)
        .map(|e| e["event_id"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(
        would,
        HashSet::from(["ev_f3".to_owned(), "ev_f6".to_owned()])
    );
    let (status, r) = app
        .admin_post_json("/api/v1/replays", json!({"mode": "dispatch"}))
        .await;
    assert_eq!(status, 200, "{r}");
    let done = app.wait_replay(r["id"].as_str().unwrap(), 30).await;
    assert_eq!(
        (done["done"].as_i64(), done["runs_created"].as_i64()),
        (Some(7), Some(2)),
        "{done}"
    );
    let runs = app.wait_runs_final(2, 20).await;
    let ran: HashSet<String> = runs.iter().map(|r| r.event_id.clone()).collect();
    assert_eq!(ran, would, "dispatch and backtest agree");
    assert!(runs.iter().all(|r| r.status == "succeeded"));
    let (_, ev) = app.admin_get("/api/v1/events/ev_f7").await;
    let decisions = ev["match_decisions"].to_string();
    assert!(
        decisions.contains("\"matched\":false") && decisions.contains("qualified"),
        "the verdict on ev_f7 is recorded with its reason: {decisions}"
    );
}

on_both_backends!(
    a_dispatch_judges_each_event_as_of_its_place_in_the_log,
    sigterm_hands_a_replay_back,
    a_dispatch_killed_mid_way_creates_each_run_once,
    dispatch_requests_are_validated,
    the_dispatch_command,
    a_bulk_replay_killed_mid_way_replays_no_event_twice,
    two_concurrent_dispatches_create_each_missing_run_once,
);
