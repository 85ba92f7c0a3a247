//! The load generator: Operator-style signed deliveries over HTTP/1.1
//! keep-alive connections, either closed-loop at maximum rate (N workers,
//! each sending its next request when the last is answered) or open-loop
//! at a fixed rate (latency counted from the moment a request was due, so
//! a stalled server is not hidden by a stalled generator).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use switchboard::webhook::signature::{SignedParts, SigningKey, sign};
use tokio::sync::Mutex;

pub const KEY: &str = "bench-key";

/// What one load run measured.
#[derive(Clone, Debug, Default)]
pub struct Sample {
    pub sent: u64,
    pub ok: u64,
    pub errors: u64,
    pub elapsed: Duration,
    /// Sorted latencies of the answered requests.
    pub latencies: Vec<Duration>,
}

impl Sample {
    pub fn rate(&self) -> f64 {
        self.ok as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }

    pub fn pct(&self, p: f64) -> f64 {
        pct(&self.latencies, p)
    }
}

/// The value at quantile `p` of sorted durations, in milliseconds (NaN when empty).
pub fn pct(sorted: &[Duration], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize].as_secs_f64() * 1e3
}

/// Builds the body of request number `i`.
pub type MakeBody = Arc<dyn Fn(u64) -> String + Send + Sync>;

/// Called with (request number, time the answer arrived) for each 200.
pub type OnAck = Arc<dyn Fn(u64, Instant) + Send + Sync>;

#[derive(Clone)]
pub struct Target {
    pub client: reqwest::Client,
    pub url: String,
    /// Sign as Operator does (false: a plain POST, for the HTTP ceiling).
    pub signed: bool,
    pub make_body: MakeBody,
    pub on_ack: Option<OnAck>,
}

pub fn client(connections: usize) -> reqwest::Client {
    reqwest::Client::builder()
        .pool_max_idle_per_host(connections)
        .http1_only()
        .tcp_nodelay(true)
        .timeout(Duration::from_secs(30))
        .build()
        .expect("http client")
}

impl Target {
    async fn send(&self, i: u64) -> bool {
        let body = (self.make_body)(i);
        let mut req = self
            .client
            .post(&self.url)
            .header("content-type", "application/json");
        if self.signed {
            let ts = chrono::Utc::now().timestamp().to_string();
            let idem = uuid::Uuid::new_v4().to_string();
            let sig = sign(
                &SigningKey::new(KEY).expect("key"),
                &SignedParts {
                    url: &self.url,
                    idempotency_key: &idem,
                    timestamp: &ts,
                    body: body.as_bytes(),
                },
            );
            req = req
                .header("X-Timestamp", ts)
                .header("X-Idempotency-Key", idem)
                .header("X-Signature", sig);
        }
        match req.body(body).send().await {
            Ok(resp) if resp.status() == 200 => {
                let ok = resp.bytes().await.is_ok();
                if ok && let Some(on_ack) = &self.on_ack {
                    on_ack(i, Instant::now());
                }
                ok
            }
            _ => false,
        }
    }
}

/// Closed loop: `connections` workers send back to back for `duration`
/// (or until `limit` requests were sent).
pub async fn max_rate(
    target: &Target,
    connections: usize,
    duration: Duration,
    limit: Option<u64>,
) -> Sample {
    let next = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let deadline = start + duration;
    let mut workers = Vec::new();
    for _ in 0..connections {
        let target = target.clone();
        let next = next.clone();
        workers.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            let mut errors = 0u64;
            loop {
                if Instant::now() >= deadline {
                    break;
                }
                let i = next.fetch_add(1, Ordering::Relaxed);
                if limit.is_some_and(|l| i >= l) {
                    break;
                }
                let t = Instant::now();
                if target.send(i).await {
                    lat.push(t.elapsed());
                } else {
                    errors += 1;
                }
            }
            (lat, errors)
        }));
    }
    let mut sample = Sample::default();
    for w in workers {
        let (lat, errors) = w.await.expect("load worker");
        sample.ok += lat.len() as u64;
        sample.errors += errors;
        sample.latencies.extend(lat);
    }
    sample.elapsed = start.elapsed();
    sample.sent = sample.ok + sample.errors;
    sample.latencies.sort();
    sample
}

/// Open loop: one request every 1/`rate` s for `duration`, however long answers take.
pub async fn fixed_rate(target: &Target, rate: f64, duration: Duration) -> Sample {
    let total = (rate * duration.as_secs_f64()).round() as u64;
    let interval = Duration::from_secs_f64(1.0 / rate);
    let results = Arc::new(Mutex::new((Vec::with_capacity(total as usize), 0u64)));
    let start = Instant::now();
    let mut tasks = Vec::with_capacity(total as usize);
    for i in 0..total {
        let due = start + interval.mul_f64(i as f64);
        tokio::time::sleep_until(due.into()).await;
        let target = target.clone();
        let results = results.clone();
        tasks.push(tokio::spawn(async move {
            let ok = target.send(i).await;
            let took = due.elapsed();
            let mut r = results.lock().await;
            if ok {
                r.0.push(took);
            } else {
                r.1 += 1;
            }
        }));
    }
    for t in tasks {
        let _ = t.await;
    }
    let elapsed = start.elapsed();
    let (mut latencies, errors) = std::mem::take(&mut *results.lock().await);
    latencies.sort();
    Sample {
        sent: total,
        ok: latencies.len() as u64,
        errors,
        elapsed,
        latencies,
    }
}

/// An Operator envelope with a unique id (`tag` keeps runs apart) around `payload`.
fn envelope(tag: &str, i: u64, payload: serde_json::Value) -> String {
    serde_json::json!({
        "id": format!("ev_{tag}_{i}"),
        "created_at": "2025-07-14T15:09:40.251Z",
        "agent_id": "ca_bench@v1",
        "livemode": true,
        "conversation_id": format!("conv_{tag}_{i}"),
        "payload": payload
    })
    .to_string()
}

/// A conversation.ended body with a unique id.
pub fn ended_body(tag: &str, i: u64) -> String {
    envelope(
        tag,
        i,
        serde_json::json!({"type": "conversation.ended", "status": "completed"}),
    )
}

/// A conversation.setup body (outbound phone call) with a unique id.
pub fn setup_body(tag: &str, i: u64) -> String {
    envelope(
        tag,
        i,
        serde_json::json!({"type": "conversation.setup", "direction": "outbound",
            "channel": {"type": "phone", "caller_no": "+15550100", "callee_no": format!("+1555{i:07}")}}),
    )
}
