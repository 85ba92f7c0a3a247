//! conversation.setup answered from setup workflows, on SQLite and
//! PostgreSQL, with a local sink as the CRM.

mod common;

use std::time::{Duration, Instant};

use common::sink::Sink;
use common::{Delivery, TestApp, TestDb, fixture};
use serde_json::{Value, json};

const INBOUND: &str = "conversation_setup_inbound_phone.json";
const OUTBOUND: &str = "conversation_setup_outbound_phone.json";

fn lookup_workflow(sink: &Sink, path: &str, timeout: &str, deadline: &str) -> String {
    format!(
        r#"name: inbound-context
on:
  event: conversation.setup
when: event.payload.direction == "inbound"
steps:
  - id: lookup
    http:
      method: GET
      url: "{}"
      query: {{ phone: "{{{{ event.payload.channel.caller_no }}}}" }}
    timeout: {timeout}
    retry: {{ max_attempts: 2, backoff: fixed, initial_delay: 50ms }}
deadline: {deadline}
respond:
  context:
    $customer: {{ name: "{{{{ steps.lookup.json.name }}}}", phone_no: "{{{{ event.payload.channel.caller_no }}}}" }}
    $variables: {{ vip: "{{{{ steps.lookup.json.vip }}}}", greeting: "Hola {{{{ steps.lookup.json.name }}}}" }}
  override_config:
    language: {{ default_language: Spanish }}
fallback:
  context: {{ $variables: {{ plan: unknown }} }}
"#,
        sink.url(path)
    )
}

const OUTBOUND_STATIC: &str = r#"name: outbound-static
on: { event: conversation.setup }
when: event.payload.direction == "outbound"
respond:
  context:
    $variables: { campaign: "renewals", callee: "{{ event.payload.channel.callee_no }}" }
"#;

async fn answer(app: &TestApp, body: &[u8], d: Delivery) -> (Value, Duration) {
    let start = Instant::now();
    let resp = app.deliver_with(body, d).await;
    assert_eq!(resp.status(), 200);
    let text = resp.text().await.unwrap();
    (serde_json::from_str(&text).unwrap(), start.elapsed())
}

async fn an_inbound_answer_is_built_from_a_lookup_and_an_outbound_one_is_static(db: &TestDb) {
    let sink = Sink::start().await;
    let (app, _dir) = TestApp::with_workflows(
        db,
        &[
            (
                "a-inbound.yaml",
                &lookup_workflow(&sink, "/ok/contacts", "2s", "3s"),
            ),
            ("b-outbound.yaml", OUTBOUND_STATIC),
        ],
    )
    .await;
    let (inbound, _) = answer(&app, &fixture(INBOUND), Delivery::default()).await;
    assert_eq!(
        inbound,
        json!({
            "context": {
                "$customer": {"name": "Zoë", "phone_no": "+14155550123"},
                "$variables": {"vip": true, "greeting": "Hola Zoë"}
            },
            "override_config": {"language": {"default_language": "Spanish"}}
        })
    );
    let lookups = sink.received_on("/ok/contacts");
    assert_eq!(lookups.len(), 1);
    assert_eq!(lookups[0].method, "GET");
    assert_eq!(lookups[0].query.as_deref(), Some("phone=%2B14155550123"));
    let (outbound, _) = answer(&app, &fixture(OUTBOUND), Delivery::default()).await;
    assert_eq!(
        outbound,
        json!({"context": {"$variables": {"campaign": "renewals", "callee": "+13105550162"}}})
    );
    // The event shows which workflow answered and how.
    let (_, ev) = app.admin_get("/api/v1/events/ev_fDsVNA3cQ5X").await;
    assert_eq!(ev["setup_answer"]["workflow"], "inbound-context");
    assert_eq!(ev["setup_answer"]["used_fallback"], false);
    assert_eq!(ev["setup_answer"]["body"], inbound);
    assert_eq!(ev["setup_answer"]["lookups"][0]["response_status"], 200);
}

async fn a_slow_or_failing_lookup_gives_the_fallback_in_time(db: &TestDb) {
    let sink = Sink::start().await;
    let (app, _dir) = TestApp::with_workflows(
        db,
        &[(
            "slow.yaml",
            &lookup_workflow(&sink, "/slow/3000/contacts", "300ms", "1s"),
        )],
    )
    .await;
    let (body, took) = answer(&app, &fixture(INBOUND), Delivery::default()).await;
    assert_eq!(
        body,
        json!({"context": {"$variables": {"plan": "unknown"}}})
    );
    assert!(
        took < Duration::from_millis(1300),
        "answered after {took:?} with a 1s deadline"
    );
    let (_, ev) = app.admin_get("/api/v1/events/ev_fDsVNA3cQ5X").await;
    assert_eq!(ev["setup_answer"]["used_fallback"], true);
    assert_eq!(ev["setup_answer"]["lookups"][0]["error_class"], "timeout");

    let sink = Sink::start().await;
    let db2 = match db {
        TestDb::Sqlite { .. } => TestDb::sqlite().await,
        TestDb::Postgres { .. } => TestDb::postgres().await.unwrap(),
    };
    let (app, _dir) = TestApp::with_workflows(
        &db2,
        &[(
            "err.yaml",
            &lookup_workflow(&sink, "/status/500/contacts", "1s", "2s"),
        )],
    )
    .await;
    let (body, _) = answer(&app, &fixture(INBOUND), Delivery::default()).await;
    assert_eq!(
        body,
        json!({"context": {"$variables": {"plan": "unknown"}}})
    );
    assert_eq!(
        sink.received_on("/status/500").len(),
        2,
        "retried within the deadline, then the fallback"
    );
    let (_, ev) = app.admin_get("/api/v1/events/ev_fDsVNA3cQ5X").await;
    assert!(
        ev["setup_answer"]["reason"]
            .as_str()
            .unwrap()
            .contains("lookup `lookup` failed: HTTP 500")
    );
}

async fn a_failed_lookup_whose_retry_cannot_beat_the_deadline_falls_back_at_once(db: &TestDb) {
    let sink = Sink::start().await;
    let wf = lookup_workflow(&sink, "/status/503/contacts", "1s", "2s")
        .replace("initial_delay: 50ms", "initial_delay: 5s");
    let (app, _dir) = TestApp::with_workflows(db, &[("a.yaml", &wf)]).await;
    let (body, took) = answer(&app, &fixture(INBOUND), Delivery::default()).await;
    assert_eq!(
        body,
        json!({"context": {"$variables": {"plan": "unknown"}}})
    );
    assert!(
        took < Duration::from_millis(500),
        "no waiting for a retry that ends after the deadline: {took:?}"
    );
    assert_eq!(sink.received_on("/status/503").len(), 1);
}

async fn no_matching_workflow_gives_an_empty_context(db: &TestDb) {
    let (app, _dir) = TestApp::with_workflows(db, &[("b-outbound.yaml", OUTBOUND_STATIC)]).await;
    let resp = app.deliver(&fixture(INBOUND)).await;
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.text().await.unwrap(), r#"{"context":{}}"#);
}

async fn a_retried_delivery_gets_the_same_answer_without_new_lookups(db: &TestDb) {
    let sink = Sink::start().await;
    let (app, _dir) = TestApp::with_workflows(
        db,
        &[(
            "a.yaml",
            &lookup_workflow(&sink, "/slow/300/contacts", "2s", "3s"),
        )],
    )
    .await;
    // Two copies at once (the retry arrives while the first is computing), then a later retry.
    let d = Delivery {
        idempotency_key: Some("setup-key".into()),
        ..Default::default()
    };
    let body = fixture(INBOUND);
    let (a, b) = tokio::join!(
        app.deliver_with(&body, d.clone()),
        app.deliver_with(&body, d.clone())
    );
    let (a, b) = (a.bytes().await.unwrap(), b.bytes().await.unwrap());
    let later = app.deliver_with(&body, d).await.bytes().await.unwrap();
    let other_key = app.deliver(&body).await.bytes().await.unwrap();
    assert_eq!(a, b);
    assert_eq!(a, later);
    assert_eq!(a, other_key);
    assert!(String::from_utf8_lossy(&a).contains("Zoë"));
    assert_eq!(
        sink.received_on("/slow/300/contacts").len(),
        1,
        "one lookup in all"
    );
}

async fn an_async_setup_workflow_does_not_delay_the_answer(db: &TestDb) {
    let sink = Sink::start().await;
    let asynchronous = format!(
        "name: log-setup\non: {{ event: conversation.setup }}\nsteps:\n  - id: log\n    http: {{ url: \"{}\" }}\n",
        sink.url("/slow/1500/log")
    );
    let (app, _dir) = TestApp::with_workflows(
        db,
        &[
            ("b-outbound.yaml", OUTBOUND_STATIC),
            ("c-log.yaml", &asynchronous),
        ],
    )
    .await;
    let (body, took) = answer(&app, &fixture(OUTBOUND), Delivery::default()).await;
    assert_eq!(body["context"]["$variables"]["campaign"], "renewals");
    assert!(
        took < Duration::from_millis(1000),
        "the answer did not wait for the async run: {took:?}"
    );
    let runs = app.wait_runs_final(1, 10).await;
    assert_eq!(runs[0].workflow, "log-setup");
    assert_eq!(sink.received_on("/slow/1500/log").len(), 1);
}

async fn a_cached_lookup_is_not_repeated_for_the_same_request(db: &TestDb) {
    let sink = Sink::start().await;
    let wf = lookup_workflow(&sink, "/ok/cached", "2s", "3s")
        .replace("    timeout: 2s\n", "    timeout: 2s\n    cache: 5m\n");
    assert!(wf.contains("cache: 5m"));
    let (app, _dir) = TestApp::with_workflows(db, &[("a.yaml", &wf)]).await;
    let first = fixture(INBOUND);
    let second = String::from_utf8(first.clone())
        .unwrap()
        .replace("ev_fDsVNA3cQ5X", "ev_second")
        .replace("conv_Qao75vrxIqo", "conv_second");
    let (a, _) = answer(&app, &first, Delivery::default()).await;
    let (b, _) = answer(&app, second.as_bytes(), Delivery::default()).await;
    assert_eq!(a, b, "same caller, same answer");
    assert_eq!(
        sink.received_on("/ok/cached").len(),
        1,
        "the second call was served from the cache"
    );
    let (_, ev) = app.admin_get("/api/v1/events/ev_second").await;
    assert_eq!(ev["setup_answer"]["lookups"][0]["cached"], true);
}

on_both_backends!(
    a_failed_lookup_whose_retry_cannot_beat_the_deadline_falls_back_at_once,
    a_cached_lookup_is_not_repeated_for_the_same_request,
    an_inbound_answer_is_built_from_a_lookup_and_an_outbound_one_is_static,
    a_slow_or_failing_lookup_gives_the_fallback_in_time,
    no_matching_workflow_gives_an_empty_context,
    a_retried_delivery_gets_the_same_answer_without_new_lookups,
    an_async_setup_workflow_does_not_delay_the_answer,
);
