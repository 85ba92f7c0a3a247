//! Admin list latency with a large store: seeds N events (through the
//! store's own append path, in batches) into a fresh database, then times
//! each list endpoint over HTTP.
//!
//! cargo run --release --example list_latency [-- N [postgres://…]]

mod common;

use std::time::Instant;

use switchboard::domain::IdempotencyKey;
use switchboard::store::{self, NewEvent, NoWorkflows, Verification};
use switchboard::webhook::envelope::Envelope;

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
    let statuses = ["completed", "failed", "busy", "no-answer", "voicemail"];
    let mut batch = Vec::with_capacity(256);
    for i in 0..n {
        let body = serde_json::json!({"id": format!("ev_seed_{i}"), "conversation_id": format!("conv_{}", i / 4),
            "agent_id": format!("ca_{}@v1", i % 20), "livemode": true, "created_at": "2025-07-14T15:09:40.251Z",
            "payload": {"type": if i % 4 == 3 { "conversation.ended" } else { "conversation.custom_fields.updated" },
                        "status": statuses[i % 5], "key": "lead_status", "value": format!("v{i}")}})
        .to_string();
        batch.push(NewEvent {
            envelope: Envelope::parse(body.as_bytes())?,
            idempotency_key: IdempotencyKey::parse(format!("seed-{i}"))?,
            raw_body: body.into_bytes(),
            verification: Verification {
                signed_url: "http://seed".into(),
                timestamp: "0".into(),
                signature: "seed".into(),
            },
            received_at: chrono::Utc::now(),
            span: tracing::Span::none(),
        });
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
