//! What the daemon says about its batches: the per-batch span and the info-level summary.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tracing::info;

use crate::core::batch::Batch;
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

/// How many rejected events a second are logged one by one: a role flooding the channel with
/// forged payloads must not flood the log too. The rest are counted (the metric counts all)
/// and said in one line when the next second's first one is logged.
const REJECTS_LOGGED_PER_SECOND: u64 = 10;

/// The log budget of rejected events. Atomics: the daemon's `&self` methods reject.
#[derive(Default)]
pub struct RejectLog {
    /// The second (since the first rejection) being counted, its lines so far, and the
    /// rejections left out of the log since the last line.
    second: AtomicU64,
    logged: AtomicU64,
    left_out: AtomicU64,
    start: std::sync::OnceLock<Instant>,
}

impl RejectLog {
    /// Whether this rejection gets a line of its own; if so, how many were left out before it.
    pub fn admit(&self) -> Option<u64> {
        let start = *self.start.get_or_init(Instant::now);
        let second = start.elapsed().as_secs();
        if self.second.swap(second, Ordering::Relaxed) != second {
            self.logged.store(0, Ordering::Relaxed);
        }
        if self.logged.fetch_add(1, Ordering::Relaxed) < REJECTS_LOGGED_PER_SECOND {
            Some(self.left_out.swap(0, Ordering::Relaxed))
        } else {
            self.left_out.fetch_add(1, Ordering::Relaxed);
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_flood_of_rejections_is_logged_a_few_a_second() {
        let log = RejectLog::default();
        let admitted = (0..1_000).filter(|_| log.admit().is_some()).count();
        assert_eq!(admitted as u64, REJECTS_LOGGED_PER_SECOND);
    }
}
