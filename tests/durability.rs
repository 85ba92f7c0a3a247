//! Durability and the shape of the log, on SQLite and PostgreSQL: an
//! acknowledged event survives kill -9 of the real binary; the schema
//! refuses UPDATE and DELETE on events; the projection is the fold of the
//! log and can be rebuilt from it.

mod common;

use common::{Delivery, ServerProcess, TestApp, TestDb, client, deliver_to, ended_body};
use switchboard::store::{self, conversation_as_of};

async fn acknowledged_events_survive_kill_9(db: &TestDb) {
    let logs = tempfile::tempdir().unwrap();
    let mut server = ServerProcess::start(db, logs.path(), &[]).await;
    let http = client();
    // Deliver concurrently and kill the process the instant the last ack arrives.
    let sends = (0..40).map(|i| {
        let body = ended_body(
            &format!("ev_k{i}"),
            &format!("conv_k{}", i % 4),
            "completed",
        );
        let http = http.clone();
        let url = server.webhook_url();
        async move {
            let r = deliver_to(&http, &url, &body, Delivery::default()).await;
            (i, r.status().as_u16())
        }
    });
    let acked: Vec<usize> = futures::future::join_all(sends)
        .await
        .into_iter()
        .filter(|(_, s)| *s == 200)
        .map(|(i, _)| i)
        .collect();
    server.kill9();
    assert_eq!(
        acked.len(),
        40,
        "all deliveries acknowledged before the kill"
    );

    let server = ServerProcess::start(db, logs.path(), &[]).await;
    let events = common::all_events(&http, &server.base()).await;
    let mut ids: Vec<String> = events
        .iter()
        .map(|e| e["id"].as_str().unwrap().to_owned())
        .collect();
    ids.sort();
    let mut expected: Vec<String> = acked.iter().map(|i| format!("ev_k{i}")).collect();
    expected.sort();
    assert_eq!(ids, expected, "every acknowledged event is stored, once");
    let seqs: Vec<i64> = events
        .iter()
        .map(|e| e["sequence"].as_i64().unwrap())
        .collect();
    assert_eq!(seqs, (1..=40).collect::<Vec<_>>());
}

async fn the_schema_refuses_update_and_delete_of_events(db: &TestDb) {
    let app = TestApp::spawn(db).await;
    assert_eq!(
        app.deliver(&ended_body("ev_ro", "conv_ro", "completed"))
            .await
            .status(),
        200
    );
    let attempts = ["UPDATE events SET event_type = 'x'", "DELETE FROM events"];
    for sql in attempts {
        let err = match db {
            TestDb::Sqlite { url, .. } => {
                let pool = sqlx::SqlitePool::connect(url).await.unwrap();
                sqlx::query(sql).execute(&pool).await.unwrap_err()
            }
            TestDb::Postgres { url, .. } => {
                let pool = sqlx::PgPool::connect(url).await.unwrap();
                sqlx::query(sql).execute(&pool).await.unwrap_err()
            }
        };
        assert!(err.to_string().contains("append-only"), "{sql}: {err}");
    }
    if let TestDb::Postgres { url, .. } = db {
        let pool = sqlx::PgPool::connect(url).await.unwrap();
        let err = sqlx::query("TRUNCATE events")
            .execute(&pool)
            .await
            .unwrap_err();
        assert!(err.to_string().contains("append-only"), "{err}");
    }
    assert_eq!(app.all_events().await.len(), 1);
}

async fn the_projection_is_the_fold_of_the_log(db: &TestDb) {
    let app = TestApp::spawn(db).await;
    let conv = "conv_Qao75vrxIqo";
    for name in [
        "conversation_setup_inbound_phone.json",
        "conversation_custom_fields_updated_first_set.json",
        "conversation_ended_completed.json",
        "conversation_custom_fields_updated_changed.json",
    ] {
        assert_eq!(
            app.deliver(&common::fixture(name)).await.status(),
            200,
            "{name}"
        );
    }
    let field = |key: &str, value: serde_json::Value, id: &str, at: &str| {
        serde_json::json!({"id": id, "created_at": at, "conversation_id": conv, "agent_id": "ca_HoaHZdn1ykv@v4",
            "payload": {"type": "conversation.custom_fields.updated", "key": key, "value": value}})
        .to_string()
        .into_bytes()
    };
    let r = app
        .deliver(&field(
            "caller_name",
            "Zoë R.".into(),
            "ev_cf3",
            "2025-07-14T15:10:00Z",
        ))
        .await;
    assert_eq!(r.status(), 200);

    let stored = app
        .store
        .conversation(conv)
        .await
        .unwrap()
        .expect("projection exists");
    assert_eq!(stored.status.as_deref(), Some("completed"));
    assert_eq!(stored.direction.as_deref(), Some("inbound"));
    assert_eq!(
        stored.field("caller_name"),
        Some(&serde_json::json!("Zoë R."))
    );
    assert_eq!(
        stored.field("appointment_status"),
        Some(&serde_json::json!("confirmed"))
    );
    assert_eq!(stored.event_count, 5);

    // The same state by folding the log, and as of an earlier point of it.
    let folded = conversation_as_of(app.store.as_ref(), conv, None)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(folded, stored);
    let early = conversation_as_of(app.store.as_ref(), conv, Some(2))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(early.status.as_deref(), Some("setup"));
    assert_eq!(
        early.field("caller_name"),
        Some(&serde_json::json!("Zoë Ramírez"))
    );
    assert_eq!(early.field("appointment_status"), None);

    // Rebuilding from scratch gives the same projection.
    let other = store::connect(db.url()).await.unwrap();
    assert_eq!(other.rebuild_projections().await.unwrap(), 5);
    assert_eq!(other.conversation(conv).await.unwrap().unwrap(), stored);
}

on_both_backends!(
    acknowledged_events_survive_kill_9,
    the_schema_refuses_update_and_delete_of_events,
    the_projection_is_the_fold_of_the_log,
);
