//! What a measured phase costs per message: database transactions and CPU
//! time of the server and of the database processes.
//!
//! - Transactions. SQLite: the server's `switchboard_store_commits_total`
//!   (a commit hook on every store connection; SQLite calls it for write
//!   transactions only), read from `/metrics` before and after. PostgreSQL:
//!   `pg_stat_database.xact_commit` of the phase's own database (read-only
//!   transactions included). PostgreSQL publishes a backend's counts only
//!   when it flushes them (up to 10 s late while idle, always at exit), so
//!   each phase runs on a server of its own: the figure is read after the
//!   server was stopped and every backend of the database has exited, and
//!   the server's start-up transactions (measured by starting and stopping
//!   a server once per scenario, [`Probe::startup_xacts`]) are subtracted.
//! - Context switches of the server's threads (`/proc/<pid>/task/*/status`),
//!   per message: threads put to sleep and woken again.
//! - CPU, from /proc (utime + stime): the server process; on PostgreSQL
//!   also the backends serving the phase's database (`pg_stat_activity`
//!   pids for its datname, at the start and at the end of the phase; a
//!   backend that both started and exited in between is missed). The
//!   cluster's shared background processes (walwriter, background writer,
//!   checkpointer, autovacuum launcher) are reported apart: they serve
//!   every database of the cluster, so they cannot be attributed.

use std::collections::HashMap;
use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use sqlx::Connection;

use super::server::{self, Server};

/// The shared PostgreSQL processes reported apart.
const SHARED: &str = "('walwriter', 'background writer', 'checkpointer', 'autovacuum launcher')";

/// What a phase cost, per message.
#[derive(Clone, Debug)]
pub struct Cost {
    pub messages: u64,
    pub tx_per_msg: f64,
    pub server_cpu_ms: f64,
    /// Context switches of the server's threads.
    pub server_switches: f64,
    /// PostgreSQL backends of the phase's database (NaN on SQLite: inside the server).
    pub db_cpu_ms: f64,
    /// PostgreSQL's shared background processes (whole cluster; NaN on SQLite).
    pub shared_cpu_ms: f64,
}

impl Cost {
    pub fn json(&self) -> Value {
        let num = |v: f64| if v.is_finite() { json!(v) } else { Value::Null };
        json!({"messages": self.messages, "db_transactions_per_message": num(self.tx_per_msg),
               "server_cpu_ms_per_message": num(self.server_cpu_ms),
               "server_context_switches_per_message": num(self.server_switches),
               "db_cpu_ms_per_message": num(self.db_cpu_ms),
               "pg_shared_background_cpu_ms_per_message": num(self.shared_cpu_ms)})
    }
}

/// Measures phases on one scenario's database.
pub struct Probe {
    /// PostgreSQL: the admin URL (another database of the cluster) and the phase's datname.
    pg: Option<(String, String)>,
}

/// A phase under way: the readings at its start.
pub struct Phase {
    server_cpu: f64,
    switches: u64,
    commits: u64,
    xacts: i64,
    /// Messages sent between `xacts` and `begin` (a warm-up): counted for PostgreSQL's transactions.
    warmup: u64,
    backends: HashMap<u32, f64>,
    shared: HashMap<u32, f64>,
}

impl Probe {
    /// `admin`: the bench's `--pg` URL (or "sqlite"); `db`: the scenario's database URL.
    pub fn new(admin: &str, db: &str) -> Self {
        let pg = (admin != "sqlite").then(|| {
            let name = db.rsplit_once('/').map(|(_, n)| n).unwrap_or(db);
            (admin.to_owned(), name.to_owned())
        });
        Self { pg }
    }

    async fn pids(&self, filter: &str) -> anyhow::Result<HashMap<u32, f64>> {
        let Some((admin, _)) = &self.pg else {
            return Ok(HashMap::new());
        };
        let mut c = sqlx::PgConnection::connect(admin).await?;
        let pids: Vec<i32> = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
            "SELECT pid FROM pg_stat_activity WHERE {filter}"
        )))
        .fetch_all(&mut c)
        .await?;
        Ok(pids
            .into_iter()
            .map(|p| (p as u32, server::cpu_seconds(p as u32)))
            .collect())
    }

    /// CPU seconds so far of each backend serving the database (PostgreSQL; empty on SQLite).
    pub async fn backends(&self) -> anyhow::Result<HashMap<u32, f64>> {
        match &self.pg {
            Some((_, name)) => self.pids(&format!("datname = '{name}'")).await,
            None => Ok(HashMap::new()),
        }
    }

    async fn shared(&self) -> anyhow::Result<HashMap<u32, f64>> {
        match &self.pg {
            Some(_) => self.pids(&format!("backend_type IN {SHARED}")).await,
            None => Ok(HashMap::new()),
        }
    }

    /// PostgreSQL: the database's committed transactions once no backend serves it
    /// (so every count is flushed); 0 on SQLite.
    pub async fn settled_xacts(&self) -> anyhow::Result<i64> {
        let Some((admin, name)) = &self.pg else {
            return Ok(0);
        };
        let mut c = sqlx::PgConnection::connect(admin).await?;
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let n: i64 =
                sqlx::query_scalar("SELECT count(*) FROM pg_stat_activity WHERE datname = $1")
                    .bind(name)
                    .fetch_one(&mut c)
                    .await?;
            if n == 0 {
                break;
            }
            anyhow::ensure!(
                Instant::now() < deadline,
                "{n} backend(s) of {name} still open 20 s after the server stopped"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let x: Option<i64> =
            sqlx::query_scalar("SELECT xact_commit FROM pg_stat_database WHERE datname = $1")
                .bind(name)
                .fetch_one(&mut c)
                .await?;
        Ok(x.unwrap_or(0))
    }

    /// PostgreSQL: the transactions a server commits between its start and its stop,
    /// without load (after one start that migrated and stored the workflow versions).
    pub async fn startup_xacts(
        &self,
        bin: &Path,
        db: &str,
        workflows: &Path,
        log_dir: &Path,
    ) -> anyhow::Result<i64> {
        if self.pg.is_none() {
            return Ok(0);
        }
        drop(Server::start(bin, db, workflows, log_dir, &[]).await?);
        let before = self.settled_xacts().await?;
        drop(Server::start(bin, db, workflows, log_dir, &[]).await?);
        Ok(self.settled_xacts().await? - before)
    }

    /// Readings at the start of a phase; `xacts` from [`Self::settled_xacts`] before the server
    /// started; `warmup`: messages the server took since then.
    pub async fn begin(&self, server: &Server, xacts: i64, warmup: u64) -> anyhow::Result<Phase> {
        Ok(Phase {
            server_cpu: server::cpu_seconds(server.pid()),
            switches: server::context_switches(server.pid()),
            commits: if self.pg.is_none() {
                sqlite_commits(server).await?
            } else {
                0
            },
            xacts,
            warmup,
            backends: self.backends().await?,
            shared: self.shared().await?,
        })
    }

    /// Ends a phase of `messages` messages: reads, stops the server, and (PostgreSQL)
    /// reads the settled transaction count; `startup`: from [`Self::startup_xacts`].
    pub async fn end(
        &self,
        phase: Phase,
        server: Server,
        messages: u64,
        startup: i64,
    ) -> anyhow::Result<Cost> {
        let server_cpu = server::cpu_seconds(server.pid()) - phase.server_cpu;
        let switches = server::context_switches(server.pid()).saturating_sub(phase.switches);
        let grown = |before: &HashMap<u32, f64>, after: HashMap<u32, f64>| -> f64 {
            after
                .into_iter()
                .map(|(pid, cpu)| cpu - before.get(&pid).copied().unwrap_or(0.0))
                .sum()
        };
        let db_cpu = grown(&phase.backends, self.backends().await?);
        let shared_cpu = grown(&phase.shared, self.shared().await?);
        let commits = if self.pg.is_none() {
            sqlite_commits(&server).await? - phase.commits
        } else {
            0
        };
        drop(server);
        let pg = self.pg.is_some();
        let tx_per_msg = if pg {
            let tx = (self.settled_xacts().await? - phase.xacts - startup).max(0);
            tx as f64 / (messages + phase.warmup).max(1) as f64
        } else {
            commits as f64 / messages.max(1) as f64
        };
        let per = |v: f64| v / messages.max(1) as f64;
        Ok(Cost {
            messages,
            tx_per_msg,
            server_cpu_ms: per(server_cpu * 1e3),
            server_switches: per(switches as f64),
            db_cpu_ms: if pg { per(db_cpu * 1e3) } else { f64::NAN },
            shared_cpu_ms: if pg { per(shared_cpu * 1e3) } else { f64::NAN },
        })
    }
}

/// The server's `switchboard_store_commits_total`.
async fn sqlite_commits(server: &Server) -> anyhow::Result<u64> {
    let text = reqwest::get(format!("{}/metrics", server.base))
        .await?
        .text()
        .await?;
    text.lines()
        .find_map(|l| l.strip_prefix("switchboard_store_commits_total "))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .map(|v| v as u64)
        .ok_or_else(|| anyhow::anyhow!("/metrics has no switchboard_store_commits_total"))
}
