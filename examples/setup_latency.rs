//! Measures what a static setup answer adds at the server: the same server,
//! one delivery at a time, acknowledgement latency of conversation.ended
//! (stored only) versus conversation.setup answered by a templated workflow
//! without lookups.
//!
//! cargo run --release --example setup_latency [-- N [postgres://…]]

use std::time::{Duration, Instant};

use switchboard::api::AdminToken;
use switchboard::config::Settings;
use switchboard::startup::Application;
use switchboard::webhook::signature::{SignedParts, SigningKey, SigningKeys, Tolerance, sign};

fn percentile(sorted: &[Duration], p: f64) -> f64 {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize].as_secs_f64() * 1e3
}

async fn measure(
    client: &reqwest::Client,
    url: &str,
    n: usize,
    tag: &str,
    payload: serde_json::Value,
) -> anyhow::Result<Vec<Duration>> {
    let key = SigningKey::new("bench-key").unwrap();
    let mut out = Vec::with_capacity(n);
    for i in 0..n {
        let body = serde_json::json!({"id": format!("ev_{tag}_{i}"), "conversation_id": format!("conv_{tag}_{i}"),
            "agent_id": "ca_bench@v1", "livemode": true, "payload": payload})
        .to_string();
        let ts = chrono::Utc::now().timestamp().to_string();
        let idem = uuid::Uuid::new_v4().to_string();
        let sig = sign(
            &key,
            &SignedParts {
                url,
                idempotency_key: &idem,
                timestamp: &ts,
                body: body.as_bytes(),
            },
        );
        let start = Instant::now();
        let resp = client
            .post(url)
            .header("X-Timestamp", &ts)
            .header("X-Idempotency-Key", &idem)
            .header("X-Signature", sig)
            .body(body)
            .send()
            .await?;
        anyhow::ensure!(resp.status() == 200, "refused: {}", resp.status());
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
    let database_url = args
        .next()
        .unwrap_or_else(|| format!("sqlite://{}", tmp.path().join("bench.db").display()));
    let wf_dir = tmp.path().join("workflows");
    std::fs::create_dir_all(&wf_dir)?;
    std::fs::write(
        wf_dir.join("static.yaml"),
        "on: { event: conversation.setup }\nwhen: event.payload.direction == \"outbound\"\nrespond:\n  context:\n    $variables: { campaign: renewals, callee: \"{{ event.payload.channel.callee_no }}\" }\n",
    )?;
    let settings = Settings {
        database_url: database_url.clone(),
        listen: "127.0.0.1:0".parse()?,
        public_url: None,
        signing_keys: SigningKeys::parse("bench-key").unwrap(),
        admin_token: AdminToken::new("bench"),
        admin_token_generated: false,
        workflows_dir: wf_dir,
        tolerance: Tolerance::default(),
        max_body_bytes: 1 << 20,
        shutdown_grace: Duration::from_secs(1),
        worker_concurrency: 32,
    };
    let server = Application::build(settings).await?;
    let url = format!("http://{}/webhooks/operator", server.local_addr());
    tokio::spawn(server.run());
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
    let backend = if database_url.starts_with("postgres") {
        "postgres"
    } else {
        "sqlite"
    };
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
