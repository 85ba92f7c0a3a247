//! Bench scenario `destinations` (issue 14): 500 runs to a destination
//! limited to 50/s, measured at the sink: the steady rate after the first
//! second, the most requests in any one-second window after it, and whether
//! every run arrived exactly once. Then the cost of the gate for a
//! destination with no rate or cap: ack → sink latency at a fixed rate with
//! a breaker-only `default:` (compare with scenario 2's row).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::server::{self, Server, Sink};
use super::{Ctx, Row, backend_name, drop_db, fresh_db, load, tag, target, write_workflow};

/// The gate in process, per request: admit + report, for a destination with
/// only a breaker (the `default:`), and with nothing configured.
async fn gate_cost(rows: &mut Vec<Row>) -> anyhow::Result<()> {
    use switchboard::destinations::gate::{Admit, Gate, Outcome};
    let n = 200_000u32;
    for (label, yaml) in [
        ("nothing configured", ""),
        (
            "breaker-only default",
            "default:\n  circuit_breaker: { failures: 10, cool_down: 30s }\n",
        ),
    ] {
        let gate = Gate::default();
        let d = switchboard::destinations::format::compile(std::path::Path::new("d.yaml"), yaml)
            .map_err(|e| anyhow::anyhow!("{e:?}"))?;
        gate.configure(Arc::new(d));
        let ok = Outcome {
            status: Some(200),
            ..Default::default()
        };
        let start = Instant::now();
        for _ in 0..n {
            if gate.config().is_empty() {
                continue;
            }
            match gate.admit("http://127.0.0.1:9/crm/deliveries", None).await {
                Admit::Go(p) => {
                    p.report(&ok);
                }
                Admit::Hold(_) => anyhow::bail!("held with nothing limited"),
            }
        }
        let per = start.elapsed().as_secs_f64() * 1e9 / f64::from(n);
        rows.push(Row::note_only(
            &format!("5. destinations: gate per request, {label}"),
            "-",
            1e9 / per,
            0,
            format!("{per:.0} ns per admit + report, in process, no database"),
        ));
    }
    Ok(())
}

pub async fn run(ctx: &Ctx, backend: &str, rows: &mut Vec<Row>) -> anyhow::Result<()> {
    let b = backend_name(backend);
    gate_cost(rows).await?;
    let (sink, sink_url) = Sink::start().await?;
    let wf = ctx.tmp.path().join(format!("wf-dest-{}", tag()));
    write_workflow(
        &wf,
        "crm.yaml",
        &format!(
            "name: crm\non: {{ event: conversation.ended }}\nsteps:\n  - id: post\n    http:\n      url: \"{sink_url}/crm/deliveries\"\n      json: {{ event: \"{{{{ event.id }}}}\" }}\n"
        ),
    )?;
    write_workflow(
        &wf,
        "destinations.yaml",
        &format!("destinations:\n  - name: crm\n    url: \"{sink_url}/crm/\"\n    rate: 50/s\n"),
    )?;
    let db = fresh_db(backend, ctx.tmp.path()).await?;
    let server = Server::start(&ctx.bin, &db, &wf, ctx.tmp.path(), &[]).await?;
    let t = tag();
    let tgt = target(
        &server,
        ctx.o.connections,
        Arc::new(move |i| load::ended_body(&t, i)),
    );
    let n = 500u64;
    let sent = load::max_rate(&tgt, ctx.o.connections, Duration::from_secs(120), Some(n)).await;
    sink.wait_for(sent.ok as usize, Duration::from_secs(60))
        .await;
    let (mut times, dupes): (Vec<Instant>, u32) = {
        let a = sink.arrivals.lock().unwrap();
        (
            a.values().map(|(t, _)| *t).collect(),
            a.values().map(|(_, c)| c.saturating_sub(1)).sum(),
        )
    };
    times.sort();
    anyhow::ensure!(!times.is_empty(), "nothing reached the sink");
    let first = times[0];
    let after: Vec<Instant> = times
        .iter()
        .copied()
        .filter(|t| t.duration_since(first) >= Duration::from_secs(1))
        .collect();
    let mut max_window = 0;
    let mut j = 0;
    for i in 0..after.len() {
        while after[i].duration_since(after[j]) >= Duration::from_secs(1) {
            j += 1;
        }
        max_window = max_window.max(i - j + 1);
    }
    let steady = match (after.first(), after.last()) {
        (Some(a), Some(z)) if z > a => {
            (after.len() - 1) as f64 / z.duration_since(*a).as_secs_f64()
        }
        _ => 0.0,
    };
    let (_, peak) = server::rss_mb(server.pid());
    rows.push(Row::note_only(
        "5. destinations: 500 runs, rate 50/s",
        b,
        steady,
        sent.errors + (n - times.len() as u64) + u64::from(dupes),
        format!(
            "{} of {n} arrived, {dupes} twice; steady {steady:.1}/s after the first second (limit 50/s); \
             at most {max_window} in any 1 s after it; RSS {peak:.0} MB",
            times.len()
        ),
    ));
    drop(server);
    drop_db(backend, &db).await;

    // The gate's cost where nothing is limited: a breaker-only default.
    let (sink, sink_url) = Sink::start().await?;
    let wf = ctx.tmp.path().join(format!("wf-dest0-{}", tag()));
    write_workflow(
        &wf,
        "e2e.yaml",
        &format!(
            "name: e2e\non: {{ event: conversation.ended }}\nsteps:\n  - id: post\n    http:\n      url: \"{sink_url}/deliveries\"\n      json: {{ event: \"{{{{ event.id }}}}\" }}\n"
        ),
    )?;
    write_workflow(
        &wf,
        "destinations.yaml",
        "default:\n  circuit_breaker: { failures: 10, cool_down: 30s }\n",
    )?;
    let db = fresh_db(backend, ctx.tmp.path()).await?;
    let server = Server::start(&ctx.bin, &db, &wf, ctx.tmp.path(), &[]).await?;
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
    let fixed = load::fixed_rate(&tgt, 300.0, ctx.o.duration).await;
    sink.wait_for(fixed.ok as usize, Duration::from_secs(30))
        .await;
    let mut lat: Vec<Duration> = {
        let acks = acks.lock().unwrap();
        let arrivals = sink.arrivals.lock().unwrap();
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
    rows.push(Row {
        scenario: "5. destinations: 300/s ack → sink, breaker-only default".into(),
        backend: b.into(),
        rate: delivered as f64 / fixed.elapsed.as_secs_f64(),
        p50: load::pct(&lat, 0.5),
        p90: load::pct(&lat, 0.9),
        p99: load::pct(&lat, 0.99),
        max: load::pct(&lat, 1.0),
        errors: fixed.errors + fixed.ok - delivered,
        rss_peak_mb: peak,
        note: format!("{delivered} delivered; compare with scenario 2 (no destinations.yaml)"),
        cost: None,
    });
    drop(server);
    drop_db(backend, &db).await;
    Ok(())
}

/// Scenario `shared-rate` (PostgreSQL only): two instances over one database
/// share `rate: 50/s`; 1,000 runs, half ingested through each; the combined
/// rate at the sink after the first second, against the limit.
pub async fn shared_rate(ctx: &Ctx, backend: &str, rows: &mut Vec<Row>) -> anyhow::Result<()> {
    if backend == "sqlite" {
        return Ok(()); // one process runs the engine on SQLite
    }
    let (sink, sink_url) = Sink::start().await?;
    let wf = ctx.tmp.path().join(format!("wf-shared-{}", tag()));
    write_workflow(
        &wf,
        "crm.yaml",
        &format!(
            "name: crm\non: {{ event: conversation.ended }}\nsteps:\n  - id: post\n    http:\n      url: \"{sink_url}/crm/deliveries\"\n      json: {{ event: \"{{{{ event.id }}}}\" }}\n"
        ),
    )?;
    write_workflow(
        &wf,
        "destinations.yaml",
        &format!("destinations:\n  - name: crm\n    url: \"{sink_url}/crm/\"\n    rate: 50/s\n"),
    )?;
    let db = fresh_db(backend, ctx.tmp.path()).await?;
    let a = Server::start(&ctx.bin, &db, &wf, ctx.tmp.path(), &[]).await?;
    let b_srv = Server::start(&ctx.bin, &db, &wf, ctx.tmp.path(), &[]).await?;
    let n = if ctx.o.duration < Duration::from_secs(2) {
        100u64
    } else {
        1_000
    };
    let (ta, tb) = (tag(), tag());
    let (ga, gb) = (
        target(&a, 16, Arc::new(move |i| load::ended_body(&ta, i))),
        target(&b_srv, 16, Arc::new(move |i| load::ended_body(&tb, i))),
    );
    let (sa, sb) = tokio::join!(
        load::max_rate(&ga, 16, Duration::from_secs(120), Some(n / 2)),
        load::max_rate(&gb, 16, Duration::from_secs(120), Some(n / 2)),
    );
    let sent = sa.ok + sb.ok;
    sink.wait_for(sent as usize, Duration::from_secs(n / 25 + 30))
        .await;
    let mut times: Vec<Instant> = sink
        .arrivals
        .lock()
        .unwrap()
        .values()
        .map(|(t, _)| *t)
        .collect();
    times.sort();
    anyhow::ensure!(!times.is_empty(), "nothing reached the sink");
    let after: Vec<Instant> = times
        .iter()
        .copied()
        .filter(|t| t.duration_since(times[0]) >= Duration::from_secs(1))
        .collect();
    let mut max_window = 0;
    let mut j = 0;
    for i in 0..after.len() {
        while after[i].duration_since(after[j]) >= Duration::from_secs(1) {
            j += 1;
        }
        max_window = max_window.max(i - j + 1);
    }
    let steady = match (after.first(), after.last()) {
        (Some(x), Some(z)) if z > x => {
            (after.len() - 1) as f64 / z.duration_since(*x).as_secs_f64()
        }
        _ => 0.0,
    };
    rows.push(Row::note_only(
        &format!("5. destinations: two instances, {n} runs, 50/s"),
        backend_name(backend),
        steady,
        sa.errors + sb.errors + n - times.len() as u64,
        format!(
            "{} of {n} arrived; combined {steady:.1}/s after the first second = {:.0} % of the limit; at most {max_window} in any 1 s",
            times.len(),
            100.0 * steady / 50.0
        ),
    ));
    drop(a);
    drop(b_srv);
    drop_db(backend, &db).await;
    Ok(())
}

/// The load average of the machine (1 min), to print next to a figure.
pub fn loadavg() -> f64 {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .unwrap_or(f64::NAN)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.retain(|x| x.is_finite());
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// Scenario `dest-overhead` (issue 14: "overhead for destinations with no
/// limits: none measurable"): scenario 2's fixed 300/s phase (ack → sink
/// latency, server CPU and transactions per delivery) with no
/// `destinations.yaml`, with a breaker-only `default:` (the workflow's URL
/// falls to it), and with an entry without limits covering the URL (beside
/// that default). One database and one workflow; the variants take turns,
/// round after round (`--rounds`, at least 3), each phase on a server of
/// its own, so noise of a shared machine falls on all of them; the medians
/// over the rounds and their differences to no file are printed.
pub async fn overhead(ctx: &Ctx, backend: &str, rows: &mut Vec<Row>) -> anyhow::Result<()> {
    let b = backend_name(backend);
    let db = fresh_db(backend, ctx.tmp.path()).await?;
    let breaker =
        "default:\n  circuit_breaker: { failures: 10, cool_down: 30s, max_cool_down: 10m }\n";
    // One sink: the workflow is the same text in every variant.
    let (sink, sink_url) = Sink::start().await?;
    let mut variants = Vec::new();
    for (label, with) in [
        ("no destinations.yaml", 0),
        ("breaker-only default", 1),
        ("entry without limits", 2),
    ] {
        let wf = ctx.tmp.path().join(format!("wf-overhead-{}", tag()));
        write_workflow(
            &wf,
            "e2e.yaml",
            &format!(
                "name: e2e\non: {{ event: conversation.ended }}\nsteps:\n  - id: post\n    http:\n      url: \"{sink_url}/deliveries\"\n      json: {{ event: \"{{{{ event.id }}}}\" }}\n"
            ),
        )?;
        match with {
            1 => write_workflow(&wf, "destinations.yaml", breaker)?,
            2 => write_workflow(
                &wf,
                "destinations.yaml",
                &format!("destinations:\n  - name: sink\n    url: \"{sink_url}/\"\n{breaker}"),
            )?,
            _ => {}
        }
        let probe = super::Probe::new(backend, &db);
        let startup = probe
            .startup_xacts(&ctx.bin, &db, &wf, ctx.tmp.path())
            .await?;
        variants.push((
            label,
            super::E2e {
                ctx,
                db: db.clone(),
                wf,
                sink: sink.clone(),
                probe,
                startup,
            },
        ));
    }
    let rounds = ctx.o.rounds.max(3);
    // (p50, p99, server CPU ms, db CPU ms, tx, load average) per round, per variant.
    let mut got: Vec<Vec<[f64; 6]>> = vec![Vec::new(); variants.len()];
    for round in 1..=rounds {
        for (k, (label, v)) in variants.iter().enumerate() {
            let load_before = loadavg();
            let row = v.fixed(b, 300.0).await?;
            let cost = row.cost.clone();
            let c = |f: fn(&super::cost::Cost) -> f64| cost.as_ref().map_or(f64::NAN, f);
            let fig = [
                row.p50,
                row.p99,
                c(|c| c.server_cpu_ms),
                c(|c| c.db_cpu_ms),
                c(|c| c.tx_per_msg),
                (load_before + loadavg()) / 2.0,
            ];
            println!(
                "dest-overhead {b} round {round} {label:<22}: p50 {:.2} ms, p99 {:.2} ms, server {:.3} ms/delivery, db {:.3} ms, tx {:.2}, {} of {:.0}/s delivered, errors {}, load {:.2}",
                fig[0], fig[1], fig[2], fig[3], fig[4], row.rate, 300.0, row.errors, fig[5]
            );
            anyhow::ensure!(row.errors == 0, "{label}: {} errors", row.errors);
            got[k].push(fig);
        }
    }
    let med = |k: usize, i: usize| median(got[k].iter().map(|f| f[i]).collect());
    for (k, (label, _)) in variants.iter().enumerate() {
        let each = |i: usize| {
            got[k]
                .iter()
                .map(|f| format!("{:.2}", f[i]))
                .collect::<Vec<_>>()
                .join("/")
        };
        let diff = if k == 0 {
            String::new()
        } else {
            format!(
                "; vs no file: p50 {:+.3} ms, p99 {:+.3} ms, server CPU {:+.3} ms/delivery",
                med(k, 0) - med(0, 0),
                med(k, 1) - med(0, 1),
                med(k, 2) - med(0, 2)
            )
        };
        rows.push(Row {
            scenario: format!("5. dest-overhead, 300/s, {label}"),
            backend: b.into(),
            rate: 300.0,
            p50: med(k, 0),
            p90: f64::NAN,
            p99: med(k, 1),
            max: f64::NAN,
            errors: 0,
            rss_peak_mb: f64::NAN,
            note: format!(
                "medians of {rounds} rounds: server CPU {:.3} ms/delivery (rounds {}), db {:.3} ms, tx {:.2}; p99 by round {}; load avg {}{diff}",
                med(k, 2),
                each(2),
                med(k, 3),
                med(k, 4),
                each(1),
                each(5),
            ),
            cost: None,
        });
    }
    drop(variants);
    drop_db(backend, &db).await;
    Ok(())
}
