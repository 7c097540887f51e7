//! The shutdown protocol.
//!
//! 1. SIGTERM or SIGINT cancels the one [`CancellationToken`] every task holds.
//! 2. The daemon stops taking new work: its loop sees the token between batches, so the batch in
//!    hand is finished (or, in outbox mode, its claim is rolled back and the rows stay queued).
//! 3. systemd hears STOPPING=1; `run` waits for the daemon at most `--shutdown-timeout`
//!    seconds, then returns, and the process exits 0.

use anyhow::Context as _;
use tokio::signal::unix::{SignalKind, signal};
use tokio_util::sync::CancellationToken;

/// A token cancelled on the first SIGTERM or SIGINT.
pub fn on_signals() -> anyhow::Result<CancellationToken> {
    let token = CancellationToken::new();
    let mut terminate = signal(SignalKind::terminate()).context("cannot watch SIGTERM")?;
    let mut interrupt = signal(SignalKind::interrupt()).context("cannot watch SIGINT")?;
    let cancel = token.clone();
    tokio::spawn(async move {
        let name = tokio::select! {
            _ = terminate.recv() => "SIGTERM",
            _ = interrupt.recv() => "SIGINT",
        };
        tracing::info!(signal = name, "shutting down");
        let _ = sd_notify::notify(&[sd_notify::NotifyState::Stopping]);
        cancel.cancel();
    });
    Ok(token)
}
