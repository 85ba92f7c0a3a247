//! Operational edges (issue 17): every wait on the webhook path is bounded,
//! batches stay under each database's bind-parameter limit, background tasks
//! are supervised and visible in `/readyz`, admin errors tell unavailable
//! from corrupt, refused signatures cannot flood the log or choose the trace,
//! and no database password reaches the log.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::sink::Sink;
use common::{ServerProcess, TestApp, TestDb, client, settings, workflow_dir};
use switchboard::startup::Application;

/// `n` workflows that all start on `conversation.ended`, posting to `url`.
fn many_workflows(n: usize, url: &str) -> Vec<(String, String)> {
    (0..n)
        .map(|i| {
            (
                format!("w{i:02}.yaml"),
                format!(
                    "name: w{i:02}\non: {{ event: conversation.ended }}\nsteps:\n  - id: post\n    http: {{ url: \"{url}\" }}\n"
                ),
            )
        })
        .collect()
}

/// 256 events that each start 40 workflows: 10,240 runs and as many match
/// decisions in one transaction, far past both bind-parameter limits as one
/// statement. The batch commits whole.
async fn a_full_batch_of_many_matches_commits_in_one_transaction(db: &TestDb) {
    use switchboard::store::{AppendOutcome, NewEvent};
    let dir = workflow_dir(
        &many_workflows(40, "http://127.0.0.1:9/unused")
            .iter()
            .map(|(f, y)| (f.as_str(), y.as_str()))
            .collect::<Vec<_>>(),
    );
    let (registry, store) = common::registry_and_store(db, dir.path()).await;
    let batch: Vec<NewEvent> = (0..256)
        .map(|i| {
            let body =
                common::ended_body(&format!("ev_big_{i}"), &format!("c_big_{i}"), "completed");
            common::new_event(body, &format!("key-big-{i}"))
        })
        .collect();
    let (outcomes, runs) = store
        .append_batch(&batch, registry.as_ref())
        .await
        .expect("the batch is split under the bind limit, not refused");
    assert_eq!(runs, 256 * 40);
    assert!(
        outcomes
            .iter()
            .all(|o| matches!(o, AppendOutcome::Appended { .. }))
    );
    assert_eq!(db.count("SELECT COUNT(*) FROM events").await, 256);
    assert_eq!(db.count("SELECT COUNT(*) FROM runs").await, 256 * 40);
    assert_eq!(
        db.count("SELECT COUNT(*) FROM match_decisions").await,
        256 * 40
    );
}

/// 40 workflows on one event type and 300 concurrent deliveries: every
/// delivery is acknowledged, stored once, and starts its 40 runs.
async fn forty_workflows_and_300_concurrent_deliveries(db: &TestDb) {
    let sink = Sink::start().await;
    // One worker, held by a slow call: the runs are created, not executed.
    let files = many_workflows(40, &sink.url("/slow/60000/w"));
    let dir = workflow_dir(
        &files
            .iter()
            .map(|(f, y)| (f.as_str(), y.as_str()))
            .collect::<Vec<_>>(),
    );
    let mut s = settings(db);
    s.workflows_dir = dir.path().to_owned();
    s.worker_concurrency = 1;
    // What is checked here is that every delivery is stored (and its runs
    // created) once, not how fast: a debug build on a shared test machine
    // needs more than the default 2 s for 12,000 runs.
    s.append_timeout = Duration::from_secs(60);
    let app = Arc::new(TestApp::spawn_with(s).await);
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..300 {
        let app = app.clone();
        tasks.spawn(async move {
            let body =
                common::ended_body(&format!("ev_load_{i}"), &format!("c_load_{i}"), "completed");
            app.deliver(&body).await.status().as_u16()
        });
    }
    let mut statuses = Vec::new();
    while let Some(status) = tasks.join_next().await {
        statuses.push(status.unwrap());
    }
    let not_ok: Vec<_> = statuses.iter().filter(|s| **s != 200).collect();
    assert!(not_ok.is_empty(), "answers other than 200: {not_ok:?}");
    assert_eq!(db.count("SELECT COUNT(*) FROM events").await, 300);
    assert_eq!(
        db.count("SELECT COUNT(DISTINCT event_id) FROM events")
            .await,
        300
    );
    assert_eq!(db.count("SELECT COUNT(*) FROM runs").await, 300 * 40);
}

/// `SWITCHBOARD_WORKER_CONCURRENCY` bounds the requests in flight (run
/// slots are four times as many, for runs saving their outcomes): with 2,
/// twelve runs to a slow sink never have more than 2 requests at the sink
/// at once, and all of them arrive.
async fn worker_concurrency_bounds_the_requests_in_flight(db: &TestDb) {
    let sink = Sink::start().await;
    let dir = workflow_dir(&[(
        "slow.yaml",
        &format!(
            "name: slow\non: {{ event: conversation.ended }}\nsteps:\n  - id: post\n    http: {{ url: \"{}\" }}\n",
            sink.url("/slow/200/bounded")
        ),
    )]);
    let mut s = settings(db);
    s.workflows_dir = dir.path().to_owned();
    s.worker_concurrency = 2;
    let app = TestApp::spawn_with(s).await;
    for i in 0..12 {
        let body = common::ended_body(&format!("ev_cap_{i}"), &format!("c_cap_{i}"), "completed");
        assert_eq!(app.deliver(&body).await.status(), 200);
    }
    sink.wait_for("/slow/200/bounded", 12, 30).await;
    assert_eq!(
        sink.max_in_flight(),
        2,
        "as many requests in flight as the worker concurrency, never more"
    );
}

/// Holds the database's append lock from outside the server (SQLite: a write
/// transaction; PostgreSQL: the appender's advisory lock), until dropped.
enum Blocker {
    Sqlite(sqlx::pool::PoolConnection<sqlx::Sqlite>),
    Postgres(sqlx::pool::PoolConnection<sqlx::Postgres>),
}

async fn block_appends(db: &TestDb) -> Blocker {
    match db {
        TestDb::Sqlite { .. } => {
            let pool = sqlx::SqlitePool::connect(db.url()).await.unwrap();
            let mut conn = pool.acquire().await.unwrap();
            sqlx::query("BEGIN IMMEDIATE")
                .execute(&mut *conn)
                .await
                .unwrap();
            Blocker::Sqlite(conn)
        }
        TestDb::Postgres { .. } => {
            let pool = sqlx::PgPool::connect(db.url()).await.unwrap();
            let mut conn = pool.acquire().await.unwrap();
            sqlx::query("SELECT pg_advisory_lock($1)")
                .bind(0x5357_4244_0001_i64)
                .execute(&mut *conn)
                .await
                .unwrap();
            Blocker::Postgres(conn)
        }
    }
}

impl Blocker {
    async fn release(self) {
        match self {
            Blocker::Sqlite(mut c) => {
                sqlx::query("ROLLBACK").execute(&mut *c).await.unwrap();
            }
            Blocker::Postgres(mut c) => {
                sqlx::query("SELECT pg_advisory_unlock_all()")
                    .execute(&mut *c)
                    .await
                    .unwrap();
            }
        }
    }
}

/// While the store hangs, every delivery is answered 503 with Retry-After
/// within SWITCHBOARD_APPEND_TIMEOUT (the wait to hand the event over and
/// the wait behind earlier batches included); afterwards they are stored.
async fn every_delivery_is_answered_within_the_append_timeout(db: &TestDb) {
    let mut s = settings(db);
    s.append_timeout = Duration::from_millis(300);
    let app = Arc::new(TestApp::spawn_with(s).await);
    // The schema exists and the pools are warm. On a loaded machine the first
    // delivery to a fresh database can itself take longer than the 300 ms.
    let warm = common::ended_body("ev_warm", "c_warm", "completed");
    let deadline = Instant::now() + Duration::from_secs(10);
    while app.deliver(&warm).await.status() != 200 {
        assert!(
            Instant::now() < deadline,
            "the warm-up delivery was never stored"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let blocker = block_appends(db).await;
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..40 {
        let app = app.clone();
        tasks.spawn(async move {
            let body =
                common::ended_body(&format!("ev_hang_{i}"), &format!("c_hang_{i}"), "completed");
            let sent = Instant::now();
            let resp = app.deliver(&body).await;
            let retry_after = resp.headers().get("retry-after").is_some();
            (resp.status().as_u16(), retry_after, sent.elapsed())
        });
    }
    while let Some(answer) = tasks.join_next().await {
        let (status, retry_after, took) = answer.unwrap();
        assert_eq!(status, 503);
        assert!(retry_after, "a 503 says when to retry");
        // The bound is the timeout; the slack is for a loaded test machine.
        assert!(
            took < Duration::from_millis(300) + Duration::from_millis(1200),
            "answered after {took:?}"
        );
    }
    blocker.release().await;
    // The refusal after a failed batch lasts 1 s; then deliveries are stored again.
    let body = common::ended_body("ev_after", "c_after", "completed");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let status = app.deliver(&body).await.status().as_u16();
        if status == 200 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "still {status} after the store came back"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// A background task that stops is restarted, and `/readyz` names it while
/// it is down; deliveries sent meanwhile wait for it (within the timeout).
async fn a_stopped_appender_is_restarted_and_readyz_names_it(db: &TestDb) {
    let mut s = settings(db);
    s.append_timeout = Duration::from_secs(10);
    let app = Application::build(s).await.expect("build app");
    let base = format!("http://{}", app.local_addr());
    let supervisor = app.supervisor();
    let server = tokio::spawn(async move {
        let _ = app.run().await;
    });
    let http = client();
    assert_eq!(
        http.get(format!("{base}/readyz"))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    assert!(supervisor.abort("appender"), "the appender runs");
    let deadline = Instant::now() + Duration::from_secs(5);
    let reason = loop {
        let resp = http.get(format!("{base}/readyz")).send().await.unwrap();
        if resp.status() == 503 {
            let body: serde_json::Value = resp.json().await.unwrap();
            assert_eq!(body["status"], "unavailable");
            break body["reason"].as_str().unwrap_or_default().to_owned();
        }
        assert!(
            Instant::now() < deadline,
            "/readyz never reported the appender down"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(reason.contains("appender"), "{reason}");
    // Sent while the appender is down: stored once it is back.
    let body = common::ended_body("ev_restart", "c_restart", "completed");
    let resp = common::deliver_to(
        &http,
        &format!("{base}/webhooks/operator"),
        &body,
        Default::default(),
    )
    .await;
    assert_eq!(resp.status(), 200);
    assert_eq!(
        http.get(format!("{base}/readyz"))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    assert_eq!(supervisor.restarts("appender"), 1);
    server.abort();
}

/// A conversation whose stored body cannot be read is a 500 with its own
/// code, not a 503 "retry later".
async fn corrupt_data_is_an_internal_error_not_unavailable(db: &TestDb) {
    let app = TestApp::spawn(db).await;
    let body = common::ended_body("ev_fine", "c_broken", "completed");
    assert_eq!(app.deliver(&body).await.status(), 200);
    let insert = "INSERT INTO events (seq, event_id, idempotency_key, event_type, conversation_id, \
                  stream_version, received_at, signed_url, x_timestamp, x_signature, raw_body) \
                  VALUES (2, 'ev_garbled', 'k-garbled', 'conversation.ended', 'c_broken', 2, $1, 'u', '1', 's', $2)";
    let now = chrono::Utc::now();
    let garbled: &[u8] = b"this is not an envelope";
    match db {
        TestDb::Sqlite { .. } => {
            let pool = sqlx::SqlitePool::connect(db.url()).await.unwrap();
            sqlx::query(insert)
                .bind(now)
                .bind(garbled)
                .execute(&pool)
                .await
                .unwrap();
        }
        TestDb::Postgres { .. } => {
            let pool = sqlx::PgPool::connect(db.url()).await.unwrap();
            sqlx::query(insert)
                .bind(now)
                .bind(garbled)
                .execute(&pool)
                .await
                .unwrap();
        }
    }
    let (status, body) = app.admin_get("/api/v1/conversations/c_broken").await;
    assert_eq!(status, 500, "{body}");
    assert_eq!(body["error"]["code"], "store_corrupt", "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("ev_garbled"),
        "{body}"
    );
}

/// Refused signatures are logged once per period (with a count of the lines
/// left out), and their `traceparent` is not honoured; a verified delivery's is.
async fn refused_signatures_are_throttled_and_choose_no_trace(db: &TestDb) {
    const FORGED_TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
    const GOOD_TRACE: &str = "0af7651916cd43dd8448eb211c80319c";
    let logs = tempfile::tempdir().unwrap();
    // An OTLP endpoint that accepts nothing: spans are built (and logs carry
    // their trace ids) but go nowhere.
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let endpoint = format!("http://127.0.0.1:{closed}");
    let server = ServerProcess::start(
        db,
        logs.path(),
        &[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint.as_str()),
            ("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc"),
            ("SWITCHBOARD_LOG_FORMAT", "json"),
            ("RUST_LOG", "info,switchboard=debug"),
        ],
    )
    .await;
    let http = client();
    let body = common::ended_body("ev_forged", "c_forged", "completed");
    for _ in 0..30 {
        let resp = http
            .post(server.webhook_url())
            .header("x-timestamp", chrono::Utc::now().timestamp().to_string())
            .header("x-idempotency-key", uuid::Uuid::new_v4().to_string())
            .header("x-signature", "v1,AAAA")
            .header(
                "traceparent",
                format!("00-{FORGED_TRACE}-00f067aa0ba902b7-01"),
            )
            .body(body.clone())
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 401);
    }
    let good = common::ended_body("ev_good_trace", "c_good", "completed");
    let resp = common::deliver_with_headers(
        &http,
        &server.webhook_url(),
        &good,
        &[(
            "traceparent",
            &format!("00-{GOOD_TRACE}-00f067aa0ba902b7-01"),
        )],
    )
    .await;
    assert_eq!(resp.status(), 200);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let log = std::fs::read_to_string(&server.log).unwrap();
    let refused: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("webhook refused"))
        .collect();
    assert_eq!(
        refused.len(),
        1,
        "one line per period:\n{}",
        refused.join("\n")
    );
    assert!(refused[0].contains("suppressed"), "{}", refused[0]);
    assert!(
        !log.contains(FORGED_TRACE),
        "an unverified traceparent was honoured:\n{log}"
    );
    assert!(
        log.lines()
            .any(|l| l.contains("event stored") && l.contains(GOOD_TRACE)),
        "a verified delivery continues its traceparent:\n{log}"
    );
}

/// A database URL with credentials in its query (as sqlx accepts them) is
/// printed without them.
async fn no_database_password_reaches_the_log(db: &TestDb) {
    let logs = tempfile::tempdir().unwrap();
    let url = match db {
        TestDb::Sqlite { .. } => return, // SQLite URLs carry no credentials
        TestDb::Postgres { url, .. } => {
            // Trust auth: the password is sent but not needed.
            let (scheme, rest) = url.split_once("://").unwrap();
            let (userinfo, hostpath) = rest.split_once('@').unwrap();
            let user = userinfo.split(':').next().unwrap();
            format!(
                "{scheme}://{user}:hunter2-userinfo@{hostpath}?password=hunter2-query&sslmode=disable&sslpassword=hunter2-ssl&Password=hunter2-case"
            )
        }
    };
    let server = ServerProcess::start(
        db,
        logs.path(),
        &[("SWITCHBOARD_DATABASE_URL", url.as_str())],
    )
    .await;
    let log = std::fs::read_to_string(&server.log).unwrap();
    assert!(log.contains("listening"), "{log}");
    assert!(
        !log.contains("hunter2"),
        "a password reached the log:\n{log}"
    );
    assert!(log.contains("***"), "{log}");
    // Parameters sqlx ignores are named, without their values.
    assert!(log.contains("`sslpassword` is not understood"), "{log}");
}

/// A bulk replay whose work fails (here: SQLite's write lock held past its
/// busy timeout) is resumed from its saved position by the process itself,
/// not left "running" until the next start.
async fn an_interrupted_replay_resumes_without_a_restart(db: &TestDb) {
    if !matches!(db, TestDb::Sqlite { .. }) {
        return; // the fault used (a held write lock that times out) is SQLite's
    }
    let app = Arc::new(TestApp::spawn(db).await);
    let mut tasks = tokio::task::JoinSet::new();
    for chunk in 0..20 {
        let app = app.clone();
        tasks.spawn(async move {
            for i in 0..40 {
                let body = common::ended_body(
                    &format!("ev_rp_{chunk}_{i}"),
                    &format!("c_rp_{chunk}"),
                    "completed",
                );
                assert_eq!(app.deliver(&body).await.status(), 200);
            }
        });
    }
    while let Some(done) = tasks.join_next().await {
        done.unwrap();
    }
    for attempt in 0..3 {
        let resp = app
            .client
            .post(app.url("/api/v1/replays"))
            .bearer_auth(common::TOKEN)
            .json(&serde_json::json!({"type": "conversation.ended"}))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        let replay: serde_json::Value = resp.json().await.unwrap();
        let id = replay["id"].as_str().unwrap().to_owned();
        let blocker = block_appends(db).await;
        let (_, during) = app.admin_get(&format!("/api/v1/replays/{id}")).await;
        if during["status"] != "running" {
            // It finished before the lock was taken: try again with a new one.
            blocker.release().await;
            assert!(
                attempt < 2,
                "the replay always finished before the lock: {during}"
            );
            continue;
        }
        // Past the 5 s busy timeout: the replay's save fails.
        tokio::time::sleep(Duration::from_millis(6500)).await;
        blocker.release().await;
        let deadline = Instant::now() + Duration::from_secs(40);
        loop {
            let (_, r) = app.admin_get(&format!("/api/v1/replays/{id}")).await;
            if r["status"] == "succeeded" {
                assert_eq!(r["done"], r["total"], "{r}");
                return;
            }
            assert!(Instant::now() < deadline, "the replay was not resumed: {r}");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

on_both_backends!(
    worker_concurrency_bounds_the_requests_in_flight,
    a_full_batch_of_many_matches_commits_in_one_transaction,
    forty_workflows_and_300_concurrent_deliveries,
    every_delivery_is_answered_within_the_append_timeout,
    a_stopped_appender_is_restarted_and_readyz_names_it,
    corrupt_data_is_an_internal_error_not_unavailable,
    refused_signatures_are_throttled_and_choose_no_trace,
    no_database_password_reaches_the_log,
    an_interrupted_replay_resumes_without_a_restart,
);
