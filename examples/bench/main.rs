//! The benchmark suite: the release server as a child process, loaded by
//! a signing load generator, on SQLite and/or PostgreSQL; every figure is
//! printed next to the machine's own ceilings (see `ceilings.rs`).
//!
//! ```text
//! cargo run --release --example bench -- [--pg postgres://…] [--no-sqlite]
//!     [--scenarios ingest,e2e,setup,growth,idle,destinations] [--duration 10s] [--growth 10000,100000]
//!     [--idle 60s] [--json results.json] [--smoke] [--no-build]
//!     [--waits 100000] [--outage 60s] [--rounds 3]
//! ```
//!
//! Scenarios (each on every backend asked for):
//! 1. ingest: no workflows, 64 connections at maximum rate; then a fixed 50 % of that rate;
//! 2. e2e: one conversation.ended workflow posting to a local sink: a fixed 200/s and a fixed
//!    300/s (ack → sink latency), then a burst as fast as possible (ten times the 300/s phase's
//!    messages: about 10 s at full load with the default duration) until the sink has every
//!    delivery, with how long the queue took to drain after the last ack;
//!
//! Ingest and e2e also print what each phase costs per message (per event acked for ingest, per
//! delivery for e2e): database transactions (`tx/msg`) and CPU ms of the server (`srv ms`) and
//! of the PostgreSQL backends serving its database (`db ms`); see `cost.rs` for what is counted.
//! 3. setup: a static answer at a fixed 500/s; an answer with one lookup to the sink at 200/s;
//! 4. growth: with 10k, 100k (, 1M) events stored: ingest rate and admin list latency;
//! 5. idle: RSS after start and after the idle period, CPU used while idle.
//!
//! `destinations` (not in the default list): 500 runs to a destination limited to 50/s, the
//! gate's cost per request, and ack → sink latency with a breaker-only `default:`
//! (see `destinations.rs`).
//!
//! `waits` (not in the default list): `--waits` waiting runs (half `wait`, half `wait_for`)
//! created through the server; idle CPU and RSS over them, ingest beside them vs. the same
//! store with its runs finished (a copy; PostgreSQL: both `VACUUM ANALYZE`d), resume latency
//! of `wait_for` and of a short `wait` (see `waits.rs`).
//!
//! `outage` (not in the default list): a destination refusing connections for `--outage`
//! with 1,000 runs queued (`max_attempts: 3`): probes per cool-down, time to drain after the
//! recovery, a healthy destination's ack → sink p99 during and without it (see `outage.rs`).
//! `shared-rate` (PostgreSQL only, not in the default list): two instances sharing `rate: 50/s`.
//! `dest-overhead` (not in the default list): the fixed 300/s phase of scenario 2 with no
//! `destinations.yaml`, with a breaker-only `default:` and with an entry without limits, in
//! interleaved rounds (`--rounds`, at least 3); medians and differences (see `destinations.rs`).

mod ceilings;
#[path = "../common/mod.rs"]
mod common;
mod cost;
mod destinations;
mod load;
mod outage;
mod server;
mod waits;

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use cost::{Cost, Probe};
use load::{Sample, Target};
use serde_json::{Value, json};
use server::{Server, Sink};

struct Options {
    backends: Vec<String>,
    scenarios: Vec<String>,
    duration: Duration,
    growth: Vec<usize>,
    idle: Duration,
    json: Option<String>,
    connections: usize,
    build: bool,
    /// Waiting runs for `waits`.
    waits: usize,
    /// How long the destination of `outage` is down (issue 14: 60 s).
    outage: Duration,
    /// Rounds of `dest-overhead` (at least 3).
    rounds: usize,
}

fn parse_args() -> anyhow::Result<Options> {
    let mut o = Options {
        backends: vec!["sqlite".into()],
        scenarios: ["ingest", "e2e", "setup", "growth", "idle"]
            .map(String::from)
            .to_vec(),
        duration: Duration::from_secs(10),
        growth: vec![10_000, 100_000],
        idle: Duration::from_secs(60),
        json: None,
        connections: 64,
        build: true,
        waits: 100_000,
        outage: Duration::from_secs(60),
        rounds: 3,
    };
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut value = || {
            args.next()
                .ok_or_else(|| anyhow::anyhow!("{a} needs a value"))
        };
        match a.as_str() {
            "--pg" => o.backends.push(value()?),
            "--no-sqlite" => o.backends.retain(|b| b != "sqlite"),
            "--scenarios" => o.scenarios = value()?.split(',').map(String::from).collect(),
            "--duration" => o.duration = humantime::parse_duration(&value()?)?,
            "--growth" => {
                o.growth = value()?
                    .split(',')
                    .map(|n| n.trim().replace('_', "").parse())
                    .collect::<Result<_, _>>()?
            }
            "--idle" => o.idle = humantime::parse_duration(&value()?)?,
            "--json" => o.json = Some(value()?),
            "--connections" => o.connections = value()?.parse()?,
            "--no-build" => o.build = false,
            "--waits" => o.waits = value()?.replace('_', "").parse()?,
            "--outage" => o.outage = humantime::parse_duration(&value()?)?,
            "--rounds" => o.rounds = value()?.parse()?,
            "--smoke" => {
                o.duration = Duration::from_secs(1);
                o.growth = vec![1_000];
                o.idle = Duration::from_secs(2);
                o.connections = 16;
                o.waits = 2_000;
                o.outage = Duration::from_secs(8);
            }
            other => {
                anyhow::bail!("unknown argument {other}; see the header of examples/bench/main.rs")
            }
        }
    }
    anyhow::ensure!(
        !o.backends.is_empty(),
        "no backend: drop --no-sqlite or add --pg URL"
    );
    Ok(o)
}

/// One line of the report.
#[derive(Clone)]
struct Row {
    scenario: String,
    backend: String,
    rate: f64,
    p50: f64,
    p90: f64,
    p99: f64,
    max: f64,
    errors: u64,
    rss_peak_mb: f64,
    note: String,
    /// Transactions and CPU per message, where measured.
    cost: Option<Cost>,
}

impl Row {
    fn from_sample(scenario: &str, backend: &str, s: &Sample, rss: f64, note: String) -> Self {
        Self {
            scenario: scenario.into(),
            backend: backend.into(),
            rate: s.rate(),
            p50: s.pct(0.5),
            p90: s.pct(0.9),
            p99: s.pct(0.99),
            max: s.pct(1.0),
            errors: s.errors,
            rss_peak_mb: rss,
            note,
            cost: None,
        }
    }

    /// A row with a rate or none, and a note, but no latencies.
    fn note_only(scenario: &str, backend: &str, rate: f64, errors: u64, note: String) -> Self {
        Self {
            scenario: scenario.into(),
            backend: backend.into(),
            rate,
            p50: f64::NAN,
            p90: f64::NAN,
            p99: f64::NAN,
            max: f64::NAN,
            errors,
            rss_peak_mb: f64::NAN,
            note,
            cost: None,
        }
    }

    fn json(&self) -> Value {
        json!({"scenario": self.scenario, "backend": self.backend, "per_second": self.rate,
               "p50_ms": self.p50, "p90_ms": self.p90, "p99_ms": self.p99, "max_ms": self.max,
               "errors": self.errors, "server_rss_peak_mb": self.rss_peak_mb, "note": self.note,
               "cost": self.cost.as_ref().map(Cost::json)})
    }
}

fn print_rows(rows: &[Row]) {
    println!(
        "\n{:<40} {:<9} {:>10} {:>8} {:>8} {:>8} {:>8} {:>7} {:>8} {:>6} {:>7} {:>7}  note",
        "scenario",
        "backend",
        "per s",
        "p50 ms",
        "p90 ms",
        "p99 ms",
        "max ms",
        "errors",
        "RSS MB",
        "tx/msg",
        "srv ms",
        "db ms"
    );
    for r in rows {
        let (tx, srv, db) = r.cost.as_ref().map_or((f64::NAN, f64::NAN, f64::NAN), |c| {
            (c.tx_per_msg, c.server_cpu_ms, c.db_cpu_ms)
        });
        let mut note = r.note.clone();
        if let Some(c) = &r.cost
            && c.server_switches.is_finite()
        {
            note.push_str(&format!(
                "; {:.1} server context switches/msg",
                c.server_switches
            ));
        }
        if let Some(c) = &r.cost
            && c.shared_cpu_ms.is_finite()
        {
            note.push_str(&format!(
                "; PG shared background {:.3} CPU ms/msg (whole cluster)",
                c.shared_cpu_ms
            ));
        }
        println!(
            "{:<40} {:<9} {:>10.0} {:>8.2} {:>8.2} {:>8.2} {:>8.2} {:>7} {:>8.1} {:>6.2} {:>7.3} {:>7.3}  {}",
            r.scenario,
            r.backend,
            r.rate,
            r.p50,
            r.p90,
            r.p99,
            r.max,
            r.errors,
            r.rss_peak_mb,
            tx,
            srv,
            db,
            note
        );
    }
}

fn write_workflow(dir: &Path, name: &str, text: &str) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir)?;
    std::fs::write(dir.join(name), text)?;
    Ok(())
}

fn tag() -> String {
    uuid::Uuid::new_v4().simple().to_string()[..8].to_owned()
}

/// A fresh database for one scenario: a new SQLite file, or a new PostgreSQL database.
async fn fresh_db(backend: &str, tmp: &Path) -> anyhow::Result<String> {
    if backend == "sqlite" {
        return Ok(format!("sqlite://{}/bench-{}.db", tmp.display(), tag()));
    }
    use sqlx::Connection;
    let mut admin = sqlx::PgConnection::connect(backend).await?;
    let name = format!("sbbench_{}", tag());
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
        .execute(&mut admin)
        .await?;
    let mut url = reqwest::Url::parse(backend)?;
    url.set_path(&format!("/{name}"));
    Ok(url.to_string())
}

async fn drop_db(backend: &str, url: &str) {
    if backend == "sqlite" {
        return;
    }
    use sqlx::Connection;
    if let (Ok(mut admin), Some((_, name))) = (
        sqlx::PgConnection::connect(backend).await,
        url.rsplit_once('/'),
    ) {
        let _ = sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
            "DROP DATABASE IF EXISTS {name} WITH (FORCE)"
        )))
        .execute(&mut admin)
        .await;
    }
}

fn backend_name(b: &str) -> &'static str {
    if b == "sqlite" { "sqlite" } else { "postgres" }
}

struct Ctx {
    bin: std::path::PathBuf,
    tmp: tempfile::TempDir,
    o: Options,
}

fn target(server: &Server, connections: usize, body: load::MakeBody) -> Target {
    Target {
        client: load::client(connections),
        url: server.webhook_url(),
        signed: true,
        make_body: body,
        on_ack: None,
    }
}

async fn ingest(ctx: &Ctx, backend: &str, rows: &mut Vec<Row>) -> anyhow::Result<f64> {
    let b = backend_name(backend);
    let db = fresh_db(backend, ctx.tmp.path()).await?;
    let empty = ctx.tmp.path().join(format!("empty-{}", tag()));
    std::fs::create_dir_all(&empty)?;
    let probe = Probe::new(backend, &db);
    let startup = probe
        .startup_xacts(&ctx.bin, &db, &empty, ctx.tmp.path())
        .await?;
    let fresh_target = |server: &Server| {
        let t = tag();
        target(
            server,
            ctx.o.connections,
            Arc::new(move |i| load::ended_body(&t, i)),
        )
    };
    // Each phase on a server of its own (see cost.rs).
    let xacts = probe.settled_xacts().await?;
    let server = Server::start(&ctx.bin, &db, &empty, ctx.tmp.path(), &[]).await?;
    // Warm-up: connections, caches, the database file.
    let warm = load::max_rate(
        &fresh_target(&server),
        ctx.o.connections,
        Duration::from_millis(500),
        None,
    )
    .await;
    let phase = probe.begin(&server, xacts, warm.ok).await?;
    let max = load::max_rate(
        &fresh_target(&server),
        ctx.o.connections,
        ctx.o.duration,
        None,
    )
    .await;
    let (_, peak) = server::rss_mb(server.pid());
    let mut row = Row::from_sample(
        "1. ingest, max rate",
        b,
        &max,
        peak,
        format!("{} connections", ctx.o.connections),
    );
    row.cost = Some(probe.end(phase, server, max.ok, startup).await?);
    rows.push(row);
    let half = (max.rate() / 2.0).max(1.0);
    let xacts = probe.settled_xacts().await?;
    let server = Server::start(&ctx.bin, &db, &empty, ctx.tmp.path(), &[]).await?;
    let phase = probe.begin(&server, xacts, 0).await?;
    let fixed = load::fixed_rate(&fresh_target(&server), half, ctx.o.duration).await;
    let (_, peak) = server::rss_mb(server.pid());
    let mut row = Row::from_sample(
        "1. ingest, 50 % of max",
        b,
        &fixed,
        peak,
        format!("fixed {half:.0}/s"),
    );
    row.cost = Some(probe.end(phase, server, fixed.ok, startup).await?);
    rows.push(row);
    drop_db(backend, &db).await;
    Ok(max.rate())
}

/// The e2e scenario's database, workflow and sink.
struct E2e<'a> {
    ctx: &'a Ctx,
    db: String,
    wf: std::path::PathBuf,
    sink: Sink,
    probe: Probe,
    startup: i64,
}

impl E2e<'_> {
    /// A fixed rate on a server of its own: latency from the acknowledgement to the sink's receipt.
    async fn fixed(&self, b: &str, rate: f64) -> anyhow::Result<Row> {
        let ctx = self.ctx;
        let xacts = self.probe.settled_xacts().await?;
        let server = Server::start(&ctx.bin, &self.db, &self.wf, ctx.tmp.path(), &[]).await?;
        let phase = self.probe.begin(&server, xacts, 0).await?;
        let acks: Arc<Mutex<HashMap<u64, Instant>>> = Default::default();
        let t = tag();
        let body_tag = t.clone();
        let mut tgt = target(
            &server,
            ctx.o.connections,
            Arc::new(move |i| load::ended_body(&body_tag, i)),
        );
        let acks2 = acks.clone();
        tgt.on_ack = Some(Arc::new(move |i, at| {
            acks2.lock().unwrap().insert(i, at);
        }));
        let before = self.sink.count();
        let fixed = load::fixed_rate(&tgt, rate, ctx.o.duration).await;
        self.sink
            .wait_for(before + fixed.ok as usize, Duration::from_secs(30))
            .await;
        let mut lat: Vec<Duration> = {
            let acks = acks.lock().unwrap();
            let arrivals = self.sink.arrivals.lock().unwrap();
            acks.iter()
                .filter_map(|(i, acked)| {
                    let (arrived, _) = arrivals.get(&format!("ev_{t}_{i}"))?;
                    Some(arrived.saturating_duration_since(*acked))
                })
                .collect()
        };
        lat.sort();
        let (_, peak) = server::rss_mb(server.pid());
        let delivered = lat.len() as u64;
        let cost = self
            .probe
            .end(phase, server, delivered, self.startup)
            .await?;
        Ok(Row {
            scenario: format!("2. end to end, {rate:.0}/s: ack → sink"),
            backend: b.into(),
            rate: delivered as f64 / fixed.elapsed.as_secs_f64(),
            p50: load::pct(&lat, 0.5),
            p90: load::pct(&lat, 0.9),
            p99: load::pct(&lat, 0.99),
            max: load::pct(&lat, 1.0),
            errors: fixed.errors + fixed.ok - delivered,
            rss_peak_mb: peak,
            note: format!(
                "{delivered} delivered; ack p99 {:.2} ms; sink before ack counts as 0",
                fixed.pct(0.99)
            ),
            cost: Some(cost),
        })
    }

    /// As fast as possible: `n` deliveries, until the sink has them all.
    async fn max(&self, b: &str, n: usize) -> anyhow::Result<Row> {
        let ctx = self.ctx;
        let xacts = self.probe.settled_xacts().await?;
        let server = Server::start(&ctx.bin, &self.db, &self.wf, ctx.tmp.path(), &[]).await?;
        let phase = self.probe.begin(&server, xacts, 0).await?;
        let before = self.sink.count();
        let t = tag();
        let tgt = target(
            &server,
            ctx.o.connections,
            Arc::new(move |i| load::ended_body(&t, i)),
        );
        let start = Instant::now();
        let sent = load::max_rate(
            &tgt,
            ctx.o.connections,
            Duration::from_secs(600),
            Some(n as u64),
        )
        .await;
        let last = self
            .sink
            .wait_for(before + sent.ok as usize, Duration::from_secs(120))
            .await;
        let took = last
            .map(|l| l.duration_since(start))
            .unwrap_or(Duration::MAX);
        let delivered = (self.sink.count() - before) as u64;
        let (_, peak) = server::rss_mb(server.pid());
        let cost = self
            .probe
            .end(phase, server, delivered, self.startup)
            .await?;
        Ok(Row {
            scenario: "2. end to end, max: deliveries".into(),
            backend: b.into(),
            rate: sent.ok as f64 / took.as_secs_f64(),
            p50: sent.pct(0.5),
            p90: sent.pct(0.9),
            p99: sent.pct(0.99),
            max: sent.pct(1.0),
            errors: sent.errors,
            rss_peak_mb: peak,
            note: format!(
                "{} events acked at {:.0}/s; queue drained {:.2} s after the last ack; latencies are the acks",
                sent.ok,
                sent.rate(),
                took.saturating_sub(sent.elapsed).as_secs_f64()
            ),
            cost: Some(cost),
        })
    }
}

async fn e2e(ctx: &Ctx, backend: &str, rows: &mut Vec<Row>) -> anyhow::Result<()> {
    let b = backend_name(backend);
    let (sink, sink_url) = Sink::start().await?;
    let wf = ctx.tmp.path().join(format!("wf-e2e-{}", tag()));
    write_workflow(
        &wf,
        "e2e.yaml",
        &format!(
            "name: e2e\non: {{ event: conversation.ended }}\nsteps:\n  - id: post\n    http:\n      url: \"{sink_url}/deliveries\"\n      json: {{ event: \"{{{{ event.id }}}}\" }}\n"
        ),
    )?;
    let db = fresh_db(backend, ctx.tmp.path()).await?;
    let probe = Probe::new(backend, &db);
    let startup = probe
        .startup_xacts(&ctx.bin, &db, &wf, ctx.tmp.path())
        .await?;
    let s = E2e {
        ctx,
        db,
        wf,
        sink,
        probe,
        startup,
    };
    // The rate users run at (issue 12's cost targets), then the latency target's rate.
    rows.push(s.fixed(b, 200.0).await?);
    let at300 = s.fixed(b, 300.0).await?;
    let n = (at300.cost.as_ref().map_or(0, |c| c.messages).max(300) * 10) as usize;
    rows.push(at300);
    rows.push(s.max(b, n).await?);
    drop_db(backend, &s.db).await;
    Ok(())
}

async fn setup(ctx: &Ctx, backend: &str, rows: &mut Vec<Row>) -> anyhow::Result<()> {
    let b = backend_name(backend);
    let (_sink, sink_url) = Sink::start().await?;
    for (label, rate, workflow) in [
        (
            "3. setup, static answer, 500/s",
            500.0,
            "name: static\non: { event: conversation.setup }\nrespond:\n  context:\n    $variables: { campaign: renewals, callee: \"{{ event.payload.channel.callee_no }}\" }\n".to_owned(),
        ),
        (
            "3. setup, one lookup, 200/s",
            200.0,
            format!(
                "name: lookup\non: {{ event: conversation.setup }}\nsteps:\n  - id: crm\n    http: {{ method: GET, url: \"{sink_url}/contacts\", query: {{ phone: \"{{{{ event.payload.channel.callee_no }}}}\" }} }}\n    timeout: 500ms\ndeadline: 1s\nrespond:\n  context:\n    $customer: {{ name: \"{{{{ steps.crm.json.name }}}}\" }}\nfallback:\n  context: {{}}\n"
            ),
        ),
    ] {
        let wf = ctx.tmp.path().join(format!("wf-setup-{}", tag()));
        write_workflow(&wf, "setup.yaml", &workflow)?;
        let db = fresh_db(backend, ctx.tmp.path()).await?;
        let server = Server::start(&ctx.bin, &db, &wf, ctx.tmp.path(), &[]).await?;
        let t = tag();
        let tgt = target(&server, ctx.o.connections, Arc::new(move |i| load::setup_body(&t, i)));
        load::fixed_rate(&tgt, rate, Duration::from_millis(500)).await; // warm-up
        let s = load::fixed_rate(&tgt, rate, ctx.o.duration).await;
        let (_, peak) = server::rss_mb(server.pid());
        rows.push(Row::from_sample(label, b, &s, peak, "answer latency at the client".into()));
        drop(server);
        drop_db(backend, &db).await;
    }
    Ok(())
}

async fn growth(ctx: &Ctx, backend: &str, rows: &mut Vec<Row>) -> anyhow::Result<()> {
    use switchboard::store::NoWorkflows;
    let b = backend_name(backend);
    let db = fresh_db(backend, ctx.tmp.path()).await?;
    let store = switchboard::store::connect(&db).await?;
    store.migrate().await?;
    let empty = ctx.tmp.path().join(format!("empty-{}", tag()));
    std::fs::create_dir_all(&empty)?;
    let mut stored = 0usize; // seeded plus ingested by the load
    let mut seeded = 0usize;
    for &target_size in &ctx.o.growth {
        // Seed through the store's own batched append path.
        let seed = Instant::now();
        let mut batch = Vec::with_capacity(256);
        while stored < target_size {
            batch.push(common::seed_event(seeded)?);
            seeded += 1;
            stored += 1;
            if batch.len() == 256 || stored == target_size {
                store.append_batch(&batch, &NoWorkflows).await?;
                batch.clear();
            }
        }
        let seeded_in = seed.elapsed();
        let server = Server::start(&ctx.bin, &db, &empty, ctx.tmp.path(), &[]).await?;
        let t = tag();
        let tgt = target(
            &server,
            ctx.o.connections,
            Arc::new(move |i| load::ended_body(&t, i)),
        );
        let dur = (ctx.o.duration / 2).max(Duration::from_secs(1));
        let s = load::max_rate(&tgt, ctx.o.connections, dur, None).await;
        stored += s.ok as usize;
        let (_, peak) = server::rss_mb(server.pid());
        rows.push(Row::from_sample(
            &format!("4. growth {target_size}: ingest max"),
            b,
            &s,
            peak,
            format!("seeded in {:.1} s", seeded_in.as_secs_f64()),
        ));
        // Admin list queries: 20 calls each over HTTP.
        let client = reqwest::Client::new();
        let mid = seeded / 2;
        let mut all = Vec::new();
        let mut worst = (0.0f64, String::new());
        for path in [
            "/api/v1/events?limit=50".to_owned(),
            format!("/api/v1/events?limit=50&cursor={mid}"),
            "/api/v1/events?type=conversation.ended&limit=50".to_owned(),
            format!("/api/v1/events?conversation_id=conv_{}", seeded / 8),
            "/api/v1/events?agent_id=ca_7@v1&limit=50".to_owned(),
            format!("/api/v1/events/ev_seed_{mid}"),
            "/api/v1/conversations?limit=50".to_owned(),
            format!("/api/v1/conversations/conv_{}", seeded / 8),
            "/api/v1/runs?limit=50".to_owned(),
        ] {
            for _ in 0..20 {
                let start = Instant::now();
                let resp = client
                    .get(format!("{}{path}", server.base))
                    .bearer_auth(server::TOKEN)
                    .send()
                    .await?;
                anyhow::ensure!(resp.status() == 200, "{path}: {}", resp.status());
                let _ = resp.bytes().await?;
                let took = start.elapsed();
                if took.as_secs_f64() * 1e3 > worst.0 {
                    worst = (took.as_secs_f64() * 1e3, path.clone());
                }
                all.push(took);
            }
        }
        all.sort();
        rows.push(Row {
            scenario: format!("4. growth {target_size}: list queries"),
            backend: b.into(),
            rate: all.len() as f64 / all.iter().map(Duration::as_secs_f64).sum::<f64>(),
            p50: load::pct(&all, 0.5),
            p90: load::pct(&all, 0.9),
            p99: load::pct(&all, 0.99),
            max: load::pct(&all, 1.0),
            errors: 0,
            rss_peak_mb: server::rss_mb(server.pid()).1,
            note: format!("9 endpoints × 20 calls; slowest {}", worst.1),
            cost: None,
        });
    }
    drop(store);
    drop_db(backend, &db).await;
    Ok(())
}

async fn idle(ctx: &Ctx, backend: &str, rows: &mut Vec<Row>) -> anyhow::Result<()> {
    let b = backend_name(backend);
    let db = fresh_db(backend, ctx.tmp.path()).await?;
    let wf = Path::new(env!("CARGO_MANIFEST_DIR")).join("workflows");
    let server = Server::start(&ctx.bin, &db, &wf, ctx.tmp.path(), &[]).await?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let (start_rss, _) = server::rss_mb(server.pid());
    let cpu0 = server::cpu_seconds(server.pid());
    tokio::time::sleep(ctx.o.idle).await;
    let (end_rss, peak) = server::rss_mb(server.pid());
    let cpu = server::cpu_seconds(server.pid()) - cpu0;
    let mut row = Row::note_only(
        "5. idle",
        b,
        0.0,
        0,
        format!(
            "RSS {start_rss:.1} MB after start, {end_rss:.1} MB after {}; CPU {:.2} s = {:.3} % of a core",
            humantime::format_duration(ctx.o.idle),
            cpu,
            100.0 * cpu / ctx.o.idle.as_secs_f64()
        ),
    );
    row.rss_peak_mb = peak;
    rows.push(row);
    drop(server);
    drop_db(backend, &db).await;
    Ok(())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("--ceiling-http") {
        return ceilings::serve_bare_http(args[2].parse()?).await;
    }
    let o = parse_args()?;
    let ctx = Ctx {
        bin: server::binary(o.build)?,
        tmp: tempfile::tempdir()?,
        o,
    };
    let machine = format!(
        "{} cores, {}",
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(0),
        std::fs::read_to_string("/proc/cpuinfo")
            .ok()
            .and_then(
                |c| c.lines().find(|l| l.starts_with("model name")).map(|l| l
                    .split(':')
                    .nth(1)
                    .unwrap_or("")
                    .trim()
                    .to_owned())
            )
            .unwrap_or_default()
    );
    println!(
        "switchboard bench on {machine}; server: {}",
        ctx.bin.display()
    );
    let mut rows = Vec::new();
    let mut ceilings_json = Vec::new();
    let http = ceilings::http(ctx.o.connections, ctx.o.duration).await?;
    println!(
        "HTTP ceiling (bare poem handler, {} connections): {:.0} req/s, p50 {:.2} ms, p99 {:.2} ms",
        ctx.o.connections,
        http.rate(),
        http.pct(0.5),
        http.pct(0.99)
    );
    rows.push(Row::from_sample(
        "0. ceiling: bare HTTP handler",
        "-",
        &http,
        f64::NAN,
        String::new(),
    ));
    for backend in ctx.o.backends.clone() {
        let b = backend_name(&backend);
        let storage_db = fresh_db(&backend, ctx.tmp.path()).await?;
        let rows_n = if ctx.o.duration < Duration::from_secs(2) {
            5_120
        } else {
            102_400
        };
        let storage = ceilings::storage(&storage_db, rows_n).await?;
        drop_db(&backend, &storage_db).await;
        println!(
            "storage ceiling ({b}, raw batched inserts of the same rows): {storage:.0} rows/s"
        );
        ceilings_json.push(json!({"backend": b, "storage_rows_per_s": storage}));
        rows.push(Row::note_only(
            "0. ceiling: raw batched inserts",
            b,
            storage,
            0,
            format!("{rows_n} rows, 256 per transaction"),
        ));
        for scenario in ctx.o.scenarios.clone() {
            let result = match scenario.as_str() {
                "ingest" => ingest(&ctx, &backend, &mut rows).await.map(|max| {
                    let last = rows.len() - 2;
                    rows[last].note.push_str(&format!(
                        "; {:.0} % of HTTP ceiling, {:.0} % of storage ceiling",
                        100.0 * max / http.rate(),
                        100.0 * max / storage
                    ));
                }),
                "e2e" => e2e(&ctx, &backend, &mut rows).await,
                "setup" => setup(&ctx, &backend, &mut rows).await,
                "growth" => growth(&ctx, &backend, &mut rows).await,
                "idle" => idle(&ctx, &backend, &mut rows).await,
                "destinations" => destinations::run(&ctx, &backend, &mut rows).await,
                "waits" => waits::run(&ctx, &backend, &mut rows).await,
                "outage" => outage::run(&ctx, &backend, &mut rows).await,
                "shared-rate" => destinations::shared_rate(&ctx, &backend, &mut rows).await,
                "dest-overhead" => destinations::overhead(&ctx, &backend, &mut rows).await,
                other => Err(anyhow::anyhow!("unknown scenario {other}")),
            };
            if let Err(e) = result {
                println!("{scenario} on {b} failed: {e:#}");
                rows.push(Row::note_only(
                    &scenario,
                    b,
                    0.0,
                    1,
                    format!("FAILED: {e:#}"),
                ));
            }
        }
    }
    print_rows(&rows);
    if let Some(path) = &ctx.o.json {
        let doc = json!({
            "machine": machine,
            "http_ceiling_per_s": http.rate(),
            "ceilings": ceilings_json,
            "rows": rows.iter().map(Row::json).collect::<Vec<_>>(),
        });
        std::fs::write(path, serde_json::to_string_pretty(&doc)?)?;
        println!("\nwrote {path}");
    }
    let failed = rows.iter().filter(|r| r.note.starts_with("FAILED")).count();
    anyhow::ensure!(failed == 0, "{failed} scenario(s) failed");
    Ok(())
}
