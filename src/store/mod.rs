//! The append-only event store: one trait, one implementation per database.
//!
//! Every verified delivery becomes one row in `events`, at the next place of
//! a single global sequence (gap-free and in commit order, so a reader that
//! pages by sequence never misses a row) and of its conversation's stream.
//! The schema refuses UPDATE and DELETE on `events`. The `conversations`
//! table is a projection ([`projection`]) maintained in the same transaction
//! and rebuildable from the log.
//!
//! Writes go through the [`appender::Appender`], which batches concurrent
//! deliveries into one transaction (group commit): one fsync acknowledges
//! many webhooks without weakening durability.

pub mod appender;
mod batch;
pub mod model;
pub mod postgres;
pub mod projection;
pub mod runs;
mod runs_sql;
pub mod sanitize;
mod sql;
pub mod sqlite;

use std::sync::Arc;

use async_trait::async_trait;

pub use model::*;
use projection::ConversationState;

/// Which database backs the store.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

impl Backend {
    pub fn name(self) -> &'static str {
        match self {
            Backend::Sqlite => "sqlite",
            Backend::Postgres => "postgres",
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database error: {0}")]
    Database(#[from] sqlx::Error),
    #[error("migration failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error("stored data is corrupt: {0}")]
    Corrupt(String),
    #[error("unsupported database URL `{0}`: use sqlite://PATH or postgres://USER@HOST/DB")]
    UnsupportedUrl(String),
    #[error("the store is shutting down")]
    Closed,
    #[error("the database is unavailable: {0}")]
    Unavailable(String),
}

impl StoreError {
    /// The database cannot be reached or written at all (down, disk full,
    /// read-only), as opposed to one statement failing: retrying the same
    /// work at once will fail the same way.
    pub fn is_unavailable(&self) -> bool {
        match self {
            StoreError::Database(e) => match e {
                sqlx::Error::Io(_)
                | sqlx::Error::PoolTimedOut
                | sqlx::Error::PoolClosed
                | sqlx::Error::Tls(_)
                | sqlx::Error::Protocol(_)
                | sqlx::Error::WorkerCrashed => true,
                sqlx::Error::Database(db) => {
                    let code = db.code().unwrap_or_default();
                    if db.try_downcast_ref::<sqlx::sqlite::SqliteError>().is_some() {
                        // Primary result codes: SQLITE_BUSY 5, SQLITE_READONLY 8,
                        // SQLITE_IOERR 10, SQLITE_FULL 13, SQLITE_CANTOPEN 14.
                        let primary = code.parse::<i32>().map(|c| c & 0xff).unwrap_or(0);
                        matches!(primary, 5 | 8 | 10 | 13 | 14)
                    } else {
                        // PostgreSQL classes 08 (connection), 53 (resources), 57P (shutdown).
                        code.starts_with("08") || code.starts_with("53") || code.starts_with("57P")
                    }
                }
                _ => false,
            },
            StoreError::Closed | StoreError::Unavailable(_) => true,
            _ => false,
        }
    }
}

/// What `/metrics` reports about the store.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct StoreStats {
    /// Events in the log (the highest sequence: it has no gaps).
    pub events: i64,
    /// Runs due now and not yet taken by a worker.
    pub runs_waiting: i64,
    /// When the longest-waiting due run fell due.
    pub oldest_waiting_since: Option<chrono::DateTime<chrono::Utc>>,
    /// Runs scheduled for later (backoff) or held by a worker.
    pub runs_pending: i64,
    /// The database's size on disk, in bytes.
    pub size_bytes: i64,
}

/// The event log and its projections. Implemented by [`sqlite::SqliteStore`]
/// and [`postgres::PostgresStore`]; both behave the same.
#[async_trait]
pub trait EventStore: runs::RunStore + Send + Sync + 'static {
    fn backend(&self) -> Backend;

    /// Applies pending schema migrations.
    async fn migrate(&self) -> Result<(), StoreError>;

    /// Appends a batch in one transaction, deduplicating by envelope id (forever)
    /// and by idempotency key (within [`IDEMPOTENCY_WINDOW`]), also within the batch.
    /// In the same transaction, records `dispatcher`'s verdict on every new event
    /// and creates the runs it starts (the outbox: no event is committed without them).
    /// Returns one outcome per input, in order, and the number of runs created. All or nothing.
    async fn append_batch(
        &self,
        batch: &[NewEvent],
        dispatcher: &dyn Dispatcher,
    ) -> Result<(Vec<AppendOutcome>, usize), StoreError>;

    /// Sizes for `/metrics`: events stored, runs waiting, the database's size.
    async fn stats(&self, now: chrono::DateTime<chrono::Utc>) -> Result<StoreStats, StoreError>;

    /// One event with its raw body, by envelope id.
    async fn get_event(&self, event_id: &str) -> Result<Option<StoredEventWithBody>, StoreError>;

    /// Events matching `query`, ordered by sequence.
    async fn list_events(&self, query: &EventQuery) -> Result<Vec<StoredEvent>, StoreError>;

    /// How many events match `query`'s filters (its cursor and limit are ignored).
    async fn count_events(&self, query: &EventQuery) -> Result<i64, StoreError>;

    /// Raw bodies of one conversation's events, in log order, up to `as_of` (inclusive).
    async fn conversation_log(
        &self,
        conversation_id: &str,
        as_of: Option<i64>,
    ) -> Result<Vec<StoredEventWithBody>, StoreError>;

    /// Stored projections, most recently active first.
    async fn list_conversations(
        &self,
        query: &ConversationQuery,
    ) -> Result<Vec<ConversationState>, StoreError>;

    /// The stored projection of one conversation.
    async fn conversation(
        &self,
        conversation_id: &str,
    ) -> Result<Option<ConversationState>, StoreError>;

    /// Drops the projections and folds the whole log again. Returns the number of events read.
    async fn rebuild_projections(&self) -> Result<u64, StoreError>;

    /// Checks the database answers.
    async fn ping(&self) -> Result<(), StoreError>;

    /// Records the setup answer that was actually sent (it went out before
    /// it could be stored, at the deadline): inserted, or replacing an answer
    /// stored meanwhile, so a retried delivery gets the bytes that were sent.
    async fn record_sent_setup_answer(&self, answer: &runs::SetupAnswer) -> Result<(), StoreError>;
}

/// Opens the store a URL names: `sqlite://…` or `postgres://…` / `postgresql://…`.
pub async fn connect(url: &str) -> Result<Arc<dyn EventStore>, StoreError> {
    if url.starts_with("sqlite:") {
        Ok(Arc::new(sqlite::SqliteStore::connect(url).await?))
    } else if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        Ok(Arc::new(postgres::PostgresStore::connect(url).await?))
    } else {
        Err(StoreError::UnsupportedUrl(redact_url(url)))
    }
}

/// The URL with any password replaced, for messages and logs.
pub fn redact_url(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme_end), Some(at)) if at > scheme_end => {
            let userinfo = &url[scheme_end + 3..at];
            match userinfo.split_once(':') {
                Some((user, _)) => format!("{}{user}:***{}", &url[..scheme_end + 3], &url[at..]),
                None => url.to_owned(),
            }
        }
        _ => url.to_owned(),
    }
}

/// Folds a conversation's log, up to `as_of`, into its state.
pub async fn conversation_as_of(
    store: &dyn EventStore,
    conversation_id: &str,
    as_of: Option<i64>,
) -> Result<Option<ConversationState>, StoreError> {
    let log = store.conversation_log(conversation_id, as_of).await?;
    projection::fold_log(conversation_id, &log)
}

#[cfg(test)]
mod tests {
    #[test]
    fn redacts_passwords_only() {
        assert_eq!(
            super::redact_url("postgres://u:secret@h:5432/db"),
            "postgres://u:***@h:5432/db"
        );
        assert_eq!(super::redact_url("postgres://u@h/db"), "postgres://u@h/db");
        assert_eq!(super::redact_url("sqlite://x.db"), "sqlite://x.db");
    }
}
