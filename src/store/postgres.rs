//! The event store on PostgreSQL, for more than one machine: several
//! Switchboard instances may share the database.
//!
//! Each append transaction first takes a transaction-scoped advisory lock,
//! so sequence numbers are assigned in commit order across instances and a
//! reader paging by sequence never sees a gap that fills in later. Group
//! commit (see [`super::appender`]) amortises the lock and the fsync.

use std::str::FromStr;
use std::time::Duration;

use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};

use super::runs_sql::impl_run_store;
use super::sql::{append_in_tx, impl_event_store, rebuild_in_tx};
use super::{AppendOutcome, Backend, Dispatcher, LocalLease, NewEvent, StoreError};

/// The advisory lock key that serialises appends to the log.
const APPEND_LOCK: i64 = 0x5357_4244_0001; // "SWBD" 1

/// The channel workers LISTEN on; notified (at commit) when runs are created.
pub const RUNS_CHANNEL: &str = "switchboard_runs";
const NOTIFY_RUNS: &str = "SELECT pg_notify('switchboard_runs', '')";

/// A pooled connection idle for longer is pinged before it is used again.
const PING_IF_IDLE_FOR: Duration = Duration::from_secs(1);

pub struct PostgresStore {
    reader: PgPool,
    /// The same pool: PostgreSQL needs no separate writer.
    writer: PgPool,
    /// Runs reaching a wait step, parked in one transaction (store/waits.rs).
    waits: super::waits::WaitBatch,
}

fn migrator() -> sqlx::migrate::Migrator {
    let mut migrator = sqlx::migrate!("./migrations/postgres");
    migrator.dangerous_set_table_name("switchboard_migrations");
    migrator
}

impl PostgresStore {
    /// Per-conversation order takes advisory locks (store/order.rs).
    const ORDER_LOCK: bool = true;
    const NOTIFY_RUNS: Option<&'static str> = Some(NOTIFY_RUNS);
    const SIZE_SQL: &'static str = "SELECT pg_database_size(current_database())";

    pub async fn connect(url: &str) -> Result<Self, StoreError> {
        let options = PgConnectOptions::from_str(url)?.application_name("switchboard");
        let pool = PgPoolOptions::new()
            .max_connections(16)
            // Short: while PostgreSQL is down, a webhook gets its 503 within ~2 s
            // (Operator retries it) instead of waiting out a long timeout.
            .acquire_timeout(Duration::from_secs(2))
            // A connection is pinged before use only when it sat idle for a while
            // (a round trip per transaction otherwise, on both sides): one used in
            // the last second is known to be alive, and if PostgreSQL went away
            // since, the statement fails like any other during an outage.
            .test_before_acquire(false)
            .before_acquire(|conn, meta| {
                Box::pin(async move {
                    if meta.idle_for >= PING_IF_IDLE_FOR {
                        sqlx::Connection::ping(conn).await?;
                    }
                    Ok(true)
                })
            })
            .after_release(|conn, _| {
                Box::pin(async move { Ok(!sqlx::Connection::is_in_transaction(&*conn)) })
            })
            .connect_with(options)
            .await?;
        Ok(Self {
            writer: pool.clone(),
            reader: pool,
            waits: Default::default(),
        })
    }

    pub fn pool(&self) -> &PgPool {
        &self.reader
    }
}

impl_event_store!(PostgresStore, sqlx::Postgres, {
    fn backend(&self) -> Backend {
        Backend::Postgres
    }

    async fn migrate(&self) -> Result<(), StoreError> {
        migrator().run(&self.reader).await?;
        Ok(())
    }

    async fn append_batch_leased(
        &self,
        batch: &[NewEvent],
        dispatcher: &dyn Dispatcher,
        local: Option<&LocalLease>,
    ) -> Result<(Vec<AppendOutcome>, usize, Vec<crate::store::runs::Run>), StoreError> {
        let mut tx = self.reader.begin().await?;
        sqlx::query("SELECT pg_advisory_xact_lock($1)")
            .bind(APPEND_LOCK)
            .execute(&mut *tx)
            .await?;
        let outcomes = append_in_tx!(
            sqlx::Postgres,
            &mut tx,
            batch,
            dispatcher,
            Some(NOTIFY_RUNS),
            true,
            local
        );
        tx.commit().await?;
        Ok(outcomes)
    }

    async fn rebuild_projections(&self) -> Result<u64, StoreError> {
        let mut tx = self.reader.begin().await?;
        sqlx::query("SELECT pg_advisory_xact_lock($1)")
            .bind(APPEND_LOCK)
            .execute(&mut *tx)
            .await?;
        let read = rebuild_in_tx!(sqlx::Postgres, &mut tx);
        tx.commit().await?;
        Ok(read)
    }
});

impl_run_store!(
    PostgresStore,
    sqlx::Postgres,
    "FOR UPDATE SKIP LOCKED",
    Some("SET LOCAL synchronous_commit TO OFF"),
    "FOR UPDATE",
    true
);

// Durable waits (src/store/waits.rs): a wait_for's lookup of stored events serializes with appends.
super::waits::impl_wait_store!(
    PostgresStore,
    sqlx::Postgres,
    Some(APPEND_LOCK),
    "FOR UPDATE"
);
