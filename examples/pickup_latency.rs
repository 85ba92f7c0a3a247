//! Measures how soon a run's first attempt leaves after its webhook is
//! acknowledged, on an idle server: the real server in this process, a
//! workflow posting to a local sink, one delivery at a time.
//!
//! cargo run --release --example pickup_latency [-- N [postgres://…]]
//!
//! Prints p50/p90/p99/max of (sink received) − (acknowledgement received).

mod common;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::ms;
use poem::listener::{Acceptor, Listener, TcpListener};
use poem::{EndpointExt, Route, Server, handler, web::Data};

type Arrivals = Arc<Mutex<Vec<(String, Instant)>>>;

#[handler]
async fn sink(req: &poem::Request, arrivals: Data<&Arrivals>) -> &'static str {
    let key = req.header("idempotency-key").unwrap_or_default().to_owned();
    arrivals.lock().unwrap().push((key, Instant::now()));
    "{}"
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let mut args = std::env::args().skip(1);
    let n: usize = args.next().map(|a| a.parse()).transpose()?.unwrap_or(300);
    let tmp = tempfile::tempdir()?;
    let database_url = common::database_url(args.next(), tmp.path());

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
    let url = format!(
        "{}/webhooks/operator",
        common::start_server(&database_url, &wf_dir).await?
    );
    let client = reqwest::Client::new();
    let run_tag = uuid::Uuid::new_v4().simple().to_string();

    let mut latencies = Vec::with_capacity(n);
    for i in 0..n {
        let body = serde_json::json!({"id": format!("ev_{run_tag}_{i}"), "conversation_id": format!("conv_{i}"),
            "payload": {"type": "conversation.ended", "status": "completed"}})
        .to_string();
        let before = arrivals.lock().unwrap().len();
        common::deliver(&client, &url, body).await?;
        let acked = Instant::now();
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
    let backend = common::backend(&database_url);
    println!("pick-up latency, ack → sink, {n} sequential deliveries on {backend}:");
    println!(
        "  p50 {:.2} ms  p90 {:.2} ms  p99 {:.2} ms  max {:.2} ms",
        ms(&latencies, 0.5),
        ms(&latencies, 0.9),
        ms(&latencies, 0.99),
        latencies.last().unwrap().as_secs_f64() * 1e3
    );
    Ok(())
}
