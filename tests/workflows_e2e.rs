//! Workflows end to end, on SQLite and PostgreSQL: the real server, real
//! HTTP to a local sink, runs and attempts read back.

mod common;

use common::sink::Sink;
use common::{TestApp, TestDb, ended_body};
use switchboard::store::runs::RunStatus;

fn on_ended(sink: &Sink, path: &str, extra: &str) -> String {
    format!(
        "on:\n  event: conversation.ended\n  status: [completed, voicemail]\nsteps:\n  - id: post\n    http:\n      url: \"{}\"\n      json:\n        conversation: \"{{{{ event.conversation_id }}}}\"\n        live: \"{{{{ event.livemode }}}}\"\n{extra}",
        sink.url(path)
    )
}

async fn a_status_filter_that_matches_and_one_that_does_not(db: &TestDb) {
    let sink = Sink::start().await;
    let (app, _dir) =
        TestApp::with_workflows(db, &[("crm.yaml", &on_ended(&sink, "/ok/crm", ""))]).await;
    assert_eq!(
        app.deliver(&ended_body("ev_m1", "conv_1", "completed"))
            .await
            .status(),
        200
    );
    assert_eq!(
        app.deliver(&ended_body("ev_m2", "conv_2", "busy"))
            .await
            .status(),
        200
    );
    let got = sink.wait_for("/ok/crm", 1, 10).await;
    let runs = app.wait_runs_final(1, 10).await;
    assert_eq!(runs.len(), 1, "only the completed call runs");
    assert_eq!(runs[0].status(), Some(RunStatus::Succeeded));
    assert_eq!(
        got[0].json(),
        serde_json::json!({"conversation": "conv_1", "live": true})
    );
    assert_eq!(
        got[0].headers["idempotency-key"],
        format!("{}:post", runs[0].run_id)
    );
    assert!(got[0].headers["user-agent"].starts_with("switchboard/"));
    assert!(got[0].headers["traceparent"].starts_with("00-"));
    let busy = app.store.get_event("ev_m2").await.unwrap().unwrap();
    let decisions = app.store.decisions(busy.event.seq).await.unwrap();
    assert_eq!(decisions.len(), 1);
    assert!(!decisions[0].matched);
    assert_eq!(
        decisions[0].reason.as_deref(),
        Some("status is `busy`, not one of [completed, voicemail]")
    );
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    assert_eq!(sink.received().len(), 1, "nothing else was sent");
}

fn field_update(
    id: &str,
    conv: &str,
    key: &str,
    value: serde_json::Value,
    previous: Option<serde_json::Value>,
) -> Vec<u8> {
    let mut payload = serde_json::json!({"type": "conversation.custom_fields.updated", "key": key, "value": value});
    if let Some(p) = previous {
        payload["previous_value"] = p;
    }
    serde_json::json!({"id": id, "conversation_id": conv, "agent_id": "ca_t@v1", "livemode": true,
        "created_at": "2025-07-14T15:00:00Z", "payload": payload})
    .to_string()
    .into_bytes()
}

async fn run_detail(app: &TestApp, run_id: &str) -> serde_json::Value {
    let (status, run) = app.admin_get(&format!("/api/v1/runs/{run_id}")).await;
    assert_eq!(status, 200);
    run
}

async fn transitions_with_and_without_previous_value(db: &TestDb) {
    let sink = Sink::start().await;
    let wf = format!(
        "on:\n  event: conversation.custom_fields.updated\n  field: lead_status\n  from: [new, contacted]\n  to: qualified\nsteps:\n  - id: deal\n    http:\n      url: \"{}\"\n      json: {{ conv: \"{{{{ event.conversation_id }}}}\", was: \"{{{{ conversation.custom_fields.lead_status }}}}\" }}\n",
        sink.url("/ok/deal")
    );
    let (app, _dir) = TestApp::with_workflows(db, &[("deal.yaml", &wf)]).await;
    let q = serde_json::json!("qualified");
    // A: previous_value in the payload.
    app.deliver(&field_update(
        "ev_a1",
        "conv_a",
        "lead_status",
        "new".into(),
        None,
    ))
    .await;
    app.deliver(&field_update(
        "ev_a2",
        "conv_a",
        "lead_status",
        q.clone(),
        Some("new".into()),
    ))
    .await;
    // B: no previous_value: the projection knows it was `contacted`.
    app.deliver(&field_update(
        "ev_b1",
        "conv_b",
        "lead_status",
        "contacted".into(),
        None,
    ))
    .await;
    app.deliver(&field_update(
        "ev_b2",
        "conv_b",
        "lead_status",
        q.clone(),
        None,
    ))
    .await;
    // C: from `lost`: not a transition the workflow wants.
    app.deliver(&field_update(
        "ev_c1",
        "conv_c",
        "lead_status",
        "lost".into(),
        None,
    ))
    .await;
    app.deliver(&field_update(
        "ev_c2",
        "conv_c",
        "lead_status",
        q.clone(),
        None,
    ))
    .await;
    // D: set to the value it already had: no change, no run.
    app.deliver(&field_update(
        "ev_d1",
        "conv_d",
        "lead_status",
        "new".into(),
        None,
    ))
    .await;
    app.deliver(&field_update(
        "ev_d2",
        "conv_d",
        "lead_status",
        "new".into(),
        Some("new".into()),
    ))
    .await;
    let runs = app.wait_runs_final(2, 10).await;
    let mut events: Vec<&str> = runs.iter().map(|r| r.event_id.as_str()).collect();
    events.sort();
    assert_eq!(events, vec!["ev_a2", "ev_b2"]);
    let got = sink.wait_for("/ok/deal", 2, 10).await;
    assert!(
        got.iter().all(|r| r.json()["was"] == "qualified"),
        "conversation is as of the event"
    );
    let (_, c2) = app.admin_get("/api/v1/events/ev_c2").await;
    let seq = c2["sequence"].as_i64().unwrap();
    let d = app.store.decisions(seq).await.unwrap();
    assert_eq!(
        d[0].reason.as_deref(),
        Some("`lead_status` was \"lost\", not one of [\"new\", \"contacted\"]")
    );
}

async fn from_null_means_first_set(db: &TestDb) {
    let sink = Sink::start().await;
    let wf = format!(
        "on:\n  event: conversation.custom_fields.updated\n  field: caller_name\n  from: null\nsteps:\n  - id: welcome\n    http: {{ url: \"{}\" }}\n",
        sink.url("/ok/welcome")
    );
    let (app, _dir) = TestApp::with_workflows(db, &[("w.yaml", &wf)]).await;
    app.deliver(&common::fixture(
        "conversation_custom_fields_updated_first_set.json",
    ))
    .await;
    app.deliver(&field_update(
        "ev_n2",
        "conv_Qao75vrxIqo",
        "caller_name",
        "Zoë R.".into(),
        None,
    ))
    .await;
    let runs = app.wait_runs_final(1, 10).await;
    assert_eq!(runs.len(), 1);
    assert_eq!(runs[0].event_id, "ev_iRr4yHdgSlO");
}

async fn a_second_step_reads_the_first_steps_response(db: &TestDb) {
    let sink = Sink::start().await;
    let wf = format!(
        "on: {{ event: conversation.ended }}\nsteps:\n  - id: crm\n    http: {{ url: \"{}\" }}\n  - id: notify\n    http:\n      url: \"{}\"\n      json: {{ crm_id: \"{{{{ steps.crm.json.id }}}}\", vip: \"{{{{ steps.crm.json.vip }}}}\", name: \"{{{{ steps.crm.json.name }}}}\" }}\n",
        sink.url("/ok/crm"),
        sink.url("/ok/notify")
    );
    let (app, _dir) = TestApp::with_workflows(db, &[("two.yaml", &wf)]).await;
    app.deliver(&ended_body("ev_two", "conv_two", "completed"))
        .await;
    let runs = app.wait_runs_final(1, 10).await;
    assert_eq!(runs[0].status(), Some(RunStatus::Succeeded));
    let notify = sink.wait_for("/ok/notify", 1, 5).await;
    assert_eq!(
        notify[0].json(),
        serde_json::json!({"crm_id": "crm-1", "vip": true, "name": "Zoë"})
    );
    let crm = sink.received_on("/ok/crm");
    assert_ne!(
        crm[0].headers["idempotency-key"], notify[0].headers["idempotency-key"],
        "one key per step"
    );
    let detail = run_detail(&app, &runs[0].run_id).await;
    assert_eq!(detail["attempts"].as_array().unwrap().len(), 2);
    assert_eq!(detail["step_results"]["crm"]["json"]["id"], "crm-1");
}

async fn retries_after_500_and_503_then_success_with_one_key(db: &TestDb) {
    let sink = Sink::start().await;
    let wf = format!(
        "on: {{ event: conversation.ended }}\nsteps:\n  - id: post\n    http: {{ url: \"{}\" }}\n    retry: {{ max_attempts: 5, backoff: fixed, initial_delay: 300ms }}\n",
        sink.url("/flaky/2/crm")
    );
    let (app, _dir) = TestApp::with_workflows(db, &[("r.yaml", &wf)]).await;
    app.deliver(&ended_body("ev_retry", "conv_r", "completed"))
        .await;
    let runs = app.wait_runs_final(1, 15).await;
    assert_eq!(runs[0].status(), Some(RunStatus::Succeeded));
    let got = sink.received_on("/flaky/2/crm");
    assert_eq!(got.len(), 3);
    let key = &got[0].headers["idempotency-key"];
    assert!(
        got.iter().all(|r| &r.headers["idempotency-key"] == key),
        "one Idempotency-Key for every attempt"
    );
    for pair in got.windows(2) {
        let gap = pair[1].at - pair[0].at;
        assert!(
            gap >= std::time::Duration::from_millis(290),
            "backoff respected: {gap:?}"
        );
    }
    let detail = run_detail(&app, &runs[0].run_id).await;
    let attempts = detail["attempts"].as_array().unwrap();
    let outcomes: Vec<&str> = attempts
        .iter()
        .map(|a| a["outcome"].as_str().unwrap())
        .collect();
    assert_eq!(outcomes, vec!["retrying", "retrying", "succeeded"]);
    assert_eq!(attempts[0]["response_status"], 500);
    assert_eq!(attempts[1]["response_status"], 503);
    assert_eq!(attempts[0]["error_class"], "http_5xx");
    assert_eq!(attempts[0]["next_delay_ms"], 300);
    assert_eq!(detail["attempts_total"], 3);
}

async fn a_400_fails_at_once_and_exhausted_runs_can_be_retried(db: &TestDb) {
    let sink = Sink::start().await;
    let bad = format!(
        "on: {{ event: conversation.ended }}\nsteps:\n  - id: post\n    http: {{ url: \"{}\" }}\n",
        sink.url("/status/400/x")
    );
    let flaky = format!(
        "on: {{ event: conversation.ended }}\nsteps:\n  - id: post\n    http: {{ url: \"{}\" }}\n    retry: {{ max_attempts: 2, backoff: fixed, initial_delay: 100ms }}\n  - id: after\n    http: {{ url: \"{}\" }}\n",
        sink.url("/flaky/2/y"),
        sink.url("/ok/after")
    );
    let (app, _dir) =
        TestApp::with_workflows(db, &[("bad.yaml", &bad), ("flaky.yaml", &flaky)]).await;
    app.deliver(&ended_body("ev_400", "conv_400", "completed"))
        .await;
    let runs = app.wait_runs_final(2, 15).await;
    assert!(
        runs.iter().all(|r| r.status() == Some(RunStatus::Failed)),
        "{runs:?}"
    );
    let bad_run = runs.iter().find(|r| r.workflow == "bad").unwrap();
    let d = run_detail(&app, &bad_run.run_id).await;
    assert_eq!(
        d["attempts"].as_array().unwrap().len(),
        1,
        "a 400 is not retried"
    );
    assert_eq!(d["attempts"][0]["error_class"], "http_4xx");
    assert_eq!(d["attempts"][0]["response_body"], "answered 400");
    assert!(d["last_error"].as_str().unwrap().contains("HTTP 400"));
    let flaky_run = runs.iter().find(|r| r.workflow == "flaky").unwrap();
    assert_eq!(flaky_run.attempts_total, 2);
    assert!(
        sink.received_on("/ok/after").is_empty(),
        "later steps do not run after a failure"
    );
    // Retry from the failed step: the sink now answers 200.
    let (status, body) = app
        .admin_post(&format!("/api/v1/runs/{}/retry", flaky_run.run_id))
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["status"], "scheduled");
    sink.wait_for("/ok/after", 1, 10).await;
    let runs = app.wait_runs_final(2, 10).await;
    let flaky_run = runs.iter().find(|r| r.workflow == "flaky").unwrap();
    assert_eq!(flaky_run.status(), Some(RunStatus::Succeeded));
    assert_eq!(sink.received_on("/flaky/2/y").len(), 3);
    // Retrying a succeeded run is a conflict; an unknown run is 404.
    let (status, err) = app
        .admin_post(&format!("/api/v1/runs/{}/retry", flaky_run.run_id))
        .await;
    assert_eq!(
        (status, err["error"]["code"].as_str()),
        (409, Some("conflict"))
    );
    let (status, _) = app.admin_post("/api/v1/runs/run_nope/retry").await;
    assert_eq!(status, 404);
    let (status, _) = app.admin_get("/api/v1/runs/run_nope").await;
    assert_eq!(status, 404);
}

async fn a_timeout_is_retried(db: &TestDb) {
    let sink = Sink::start().await;
    let wf = format!(
        "on: {{ event: conversation.ended }}\nsteps:\n  - id: post\n    http: {{ url: \"{}\" }}\n    timeout: 300ms\n    retry: {{ max_attempts: 3, backoff: fixed, initial_delay: 50ms }}\n",
        sink.url("/slow-once/2000/x")
    );
    let (app, _dir) = TestApp::with_workflows(db, &[("t.yaml", &wf)]).await;
    app.deliver(&ended_body("ev_to", "conv_to", "completed"))
        .await;
    let runs = app.wait_runs_final(1, 10).await;
    assert_eq!(runs[0].status(), Some(RunStatus::Succeeded));
    let d = run_detail(&app, &runs[0].run_id).await;
    let attempts = d["attempts"].as_array().unwrap();
    assert_eq!(attempts.len(), 2);
    assert_eq!(attempts[0]["error_class"], "timeout");
    assert!(
        attempts[0]["duration_ms"].as_i64().unwrap() < 1500,
        "the attempt was cut at its timeout"
    );
}

async fn secrets_never_reach_the_admin_api(db: &TestDb) {
    let sink = Sink::start().await;
    let name = format!("SB_TEST_SECRET_{}", uuid::Uuid::new_v4().simple());
    let value = format!("s3cr3t-{}", uuid::Uuid::new_v4().simple());
    // SAFETY: a unique variable name; no other code reads it concurrently.
    unsafe { std::env::set_var(&name, &value) };
    let wf = format!(
        "on: {{ event: conversation.ended }}\nsecrets: [{name}]\nsteps:\n  - id: post\n    http:\n      url: \"{}\"\n      headers: {{ Authorization: \"Bearer {{{{ secrets.{name} }}}}\" }}\n      json: {{ token: \"{{{{ secrets.{name} }}}}\" }}\n",
        sink.url("/status/400/echo")
    );
    let (app, _dir) = TestApp::with_workflows(db, &[("s.yaml", &wf)]).await;
    app.deliver(&ended_body("ev_secret", "conv_s", "completed"))
        .await;
    let runs = app.wait_runs_final(1, 10).await;
    let got = sink.wait_for("/status/400/echo", 1, 5).await;
    assert_eq!(
        got[0].headers["authorization"],
        format!("Bearer {value}"),
        "the real secret is sent"
    );
    let d = run_detail(&app, &runs[0].run_id).await;
    assert_eq!(
        d["attempts"][0]["request"]["headers"]["Authorization"],
        "Bearer ***"
    );
    assert_eq!(d["attempts"][0]["request"]["body"]["token"], "***");
    for path in [
        format!("/api/v1/runs/{}", runs[0].run_id),
        "/api/v1/runs".to_owned(),
        "/api/v1/workflows".to_owned(),
        "/api/v1/events/ev_secret".to_owned(),
    ] {
        let resp = app
            .client
            .get(app.url(&path))
            .bearer_auth(common::TOKEN)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200, "{path}");
        let text = resp.text().await.unwrap();
        assert!(!text.contains(&value), "{path} leaks the secret");
    }
    // SAFETY: as above.
    unsafe { std::env::remove_var(&name) };
}

async fn workflows_are_listed_with_recent_run_counts(db: &TestDb) {
    let sink = Sink::start().await;
    let (app, _dir) =
        TestApp::with_workflows(db, &[("crm.yaml", &on_ended(&sink, "/ok/crm", ""))]).await;
    app.deliver(&ended_body("ev_w1", "conv_w", "completed"))
        .await;
    app.wait_runs_final(1, 10).await;
    let (status, list) = app.admin_get("/api/v1/workflows").await;
    assert_eq!(status, 200);
    assert_eq!(list[0]["name"], "crm");
    assert_eq!(list[0]["event"], "conversation.ended");
    assert_eq!(list[0]["runs_last_24h"]["succeeded"], 1);
    let (status, page) = app
        .admin_get("/api/v1/runs?workflow=crm&status=succeeded")
        .await;
    assert_eq!(status, 200);
    assert_eq!(page["data"].as_array().unwrap().len(), 1);
    let (status, page) = app.admin_get("/api/v1/runs?status=failed").await;
    assert_eq!((status, page["data"].as_array().unwrap().len()), (200, 0));
    let (status, _) = app.admin_get("/api/v1/runs?status=exploded").await;
    assert_eq!(status, 400);
    for path in ["/api/v1/runs", "/api/v1/workflows"] {
        let r = app.client.get(app.url(path)).send().await.unwrap();
        assert_eq!(r.status(), 401, "{path}");
    }
}

async fn an_if_that_is_false_skips_the_step_and_retry_after_is_honoured(db: &TestDb) {
    let sink = Sink::start().await;
    let wf = format!(
        "on: {{ event: conversation.ended }}\nsteps:\n  - id: only-failed\n    if: event.payload.status == \"failed\"\n    http: {{ url: \"{}\" }}\n  - id: always\n    http: {{ url: \"{}\" }}\n    retry: {{ max_attempts: 3, initial_delay: 10ms, max_delay: 5s }}\n",
        sink.url("/ok/failed-only"),
        sink.url("/retry-after/1/always")
    );
    let (app, _dir) = TestApp::with_workflows(db, &[("if.yaml", &wf)]).await;
    app.deliver(&ended_body("ev_if", "conv_if", "completed"))
        .await;
    let runs = app.wait_runs_final(1, 10).await;
    assert_eq!(runs[0].status(), Some(RunStatus::Succeeded));
    assert!(
        sink.received_on("/ok/failed-only").is_empty(),
        "the step whose `if` is false did not run"
    );
    let got = sink.received_on("/retry-after/1/always");
    assert_eq!(got.len(), 2);
    let gap = got[1].at - got[0].at;
    assert!(
        gap >= std::time::Duration::from_millis(950),
        "Retry-After: 1 was honoured: {gap:?}"
    );
    let d = run_detail(&app, &runs[0].run_id).await;
    assert_eq!(d["step_results"]["only-failed"]["skipped"], true);
    assert_eq!(d["attempts"][0]["response_status"], 429);
    assert_eq!(d["attempts"][0]["next_delay_ms"], 1000);
    // The event shows why the workflow matched and the run it started.
    let (_, ev) = app.admin_get("/api/v1/events/ev_if").await;
    assert_eq!(ev["match_decisions"][0]["workflow"], "if");
    assert_eq!(ev["match_decisions"][0]["matched"], true);
    assert_eq!(ev["runs"][0]["id"], runs[0].run_id.as_str());
}

async fn runs_are_paginated_newest_first(db: &TestDb) {
    let sink = Sink::start().await;
    let (app, _dir) =
        TestApp::with_workflows(db, &[("crm.yaml", &on_ended(&sink, "/ok/crm", ""))]).await;
    for i in 0..5 {
        app.deliver(&ended_body(
            &format!("ev_pg{i}"),
            &format!("conv_pg{i}"),
            "completed",
        ))
        .await;
    }
    app.wait_runs_final(5, 10).await;
    let mut seen = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        let path = match &cursor {
            Some(c) => format!("/api/v1/runs?limit=2&cursor={c}"),
            None => "/api/v1/runs?limit=2".to_owned(),
        };
        let (status, page) = app.admin_get(&path).await;
        assert_eq!(status, 200, "{page}");
        for r in page["data"].as_array().unwrap() {
            seen.push(r["event_id"].as_str().unwrap().to_owned());
        }
        match page["next_cursor"].as_str() {
            Some(c) => cursor = Some(c.to_owned()),
            None => break,
        }
    }
    assert_eq!(seen, vec!["ev_pg4", "ev_pg3", "ev_pg2", "ev_pg1", "ev_pg0"]);
    let (status, _) = app.admin_get("/api/v1/runs?cursor=garbage").await;
    assert_eq!(status, 400);
    let (_, page) = app.admin_get("/api/v1/runs?event_id=ev_pg2").await;
    assert_eq!(page["data"].as_array().unwrap().len(), 1);
    let (_, page) = app.admin_get("/api/v1/runs?conversation_id=conv_pg3").await;
    assert_eq!(page["data"][0]["event_id"], "ev_pg3");
}

on_both_backends!(
    an_if_that_is_false_skips_the_step_and_retry_after_is_honoured,
    runs_are_paginated_newest_first,
    a_status_filter_that_matches_and_one_that_does_not,
    transitions_with_and_without_previous_value,
    from_null_means_first_set,
    a_second_step_reads_the_first_steps_response,
    retries_after_500_and_503_then_success_with_one_key,
    a_400_fails_at_once_and_exhausted_runs_can_be_retried,
    a_timeout_is_retried,
    secrets_never_reach_the_admin_api,
    workflows_are_listed_with_recent_run_counts,
);
