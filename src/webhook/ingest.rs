//! `POST /webhooks/operator`: read the raw body, verify, parse, append, acknowledge.
//!
//! The order is Operator's: headers and signature first (401), then the
//! envelope (400), then the store. A delivery is acknowledged (200) only
//! once it is committed; a repeated delivery gets the first answer again.
//! When the store cannot commit, the answer is 503 so that Operator retries.

use std::sync::Arc;

use std::time::Instant;

use chrono::{SubsecRound, Utc};
use poem::http::{HeaderMap, StatusCode, header};
use poem::web::Data;
use poem::{Body, Request, Response, handler};
use serde_json::json;
use tracing::field::Empty;
use tracing::{Instrument, Span};

use super::envelope::{Envelope, EventKind};
use super::signature::{
    self, DeliveryHeaders, IDEMPOTENCY_KEY_HEADER, SIGNATURE_HEADER, SigningKeys, TIMESTAMP_HEADER,
    Tolerance,
};
use crate::domain::IdempotencyKey;
use crate::engine::setup::{AppendFn, SetupResponder};
use crate::prometheus;
use crate::store::appender::Appender;
use crate::store::{AppendOutcome, EventRef, NewEvent, Verification};

/// Path Operator posts to.
pub const WEBHOOK_PATH: &str = "/webhooks/operator";

/// What the receiver needs, shared by every request.
pub struct IngestState {
    pub setup: Arc<SetupResponder>,
    pub keys: SigningKeys,
    /// The URL registered in Operator; `None` rebuilds it from each request.
    pub public_url: Option<String>,
    /// Peers whose `X-Forwarded-Proto/Host` are believed when rebuilding it.
    pub trusted_proxies: Vec<ipnet::IpNet>,
    pub tolerance: Tolerance,
    pub max_body_bytes: usize,
    pub appender: Appender,
}

/// A short JSON error: `{"error": {"code", "message"}}`, the shape of every error we send.
pub fn error_response(status: StatusCode, code: &str, message: impl Into<String>) -> Response {
    Response::builder()
        .status(status)
        .content_type("application/json")
        .body(json!({"error": {"code": code, "message": message.into()}}).to_string())
}

fn header_str<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers.get(name).and_then(|v| v.to_str().ok())
}

/// The URL Operator signed: the configured one, or scheme://host/path of this
/// request, without the query. `X-Forwarded-Proto` / `X-Forwarded-Host` are
/// honoured only when the peer is one of the `trusted` proxies: from anyone
/// else they would let a client choose the URL its signature is checked on.
pub fn signed_url(req: &Request, configured: Option<&str>, trusted: &[ipnet::IpNet]) -> String {
    if let Some(url) = configured {
        return url.to_owned();
    }
    let headers = req.headers();
    let from_proxy = req.remote_addr().as_socket_addr().is_some_and(|peer| {
        let ip = peer.ip().to_canonical();
        trusted.iter().any(|net| net.contains(&ip))
    });
    let first = |name: &str| {
        header_str(headers, name)
            .filter(|_| from_proxy)
            .and_then(|v| v.split(',').next())
            .map(str::trim)
    };
    let scheme = first("x-forwarded-proto").unwrap_or_else(|| req.scheme().as_str());
    let host = first("x-forwarded-host")
        .or_else(|| header_str(headers, header::HOST.as_str()))
        .or_else(|| req.uri().authority().map(|a| a.as_str()))
        .unwrap_or("localhost");
    format!("{scheme}://{host}{}", req.uri().path())
}

/// The acknowledgement body of events other than setup: derived from the
/// stored event only, so every retry of a delivery gets the same bytes.
fn acknowledgement(event: &EventRef) -> String {
    json!({"event_id": event.event_id, "sequence": event.seq}).to_string()
}

/// `POST /webhooks/operator`, inside its `webhook` span (a trace root, or
/// the child of an inbound `traceparent` once the signature verified: an
/// unauthenticated sender cannot choose the trace or force sampling).
#[handler]
pub async fn receive(req: &Request, body: Body, Data(state): Data<&Arc<IngestState>>) -> Response {
    let started = Instant::now();
    // Read and verify first (no I/O besides the body), so that the span is
    // created knowing whether the inbound trace context may be trusted.
    let body = body.into_bytes_limit(state.max_body_bytes).await;
    let url = signed_url(req, state.public_url.as_deref(), &state.trusted_proxies);
    let headers = req.headers();
    let delivery = DeliveryHeaders {
        timestamp: header_str(headers, TIMESTAMP_HEADER),
        idempotency_key: header_str(headers, IDEMPOTENCY_KEY_HEADER),
        signature: header_str(headers, SIGNATURE_HEADER),
    };
    let verified = body.as_ref().ok().map(|body| {
        signature::verify_delivery(
            &state.keys,
            &url,
            delivery,
            body,
            Utc::now().timestamp(),
            state.tolerance,
        )
    });
    let span = tracing::info_span!(
        parent: None,
        "webhook",
        otel.kind = "server",
        otel.status_code = Empty,
        http.request.method = "POST",
        http.route = WEBHOOK_PATH,
        http.response.status_code = Empty,
        error.type = Empty,
        operator.event.id = Empty,
        operator.event.type = Empty,
        operator.conversation.id = Empty,
        operator.agent.id = Empty,
        switchboard.event.seq = Empty,
        switchboard.duplicate = Empty,
    );
    if let Some(Ok(_)) = &verified {
        crate::telemetry::set_parent(&span, header_str(req.headers(), "traceparent"));
    }
    let received = Received {
        body,
        url,
        delivery,
        verified,
    };
    let (resp, event_type, outcome) = handle(received, state, &span, started)
        .instrument(span.clone())
        .await;
    let status = resp.status();
    span.record("http.response.status_code", status.as_u16());
    if status != StatusCode::OK {
        span.record("otel.status_code", "ERROR");
        span.record("error.type", status.as_str());
    }
    if let Some(outcome) = outcome {
        prometheus::webhook_received(&event_type, outcome, started.elapsed());
    }
    resp
}

/// A request as read and checked before its span exists.
struct Received<'a, B> {
    body: Result<B, poem::error::ReadBodyError>,
    url: String,
    delivery: DeliveryHeaders<'a>,
    /// `None` when the body could not be read.
    verified: Option<Result<i64, signature::VerifyError>>,
}

/// The handler's body: the response, the event type, and the outcome to count
/// (`None` when a rejection was already counted with its reason).
async fn handle(
    received: Received<'_, impl std::ops::Deref<Target = [u8]>>,
    state: &IngestState,
    span: &Span,
    started: Instant,
) -> (Response, String, Option<&'static str>) {
    let rejected = |resp, reason, verification| {
        prometheus::webhook_rejected(reason, verification);
        (resp, String::new(), None)
    };
    let Received {
        body,
        url,
        delivery,
        verified,
    } = received;
    let body = match body {
        Ok(b) => b,
        Err(poem::error::ReadBodyError::PayloadTooLarge) => {
            return rejected(
                error_response(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    "payload_too_large",
                    format!("body is larger than {} bytes", state.max_body_bytes),
                ),
                "payload_too_large",
                false,
            );
        }
        Err(e) => {
            return rejected(
                error_response(StatusCode::BAD_REQUEST, "unreadable_body", e.to_string()),
                "unreadable_body",
                false,
            );
        }
    };
    // `verify` covers the signature and the envelope; it gets the event's ids once parsed.
    let verify = tracing::info_span!(
        "verify",
        signing_keys = state.keys.len(),
        operator.event.id = Empty,
        operator.conversation.id = Empty,
        operator.agent.id = Empty,
    );
    // Verified before the span existed (see `receive`); the outcome is recorded under it.
    let verified = verified.expect("verified whenever the body was read");
    if let Err(e) = verified {
        if let Some(suppressed) = REFUSED_LOG.should_log() {
            verify.in_scope(|| {
                tracing::warn!(reason = e.code(), signed_url = %url, suppressed, "webhook refused: {e}");
            });
        }
        return rejected(
            error_response(StatusCode::UNAUTHORIZED, e.code(), e.to_string()),
            e.code(),
            true,
        );
    }
    let envelope = match Envelope::parse(&body) {
        Ok(env) => env,
        Err(e) => {
            tracing::warn!("webhook refused: {e}");
            let code = match e {
                super::envelope::EnvelopeError::InvalidJson(_) => "invalid_json",
                super::envelope::EnvelopeError::NotAnEnvelope(_) => "not_an_envelope",
            };
            return rejected(
                error_response(StatusCode::BAD_REQUEST, code, e.to_string()),
                code,
                false,
            );
        }
    };
    span.record("operator.event.type", envelope.event_type.as_str());
    for s in [span, &verify] {
        s.record("operator.event.id", envelope.id.as_str());
        if let Some(c) = &envelope.conversation_id {
            s.record("operator.conversation.id", c.as_str());
        }
        if let Some(a) = &envelope.agent_id {
            s.record("operator.agent.id", a.as_str());
        }
    }
    drop(verify);
    let event_type = envelope.event_type.clone();
    let idempotency_key = match IdempotencyKey::parse(delivery.idempotency_key.unwrap_or_default())
    {
        Ok(k) => k,
        Err(e) => {
            return rejected(
                error_response(
                    StatusCode::BAD_REQUEST,
                    "invalid_idempotency_key",
                    format!("X-Idempotency-Key {e}"),
                ),
                "invalid_idempotency_key",
                false,
            );
        }
    };
    let event = NewEvent {
        envelope,
        idempotency_key,
        raw_body: body.to_vec(),
        verification: Verification {
            signed_url: url,
            timestamp: delivery.timestamp.unwrap_or_default().to_owned(),
            signature: delivery.signature.unwrap_or_default().to_owned(),
        },
        // Microseconds: what both databases keep, so a re-read equals what was written.
        received_at: Utc::now().trunc_subsecs(6),
        span: span.clone(),
    };
    if event.envelope.event_type == EventKind::SETUP {
        let (resp, outcome) = receive_setup(state, event, span, started).await;
        if outcome != "unavailable" {
            prometheus::setup_answered(started.elapsed());
        }
        return (resp, event_type, Some(outcome));
    }
    match append(&state.appender, event, span).await {
        Ok(outcome) => {
            let duplicate = outcome.is_duplicate();
            let stored = outcome.event();
            if let AppendOutcome::Duplicate { of, .. } = &outcome {
                let duplicate_by = match of {
                    crate::store::DuplicateOf::IdempotencyKey => "idempotency_key",
                    crate::store::DuplicateOf::EventId => "event_id",
                };
                tracing::info!(event_id = %stored.event_id, seq = stored.seq, duplicate_by, "duplicate delivery acknowledged");
            } else {
                tracing::debug!(event_id = %stored.event_id, seq = stored.seq, event_type = %stored.event_type, "event stored");
            }
            (
                acknowledge(acknowledgement(stored), duplicate),
                event_type,
                Some(if duplicate { "duplicate" } else { "stored" }),
            )
        }
        Err(e) => (unavailable(&e), event_type, Some("unavailable")),
    }
}

/// Appends inside an `append` span (waiting for the group commit included)
/// and records the outcome on the `webhook` span.
async fn append(
    appender: &Appender,
    event: NewEvent,
    span: &Span,
) -> Result<AppendOutcome, crate::store::StoreError> {
    let append_span = tracing::info_span!(
        "append",
        operator.event.id = %event.envelope.id,
        operator.conversation.id = event.envelope.conversation_id.as_ref().map(|c| c.as_str()),
        operator.agent.id = event.envelope.agent_id.as_ref().map(|a| a.as_str()),
    );
    let result = appender.append(event).instrument(append_span).await;
    if let Ok(outcome) = &result {
        span.record("switchboard.event.seq", outcome.event().seq);
        span.record("switchboard.duplicate", outcome.is_duplicate());
        if let AppendOutcome::Duplicate { of, .. } = outcome {
            prometheus::duplicate(match of {
                crate::store::model::DuplicateOf::IdempotencyKey => "idempotency_key",
                crate::store::model::DuplicateOf::EventId => "event_id",
            });
        }
    }
    result
}

/// At most one log line per [`LOG_EVERY_SECS`] for a kind of failure that
/// anyone can cause at any rate (refused signatures, a failing store), with
/// the count of lines not written since the last one.
struct LogThrottle {
    last: std::sync::atomic::AtomicI64,
    suppressed: std::sync::atomic::AtomicU64,
}

impl LogThrottle {
    const fn new() -> Self {
        Self {
            last: std::sync::atomic::AtomicI64::new(0),
            suppressed: std::sync::atomic::AtomicU64::new(0),
        }
    }

    /// `Some(lines suppressed since the last one)` when this one may be logged.
    fn should_log(&self) -> Option<u64> {
        use std::sync::atomic::Ordering;
        let now = Utc::now().timestamp();
        let last = self.last.load(Ordering::Relaxed);
        if now - last >= LOG_EVERY_SECS
            && self
                .last
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            Some(self.suppressed.swap(0, Ordering::Relaxed))
        } else {
            self.suppressed.fetch_add(1, Ordering::Relaxed);
            None
        }
    }
}

static STORE_FAILURE_LOG: LogThrottle = LogThrottle::new();
static REFUSED_LOG: LogThrottle = LogThrottle::new();

/// Logs a store failure at most once per [`LOG_EVERY_SECS`], with how many were not logged.
fn log_store_failure(e: &crate::store::StoreError) {
    if let Some(suppressed) = STORE_FAILURE_LOG.should_log() {
        tracing::error!(error = %e, suppressed, "could not store webhooks; answering 503 so Operator retries");
    }
}

/// While the store fails (or signatures are refused), one log line per this many seconds.
const LOG_EVERY_SECS: i64 = 10;

fn unavailable(e: &crate::store::StoreError) -> Response {
    log_store_failure(e);
    let mut resp = error_response(
        StatusCode::SERVICE_UNAVAILABLE,
        "store_unavailable",
        "the event could not be stored; retry later",
    );
    resp.headers_mut().insert(
        header::RETRY_AFTER,
        poem::http::HeaderValue::from_static("1"),
    );
    resp
}

fn acknowledge(body: impl Into<Body>, duplicate: bool) -> Response {
    Response::builder()
        .status(StatusCode::OK)
        .content_type("application/json")
        .header(
            "x-switchboard-duplicate",
            if duplicate { "true" } else { "false" },
        )
        .body(body)
}

/// `conversation.setup`: store the event and answer it, by the deadline
/// counted from `started` whatever the store does (see
/// [`SetupResponder::respond_to`]), always with 200 and a context; 503 only
/// when the store refused the event before the deadline.
async fn receive_setup(
    state: &IngestState,
    event: NewEvent,
    span: &Span,
    started: Instant,
) -> (Response, &'static str) {
    let appender = state.appender.clone();
    let webhook_span = span.clone();
    let append_fn: AppendFn = Arc::new(move |event| {
        let appender = appender.clone();
        let span = webhook_span.clone();
        Box::pin(async move { append(&appender, event, &span).await })
    });
    match state.setup.respond_to(event, append_fn, started).await {
        Ok(reply) => (
            acknowledge(reply.body.to_string(), reply.duplicate),
            if reply.duplicate {
                "duplicate"
            } else {
                "stored"
            },
        ),
        Err(e) => (unavailable(&e), "unavailable"),
    }
}
