//! One feed per delivery: where its changes come from, how they become batches, and what
//! acknowledges them once Redis has them. The daemon's loop treats them alike — wait for a
//! feed's wake-up, let it handle it — and every batch goes through the same [`Flusher`]:
//!
//! - [`notify`](NotifyFeed): signed NOTIFY payloads → a batch; nothing to acknowledge; what
//!   happened while nobody listened is unknown, so a start (and a dropped notification) resyncs.
//! - [`outbox`](outbox::OutboxFeed): claims of outbox rows → batches (a huge statement in
//!   pieces) → the claim commits once Redis confirmed; a NOTIFY, the doorbell's busy polling or
//!   the poll wake-up wakes it.
//! - [`logical`](logical::LogicalFeed): the replication stream → a transaction's targets → its
//!   end confirmed to the slot once Redis confirmed.

mod logical;
mod outbox;

use tokio_postgres::Notification;
use tracing::warn;

use super::error::SessionError;
use super::flush::Flusher;
use crate::config::Delivery;
use crate::core::batch::Batch;
use crate::core::event::ChangeEvent;
use crate::core::wal::Frame;
use crate::sink::RedisSink;
use crate::source::Session;
use logical::LogicalFeed;
use outbox::OutboxFeed;

/// What woke a feed.
pub(super) enum Wake {
    /// A NOTIFY on the channel (an event in `notify` delivery, a wake-up otherwise).
    Notification(Notification),
    /// The poll that was due (`outbox`).
    Poll,
    /// A frame of the replication stream (`logical`).
    Frame(Frame),
}

/// What every delivery's feed does once started: wait for what wakes it, handle it (fold,
/// flush, acknowledge), and check its own health on the daemon's tick.
pub(super) trait Feed {
    /// What wakes the feed next. Cancel-safe: the loop waits on it beside its timers.
    async fn wait(&mut self, source: &mut Session) -> Result<Wake, SessionError>;

    /// Turns what woke the feed into batches for Redis, and acknowledges them once Redis has
    /// them. Runs to its end.
    async fn handle(
        &mut self,
        wake: Wake,
        source: &mut Session,
        sink: &RedisSink,
        flusher: &mut Flusher,
    ) -> Result<(), SessionError>;

    /// The delivery's part of the health tick (the outbox's backlog, the replication stream's
    /// liveness marker); nothing by default.
    async fn health(&mut self, _source: &Session, _flusher: &Flusher) -> Result<(), SessionError> {
        Ok(())
    }
}

/// The feed of the delivery the database has installed.
pub(super) enum AnyFeed {
    Notify(NotifyFeed),
    Outbox(OutboxFeed),
    /// Boxed: the stream's buffers and folder state are large beside the others.
    Logical(Box<LogicalFeed>),
}

impl AnyFeed {
    /// Does the delivery's start-up work (resync, backlog drain, catch-up with the slot), after
    /// which the daemon is ready: entries written from then on are never swept by it.
    pub async fn start(
        source: &mut Session,
        sink: &RedisSink,
        flusher: &mut Flusher,
        redis_restarted: bool,
    ) -> Result<Self, SessionError> {
        Ok(match source.delivery {
            Delivery::Notify => AnyFeed::Notify(NotifyFeed::start(sink, flusher).await?),
            Delivery::Outbox => {
                AnyFeed::Outbox(OutboxFeed::start(source, sink, flusher, redis_restarted).await?)
            }
            Delivery::Logical => AnyFeed::Logical(Box::new(
                LogicalFeed::start(source, sink, flusher, redis_restarted).await?,
            )),
        })
    }
}

impl Feed for AnyFeed {
    async fn wait(&mut self, source: &mut Session) -> Result<Wake, SessionError> {
        match self {
            AnyFeed::Notify(feed) => feed.wait(source).await,
            AnyFeed::Outbox(feed) => feed.wait(source).await,
            AnyFeed::Logical(feed) => feed.wait(source).await,
        }
    }

    async fn handle(
        &mut self,
        wake: Wake,
        source: &mut Session,
        sink: &RedisSink,
        flusher: &mut Flusher,
    ) -> Result<(), SessionError> {
        match self {
            AnyFeed::Notify(feed) => feed.handle(wake, source, sink, flusher).await,
            AnyFeed::Outbox(feed) => feed.handle(wake, source, sink, flusher).await,
            AnyFeed::Logical(feed) => feed.handle(wake, source, sink, flusher).await,
        }
    }

    async fn health(&mut self, source: &Session, flusher: &Flusher) -> Result<(), SessionError> {
        match self {
            AnyFeed::Notify(feed) => feed.health(source, flusher).await,
            AnyFeed::Outbox(feed) => feed.health(source, flusher).await,
            AnyFeed::Logical(feed) => feed.health(source, flusher).await,
        }
    }
}

/// The `notify` feed: events travel in the NOTIFY payloads themselves.
pub(super) struct NotifyFeed;

impl NotifyFeed {
    async fn start(sink: &RedisSink, flusher: &mut Flusher) -> Result<Self, SessionError> {
        flusher
            .resync(sink, "start-up: notify mode cannot know what it missed")
            .await?;
        Ok(Self)
    }
}

impl Feed for NotifyFeed {
    async fn wait(&mut self, source: &mut Session) -> Result<Wake, SessionError> {
        Ok(Wake::Notification(source.next_notification().await?))
    }

    /// One notification and whatever others are already waiting (up to `batch_max_events`
    /// events), as one batch. Only signed payloads count: any role may NOTIFY.
    async fn handle(
        &mut self,
        wake: Wake,
        source: &mut Session,
        sink: &RedisSink,
        flusher: &mut Flusher,
    ) -> Result<(), SessionError> {
        let Wake::Notification(first) = wake else {
            return Ok(());
        };
        let mut batch = Batch::default();
        let mut next = Some(first);
        while let Some(n) = next {
            match source
                .signing_key
                .as_ref()
                .map(|key| key.open_str(n.payload()))
            {
                Some(Ok(payload)) => add_payload(flusher, &mut batch, payload),
                Some(Err(forged)) => {
                    flusher.reject("forged", forged.to_string(), n.payload());
                }
                None => {
                    flusher.reject("forged", "no signing key".to_string(), n.payload());
                }
            }
            next = if batch.event_count() < flusher.settings.batch_max_events as u64 {
                source.try_next_notification()
            } else {
                None
            };
        }
        let dropped = source.take_dropped();
        if dropped > 0 {
            flusher
                .observed
                .metrics
                .notifications_dropped
                .inc_by(dropped);
            warn!(
                dropped,
                buffer = flusher.settings.notify_buffer,
                "notifications arrived faster than Redis took them and some were dropped; invalidating every table"
            );
            batch.targets.merge(flusher.settings.rules.all_table_wide());
        }
        flusher.flush(sink, batch).await
    }
}

/// Parses one payload into `batch`; a bad one is logged with its reason, counted and skipped.
fn add_payload(flusher: &Flusher, batch: &mut Batch, payload: &str) {
    let result = ChangeEvent::parse(payload)
        .map_err(|e| ("malformed", e.to_string()))
        .and_then(|event| {
            batch
                .add(&flusher.settings.rules, &event)
                .map_err(|e| ("unknown_table", e.to_string()))
        });
    if let Err((kind, reason)) = result {
        flusher.reject(kind, reason, payload);
    }
}
