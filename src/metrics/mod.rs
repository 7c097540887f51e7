//! Every metric evictd exports lives here, named `evictd_*`, with low-cardinality labels only
//! (table, op, kind, server — never a tag or key). Updated per batch, not per event. Beside
//! them, the process's own figures under their usual `process_*` names (`process`).

mod process;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::metrics::info::Info;
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct EventLabels {
    pub table: String,
    pub op: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabels {
    pub kind: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ServerLabels {
    pub server: String,
}

/// The daemon's metrics. Cloning shares the underlying values.
#[derive(Clone)]
pub struct Metrics {
    /// Change events processed, by table and operation.
    pub events: Family<EventLabels, Counter>,
    /// Events skipped as malformed or unknown, by reason.
    pub events_rejected: Family<KindLabels, Counter>,
    /// Batches flushed to Redis.
    pub batches: Counter,
    /// Tags invalidated.
    pub tags_invalidated: Counter,
    /// Cache entries removed.
    pub keys_invalidated: Counter,
    /// Table-wide invalidations (TRUNCATE, large statements, resyncs).
    pub table_wide: Counter,
    /// Errors, by kind (`postgres`, `redis`).
    pub errors: Family<KindLabels, Counter>,
    /// Reconnections, by server.
    pub reconnects: Family<ServerLabels, Counter>,
    /// Events waiting in `evictd.outbox` at the last look.
    pub outbox_backlog: Gauge,
    /// Age of the oldest event waiting in `evictd.outbox` at the last look (0 when none).
    pub outbox_oldest_age_seconds: Gauge<f64, std::sync::atomic::AtomicU64>,
    /// WAL the replication slot holds back (`logical`), at the last look; -1 until measured
    /// (and in the other deliveries).
    pub slot_lag_bytes: Gauge,
    /// When Redis last confirmed a batch (Unix time, seconds).
    pub last_batch_timestamp_seconds: Gauge<f64, std::sync::atomic::AtomicU64>,
    /// Notifications dropped because the buffer (`notify_buffer`) was full.
    pub notifications_dropped: Counter,
    /// Seconds from the statement to its invalidation in Redis (the oldest event of each batch).
    pub lag_seconds: Histogram,
    /// 1 when ready (listening, both servers answer), else 0.
    pub ready: Gauge,
    /// 1 while standing by for a replication slot another daemon holds (`logical`), else 0.
    pub standby: Gauge,
    /// Tag-set members removed by the hygiene sweep because their entry had expired.
    pub swept: Counter,
}

impl Metrics {
    /// Creates the metrics and registers them in a new registry.
    pub fn new() -> (Self, Registry) {
        let metrics = Self {
            events: Family::default(),
            events_rejected: Family::default(),
            batches: Counter::default(),
            tags_invalidated: Counter::default(),
            keys_invalidated: Counter::default(),
            table_wide: Counter::default(),
            errors: Family::default(),
            reconnects: Family::default(),
            outbox_backlog: Gauge::default(),
            outbox_oldest_age_seconds: Gauge::default(),
            slot_lag_bytes: Gauge::default(),
            last_batch_timestamp_seconds: Gauge::default(),
            notifications_dropped: Counter::default(),
            // 0.5 ms .. ~65 s
            lag_seconds: Histogram::new(exponential_buckets(0.0005, 2.0, 18)),
            ready: Gauge::default(),
            standby: Gauge::default(),
            swept: Counter::default(),
        };
        metrics.slot_lag_bytes.set(-1);
        // Known label values start at zero, so alerts and dashboards see the series from the
        // first scrape rather than after the first error.
        for kind in ["postgres", "redis"] {
            metrics.error_family_touch(kind);
        }
        for kind in ["malformed", "unknown_table"] {
            let _ = metrics.events_rejected.get_or_create(&KindLabels {
                kind: kind.to_string(),
            });
        }
        let mut root = Registry::default();
        root.register_collector(Box::new(process::ProcessCollector));
        let registry = root.sub_registry_with_prefix("evictd");
        registry.register(
            "build",
            "The running build (its version as a label; always 1)",
            Info::new(vec![("version", env!("CARGO_PKG_VERSION"))]),
        );
        registry.register(
            "events",
            "Change events processed, by table and operation",
            metrics.events.clone(),
        );
        registry.register(
            "events_rejected",
            "Events skipped as malformed or unmappable, by reason",
            metrics.events_rejected.clone(),
        );
        registry.register(
            "batches",
            "Batches flushed to Redis",
            metrics.batches.clone(),
        );
        registry.register(
            "tags_invalidated",
            "Tags invalidated",
            metrics.tags_invalidated.clone(),
        );
        registry.register(
            "keys_invalidated",
            "Cache entries removed",
            metrics.keys_invalidated.clone(),
        );
        registry.register(
            "table_wide_invalidations",
            "Table-wide invalidations",
            metrics.table_wide.clone(),
        );
        registry.register("errors", "Errors by kind", metrics.errors.clone());
        registry.register(
            "reconnects",
            "Reconnections by server",
            metrics.reconnects.clone(),
        );
        registry.register(
            "outbox_backlog",
            "Events waiting in evictd.outbox",
            metrics.outbox_backlog.clone(),
        );
        registry.register(
            "outbox_oldest_event_age_seconds",
            "Age of the oldest event waiting in evictd.outbox (0 when none)",
            metrics.outbox_oldest_age_seconds.clone(),
        );
        registry.register(
            "replication_slot_lag_bytes",
            "WAL the replication slot holds back (logical delivery; -1 until measured)",
            metrics.slot_lag_bytes.clone(),
        );
        registry.register(
            "last_batch_timestamp_seconds",
            "When Redis last confirmed a batch (Unix time)",
            metrics.last_batch_timestamp_seconds.clone(),
        );
        registry.register(
            "notifications_dropped",
            "Notifications dropped because the buffer (notify_buffer) was full",
            metrics.notifications_dropped.clone(),
        );
        registry.register(
            "lag_seconds",
            "Seconds from statement to invalidation",
            metrics.lag_seconds.clone(),
        );
        registry.register("ready", "1 when ready", metrics.ready.clone());
        registry.register(
            "standby",
            "1 while standing by for the replication slot another daemon holds",
            metrics.standby.clone(),
        );
        registry.register(
            "tag_members_swept",
            "Tag-set members removed because their entry expired",
            metrics.swept.clone(),
        );
        (metrics, root)
    }

    fn error_family_touch(&self, server: &str) {
        let _ = self.errors.get_or_create(&KindLabels {
            kind: server.to_string(),
        });
        let _ = self.reconnects.get_or_create(&ServerLabels {
            server: server.to_string(),
        });
    }

    pub fn error(&self, kind: &str) {
        self.errors_by(kind, 1);
    }

    pub fn errors_by(&self, kind: &str, n: u64) {
        self.errors
            .get_or_create(&KindLabels {
                kind: kind.to_string(),
            })
            .inc_by(n);
    }

    pub fn rejected(&self, kind: &str) {
        self.events_rejected
            .get_or_create(&KindLabels {
                kind: kind.to_string(),
            })
            .inc();
    }

    pub fn reconnect(&self, server: &str) {
        self.reconnects
            .get_or_create(&ServerLabels {
                server: server.to_string(),
            })
            .inc();
    }
}
