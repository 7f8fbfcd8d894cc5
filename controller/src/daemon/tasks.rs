//! The controller's long-running tasks, owned: the TLS server loop and the spec Steward run in
//! one [`JoinSet`], so one that ends (returns or panics) is noticed instead of leaving a
//! process that is up but no longer serves or publishes. Before `stop`, any task ending is
//! unexpected: [`Tasks::ended`] turns it into a [`TaskEnded`] error that `fleet serve` prints as
//! its one line before exiting non-zero (docs/architecture-daemon.md, "Who owns which task").

use std::collections::HashMap;
use std::future::Future;
use std::time::Duration;

use tokio::task::{Id, JoinSet};

/// A task of the controller ended while it was meant to run.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "the controller's {task} {how}, so the controller stopped; see the log above and restart \
     `fleet serve`"
)]
pub struct TaskEnded {
    /// The task's name, as given to [`Tasks::spawn`].
    pub task: &'static str,
    /// "ended" (it returned) or "panicked".
    pub how: &'static str,
}

/// The set of named long-running tasks.
#[derive(Default)]
pub(super) struct Tasks {
    set: JoinSet<()>,
    names: HashMap<Id, &'static str>,
}

impl Tasks {
    /// Spawns `task` under `name` (how it is called if it ends).
    pub(super) fn spawn(
        &mut self,
        name: &'static str,
        task: impl Future<Output = ()> + Send + 'static,
    ) {
        let handle = self.set.spawn(task);
        self.names.insert(handle.id(), name);
    }

    /// Resolves when one of the tasks ends, with what ended and how. Never resolves while they
    /// all run, nor when there is none.
    pub(super) async fn ended(&mut self) -> TaskEnded {
        let Some(joined) = self.set.join_next_with_id().await else {
            return std::future::pending().await;
        };
        let (id, how) = match joined {
            Ok((id, ())) => (id, "ended"),
            Err(e) if e.is_panic() => (e.id(), "panicked"),
            Err(e) => (e.id(), "was cancelled"),
        };
        TaskEnded {
            task: self.names.remove(&id).unwrap_or("task"),
            how,
        }
    }

    /// After the stop signal went out: waits up to `grace` for the tasks that end on it (the
    /// server loop), then aborts what is left (the Steward, which has no stop of its own).
    pub(super) async fn stop(mut self, grace: Duration, ends_on_stop: &'static str) {
        let _ = tokio::time::timeout(grace, async {
            while self.names.values().any(|n| *n == ends_on_stop) {
                match self.set.join_next_with_id().await {
                    Some(Ok((id, ()))) => self.names.remove(&id),
                    Some(Err(e)) => self.names.remove(&e.id()),
                    None => return,
                };
            }
        })
        .await;
        self.set.shutdown().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SOON: Duration = Duration::from_millis(200);

    #[tokio::test]
    async fn a_task_that_returns_is_named_in_the_error() {
        let mut tasks = Tasks::default();
        tasks.spawn("server", std::future::pending());
        tasks.spawn("spec steward", async {});
        let ended = tokio::time::timeout(SOON, tasks.ended()).await.unwrap();
        assert_eq!(
            ended,
            TaskEnded {
                task: "spec steward",
                how: "ended"
            }
        );
        assert_eq!(
            ended.to_string(),
            "the controller's spec steward ended, so the controller stopped; see the log above \
             and restart `fleet serve`"
        );
    }

    #[tokio::test]
    async fn a_task_that_panics_is_an_error_too() {
        let mut tasks = Tasks::default();
        tasks.spawn("server", async { panic!("boom") });
        let ended = tokio::time::timeout(SOON, tasks.ended()).await.unwrap();
        assert_eq!((ended.task, ended.how), ("server", "panicked"));
    }

    #[tokio::test]
    async fn tasks_that_keep_running_end_nothing() {
        let mut tasks = Tasks::default();
        assert!(
            tokio::time::timeout(SOON, tasks.ended()).await.is_err(),
            "no task: nothing ends"
        );
        tasks.spawn("server", std::future::pending());
        assert!(tokio::time::timeout(SOON, tasks.ended()).await.is_err());
    }

    #[tokio::test]
    async fn stop_waits_for_the_server_and_aborts_the_rest() {
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let (done_tx, done_rx) = tokio::sync::oneshot::channel::<()>();
        let mut tasks = Tasks::default();
        tasks.spawn("server", async move {
            let _ = rx.await;
            tokio::time::sleep(Duration::from_millis(50)).await;
            let _ = done_tx.send(());
        });
        tasks.spawn("spec steward", std::future::pending());
        tx.send(()).unwrap();
        tokio::time::timeout(Duration::from_secs(5), tasks.stop(SOON * 5, "server"))
            .await
            .expect("the steward is aborted, not waited for");
        assert!(done_rx.await.is_ok(), "the server loop finished its stop");
    }
}
