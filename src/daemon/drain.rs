//! Draining the outbox: claim a batch of rows (SKIP LOCKED), invalidate them — a huge
//! statement in bounded pieces — and acknowledge only after Redis confirmed; poison rows go to
//! the dead-letter table with their reason.

use std::time::Instant;

use tracing::Instrument as _;

use super::report::batch_span;
use super::{Daemon, FLUSH_TAGS, ROWS_PER_PART, SessionError};
use crate::batch::Batch;
use crate::event::ChangeEvent;
use crate::sink::RedisSink;
use crate::source::{Session, SourceError, outbox};

/// Claims taken in one transaction before it is committed: while Redis invalidates one claim's
/// events, PostgreSQL already deletes (takes) the next rows, instead of each waiting for the
/// other. Bounds how much one commit (or a crash before it) covers.
const TAKES_PER_TRANSACTION: usize = 4;

impl Daemon {
    /// Claims, invalidates and acknowledges outbox rows until none are left.
    pub(super) async fn drain_outbox(
        &mut self,
        source: &mut Session,
        sink: &RedisSink,
    ) -> Result<usize, SessionError> {
        let limit = self.settings.batch_max_events;
        let mut total = 0;
        loop {
            // Wake-ups that arrived meanwhile are answered by this very drain.
            while let Some(n) = source.try_next_notification() {
                if !n.payload().is_empty() {
                    let mut batch = Batch::default();
                    self.add_payload(&mut batch, n.payload());
                    self.flush(sink, batch).await?;
                }
            }
            let claim = outbox::begin(&mut source.connection.client)
                .await
                .map_err(SourceError::from)?;
            let mut rows = claim.take(limit as i64).await.map_err(SourceError::from)?;
            if rows.is_empty() {
                self.observed.metrics.outbox_backlog.set(0);
                return Ok(total);
            }
            let mut poison = Vec::new();
            let mut takes = 1;
            let more = loop {
                total += rows.len();
                let full = rows.len() == limit;
                let batch = self.fold_claimed(sink, &rows, &mut poison).await?;
                drop(rows);
                if !full || takes == TAKES_PER_TRANSACTION {
                    // On a Redis error the claim is dropped: its rows go back, untouched.
                    self.invalidate_claimed(sink, batch).await?;
                    break full;
                }
                // Two servers, two waits: overlap them.
                let (invalidated, next) = tokio::join!(
                    self.invalidate_claimed(sink, batch),
                    claim.take(limit as i64)
                );
                invalidated?;
                rows = next.map_err(SourceError::from)?;
                takes += 1;
                if rows.is_empty() {
                    break false;
                }
            };
            claim.ack(&poison).await.map_err(SourceError::from)?;
            if !more {
                return Ok(total);
            }
        }
    }

    /// Parses claimed rows into a batch; a statement of many rows is invalidated in pieces
    /// along the way, bounding memory (its row is acknowledged with the rest of the claim,
    /// after every piece succeeded). Unusable rows are added to `poison`.
    async fn fold_claimed(
        &mut self,
        sink: &RedisSink,
        rows: &[outbox::OutboxRow],
        poison: &mut Vec<outbox::Poison>,
    ) -> Result<Batch, SessionError> {
        let mut batch = Batch::default();
        for row in rows {
            let payload = row.payload();
            let event = match ChangeEvent::parse(payload) {
                Ok(event) => event,
                Err(e) => {
                    let reason = self.reject("malformed", e.to_string(), payload);
                    poison.push(outbox::Poison::new(row, reason));
                    continue;
                }
            };
            for (i, part) in event.split(ROWS_PER_PART).into_iter().enumerate() {
                if let Err(e) = batch.add_part(&self.settings.rules, &part, i == 0) {
                    let reason = self.reject("unknown_table", e.to_string(), payload);
                    poison.push(outbox::Poison::new(row, reason));
                    break;
                }
                if batch.targets.tags.len() >= FLUSH_TAGS {
                    let full = std::mem::take(&mut batch);
                    self.invalidate_claimed(sink, full).await?;
                }
            }
        }
        Ok(batch)
    }

    /// Invalidates a batch drawn from claimed outbox rows (not yet acknowledged), records it and
    /// schedules its second pass.
    async fn invalidate_claimed(
        &mut self,
        sink: &RedisSink,
        batch: Batch,
    ) -> Result<(), SessionError> {
        if batch.is_empty() {
            return Ok(());
        }
        let started = Instant::now();
        let span = batch_span(&batch);
        let report = sink
            .invalidate(&batch.targets)
            .instrument(span.clone())
            .await?;
        if let Some(delay) = self.settings.second_pass {
            self.schedule_second_pass(delay, &batch.targets);
        }
        span.in_scope(|| self.record(&batch, report, started.elapsed()));
        Ok(())
    }
}
