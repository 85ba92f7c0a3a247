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

use crate::store::StoreError;
use crate::store::runs::{RunStore, Save};
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
