//! What the measuring examples share: a server in this process on a fresh
//! or given database, and Operator-style signed deliveries.

#![allow(dead_code)]

use std::path::Path;
use std::time::Duration;

use switchboard::api::AdminToken;
use switchboard::config::Settings;
use switchboard::startup::Application;
use switchboard::webhook::signature::{SignedParts, SigningKey, SigningKeys, Tolerance, sign};

pub const KEY: &str = "bench-key";
pub const TOKEN: &str = "bench";

/// The database URL from the command line, or an SQLite file in `tmp`.
pub fn database_url(arg: Option<String>, tmp: &Path) -> String {
    arg.unwrap_or_else(|| format!("sqlite://{}", tmp.join("bench.db").display()))
}

pub fn backend(url: &str) -> &'static str {
    if url.starts_with("postgres") {
        "postgres"
    } else {
        "sqlite"
    }
}

/// Starts the real server on port 0; returns its base URL.
pub async fn start_server(database_url: &str, workflows_dir: &Path) -> anyhow::Result<String> {
    let settings = Settings {
        database_url: database_url.to_owned(),
        listen: "127.0.0.1:0".parse()?,
        public_url: None,
        signing_keys: SigningKeys::parse(KEY).unwrap(),
        admin_token: AdminToken::new(TOKEN),
        admin_token_generated: false,
        workflows_dir: workflows_dir.to_owned(),
        tolerance: Tolerance::default(),
        max_body_bytes: 1 << 20,
        shutdown_grace: Duration::from_secs(1),
        worker_concurrency: 32,
        metrics_listen: None,
        trusted_proxies: Vec::new(),
        setup_cache_bytes: 32 * 1024 * 1024,
        append_timeout: switchboard::store::appender::APPEND_TIMEOUT,
        metrics_token: None,
    };
    let server = Application::build(settings).await?;
    let base = format!("http://{}", server.local_addr());
    tokio::spawn(server.run());
    Ok(base)
}

/// Posts `body` to the webhook URL, signed as Operator would.
pub async fn deliver(
    client: &reqwest::Client,
    url: &str,
    body: String,
) -> anyhow::Result<reqwest::Response> {
    let ts = chrono::Utc::now().timestamp().to_string();
    let idem = uuid::Uuid::new_v4().to_string();
    let key = SigningKey::new(KEY).unwrap();
    let sig = sign(
        &key,
        &SignedParts {
            url,
            idempotency_key: &idem,
            timestamp: &ts,
            body: body.as_bytes(),
        },
    );
    let resp = client
        .post(url)
        .header("X-Timestamp", &ts)
        .header("X-Idempotency-Key", &idem)
        .header("X-Signature", sig)
        .body(body)
        .send()
        .await?;
    anyhow::ensure!(resp.status() == 200, "delivery refused: {}", resp.status());
    Ok(resp)
}

/// The value at quantile `p` of sorted durations, in milliseconds.
pub fn ms(sorted: &[Duration], p: f64) -> f64 {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize].as_secs_f64() * 1e3
}

/// Seed event number `i` for a large store: four events per conversation
/// (three custom-field updates, then ended), twenty agents.
pub fn seed_event(i: usize) -> anyhow::Result<switchboard::store::NewEvent> {
    use switchboard::domain::IdempotencyKey;
    use switchboard::store::Verification;
    use switchboard::webhook::envelope::Envelope;
    let statuses = ["completed", "failed", "busy", "no-answer", "voicemail"];
    let body = serde_json::json!({"id": format!("ev_seed_{i}"), "conversation_id": format!("conv_{}", i / 4),
        "agent_id": format!("ca_{}@v1", i % 20), "livemode": true, "created_at": "2025-07-14T15:09:40.251Z",
        "payload": {"type": if i % 4 == 3 { "conversation.ended" } else { "conversation.custom_fields.updated" },
                    "status": statuses[i % 5], "key": "lead_status", "value": format!("v{i}")}})
    .to_string();
    Ok(switchboard::store::NewEvent {
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
    })
}
