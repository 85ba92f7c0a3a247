//! The event store on an embedded SQLite file (the default).
//!
//! Durability: WAL journal with `synchronous = FULL`, set on every
//! connection as it opens, so a commit is on disk (the WAL fsynced) before
//! a webhook is acknowledged: it survives kill -9 and power loss. Appends go
//! through one dedicated writer connection with `BEGIN IMMEDIATE`; reads use
//! a separate pool and never block on the writer (WAL).
//!
//! Every connection carries a commit hook counting the transactions that
//! write (SQLite calls it for write transactions only), read by
//! [`commits`] and published as `switchboard_store_commits_total`.

use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous,
};

use super::runs_sql::impl_run_store;
use super::sql::{append_in_tx, impl_event_store, rebuild_in_tx};
use super::{AppendOutcome, Backend, Dispatcher, LocalLease, NewEvent, StoreError};

pub struct SqliteStore {
    writer: SqlitePool,
    reader: SqlitePool,
    /// Runs reaching a wait step, parked in one transaction (store/waits.rs).
    waits: super::waits::WaitBatch,
}

/// The connection settings every connection gets.
pub fn connect_options(url: &str) -> Result<SqliteConnectOptions, StoreError> {
    Ok(SqliteConnectOptions::from_str(url)?
        .create_if_missing(true)
        .journal_mode(SqliteJournalMode::Wal)
        .synchronous(SqliteSynchronous::Full)
        .busy_timeout(Duration::from_secs(5))
        .foreign_keys(true))
}

/// Write transactions committed on this process's SQLite connections.
static COMMITS: AtomicU64 = AtomicU64::new(0);

/// How many write transactions this process has committed to SQLite (all stores).
pub fn commits() -> u64 {
    COMMITS.load(Ordering::Relaxed)
}

/// Counts every commit of `conn` into [`COMMITS`] (SQLite's commit hook).
async fn count_commits(conn: &mut sqlx::SqliteConnection) -> Result<(), sqlx::Error> {
    conn.lock_handle().await?.set_commit_hook(|| {
        COMMITS.fetch_add(1, Ordering::Relaxed);
        true // let the commit proceed
    });
    Ok(())
}

fn migrator() -> sqlx::migrate::Migrator {
    let mut migrator = sqlx::migrate!("./migrations/sqlite");
    // apalis keeps its own migrations in `_sqlx_migrations`; ours must not collide.
    migrator.dangerous_set_table_name("switchboard_migrations");
    migrator
}

impl SqliteStore {
    /// One writer connection serialises everything: no locks for order (store/order.rs).
    const ORDER_LOCK: bool = false;
    const NOTIFY_RUNS: Option<&'static str> = None;
    /// The database file's size (the WAL is not counted).
    const SIZE_SQL: &'static str =
        "SELECT page_count * page_size FROM pragma_page_count(), pragma_page_size()";

    pub async fn connect(url: &str) -> Result<Self, StoreError> {
        let options = connect_options(url)?;
        // A failed COMMIT (disk full, I/O error) can leave sqlx believing the
        // connection is still inside a transaction, and every later BEGIN then
        // fails: such a connection is closed on release and a fresh one opened.
        // No ping before acquire: on SQLite it tests nothing (the connection is a
        // thread of this process) and costs a round trip to that thread per transaction.
        let writer = SqlitePoolOptions::new()
            .max_connections(1)
            .test_before_acquire(false)
            .after_connect(|conn, _| Box::pin(count_commits(conn)))
            .after_release(|conn, _| {
                Box::pin(async move { Ok(!sqlx::Connection::is_in_transaction(&*conn)) })
            })
            .connect_with(options.clone())
            .await?;
        let reader = SqlitePoolOptions::new()
            .max_connections(4)
            .test_before_acquire(false)
            .after_connect(|conn, _| Box::pin(count_commits(conn)))
            .after_release(|conn, _| {
                Box::pin(async move { Ok(!sqlx::Connection::is_in_transaction(&*conn)) })
            })
            .connect_with(options)
            .await?;
        Ok(Self {
            writer,
            reader,
            waits: Default::default(),
        })
    }

    /// The pool that writes (one connection).
    pub fn writer(&self) -> &SqlitePool {
        &self.writer
    }
}

impl_event_store!(SqliteStore, sqlx::Sqlite, {
    fn backend(&self) -> Backend {
        Backend::Sqlite
    }

    async fn migrate(&self) -> Result<(), StoreError> {
        migrator().run(&self.writer).await?;
        Ok(())
    }

    async fn append_batch_leased(
        &self,
        batch: &[NewEvent],
        dispatcher: &dyn Dispatcher,
        local: Option<&LocalLease>,
    ) -> Result<(Vec<AppendOutcome>, usize, Vec<crate::store::runs::Run>), StoreError> {
        let mut tx = self.writer.begin_with("BEGIN IMMEDIATE").await?;
        let outcomes = append_in_tx!(
            sqlx::Sqlite,
            &mut tx,
            batch,
            dispatcher,
            None::<&str>,
            false,
            local
        );
        tx.commit().await?;
        Ok(outcomes)
    }

    fn shares_commits(&self) -> bool {
        true
    }

    async fn append_and_save(
        &self,
        batch: &[NewEvent],
        dispatcher: &dyn Dispatcher,
        local: Option<&LocalLease>,
        saves: &[crate::store::runs::Save],
        now: chrono::DateTime<chrono::Utc>,
    ) -> Result<(super::AppendedBatch, crate::store::runs::SavedBatch), StoreError> {
        // One writer: the saves share the appends' commit (one fsync for both).
        let mut tx = self.writer.begin_with("BEGIN IMMEDIATE").await?;
        let saved = Self::save_batch_in_tx(&mut tx, saves, now).await?;
        let appended = append_in_tx!(
            sqlx::Sqlite,
            &mut tx,
            batch,
            dispatcher,
            None::<&str>,
            false,
            local
        );
        tx.commit().await?;
        Ok((appended, saved))
    }

    async fn rebuild_projections(&self) -> Result<u64, StoreError> {
        let mut tx = self.writer.begin_with("BEGIN IMMEDIATE").await?;
        let read = rebuild_in_tx!(sqlx::Sqlite, &mut tx);
        tx.commit().await?;
        Ok(read)
    }
});

impl_run_store!(SqliteStore, sqlx::Sqlite, "", None, "", false);

// Durable waits (src/store/waits.rs): one writer connection serializes them with appends.
super::waits::impl_wait_store!(SqliteStore, sqlx::Sqlite, None, "");

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::store::EventStore;
    use crate::store::runs::{RunStatus, RunUpdate};
    use crate::store::waits::{NewWait, WaitStore};

    /// Runs reaching a wait step while a batch is being written queue up and
    /// are parked together, in one transaction, by the next writer; a run whose
    /// lease was lost is answered `None` and fails none of the others.
    #[tokio::test]
    async fn runs_reaching_a_wait_step_together_are_parked_in_one_transaction() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(
            SqliteStore::connect(&format!("sqlite://{}/w.db", dir.path().display()))
                .await
                .unwrap(),
        );
        store.migrate().await.unwrap();
        let now = chrono::Utc::now();
        for i in 0..3 {
            sqlx::query(
                "INSERT INTO runs (run_id, workflow, event_seq, event_id, status, next_attempt_at, context, \
                 step_results, created_at, updated_at, lease_owner, lease_until, lease_token) \
                 VALUES ($1, 'wf', $2, $3, 'running', $4, '{}', '{}', $4, $4, 'me', $5, 1)",
            )
            .bind(format!("run_{i}"))
            .bind(i as i64)
            .bind(format!("ev_{i}"))
            .bind(now)
            .bind(now + chrono::TimeDelta::minutes(5))
            .execute(&store.writer)
            .await
            .unwrap();
        }
        let until = now + chrono::TimeDelta::hours(1);
        let turn = store.waits.turn.lock().await;
        let mut parking = Vec::new();
        for (i, token) in [1, 1, 2].into_iter().enumerate() {
            let store = store.clone();
            parking.push(tokio::spawn(async move {
                let update = RunUpdate {
                    status: RunStatus::Waiting,
                    step_index: 0,
                    step_id: Some("settle".into()),
                    attempt: 0,
                    attempts_total: 0,
                    next_attempt_at: until,
                    lease: None,
                    step_results: serde_json::json!({}),
                    last_error: None,
                    finished_at: None,
                    wait_reason: Some("timer".into()),
                };
                let wait = NewWait {
                    run_id: format!("run_{i}"),
                    step_id: "settle".into(),
                    kind: "timer",
                    conversation_id: None,
                    event_type: None,
                    after_seq: i as i64,
                    matcher: serde_json::Value::Null,
                    started_at: now,
                    until,
                };
                store.begin_wait("me", token, &update, &wait, now).await
            }));
        }
        // All three queue behind the batch being written (the turn held here).
        for _ in 0..10_000 {
            if store.waits.len() == 3 {
                break;
            }
            tokio::task::yield_now().await;
        }
        assert_eq!(
            store.waits.len(),
            3,
            "the waits queue while a batch is written"
        );
        drop(turn);
        let mut answers = Vec::new();
        for p in parking {
            answers.push(p.await.unwrap().unwrap());
        }
        assert_eq!(
            answers,
            [Some(false), Some(false), None],
            "run_2's lease was lost"
        );
        assert_eq!(store.waits.len(), 0);
        let parked: Vec<(String, String, i64)> = sqlx::query_as(
            "SELECT r.run_id, r.status, (SELECT COUNT(*) FROM run_waits w WHERE w.run_id = r.run_id) \
             FROM runs r ORDER BY r.run_id",
        )
        .fetch_all(&store.reader)
        .await
        .unwrap();
        assert_eq!(
            parked,
            [
                ("run_0".into(), "waiting".into(), 1),
                ("run_1".into(), "waiting".into(), 1),
                ("run_2".into(), "running".into(), 0),
            ]
        );
    }
}
