//! Keeps the background tasks the process needs (the appender, the workers,
//! the replay workers, PostgreSQL LISTEN, the `/metrics` listener) running: a task that ends
//! when it should not (it panicked, returned, or was aborted) is logged as
//! an error and started again after a short, growing pause; while it is
//! down, `/readyz` answers 503 naming it.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::task::{AbortHandle, JoinHandle};

/// The first pause before a restart; it doubles up to [`MAX_PAUSE`].
const FIRST_PAUSE: Duration = Duration::from_secs(1);
const MAX_PAUSE: Duration = Duration::from_secs(30);
/// A task that ran this long before ending restarts after [`FIRST_PAUSE`] again.
const HEALTHY_FOR: Duration = Duration::from_secs(60);

#[derive(Default)]
struct TaskState {
    /// Why it is down, while it is.
    down: Option<String>,
    restarts: u64,
    current: Option<AbortHandle>,
}

/// The supervised tasks of one process and their state.
#[derive(Default)]
pub struct Supervisor {
    tasks: Mutex<BTreeMap<&'static str, TaskState>>,
    stopping: AtomicBool,
}

/// A task that is down, as `/readyz` reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DownTask {
    pub name: &'static str,
    pub reason: String,
}

impl Supervisor {
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// Runs `start()`'s task under supervision; `start` is called again for
    /// every restart. The returned handle is the supervision loop: aborting
    /// (or dropping it via `AbortOnDrop`) also aborts the current task.
    pub fn spawn<F>(self: &Arc<Self>, name: &'static str, mut start: F) -> JoinHandle<()>
    where
        F: FnMut() -> JoinHandle<()> + Send + 'static,
    {
        let me = self.clone();
        me.tasks
            .lock()
            .expect("supervisor lock")
            .entry(name)
            .or_default();
        tokio::spawn(async move {
            let mut pause = FIRST_PAUSE;
            loop {
                let task = AbortOnDrop(start());
                let started = Instant::now();
                me.set(name, |s| {
                    s.down = None;
                    s.current = Some(task.0.abort_handle());
                });
                let mut task = task;
                let ended = (&mut task.0).await;
                if me.stopping.load(Ordering::SeqCst) {
                    return;
                }
                let reason = match ended {
                    Ok(()) => "it returned".to_owned(),
                    Err(e) if e.is_panic() => {
                        let payload = e.into_panic();
                        let message = payload
                            .downcast_ref::<&str>()
                            .map(|s| (*s).to_owned())
                            .or_else(|| payload.downcast_ref::<String>().cloned())
                            .unwrap_or_else(|| "a panic".to_owned());
                        format!("it panicked: {message}")
                    }
                    Err(_) => "it was aborted".to_owned(),
                };
                if started.elapsed() >= HEALTHY_FOR {
                    pause = FIRST_PAUSE;
                }
                let restarts = me.set(name, |s| {
                    s.down = Some(reason.clone());
                    s.current = None;
                    s.restarts += 1;
                    s.restarts
                });
                tracing::error!(
                    task = name,
                    restarts,
                    "background task `{name}` stopped ({reason}); restarting it in {}",
                    humantime::format_duration(pause)
                );
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(MAX_PAUSE);
            }
        })
    }

    fn set<T>(&self, name: &'static str, f: impl FnOnce(&mut TaskState) -> T) -> T {
        f(self
            .tasks
            .lock()
            .expect("supervisor lock")
            .entry(name)
            .or_default())
    }

    /// The tasks that are down now, by name.
    pub fn down(&self) -> Vec<DownTask> {
        self.tasks
            .lock()
            .expect("supervisor lock")
            .iter()
            .filter_map(|(name, s)| {
                s.down.as_ref().map(|reason| DownTask {
                    name,
                    reason: reason.clone(),
                })
            })
            .collect()
    }

    /// How many times a task was restarted.
    pub fn restarts(&self, name: &str) -> u64 {
        self.tasks
            .lock()
            .expect("supervisor lock")
            .get(name)
            .map_or(0, |s| s.restarts)
    }

    /// The process is shutting down: tasks that end now are not restarted.
    pub fn stop(&self) {
        self.stopping.store(true, Ordering::SeqCst);
    }

    /// Aborts a task's current instance, as a crash would end it (for fault
    /// tests). Returns false if no such task is running.
    #[doc(hidden)]
    pub fn abort(&self, name: &str) -> bool {
        match self
            .tasks
            .lock()
            .expect("supervisor lock")
            .get(name)
            .and_then(|s| s.current.clone())
        {
            Some(handle) => {
                handle.abort();
                true
            }
            None => false,
        }
    }
}

/// Aborts the task when dropped (so aborting the supervision loop stops it too).
struct AbortOnDrop(JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn restarts_a_task_that_panics_and_reports_it_down_meanwhile() {
        let supervisor = Supervisor::new();
        let starts = Arc::new(std::sync::atomic::AtomicU32::new(0));
        let counted = starts.clone();
        let _loop = supervisor.spawn("flaky", move || {
            let n = counted.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(async move {
                if n == 0 {
                    panic!("boom");
                }
                std::future::pending::<()>().await;
            })
        });
        tokio::time::sleep(Duration::from_millis(100)).await;
        let down = supervisor.down();
        assert_eq!(down.len(), 1, "{down:?}");
        assert_eq!(down[0].name, "flaky");
        assert!(down[0].reason.contains("boom"), "{down:?}");
        tokio::time::sleep(FIRST_PAUSE + Duration::from_millis(300)).await;
        assert!(supervisor.down().is_empty());
        assert_eq!(starts.load(Ordering::SeqCst), 2);
        assert_eq!(supervisor.restarts("flaky"), 1);
        // Once stopping, an ending task stays down and is not restarted.
        supervisor.stop();
        assert!(supervisor.abort("flaky"));
        tokio::time::sleep(FIRST_PAUSE * 3).await;
        assert_eq!(starts.load(Ordering::SeqCst), 2);
    }
}
