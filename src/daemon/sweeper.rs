//! The tag-set hygiene sweep as a background task of the daemon: a paced pass over every tag
//! set each `sweep_interval`, on a Redis connection of its own.

use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::config::Settings;
use crate::metrics::Metrics;
use crate::sink::{RedisSink, SinkOptions};

/// The tag-set hygiene sweep: one paced pass every `interval`, on its own connection, until
/// shutdown. Failures are logged and retried at the next interval.
pub async fn sweep_forever(
    settings: Settings,
    interval: Duration,
    metrics: Metrics,
    shutdown: CancellationToken,
) {
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(interval) => {}
        }
        let sink = match RedisSink::connect(&settings.redis_url, SinkOptions::from(&settings)).await
        {
            Ok(sink) => sink,
            Err(e) => {
                warn!(error = %e, "tag-set sweep skipped");
                continue;
            }
        };
        // Drains a process left when it died or gave up (an `evictd invalidate` cut off by a
        // Redis outage) are finished here rather than at the next daemon start.
        match sink.resume_drains().await {
            Ok(resumed) if resumed.tags > 0 => info!(
                drains = resumed.tags,
                keys = resumed.keys,
                "finished drains another process left"
            ),
            Ok(_) => {}
            Err(e) => warn!(error = %e, "resuming left drains failed"),
        }
        match sink.sweep_tag_sets(settings.sweep_rate, &shutdown).await {
            Ok(removed) => {
                metrics.swept.inc_by(removed);
                if removed > 0 {
                    info!(
                        removed,
                        "tag-set sweep removed members whose entries expired"
                    );
                }
            }
            Err(e) => warn!(error = %e, "tag-set sweep failed"),
        }
    }
}
