//! The PostgreSQL pool skips the per-use ping (issue 12: it was a round trip
//! per transaction): a connection is pinged only after sitting idle, and one
//! found broken in use is closed when it goes back to the pool. This test
//! kills the pool's connections under it and checks that the store recovers
//! by itself: each dead connection fails at most the one operation that
//! found it, and then every operation succeeds again.

mod common;

use std::time::Duration;

use common::TestDb;

/// PostgreSQL ends every connection of the store (what a restart or an
/// administrator does); the store keeps working after a bounded number of
/// failed operations, with no dead connection left in its pool.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_connections_leave_the_pool_after_one_failure_each() {
    let Some(db) = TestDb::postgres().await else {
        return;
    };
    let store = switchboard::store::connect(db.url())
        .await
        .expect("connect");
    store.migrate().await.expect("migrate");
    // Open several connections at once, so the pool holds more than one.
    let warm: Vec<_> = (0..4).map(|_| store.stats(chrono::Utc::now())).collect();
    for r in futures::future::join_all(warm).await {
        r.expect("stats before the kill");
    }
    let TestDb::Postgres { name, .. } = &db else {
        unreachable!()
    };
    let admin = sqlx::PgPool::connect(&common::postgres_admin_url())
        .await
        .expect("admin connection");
    let killed: Vec<bool> = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
         WHERE datname = '{name}' AND pid <> pg_backend_pid()"
    )))
    .fetch_all(&admin)
    .await
    .expect("terminate the store's connections");
    assert!(!killed.is_empty(), "the store had connections to kill");
    // Used within the last second: not pinged before use, so a dead one fails once.
    let mut failures = 0;
    let mut ok_in_a_row = 0;
    for _ in 0..200 {
        match store.stats(chrono::Utc::now()).await {
            Ok(_) => ok_in_a_row += 1,
            Err(_) => {
                failures += 1;
                ok_in_a_row = 0;
            }
        }
        if ok_in_a_row >= 20 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert!(
        ok_in_a_row >= 20,
        "the store did not recover: {failures} failures"
    );
    // `stats` makes two queries, each on its own connection from the pool (at most 16).
    assert!(
        failures <= killed.len(),
        "{failures} failed operations for {} killed connections: a dead connection went back to the pool",
        killed.len()
    );
    admin.close().await;
}
