//! Prometheus metrics: the names, their labels, and `GET /metrics`.
//!
//! Counters and histograms are recorded where things happen, through the
//! `metrics` crate's macros and the small helpers below (so every call site
//! uses the same names and labels). Gauges about the store (runs waiting,
//! age of the oldest, events, size) are read from the database when
//! `/metrics` is scraped, at most once a second whatever the scrape rate, so
//! they are right across several instances. With `SWITCHBOARD_METRICS_TOKEN`
//! set, `/metrics` answers only requests that present it as a bearer token.

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use metrics::{counter, describe_counter, describe_gauge, describe_histogram, gauge, histogram};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use poem::http::StatusCode;
use poem::web::Data;
use poem::{Request, Response, handler};

use crate::api::AdminToken;
use crate::store::EventStore;

/// The store gauges are read from the database at most this often.
pub const GAUGES_EVERY: Duration = Duration::from_secs(1);

/// Who may read `/metrics`, and when its store gauges were last read.
pub struct MetricsGate {
    token: Option<AdminToken>,
    last_read: tokio::sync::Mutex<Option<std::time::Instant>>,
}

impl MetricsGate {
    /// `token`: the bearer token required (`SWITCHBOARD_METRICS_TOKEN`), if any.
    pub fn new(token: Option<AdminToken>) -> Arc<Self> {
        Arc::new(Self {
            token,
            last_read: tokio::sync::Mutex::new(None),
        })
    }

    fn allows(&self, req: &Request) -> bool {
        let Some(token) = &self.token else {
            return true;
        };
        req.headers()
            .get(poem::http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| {
                v.strip_prefix("Bearer ")
                    .or_else(|| v.strip_prefix("bearer "))
            })
            .is_some_and(|presented| token.matches(presented.trim()))
    }
}

/// Latency buckets, in seconds: 0.25 ms to 30 s.
const BUCKETS: &[f64] = &[
    0.000_25, 0.000_5, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
    30.0,
];

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

/// Installs the process-wide recorder (once; later calls return the same handle).
pub fn install() -> PrometheusHandle {
    HANDLE
        .get_or_init(|| {
            let recorder = PrometheusBuilder::new()
                .set_buckets(BUCKETS)
                .expect("buckets are not empty")
                .build_recorder();
            let handle = recorder.handle();
            if metrics::set_global_recorder(recorder).is_err() {
                tracing::warn!("a metrics recorder was already installed; /metrics will be empty");
            }
            describe();
            let upkeep = handle.clone();
            std::thread::Builder::new()
                .name("metrics-upkeep".into())
                .spawn(move || {
                    loop {
                        std::thread::sleep(Duration::from_secs(5));
                        upkeep.run_upkeep();
                    }
                })
                .expect("spawn the metrics upkeep thread");
            handle
        })
        .clone()
}

fn describe() {
    describe_counter!(
        "switchboard_webhooks_received_total",
        "Webhook deliveries by event type and outcome (stored, duplicate, rejected, unavailable)"
    );
    describe_counter!(
        "switchboard_webhook_verification_failures_total",
        "Deliveries refused with 401, by reason"
    );
    describe_counter!(
        "switchboard_webhook_duplicates_total",
        "Repeated deliveries acknowledged without storing, by what identified them"
    );
    describe_histogram!(
        "switchboard_ingest_duration_seconds",
        metrics::Unit::Seconds,
        "From the request's arrival to its acknowledgement, by event type"
    );
    describe_histogram!(
        "switchboard_setup_answer_duration_seconds",
        metrics::Unit::Seconds,
        "Time to answer conversation.setup, lookups included"
    );
    describe_counter!(
        "switchboard_setup_fallbacks_total",
        "Setup answers that used the fallback, by workflow"
    );
    describe_counter!(
        "switchboard_runs_started_total",
        "Runs whose first attempt began, by workflow"
    );
    describe_counter!(
        "switchboard_runs_finished_total",
        "Runs that reached a final state, by workflow and state"
    );
    describe_counter!(
        "switchboard_attempts_total",
        "Outbound HTTP attempts, by workflow, outcome and error class"
    );
    describe_histogram!(
        "switchboard_attempt_duration_seconds",
        metrics::Unit::Seconds,
        "Outbound HTTP attempt latency, by workflow"
    );
    describe_gauge!(
        "switchboard_jobs_waiting",
        "Runs due now that no worker has started yet (stored, or queued in memory for a free slot)"
    );
    describe_gauge!(
        "switchboard_jobs_oldest_waiting_age_seconds",
        metrics::Unit::Seconds,
        "How long the longest-waiting due run has been due"
    );
    describe_gauge!(
        "switchboard_jobs_pending",
        "Runs in backoff (due later) or held by a worker"
    );
    describe_gauge!(
        "switchboard_destination_breaker_state",
        "Circuit breaker of each destination: 0 closed, 1 open, 2 half open"
    );
    describe_counter!(
        "switchboard_destination_held_total",
        "Requests held by a destination (not sent, not an attempt), by destination and reason"
    );
    describe_histogram!(
        "switchboard_destination_throttle_wait_seconds",
        metrics::Unit::Seconds,
        "How long a held run waits before it may try again, by destination and reason"
    );
    describe_gauge!(
        "switchboard_runs_waiting",
        "Runs parked at a `wait` or `wait_for` step (holding no worker)"
    );
    describe_gauge!(
        "switchboard_runs_oldest_wait_seconds",
        metrics::Unit::Seconds,
        "How long the run waiting longest at a `wait` or `wait_for` step has waited"
    );
    describe_gauge!("switchboard_store_events", "Events in the log");
    describe_counter!(
        "switchboard_store_commits_total",
        "Write transactions this process committed to its SQLite store (SQLite only)"
    );
    describe_gauge!(
        "switchboard_store_size_bytes",
        metrics::Unit::Bytes,
        "Size of the database on disk"
    );
}

/// One webhook delivery answered.
pub fn webhook_received(event_type: &str, outcome: &'static str, elapsed: Duration) {
    let event_type = known_type(event_type);
    counter!("switchboard_webhooks_received_total", "type" => event_type, "outcome" => outcome)
        .increment(1);
    if outcome != "rejected" {
        histogram!("switchboard_ingest_duration_seconds", "type" => event_type)
            .record(elapsed.as_secs_f64());
    }
}

/// Operator's event types, or `other`: a sender cannot blow up the label set.
fn known_type(event_type: &str) -> &'static str {
    use crate::webhook::envelope::EventKind;
    match event_type {
        EventKind::SETUP => EventKind::SETUP,
        EventKind::ENDED => EventKind::ENDED,
        EventKind::CUSTOM_FIELDS_UPDATED => EventKind::CUSTOM_FIELDS_UPDATED,
        "" => "unknown",
        _ => "other",
    }
}

/// A delivery refused before its body was parsed (401, 400, 413).
pub fn webhook_rejected(reason: &'static str, verification: bool) {
    counter!("switchboard_webhooks_received_total", "type" => "unknown", "outcome" => "rejected")
        .increment(1);
    if verification {
        counter!("switchboard_webhook_verification_failures_total", "reason" => reason)
            .increment(1);
    }
}

pub fn duplicate(of: &'static str) {
    counter!("switchboard_webhook_duplicates_total", "of" => of).increment(1);
}

/// A `conversation.setup` delivery answered (the time includes storing it).
pub fn setup_answered(elapsed: Duration) {
    histogram!("switchboard_setup_answer_duration_seconds").record(elapsed.as_secs_f64());
}

pub fn setup_fallback(workflow: Option<&str>) {
    counter!("switchboard_setup_fallbacks_total", "workflow" => workflow.unwrap_or("").to_owned())
        .increment(1);
}

pub fn run_started(workflow: &str) {
    counter!("switchboard_runs_started_total", "workflow" => workflow.to_owned()).increment(1);
}

pub fn run_finished(workflow: &str, state: &'static str) {
    counter!("switchboard_runs_finished_total", "workflow" => workflow.to_owned(), "state" => state)
        .increment(1);
}

pub fn attempt(workflow: &str, outcome: &str, error_class: Option<&str>, elapsed: Duration) {
    counter!(
        "switchboard_attempts_total",
        "workflow" => workflow.to_owned(),
        "outcome" => outcome.to_owned(),
        "error_class" => error_class.unwrap_or("none").to_owned()
    )
    .increment(1);
    histogram!("switchboard_attempt_duration_seconds", "workflow" => workflow.to_owned())
        .record(elapsed.as_secs_f64());
}

/// A destination's breaker changed state (0 closed, 1 open, 2 half open).
pub fn destination_state(destination: &str, state: f64) {
    gauge!("switchboard_destination_breaker_state", "destination" => destination.to_owned())
        .set(state);
}

/// A request was held by its destination (`reason`: rate_limited, concurrency, circuit_open, paused_until).
pub fn destination_held(destination: &str, reason: &'static str) {
    counter!("switchboard_destination_held_total", "destination" => destination.to_owned(), "reason" => reason)
        .increment(1);
}

/// How long a held run waits before it tries again.
pub fn destination_wait(destination: &str, reason: &'static str, wait: Duration) {
    histogram!("switchboard_destination_throttle_wait_seconds", "destination" => destination.to_owned(), "reason" => reason)
        .record(wait.as_secs_f64());
}

/// `GET /metrics`: Prometheus text format. Store gauges are read at most
/// once per [`GAUGES_EVERY`] (concurrent scrapes share one read); if the store
/// cannot be read, the rest is still served (and the failure logged).
#[handler]
pub async fn endpoint(
    req: &Request,
    Data(store): Data<&Arc<dyn EventStore>>,
    Data(gate): Data<&Arc<MetricsGate>>,
) -> Response {
    if !gate.allows(req) {
        return Response::builder()
            .status(StatusCode::UNAUTHORIZED)
            .header(poem::http::header::WWW_AUTHENTICATE, "Bearer")
            .content_type("application/json")
            .body(
                serde_json::json!({"error": {
                    "code": "unauthorized",
                    "message": "/metrics needs `Authorization: Bearer <token>` with the value of SWITCHBOARD_METRICS_TOKEN",
                }})
                .to_string(),
            );
    }
    let handle = install();
    if store.backend() == crate::store::Backend::Sqlite {
        counter!("switchboard_store_commits_total").absolute(crate::store::sqlite::commits());
    }
    {
        let mut last_read = gate.last_read.lock().await;
        if last_read.is_none_or(|t| t.elapsed() >= GAUGES_EVERY) {
            read_store_gauges(store.as_ref()).await;
            *last_read = Some(std::time::Instant::now());
        }
    }
    Response::builder()
        .status(StatusCode::OK)
        .content_type("text/plain; version=0.0.4; charset=utf-8")
        .body(handle.render())
}

async fn read_store_gauges(store: &dyn EventStore) {
    let now = chrono::Utc::now();
    match store.stats(now).await {
        Ok(stats) => {
            // Runs queued in memory for a free slot are `running` in the
            // database but wait for a worker like the due ones.
            // So are runs waiting for a request slot (engine/slots.rs).
            let (for_slot, slot_since) = crate::engine::slots::waiting();
            let queued = crate::engine::backend::queued_in_memory() + for_slot as i64;
            gauge!("switchboard_jobs_waiting").set((stats.runs_waiting + queued) as f64);
            gauge!("switchboard_jobs_pending").set((stats.runs_pending - queued).max(0) as f64);
            let age = stats
                .oldest_waiting_since
                .map(|t| (now - t).num_milliseconds().max(0) as f64 / 1000.0)
                .unwrap_or(0.0)
                .max(slot_since.map_or(0.0, |t| t.elapsed().as_secs_f64()));
            gauge!("switchboard_jobs_oldest_waiting_age_seconds").set(age);
            gauge!("switchboard_store_events").set(stats.events as f64);
            gauge!("switchboard_store_size_bytes").set(stats.size_bytes as f64);
        }
        Err(e) => tracing::warn!(error = %e, "/metrics: cannot read the store's sizes"),
    }
    // Durable waits (store/waits.rs).
    match store.wait_stats().await {
        Ok((waiting, oldest)) => {
            gauge!("switchboard_runs_waiting").set(waiting as f64);
            let age = oldest
                .map(|t| (now - t).num_milliseconds().max(0) as f64 / 1000.0)
                .unwrap_or(0.0);
            gauge!("switchboard_runs_oldest_wait_seconds").set(age);
        }
        Err(e) => tracing::warn!(error = %e, "/metrics: cannot read the waiting runs"),
    }
}
