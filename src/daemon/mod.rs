//! `evictd run`: the supervisor and the event loop.
//!
//! ```text
//! supervisor: connect Redis + PostgreSQL (backoff) -> start-up work -> ready -> event loop
//!             any connection error -> not ready -> backoff -> again (never exits for it)
//! event loop: notification -> parse -> Batch (rules) -> flush to the sink -> ack (outbox)
//! ```
//!
//! Start-up work, before readiness, so that entries written after `ready` are never swept by
//! it: finish interrupted drains; then in `notify` mode invalidate every table table-wide (what
//! happened while nobody listened is unknown), in `outbox` mode drain the backlog.

mod drain;
mod follow;
mod report;
mod sweeper;

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use thiserror::Error;
use tokio_postgres::Notification;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument as _, debug, info, warn};

use self::drain::{DOORBELL_RETRY, Doorbell};
use crate::backoff::Backoff;
use crate::config::{Delivery, Settings, Wakeup};
use crate::core::batch::Batch;
use crate::core::event::{ChangeEvent, truncate};
use crate::core::rules::Targets;
use crate::metrics::{EventLabels, Metrics};
use crate::schema::SchemaError;
use crate::sink::{MarkerTtl, RedisSink, Report, SinkError, SinkOptions};
use crate::source::{Session, SourceError, doorbell, outbox};
use report::{RejectLog, Summary, batch_span};
use sweeper::sweep_forever;

/// A many-row event is folded into batches this many rows at a time…
const ROWS_PER_PART: usize = 5_000;
/// …and a batch is invalidated once it holds this many tags, so memory stays bounded whatever
/// the size of a statement.
const FLUSH_TAGS: usize = 20_000;
/// Safety poll of the outbox even without a wake-up NOTIFY.
const OUTBOX_POLL: Duration = Duration::from_secs(1);
/// The poll interval in `poll` wake-up mode while the outbox has rows: long enough that each
/// claim takes a batch worth the round trips, short enough to stay far under 100 ms of lag.
const OUTBOX_POLL_BUSY: Duration = Duration::from_millis(10);

#[derive(Debug, Error)]
enum SessionError {
    #[error(transparent)]
    Source(#[from] SourceError),
    #[error(transparent)]
    Sink(#[from] SinkError),
    #[error("postgresql did not answer a ping within {0:?} (half-open connection?)")]
    PgTimeout(Duration),
    #[error(
        "the replication stream did not deliver our marker within {0:?} (half-open connection?)"
    )]
    StreamSilent(Duration),
    #[error("shutting down")]
    Shutdown,
    /// The task invalidating a batch panicked (a bug) or was cancelled.
    #[error("invalidation task failed: {0}")]
    Invalidation(tokio::task::JoinError),
    /// A problem no reconnect can fix: the configuration names what the database lacks.
    #[error(transparent)]
    Fatal(SchemaError),
}

/// Shared state the HTTP endpoints and tests observe.
#[derive(Clone)]
pub struct Observed {
    pub ready: Arc<AtomicBool>,
    pub metrics: Metrics,
}

/// Runs until `shutdown` is cancelled. Connection problems are retried forever; the only error
/// returned is a configuration that does not fit the database (a missing table or column).
pub async fn run(
    settings: Settings,
    observed: Observed,
    shutdown: CancellationToken,
) -> Result<(), SchemaError> {
    let mut daemon = Daemon {
        settings,
        observed,
        shutdown,
        summary: Summary::default(),
        reject_log: RejectLog::default(),
        redis_identity: None,
        second_passes: VecDeque::new(),
        last_logical_flush: None,
        logical_markers_owed: false,
        doorbell: Doorbell::Idle,
    };
    if let Some(interval) = daemon.settings.sweep_interval {
        tokio::spawn(sweep_forever(
            daemon.settings.clone(),
            interval,
            daemon.observed.metrics.clone(),
            daemon.shutdown.clone(),
        ));
    }
    let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(10));
    loop {
        let outcome = daemon.session(&mut backoff).await;
        daemon.set_ready(false);
        match outcome {
            Ok(()) | Err(SessionError::Shutdown) => return Ok(()),
            Err(SessionError::Fatal(e)) => return Err(e),
            Err(e) => {
                let server = match &e {
                    SessionError::Sink(_) => "redis",
                    _ => "postgres",
                };
                daemon.observed.metrics.error(server);
                daemon.observed.metrics.reconnect(server);
                let delay = backoff.next_delay();
                warn!(error = %e, retry_in_ms = delay.as_millis() as u64, "not serving; retrying");
                tokio::select! {
                    _ = daemon.shutdown.cancelled() => return Ok(()),
                    _ = tokio::time::sleep(delay) => {}
                }
            }
        }
    }
}

struct Daemon {
    settings: Settings,
    observed: Observed,
    shutdown: CancellationToken,
    summary: Summary,
    /// How many rejected events were logged this second.
    reject_log: RejectLog,
    /// Redis `run_id` and role last seen: a change means Redis restarted or failed over and
    /// may have brought back entries already invalidated.
    redis_identity: Option<String>,
    /// Targets to invalidate once more, when due (the `second_pass` setting), oldest first.
    second_passes: VecDeque<(Instant, Targets)>,
    /// When the last `logical` batch was flushed ([`Settings::batch_linger`]).
    last_logical_flush: Option<tokio::time::Instant>,
    /// Part of a huge `logical` transaction went to Redis with its markers' TTL deferred; they
    /// get it before the transaction is confirmed.
    logical_markers_owed: bool,
    /// `outbox` delivery with `doorbell` wake-up: where the daemon is in the doorbell's cycle.
    doorbell: Doorbell,
}

impl Daemon {
    fn set_ready(&self, ready: bool) {
        let was = self.observed.ready.swap(ready, Ordering::Relaxed);
        self.observed.metrics.ready.set(i64::from(ready));
        if ready && !was {
            let _ = sd_notify::notify(&[sd_notify::NotifyState::Ready]);
        }
    }

    async fn session(&mut self, backoff: &mut Backoff) -> Result<(), SessionError> {
        let sink =
            RedisSink::connect(&self.settings.redis_url, SinkOptions::from(&self.settings)).await?;
        sink.ping().await?;
        sink.check_version().await?;
        sink.warn_if_evicting().await;
        let mut source = match Session::open(&self.settings).await {
            Err(SourceError::Schema(e @ SchemaError::Config { .. })) => {
                return Err(SessionError::Fatal(e));
            }
            other => other?,
        };
        let redis_restarted = self.check_redis_restart(&sink).await?;

        let resumed = sink.resume_drains().await?;
        if resumed.tags > 0 {
            info!(
                drains = resumed.tags,
                keys = resumed.keys,
                "finished drains a previous run left"
            );
        }
        match source.delivery {
            Delivery::Notify => {
                self.resync(&sink, "start-up: notify mode cannot know what it missed")
                    .await?
            }
            Delivery::Outbox => {
                if redis_restarted {
                    self.resync(&sink, "redis restarted or failed over").await?;
                }
                if source.wakeup == Wakeup::Doorbell {
                    // A daemon that died draining left the doorbell telling writers not to
                    // ring: set it back, and drain after the barrier as any idle daemon does.
                    doorbell::set_busy(&source.connection.client, false)
                        .await
                        .map_err(SourceError::from)?;
                    self.doorbell = Doorbell::BarrierOwed {
                        retry: DOORBELL_RETRY,
                    };
                }
                self.drain_and_ring(&mut source, &sink).await?;
            }
            Delivery::Logical => {}
        }
        let mut stream = match source.delivery {
            Delivery::Logical => Some(self.start_logical(&source, &sink, redis_restarted).await?),
            _ => None,
        };
        self.set_ready(true);
        backoff.reset();
        info!(
            channel = %source.channel,
            delivery = source.delivery.as_str(),
            "evictd is ready"
        );

        // Under a systemd watchdog, ping at least twice per watchdog period.
        let tick = sd_notify::watchdog_enabled().map_or(self.settings.health_interval, |w| {
            self.settings.health_interval.min(w / 2)
        });
        let mut health = tokio::time::interval(tick);
        health.reset();
        let polling = source.wakeup == Wakeup::Poll;
        // Without the poll wake-up the poll is a safety net, or the doorbell's busy polling.
        let mut poll_every = if polling {
            OUTBOX_POLL_BUSY
        } else {
            self.doorbell.next_poll()
        };
        let mut next_poll = tokio::time::Instant::now() + poll_every;
        loop {
            tokio::select! {
                biased;
                _ = self.shutdown.cancelled() => return Ok(()),
                _ = health.tick() => {
                    self.health_check(&source, &sink).await?;
                    if let Some(stream) = stream.as_mut() {
                        self.stream_health(&source, stream).await?;
                    }
                }
                _ = second_pass_due(&self.second_passes) => {
                    if let Some((_, targets)) = self.second_passes.pop_front() {
                        let batch = Batch { targets, ..Batch::default() };
                        debug!("second pass");
                        self.flush_once(&sink, batch, MarkerTtl::Now).await?;
                    }
                }
                _ = tokio::time::sleep_until(next_poll), if source.delivery == Delivery::Outbox => {
                    let found = self.drain_and_ring(&mut source, &sink).await?;
                    if polling {
                        // Adaptive: straight back while there is work, backing off when idle.
                        poll_every = if found > 0 {
                            OUTBOX_POLL_BUSY
                        } else {
                            (poll_every * 2).min(self.settings.outbox_poll_max)
                        };
                    } else {
                        poll_every = self.doorbell.next_poll();
                    }
                    next_poll = tokio::time::Instant::now() + poll_every;
                }
                notification = source.next_notification() => {
                    let first = notification?;
                    self.on_notifications(first, &mut source, &sink).await?;
                    if !polling {
                        next_poll = next_poll
                            .min(tokio::time::Instant::now() + self.doorbell.next_poll());
                    }
                }
                event = follow::next_event(&mut stream) => {
                    if let Some(stream) = stream.as_mut() {
                        self.on_logical(event?, stream, &sink, None).await?;
                    }
                }
            }
        }
    }

    /// Handles one notification and whatever else is already waiting, as one batch.
    async fn on_notifications(
        &mut self,
        first: Notification,
        source: &mut Session,
        sink: &RedisSink,
    ) -> Result<(), SessionError> {
        let mut batch = Batch::default();
        let mut wake = false;
        let mut next = Some(first);
        while let Some(n) = next {
            // Only `notify` delivery carries events in notifications, and only signed ones
            // count: any role may NOTIFY. In the others a notification only wakes the daemon,
            // whatever it says: the events are in the outbox or the WAL.
            match (&source.signing_key, source.delivery) {
                (Some(key), Delivery::Notify) => match key.open_str(n.payload()) {
                    Ok(payload) => {
                        self.add_payload(&mut batch, payload);
                    }
                    Err(forged) => {
                        self.reject("forged", forged.to_string(), n.payload());
                    }
                },
                _ => wake = true,
            }
            next = if batch.event_count() < self.settings.batch_max_events as u64 {
                source.try_next_notification()
            } else {
                None
            };
        }
        // In outbox mode notifications are only wake-ups (the events are in the table), so a
        // dropped one costs nothing: the drain below reads everything.
        let overflowed = source.take_overflow();
        if overflowed && source.delivery == Delivery::Notify {
            warn!(
                buffer = self.settings.notify_buffer,
                "notifications arrived faster than Redis took them and some were dropped; invalidating every table"
            );
            batch.targets.merge(self.settings.rules.all_table_wide());
        }
        self.flush(sink, batch).await?;
        if source.delivery == Delivery::Outbox && (wake || overflowed) {
            self.drain_and_ring(source, sink).await?;
        }
        Ok(())
    }

    /// Parses one payload into `batch`; a bad one is logged with its reason, counted and skipped.
    /// Returns the reason when it was rejected.
    fn add_payload(&self, batch: &mut Batch, payload: &str) -> Option<String> {
        let result = ChangeEvent::parse(payload)
            .map_err(|e| ("malformed", e.to_string()))
            .and_then(|event| {
                batch
                    .add(&self.settings.rules, &event)
                    .map_err(|e| ("unknown_table", e.to_string()))
            });
        match result {
            Ok(()) => None,
            Err((kind, reason)) => Some(self.reject(kind, reason, payload)),
        }
    }

    /// Counts a rejected event and logs it (a few a second at most: see [`RejectLog`]);
    /// returns the reason.
    fn reject(&self, kind: &str, reason: String, payload: &str) -> String {
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
    async fn flush(&mut self, sink: &RedisSink, batch: Batch) -> Result<(), SessionError> {
        self.flush_with(sink, batch, MarkerTtl::Now).await
    }

    /// [`Daemon::flush`] with the `tagts` markers' TTL possibly deferred: the caller then owes
    /// a [`RedisSink::expire_pending_markers`] before it acknowledges the changes.
    async fn flush_with(
        &mut self,
        sink: &RedisSink,
        batch: Batch,
        marker_ttl: MarkerTtl,
    ) -> Result<(), SessionError> {
        self.schedule_second_pass(&batch);
        self.flush_once(sink, batch, marker_ttl).await
    }

    /// Queues `batch`'s tags for a second invalidation, if the `second_pass` setting asks for one.
    fn schedule_second_pass(&mut self, batch: &Batch) {
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
            match sink
                .invalidate_with(&batch.targets, marker_ttl)
                .instrument(span.clone())
                .await
            {
                Ok(report) => break report,
                Err(e) => {
                    failed = true;
                    self.set_ready(false);
                    self.observed.metrics.error("redis");
                    let delay = backoff.next_delay();
                    warn!(error = %e, retry_in_ms = delay.as_millis() as u64, "redis invalidation failed; retrying");
                    tokio::select! {
                        _ = self.shutdown.cancelled() => return Err(SessionError::Shutdown),
                        _ = tokio::time::sleep(delay) => {}
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

    fn record(&mut self, batch: &Batch, report: Report, took: Duration) {
        let m = &self.observed.metrics;
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
    async fn resync(&mut self, sink: &RedisSink, why: &str) -> Result<(), SessionError> {
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

    async fn health_check(
        &mut self,
        source: &Session,
        sink: &RedisSink,
    ) -> Result<(), SessionError> {
        let limit = self.settings.health_interval;
        match tokio::time::timeout(limit, source.connection.client.simple_query("")).await {
            Ok(result) => {
                result.map_err(SourceError::from)?;
            }
            Err(_) => return Err(SessionError::PgTimeout(limit)),
        }
        if source.delivery == Delivery::Outbox {
            let waiting = outbox::backlog(&source.connection.client)
                .await
                .map_err(SourceError::from)?;
            self.observed.metrics.outbox_backlog.set(waiting);
        }
        match tokio::time::timeout(limit, sink.ping()).await {
            Ok(Ok(())) => {
                if self.check_redis_restart(sink).await? {
                    self.resync(sink, "redis restarted or failed over").await?;
                }
                self.set_ready(true);
                if sd_notify::watchdog_enabled().is_some() {
                    let _ = sd_notify::notify(&[sd_notify::NotifyState::Watchdog]);
                }
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
    async fn check_redis_restart(&mut self, sink: &RedisSink) -> Result<bool, SessionError> {
        let info = sink.server_info().await?;
        let identity = Some(format!("{} {}", info.run_id, info.role));
        let changed = self.redis_identity.is_some() && self.redis_identity != identity;
        self.redis_identity = identity;
        Ok(changed)
    }
}

/// Resolves when the oldest scheduled second pass is due; never when none is scheduled.
async fn second_pass_due(queue: &VecDeque<(Instant, Targets)>) {
    match queue.front() {
        Some((due, _)) => tokio::time::sleep_until((*due).into()).await,
        None => std::future::pending().await,
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
