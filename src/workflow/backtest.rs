//! Backtests: how a workflow (new or edited) would have behaved on the
//! events already stored. Each event is judged as of its own place in the
//! log (the conversation as it was then), and the requests the workflow
//! would have sent are rendered with secrets masked. Nothing is sent.

use serde::Serialize;
use serde_json::{Value, json};

use super::matching::{EventFacts, base_context, decide};
use super::{Workflow, answer, template};
use crate::engine::http;
use crate::operator::envelope::Envelope;
use crate::store::projection::{ConversationState, fold_log};
use crate::store::{EventQuery, EventStore, Order, StoreError};

/// Opens the store for a read-only tool (`backtest`): nothing is created,
/// migrated or written. A database without Switchboard's tables (or with
/// migrations missing) is refused with a message that names it and says what
/// to do.
pub async fn open_read_only(url: &str) -> anyhow::Result<std::sync::Arc<dyn EventStore>> {
    use sqlx::Connection;
    let shown = crate::store::redact_url(url);
    let fix = format!(
        "run `switchboard migrate --database-url {shown}` against it first, or point --database-url \
         (SWITCHBOARD_DATABASE_URL) at the database `switchboard serve` uses"
    );
    let (applied, expected): (Option<Vec<i64>>, Vec<i64>) = if url.starts_with("sqlite:") {
        use std::str::FromStr;
        let options = sqlx::sqlite::SqliteConnectOptions::from_str(url)?.create_if_missing(false);
        let file = options.get_filename().to_owned();
        if !file.exists() {
            anyhow::bail!(
                "database {shown}: no such file {}; a backtest reads an existing Switchboard database ({fix})",
                file.display()
            );
        }
        let mut conn = sqlx::SqliteConnection::connect_with(&options).await?;
        let has: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM sqlite_master WHERE type = 'table' AND name = 'switchboard_migrations'",
        )
        .fetch_one(&mut conn)
        .await?;
        let applied = if has == 0 {
            None
        } else {
            Some(
                sqlx::query_scalar("SELECT version FROM switchboard_migrations WHERE success")
                    .fetch_all(&mut conn)
                    .await?,
            )
        };
        conn.close().await?;
        let expected = sqlx::migrate!("./migrations/sqlite")
            .iter()
            .map(|m| m.version)
            .collect();
        (applied, expected)
    } else {
        // Connect through the store first: its connection errors say what failed.
        crate::store::connect(url).await?;
        let mut conn = sqlx::PgConnection::connect(url).await?;
        let has: bool =
            sqlx::query_scalar("SELECT to_regclass('switchboard_migrations') IS NOT NULL")
                .fetch_one(&mut conn)
                .await?;
        let applied = if has {
            Some(
                sqlx::query_scalar("SELECT version FROM switchboard_migrations WHERE success")
                    .fetch_all(&mut conn)
                    .await?,
            )
        } else {
            None
        };
        conn.close().await?;
        let expected = sqlx::migrate!("./migrations/postgres")
            .iter()
            .map(|m| m.version)
            .collect();
        (applied, expected)
    };
    match applied {
        None => anyhow::bail!("database {shown} has no Switchboard tables; {fix}"),
        Some(applied) => {
            let missing: Vec<String> = expected
                .iter()
                .filter(|v| !applied.contains(v))
                .map(i64::to_string)
                .collect();
            if !missing.is_empty() {
                anyhow::bail!(
                    "database {shown} lacks Switchboard migration(s) {}; {fix}",
                    missing.join(", ")
                );
            }
        }
    }
    Ok(crate::store::connect(url).await?)
}

/// Which stored events to test against.
#[derive(Clone, Debug, Default)]
pub struct BacktestFilter {
    pub received_after: Option<chrono::DateTime<chrono::Utc>>,
    pub received_before: Option<chrono::DateTime<chrono::Utc>>,
    pub conversation_id: Option<String>,
    /// At most this many events (most recent), 1 to 1000.
    pub limit: u32,
}

/// A request the workflow would have sent.
#[derive(Clone, Debug, Serialize)]
pub struct WouldSend {
    pub step_id: String,
    /// `{method, url, headers, body}` with secrets as `***`; absent when it could not be rendered.
    pub request: Option<Value>,
    /// Why it could not be rendered (e.g. it needs an earlier step's response) or was skipped.
    pub note: Option<String>,
    /// The step would fail at run time (a template or URL that cannot render): `note` says why.
    pub fails: bool,
}

/// The verdict on one event.
#[derive(Clone, Debug, Serialize)]
pub struct BacktestResult {
    pub event_id: String,
    pub sequence: i64,
    pub conversation_id: Option<String>,
    pub received_at: chrono::DateTime<chrono::Utc>,
    pub matched: bool,
    /// Why it would not have run.
    pub reason: Option<String>,
    pub requests: Vec<WouldSend>,
    /// For setup workflows without lookups: the answer it would have given.
    pub answer: Option<Value>,
    /// It would have run, then failed: the first failing step and why.
    pub would_fail: Option<String>,
}

/// The earlier steps a step reads (`steps.X` in its `if:` or request templates).
fn reads_steps(step: &super::Step) -> Vec<String> {
    let mut texts: Vec<String> = vec![step.http.url.clone()];
    texts.extend(step.condition.iter().cloned());
    texts.extend(step.http.headers.iter().map(|(_, v)| v.clone()));
    texts.extend(step.http.query.iter().map(|(_, v)| v.clone()));
    match &step.http.body {
        super::BodySpec::Json(v) => template::strings_in(v, &mut texts),
        super::BodySpec::Text { template, .. } => texts.push(template.clone()),
        super::BodySpec::None => {}
    }
    let mut names: Vec<String> = texts
        .iter()
        .flat_map(|t| super::compile::referenced_names(t))
        .filter(|(kind, _)| *kind == "steps")
        .map(|(_, name)| name.to_owned())
        .collect();
    names.sort();
    names.dedup();
    names
}

/// Why a step's request or `if:` could not be worked out: either it reads an
/// earlier step's response (which a backtest does not have) or it would fail.
fn unrendered(step: &super::Step, what: &str, message: &str) -> WouldSend {
    let earlier = reads_steps(step);
    if earlier.is_empty() {
        WouldSend {
            step_id: step.id.clone(),
            request: None,
            note: Some(format!("would fail: {what} cannot be rendered: {message}")),
            fails: true,
        }
    } else {
        let list = earlier
            .iter()
            .map(|s| format!("`{s}`"))
            .collect::<Vec<_>>()
            .join(", ");
        WouldSend {
            step_id: step.id.clone(),
            request: None,
            note: Some(format!(
                "not rendered: {what} reads the response of an earlier step ({list}), which a backtest does not send ({message})"
            )),
            fails: false,
        }
    }
}

/// A stored event with the conversation as it was around it: what a
/// workflow is judged on (backtests, re-dispatch).
pub struct EventAsOf {
    pub envelope: Envelope,
    pub event_json: Value,
    /// The conversation before the event (its log up to, not including, it).
    pub before: Option<ConversationState>,
    /// The conversation including the event.
    pub after: Option<ConversationState>,
}

impl EventAsOf {
    pub fn facts(&self) -> EventFacts<'_> {
        EventFacts {
            envelope: &self.envelope,
            event_json: &self.event_json,
            before: self.before.as_ref(),
            after: self.after.as_ref(),
        }
    }
}

/// Reads `event` with its conversation folded as of its own place in the
/// log; `None` if the event is gone.
pub async fn event_as_of(
    store: &dyn EventStore,
    event: &crate::store::StoredEvent,
) -> Result<Option<EventAsOf>, StoreError> {
    // The conversation as it was: its log up to and including this event.
    let log = match &event.conversation_id {
        Some(c) => store.conversation_log(c, Some(event.seq)).await?,
        None => Vec::new(),
    };
    let raw = match log.last() {
        Some(last) if last.event.seq == event.seq => last.raw_body.clone(),
        _ => match store.get_event(&event.event_id).await? {
            Some(raw) => raw.raw_body,
            None => return Ok(None),
        },
    };
    let envelope = Envelope::parse(&raw).map_err(|e| StoreError::Corrupt(e.to_string()))?;
    let event_json: Value = serde_json::from_slice(&raw).unwrap_or_default();
    // The one fold: the state before this event (its log minus itself), then with it.
    let (before, after) = match (&event.conversation_id, log.split_last()) {
        (Some(c), Some((last, earlier))) if last.event.seq == event.seq => {
            let before =
                fold_log(c, earlier)?.unwrap_or_else(|| ConversationState::new(c.as_str()));
            let mut after = before.clone();
            after.apply_stored(last)?;
            (Some(before), Some(after))
        }
        _ => (None, None),
    };
    Ok(Some(EventAsOf {
        envelope,
        event_json,
        before,
        after,
    }))
}

/// Evaluates `wf` against the stored events of its event type.
pub async fn run(
    store: &dyn EventStore,
    wf: &Workflow,
    filter: &BacktestFilter,
) -> Result<Vec<BacktestResult>, StoreError> {
    let mut events = store
        .list_events(&EventQuery {
            event_type: Some(wf.event.clone()),
            conversation_id: filter.conversation_id.clone(),
            received_after: filter.received_after,
            received_before: filter.received_before,
            order: Order::NewestFirst,
            limit: filter.limit.clamp(1, 1000),
            ..Default::default()
        })
        .await?;
    events.reverse();
    let mut results = Vec::with_capacity(events.len());
    for event in events {
        let Some(judged) = event_as_of(store, &event).await? else {
            continue;
        };
        let facts = judged.facts();
        let decision = decide(wf, &facts);
        let mut result = BacktestResult {
            event_id: event.event_id.clone(),
            sequence: event.seq,
            conversation_id: event.conversation_id.clone(),
            received_at: event.received_at,
            matched: decision.matched(),
            reason: decision.reason().map(str::to_owned),
            requests: Vec::new(),
            answer: None,
            would_fail: None,
        };
        if decision.matched() {
            let mut ctx = base_context(&facts);
            // Secrets render as placeholders that also parse as URLs (a secret may be a
            // whole URL), and are masked to `***` in what is shown.
            let placeholders: Vec<String> = wf
                .secrets
                .iter()
                .map(|s| format!("https://secret.invalid/{s}"))
                .collect();
            let masker = http::Masker::new(placeholders.iter());
            let secrets: serde_json::Map<String, Value> = wf
                .secrets
                .iter()
                .zip(&placeholders)
                .map(|(s, p)| (s.clone(), Value::String(p.clone())))
                .collect();
            ctx["secrets"] = Value::Object(secrets);
            ctx["steps"] = json!({});
            ctx["run"] = json!({"id": "run_backtest", "attempt": 1, "workflow": wf.name});
            // Durable waits: when the run would have reached each step (trigger time + earlier waits).
            let mut reached = event.received_at;
            for step in &wf.steps {
                if let Some(cond) = &step.condition {
                    match template::truthy(cond, &ctx) {
                        Ok(true) => {}
                        Ok(false) => {
                            result.requests.push(WouldSend {
                                step_id: step.id.clone(),
                                request: None,
                                note: Some(format!("skipped: `if: {cond}` is false")),
                                fails: false,
                            });
                            continue;
                        }
                        Err(e) => {
                            result.requests.push(unrendered(
                                step,
                                "`if`",
                                &masker.text(&e.to_string()),
                            ));
                            if result.requests.last().is_some_and(|w| w.fails) {
                                break;
                            }
                            continue;
                        }
                    }
                }
                if let Some(wait) = &step.wait {
                    let (note, outcome) =
                        judge_wait(store, wait, &event, reached, chrono::Utc::now()).await?;
                    reached = outcome.resumed_at;
                    ctx["steps"][step.id.as_str()] = outcome.result;
                    result.requests.push(WouldSend {
                        step_id: step.id.clone(),
                        request: None,
                        note: Some(note),
                        fails: false,
                    });
                    if outcome.still_waiting {
                        break;
                    }
                    continue;
                }
                match http::render(&step.http, &ctx) {
                    Ok(req) => result.requests.push(WouldSend {
                        step_id: step.id.clone(),
                        request: Some(masker.value(&req.record(&[]))),
                        note: None,
                        fails: false,
                    }),
                    Err((_, message)) => result.requests.push(unrendered(
                        step,
                        "the request",
                        &masker.text(&message),
                    )),
                }
                // A run stops at a step that fails: later steps would not be sent.
                if result.requests.last().is_some_and(|w| w.fails) {
                    break;
                }
            }
            result.would_fail = result.requests.iter().find(|w| w.fails).map(|w| {
                format!(
                    "step `{}`: {}",
                    w.step_id,
                    w.note.as_deref().unwrap_or_default()
                )
            });
            if wf.respond.is_some() && wf.steps.is_empty() {
                let produced = answer::render(wf, &ctx);
                result.answer = serde_json::from_str(&produced.body).ok();
            }
        }
        results.push(result);
    }
    Ok(results)
}

/// How a wait step would have ended, in a backtest.
struct WaitJudged {
    /// When the run would have gone on.
    resumed_at: chrono::DateTime<chrono::Utc>,
    /// `steps.<id>` as the run would have seen it.
    result: Value,
    /// It would still be waiting now.
    still_waiting: bool,
}

/// Judges a `wait` / `wait_for` step against the stored history: a
/// `wait_for` resumes on the first matching event of the conversation
/// stored after the trigger (one stored before the step was reached
/// resumes it at once), unless its timeout passed first.
async fn judge_wait(
    store: &dyn EventStore,
    wait: &super::wait::WaitStep,
    trigger: &crate::store::StoredEvent,
    reached: chrono::DateTime<chrono::Utc>,
    now: chrono::DateTime<chrono::Utc>,
) -> Result<(String, WaitJudged), StoreError> {
    use super::wait::{WaitStep, event_result, timer_result};
    let plus = |t: chrono::DateTime<chrono::Utc>, d: std::time::Duration| {
        chrono::TimeDelta::from_std(d)
            .ok()
            .and_then(|d| t.checked_add_signed(d))
            .unwrap_or(chrono::DateTime::<chrono::Utc>::MAX_UTC)
    };
    // Whole seconds from a second on, else milliseconds.
    let human = |d: chrono::TimeDelta| {
        let ms = d.num_milliseconds().max(0) as u64;
        let d = if ms >= 1000 {
            std::time::Duration::from_secs(ms / 1000)
        } else {
            std::time::Duration::from_millis(ms)
        };
        humantime::format_duration(d).to_string()
    };
    match wait {
        WaitStep::Timer { duration } => {
            let until = plus(reached, *duration);
            let ms = i64::try_from(duration.as_millis()).unwrap_or(i64::MAX);
            Ok((
                format!("would wait {}", humantime::format_duration(*duration)),
                WaitJudged {
                    resumed_at: until,
                    result: timer_result(ms),
                    still_waiting: until > now,
                },
            ))
        }
        WaitStep::Event(w) => {
            let timeout_at = plus(reached, w.timeout);
            let log = match &trigger.conversation_id {
                Some(c) => store.conversation_log(c, None).await?,
                None => Vec::new(),
            };
            let rows: Vec<crate::store::waits::LoggedEvent> = log
                .iter()
                .map(|e| {
                    (
                        e.event.seq,
                        e.event.event_id.clone(),
                        e.event.event_type.clone(),
                        e.raw_body.clone(),
                        e.event.received_at,
                    )
                })
                .collect();
            let found = trigger
                .conversation_id
                .as_deref()
                .and_then(|c| crate::store::waits::first_match(c, &rows, w, trigger.seq));
            let hit = found.and_then(|(seq, id)| {
                let e = log.iter().find(|e| e.event.seq == seq)?;
                (e.event.received_at <= timeout_at).then(|| {
                    let envelope: Value = serde_json::from_slice(&e.raw_body).unwrap_or_default();
                    (id, e.event.received_at.max(reached), envelope)
                })
            });
            Ok(match hit {
                Some((id, at, envelope)) => {
                    let waited = at - reached;
                    let note = if waited.num_milliseconds() <= 0 {
                        format!(
                            "would have resumed on {id} at once (it was stored before the step was reached)"
                        )
                    } else {
                        format!("would have resumed on {id} after {}", human(waited))
                    };
                    (
                        note,
                        WaitJudged {
                            resumed_at: at,
                            result: event_result(Some(envelope), waited.num_milliseconds()),
                            still_waiting: false,
                        },
                    )
                }
                None if timeout_at <= now => (
                    format!(
                        "would have timed out after {} (no {} matched)",
                        humantime::format_duration(w.timeout),
                        w.describe()
                    ),
                    WaitJudged {
                        resumed_at: timeout_at,
                        result: event_result(
                            None,
                            i64::try_from(w.timeout.as_millis()).unwrap_or(i64::MAX),
                        ),
                        still_waiting: false,
                    },
                ),
                None => (
                    format!(
                        "would still be waiting: no {} yet; it times out at {}",
                        w.describe(),
                        timeout_at.to_rfc3339()
                    ),
                    WaitJudged {
                        resumed_at: timeout_at,
                        result: Value::Null,
                        still_waiting: true,
                    },
                ),
            })
        }
    }
}
