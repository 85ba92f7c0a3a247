//! Bulk replays as apalis jobs: an apalis-core [`Backend`] over our own
//! `replays` table. The fetcher leases running replays whose lease is free
//! or lapsed (`claim_replays`: owner, expiry, fencing token; SKIP LOCKED and
//! the database's clock on PostgreSQL) and hands each to the worker, which
//! drives it with [`super::replay::Driver`]. At most [`CONCURRENCY`]
//! replays per process; a semaphore permit travels with each task.
//!
//! The fetcher never yields `None` (that would end the worker for good) nor
//! an error (that would drop every replay in flight): when nothing is
//! claimable it waits for a new replay in this process or the poll interval
//! (lapsed leases of other instances), and it logs and retries database
//! errors. It claims in a task of its own ([`Spawned`]), not inside
//! `poll_next`, as the runs' backend does.
//!
//! The monitor is supervised (task `replays`) and stops gracefully:
//! [`ReplayWorkers::stop`] ends every drive after its page in progress,
//! waits for the monitor within the grace period, then hands the leases back.

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use apalis_core::backend::{Backend, BackendConfig, finalize::Ephemeral};
use apalis_core::layers::Identity;
use apalis_core::monitor::Monitor;
use apalis_core::task::Task;
use apalis_core::task::task_id::RandomId;
use apalis_core::worker::builder::WorkerBuilder;
use apalis_core::worker::context::WorkerContext;
use apalis_core::worker::ext::parallelize::ParallelizeExt;
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore, watch};
use tokio::task::JoinHandle;

use super::replay::{Driver, LEASE, REPLAYS_CREATED};
use super::spawned::Spawned;
use crate::store::EventStore;
use crate::store::runs::Replay;
use crate::supervisor::Supervisor;

/// Replays one process drives at once.
pub const CONCURRENCY: usize = 2;

/// How often idle workers look for replays whose lease lapsed elsewhere
/// (a replay created here or through the API wakes them at once). Each look
/// is a transaction: at 1 s it was most of an idle instance's commits.
pub const POLL: Duration = Duration::from_secs(5);

/// A replay leased to this process, with its concurrency permit.
pub struct LeasedReplay {
    pub replay: Replay,
    _permit: OwnedSemaphorePermit,
}

/// The `replays` table as an apalis backend.
pub struct ReplayBackend {
    store: Arc<dyn EventStore>,
    owner: String,
    permits: Arc<Semaphore>,
    stopping: Arc<AtomicBool>,
    /// The claim in flight, in a task of its own (aborted when dropped).
    claim: Option<Spawned<Vec<LeasedReplay>>>,
    ready: VecDeque<LeasedReplay>,
}

/// Claims up to the free permits' worth of replays; waits (never returns
/// empty) until there is one. Database errors are logged and retried.
async fn claim(
    store: Arc<dyn EventStore>,
    owner: String,
    permits: Arc<Semaphore>,
    stopping: Arc<AtomicBool>,
) -> Vec<LeasedReplay> {
    loop {
        let first = permits
            .clone()
            .acquire_owned()
            .await
            .expect("the semaphore is never closed");
        let created = REPLAYS_CREATED.notified();
        tokio::pin!(created);
        created.as_mut().enable();
        if !stopping.load(Ordering::SeqCst) {
            let free = 1 + permits.available_permits();
            match store
                .claim_replays(&owner, chrono::Utc::now(), LEASE, free as u32)
                .await
            {
                Ok(replays) if !replays.is_empty() => {
                    let mut permit = Some(first);
                    return replays
                        .into_iter()
                        .map(|replay| {
                            tracing::info!(replay_id = %replay.replay_id, mode = %replay.mode, done = replay.done, total = replay.total, "driving replay");
                            let permit = match permit.take() {
                                Some(p) => p,
                                None => permits
                                    .clone()
                                    .try_acquire_owned()
                                    .expect("claimed no more than the free permits"),
                            };
                            LeasedReplay {
                                replay,
                                _permit: permit,
                            }
                        })
                        .collect();
                }
                Ok(_) => {}
                Err(e) => tracing::error!(error = %e, "cannot look for replays to drive; retrying"),
            }
        }
        drop(first);
        tokio::select! {
            _ = &mut created => {}
            _ = tokio::time::sleep(POLL) => {}
        }
    }
}

impl Backend for ReplayBackend {
    type Task = Task<LeasedReplay>;
    type Error = std::io::Error;

    fn poll_ready(
        &mut self,
        _: &mut Context<'_>,
        _: &WorkerContext,
    ) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn poll_next(
        &mut self,
        cx: &mut Context<'_>,
        _: &WorkerContext,
    ) -> Poll<Option<Result<Self::Task, Self::Error>>> {
        loop {
            if let Some(leased) = self.ready.pop_front() {
                return Poll::Ready(Some(Ok(Task::new(leased))));
            }
            let claim = self.claim.get_or_insert_with(|| {
                Spawned::new(claim(
                    self.store.clone(),
                    self.owner.clone(),
                    self.permits.clone(),
                    self.stopping.clone(),
                ))
            });
            match Pin::new(claim).poll(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(claimed) => {
                    self.claim = None;
                    match claimed {
                        Ok(replays) => self.ready.extend(replays),
                        // The claim never panics (errors are retried inside it); if it did, claim again.
                        Err(e) => {
                            tracing::error!(error = %e, "the replay claim ended; claiming again")
                        }
                    }
                }
            }
        }
    }

    fn poll_close(
        &mut self,
        _: &mut Context<'_>,
        _: &WorkerContext,
    ) -> Poll<Result<(), Self::Error>> {
        // A claim that committed after this is handed back by `ReplayWorkers::stop`.
        self.claim = None;
        Poll::Ready(Ok(()))
    }
}

impl BackendConfig for ReplayBackend {
    type Args = LeasedReplay;
    type Id = RandomId;
    type Kind = Ephemeral;
    type Config = ();
    type Layer = Identity;

    fn config(&self) -> &Self::Config {
        &()
    }

    fn middleware(&mut self, _: &mut WorkerContext) -> Self::Layer {
        Identity::new()
    }
}

/// This process's replay workers: run them with [`ReplayWorkers::supervise`],
/// and call [`ReplayWorkers::stop`] when the process stops.
#[derive(Clone)]
pub struct ReplayWorkers {
    driver: Arc<Driver>,
    permits: Arc<Semaphore>,
    /// Set (to the grace period) when shutdown begins.
    stop: Arc<watch::Sender<Option<Duration>>>,
    /// No monitor is running (not started yet, or it returned).
    idle: Arc<watch::Sender<bool>>,
}

impl ReplayWorkers {
    pub fn new(store: Arc<dyn EventStore>, wake: Arc<Notify>) -> Self {
        Self {
            driver: Arc::new(Driver {
                store,
                wake,
                // Unique per process: a restarted process never mistakes an old lease for its own.
                owner: format!("replays-{}", uuid::Uuid::new_v4().simple()),
                stopping: Arc::new(AtomicBool::new(false)),
            }),
            permits: Arc::new(Semaphore::new(CONCURRENCY)),
            stop: Arc::new(watch::Sender::new(None)),
            idle: Arc::new(watch::Sender::new(true)),
        }
    }

    pub fn owner(&self) -> &str {
        &self.driver.owner
    }

    /// Runs the monitor under `supervisor`, as task `replays` (restarted if
    /// it ends before [`ReplayWorkers::stop`]).
    pub fn supervise(&self, supervisor: &Arc<Supervisor>) -> JoinHandle<()> {
        // Running from now on: a stop waits for the monitor even if it has not started yet.
        self.idle.send_replace(false);
        let this = self.clone();
        supervisor.spawn("replays", move || this.spawn())
    }

    /// Runs the replay worker under an apalis [`Monitor`] until
    /// [`ReplayWorkers::stop`]: then the drives in progress end after their
    /// page, within the grace period (past it they are dropped).
    fn spawn(&self) -> JoinHandle<()> {
        let this = self.clone();
        tokio::spawn(async move {
            this.idle.send_replace(false);
            let monitor = this.register(Monitor::new());
            match super::monitor::run_until_stopped(monitor, this.stop.subscribe()).await {
                Ok(()) => tracing::info!("replay workers stopped gracefully"),
                Err(e) => tracing::error!(error = %e, "the replay workers stopped"),
            }
            this.idle.send_replace(true);
        })
    }

    /// Adds the replay worker to `monitor`.
    fn register(&self, monitor: Monitor) -> Monitor {
        let this = self.clone();
        monitor.register(move |_restarts| {
            let backend = ReplayBackend {
                store: this.driver.store.clone(),
                owner: this.driver.owner.clone(),
                permits: this.permits.clone(),
                stopping: this.driver.stopping.clone(),
                claim: None,
                ready: VecDeque::new(),
            };
            let driver = this.driver.clone();
            WorkerBuilder::new(format!("replays-{}", uuid::Uuid::new_v4().simple()))
                .backend(backend)
                .parallelize(Spawned::new)
                .build(move |leased: LeasedReplay| {
                    let driver = driver.clone();
                    async move {
                        driver.drive_supervised(leased.replay).await;
                        Ok::<(), std::io::Error>(())
                    }
                })
        })
    }

    /// Stops driving (after the page in progress), waits for the monitor
    /// (within `grace`), then hands the leases back at once, so another
    /// instance takes the replays over without waiting.
    pub async fn stop(&self, grace: Duration) {
        self.driver.stopping.store(true, Ordering::SeqCst);
        self.stop.send_replace(Some(grace));
        let mut idle = self.idle.subscribe();
        // The monitor returns within the grace (or just after it, when it drops the workers).
        let _ = tokio::time::timeout(grace + Duration::from_secs(2), idle.wait_for(|i| *i)).await;
        // After the monitor returned: no claim or page of this process commits any more.
        match self
            .driver
            .store
            .release_replay_leases(&self.driver.owner, chrono::Utc::now())
            .await
        {
            Ok(0) => {}
            Ok(n) => tracing::info!(replays = n, "replays handed back to other instances"),
            Err(e) => {
                tracing::error!(error = %e, "could not hand back replays; they are taken over when their leases lapse")
            }
        }
    }
}
