//! Shutdown as an input: every long-running loop takes a [`Shutdown`] and stops taking work
//! when it fires, then finishes or hands back what it holds.

use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// A cloneable shutdown signal.
pub type Shutdown = CancellationToken;

/// A signal that fires on SIGTERM or Ctrl-C. Work in hand then has `deadline` to finish; past
/// it the process exits with status 1 (what it did not acknowledge is delivered again).
pub fn on_signals(deadline: Duration) -> Shutdown {
    let token = Shutdown::new();
    let fire = token.clone();
    tokio::spawn(async move {
        let ctrl_c = tokio::signal::ctrl_c();
        #[cfg(unix)]
        {
            let mut term =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
                    .expect("installing the SIGTERM handler");
            tokio::select! {
                _ = ctrl_c => {},
                _ = term.recv() => {},
            }
        }
        #[cfg(not(unix))]
        let _ = ctrl_c.await;
        tracing::info!(deadline = ?deadline, "shutdown requested: finishing the work in hand");
        fire.cancel();
        tokio::time::sleep(deadline).await;
        tracing::error!(deadline = ?deadline, "work in hand not finished in time: exiting; unacknowledged messages will be delivered again");
        std::process::exit(1);
    });
    token
}
