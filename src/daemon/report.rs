//! What the daemon says about its batches: the per-batch span and the info-level summary.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tracing::info;

use crate::batch::Batch;
use crate::sink::Report;

/// The span every log line about one batch carries.
pub fn batch_span(batch: &Batch) -> tracing::Span {
    static NEXT: AtomicU64 = AtomicU64::new(1);
    tracing::info_span!(
        "batch",
        id = NEXT.fetch_add(1, Ordering::Relaxed),
        events = batch.event_count(),
        tags = batch.targets.tags.len(),
        table_wide = batch.targets.wide_tables.len(),
    )
}

/// The info-level summary: at most one line a second, however many batches.
#[derive(Default)]
pub struct Summary {
    batches: u64,
    events: u64,
    tags: u64,
    keys: u64,
    last: Option<Instant>,
}

impl Summary {
    /// Whether batches were recorded since the last line.
    pub fn has_news(&self) -> bool {
        self.batches > 0
    }

    pub fn add(&mut self, events: u64, report: Report) {
        self.batches += 1;
        self.events += events;
        self.tags += report.tags;
        self.keys += report.keys;
    }

    pub fn maybe_log(&mut self) {
        if self
            .last
            .is_some_and(|l| l.elapsed() < Duration::from_secs(1))
        {
            return;
        }
        info!(
            batches = self.batches,
            events = self.events,
            tags = self.tags,
            keys = self.keys,
            "invalidated"
        );
        *self = Summary {
            last: Some(Instant::now()),
            ..Summary::default()
        };
    }
}
