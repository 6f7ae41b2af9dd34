//! How every long-running clustermesh binary (the apiserver, the agent, `clustermesh
//! observe --follow`, `clustermesh ui`) lives, so they all stop the same way: logs go to stderr through one
//! `tracing` subscriber; the application runs under one root [`CancellationToken`] in a
//! [`JoinSet`]; SIGINT or SIGTERM cancels the root token, and the application then has a
//! grace period to drain before it is aborted.
//!
//! This crate must not hold application logic, parse flags or decide exit codes: `main`
//! does that with what [`run`] returns.

use std::future::Future;
use std::time::Duration;

use tokio::signal::unix::{signal, SignalKind};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn, Instrument as _};

/// Why [`run`] could not hand back the application's own result.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The signal handlers could not be installed.
    #[error("cannot install the SIGINT/SIGTERM handlers")]
    Signal(#[source] std::io::Error),
    /// After a signal, the application did not stop within the grace period (it was
    /// aborted).
    #[error("did not stop within the {grace:?} grace period after {signal}")]
    GraceExceeded {
        /// The grace period.
        grace: Duration,
        /// The signal that started the shutdown.
        signal: &'static str,
    },
    /// The application's task panicked.
    #[error("the application task panicked: {reason}")]
    Panicked {
        /// The panic, as the runtime reports it.
        reason: String,
    },
}

/// Result with this crate's error.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Sends `tracing` events to stderr, filtered by `filter` (`RUST_LOG` syntax, e.g. `info`
/// or `clustermesh_agent=debug`); an unparsable filter falls back to `info`. Call once,
/// first thing in `main`.
pub fn init_tracing(filter: &str) {
    let filter = tracing_subscriber::EnvFilter::try_new(filter)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
}

/// Runs `app` with a child of a fresh root token until it ends on its own or SIGINT/SIGTERM
/// arrives; after a signal the root token is cancelled and `app` has `grace` to return.
/// Returns `app`'s own result in both cases (it decides whether a drained shutdown is a
/// success), or an [`Error`] if it had to be aborted or panicked.
pub async fn run<T, F, Fut>(grace: Duration, app: F) -> Result<T>
where
    T: Send + 'static,
    F: FnOnce(CancellationToken) -> Fut,
    Fut: Future<Output = T> + Send + 'static,
{
    let mut interrupt = signal(SignalKind::interrupt()).map_err(Error::Signal)?;
    let mut terminate = signal(SignalKind::terminate()).map_err(Error::Signal)?;
    let root = CancellationToken::new();
    let mut tasks = JoinSet::new();
    tasks.spawn(app(root.child_token()).instrument(tracing::Span::current()));
    let signal = tokio::select! {
        joined = tasks.join_next() => return finished(joined),
        _ = interrupt.recv() => "SIGINT",
        _ = terminate.recv() => "SIGTERM",
    };
    info!(signal, ?grace, "shutting down");
    root.cancel();
    match tokio::time::timeout(grace, tasks.join_next()).await {
        Ok(joined) => finished(joined),
        Err(_) => {
            warn!(
                signal,
                ?grace,
                "did not stop within the grace period; aborting"
            );
            tasks.abort_all();
            Err(Error::GraceExceeded { grace, signal })
        }
    }
}

fn finished<T>(joined: Option<std::result::Result<T, tokio::task::JoinError>>) -> Result<T> {
    match joined {
        Some(Ok(v)) => Ok(v),
        Some(Err(e)) => Err(Error::Panicked {
            reason: e.to_string(),
        }),
        // The set held one task and nothing else takes it out.
        None => Err(Error::Panicked {
            reason: "the task was lost".into(),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn returns_what_the_app_returns() {
        let r = run(Duration::from_secs(1), |_| async { 7 }).await.unwrap();
        assert_eq!(r, 7);
    }

    async fn signal_self(name: &str) {
        let pid = std::process::id().to_string();
        let status = tokio::process::Command::new("kill")
            .args([&format!("-{name}"), &pid])
            .status()
            .await
            .unwrap();
        assert!(status.success());
    }

    /// One test for both signals: the handlers are process-wide, so a signal sent by one
    /// test would reach another test's `run`.
    #[tokio::test]
    async fn a_signal_cancels_the_token_and_the_app_drains_or_is_aborted() {
        let drained = run(Duration::from_secs(5), |token| async move {
            token.cancelled().await;
            "drained"
        });
        let kill = async {
            tokio::time::sleep(Duration::from_millis(100)).await;
            signal_self("TERM").await;
        };
        let (r, ()) = tokio::join!(drained, kill);
        assert_eq!(r.unwrap(), "drained");

        let stuck = run(Duration::from_millis(100), |_token| async move {
            tokio::time::sleep(Duration::from_secs(3600)).await;
        });
        let kill = async {
            tokio::time::sleep(Duration::from_millis(100)).await;
            signal_self("INT").await;
        };
        let (r, ()) = tokio::join!(stuck, kill);
        match r {
            Err(Error::GraceExceeded { signal, .. }) => assert_eq!(signal, "SIGINT"),
            other => panic!("expected GraceExceeded after SIGINT, got {other:?}"),
        }
    }
}
