//! The egress policy end to end (issue 11, defect 4): denied addresses are
//! refused on the address actually connected to, IP literals and names
//! alike, with error class `egress` and no retry. Loopback only: a 127.x
//! address stands in for a denied range.
//!
//! The policy is read from the environment when a server starts, so this
//! binary holds one test that changes it between servers.

mod common;

use common::sink::Sink;
use common::{TestApp, TestDb, ended_body};
use switchboard::store::runs::RunStatus;

fn set_policy(deny: &str, allow: Option<&str>) {
    // SAFETY: the only test in this binary; servers read the policy when they start.
    unsafe {
        std::env::set_var("SWITCHBOARD_EGRESS_DENY", deny);
        match allow {
            Some(a) => std::env::set_var("SWITCHBOARD_EGRESS_ALLOW", a),
            None => std::env::remove_var("SWITCHBOARD_EGRESS_ALLOW"),
        }
    }
}

fn workflow(steps: &[(&str, String)]) -> String {
    let mut s = "on: { event: conversation.ended }\nsteps:\n".to_owned();
    for (id, url) in steps {
        s.push_str(&format!(
            "  - id: {id}\n    retry: {{ max_attempts: 3, initial_delay: 10ms }}\n    http: {{ url: \"{url}\" }}\n"
        ));
    }
    s
}

async fn attempts(app: &TestApp, run_id: &str) -> Vec<serde_json::Value> {
    let (_, d) = app.admin_get(&format!("/api/v1/runs/{run_id}")).await;
    d["attempts"].as_array().cloned().unwrap_or_default()
}

async fn denied_addresses_are_refused(db: &TestDb) {
    let sink = Sink::start().await;
    let port = sink.addr.port();

    // An IP literal on the deny list; 127.0.0.1 still works.
    set_policy("127.0.0.2/32", None);
    let setup = format!(
        "name: lookup\non: {{ event: conversation.setup }}\nsteps:\n  - id: lookup\n    http: {{ method: GET, url: \"http://127.0.0.2:{port}/ok/contacts\" }}\n\
         deadline: 2s\nrespond: {{ context: {{ $variables: {{ found: \"{{{{ steps.lookup.json.ok }}}}\" }} }} }}\n\
         fallback: {{ context: {{ $variables: {{ plan: unknown }} }} }}\n"
    );
    let (app, _dir) = TestApp::with_workflows(
        db,
        &[
            (
                "literal.yaml",
                &workflow(&[
                    ("fine", format!("http://127.0.0.1:{port}/ok/fine")),
                    ("denied", format!("http://127.0.0.2:{port}/ok/denied")),
                ]),
            ),
            ("setup.yaml", &setup),
        ],
    )
    .await;
    app.deliver(&ended_body("ev_eg1", "conv_eg1", "completed"))
        .await;
    let runs = app.wait_runs_final(1, 10).await;
    assert_eq!(runs[0].status, RunStatus::Failed);
    let a = attempts(&app, &runs[0].run_id).await;
    assert_eq!(a.len(), 2, "refused once, not retried: {a:?}");
    assert_eq!(a[0]["outcome"], "succeeded");
    assert_eq!(a[1]["error_class"], "egress");
    assert!(
        a[1]["error_message"]
            .as_str()
            .unwrap()
            .contains("127.0.0.2"),
        "{}",
        a[1]["error_message"]
    );
    assert_eq!(sink.received().len(), 1);
    assert_eq!(sink.received()[0].path, "/ok/fine");
    // Setup lookups obey the same policy: the fallback answers.
    let resp = app
        .deliver(&common::fixture("conversation_setup_inbound_phone.json"))
        .await;
    assert_eq!(resp.status(), 200);
    let answer: serde_json::Value = resp.json().await.unwrap();
    assert_eq!(
        answer,
        serde_json::json!({"context": {"$variables": {"plan": "unknown"}}})
    );
    let (_, ev) = app.admin_get("/api/v1/events/ev_fDsVNA3cQ5X").await;
    assert_eq!(ev["setup_answer"]["used_fallback"], true, "{ev}");
    assert_eq!(
        ev["setup_answer"]["lookups"][0]["error_class"], "egress",
        "{ev}"
    );
    assert_eq!(sink.received().len(), 1, "nothing reached the sink");
    drop(app);

    // A name that resolves into a denied range is refused too.
    set_policy("127.0.0.0/8, ::1/128", None);
    let (app, _dir) = TestApp::with_workflows(
        db,
        &[(
            "name.yaml",
            &workflow(&[("by-name", format!("http://localhost:{port}/ok/by-name"))]),
        )],
    )
    .await;
    app.deliver(&ended_body("ev_eg2", "conv_eg2", "completed"))
        .await;
    let runs = app.wait_runs_final(1, 10).await;
    let run = runs.iter().find(|r| r.event_id == "ev_eg2").unwrap();
    assert_eq!(run.status, RunStatus::Failed);
    let a = attempts(&app, &run.run_id).await;
    assert_eq!(a.len(), 1, "not retried: {a:?}");
    assert_eq!(a[0]["error_class"], "egress");
    assert!(
        a[0]["error_message"]
            .as_str()
            .unwrap()
            .contains("localhost"),
        "{}",
        a[0]["error_message"]
    );
    drop(app);

    // With an allow list, only those addresses.
    set_policy("", Some("127.0.0.1/32"));
    let (app, _dir) = TestApp::with_workflows(
        db,
        &[(
            "allow.yaml",
            &workflow(&[
                ("fine", format!("http://127.0.0.1:{port}/ok/allowed")),
                ("other", format!("http://127.0.0.3:{port}/ok/not-allowed")),
            ]),
        )],
    )
    .await;
    app.deliver(&ended_body("ev_eg3", "conv_eg3", "completed"))
        .await;
    let runs = app.wait_runs_final(1, 10).await;
    let run = runs.iter().find(|r| r.event_id == "ev_eg3").unwrap();
    let a = attempts(&app, &run.run_id).await;
    assert_eq!(a.len(), 2, "{a:?}");
    assert_eq!(a[1]["error_class"], "egress");
    let paths: Vec<String> = sink.received().iter().map(|r| r.path.clone()).collect();
    assert_eq!(paths, ["/ok/fine", "/ok/allowed"]);
    drop(app);

    // A policy that does not parse stops the server at startup.
    set_policy("10.0.0.0/33", None);
    let err = switchboard::startup::Application::build(common::settings(db))
        .await
        .err()
        .expect("refused");
    assert!(err.to_string().contains("SWITCHBOARD_EGRESS_DENY"), "{err}");
    set_policy(switchboard::engine::http::DEFAULT_EGRESS_DENY, None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_egress_policy_refuses_denied_addresses_on_both_backends() {
    let db = TestDb::sqlite().await;
    denied_addresses_are_refused(&db).await;
    if let Some(db) = TestDb::postgres().await {
        denied_addresses_are_refused(&db).await;
    }
}
