//! The engine's hardening (issue 11), end to end on both backends: the real
//! server, real HTTP to a local sink on loopback, runs and attempts read
//! back. No request is sent forever, none twice by two claims, none
//! redirected or steered by payload data, and no secret leaks.

mod common;

use std::time::Duration;

use common::sink::Sink;
use common::{TestApp, TestDb, ended_body, on_ended};
use serde_json::Value;
use switchboard::store::runs::RunStatus;

async fn run_detail(app: &TestApp, run_id: &str) -> Value {
    let (status, run) = app.admin_get(&format!("/api/v1/runs/{run_id}")).await;
    assert_eq!(status, 200, "{run}");
    run
}

/// Defect 1: a 200 whose body holds NUL (PostgreSQL refuses it in TEXT and
/// JSONB) used to make every save fail, so the request went out again and
/// again. Now it is stored (NUL as U+FFFD) and sent once.
async fn a_nul_in_a_response_is_stored_and_the_request_sent_once(db: &TestDb) {
    let sink = Sink::start().await;
    let wf = on_ended(&format!(
        "  - id: text\n    http: {{ url: \"{}\" }}\n  - id: json\n    http: {{ url: \"{}\" }}\n",
        sink.url("/nul/a"),
        sink.url("/nul-json/b")
    ));
    let (app, _dir) = TestApp::with_workflows(db, &[("nul.yaml", &wf)]).await;
    app.deliver(&ended_body("ev_nul", "conv_nul", "completed"))
        .await;
    let runs = app.wait_runs_final(1, 15).await;
    assert_eq!(
        runs[0].status,
        RunStatus::Succeeded,
        "{:?}",
        runs[0].last_error
    );
    tokio::time::sleep(Duration::from_secs(6)).await; // past a lease: nothing is sent again
    assert_eq!(sink.received_on("/nul/").len(), 1);
    assert_eq!(sink.received_on("/nul-json/").len(), 1);
    let d = run_detail(&app, &runs[0].run_id).await;
    let attempts = d["attempts"].as_array().unwrap();
    assert_eq!(attempts.len(), 2);
    assert_eq!(attempts[0]["response_body"], "before\u{FFFD}after");
    assert_eq!(d["step_results"]["json"]["json"]["note"], "a\u{FFFD}b");
}

/// Defect 1: a save that keeps failing ends the attempt as a recorded failure
/// of class `store`; the request is not sent again. (A trigger in the test
/// database refuses the attempt's row while it holds the response.)
async fn an_outcome_that_cannot_be_stored_is_a_store_failure_not_a_resend(db: &TestDb) {
    let sink = Sink::start().await;
    let wf = on_ended(&format!(
        "  - id: post\n    http: {{ url: \"{}\" }}\n",
        sink.url("/status/201/poison")
    ));
    let (app, _dir) = TestApp::with_workflows(db, &[("store.yaml", &wf)]).await;
    match db {
        TestDb::Sqlite { .. } => {
            db.exec(&["CREATE TRIGGER refuse_poison BEFORE INSERT ON attempts \
                 WHEN NEW.response_body LIKE '%answered 201%' \
                 BEGIN SELECT RAISE(ABORT, 'refused by the test trigger'); END"])
            .await
        }
        TestDb::Postgres { .. } => {
            db.exec(&[
                    "CREATE FUNCTION refuse_poison() RETURNS trigger AS $$ BEGIN \
                     IF NEW.response_body LIKE '%answered 201%' THEN RAISE EXCEPTION 'refused by the test trigger'; END IF; \
                     RETURN NEW; END $$ LANGUAGE plpgsql",
                    "CREATE TRIGGER refuse_poison BEFORE INSERT ON attempts \
                     FOR EACH ROW EXECUTE FUNCTION refuse_poison()",
                ],
            )
            .await
        }
    }
    app.deliver(&ended_body("ev_store", "conv_store", "completed"))
        .await;
    let runs = app.wait_runs_final(1, 20).await;
    assert_eq!(runs[0].status, RunStatus::Failed);
    tokio::time::sleep(Duration::from_secs(6)).await; // past a lease
    assert_eq!(
        sink.received_on("/status/201/").len(),
        1,
        "sent once, never again"
    );
    let d = run_detail(&app, &runs[0].run_id).await;
    let attempts = d["attempts"].as_array().unwrap();
    assert_eq!(attempts.len(), 1);
    assert_eq!(attempts[0]["error_class"], "store");
    assert_eq!(attempts[0]["response_status"], 201);
    assert!(
        d["last_error"]
            .as_str()
            .unwrap()
            .contains("could not be stored"),
        "{}",
        d["last_error"]
    );
}

/// Defect 2: a run held by a live worker is not taken by an instance whose
/// clock is ahead (lease expiry is the database's clock on PostgreSQL).
/// The skewed instance is the store API called with its idea of "now".
async fn a_clock_ahead_does_not_steal_a_running_run(db: &TestDb) {
    let sink = Sink::start().await;
    let wf = on_ended(&format!(
        "  - id: slow\n    timeout: 10s\n    http: {{ url: \"{}\" }}\n",
        sink.url("/slow/3000/x")
    ));
    let (app, _dir) = TestApp::with_workflows(db, &[("slow.yaml", &wf)]).await;
    app.deliver(&ended_body("ev_skew", "conv_skew", "completed"))
        .await;
    sink.wait_for("/slow/", 1, 10).await;
    let ahead = chrono::Utc::now() + chrono::TimeDelta::seconds(30);
    let stolen = app
        .store
        .claim_due("skewed-instance", ahead, Duration::from_secs(5), 10)
        .await
        .unwrap();
    assert!(
        stolen.is_empty(),
        "an instance 30 s ahead took a running run"
    );
    let runs = app.wait_runs_final(1, 15).await;
    assert_eq!(runs[0].status, RunStatus::Succeeded);
    assert_eq!(sink.received_on("/slow/").len(), 1);
}

/// Defect 2: a claim is fenced by its own token, not by the process: after its
/// lease lapsed and the run was claimed again (here by the same owner name,
/// as after a database stall), the first claim's save writes nothing.
async fn a_superseded_claim_cannot_save(db: &TestDb) {
    let sink = Sink::start().await;
    let wf = on_ended(&format!(
        "  - id: slow\n    timeout: 10s\n    http: {{ url: \"{}\" }}\n",
        sink.url("/slow/2500/y")
    ));
    let (app, _dir) = TestApp::with_workflows(db, &[("fence.yaml", &wf)]).await;
    app.deliver(&ended_body("ev_fence", "conv_fence", "completed"))
        .await;
    sink.wait_for("/slow/", 1, 10).await;
    let runs = app
        .store
        .list_runs(&switchboard::store::runs::RunQuery {
            limit: 10,
            ..Default::default()
        })
        .await
        .unwrap();
    let owner = runs[0].lease_owner.clone().expect("held");
    // The lease lapses (a stall) and the same owner claims the run again.
    db.exec(&[
        "UPDATE runs SET lease_until = '2000-01-01T00:00:00+00:00' WHERE status = 'running'",
    ])
    .await;
    let again = app
        .store
        .claim_due(&owner, chrono::Utc::now(), Duration::from_secs(60), 10)
        .await
        .unwrap();
    assert_eq!(again.len(), 1);
    assert_eq!(again[0].lease_token, runs[0].lease_token + 1);
    tokio::time::sleep(Duration::from_secs(4)).await; // the first claim's request ends and it tries to save
    let attempts = app.store.attempts(&runs[0].run_id).await.unwrap();
    assert!(
        attempts.is_empty(),
        "the superseded claim saved {attempts:?}"
    );
    let run = app.store.get_run(&runs[0].run_id).await.unwrap().unwrap();
    assert_eq!(run.status, RunStatus::Running);
    assert_eq!(run.lease_token, again[0].lease_token);
}

/// Defect 2: `max_delay: 300000y` overflowed the clock in the backoff and the
/// run's renewal outlived the panic, holding the run forever. Now the delay
/// is capped and the run waits, released.
async fn a_huge_retry_delay_does_not_wedge_the_run(db: &TestDb) {
    let sink = Sink::start().await;
    let wf = on_ended(&format!(
        "  - id: post\n    http: {{ url: \"{}\" }}\n    retry: {{ max_attempts: 3, backoff: fixed, initial_delay: 300000y, max_delay: 300000y }}\n",
        sink.url("/status/503/huge")
    ));
    let (app, _dir) = TestApp::with_workflows(db, &[("huge.yaml", &wf)]).await;
    app.deliver(&ended_body("ev_huge", "conv_huge", "completed"))
        .await;
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let runs = app
            .store
            .list_runs(&switchboard::store::runs::RunQuery {
                limit: 10,
                ..Default::default()
            })
            .await
            .unwrap();
        if let Some(r) = runs.first()
            && r.status == RunStatus::Retrying
        {
            assert!(r.lease_owner.is_none());
            assert!(r.next_attempt_at > chrono::Utc::now() + chrono::TimeDelta::days(365 * 1000));
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the run never got to wait: {:?}",
            runs.iter()
                .map(|r| (r.status, &r.lease_owner))
                .collect::<Vec<_>>()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(sink.received_on("/status/503/").len(), 1);
}

/// Defect 3: a redirect is not followed: a failure of class `http_3xx` with
/// its Location recorded, not retried.
async fn a_redirect_is_a_failure_and_not_followed(db: &TestDb) {
    let sink = Sink::start().await;
    let wf = on_ended(&format!(
        "  - id: post\n    http:\n      url: \"{}\"\n      headers: {{ X-Custom: kept-here }}\n      json: {{ a: 1 }}\n",
        sink.url("/redirect/here")
    ));
    let (app, _dir) = TestApp::with_workflows(db, &[("redirect.yaml", &wf)]).await;
    app.deliver(&ended_body("ev_redir", "conv_redir", "completed"))
        .await;
    let runs = app.wait_runs_final(1, 10).await;
    assert_eq!(runs[0].status, RunStatus::Failed);
    let d = run_detail(&app, &runs[0].run_id).await;
    let attempts = d["attempts"].as_array().unwrap();
    assert_eq!(attempts.len(), 1, "not retried");
    assert_eq!(
        d["step"], "post",
        "a failed run shows the step it failed at"
    );
    assert_eq!(d["attempt"], 1);
    assert_eq!(d["attempts_total"], 1);
    assert_eq!(attempts[0]["error_class"], "http_3xx");
    assert_eq!(attempts[0]["response_status"], 301);
    assert!(
        attempts[0]["error_message"]
            .as_str()
            .unwrap()
            .contains("/ok/redirected")
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        sink.received_on("/ok/").is_empty(),
        "the redirect was followed"
    );
    assert_eq!(sink.received().len(), 1);
}

fn field_update(id: &str, value: &str) -> Vec<u8> {
    common::field_body(id, "conv_f", "2025-07-14T15:00:00Z", "ref", value.into())
}

/// Defect 4: a value templated into the URL's path or query is encoded as a
/// path segment or a query value: payload data cannot steer the request.
async fn a_templated_value_cannot_steer_the_url(db: &TestDb) {
    let sink = Sink::start().await;
    let wf = format!(
        "on: {{ event: conversation.custom_fields.updated, field: ref }}\nsteps:\n  - id: put\n    http:\n      url: \"{}/records/{{{{ event.payload.value }}}}?ref={{{{ event.payload.value }}}}\"\n",
        sink.url("/ok")
    );
    let (app, _dir) = TestApp::with_workflows(db, &[("steer.yaml", &wf)]).await;
    assert_eq!(
        app.deliver(&field_update("ev_steer", "../admin?drop=1&x=#frag"))
            .await
            .status(),
        200
    );
    let runs = app.wait_runs_final(1, 10).await;
    assert_eq!(
        runs[0].status,
        RunStatus::Succeeded,
        "{:?}",
        runs[0].last_error
    );
    let got = sink.received();
    assert_eq!(got.len(), 1);
    assert_eq!(
        got[0].path,
        "/ok/records/..%2Fadmin%3Fdrop%3D1%26x%3D%23frag"
    );
    assert_eq!(
        got[0].query.as_deref(),
        Some("ref=..%2Fadmin%3Fdrop%3D1%26x%3D%23frag")
    );
}

/// Defects 5 and 6: a secret may be a whole URL (rendered once, with the real
/// values); `if:` sees real values; a secret is masked in every form it
/// takes (plain, percent-encoded, JSON-escaped) in errors, the recorded
/// request, stored response headers and the API.
async fn secrets_are_used_once_and_masked_everywhere(db: &TestDb) {
    let sink = Sink::start().await;
    let suffix = uuid::Uuid::new_v4().simple().to_string();
    let url_name = format!("SB_HOOK_URL_{suffix}");
    let token_name = format!("SB_TOKEN_{suffix}");
    let token = format!("a+b/c= \"{}\"", &suffix[..8]);
    let hook = sink.url(&format!("/echo/hook-{}", &suffix[..8]));
    // SAFETY: unique variable names; nothing else reads them concurrently.
    unsafe {
        std::env::set_var(&url_name, &hook);
        std::env::set_var(&token_name, &token);
    }
    let wf = format!(
        "on: {{ event: conversation.ended }}\nsecrets: [{url_name}, {token_name}]\nsteps:\n  \
         - id: hook\n    if: \"secrets.{token_name}[:3] == 'a+b'\"\n    http:\n      url: \"{{{{ secrets.{url_name} }}}}\"\n      \
         headers: {{ X-Echo: \"{{{{ secrets.{token_name} }}}}\" }}\n      query: {{ token: \"{{{{ secrets.{token_name} }}}}\" }}\n      \
         json: {{ token: \"{{{{ secrets.{token_name} }}}}\" }}\n  \
         - id: closed\n    retry: {{ max_attempts: 1 }}\n    http:\n      url: \"http://127.0.0.1:1/x\"\n      query: {{ token: \"{{{{ secrets.{token_name} }}}}\" }}\n",
    );
    let (app, _dir) = TestApp::with_workflows(db, &[("secret.yaml", &wf)]).await;
    app.deliver(&ended_body("ev_sec", "conv_sec", "completed"))
        .await;
    let runs = app.wait_runs_final(1, 15).await;
    let got = sink.received_on("/echo/");
    assert_eq!(
        got.len(),
        1,
        "the secret URL was called: {:?}",
        runs[0].last_error
    );
    assert_eq!(got[0].headers["x-echo"], token, "the real value is sent");
    assert_eq!(got[0].json()["token"], token.as_str());
    assert_eq!(
        runs[0].status,
        RunStatus::Failed,
        "the second step cannot connect"
    );
    let d = run_detail(&app, &runs[0].run_id).await;
    let attempts = d["attempts"].as_array().unwrap();
    assert_eq!(
        attempts[0]["step_id"], "hook",
        "the `if` saw the real value"
    );
    assert_eq!(attempts[0]["request"]["url"], "***?token=***");
    assert_eq!(attempts[0]["request"]["headers"]["X-Echo"], "***");
    assert_eq!(attempts[0]["request"]["body"]["token"], "***");
    assert_eq!(attempts[0]["response_headers"]["x-echo"], "***");
    assert_eq!(attempts[0]["response_body"], "token=***");
    assert!(
        attempts[1]["error_message"]
            .as_str()
            .unwrap()
            .contains("token=***"),
        "{}",
        attempts[1]["error_message"]
    );
    let mut form = reqwest::Url::parse("http://x/").unwrap();
    form.query_pairs_mut().append_pair("k", &token);
    let encoded = form.query().unwrap()[2..].to_owned();
    let forms = [
        token.clone(),
        encoded,
        token.replace('"', "\\\""),
        "a%2Bb%2Fc%3D".to_owned(),
        "a+b/c=".to_owned(),
        hook.clone(),
    ];
    for path in [
        format!("/api/v1/runs/{}", runs[0].run_id),
        "/api/v1/runs".to_owned(),
    ] {
        let text = app
            .client
            .get(app.url(&path))
            .bearer_auth(common::TOKEN)
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        for form in &forms {
            assert!(
                !text.contains(form.as_str()),
                "{path} shows `{form}`: {text}"
            );
        }
    }
    // SAFETY: as above.
    unsafe {
        std::env::remove_var(&url_name);
        std::env::remove_var(&token_name);
    }
}

/// Defect 7: a run resumes at its step by id: removing an earlier step while
/// it retries a later one does not skip the later one; removing the step
/// itself fails a run without a recorded version (created before versions)
/// with a clear message (versioned runs keep their own version: tests/workflow_versions.rs).
async fn a_run_resumes_at_its_step_by_id(db: &TestDb) {
    let sink = Sink::start().await;
    let steps = |ids: &[&str]| {
        let mut s = String::new();
        for id in ids {
            let path = match *id {
                "c" => "/flaky/2/c".to_owned(),
                other => format!("/ok/{other}"),
            };
            s.push_str(&format!(
                "  - id: {id}\n    retry: {{ max_attempts: 5, backoff: fixed, initial_delay: 1500ms }}\n    http: {{ url: \"{}\" }}\n",
                sink.url(&path)
            ));
        }
        on_ended(&s)
    };
    let (app, dir) = TestApp::with_workflows(db, &[("steps.yaml", &steps(&["a", "b", "c"]))]).await;
    app.deliver(&ended_body("ev_steps", "conv_steps", "completed"))
        .await;
    sink.wait_for("/flaky/2/c", 1, 10).await;
    std::fs::write(dir.path().join("steps.yaml"), steps(&["b", "c"])).unwrap();
    let (status, body) = app.admin_post("/api/v1/workflows/reload").await;
    assert_eq!(status, 200, "{body}");
    let runs = app.wait_runs_final(1, 15).await;
    assert_eq!(
        runs[0].status,
        RunStatus::Succeeded,
        "{:?}",
        runs[0].last_error
    );
    assert_eq!(
        sink.received_on("/flaky/2/c").len(),
        3,
        "c was tried until it succeeded"
    );
    let d = run_detail(&app, &runs[0].run_id).await;
    let last = d["attempts"].as_array().unwrap().last().unwrap().clone();
    assert_eq!(last["step_id"], "c");
    assert_eq!(last["outcome"], "succeeded");
    assert!(
        d.get("attempt").is_none(),
        "no `attempt` on a succeeded run: {d}"
    );
    assert_eq!(d["attempts_total"], 5);

    // The step itself removed while the run waits to retry it.
    std::fs::write(
        dir.path().join("steps.yaml"),
        on_ended(&format!(
            "  - id: a\n    http: {{ url: \"{}\" }}\n  - id: d\n    retry: {{ max_attempts: 5, backoff: fixed, initial_delay: 1500ms }}\n    http: {{ url: \"{}\" }}\n",
            sink.url("/ok/a"),
            sink.url("/status/503/d")
        )),
    )
    .unwrap();
    app.admin_post("/api/v1/workflows/reload").await;
    app.deliver(&ended_body("ev_steps2", "conv_steps2", "completed"))
        .await;
    sink.wait_for("/status/503/d", 1, 10).await;
    // A run recorded before versions (no version) resumes on the workflow loaded under its name.
    db.exec(&["UPDATE runs SET version = NULL WHERE event_id = 'ev_steps2'"])
        .await;
    std::fs::write(
        dir.path().join("steps.yaml"),
        on_ended(&format!(
            "  - id: a\n    http: {{ url: \"{}\" }}\n",
            sink.url("/ok/a")
        )),
    )
    .unwrap();
    app.admin_post("/api/v1/workflows/reload").await;
    let runs = app.wait_runs_final(2, 15).await;
    let second = runs
        .iter()
        .find(|r| r.event_id == "ev_steps2")
        .expect("the second run");
    assert_eq!(second.status, RunStatus::Failed);
    assert!(
        second
            .last_error
            .as_deref()
            .unwrap_or_default()
            .contains("step `d` is no longer in workflow"),
        "{:?}",
        second.last_error
    );
    assert_eq!(sink.received_on("/status/503/d").len(), 1);
}

/// Issue 18: the recorded request is what was sent, every header included.
async fn the_recorded_request_is_what_was_sent(db: &TestDb) {
    let sink = Sink::start().await;
    let wf = on_ended(&format!(
        "  - id: post\n    http:\n      url: \"{}\"\n      headers: {{ X-One: \"1\" }}\n      json: {{ a: 1 }}\n",
        sink.url("/ok/rec")
    ));
    let (app, _dir) = TestApp::with_workflows(db, &[("rec.yaml", &wf)]).await;
    app.deliver(&ended_body("ev_rec", "conv_rec", "completed"))
        .await;
    let runs = app.wait_runs_final(1, 10).await;
    let got = sink.wait_for("/ok/rec", 1, 5).await;
    let d = run_detail(&app, &runs[0].run_id).await;
    let recorded = d["attempts"][0]["request"]["headers"]
        .as_object()
        .unwrap()
        .clone();
    for name in [
        "user-agent",
        "idempotency-key",
        "traceparent",
        "content-type",
        "x-one",
    ] {
        let (_, value) = recorded
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .unwrap_or_else(|| panic!("`{name}` not recorded: {recorded:?}"));
        assert_eq!(value.as_str().unwrap(), got[0].headers[name], "{name}");
    }
    assert_eq!(d["step"], Value::Null, "no current step once done");
    assert_eq!(d["attempts_total"], 1);
}

on_both_backends!(
    a_nul_in_a_response_is_stored_and_the_request_sent_once,
    an_outcome_that_cannot_be_stored_is_a_store_failure_not_a_resend,
    a_superseded_claim_cannot_save,
    a_huge_retry_delay_does_not_wedge_the_run,
    a_redirect_is_a_failure_and_not_followed,
    a_templated_value_cannot_steer_the_url,
    secrets_are_used_once_and_masked_everywhere,
    a_run_resumes_at_its_step_by_id,
    the_recorded_request_is_what_was_sent,
);

/// PostgreSQL only: SQLite is shared only by processes on one host, which share one clock.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_a_clock_ahead_does_not_steal_a_running_run() {
    let Some(db) = TestDb::postgres().await else {
        return;
    };
    a_clock_ahead_does_not_steal_a_running_run(&db).await;
}
