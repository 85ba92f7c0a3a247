//! Runs an apalis-core [`Monitor`] until a stop is asked for, the same way
//! for the runs' workers and the replay workers: the stop is a grace period
//! sent on a watch channel; the monitor then stops its workers' polling and
//! lets the tasks in flight finish within the grace; past it the workers
//! (and their tasks) are dropped.

use std::time::Duration;

use apalis_core::monitor::{Monitor, MonitorError};
use tokio::sync::watch;

/// Runs `monitor` until `stop` holds a grace period, then at most that long.
pub(crate) async fn run_until_stopped(
    monitor: Monitor,
    mut stop: watch::Receiver<Option<Duration>>,
) -> Result<(), MonitorError> {
    let mut grace = stop.clone();
    let signal = async move {
        let _ = stop.wait_for(Option::is_some).await;
        Ok(())
    };
    // Starts after the signal: past it, the workers (and their tasks) are dropped.
    let terminator = async move {
        let grace = grace
            .wait_for(Option::is_some)
            .await
            .ok()
            .and_then(|g| *g)
            .unwrap_or_default();
        tokio::time::sleep(grace).await;
    };
    monitor
        .with_terminator(terminator)
        .run_with_signal(signal)
        .await
}
