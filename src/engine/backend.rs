//! The apalis [`Backend`] over our own leased `runs` table: apalis-core's
//! worker asks it for the next run only when a concurrency slot is free
//! (tower's `GlobalConcurrencyLimitLayer` holds the slot), and the fetcher
//! claims as many due runs as there are free slots in one statement
//! (`SKIP LOCKED` on PostgreSQL, a fencing token per claim, lease expiry and
//! backoff in the database: see [`crate::store::runs::RunStore::claim_due`]).
//!
//! Runs created by this process's own appends arrive in memory, already
//! leased to this process in the event's transaction ([`LocalRuns`]): they
//! are yielded without a claim round trip. The fetcher only claims when a
//! wake-up (new runs from another instance through LISTEN/NOTIFY, the
//! in-process notify, or the time the next run falls due) says there may
//! be something to claim, never merely because a run finished.
//!
//! Two traps of the custom-backend path are avoided on purpose: the backend
//! never yields `None` (that would end the worker for good) and never yields
//! an error (that would end the worker and drop every run in flight):
//! database errors are logged and retried inside the fetcher.

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use apalis_core::backend::{Backend, BackendConfig, finalize::Ephemeral};
use apalis_core::task::Task;
use apalis_core::task::builder::TaskBuilder;
use apalis_core::task::task_id::{RandomId, TaskId};
use apalis_core::worker::context::WorkerContext;
use tower::layer::util::Identity;

use super::{Engine, LEASE, now};
use crate::store::runs::Run;

/// The safety-net poll when nothing else wakes the fetcher.
const POLL: Duration = Duration::from_secs(1);

/// A fetch in flight, in a task of its own: the runs it claimed, and
/// whether it filled every free slot. Its own task because a claim holds a
/// database connection (on SQLite, the one writer) inside its transaction,
/// and apalis polls the backend only while a concurrency slot is free: a
/// claim driven by `poll_next` stalled mid-transaction whenever every slot
/// was busy, and the runs in those slots then waited for that connection to
/// save (a deadlock until the pool's acquire timeout, seen at full load).
/// Aborted when dropped (on close), which rolls an unfinished claim back.
struct Fetch(tokio::task::JoinHandle<(Vec<Run>, bool)>);

impl Drop for Fetch {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Runs this process created and leased to itself in the event's append
/// transaction, handed to its workers in memory (each with the time it was
/// handed over: one that waited longer than its lease is left to a claim).
#[derive(Default)]
pub struct LocalRuns {
    queue: Mutex<VecDeque<(Run, std::time::Instant)>>,
    /// The worker waiting for a run, woken by [`LocalRuns::push`].
    waker: Mutex<Option<Waker>>,
}

/// Runs waiting in memory for a free slot, in every engine of this process
/// (`/metrics` counts them as waiting: in the database they are `running`).
static QUEUED: std::sync::atomic::AtomicI64 = std::sync::atomic::AtomicI64::new(0);

/// How many runs wait in memory for a free slot in this process.
pub fn queued_in_memory() -> i64 {
    QUEUED.load(std::sync::atomic::Ordering::Relaxed).max(0)
}

impl Drop for LocalRuns {
    fn drop(&mut self) {
        let left = self.queue.get_mut().map_or(0, |q| q.len());
        QUEUED.fetch_sub(left as i64, std::sync::atomic::Ordering::Relaxed);
    }
}

impl LocalRuns {
    pub fn push(&self, runs: impl IntoIterator<Item = Run>) {
        let at = std::time::Instant::now();
        let mut queue = self.queue.lock().expect("local runs lock");
        let before = queue.len();
        queue.extend(runs.into_iter().map(|r| (r, at)));
        let added = queue.len() > before;
        QUEUED.fetch_add(
            (queue.len() - before) as i64,
            std::sync::atomic::Ordering::Relaxed,
        );
        drop(queue);
        if added && let Some(w) = self.waker.lock().expect("local runs lock").take() {
            w.wake();
        }
    }

    /// How many runs wait for a slot.
    pub fn len(&self) -> usize {
        self.queue.lock().expect("local runs lock").len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn register(&self, waker: &Waker) {
        let mut slot = self.waker.lock().expect("local runs lock");
        if !slot.as_ref().is_some_and(|w| w.will_wake(waker)) {
            *slot = Some(waker.clone());
        }
    }

    fn pop(&self) -> Option<(Run, std::time::Instant)> {
        let run = self.queue.lock().expect("local runs lock").pop_front();
        if run.is_some() {
            QUEUED.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
        }
        run
    }
}

/// The backend of one apalis worker: claimed runs not yet started, and the fetch in flight.
pub struct RunsBackend {
    engine: Arc<Engine>,
    ready: VecDeque<Run>,
    fetching: Option<Fetch>,
    /// The last claim filled every free slot: claim again at once.
    more: bool,
}

impl RunsBackend {
    pub fn new(engine: Arc<Engine>) -> Self {
        Self {
            engine,
            ready: VecDeque::new(),
            fetching: None,
            // At start-up, claim what is due at once (e.g. runs of a crashed process).
            more: true,
        }
    }

    fn task(run: Run) -> Task<Run> {
        let id = TaskId::from_string(run.run_id.clone());
        TaskBuilder::new(run).task_id(id).build()
    }
}

impl Backend for RunsBackend {
    type Task = Task<Run>;
    type Error = std::convert::Infallible;

    fn poll_ready(
        &mut self,
        _cx: &mut Context<'_>,
        _worker: &WorkerContext,
    ) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn poll_next(
        &mut self,
        cx: &mut Context<'_>,
        _worker: &WorkerContext,
    ) -> Poll<Option<Result<Self::Task, Self::Error>>> {
        // Registered before looking, so a push in between is not missed.
        self.engine.local.register(cx.waker());
        loop {
            if let Some(run) = self.ready.pop_front() {
                return Poll::Ready(Some(Ok(Self::task(run))));
            }
            // Local runs first: leased to this process already, no claim needed.
            while let Some((run, at)) = self.engine.local.pop() {
                if at.elapsed() < LEASE / 2 {
                    return Poll::Ready(Some(Ok(Self::task(run))));
                }
                // Waited too long for a slot: its lease may lapse before it is
                // renewed; a claim takes it (with a new fencing token) instead.
                self.more = true;
            }
            let engine = self.engine.clone();
            let more = self.more;
            let fetch = self
                .fetching
                .get_or_insert_with(|| Fetch(tokio::spawn(fetch(engine, more))));
            match Pin::new(&mut fetch.0).poll(cx) {
                Poll::Ready(joined) => {
                    self.fetching = None;
                    // The fetch never panics (errors are retried inside it); if
                    // it did, claim again at once.
                    let (runs, more) = joined.unwrap_or_default();
                    self.more = more || runs.is_empty();
                    self.ready.extend(runs);
                }
                Poll::Pending => return Poll::Pending,
            }
        }
    }

    fn poll_close(
        &mut self,
        _cx: &mut Context<'_>,
        _worker: &WorkerContext,
    ) -> Poll<Result<(), Self::Error>> {
        // Claimed runs never started keep their lease until the engine hands
        // every lease of this process back, after the monitor returns (past
        // the grace, `poll_close` is not called at all).
        self.fetching = None;
        Poll::Ready(Ok(()))
    }
}

impl BackendConfig for RunsBackend {
    type Args = Run;
    type Id = RandomId;
    type Kind = Ephemeral;
    type Config = ();
    type Layer = Identity;

    fn config(&self) -> &Self::Config {
        &()
    }

    fn middleware(&mut self, _worker: &mut WorkerContext) -> Self::Layer {
        Identity::new()
    }
}

/// Waits until there may be runs to claim, claims up to the free slots (this
/// poll's own slot included: the concurrency limit holds it while the worker
/// waits for a run), and returns them with whether they filled every slot.
/// With `claim_now` false (the last claim left slots free) it first sleeps
/// until woken or until the next run falls due. Never returns empty.
async fn fetch(engine: Arc<Engine>, mut claim_now: bool) -> (Vec<Run>, bool) {
    let mut failing_since: Option<std::time::Instant> = None;
    let mut look_ahead = !claim_now;
    loop {
        let notified = engine.wake.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        let mut wait = POLL;
        if claim_now {
            // Free slots, this poll's own included, less those local runs will take.
            let free = (engine.permits.available_permits() + 1).saturating_sub(engine.local.len());
            if free == 0 {
                return (Vec::new(), true);
            }
            match engine
                .store
                .claim_due(&engine.owner, now(), LEASE, free as u32)
                .await
            {
                Ok(runs) => {
                    if failing_since.take().is_some() {
                        tracing::info!("run queue reachable again");
                    }
                    if !runs.is_empty() {
                        let filled = runs.len() >= free;
                        return (runs, filled);
                    }
                    look_ahead = true;
                }
                Err(e) => {
                    if failing_since.is_none() {
                        tracing::error!(error = %e, "cannot read the run queue; retrying every second");
                        failing_since = Some(std::time::Instant::now());
                    }
                    look_ahead = false;
                }
            }
        }
        // Sleep until the next run falls due (at most POLL), unless woken first.
        if look_ahead && let Ok(Some(next)) = engine.store.next_wakeup().await {
            wait = (next - now()).to_std().unwrap_or(Duration::ZERO).min(POLL);
        }
        look_ahead = false;
        claim_now = true;
        tokio::select! {
            _ = &mut notified => {}
            _ = tokio::time::sleep(wait.max(Duration::from_millis(5))) => {}
        }
    }
}
