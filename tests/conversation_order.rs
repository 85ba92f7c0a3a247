//! Per-conversation order (`order: conversation`, the default) end to end,
//! on SQLite and PostgreSQL: a retrying or waiting run holds back the later
//! runs of its workflow and conversation, which then start one after
//! another in log order; cancel and failure release the next; `order: none`
//! overlaps; other conversations are not held; the admin API shows which run
//! a held run waits behind; and on PostgreSQL two instances ingesting one
//! conversation at once still execute its runs in log order.

mod common;

use std::time::{Duration, Instant};

use common::sink::Sink;
use common::{TestApp, TestDb, ended_body};
use serde_json::Value;

/// A workflow that posts the event's id to `url` on every conversation.ended.
fn posting(url: &str, order: &str, retry: &str) -> String {
    format!(
        "on: {{ event: conversation.ended }}\norder: {order}\nsteps:\n  - id: post\n    http:\n      url: \"{url}\"\n      json: {{ event: \"{{{{ event.id }}}}\" }}\n    retry: {retry}\n"
    )
}

/// A workflow that waits, then posts the event's id.
fn waiting_then_posting(wait: &str, url: &str) -> String {
    format!(
        "on: {{ event: conversation.ended }}\nsteps:\n  - id: settle\n    wait: {wait}\n  - id: post\n    http:\n      url: \"{url}\"\n      json: {{ event: \"{{{{ event.id }}}}\" }}\n"
    )
}

/// The run started by `event_id` (one workflow per test), as the API shows it.
async fn run_of(app: &TestApp, event_id: &str) -> Value {
    let (status, page) = app
        .admin_get(&format!("/api/v1/runs?event_id={event_id}"))
        .await;
    assert_eq!(status, 200, "{page}");
    page["data"][0].clone()
}

/// Waits until the run of `event_id` has `status` (and returns it).
async fn run_with_status(app: &TestApp, event_id: &str, status: &str, secs: u64) -> Value {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        let run = run_of(app, event_id).await;
        if run["status"] == status {
            return run;
        }
        assert!(
            Instant::now() < deadline,
            "the run of {event_id} is not {status} within {secs}s: {run}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn deliver_all(app: &TestApp, events: &[(&str, &str)]) {
    for (id, conv) in events {
        let resp = app.deliver(&ended_body(id, conv, "completed")).await;
        assert_eq!(resp.status(), 200, "{id}");
    }
}

fn events_in_arrival_order(got: &[common::sink::Received]) -> Vec<String> {
    got.iter()
        .map(|r| r.json()["event"].as_str().unwrap_or("?").to_owned())
        .collect()
}

async fn a_retrying_run_holds_the_later_ones_which_then_run_in_log_order(db: &TestDb) {
    let sink = Sink::start().await;
    // The first three requests fail (500, 503, 500): the first run retries three times.
    let wf = posting(
        &sink.url("/flaky/3/order"),
        "conversation",
        "{ max_attempts: 10, backoff: fixed, initial_delay: 300ms }",
    );
    let (app, _dir) = TestApp::with_workflows(db, &[("o.yaml", &wf)]).await;
    deliver_all(
        &app,
        &[
            ("ev_o1", "conv_o"),
            ("ev_o2", "conv_o"),
            ("ev_o3", "conv_o"),
        ],
    )
    .await;
    sink.wait_for("/flaky/3/order", 1, 10).await;
    let first = run_with_status(&app, "ev_o1", "retrying", 5).await;
    let second = run_of(&app, "ev_o2").await;
    let third = run_of(&app, "ev_o3").await;
    for (held, ahead) in [(&second, 1), (&third, 2)] {
        assert_eq!(held["status"], "waiting", "{held}");
        assert_eq!(held["wait_reason"], "order", "{held}");
        let w = &held["waiting_for"];
        assert_eq!(w["kind"], "order", "{held}");
        assert_eq!(w["behind"], first["id"], "{held}");
        assert_eq!(w["ahead"], ahead, "{held}");
        // The run ahead is retrying, or running its next attempt by now.
        let description = w["description"].as_str().unwrap();
        assert!(
            description.contains(first["id"].as_str().unwrap())
                && (description.contains("(retrying)") || description.contains("(running)")),
            "{w}"
        );
        assert!(held["resume_at"].is_null() && held["next_attempt_at"].is_null());
    }
    // The detail view shows the same.
    let (_, detail) = app
        .admin_get(&format!("/api/v1/runs/{}", second["id"].as_str().unwrap()))
        .await;
    assert_eq!(detail["waiting_for"]["behind"], first["id"], "{detail}");
    let got = sink.wait_for("/flaky/3/order", 6, 20).await;
    assert_eq!(
        events_in_arrival_order(&got),
        ["ev_o1", "ev_o1", "ev_o1", "ev_o1", "ev_o2", "ev_o3"],
        "the later runs start only after the first ended, in log order"
    );
    let runs = app.wait_runs_final(3, 10).await;
    assert!(runs.iter().all(|r| r.status == "succeeded"), "{runs:?}");
}

async fn a_waiting_run_holds_the_next_and_metrics_count_it(db: &TestDb) {
    let sink = Sink::start().await;
    let wf = waiting_then_posting("700ms", &sink.url("/ok/w"));
    let (app, _dir) = TestApp::with_workflows(db, &[("w.yaml", &wf)]).await;
    deliver_all(&app, &[("ev_w1", "conv_w"), ("ev_w2", "conv_w")]).await;
    let first = run_with_status(&app, "ev_w1", "waiting", 5).await;
    assert_eq!(first["wait_reason"], "timer", "{first}");
    let second = run_of(&app, "ev_w2").await;
    assert_eq!(second["wait_reason"], "order", "{second}");
    assert_eq!(second["waiting_for"]["behind"], first["id"], "{second}");
    let metrics = app.metrics_text().await;
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("switchboard_runs_waiting ") && l.ends_with(" 2")),
        "a run held by order counts among the waiting: {metrics}"
    );
    let got = sink.wait_for("/ok/w", 2, 10).await;
    assert_eq!(events_in_arrival_order(&got), ["ev_w1", "ev_w2"]);
    // The second run reached its own 700 ms wait only after the first ended.
    assert!(
        got[1].at.duration_since(got[0].at) >= Duration::from_millis(650),
        "the second run overlapped the first: {:?}",
        got[1].at.duration_since(got[0].at)
    );
    app.wait_runs_final(2, 10).await;
}

async fn order_none_lets_one_conversations_runs_overlap(db: &TestDb) {
    let sink = Sink::start().await;
    let wf = posting(&sink.url("/slow/1500/none"), "none", "{ max_attempts: 1 }");
    let (app, _dir) = TestApp::with_workflows(db, &[("n.yaml", &wf)]).await;
    deliver_all(&app, &[("ev_n1", "conv_n"), ("ev_n2", "conv_n")]).await;
    let got = sink.wait_for("/slow/1500/none", 2, 10).await;
    let gap = got[1].at.duration_since(got[0].at);
    assert!(
        gap < Duration::from_millis(1500),
        "the second request came only after the first was answered ({gap:?}): the runs did not overlap"
    );
    app.wait_runs_final(2, 10).await;
}

async fn runs_of_other_conversations_are_not_held(db: &TestDb) {
    let wf = waiting_then_posting("30s", "http://127.0.0.1:9/unused");
    let (app, _dir) = TestApp::with_workflows(db, &[("c.yaml", &wf)]).await;
    deliver_all(
        &app,
        &[
            ("ev_a1", "conv_a"),
            ("ev_a2", "conv_a"),
            ("ev_b1", "conv_b"),
        ],
    )
    .await;
    let a1 = run_with_status(&app, "ev_a1", "waiting", 5).await;
    assert_eq!(a1["wait_reason"], "timer", "{a1}");
    let b1 = run_with_status(&app, "ev_b1", "waiting", 5).await;
    assert_eq!(
        b1["wait_reason"], "timer",
        "another conversation's run goes on: {b1}"
    );
    let a2 = run_of(&app, "ev_a2").await;
    assert_eq!(a2["wait_reason"], "order", "{a2}");
    assert_eq!(a2["waiting_for"]["behind"], a1["id"], "{a2}");
}

async fn cancelling_or_failing_the_first_run_releases_the_next(db: &TestDb) {
    let sink = Sink::start().await;
    // Cancel: the first request fails, the retry is 30 s away; cancelling it releases the second.
    let wf = posting(
        &sink.url("/flaky/1/cancel"),
        "conversation",
        "{ max_attempts: 5, backoff: fixed, initial_delay: 30s }",
    )
    .replace(
        "conversation.ended }",
        "conversation.ended, status: completed }",
    );
    // Failure: one attempt only; the second run of the conversation then runs.
    let failing = posting(
        &sink.url("/flaky/1/fail"),
        "conversation",
        "{ max_attempts: 1 }",
    )
    .replace(
        "conversation.ended }",
        "conversation.ended, status: voicemail }",
    );
    let (app, _dir) = TestApp::with_workflows(db, &[("c.yaml", &wf), ("f.yaml", &failing)]).await;
    deliver_all(&app, &[("ev_c1", "conv_c"), ("ev_c2", "conv_c")]).await;
    sink.wait_for("/flaky/1/cancel", 1, 10).await;
    let first = run_with_status(&app, "ev_c1", "retrying", 5).await;
    assert_eq!(run_of(&app, "ev_c2").await["wait_reason"], "order");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(sink.received_on("/flaky/1/cancel").len(), 1, "still held");
    let (status, cancelled) = app
        .admin_post(&format!(
            "/api/v1/runs/{}/cancel",
            first["id"].as_str().unwrap()
        ))
        .await;
    assert_eq!(status, 200, "{cancelled}");
    let got = sink.wait_for("/flaky/1/cancel", 2, 10).await;
    assert_eq!(events_in_arrival_order(&got), ["ev_c1", "ev_c2"]);
    run_with_status(&app, "ev_c2", "succeeded", 10).await;

    for (id, conv) in [("ev_f1", "conv_f"), ("ev_f2", "conv_f")] {
        let resp = app.deliver(&ended_body(id, conv, "voicemail")).await;
        assert_eq!(resp.status(), 200);
    }
    let got = sink.wait_for("/flaky/1/fail", 2, 10).await;
    assert_eq!(events_in_arrival_order(&got), ["ev_f1", "ev_f2"]);
    let (_, page) = app.admin_get("/api/v1/runs?event_id=ev_f1").await;
    assert_eq!(page["data"][0]["status"], "failed", "{page}");
    run_with_status(&app, "ev_f2", "succeeded", 10).await;
    // A manual retry of the failed run starts at once, although a later run already ran.
    let failed = page["data"][0]["id"].as_str().unwrap().to_owned();
    let (status, retried) = app
        .admin_post(&format!("/api/v1/runs/{failed}/retry"))
        .await;
    assert_eq!(status, 200, "{retried}");
    assert_eq!(retried["status"], "scheduled", "{retried}");
    let got = sink.wait_for("/flaky/1/fail", 3, 10).await;
    assert_eq!(events_in_arrival_order(&got), ["ev_f1", "ev_f2", "ev_f1"]);
    run_with_status(&app, "ev_f1", "succeeded", 10).await;
}

on_both_backends!(
    a_retrying_run_holds_the_later_ones_which_then_run_in_log_order,
    a_waiting_run_holds_the_next_and_metrics_count_it,
    order_none_lets_one_conversations_runs_overlap,
    runs_of_other_conversations_are_not_held,
    cancelling_or_failing_the_first_run_releases_the_next,
);

/// Two instances on one PostgreSQL database ingest the events of one
/// conversation at the same time, and work on its runs at the same time:
/// the runs still execute one after another, in log order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_instances_on_postgres_keep_one_conversation_in_log_order() {
    let Some(db) = TestDb::postgres().await else {
        return;
    };
    let sink = Sink::start().await;
    let wf = posting(
        &sink.url("/slow/120/two"),
        "conversation",
        "{ max_attempts: 1 }",
    );
    let (a, _dir_a) = TestApp::with_workflows(&db, &[("p.yaml", &wf)]).await;
    let (b, _dir_b) = TestApp::with_workflows(&db, &[("p.yaml", &wf)]).await;
    const N: usize = 10;
    let ids: Vec<String> = (0..N).map(|i| format!("ev_p{i:02}")).collect();
    let sends = ids.iter().enumerate().map(|(i, id)| {
        let app = if i % 2 == 0 { &a } else { &b };
        async move { app.deliver(&ended_body(id, "conv_p", "completed")).await }
    });
    for resp in futures::future::join_all(sends).await {
        assert_eq!(resp.status(), 200);
    }
    let got = sink.wait_for("/slow/120/two", N, 30).await;
    let log: Vec<String> = a
        .all_events()
        .await
        .iter()
        .map(|e| e["id"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(log.len(), N);
    assert_eq!(
        events_in_arrival_order(&got),
        log,
        "the runs executed in the log's order"
    );
    for pair in got.windows(2) {
        assert!(
            pair[1].at.duration_since(pair[0].at) >= Duration::from_millis(110),
            "a run started before the previous one ended"
        );
    }
    a.wait_runs_final(N, 10).await;
}

/// On PostgreSQL, an append and a transaction ending the run ahead serialise
/// on the (workflow, conversation) advisory lock: here a transaction holding
/// that lock ends the first run (as the engine's final save or a cancel
/// does) while an event of the conversation is being appended. The append
/// waits for it, sees the first run ended, and does not hold the new run;
/// without the lock it would hold it behind a run whose end released nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_postgres_an_append_waits_for_a_run_ending_in_the_same_conversation() {
    use sqlx::Connection;
    let Some(db) = TestDb::postgres().await else {
        return;
    };
    let sink = Sink::start().await;
    let wf = posting(
        &sink.url("/flaky/1/race"),
        "conversation",
        "{ max_attempts: 5, backoff: fixed, initial_delay: 30s }",
    );
    let (app, _dir) = TestApp::with_workflows(&db, &[("r.yaml", &wf)]).await;
    deliver_all(&app, &[("ev_r1", "conv_r")]).await;
    run_with_status(&app, "ev_r1", "retrying", 10).await;
    let mut conn = sqlx::PgConnection::connect(db.url()).await.unwrap();
    let mut tx = conn.begin().await.unwrap();
    sqlx::query("SELECT pg_advisory_xact_lock(hashtext('r'), hashtext('conv_r'))")
        .execute(&mut *tx)
        .await
        .unwrap();
    let delivery = {
        let client = app.client.clone();
        let url = app.webhook_url();
        tokio::spawn(async move {
            common::deliver_to(
                &client,
                &url,
                &ended_body("ev_r2", "conv_r", "completed"),
                common::Delivery::default(),
            )
            .await
            .status()
        })
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        !delivery.is_finished(),
        "the append did not wait for the conversation's order lock"
    );
    sqlx::query(
        "UPDATE runs SET status = 'cancelled', finished_at = now() WHERE event_id = 'ev_r1'",
    )
    .execute(&mut *tx)
    .await
    .unwrap();
    tx.commit().await.unwrap();
    assert_eq!(delivery.await.unwrap(), 200);
    let second = run_with_status(&app, "ev_r2", "succeeded", 10).await;
    assert!(second["replay_of"].is_null());
}
