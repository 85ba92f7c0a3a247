//! Batched saves: one task writes every run save that is waiting as one
//! transaction (one commit), the way the appender group-commits events, so
//! concurrent runs share a commit while each run goes on only after its own
//! save is durable (or refused by the fencing token). A one-step run that
//! succeeds at its first attempt costs exactly this one save: its attempt
//! record and its final state, together.

use std::sync::Arc;

use tokio::sync::{mpsc, oneshot};

use crate::store::StoreError;
use tokio::sync::Notify;

use crate::store::runs::{RunStore, Save};

/// Most saves written in one transaction.
const MAX_BATCH: usize = 256;

type Reply = oneshot::Sender<Result<bool, StoreError>>;

/// A handle to the save task; its loop ends when every handle is dropped.
#[derive(Clone)]
pub struct Saver {
    tx: mpsc::Sender<(Save, Reply)>,
}

impl Saver {
    /// Starts the save task on the current runtime; `wake` wakes this
    /// process's workers when a run that ended released one held by order.
    pub fn spawn(store: Arc<dyn RunStore>, wake: Arc<Notify>) -> Self {
        let (tx, rx) = mpsc::channel(4 * MAX_BATCH);
        tokio::spawn(run(store, rx, wake));
        Self { tx }
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

async fn run(store: Arc<dyn RunStore>, mut rx: mpsc::Receiver<(Save, Reply)>, wake: Arc<Notify>) {
    let mut saves = Vec::with_capacity(MAX_BATCH);
    let mut replies: Vec<Reply> = Vec::with_capacity(MAX_BATCH);
    while let Some((save, reply)) = rx.recv().await {
        saves.push(save);
        replies.push(reply);
        while saves.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok((save, reply)) => {
                    saves.push(save);
                    replies.push(reply);
                }
                Err(_) => break,
            }
        }
        match store.save_progress_batch(&saves, super::now()).await {
            Ok(batch) => {
                if batch.released > 0 {
                    wake.notify_one();
                }
                for (reply, saved) in replies.drain(..).zip(batch.saved) {
                    let _ = reply.send(Ok(saved));
                }
            }
            Err(e) if saves.len() == 1 => {
                let _ = replies.pop().expect("one reply").send(Err(e));
            }
            Err(e) => {
                // One bad save must not fail its neighbours: one by one.
                tracing::warn!(error = %e, batch = saves.len(), "batched save failed; saving one by one");
                for (save, reply) in saves.iter().zip(replies.drain(..)) {
                    let one = store
                        .save_progress_batch(std::slice::from_ref(save), super::now())
                        .await
                        .map(|b| {
                            if b.released > 0 {
                                wake.notify_one();
                            }
                            b.saved[0]
                        });
                    let _ = reply.send(one);
                }
            }
        }
        saves.clear();
    }
}
