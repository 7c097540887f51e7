//! Whether the daemon's loops make progress. They beat at each step (a loop turn, a batch
//! confirmed, a retry, a page of a keyspace walk); `/healthz` and systemd's watchdog ask
//! whether the last beat is recent. Waiting for a server that is away is progress (the retries
//! beat); a step that never returns — a deadlocked task, a call without a deadline — is not.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

// tokio's clock: the same as std's, except in tests that pause time.
use tokio::time::Instant;

/// How often a deliberate wait ([`Liveness::sleep`]) beats.
const SLEEP_BEAT: Duration = Duration::from_secs(1);

#[derive(Debug, Clone)]
pub struct Liveness {
    origin: Instant,
    /// Milliseconds from `origin` to the last beat.
    last_beat_ms: Arc<AtomicU64>,
    timeout: Duration,
}

impl Liveness {
    /// Alive until `timeout` passes without a beat; the first beat is now.
    pub fn new(timeout: Duration) -> Self {
        Self {
            origin: Instant::now(),
            last_beat_ms: Arc::new(AtomicU64::new(0)),
            timeout,
        }
    }

    pub fn beat(&self) {
        let now = self.origin.elapsed().as_millis() as u64;
        self.last_beat_ms.fetch_max(now, Ordering::Relaxed);
    }

    pub fn since_last_beat(&self) -> Duration {
        let last = Duration::from_millis(self.last_beat_ms.load(Ordering::Relaxed));
        self.origin.elapsed().saturating_sub(last)
    }

    pub fn is_alive(&self) -> bool {
        self.since_last_beat() < self.timeout
    }

    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// Sleeps `duration`, beating every second: a deliberate wait (a retry's backoff) is not a
    /// stall.
    pub async fn sleep(&self, duration: Duration) {
        let end = Instant::now() + duration;
        loop {
            self.beat();
            let now = Instant::now();
            if now >= end {
                return;
            }
            tokio::time::sleep_until(end.min(now + SLEEP_BEAT)).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn alive_until_the_timeout_passes_without_a_beat() {
        let liveness = Liveness::new(Duration::from_millis(50));
        assert!(liveness.is_alive());
        std::thread::sleep(Duration::from_millis(80));
        assert!(!liveness.is_alive());
        liveness.beat();
        assert!(liveness.is_alive());
        assert!(liveness.since_last_beat() < Duration::from_millis(50));
    }

    #[tokio::test(start_paused = true)]
    async fn a_long_sleep_keeps_beating() {
        let liveness = Liveness::new(Duration::from_secs(2));
        let watcher = liveness.clone();
        let sleeper = tokio::spawn(async move { liveness.sleep(Duration::from_secs(10)).await });
        for _ in 0..9 {
            tokio::time::sleep(Duration::from_millis(1_100)).await;
            assert!(watcher.since_last_beat() <= Duration::from_secs(2));
        }
        sleeper.await.unwrap();
    }
}
