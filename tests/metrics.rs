//! `GET /metrics`: the Prometheus counters, histograms and gauges move when
//! webhooks arrive and runs execute; `/metrics` can move to its own address.
//!
//! The recorder is global to the process, so the tests of this file take
//! turns (a lock) and compare values before and after.

mod common;

use std::time::Duration;

use common::sink::Sink;
use common::{Delivery, TestApp, TestDb, fixture, settings, workflow_dir};

static TURN: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

async fn scrape(app: &TestApp) -> String {
    let resp = app.client.get(app.url("/metrics")).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    let ct = resp.headers()["content-type"].to_str().unwrap().to_owned();
    assert!(ct.starts_with("text/plain"), "{ct}");
    resp.text().await.unwrap()
}

/// The value of the series `name` whose labels include all of `labels` (0 when absent).
fn value(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (series, v) = l.rsplit_once(' ')?;
            let (n, rest) = series.split_once('{').unwrap_or((series, ""));
            (n == name
                && labels
                    .iter()
                    .all(|(k, val)| rest.contains(&format!("{k}=\"{val}\""))))
            .then(|| v.parse::<f64>().unwrap())
        })
        .sum()
}

async fn counters_move_with_webhooks_runs_and_attempts(db: &TestDb) {
    let _turn = TURN.lock().await;
    let sink = Sink::start().await;
    let (app, _dir) = TestApp::with_workflows(
        db,
        &[(
            "m.yaml",
            &format!(
                "name: metered\non: {{ event: conversation.ended }}\nsteps:\n  - id: post\n    http: {{ url: \"{}\" }}\n    retry: {{ max_attempts: 3, backoff: fixed, initial_delay: 50ms }}\n",
                sink.url("/flaky/1/m")
            ),
        )],
    )
    .await;
    let before = scrape(&app).await;

    let body = fixture("conversation_ended_completed.json");
    // The same delivery twice: stored, then acknowledged as a duplicate.
    let keyed = Delivery {
        idempotency_key: Some("metrics-key-1".into()),
        ..Default::default()
    };
    for _ in 0..2 {
        let resp = app.deliver_with(&body, keyed.clone()).await;
        assert_eq!(resp.status(), 200);
    }
    let forged = app
        .deliver_with(
            &body,
            Delivery {
                key: Some("not-the-key".into()),
                ..Default::default()
            },
        )
        .await;
    assert_eq!(forged.status(), 401);
    assert_eq!(app.deliver(b"{not json").await.status(), 400);
    app.wait_runs_final(1, 15).await;
    assert_eq!(
        app.deliver(&fixture("conversation_setup_inbound_phone.json"))
            .await
            .status(),
        200
    );

    // Store gauges are read at most once a second.
    tokio::time::sleep(switchboard::prometheus::GAUGES_EVERY).await;
    let after = scrape(&app).await;
    let delta = |name: &str, labels: &[(&str, &str)]| {
        value(&after, name, labels) - value(&before, name, labels)
    };
    let ended = ("type", "conversation.ended");
    assert_eq!(
        delta(
            "switchboard_webhooks_received_total",
            &[ended, ("outcome", "stored")]
        ),
        1.0
    );
    assert_eq!(
        delta(
            "switchboard_webhooks_received_total",
            &[ended, ("outcome", "duplicate")]
        ),
        1.0
    );
    assert_eq!(
        delta(
            "switchboard_webhooks_received_total",
            &[("outcome", "rejected")]
        ),
        2.0
    );
    assert_eq!(
        delta(
            "switchboard_webhook_verification_failures_total",
            &[("reason", "bad_signature")]
        ),
        1.0
    );
    assert_eq!(
        delta(
            "switchboard_webhook_duplicates_total",
            &[("of", "idempotency_key")]
        ),
        1.0
    );
    assert_eq!(
        delta("switchboard_ingest_duration_seconds_count", &[ended]),
        2.0
    );
    assert_eq!(
        delta("switchboard_setup_answer_duration_seconds_count", &[]),
        1.0
    );
    let wf = ("workflow", "metered");
    assert_eq!(delta("switchboard_runs_started_total", &[wf]), 1.0);
    assert_eq!(
        delta(
            "switchboard_runs_finished_total",
            &[wf, ("state", "succeeded")]
        ),
        1.0
    );
    assert_eq!(
        delta(
            "switchboard_attempts_total",
            &[wf, ("outcome", "retrying"), ("error_class", "http_5xx")]
        ),
        1.0
    );
    assert_eq!(
        delta(
            "switchboard_attempts_total",
            &[wf, ("outcome", "succeeded")]
        ),
        1.0
    );
    assert_eq!(
        delta("switchboard_attempt_duration_seconds_count", &[wf]),
        2.0
    );
    // Store gauges are read from this test's fresh database.
    assert_eq!(value(&after, "switchboard_store_events", &[]), 2.0);
    assert!(value(&after, "switchboard_store_size_bytes", &[]) > 0.0);
    assert_eq!(value(&after, "switchboard_jobs_waiting", &[]), 0.0);
    assert!(after.contains("# TYPE switchboard_ingest_duration_seconds histogram"));
}

async fn waiting_jobs_and_their_age_are_reported(db: &TestDb) {
    let _turn = TURN.lock().await;
    // A run that is due but that no worker can take: the sink is never called
    // because the app's workers are busy with a slow step (concurrency 1).
    let sink = Sink::start().await;
    let dir = workflow_dir(&[(
        "slow.yaml",
        &format!(
            "name: slow\non: {{ event: conversation.ended }}\nsteps:\n  - id: post\n    http: {{ url: \"{}\" }}\n",
            sink.url("/slow/3000/w")
        ),
    )]);
    let mut s = settings(db);
    s.workflows_dir = dir.path().to_owned();
    s.worker_concurrency = 1;
    let app = TestApp::spawn_with(s).await;
    for i in 0..3 {
        let body = common::ended_body(&format!("ev_wait_{i}"), &format!("c{i}"), "completed");
        assert_eq!(app.deliver(&body).await.status(), 200);
    }
    sink.wait_for("/slow/3000", 1, 10).await;
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let text = scrape(&app).await;
    assert_eq!(value(&text, "switchboard_jobs_waiting", &[]), 2.0, "{text}");
    assert!(value(&text, "switchboard_jobs_oldest_waiting_age_seconds", &[]) >= 1.0);
    assert_eq!(value(&text, "switchboard_jobs_pending", &[]), 1.0);
}

async fn metrics_can_have_their_own_address(db: &TestDb) {
    let _turn = TURN.lock().await;
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut s = settings(db);
    s.metrics_listen = Some(format!("127.0.0.1:{port}").parse().unwrap());
    let app = TestApp::spawn_with(s).await;
    let main = app.client.get(app.url("/metrics")).send().await.unwrap();
    assert_eq!(main.status(), 404, "not on the main address");
    let own = app
        .client
        .get(format!("http://127.0.0.1:{port}/metrics"))
        .send()
        .await
        .unwrap();
    assert_eq!(own.status(), 200);
    assert!(
        own.text()
            .await
            .unwrap()
            .contains("switchboard_store_events")
    );
}

/// Scrapes faster than once a second read the store's gauges once: the
/// COUNT queries do not follow the scrape rate.
async fn store_gauges_are_read_at_most_once_a_second(db: &TestDb) {
    let _turn = TURN.lock().await;
    let app = TestApp::spawn(db).await;
    let first = scrape(&app).await;
    let read_at = std::time::Instant::now();
    assert_eq!(value(&first, "switchboard_store_events", &[]), 0.0);
    let body = common::ended_body("ev_gauge_1", "c_gauge", "completed");
    assert_eq!(app.deliver(&body).await.status(), 200);
    for _ in 0..20 {
        let text = scrape(&app).await;
        if read_at.elapsed() < Duration::from_millis(900) {
            // Still within the second: the value read by the first scrape.
            assert_eq!(value(&text, "switchboard_store_events", &[]), 0.0);
        }
    }
    tokio::time::sleep(switchboard::prometheus::GAUGES_EVERY).await;
    let later = scrape(&app).await;
    assert_eq!(value(&later, "switchboard_store_events", &[]), 1.0);
}

/// With SWITCHBOARD_METRICS_TOKEN set, /metrics needs it as a bearer token.
async fn metrics_token_is_required_when_set(db: &TestDb) {
    let _turn = TURN.lock().await;
    let mut s = settings(db);
    s.metrics_token = Some(switchboard::api::AdminToken::new("metrics-secret"));
    let app = TestApp::spawn_with(s).await;
    let url = app.url("/metrics");
    let none = app.client.get(&url).send().await.unwrap();
    assert_eq!(none.status(), 401);
    let body: serde_json::Value = none.json().await.unwrap();
    assert_eq!(body["error"]["code"], "unauthorized");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("SWITCHBOARD_METRICS_TOKEN")
    );
    let wrong = app
        .client
        .get(&url)
        .bearer_auth("nope")
        .send()
        .await
        .unwrap();
    assert_eq!(wrong.status(), 401);
    let right = app
        .client
        .get(&url)
        .bearer_auth("metrics-secret")
        .send()
        .await
        .unwrap();
    assert_eq!(right.status(), 200);
    assert!(
        right
            .text()
            .await
            .unwrap()
            .contains("switchboard_store_events")
    );
    // The probes stay open.
    let ready = app.client.get(app.url("/readyz")).send().await.unwrap();
    assert_eq!(ready.status(), 200);
}

/// SQLite: every write transaction is counted (a commit hook on the store's
/// connections); the counter is process-wide, so other tests can only add to it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_commits_are_counted() {
    let db = TestDb::sqlite().await;
    let app = TestApp::spawn(&db).await;
    let before = value(&scrape(&app).await, "switchboard_store_commits_total", &[]);
    assert!(before >= 1.0, "migrations committed: {before}");
    let resp = app
        .deliver(&common::ended_body("ev_commit", "conv_commit", "completed"))
        .await;
    assert_eq!(resp.status(), 200);
    // The gauges are read at most once a second; the counter on every scrape.
    let after = value(&scrape(&app).await, "switchboard_store_commits_total", &[]);
    assert!(after > before, "the append committed: {before} → {after}");
}

on_both_backends!(
    counters_move_with_webhooks_runs_and_attempts,
    waiting_jobs_and_their_age_are_reported,
    metrics_can_have_their_own_address,
    store_gauges_are_read_at_most_once_a_second,
    metrics_token_is_required_when_set,
);
