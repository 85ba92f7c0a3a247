//! The gate every outbound request of a run or a setup lookup passes right
//! before it is sent: go (with a [`Permit`] that is told the outcome) or
//! hold until a time, for a [`HoldReason`].
//!
//! State lives in this process (rate as a GCRA token bucket, requests in
//! flight, the breaker, a `Retry-After` pause). With a PostgreSQL store the
//! rate, the concurrency slots and the breaker are shared by every instance
//! through [`super::shared`]; destinations without a rate or a cap never
//! touch the database per request.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use chrono::{DateTime, Utc};

use super::breaker::{Breaker, State, Verdict};
use super::{DestinationSpec, Destinations, HoldReason};

/// A request that may not go now.
#[derive(Clone, Debug, PartialEq)]
pub struct Hold {
    pub destination: String,
    pub until: DateTime<Utc>,
    pub reason: HoldReason,
}

pub enum Admit {
    Go(Permit),
    Hold(Hold),
}

/// Counted per destination for the API.
#[derive(Default)]
struct Health {
    /// (when, succeeded) of the last 5 minutes.
    outcomes: VecDeque<(DateTime<Utc>, bool)>,
    last_errors: VecDeque<(DateTime<Utc>, String)>,
}

const HEALTH_WINDOW: chrono::TimeDelta = chrono::TimeDelta::minutes(5);
const LAST_ERRORS: usize = 5;

/// A held run's place in its destination's queue: (created at, run id).
type QueueKey = (DateTime<Utc>, String);

/// A run asking the gate (held runs of a destination go oldest first).
#[derive(Clone, Copy, Debug)]
pub struct RunRef<'a> {
    pub id: &'a str,
    pub created_at: DateTime<Utc>,
    /// Why the run waited before this claim (`runs.wait_reason`): a run that
    /// comes back from a hold may be in the shared queue.
    pub held: Option<&'a str>,
}

impl RunRef<'_> {
    fn key(&self) -> QueueKey {
        (self.created_at, self.id.to_owned())
    }
}

#[derive(Default)]
struct DestState {
    /// GCRA: the theoretical arrival time of the next request.
    tat: Option<DateTime<Utc>>,
    /// When the requests of the last rate period were let through (sliding window).
    sent: VecDeque<DateTime<Utc>>,
    in_flight: u32,
    breaker: Breaker,
    paused_until: Option<DateTime<Utc>>,
    /// When this process last changed the breaker or the pause (the shared
    /// copy read back may predate that write).
    changed_at: Option<std::time::Instant>,
    /// Runs held now, oldest first: (created at, run id) → when it comes back.
    queue: BTreeMap<QueueKey, DateTime<Utc>>,
    health: Health,
}

struct Inner {
    config: RwLock<Arc<Destinations>>,
    states: Mutex<HashMap<String, DestState>>,
    shared: Option<super::shared::Shared>,
    /// Where parked runs are woken when a breaker closes (see [`Gate::attach`]).
    wake: std::sync::OnceLock<Waker>,
}

/// The run store and the workers' wake-up, to wake parked runs.
struct Waker {
    store: Arc<dyn crate::store::EventStore>,
    notify: Arc<tokio::sync::Notify>,
}

/// Cheap to clone; one per process (shared by the engine and setup answers).
#[derive(Clone)]
pub struct Gate {
    inner: Arc<Inner>,
}

impl Default for Gate {
    fn default() -> Self {
        Self::new(None)
    }
}

fn plus(t: DateTime<Utc>, d: Duration) -> DateTime<Utc> {
    t + chrono::TimeDelta::from_std(d).unwrap_or(chrono::TimeDelta::MAX / 2)
}

/// How long a request held by the concurrency cap waits before it looks again.
const CONCURRENCY_RETRY: Duration = Duration::from_millis(50);
/// The spacing of requests held by the cap (oldest first).
const CONCURRENCY_SPACING: Duration = Duration::from_millis(5);
/// The longest `Retry-After` that pauses a destination.
const MAX_PAUSE: Duration = Duration::from_secs(3600);
/// Runs held by an open breaker other than the oldest (which comes back for
/// the probe) are parked: they come back when it closes (woken all at once,
/// oldest first) or, should that wake be lost, this long after the probe
/// time, one [`PARK_SPACING`] apart, and are parked again if it is still open.
const PARK: Duration = Duration::from_secs(60);
const PARK_SPACING: Duration = Duration::from_millis(50);
/// How long past its turn a held run is waited for by younger runs before it
/// is forgotten (cancelled, or late): a claim may come up to a second late.
const TURN_GRACE: Duration = Duration::from_secs(2);
/// How far ahead the shared gate looks for an older held run that goes
/// first on a destination with a cap and no rate (see [`Gate::queued_run`]):
/// a run held again by the cap is queued at a guess (`now + 50 ms + 5 ms ×
/// runs ahead`), which may lie past a younger run's turn by more than one
/// lookahead; within this horizon it still goes first. (With a rate a run
/// held again is queued at the next token's own time, which no younger run
/// can take before it; looking 2 s ahead there made younger runs leave
/// tokens unused: 77–87 % of the limit in the `shared-rate` bench against
/// 98 %.) Runs parked behind an open breaker (a minute away) lie beyond it.
const ORDER_HORIZON: Duration = TURN_GRACE;
/// How long a run waits in process for the shared gate (PostgreSQL) before
/// it is parked instead (see [`Gate::admit_shared`]).
const SHARED_WAIT: Duration = Duration::from_millis(100);

/// How far ahead an older held run's turn makes a younger run wait behind it,
/// and the reason it waits; `None` without a rate or a cap (nothing is scarce).
fn lookahead(limits: &super::Limits) -> Option<(Duration, HoldReason)> {
    match (limits.rate, limits.concurrency) {
        (Some(rate), _) => Some((
            rate.interval().max(CONCURRENCY_RETRY),
            HoldReason::RateLimited,
        )),
        (None, Some(_)) => Some((CONCURRENCY_RETRY, HoldReason::Concurrency)),
        (None, None) => None,
    }
}

/// The spacing of held runs queued one behind the other.
fn spacing_of(dest: &DestinationSpec, reason: HoldReason) -> Duration {
    match reason {
        HoldReason::RateLimited => dest
            .limits
            .rate
            .map_or(CONCURRENCY_SPACING, |r| r.interval()),
        _ => CONCURRENCY_SPACING,
    }
}

/// When a run must let an older held run of its destination go first: the
/// oldest held run older than `r` whose turn is now or within one spacing (and
/// that has not been forgotten: see [`TURN_GRACE`]), for destinations with a
/// rate or a cap (without them nothing is scarce). Forgets stale turns.
fn older_turn(
    queue: &mut BTreeMap<QueueKey, DateTime<Utc>>,
    limits: &super::Limits,
    r: RunRef<'_>,
    now: DateTime<Utc>,
) -> Option<(DateTime<Utc>, HoldReason)> {
    let (lookahead, reason) = lookahead(limits)?;
    let stale = now - chrono::TimeDelta::from_std(TURN_GRACE).unwrap_or_default();
    let soon = plus(now, lookahead);
    let key = r.key();
    let mut forgotten = Vec::new();
    let mut turn = None;
    for (k, until) in queue.range(..&key) {
        if *until < stale {
            forgotten.push(k.clone());
        } else if *until <= soon {
            turn = Some(*until);
            break;
        }
    }
    for k in forgotten {
        queue.remove(&k);
    }
    turn.map(|t| (t, reason))
}

/// How an attempt ended, as the gate needs it.
#[derive(Clone, Debug, Default)]
pub struct Outcome {
    pub status: Option<u16>,
    /// The error class (`connect`, `timeout`, `http_5xx`...), if it failed.
    pub error_class: Option<String>,
    pub error: Option<String>,
    pub retry_after: Option<Duration>,
    /// The request was never sent (a template or secret failed).
    pub not_sent: bool,
}

impl Outcome {
    /// Counts against the breaker: connect, timeout, 5xx, 429.
    pub fn failed(&self) -> bool {
        matches!(self.status, Some(429) | Some(500..=599))
            || matches!(
                self.error_class.as_deref(),
                Some("connect" | "timeout" | "dns" | "http_5xx")
            )
    }

    /// From a setup lookup's exchange.
    pub fn of_exchange(ex: &crate::engine::http::Exchange) -> Self {
        let status = ex.response.as_ref().map(|r| r.status);
        Self {
            status,
            error_class: ex.failure.as_ref().map(|f| f.class.as_str().to_owned()),
            error: ex.failure.as_ref().map(|f| f.message.clone()),
            retry_after: ex
                .failure
                .as_ref()
                .and_then(|f| f.retry_after)
                .filter(|_| matches!(status, Some(429 | 503))),
            not_sent: false,
        }
    }

    /// From an attempt as recorded.
    pub fn of_attempt(a: &crate::store::runs::Attempt) -> Self {
        let status = a.response_status.and_then(|s| u16::try_from(s).ok());
        let retry_after = matches!(status, Some(429 | 503))
            .then(|| {
                a.response_headers
                    .as_ref()?
                    .0
                    .get("retry-after")?
                    .as_str()
                    .and_then(|v| crate::engine::backoff::parse_retry_after(v, Utc::now()))
            })
            .flatten();
        Self {
            status,
            error_class: a.error_class.clone(),
            error: a.error_message.clone(),
            retry_after,
            not_sent: a.response_status.is_none()
                && matches!(
                    a.error_class.as_deref(),
                    Some("template" | "secret" | "egress" | "request")
                ),
        }
    }
}

/// Leave to send one request; give it the outcome with [`Permit::report`].
/// Dropped without a report (the work was stopped), it frees its slot and,
/// if it was the probe, lets another probe go.
pub struct Permit {
    gate: Option<Gate>,
    dest: String,
    probe: bool,
    slot: Option<super::shared::Slot>,
    counted: bool,
    policy: Option<super::BreakerPolicy>,
    /// The run's place in the queue (a failed probe keeps it).
    run: Option<QueueKey>,
}

impl Permit {
    fn free() -> Self {
        Self {
            gate: None,
            dest: String::new(),
            probe: false,
            slot: None,
            counted: false,
            policy: None,
            run: None,
        }
    }

    /// The destination this request belongs to (empty when none).
    pub fn destination(&self) -> &str {
        &self.dest
    }

    /// Gives the attempt's outcome to the gate; says what it did to the breaker.
    pub fn report(mut self, outcome: &Outcome) -> Reported {
        match self.gate.take() {
            Some(gate) => gate.finish(&mut self, Some(outcome)),
            None => Reported::default(),
        }
    }
}

/// What an attempt's outcome did to its destination's breaker.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Reported {
    /// The attempt was the breaker's probe and failed: the breaker is open
    /// again until then (the next probe).
    pub probe_failed_until: Option<DateTime<Utc>>,
    /// The attempt closed the breaker.
    pub closed: bool,
}

impl Drop for Permit {
    fn drop(&mut self) {
        if let Some(gate) = self.gate.take() {
            gate.finish(self, None);
        }
    }
}

/// One destination as the API shows it.
#[derive(Clone, Debug)]
pub struct Snapshot {
    pub name: String,
    pub url: String,
    pub state: State,
    pub until: Option<DateTime<Utc>>,
    pub paused_until: Option<DateTime<Utc>>,
    pub in_flight: u32,
    pub held_runs: usize,
    pub last_errors: Vec<(DateTime<Utc>, String)>,
    pub success_rate: Option<f64>,
    pub requests_5m: usize,
}

impl Gate {
    pub fn new(shared: Option<super::shared::Shared>) -> Self {
        Self {
            inner: Arc::new(Inner {
                config: RwLock::new(Arc::new(Destinations::default())),
                states: Mutex::new(HashMap::new()),
                shared,
                wake: std::sync::OnceLock::new(),
            }),
        }
    }

    /// Puts a (re)loaded `destinations.yaml` in force; state of destinations
    /// still named is kept.
    pub fn configure(&self, d: Arc<Destinations>) {
        if let Some(shared) = &self.inner.shared {
            shared.configure(&d);
        }
        *self.inner.config.write().expect("gate config") = d;
        // A destination may be gone, or its breaker changed: parked runs look again.
        self.wake_parked();
    }

    /// Gives the gate the run store and the workers' wake-up, so that runs
    /// parked behind an open breaker are woken (one UPDATE) when it closes.
    pub fn attach(
        &self,
        store: Arc<dyn crate::store::EventStore>,
        notify: Arc<tokio::sync::Notify>,
    ) {
        let _ = self.inner.wake.set(Waker { store, notify });
    }

    /// Makes every run parked behind a breaker due now, oldest first (for
    /// every destination: those still open park them again), in the
    /// background, tried 3 times; the parked runs' own time is the safety net.
    fn wake_parked(&self) {
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let gate = self.clone();
        runtime.spawn(async move { gate.wake_parked_now().await });
    }

    /// [`Self::wake_parked`], awaited.
    async fn wake_parked_now(&self) {
        let Some(w) = self.inner.wake.get() else {
            return;
        };
        let (store, notify) = (w.store.clone(), w.notify.clone());
        for tries in 1..=3u32 {
            match store
                .wake_held(&[HoldReason::CircuitOpen.as_str()], Utc::now())
                .await
            {
                Ok(n) => {
                    if n > 0 {
                        tracing::info!(runs = n, "runs parked behind a circuit breaker woken");
                        notify.notify_waiters();
                    }
                    return;
                }
                Err(e) => {
                    tracing::warn!(error = %e, tries, "cannot wake the runs parked behind a circuit breaker; they come back by themselves");
                    tokio::time::sleep(Duration::from_millis(500) * tries).await;
                }
            }
        }
    }

    pub fn config(&self) -> Arc<Destinations> {
        self.inner.config.read().expect("gate config").clone()
    }

    /// Asks to send one request to `url` now; `run` (for runs, not lookups)
    /// queues held runs oldest first (on PostgreSQL, for a destination with a
    /// rate or a cap, in a queue every instance shares: see [`Self::held_shared`]).
    pub async fn admit(&self, url: &str, run: Option<RunRef<'_>>) -> Admit {
        let config = self.config();
        if config.is_empty() {
            return Admit::Go(Permit::free());
        }
        let Some(dest) = config.find(url) else {
            return Admit::Go(Permit::free());
        };
        let limited = dest.limits.rate.is_some() || dest.limits.concurrency.is_some();
        if let Some(shared) = &self.inner.shared {
            // A run parked behind a breaker that comes back while this instance still
            // sees the breaker open was most likely woken because another instance's
            // probe closed it: read the shared state now rather than park it again.
            if run.is_some_and(|r| r.held == Some(HoldReason::CircuitOpen.as_str()))
                && self.breaker_of(&dest.name).state != State::Closed
            {
                shared.refresh_now(self).await;
            } else {
                shared.refresh_if_stale(self).await;
            }
        }
        let verdict = self.admit_local(&dest, run);
        let verdict = match (verdict, &self.inner.shared) {
            (Ok(permit), Some(shared)) if limited => {
                match self.admit_shared(shared, &dest, run).await {
                    Ok(slot) => {
                        let mut permit = permit;
                        permit.slot = slot;
                        // A pause or an opening that came while the shared query ran holds it still.
                        match self
                            .stopped_since(&dest.name, permit.probe)
                            .or_else(|| self.count_local(&dest, &mut permit))
                        {
                            None => Ok(permit),
                            Some(hold) => {
                                if let Some(slot) = permit.slot.take() {
                                    shared.release(slot).await;
                                }
                                permit.counted_back();
                                Err(hold)
                            }
                        }
                    }
                    Err(hold) => {
                        // Give back what the local gate counted.
                        let mut permit = permit;
                        permit.counted_back();
                        Err(hold)
                    }
                }
            }
            (v, _) => v,
        };
        let verdict = match verdict {
            Ok(mut permit) => {
                if permit.probe
                    && let Some(shared) = &self.inner.shared
                {
                    // One probe for every instance: whoever turns the shared row half open sends it.
                    let b = self.breaker_of(&dest.name);
                    if shared.claim_probe(&dest.name, &b).await {
                        Ok(permit)
                    } else {
                        let until = Utc::now() + chrono::TimeDelta::seconds(1);
                        {
                            let mut states = self.inner.states.lock().expect("gate state");
                            let s = states.entry(dest.name.clone()).or_default();
                            s.breaker.state = State::Open;
                            s.breaker.until = Some(until);
                        }
                        permit.probe = false;
                        permit.counted_back();
                        Err((until, HoldReason::CircuitOpen))
                    }
                } else {
                    Ok(permit)
                }
            }
            Err(hold) => Err(hold),
        };
        match verdict {
            Ok(permit) => {
                // Out of the queue only now: while the shared gate is asked, younger runs wait behind it.
                if let Some(r) = run
                    && let Some(s) = self
                        .inner
                        .states
                        .lock()
                        .expect("gate state")
                        .get_mut(&dest.name)
                {
                    s.queue.remove(&r.key());
                }
                Admit::Go(permit)
            }
            Err((earliest, reason)) => {
                let hold = match (&self.inner.shared, run) {
                    (Some(shared), Some(r)) if limited => {
                        self.held_shared(shared, &dest, earliest, reason, r).await
                    }
                    _ => self.held(&dest, earliest, reason, run),
                };
                crate::prometheus::destination_held(&hold.destination, hold.reason.as_str());
                Admit::Hold(hold)
            }
        }
    }

    /// The shared gate's answer for a request the local gate let through. A
    /// run held for at most [`SHARED_WAIT`] (by an older held run being let
    /// through on another instance, the next rate token, a slot) waits here
    /// and asks again instead of being parked and claimed back: that trip
    /// through the database takes longer than a token's interval, so with
    /// several instances each hold would lose the destination's turn.
    async fn admit_shared(
        &self,
        shared: &super::shared::Shared,
        dest: &DestinationSpec,
        run: Option<RunRef<'_>>,
    ) -> Result<Option<super::shared::Slot>, (DateTime<Utc>, HoldReason)> {
        let waited_until = std::time::Instant::now() + SHARED_WAIT;
        loop {
            let queued = run.and_then(|r| self.queued_run(dest, r));
            match shared.admit(dest, queued.as_ref()).await {
                Err((until, reason))
                    if run.is_some()
                        && matches!(reason, HoldReason::RateLimited | HoldReason::Concurrency) =>
                {
                    let wait = (until - Utc::now()).to_std().unwrap_or_default();
                    if std::time::Instant::now() + wait > waited_until {
                        return Err((until, reason));
                    }
                    tokio::time::sleep(wait.max(Duration::from_millis(2))).await;
                }
                verdict => return verdict,
            }
        }
    }

    /// What the shared gate needs of `r` for the shared queue: `None` when
    /// nothing is scarce (no rate, no cap).
    fn queued_run(
        &self,
        dest: &DestinationSpec,
        r: RunRef<'_>,
    ) -> Option<super::shared::QueuedRun> {
        let (lookahead, reason) = lookahead(&dest.limits)?;
        let now = Utc::now();
        Some(super::shared::QueuedRun {
            key: r.key(),
            held: r
                .held
                .is_some_and(|h| HoldReason::ALL.iter().any(|x| x.as_str() == h)),
            stale: now - chrono::TimeDelta::from_std(TURN_GRACE).unwrap_or_default(),
            soon: plus(
                now,
                match dest.limits.rate {
                    Some(_) => lookahead,
                    None => lookahead.max(ORDER_HORIZON),
                },
            ),
            reason,
        })
    }

    /// [`Self::held`], with the run's turn taken from the queue every
    /// instance shares (PostgreSQL, destinations with a rate or a cap): one
    /// spacing after every older held run still awaited, whichever instance
    /// held it. The local queue keeps the same turn.
    async fn held_shared(
        &self,
        shared: &super::shared::Shared,
        dest: &DestinationSpec,
        earliest: DateTime<Utc>,
        reason: HoldReason,
        r: RunRef<'_>,
    ) -> Hold {
        let mut hold = self.held(dest, earliest, reason, Some(r));
        let stale = Utc::now() - chrono::TimeDelta::from_std(TURN_GRACE).unwrap_or_default();
        let parked = (reason == HoldReason::CircuitOpen).then_some((PARK, PARK_SPACING));
        match shared
            .enqueue(
                &dest.name,
                &r.key(),
                stale,
                earliest,
                spacing_of(dest, reason),
                parked,
            )
            .await
        {
            Ok(turn) => {
                hold.until = turn;
                if let Some(s) = self
                    .inner
                    .states
                    .lock()
                    .expect("gate state")
                    .get_mut(&dest.name)
                {
                    s.queue.insert(r.key(), turn);
                }
            }
            Err(e) => {
                tracing::warn!(destination = %dest.name, error = %e, "cannot queue a held run in the shared queue; this instance's order only");
            }
        }
        hold
    }

    /// Counts a request the shared gate let through in this process's
    /// requests in flight (not before: a run that waits in its worker for
    /// the shared gate must not keep an older held run of this process out);
    /// held if this process's own requests would exceed the cap (only if a
    /// shared slot expired under a request still in flight).
    fn count_local(
        &self,
        dest: &DestinationSpec,
        permit: &mut Permit,
    ) -> Option<(DateTime<Utc>, HoldReason)> {
        let mut states = self.inner.states.lock().expect("gate state");
        let s = states.entry(dest.name.clone()).or_default();
        if let Some(cap) = dest.limits.concurrency
            && s.in_flight >= cap
        {
            return Some((plus(Utc::now(), CONCURRENCY_RETRY), HoldReason::Concurrency));
        }
        s.in_flight += 1;
        permit.counted = true;
        None
    }

    /// A pause, or an open breaker (for a request that is not the probe), in force now.
    fn stopped_since(&self, name: &str, probe: bool) -> Option<(DateTime<Utc>, HoldReason)> {
        let now = Utc::now();
        let states = self.inner.states.lock().expect("gate state");
        let s = states.get(name)?;
        if let Some(p) = s.paused_until.filter(|p| *p > now) {
            return Some((p, HoldReason::PausedUntil));
        }
        if !probe
            && s.breaker.state == State::Open
            && let Some(until) = s.breaker.until.filter(|u| *u > now)
        {
            return Some((until, HoldReason::CircuitOpen));
        }
        None
    }

    fn breaker_of(&self, name: &str) -> Breaker {
        self.inner
            .states
            .lock()
            .expect("gate state")
            .get(name)
            .map(|s| s.breaker)
            .unwrap_or_default()
    }

    /// Schedules a held request. A run comes back one spacing after every
    /// held run of the destination older than it (that is still awaited):
    /// oldest first, never all at once, and a run held again keeps its place
    /// ahead of younger ones. A lookup (no run) waits for `earliest` itself.
    fn held(
        &self,
        dest: &DestinationSpec,
        earliest: DateTime<Utc>,
        reason: HoldReason,
        run: Option<RunRef<'_>>,
    ) -> Hold {
        let mut states = self.inner.states.lock().expect("gate state");
        let s = states.entry(dest.name.clone()).or_default();
        let now = Utc::now();
        let spacing = spacing_of(dest, reason);
        let until = match run {
            None => earliest,
            Some(r) => {
                let key = r.key();
                let awaited = now - chrono::TimeDelta::from_std(TURN_GRACE).unwrap_or_default();
                let ahead = s
                    .queue
                    .range(..&key)
                    .filter(|(_, u)| **u >= awaited)
                    .count();
                let ahead = u32::try_from(ahead).unwrap_or(u32::MAX);
                let until = if reason == HoldReason::CircuitOpen && ahead > 0 {
                    // Parked: only the oldest comes back for the probe.
                    plus(plus(earliest, PARK), PARK_SPACING * ahead)
                } else {
                    plus(earliest, spacing * ahead)
                };
                s.queue.insert(key, until);
                until
            }
        };
        if s.queue.len() > 10_000 {
            let stale = now - chrono::TimeDelta::minutes(1);
            s.queue.retain(|_, u| *u > stale);
        }
        Hold {
            destination: dest.name.clone(),
            until,
            reason,
        }
    }

    /// The local gate: a permit, or held from when, for what (not queued yet).
    fn admit_local(
        &self,
        dest: &DestinationSpec,
        run: Option<RunRef<'_>>,
    ) -> Result<Permit, (DateTime<Utc>, HoldReason)> {
        let now = Utc::now();
        let limits = dest.limits;
        // The shared gate orders the held runs of a destination with a rate or a cap
        // (in its queue, read in the admission's transaction): this process's queue
        // does not know which of its runs another instance has let through since.
        let shared_queue =
            self.inner.shared.is_some() && (limits.rate.is_some() || limits.concurrency.is_some());
        let hold = {
            let mut states = self.inner.states.lock().expect("gate state");
            let s = states.entry(dest.name.clone()).or_default();
            'hold: {
                if let Some(p) = s.paused_until {
                    if now < p {
                        break 'hold Some((p, HoldReason::PausedUntil));
                    }
                    s.paused_until = None;
                }
                let verdict = match limits.breaker {
                    Some(_) => s.breaker.check(now),
                    None => Verdict::Go,
                };
                if let Verdict::Hold(until) = verdict {
                    break 'hold Some((until, HoldReason::CircuitOpen));
                }
                // Oldest first: a run waits behind an older held run whose turn has come
                // (with the shared gate, in its queue instead: see `shared_queue` above).
                if let Some(r) = run
                    && !shared_queue
                    && let Some((turn, reason)) = older_turn(&mut s.queue, &limits, r, now)
                {
                    break 'hold Some((turn.max(now), reason));
                }
                // (Shared or not: this process's own requests never exceed the cap either;
                // with the shared gate that is checked, and counted, once it lets the request
                // through: see `count_local`.)
                if let Some(cap) = limits.concurrency
                    && !shared_queue
                    && s.in_flight >= cap
                {
                    break 'hold Some((plus(now, CONCURRENCY_RETRY), HoldReason::Concurrency));
                }
                if let Some(rate) = limits.rate
                    && self.inner.shared.is_none()
                {
                    let interval = chrono::TimeDelta::from_std(rate.interval())
                        .unwrap_or(chrono::TimeDelta::MAX / 2);
                    let tau = interval * (rate.burst.saturating_sub(1) as i32);
                    let t = s.tat.map_or(now, |t| t.max(now));
                    if t - now > tau {
                        break 'hold Some((t - tau, HoldReason::RateLimited));
                    }
                    // And never more than `count` in any window of `period` (what an API's
                    // "100 per 10 s" means; the bucket alone would allow count + burst).
                    let period = chrono::TimeDelta::from_std(rate.period)
                        .unwrap_or(chrono::TimeDelta::MAX / 2);
                    while s.sent.front().is_some_and(|at| *at <= now - period) {
                        s.sent.pop_front();
                    }
                    if s.sent.len() >= rate.count as usize
                        && let Some(oldest) = s.sent.front()
                    {
                        break 'hold Some((*oldest + period, HoldReason::RateLimited));
                    }
                    s.sent.push_back(now);
                    s.tat = Some(t + interval);
                }
                let probe = verdict == Verdict::Probe;
                if probe {
                    s.breaker.start_probe(now);
                    s.changed_at = Some(std::time::Instant::now());
                }
                if !shared_queue {
                    s.in_flight += 1;
                }
                return Ok(Permit {
                    gate: Some(self.clone()),
                    dest: dest.name.clone(),
                    probe,
                    slot: None,
                    counted: !shared_queue,
                    policy: limits.breaker,
                    run: run.map(|r| r.key()),
                });
            }
        };
        Err(hold.expect("held"))
    }

    /// Returns a permit's slot and records its outcome.
    fn finish(&self, permit: &mut Permit, outcome: Option<&Outcome>) -> Reported {
        let now = Utc::now();
        let mut changed = None;
        let mut reported = Reported::default();
        {
            let mut states = self.inner.states.lock().expect("gate state");
            let s = states.entry(permit.dest.clone()).or_default();
            if permit.counted {
                s.in_flight = s.in_flight.saturating_sub(1);
                permit.counted = false;
            }
            match outcome {
                None => {
                    // Stopped before an answer: a probe may go again.
                    if permit.probe && s.breaker.state == State::HalfOpen {
                        s.breaker.until = Some(now);
                    }
                }
                Some(o) if o.not_sent => {
                    if permit.probe && s.breaker.state == State::HalfOpen {
                        s.breaker.until = Some(now);
                    }
                }
                Some(o) => {
                    let failed = o.failed();
                    if let Some(policy) = &permit.policy
                        && s.breaker.record(policy, failed, permit.probe, now)
                    {
                        changed = Some(s.breaker);
                        s.changed_at = Some(std::time::Instant::now());
                        if s.breaker.state == State::Open {
                            tracing::warn!(destination = %permit.dest, cool_down = %humantime::format_duration(s.breaker.cool_down), "circuit breaker open: requests to this destination are held");
                        } else {
                            tracing::info!(destination = %permit.dest, "circuit breaker closed");
                        }
                        crate::prometheus::destination_state(&permit.dest, s.breaker.state.gauge());
                        reported.closed = s.breaker.state == State::Closed;
                        if reported.closed {
                            // Every held run's turn has come (parked ones are woken below).
                            s.queue.values_mut().for_each(|u| *u = now);
                        }
                    }
                    if permit.probe && failed && s.breaker.state == State::Open {
                        reported.probe_failed_until = s.breaker.until;
                        // The run that probed comes back for the next probe, first in line.
                        if let (Some(key), Some(until)) = (permit.run.take(), s.breaker.until) {
                            s.queue.insert(key, until);
                        }
                    }
                    if let Some(ra) = o.retry_after {
                        let until = plus(now, ra.min(MAX_PAUSE));
                        if s.paused_until.is_none_or(|p| p < until) {
                            s.paused_until = Some(until);
                            s.changed_at = Some(std::time::Instant::now());
                            tracing::info!(destination = %permit.dest, until = %until, "destination paused by Retry-After");
                        }
                    }
                    s.health.outcomes.push_back((now, !failed));
                    if failed {
                        let why = o
                            .error
                            .clone()
                            .unwrap_or_else(|| format!("HTTP {}", o.status.unwrap_or_default()));
                        s.health.last_errors.push_back((now, why));
                        if s.health.last_errors.len() > LAST_ERRORS {
                            s.health.last_errors.pop_front();
                        }
                    }
                    let horizon = now - HEALTH_WINDOW;
                    while s.health.outcomes.front().is_some_and(|(t, _)| *t < horizon)
                        || s.health.outcomes.len() > 100_000
                    {
                        s.health.outcomes.pop_front();
                    }
                }
            }
        }
        // With other instances, the closed breaker is written before the parked runs are
        // woken: an instance that claims one reads the shared state then (see `admit`).
        if reported.closed && self.inner.shared.is_none() {
            self.wake_parked();
        }
        let paused = outcome.and_then(|o| o.retry_after).is_some();
        if let Some(shared) = &self.inner.shared {
            let slot = permit.slot.take();
            let dest = permit.dest.clone();
            let shared = shared.clone();
            let pause = paused.then(|| {
                self.inner
                    .states
                    .lock()
                    .expect("gate state")
                    .get(&dest)
                    .and_then(|s| s.paused_until)
            });
            // A permit dropped while the runtime shuts down has no one to write for:
            // its slot expires by itself and the breaker is written again on its next change.
            if (slot.is_some() || changed.is_some() || pause.is_some())
                && let Ok(runtime) = tokio::runtime::Handle::try_current()
            {
                let gate = self.clone();
                let closed = reported.closed;
                runtime.spawn(async move {
                    if let Some(slot) = slot {
                        shared.release(slot).await;
                    }
                    if let Some(b) = changed {
                        shared.write_breaker(&dest, &b).await;
                    }
                    if closed {
                        shared.turns_now(&dest).await;
                        gate.wake_parked_now().await;
                    }
                    if let Some(Some(until)) = pause {
                        shared.write_pause(&dest, until).await;
                    }
                });
            }
        }
        reported
    }

    /// Closes the breaker of `name` and ends a pause; false when no such destination.
    pub async fn reset(&self, name: &str) -> bool {
        if !self.names().iter().any(|n| n == name) {
            return false;
        }
        {
            let mut states = self.inner.states.lock().expect("gate state");
            let s = states.entry(name.to_owned()).or_default();
            s.breaker = Breaker::default();
            s.paused_until = None;
            s.changed_at = Some(std::time::Instant::now());
            for until in s.queue.values_mut() {
                *until = Utc::now();
            }
        }
        crate::prometheus::destination_state(name, 0.0);
        if let Some(shared) = &self.inner.shared {
            shared.write_breaker(name, &Breaker::default()).await;
            shared.write_pause(name, Utc::now()).await;
            shared.turns_now(name).await;
        }
        true
    }

    /// Named destinations and every origin the default has seen.
    fn names(&self) -> Vec<String> {
        let config = self.config();
        let mut names: Vec<String> = config.entries.iter().map(|e| e.name.clone()).collect();
        if !config.default.is_empty() {
            let states = self.inner.states.lock().expect("gate state");
            let mut seen: Vec<String> = states
                .keys()
                .filter(|k| !names.contains(k))
                .cloned()
                .collect();
            seen.sort();
            names.extend(seen);
        }
        names
    }

    /// Applies breaker states and pauses read from the shared store.
    pub(crate) fn apply_shared(&self, rows: Vec<(String, Breaker, Option<DateTime<Utc>>)>) {
        let mut states = self.inner.states.lock().expect("gate state");
        for (name, b, paused) in rows {
            let s = states.entry(name).or_default();
            // This process's own recent change wins until its write is surely read back.
            if s.changed_at.is_some_and(|t| {
                t.elapsed() < 2 * super::shared::REFRESH + std::time::Duration::from_secs(1)
            }) {
                continue;
            }
            // Closed both ways: keep this process's count of consecutive failures.
            if !(s.breaker.state == State::Closed && b.state == State::Closed) {
                if s.breaker.state != State::Closed && b.state == State::Closed {
                    // Closed by another instance (which wakes the parked runs).
                    let now = Utc::now();
                    s.queue.values_mut().for_each(|u| *u = now);
                }
                s.breaker = b;
            }
            s.paused_until = paused.filter(|p| *p > Utc::now());
        }
    }

    /// Reads the shared breaker states now (PostgreSQL), if stale.
    pub async fn refresh(&self) {
        if let Some(shared) = &self.inner.shared {
            shared.refresh_if_stale(self).await;
        }
    }

    /// Every destination, for the API.
    pub fn snapshot(&self) -> Vec<Snapshot> {
        let config = self.config();
        let now = Utc::now();
        let names = self.names();
        let states = self.inner.states.lock().expect("gate state");
        names
            .into_iter()
            .map(|name| {
                let url = config
                    .entries
                    .iter()
                    .find(|e| e.name == name)
                    .map_or_else(|| name.clone(), |e| e.url.clone());
                let s = states.get(&name);
                let horizon = now - HEALTH_WINDOW;
                let recent: Vec<bool> = s
                    .map(|s| {
                        s.health
                            .outcomes
                            .iter()
                            .filter(|(t, _)| *t >= horizon)
                            .map(|(_, ok)| *ok)
                            .collect()
                    })
                    .unwrap_or_default();
                let ok = recent.iter().filter(|ok| **ok).count();
                let breaker = s.map(|s| s.breaker).unwrap_or_default();
                Snapshot {
                    name: name.clone(),
                    url,
                    state: breaker.state,
                    until: breaker.until.filter(|_| breaker.state != State::Closed),
                    paused_until: s.and_then(|s| s.paused_until).filter(|p| *p > now),
                    in_flight: s.map_or(0, |s| s.in_flight),
                    held_runs: s.map_or(0, |s| {
                        s.queue
                            .values()
                            .filter(|u| **u > now - chrono::TimeDelta::seconds(5))
                            .count()
                    }),
                    last_errors: s
                        .map(|s| s.health.last_errors.iter().rev().cloned().collect())
                        .unwrap_or_default(),
                    success_rate: (!recent.is_empty()).then(|| ok as f64 / recent.len() as f64),
                    requests_5m: recent.len(),
                }
            })
            .collect()
    }
}

impl Permit {
    /// Gives back the local count (the shared gate held the request).
    fn counted_back(&mut self) {
        if let Some(gate) = self.gate.take() {
            let mut states = gate.inner.states.lock().expect("gate state");
            if let Some(s) = states.get_mut(&self.dest) {
                if self.counted {
                    s.in_flight = s.in_flight.saturating_sub(1);
                }
                if self.probe && s.breaker.state == State::HalfOpen {
                    s.breaker.until = Some(Utc::now());
                }
            }
            self.counted = false;
        }
    }
}
