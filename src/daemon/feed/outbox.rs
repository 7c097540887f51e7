//! The `outbox` feed: woken by a NOTIFY, the doorbell's busy polling or the poll wake-up, it
//! claims a batch of rows (SKIP LOCKED), hands them to Redis — a huge statement in bounded
//! pieces — and acknowledges (commits the claim) only after Redis confirmed; poison rows go to
//! the dead-letter table with their reason.

use std::time::{Duration, Instant};

use tokio_util::task::AbortOnDropHandle;
use tracing::{Instrument as _, Span, debug};

use super::super::error::SessionError;
use super::super::flush::{FLUSH_TAGS, Flusher};
use super::super::report::batch_span;
use super::{Feed, Wake};
use crate::config::Wakeup;
use crate::core::batch::{Batch, SentTags};
use crate::core::event::ChangeEvent;
use crate::sink::{MarkerTtl, RedisSink, Report, SinkError};
use crate::source::{Session, SourceError, doorbell, outbox};

/// A many-row event is folded into batches this many rows at a time (bounding memory whatever
/// the size of a statement).
const ROWS_PER_PART: usize = 5_000;
/// Safety poll of the outbox even without a wake-up NOTIFY.
const OUTBOX_POLL: Duration = Duration::from_secs(1);
/// The poll interval in `poll` wake-up mode while the outbox has rows: long enough that each
/// claim takes a batch worth the round trips, short enough to stay far under 100 ms of lag.
const OUTBOX_POLL_BUSY: Duration = Duration::from_millis(10);

/// Claims taken in one transaction before it is committed: while Redis invalidates one claim's
/// events, PostgreSQL already deletes (takes) the next rows, instead of each waiting for the
/// other. Bounds how much one commit (or a crash before it) covers.
const TAKES_PER_TRANSACTION: usize = 4;
/// A statement cut into parts is sent to Redis in batches of this many tags: half of
/// `FLUSH_TAGS`, since two are alive at once (one in flight, one being rendered) besides the
/// statement's own payload. Small events fill batches up to `FLUSH_TAGS`, so that a full claim
/// of them (`batch_max_events`) stays one batch, invalidated while the next claim is taken.
const PIECE_TAGS: usize = FLUSH_TAGS / 2;

/// Polls while the doorbell says busy: often enough that an event waits about a millisecond…
const DOORBELL_BUSY_POLL: Duration = Duration::from_millis(1);
/// …and this many quiet polls in a row make it idle.
const DOORBELL_QUIET_POLLS: u32 = 5;
/// A drain must find at least this many events to make (or keep) the daemon busy; one that
/// finds fewer is quiet. At a low rate each wake-up finds one event: writers keep ringing, and
/// each event goes at once instead of waiting for the next poll (at 500 commits/s, latency
/// p50 / p99 1.5 / 2.6 → 0.35 / 0.55 ms); under load each poll finds several. With 2, a poll
/// period of ~2 ms (tokio rounds the 1-ms timer up) at 500 commits/s often found 2 and the
/// daemon stayed busy.
const DOORBELL_BUSY_EVENTS: usize = 3;
/// A busy daemon whose drain finds this many events is falling behind writers that no longer
/// ring (on shared cores, unthrottled writers starve the daemon of CPU: with
/// `synchronous_commit = off` lag p99 grew to 25–70 ms): it asks them to ring again, and the
/// NOTIFY's commit lock holds them back, until a drain finds under a quarter of this.
const DOORBELL_THROTTLE_EVENTS: usize = 100;
/// How soon a barrier that did not pass is tried again at first (doubling up to `OUTBOX_POLL`).
const DOORBELL_RETRY: Duration = Duration::from_millis(1);

/// Where the daemon is in the doorbell's cycle (`outbox` delivery, `doorbell` wake-up; see
/// `source::doorbell`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Doorbell {
    /// Writers ring; the daemon drains when they do (or at the safety poll).
    Idle,
    /// The daemon polls. `quiet`: polls in a row that found fewer than
    /// [`DOORBELL_BUSY_EVENTS`]. `ringing`: writers were asked to ring again, as the daemon was
    /// falling behind ([`DOORBELL_THROTTLE_EVENTS`]); otherwise they do not ring.
    Busy { quiet: u32, ringing: bool },
    /// Set back to idle, but the barrier has not passed: the last drain is owed, tried again
    /// after `retry`.
    BarrierOwed { retry: Duration },
}

impl Doorbell {
    /// How long the session loop may wait before the next [`OutboxFeed::drain_and_ring`].
    fn next_poll(self) -> Duration {
        match self {
            Doorbell::Idle => OUTBOX_POLL,
            // Work was just found: straight back.
            Doorbell::Busy { quiet: 0, .. } => Duration::ZERO,
            Doorbell::Busy { .. } => DOORBELL_BUSY_POLL,
            Doorbell::BarrierOwed { retry } => retry,
        }
    }

    /// The next step after a drain (not the barrier's) that found `found` events, and what
    /// writers must now be told: `Some(true)` that the daemon is busy (they need not ring),
    /// `Some(false)` that they must ring. Leaving `Busy` owes the barrier before the last drain.
    fn after_drain(self, found: usize) -> (Doorbell, Option<bool>) {
        let loaded = found >= DOORBELL_BUSY_EVENTS;
        match self {
            Doorbell::Idle | Doorbell::BarrierOwed { .. } if !loaded => (Doorbell::Idle, None),
            Doorbell::Idle | Doorbell::BarrierOwed { .. } => (
                Doorbell::Busy {
                    quiet: 0,
                    ringing: false,
                },
                Some(true),
            ),
            Doorbell::Busy { ringing: false, .. } if found >= DOORBELL_THROTTLE_EVENTS => (
                Doorbell::Busy {
                    quiet: 0,
                    ringing: true,
                },
                Some(false),
            ),
            Doorbell::Busy { ringing: true, .. }
                if loaded && found < DOORBELL_THROTTLE_EVENTS / 4 =>
            {
                (
                    Doorbell::Busy {
                        quiet: 0,
                        ringing: false,
                    },
                    Some(true),
                )
            }
            Doorbell::Busy { ringing, .. } if loaded => {
                (Doorbell::Busy { quiet: 0, ringing }, None)
            }
            Doorbell::Busy { quiet, ringing } if quiet + 1 < DOORBELL_QUIET_POLLS => (
                Doorbell::Busy {
                    quiet: quiet + 1,
                    ringing,
                },
                None,
            ),
            Doorbell::Busy { ringing, .. } => (
                Doorbell::BarrierOwed {
                    retry: DOORBELL_RETRY,
                },
                (!ringing).then_some(false),
            ),
        }
    }
}

/// The invalidation of one batch of claimed events, running as a task of its own so that
/// Redis works on it while this task parses and renders the next batch (or claims the next
/// rows) — the two took turns before, leaving Redis idle in between. At most one is in flight,
/// so memory stays bounded at two batches. Dropping it (an error elsewhere, shutdown) aborts
/// the task; the claim then goes back unacknowledged and is invalidated again.
struct InFlight {
    task: AbortOnDropHandle<(Batch, Result<Report, SinkError>)>,
    span: Span,
    started: Instant,
}

/// What the invalidation of one drain transaction's claims has under way.
#[derive(Default)]
struct ClaimWork {
    in_flight: Option<InFlight>,
    /// A piece of a huge statement was sent with its `tagts` TTLs deferred
    /// ([`MarkerTtl::Deferred`]): they are set before the transaction is acknowledged.
    markers_owed: bool,
}

/// The state of the outbox feed between wake-ups.
pub(in crate::daemon) struct OutboxFeed {
    wakeup: Wakeup,
    /// `doorbell` wake-up: where the daemon is in the doorbell's cycle.
    doorbell: Doorbell,
    /// How long until the next poll, and when it is due.
    poll_every: Duration,
    next_poll: tokio::time::Instant,
    /// The claim's statement, prepared on this session's connection.
    take: outbox::TakeStatement,
}

impl OutboxFeed {
    /// The start-up work: a Redis that restarted meanwhile is resynced; a doorbell a dead
    /// daemon left busy is set back; the backlog is drained.
    pub async fn start(
        source: &mut Session,
        sink: &RedisSink,
        flusher: &mut Flusher,
        redis_restarted: bool,
    ) -> Result<Self, SessionError> {
        if redis_restarted {
            flusher
                .resync(sink, "redis restarted or failed over")
                .await?;
        }
        let mut feed = Self {
            wakeup: source.wakeup,
            doorbell: Doorbell::Idle,
            poll_every: OUTBOX_POLL,
            next_poll: tokio::time::Instant::now(),
            take: outbox::prepare_take(&source.connection.client)
                .await
                .map_err(SourceError::from)?,
        };
        if source.wakeup == Wakeup::Doorbell {
            // A daemon that died draining left the doorbell telling writers not to ring: set
            // it back, and drain after the barrier as any idle daemon does.
            doorbell::set_busy(&source.connection.client, false)
                .await
                .map_err(SourceError::from)?;
            feed.doorbell = Doorbell::BarrierOwed {
                retry: DOORBELL_RETRY,
            };
        }
        feed.drain_and_ring(source, sink, flusher).await?;
        // Without the poll wake-up the poll is a safety net, or the doorbell's busy polling.
        feed.poll_every = if feed.polling() {
            OUTBOX_POLL_BUSY
        } else {
            feed.doorbell.next_poll()
        };
        feed.next_poll = tokio::time::Instant::now() + feed.poll_every;
        Ok(feed)
    }

    fn polling(&self) -> bool {
        self.wakeup == Wakeup::Poll
    }

    /// A wake-up and every other already waiting, answered by one drain. What they say is
    /// ignored: any role may NOTIFY, and the events are in the table; a dropped one costs
    /// nothing, the drain reads everything.
    async fn on_wake_up(
        &mut self,
        source: &mut Session,
        sink: &RedisSink,
        flusher: &mut Flusher,
    ) -> Result<(), SessionError> {
        while source.try_next_notification().is_some() {}
        // Wake-ups carry nothing: the drain below answers the dropped ones too.
        flusher
            .observed
            .metrics
            .notifications_dropped
            .inc_by(source.take_dropped());
        self.drain_and_ring(source, sink, flusher).await?;
        Ok(())
    }

    /// Drains the outbox; with `doorbell` wake-up, takes the [`Doorbell`] one step further
    /// ([`Doorbell::after_drain`]): a drain that found [`DOORBELL_BUSY_EVENTS`] or more tells
    /// writers the daemon is busy (they skip their NOTIFY) and the daemon polls instead (one
    /// that finds [`DOORBELL_THROTTLE_EVENTS`] asks them to ring again for a while); after
    /// [`DOORBELL_QUIET_POLLS`] polls in a row that found fewer it tells them it is idle and,
    /// once the barrier passed (every writer that saw it busy has ended), drains a last time.
    /// The session loop calls again after [`Doorbell::next_poll`]. Returns the events drained.
    async fn drain_and_ring(
        &mut self,
        source: &mut Session,
        sink: &RedisSink,
        flusher: &mut Flusher,
    ) -> Result<usize, SessionError> {
        if source.wakeup != Wakeup::Doorbell {
            return Self::drain_outbox(source, &self.take, sink, flusher).await;
        }
        let mut total = 0;
        loop {
            if let Doorbell::BarrierOwed { retry } = self.doorbell {
                if !doorbell::barrier_passed(&source.connection.client)
                    .await
                    .map_err(SourceError::from)?
                {
                    debug!("doorbell barrier: a writer that saw the daemon busy has not ended");
                    self.doorbell = Doorbell::BarrierOwed {
                        retry: (retry * 2).min(OUTBOX_POLL),
                    };
                    return Ok(total);
                }
                self.doorbell = Doorbell::Idle;
            }
            let found = Self::drain_outbox(source, &self.take, sink, flusher).await?;
            total += found;
            let (next, tell_writers) = self.doorbell.after_drain(found);
            if let Some(busy) = tell_writers {
                doorbell::set_busy(&source.connection.client, busy)
                    .await
                    .map_err(SourceError::from)?;
            }
            self.doorbell = next;
            if matches!(next, Doorbell::BarrierOwed { .. }) {
                // Straight to the barrier and, once it passes, the last drain.
                continue;
            }
            return Ok(total);
        }
    }

    /// Claims, invalidates and acknowledges outbox rows until none are left.
    async fn drain_outbox(
        source: &mut Session,
        take: &outbox::TakeStatement,
        sink: &RedisSink,
        flusher: &mut Flusher,
    ) -> Result<usize, SessionError> {
        let limit = flusher.settings.batch_max_events;
        let mut total = 0;
        loop {
            // Wake-ups that arrived meanwhile are answered by this very drain. What they say
            // is ignored: any role may NOTIFY, and the events are in the table.
            while source.try_next_notification().is_some() {}
            let claim = outbox::begin(&source.connection.client, take);
            let mut poison = Vec::new();
            let mut work = ClaimWork::default();
            let mut takes = 0;
            let more = loop {
                let rows = claim.take(limit as i64).await.map_err(SourceError::from)?;
                takes += 1;
                let (batch, taken) =
                    Self::fold_claimed(sink, flusher, rows, &mut poison, &mut work).await?;
                if taken == 0 && takes == 1 {
                    claim.release().await.map_err(SourceError::from)?;
                    flusher.observed.metrics.outbox_backlog.set(0);
                    return Ok(total);
                }
                total += taken;
                let full = taken == limit;
                if !full || takes == TAKES_PER_TRANSACTION {
                    // Nothing left to overlap with: invalidated right here, which spares the
                    // common small claim two hops between threads.
                    Self::land(flusher, work.in_flight.take()).await?;
                    // After pieces whose markers wait for their TTL, this batch's may too:
                    // they all get it just below, before the acknowledgement.
                    let marker_ttl = if work.markers_owed {
                        MarkerTtl::Deferred
                    } else {
                        MarkerTtl::Now
                    };
                    Self::invalidate_claimed(sink, flusher, batch, marker_ttl).await?;
                    break full;
                }
                // PostgreSQL deletes the next rows while Redis invalidates these.
                Self::send_claimed(sink, flusher, batch, MarkerTtl::Now, &mut work).await?;
            };
            // On a Redis error the claim is dropped: its rows go back, untouched.
            Self::land(flusher, work.in_flight.take()).await?;
            if work.markers_owed {
                sink.expire_pending_markers().await?;
            }
            claim.ack(&poison).await.map_err(SourceError::from)?;
            if !more {
                return Ok(total);
            }
        }
    }

    /// Parses claimed rows into a batch as they arrive, and how many there were; a statement
    /// of many rows is sent to Redis in pieces along the way, bounding memory (its rows are
    /// acknowledged with the rest of the claim, after every piece succeeded), and tags the
    /// pieces share are sent only until they recur ([`SentTags`]). Unusable rows are added to
    /// `poison`.
    async fn fold_claimed(
        sink: &RedisSink,
        flusher: &mut Flusher,
        mut rows: outbox::Taken,
        poison: &mut Vec<outbox::Poison>,
        work: &mut ClaimWork,
    ) -> Result<(Batch, usize), SessionError> {
        let mut batch = Batch::default();
        let mut sent = SentTags::default();
        let mut taken = 0;
        while let Some(row) = rows.next().await {
            let row = row.map_err(SourceError::from)?;
            taken += 1;
            let payload = row.payload();
            let event = match ChangeEvent::parse(payload) {
                Ok(event) => event,
                Err(e) => {
                    let reason = flusher.reject("malformed", e.to_string(), payload);
                    poison.push(outbox::Poison::new(&row, reason));
                    continue;
                }
            };
            let parts = event.parts(ROWS_PER_PART);
            // A statement cut into parts goes in smaller pieces, and its entries go first: the
            // markers' TTLs wait for the whole statement.
            let (bound, marker_ttl) = if parts.len() > 1 {
                (PIECE_TAGS, MarkerTtl::Deferred)
            } else {
                (FLUSH_TAGS, MarkerTtl::Now)
            };
            for (i, part) in parts.into_iter().enumerate() {
                if let Err(e) = batch.add_part(&flusher.settings.rules, &event, part, i == 0) {
                    let reason = flusher.reject("unknown_table", e.to_string(), payload);
                    poison.push(outbox::Poison::new(&row, reason));
                    break;
                }
                if batch.targets.len() >= bound {
                    let mut full = std::mem::take(&mut batch);
                    sent.prune(&mut full);
                    Self::send_claimed(sink, flusher, full, marker_ttl, work).await?;
                }
            }
        }
        if sent.any() {
            sent.prune(&mut batch);
        }
        Ok((batch, taken))
    }

    /// Starts invalidating a batch drawn from claimed outbox rows (not yet acknowledged) once
    /// the one in flight has landed, and schedules its second pass.
    async fn send_claimed(
        sink: &RedisSink,
        flusher: &mut Flusher,
        batch: Batch,
        marker_ttl: MarkerTtl,
        work: &mut ClaimWork,
    ) -> Result<(), SessionError> {
        if batch.is_empty() {
            return Ok(());
        }
        Self::land(flusher, work.in_flight.take()).await?;
        work.markers_owed |= marker_ttl == MarkerTtl::Deferred;
        flusher.schedule_second_pass(&batch);
        let span = batch_span(&batch);
        let sink = sink.clone();
        let task = tokio::spawn(
            async move {
                let report = sink.invalidate_with(&batch.targets, marker_ttl).await;
                (batch, report)
            }
            .instrument(span.clone()),
        );
        work.in_flight = Some(InFlight {
            task: AbortOnDropHandle::new(task),
            span,
            started: Instant::now(),
        });
        Ok(())
    }

    /// Invalidates a batch drawn from claimed outbox rows (not yet acknowledged), records it and
    /// schedules its second pass.
    async fn invalidate_claimed(
        sink: &RedisSink,
        flusher: &mut Flusher,
        batch: Batch,
        marker_ttl: MarkerTtl,
    ) -> Result<(), SessionError> {
        if batch.is_empty() {
            return Ok(());
        }
        flusher.schedule_second_pass(&batch);
        let started = Instant::now();
        let span = batch_span(&batch);
        let report = sink
            .invalidate_with(&batch.targets, marker_ttl)
            .instrument(span.clone())
            .await?;
        span.in_scope(|| flusher.record(&batch, report, started.elapsed()));
        Ok(())
    }

    /// Waits for the batch in flight, if any, and records it.
    async fn land(flusher: &mut Flusher, in_flight: Option<InFlight>) -> Result<(), SessionError> {
        let Some(InFlight {
            task,
            span,
            started,
        }) = in_flight
        else {
            return Ok(());
        };
        let (batch, report) = task.await.map_err(SessionError::Invalidation)?;
        let report = report?;
        span.in_scope(|| flusher.record(&batch, report, started.elapsed()));
        Ok(())
    }
}

impl Feed for OutboxFeed {
    /// A wake-up NOTIFY, or the poll that is due. Cancel-safe.
    async fn wait(&mut self, source: &mut Session) -> Result<Wake, SessionError> {
        tokio::select! {
            biased;
            () = tokio::time::sleep_until(self.next_poll) => Ok(Wake::Poll),
            notification = source.next_notification() => Ok(Wake::Notification(notification?)),
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
            Wake::Poll => {
                let found = self.drain_and_ring(source, sink, flusher).await?;
                if self.polling() {
                    // Adaptive: straight back while there is work, backing off when idle.
                    self.poll_every = if found > 0 {
                        OUTBOX_POLL_BUSY
                    } else {
                        (self.poll_every * 2).min(flusher.settings.outbox_poll_max)
                    };
                } else {
                    self.poll_every = self.doorbell.next_poll();
                }
                self.next_poll = tokio::time::Instant::now() + self.poll_every;
            }
            Wake::Notification(_) => {
                self.on_wake_up(source, sink, flusher).await?;
                if !self.polling() {
                    self.next_poll = self
                        .next_poll
                        .min(tokio::time::Instant::now() + self.doorbell.next_poll());
                }
            }
            Wake::Frame(_) => {}
        }
        Ok(())
    }

    /// The outbox's backlog, for the metric.
    async fn health(&mut self, source: &Session, flusher: &Flusher) -> Result<(), SessionError> {
        let backlog = outbox::backlog(&source.connection.client)
            .await
            .map_err(SourceError::from)?;
        let metrics = &flusher.observed.metrics;
        metrics.outbox_backlog.set(backlog.waiting);
        metrics
            .outbox_oldest_age_seconds
            .set(backlog.oldest_age_seconds);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BUSY: Doorbell = Doorbell::Busy {
        quiet: 0,
        ringing: false,
    };

    /// The states a run of drains goes through, and what writers were told on the way.
    fn run(from: Doorbell, drains: &[usize]) -> Vec<(Doorbell, Option<bool>)> {
        let mut state = from;
        drains
            .iter()
            .map(|&found| {
                let step = state.after_drain(found);
                state = step.0;
                step
            })
            .collect()
    }

    #[test]
    fn one_event_at_a_time_stays_idle() {
        assert_eq!(
            run(Doorbell::Idle, &[1, 2, 1, 0]),
            vec![(Doorbell::Idle, None); 4]
        );
    }

    #[test]
    fn several_events_make_it_busy_and_quiet_polls_owe_the_barrier() {
        let steps = run(Doorbell::Idle, &[3, 1, 0, 2, 1, 0]);
        assert_eq!(steps[0], (BUSY, Some(true)));
        assert_eq!(
            steps[4].0,
            Doorbell::Busy {
                quiet: 4,
                ringing: false
            }
        );
        assert_eq!(
            steps[5],
            (
                Doorbell::BarrierOwed {
                    retry: DOORBELL_RETRY
                },
                Some(false)
            )
        );
    }

    #[test]
    fn falling_behind_asks_writers_to_ring_until_caught_up() {
        let steps = run(BUSY, &[150, 60, 30, 10, 20]);
        let ringing = Doorbell::Busy {
            quiet: 0,
            ringing: true,
        };
        assert_eq!(steps[0], (ringing, Some(false)));
        assert_eq!(steps[1], (ringing, None));
        assert_eq!(steps[2], (ringing, None), "a quarter is the way back");
        assert_eq!(steps[3], (BUSY, Some(true)));
        assert_eq!(steps[4], (BUSY, None));
    }

    #[test]
    fn ringing_writers_need_no_second_telling_when_the_daemon_goes_idle() {
        let ringing = Doorbell::Busy {
            quiet: DOORBELL_QUIET_POLLS - 1,
            ringing: true,
        };
        assert_eq!(
            ringing.after_drain(0),
            (
                Doorbell::BarrierOwed {
                    retry: DOORBELL_RETRY
                },
                None
            )
        );
    }
}
