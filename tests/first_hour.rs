//! The mistakes a new user makes in the first hour are loud and point at the
//! fix: the admin API's edges (unknown filter values, malformed numbers, a
//! replay without a body), and the binary's startup checks (a workflows
//! directory that does not exist, database URLs that cannot work, listen
//! addresses given as host names, a declared secret that is unset).

mod common;

use std::process::{Command, Stdio};
use std::time::Duration;

use common::sink::Sink;
use common::{TestApp, TestDb, ended_body};
use serde_json::Value;

async fn request(app: &TestApp, method: reqwest::Method, path: &str) -> (u16, Value) {
    let resp = app
        .client
        .request(method, app.url(path))
        .bearer_auth(common::TOKEN)
        .send()
        .await
        .unwrap();
    let status = resp.status().as_u16();
    (status, resp.json().await.unwrap_or(Value::Null))
}

async fn enum_filters_reject_unknown_values_with_the_valid_list(db: &TestDb) {
    let app = TestApp::spawn(db).await;
    let (status, body) = request(
        &app,
        reqwest::Method::GET,
        "/api/v1/conversations?status=nope",
    )
    .await;
    assert_eq!(status, 400, "{body}");
    assert_eq!(body["error"]["code"], "bad_request");
    let message = body["error"]["message"].as_str().unwrap();
    assert!(
        message.starts_with("invalid query parameter `status`: expected one of"),
        "{message}"
    );
    assert!(message.contains("(got `nope`)"), "{message}");
    assert!(
        message.contains("setup, completed, failed, busy, no-answer, voicemail"),
        "{message}"
    );
    let (status, body) = request(&app, reqwest::Method::GET, "/api/v1/runs?status=broken").await;
    assert_eq!(status, 400, "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("scheduled, running, retrying, waiting, succeeded, failed, cancelled"),
        "{body}"
    );
    // A valid value still filters.
    let (status, body) = request(
        &app,
        reqwest::Method::GET,
        "/api/v1/conversations?status=no-answer",
    )
    .await;
    assert_eq!(status, 200, "{body}");
}

async fn numeric_parameters_have_one_message_form(db: &TestDb) {
    let app = TestApp::spawn(db).await;
    for path in [
        "/api/v1/events?limit=-1",
        "/api/v1/events?limit=abc",
        "/api/v1/events?limit=0",
        "/api/v1/conversations?limit=501",
        "/api/v1/runs?limit=-1",
    ] {
        let (status, body) = request(&app, reqwest::Method::GET, path).await;
        assert_eq!(status, 400, "{path}: {body}");
        assert_eq!(
            body["error"]["message"],
            "invalid query parameter `limit`: expected an integer from 1 to 500",
            "{path}"
        );
    }
    let (status, body) = request(
        &app,
        reqwest::Method::GET,
        "/api/v1/conversations/conv_x?as_of=-x",
    )
    .await;
    assert_eq!(status, 400, "{body}");
    let message = body["error"]["message"].as_str().unwrap();
    assert!(
        message.starts_with("invalid query parameter `as_of`: expected"),
        "{message}"
    );
    assert!(!message.contains("invalid digit"), "{message}");
    for path in [
        "/api/v1/events?cursor=x",
        "/api/v1/conversations?cursor=x",
        "/api/v1/runs?cursor=x",
    ] {
        let (status, body) = request(&app, reqwest::Method::GET, path).await;
        assert_eq!(status, 400, "{path}: {body}");
        assert!(
            body["error"]["message"]
                .as_str()
                .unwrap()
                .starts_with("invalid query parameter `cursor`: expected the `next_cursor`"),
            "{path}: {body}"
        );
    }
}

async fn an_event_is_replayed_without_a_body(db: &TestDb) {
    let sink = Sink::start().await;
    let wf = format!(
        "on: {{ event: conversation.ended }}\nsteps:\n  - id: post\n    http: {{ url: \"{}\" }}\n",
        sink.url("/ok/first-hour")
    );
    let (app, _dir) = TestApp::with_workflows(db, &[("post.yaml", &wf)]).await;
    app.deliver(&ended_body("ev_nobody", "conv_nobody", "completed"))
        .await;
    app.wait_runs_final(1, 10).await;
    // No body, no Content-Type: as curl -X POST sends it.
    let (status, body) = request(
        &app,
        reqwest::Method::POST,
        "/api/v1/events/ev_nobody/replay",
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert!(body[0]["new_run_id"].is_string(), "{body}");
    let runs = app.wait_runs_final(2, 10).await;
    assert!(runs.iter().all(|r| r.status == "succeeded"));
    // A body that is not JSON is still refused.
    let resp = app
        .client
        .post(app.url("/api/v1/events/ev_nobody/replay"))
        .bearer_auth(common::TOKEN)
        .header("content-type", "text/plain")
        .body("workflows=post")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 415);
    // An operation whose body selects what to do (a bulk replay) says it needs one.
    let (status, body) = request(&app, reqwest::Method::POST, "/api/v1/replays").await;
    assert_eq!(status, 415, "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("needs a JSON body"),
        "{body}"
    );
}

on_both_backends!(
    enum_filters_reject_unknown_values_with_the_valid_list,
    numeric_parameters_have_one_message_form,
    an_event_is_replayed_without_a_body,
);

/// /docs groups operations by resource: an event's replay under Events,
/// bulk replays under their own tag, cancel next to retry under Runs.
#[test]
fn docs_tags_group_operations_by_resource() {
    let spec: Value = serde_json::from_str(&switchboard::api::spec_json()).unwrap();
    let tag = |path: &str, method: &str| spec["paths"][path][method]["tags"][0].clone();
    assert_eq!(tag("/api/v1/events/{id}/replay", "post"), "Events");
    assert_eq!(tag("/api/v1/replays", "post"), "Replays");
    assert_eq!(tag("/api/v1/replays/{id}/cancel", "post"), "Replays");
    assert_eq!(tag("/api/v1/runs/{id}/cancel", "post"), "Runs");
    // In spec order (as /docs shows them): retry, then cancel, then the bulk replays.
    let text = switchboard::api::spec_json();
    let at = |p: &str| text.find(&format!("\"{p}\": {{")).unwrap();
    assert!(at("/api/v1/runs/{id}/retry") < at("/api/v1/runs/{id}/cancel"));
    assert!(at("/api/v1/runs/{id}/cancel") < at("/api/v1/replays"));
    assert_eq!(
        spec["paths"]["/api/v1/events/{id}/replay"]["post"]["requestBody"]["required"],
        false
    );
}

/// Runs the binary with a clean environment; returns (exit code, stderr).
fn run(args: &[&str], env: &[(&str, &str)]) -> (i32, String) {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_switchboard"));
    cmd.args(args)
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().unwrap();
    let mut text = String::from_utf8_lossy(&out.stderr).into_owned();
    text.push_str(&String::from_utf8_lossy(&out.stdout));
    (out.status.code().unwrap_or(-1), text)
}

#[test]
fn a_workflows_directory_that_does_not_exist_refuses_to_start() {
    let tmp = tempfile::tempdir().unwrap();
    let missing = tmp.path().join("workflowz");
    let missing = missing.to_str().unwrap();
    let db = format!("sqlite://{}/sb.db", tmp.path().display());
    let expected = format!("{missing}: no such file or directory");
    let (code, out) = run(&["validate", missing], &[]);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains(&expected), "validate: {out}");
    for command in ["serve", "worker"] {
        let (code, out) = run(
            &[command],
            &[
                ("SWITCHBOARD_WORKFLOWS", missing),
                ("SWITCHBOARD_SIGNING_KEYS", "k"),
                ("SWITCHBOARD_DATABASE_URL", &db),
                ("SWITCHBOARD_LISTEN", "127.0.0.1:0"),
            ],
        );
        assert_eq!(code, 1, "{command}: {out}");
        assert!(out.contains(&expected), "{command}: {out}");
        assert!(out.contains("SWITCHBOARD_WORKFLOWS"), "{command}: {out}");
    }
}

#[test]
fn sqlite_without_a_path_is_refused_with_the_expected_form() {
    for url in ["sqlite://", "sqlite:"] {
        let (code, out) = run(&["migrate", "--database-url", url], &[]);
        assert_eq!(code, 1, "{url}: {out}");
        assert!(out.contains("names no file"), "{url}: {out}");
        assert!(out.contains("sqlite://./switchboard.db"), "{url}: {out}");
        assert!(!out.contains("no such table"), "{url}: {out}");
    }
    let tmp = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}/no/such/dir/sb.db", tmp.path().display());
    let (code, out) = run(&["migrate", "--database-url", &url], &[]);
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("does not exist") && out.contains("mkdir -p"),
        "{out}"
    );
}

/// Nothing listens on port 1 of loopback: the message says "connection
/// refused", names host and port, once, and never the pool's timeout.
#[test]
fn a_refused_postgres_connection_says_so_once() {
    let (code, out) = run(
        &[
            "migrate",
            "--database-url",
            "postgres://switchboard:hunter2@127.0.0.1:1/app",
        ],
        &[],
    );
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("connection refused by 127.0.0.1:1"), "{out}");
    assert_eq!(out.matches("refused").count(), 1, "{out}");
    assert!(!out.contains("pool timed out"), "{out}");
    assert!(!out.contains("hunter2"), "the password leaked: {out}");
    assert!(out.contains("pg_isready -h 127.0.0.1 -p 1"), "{out}");
}

/// A database or role that does not exist, on the real PostgreSQL.
#[tokio::test]
async fn a_missing_postgres_database_or_role_is_named_with_a_hint() {
    let Some(db) = TestDb::postgres().await else {
        return;
    };
    let url = reqwest::Url::parse(db.url()).unwrap();
    let (host, port) = (
        url.host_str().unwrap().to_owned(),
        url.port().unwrap_or(5432),
    );
    let mut missing_db = url.clone();
    missing_db.set_path("/sb_no_such_database_xyz");
    let (code, out) = run(&["migrate", "--database-url", missing_db.as_str()], &[]);
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains(&format!(
            "database `sb_no_such_database_xyz` does not exist on PostgreSQL at {host}:{port}"
        )),
        "{out}"
    );
    assert!(out.contains("createdb -h"), "{out}");
    assert_eq!(out.matches("does not exist").count(), 1, "{out}");
    assert!(!out.contains("at line"), "{out}");

    let mut missing_role = url.clone();
    missing_role.set_username("sb_no_such_role_xyz").unwrap();
    let (code, out) = run(&["migrate", "--database-url", missing_role.as_str()], &[]);
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("role `sb_no_such_role_xyz` does not exist"),
        "{out}"
    );
    assert!(out.contains("createuser"), "{out}");
    assert!(!out.contains("at line"), "{out}");
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// `--listen localhost:PORT` is resolved (it used to be "invalid socket
/// address syntax"), and a declared secret whose variable is unset is a
/// startup warning that names it.
#[tokio::test]
async fn serve_accepts_a_host_name_and_warns_about_an_unset_secret() {
    let tmp = tempfile::tempdir().unwrap();
    let wf = tmp.path().join("wf");
    std::fs::create_dir(&wf).unwrap();
    std::fs::copy(
        concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/examples/workflows/crm-on-completed.yaml"
        ),
        wf.join("crm.yaml"),
    )
    .unwrap();
    let port = free_port();
    let log = tmp.path().join("serve.log");
    let mut child = Command::new(env!("CARGO_BIN_EXE_switchboard"))
        .args(["serve", "--listen", &format!("localhost:{port}")])
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("SWITCHBOARD_SIGNING_KEYS", "k")
        .env("SWITCHBOARD_ADMIN_TOKEN", "t")
        .env("SWITCHBOARD_WORKFLOWS", &wf)
        .env(
            "SWITCHBOARD_DATABASE_URL",
            format!("sqlite://{}/sb.db", tmp.path().display()),
        )
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let client = common::client();
    let mut ready = false;
    for _ in 0..200 {
        if let Ok(r) = client
            .get(format!("http://127.0.0.1:{port}/readyz"))
            .send()
            .await
            && r.status().is_success()
        {
            ready = true;
            break;
        }
        if let Ok(Some(_)) = child.try_wait() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let _ = child.kill();
    let _ = child.wait();
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(
        ready,
        "serve --listen localhost:{port} did not come up:\n{text}"
    );
    assert!(text.contains("WARN"), "{text}");
    assert!(
        text.contains(
            "secret `CRM_TOKEN` is declared but the environment variable CRM_TOKEN is not set"
        ),
        "{text}"
    );
}

#[test]
fn a_listen_address_that_cannot_work_is_refused_clearly() {
    let (code, out) = run(
        &["serve", "--listen", "8080"],
        &[("SWITCHBOARD_SIGNING_KEYS", "k")],
    );
    assert_eq!(code, 2, "{out}");
    assert!(
        out.contains("has no port") || out.contains("IP:PORT or HOST:PORT"),
        "{out}"
    );
    assert!(!out.contains("invalid socket address syntax"), "{out}");
}

/// `switchboard sink` prints what it receives (method, path, headers, body)
/// and answers the status it is given.
#[tokio::test]
async fn the_sink_prints_each_request_and_answers_its_status() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("sink.out");
    let port = free_port();
    let mut child = Command::new(env!("CARGO_BIN_EXE_switchboard"))
        .args([
            "sink",
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--status",
            "503",
        ])
        .env_clear()
        .stdout(std::fs::File::create(&out).unwrap())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let client = common::client();
    let mut answer = None;
    for _ in 0..100 {
        if let Ok(r) = client
            .post(format!("http://127.0.0.1:{port}/calls/conv_1?x=1"))
            .header("idempotency-key", "run_1:post")
            .json(&serde_json::json!({"status": "completed"}))
            .send()
            .await
        {
            answer = Some(r.status().as_u16());
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let _ = child.kill();
    let _ = child.wait();
    let printed = std::fs::read_to_string(&out).unwrap();
    assert_eq!(answer, Some(503), "{printed}");
    assert!(printed.contains("POST /calls/conv_1?x=1"), "{printed}");
    assert!(printed.contains("idempotency-key: run_1:post"), "{printed}");
    assert!(printed.contains("\"status\": \"completed\""), "{printed}");
}
