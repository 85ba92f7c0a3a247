//! Test harness: a fresh database per test (an SQLite file in a temp dir, or
//! a new PostgreSQL database), the real server on a random port, a client
//! that signs deliveries like Operator does, and the real binary for crash tests.

#![allow(dead_code)]

pub mod probe;
pub mod sink;

#[allow(unused_imports)] // each test file uses what it needs
pub use probe::{Probe, new_event};

use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Once;
use std::time::Duration;

use serde_json::Value;
use switchboard::api::AdminToken;
use switchboard::config::Settings;
use switchboard::startup::Application;
use switchboard::webhook::signature::{self, SignedParts, SigningKey, SigningKeys, Tolerance};

pub const KEY: &str = "test-signing-key-0001";
pub const TOKEN: &str = "test-admin-token";

/// Where PostgreSQL tests create their databases (trust auth on this machine and in CI).
pub fn postgres_admin_url() -> String {
    std::env::var("SWITCHBOARD_TEST_POSTGRES_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_owned())
}

fn init() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let _ = rustls::crypto::ring::default_provider().install_default();
    });
}

/// A fresh database for one test; dropped (PostgreSQL) or deleted (SQLite) afterwards.
pub enum TestDb {
    Sqlite { dir: tempfile::TempDir, url: String },
    Postgres { url: String, name: String },
}

impl TestDb {
    pub async fn sqlite() -> Self {
        init();
        let dir = tempfile::tempdir().expect("temp dir");
        let url = format!("sqlite://{}", dir.path().join("switchboard.db").display());
        TestDb::Sqlite { dir, url }
    }

    /// A new database on the test PostgreSQL, or `None` (with a printed reason)
    /// when it is unreachable. With SWITCHBOARD_REQUIRE_POSTGRES=1 (CI) that is a failure.
    pub async fn postgres() -> Option<Self> {
        init();
        let admin_url = postgres_admin_url();
        static UNREACHABLE: std::sync::OnceLock<String> = std::sync::OnceLock::new();
        let connect = async {
            if let Some(reason) = UNREACHABLE.get() {
                return Err(reason.clone());
            }
            let attempt = sqlx::postgres::PgPoolOptions::new()
                .max_connections(1)
                .acquire_timeout(Duration::from_secs(3))
                .connect(&admin_url)
                .await;
            attempt.map_err(|e| UNREACHABLE.get_or_init(|| e.to_string()).clone())
        };
        let admin = match connect.await {
            Ok(pool) => pool,
            Err(e) => {
                if std::env::var("SWITCHBOARD_REQUIRE_POSTGRES").is_ok_and(|v| v == "1") {
                    panic!(
                        "PostgreSQL is required (SWITCHBOARD_REQUIRE_POSTGRES=1) but {admin_url} is unreachable: {e}"
                    );
                }
                // Written straight to stderr (not eprintln!) so the test harness does not swallow it.
                static SAID: Once = Once::new();
                SAID.call_once(|| {
                    let _ = writeln!(
                        std::io::stderr(),
                        "\nskipped: PostgreSQL tests: {admin_url} is unreachable ({e}); \
                         start PostgreSQL or set SWITCHBOARD_TEST_POSTGRES_URL to run them\n"
                    );
                });
                return None;
            }
        };
        let name = format!("sbtest_{}", uuid::Uuid::new_v4().simple());
        sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
            .execute(&admin)
            .await
            .expect("create test database");
        admin.close().await;
        let base = admin_url
            .rsplit_once('/')
            .expect("database URL has a path")
            .0;
        Some(TestDb::Postgres {
            url: format!("{base}/{name}"),
            name,
        })
    }

    pub fn url(&self) -> &str {
        match self {
            TestDb::Sqlite { url, .. } | TestDb::Postgres { url, .. } => url,
        }
    }

    pub fn dir(&self) -> Option<&Path> {
        match self {
            TestDb::Sqlite { dir, .. } => Some(dir.path()),
            TestDb::Postgres { .. } => None,
        }
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        if let TestDb::Postgres { name, .. } = self {
            let name = name.clone();
            let admin_url = postgres_admin_url();
            // Drop runs inside the test's runtime; use a thread with its own.
            let _ = std::thread::spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .unwrap();
                rt.block_on(async {
                    if let Ok(admin) = sqlx::PgPool::connect(&admin_url).await {
                        let _ = sqlx::query(sqlx::AssertSqlSafe(format!(
                            "DROP DATABASE IF EXISTS {name} WITH (FORCE)"
                        )))
                        .execute(&admin)
                        .await;
                    }
                });
            })
            .join();
        }
    }
}

/// Runs each listed `async fn(&TestDb)` once on SQLite and once on PostgreSQL.
#[macro_export]
macro_rules! on_both_backends {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    let db = $crate::common::TestDb::sqlite().await;
                    super::$name(&db).await;
                }
            )*
        }
        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    let Some(db) = $crate::common::TestDb::postgres().await else { return };
                    super::$name(&db).await;
                }
            )*
        }
    };
}

/// Settings as `serve` would build them, on port 0.
pub fn settings(db: &TestDb) -> Settings {
    Settings {
        database_url: db.url().to_owned(),
        listen: "127.0.0.1:0".parse().unwrap(),
        public_url: None,
        signing_keys: SigningKeys::parse(KEY).unwrap(),
        admin_token: AdminToken::new(TOKEN),
        admin_token_generated: false,
        workflows_dir: PathBuf::from("/nonexistent-workflows"),
        tolerance: Tolerance::default(),
        max_body_bytes: 1024 * 1024,
        shutdown_grace: Duration::from_secs(1),
        worker_concurrency: 8,
        metrics_listen: None,
        trusted_proxies: Vec::new(),
        setup_cache_bytes: 32 * 1024 * 1024,
        append_timeout: switchboard::store::appender::APPEND_TIMEOUT,
        metrics_token: None,
    }
}

/// A running server in this process.
pub struct TestApp {
    pub addr: SocketAddr,
    pub client: reqwest::Client,
    pub store: std::sync::Arc<dyn switchboard::store::EventStore>,
    /// The server's background tasks (fault tests stop them through it).
    pub supervisor: std::sync::Arc<switchboard::supervisor::Supervisor>,
    server: tokio::task::JoinHandle<()>,
}

impl Drop for TestApp {
    fn drop(&mut self) {
        self.server.abort();
    }
}

/// How to sign one delivery (defaults: now, a new key, the server's URL, the test key).
#[derive(Clone, Default)]
pub struct Delivery {
    pub key: Option<String>,
    pub idempotency_key: Option<String>,
    pub timestamp: Option<String>,
    pub url: Option<String>,
    /// Replace the computed signature.
    pub signature: Option<String>,
    /// Leave these headers out.
    pub omit: Vec<&'static str>,
}

pub fn sign_headers(key: &str, url: &str, idem: &str, ts: &str, body: &[u8]) -> String {
    signature::sign(
        &SigningKey::new(key).unwrap(),
        &SignedParts {
            url,
            idempotency_key: idem,
            timestamp: ts,
            body,
        },
    )
}

pub fn client() -> reqwest::Client {
    init();
    reqwest::Client::builder().build().unwrap()
}

/// `switchboard validate PATHS…` as a user runs it: (exit status, stdout, stderr).
pub fn validate_paths(paths: &[&Path]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_switchboard"))
        .arg("validate")
        .args(paths)
        .env_remove("SWITCHBOARD_WORKFLOWS")
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// [`validate_paths`] of one directory or file.
pub fn validate(path: &Path) -> (i32, String, String) {
    validate_paths(&[path])
}

/// A workflow on `conversation.ended` with these steps.
pub fn on_ended(steps: &str) -> String {
    format!("on: {{ event: conversation.ended }}\nsteps:\n{steps}")
}

/// A workflow on `conversation.ended` with steps `ids`, each posting to the
/// sink's `/ok/<id>` except `c`, which posts to `c_path`; every step retries
/// (5 attempts, `initial_delay` apart).
pub fn retrying_steps(
    sink: &sink::Sink,
    ids: &[&str],
    c_path: &str,
    initial_delay: &str,
) -> String {
    let mut s = String::new();
    for id in ids {
        let path = if *id == "c" {
            c_path.to_owned()
        } else {
            format!("/ok/{id}")
        };
        s.push_str(&format!(
            "  - id: {id}\n    retry: {{ max_attempts: 5, backoff: fixed, initial_delay: {initial_delay} }}\n    http: {{ url: \"{}\" }}\n",
            sink.url(&path)
        ));
    }
    on_ended(&s)
}

/// A directory of workflow files for one test.
pub fn workflow_dir(files: &[(&str, &str)]) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for (name, text) in files {
        std::fs::write(dir.path().join(name), text).unwrap();
    }
    dir
}

/// The workflows of `dir` as a dispatcher, and a migrated store on `db`: for
/// tests that drive the store (or the appender) without a server.
#[allow(dead_code)]
pub async fn registry_and_store(
    db: &TestDb,
    dir: &std::path::Path,
) -> (
    std::sync::Arc<switchboard::workflow::registry::Registry>,
    std::sync::Arc<dyn switchboard::store::EventStore>,
) {
    let registry = std::sync::Arc::new(switchboard::workflow::registry::Registry::new(
        switchboard::workflow::WorkflowSet::load(dir).expect("workflows load"),
    ));
    let store = switchboard::store::connect(db.url()).await.unwrap();
    store.migrate().await.unwrap();
    (registry, store)
}

impl TestApp {
    /// A server whose workflows are these files.
    pub async fn with_workflows(db: &TestDb, files: &[(&str, &str)]) -> (Self, tempfile::TempDir) {
        let dir = workflow_dir(files);
        let mut s = settings(db);
        s.workflows_dir = dir.path().to_owned();
        (Self::spawn_with(s).await, dir)
    }

    /// Waits until every run is final (or panics after `secs`); returns them.
    pub async fn wait_runs_final(
        &self,
        expected: usize,
        secs: u64,
    ) -> Vec<switchboard::store::runs::Run> {
        let deadline = std::time::Instant::now() + Duration::from_secs(secs);
        loop {
            let runs = self
                .store
                .list_runs(&switchboard::store::runs::RunQuery {
                    limit: 1000,
                    ..Default::default()
                })
                .await
                .unwrap();
            let done = runs
                .iter()
                .filter(|r| r.status().is_some_and(|s| s.is_final()))
                .count();
            if runs.len() >= expected && done == runs.len() {
                return runs;
            }
            if std::time::Instant::now() > deadline {
                panic!(
                    "runs not final within {secs}s: {:?}",
                    runs.iter()
                        .map(|r| (&r.workflow, &r.status, &r.last_error))
                        .collect::<Vec<_>>()
                );
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    pub async fn spawn(db: &TestDb) -> Self {
        Self::spawn_with(settings(db)).await
    }

    pub async fn spawn_with(settings: Settings) -> Self {
        init();
        let app = Application::build(settings).await.expect("build app");
        let addr = app.local_addr();
        let store = app.store();
        let supervisor = app.supervisor();
        let server = tokio::spawn(async move {
            let _ = app.run().await;
        });
        Self {
            addr,
            client: client(),
            store,
            supervisor,
            server,
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    pub fn webhook_url(&self) -> String {
        self.url("/webhooks/operator")
    }

    /// Posts a body signed like Operator would (new idempotency key, now).
    pub async fn deliver(&self, body: &[u8]) -> reqwest::Response {
        self.deliver_with(body, Delivery::default()).await
    }

    pub async fn deliver_with(&self, body: &[u8], d: Delivery) -> reqwest::Response {
        deliver_to(&self.client, &self.webhook_url(), body, d).await
    }

    pub async fn admin_get(&self, path: &str) -> (u16, Value) {
        self.admin(reqwest::Method::GET, path, None).await
    }

    pub async fn admin_post(&self, path: &str) -> (u16, Value) {
        self.admin(reqwest::Method::POST, path, None).await
    }

    /// A POST of `body` as JSON to the admin API.
    pub async fn admin_post_json(&self, path: &str, body: Value) -> (u16, Value) {
        self.admin(reqwest::Method::POST, path, Some(body)).await
    }

    async fn admin(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
    ) -> (u16, Value) {
        let mut req = self
            .client
            .request(method, self.url(path))
            .bearer_auth(TOKEN);
        if let Some(body) = body {
            req = req.json(&body);
        }
        let resp = req.send().await.unwrap();
        let status = resp.status().as_u16();
        (status, resp.json().await.unwrap_or(Value::Null))
    }

    /// Waits until replay `id` has succeeded (or panics after `secs`); returns it.
    pub async fn wait_replay(&self, id: &str, secs: u64) -> Value {
        let deadline = std::time::Instant::now() + Duration::from_secs(secs);
        loop {
            let (_, r) = self.admin_get(&format!("/api/v1/replays/{id}")).await;
            if r["status"] == "succeeded" {
                return r;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "replay {id} did not finish in {secs}s: {r}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The text of `GET /metrics`.
    pub async fn metrics_text(&self) -> String {
        let resp = self.client.get(self.url("/metrics")).send().await.unwrap();
        resp.text().await.unwrap()
    }

    /// Every stored event, oldest first (follows cursors).
    pub async fn all_events(&self) -> Vec<Value> {
        all_events(&self.client, &format!("http://{}", self.addr)).await
    }
}

pub async fn deliver_to(
    client: &reqwest::Client,
    url: &str,
    body: &[u8],
    d: Delivery,
) -> reqwest::Response {
    let ts = d
        .timestamp
        .unwrap_or_else(|| chrono::Utc::now().timestamp().to_string());
    let idem = d
        .idempotency_key
        .unwrap_or_else(|| uuid::Uuid::new_v4().to_string());
    let signed_url = d.url.unwrap_or_else(|| url.to_owned());
    let sig = d.signature.unwrap_or_else(|| {
        sign_headers(
            d.key.as_deref().unwrap_or(KEY),
            &signed_url,
            &idem,
            &ts,
            body,
        )
    });
    let mut req = client
        .post(url)
        .header("content-type", "application/json")
        .body(body.to_vec());
    for (name, value) in [
        ("X-Timestamp", ts),
        ("X-Idempotency-Key", idem),
        ("X-Signature", sig),
    ] {
        if !d.omit.contains(&name) {
            req = req.header(name, value);
        }
    }
    req.send().await.expect("send delivery")
}

/// A signed delivery with extra headers (e.g. an inbound `traceparent`).
pub async fn deliver_with_headers(
    client: &reqwest::Client,
    url: &str,
    body: &[u8],
    extra: &[(&str, &str)],
) -> reqwest::Response {
    let ts = chrono::Utc::now().timestamp().to_string();
    let idem = uuid::Uuid::new_v4().to_string();
    let sig = sign_headers(KEY, url, &idem, &ts, body);
    let mut req = client
        .post(url)
        .header("content-type", "application/json")
        .header("X-Timestamp", ts)
        .header("X-Idempotency-Key", idem)
        .header("X-Signature", sig)
        .body(body.to_vec());
    for (k, v) in extra {
        req = req.header(*k, *v);
    }
    req.send().await.expect("send delivery")
}

/// The newest runs (up to 500) of a server process at `base`, as the admin API lists them.
pub async fn runs_of(base: &str) -> Vec<Value> {
    let page: Value = client()
        .get(format!("{base}/api/v1/runs?limit=500"))
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    page["data"].as_array().unwrap().clone()
}

pub async fn all_events(client: &reqwest::Client, base: &str) -> Vec<Value> {
    let mut out = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        let mut url = format!("{base}/api/v1/events?order=oldest_first&limit=500");
        if let Some(c) = &cursor {
            url.push_str(&format!("&cursor={c}"));
        }
        let page: Value = client
            .get(&url)
            .bearer_auth(TOKEN)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        out.extend(page["data"].as_array().unwrap().iter().cloned());
        match page["next_cursor"].as_str() {
            Some(c) => cursor = Some(c.to_owned()),
            None => return out,
        }
    }
}

pub fn fixture(name: &str) -> Vec<u8> {
    std::fs::read(format!(
        "{}/tests/fixtures/{name}",
        env!("CARGO_MANIFEST_DIR")
    ))
    .unwrap()
}

/// The fixture bodies of the events Operator sends.
pub const EVENT_FIXTURES: [&str; 9] = [
    "conversation_setup_inbound_phone.json",
    "conversation_setup_outbound_phone.json",
    "conversation_ended_completed.json",
    "conversation_ended_failed.json",
    "conversation_ended_busy.json",
    "conversation_ended_no_answer.json",
    "conversation_ended_voicemail.json",
    "conversation_custom_fields_updated_first_set.json",
    "conversation_custom_fields_updated_changed.json",
];

/// A compact conversation.ended body with a given id.
/// A `conversation.custom_fields.updated` body setting `key` to `value` (no `previous_value`).
pub fn field_body(id: &str, conv: &str, created_at: &str, key: &str, value: Value) -> Vec<u8> {
    serde_json::json!({"id": id, "conversation_id": conv, "agent_id": "ca_t@v1", "livemode": true,
        "created_at": created_at,
        "payload": {"type": "conversation.custom_fields.updated", "key": key, "value": value}})
    .to_string()
    .into_bytes()
}

pub fn ended_body(event_id: &str, conversation_id: &str, status: &str) -> Vec<u8> {
    serde_json::json!({
        "id": event_id,
        "created_at": "2025-07-14T15:09:40.251Z",
        "agent_id": "ca_test@v1",
        "livemode": true,
        "conversation_id": conversation_id,
        "experimental": false,
        "payload": {"type": "conversation.ended", "status": status}
    })
    .to_string()
    .into_bytes()
}

/// An empty workflows directory under `dir` (a missing one is refused at startup).
pub fn no_workflows(dir: &Path) -> PathBuf {
    let wf = dir.join("no-workflows");
    std::fs::create_dir_all(&wf).unwrap();
    wf
}

/// The real `switchboard serve` binary, for crash tests.
pub struct ServerProcess {
    pub child: Child,
    pub addr: SocketAddr,
    pub log: PathBuf,
}

impl ServerProcess {
    /// `switchboard worker` (no HTTP): ready once its log says so. The caller kills and waits for it.
    #[allow(clippy::zombie_processes)]
    pub async fn start_worker(db: &TestDb, log_dir: &Path, extra_env: &[(&str, &str)]) -> Child {
        let log = log_dir.join(format!("worker-{}.log", uuid::Uuid::new_v4().simple()));
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_switchboard"));
        cmd.arg("worker")
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("SWITCHBOARD_DATABASE_URL", db.url())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap());
        for (k, v) in extra_env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().expect("spawn switchboard worker");
        for _ in 0..200 {
            if std::fs::read_to_string(&log)
                .unwrap_or_default()
                .contains("worker started")
            {
                return child;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let _ = child.kill();
        let _ = child.wait();
        panic!(
            "worker did not start; log:\n{}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
    }

    pub async fn start(db: &TestDb, log_dir: &Path, extra_env: &[(&str, &str)]) -> Self {
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        let log = log_dir.join(format!("server-{port}.log"));
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_switchboard"));
        cmd.arg("serve")
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("SWITCHBOARD_DATABASE_URL", db.url())
            .env("SWITCHBOARD_LISTEN", addr.to_string())
            .env("SWITCHBOARD_SIGNING_KEYS", KEY)
            .env("SWITCHBOARD_ADMIN_TOKEN", TOKEN)
            .env("SWITCHBOARD_WORKFLOWS", no_workflows(log_dir))
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap());
        for (k, v) in extra_env {
            cmd.env(k, v);
        }
        let child = cmd.spawn().expect("spawn switchboard");
        let me = Self { child, addr, log };
        me.wait_ready().await;
        me
    }

    async fn wait_ready(&self) {
        let client = client();
        for _ in 0..200 {
            if let Ok(r) = client
                .get(format!("http://{}/readyz", self.addr))
                .send()
                .await
                && r.status().is_success()
            {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!(
            "server did not become ready; log:\n{}",
            std::fs::read_to_string(&self.log).unwrap_or_default()
        );
    }

    pub fn base(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn webhook_url(&self) -> String {
        format!("http://{}/webhooks/operator", self.addr)
    }

    /// SIGTERM: the graceful shutdown.
    pub fn terminate(&self) {
        let status = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .expect("run kill -TERM");
        assert!(status.success());
    }

    /// Waits for the process to exit (panics after `limit`).
    pub async fn wait_exit(&mut self, limit: Duration) -> std::process::ExitStatus {
        let deadline = std::time::Instant::now() + limit;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "still running {limit:?} after SIGTERM; log:\n{}",
                std::fs::read_to_string(&self.log).unwrap_or_default()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// SIGKILL: no shutdown code runs.
    pub fn kill9(&mut self) {
        self.child.kill().expect("kill -9");
        self.child.wait().unwrap();
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
