//! The two ceilings every result is compared with, measured in the same
//! run on the same machine:
//!
//! - HTTP: a bare poem handler that reads the body and answers 200, in its
//!   own process, loaded by the same generator (signing included);
//! - storage: raw inserts of the same event rows into the same database,
//!   with the same durability settings (SQLite WAL + `synchronous=FULL`;
//!   PostgreSQL's defaults) and the same indexes, in batched transactions of
//!   256 rows, as many writers as the engine allows (SQLite 1, PostgreSQL 4).

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use sqlx::{Connection, QueryBuilder};

use super::load::{self, Sample, Target};
use super::server::free_port;

/// `bench --ceiling-http PORT`: the bare server (run as a child of the bench).
pub async fn serve_bare_http(port: u16) -> anyhow::Result<()> {
    use poem::{Body, handler, post};
    #[handler]
    async fn read_and_answer(body: Body) -> &'static str {
        let _ = body.into_bytes().await;
        "{}"
    }
    poem::Server::new(poem::listener::TcpListener::bind(format!(
        "127.0.0.1:{port}"
    )))
    .run(poem::Route::new().at("/webhooks/operator", post(read_and_answer)))
    .await?;
    Ok(())
}

struct Bare(Child);

impl Drop for Bare {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Requests/s of the bare handler with `connections` connections.
pub async fn http(connections: usize, duration: Duration) -> anyhow::Result<Sample> {
    let port = free_port();
    let _bare = Bare(
        Command::new(std::env::current_exe()?)
            .args(["--ceiling-http", &port.to_string()])
            .stdout(Stdio::null())
            .spawn()?,
    );
    let url = format!("http://127.0.0.1:{port}/webhooks/operator");
    let client = load::client(connections);
    for _ in 0..200 {
        if client.post(&url).body("{}").send().await.is_ok() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let tag = uuid::Uuid::new_v4().simple().to_string();
    let target = Target {
        client,
        url,
        signed: true,
        make_body: std::sync::Arc::new(move |i| load::ended_body(&tag, i)),
        on_ack: None,
    };
    Ok(load::max_rate(&target, connections, duration, None).await)
}

const COLUMNS: &str = "event_id, idempotency_key, event_type, conversation_id, stream_version, agent_id, \
     livemode, created_at, received_at, signed_url, x_timestamp, x_signature, raw_body";

fn create_sql(sqlite: bool) -> Vec<String> {
    let seq = if sqlite {
        "seq INTEGER PRIMARY KEY"
    } else {
        "seq BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY"
    };
    let (ts, blob) = if sqlite {
        ("TEXT", "BLOB")
    } else {
        ("TIMESTAMPTZ", "BYTEA")
    };
    vec![
        "DROP TABLE IF EXISTS ceiling_events".into(),
        format!(
            "CREATE TABLE ceiling_events ({seq}, event_id TEXT NOT NULL UNIQUE, idempotency_key TEXT NOT NULL, \
             event_type TEXT NOT NULL, conversation_id TEXT, stream_version BIGINT, agent_id TEXT, livemode BOOLEAN, \
             created_at TEXT, received_at {ts} NOT NULL, signed_url TEXT NOT NULL, x_timestamp TEXT NOT NULL, \
             x_signature TEXT NOT NULL, raw_body {blob} NOT NULL, UNIQUE (conversation_id, stream_version))"
        ),
        "CREATE INDEX ceiling_idem ON ceiling_events (idempotency_key)".into(),
        "CREATE INDEX ceiling_conv ON ceiling_events (conversation_id, seq)".into(),
        "CREATE INDEX ceiling_type ON ceiling_events (event_type, seq)".into(),
        "CREATE INDEX ceiling_agent ON ceiling_events (agent_id, seq)".into(),
        "CREATE INDEX ceiling_received ON ceiling_events (received_at)".into(),
    ]
}

async fn insert_batches<DB>(
    conn: &mut DB::Connection,
    writer: usize,
    batches: usize,
) -> anyhow::Result<()>
where
    DB: sqlx::Database,
    DB::Arguments: sqlx::IntoArguments<DB>,
    for<'c> &'c mut DB::Connection: sqlx::Executor<'c, Database = DB>,
    for<'t> String: sqlx::Encode<'t, DB> + sqlx::Type<DB>,
    for<'t> i64: sqlx::Encode<'t, DB> + sqlx::Type<DB>,
    for<'t> bool: sqlx::Encode<'t, DB> + sqlx::Type<DB>,
    for<'t> Vec<u8>: sqlx::Encode<'t, DB> + sqlx::Type<DB>,
    for<'t> chrono::DateTime<chrono::Utc>: sqlx::Encode<'t, DB> + sqlx::Type<DB>,
{
    for b in 0..batches {
        let mut tx = conn.begin().await?;
        let mut qb = QueryBuilder::<DB>::new(format!("INSERT INTO ceiling_events ({COLUMNS}) "));
        qb.push_values(0..256usize, |mut row, i| {
            let n = format!("{writer}_{b}_{i}");
            let body = load::ended_body("ceiling", (b * 256 + i) as u64);
            row.push_bind(format!("ev_{n}"))
                .push_bind(uuid::Uuid::new_v4().to_string())
                .push_bind("conversation.ended".to_owned())
                .push_bind(format!("conv_{n}"))
                .push_bind(1i64)
                .push_bind("ca_bench@v1".to_owned())
                .push_bind(true)
                .push_bind("2025-07-14T15:09:40.251Z".to_owned())
                .push_bind(chrono::Utc::now())
                .push_bind("http://127.0.0.1/webhooks/operator".to_owned())
                .push_bind("1752505780".to_owned())
                .push_bind("v1,0123456789abcdef0123456789abcdef".to_owned())
                .push_bind(body.into_bytes());
        });
        qb.build().execute(&mut *tx).await?;
        tx.commit().await?;
    }
    Ok(())
}

/// Rows/s of batched raw inserts; `database_url` is the bench's database.
pub async fn storage(database_url: &str, rows: usize) -> anyhow::Result<f64> {
    let batches = rows.div_ceil(256);
    if database_url.starts_with("postgres") {
        let mut conn = sqlx::PgConnection::connect(database_url).await?;
        for s in create_sql(false) {
            sqlx::raw_sql(sqlx::AssertSqlSafe(s))
                .execute(&mut conn)
                .await?;
        }
        let writers = 4;
        let start = Instant::now();
        let mut tasks = Vec::new();
        for w in 0..writers {
            let url = database_url.to_owned();
            tasks.push(tokio::spawn(async move {
                let mut c = sqlx::PgConnection::connect(&url).await?;
                insert_batches::<sqlx::Postgres>(&mut c, w, batches / writers).await
            }));
        }
        for t in tasks {
            t.await??;
        }
        let took = start.elapsed();
        sqlx::raw_sql("DROP TABLE ceiling_events")
            .execute(&mut conn)
            .await?;
        Ok((batches / writers * writers * 256) as f64 / took.as_secs_f64())
    } else {
        use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqliteSynchronous};
        let path = database_url.trim_start_matches("sqlite://");
        let ceiling_path = format!("{path}.ceiling");
        let opts = SqliteConnectOptions::new()
            .filename(&ceiling_path)
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Full);
        let mut conn = sqlx::SqliteConnection::connect_with(&opts).await?;
        for s in create_sql(true) {
            sqlx::raw_sql(sqlx::AssertSqlSafe(s))
                .execute(&mut conn)
                .await?;
        }
        let start = Instant::now();
        insert_batches::<sqlx::Sqlite>(&mut conn, 0, batches).await?;
        let took = start.elapsed();
        drop(conn);
        for suffix in ["", "-wal", "-shm"] {
            let _ = std::fs::remove_file(format!("{ceiling_path}{suffix}"));
        }
        Ok((batches * 256) as f64 / took.as_secs_f64())
    }
}
