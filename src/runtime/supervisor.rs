//! The supervisor of a program's long-running work: every future that
//! must run as long as the program does is spawned here under a name. One
//! that ends before the program is told to stop (returns, fails or panics)
//! is reported as an [`EndedError`] naming it, so the program exits with an
//! error and its orchestrator restarts it instead of leaving it half-alive.
//! On a normal stop the supervisor tells everything to stop and waits for
//! it to drain.

use std::{borrow::Cow, collections::HashMap, future::Future, time::Duration};

use tokio::{
    sync::watch,
    task::{Id, JoinError, JoinSet},
};
use tracing::Instrument;

/// The error a supervised future may end with.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The name of supervised work: a fixed one, or one made at run time (a
/// listener and its address, say).
pub type Name = Cow<'static, str>;

/// How a supervised future ended when it should not have.
#[derive(Debug, thiserror::Error)]
pub enum EndedError {
    /// It returned before the program was told to stop.
    #[error("{name} stopped unexpectedly")]
    Returned {
        /// Its name.
        name: Name,
    },
    /// It returned an error.
    #[error("{name} failed: {error}")]
    Failed {
        /// Its name.
        name: Name,
        /// The error and its causes, outermost first.
        error: String,
    },
    /// It panicked.
    #[error("{name} panicked: {message}")]
    Panicked {
        /// Its name.
        name: Name,
        /// The panic message.
        message: String,
    },
}

impl EndedError {
    /// The name of what ended.
    pub fn name(&self) -> &str {
        match self {
            EndedError::Returned { name }
            | EndedError::Failed { name, .. }
            | EndedError::Panicked { name, .. } => name,
        }
    }
}

/// Named long-running futures, each on its own tokio task, and the signal
/// that tells them to stop.
#[derive(Debug)]
pub struct Supervisor {
    running: JoinSet<Result<(), BoxError>>,
    names: HashMap<Id, Name>,
    stop: watch::Sender<bool>,
}

impl Default for Supervisor {
    fn default() -> Self {
        Self::new()
    }
}

impl Supervisor {
    /// A supervisor of nothing yet.
    pub fn new() -> Self {
        Supervisor {
            running: JoinSet::new(),
            names: HashMap::new(),
            stop: watch::channel(false).0,
        }
    }

    /// Runs `work` under `name` (in a span of that name). It should end only
    /// after [`Supervisor::stopping`] completes; ending earlier, in any way,
    /// is an [`EndedError`].
    pub fn spawn<F, E>(&mut self, name: impl Into<Name>, work: F)
    where
        F: Future<Output = Result<(), E>> + Send + 'static,
        E: Into<BoxError>,
    {
        let name = name.into();
        let span = tracing::info_span!("supervised", name = %name);
        let work = async move { work.await.map_err(Into::into) }.instrument(span);
        let id = self.running.spawn(work).id();
        self.names.insert(id, name);
    }

    /// Runs `work` under `name` until [`Supervisor::stop`], then drops it:
    /// for work with nothing to finish, which never ends by itself.
    pub fn spawn_until_stopped<F, E>(&mut self, name: impl Into<Name>, work: F)
    where
        F: Future<Output = Result<(), E>> + Send + 'static,
        E: Into<BoxError>,
    {
        let stopping = self.stopping();
        self.spawn(name, async move {
            tokio::select! {
                ended = work => ended.map_err(Into::into),
                () = stopping => Ok(()),
            }
        });
    }

    /// Completes once [`Supervisor::stop`] is called: what supervised work
    /// waits for to begin a graceful stop.
    pub fn stopping(&self) -> impl Future<Output = ()> + Send + Sync + use<> {
        let mut stop = self.stop.subscribe();
        async move {
            // The sender lives as long as the supervisor; if it is gone,
            // nothing is left to wait for either.
            let _ = stop.wait_for(|stop| *stop).await;
        }
    }

    /// Waits for `shutdown` and returns its output, unless supervised work
    /// ends first: then the error names it (and is logged).
    pub async fn run_until<T>(
        &mut self,
        shutdown: impl Future<Output = T>,
    ) -> Result<T, EndedError> {
        let Self { running, names, .. } = self;
        let ended = async {
            loop {
                match running.join_next_with_id().await {
                    Some(joined) => {
                        if let Err(e) = outcome(names, joined, false) {
                            return e;
                        }
                    }
                    None => std::future::pending::<()>().await,
                }
            }
        };
        tokio::select! {
            value = shutdown => Ok(value),
            e = ended => {
                tracing::error!(name = e.name(), error = %e, "stopping: supervised work ended");
                Err(e)
            }
        }
    }

    /// Tells all supervised work to stop and waits at most `limit` for it to
    /// end. `Ok(true)` when everything ended, `Ok(false)` when the limit
    /// passed (the rest is aborted), and the first failure or panic while
    /// stopping otherwise.
    pub async fn stop(&mut self, limit: Duration) -> Result<bool, EndedError> {
        let _ = self.stop.send(true);
        let Self { running, names, .. } = self;
        let mut first_error = None;
        let drain = async {
            while let Some(joined) = running.join_next_with_id().await {
                if let Err(e) = outcome(names, joined, true) {
                    tracing::error!(name = e.name(), error = %e, "failed while stopping");
                    first_error.get_or_insert(e);
                }
            }
        };
        let drained = tokio::time::timeout(limit, drain).await.is_ok();
        if !drained {
            running.abort_all();
        }
        match first_error {
            Some(e) => Err(e),
            None => Ok(drained),
        }
    }
}

/// What one joined future's end means; returning is fine only once
/// `stopping`.
fn outcome(
    names: &mut HashMap<Id, Name>,
    joined: Result<(Id, Result<(), BoxError>), JoinError>,
    stopping: bool,
) -> Result<(), EndedError> {
    let id = match &joined {
        Ok((id, _)) => *id,
        Err(e) => e.id(),
    };
    let name = names.remove(&id).unwrap_or(Cow::Borrowed("unnamed work"));
    match joined {
        Ok((_, Ok(()))) if stopping => Ok(()),
        Ok((_, Ok(()))) => Err(EndedError::Returned { name }),
        Ok((_, Err(error))) => Err(EndedError::Failed {
            name,
            error: chain(error.as_ref()),
        }),
        Err(e) if e.is_panic() => Err(EndedError::Panicked {
            name,
            message: panic_message(e.into_panic()),
        }),
        Err(_) if stopping => Ok(()),
        Err(_) => Err(EndedError::Returned { name }),
    }
}

fn chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

fn panic_message(payload: Box<dyn std::any::Any + Send>) -> String {
    match payload.downcast::<String>() {
        Ok(message) => *message,
        Err(payload) => match payload.downcast::<&'static str>() {
            Ok(message) => (*message).to_string(),
            Err(_) => "a panic without a message".to_string(),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMIT: Duration = Duration::from_secs(10);

    fn mk_forever(supervisor: &Supervisor) -> impl Future<Output = Result<(), BoxError>> + use<> {
        let stopping = supervisor.stopping();
        async move {
            stopping.await;
            Ok(())
        }
    }

    #[tokio::test]
    async fn work_that_returns_early_ends_the_run_with_its_name() {
        let mut supervisor = Supervisor::new();
        let forever = mk_forever(&supervisor);
        supervisor.spawn("HTTP endpoint", forever);
        supervisor.spawn("ConfigMap writer", async { Ok::<(), BoxError>(()) });
        let e = supervisor
            .run_until(std::future::pending::<()>())
            .await
            .expect_err("an early return");
        assert!(
            matches!(&e, EndedError::Returned { name } if name == "ConfigMap writer"),
            "{e}"
        );
        assert_eq!(e.to_string(), "ConfigMap writer stopped unexpectedly");
        assert!(supervisor.stop(LIMIT).await.expect("stop"));
    }

    #[tokio::test]
    async fn work_that_fails_ends_the_run_with_its_name_and_error() {
        let mut supervisor = Supervisor::new();
        supervisor.spawn("store writer", async {
            Err::<(), BoxError>(std::io::Error::other("disk full").into())
        });
        let e = supervisor
            .run_until(std::future::pending::<()>())
            .await
            .expect_err("a failure");
        assert_eq!(e.to_string(), "store writer failed: disk full");
    }

    #[tokio::test]
    async fn work_that_panics_ends_the_run_with_its_name_and_message() {
        let mut supervisor = Supervisor::new();
        let forever = mk_forever(&supervisor);
        supervisor.spawn("lease manager", forever);
        supervisor.spawn("Service controller", async {
            if true {
                panic!("index out of bounds");
            }
            Ok::<(), BoxError>(())
        });
        let e = supervisor
            .run_until(std::future::pending::<()>())
            .await
            .expect_err("a panic");
        assert!(
            matches!(&e, EndedError::Panicked { name, message } if name == "Service controller" && message == "index out of bounds"),
            "{e}"
        );
    }

    #[tokio::test]
    async fn shutdown_returns_its_value_and_stop_drains_everything() {
        let mut supervisor = Supervisor::new();
        let forever = mk_forever(&supervisor);
        supervisor.spawn("server", forever);
        supervisor.spawn_until_stopped(
            "ConfigMap writer",
            std::future::pending::<Result<(), BoxError>>(),
        );
        let why = supervisor
            .run_until(async { "signal" })
            .await
            .expect("a shutdown");
        assert_eq!(why, "signal");
        assert!(supervisor.stop(LIMIT).await.expect("stop"));
    }

    #[tokio::test]
    async fn stop_reports_work_that_does_not_end_within_the_limit() {
        let mut supervisor = Supervisor::new();
        supervisor.spawn("stuck", std::future::pending::<Result<(), BoxError>>());
        let drained = supervisor
            .stop(Duration::from_millis(10))
            .await
            .expect("no failure");
        assert!(!drained);
    }

    #[tokio::test]
    async fn stop_reports_a_failure_while_stopping() {
        let mut supervisor = Supervisor::new();
        let stopping = supervisor.stopping();
        supervisor.spawn("store writer", async move {
            stopping.await;
            Err::<(), BoxError>(std::io::Error::other("flush failed").into())
        });
        let e = supervisor.stop(LIMIT).await.expect_err("a failure");
        assert_eq!(e.to_string(), "store writer failed: flush failed");
    }
}
