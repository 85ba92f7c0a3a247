//! Executing one run under supervision: the run's work in a task of its
//! own with its lease renewed alongside, so renewal ends with the run, a
//! lost lease stops the work before another worker may send the same step,
//! and a panic is caught and recorded as the run's failure (its worker goes
//! on).

use std::sync::Arc;

use super::driver::RunState;
use super::trace::RunTrace;
use super::{Engine, LEASE, RENEW_EVERY};
use crate::store::runs::Run;

impl Engine {
    /// Drives one claimed run. The lease is renewed inside the run's own
    /// future, so renewal ends with the run, a panic included (a panic is
    /// caught and recorded as the run's failure).
    pub(super) async fn execute(self: &Arc<Self>, run: Run) {
        let run_id = run.run_id.clone();
        // (A run resumed from a wait at its first step is not a new start.)
        if run.attempts_total == 0 && run.step_index == 0 && run.wait_reason.is_none() {
            crate::prometheus::run_started(&run.workflow);
        }
        // Boxed: spawning moves the future, and a run's is large.
        let work = {
            let me = self.clone();
            let run = run.clone();
            Box::pin(async move { me.drive(run).await })
        };
        // Renews the lease; ends with `true` when the lease is lost (taken over,
        // or not renewed for nearly a whole lease), so the work stops before
        // another worker may send the same step.
        let renew = async {
            let mut renewed = std::time::Instant::now();
            loop {
                tokio::time::sleep(RENEW_EVERY).await;
                match self
                    .store
                    .renew_lease(&run.run_id, &self.owner, run.lease_token, LEASE)
                    .await
                {
                    Ok(true) => renewed = std::time::Instant::now(),
                    Ok(false) => return true,
                    Err(e) => {
                        tracing::warn!(run_id, error = %e, "could not renew lease");
                        if renewed.elapsed() + RENEW_EVERY >= LEASE {
                            return true;
                        }
                    }
                }
            }
        };
        match supervised(work, renew).await {
            Supervised::Done(Ok(())) => {}
            Supervised::Done(Err(e)) => {
                tracing::error!(run_id, error = %e, "run interrupted by a store error; it resumes when its lease lapses");
            }
            Supervised::Panicked(why) => self.fail_on_panic(&run, why).await,
            Supervised::LeaseLost => {
                tracing::warn!(
                    run_id,
                    "lost the lease on a run; stopped working on it (its new worker goes on, with the same Idempotency-Key)"
                );
            }
        }
    }

    /// Records a panic in the engine as the run's failure (as of its last save).
    async fn fail_on_panic(&self, claimed: &Run, why: String) {
        let run = self
            .store
            .get_run(&claimed.run_id)
            .await
            .ok()
            .flatten()
            .unwrap_or_else(|| claimed.clone());
        let trace = RunTrace::new(&run);
        let state = RunState::from(&run);
        let update = state.failed(format!(
            "the engine failed while running step `{}`: {why}",
            state.step_id.as_deref().unwrap_or("?")
        ));
        match self.save(claimed, None, &update).await {
            Ok(true) => self.finished(&run, &trace, &update),
            Ok(false) => {}
            Err(e) => {
                tracing::error!(run_id = %run.run_id, error = %e, "run panicked ({why}) and its failure could not be stored; it resumes when its lease lapses")
            }
        }
    }
}

/// Runs `work` in a task of its own with `renew` alongside, and returns its
/// output, or the message of its panic. `renew` ends when `work` ends,
/// however it ends; if `renew` finishes first (the lease is lost), `work`
/// goes on alone (its saves are refused by the fencing token).
/// How a run's work under [`supervised`] ended.
enum Supervised<T> {
    Done(T),
    Panicked(String),
    /// The renewal lost the lease: the work was stopped.
    LeaseLost,
}

async fn supervised<T: Send + 'static>(
    work: impl std::future::Future<Output = T> + Send + 'static,
    renew: impl std::future::Future<Output = bool>,
) -> Supervised<T> {
    // Aborted if this future is dropped (the monitor drops runs still going past the grace).
    let mut task = AbortOnDrop(tokio::spawn(work));
    let task = &mut task.0;
    tokio::pin!(renew);
    let mut renewing = true;
    let joined = loop {
        tokio::select! {
            joined = &mut *task => break joined,
            lost = &mut renew, if renewing => {
                renewing = false;
                if lost {
                    task.abort();
                    let _ = (&mut *task).await;
                    return Supervised::LeaseLost;
                }
            }
        }
    };
    match joined {
        Ok(v) => Supervised::Done(v),
        Err(e) => Supervised::Panicked(match e.try_into_panic() {
            Ok(p) => p
                .downcast_ref::<&str>()
                .map(|s| (*s).to_owned())
                .or_else(|| p.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "a panic".into()),
            Err(e) => e.to_string(),
        }),
    }
}

/// Aborts the task when dropped.
struct AbortOnDrop<T>(tokio::task::JoinHandle<T>);

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    #[tokio::test]
    async fn renewal_ends_with_the_run_and_a_panic_is_caught() {
        let renewals = Arc::new(AtomicUsize::new(0));
        let counter = renewals.clone();
        let renew = async move {
            loop {
                counter.fetch_add(1, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(5)).await;
                if counter.load(Ordering::SeqCst) == usize::MAX {
                    return false;
                }
            }
        };
        let work = async {
            tokio::time::sleep(Duration::from_millis(50)).await;
            let _ = crate::engine::after(Duration::MAX);
            panic!("boom in step");
        };
        let outcome: Supervised<()> = supervised(work, renew).await;
        assert!(matches!(&outcome, Supervised::Panicked(why) if why == "boom in step"));
        let seen = renewals.load(Ordering::SeqCst);
        assert!(seen > 1, "renewed while the run worked");
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(
            renewals.load(Ordering::SeqCst),
            seen,
            "renewal outlived the run"
        );
    }

    #[tokio::test]
    async fn a_lost_lease_stops_the_work() {
        let stopped = Arc::new(AtomicUsize::new(0));
        struct Flag(Arc<AtomicUsize>);
        impl Drop for Flag {
            fn drop(&mut self) {
                self.0.fetch_add(1, Ordering::SeqCst);
            }
        }
        let flag = Flag(stopped.clone());
        let work = async move {
            let _flag = flag;
            tokio::time::sleep(Duration::from_secs(30)).await; // an HTTP call in flight
        };
        let renew = async {
            tokio::time::sleep(Duration::from_millis(20)).await;
            true // another worker took the run over
        };
        let outcome = supervised(work, renew).await;
        assert!(matches!(outcome, Supervised::LeaseLost));
        assert_eq!(stopped.load(Ordering::SeqCst), 1, "the work was dropped");
    }
}
