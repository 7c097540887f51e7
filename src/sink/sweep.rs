//! Tag-set hygiene: tag sets keep the names of entries that have since expired. The sweep walks
//! every tag set in small steps (one Lua call of `SWEEP_STEP` members), removes such members,
//! and paces itself to `members_per_second` so it never competes with the application.

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tokio_util::sync::CancellationToken;

use super::{KeyScan, RedisSink, SinkError};

const SWEEP_STEP: u64 = 100;

impl RedisSink {
    /// One pass over every tag set, a SCAN page of them at a time (memory bounded by a page).
    /// Returns the number of members removed; stops early (with what it removed so far) when
    /// `shutdown` is cancelled.
    pub async fn sweep_tag_sets(
        &self,
        members_per_second: u64,
        shutdown: &CancellationToken,
    ) -> Result<u64, SinkError> {
        let pattern = self.keys.tag_glob("*");
        let pause = Duration::from_secs_f64(SWEEP_STEP as f64 / members_per_second.max(1) as f64);
        let mut removed = 0;
        let mut scan = KeyScan::new(pattern);
        while let Some(page) = self.next_page(&mut scan).await? {
            for tag_key in page {
                removed += self.sweep_tag_set(&tag_key, pause, shutdown).await?;
                if shutdown.is_cancelled() {
                    return Ok(removed);
                }
            }
        }
        Ok(removed)
    }

    /// Sweeps one tag set in paced steps; the members removed.
    async fn sweep_tag_set(
        &self,
        tag_key: &[u8],
        pause: Duration,
        shutdown: &CancellationToken,
    ) -> Result<u64, SinkError> {
        let mut removed = 0;
        let mut cursor = "0".to_string();
        loop {
            if shutdown.is_cancelled() {
                return Ok(removed);
            }
            let started = Instant::now();
            let now_s = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_secs());
            let (next, n): (String, u64) = if self.is_cluster() {
                self.sweep_step_in_cluster(tag_key, &cursor, SWEEP_STEP, now_s)
                    .await?
            } else {
                let mut conn = self.conn();
                self.sweep
                    .key(tag_key)
                    .arg(&cursor)
                    .arg(SWEEP_STEP)
                    .arg(now_s)
                    .invoke_async(&mut conn)
                    .await?
            };
            removed += n;
            if n > 0 {
                self.count(&[("swept", n)]).await?;
            }
            if let Some(rest) = pause.checked_sub(started.elapsed()) {
                tokio::time::sleep(rest).await;
            }
            if next == "0" {
                return Ok(removed);
            }
            cursor = next;
        }
    }
}
