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

impl Daemon {
    /// Claims, invalidates and acknowledges outbox rows until none are left.
    pub(super) async fn drain_outbox(
        &mut self,
        source: &mut Session,
        sink: &RedisSink,
    ) -> Result<usize, SessionError> {
        let limit = self.settings.batch_max_events as i64;
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
            let claim = outbox::claim(&mut source.connection.client, limit)
                .await
                .map_err(SourceError::from)?;
            let claimed = claim.rows.len();
            if claimed == 0 {
                self.observed.metrics.outbox_backlog.set(0);
                return Ok(total);
            }
            total += claimed;
            let mut batch = Batch::default();
            let mut poison = Vec::new();
            for row in &claim.rows {
                let payload = row.payload();
                let event = match ChangeEvent::parse(payload) {
                    Ok(event) => event,
                    Err(e) => {
                        poison.push((row.id(), self.reject("malformed", e.to_string(), payload)));
                        continue;
                    }
                };
                // A statement of many rows is invalidated in pieces, bounding memory; its row is
                // acknowledged with the rest of the claim, after every piece succeeded.
                for (i, part) in event.split(ROWS_PER_PART).into_iter().enumerate() {
                    if let Err(e) = batch.add_part(&self.settings.rules, &part, i == 0) {
                        poison.push((
                            row.id(),
                            self.reject("unknown_table", e.to_string(), payload),
                        ));
                        break;
                    }
                    if batch.targets.tags.len() >= FLUSH_TAGS {
                        let full = std::mem::take(&mut batch);
                        // On a Redis error the claim is dropped: its rows go back, untouched.
                        self.invalidate_claimed(sink, full).await?;
                    }
                }
            }
            self.invalidate_claimed(sink, batch).await?;
            claim.ack(&poison).await.map_err(SourceError::from)?;
            if claimed < limit as usize {
                return Ok(total);
            }
        }
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
