//! Admin list latency with a large store: seeds N events (through the
//! store's own append path, in batches) into a fresh database, then times
//! each list endpoint over HTTP.
//!
//! cargo run --release --example list_latency [-- N [postgres://…]]

mod common;

use std::time::Instant;

use switchboard::store::{self, NoWorkflows};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let mut args = std::env::args().skip(1);
    let n: usize = args
        .next()
        .map(|a| a.parse())
        .transpose()?
        .unwrap_or(100_000);
    let tmp = tempfile::tempdir()?;
    let database_url = common::database_url(args.next(), tmp.path());
    let store = store::connect(&database_url).await?;
    store.migrate().await?;
    let seed_start = Instant::now();
    let mut batch = Vec::with_capacity(256);
    for i in 0..n {
        batch.push(common::seed_event(i)?);
        if batch.len() == 256 || i + 1 == n {
            store.append_batch(&batch, &NoWorkflows).await?;
            batch.clear();
        }
    }
    println!(
        "seeded {n} events in {:.1} s",
        seed_start.elapsed().as_secs_f64()
    );
    let base = common::start_server(&database_url, &tmp.path().join("none")).await?;
    let client = reqwest::Client::new();
    let mid = n / 2;
    let paths = [
        "/api/v1/events?limit=50".to_owned(),
        format!("/api/v1/events?limit=50&cursor={mid}"),
        "/api/v1/events?type=conversation.ended&limit=50".to_owned(),
        format!("/api/v1/events?conversation_id=conv_{}", n / 8),
        "/api/v1/events?agent_id=ca_7@v1&limit=50".to_owned(),
        format!("/api/v1/events/ev_seed_{mid}"),
        "/api/v1/conversations?limit=50".to_owned(),
        "/api/v1/conversations?status=busy&limit=50".to_owned(),
        format!("/api/v1/conversations/conv_{}", n / 8),
        "/api/v1/runs?limit=50".to_owned(),
    ];
    let backend = common::backend(&database_url);
    println!("list latency with {n} events on {backend}, 20 calls each (ms):");
    println!("  {:<58} {:>7} {:>7}", "", "p50", "max");
    for path in &paths {
        let mut times = Vec::new();
        for _ in 0..20 {
            let start = Instant::now();
            let resp = client
                .get(format!("{base}{path}"))
                .bearer_auth(common::TOKEN)
                .send()
                .await?;
            anyhow::ensure!(resp.status() == 200, "{path}: {}", resp.status());
            let _ = resp.bytes().await?;
            times.push(start.elapsed());
        }
        times.sort();
        println!(
            "  {:<58} {:>7.2} {:>7.2}",
            path,
            times[times.len() / 2].as_secs_f64() * 1e3,
            times.last().unwrap().as_secs_f64() * 1e3
        );
    }
    Ok(())
}
