//! Batched saves: one task writes every run save that is waiting as one
//! transaction (one commit), the way the appender group-commits events, so
//! concurrent runs share a commit while each run goes on only after its own
//! save is durable (or refused by the fencing token). A one-step run that
//! succeeds at its first attempt costs exactly this one save: its attempt
//! record and its final state, together.
//!
//! On SQLite the appender owns the queue instead and writes the saves in
//! its own transactions ([`crate::store::saves`]); this task runs only when
//! nothing else took the queue (PostgreSQL, or `switchboard worker`).

use std::sync::{Arc, Mutex};

use tokio::sync::{Notify, mpsc, oneshot};

use super::driver::RunState;
use super::http::ErrorClass;
use super::{Engine, SAVE_RETRY_DELAY, SAVE_TRIES};
use crate::store::StoreError;
use crate::store::runs::{Attempt, Run, RunStore, RunUpdate, Save};
use crate::store::saves::{self, SaveQueue, SaveRequest};

/// A handle to the save queue.
pub struct Saver {
    tx: mpsc::Sender<SaveRequest>,
    /// The queue's receiving end until its owner takes it.
    queue: Mutex<Option<SaveQueue>>,
}

impl Default for Saver {
    fn default() -> Self {
        Self::new()
    }
}

impl Saver {
    /// A queue nobody writes yet: the appender takes it ([`Saver::take`]), or
    /// [`Saver::start`] starts the save task on it.
    pub fn new() -> Self {
        let (tx, queue) = saves::queue();
        Self {
            tx,
            queue: Mutex::new(Some(queue)),
        }
    }

    /// Hands the queue to another writer (the appender, on SQLite).
    pub fn take(&self) -> Option<SaveQueue> {
        self.queue.lock().expect("saver lock").take()
    }

    /// Starts the save task on the current runtime, unless another writer
    /// took the queue; `wake` wakes this process's workers when a run that
    /// ended released one held by order.
    pub fn start(&self, store: Arc<dyn RunStore>, wake: Arc<Notify>) {
        if let Some(queue) = self.take() {
            tokio::spawn(run(store, queue, wake));
        }
    }

    /// Saves once committed: true if saved, false if the lease was lost.
    pub async fn save(&self, save: Save) -> Result<bool, StoreError> {
        let (reply, answer) = oneshot::channel();
        self.tx
            .send((save, reply))
            .await
            .map_err(|_| StoreError::Closed)?;
        answer.await.map_err(|_| StoreError::Closed)?
    }
}

async fn run(store: Arc<dyn RunStore>, queue: SaveQueue, wake: Arc<Notify>) {
    let mut rx = queue.lock_owned().await;
    while let Some((save, reply)) = rx.recv().await {
        let (mut batch, mut replies) = (vec![save], vec![reply]);
        saves::drain(&mut rx, &mut batch, &mut replies);
        saves::write(store.as_ref(), batch, replies, &wake).await;
    }
}

/// A run's saves, through the queue, retried a few times.
impl Engine {
    /// Saves progress; false when the lease was lost (another claim has the run).
    pub(super) async fn save(
        &self,
        run: &Run,
        attempt: Option<&Attempt>,
        update: &RunUpdate,
    ) -> Result<bool, crate::store::StoreError> {
        let mut tries = 0;
        let saved = loop {
            tries += 1;
            let save = crate::store::runs::Save {
                run_id: run.run_id.clone(),
                owner: self.owner.clone(),
                token: run.lease_token,
                attempt: attempt.cloned(),
                update: update.clone(),
            };
            match self.saver.save(save).await {
                Ok(saved) => break saved,
                Err(e) if tries < SAVE_TRIES => {
                    tracing::warn!(run_id = %run.run_id, error = %e, tries, "could not save a run's progress; trying again");
                    tokio::time::sleep(SAVE_RETRY_DELAY * tries).await;
                }
                Err(e) => return Err(e),
            }
        };
        if !saved {
            tracing::warn!(run_id = %run.run_id, "lost the lease on a run; leaving it to its new worker");
        }
        Ok(saved)
    }

    /// Saves an attempt and its outcome. If that keeps failing, the attempt is
    /// recorded as a failure of class `store` (without the response that
    /// could not be stored) and the run fails: a request is never sent again
    /// only because its outcome could not be written. Returns the update
    /// that was saved, or `None` when the lease was lost.
    pub(super) async fn save_attempt(
        &self,
        run: &Run,
        before: &RunState,
        mut attempt: Attempt,
        update: RunUpdate,
    ) -> Result<Option<(Attempt, RunUpdate)>, crate::store::StoreError> {
        let e = match self.save(run, Some(&attempt), &update).await {
            Ok(true) => return Ok(Some((attempt, update))),
            Ok(false) => return Ok(None),
            Err(e) => e,
        };
        let why = format!(
            "the outcome of the attempt could not be stored ({e}); the request is not sent again"
        );
        tracing::error!(run_id = %run.run_id, step = %attempt.step_id, "{why}");
        attempt.outcome = "failed".into();
        attempt.error_class = Some(ErrorClass::Store.as_str().into());
        attempt.error_message = Some(why.clone());
        attempt.response_headers = None;
        attempt.response_body = None;
        attempt.next_delay_ms = None;
        let mut state = before.clone();
        state.attempt = attempt.attempt;
        state.attempts_total = attempt.number;
        let update = state.failed(format!("step `{}`: {why}", attempt.step_id));
        Ok(self
            .save(run, Some(&attempt), &update)
            .await?
            .then_some((attempt, update)))
    }
}
