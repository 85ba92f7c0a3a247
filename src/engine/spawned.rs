//! A future driven in a tokio task of its own, aborted when dropped: what an
//! apalis backend's `poll_next` awaits instead of polling a database claim
//! itself. apalis polls a backend only while a concurrency slot is free, so
//! a claim polled inside `poll_next` can stall mid-transaction, holding a
//! connection (on SQLite the one writer) that the tasks in the busy slots
//! need to finish; in a task of its own the claim always completes. Dropping
//! it (the worker closed) aborts the task, which rolls an unfinished claim
//! back. Also what the replay worker's `parallelize` runs each replay in.
//!
//! Used by [`super::replay_backend`]. [`super::backend`]'s `Fetch` is the
//! same thing for runs and could become `Spawned<(Vec<Run>, bool)>`:
//! `Spawned::new(fetch(engine, more))` where it spawns, and
//! `Pin::new(fetch).poll(cx)` where it polls `fetch.0`.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::task::{JoinError, JoinHandle};

/// A spawned future; its output (or how the task ended) when awaited.
pub struct Spawned<T>(JoinHandle<T>);

impl<T: Send + 'static> Spawned<T> {
    pub fn new(f: impl Future<Output = T> + Send + 'static) -> Self {
        Self(tokio::spawn(f))
    }
}

impl<T> Future for Spawned<T> {
    type Output = Result<T, JoinError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        Pin::new(&mut self.0).poll(cx)
    }
}

impl<T> Drop for Spawned<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn it_runs_without_being_polled_and_dropping_it_aborts_it() {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let spawned = Spawned::new(async move {
            let _ = tx.send(());
            std::future::pending::<()>().await;
        });
        // Never polled here, yet it ran.
        rx.await.expect("ran in its own task");
        let handle = spawned.0.abort_handle();
        drop(spawned);
        for _ in 0..100 {
            if handle.is_finished() {
                break;
            }
            tokio::task::yield_now().await;
        }
        assert!(handle.is_finished(), "aborted when dropped");
        assert_eq!(Spawned::new(async { 7 }).await.expect("not aborted"), 7);
    }
}
