//! The fault-injection suite: the real `switchboard` binary under signed
//! load while things break, then a check of what Switchboard promises.
//!
//! ```text
//! cargo run --release --example faults -- [--long] [--pg postgres://…] [--only kill,outage,pg-restart,two,disk]
//! ```
//!
//! 1. kill: kill -9 at random moments (3 times; 20 with --long), restarting each time;
//! 2. outage: the sink refuses connections for 5 s (60 s with --long), then returns;
//! 3. pg-restart: PostgreSQL stops under load and starts again (needs --pg and the local
//!    cluster: it runs `pg_ctlcluster`, so it must not share the database with anything else);
//! 4. two: two `switchboard serve` on one PostgreSQL, one killed with runs in flight (needs --pg);
//! 5. disk: SQLite on a small tmpfs that fills up, then grows again (needs root to mount).
//!
//! The load behaves like Operator: every delivery is retried (same idempotency key) until it
//! is acknowledged. Each fault prints its counts and fails the program if a promise broke.

#[path = "../bench/load.rs"]
#[allow(dead_code)]
mod load;
#[path = "../bench/server.rs"]
#[allow(dead_code)]
mod server;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use poem::listener::{Acceptor, Listener, TcpListener};
use poem::web::Data;
use poem::{EndpointExt, Response, Route, handler};
use server::Server;
use switchboard::store::runs::RunQuery;
use switchboard::webhook::signature::{SignedParts, SigningKey, sign};

// ---------------------------------------------------------------------------------------------
// A sink that counts Idempotency-Keys and can be taken down and brought back on the same port.

#[derive(Clone, Default)]
struct KeySink {
    keys: Arc<Mutex<HashMap<String, u32>>>,
    /// (key, arrival) in order, to tell first attempts from repeats.
    log: Arc<Mutex<Vec<(String, Instant)>>>,
    delay: Duration,
}

#[handler]
async fn count_key(req: &poem::Request, Data(sink): Data<&KeySink>) -> Response {
    let key = req.header("idempotency-key").unwrap_or("").to_owned();
    *sink.keys.lock().unwrap().entry(key.clone()).or_default() += 1;
    sink.log.lock().unwrap().push((key, Instant::now()));
    if !sink.delay.is_zero() {
        tokio::time::sleep(sink.delay).await;
    }
    Response::builder().body("ok")
}

struct RunningSink {
    port: u16,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
}

impl KeySink {
    async fn serve(&self, port: u16) -> anyhow::Result<RunningSink> {
        let acceptor = TcpListener::bind(format!("127.0.0.1:{port}"))
            .into_acceptor()
            .await?;
        let port = acceptor
            .local_addr()
            .first()
            .and_then(|a| a.as_socket_addr().map(|s| s.port()))
            .unwrap_or(port);
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let app = Route::new()
            .at("/*", poem::post(count_key))
            .data(self.clone());
        tokio::spawn(async move {
            let _ = poem::Server::new_with_acceptor(acceptor)
                .run_with_graceful_shutdown(
                    app,
                    async {
                        let _ = rx.await;
                    },
                    Some(Duration::from_millis(10)),
                )
                .await;
        });
        Ok(RunningSink {
            port,
            stop: Some(tx),
        })
    }

    fn distinct(&self) -> usize {
        self.keys.lock().unwrap().len()
    }
}

impl RunningSink {
    async fn stop(mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        // Until the listener is really gone, connections may still be accepted.
        for _ in 0..100 {
            if std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Operator-like load: each delivery retried with its key until acknowledged.

#[derive(Default)]
struct Outcomes {
    acked: HashSet<String>,
    statuses: BTreeMap<String, u64>,
    /// Per delivery: how many tries before the 200.
    gave_up: u64,
}

struct Load {
    stop: Arc<AtomicBool>,
    outcomes: Arc<Mutex<Outcomes>>,
    task: tokio::task::JoinHandle<()>,
}

fn signed(client: &reqwest::Client, url: &str, idem: &str, body: &str) -> reqwest::RequestBuilder {
    let ts = chrono::Utc::now().timestamp().to_string();
    let sig = sign(
        &SigningKey::new(load::KEY).unwrap(),
        &SignedParts {
            url,
            idempotency_key: idem,
            timestamp: &ts,
            body: body.as_bytes(),
        },
    );
    client
        .post(url)
        .header("X-Timestamp", ts)
        .header("X-Idempotency-Key", idem)
        .header("X-Signature", sig)
        .body(body.to_owned())
}

/// Sends `rate` deliveries/s to whichever URLs `urls` holds (round robin) until stopped.
fn start_load(urls: Arc<RwLock<Vec<String>>>, rate: f64, tag: String) -> Load {
    let stop = Arc::new(AtomicBool::new(false));
    let outcomes: Arc<Mutex<Outcomes>> = Default::default();
    let (s, o) = (stop.clone(), outcomes.clone());
    let task = tokio::spawn(async move {
        let client = reqwest::Client::builder()
            .timeout(Duration::from_secs(5))
            .build()
            .unwrap();
        let mut tasks = Vec::new();
        let mut i = 0u64;
        let interval = Duration::from_secs_f64(1.0 / rate);
        while !s.load(Ordering::Relaxed) {
            let (client, urls, o, tag) = (client.clone(), urls.clone(), o.clone(), tag.clone());
            tasks.push(tokio::spawn(async move {
                let body = load::ended_body(&tag, i);
                let id = format!("ev_{tag}_{i}");
                let idem = uuid::Uuid::new_v4().to_string();
                let give_up = Instant::now() + Duration::from_secs(120);
                let mut attempt = 0usize;
                while Instant::now() < give_up {
                    let url = {
                        let u = urls.read().unwrap();
                        u[(i as usize + attempt) % u.len()].clone()
                    };
                    attempt += 1;
                    let status = match signed(&client, &url, &idem, &body).send().await {
                        Ok(r) => r.status().as_u16().to_string(),
                        Err(e) if e.is_connect() => "connection refused".into(),
                        Err(e) if e.is_timeout() => "timeout".into(),
                        Err(_) => "connection error".into(),
                    };
                    let ok = status == "200";
                    {
                        let mut out = o.lock().unwrap();
                        *out.statuses.entry(status).or_default() += 1;
                        if ok {
                            out.acked.insert(id.clone());
                        }
                    }
                    if ok {
                        return;
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                o.lock().unwrap().gave_up += 1;
            }));
            i += 1;
            tokio::time::sleep(interval).await;
        }
        for t in tasks {
            let _ = t.await;
        }
    });
    Load {
        stop,
        outcomes,
        task,
    }
}

impl Load {
    /// Stops sending new deliveries and waits until every one was acknowledged (or given up).
    async fn finish(self) -> Outcomes {
        self.stop.store(true, Ordering::Relaxed);
        let _ = self.task.await;
        std::mem::take(&mut *self.outcomes.lock().unwrap())
    }
}

// ---------------------------------------------------------------------------------------------

struct Ctx {
    bin: std::path::PathBuf,
    tmp: tempfile::TempDir,
    long: bool,
    pg: Option<String>,
}

fn workflow(dir: &Path, sink_port: u16, retry: &str) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir)?;
    std::fs::write(
        dir.join("faults.yaml"),
        format!(
            "name: faults\non: {{ event: conversation.ended }}\nsteps:\n  - id: post\n    http:\n      url: \"http://127.0.0.1:{sink_port}/k\"\n      json: {{ event: \"{{{{ event.id }}}}\" }}\n    timeout: 5s\n    retry: {retry}\n"
        ),
    )?;
    Ok(())
}

const RETRY: &str =
    "{ max_attempts: 30, backoff: exponential, initial_delay: 200ms, max_delay: 2s }";

fn tag() -> String {
    uuid::Uuid::new_v4().simple().to_string()[..8].to_owned()
}

async fn fresh_pg(admin: &str) -> anyhow::Result<String> {
    use sqlx::Connection;
    let mut c = sqlx::PgConnection::connect(admin).await?;
    let name = format!("sbfault_{}", tag());
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
        .execute(&mut c)
        .await?;
    let mut url = reqwest::Url::parse(admin)?;
    url.set_path(&format!("/{name}"));
    Ok(url.to_string())
}

/// Waits until every run is final; returns (runs, succeeded).
async fn drain(db: &str, expected: usize, limit: Duration) -> anyhow::Result<(usize, usize)> {
    let store = switchboard::store::connect(db).await?;
    let deadline = Instant::now() + limit;
    loop {
        let runs = store
            .list_runs(&RunQuery {
                limit: 100_000,
                ..Default::default()
            })
            .await?;
        let finals = runs
            .iter()
            .filter(|r| r.status().is_some_and(|s| s.is_final()))
            .count();
        let ok = runs.iter().filter(|r| r.status == "succeeded").count();
        if runs.len() >= expected && finals == runs.len() {
            return Ok((runs.len(), ok));
        }
        if Instant::now() > deadline {
            anyhow::bail!(
                "runs not final after {limit:?}: {} runs, {finals} final, {ok} succeeded",
                runs.len()
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Events stored, and how many distinct event ids among them.
async fn stored_events(db: &str) -> anyhow::Result<(usize, HashSet<String>)> {
    let store = switchboard::store::connect(db).await?;
    let stats = store.stats(chrono::Utc::now()).await?;
    let mut ids = HashSet::new();
    let mut q = switchboard::store::EventQuery {
        limit: 1000,
        ..Default::default()
    };
    loop {
        let page = store.list_events(&q).await?;
        let Some(last) = page.last() else { break };
        q.cursor = Some(last.seq);
        ids.extend(page.iter().map(|e| e.event_id.clone()));
    }
    Ok((stats.events as usize, ids))
}

/// Sends new deliveries until one is acknowledged; how long that took (`None` after `limit`).
async fn until_acknowledged(url: &str, limit: Duration) -> Option<Duration> {
    let client = reqwest::Client::new();
    let start = Instant::now();
    while start.elapsed() < limit {
        let body = load::ended_body(&tag(), 0);
        let idem = uuid::Uuid::new_v4().to_string();
        if let Ok(r) = signed(&client, url, &idem, &body).send().await
            && r.status() == 200
        {
            return Some(start.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    None
}

fn check(ok: bool, what: &str, failures: &mut Vec<String>) {
    println!("  [{}] {what}", if ok { "ok" } else { "FAIL" });
    if !ok {
        failures.push(what.to_owned());
    }
}

/// 1. kill -9 at random moments under load.
async fn kill_loop(ctx: &Ctx, db: &str, label: &str) -> anyhow::Result<Vec<String>> {
    let kills = if ctx.long { 20 } else { 3 };
    println!("\n== kill -9 loop on {label}: {kills} kills under 100 deliveries/s");
    let sink = KeySink::default();
    let running = sink.serve(0).await?;
    let wf = ctx.tmp.path().join(format!("wf-{}", tag()));
    workflow(&wf, running.port, RETRY)?;
    let mut srv = Server::start(&ctx.bin, db, &wf, ctx.tmp.path(), &[]).await?;
    let urls = Arc::new(RwLock::new(vec![srv.webhook_url()]));
    let load = start_load(urls.clone(), 100.0, tag());
    for _ in 0..kills {
        let wait = Duration::from_millis(300 + rand::random::<u64>() % 1200);
        tokio::time::sleep(wait).await;
        srv.kill9();
        srv = Server::start(&ctx.bin, db, &wf, ctx.tmp.path(), &[]).await?;
        *urls.write().unwrap() = vec![srv.webhook_url()];
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let out = load.finish().await;
    let (runs, ok) = drain(db, out.acked.len(), Duration::from_secs(60)).await?;
    let (events, ids) = stored_events(db).await?;
    let keys = sink.keys.lock().unwrap().clone();
    let total: u32 = keys.values().sum();
    let repeats = total as usize - keys.len();
    println!(
        "  acknowledged {}, stored {events} ({} distinct), runs {runs} ({ok} succeeded), \
         sink: {} keys, {total} requests ({repeats} repeats), statuses {:?}, gave up {}",
        out.acked.len(),
        ids.len(),
        keys.len(),
        out.statuses,
        out.gave_up
    );
    let mut f = Vec::new();
    check(
        out.gave_up == 0,
        "every delivery was acknowledged in the end",
        &mut f,
    );
    check(
        events == ids.len()
            && out.acked.iter().all(|id| ids.contains(id))
            && events == out.acked.len(),
        "every acknowledged event stored exactly once, and nothing else",
        &mut f,
    );
    check(runs == events, "exactly one run per event", &mut f);
    check(ok == runs, "every run succeeded", &mut f);
    check(
        keys.len() == runs,
        "the sink saw every run's Idempotency-Key",
        &mut f,
    );
    // A repeat is an attempt that was in flight at a kill (sent, its outcome not yet
    // committed): at most the runs in flight per kill, four run slots per request slot (32).
    check(
        repeats <= kills * 32 * 4,
        &format!("repeats ({repeats}) are bounded by the attempts in flight at {kills} kills"),
        &mut f,
    );
    running.stop().await;
    Ok(f)
}

/// 2. The sink refuses connections for a while, then returns.
async fn outage(ctx: &Ctx, db: &str, label: &str) -> anyhow::Result<Vec<String>> {
    let down = Duration::from_secs(if ctx.long { 60 } else { 5 });
    println!("\n== sink outage on {label}: connections refused for {down:?}");
    let sink = KeySink::default();
    let port = server::free_port();
    let wf = ctx.tmp.path().join(format!("wf-{}", tag()));
    let retry = if ctx.long {
        // Full jitter: 11 delays under caps 1, 2, 4, … 30 s sum to 105 s on average but to
        // less than the 59 s outage about once in 60 runs, and a run that spends all its
        // attempts inside the outage fails as promised. 20 attempts outlast it (the chance
        // that 19 such delays sum to under 59 s is about 1 in 5 million).
        "{ max_attempts: 20, backoff: exponential, initial_delay: 1s, max_delay: 30s }"
    } else {
        // Full jitter can spend 10 attempts inside a 5 s outage (about one run in 150):
        // the promise is "while max_attempts allows", so allow enough to outlast it.
        "{ max_attempts: 20, backoff: exponential, initial_delay: 200ms, max_delay: 3s }"
    };
    workflow(&wf, port, retry)?;
    let srv = Server::start(&ctx.bin, db, &wf, ctx.tmp.path(), &[]).await?;
    let urls = Arc::new(RwLock::new(vec![srv.webhook_url()]));
    let load = start_load(urls, 20.0, tag());
    tokio::time::sleep(Duration::from_secs(1)).await;
    let out = load.finish().await;
    tokio::time::sleep(down.saturating_sub(Duration::from_secs(1))).await;
    let running = sink.serve(port).await?;
    let (runs, ok) = drain(db, out.acked.len(), down * 2 + Duration::from_secs(60)).await?;
    let store = switchboard::store::connect(db).await?;
    let some = store
        .list_runs(&RunQuery {
            limit: 1,
            ..Default::default()
        })
        .await?;
    let schedule: Vec<String> = match some.first() {
        Some(r) => store
            .attempts(&r.run_id)
            .await?
            .iter()
            .map(|a| match a.next_delay_ms {
                Some(d) => format!(
                    "{} → wait {:.1}s",
                    a.error_class.as_deref().unwrap_or("ok"),
                    d as f64 / 1e3
                ),
                None => a.outcome.clone(),
            })
            .collect(),
        None => vec![],
    };
    println!(
        "  runs {runs} ({ok} succeeded); sink saw {} keys; one run's attempts: {}",
        sink.distinct(),
        schedule.join(", ")
    );
    let failed = store
        .list_runs(&RunQuery {
            limit: 100_000,
            ..Default::default()
        })
        .await?
        .into_iter()
        .filter(|r| r.status != "succeeded");
    for r in failed {
        println!(
            "  not succeeded: {} {} after {} attempts: {}",
            r.run_id,
            r.status,
            r.attempts_total,
            r.last_error.as_deref().unwrap_or("-")
        );
    }
    let mut f = Vec::new();
    check(
        runs == out.acked.len() && runs > 0,
        "one run per acknowledged event",
        &mut f,
    );
    check(
        ok == runs,
        "every run completed once the sink returned; none failed",
        &mut f,
    );
    check(
        schedule.len() >= 2 && schedule.last().is_some_and(|s| s == "succeeded"),
        "attempts show the backoff schedule, ending in success",
        &mut f,
    );
    running.stop().await;
    Ok(f)
}

fn pg_ctl(action: &str) -> anyhow::Result<()> {
    let version = std::fs::read_dir("/etc/postgresql")?
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .next()
        .ok_or_else(|| anyhow::anyhow!("no cluster under /etc/postgresql"))?;
    let mut args = vec![
        "--skip-systemctl-redirect",
        version.as_str(),
        "main",
        action,
    ];
    if action == "stop" {
        args.extend(["-m", "fast"]);
    }
    let status = Command::new("pg_ctlcluster").args(&args).status()?;
    anyhow::ensure!(status.success(), "pg_ctlcluster {action} failed");
    Ok(())
}

/// 3. PostgreSQL stops under load, then starts again.
async fn pg_restart(ctx: &Ctx, admin: &str) -> anyhow::Result<Vec<String>> {
    println!("\n== PostgreSQL restart under 100 deliveries/s");
    let db = fresh_pg(admin).await?;
    let sink = KeySink::default();
    let running = sink.serve(0).await?;
    let wf = ctx.tmp.path().join(format!("wf-{}", tag()));
    workflow(&wf, running.port, RETRY)?;
    let mut srv = Server::start(&ctx.bin, &db, &wf, ctx.tmp.path(), &[]).await?;
    let urls = Arc::new(RwLock::new(vec![srv.webhook_url()]));
    let load = start_load(urls, 100.0, tag());
    tokio::time::sleep(Duration::from_secs(2)).await;
    pg_ctl("stop")?;
    let stopped = Instant::now();
    // Long enough for deliveries to be refused: a batch gives up after the store's 2-3 s timeouts.
    tokio::time::sleep(Duration::from_secs(if ctx.long { 20 } else { 6 })).await;
    let during = load.outcomes.lock().unwrap().statuses.clone();
    pg_ctl("start")?;
    let started = Instant::now();
    // Recovery: the first delivery acknowledged after PostgreSQL is back.
    let recovered = until_acknowledged(&srv.webhook_url(), Duration::from_secs(60))
        .await
        .map(|_| started.elapsed());
    tokio::time::sleep(Duration::from_secs(2)).await;
    let out = load.finish().await;
    let alive = srv.alive();
    let (runs, ok) = drain(&db, out.acked.len(), Duration::from_secs(60)).await?;
    let (events, ids) = stored_events(&db).await?;
    let log = srv.log_text();
    let store_errors = log.matches("could not store webhooks").count();
    println!(
        "  down {:?}; statuses while down and after: {during:?} → {:?}; recovered {:?} after start; \
         acknowledged {}, stored {events}; runs {runs} ({ok} succeeded); 'could not store' logged {store_errors}×",
        started.duration_since(stopped),
        out.statuses,
        recovered,
        out.acked.len()
    );
    let mut f = Vec::new();
    check(alive, "the server did not exit", &mut f);
    let refused = during.get("503").copied().unwrap_or(0);
    check(
        refused >= 50,
        &format!("webhooks got 503 while PostgreSQL was down ({refused}), not a hang"),
        &mut f,
    );
    check(
        during.keys().all(|s| s == "200" || s == "503"),
        "nothing but 200 and 503 (no connection errors, no 500)",
        &mut f,
    );
    check(
        recovered.is_some_and(|d| d < Duration::from_secs(10)),
        "recovered by itself within seconds of PostgreSQL's return",
        &mut f,
    );
    check(
        out.acked.iter().all(|id| ids.contains(id)) && out.gave_up == 0,
        "nothing acknowledged was lost",
        &mut f,
    );
    check(ok == runs, "every run succeeded", &mut f);
    if !f.is_empty() {
        let tail: Vec<&str> = log.lines().rev().take(15).collect();
        println!(
            "  server log (last lines, newest first):\n    {}",
            tail.join("\n    ")
        );
    }
    srv.kill9();
    running.stop().await;
    Ok(f)
}

/// 4. Two instances on one PostgreSQL; one is killed with runs in flight.
async fn two_instances(ctx: &Ctx, admin: &str) -> anyhow::Result<Vec<String>> {
    println!("\n== two instances on one PostgreSQL; one killed with runs in flight");
    let db = fresh_pg(admin).await?;
    let sink = KeySink {
        delay: Duration::from_millis(300),
        ..Default::default()
    };
    let running = sink.serve(0).await?;
    let wf = ctx.tmp.path().join(format!("wf-{}", tag()));
    workflow(&wf, running.port, RETRY)?;
    let mut a = Server::start(&ctx.bin, &db, &wf, ctx.tmp.path(), &[]).await?;
    let b = Server::start(&ctx.bin, &db, &wf, ctx.tmp.path(), &[]).await?;
    let urls = Arc::new(RwLock::new(vec![a.webhook_url(), b.webhook_url()]));
    let load = start_load(urls.clone(), 60.0, tag());
    tokio::time::sleep(Duration::from_secs(if ctx.long { 20 } else { 4 })).await;
    let killed_at = Instant::now();
    a.kill9();
    *urls.write().unwrap() = vec![b.webhook_url()];
    tokio::time::sleep(Duration::from_secs(2)).await;
    let out = load.finish().await;
    let (runs, ok) = drain(&db, out.acked.len(), Duration::from_secs(60)).await?;
    let log = sink.log.lock().unwrap().clone();
    let mut seen_before: HashMap<&str, u32> = HashMap::new();
    for (k, at) in &log {
        if *at < killed_at {
            *seen_before.entry(k.as_str()).or_default() += 1;
        }
    }
    let dup_before = seen_before.values().filter(|n| **n > 1).count();
    let keys = sink.keys.lock().unwrap().clone();
    let repeated = keys.values().filter(|n| **n > 1).count();
    println!(
        "  acknowledged {}, runs {runs} ({ok} succeeded); sink: {} keys; before the kill {} keys, \
         {dup_before} seen twice; repeats overall {repeated} (attempts in flight at the kill)",
        out.acked.len(),
        keys.len(),
        seen_before.len()
    );
    let mut f = Vec::new();
    check(
        dup_before == 0,
        "no run's first attempt was made by both instances",
        &mut f,
    );
    check(
        runs == out.acked.len() && ok == runs,
        "every run executed and succeeded",
        &mut f,
    );
    check(
        keys.len() == runs,
        "the survivor took over the killed instance's runs",
        &mut f,
    );
    check(
        repeated <= 32 * 4,
        "repeats bounded by the killed instance's runs in flight (four run slots per request slot)",
        &mut f,
    );
    running.stop().await;
    Ok(f)
}

fn mount(args: &[&str]) -> anyhow::Result<()> {
    let status = Command::new("mount").args(args).status()?;
    anyhow::ensure!(status.success(), "mount {args:?} failed");
    Ok(())
}

/// Fault 5: a full disk under SQLite. A read-only remount is refused while
/// SQLite holds the file open for writing, and root ignores file modes, so
/// the read-only case is not simulated here.
async fn disk(ctx: &Ctx) -> anyhow::Result<Vec<String>> {
    println!("\n== SQLite on a full disk (a 3 MB tmpfs), then room again");
    let dir = ctx.tmp.path().join(format!("disk-{}", tag()));
    std::fs::create_dir_all(&dir)?;
    if let Err(e) = mount(&[
        "-t",
        "tmpfs",
        "-o",
        "size=3m",
        "tmpfs",
        dir.to_str().unwrap(),
    ]) {
        println!("  skipped: cannot mount a tmpfs here ({e}); this fault needs root");
        return Ok(vec![]);
    }
    struct Unmount(std::path::PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = Command::new("umount").arg(&self.0).status();
        }
    }
    let _unmount = Unmount(dir.clone());
    let db = format!("sqlite://{}/sb.db", dir.display());
    let empty = ctx.tmp.path().join(format!("empty-{}", tag()));
    std::fs::create_dir_all(&empty)?;
    let mut srv = Server::start(
        &ctx.bin,
        &db,
        &empty,
        ctx.tmp.path(),
        &[("RUST_LOG", "error")],
    )
    .await?;
    let client = reqwest::Client::new();
    let t = tag();
    let mut statuses: BTreeMap<u16, u64> = BTreeMap::new();
    let mut acked = 0u64;
    let start = Instant::now();
    // Fill the disk: bodies of ~8 KB until 503s come back steadily.
    let pad = "x".repeat(8000);
    let mut i = 0u64;
    while start.elapsed() < Duration::from_secs(30) && statuses.get(&503).copied().unwrap_or(0) < 50
    {
        let body = serde_json::json!({"id": format!("ev_{t}_{i}"), "conversation_id": format!("c_{t}_{i}"),
            "payload": {"type": "conversation.ended", "status": "completed", "pad": pad}})
        .to_string();
        i += 1;
        let url = srv.webhook_url();
        match signed(&client, &url, &uuid::Uuid::new_v4().to_string(), &body)
            .send()
            .await
        {
            Ok(r) => {
                *statuses.entry(r.status().as_u16()).or_default() += 1;
                if r.status() == 200 {
                    acked += 1;
                }
            }
            Err(_) => *statuses.entry(0).or_default() += 1,
        }
    }
    let full_alive = srv.alive();
    let logged = srv.log_text().matches("could not store webhooks").count();
    // Room again: the next deliveries are stored.
    mount(&["-o", "remount,size=64m", dir.to_str().unwrap()])?;
    let recovered_full = until_acknowledged(&srv.webhook_url(), Duration::from_secs(15))
        .await
        .is_some();
    let elapsed = start.elapsed();
    let (events, _) = stored_events(&db).await?;
    println!(
        "  disk full: {statuses:?} (acknowledged {acked}); error logged {logged}× in {:.0} s; stored {events}",
        elapsed.as_secs_f64()
    );
    let mut f = Vec::new();
    check(
        statuses.get(&503).copied().unwrap_or(0) > 0,
        "a full disk gives 503",
        &mut f,
    );
    check(
        statuses.keys().all(|s| *s == 200 || *s == 503),
        "nothing but 200 and 503 while the disk fills",
        &mut f,
    );
    check(full_alive, "the server did not crash", &mut f);
    check(
        logged >= 1 && logged as f64 <= elapsed.as_secs_f64() / 10.0 + 2.0,
        &format!("the error is logged once per 10 s interval ({logged}×), not per request"),
        &mut f,
    );
    check(
        recovered_full,
        "it recovers by itself once there is room again",
        &mut f,
    );
    check(
        events as u64 >= acked,
        "everything acknowledged is stored",
        &mut f,
    );
    if !f.is_empty() {
        let log = srv.log_text();
        let tail: Vec<&str> = log.lines().rev().take(10).collect();
        println!(
            "  server log (last lines, newest first):\n    {}",
            tail.join("\n    ")
        );
    }
    srv.kill9();
    Ok(f)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let mut long = false;
    let mut pg = None;
    let mut only: Option<Vec<String>> = None;
    let mut build = true;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--long" => long = true,
            "--pg" => pg = args.next(),
            "--only" => {
                only = args
                    .next()
                    .map(|s| s.split(',').map(String::from).collect())
            }
            "--no-build" => build = false,
            other => {
                anyhow::bail!("unknown argument {other}; see the header of examples/faults/main.rs")
            }
        }
    }
    let ctx = Ctx {
        bin: server::binary(build)?,
        tmp: tempfile::tempdir()?,
        long,
        pg,
    };
    let wants = |name: &str| only.as_ref().is_none_or(|o| o.iter().any(|x| x == name));
    let started = Instant::now();
    let mut failures: Vec<String> = Vec::new();
    let mut record = |name: &str, r: anyhow::Result<Vec<String>>| match r {
        Ok(f) => failures.extend(f.into_iter().map(|x| format!("{name}: {x}"))),
        Err(e) => failures.push(format!("{name}: {e:#}")),
    };
    if wants("kill") {
        let db = format!("sqlite://{}/kill.db", ctx.tmp.path().display());
        record("kill (sqlite)", kill_loop(&ctx, &db, "SQLite").await);
        if let Some(admin) = &ctx.pg {
            match fresh_pg(admin).await {
                Ok(db) => record("kill (postgres)", kill_loop(&ctx, &db, "PostgreSQL").await),
                Err(e) => record("kill (postgres)", Err(e)),
            }
        }
    }
    if wants("outage") {
        let db = format!("sqlite://{}/outage.db", ctx.tmp.path().display());
        record("outage", outage(&ctx, &db, "SQLite").await);
    }
    match (&ctx.pg, wants("pg-restart"), wants("two")) {
        (Some(admin), restart, two) => {
            if two {
                record("two instances", two_instances(&ctx, admin).await);
            }
            if restart {
                record("pg-restart", pg_restart(&ctx, admin).await);
            }
        }
        (None, true, _) | (None, _, true) => {
            println!("\nskipped: pg-restart and two instances need --pg postgres://…")
        }
        _ => {}
    }
    if wants("disk") {
        record("disk", disk(&ctx).await);
    }
    println!(
        "\nfault suite finished in {:.0} s",
        started.elapsed().as_secs_f64()
    );
    if failures.is_empty() {
        println!("all promises held");
        Ok(())
    } else {
        for f in &failures {
            println!("FAILED {f}");
        }
        anyhow::bail!("{} promise(s) broken", failures.len())
    }
}
