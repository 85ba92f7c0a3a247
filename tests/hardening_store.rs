//! Issue 11, the store and setup side, end to end on SQLite and PostgreSQL:
//! data the databases refuse (NUL) is stored safely, late and older
//! custom-field updates fire nothing, the setup deadline bounds the whole
//! request (storing included), templates have bounded fuel and output, and
//! forwarded headers are trusted only from configured proxies.

mod common;

use common::sink::Sink;
use common::{TestApp, TestDb};
use serde_json::{Value, json};

fn field_update(id: &str, conv: &str, created_at: &str, value: Value) -> Vec<u8> {
    common::field_body(id, conv, created_at, "lead_status", value)
}

/// E2 sets `qualified`; E1 (`contacted`, older `created_at`, no
/// `previous_value`) arrives after it: the projection keeps `qualified`, and
/// a `qualified → contacted` workflow must not run (its decision says why).
async fn an_older_field_update_arriving_late_fires_no_transition(db: &TestDb) {
    let sink = Sink::start().await;
    let wf = format!(
        "on:\n  event: conversation.custom_fields.updated\n  field: lead_status\n  from: qualified\n  to: contacted\nsteps:\n  - id: back\n    http: {{ url: \"{}\" }}\n",
        sink.url("/ok/back")
    );
    let (app, _dir) = TestApp::with_workflows(db, &[("back.yaml", &wf)]).await;
    let e2 = field_update(
        "ev_late2",
        "conv_late",
        "2025-07-14T15:00:02Z",
        "qualified".into(),
    );
    let e1 = field_update(
        "ev_late1",
        "conv_late",
        "2025-07-14T15:00:01Z",
        "contacted".into(),
    );
    assert_eq!(app.deliver(&e2).await.status(), 200);
    assert_eq!(app.deliver(&e1).await.status(), 200);
    let (status, conv) = app.admin_get("/api/v1/conversations/conv_late").await;
    assert_eq!(status, 200);
    assert_eq!(conv["custom_fields"]["lead_status"], "qualified");
    let stored = app.store.get_event("ev_late1").await.unwrap().unwrap();
    let decisions = app.store.decisions(stored.event.seq).await.unwrap();
    assert_eq!(decisions.len(), 1);
    assert!(!decisions[0].matched, "{decisions:?}");
    let reason = decisions[0].reason.as_deref().unwrap();
    assert!(
        reason.contains("older than its current value \"qualified\""),
        "{reason}"
    );
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    let runs = app
        .store
        .list_runs(&switchboard::store::runs::RunQuery {
            limit: 10,
            ..Default::default()
        })
        .await
        .unwrap();
    assert!(runs.is_empty(), "no run: {runs:?}");
    assert!(sink.received().is_empty());
}

/// A webhook with NUL (`\u0000`) in a custom-field value, in `created_at`
/// and in an ended status is acknowledged (not 503 on every retry): the raw
/// body reads back byte-exact, the payload as sent, the projection with NUL
/// replaced by U+FFFD, and the run the update starts is created.
async fn nul_in_a_webhook_is_stored_safely(db: &TestDb) {
    let sink = Sink::start().await;
    let wf = format!(
        "on:\n  event: conversation.custom_fields.updated\n  field: lead_status\nsteps:\n  - id: post\n    http:\n      url: \"{}\"\n      json: {{ value: \"{{{{ event.payload.value }}}}\" }}\n",
        sink.url("/ok/nul")
    );
    let (app, _dir) = TestApp::with_workflows(db, &[("nul.yaml", &wf)]).await;
    let update = br#"{"id":"ev_nul1","conversation_id":"conv_nul","agent_id":"ca_t@v1","created_at":"2025-07-14T15:00:01Z\u0000","payload":{"type":"conversation.custom_fields.updated","key":"lead_status","value":"a\u0000b","extra":{"k\u0000":"\u0000"}}}"#;
    let ended = br#"{"id":"ev_nul2","conversation_id":"conv_nul","payload":{"type":"conversation.ended","status":"completed\u0000","failure_reason":"x\u0000"}}"#;
    for body in [&update[..], &ended[..]] {
        let resp = app.deliver(body).await;
        assert_eq!(
            resp.status().as_u16(),
            200,
            "{}",
            resp.text().await.unwrap()
        );
    }
    for (id, body) in [("ev_nul1", &update[..]), ("ev_nul2", &ended[..])] {
        let (status, ev) = app.admin_get(&format!("/api/v1/events/{id}")).await;
        assert_eq!(status, 200, "{ev}");
        assert_eq!(ev["raw_body"].as_str().unwrap().as_bytes(), body);
        let stored = app.store.get_event(id).await.unwrap().unwrap();
        assert_eq!(stored.raw_body, body, "byte-exact");
    }
    let (_, ev) = app.admin_get("/api/v1/events/ev_nul1").await;
    assert_eq!(
        ev["body"]["payload"]["value"], "a\u{0}b",
        "the payload as sent"
    );
    let (status, conv) = app.admin_get("/api/v1/conversations/conv_nul").await;
    assert_eq!(status, 200, "{conv}");
    assert_eq!(conv["custom_fields"]["lead_status"], "a\u{FFFD}b");
    assert_eq!(conv["status"], "completed\u{FFFD}");
    let (status, list) = app.admin_get("/api/v1/conversations").await;
    assert_eq!(status, 200, "{list}");
    let runs = app.wait_runs_final(1, 10).await;
    assert_eq!(runs.len(), 1);
    let got = sink.wait_for("/ok/nul", 1, 10).await;
    assert_eq!(got[0].json()["value"], "a\u{FFFD}b");
    // A rebuild folds the same projection again.
    app.store.rebuild_projections().await.unwrap();
    let state = app.store.conversation("conv_nul").await.unwrap().unwrap();
    assert_eq!(state.field("lead_status"), Some(&json!("a\u{FFFD}b")));
}

/// Holds the store's write lock from another connection (SQLite: a write
/// transaction; PostgreSQL: the append's advisory lock) until dropped.
enum WriteLock {
    Sqlite(sqlx::SqliteConnection),
    Postgres(sqlx::PgConnection),
}

impl WriteLock {
    async fn take(db: &TestDb) -> Self {
        use sqlx::Connection;
        match db {
            TestDb::Sqlite { .. } => {
                let mut c = sqlx::SqliteConnection::connect(db.url()).await.unwrap();
                sqlx::query("BEGIN IMMEDIATE")
                    .execute(&mut c)
                    .await
                    .unwrap();
                WriteLock::Sqlite(c)
            }
            TestDb::Postgres { .. } => {
                let mut c = sqlx::PgConnection::connect(db.url()).await.unwrap();
                sqlx::query("SELECT pg_advisory_lock(91634239012865)") // the append lock, "SWBD" 1
                    .execute(&mut c)
                    .await
                    .unwrap();
                WriteLock::Postgres(c)
            }
        }
    }

    async fn release(self) {
        use sqlx::Connection;
        match self {
            WriteLock::Sqlite(mut c) => {
                sqlx::query("ROLLBACK").execute(&mut c).await.unwrap();
                c.close().await.unwrap();
            }
            WriteLock::Postgres(c) => c.close().await.unwrap(),
        }
    }
}

const SETUP_WITH_DEADLINE: &str = r#"name: greet
on: { event: conversation.setup }
deadline: 400ms
respond:
  context: { $variables: { greeting: "hello {{ event.payload.direction }}" } }
fallback:
  context: { $variables: { greeting: "hello" } }
"#;

/// The deadline bounds the whole setup request, storing included: with the
/// store's write lock held, the fallback arrives by the deadline; the event
/// is still stored once the lock is released, and its stored answer is the
/// fallback that was sent, saying it was sent before the event's commit.
async fn a_slow_store_still_gets_the_setup_answer_by_the_deadline(db: &TestDb) {
    let (app, _dir) = TestApp::with_workflows(db, &[("greet.yaml", SETUP_WITH_DEADLINE)]).await;
    // Warm up (connections open, migrations done) with a first setup.
    let warm = br#"{"id":"ev_warm","conversation_id":"conv_warm","payload":{"type":"conversation.setup","direction":"inbound"}}"#;
    let resp = app.deliver(warm).await;
    assert_eq!(resp.status(), 200);
    assert_eq!(
        resp.json::<Value>().await.unwrap(),
        json!({"context": {"$variables": {"greeting": "hello inbound"}}})
    );
    let lock = WriteLock::take(db).await;
    let body = br#"{"id":"ev_slow","conversation_id":"conv_slow","payload":{"type":"conversation.setup","direction":"inbound"}}"#;
    let started = std::time::Instant::now();
    let resp = app.deliver(body).await;
    let took = started.elapsed();
    assert_eq!(resp.status(), 200);
    assert_eq!(
        resp.json::<Value>().await.unwrap(),
        json!({"context": {"$variables": {"greeting": "hello"}}}),
        "the fallback"
    );
    // Held 1.5 s: the old code answered only once the lock was released.
    assert!(
        took < std::time::Duration::from_millis(1200),
        "answered after {took:?}, deadline 400ms"
    );
    tokio::time::sleep(std::time::Duration::from_millis(1500).saturating_sub(took)).await;
    lock.release().await;
    // The write was not abandoned: the event is stored, and with it the answer that was sent.
    let mut stored = None;
    for _ in 0..100 {
        if let Some(ev) = app.store.get_event("ev_slow").await.unwrap()
            && let Some(a) = app.store.setup_answer(ev.event.seq).await.unwrap()
            && a.used_fallback
        {
            stored = Some(a);
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let stored = stored.expect("the event and the answer sent are stored");
    assert_eq!(
        stored.body,
        r#"{"context":{"$variables":{"greeting":"hello"}}}"#
    );
    let reason = stored.reason.unwrap();
    assert!(
        reason.contains("sent before the event's commit"),
        "{reason}"
    );
    // A retried delivery gets the bytes that were sent.
    let resp = app.deliver(body).await;
    assert_eq!(resp.headers()["x-switchboard-duplicate"], "true");
    assert_eq!(
        resp.text().await.unwrap(),
        r#"{"context":{"$variables":{"greeting":"hello"}}}"#
    );
}

/// Without `SWITCHBOARD_PUBLIC_URL`, `X-Forwarded-Proto/Host` choose the
/// URL the signature is checked on only when the peer is a trusted proxy.
async fn forwarded_headers_are_trusted_only_from_trusted_proxies(db: &TestDb) {
    let forged = "https://hooks.example.com/webhooks/operator";
    let deliver = |app: &TestApp, signed_for: String, id: &str| {
        let body = common::ended_body(id, "conv_fwd", "completed");
        let ts = chrono::Utc::now().timestamp().to_string();
        let idem = uuid::Uuid::new_v4().to_string();
        let sig = common::sign_headers(common::KEY, &signed_for, &idem, &ts, &body);
        app.client
            .post(app.webhook_url())
            .header("X-Forwarded-Proto", "https")
            .header("X-Forwarded-Host", "hooks.example.com")
            .header("X-Timestamp", ts)
            .header("X-Idempotency-Key", idem)
            .header("X-Signature", sig)
            .body(body)
            .send()
    };
    // No trusted proxy: the headers are ignored, the URL is the one the request reached.
    let app = TestApp::spawn(db).await;
    let resp = deliver(&app, forged.to_owned(), "ev_fwd1").await.unwrap();
    assert_eq!(
        resp.status(),
        401,
        "a forged X-Forwarded-Host is not believed"
    );
    let resp = deliver(&app, app.webhook_url(), "ev_fwd1").await.unwrap();
    assert_eq!(resp.status(), 200);
    drop(app);
    // The test client (127.0.0.1) as a trusted proxy: its headers rebuild the URL.
    let mut s = common::settings(db);
    s.trusted_proxies = vec!["127.0.0.0/8".parse().unwrap()];
    let app = TestApp::spawn_with(s).await;
    let resp = deliver(&app, forged.to_owned(), "ev_fwd2").await.unwrap();
    assert_eq!(resp.status(), 200);
    let stored = app.store.get_event("ev_fwd2").await.unwrap().unwrap();
    assert_eq!(stored.event.verification.signed_url, forged);
}

const RUNAWAY: &str = r#"name: runaway
on: { event: conversation.setup }
respond:
  context:
    $variables:
      n: "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}x"
fallback:
  context: { $variables: { n: "fallback" } }
"#;

const HUGE: &str = r#"name: huge
on: { event: conversation.setup }
when: event.payload.direction == "outbound"
respond:
  context:
    $variables:
      n: "{% for i in range(50) %}{{ 'x' * 1000000 }}{% endfor %}"
fallback:
  context: { $variables: { n: "too big" } }
"#;

/// A runaway template (a loop of 10^10 steps) in an answer rendered inside
/// the append transaction, and one that renders 50 MB: each fails its own
/// evaluation with a clear message (the fallback answers), the event and
/// others in the log are stored, and nothing hangs.
async fn a_runaway_template_fails_its_workflow_not_the_batch(db: &TestDb) {
    let (app, _dir) =
        TestApp::with_workflows(db, &[("a_huge.yaml", HUGE), ("b_runaway.yaml", RUNAWAY)]).await;
    let inbound = br#"{"id":"ev_run1","conversation_id":"conv_run","payload":{"type":"conversation.setup","direction":"inbound"}}"#;
    let outbound = br#"{"id":"ev_run2","conversation_id":"conv_run2","payload":{"type":"conversation.setup","direction":"outbound"}}"#;
    let ended = common::ended_body("ev_run3", "conv_run", "completed");
    let (a, b, c) = tokio::time::timeout(std::time::Duration::from_secs(20), async {
        tokio::join!(
            app.deliver(inbound),
            app.deliver(outbound),
            app.deliver(&ended)
        )
    })
    .await
    .expect("no delivery hangs on a runaway template");
    assert_eq!(a.status(), 200);
    assert_eq!(
        a.json::<Value>().await.unwrap(),
        json!({"context": {"$variables": {"n": "fallback"}}})
    );
    assert_eq!(b.status(), 200);
    assert_eq!(
        b.json::<Value>().await.unwrap(),
        json!({"context": {"$variables": {"n": "too big"}}})
    );
    assert_eq!(c.status(), 200);
    for (id, needle) in [("ev_run1", "ran too long"), ("ev_run2", "KiB of text")] {
        let ev = app.store.get_event(id).await.unwrap().unwrap();
        let answer = app.store.setup_answer(ev.event.seq).await.unwrap().unwrap();
        let reason = answer.reason.unwrap_or_default();
        assert!(
            answer.used_fallback && reason.contains(needle),
            "{id}: {reason}"
        );
    }
    assert_eq!(app.all_events().await.len(), 3);
}

/// A leader that is dropped mid-flight (its request cancelled, or a panic)
/// leaves no in-flight entry behind: the next delivery of the same event
/// leads (computes) instead of waiting on a computation nobody finishes.
async fn a_dropped_leader_leaves_no_inflight_entry(db: &TestDb) {
    use std::sync::Arc;
    use switchboard::engine::setup::{SetupResponder, Slot};
    let store = switchboard::store::connect(db.url()).await.unwrap();
    store.migrate().await.unwrap();
    let registry = Arc::new(switchboard::workflow::registry::Registry::default());
    let setup = Arc::new(SetupResponder::new(registry, store));
    let first = setup.join("ev_dropped");
    assert!(matches!(first, Slot::Leader(_)));
    assert!(
        matches!(setup.join("ev_dropped"), Slot::Follower(_)),
        "while it leads"
    );
    drop(first);
    assert!(
        matches!(setup.join("ev_dropped"), Slot::Leader(_)),
        "the entry left with its leader"
    );
}

on_both_backends!(
    an_older_field_update_arriving_late_fires_no_transition,
    nul_in_a_webhook_is_stored_safely,
    a_slow_store_still_gets_the_setup_answer_by_the_deadline,
    forwarded_headers_are_trusted_only_from_trusted_proxies,
    a_runaway_template_fails_its_workflow_not_the_batch,
    a_dropped_leader_leaves_no_inflight_entry,
);
