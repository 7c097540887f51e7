//! Between a batch and Redis' confirmation, the same for every delivery: invalidation retried
//! while Redis is away (not ready meanwhile), metrics and the summary line, second passes,
//! refused events, table-wide resyncs, and noticing a Redis that restarted. The feeds hand
//! their batches here; nothing here knows which delivery they came from.

use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tracing::{Instrument as _, debug, info, warn};

use super::Observed;
use super::error::SessionError;
use super::report::{RejectLog, Summary, batch_span};
use crate::backoff::Backoff;
use crate::config::Settings;
use crate::core::batch::Batch;
use crate::core::event::truncate;
use crate::core::rules::Targets;
use crate::metrics::EventLabels;
use crate::sink::{MarkerTtl, RedisSink, Report};

/// A batch is invalidated once it holds this many tags (and patterns), so memory stays
/// bounded whatever the size of a statement or transaction.
pub(super) const FLUSH_TAGS: usize = 20_000;

/// The invalidation path every feed's batches take. Lives across sessions: second passes and
/// Redis' last identity outlast a reconnect.
pub(super) struct Flusher {
    pub settings: Settings,
    pub observed: Observed,
    shutdown: tokio_util::sync::CancellationToken,
    summary: Summary,
    /// How many refused events were logged this second.
    reject_log: RejectLog,
    /// Redis `run_id` and role last seen: a change means Redis restarted or failed over and
    /// may have brought back entries already invalidated.
    redis_identity: Option<String>,
    /// Targets to invalidate once more, when due (the `second_pass` setting), oldest first.
    second_passes: VecDeque<(Instant, Targets)>,
}

impl Flusher {
    pub fn new(
        settings: Settings,
        observed: Observed,
        shutdown: tokio_util::sync::CancellationToken,
    ) -> Self {
        Self {
            settings,
            observed,
            shutdown,
            summary: Summary::default(),
            reject_log: RejectLog::default(),
            redis_identity: None,
            second_passes: VecDeque::new(),
        }
    }

    /// The daemon's shutdown, for waits of a feed's own.
    pub fn shutdown(&self) -> &tokio_util::sync::CancellationToken {
        &self.shutdown
    }

    pub fn set_ready(&self, ready: bool) {
        let was = self.observed.ready.swap(ready, Ordering::Relaxed);
        self.observed.metrics.ready.set(i64::from(ready));
        if ready && !was {
            let _ = sd_notify::notify(&[sd_notify::NotifyState::Ready]);
        }
    }

    /// Counts a refused event and logs it (a few a second at most: see [`RejectLog`]);
    /// returns the reason.
    pub fn reject(&self, kind: &str, reason: String, payload: &str) -> String {
        self.observed.metrics.rejected(kind);
        if let Some(left_out) = self.reject_log.admit() {
            warn!(
                kind,
                reason = %reason,
                payload = %truncate(payload, 200),
                left_out_of_the_log = left_out,
                "event skipped"
            );
        }
        reason
    }

    /// Invalidates `batch` in Redis, retrying with backoff while Redis is unreachable (not
    /// ready meanwhile), until it succeeds or the daemon shuts down; then schedules its second
    /// pass, if configured.
    pub async fn flush(&mut self, sink: &RedisSink, batch: Batch) -> Result<(), SessionError> {
        self.flush_with(sink, batch, MarkerTtl::Now).await
    }

    /// [`Flusher::flush`] with the `tagts` markers' TTL possibly deferred: the caller then owes
    /// a [`RedisSink::expire_pending_markers`] before it acknowledges the changes.
    pub async fn flush_with(
        &mut self,
        sink: &RedisSink,
        batch: Batch,
        marker_ttl: MarkerTtl,
    ) -> Result<(), SessionError> {
        self.schedule_second_pass(&batch);
        self.flush_once(sink, batch, marker_ttl).await
    }

    /// Queues `batch`'s tags for a second invalidation, if the `second_pass` setting asks for one.
    pub fn schedule_second_pass(&mut self, batch: &Batch) {
        let Some(delay) = self.settings.second_pass else {
            return;
        };
        if batch.is_empty() {
            return;
        }
        let targets = &batch.targets;
        let due = Instant::now() + delay;
        // Batches a few milliseconds apart share one second pass.
        match self.second_passes.back_mut() {
            Some((last_due, last)) if due.duration_since(*last_due) < Duration::from_millis(20) => {
                last.merge(targets.clone());
            }
            _ => self.second_passes.push_back((due, targets.clone())),
        }
    }

    /// Resolves when the oldest scheduled second pass is due; never when none is scheduled.
    pub async fn second_pass_due(&self) {
        match self.second_passes.front() {
            Some((due, _)) => tokio::time::sleep_until((*due).into()).await,
            None => std::future::pending().await,
        }
    }

    /// Invalidates the second pass that is due.
    pub async fn second_pass(&mut self, sink: &RedisSink) -> Result<(), SessionError> {
        if let Some((_, targets)) = self.second_passes.pop_front() {
            let batch = Batch {
                targets,
                ..Batch::default()
            };
            debug!("second pass");
            self.flush_once(sink, batch, MarkerTtl::Now).await?;
        }
        Ok(())
    }

    async fn flush_once(
        &mut self,
        sink: &RedisSink,
        batch: Batch,
        marker_ttl: MarkerTtl,
    ) -> Result<(), SessionError> {
        if batch.is_empty() {
            return Ok(());
        }
        let started = Instant::now();
        let mut backoff = Backoff::new(Duration::from_millis(50), Duration::from_secs(5));
        let mut failed = false;
        let span = batch_span(&batch);
        let report = loop {
            self.observed.liveness.beat();
            match sink
                .invalidate_with(&batch.targets, marker_ttl)
                .instrument(span.clone())
                .await
            {
                Ok(report) => break report,
                Err(e) => {
                    failed = true;
                    self.set_ready(false);
                    // A failover under Sentinel: the next attempt goes to the new master.
                    if let Err(e) = sink.follow_master().await {
                        debug!(error = %e, "cannot ask the sentinels for the master");
                    }
                    self.observed.metrics.error("redis");
                    let delay = backoff.next_delay();
                    warn!(error = %e, retry_in_ms = delay.as_millis() as u64, "redis invalidation failed; retrying");
                    tokio::select! {
                        _ = self.shutdown.cancelled() => return Err(SessionError::Shutdown),
                        _ = self.observed.liveness.sleep(delay) => {}
                    }
                }
            }
        };
        if failed {
            info!("redis answers again");
            if self.check_redis_restart(sink).await? {
                self.resync(sink, "redis restarted or failed over").await?;
            }
            self.set_ready(true);
        }
        span.in_scope(|| self.record(&batch, report, started.elapsed()));
        Ok(())
    }

    /// Metrics, the debug line and the summary of one batch Redis confirmed.
    pub fn record(&mut self, batch: &Batch, report: Report, took: Duration) {
        self.observed.liveness.beat();
        let m = &self.observed.metrics;
        m.last_batch_timestamp_seconds.set(now_ms() as f64 / 1000.0);
        m.batches.inc();
        if report.wrong_type > 0 {
            m.errors_by("tag_type", report.wrong_type);
        }
        m.tags_invalidated.inc_by(report.tags);
        m.keys_invalidated.inc_by(report.keys);
        m.table_wide.inc_by(batch.targets.wide_tables.len() as u64);
        for ((table, op), count) in &batch.events {
            m.events
                .get_or_create(&EventLabels {
                    table: table.clone(),
                    op: op.as_str().to_string(),
                })
                .inc_by(*count);
        }
        if let Some(lag) = batch.oldest_ts_ms.and_then(|ts| lag_seconds(now_ms(), ts)) {
            m.lag_seconds.observe(lag);
        }
        debug!(
            events = batch.event_count(),
            tags = report.tags,
            keys = report.keys,
            table_wide = batch.targets.wide_tables.len(),
            ms = took.as_secs_f64() * 1000.0,
            "batch invalidated"
        );
        self.summary.add(batch.event_count(), report);
        self.summary.maybe_log();
    }

    /// Invalidates every configured table table-wide.
    pub async fn resync(&mut self, sink: &RedisSink, why: &str) -> Result<(), SessionError> {
        info!(
            reason = why,
            "invalidating every configured table table-wide"
        );
        let batch = Batch {
            targets: self.settings.rules.all_table_wide(),
            ..Batch::default()
        };
        // Boxed: a resync can start from inside a flush (Redis came back restarted).
        Box::pin(self.flush_once(sink, batch, MarkerTtl::Now)).await
    }

    /// Redis' part of the health tick: a ping within `limit`; a Redis that restarted meanwhile
    /// gets a resync. Ready when it answers, not ready when it does not.
    pub async fn redis_health(
        &mut self,
        sink: &RedisSink,
        limit: Duration,
    ) -> Result<(), SessionError> {
        // Under Sentinel, a failover moves the master: follow it before pinging (the old one,
        // demoted, would answer the ping and refuse every write).
        if let Err(e) = sink.follow_master().await {
            debug!(error = %e, "cannot ask the sentinels for the master");
        }
        match tokio::time::timeout(limit, sink.ping()).await {
            Ok(Ok(())) => {
                if self.check_redis_restart(sink).await? {
                    self.resync(sink, "redis restarted or failed over").await?;
                }
                self.set_ready(true);
                if self.summary.has_news() {
                    self.summary.maybe_log();
                }
            }
            _ => {
                self.set_ready(false);
                self.observed.metrics.error("redis");
                warn!("redis does not answer a ping");
            }
        }
        Ok(())
    }

    /// Records Redis' identity (`run_id` and role); true when it changed since the last look:
    /// a restarted or failed-over Redis may have brought back entries already invalidated.
    pub async fn check_redis_restart(&mut self, sink: &RedisSink) -> Result<bool, SessionError> {
        let info = sink.server_info().await?;
        let identity = Some(format!("{} {}", info.run_id, info.role));
        let changed = self.redis_identity.is_some() && self.redis_identity != identity;
        self.redis_identity = identity;
        Ok(changed)
    }
}

/// Seconds from a statement's time `ts_ms` to `now_ms`, or `None` for a time no statement can
/// have (a year old, or a minute ahead of this clock): such a `ts` is corrupt or forged, and
/// would skew the histogram's sum for good. Never overflows, whatever `ts_ms` holds.
fn lag_seconds(now_ms: i64, ts_ms: i64) -> Option<f64> {
    const YEAR_MS: i64 = 365 * 24 * 3600 * 1000;
    let lag = now_ms.saturating_sub(ts_ms);
    (-60_000..YEAR_MS)
        .contains(&lag)
        .then(|| lag.max(0) as f64 / 1000.0)
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lag_is_measured_only_for_plausible_times() {
        let now = 1_750_000_000_000;
        assert_eq!(lag_seconds(now, now - 1_500), Some(1.5));
        assert_eq!(lag_seconds(now, now + 10), Some(0.0), "a clock a bit ahead");
        assert_eq!(lag_seconds(now, now + 3_600_000), None);
        assert_eq!(lag_seconds(now, i64::MIN), None);
        assert_eq!(lag_seconds(now, i64::MAX), None);
        assert_eq!(lag_seconds(now, 0), None);
    }
}
