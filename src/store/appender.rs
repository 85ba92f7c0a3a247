//! Group commit: one task owns all appends of this process and writes
//! whatever deliveries are waiting as one transaction, so concurrent
//! webhooks share one commit (one fsync) while each is acknowledged only
//! after that commit.

use std::sync::Arc;

use tokio::sync::{Notify, mpsc, oneshot};

use super::{AppendOutcome, Dispatcher, EventStore, NewEvent, StoreError};

/// Most deliveries written in one transaction.
pub const MAX_BATCH: usize = 256;

/// How long one batch may take before its deliveries get 503 (so that a
/// database that hangs, e.g. while PostgreSQL shuts down, cannot hold
/// webhooks until Operator's own timeout).
pub const APPEND_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(2);

/// After a batch failed because the database is unavailable, deliveries are
/// answered 503 without trying for this long; then one batch probes again.
/// A delivery thus waits at most about [`APPEND_TIMEOUT`] for its 503.
const REFUSE_FOR: std::time::Duration = std::time::Duration::from_secs(1);

type Reply = oneshot::Sender<Result<AppendOutcome, StoreError>>;

/// A handle to the append task; cheap to clone.
#[derive(Clone)]
pub struct Appender {
    tx: mpsc::Sender<(NewEvent, Reply)>,
}

impl Appender {
    /// Starts the append task on the current runtime. It ends when every handle is dropped.
    /// `dispatcher` decides which workflows each new event starts; `wake` is notified
    /// after a commit that created runs, so workers pick them up at once.
    pub fn spawn(
        store: Arc<dyn EventStore>,
        dispatcher: Arc<dyn Dispatcher>,
        wake: Arc<Notify>,
    ) -> Self {
        let (tx, rx) = mpsc::channel(4 * MAX_BATCH);
        tokio::spawn(run(store, dispatcher, wake, rx));
        Self { tx }
    }

    /// Appends one delivery; returns once it is durably committed (or refused as a duplicate).
    pub async fn append(&self, event: NewEvent) -> Result<AppendOutcome, StoreError> {
        let (reply, answer) = oneshot::channel();
        self.tx
            .send((event, reply))
            .await
            .map_err(|_| StoreError::Closed)?;
        answer.await.map_err(|_| StoreError::Closed)?
    }
}

async fn run(
    store: Arc<dyn EventStore>,
    dispatcher: Arc<dyn Dispatcher>,
    wake: Arc<Notify>,
    mut rx: mpsc::Receiver<(NewEvent, Reply)>,
) {
    let mut events = Vec::with_capacity(MAX_BATCH);
    let mut replies = Vec::with_capacity(MAX_BATCH);
    // While the database is unavailable, deliveries are refused at once for a
    // moment instead of each waiting out a timeout behind the batch before it.
    let mut refuse_until: Option<std::time::Instant> = None;
    let mut last_error = String::new();
    while let Some((event, reply)) = rx.recv().await {
        events.push(event);
        replies.push(reply);
        while events.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok((event, reply)) => {
                    events.push(event);
                    replies.push(reply);
                }
                Err(_) => break,
            }
        }
        if refuse_until.is_some_and(|t| std::time::Instant::now() < t) {
            for reply in replies.drain(..) {
                let _ = reply.send(Err(StoreError::Unavailable(last_error.clone())));
            }
            events.clear();
            continue;
        }
        refuse_until = None;
        let appended = tokio::time::timeout(
            APPEND_TIMEOUT,
            store.append_batch(&events, dispatcher.as_ref()),
        )
        .await
        .unwrap_or_else(|_| {
            // Dropping the transaction rolls it back. If it had in fact committed,
            // Operator's retry is recognised as a duplicate: nothing is stored twice.
            Err(StoreError::Unavailable(format!(
                "the database did not answer within {APPEND_TIMEOUT:?}"
            )))
        });
        match appended {
            Ok((outcomes, runs)) => {
                if runs > 0 {
                    wake.notify_one();
                }
                for (reply, outcome) in replies.drain(..).zip(outcomes) {
                    let _ = reply.send(Ok(outcome));
                }
            }
            Err(err) if err.is_unavailable() => {
                // The database is down or full: one by one would fail the same way, only slower.
                let message = match err {
                    StoreError::Unavailable(m) => m,
                    other => other.to_string(),
                };
                refuse_until = Some(std::time::Instant::now() + REFUSE_FOR);
                last_error.clone_from(&message);
                for reply in replies.drain(..) {
                    let _ = reply.send(Err(StoreError::Unavailable(message.clone())));
                }
            }
            Err(err) if events.len() == 1 => {
                let _ = replies.pop().expect("one reply").send(Err(err));
            }
            Err(err) => {
                // One bad delivery must not fail its neighbours: retry them one by one.
                tracing::warn!(error = %err, batch = events.len(), "batch append failed; retrying one by one");
                for (event, reply) in events.iter().zip(replies.drain(..)) {
                    let result = store
                        .append_batch(std::slice::from_ref(event), dispatcher.as_ref())
                        .await
                        .map(|(mut o, runs)| {
                            if runs > 0 {
                                wake.notify_one();
                            }
                            o.remove(0)
                        });
                    let _ = reply.send(result);
                }
            }
        }
        events.clear();
    }
}
