//! On SQLite a save that ends its run waits a moment (`SAVE_LINGER`) for a
//! delivery to share its commit with, in the appender: at the rates users
//! run, a one-step run then costs no commit of its own. A save after which
//! the run goes on is written at once. Here the appender is the real one on
//! a real SQLite file; the test plays the workers (the handoff), with a long
//! linger so that nothing depends on the machine's speed.

mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{TestDb, workflow_dir};
use switchboard::store::appender::Appender;
use switchboard::store::runs::{Run, RunStatus, RunUpdate, Save};
use switchboard::store::saves::{self, SaveQueue, SaveRequest};
use switchboard::store::{LocalLease, NewEvent, RunHandoff};
use tokio::sync::{mpsc, oneshot};

/// A `conversation.ended` of its own conversation, keyed `key-<id>`.
fn event(id: &str) -> NewEvent {
    let body = common::ended_body(id, &format!("conv_{id}"), "completed");
    common::new_event(body, &format!("key-{id}"))
}

/// The workers, as the appender sees them: runs handed over are kept, and
/// the save queue is the appender's to write.
struct Workers {
    handed: Mutex<Vec<Run>>,
    queue: Mutex<Option<SaveQueue>>,
}

impl RunHandoff for Workers {
    fn lease(&self) -> Option<LocalLease> {
        Some(LocalLease {
            owner: "worker-a".into(),
            lease: Duration::from_secs(60),
            max: 8,
        })
    }
    fn hand_over(&self, runs: Vec<Run>) {
        self.handed.lock().unwrap().extend(runs);
    }
    fn take_saves(&self) -> Option<SaveQueue> {
        self.queue.lock().unwrap().take()
    }
    fn save_linger(&self) -> Duration {
        Duration::from_secs(5)
    }
}

fn save(run: &Run, status: RunStatus) -> Save {
    let now = chrono::Utc::now();
    Save {
        run_id: run.run_id.clone(),
        owner: "worker-a".into(),
        token: run.lease_token,
        attempt: None,
        update: RunUpdate {
            status,
            step_index: if status.is_final() { 1 } else { 0 },
            step_id: None,
            attempt: 0,
            attempts_total: 0,
            next_attempt_at: now,
            lease: (!status.is_final()).then_some(Duration::from_secs(60)),
            step_results: serde_json::json!({}),
            last_error: None,
            finished_at: status.is_final().then_some(now),
            wait_reason: None,
        },
    }
}

async fn send(
    tx: &mpsc::Sender<SaveRequest>,
    s: Save,
) -> oneshot::Receiver<Result<bool, switchboard::store::StoreError>> {
    let (reply, answer) = oneshot::channel();
    tx.send((s, reply)).await.unwrap();
    answer
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_final_save_waits_for_a_delivery_to_share_its_commit() {
    let db = TestDb::sqlite().await;
    let dir = workflow_dir(&[(
        "crm.yaml",
        "on:\n  event: conversation.ended\nsteps:\n  - id: post\n    http:\n      url: \"http://127.0.0.1:9/never\"\n      json: {}\n",
    )]);
    let (registry, store) = common::registry_and_store(&db, dir.path()).await;
    let (tx, queue) = saves::queue();
    let workers = Arc::new(Workers {
        handed: Mutex::new(Vec::new()),
        queue: Mutex::new(Some(queue)),
    });
    let supervisor = switchboard::supervisor::Supervisor::new();
    let (appender, _task) = Appender::spawn(
        store.clone(),
        registry.clone(),
        Some(workers.clone()),
        Arc::new(tokio::sync::Notify::new()),
        Duration::from_secs(30),
        &supervisor,
    );
    appender.append(event("ev_a")).await.unwrap();
    appender.append(event("ev_b")).await.unwrap();
    let handed = workers.handed.lock().unwrap().clone();
    assert_eq!(handed.len(), 2, "both runs handed to the workers");

    // A final save with no delivery to ride with waits (the linger here is 5 s)...
    let before = switchboard::store::sqlite::commits();
    let mut answer = send(&tx, save(&handed[0], RunStatus::Succeeded)).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        answer.try_recv().is_err(),
        "the final save is not written before a delivery comes (or the linger ends)"
    );
    assert_eq!(
        switchboard::store::sqlite::commits(),
        before,
        "no commit yet"
    );
    // ...and the next delivery takes it along: one commit for both.
    appender.append(event("ev_c")).await.unwrap();
    assert!(answer.await.unwrap().unwrap(), "saved with ev_c");
    assert_eq!(
        switchboard::store::sqlite::commits() - before,
        1,
        "the delivery and the save share one commit"
    );
    let done = store.get_run(&handed[0].run_id).await.unwrap().unwrap();
    assert_eq!(done.status, RunStatus::Succeeded);

    // A save after which the run goes on is written at once, alone.
    let before = switchboard::store::sqlite::commits();
    let answer = send(&tx, save(&handed[1], RunStatus::Running)).await;
    let saved = tokio::time::timeout(Duration::from_secs(4), answer)
        .await
        .expect("written without waiting out the 5 s linger");
    assert!(saved.unwrap().unwrap());
    assert_eq!(switchboard::store::sqlite::commits() - before, 1);
}
