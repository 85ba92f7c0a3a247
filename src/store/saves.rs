//! Run saves waiting for a commit, and how a batch of them is written.
//!
//! The engine's workers send each save (a run's new state, with its
//! attempt) through one queue and wait for the answer. Whoever owns the
//! queue group-commits what is waiting: on PostgreSQL, the engine's save
//! task ([`crate::engine::save`]); on SQLite, where one connection writes
//! everything, the appender, which puts the saves into the transaction of
//! the events it is appending anyway ([`super::EventStore::append_and_save`]),
//! so a burst costs one commit (one fsync) per batch, not two.

use std::sync::Arc;

use chrono::{DateTime, SubsecRound, Utc};
use tokio::sync::{Notify, mpsc, oneshot};

use super::StoreError;
use super::runs::{RunStore, Save, SavedBatch};

/// How long saves that end their runs wait for a delivery to share its
/// commit. Only final saves wait: nothing is waiting for them (the run's
/// request was answered; its slot for a request is free), whereas a run
/// that goes on to its next step waits for its save. A kill -9 within the
/// wait loses the save like any save not yet committed: the attempt is made
/// again with the same Idempotency-Key.
pub const SAVE_LINGER: std::time::Duration = std::time::Duration::from_millis(10);

/// Most saves written in one transaction.
pub const MAX_SAVES: usize = 256;

/// The answer to one save: true if saved, false if its lease was lost.
pub type SaveReply = oneshot::Sender<Result<bool, StoreError>>;

/// One save and where its answer goes.
pub type SaveRequest = (Save, SaveReply);

/// The receiving end of the save queue, shared by the task that owns it
/// and its restarts (a supervised appender).
pub type SaveQueue = Arc<tokio::sync::Mutex<mpsc::Receiver<SaveRequest>>>;

/// A new queue: the sender for the workers, the receiver for its owner.
pub fn queue() -> (mpsc::Sender<SaveRequest>, SaveQueue) {
    let (tx, rx) = mpsc::channel(4 * MAX_SAVES);
    (tx, Arc::new(tokio::sync::Mutex::new(rx)))
}

/// The time a save is written at (microseconds, as both databases keep).
pub fn now() -> DateTime<Utc> {
    Utc::now().trunc_subsecs(6)
}

/// Answers each save of a committed batch, and wakes the workers if it
/// released a run held by order.
pub fn answer(batch: SavedBatch, replies: Vec<SaveReply>, wake: &Notify) {
    if batch.released > 0 {
        wake.notify_one();
    }
    for (reply, saved) in replies.into_iter().zip(batch.saved) {
        let _ = reply.send(Ok(saved));
    }
}

/// Writes `saves` in one transaction of their own and answers them; if that
/// fails, one by one, so that one bad save does not fail its neighbours.
pub async fn write(
    store: &dyn RunStore,
    saves: Vec<Save>,
    mut replies: Vec<SaveReply>,
    wake: &Notify,
) {
    if saves.is_empty() {
        return;
    }
    match store.save_progress_batch(&saves, now()).await {
        Ok(batch) => answer(batch, replies, wake),
        Err(e) if saves.len() == 1 => {
            let _ = replies.pop().expect("one reply").send(Err(e));
        }
        Err(e) => {
            tracing::warn!(error = %e, batch = saves.len(), "batched save failed; saving one by one");
            for (save, reply) in saves.iter().zip(replies) {
                let one = store
                    .save_progress_batch(std::slice::from_ref(save), now())
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
}

/// Takes what is waiting in `rx` (after `first`, if any), up to [`MAX_SAVES`].
pub fn drain(
    rx: &mut mpsc::Receiver<SaveRequest>,
    saves: &mut Vec<Save>,
    replies: &mut Vec<SaveReply>,
) {
    while saves.len() < MAX_SAVES {
        match rx.try_recv() {
            Ok((save, reply)) => {
                saves.push(save);
                replies.push(reply);
            }
            Err(_) => break,
        }
    }
}
