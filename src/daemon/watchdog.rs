//! Liveness, told to systemd and the log: WATCHDOG=1 while the daemon's loops make progress
//! (whether or not the servers answer: an outage is waited out, not restarted), and
//! EXTEND_TIMEOUT_USEC while start-up work goes on before the first READY=1 (a long backlog, a
//! resync, servers still away). A loop without progress for `liveness_timeout` gets neither,
//! so systemd restarts the service, as Kubernetes does on the failing `/healthz`.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use sd_notify::NotifyState;
use tokio_util::sync::CancellationToken;
use tracing::{error, info};

use crate::liveness::Liveness;

/// How often liveness is looked at, at most (half the watchdog period when that is shorter).
const TICK: Duration = Duration::from_secs(1);

pub(super) async fn watch(liveness: Liveness, ready: Arc<AtomicBool>, shutdown: CancellationToken) {
    let watchdog = sd_notify::watchdog_enabled();
    let tick = watchdog.map_or(TICK, |period| (period / 2).min(TICK));
    // Each extension covers a stall's detection and two ticks: started work that stops making
    // progress is timed out by systemd soon after `/healthz` fails.
    let extension = u32::try_from((liveness.timeout() + tick * 2).as_micros()).unwrap_or(u32::MAX);
    let mut ticks = tokio::time::interval(tick);
    let mut started = false;
    let mut stalled = false;
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = ticks.tick() => {}
        }
        started |= ready.load(Ordering::Relaxed);
        if !liveness.is_alive() {
            if !stalled {
                error!(
                    no_progress_s = liveness.since_last_beat().as_secs(),
                    "the daemon makes no progress: /healthz fails and systemd's watchdog is \
                     no longer fed, so the service manager restarts it"
                );
                stalled = true;
            }
            continue;
        }
        if stalled {
            info!("the daemon makes progress again");
            stalled = false;
        }
        // Without NOTIFY_SOCKET (not under systemd) these do nothing.
        if watchdog.is_some() {
            let _ = sd_notify::notify(&[NotifyState::Watchdog]);
        }
        if !started {
            let _ = sd_notify::notify(&[NotifyState::ExtendTimeoutUsec(extension)]);
        }
    }
}
