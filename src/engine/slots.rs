//! Request slots: the outbound requests one process's workers may have in
//! flight at once (`SWITCHBOARD_WORKER_CONCURRENCY`). A run holds a slot
//! only while its request is in flight, not while its outcome is saved, so
//! slots turn over at the speed of the requests rather than of the group
//! commits. Runs waiting for a slot are counted (and the oldest's age kept)
//! for `/metrics`, where they count as waiting like the due ones.

use std::collections::BTreeSet;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// Runs waiting for a request slot, in every engine of this process, by
/// when they began to wait (and a number, to tell equal instants apart).
static WAITING: Mutex<BTreeSet<(Instant, u64)>> = Mutex::new(BTreeSet::new());
static NEXT: AtomicU64 = AtomicU64::new(0);

/// Takes a request slot, waiting for one if none is free (then counted as
/// waiting until it has one). `None` only if the semaphore was closed.
pub async fn acquire(slots: &std::sync::Arc<Semaphore>) -> Option<OwnedSemaphorePermit> {
    if let Ok(permit) = slots.clone().try_acquire_owned() {
        return Some(permit);
    }
    let _waiting = Waiting::new();
    slots.clone().acquire_owned().await.ok()
}

/// How many runs wait for a request slot, and since when the oldest has.
pub fn waiting() -> (usize, Option<Instant>) {
    let set = WAITING.lock().expect("slot waiters lock");
    (set.len(), set.first().map(|(at, _)| *at))
}

/// One run waiting for a slot, until dropped (however the wait ends).
struct Waiting((Instant, u64));

impl Waiting {
    fn new() -> Self {
        let key = (Instant::now(), NEXT.fetch_add(1, Ordering::Relaxed));
        WAITING.lock().expect("slot waiters lock").insert(key);
        Self(key)
    }
}

impl Drop for Waiting {
    fn drop(&mut self) {
        WAITING.lock().expect("slot waiters lock").remove(&self.0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[tokio::test]
    async fn a_run_waiting_for_a_slot_is_counted_until_it_has_one() {
        let slots = Arc::new(Semaphore::new(1));
        let first = acquire(&slots).await.expect("a free slot");
        let (before, _) = waiting();
        let s = slots.clone();
        let second = tokio::spawn(async move { acquire(&s).await.is_some() });
        // Until the waiter registers.
        for _ in 0..100 {
            if waiting().0 > before {
                break;
            }
            tokio::task::yield_now().await;
        }
        let (count, oldest) = waiting();
        assert_eq!(count, before + 1, "the second run waits for the slot");
        assert!(oldest.is_some());
        drop(first);
        assert!(second.await.unwrap(), "it got the slot once freed");
        assert_eq!(waiting().0, before, "no longer counted once it has one");
    }
}
