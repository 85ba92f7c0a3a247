//! List endpoints are index-backed: the query shapes the admin API uses are
//! planned with an index on both databases (on PostgreSQL with sequential
//! scans disabled, since a small table would otherwise be scanned anyway).

mod common;

use common::{TestApp, TestDb, ended_body};

/// The list queries, as the store builds them (SQLite reads `$n` too).
const QUERIES: &[(&str, &str, Option<&str>)] = &[
    (
        "events, newest first",
        "SELECT seq FROM events WHERE 1 = 1 AND seq < 1000 ORDER BY seq DESC LIMIT 50",
        None,
    ),
    (
        "events by type",
        "SELECT seq FROM events WHERE 1 = 1 AND event_type = $1 ORDER BY seq DESC LIMIT 50",
        Some("conversation.ended"),
    ),
    (
        "events by conversation",
        "SELECT seq FROM events WHERE 1 = 1 AND conversation_id = $1 ORDER BY seq DESC LIMIT 50",
        Some("conv_1"),
    ),
    (
        "events by agent",
        "SELECT seq FROM events WHERE 1 = 1 AND agent_id = $1 ORDER BY seq DESC LIMIT 50",
        Some("ca_test@v1"),
    ),
    (
        "event by id",
        "SELECT seq FROM events WHERE event_id = $1",
        Some("ev_1"),
    ),
    (
        "idempotency lookup",
        "SELECT seq FROM events WHERE idempotency_key = $1",
        Some("k"),
    ),
    (
        "runs, newest first",
        "SELECT run_id FROM runs WHERE 1 = 1 ORDER BY created_at DESC, run_id DESC LIMIT 50",
        None,
    ),
    (
        "runs by workflow",
        "SELECT run_id FROM runs WHERE 1 = 1 AND workflow = $1 ORDER BY created_at DESC, run_id DESC LIMIT 50",
        Some("crm"),
    ),
    (
        "runs by status",
        "SELECT run_id FROM runs WHERE 1 = 1 AND status = $1 ORDER BY created_at DESC, run_id DESC LIMIT 50",
        Some("failed"),
    ),
    (
        "runs by event",
        "SELECT run_id FROM runs WHERE 1 = 1 AND event_id = $1 ORDER BY created_at DESC, run_id DESC LIMIT 50",
        Some("ev_1"),
    ),
    (
        "runs by conversation",
        "SELECT run_id FROM runs WHERE 1 = 1 AND conversation_id = $1 ORDER BY created_at DESC, run_id DESC LIMIT 50",
        Some("conv_1"),
    ),
    (
        "due runs",
        "SELECT run_id FROM runs WHERE status IN ('scheduled', 'retrying') AND next_attempt_at <= '2030-01-01' ORDER BY next_attempt_at LIMIT 10",
        None,
    ),
    (
        "unfinished runs of a batch's conversations (order, at creation)",
        "SELECT DISTINCT workflow, conversation_id FROM runs WHERE replay_of IS NULL \
         AND status IN ('scheduled', 'running', 'retrying', 'waiting') AND conversation_id IN ($1)",
        Some("conv_1"),
    ),
    (
        "the run holding a conversation's line (order, at a run's end)",
        "SELECT h.run_id FROM runs h JOIN runs f ON h.workflow = f.workflow AND h.conversation_id = f.conversation_id \
         WHERE f.run_id = $1 AND h.replay_of IS NULL AND h.status IN ('scheduled', 'running', 'retrying', 'waiting') \
         ORDER BY h.event_seq LIMIT 1",
        Some("run_1"),
    ),
    (
        "conversations, recent first",
        "SELECT state FROM conversations WHERE 1 = 1 ORDER BY last_seq DESC LIMIT 50",
        None,
    ),
    (
        "conversations by status",
        "SELECT state FROM conversations WHERE 1 = 1 AND status = $1 ORDER BY last_seq DESC LIMIT 50",
        Some("completed"),
    ),
    (
        "conversations by agent",
        "SELECT state FROM conversations WHERE 1 = 1 AND agent_id = $1 ORDER BY last_seq DESC LIMIT 50",
        Some("ca_test@v1"),
    ),
];

async fn list_queries_use_indexes(db: &TestDb) {
    let app = TestApp::spawn(db).await;
    for i in 0..20 {
        app.deliver(&ended_body(
            &format!("ev_{i}"),
            &format!("conv_{}", i % 3),
            "completed",
        ))
        .await;
    }
    for (name, sql, arg) in QUERIES {
        let plan = match db {
            TestDb::Sqlite { url, .. } => {
                let pool = sqlx::SqlitePool::connect(url).await.unwrap();
                let q = format!("EXPLAIN QUERY PLAN {sql}");
                let mut query =
                    sqlx::query_as::<_, (i64, i64, i64, String)>(sqlx::AssertSqlSafe(q));
                if let Some(a) = arg {
                    query = query.bind(*a);
                }
                let rows = query.fetch_all(&pool).await.unwrap();
                rows.into_iter().map(|r| r.3).collect::<Vec<_>>().join("\n")
            }
            TestDb::Postgres { url, .. } => {
                let pool = sqlx::postgres::PgPoolOptions::new()
                    .max_connections(1)
                    .after_connect(|conn, _| {
                        Box::pin(async move {
                            sqlx::query("SET enable_seqscan = off")
                                .execute(conn)
                                .await?;
                            Ok(())
                        })
                    })
                    .connect(url)
                    .await
                    .unwrap();
                let q = format!("EXPLAIN {sql}");
                let mut query = sqlx::query_scalar::<_, String>(sqlx::AssertSqlSafe(q));
                if let Some(a) = arg {
                    query = query.bind(*a);
                }
                query.fetch_all(&pool).await.unwrap().join("\n")
            }
        };
        let indexed = match db {
            TestDb::Sqlite { .. } => {
                plan.contains("USING INDEX")
                    || plan.contains("USING COVERING INDEX")
                    || plan.contains("USING INTEGER PRIMARY KEY")
            }
            TestDb::Postgres { .. } => {
                plan.contains("Index Scan")
                    || plan.contains("Index Only Scan")
                    || plan.contains("Bitmap Index Scan")
            }
        };
        assert!(indexed, "{name} is not index-backed:\n{plan}");
        if let TestDb::Sqlite { .. } = db {
            assert!(
                !plan
                    .lines()
                    .any(|l| l.starts_with("SCAN ") && !l.contains("INDEX")),
                "{name} scans a table:\n{plan}"
            );
        }
    }
}

/// The plan of `sql` (`EXPLAIN QUERY PLAN` lines on SQLite; `EXPLAIN` with
/// sequential scans disabled on PostgreSQL).
async fn plan_of(db: &TestDb, sql: &str) -> String {
    match db {
        TestDb::Sqlite { url, .. } => {
            let pool = sqlx::SqlitePool::connect(url).await.unwrap();
            let q = format!("EXPLAIN QUERY PLAN {sql}");
            let rows = sqlx::query_as::<_, (i64, i64, i64, String)>(sqlx::AssertSqlSafe(q))
                .fetch_all(&pool)
                .await
                .unwrap();
            rows.into_iter().map(|r| r.3).collect::<Vec<_>>().join("\n")
        }
        TestDb::Postgres { url, .. } => {
            let pool = sqlx::postgres::PgPoolOptions::new()
                .max_connections(1)
                .after_connect(|conn, _| {
                    Box::pin(async move {
                        sqlx::query("SET enable_seqscan = off")
                            .execute(conn)
                            .await?;
                        Ok(())
                    })
                })
                .connect(url)
                .await
                .unwrap();
            let q = format!("EXPLAIN {sql}");
            sqlx::query_scalar::<_, String>(sqlx::AssertSqlSafe(q))
                .fetch_all(&pool)
                .await
                .unwrap()
                .join("\n")
        }
    }
}

/// A server on `db` that took five `conversation.ended` events (so the
/// tables hold runs to plan over), and `db`'s backend.
async fn app_with_runs(db: &TestDb) -> (TestApp, switchboard::store::Backend) {
    use switchboard::store::Backend;
    let app = TestApp::spawn(db).await;
    for i in 0..5 {
        app.deliver(&ended_body(
            &format!("ev_{i}"),
            &format!("conv_{i}"),
            "completed",
        ))
        .await;
    }
    let backend = match db {
        TestDb::Sqlite { .. } => Backend::Sqlite,
        TestDb::Postgres { .. } => Backend::Postgres,
    };
    (app, backend)
}

/// The statements a worker runs whenever it looks for work (store/due.rs)
/// read the partial indexes of due runs and lapsed leases, not every run of
/// a status: on SQLite without statistics the planner used to pick
/// `runs_by_status` and read every waiting run, twice a second.
async fn due_statements_use_the_partial_indexes(db: &TestDb) {
    use switchboard::store::Backend;
    use switchboard::store::due::{claim_sql, next_wakeup_sql};
    let (_app, backend) = app_with_runs(db).await;
    // The claim as it runs, with its parameters written in (EXPLAIN only: nothing is claimed).
    let lease = match backend {
        Backend::Sqlite => "'2030-01-01T00:00:05Z'",
        Backend::Postgres => "5",
    };
    let claim = claim_sql(backend)
        .replace("$1", "'explain'")
        .replace("$2", lease)
        .replace("$3", "'2030-01-01T00:00:00Z'")
        .replace("$4", "10");
    for (name, sql) in [
        ("claim", claim.as_str()),
        ("next wake-up", next_wakeup_sql(backend)),
    ] {
        let plan = plan_of(db, sql).await;
        match db {
            TestDb::Sqlite { .. } => {
                assert!(
                    plan.contains("runs_due") && plan.contains("runs_leased"),
                    "{name} does not read runs_due and runs_leased:\n{plan}"
                );
                assert!(
                    !plan.contains("runs_by_status"),
                    "{name} reads runs_by_status:\n{plan}"
                );
                assert!(
                    !plan.lines().any(|l| l.contains("SCAN runs")),
                    "{name} scans runs:\n{plan}"
                );
            }
            TestDb::Postgres { .. } => {
                assert!(
                    !plan.contains("Seq Scan on runs"),
                    "{name} scans runs:\n{plan}"
                );
                assert!(
                    plan.contains("runs_due") && plan.contains("runs_leased"),
                    "{name} does not read runs_due and runs_leased:\n{plan}"
                );
            }
        }
    }
}

/// The gauges `/metrics` reads (store/gauges.rs) count from indexes only
/// (no table read, and no `runs_by_status` walk over every waiting run): the
/// counts of waiting runs come from the partial index `runs_waiting`, the
/// oldest wait from `run_waits_started`. They used to read every waiting
/// run's row (a join with `run_waits`) on each scrape.
async fn gauge_statements_read_indexes_only(db: &TestDb) {
    use switchboard::store::gauges::{stats_sql, wait_stats_sql};
    let (_app, backend) = app_with_runs(db).await;
    if let TestDb::Postgres { url, .. } = db {
        // Parked runs, as many as make PostgreSQL's planner weigh its choices
        // (SQLite's statements name their indexes).
        let pool = sqlx::PgPool::connect(url).await.unwrap();
        for sql in [
            "INSERT INTO runs (run_id, workflow, event_seq, event_id, conversation_id, status, wait_reason, \
             next_attempt_at, context, step_results, created_at, updated_at) \
             SELECT 'run_parked_' || i, 'parked', i, 'ev_parked_' || i, 'conv_parked_' || i, 'waiting', \
             CASE WHEN i % 2 = 0 THEN 'timer' ELSE 'event' END, now() + interval '1 day', '{}', '{}', now(), now() \
             FROM generate_series(1, 5000) i",
            "INSERT INTO run_waits (run_id, step_id, kind, after_seq, matcher, started_at, until_at) \
             SELECT 'run_parked_' || i, 'settle', 'timer', i, 'null', now(), now() + interval '1 day' \
             FROM generate_series(1, 5000) i",
            "ANALYZE runs",
            "ANALYZE run_waits",
        ] {
            sqlx::query(sql).execute(&pool).await.unwrap();
        }
    }
    let stats = stats_sql(backend).replace("$1", "'2030-01-01T00:00:00Z'");
    for (name, sql) in [("stats", stats), ("wait stats", wait_stats_sql(backend))] {
        let plan = plan_of(db, &sql).await;
        assert!(
            plan.contains("runs_waiting"),
            "{name} does not read runs_waiting:\n{plan}"
        );
        match db {
            TestDb::Sqlite { .. } => {
                for line in plan.lines().filter(|l| l.contains(" runs ")) {
                    // Counted from the index (no row of `runs` read), or a range of
                    // `runs_due` (only the due runs, or the first one).
                    assert!(
                        line.contains("COVERING INDEX")
                            || (line.starts_with("SEARCH") && line.contains("runs_due")),
                        "{name} reads rows of runs:\n{plan}"
                    );
                }
            }
            TestDb::Postgres { .. } => {
                assert!(
                    !plan.contains("Seq Scan on runs") && !plan.contains("Seq Scan on run_waits"),
                    "{name} scans a table:\n{plan}"
                );
                // Waiting runs are never found through runs_by_status (all of them, read from the table).
                assert!(
                    !plan.contains("Index Cond: (status = 'waiting'::text)"),
                    "{name} reads every waiting run through runs_by_status:\n{plan}"
                );
            }
        }
        if name == "wait stats" {
            assert!(
                plan.contains("run_waits_started"),
                "the oldest wait is not read from run_waits_started:\n{plan}"
            );
            assert!(
                !plan.contains("runs_by_status"),
                "{name} reads runs_by_status:\n{plan}"
            );
        }
    }
}

/// At creation, the look-up of a batch's conversations with unfinished runs
/// (order, in the append transaction) probes `runs_in_order` once per
/// conversation on PostgreSQL, whatever the statistics (here: none): a plain
/// `IN` was planned as a bitmap scan of every unfinished run (every waiting
/// run), 91 ms per batch with 78,000 waiting. SQLite's `IN` form is in
/// [`QUERIES`].
async fn order_lookup_at_creation_probes_each_conversation(db: &TestDb) {
    let TestDb::Postgres { url, .. } = db else {
        return;
    };
    let _app = TestApp::spawn(db).await;
    let pool = sqlx::PgPool::connect(url).await.unwrap();
    sqlx::query(
        "INSERT INTO runs (run_id, workflow, event_seq, event_id, conversation_id, status, wait_reason, \
         next_attempt_at, context, step_results, created_at, updated_at) \
         SELECT 'run_parked_' || i, 'parked', i, 'ev_parked_' || i, 'conv_parked_' || i, 'waiting', 'timer', \
         now() + interval '1 day', '{}', '{}', now(), now() FROM generate_series(1, 5000) i",
    )
    .execute(&pool)
    .await
    .unwrap();
    let sql = switchboard::store::order::unfinished_of_conversations_pg(3)
        .replace("$1", "'conv_parked_1'")
        .replace("$2", "'conv_parked_2'")
        .replace("$3", "'conv_parked_3'");
    let plan = plan_of(db, &sql).await;
    assert!(
        plan.contains("Nested Loop") && plan.contains("runs_in_order"),
        "not one probe of runs_in_order per conversation:\n{plan}"
    );
    assert!(
        !plan.contains("Bitmap Heap Scan on runs") && !plan.contains("Seq Scan on runs"),
        "reads every unfinished run:\n{plan}"
    );
}

on_both_backends!(
    list_queries_use_indexes,
    due_statements_use_the_partial_indexes,
    gauge_statements_read_indexes_only,
    order_lookup_at_creation_probes_each_conversation
);
