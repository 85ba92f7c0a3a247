//! Measures how soon a run's first attempt leaves after its webhook is
//! acknowledged, on an idle server: the real server in this process, a
//! workflow posting to a local sink, one delivery at a time.
//!
//! cargo run --release --example pickup_latency [-- N [postgres://…]]
//!
//! Prints p50/p90/p99/max of (sink received) − (acknowledgement received).

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use poem::listener::{Acceptor, Listener, TcpListener};
use poem::{EndpointExt, Route, Server, handler, web::Data};
use switchboard::api::AdminToken;
use switchboard::config::Settings;
use switchboard::startup::Application;
use switchboard::webhook::signature::{SignedParts, SigningKey, SigningKeys, Tolerance, sign};

type Arrivals = Arc<Mutex<Vec<(String, Instant)>>>;

#[handler]
async fn sink(req: &poem::Request, arrivals: Data<&Arrivals>) -> &'static str {
    let key = req.header("idempotency-key").unwrap_or_default().to_owned();
    arrivals.lock().unwrap().push((key, Instant::now()));
    "{}"
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let mut args = std::env::args().skip(1);
    let n: usize = args.next().map(|a| a.parse()).transpose()?.unwrap_or(300);
    let tmp = tempfile::tempdir()?;
    let database_url = args
        .next()
        .unwrap_or_else(|| format!("sqlite://{}", tmp.path().join("bench.db").display()));

    let arrivals: Arrivals = Arc::default();
    let acceptor = TcpListener::bind("127.0.0.1:0").into_acceptor().await?;
    let sink_addr = *acceptor.local_addr()[0].as_socket_addr().unwrap();
    let app = Route::new().at("/*p", sink).data(arrivals.clone());
    tokio::spawn(async move { Server::new_with_acceptor(acceptor).run(app).await });

    let wf_dir = tmp.path().join("workflows");
    std::fs::create_dir_all(&wf_dir)?;
    std::fs::write(
        wf_dir.join("sink.yaml"),
        format!(
            "on: {{ event: conversation.ended }}\nsteps:\n  - id: post\n    http: {{ url: \"http://{sink_addr}/crm\" }}\n"
        ),
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
    let key = SigningKey::new("bench-key").unwrap();
    let run_tag = uuid::Uuid::new_v4().simple().to_string();

    let mut latencies = Vec::with_capacity(n);
    for i in 0..n {
        let body = serde_json::json!({"id": format!("ev_{run_tag}_{i}"), "conversation_id": format!("conv_{i}"),
            "payload": {"type": "conversation.ended", "status": "completed"}})
        .to_string();
        let ts = chrono::Utc::now().timestamp().to_string();
        let idem = uuid::Uuid::new_v4().to_string();
        let sig = sign(
            &key,
            &SignedParts {
                url: &url,
                idempotency_key: &idem,
                timestamp: &ts,
                body: body.as_bytes(),
            },
        );
        let before = arrivals.lock().unwrap().len();
        let resp = client
            .post(&url)
            .header("X-Timestamp", &ts)
            .header("X-Idempotency-Key", &idem)
            .header("X-Signature", sig)
            .body(body)
            .send()
            .await?;
        let acked = Instant::now();
        anyhow::ensure!(resp.status() == 200, "delivery refused: {}", resp.status());
        let arrived = loop {
            if let Some((_, at)) = arrivals.lock().unwrap().get(before).cloned() {
                break at;
            }
            tokio::time::sleep(Duration::from_micros(100)).await;
        };
        latencies.push(arrived.saturating_duration_since(acked));
        // Idle between deliveries, as on a quiet system.
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    latencies.sort();
    let backend = if database_url.starts_with("postgres") {
        "postgres"
    } else {
        "sqlite"
    };
    println!("pick-up latency, ack → sink, {n} sequential deliveries on {backend}:");
    println!(
        "  p50 {:.2} ms  p90 {:.2} ms  p99 {:.2} ms  max {:.2} ms",
        percentile(&latencies, 0.5).as_secs_f64() * 1e3,
        percentile(&latencies, 0.9).as_secs_f64() * 1e3,
        percentile(&latencies, 0.99).as_secs_f64() * 1e3,
        latencies.last().unwrap().as_secs_f64() * 1e3
    );
    Ok(())
}
