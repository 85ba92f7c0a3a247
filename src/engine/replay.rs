//! Bulk replays: work through the events a filter selects, oldest first,
//! creating replay runs; progress and the position reached are saved after
//! every page, so a replay resumes after a restart and can be cancelled.

use std::sync::Arc;

use chrono::Utc;
use serde::{Deserialize, Serialize};
use tokio::sync::Notify;

use crate::store::runs::Replay;
use crate::store::{EventQuery, EventStore, Order, StoreError};

/// What a bulk replay selects.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ReplayFilter {
    pub event_type: Option<String>,
    pub received_after: Option<chrono::DateTime<Utc>>,
    pub received_before: Option<chrono::DateTime<Utc>>,
    /// Only runs of these workflows.
    pub workflows: Option<Vec<String>>,
    /// Only events whose (original) runs failed.
    #[serde(default)]
    pub only_failed: bool,
}

impl ReplayFilter {
    fn query(&self, after_seq: i64, limit: u32) -> EventQuery {
        EventQuery {
            event_type: self.event_type.clone(),
            received_after: self.received_after,
            received_before: self.received_before,
            cursor: Some(after_seq),
            order: Order::OldestFirst,
            limit,
            ..Default::default()
        }
    }
}

/// Starts a bulk replay: counts what it selects, saves it, works through it in the background.
pub async fn start(
    store: Arc<dyn EventStore>,
    wake: Arc<Notify>,
    filter: ReplayFilter,
) -> Result<Replay, StoreError> {
    let total = store.count_events(&filter.query(0, 1)).await?;
    let replay = Replay {
        replay_id: format!("rpl_{}", uuid::Uuid::new_v4().simple()),
        filter: sqlx::types::Json(serde_json::to_value(&filter).unwrap_or_default()),
        status: "running".into(),
        total,
        done: 0,
        runs_created: 0,
        skipped: 0,
        failed: 0,
        cursor_seq: 0,
        created_at: Utc::now(),
        finished_at: None,
    };
    store.create_replay(&replay).await?;
    spawn(store, wake, replay.clone());
    Ok(replay)
}

/// Resumes the replays a previous process left running.
pub async fn resume_all(store: Arc<dyn EventStore>, wake: Arc<Notify>) -> Result<(), StoreError> {
    for replay in store.running_replays().await? {
        tracing::info!(replay_id = %replay.replay_id, done = replay.done, total = replay.total, "resuming replay");
        spawn(store.clone(), wake.clone(), replay);
    }
    Ok(())
}

/// Drives one replay, supervised: if its work fails (the database is away)
/// or panics, the error is logged and it starts again from its last saved
/// position after a pause (1 s, doubling to 30 s), for as long as the replay
/// is still running in the store.
fn spawn(store: Arc<dyn EventStore>, wake: Arc<Notify>, replay: Replay) {
    tokio::spawn(async move {
        let id = replay.replay_id.clone();
        let mut replay = Some(replay);
        let mut pause = std::time::Duration::from_secs(1);
        loop {
            let current = match replay.take() {
                Some(r) => r,
                None => match store.get_replay(&id).await {
                    Ok(Some(r)) if r.status == "running" => r,
                    Ok(_) => return, // finished or cancelled meanwhile
                    Err(e) => {
                        tracing::error!(replay_id = %id, error = %e, "replay interrupted; retrying in {}", humantime::format_duration(pause));
                        tokio::time::sleep(pause).await;
                        pause = (pause * 2).min(std::time::Duration::from_secs(30));
                        continue;
                    }
                },
            };
            let (s, w) = (store.clone(), wake.clone());
            let task = tokio::spawn(async move { work(s.as_ref(), &w, current).await });
            let error = match task.await {
                Ok(Ok(())) => return,
                Ok(Err(e)) => e.to_string(),
                Err(e) if e.is_panic() => "the replay task panicked".to_owned(),
                Err(_) => return, // aborted: the process is stopping
            };
            tracing::error!(replay_id = %id, error = %error, "replay interrupted; resuming from its last saved position in {}", humantime::format_duration(pause));
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(std::time::Duration::from_secs(30));
        }
    });
}

async fn work(store: &dyn EventStore, wake: &Notify, mut replay: Replay) -> Result<(), StoreError> {
    let filter: ReplayFilter = serde_json::from_value(replay.filter.0.clone()).unwrap_or_default();
    loop {
        let page = store
            .list_events(&filter.query(replay.cursor_seq, 100))
            .await?;
        if page.is_empty() {
            replay.status = "succeeded".into();
            replay.finished_at = Some(Utc::now());
            store.save_replay(&replay).await?;
            tracing::info!(replay_id = %replay.replay_id, runs = replay.runs_created, "replay finished");
            return Ok(());
        }
        for event in &page {
            match store
                .replay_event(
                    &event.event_id,
                    filter.workflows.as_deref(),
                    filter.only_failed,
                    Utc::now(),
                )
                .await
            {
                Ok(outcomes) => {
                    let created = outcomes.iter().filter(|o| o.new_run_id.is_some()).count() as i64;
                    replay.runs_created += created;
                    if created == 0 {
                        replay.skipped += 1;
                    }
                }
                Err(e) => {
                    tracing::warn!(event_id = %event.event_id, error = %e, "could not replay event");
                    replay.failed += 1;
                }
            }
            replay.done += 1;
            replay.cursor_seq = event.seq;
        }
        wake.notify_one();
        if !store.save_replay(&replay).await? {
            tracing::info!(replay_id = %replay.replay_id, "replay cancelled");
            return Ok(());
        }
    }
}
