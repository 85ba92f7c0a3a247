//! Run saves that share an append's transaction (`EventStore::append_and_save`):
//! on SQLite, where one connection writes everything, the appender writes the
//! workers' saves in the transaction of the events it appends, so both cost
//! one commit; on PostgreSQL they are two transactions. On both: a save
//! whose lease was lost writes nothing and does not fail the append, and a
//! save the database refuses fails the whole transaction (nothing half-written).

mod common;

use std::time::Duration;

use common::{TestDb, workflow_dir};
use switchboard::store::runs::{Attempt, RunStatus, RunUpdate, Save};
use switchboard::store::{AppendOutcome, Backend, LocalLease, NewEvent};

/// A `conversation.ended` of its own conversation, keyed `key-<id>`.
fn event(id: &str) -> NewEvent {
    let body = common::ended_body(id, &format!("conv_{id}"), "completed");
    common::new_event(body, &format!("key-{id}"))
}

/// The save of a one-step run that succeeded at its first attempt.
fn success(run_id: &str, owner: &str, token: i64) -> Save {
    let now = chrono::Utc::now();
    Save {
        run_id: run_id.into(),
        owner: owner.into(),
        token,
        attempt: Some(Attempt {
            run_id: run_id.into(),
            number: 1,
            step_index: 0,
            step_id: "post".into(),
            attempt: 1,
            started_at: now,
            duration_ms: 3,
            request: sqlx::types::Json(serde_json::json!({"method": "POST"})),
            response_status: Some(200),
            response_headers: None,
            response_body: Some("ok".into()),
            outcome: "succeeded".into(),
            error_class: None,
            error_message: None,
            next_delay_ms: None,
        }),
        update: RunUpdate {
            status: RunStatus::Succeeded,
            step_index: 1,
            step_id: None,
            attempt: 1,
            attempts_total: 1,
            next_attempt_at: now,
            lease: None,
            step_results: serde_json::json!({"post": {"status": 200}}),
            last_error: None,
            finished_at: Some(now),
            wait_reason: None,
        },
    }
}

async fn saves_ride_in_the_append_transaction(db: &TestDb) {
    // The sink is never called: no worker runs here; the test plays the worker.
    let dir = workflow_dir(&[(
        "crm.yaml",
        "on:\n  event: conversation.ended\nsteps:\n  - id: post\n    http:\n      url: \"http://127.0.0.1:9/never\"\n      json: {}\n",
    )]);
    let (registry, store) = common::registry_and_store(db, dir.path()).await;
    let sqlite = store.backend() == Backend::Sqlite;
    assert_eq!(store.shares_commits(), sqlite);
    let lease = LocalLease {
        owner: "worker-a".into(),
        lease: Duration::from_secs(30),
        max: 8,
    };
    let (_, _, handed) = store
        .append_batch_leased(&[event("ev_a")], registry.as_ref(), Some(&lease))
        .await
        .unwrap();
    assert_eq!(handed.len(), 1);
    let run = &handed[0];

    // The run's save and the next delivery: one commit on SQLite.
    let before = switchboard::store::sqlite::commits();
    let ((outcomes, _, _), saved) = store
        .append_and_save(
            &[event("ev_b")],
            registry.as_ref(),
            None,
            &[success(&run.run_id, "worker-a", run.lease_token)],
            chrono::Utc::now(),
        )
        .await
        .unwrap();
    if sqlite {
        assert_eq!(
            switchboard::store::sqlite::commits() - before,
            1,
            "the save and the append share one commit"
        );
    }
    assert!(matches!(outcomes[0], AppendOutcome::Appended { .. }));
    assert_eq!(saved.saved, vec![true]);
    let done = store.get_run(&run.run_id).await.unwrap().unwrap();
    assert_eq!(done.status, RunStatus::Succeeded);
    assert_eq!(done.lease_owner, None);
    assert_eq!(store.attempts(&run.run_id).await.unwrap().len(), 1);
    assert!(store.get_event("ev_b").await.unwrap().is_some());

    // A save whose lease was lost (another token) writes nothing; the append goes on.
    let ((outcomes, _, _), saved) = store
        .append_and_save(
            &[event("ev_c")],
            registry.as_ref(),
            None,
            &[success(&run.run_id, "worker-b", run.lease_token + 7)],
            chrono::Utc::now(),
        )
        .await
        .unwrap();
    assert!(matches!(outcomes[0], AppendOutcome::Appended { .. }));
    assert_eq!(saved.saved, vec![false]);
    assert_eq!(store.attempts(&run.run_id).await.unwrap().len(), 1);

    // All or nothing on SQLite: a save the database refuses fails the
    // delivery's transaction too (the appender then writes them apart).
    if sqlite {
        let pool = sqlx::SqlitePool::connect(db.url()).await.unwrap();
        sqlx::query(
            "CREATE TRIGGER refuse_attempts BEFORE INSERT ON attempts \
             BEGIN SELECT RAISE(ABORT, 'attempt refused by the test'); END",
        )
        .execute(&pool)
        .await
        .unwrap();
        let claimed = store
            .claim_due("worker-c", chrono::Utc::now(), Duration::from_secs(30), 1)
            .await
            .unwrap();
        let b_run = claimed.first().expect("ev_b's run is due");
        let refused = store
            .append_and_save(
                &[event("ev_d")],
                registry.as_ref(),
                None,
                &[success(&b_run.run_id, "worker-c", b_run.lease_token)],
                chrono::Utc::now(),
            )
            .await;
        assert!(refused.is_err(), "the trigger refuses the attempt");
        assert!(
            store.get_event("ev_d").await.unwrap().is_none(),
            "nothing of the failed transaction is stored"
        );
        sqlx::query("DROP TRIGGER refuse_attempts")
            .execute(&pool)
            .await
            .unwrap();
        pool.close().await;
    }
}

on_both_backends!(saves_ride_in_the_append_transaction);
