//! The records the event store takes and gives back.

use chrono::{DateTime, Utc};
use serde::Serialize;

use crate::domain::IdempotencyKey;
use crate::operator::envelope::Envelope;

/// How long a repeated `X-Idempotency-Key` counts as a retry of the same
/// delivery. Operator retries within 5 minutes and never reuses a key within
/// 24 hours; the envelope `id` deduplicates forever.
pub const IDEMPOTENCY_WINDOW: chrono::TimeDelta = chrono::TimeDelta::hours(24);

/// The headers a delivery was verified with, kept as evidence.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Verification {
    /// The URL the signature was checked against.
    pub signed_url: String,
    /// `X-Timestamp` as received.
    pub timestamp: String,
    /// `X-Signature` as received (a MAC, not a secret).
    pub signature: String,
}

/// A verified delivery, ready to append.
#[derive(Clone, Debug)]
pub struct NewEvent {
    pub envelope: Envelope,
    pub idempotency_key: IdempotencyKey,
    pub raw_body: Vec<u8>,
    pub verification: Verification,
    pub received_at: DateTime<Utc>,
    /// The `webhook` span of the delivery (`Span::none()` outside a request):
    /// the store hangs its `dedupe` and `dispatch` spans under it.
    pub span: tracing::Span,
}

#[cfg(test)]
impl NewEvent {
    /// A delivery of `body` (a test's own), received now under idempotency key `key`.
    pub(crate) fn of_body(body: String, key: &str) -> Self {
        NewEvent {
            envelope: Envelope::parse(body.as_bytes()).unwrap(),
            idempotency_key: IdempotencyKey::parse(key).unwrap(),
            raw_body: body.into_bytes(),
            verification: Verification {
                signed_url: "u".into(),
                timestamp: "1".into(),
                signature: "s".into(),
            },
            received_at: Utc::now(),
            span: tracing::Span::none(),
        }
    }
}

/// A short reference to a stored event.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EventRef {
    pub seq: i64,
    pub event_id: String,
    pub event_type: String,
}

/// What identified a delivery as already stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DuplicateOf {
    IdempotencyKey,
    EventId,
}

/// The result of appending one delivery.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AppendOutcome {
    /// Stored now, at this place in the global log and in its conversation's stream.
    Appended {
        event: EventRef,
        stream_version: Option<i64>,
    },
    /// Already stored: the original is returned, nothing was written.
    Duplicate { original: EventRef, of: DuplicateOf },
}

impl AppendOutcome {
    /// The event the delivery is (or was first) stored as.
    pub fn event(&self) -> &EventRef {
        match self {
            AppendOutcome::Appended { event, .. } => event,
            AppendOutcome::Duplicate { original, .. } => original,
        }
    }

    pub fn is_duplicate(&self) -> bool {
        matches!(self, AppendOutcome::Duplicate { .. })
    }
}

/// One stored event, without its body.
#[derive(Clone, Debug, PartialEq)]
pub struct StoredEvent {
    pub seq: i64,
    pub event_id: String,
    pub idempotency_key: String,
    pub event_type: String,
    pub conversation_id: Option<String>,
    pub stream_version: Option<i64>,
    pub agent_id: Option<String>,
    pub livemode: Option<bool>,
    pub created_at: Option<String>,
    pub received_at: DateTime<Utc>,
    pub verification: Verification,
}

/// A stored event with its raw body, byte for byte as received.
#[derive(Clone, Debug, PartialEq)]
pub struct StoredEventWithBody {
    pub event: StoredEvent,
    pub raw_body: Vec<u8>,
}

/// Reading direction for lists over the global sequence.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Order {
    #[default]
    NewestFirst,
    OldestFirst,
}

/// Filters and keyset pagination for listing events.
#[derive(Clone, Debug, Default)]
pub struct EventQuery {
    pub event_type: Option<String>,
    pub conversation_id: Option<String>,
    pub agent_id: Option<String>,
    pub received_after: Option<DateTime<Utc>>,
    pub received_before: Option<DateTime<Utc>>,
    /// Only events strictly after (oldest-first) or before (newest-first) this sequence.
    pub cursor: Option<i64>,
    pub order: Order,
    pub limit: u32,
}

/// Why a workflow did or did not match an event, recorded with the event.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MatchRecord {
    pub event_seq: i64,
    pub workflow: String,
    pub matched: bool,
    pub reason: Option<String>,
}

/// A run to create with the event that caused it.
#[derive(Clone, Debug, PartialEq)]
pub struct NewRun {
    pub run_id: String,
    pub workflow: String,
    pub event_seq: i64,
    pub event_id: String,
    pub conversation_id: Option<String>,
    /// `{event, conversation}` as of the event: what the run's templates read.
    pub context: serde_json::Value,
    pub created_at: DateTime<Utc>,
    /// W3C `traceparent` of the `dispatch` span that started the run; the worker continues it.
    pub trace_context: Option<String>,
    /// The workflow version (content hash) the run executes.
    pub version: Option<String>,
    /// The workflow keeps one conversation's runs in order (`order: conversation`).
    pub ordered: bool,
    /// Held by order: an earlier run of this workflow for this conversation
    /// has not ended. Decided only by [`super::order::hold_new_runs`], inside
    /// the append transaction; a held run is created `waiting` (`wait_reason`
    /// `order`) and must not be handed to a worker ([`NewRun::starts_now`]).
    pub held: bool,
}

impl NewRun {
    /// Whether the run is due as soon as its transaction commits (not held by order).
    pub fn starts_now(&self) -> bool {
        !self.held
    }
}

impl NewRun {
    /// The run as stored with `lease` (what a claim of it would read back;
    /// `lease_until` is this host's estimate, the database holds the real one).
    pub fn leased(&self, lease: &LocalLease) -> super::runs::Run {
        super::runs::Run {
            run_id: self.run_id.clone(),
            workflow: self.workflow.clone(),
            event_seq: self.event_seq,
            event_id: self.event_id.clone(),
            conversation_id: self.conversation_id.clone(),
            replay_of: None,
            status: super::runs::RunStatus::Running,
            step_index: 0,
            step_id: None,
            attempt: 0,
            attempts_total: 0,
            next_attempt_at: self.created_at,
            lease_owner: Some(lease.owner.clone()),
            lease_until: Some(super::runs_sql::local_lease_until(lease.lease)),
            lease_token: 1,
            context: sqlx::types::Json(super::sanitize::json(&self.context).into_owned()),
            step_results: sqlx::types::Json(serde_json::json!({})),
            trace_context: self.trace_context.clone(),
            last_error: None,
            created_at: self.created_at,
            updated_at: self.created_at,
            finished_at: None,
            version: self.version.clone(),
            wait_reason: None,
        }
    }
}

/// One workflow's verdict on one new event.
#[derive(Clone, Debug, PartialEq)]
pub struct DispatchDecision {
    pub workflow: String,
    pub matched: bool,
    pub reason: Option<String>,
    /// For matched workflows: the run's template context.
    pub context: Option<serde_json::Value>,
    /// The matched workflow's version (content hash).
    pub version: Option<String>,
    /// The workflow has `order: conversation`.
    pub ordered: bool,
}

/// A setup answer computed inside the append transaction (no lookups needed),
/// stored in the same commit as its event.
#[derive(Clone, Debug, PartialEq)]
pub struct PreparedAnswer {
    pub workflow: Option<String>,
    pub body: String,
    pub fallback_reason: Option<String>,
}

/// Runs an append may lease to this process's own workers as it creates them.
#[derive(Clone, Debug)]
pub struct LocalLease {
    /// The lease owner (the engine's, unique per process).
    pub owner: String,
    pub lease: std::time::Duration,
    /// At most this many runs (the workers' free slots, plus a bounded queue).
    pub max: usize,
}

/// This process's workers, as the appender sees them: runs it created and
/// leased to them in the event's transaction are handed over in memory.
pub trait RunHandoff: Send + Sync {
    /// What the next append may lease to the workers (`None`: nothing now).
    fn lease(&self) -> Option<LocalLease>;
    /// Runs committed with a lease to this process (after the commit).
    fn hand_over(&self, runs: Vec<super::runs::Run>);
    /// The workers' save queue, for the appender to write in its own
    /// transactions where the store shares commits (SQLite); taken once.
    fn take_saves(&self) -> Option<super::saves::SaveQueue> {
        None
    }
    /// How long saves that end their runs may wait for a delivery to share
    /// its commit ([`super::saves::SAVE_LINGER`]).
    fn save_linger(&self) -> std::time::Duration {
        super::saves::SAVE_LINGER
    }
}

/// Decides, inside the append transaction, which workflows an event starts.
/// Implemented by the workflow registry; the store only records the verdicts.
pub trait Dispatcher: Send + Sync {
    fn dispatch(
        &self,
        event: &NewEvent,
        before: Option<&super::projection::ConversationState>,
        after: Option<&super::projection::ConversationState>,
    ) -> Vec<DispatchDecision>;

    /// For a `conversation.setup` event: its answer, when it needs no lookups.
    fn setup_answer(
        &self,
        _event: &NewEvent,
        _after: Option<&super::projection::ConversationState>,
    ) -> Option<PreparedAnswer> {
        None
    }

    /// The most workflows one event can start (the appender sizes batches by it).
    fn fan_out(&self) -> usize {
        0
    }
}

/// No workflows: every event is only stored.
pub struct NoWorkflows;

impl Dispatcher for NoWorkflows {
    fn dispatch(
        &self,
        _: &NewEvent,
        _: Option<&super::projection::ConversationState>,
        _: Option<&super::projection::ConversationState>,
    ) -> Vec<DispatchDecision> {
        Vec::new()
    }
}

/// Filters and keyset pagination for listing conversations (most recent first).
#[derive(Clone, Debug, Default)]
pub struct ConversationQuery {
    pub status: Option<String>,
    pub agent_id: Option<String>,
    /// Only conversations whose last event is older than this sequence.
    pub before_seq: Option<i64>,
    pub limit: u32,
}
