//! The hooks of the run driver, on both databases: a gate asked right
//! before each attempt can hold it (the run goes `waiting` with a reason,
//! releases its lease, records and counts no attempt) and the run goes on
//! when it is due again; a run created by this process is started by its
//! workers (leased in the append transaction, handed over in memory); and a
//! run that panics fails alone while its worker goes on.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use common::sink::Sink;
use common::{TestDb, workflow_dir};
use switchboard::engine::{Engine, Gate, GateAnswer};
use switchboard::store::runs::{Run, RunStatus};
use switchboard::store::{NewEvent, RunHandoff};
use switchboard::workflow::Step;

/// Holds the first attempt for 300 ms, then lets every attempt go.
struct HoldOnce(AtomicUsize);

#[async_trait::async_trait]
impl Gate for HoldOnce {
    async fn check(&self, _run: &Run, _step: &Step) -> GateAnswer {
        if self.0.fetch_add(1, Ordering::SeqCst) == 0 {
            GateAnswer::Hold {
                until: chrono::Utc::now() + chrono::TimeDelta::milliseconds(300),
                reason: "rate_limited".into(),
            }
        } else {
            GateAnswer::Go
        }
    }
}

fn event(id: &str) -> NewEvent {
    common::new_event(
        common::ended_body(id, "conv_gate", "completed"),
        &format!("key-{id}"),
    )
}

/// One workflow posting every `conversation.ended` to the sink's `/ok/crm`,
/// loaded, and the test database's store, migrated.
async fn crm_posting_to(
    sink: &Sink,
    db: &TestDb,
) -> (
    Arc<switchboard::workflow::registry::Registry>,
    Arc<dyn switchboard::store::EventStore>,
) {
    let dir = workflow_dir(&[(
        "crm.yaml",
        &format!(
            "on:\n  event: conversation.ended\nsteps:\n  - id: post\n    http:\n      url: \"{}\"\n      json: {{}}\n",
            sink.url("/ok/crm")
        ),
    )]);
    let (registry, store) = common::registry_and_store(db, dir.path()).await;
    (registry, store)
}

async fn a_held_attempt_waits_without_an_attempt_then_goes(db: &TestDb) {
    let sink = Sink::start().await;
    let (registry, store) = crm_posting_to(&sink, db).await;
    let gate = Arc::new(HoldOnce(AtomicUsize::new(0)));
    let engine = Arc::new(
        Engine::new(
            store.clone(),
            registry.clone(),
            Arc::new(tokio::sync::Notify::new()),
            4,
        )
        .with_gate(gate.clone()),
    );
    let workers = engine.clone().spawn();
    // As the appender does: the run is leased to this engine in the event's transaction.
    let lease = engine.lease().expect("free slots");
    let (_, runs, handed) = store
        .append_batch_leased(&[event("ev_gate")], registry.as_ref(), Some(&lease))
        .await
        .unwrap();
    // One run, handed over: none is left for a claim.
    assert_eq!((runs, handed.len()), (0, 1));
    assert_eq!(handed[0].lease_owner.as_deref(), Some(engine.owner()));
    let run_id = handed[0].run_id.clone();
    engine.hand_over(handed);
    // Held: waiting, with its reason, no lease, no attempt.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    let held = loop {
        let run = store.get_run(&run_id).await.unwrap().unwrap();
        if run.status == RunStatus::Waiting || std::time::Instant::now() > deadline {
            break run;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    assert_eq!(held.status, RunStatus::Waiting, "{held:?}");
    assert_eq!(held.wait_reason.as_deref(), Some("rate_limited"));
    assert_eq!(held.lease_owner, None);
    assert_eq!(held.attempts_total, 0, "a held attempt is not counted");
    assert!(store.attempts(&run_id).await.unwrap().is_empty());
    // Due again: claimed and sent once.
    sink.wait_for("/ok/crm", 1, 5).await;
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    let done = loop {
        let run = store.get_run(&run_id).await.unwrap().unwrap();
        if run.status.is_final() || std::time::Instant::now() > deadline {
            break run;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    assert_eq!(done.status, RunStatus::Succeeded);
    assert_eq!(done.wait_reason, None);
    assert_eq!(done.attempts_total, 1);
    assert_eq!(store.attempts(&run_id).await.unwrap().len(), 1);
    assert_eq!(gate.0.load(Ordering::SeqCst), 2);
    assert_eq!(engine.shutdown(Duration::from_secs(1)).await, 0);
    workers.abort();
}

/// Panics for the run of event `ev_boom`, lets every other attempt go.
struct PanicsOnBoom;

#[async_trait::async_trait]
impl Gate for PanicsOnBoom {
    async fn check(&self, run: &Run, _step: &Step) -> GateAnswer {
        if run.event_id == "ev_boom" {
            panic!("boom in the gate");
        }
        GateAnswer::Go
    }
}

async fn a_panicking_run_fails_alone_and_its_worker_goes_on(db: &TestDb) {
    let sink = Sink::start().await;
    let (registry, store) = crm_posting_to(&sink, db).await;
    // One slot: the run after the panic can only execute if the worker survived it.
    let engine = Arc::new(
        Engine::new(
            store.clone(),
            registry.clone(),
            Arc::new(tokio::sync::Notify::new()),
            1,
        )
        .with_gate(Arc::new(PanicsOnBoom)),
    );
    let workers = engine.clone().spawn();
    let mut ids = Vec::new();
    for ev in ["ev_boom", "ev_fine"] {
        let lease = engine.lease();
        let (_, _, handed) = store
            .append_batch_leased(&[event(ev)], registry.as_ref(), lease.as_ref())
            .await
            .unwrap();
        let listed = store
            .list_runs(&switchboard::store::runs::RunQuery {
                event_id: Some(ev.into()),
                limit: 1,
                ..Default::default()
            })
            .await
            .unwrap();
        ids.push(listed[0].run_id.clone());
        engine.hand_over(handed);
    }
    sink.wait_for("/ok/crm", 1, 10).await;
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let (boom, fine) = loop {
        let boom = store.get_run(&ids[0]).await.unwrap().unwrap();
        let fine = store.get_run(&ids[1]).await.unwrap().unwrap();
        if (boom.status.is_final() && fine.status.is_final())
            || std::time::Instant::now() > deadline
        {
            break (boom, fine);
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    assert_eq!(boom.status, RunStatus::Failed, "{boom:?}");
    assert!(
        boom.last_error
            .as_deref()
            .unwrap_or("")
            .contains("boom in the gate"),
        "{boom:?}"
    );
    assert_eq!(fine.status, RunStatus::Succeeded, "{fine:?}");
    assert_eq!(sink.received().len(), 1);
    engine.shutdown(Duration::from_secs(1)).await;
    workers.abort();
}

on_both_backends!(
    a_held_attempt_waits_without_an_attempt_then_goes,
    a_panicking_run_fails_alone_and_its_worker_goes_on
);
