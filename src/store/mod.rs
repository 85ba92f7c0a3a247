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
pub mod due;
pub mod gauges;
mod leased;
pub mod model;
pub mod order;
pub mod postgres;
pub mod projection;
pub mod runs;
mod runs_sql;
pub mod sanitize;
pub mod saves;
mod sql;
pub mod sqlite;
pub mod waits;

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
    #[error("internal error: {0}")]
    Internal(String),
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
                | sqlx::Error::WorkerCrashed => true,
                // A statement the driver refuses to send (e.g. more bind parameters than
                // the protocol can count) is this statement's fault, not the database's.
                sqlx::Error::Protocol(message) => !message.contains("too many"),
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
    /// Runs scheduled for later (backoff, a destination's hold) or held by a
    /// worker; not the runs parked at a wait step or by order.
    pub runs_pending: i64,
    /// The database's size on disk, in bytes.
    pub size_bytes: i64,
}

/// What [`EventStore::append_batch_leased`] returns: one outcome per
/// delivery, the runs left for a claim (plus waits resumed), and the runs
/// leased to this process's workers.
pub type AppendedBatch = (Vec<AppendOutcome>, usize, Vec<runs::Run>);

/// The event log and its projections. Implemented by [`sqlite::SqliteStore`]
/// and [`postgres::PostgresStore`]; both behave the same.
#[async_trait]
pub trait EventStore: runs::RunStore + waits::WaitStore + Send + Sync + 'static {
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
    ) -> Result<(Vec<AppendOutcome>, usize), StoreError> {
        let (outcomes, runs, _) = self.append_batch_leased(batch, dispatcher, None).await?;
        Ok((outcomes, runs))
    }

    /// [`EventStore::append_batch`], and the first `local.max` runs it
    /// creates that are due now (not held by order) are leased to
    /// `local.owner` in the same transaction (status `running`, fencing
    /// token 1): they are returned, for this process's workers to start
    /// without a claim. The others are created `scheduled` (or held) and
    /// announced to other instances on PostgreSQL. The count is of the runs
    /// left for a claim (due now, not handed over) plus waits this batch resumed.
    async fn append_batch_leased(
        &self,
        batch: &[NewEvent],
        dispatcher: &dyn Dispatcher,
        local: Option<&LocalLease>,
    ) -> Result<(Vec<AppendOutcome>, usize, Vec<runs::Run>), StoreError>;

    /// Whether [`EventStore::append_and_save`] writes one transaction (a
    /// backend with one writer: SQLite), so that the appender should take
    /// the engine's run saves into its own group commit.
    fn shares_commits(&self) -> bool {
        false
    }

    /// [`EventStore::append_batch_leased`] and [`runs::RunStore::save_progress_batch`]
    /// together: in one transaction where [`EventStore::shares_commits`]
    /// (saves first, so runs they end release held ones before the batch's
    /// own order decisions), otherwise one after the other. All or nothing
    /// where it is one transaction: on an error the caller writes each part alone.
    async fn append_and_save(
        &self,
        batch: &[NewEvent],
        dispatcher: &dyn Dispatcher,
        local: Option<&LocalLease>,
        saves: &[runs::Save],
        now: chrono::DateTime<chrono::Utc>,
    ) -> Result<(AppendedBatch, runs::SavedBatch), StoreError> {
        let saved = self.save_progress_batch(saves, now).await?;
        let appended = self.append_batch_leased(batch, dispatcher, local).await?;
        Ok((appended, saved))
    }

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
        warn_unknown_parameters(url);
        Ok(Arc::new(postgres::PostgresStore::connect(url).await?))
    } else {
        Err(StoreError::UnsupportedUrl(redact_url(url)))
    }
}

/// The PostgreSQL URL parameters sqlx 0.9 understands.
const KNOWN_PG_PARAMETERS: &[&str] = &[
    "sslmode",
    "ssl-mode",
    "sslrootcert",
    "ssl-root-cert",
    "ssl-ca",
    "sslcert",
    "ssl-cert",
    "sslkey",
    "ssl-key",
    "statement-cache-capacity",
    "host",
    "hostaddr",
    "port",
    "dbname",
    "user",
    "password",
    "application_name",
    "options",
];

/// Names (never values: one may be a password) the parameters of a
/// PostgreSQL URL that will be ignored (sqlx's own notice, which prints the
/// value, is filtered out of the log).
fn warn_unknown_parameters(url: &str) {
    let Some(query) = url
        .split('#')
        .next()
        .and_then(|u| u.split_once('?'))
        .map(|(_, q)| q)
    else {
        return;
    };
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let key = pair.split('=').next().unwrap_or_default();
        if !KNOWN_PG_PARAMETERS.contains(&key) && !key.starts_with("options[") {
            tracing::warn!(
                parameter = key,
                "the database URL parameter `{key}` is not understood and is ignored (names are case-sensitive)"
            );
        }
    }
}

/// The URL with every credential replaced by `***`, for messages and logs:
/// the password of the userinfo (`user:pass@`), and the value of every query
/// parameter that can carry one (`password=`, `sslpassword=`, … in any case,
/// percent-encoded or not, anywhere in the query). Everything that prints a
/// database URL goes through here.
pub fn redact_url(url: &str) -> String {
    // A password may hold `?`, `#` or `/` (sqlx accepts it unencoded): find the
    // userinfo by the last `@` first, before splitting off query and fragment.
    if let Some(scheme_end) = url.find("://") {
        let prefix = &url[..scheme_end + 3];
        let rest = &url[scheme_end + 3..];
        if let Some(at) = rest.rfind('@')
            && let Some((user, _)) = rest[..at].split_once(':')
            && !user.contains(['/', '?', '#'])
        {
            let tail = redact_parts(&format!("{prefix}{}", &rest[at + 1..]));
            return format!("{prefix}{user}:***@{}", &tail[prefix.len()..]);
        }
    }
    redact_parts(url)
}

fn redact_parts(url: &str) -> String {
    const MASK: &str = "***";
    let (head, fragment) = match url.find('#') {
        Some(i) => (&url[..i], Some(&url[i + 1..])),
        None => (url, None),
    };
    let (base, query) = match head.find('?') {
        Some(i) => (&head[..i], Some(&head[i + 1..])),
        None => (head, None),
    };
    let mut out = String::with_capacity(url.len());
    match base.find("://") {
        Some(scheme_end) => {
            let rest = &base[scheme_end + 3..];
            // The authority ends at the first `/`; its userinfo at the last `@` in it.
            let authority_end = rest.find('/').unwrap_or(rest.len());
            let authority = &rest[..authority_end];
            out.push_str(&base[..scheme_end + 3]);
            match authority.rfind('@') {
                Some(at) => {
                    let userinfo = &authority[..at];
                    match userinfo.split_once(':') {
                        Some((user, _)) => {
                            out.push_str(user);
                            out.push(':');
                            out.push_str(MASK);
                        }
                        None => out.push_str(userinfo),
                    }
                    out.push_str(&authority[at..]);
                }
                None => out.push_str(authority),
            }
            out.push_str(&rest[authority_end..]);
        }
        None => out.push_str(base),
    }
    if let Some(query) = query {
        out.push('?');
        let pairs: Vec<String> = query
            .split('&')
            .map(|pair| match pair.split_once('=') {
                Some((key, _)) if is_secret_parameter(key) => format!("{key}={MASK}"),
                _ => pair.to_owned(),
            })
            .collect();
        out.push_str(&pairs.join("&"));
    }
    if let Some(fragment) = fragment {
        // A fragment is never needed to connect; it is not printed.
        if !fragment.is_empty() {
            out.push_str("#***");
        }
    }
    out
}

/// A query parameter that may carry a credential: its (percent-decoded,
/// case-folded) name mentions a password, a secret or a token.
fn is_secret_parameter(key: &str) -> bool {
    let mut decoded = Vec::with_capacity(key.len());
    let bytes = key.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        let hex = |b: Option<&u8>| b.and_then(|b| (*b as char).to_digit(16));
        if bytes[i] == b'%'
            && let (Some(h), Some(l)) = (hex(bytes.get(i + 1)), hex(bytes.get(i + 2)))
        {
            decoded.push((h * 16 + l) as u8);
            i += 3;
            continue;
        }
        decoded.push(if bytes[i] == b'+' { b' ' } else { bytes[i] });
        i += 1;
    }
    let name = String::from_utf8_lossy(&decoded).to_ascii_lowercase();
    ["pass", "pwd", "secret", "token", "credential"]
        .iter()
        .any(|word| name.contains(word))
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
        assert_eq!(
            super::redact_url("postgres://u@h/db?sslmode=require&application_name=x"),
            "postgres://u@h/db?sslmode=require&application_name=x"
        );
    }

    #[test]
    fn a_statement_over_the_bind_limit_is_not_the_database_being_down() {
        let too_many = super::StoreError::Database(sqlx::Error::Protocol(
            "PgConnection::run(): too many arguments for query: 112640".into(),
        ));
        assert!(!too_many.is_unavailable());
        let broken = super::StoreError::Database(sqlx::Error::Protocol(
            "unexpected message from server".into(),
        ));
        assert!(broken.is_unavailable());
    }

    #[test]
    fn redacts_every_credential_form_sqlx_accepts() {
        let cases = [
            "postgres://u@h/db?password=hunter2",
            "postgres://u@h/db?sslmode=require&password=hunter2",
            "postgres://u@h/db?PASSWORD=hunter2&sslmode=require",
            "postgresql://u@h/db?sslpassword=hunter2",
            "postgres://u@h/db?SslPassword=hunter2",
            "postgres://u@h/db?pass%77ord=hunter2",
            "postgres://u:hunter2@h/db?password=hunter2",
            "postgres://u:hun%40ter2@h/db",
            "postgres://u:hunter2@/db?host=/var/run/postgresql",
            "postgres:///db?user=u&password=hunter2&host=h",
            "mysql://u:hunter2@h/db",
            "postgres://u@h/db?password=hunter2#frag",
            "postgres://u@h/db#hunter2",
            "postgres://u:hun?ter2@h/db",
            "postgres://u:hun#ter2@h/db?sslmode=disable",
            "postgres://u:hun/ter2@h/db",
        ];
        for url in cases {
            let shown = super::redact_url(url);
            assert!(!shown.contains("hunter2"), "{url} printed as {shown}");
            assert!(!shown.contains("hun%40ter2"), "{url} printed as {shown}");
            assert!(!shown.contains("ter2"), "{url} printed as {shown}");
            assert!(shown.contains("***"), "{url} printed as {shown}");
        }
        assert_eq!(
            super::redact_url("postgres:///db?user=u&Password=x&host=h"),
            "postgres:///db?user=u&Password=***&host=h"
        );
    }
}
