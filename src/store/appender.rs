//! Group commit: one task owns all appends of this process and writes
//! whatever deliveries are waiting as one transaction, so concurrent
//! webhooks share one commit (one fsync) while each is acknowledged only
//! after that commit. Where the store has one writer (SQLite), the
//! workers' run saves wait in the same task and go into the same
//! transaction ([`super::saves`]): a burst's deliveries and saves share
//! commits instead of taking turns at the writer. A save that ends its run
//! waits up to [`super::saves::SAVE_LINGER`] for a delivery to ride with (at the rates
//! users run, the next webhook is a few milliseconds away), so that a
//! one-step run often costs no commit of its own; other saves, and final
//! ones that found no delivery, are written at once, alone.

use std::sync::Arc;

use tokio::sync::{Notify, mpsc, oneshot};

use super::runs::{Save, SavedBatch};
use super::saves::{SaveQueue, SaveReply, SaveRequest};
use super::{AppendOutcome, Dispatcher, EventStore, NewEvent, RunHandoff, StoreError};

/// Most deliveries written in one transaction.
pub const MAX_BATCH: usize = 256;

/// Fewer deliveries go in one transaction when each may start many runs:
/// at most about this many runs per batch, so that one batch (and every
/// webhook waiting behind it) is not held by a large fan-out.
pub const MAX_RUNS_PER_BATCH: usize = 2048;

/// Deliveries per transaction for a dispatcher that starts up to `fan_out` runs per event.
pub fn batch_size(fan_out: usize) -> usize {
    (MAX_RUNS_PER_BATCH / fan_out.max(1)).clamp(1, MAX_BATCH)
}

/// The default of `SWITCHBOARD_APPEND_TIMEOUT`: how long a webhook may wait
/// for its commit (handing the event to the append task, waiting behind the
/// batch before it, its own batch, a one-by-one retry) before it is answered
/// 503, so that a database that hangs, e.g. while PostgreSQL shuts down,
/// cannot hold webhooks until Operator's own timeout.
pub const APPEND_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(2);

/// After a batch failed because the database is unavailable, deliveries are
/// answered 503 without trying for this long; then one batch probes again.
const REFUSE_FOR: std::time::Duration = std::time::Duration::from_secs(1);

type Reply = oneshot::Sender<Result<AppendOutcome, StoreError>>;
type Queue = Arc<tokio::sync::Mutex<mpsc::Receiver<(NewEvent, Reply)>>>;

/// A handle to the append task; cheap to clone.
#[derive(Clone)]
pub struct Appender {
    tx: mpsc::Sender<(NewEvent, Reply)>,
    timeout: std::time::Duration,
}

impl Appender {
    /// Starts the append task on the current runtime, supervised by
    /// `supervisor` as `appender` (restarted if it ever ends; deliveries wait
    /// in the queue meanwhile, each at most `timeout`). Its loop ends when
    /// every handle is dropped. `dispatcher` decides which workflows each new
    /// event starts; runs it creates are leased to `local` (this process's
    /// workers, as many as they have free slots) in the same transaction and
    /// handed to them in memory after the commit; `wake` is notified after a
    /// commit that created runs left for a claim.
    pub fn spawn(
        store: Arc<dyn EventStore>,
        dispatcher: Arc<dyn Dispatcher>,
        local: Option<Arc<dyn RunHandoff>>,
        wake: Arc<Notify>,
        timeout: std::time::Duration,
        supervisor: &Arc<crate::supervisor::Supervisor>,
    ) -> (Self, tokio::task::JoinHandle<()>) {
        let (tx, rx) = mpsc::channel(4 * MAX_BATCH);
        let queue: Queue = Arc::new(tokio::sync::Mutex::new(rx));
        // Where the store has one writer, the workers' saves share the appends' commits.
        let saves = local.as_ref().and_then(|l| l.take_saves());
        let linger = local
            .as_ref()
            .map_or(std::time::Duration::ZERO, |l| l.save_linger());
        let task = supervisor.spawn("appender", move || {
            tokio::spawn(run(
                store.clone(),
                dispatcher.clone(),
                local.clone(),
                wake.clone(),
                queue.clone(),
                (saves.clone(), linger),
                timeout,
            ))
        });
        (Self { tx, timeout }, task)
    }

    /// Appends one delivery; returns once it is durably committed (or refused
    /// as a duplicate), or `Unavailable` once the append timeout has passed,
    /// whatever the store is doing (the delivery may still commit later:
    /// Operator's retry is then recognised as a duplicate).
    pub async fn append(&self, event: NewEvent) -> Result<AppendOutcome, StoreError> {
        let (reply, answer) = oneshot::channel();
        let wait = async {
            self.tx
                .send((event, reply))
                .await
                .map_err(|_| StoreError::Closed)?;
            answer.await.map_err(|_| StoreError::Closed)?
        };
        tokio::time::timeout(self.timeout, wait)
            .await
            .unwrap_or_else(|_| {
                Err(StoreError::Unavailable(format!(
                    "the event was not committed within {} (SWITCHBOARD_APPEND_TIMEOUT)",
                    humantime::format_duration(self.timeout)
                )))
            })
    }
}

/// What woke the append loop.
enum Next {
    Event(NewEvent, Reply),
    Save(SaveRequest),
    /// Every save sender is gone (the engine stopped).
    SavesClosed,
    Closed,
    /// The saves waiting for a delivery waited long enough.
    Lingered,
}

async fn run(
    store: Arc<dyn EventStore>,
    dispatcher: Arc<dyn Dispatcher>,
    local: Option<Arc<dyn RunHandoff>>,
    wake: Arc<Notify>,
    queue: Queue,
    // The workers' saves (SQLite), and how long final ones wait for a delivery.
    (saves, linger): (Option<SaveQueue>, std::time::Duration),
    timeout: std::time::Duration,
) {
    let mut rx = queue.lock_owned().await;
    let mut saves_rx = match saves {
        Some(q) => Some(q.lock_owned().await),
        None => None,
    };
    let mut pending_saves: Vec<Save> = Vec::new();
    let mut save_replies: Vec<SaveReply> = Vec::new();
    let mut events_closed = false;
    let mut events = Vec::with_capacity(MAX_BATCH);
    let mut replies: Vec<Reply> = Vec::with_capacity(MAX_BATCH);
    // While the database is unavailable, deliveries are refused at once for a
    // moment instead of each waiting out a timeout behind the batch before it.
    let mut refuse_until: Option<std::time::Instant> = None;
    let mut last_error = String::new();
    let push = |events: &mut Vec<NewEvent>, replies: &mut Vec<Reply>, event, reply: Reply| {
        // A delivery whose handler has already answered 503 is not written:
        // Operator sends it again.
        if !reply.is_closed() {
            events.push(event);
            replies.push(reply);
        }
    };
    // While saves that end their runs wait for a delivery to ride with: until when.
    let mut linger_until: Option<tokio::time::Instant> = None;
    loop {
        if events_closed && saves_rx.is_none() && pending_saves.is_empty() {
            break;
        }
        // Events first; a save wakes the loop as well, and so does the end of a linger.
        let next = tokio::select! {
            biased;
            event = rx.recv(), if !events_closed => match event {
                Some((event, reply)) => Next::Event(event, reply),
                None => Next::Closed,
            },
            save = async {
                match saves_rx.as_mut() {
                    Some(rx) => rx.recv().await,
                    None => std::future::pending().await,
                }
            } => match save {
                Some(save) => Next::Save(save),
                None => Next::SavesClosed,
            },
            _ = async {
                match linger_until {
                    Some(until) => tokio::time::sleep_until(until).await,
                    None => std::future::pending().await,
                }
            } => Next::Lingered,
        };
        match next {
            Next::Event(event, reply) => push(&mut events, &mut replies, event, reply),
            Next::Save((save, reply)) => {
                pending_saves.push(save);
                save_replies.push(reply);
            }
            Next::SavesClosed => saves_rx = None,
            // No more deliveries; runs finishing within the shutdown grace still save here.
            Next::Closed => events_closed = true,
            Next::Lingered => {}
        }
        // Saves that end their runs, with no delivery to ride with: wait a
        // moment for one (or for a save that cannot wait), then go alone.
        let lingering = !linger.is_zero()
            && !events_closed
            && saves_rx.is_some()
            && events.is_empty()
            && !pending_saves.is_empty()
            && pending_saves.iter().all(|s| s.update.status.is_final());
        if lingering {
            let until = *linger_until.get_or_insert_with(|| tokio::time::Instant::now() + linger);
            if tokio::time::Instant::now() < until {
                continue;
            }
        }
        linger_until = None;
        let max_batch = batch_size(dispatcher.fan_out());
        while !events_closed && events.len() < max_batch {
            match rx.try_recv() {
                Ok((event, reply)) => push(&mut events, &mut replies, event, reply),
                Err(_) => break,
            }
        }
        if let Some(srx) = saves_rx.as_mut() {
            crate::store::saves::drain(srx, &mut pending_saves, &mut save_replies);
        }
        let refusing = refuse_until.is_some_and(|t| std::time::Instant::now() < t);
        if events.is_empty() || refusing {
            // Saves with no events to share a commit with (or while appends are refused) go alone.
            crate::store::saves::write(
                store.as_ref(),
                std::mem::take(&mut pending_saves),
                std::mem::take(&mut save_replies),
                &wake,
            )
            .await;
        }
        if events.is_empty() {
            continue;
        }
        if refusing {
            for reply in replies.drain(..) {
                let _ = reply.send(Err(StoreError::Unavailable(last_error.clone())));
            }
            events.clear();
            continue;
        }
        refuse_until = None;
        let deadline = tokio::time::Instant::now() + timeout;
        let batch = Arc::new(std::mem::take(&mut events));
        let batch_saves = Arc::new(std::mem::take(&mut pending_saves));
        let append = |saves: Option<Arc<Vec<Save>>>| {
            let (store, dispatcher, local, batch) = (&store, &dispatcher, &local, &batch);
            async move {
                append_isolated(
                    store,
                    dispatcher,
                    local,
                    batch,
                    0..batch.len(),
                    saves.as_ref(),
                    deadline,
                )
                .await
                .unwrap_or_else(|_| {
                    // Dropping the transaction rolls it back. If it had in fact committed,
                    // Operator's retry is recognised as a duplicate: nothing is stored twice.
                    Err(StoreError::Unavailable(format!(
                        "the database did not answer within {}",
                        humantime::format_duration(timeout)
                    )))
                })
            }
        };
        let with_saves = !batch_saves.is_empty();
        let mut appended = append(with_saves.then(|| batch_saves.clone())).await;
        // The saves: answered with the batch; if it failed, written alone and
        // the deliveries appended again without them (a bad save must not fail a delivery).
        let replies_for_saves = std::mem::take(&mut save_replies);
        match &mut appended {
            Ok((_, _, saved)) => {
                if let Some(saved) = saved.take() {
                    crate::store::saves::answer(saved, replies_for_saves, &wake);
                }
            }
            Err(e) if with_saves => {
                tracing::warn!(error = %e, "an append with run saves failed; writing them apart");
                let saves = Arc::try_unwrap(batch_saves).unwrap_or_else(|a| (*a).clone());
                crate::store::saves::write(store.as_ref(), saves, replies_for_saves, &wake).await;
                appended = append(None).await;
            }
            Err(_) => {}
        }
        let appended = appended.map(|(outcomes, runs, _)| (outcomes, runs));
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
            Err(err) if batch.len() == 1 => {
                let _ = replies.pop().expect("one reply").send(Err(err));
            }
            Err(err) => {
                // One bad delivery must not fail its neighbours: retry them one by
                // one, within the batch's own deadline (what is left over gets 503
                // and comes back with Operator's retry).
                tracing::warn!(error = %err, batch = batch.len(), "batch append failed; retrying one by one");
                for (i, reply) in replies.drain(..).enumerate() {
                    if reply.is_closed() {
                        continue;
                    }
                    let result = match append_isolated(
                        &store,
                        &dispatcher,
                        &local,
                        &batch,
                        i..i + 1,
                        None,
                        deadline,
                    )
                    .await
                    {
                        Ok(result) => result.map(|(mut o, runs, _)| {
                            if runs > 0 {
                                wake.notify_one();
                            }
                            o.remove(0)
                        }),
                        Err(_) => Err(StoreError::Unavailable(format!(
                            "the one-by-one retry of a failed batch did not finish within {}",
                            humantime::format_duration(timeout)
                        ))),
                    };
                    let _ = reply.send(result);
                }
            }
        }
        events = Arc::try_unwrap(batch).unwrap_or_default();
        events.clear();
    }
}

/// The outcomes of an append, the runs left for a claim, and the saves
/// written in its transaction (if it took any).
type Appended = Result<(Vec<AppendOutcome>, usize, Option<SavedBatch>), StoreError>;

/// Appends `batch[range]` (with `saves`, in one transaction) in a task of its own, so that a panic (in a
/// workflow's evaluation, say) fails these deliveries, not the appender
/// (a one-by-one retry then isolates the delivery that causes it). Aborted
/// (rolled back) at `deadline`.
/// Runs leased to this process's workers are handed to them after the
/// commit; the count returned is of the runs left for a claim (another
/// instance's, or this one's when its workers had no free slot).
async fn append_isolated(
    store: &Arc<dyn EventStore>,
    dispatcher: &Arc<dyn Dispatcher>,
    local: &Option<Arc<dyn RunHandoff>>,
    batch: &Arc<Vec<NewEvent>>,
    range: std::ops::Range<usize>,
    saves: Option<&Arc<Vec<Save>>>,
    deadline: tokio::time::Instant,
) -> Result<Appended, tokio::time::error::Elapsed> {
    let (store, dispatcher, batch) = (store.clone(), dispatcher.clone(), batch.clone());
    let local = local.clone();
    let saves = saves.filter(|s| !s.is_empty()).cloned();
    let mut task = AbortOnDrop(tokio::spawn(async move {
        let lease = local.as_ref().and_then(|l| l.lease());
        let ((outcomes, runs, handed), saved) = match saves {
            Some(saves) => {
                let (appended, saved) = store
                    .append_and_save(
                        &batch[range],
                        dispatcher.as_ref(),
                        lease.as_ref(),
                        &saves,
                        crate::store::saves::now(),
                    )
                    .await?;
                (appended, Some(saved))
            }
            None => (
                store
                    .append_batch_leased(&batch[range], dispatcher.as_ref(), lease.as_ref())
                    .await?,
                None,
            ),
        };
        let claimable = runs; // due now and not handed over (the append counts them)
        // Handed over at once, in this task: an append past its deadline may have committed.
        if let Some(local) = local
            && !handed.is_empty()
        {
            local.hand_over(handed);
        }
        Ok((outcomes, claimable, saved))
    }));
    let joined = tokio::time::timeout_at(deadline, &mut task.0).await?;
    Ok(joined.unwrap_or_else(|e| {
        let why = if e.is_panic() {
            let payload = e.into_panic();
            payload
                .downcast_ref::<&str>()
                .map(|s| (*s).to_owned())
                .or_else(|| payload.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "a panic".to_owned())
        } else {
            "cancelled".to_owned()
        };
        tracing::error!(error = %why, "appending a batch panicked; its deliveries are answered 503");
        Err(StoreError::Internal(format!("appending panicked: {why}")))
    }))
}

/// Aborts the task when dropped (a batch past its deadline is rolled back, not left running).
struct AbortOnDrop<T>(tokio::task::JoinHandle<T>);

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}
