//! The webhook receiver end to end, on SQLite and PostgreSQL: every fixture
//! and vector accepted, every rejection refused with its status and nothing
//! stored, duplicates stored once (concurrently and across restarts), and
//! the admin read path.

mod common;

use common::{Delivery, EVENT_FIXTURES, KEY, TestApp, TestDb, ended_body, fixture, settings};
use serde_json::Value;
use switchboard::webhook::signature::{SigningKeys, Tolerance};

async fn stored_count(app: &TestApp) -> usize {
    app.all_events().await.len()
}

async fn signature_vectors_are_accepted_by_the_server(db: &TestDb) {
    let v: Value = serde_json::from_slice(&fixture("signature_vectors.json")).unwrap();
    for case in v["vectors"].as_array().unwrap() {
        if case["method"] != "POST" {
            continue;
        }
        // The vectors are signed long ago for a fixed URL: configure exactly that.
        let mut s = settings(db);
        s.signing_keys = SigningKeys::parse(v["signing_key"].as_str().unwrap()).unwrap();
        s.public_url = Some(case["url_signed"].as_str().unwrap().to_owned());
        s.tolerance = Tolerance {
            max_age_secs: i64::MAX,
            max_future_secs: 0,
        };
        let app = TestApp::spawn_with(s).await;
        let h = &case["headers"];
        let resp = app
            .client
            .post(app.webhook_url())
            .header("X-Timestamp", h["X-Timestamp"].as_str().unwrap())
            .header(
                "X-Idempotency-Key",
                h["X-Idempotency-Key"].as_str().unwrap(),
            )
            .header("X-Signature", h["X-Signature"].as_str().unwrap())
            .body(case["content"].as_str().unwrap().to_owned())
            .send()
            .await
            .unwrap();
        let expected = if case["expect_valid"].as_bool().unwrap() {
            200
        } else {
            401
        };
        assert_eq!(resp.status().as_u16(), expected, "{}", case["name"]);
    }
    // The non-ASCII body is stored byte for byte.
    let app = TestApp::spawn(db).await;
    let (status, ev) = app.admin_get("/api/v1/events/ev_iRr4yHdgSlO").await;
    assert_eq!(status, 200);
    assert!(ev["raw_body"].as_str().unwrap().contains("Zoë Ramírez"));
    assert_eq!(ev["body"]["payload"]["value"], "Zoë Ramírez");
}

async fn every_fixture_is_accepted_and_stored_byte_for_byte(db: &TestDb) {
    let app = TestApp::spawn(db).await;
    for name in EVENT_FIXTURES {
        let resp = app.deliver(&fixture(name)).await;
        assert_eq!(resp.status().as_u16(), 200, "{name}");
        let body: Value = resp.json().await.unwrap();
        if name.starts_with("conversation_setup") {
            assert_eq!(body, serde_json::json!({"context": {}}), "{name}");
        } else {
            assert!(body["sequence"].as_i64().unwrap() >= 1, "{name}: {body}");
        }
    }
    let events = app.all_events().await;
    assert_eq!(events.len(), EVENT_FIXTURES.len());
    let seqs: Vec<i64> = events
        .iter()
        .map(|e| e["sequence"].as_i64().unwrap())
        .collect();
    assert_eq!(
        seqs,
        (1..=EVENT_FIXTURES.len() as i64).collect::<Vec<_>>(),
        "gap-free sequence"
    );
    for name in EVENT_FIXTURES {
        let raw = fixture(name);
        let id = serde_json::from_slice::<Value>(&raw).unwrap()["id"]
            .as_str()
            .unwrap()
            .to_owned();
        let (status, ev) = app.admin_get(&format!("/api/v1/events/{id}")).await;
        assert_eq!(status, 200, "{name}");
        assert_eq!(
            ev["raw_body"].as_str().unwrap().as_bytes(),
            raw.as_slice(),
            "{name}"
        );
        assert_eq!(ev["verification"]["signed_url"], app.webhook_url());
    }
    // The conversation stream numbers the events of conv_Qao75vrxIqo 1..4 in order.
    let (_, page) = app
        .admin_get("/api/v1/events?conversation_id=conv_Qao75vrxIqo&order=oldest_first")
        .await;
    let versions: Vec<i64> = page["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["stream_version"].as_i64().unwrap())
        .collect();
    assert_eq!(versions, vec![1, 2, 3, 4]);
}

async fn rejections_have_their_status_and_store_nothing(db: &TestDb) {
    let mut s = settings(db);
    s.max_body_bytes = 4096;
    let app = TestApp::spawn_with(s).await;
    let body = fixture("conversation_ended_completed.json");
    let now = chrono::Utc::now().timestamp();
    let cases: Vec<(&str, Vec<u8>, Delivery, u16, &str)> = vec![
        (
            "wrong key",
            body.clone(),
            Delivery {
                key: Some("other-key".into()),
                ..Default::default()
            },
            401,
            "bad_signature",
        ),
        (
            "tampered body",
            body.clone(),
            Delivery {
                signature: Some(common::sign_headers(
                    KEY,
                    &app.webhook_url(),
                    "k-tamper",
                    &now.to_string(),
                    &ended_body("ev_x", "conv_x", "failed"),
                )),
                idempotency_key: Some("k-tamper".into()),
                timestamp: Some(now.to_string()),
                ..Default::default()
            },
            401,
            "bad_signature",
        ),
        (
            "stale timestamp",
            body.clone(),
            Delivery {
                timestamp: Some((now - 31).to_string()),
                ..Default::default()
            },
            401,
            "stale_timestamp",
        ),
        (
            "future timestamp",
            body.clone(),
            Delivery {
                timestamp: Some((now + 31).to_string()),
                ..Default::default()
            },
            401,
            "future_timestamp",
        ),
        (
            "non-numeric timestamp",
            body.clone(),
            Delivery {
                timestamp: Some("soon".into()),
                ..Default::default()
            },
            401,
            "malformed_timestamp",
        ),
        (
            "no X-Timestamp",
            body.clone(),
            Delivery {
                omit: vec!["X-Timestamp"],
                ..Default::default()
            },
            401,
            "missing_header",
        ),
        (
            "no X-Idempotency-Key",
            body.clone(),
            Delivery {
                omit: vec!["X-Idempotency-Key"],
                ..Default::default()
            },
            401,
            "missing_header",
        ),
        (
            "no X-Signature",
            body.clone(),
            Delivery {
                omit: vec!["X-Signature"],
                ..Default::default()
            },
            401,
            "missing_header",
        ),
        (
            "URL mismatch",
            body.clone(),
            Delivery {
                url: Some(format!("{}/", app.webhook_url())),
                ..Default::default()
            },
            401,
            "bad_signature",
        ),
        (
            "malformed JSON",
            b"{\"id\": ".to_vec(),
            Delivery::default(),
            400,
            "invalid_json",
        ),
        (
            "not an envelope",
            br#"{"hello":"world"}"#.to_vec(),
            Delivery::default(),
            400,
            "not_an_envelope",
        ),
        (
            "oversized body",
            vec![b' '; 4097],
            Delivery::default(),
            413,
            "payload_too_large",
        ),
    ];
    for (what, body, delivery, status, code) in cases {
        let resp = app.deliver_with(&body, delivery).await;
        assert_eq!(resp.status().as_u16(), status, "{what}");
        let err: Value = resp.json().await.unwrap();
        assert_eq!(err["error"]["code"], code, "{what}: {err}");
        assert!(
            !err["error"]["message"].as_str().unwrap().is_empty(),
            "{what}"
        );
    }
    assert_eq!(stored_count(&app).await, 0, "nothing stored");
    // A body exactly at the limit is read (then refused for what it is, not its size).
    let resp = app.deliver(&vec![b' '; 4096]).await;
    assert_eq!(resp.status().as_u16(), 400);
}

async fn retries_and_duplicate_ids_are_stored_once(db: &TestDb) {
    let app = TestApp::spawn(db).await;
    let body = fixture("conversation_ended_completed.json");
    let first = app
        .deliver_with(
            &body,
            Delivery {
                idempotency_key: Some("delivery-1".into()),
                ..Default::default()
            },
        )
        .await;
    assert_eq!(first.headers()["x-switchboard-duplicate"], "false");
    let first_body = first.bytes().await.unwrap();
    // Operator's retry: same key, fresh timestamp and signature.
    let retry = app
        .deliver_with(
            &body,
            Delivery {
                idempotency_key: Some("delivery-1".into()),
                ..Default::default()
            },
        )
        .await;
    assert_eq!(retry.status().as_u16(), 200);
    assert_eq!(retry.headers()["x-switchboard-duplicate"], "true");
    assert_eq!(retry.bytes().await.unwrap(), first_body);
    // The same event under another key.
    let again = app.deliver(&body).await;
    assert_eq!(again.status().as_u16(), 200);
    assert_eq!(again.bytes().await.unwrap(), first_body);
    // An unknown event type is acknowledged and stored.
    let unknown = br#"{"id":"ev_future1","conversation_id":"conv_Qao75vrxIqo","payload":{"type":"conversation.transcribed","x":[1]}}"#;
    assert_eq!(app.deliver(unknown).await.status().as_u16(), 200);
    let events = app.all_events().await;
    assert_eq!(events.len(), 2);
    assert_eq!(events[1]["type"], "conversation.transcribed");
}

async fn concurrent_copies_of_one_delivery_are_stored_once(db: &TestDb) {
    let app = TestApp::spawn(db).await;
    let body = ended_body("ev_concurrent", "conv_c", "completed");
    let sends = (0..8).map(|_| {
        app.deliver_with(
            &body,
            Delivery {
                idempotency_key: Some("same-key".into()),
                ..Default::default()
            },
        )
    });
    let responses = futures::future::join_all(sends).await;
    let mut bodies = Vec::new();
    let mut fresh = 0;
    for r in responses {
        assert_eq!(r.status().as_u16(), 200);
        if r.headers()["x-switchboard-duplicate"] == "false" {
            fresh += 1;
        }
        bodies.push(r.bytes().await.unwrap());
    }
    assert_eq!(fresh, 1, "exactly one copy is stored");
    assert!(
        bodies.windows(2).all(|w| w[0] == w[1]),
        "every copy gets the same answer"
    );
    // Eight copies of one event under eight keys, concurrently.
    let body = ended_body("ev_concurrent2", "conv_c", "completed");
    let responses = futures::future::join_all((0..8).map(|_| app.deliver(&body))).await;
    assert!(responses.iter().all(|r| r.status().as_u16() == 200));
    assert_eq!(stored_count(&app).await, 2);
}

async fn a_retry_after_a_restart_is_still_a_duplicate(db: &TestDb) {
    let body = ended_body("ev_restart", "conv_r", "busy");
    let first = {
        let app = TestApp::spawn(db).await;
        let r = app
            .deliver_with(
                &body,
                Delivery {
                    idempotency_key: Some("k-restart".into()),
                    ..Default::default()
                },
            )
            .await;
        assert_eq!(r.status().as_u16(), 200);
        r.bytes().await.unwrap()
    };
    let app = TestApp::spawn(db).await;
    let r = app
        .deliver_with(
            &body,
            Delivery {
                idempotency_key: Some("k-restart".into()),
                ..Default::default()
            },
        )
        .await;
    assert_eq!(r.headers()["x-switchboard-duplicate"], "true");
    assert_eq!(r.bytes().await.unwrap(), first);
    assert_eq!(stored_count(&app).await, 1);
}

async fn the_admin_read_path_filters_and_paginates(db: &TestDb) {
    let app = TestApp::spawn(db).await;
    for i in 1..=5 {
        let conv = if i % 2 == 0 { "conv_even" } else { "conv_odd" };
        assert_eq!(
            app.deliver(&ended_body(&format!("ev_p{i}"), conv, "completed"))
                .await
                .status(),
            200
        );
    }
    assert_eq!(
        app.deliver(&fixture("conversation_setup_inbound_phone.json"))
            .await
            .status(),
        200
    );
    let seqs = |page: &Value| -> Vec<i64> {
        page["data"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["sequence"].as_i64().unwrap())
            .collect()
    };
    // Newest first, two at a time.
    let (status, p1) = app.admin_get("/api/v1/events?limit=2").await;
    assert_eq!(status, 200);
    assert_eq!(seqs(&p1), vec![6, 5]);
    let c = p1["next_cursor"].as_str().unwrap();
    let (_, p2) = app
        .admin_get(&format!("/api/v1/events?limit=2&cursor={c}"))
        .await;
    assert_eq!(seqs(&p2), vec![4, 3]);
    let c = p2["next_cursor"].as_str().unwrap();
    let (_, p3) = app
        .admin_get(&format!("/api/v1/events?limit=2&cursor={c}"))
        .await;
    assert_eq!(seqs(&p3), vec![2, 1]);
    let c = p3["next_cursor"].as_str().unwrap();
    let (_, p4) = app
        .admin_get(&format!("/api/v1/events?limit=2&cursor={c}"))
        .await;
    assert_eq!(seqs(&p4), Vec::<i64>::new());
    assert!(p4["next_cursor"].is_null());
    // Oldest first, and filters.
    let (_, p) = app
        .admin_get("/api/v1/events?order=oldest_first&limit=3")
        .await;
    assert_eq!(seqs(&p), vec![1, 2, 3]);
    let (_, p) = app
        .admin_get("/api/v1/events?conversation_id=conv_even")
        .await;
    assert_eq!(seqs(&p), vec![4, 2]);
    let (_, p) = app
        .admin_get("/api/v1/events?type=conversation.setup")
        .await;
    assert_eq!(seqs(&p), vec![6]);
    let (_, p) = app
        .admin_get("/api/v1/events?agent_id=ca_test@v1&order=oldest_first")
        .await;
    assert_eq!(seqs(&p), vec![1, 2, 3, 4, 5]);
    let after = (chrono::Utc::now() + chrono::TimeDelta::hours(1))
        .to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
    let (_, p) = app
        .admin_get(&format!("/api/v1/events?received_after={after}"))
        .await;
    assert_eq!(seqs(&p), Vec::<i64>::new());
    let (_, p) = app
        .admin_get(&format!("/api/v1/events?received_before={after}&limit=1"))
        .await;
    assert_eq!(seqs(&p), vec![6]);
    // Errors: bad cursor, bad limit, unknown id, missing and wrong token.
    let (status, err) = app.admin_get("/api/v1/events?cursor=abc").await;
    assert_eq!(status, 400);
    assert!(err["error"]["message"].as_str().unwrap().contains("cursor"));
    let (status, err) = app.admin_get("/api/v1/events?limit=0").await;
    assert_eq!(
        (status, err["error"]["code"].as_str()),
        (400, Some("bad_request"))
    );
    let (status, err) = app.admin_get("/api/v1/events/ev_nope").await;
    assert_eq!(
        (status, err["error"]["code"].as_str()),
        (404, Some("not_found"))
    );
    for path in ["/api/v1/events", "/api/v1/events/ev_p1"] {
        let r = app.client.get(app.url(path)).send().await.unwrap();
        assert_eq!(r.status().as_u16(), 401, "{path} without token");
        let r = app
            .client
            .get(app.url(path))
            .bearer_auth("wrong")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status().as_u16(), 401, "{path} with a wrong token");
        let err: Value = r.json().await.unwrap();
        assert_eq!(err["error"]["code"], "unauthorized");
    }
    // Health needs no token.
    for path in ["/healthz", "/readyz"] {
        let r = app.client.get(app.url(path)).send().await.unwrap();
        assert_eq!(r.status().as_u16(), 200, "{path}");
    }
}

on_both_backends!(
    signature_vectors_are_accepted_by_the_server,
    every_fixture_is_accepted_and_stored_byte_for_byte,
    rejections_have_their_status_and_store_nothing,
    retries_and_duplicate_ids_are_stored_once,
    concurrent_copies_of_one_delivery_are_stored_once,
    a_retry_after_a_restart_is_still_a_duplicate,
    the_admin_read_path_filters_and_paginates,
);
