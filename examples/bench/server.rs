//! The server under test: the release `switchboard` binary as a child
//! process (so its memory and CPU are its own), and a local sink that
//! records when each delivery arrives.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use poem::listener::{Acceptor, Listener, TcpListener};
use poem::web::Data;
use poem::{EndpointExt, Response, Route, handler};

pub const TOKEN: &str = "bench-token";

/// The `switchboard` binary of this program's profile (`target/{release,debug}/switchboard`),
/// built first unless `build` is false.
pub fn binary(build: bool) -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe()?;
    // target/release/examples/bench → target/release/switchboard
    let dir = exe
        .parent()
        .and_then(Path::parent)
        .ok_or_else(|| anyhow::anyhow!("cannot locate the target directory"))?;
    if build {
        // The same profile as this program: target/release or target/debug.
        let release = dir.file_name().is_some_and(|n| n == "release");
        let mut args = vec!["build", "--quiet", "--bin", "switchboard"];
        if release {
            args.push("--release");
        }
        let status = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
            .args(&args)
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            // Into this program's own target directory (where `bin` is looked for below),
            // whatever CARGO_TARGET_DIR this program was built with.
            .env("CARGO_TARGET_DIR", dir.parent().unwrap_or(dir))
            .status()?;
        anyhow::ensure!(
            status.success(),
            "cargo build --release --bin switchboard failed"
        );
    }
    let bin = dir.join("switchboard");
    anyhow::ensure!(
        bin.exists(),
        "{} is missing: run `cargo build --release`",
        bin.display()
    );
    Ok(bin)
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// A running `switchboard serve`.
pub struct Server {
    pub child: Child,
    pub base: String,
    pub log: PathBuf,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Server {
    pub async fn start(
        bin: &Path,
        database_url: &str,
        workflows: &Path,
        log_dir: &Path,
        extra_env: &[(&str, &str)],
    ) -> anyhow::Result<Self> {
        let port = free_port();
        let log = log_dir.join(format!("server-{port}.log"));
        let mut cmd = Command::new(bin);
        cmd.arg("serve")
            .env("SWITCHBOARD_DATABASE_URL", database_url)
            .env("SWITCHBOARD_LISTEN", format!("127.0.0.1:{port}"))
            .env("SWITCHBOARD_SIGNING_KEYS", super::load::KEY)
            .env("SWITCHBOARD_ADMIN_TOKEN", TOKEN)
            .env("SWITCHBOARD_WORKFLOWS", workflows)
            .env("RUST_LOG", "warn")
            .env_remove("OTEL_EXPORTER_OTLP_ENDPOINT")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log)?);
        for (k, v) in extra_env {
            cmd.env(k, v);
        }
        let child = cmd.spawn()?;
        let server = Self {
            child,
            base: format!("http://127.0.0.1:{port}"),
            log,
        };
        server.wait_ready().await?;
        Ok(server)
    }

    async fn wait_ready(&self) -> anyhow::Result<()> {
        let client = reqwest::Client::new();
        for _ in 0..400 {
            if let Ok(r) = client.get(format!("{}/readyz", self.base)).send().await
                && r.status().is_success()
            {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        anyhow::bail!(
            "server did not start: {}",
            std::fs::read_to_string(&self.log).unwrap_or_default()
        )
    }

    pub fn webhook_url(&self) -> String {
        format!("{}/webhooks/operator", self.base)
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// SIGKILL, and reap the process.
    #[allow(dead_code)] // used by the fault suite
    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Still running?
    #[allow(dead_code)]
    pub fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    #[allow(dead_code)]
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

/// Resident memory now and at its peak, in MB, from /proc.
pub fn rss_mb(pid: u32) -> (f64, f64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|kb| kb.parse::<f64>().ok())
            .map(|kb| kb / 1024.0)
            .unwrap_or(f64::NAN)
    };
    (field("VmRSS:"), field("VmHWM:"))
}

/// CPU time (user + system) the process has used, in seconds.
pub fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which is in parentheses and may hold spaces).
    let rest = stat.rsplit_once(") ").map(|(_, r)| r).unwrap_or("");
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    // utime and stime are fields 14 and 15 of stat: 12 and 13 after the name.
    (ticks(11) + ticks(12)) / 100.0
}

/// Context switches (voluntary and not) of every thread of `pid` so far:
/// each is a thread going to sleep or being taken off a core, the kernel
/// work that dominates the server's CPU at low rates (BENCHMARKS.md).
pub fn context_switches(pid: u32) -> u64 {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return 0;
    };
    tasks
        .filter_map(|t| t.ok())
        .filter_map(|t| std::fs::read_to_string(t.path().join("status")).ok())
        .flat_map(|status| {
            status
                .lines()
                .filter(|l| l.contains("ctxt_switches:"))
                .filter_map(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
                .collect::<Vec<_>>()
        })
        .sum()
}

/// A sink that answers 200 at once and records when each delivery arrived,
/// keyed by the `event` field of its JSON body.
#[derive(Clone, Default)]
pub struct Sink {
    pub arrivals: Arc<Mutex<HashMap<String, (Instant, u32)>>>,
}

#[handler]
async fn record(body: String, Data(sink): Data<&Sink>) -> Response {
    let event = serde_json::from_str::<serde_json::Value>(&body)
        .ok()
        .and_then(|v| v["event"].as_str().map(str::to_owned))
        .unwrap_or_default();
    let now = Instant::now();
    sink.arrivals
        .lock()
        .unwrap()
        .entry(event)
        .and_modify(|e| e.1 += 1)
        .or_insert((now, 1));
    Response::builder()
        .content_type("application/json")
        .body(r#"{"name":"Ada","plan":"pro"}"#)
}

impl Sink {
    /// Starts the sink; returns it and its base URL.
    pub async fn start() -> anyhow::Result<(Self, String)> {
        let sink = Self::default();
        let acceptor = TcpListener::bind("127.0.0.1:0").into_acceptor().await?;
        let addr = acceptor
            .local_addr()
            .first()
            .and_then(|a| a.as_socket_addr().copied())
            .ok_or_else(|| anyhow::anyhow!("sink has no address"))?;
        let app = Route::new()
            .at("/*", poem::post(record).get(record))
            .data(sink.clone());
        tokio::spawn(poem::Server::new_with_acceptor(acceptor).run(app));
        Ok((sink, format!("http://{addr}")))
    }

    pub fn count(&self) -> usize {
        self.arrivals.lock().unwrap().len()
    }

    /// Waits until `n` distinct deliveries arrived (or `limit` passed); returns when the last did.
    pub async fn wait_for(&self, n: usize, limit: Duration) -> Option<Instant> {
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            {
                let a = self.arrivals.lock().unwrap();
                if a.len() >= n {
                    return a.values().map(|(t, _)| *t).max();
                }
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        None
    }
}

impl Sink {
    /// Starts the sink on a given loopback port (a destination coming back up).
    pub async fn start_on(port: u16) -> anyhow::Result<Self> {
        let sink = Self::default();
        let acceptor = TcpListener::bind(format!("127.0.0.1:{port}"))
            .into_acceptor()
            .await?;
        let app = Route::new()
            .at("/*", poem::post(record).get(record))
            .data(sink.clone());
        tokio::spawn(poem::Server::new_with_acceptor(acceptor).run(app));
        Ok(sink)
    }
}

/// The sum of a metric's series on the server's `/metrics` whose labels contain `labels`
/// (`""`: every series).
pub async fn metric(server: &Server, name: &str, labels: &str) -> anyhow::Result<f64> {
    let text = reqwest::get(format!("{}/metrics", server.base))
        .await?
        .text()
        .await?;
    Ok(text
        .lines()
        .filter(|l| {
            l.strip_prefix(name)
                .is_some_and(|rest| rest.starts_with(' ') || rest.starts_with('{'))
                && l.contains(labels)
        })
        .filter_map(|l| l.rsplit_once(' ').and_then(|(_, v)| v.parse::<f64>().ok()))
        .sum::<f64>()
        + 0.0) // an empty sum is -0
}
