//! Capped exponential backoff with full jitter, for reconnects and retries.

use std::time::Duration;

#[derive(Debug, Clone)]
pub struct Backoff {
    base: Duration,
    cap: Duration,
    attempt: u32,
}

impl Backoff {
    pub fn new(base: Duration, cap: Duration) -> Self {
        Self {
            base,
            cap,
            attempt: 0,
        }
    }

    /// The next delay: uniformly random in `[ceiling/2, ceiling]`, where the ceiling doubles per
    /// attempt up to the cap. Half-jitter keeps daemons from reconnecting in lockstep without
    /// ever retrying at once.
    pub fn next_delay(&mut self) -> Duration {
        let factor = 2u32.saturating_pow(self.attempt.min(20));
        self.attempt = self.attempt.saturating_add(1);
        let ceiling = self.base.saturating_mul(factor).min(self.cap);
        let half = ceiling / 2;
        half + half.mul_f64(rand::random::<f64>())
    }

    pub fn reset(&mut self) {
        self.attempt = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_grow_and_stay_capped() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_secs(2));
        let first = b.next_delay();
        assert!(first >= Duration::from_millis(50) && first <= Duration::from_millis(100));
        for _ in 0..30 {
            assert!(b.next_delay() <= Duration::from_secs(2));
        }
        assert!(b.next_delay() >= Duration::from_secs(1));
        b.reset();
        assert!(b.next_delay() <= Duration::from_millis(100));
    }
}
