//! The apalis-core [`Monitor`] and worker that execute runs: the worker
//! takes runs from [`RunsBackend`] (our leased `runs` table, plus runs this
//! process created and leased to itself), tower's global concurrency limit
//! bounds the runs in flight (the backend claims as many runs as it has
//! free permits, in one statement), and each run is driven by
//! [`Engine::execute`], which renews its lease and catches a panic so a
//! panicking run fails alone and never takes its worker down. The monitor
//! owns the workers' lifecycle: it restarts a worker that ends, and on
//! shutdown lets runs in flight finish within the grace period.

use std::convert::Infallible;
use std::sync::Arc;

use apalis_core::monitor::Monitor;
use apalis_core::task::Task;
use apalis_core::worker::builder::WorkerBuilder;
use tower::limit::GlobalConcurrencyLimitLayer;

use super::Engine;
use super::backend::RunsBackend;
use crate::store::runs::Run;

/// The monitor with this process's one worker (its name is the lease owner, unique per process).
pub(super) fn monitor(engine: Arc<Engine>) -> Monitor {
    Monitor::new()
        .should_restart(|worker, error| {
            tracing::error!(worker = worker.name(), %error, "a worker stopped; restarting it");
            true
        })
        .register(move |_restarts| {
            let run = {
                let engine = engine.clone();
                tower::service_fn(move |task: Task<Run>| {
                    let engine = engine.clone();
                    async move {
                        // Boxed: the run's future is large, and apalis moves the
                        // service's future several times on its way to being polled.
                        Box::pin(engine.execute(task.args)).await;
                        Ok::<(), Infallible>(())
                    }
                })
            };
            WorkerBuilder::new(engine.owner.clone())
                .backend(RunsBackend::new(engine.clone()))
                .layer(GlobalConcurrencyLimitLayer::with_semaphore(
                    engine.permits.clone(),
                ))
                .build(run)
        })
}
