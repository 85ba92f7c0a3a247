//! Measures what a static setup answer adds at the server: the same server,
//! one delivery at a time, acknowledgement latency of conversation.ended
//! (stored only) versus conversation.setup answered by a templated workflow
//! without lookups.
//!
//! cargo run --release --example setup_latency [-- N [postgres://…]]

mod common;

use std::time::{Duration, Instant};

use common::ms as percentile;

async fn measure(
    client: &reqwest::Client,
    url: &str,
    n: usize,
    tag: &str,
    payload: serde_json::Value,
) -> anyhow::Result<Vec<Duration>> {
    let mut out = Vec::with_capacity(n);
    for i in 0..n {
        let body = serde_json::json!({"id": format!("ev_{tag}_{i}"), "conversation_id": format!("conv_{tag}_{i}"),
            "agent_id": "ca_bench@v1", "livemode": true, "payload": payload})
        .to_string();
        let start = Instant::now();
        let resp = common::deliver(client, url, body).await?;
        let _ = resp.bytes().await?;
        out.push(start.elapsed());
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    out.sort();
    Ok(out)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let mut args = std::env::args().skip(1);
    let n: usize = args.next().map(|a| a.parse()).transpose()?.unwrap_or(500);
    let tmp = tempfile::tempdir()?;
    let database_url = common::database_url(args.next(), tmp.path());
    let wf_dir = tmp.path().join("workflows");
    std::fs::create_dir_all(&wf_dir)?;
    std::fs::write(
        wf_dir.join("static.yaml"),
        "on: { event: conversation.setup }\nwhen: event.payload.direction == \"outbound\"\nrespond:\n  context:\n    $variables: { campaign: renewals, callee: \"{{ event.payload.channel.callee_no }}\" }\n",
    )?;
    let url = format!(
        "{}/webhooks/operator",
        common::start_server(&database_url, &wf_dir).await?
    );
    let client = reqwest::Client::new();
    let tag = uuid::Uuid::new_v4().simple().to_string();
    // Warm up connections and caches.
    measure(
        &client,
        &url,
        50,
        &format!("w{tag}"),
        serde_json::json!({"type": "conversation.ended", "status": "completed"}),
    )
    .await?;
    let ended = measure(
        &client,
        &url,
        n,
        &format!("e{tag}"),
        serde_json::json!({"type": "conversation.ended", "status": "completed"}),
    )
    .await?;
    let setup = measure(
        &client,
        &url,
        n,
        &format!("s{tag}"),
        serde_json::json!({"type": "conversation.setup", "direction": "outbound", "channel": {"type": "phone", "callee_no": "+13105550162"}}),
    )
    .await?;
    let backend = common::backend(&database_url);
    println!("ack latency, {n} sequential deliveries each, {backend} (ms):");
    println!(
        "  {:<28} {:>7} {:>7} {:>7} {:>7}",
        "", "p50", "p90", "p99", "max"
    );
    for (name, d) in [
        ("conversation.ended (stored)", &ended),
        ("setup, static answer", &setup),
    ] {
        println!(
            "  {:<28} {:>7.2} {:>7.2} {:>7.2} {:>7.2}",
            name,
            percentile(d, 0.5),
            percentile(d, 0.9),
            percentile(d, 0.99),
            d.last().unwrap().as_secs_f64() * 1e3
        );
    }
    println!(
        "  added by the answer: p50 {:+.2} ms, p99 {:+.2} ms",
        percentile(&setup, 0.5) - percentile(&ended, 0.5),
        percentile(&setup, 0.99) - percentile(&ended, 0.99)
    );
    Ok(())
}
