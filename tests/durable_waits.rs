//! Durable waits end to end, on SQLite and PostgreSQL: `wait` resumes after
//! its time, `wait_for` on a matching later event of the conversation (one
//! stored before the step was reached included, one before the trigger not),
//! `when` filters, the timeout path, cancel, the admin API's view of a
//! waiting run, and kill -9 of the real binary during a wait.

mod common;

use std::time::{Duration, Instant};

use common::sink::Sink;
use common::{
    Delivery, ServerProcess, TestApp, TestDb, client, deliver_to, ended_body, field_body, runs_of,
    workflow_dir,
};
use serde_json::{Value, json};
use switchboard::store::runs::RunStatus;

const AT: &str = "2025-07-14T15:10:00Z";

/// The run of this app (there is one), once its status is `status`.
async fn run_with_status(app: &TestApp, status: &str, secs: u64) -> Value {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        let (_, page) = app.admin_get("/api/v1/runs").await;
        if let Some(r) = page["data"]
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["status"] == status)
        {
            return r.clone();
        }
        assert!(
            Instant::now() < deadline,
            "no {status} run within {secs}s: {page}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn wait_then_post(sink: &Sink, wait: &str) -> String {
    format!(
        "on: {{ event: conversation.ended, status: completed }}\nsteps:\n  - id: settle\n    wait: {wait}\n  - id: post\n    http:\n      url: \"{}\"\n      json: {{ waited: \"{{{{ steps.settle.waited_ms }}}}\" }}\n",
        sink.url("/ok/after-wait")
    )
}

/// `wait_for` of `lead_status` becoming `qualified`, then two steps taking either branch.
fn follow_up(sink: &Sink, before: &str, timeout: &str, when: &str) -> String {
    format!(
        "on: {{ event: conversation.ended, status: completed }}\norder: none\nsteps:\n{before}  - id: qualified\n    wait_for:\n      event: conversation.custom_fields.updated\n      field: lead_status\n{when}      timeout: {timeout}\n  - id: deal\n    if: not steps.qualified.timed_out\n    http:\n      url: \"{}\"\n      json: {{ stage: \"{{{{ steps.qualified.event.payload.value }}}}\", event: \"{{{{ steps.qualified.event.id }}}}\" }}\n  - id: nudge\n    if: steps.qualified.timed_out\n    http:\n      url: \"{}\"\n      json: {{ timed_out: \"{{{{ steps.qualified.timed_out }}}}\", event: \"{{{{ steps.qualified.event }}}}\" }}\n",
        sink.url("/ok/deal"),
        sink.url("/ok/nudge")
    )
}

async fn a_wait_resumes_after_its_time_once(db: &TestDb) {
    let sink = Sink::start().await;
    let (app, _dir) =
        TestApp::with_workflows(db, &[("w.yaml", &wait_then_post(&sink, "700ms"))]).await;
    let sent = Instant::now();
    assert_eq!(
        app.deliver(&ended_body("ev_w1", "conv_w", "completed"))
            .await
            .status(),
        200
    );
    let waiting = run_with_status(&app, "waiting", 5).await;
    let (seen, seen_utc) = (Instant::now(), chrono::Utc::now());
    assert_eq!(waiting["wait_reason"], "timer", "{waiting}");
    assert_eq!(waiting["step"], "settle");
    assert!(waiting["resume_at"].is_string(), "{waiting}");
    assert_eq!(waiting["waiting_for"]["kind"], "timer", "{waiting}");
    let got = sink.wait_for("/ok/after-wait", 1, 10).await;
    assert!(
        got[0].at.duration_since(sent) >= Duration::from_millis(700),
        "sent after {:?}",
        got[0].at.duration_since(sent)
    );
    let resume_at: chrono::DateTime<chrono::Utc> =
        waiting["resume_at"].as_str().unwrap().parse().unwrap();
    let due = seen + (resume_at - seen_utc).to_std().unwrap_or_default();
    // A figure, not an assertion.
    eprintln!(
        "wait: next step's request {:?} after resume_at",
        got[0].at.saturating_duration_since(due)
    );
    let waited = &got[0].json()["waited"];
    let waited = waited
        .as_i64()
        .or_else(|| waited.as_str().and_then(|s| s.parse().ok()))
        .unwrap();
    assert!(waited >= 650, "waited {waited} ms");
    let runs = app.wait_runs_final(1, 10).await;
    assert_eq!(runs[0].status(), Some(RunStatus::Succeeded));
    assert!(
        app.store.run_wait(&runs[0].run_id).await.unwrap().is_none(),
        "the wait is gone once it ended"
    );
    tokio::time::sleep(Duration::from_millis(1200)).await;
    assert_eq!(sink.received().len(), 1, "resumed once");
}

async fn wait_for_resumes_on_a_later_matching_event_with_its_envelope(db: &TestDb) {
    let sink = Sink::start().await;
    let wf = follow_up(&sink, "", "30s", "      to: qualified\n");
    let (app, _dir) = TestApp::with_workflows(db, &[("f.yaml", &wf)]).await;
    app.deliver(&ended_body("ev_e1", "conv_e", "completed"))
        .await;
    let waiting = run_with_status(&app, "waiting", 5).await;
    assert_eq!(waiting["wait_reason"], "event", "{waiting}");
    let w = &waiting["waiting_for"];
    assert_eq!(w["kind"], "event", "{waiting}");
    assert_eq!(w["event"], "conversation.custom_fields.updated");
    assert!(
        w["description"]
            .as_str()
            .unwrap()
            .contains("field `lead_status` to \"qualified\""),
        "{w}"
    );
    assert_eq!(w["until"], waiting["resume_at"]);
    let metrics = app.metrics_text().await;
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("switchboard_runs_waiting ") && l.ends_with(" 1")),
        "{metrics}"
    );
    assert!(
        metrics.contains("switchboard_runs_oldest_wait_seconds "),
        "{metrics}"
    );
    // A parked run is waiting, not pending (in backoff or held by a worker), nor due.
    for gauge in ["switchboard_jobs_pending ", "switchboard_jobs_waiting "] {
        assert!(
            metrics
                .lines()
                .any(|l| l.starts_with(gauge) && l.ends_with(" 0")),
            "{gauge}: {metrics}"
        );
    }
    // Another conversation, another field, another value: none resumes it.
    let others = [
        field_body("ev_e2", "conv_other", AT, "lead_status", json!("qualified")),
        field_body("ev_e3", "conv_e", AT, "phone", json!("+1555")),
        field_body("ev_e4", "conv_e", AT, "lead_status", json!("contacted")),
    ];
    for body in &others {
        assert_eq!(app.deliver(body).await.status(), 200);
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        run_with_status(&app, "waiting", 1).await["id"],
        waiting["id"]
    );
    assert!(sink.received().is_empty());
    app.deliver(&field_body(
        "ev_e5",
        "conv_e",
        "2025-07-14T15:11:00Z",
        "lead_status",
        json!("qualified"),
    ))
    .await;
    let acked = Instant::now();
    let got = sink.wait_for("/ok/deal", 1, 10).await;
    // A figure, not an assertion (see examples/bench for measured targets).
    eprintln!(
        "wait_for: next step's request {:?} after the matching event's ack",
        got[0].at.saturating_duration_since(acked)
    );
    assert_eq!(
        got[0].json(),
        json!({"stage": "qualified", "event": "ev_e5"})
    );
    let runs = app.wait_runs_final(1, 10).await;
    assert_eq!(runs[0].status(), Some(RunStatus::Succeeded));
    let (_, detail) = app
        .admin_get(&format!("/api/v1/runs/{}", runs[0].run_id))
        .await;
    let q = &detail["step_results"]["qualified"];
    assert_eq!(q["timed_out"], false);
    assert_eq!(q["event"]["id"], "ev_e5", "the whole envelope");
    assert_eq!(q["event"]["payload"]["key"], "lead_status");
    assert_eq!(detail["step_results"]["nudge"]["skipped"], true);
    // A second matching event resumes nothing (the wait ended).
    app.deliver(&field_body(
        "ev_e6",
        "conv_e",
        "2025-07-14T15:12:00Z",
        "lead_status",
        json!("new"),
    ))
    .await;
    app.deliver(&field_body(
        "ev_e7",
        "conv_e",
        "2025-07-14T15:13:00Z",
        "lead_status",
        json!("qualified"),
    ))
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(sink.received().len(), 1);
}

async fn an_event_stored_before_the_step_was_reached_counts_one_before_the_trigger_does_not(
    db: &TestDb,
) {
    let sink = Sink::start().await;
    // The run first waits 800 ms; the field changes meanwhile.
    let wf = follow_up(
        &sink,
        "  - id: settle\n    wait: 800ms\n",
        "2s",
        "      to: qualified\n",
    );
    let (app, _dir) = TestApp::with_workflows(db, &[("f.yaml", &wf)]).await;
    // conv_before: qualified BEFORE the call ended: not after the trigger, so it times out.
    app.deliver(&field_body(
        "ev_b0",
        "conv_before",
        AT,
        "lead_status",
        json!("qualified"),
    ))
    .await;
    app.deliver(&ended_body("ev_b1", "conv_before", "completed"))
        .await;
    // conv_early: qualified after the trigger, while the run is still at `settle`.
    app.deliver(&ended_body("ev_b2", "conv_early", "completed"))
        .await;
    app.deliver(&field_body(
        "ev_b3",
        "conv_early",
        AT,
        "lead_status",
        json!("qualified"),
    ))
    .await;
    let deal = sink.wait_for("/ok/deal", 1, 10).await;
    assert_eq!(deal[0].json()["event"], "ev_b3");
    let nudge = sink.wait_for("/ok/nudge", 1, 10).await;
    assert_eq!(nudge[0].json(), json!({"timed_out": true, "event": null}));
    let runs = app.wait_runs_final(2, 10).await;
    assert!(
        runs.iter()
            .all(|r| r.status() == Some(RunStatus::Succeeded))
    );
    assert_eq!(sink.received().len(), 2);
}

async fn wait_for_an_ended_status(db: &TestDb) {
    let sink = Sink::start().await;
    let wf = format!(
        "on: {{ event: conversation.custom_fields.updated, field: lead_status, to: hot }}\nsteps:\n  - id: call\n    wait_for: {{ event: conversation.ended, status: [completed, voicemail], timeout: 30s }}\n  - id: post\n    http:\n      url: \"{}\"\n      json: {{ status: \"{{{{ steps.call.event.payload.status }}}}\", id: \"{{{{ steps.call.event.id }}}}\" }}\n",
        sink.url("/ok/ended")
    );
    let (app, _dir) = TestApp::with_workflows(db, &[("e.yaml", &wf)]).await;
    app.deliver(&field_body(
        "ev_s1",
        "conv_s",
        AT,
        "lead_status",
        json!("hot"),
    ))
    .await;
    run_with_status(&app, "waiting", 5).await;
    app.deliver(&ended_body("ev_s2", "conv_s", "busy")).await;
    app.deliver(&ended_body("ev_s3", "conv_s", "voicemail"))
        .await;
    let got = sink.wait_for("/ok/ended", 1, 10).await;
    assert_eq!(got[0].json(), json!({"status": "voicemail", "id": "ev_s3"}));
}

async fn a_wait_for_times_out_with_timed_out_true_and_no_event(db: &TestDb) {
    let sink = Sink::start().await;
    let wf = follow_up(&sink, "", "600ms", "      to: qualified\n");
    let (app, _dir) = TestApp::with_workflows(db, &[("f.yaml", &wf)]).await;
    let sent = Instant::now();
    app.deliver(&ended_body("ev_t1", "conv_t", "completed"))
        .await;
    let got = sink.wait_for("/ok/nudge", 1, 10).await;
    assert!(got[0].at.duration_since(sent) >= Duration::from_millis(600));
    let runs = app.wait_runs_final(1, 10).await;
    let (_, detail) = app
        .admin_get(&format!("/api/v1/runs/{}", runs[0].run_id))
        .await;
    let q = &detail["step_results"]["qualified"];
    assert_eq!(q["timed_out"], true, "{detail}");
    assert_eq!(q["event"], Value::Null);
    assert_eq!(detail["step_results"]["deal"]["skipped"], true);
    // An event after the timeout changes nothing.
    app.deliver(&field_body(
        "ev_t2",
        "conv_t",
        AT,
        "lead_status",
        json!("qualified"),
    ))
    .await;
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(sink.received().len(), 1);
}

async fn when_filters_the_arriving_events(db: &TestDb) {
    let sink = Sink::start().await;
    let wf = follow_up(
        &sink,
        "",
        "30s",
        "      when: event.payload.value != \"test\"\n",
    );
    let (app, _dir) = TestApp::with_workflows(db, &[("f.yaml", &wf)]).await;
    app.deliver(&ended_body("ev_n1", "conv_n", "completed"))
        .await;
    run_with_status(&app, "waiting", 5).await;
    app.deliver(&field_body(
        "ev_n2",
        "conv_n",
        AT,
        "lead_status",
        json!("test"),
    ))
    .await;
    app.deliver(&field_body(
        "ev_n3",
        "conv_n",
        "2025-07-14T15:11:00Z",
        "lead_status",
        json!("hot"),
    ))
    .await;
    let got = sink.wait_for("/ok/deal", 1, 10).await;
    assert_eq!(got[0].json(), json!({"stage": "hot", "event": "ev_n3"}));
}

async fn a_waiting_run_can_be_cancelled_and_no_event_resumes_it(db: &TestDb) {
    let sink = Sink::start().await;
    let wf = follow_up(&sink, "", "30s", "      to: qualified\n");
    let (app, _dir) = TestApp::with_workflows(db, &[("f.yaml", &wf)]).await;
    app.deliver(&ended_body("ev_c1", "conv_c", "completed"))
        .await;
    let waiting = run_with_status(&app, "waiting", 5).await;
    let (_, page) = app.admin_get("/api/v1/runs?status=waiting").await;
    assert_eq!(page["data"].as_array().unwrap().len(), 1, "{page}");
    let id = waiting["id"].as_str().unwrap();
    let (status, body) = app.admin_post(&format!("/api/v1/runs/{id}/cancel")).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["status"], "cancelled");
    assert!(app.store.run_wait(id).await.unwrap().is_none());
    app.deliver(&field_body(
        "ev_c2",
        "conv_c",
        AT,
        "lead_status",
        json!("qualified"),
    ))
    .await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(sink.received().is_empty());
    let (_, run) = app.admin_get(&format!("/api/v1/runs/{id}")).await;
    assert_eq!(run["status"], "cancelled");
    let (_, page) = app.admin_get("/api/v1/runs?status=waiting").await;
    assert!(page["data"].as_array().unwrap().is_empty());
}

async fn a_replay_waits_again(db: &TestDb) {
    let sink = Sink::start().await;
    let (app, _dir) =
        TestApp::with_workflows(db, &[("w.yaml", &wait_then_post(&sink, "300ms"))]).await;
    app.deliver(&ended_body("ev_r1", "conv_r", "completed"))
        .await;
    sink.wait_for("/ok/after-wait", 1, 10).await;
    let runs = app.wait_runs_final(1, 10).await;
    let (status, body) = app.admin_post("/api/v1/events/ev_r1/replay").await;
    assert!(status == 200 || status == 201 || status == 202, "{body}");
    let waiting = run_with_status(&app, "waiting", 5).await;
    assert_ne!(waiting["id"], runs[0].run_id.as_str(), "a new run waits");
    assert_eq!(waiting["wait_reason"], "timer");
    sink.wait_for("/ok/after-wait", 2, 10).await;
}

/// kill -9 of the real binary while runs wait (a timer and a `wait_for`),
/// then a restart: each resumes, once.
async fn kill_9_during_a_wait_then_restart_resumes_once(db: &TestDb) {
    let sink = Sink::start().await;
    let workflows = workflow_dir(&[
        ("timer.yaml", &wait_then_post(&sink, "2s")),
        (
            "f.yaml",
            &follow_up(&sink, "", "60s", "      to: qualified\n")
                .replace("status: completed", "status: voicemail"),
        ),
    ]);
    let wf_env = workflows.path().display().to_string();
    let logs = tempfile::tempdir().unwrap();
    let env = [("SWITCHBOARD_WORKFLOWS", wf_env.as_str())];
    let mut server = ServerProcess::start(db, logs.path(), &env).await;
    let c = client();
    for body in [
        ended_body("ev_k1", "conv_k1", "completed"),
        ended_body("ev_k2", "conv_k2", "voicemail"),
    ] {
        let r = deliver_to(&c, &server.webhook_url(), &body, Delivery::default()).await;
        assert_eq!(r.status(), 200);
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let runs = runs_of(&server.base()).await;
        if runs.len() == 2 && runs.iter().all(|r| r["status"] == "waiting") {
            break;
        }
        assert!(Instant::now() < deadline, "not both waiting: {runs:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    server.kill9();
    let server = ServerProcess::start(db, logs.path(), &env).await;
    let r = deliver_to(
        &c,
        &server.webhook_url(),
        &field_body("ev_k3", "conv_k2", AT, "lead_status", json!("qualified")),
        Delivery::default(),
    )
    .await;
    assert_eq!(r.status(), 200);
    sink.wait_for("/ok/after-wait", 1, 10).await;
    let deal = sink.wait_for("/ok/deal", 1, 10).await;
    assert_eq!(deal[0].json()["event"], "ev_k3");
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(sink.received().len(), 2, "each resumed once");
    let runs = runs_of(&server.base()).await;
    assert!(runs.iter().all(|r| r["status"] == "succeeded"), "{runs:?}");
}

async fn a_backtest_judges_wait_for_against_the_stored_history(db: &TestDb) {
    let sink = Sink::start().await;
    let app = TestApp::spawn(db).await;
    app.deliver(&ended_body("ev_h1", "conv_h1", "completed"))
        .await;
    app.deliver(&ended_body("ev_h2", "conv_h2", "completed"))
        .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    app.deliver(&field_body(
        "ev_h3",
        "conv_h1",
        AT,
        "lead_status",
        json!("qualified"),
    ))
    .await;
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let wf = follow_up(&sink, "", "1s", "      to: qualified\n");
    let resp = app
        .client
        .post(app.url("/api/v1/workflows/backtest"))
        .bearer_auth(common::TOKEN)
        .json(&json!({"workflow": wf}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let report: Value = resp.json().await.unwrap();
    let events = report["events"].as_array().unwrap();
    let of = |id: &str| events.iter().find(|e| e["event_id"] == id).unwrap().clone();
    let h1 = of("ev_h1");
    let note = h1["requests"][0]["note"].as_str().unwrap();
    assert!(
        note.starts_with("would have resumed on ev_h3 after ") && note.ends_with("ms"),
        "{h1}"
    );
    assert_eq!(
        h1["requests"][1]["request"]["body"],
        json!({"stage": "qualified", "event": "ev_h3"})
    );
    assert!(
        h1["requests"][2]["note"]
            .as_str()
            .unwrap()
            .starts_with("skipped")
    );
    let h2 = of("ev_h2");
    assert!(
        h2["requests"][0]["note"]
            .as_str()
            .unwrap()
            .starts_with("would have timed out after 1s"),
        "{h2}"
    );
    assert_eq!(
        h2["requests"][2]["request"]["body"],
        json!({"timed_out": true, "event": null})
    );
    assert!(sink.received().is_empty(), "a backtest sends nothing");
}

on_both_backends!(
    wait_for_an_ended_status,
    a_backtest_judges_wait_for_against_the_stored_history,
    a_wait_resumes_after_its_time_once,
    wait_for_resumes_on_a_later_matching_event_with_its_envelope,
    an_event_stored_before_the_step_was_reached_counts_one_before_the_trigger_does_not,
    a_wait_for_times_out_with_timed_out_true_and_no_event,
    when_filters_the_arriving_events,
    a_waiting_run_can_be_cancelled_and_no_event_resumes_it,
    a_replay_waits_again,
    kill_9_during_a_wait_then_restart_resumes_once,
);

/// `switchboard validate` on wait steps: each mistake is an error at its
/// line and column, with a caret.
#[test]
fn validate_points_at_wait_mistakes() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("bad.yaml"),
        "on: { event: conversation.ended }\norder: sometimes\nsteps:\n  - id: early\n    http: { url: \"https://x.example/{{ steps.q.event.id }}\" }\n  - id: q\n    wait_for:\n      event: conversation.ended\n      field: lead_status\n  - id: r\n    wait_for: { event: conversation.started, timeout: 1h }\n  - id: s\n    wait: soon\n  - id: t\n    wait_for:\n      event: conversation.custom_fields.updated\n      field: x\n      when: steps.q.timed_out\n      timeout: 5m\n",
    )
    .unwrap();
    let (code, _, stderr) = common::validate(dir.path());
    assert_eq!(code, 1, "{stderr}");
    for expected in [
        "bad.yaml:2:8: error: `order` is `sometimes`; use `conversation` or `none`",
        "bad.yaml:5:18: error: `http.url` uses steps.q, which runs later",
        "bad.yaml:8:7: error: `wait_for` needs `timeout`",
        "bad.yaml:9:14: error: `wait_for.field` only applies to conversation.custom_fields.updated, not `conversation.ended`",
        "bad.yaml:11:24: error: `wait_for.event`: `conversation.started` is not an event type a run can wait for",
        "bad.yaml:13:11: error: `wait`: `soon` is not a duration",
        "bad.yaml:18:13: error: `wait_for.when`: `steps` is not available here",
        "7 error(s)",
    ] {
        assert!(
            stderr.contains(expected),
            "missing `{expected}` in:\n{stderr}"
        );
    }
    assert!(
        stderr.contains("13 |     wait: soon\n   |           ^"),
        "{stderr}"
    );
    // A good one passes, with `order: none`.
    std::fs::write(
        dir.path().join("bad.yaml"),
        "on: { event: conversation.ended }\norder: none\nsteps:\n  - id: q\n    wait_for: { event: conversation.ended, status: [completed], timeout: 1d }\n  - id: p\n    http: { url: \"https://x.example/{{ steps.q.event.id }}\" }\n",
    )
    .unwrap();
    let (code, _, stderr) = common::validate(dir.path());
    assert_eq!(code, 0, "{stderr}");
}

/// A wait step is one `step` span, from when the run reached it to when it
/// resumed, in the trace of the event that started the run (real binary,
/// OTLP to an in-process collector).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wait_step_is_one_span_in_the_events_trace() {
    let db = TestDb::sqlite().await;
    let mut collector = fake_opentelemetry_collector::FakeCollectorServer::start()
        .await
        .expect("collector");
    let endpoint = collector.endpoint();
    let sink = Sink::start().await;
    let workflows = workflow_dir(&[("w.yaml", &wait_then_post(&sink, "600ms"))]);
    let wf_env = workflows.path().display().to_string();
    let logs = tempfile::tempdir().unwrap();
    let env = [
        ("SWITCHBOARD_WORKFLOWS", wf_env.as_str()),
        ("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint.as_str()),
        ("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc"),
        ("OTEL_BSP_SCHEDULE_DELAY", "100"),
    ];
    let server = ServerProcess::start(&db, logs.path(), &env).await;
    let trace = "4bf92f3577b34da6a3ce929d0e0e4736";
    let resp = common::deliver_with_headers(
        &client(),
        &server.webhook_url(),
        &ended_body("ev_span", "conv_span", "completed"),
        &[("traceparent", &format!("00-{trace}-00f067aa0ba902b7-01"))],
    )
    .await;
    assert_eq!(resp.status(), 200);
    sink.wait_for("/ok/after-wait", 1, 10).await;
    let mut spans = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(15);
    let is_settle = |s: &fake_opentelemetry_collector::ExportedSpan| {
        s.name == "step"
            && s.attributes
                .get("switchboard.step")
                .is_some_and(|v| v.contains("settle"))
    };
    while !spans.iter().any(is_settle) {
        assert!(Instant::now() < deadline, "no settle span: {spans:#?}");
        spans.extend(
            collector
                .exported_spans(1, Duration::from_millis(200))
                .await,
        );
    }
    let settle: Vec<_> = spans.iter().filter(|s| is_settle(s)).collect();
    assert_eq!(settle.len(), 1, "one span for the whole wait: {settle:#?}");
    let s = settle[0];
    assert_eq!(s.trace_id, trace, "in the event's trace");
    let took = Duration::from_nanos(s.end_time_unix_nano - s.start_time_unix_nano);
    assert!(
        took >= Duration::from_millis(600),
        "the span lasts the wait: {took:?}"
    );
    assert!(
        s.attributes["switchboard.wait.kind"].contains("timer"),
        "{s:?}"
    );
}
