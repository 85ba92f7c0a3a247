//! Bench scenario `waits` (issue 13 "Scale"): N waiting runs (default
//! 100,000; half `wait: 24h`, half `wait_for` a field value that never
//! arrives, timeout 24h), created by signed webhooks through the real
//! server: one `conversation.ended` event starts one run of each workflow.
//! Then, on a restarted server over that store: idle CPU and RSS; ingest
//! of `custom_fields.updated` events for the waiting conversations
//! (each one is matched against their waits, and does not match) compared
//! with the same ingest on the baseline ("the figure with no waiting runs"):
//! a copy of the same store, taken when every run was waiting, whose runs
//! were then marked finished (`succeeded`) and their `run_waits` rows
//! deleted, so both stores hold the same events, the same 50,000
//! conversations and the same number of runs, and differ only in whether
//! those runs wait. On PostgreSQL both databases are then `VACUUM ANALYZE`d
//! once (what autovacuum, off on the bench machine, would have done after
//! the bulk creation; the baseline's update left a dead row per run).
//! Resume latency of `wait_for`
//! (matching event's ack → the next step's request at the sink) and of a
//! short `wait: 2s` (the sink's receipt − (ack + 2 s), so it includes the
//! run's start as well).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::json;

use super::server::{self, Server, Sink};
use super::{Ctx, Row, backend_name, drop_db, fresh_db, load, tag, target, write_workflow};

/// An Operator envelope with an explicit event id and conversation.
fn envelope(id: String, conversation: String, payload: serde_json::Value) -> String {
    json!({
        "id": id,
        "created_at": "2025-07-14T15:09:40.251Z",
        "agent_id": "ca_bench@v1",
        "livemode": true,
        "conversation_id": conversation,
        "payload": payload
    })
    .to_string()
}

fn ended(id: String, conversation: String, status: &str) -> String {
    envelope(
        id,
        conversation,
        json!({"type": "conversation.ended", "status": status}),
    )
}

fn field(id: String, conversation: String, value: &str) -> String {
    envelope(
        id,
        conversation,
        json!({"type": "conversation.custom_fields.updated", "key": "lead_status", "value": value}),
    )
}

/// Ack times of request numbers.
type Acks = Arc<Mutex<HashMap<u64, Instant>>>;

fn recording(tgt: &mut load::Target) -> Acks {
    let acks: Acks = Default::default();
    let a = acks.clone();
    tgt.on_ack = Some(Arc::new(move |i, at| {
        a.lock().unwrap().insert(i, at);
    }));
    acks
}

/// Polls `switchboard_runs_waiting` until it reaches `n` (or `limit` passes),
/// printing progress every 10 s (`label`: what is being waited for).
async fn wait_until_waiting(
    server: &Server,
    n: f64,
    limit: Duration,
    label: &str,
) -> anyhow::Result<f64> {
    let start = Instant::now();
    let deadline = start + limit;
    let mut report = start + Duration::from_secs(10);
    let mut last = (start, 0.0);
    loop {
        let w = server::metric(server, "switchboard_runs_waiting", "").await?;
        if w >= n || Instant::now() >= deadline {
            return Ok(w);
        }
        if Instant::now() >= report {
            let per_s = (w - last.1) / last.0.elapsed().as_secs_f64();
            println!(
                "  {label}: {w:.0} of {n:.0} waiting after {:.0} s ({per_s:.0}/s lately; load average {})",
                start.elapsed().as_secs_f64(),
                load_average()
            );
            last = (Instant::now(), w);
            report += Duration::from_secs(10);
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// The machine's 1-minute load average (the bench shares it with others).
pub fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|l| l.split_whitespace().next().map(str::to_owned))
        .unwrap_or_default()
}

pub async fn run(ctx: &Ctx, backend: &str, rows: &mut Vec<Row>) -> anyhow::Result<()> {
    let b = backend_name(backend);
    let smoke = ctx.o.duration < Duration::from_secs(2);
    let events = (ctx.o.waits / 2).max(1) as u64; // each starts two waiting runs
    let (sink, sink_url) = Sink::start().await?;
    let wf = ctx.tmp.path().join(format!("wf-waits-{}", tag()));
    write_workflow(
        &wf,
        "sleep.yaml",
        &format!(
            "name: sleep\non: {{ event: conversation.ended, status: completed }}\nsteps:\n  - id: settle\n    wait: 24h\n  - id: post\n    http:\n      url: \"{sink_url}/sleep\"\n      json: {{ event: \"{{{{ event.id }}}}\" }}\n"
        ),
    )?;
    write_workflow(
        &wf,
        "qualified.yaml",
        &format!(
            "name: qualified\non: {{ event: conversation.ended, status: completed }}\nsteps:\n  - id: qualified\n    wait_for:\n      event: conversation.custom_fields.updated\n      field: lead_status\n      to: qualified\n      timeout: 24h\n  - id: post\n    http:\n      url: \"{sink_url}/qualified\"\n      json: {{ event: \"{{{{ steps.qualified.event.id }}}}\" }}\n"
        ),
    )?;
    write_workflow(
        &wf,
        "short.yaml",
        &format!(
            "name: short\non: {{ event: conversation.ended, status: voicemail }}\nsteps:\n  - id: settle\n    wait: 2s\n  - id: post\n    http:\n      url: \"{sink_url}/short\"\n      json: {{ event: \"{{{{ event.id }}}}\" }}\n"
        ),
    )?;
    let db = fresh_db(backend, ctx.tmp.path()).await?;

    // Creation, as fast as the client can: `events` ended events → 2 × `events` waiting runs.
    let server = Server::start(&ctx.bin, &db, &wf, ctx.tmp.path(), &[]).await?;
    let conv = tag();
    let c = conv.clone();
    let tgt = target(
        &server,
        ctx.o.connections,
        Arc::new(move |i| ended(format!("ev_{c}_{i}"), format!("conv_{c}_{i}"), "completed")),
    );
    let start = Instant::now();
    let created = load::max_rate(
        &tgt,
        ctx.o.connections,
        Duration::from_secs(900),
        Some(events),
    )
    .await;
    let acked_in = start.elapsed();
    let at_ack = server::metric(&server, "switchboard_runs_waiting", "").await?;
    let waiting = wait_until_waiting(
        &server,
        (2 * created.ok) as f64,
        Duration::from_secs(if smoke { 30 } else { 1200 }),
        &format!("creation ({b})"),
    )
    .await?;
    let all_waiting = start.elapsed();
    let after_ack = (all_waiting - acked_in).as_secs_f64();
    let (_, create_peak) = server::rss_mb(server.pid());
    rows.push(Row::from_sample(
        &format!("6. waits: create {} waiting runs", 2 * events),
        b,
        &created,
        create_peak,
        format!(
            "{} events acked in {:.1} s ({at_ack:.0} runs waiting then); {waiting:.0} waiting after {:.1} s \
             (the rest parked at {:.0} runs/s after the last ack); load average {}; latencies are the acks",
            created.ok,
            acked_in.as_secs_f64(),
            all_waiting.as_secs_f64(),
            (waiting - at_ack) / after_ack.max(1e-9),
            load_average()
        ),
    ));
    drop(server);

    // The like-for-like baseline for the ingest comparison (see the header).
    let base_db = finished_copy(backend, &db).await?;
    if backend != "sqlite" {
        for url in [&db, &base_db] {
            let t = Instant::now();
            vacuum_analyze(url).await?;
            println!(
                "  waits ({b}): VACUUM ANALYZE of {} took {:.1} s (autovacuum is off here; a deployment's would have run)",
                url.rsplit_once('/').map_or(url.as_str(), |(_, n)| n),
                t.elapsed().as_secs_f64()
            );
        }
    }

    // A restarted server over the waiting runs: idle CPU and memory.
    let server = Server::start(&ctx.bin, &db, &wf, ctx.tmp.path(), &[]).await?;
    let waiting = wait_until_waiting(&server, waiting, Duration::from_secs(5), "restarted").await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let idle = ctx.o.idle.min(Duration::from_secs(30));
    let cpu0 = server::cpu_seconds(server.pid());
    tokio::time::sleep(idle).await;
    let cpu = server::cpu_seconds(server.pid()) - cpu0;
    let (rss, peak) = server::rss_mb(server.pid());
    let load = load_average();
    // A scrape that reads the store's gauges (at most one read a second): its time and CPU.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let cpu1 = server::cpu_seconds(server.pid());
    let t = Instant::now();
    server::metric(&server, "switchboard_runs_waiting", "").await?;
    let scrape = t.elapsed();
    let scrape_cpu = server::cpu_seconds(server.pid()) - cpu1;
    let mut row = Row::note_only(
        &format!("6. waits: idle with {waiting:.0} waiting"),
        b,
        0.0,
        0,
        format!(
            "restarted server; CPU {cpu:.2} s in {} = {:.2} % of a core (target ≤ 1 %); RSS {rss:.1} MB \
             (target ≤ 60 MB); load average {load}; a /metrics scrape reading the gauges took {:.1} ms \
             ({:.0} ms server CPU)",
            humantime::format_duration(idle),
            100.0 * cpu / idle.as_secs_f64(),
            scrape.as_secs_f64() * 1e3,
            scrape_cpu * 1e3
        ),
    );
    row.rss_peak_mb = peak;
    rows.push(row);

    // Resume of `wait_for`: matching events at 50/s; ack → the next step's request.
    let n = if smoke { 50 } else { 300 };
    let t = tag();
    let (c, t2) = (conv.clone(), t.clone());
    let mut tgt = target(
        &server,
        ctx.o.connections,
        Arc::new(move |i| field(format!("ev_{t2}_{i}"), format!("conv_{c}_{i}"), "qualified")),
    );
    let acks = recording(&mut tgt);
    let before = sink.count();
    let sent = load::fixed_rate(&tgt, 50.0, Duration::from_secs_f64(n as f64 / 50.0)).await;
    sink.wait_for(before + sent.ok as usize, Duration::from_secs(30))
        .await;
    let lat = latencies(&acks, &sink, &t, Duration::ZERO);
    rows.push(latency_row(
        "6. waits: wait_for resume, ack → sink",
        b,
        &lat,
        sent.ok,
        sent.errors,
        &server,
        format!("{} of {} resumed; target p99 ≤ 50 ms", lat.len(), sent.ok),
    ));

    // Resume of a short `wait: 2s`: receipt − (ack + 2 s).
    let n = if smoke { 20 } else { 200 };
    let t = tag();
    let t2 = t.clone();
    let mut tgt = target(
        &server,
        ctx.o.connections,
        Arc::new(move |i| {
            ended(
                format!("ev_{t2}_{i}"),
                format!("conv_{t2}_{i}"),
                "voicemail",
            )
        }),
    );
    let acks = recording(&mut tgt);
    let before = sink.count();
    let sent = load::fixed_rate(&tgt, 50.0, Duration::from_secs_f64(n as f64 / 50.0)).await;
    sink.wait_for(before + sent.ok as usize, Duration::from_secs(30))
        .await;
    let lat = latencies(&acks, &sink, &t, Duration::from_secs(2));
    rows.push(latency_row(
        "6. waits: wait 2s, delay after resume_at",
        b,
        &lat,
        sent.ok,
        sent.errors,
        &server,
        format!(
            "{} of {} resumed; receipt − (ack + 2 s), includes the run's start; target p99 ≤ 1 s",
            lat.len(),
            sent.ok
        ),
    ));

    // Ingest with the waiting runs present vs. on the same store with those runs finished
    // (same workflows): field events of the waiting conversations, each reaching that
    // conversation's `wait_for` and matching none. Both servers run side by side and are
    // loaded in turns (A B B A …), so the machine's other load falls on both sides alike;
    // the medians of the rounds are compared.
    let empty = Server::start(&ctx.bin, &base_db, &wf, ctx.tmp.path(), &[]).await?;
    let ingest = |server: &Server| {
        let c = conv.clone();
        let t = tag();
        let n = events;
        target(
            server,
            ctx.o.connections,
            Arc::new(move |i| field(format!("ev_{t}_{i}"), format!("conv_{c}_{}", i % n), "new")),
        )
    };
    let round = (ctx.o.duration / 2).max(Duration::from_millis(500));
    let warm = Duration::from_millis(500);
    let (mut with, mut without) = (Vec::new(), Vec::new());
    let (mut with_samples, mut without_samples) = (Vec::new(), Vec::new());
    // CPU per event of each round: the server's, and (PostgreSQL) its database's backends'.
    let (probe_with, probe_without) = (
        super::cost::Probe::new(backend, &db),
        super::cost::Probe::new(backend, &base_db),
    );
    let (mut cpu_with, mut cpu_without) = (Vec::new(), Vec::new());
    for r in 0..ROUNDS {
        for loaded in if r % 2 == 0 {
            [true, false]
        } else {
            [false, true]
        } {
            let (s, probe) = if loaded {
                (&server, &probe_with)
            } else {
                (&empty, &probe_without)
            };
            load::max_rate(&ingest(s), ctx.o.connections, warm, None).await;
            let (srv0, db0) = (server::cpu_seconds(s.pid()), probe.backends().await?);
            let sw0 = server::context_switches(s.pid());
            let sample = load::max_rate(&ingest(s), ctx.o.connections, round, None).await;
            let srv = server::cpu_seconds(s.pid()) - srv0;
            let db_cpu: f64 = probe
                .backends()
                .await?
                .into_iter()
                .map(|(pid, cpu)| cpu - db0.get(&pid).copied().unwrap_or(0.0))
                .sum();
            let switches = server::context_switches(s.pid()).saturating_sub(sw0) as f64;
            let per = |v: f64| 1e6 * v / sample.ok.max(1) as f64;
            let cpu = (per(srv), per(db_cpu), per(switches) / 1e6);
            if loaded {
                with.push(sample.rate());
                with_samples.push(sample);
                cpu_with.push(cpu);
            } else {
                without.push(sample.rate());
                without_samples.push(sample);
                cpu_without.push(cpu);
            }
        }
    }
    let (m_with, m_without) = (median(&with), median(&without));
    let cpu = |v: &[(f64, f64, f64)]| {
        let srv: Vec<f64> = v.iter().map(|c| c.0).collect();
        let db: Vec<f64> = v.iter().map(|c| c.1).collect();
        let sw: Vec<f64> = v.iter().map(|c| c.2).collect();
        if backend == "sqlite" {
            format!(
                "server CPU {:.0} µs/event, {:.1} context switches/event",
                median(&srv),
                median(&sw)
            )
        } else {
            format!(
                "server CPU {:.0} + database backends {:.0} µs/event, {:.1} server context switches/event",
                median(&srv),
                median(&db),
                median(&sw)
            )
        }
    };
    let (cpu_w, cpu_wo) = (cpu(&cpu_with), cpu(&cpu_without));
    let ratio = 100.0 * m_with / m_without.max(1e-9);
    let rounds = |v: &[f64]| {
        v.iter()
            .map(|r| format!("{r:.0}"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let mut row = Row::from_sample(
        &format!("6. waits: ingest, {waiting:.0} waiting"),
        b,
        &median_sample(with_samples),
        server::rss_mb(server.pid()).1,
        format!(
            "median of {ROUNDS} rounds of {} ({} /s), alternating with the baseline (the same store, its runs finished); custom_fields.updated of the waiting conversations, none matching; {cpu_w} (medians); latencies: median round",
            humantime::format_duration(round),
            rounds(&with)
        ),
    );
    row.rate = m_with;
    rows.push(row);
    let mut row = Row::from_sample(
        "6. waits: ingest, same store, runs finished",
        b,
        &median_sample(without_samples),
        server::rss_mb(empty.pid()).1,
        format!(
            "median of {ROUNDS} rounds ({} /s); {cpu_wo} (medians); with the waiting runs {ratio:.0} % of this (target ≥ 90 %)",
            rounds(&without)
        ),
    );
    row.rate = m_without;
    rows.push(row);
    println!(
        "waits ({b}): ingest with {waiting:.0} waiting {m_with:.0}/s vs. the same store with its runs finished {m_without:.0}/s = {ratio:.0} % (target ≥ 90 %); rounds {} | {}; {cpu_w} | {cpu_wo}; load average {}",
        rounds(&with),
        rounds(&without),
        load_average()
    );
    drop(empty);
    drop(server);
    drop_db(backend, &base_db).await;
    drop_db(backend, &db).await;
    Ok(())
}

/// A copy of the store `url` (no server on it) whose waiting runs are finished:
/// status `succeeded`, no wait reason, and no `run_waits` rows. SQLite: the
/// file is copied after a checkpoint; PostgreSQL: `CREATE DATABASE … TEMPLATE`.
async fn finished_copy(backend: &str, url: &str) -> anyhow::Result<String> {
    use sqlx::Connection;
    let copy = if backend == "sqlite" {
        let path = url.trim_start_matches("sqlite://");
        let mut c = sqlx::SqliteConnection::connect(url).await?;
        sqlx::query("PRAGMA wal_checkpoint(TRUNCATE)")
            .execute(&mut c)
            .await?;
        c.close().await?;
        let copy_path = format!("{path}.finished.db");
        std::fs::copy(path, &copy_path)?;
        format!("sqlite://{copy_path}")
    } else {
        let mut admin = sqlx::PgConnection::connect(backend).await?;
        let (_, name) = url
            .rsplit_once('/')
            .ok_or_else(|| anyhow::anyhow!("no database in {url}"))?;
        let copy_name = format!("{name}_fin");
        // The killed server's sessions may take a moment to go.
        let mut tries = 0;
        loop {
            match sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
                "CREATE DATABASE {copy_name} TEMPLATE {name}"
            )))
            .execute(&mut admin)
            .await
            {
                Ok(_) => break,
                Err(e) if tries < 50 => {
                    tries += 1;
                    if tries == 1 {
                        println!("  waits: copy of {name} not yet possible ({e}); retrying");
                    }
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                Err(e) => return Err(e.into()),
            }
        }
        let mut u = reqwest::Url::parse(backend)?;
        u.set_path(&format!("/{copy_name}"));
        u.to_string()
    };
    let now = chrono::Utc::now();
    // The same statements on both backends.
    macro_rules! finish {
        ($conn:ty) => {{
            let mut c = <$conn>::connect(&copy).await?;
            let runs = sqlx::query(
                "UPDATE runs SET status = 'succeeded', wait_reason = NULL, finished_at = $1, updated_at = $1 \
                 WHERE status = 'waiting'",
            )
            .bind(now)
            .execute(&mut c)
            .await?
            .rows_affected();
            let waits = sqlx::query("DELETE FROM run_waits")
                .execute(&mut c)
                .await?
                .rows_affected();
            c.close().await?;
            println!("  waits: baseline {copy}: {runs} runs marked succeeded, {waits} waits deleted");
        }};
    }
    if backend == "sqlite" {
        finish!(sqlx::SqliteConnection);
    } else {
        finish!(sqlx::PgConnection);
    }
    Ok(copy)
}

/// `VACUUM ANALYZE` of a PostgreSQL database (what autovacuum would do).
async fn vacuum_analyze(url: &str) -> anyhow::Result<()> {
    use sqlx::Connection;
    let mut c = sqlx::PgConnection::connect(url).await?;
    sqlx::raw_sql("VACUUM ANALYZE").execute(&mut c).await?;
    c.close().await?;
    Ok(())
}

/// Ingest rounds per side (interleaved).
const ROUNDS: usize = 4;

fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

/// The sample of the median rate (the lower middle one).
fn median_sample(mut v: Vec<load::Sample>) -> load::Sample {
    v.sort_by(|a, b| a.rate().total_cmp(&b.rate()));
    let i = (v.len().max(1) - 1) / 2;
    v.swap_remove(i)
}

/// Sorted (sink receipt − ack − `after`) of the deliveries keyed `ev_{tag}_{i}`.
fn latencies(acks: &Acks, sink: &Sink, tag: &str, after: Duration) -> Vec<Duration> {
    let acks = acks.lock().unwrap();
    let arrivals = sink.arrivals.lock().unwrap();
    let mut lat: Vec<Duration> = acks
        .iter()
        .filter_map(|(i, acked)| {
            let (arrived, _) = arrivals.get(&format!("ev_{tag}_{i}"))?;
            Some(arrived.saturating_duration_since(*acked + after))
        })
        .collect();
    lat.sort();
    lat
}

fn latency_row(
    scenario: &str,
    b: &str,
    lat: &[Duration],
    ok: u64,
    errors: u64,
    server: &Server,
    note: String,
) -> Row {
    Row {
        scenario: scenario.into(),
        backend: b.into(),
        rate: f64::NAN,
        p50: load::pct(lat, 0.5),
        p90: load::pct(lat, 0.9),
        p99: load::pct(lat, 0.99),
        max: load::pct(lat, 1.0),
        errors: errors + ok - lat.len() as u64,
        rss_peak_mb: server::rss_mb(server.pid()).1,
        note,
        cost: None,
    }
}
