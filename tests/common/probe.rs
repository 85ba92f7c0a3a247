//! A test's own connection to its database, outside the server: counts
//! rows and runs SQL (to check what was stored, or to tamper with it), and
//! events built for the store directly, without a delivery.

use super::TestDb;

/// A connection pool to the test database.
pub enum Probe {
    Sqlite(sqlx::SqlitePool),
    Postgres(sqlx::PgPool),
}

impl Probe {
    pub async fn open(db: &TestDb) -> Self {
        match db {
            TestDb::Sqlite { .. } => {
                Probe::Sqlite(sqlx::SqlitePool::connect(db.url()).await.unwrap())
            }
            TestDb::Postgres { .. } => {
                Probe::Postgres(sqlx::PgPool::connect(db.url()).await.unwrap())
            }
        }
    }

    /// The one integer `sql` selects (a `COUNT(*)`, say).
    pub async fn count(&self, sql: &str) -> i64 {
        let sql = sqlx::AssertSqlSafe(sql.to_owned());
        match self {
            Probe::Sqlite(pool) => sqlx::query_scalar(sql).fetch_one(pool).await.unwrap(),
            Probe::Postgres(pool) => sqlx::query_scalar(sql).fetch_one(pool).await.unwrap(),
        }
    }

    /// Runs a statement.
    pub async fn exec(&self, sql: &str) {
        let sql = sqlx::AssertSqlSafe(sql.to_owned());
        match self {
            Probe::Sqlite(pool) => sqlx::query(sql).execute(pool).await.map(drop).unwrap(),
            Probe::Postgres(pool) => sqlx::query(sql).execute(pool).await.map(drop).unwrap(),
        }
    }

    pub async fn close(self) {
        match self {
            Probe::Sqlite(pool) => pool.close().await,
            Probe::Postgres(pool) => pool.close().await,
        }
    }
}

impl TestDb {
    /// [`Probe::count`] on a connection opened (and closed) for it.
    pub async fn count(&self, sql: &str) -> i64 {
        let probe = Probe::open(self).await;
        let n = probe.count(sql).await;
        probe.close().await;
        n
    }

    /// Runs these statements, in order, on a connection opened (and closed) for them.
    pub async fn exec(&self, statements: &[&str]) {
        let probe = Probe::open(self).await;
        for s in statements {
            probe.exec(s).await;
        }
        probe.close().await;
    }
}

/// An event for [`switchboard::store::EventStore::append_batch`] with this
/// body and idempotency key, as if delivered now (the signature is not checked there).
pub fn new_event(body: Vec<u8>, idempotency_key: &str) -> switchboard::store::NewEvent {
    use switchboard::domain::IdempotencyKey;
    use switchboard::store::{NewEvent, Verification};
    use switchboard::webhook::envelope::Envelope;
    NewEvent {
        envelope: Envelope::parse(&body).unwrap(),
        idempotency_key: IdempotencyKey::parse(idempotency_key.to_owned()).unwrap(),
        raw_body: body,
        verification: Verification {
            signed_url: "http://127.0.0.1/webhooks/operator".into(),
            timestamp: "1".into(),
            signature: "v1,x".into(),
        },
        received_at: chrono::Utc::now(),
        span: tracing::Span::none(),
    }
}
