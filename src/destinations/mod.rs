//! Destinations: protection for the systems workflows call (issue 14).
//!
//! `destinations.yaml` in the workflows directory names URL prefixes with a
//! rate limit (token bucket), a concurrency cap and a circuit breaker;
//! `default:` covers every other origin (each origin on its own). The
//! [`gate::Gate`] is consulted right before each HTTP attempt of a run and
//! before each setup lookup: it answers go (with a permit that is given the
//! outcome) or hold until a time, for a reason. A held run is not failed:
//! it waits (status `waiting`, no attempt recorded) and resumes by itself.

pub mod breaker;
pub mod format;
pub mod gate;
pub mod shared;

use std::time::Duration;

use crate::workflow::diagnostic::Diagnostic;

/// Requests per period, with a burst (token bucket).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Rate {
    pub count: u32,
    pub period: Duration,
    /// How many may go at once (default: `count`).
    pub burst: u32,
}

impl Rate {
    /// The time one token takes to come back.
    pub fn interval(&self) -> Duration {
        self.period / self.count
    }
}

#[derive(Clone, Copy, Debug, PartialEq)]
pub struct BreakerPolicy {
    /// Consecutive failed attempts (connect, timeout, 5xx, 429) that open it.
    pub failures: u32,
    pub cool_down: Duration,
    pub max_cool_down: Duration,
}

/// What protects one destination.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Limits {
    pub rate: Option<Rate>,
    pub concurrency: Option<u32>,
    pub breaker: Option<BreakerPolicy>,
}

impl Limits {
    pub fn is_empty(&self) -> bool {
        self.rate.is_none() && self.concurrency.is_none() && self.breaker.is_none()
    }
}

/// One entry of `destinations:`.
#[derive(Clone, Debug, PartialEq)]
pub struct DestinationSpec {
    pub name: String,
    /// Every request whose URL starts with this belongs to it.
    pub url: String,
    pub limits: Limits,
}

/// A checked `destinations.yaml` (empty when there is none: nothing is limited).
#[derive(Clone, Debug, Default)]
pub struct Destinations {
    /// Longest prefix first.
    pub entries: Vec<DestinationSpec>,
    /// For every origin no entry covers, each origin on its own.
    pub default: Limits,
    pub warnings: Vec<Diagnostic>,
}

impl Destinations {
    pub fn new(
        mut entries: Vec<DestinationSpec>,
        default: Limits,
        warnings: Vec<Diagnostic>,
    ) -> Self {
        entries.sort_by_key(|e| std::cmp::Reverse(e.url.len()));
        Self {
            entries,
            default,
            warnings,
        }
    }

    /// Nothing is limited: the gate lets everything through without looking.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty() && self.default.is_empty()
    }

    /// The destination of `url`: the entry with the longest matching prefix,
    /// else the default for the URL's origin (named by the origin); `None`
    /// when nothing applies.
    pub fn find(&self, url: &str) -> Option<DestinationSpec> {
        if let Some(e) = self.entries.iter().find(|e| url.starts_with(&e.url)) {
            return Some(e.clone());
        }
        if self.default.is_empty() {
            return None;
        }
        let origin = reqwest::Url::parse(url)
            .ok()?
            .origin()
            .ascii_serialization();
        Some(DestinationSpec {
            name: origin.clone(),
            url: origin,
            limits: self.default,
        })
    }

    /// Loads `destinations.yaml` from the workflows directory `dir`, if it is there.
    pub fn load(dir: &std::path::Path) -> Result<Self, Vec<Diagnostic>> {
        let file = dir.join(format::FILE_NAME);
        match std::fs::read_to_string(&file) {
            Ok(text) => format::compile(&file, &text),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Self::default()),
            Err(e) => Err(vec![Diagnostic::new(
                crate::workflow::diagnostic::Severity::Error,
                &file,
                "",
                0,
                0,
                format!("cannot read: {e}"),
            )]),
        }
    }
}

/// Whether `file` is the destinations file rather than a workflow.
pub fn is_destinations_file(file: &std::path::Path) -> bool {
    file.file_name().and_then(|n| n.to_str()) == Some(format::FILE_NAME)
}

/// Why a run or a lookup is held.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum HoldReason {
    RateLimited,
    Concurrency,
    CircuitOpen,
    PausedUntil,
}

impl HoldReason {
    pub const ALL: [HoldReason; 4] = [
        HoldReason::RateLimited,
        HoldReason::Concurrency,
        HoldReason::CircuitOpen,
        HoldReason::PausedUntil,
    ];

    /// As stored in `runs.wait_reason`.
    pub fn as_str(self) -> &'static str {
        match self {
            HoldReason::RateLimited => "rate_limited",
            HoldReason::Concurrency => "concurrency",
            HoldReason::CircuitOpen => "circuit_open",
            HoldReason::PausedUntil => "paused_until",
        }
    }
}

/// Engine hook: the URL a step's request goes to (`None` when its template
/// fails; the attempt then fails on its own, without the gate).
pub fn step_url(step: &crate::workflow::Step, ctx: &serde_json::Value) -> Option<String> {
    crate::engine::http::render_url(&step.http.url, ctx)
        .ok()
        .map(|u| u.trim().to_owned())
}

/// Engine hook: parks a claimed run that its destination holds: status
/// `waiting` with the reason, due again at the hold's end, lease released,
/// no attempt recorded. Counted, logged and traced. False if the lease was lost.
pub async fn hold_run(
    store: &dyn crate::store::EventStore,
    run: &crate::store::runs::Run,
    owner: &str,
    trace: &crate::engine::trace::RunTrace,
    step: (i64, &str),
    hold: &gate::Hold,
) -> Result<bool, crate::store::StoreError> {
    let now = chrono::Utc::now();
    let until = hold.until.max(now + chrono::TimeDelta::milliseconds(1));
    let held = store
        .hold_run(
            &run.run_id,
            owner,
            run.lease_token,
            until,
            hold.reason.as_str(),
            now,
        )
        .await?;
    if held {
        let wait = (until - now).to_std().unwrap_or_default();
        crate::prometheus::destination_wait(&hold.destination, hold.reason.as_str(), wait);
        trace.held(
            run,
            step.0,
            step.1,
            &hold.destination,
            hold.reason.as_str(),
            until,
        );
        tracing::debug!(run_id = %run.run_id, destination = %hold.destination, reason = hold.reason.as_str(), until = %until, "run held by its destination");
    }
    Ok(held)
}

/// Startup hook: gives the gate the store and the workers' wake-up (to wake
/// the runs parked behind a breaker when it closes), and wakes runs parked
/// before this process started (on SQLite the breakers start closed again;
/// on PostgreSQL those still open park them again).
pub async fn attach(
    gate: &gate::Gate,
    store: std::sync::Arc<dyn crate::store::EventStore>,
    notify: std::sync::Arc<tokio::sync::Notify>,
) {
    match store
        .wake_held(&[HoldReason::CircuitOpen.as_str()], chrono::Utc::now())
        .await
    {
        Ok(0) => {}
        Ok(n) => tracing::info!(runs = n, "runs parked behind a circuit breaker woken"),
        Err(e) => {
            tracing::warn!(error = %e, "cannot wake the runs parked behind a circuit breaker; they come back by themselves")
        }
    }
    gate.attach(store, notify);
}

/// The gate of a process: shared through the database on PostgreSQL (a small
/// pool of its own), in this process on SQLite.
pub async fn gate_for(
    backend: crate::store::Backend,
    database_url: &str,
) -> anyhow::Result<gate::Gate> {
    if backend != crate::store::Backend::Postgres {
        return Ok(gate::Gate::default());
    }
    use std::str::FromStr;
    let options = sqlx::postgres::PgConnectOptions::from_str(database_url)?
        .application_name("switchboard-destinations");
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(8)
        .acquire_timeout(Duration::from_secs(2))
        .connect_lazy_with(options);
    Ok(gate::Gate::new(Some(shared::Shared::new(pool))))
}

/// Engine hook: asks the gate for a step's request; `None` when nothing
/// limits it (no destinations configured, or its URL does not render).
pub async fn admit_step(
    gate: &gate::Gate,
    step: &crate::workflow::Step,
    ctx: &serde_json::Value,
    run: &crate::store::runs::Run,
) -> Option<gate::Admit> {
    if gate.config().is_empty() {
        return None;
    }
    let url = step_url(step, ctx)?;
    let who = gate::RunRef {
        id: &run.run_id,
        created_at: run.created_at,
        held: run.wait_reason.as_deref(),
    };
    Some(gate.admit(&url, Some(who)).await)
}

/// Setup hook: asks the gate for a lookup to `url`. An open breaker or a
/// pause is an error at once (the setup answers with its fallback); a rate or
/// concurrency hold is waited out, as long as the deadline allows.
pub async fn admit_lookup(
    gate: &gate::Gate,
    url: &str,
    deadline_at: std::time::Instant,
) -> Result<Option<gate::Permit>, String> {
    if gate.config().is_empty() {
        return Ok(None);
    }
    loop {
        match gate.admit(url, None).await {
            gate::Admit::Go(p) => return Ok(Some(p)),
            gate::Admit::Hold(h) => {
                let wait = (h.until - chrono::Utc::now()).to_std().unwrap_or_default();
                let shown = h.until.to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
                match h.reason {
                    HoldReason::CircuitOpen => {
                        return Err(format!(
                            "destination `{}` is not called: its circuit breaker is open until {shown}",
                            h.destination
                        ));
                    }
                    HoldReason::PausedUntil => {
                        return Err(format!(
                            "destination `{}` is not called: it asked to pause (Retry-After) until {shown}",
                            h.destination
                        ));
                    }
                    _ if std::time::Instant::now() + wait >= deadline_at => {
                        return Err(format!(
                            "destination `{}` is held ({}) until {shown}, after the deadline",
                            h.destination,
                            h.reason.as_str()
                        ));
                    }
                    _ => tokio::time::sleep(wait.max(Duration::from_millis(1))).await,
                }
            }
        }
    }
}
