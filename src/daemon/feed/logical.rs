//! The `logical` feed: following the replication stream. Changes are folded into a batch until
//! the stream has nothing more waiting (or the batch is full), invalidated, and only then is
//! the end of the last complete transaction confirmed to PostgreSQL.

use std::time::{Duration, Instant};

use tracing::{info, warn};

use super::super::error::SessionError;
use super::super::flush::{FLUSH_TAGS, Flusher};
use super::{Feed, Wake};
use crate::core::folder::marker_content;
use crate::core::wal::Frame;
use crate::schema::slot::{self, SlotState};
use crate::sink::{MarkerTtl, RedisSink};
use crate::source::logical::{self, LogicalStream};
use crate::source::{Session, SourceError};

/// Health intervals the stream may stay silent while catching up before readiness (60 s at
/// the default 5 s). Longer than after readiness (two): before it sends a huge transaction the
/// walsender decodes all of it, saying nothing meanwhile, but a live one sends a keepalive
/// within half its `wal_sender_timeout` (30 s by default) of hearing nothing from us.
const CATCH_UP_SILENCE: u32 = 12;

/// Frames of the stream read into one batch at most (besides the [`FLUSH_TAGS`] bound), so a
/// batch ends while the stream still flows. (`batch_max_events` counts events, of the other
/// deliveries; a frame is a row, a message, a transaction's start or end.)
const FRAMES_PER_BATCH: usize = 10_000;

/// How often a standby looks whether the replication slot is free: the takeover comes this
/// soon after the holder's connection closes.
const STANDBY_POLL: Duration = Duration::from_secs(1);

/// While a batch lingers, the stream wakes the daemon only once this much has arrived (a
/// transaction of one row is ~300 bytes, so about one linger's worth at 9,000 commits a second):
/// otherwise every message of every commit in the linger wakes it for nothing.
const LINGER_WAKE_BYTES: usize = 64 * 1024;

/// The state of the logical feed between frames.
pub(in crate::daemon) struct LogicalFeed {
    stream: LogicalStream,
    /// The slot streamed from, for its lag.
    slot: String,
    /// When the last batch was flushed ([`crate::config::Settings::batch_linger`]).
    last_flush: Option<tokio::time::Instant>,
    /// Part of a huge transaction went to Redis with its markers' TTL deferred; they get it
    /// before the transaction is confirmed.
    markers_owed: bool,
}

impl LogicalFeed {
    /// Makes sure the slot exists (a new one means what happened before is unknown: resync),
    /// starts streaming, and follows the stream until it has delivered everything committed
    /// before this call, so that readiness means caught up, as in outbox mode.
    pub async fn start(
        source: &Session,
        sink: &RedisSink,
        flusher: &mut Flusher,
        redis_restarted: bool,
    ) -> Result<Self, SessionError> {
        let client = &source.connection.client;
        let slot = slot::name(client).await.map_err(SourceError::from)?;
        let state = slot::ensure(client, &slot)
            .await
            .map_err(SourceError::from)?;
        if state == SlotState::Created {
            flusher
                .resync(sink, "new replication slot: earlier changes are unknown")
                .await?;
        } else if redis_restarted {
            flusher
                .resync(sink, "redis restarted or failed over")
                .await?;
        }
        // A slot made before PostgreSQL 17 (or by an older evictd) is not a failover slot:
        // a standby promoted in a failover would not have it.
        let make_failover = slot::failover(client, &slot)
            .await
            .map_err(SourceError::from)?
            == Some(false);
        let stream = loop {
            Self::stand_by_while_held(source, sink, flusher, &slot).await?;
            match LogicalStream::start(
                &flusher.settings,
                &slot,
                source.signing_key.clone(),
                make_failover,
            )
            .await
            {
                Ok(stream) => break stream,
                // Another standby took the slot first.
                Err(e) if e.is_slot_in_use() => continue,
                Err(e) => return Err(e.into()),
            }
        };
        let mut feed = Self {
            stream,
            slot: slot.clone(),
            last_flush: None,
            markers_owed: false,
        };
        // A non-transactional message is decoded at its place in the WAL: when it comes back,
        // every transaction committed before it has been delivered.
        let nonce = format!("{:016x}", rand::random::<u64>());
        logical::write_marker(client, &nonce).await?;
        // A long backlog streams for as long as it takes, but a stream silent for
        // CATCH_UP_SILENCE health intervals (a frozen or half-open connection) is given up.
        // Waiting within that bound is progress (the walsender may decode a large backlog for
        // minutes before the first frame): the wait beats every second.
        let silence = flusher.settings.health_interval * CATCH_UP_SILENCE;
        let shutdown = flusher.shutdown().clone();
        let mut waiting = tokio::time::interval(Duration::from_secs(1));
        let mut last_frame = Instant::now();
        loop {
            let event = tokio::select! {
                _ = shutdown.cancelled() => return Err(SessionError::Shutdown),
                event = feed.stream.recv() => event?,
                _ = waiting.tick() => {
                    if last_frame.elapsed() > silence {
                        return Err(SessionError::StreamSilent(silence));
                    }
                    flusher.observed.liveness.beat();
                    continue;
                }
            };
            last_frame = Instant::now();
            if feed.on_frame(event, sink, flusher, Some(&nonce)).await? {
                break;
            }
        }
        info!(
            slot,
            tls = feed.stream.encrypted(),
            pgoutput = feed.stream.protocol(),
            streaming = feed.stream.protocol() >= 2,
            "caught up with the replication slot"
        );
        Ok(feed)
    }

    /// Waits, quietly, while another daemon streams from `slot`: a hot standby, ready (its
    /// servers answer) and reported by `evictd_standby`, that looks every [`STANDBY_POLL`]
    /// whether the slot is free. A holder that dies frees it as soon as PostgreSQL sees its
    /// connection close (a host that vanishes: after `wal_sender_timeout`).
    async fn stand_by_while_held(
        source: &Session,
        sink: &RedisSink,
        flusher: &mut Flusher,
        slot: &str,
    ) -> Result<(), SessionError> {
        let mut standing_by = false;
        loop {
            let holder = slot::holder(&source.connection.client, slot)
                .await
                .map_err(SourceError::from)?;
            let Some(Some(pid)) = holder else {
                break;
            };
            if !standing_by {
                info!(
                    slot,
                    holder_pid = pid,
                    "another daemon streams from the replication slot; standing by to take over"
                );
                flusher.observed.metrics.standby.set(1);
                standing_by = true;
            }
            flusher.observed.liveness.beat();
            // Ready while the servers answer, as a serving daemon is.
            flusher
                .redis_health(sink, flusher.settings.health_interval)
                .await?;
            let shutdown = flusher.shutdown().clone();
            tokio::select! {
                _ = shutdown.cancelled() => return Err(SessionError::Shutdown),
                _ = tokio::time::sleep(STANDBY_POLL) => {}
            }
        }
        if standing_by {
            info!(slot, "the replication slot is free; taking over");
            flusher.observed.metrics.standby.set(0);
            // Not ready until caught up, as at any start.
            flusher.set_ready(false);
        }
        Ok(())
    }

    /// Folds `first` and every event already waiting into one batch, invalidates it, then
    /// confirms the last complete transaction. Returns whether the caught-up marker carrying
    /// `marker` went by (it ends the batch).
    async fn on_frame(
        &mut self,
        first: Frame,
        sink: &RedisSink,
        flusher: &mut Flusher,
        marker: Option<&str>,
    ) -> Result<bool, SessionError> {
        let stream = &mut self.stream;
        // Under load, the changes arriving in the linger after the previous batch join this
        // one: the first waits at most that long, and Redis gets one call instead of dozens.
        if let Some(flushed) = self.last_flush
            && flushed.elapsed() < flusher.settings.batch_linger
        {
            let quiet = stream.quiet_until(LINGER_WAKE_BYTES);
            tokio::time::sleep_until(flushed + flusher.settings.batch_linger).await;
            drop(quiet);
            // The kernel signals what arrived meanwhile as the socket is restored; the runtime
            // takes notice when it next polls for I/O, which a yielded task waits for. Folding
            // before that would see none of it, and leave it for the batch after the next
            // linger (latency p50 3.8 → 9 ms at 500 commits/s).
            tokio::task::yield_now().await;
        }
        let mut marker_seen = false;
        let threshold = flusher.settings.wide_row_threshold;
        let mut batch = std::mem::take(&mut stream.pending);
        let mut next = Some(first);
        let mut events = 0usize;
        while let Some(event) = next {
            if let Some(m) = marker
                && marker_content(&event) == Some(m.as_bytes())
            {
                marker_seen = true;
                break;
            }
            if let Err(rejected) =
                stream
                    .state
                    .fold(&event, &flusher.settings.rules, threshold, &mut batch)
            {
                flusher.reject(
                    rejected.kind(),
                    rejected.to_string(),
                    "logical decoding message",
                );
            }
            events += 1;
            if batch.targets.len() >= FLUSH_TAGS {
                // Changes arrive only once committed, so part of a transaction can go early;
                // only its end is confirmed late, after its markers got their TTL (deferred:
                // one MSET per call instead of a `SET … PX` per tag, so the entries go sooner).
                let full = std::mem::take(&mut batch);
                self.markers_owed = true;
                flusher.flush_with(sink, full, MarkerTtl::Deferred).await?;
            }
            next = if events < FRAMES_PER_BATCH {
                stream.try_recv()?
            } else {
                None
            };
        }
        if stream.state.in_transaction && !marker_seen && batch.targets.wide_tables.is_empty() {
            // The rest of this transaction is on its way: invalidate it whole (or at the
            // FLUSH_TAGS bound). Nothing is confirmed meanwhile, so a crash replays it. A
            // table gone table-wide is invalidated at once: the rest of a huge transaction can
            // take seconds to stream, and it adds nothing for that table.
            stream.pending = batch;
            return Ok(false);
        }
        self.last_flush = Some(tokio::time::Instant::now());
        if self.markers_owed {
            flusher.flush_with(sink, batch, MarkerTtl::Deferred).await?;
            sink.expire_pending_markers().await?;
            self.markers_owed = false;
        } else {
            flusher.flush(sink, batch).await?;
        }
        if let Some(lsn) = stream.state.confirmable {
            stream.confirm(lsn);
        }
        let streamed = stream.state.take_streamed_commits();
        if streamed > 0 {
            tracing::debug!(
                transactions = streamed,
                "transactions streamed while in progress committed and were invalidated"
            );
        }
        if let Some(tables) = stream.state.take_unruled() {
            warn!(
                tables = %tables.join(", "),
                "changes of published tables without a rule were ignored; run `evictd migrate` after changing the configuration"
            );
        }
        Ok(marker_seen)
    }
}

impl LogicalFeed {}

impl Feed for LogicalFeed {
    /// The next frame of the stream, or a NOTIFY (which only wakes: the events are in the WAL).
    /// Cancel-safe.
    async fn wait(&mut self, source: &mut Session) -> Result<Wake, SessionError> {
        tokio::select! {
            biased;
            notification = source.next_notification() => Ok(Wake::Notification(notification?)),
            frame = self.stream.recv() => Ok(Wake::Frame(frame?)),
        }
    }

    async fn handle(
        &mut self,
        wake: Wake,
        source: &mut Session,
        sink: &RedisSink,
        flusher: &mut Flusher,
    ) -> Result<(), SessionError> {
        match wake {
            Wake::Frame(frame) => {
                self.on_frame(frame, sink, flusher, None).await?;
            }
            Wake::Notification(_) => {
                while source.try_next_notification().is_some() {}
                // Only wake-ups of the other deliveries (see the outbox feed): dropping them
                // loses nothing, but they are counted.
                flusher
                    .observed
                    .metrics
                    .notifications_dropped
                    .inc_by(source.take_dropped());
            }
            Wake::Poll => {}
        }
        Ok(())
    }

    /// The replication path's health: the marker written on the previous tick must have come
    /// back through the stream by now (a half-open replication connection shows no error, just
    /// silence); then a new one is written.
    async fn health(&mut self, source: &Session, flusher: &Flusher) -> Result<(), SessionError> {
        // For the metric only: a role that may not read it loses the figure, not the session.
        match slot::lag_bytes(&source.connection.client, &self.slot).await {
            Ok(Some(lag)) => {
                flusher.observed.metrics.slot_lag_bytes.set(lag);
            }
            Ok(None) => {}
            Err(e) => {
                tracing::debug!(error = %crate::db::describe(&e), "cannot read the slot's lag")
            }
        }
        let stream = &mut self.stream;
        let limit = flusher.settings.health_interval * 2;
        if let Some((_, sent)) = &stream.state.awaiting {
            if sent.elapsed() > limit {
                return Err(SessionError::StreamSilent(limit));
            }
            return Ok(());
        }
        let nonce = format!("{:016x}", rand::random::<u64>());
        logical::write_marker(&source.connection.client, &nonce).await?;
        stream.state.awaiting = Some((nonce, std::time::Instant::now()));
        Ok(())
    }
}
