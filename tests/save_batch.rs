//! A batch of run saves (the engine's group commit) writes exactly what the
//! saves one at a time would, on both backends. On SQLite the whole batch is
//! one query of many statements (one round trip to the connection's thread),
//! so this is where it could go wrong: each save's attempt must be written
//! only if its own fenced UPDATE matched, and a run held by order must be
//! released only behind a run that really ended.

mod common;

use chrono::{DateTime, Utc};
use common::TestDb;
use serde_json::json;
use switchboard::store::runs::{Attempt, RunStatus, RunUpdate, Save};

/// The rows every case starts from: three runs leased to `me` (`run_b`
/// with token 5) and two runs held by order behind `run_a` and `run_b`.
const RUNS: &[(&str, Option<&str>, i64, &str, i64)] = &[
    // run id, conversation, event seq, status, lease token
    ("run_a", Some("conv_a"), 1, "running", 1),
    ("run_b", Some("conv_b"), 2, "running", 5),
    ("held_a", Some("conv_a"), 3, "waiting", 0),
    ("held_b", Some("conv_b"), 4, "waiting", 0),
    ("run_c", None, 5, "running", 1),
];

const INSERT: &str = "INSERT INTO runs (run_id, workflow, event_seq, event_id, conversation_id, status, \
     wait_reason, next_attempt_at, context, step_results, created_at, updated_at, lease_owner, lease_until, \
     lease_token) VALUES ($1, 'wf', $2, $3, $4, $5, $6, $7, '{}', '{}', $7, $7, $8, $9, $10)";

const STATES: &str = "SELECT r.run_id, r.status, (SELECT COUNT(*) FROM attempts a WHERE a.run_id = r.run_id) \
     FROM runs r ORDER BY r.run_id";

/// Runs `$body` with `$pool` bound to a pool of `$db`'s database.
macro_rules! with_pool {
    ($db:expr, |$pool:ident| $body:expr) => {
        match $db {
            TestDb::Sqlite { url, .. } => {
                let $pool = sqlx::SqlitePool::connect(url).await.unwrap();
                $body
            }
            TestDb::Postgres { url, .. } => {
                let $pool = sqlx::PgPool::connect(url).await.unwrap();
                $body
            }
        }
    };
}

fn attempt(run_id: &str, outcome: &str, now: DateTime<Utc>) -> Attempt {
    Attempt {
        run_id: run_id.into(),
        number: 1,
        step_index: 0,
        step_id: "notify".into(),
        attempt: 1,
        started_at: now,
        duration_ms: 3,
        request: sqlx::types::Json(json!({"url": "http://127.0.0.1:9/notify"})),
        response_status: Some(if outcome == "succeeded" { 200 } else { 503 }),
        response_headers: None,
        response_body: None,
        outcome: outcome.into(),
        error_class: None,
        error_message: None,
        next_delay_ms: None,
    }
}

fn save(run_id: &str, token: i64, status: RunStatus, now: DateTime<Utc>) -> Save {
    let finished = matches!(status, RunStatus::Succeeded);
    let outcome = if finished { "succeeded" } else { "retry" };
    Save {
        run_id: run_id.into(),
        owner: "me".into(),
        token,
        attempt: Some(attempt(run_id, outcome, now)),
        update: RunUpdate {
            status,
            step_index: if finished { 1 } else { 0 },
            step_id: Some("notify".into()),
            attempt: 1,
            attempts_total: 1,
            next_attempt_at: now,
            lease: None,
            step_results: json!({}),
            last_error: None,
            finished_at: finished.then_some(now),
            wait_reason: None,
        },
    }
}

async fn a_batch_writes_each_attempt_only_where_its_lease_held(db: &TestDb) {
    let store = switchboard::store::connect(db.url()).await.unwrap();
    store.migrate().await.unwrap();
    let now = Utc::now();
    let until = now + chrono::TimeDelta::minutes(5);
    with_pool!(db, |pool| {
        for (run_id, conv, seq, status, token) in RUNS {
            let leased = *status == "running";
            sqlx::query(INSERT)
                .bind(*run_id)
                .bind(*seq)
                .bind(format!("ev_{seq}"))
                .bind(*conv)
                .bind(*status)
                .bind((!leased).then_some("order"))
                .bind(now)
                .bind(leased.then_some("me"))
                .bind(leased.then_some(until))
                .bind(*token)
                .execute(&pool)
                .await
                .unwrap();
        }
    });
    let saves = [
        save("run_a", 1, RunStatus::Succeeded, now),
        // Token 1, but the run's lease is at token 5: lost, nothing written.
        save("run_b", 1, RunStatus::Succeeded, now),
        save("run_c", 1, RunStatus::Retrying, now),
    ];
    let batch = store.save_progress_batch(&saves, now).await.unwrap();
    assert_eq!(batch.saved, [true, false, true], "run_b's lease was lost");
    assert_eq!(batch.released, 1, "only the run behind run_a is released");
    let states: Vec<(String, String, i64)> = with_pool!(db, |pool| sqlx::query_as(STATES)
        .fetch_all(&pool)
        .await
        .unwrap());
    let expected = [
        ("held_a", "scheduled", 0),
        ("held_b", "waiting", 0),
        ("run_a", "succeeded", 1),
        ("run_b", "running", 0),
        ("run_c", "retrying", 1),
    ];
    let expected: Vec<(String, String, i64)> = expected
        .iter()
        .map(|(r, s, n)| (r.to_string(), s.to_string(), *n))
        .collect();
    assert_eq!(states, expected);
}

#[tokio::test]
async fn sqlite_a_batch_writes_each_attempt_only_where_its_lease_held() {
    a_batch_writes_each_attempt_only_where_its_lease_held(&TestDb::sqlite().await).await;
}

#[tokio::test]
async fn postgres_a_batch_writes_each_attempt_only_where_its_lease_held() {
    let Some(db) = TestDb::postgres().await else {
        return;
    };
    a_batch_writes_each_attempt_only_where_its_lease_held(&db).await;
}
