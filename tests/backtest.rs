//! Backtests on SQLite and PostgreSQL: matches, non-matches with reasons,
//! rendered requests with secrets masked, history as of each event; the
//! sink receives nothing. Also the `switchboard backtest` command, which
//! never migrates or writes the database it reads, and `change` (the
//! transition a custom field update made) in runs and backtests alike.

mod common;

use common::sink::Sink;
use common::{TestApp, TestDb, ended_body};
use serde_json::{Value, json};

fn field(id: &str, conv: &str, value: &str) -> Vec<u8> {
    json!({"id": id, "conversation_id": conv, "livemode": true, "created_at": "2025-07-14T15:00:00Z",
        "payload": {"type": "conversation.custom_fields.updated", "key": "lead_status", "value": value}})
    .to_string()
    .into_bytes()
}

async fn backtest(app: &TestApp, body: Value) -> (u16, Value) {
    let resp = app
        .client
        .post(app.url("/api/v1/workflows/backtest"))
        .bearer_auth(common::TOKEN)
        .json(&body)
        .send()
        .await
        .unwrap();
    let status = resp.status().as_u16();
    (status, resp.json().await.unwrap())
}

async fn a_backtest_reports_matches_reasons_and_requests_and_sends_nothing(db: &TestDb) {
    let sink = Sink::start().await;
    let app = TestApp::spawn(db).await;
    app.deliver(&ended_body("ev_b1", "conv_b1", "completed"))
        .await;
    app.deliver(&ended_body("ev_b2", "conv_b2", "busy")).await;
    app.deliver(&field("ev_l1", "conv_l", "new")).await;
    app.deliver(&field("ev_l2", "conv_l", "qualified")).await;
    app.deliver(&field("ev_l3", "conv_l", "lost")).await;

    let wf = format!(
        "name: crm-draft\non: {{ event: conversation.ended, status: completed }}\nsecrets: [CRM_TOKEN_BT]\nsteps:\n  - id: first\n    http:\n      url: \"{}\"\n      headers: {{ Authorization: \"Bearer {{{{ secrets.CRM_TOKEN_BT }}}}\" }}\n      json: {{ conv: \"{{{{ event.conversation_id }}}}\" }}\n  - id: second\n    http: {{ url: \"{}/{{{{ steps.first.json.id }}}}\" }}\n",
        sink.url("/ok/crm"),
        sink.url("/ok/next")
    );
    let (status, report) = backtest(&app, json!({"workflow": wf})).await;
    assert_eq!(status, 200, "{report}");
    assert_eq!(report["workflow"], "crm-draft");
    assert_eq!(
        (report["evaluated"].as_u64(), report["matched"].as_u64()),
        (Some(2), Some(1))
    );
    let events = report["events"].as_array().unwrap();
    assert_eq!(events[0]["event_id"], "ev_b1");
    assert_eq!(events[0]["matched"], true);
    let first = &events[0]["requests"][0]["request"];
    assert_eq!(first["method"], "POST");
    assert_eq!(first["url"], sink.url("/ok/crm"));
    assert_eq!(first["headers"]["Authorization"], "Bearer ***");
    assert_eq!(first["body"], json!({"conv": "conv_b1"}));
    assert!(
        events[0]["requests"][1]["note"]
            .as_str()
            .unwrap()
            .contains("earlier step")
    );
    assert_eq!(
        events[1]["reason"],
        "status is `busy`, not one of [completed]"
    );

    // A transition judged with the conversation as it was at each event.
    let transition = "on: { event: conversation.custom_fields.updated, field: lead_status, from: new, to: qualified }\nsteps: []\n";
    let (_, report) = backtest(
        &app,
        json!({"workflow": transition, "conversation_id": "conv_l"}),
    )
    .await;
    let verdicts: Vec<(bool, String)> = report["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["matched"].as_bool().unwrap(),
                e["reason"].as_str().unwrap_or("").to_owned(),
            )
        })
        .collect();
    assert_eq!(
        verdicts,
        vec![
            (
                false,
                "`lead_status` was null (not set), not one of [\"new\"]".to_owned()
            ),
            (true, String::new()),
            (
                false,
                "`lead_status` was \"qualified\", not one of [\"new\"]".to_owned()
            ),
        ]
    );

    let (status, err) = backtest(
        &app,
        json!({"workflow": "on: { event: conversation.ended }\nstepz: []\n"}),
    )
    .await;
    assert_eq!(status, 422);
    assert!(
        err["error"]["message"]
            .as_str()
            .unwrap()
            .contains("backtest.yaml:2:1"),
        "{err}"
    );
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    assert!(sink.received().is_empty(), "a backtest sends nothing");

    // The same from the command line, against the same database.
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("draft.yaml");
    std::fs::write(&file, &wf).unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_switchboard"))
        .args(["backtest", "--since", "1h", "--limit", "10"])
        .arg(&file)
        .env("SWITCHBOARD_DATABASE_URL", db.url())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("on 2 stored conversation.ended event(s): 1 would have run"),
        "{stdout}"
    );
    assert!(stdout.contains("✓ #1 ev_b1 (conv_b1)"), "{stdout}");
    assert!(
        stdout.contains("✗ #2 ev_b2 (conv_b2): status is `busy`"),
        "{stdout}"
    );
    assert!(sink.received().is_empty());
}

fn backtest_cli(db_url: &str, file: &std::path::Path) -> (i32, String, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_switchboard"))
        .arg("backtest")
        .arg(file)
        .env("SWITCHBOARD_DATABASE_URL", db_url)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Tables and functions a database holds outside the system catalogs.
async fn objects(db: &TestDb) -> Vec<String> {
    match db {
        TestDb::Sqlite { .. } => {
            let url = db.url();
            let file = url.trim_start_matches("sqlite://");
            if !std::path::Path::new(file).exists() {
                return vec![];
            }
            let options = sqlx::sqlite::SqliteConnectOptions::new()
                .filename(file)
                .read_only(true);
            let pool = sqlx::SqlitePool::connect_with(options).await.unwrap();
            let names = sqlx::query_scalar("SELECT name FROM sqlite_master")
                .fetch_all(&pool)
                .await
                .unwrap();
            pool.close().await;
            names
        }
        TestDb::Postgres { .. } => {
            let pool = sqlx::PgPool::connect(db.url()).await.unwrap();
            let names = sqlx::query_scalar(
                "SELECT table_schema || '.' || table_name FROM information_schema.tables \
                 WHERE table_schema NOT IN ('pg_catalog', 'information_schema') \
                 UNION ALL SELECT n.nspname || '.' || p.proname FROM pg_proc p \
                 JOIN pg_namespace n ON n.oid = p.pronamespace \
                 WHERE n.nspname NOT IN ('pg_catalog', 'information_schema')",
            )
            .fetch_all(&pool)
            .await
            .unwrap();
            pool.close().await;
            names
        }
    }
}

async fn a_backtest_never_migrates_the_database_it_reads(db: &TestDb) {
    if let Some(dir) = db.dir() {
        // A fresh, empty SQLite file.
        std::fs::write(dir.join("switchboard.db"), b"").unwrap();
    }
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("draft.yaml");
    std::fs::write(
        &file,
        "on: { event: conversation.ended }\nsteps:\n  - id: a\n    http: { url: \"http://127.0.0.1:9/\" }\n",
    )
    .unwrap();
    let (code, stdout, stderr) = backtest_cli(db.url(), &file);
    assert_eq!(code, 1, "{stdout}{stderr}");
    assert!(
        stderr.contains(&format!(
            "error: database {} has no Switchboard tables; run `switchboard migrate",
            db.url()
        )),
        "{stderr}"
    );
    assert!(stderr.contains("--database-url"), "{stderr}");
    assert_eq!(objects(db).await, Vec::<String>::new(), "nothing created");
    if let Some(dir) = db.dir() {
        assert_eq!(
            std::fs::metadata(dir.join("switchboard.db")).unwrap().len(),
            0,
            "the SQLite file is untouched"
        );
        // A file that does not exist is not created.
        let absent = format!("sqlite://{}", dir.join("absent.db").display());
        let (code, _, stderr) = backtest_cli(&absent, &file);
        assert_eq!(code, 1);
        assert!(stderr.contains("no such file"), "{stderr}");
        assert!(!dir.join("absent.db").exists());
    }
}

async fn a_step_that_cannot_render_is_a_failure_with_its_reason(db: &TestDb) {
    let app = TestApp::spawn(db).await;
    app.deliver(&ended_body("ev_f1", "conv_f1", "completed"))
        .await;
    let wf = "name: typo\non: { event: conversation.ended }\nsteps:\n  - id: post\n    http:\n      url: \"http://127.0.0.1:9/\"\n      json: { n: \"{{ event.payload.no_such_key }}\" }\n  - id: later\n    http: { url: \"http://127.0.0.1:9/\" }\n";
    let (status, report) = backtest(&app, json!({"workflow": wf})).await;
    assert_eq!(status, 200, "{report}");
    let event = &report["events"][0];
    assert_eq!(event["matched"], true);
    let note = event["requests"][0]["note"].as_str().unwrap();
    assert!(
        note.starts_with(
            "would fail: the request cannot be rendered: expression `event.payload.no_such_key`"
        ),
        "{note}"
    );
    assert!(note.contains("undefined"), "{note}");
    assert!(!note.contains("earlier step"), "{note}");
    assert_eq!(
        event["requests"].as_array().unwrap().len(),
        1,
        "a run stops at the failing step: {report}"
    );

    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("typo.yaml");
    std::fs::write(&file, wf).unwrap();
    let (code, stdout, stderr) = backtest_cli(db.url(), &file);
    assert_eq!(code, 0, "{stdout}{stderr}");
    assert!(
        stdout.contains("1 would have run, 1 of them would fail"),
        "{stdout}"
    );
    assert!(
        stdout.contains("! #1 ev_f1 (conv_f1): would run, then fail at step `post`: would fail"),
        "{stdout}"
    );
    assert!(!stdout.contains('✓'), "{stdout}");
}

fn field_update(id: &str, conv: &str, value: &str, previous: Option<&str>) -> Vec<u8> {
    let mut payload =
        json!({"type": "conversation.custom_fields.updated", "key": "lead_status", "value": value});
    if let Some(p) = previous {
        payload["previous_value"] = json!(p);
    }
    json!({"id": id, "conversation_id": conv, "livemode": true, "created_at": "2025-07-14T15:00:00Z",
        "payload": payload})
    .to_string()
    .into_bytes()
}

async fn the_change_reaches_runs_and_backtests(db: &TestDb) {
    let sink = Sink::start().await;
    let wf = format!(
        "name: moved\non: {{ event: conversation.custom_fields.updated, field: lead_status, to: qualified }}\nwhen: change.from != none\nsteps:\n  - id: tell\n    if: change.to == \"qualified\"\n    http:\n      url: \"{}\"\n      json: {{ field: \"{{{{ change.field }}}}\", from: \"{{{{ change.from }}}}\", to: \"{{{{ change.to }}}}\", source: \"{{{{ change.from_source }}}}\", text: \"moved from {{{{ change.from }}}} to {{{{ change.to }}}}\" }}\n",
        sink.url("/ok/moved")
    );
    let (app, _dir) = TestApp::with_workflows(db, &[("moved.yaml", &wf)]).await;
    // A: Operator sends previous_value. B: it does not; history knows `contacted`.
    // C: first set (from null): `when` is false.
    app.deliver(&field_update("ev_a1", "conv_a", "new", None))
        .await;
    app.deliver(&field_update("ev_a2", "conv_a", "qualified", Some("new")))
        .await;
    app.deliver(&field_update("ev_b1", "conv_b", "contacted", None))
        .await;
    app.deliver(&field_update("ev_b2", "conv_b", "qualified", None))
        .await;
    app.deliver(&field_update("ev_c1", "conv_c", "qualified", None))
        .await;
    let runs = app.wait_runs_final(2, 10).await;
    assert_eq!(runs.len(), 2);
    let mut got: Vec<Value> = sink
        .wait_for("/ok/moved", 2, 10)
        .await
        .iter()
        .map(|r| r.json())
        .collect();
    got.sort_by_key(|v| v["from"].as_str().unwrap_or_default().to_owned());
    assert_eq!(
        got,
        vec![
            json!({"field": "lead_status", "from": "contacted", "to": "qualified", "source": "history", "text": "moved from contacted to qualified"}),
            json!({"field": "lead_status", "from": "new", "to": "qualified", "source": "payload", "text": "moved from new to qualified"}),
        ]
    );
    // Stored with the run's context at dispatch.
    let b2 = runs.iter().find(|r| r.event_id == "ev_b2").unwrap();
    assert_eq!(
        b2.context.0["change"],
        json!({"field": "lead_status", "from": "contacted", "to": "qualified", "from_source": "history"})
    );

    // The backtest sees the same transitions.
    let (status, report) = backtest(&app, json!({"workflow": wf})).await;
    assert_eq!(status, 200, "{report}");
    let bodies: Vec<(String, Value)> = report["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["event_id"].as_str().unwrap().to_owned(),
                e["requests"][0]["request"]["body"].clone(),
            )
        })
        .collect();
    assert_eq!(bodies[3].0, "ev_b2");
    assert_eq!(bodies[3].1["source"], "history");
    assert_eq!(bodies[3].1["from"], "contacted");
    assert_eq!(bodies[1].1["source"], "payload");
    assert_eq!(
        report["events"][4]["reason"],
        "`when: change.from != none` is false"
    );
}

/// A secret may be a whole URL: the backtest renders it (as a placeholder that
/// parses as a URL), shows `***`, and does not call the run a failure.
async fn a_secret_url_is_rendered_masked_not_a_failure(db: &TestDb) {
    let app = TestApp::spawn(db).await;
    app.deliver(&ended_body("ev_su1", "conv_su1", "completed"))
        .await;
    let wf = "name: slack-draft\non: { event: conversation.ended }\nsecrets: [SLACK_URL_BT]\nsteps:\n  - id: post\n    http:\n      url: \"{{ secrets.SLACK_URL_BT }}\"\n      json: { text: \"{{ event.conversation_id }}\" }\n";
    let (status, report) = backtest(&app, json!({"workflow": wf})).await;
    assert_eq!(status, 200, "{report}");
    let event = &report["events"][0];
    assert_eq!(event["matched"], true, "{report}");
    assert!(event["would_fail"].is_null(), "{report}");
    let request = &event["requests"][0]["request"];
    assert_eq!(request["url"], "***", "{report}");
    assert!(!report.to_string().contains("secret.invalid"), "{report}");
}

on_both_backends!(
    a_backtest_reports_matches_reasons_and_requests_and_sends_nothing,
    a_backtest_never_migrates_the_database_it_reads,
    a_step_that_cannot_render_is_a_failure_with_its_reason,
    the_change_reaches_runs_and_backtests,
    a_secret_url_is_rendered_masked_not_a_failure,
);
