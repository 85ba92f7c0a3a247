//! Bench scenario `outage` (issue 14 "Measured"): a destination down
//! (connection refused: a loopback port nothing listens on) while N runs
//! (default 1,000, `max_attempts: 3`) are queued to it, for `--outage`
//! (default 60 s, as issue 14 says), then a sink started on that port.
//! Measured: attempts (probes) while the breaker is open per cool-down (from
//! the server's `switchboard_attempts_total`), whether every run succeeded
//! and how long after the recovery the last one arrived, and a healthy second
//! destination's ack → sink latency during the outage and without one, with
//! what the server spent meanwhile (CPU; on SQLite also its write
//! transactions, `switchboard_store_commits_total`), to show what the held
//! runs cost while the breaker is open.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::server::{self, Server, Sink};
use super::{Ctx, Row, backend_name, drop_db, fresh_db, load, tag, target, write_workflow};

const COOL_DOWN: Duration = Duration::from_secs(5);

fn body(tag: &str, i: u64, status: &str) -> String {
    serde_json::json!({
        "id": format!("ev_{tag}_{i}"),
        "created_at": "2025-07-14T15:09:40.251Z",
        "agent_id": "ca_bench@v1",
        "livemode": true,
        "conversation_id": format!("conv_{tag}_{i}"),
        "payload": {"type": "conversation.ended", "status": status}
    })
    .to_string()
}

/// When the slow deliveries (ack → sink over 20 ms) of a phase were acked,
/// in seconds after `start`: "n slow, at a–b s" (to tell a burst from a steady cost).
fn slow_note(start: Instant, slow: &[(Instant, Duration)]) -> String {
    if slow.is_empty() {
        return "; none over 20 ms".into();
    }
    let at: Vec<f64> = slow
        .iter()
        .map(|(t, _)| t.saturating_duration_since(start).as_secs_f64())
        .collect();
    let (lo, hi) = at
        .iter()
        .fold((f64::MAX, f64::MIN), |(a, b), x| (a.min(*x), b.max(*x)));
    let in_first = at.iter().filter(|x| **x < 3.0).count();
    format!(
        "; {} over 20 ms, acked {lo:.1}–{hi:.1} s into the phase ({in_first} in its first 3 s)",
        slow.len()
    )
}

/// The healthy destination at a fixed rate for `dur`: sorted ack → sink latencies and the errors.
async fn healthy(url: String, sink: &Sink, dur: Duration) -> (Vec<Duration>, u64) {
    let (lat, lost, _) = healthy_timed(url, sink, dur).await;
    (lat, lost)
}

/// [`healthy`], and [`slow_note`] of the phase.
async fn healthy_timed(url: String, sink: &Sink, dur: Duration) -> (Vec<Duration>, u64, String) {
    let start = Instant::now();
    let acks: Arc<Mutex<HashMap<u64, Instant>>> = Default::default();
    let t = tag();
    let t2 = t.clone();
    let mut tgt = load::Target {
        client: load::client(16),
        url,
        signed: true,
        make_body: Arc::new(move |i| body(&t2, i, "voicemail")),
        on_ack: None,
    };
    let a = acks.clone();
    tgt.on_ack = Some(Arc::new(move |i, at| {
        a.lock().unwrap().insert(i, at);
    }));
    let before = sink.count();
    let sent = load::fixed_rate(&tgt, 100.0, dur).await;
    sink.wait_for(before + sent.ok as usize, Duration::from_secs(30))
        .await;
    let acks = acks.lock().unwrap();
    let arrivals = sink.arrivals.lock().unwrap();
    let timed: Vec<(Instant, Duration)> = acks
        .iter()
        .filter_map(|(i, acked)| {
            let (arrived, _) = arrivals.get(&format!("ev_{t}_{i}"))?;
            Some((*acked, arrived.saturating_duration_since(*acked)))
        })
        .collect();
    let slow: Vec<(Instant, Duration)> = timed
        .iter()
        .copied()
        .filter(|(_, l)| *l > Duration::from_millis(20))
        .collect();
    let mut lat: Vec<Duration> = timed.iter().map(|(_, l)| *l).collect();
    lat.sort();
    let lost = sent.errors + sent.ok - lat.len() as u64;
    (lat, lost, slow_note(start, &slow))
}

/// The server's CPU seconds and (SQLite) commits so far.
async fn spent(server: &Server) -> (f64, f64) {
    let commits = server::metric(server, "switchboard_store_commits_total", "")
        .await
        .unwrap_or(f64::NAN);
    (server::cpu_seconds(server.pid()), commits)
}

/// "CPU x % of a core, y commits/s" between two readings `dur` apart.
fn spent_note(a: (f64, f64), b: (f64, f64), dur: Duration) -> String {
    let secs = dur.as_secs_f64();
    let commits = if (b.1 - a.1).is_finite() && b.1 > 0.0 {
        format!(", {:.0} commits/s", (b.1 - a.1) / secs)
    } else {
        String::new()
    };
    format!(
        "; server CPU {:.1} % of a core{commits}",
        100.0 * (b.0 - a.0) / secs
    )
}

fn latency_row(label: &str, b: &str, lat: &[Duration], lost: u64, dur: Duration) -> Row {
    Row {
        scenario: label.into(),
        backend: b.into(),
        rate: lat.len() as f64 / dur.as_secs_f64(),
        p50: load::pct(lat, 0.5),
        p90: load::pct(lat, 0.9),
        p99: load::pct(lat, 0.99),
        max: load::pct(lat, 1.0),
        errors: lost,
        rss_peak_mb: f64::NAN,
        note: format!("{} delivered at a fixed 100/s", lat.len()),
        cost: None,
    }
}

async fn connect_attempts(server: &Server) -> anyhow::Result<f64> {
    server::metric(server, "switchboard_attempts_total", "workflow=\"down\"").await
}

pub async fn run(ctx: &Ctx, backend: &str, rows: &mut Vec<Row>) -> anyhow::Result<()> {
    let b = backend_name(backend);
    let smoke = ctx.o.duration < Duration::from_secs(2);
    let n: u64 = if smoke { 100 } else { 1_000 };
    let outage = ctx.o.outage;
    let port = server::free_port(); // nothing listens on it until the recovery
    let (ok_sink, ok_url) = Sink::start().await?;
    let wf = ctx.tmp.path().join(format!("wf-outage-{}", tag()));
    write_workflow(
        &wf,
        "down.yaml",
        &format!(
            "name: down\non: {{ event: conversation.ended, status: completed }}\nsteps:\n  - id: post\n    http:\n      url: \"http://127.0.0.1:{port}/deliveries\"\n      json: {{ event: \"{{{{ event.id }}}}\" }}\n    retry: {{ max_attempts: 3, backoff: fixed, initial_delay: 1s }}\n"
        ),
    )?;
    write_workflow(
        &wf,
        "healthy.yaml",
        &format!(
            "name: healthy\non: {{ event: conversation.ended, status: voicemail }}\nsteps:\n  - id: post\n    http:\n      url: \"{ok_url}/deliveries\"\n      json: {{ event: \"{{{{ event.id }}}}\" }}\n"
        ),
    )?;
    let cd = humantime::format_duration(COOL_DOWN);
    write_workflow(
        &wf,
        "destinations.yaml",
        &format!(
            "destinations:\n  - name: down\n    url: \"http://127.0.0.1:{port}/\"\n    circuit_breaker: {{ failures: 3, cool_down: {cd}, max_cool_down: {cd} }}\n  - name: healthy\n    url: \"{ok_url}/\"\n    circuit_breaker: {{ failures: 3, cool_down: {cd}, max_cool_down: {cd} }}\n"
        ),
    )?;
    let db = fresh_db(backend, ctx.tmp.path()).await?;
    let server = Server::start(&ctx.bin, &db, &wf, ctx.tmp.path(), &[]).await?;

    // Without an outage.
    let base_dur = if smoke {
        Duration::from_secs(1)
    } else {
        Duration::from_secs(5)
    };
    let before = (spent(&server).await, Instant::now());
    let (lat, lost) = healthy(server.webhook_url(), &ok_sink, base_dur).await;
    let after = (spent(&server).await, Instant::now());
    let mut row = latency_row(
        "7. outage: healthy ack → sink, no outage",
        b,
        &lat,
        lost,
        base_dur,
    );
    row.note
        .push_str(&spent_note(before.0, after.0, after.1 - before.1));
    rows.push(row);

    // The outage: n runs queued to the dead port, the healthy destination loaded meanwhile.
    let down_at = Instant::now();
    let t = tag();
    let t2 = t.clone();
    let tgt = target(
        &server,
        ctx.o.connections,
        Arc::new(move |i| body(&t2, i, "completed")),
    );
    let queued = load::max_rate(&tgt, ctx.o.connections, Duration::from_secs(120), Some(n)).await;
    let during_dur = outage
        .saturating_sub(down_at.elapsed())
        .saturating_sub(Duration::from_millis(500))
        .max(Duration::from_secs(1));
    let (url, healthy_sink) = (server.webhook_url(), ok_sink.clone());
    let load_task =
        tokio::spawn(async move { healthy_timed(url, &healthy_sink, during_dur).await });
    // When does the breaker open, and how many attempts had gone by then?
    let mut opened: Option<(Instant, f64)> = None;
    let mut open_spent = None;
    while down_at.elapsed() < outage {
        if opened.is_none()
            && server::metric(
                &server,
                "switchboard_destination_breaker_state",
                "destination=\"down\"",
            )
            .await?
                == 1.0
        {
            opened = Some((Instant::now(), connect_attempts(&server).await?));
            open_spent = Some((spent(&server).await, Instant::now()));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let at_end = connect_attempts(&server).await?;
    let end_spent = (spent(&server).await, Instant::now());
    let (lat, lost, slow) = load_task.await?;

    // The recovery.
    let down_sink = Sink::start_on(port).await?;
    let recovered = Instant::now();
    let last = down_sink
        .wait_for(
            queued.ok as usize,
            Duration::from_secs(if smoke { 30 } else { 120 }),
        )
        .await;
    let arrived = down_sink.count();
    let dupes: u32 = down_sink
        .arrivals
        .lock()
        .unwrap()
        .values()
        .map(|(_, c)| c.saturating_sub(1))
        .sum();
    let failed = server::metric(
        &server,
        "switchboard_runs_finished_total",
        "workflow=\"down\",state=\"failed\"",
    )
    .await?;
    let probes = match opened {
        Some((at, before)) => {
            let open_for = down_at + outage - at;
            format!(
                "breaker open {:.1} s after the first request; {:.0} attempts while open for {:.1} s = {:.2} per {cd} cool-down (target ≤ 1)",
                at.duration_since(down_at).as_secs_f64(),
                at_end - before,
                open_for.as_secs_f64(),
                (at_end - before) / (open_for.as_secs_f64() / COOL_DOWN.as_secs_f64())
            )
        }
        None => "the breaker never showed open".into(),
    };
    rows.push(Row::note_only(
        &format!(
            "7. outage: {n} runs, {} down",
            humantime::format_duration(outage)
        ),
        b,
        0.0,
        queued.errors + n - arrived as u64 + u64::from(dupes),
        format!(
            "{arrived} of {} arrived ({dupes} twice), {failed:.0} failed; last {} after recovery (target ≤ 10 s); {probes}; {at_end:.0} attempts to it in all",
            queued.ok,
            last.map_or("never".into(), |l| format!(
                "{:.2} s",
                l.saturating_duration_since(recovered).as_secs_f64()
            ))
        ),
    ));
    let mut row = latency_row(
        "7. outage: healthy ack → sink, during it",
        b,
        &lat,
        lost,
        during_dur,
    );
    if let Some((s, at)) = open_spent {
        row.note.push_str(&format!(
            "{} (while the breaker was open)",
            spent_note(s, end_spent.0, end_spent.1 - at)
        ));
    }
    row.note.push_str(&slow);
    // Whether the healthy destination's own runs were ever held (its breaker, a pause).
    let held = server::metric(
        &server,
        "switchboard_destination_held_total",
        "destination=\"healthy\"",
    )
    .await
    .unwrap_or(f64::NAN);
    let healthy_failed: f64 = reqwest::get(format!("{}/metrics", server.base))
        .await?
        .text()
        .await?
        .lines()
        .filter(|l| {
            l.starts_with("switchboard_attempts_total{")
                && l.contains("workflow=\"healthy\"")
                && !l.contains("outcome=\"succeeded\"")
        })
        .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
        .sum();
    row.note.push_str(&format!(
        "; healthy runs held by their destination: {held:.0}, attempts not succeeded: {healthy_failed:.0}"
    ));
    rows.push(row);
    drop(server);
    drop_db(backend, &db).await;
    Ok(())
}
