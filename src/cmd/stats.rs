//! `evictd stats`: one JSON object, shaped like the application's own stats endpoint.

use std::time::Duration;

use serde_json::{Value, json};

use crate::cmd::invalidate::Progress;
use crate::config::Settings;
use crate::sink::{RedisSink, SinkOptions};
use crate::{db, schema};

pub async fn stats(settings: &Settings) -> anyhow::Result<()> {
    let sink = RedisSink::connect(&settings.redis_url, SinkOptions::from(settings)).await?;
    let info = sink.server_info().await?;
    let progress = Progress::new();
    let cache = sink
        .cache_stats(&|seen| progress.say(&format!("{seen} keys examined")))
        .await?;
    progress.done();
    let hit_rate = hit_rate(info.keyspace_hits, info.keyspace_misses);
    let counter = |name: &str| cache.counters.get(name).copied().unwrap_or(0);
    let report = json!({
        "totalEntries": cache.total_entries,
        "expiredEntries": cache.expired_entries,
        "hitRate": hit_rate,
        "keyspaceHits": info.keyspace_hits,
        "keyspaceMisses": info.keyspace_misses,
        "tagSets": cache.tag_sets,
        "tagMembers": cache.tag_members,
        "tagSetsDraining": cache.draining,
        "invalidations": {
            "batches": counter("invalidations"),
            "tags": counter("tags"),
            "keys": counter("keys"),
            "sweptMembers": counter("swept"),
        },
        "outbox": outbox(settings).await,
        "recommendations": {
            "hit_rate_status": hit_rate_status(hit_rate),
            "expired_entries_status": expired_entries_status(cache.expired_entries, cache.total_entries),
        },
    });
    println!("{}", serde_json::to_string_pretty(&report)?);
    Ok(())
}

/// Percent of keyspace lookups that hit; 0 with no traffic, never NaN.
pub fn hit_rate(hits: u64, misses: u64) -> f64 {
    let total = hits + misses;
    if total == 0 {
        return 0.0;
    }
    (hits as f64 * 10_000.0 / total as f64).round() / 100.0
}

/// The application's thresholds: excellent above 80 %, good above 60 %.
pub fn hit_rate_status(rate: f64) -> &'static str {
    if rate > 80.0 {
        "excellent"
    } else if rate > 60.0 {
        "good"
    } else {
        "needs_improvement"
    }
}

/// "high" when expired entries are more than 30 % of the total.
pub fn expired_entries_status(expired: u64, total: u64) -> &'static str {
    if expired as f64 > total as f64 * 0.3 {
        "high"
    } else {
        "normal"
    }
}

/// The outbox backlog, or why it could not be read (the database is optional for `stats`).
async fn outbox(settings: &Settings) -> Value {
    let read = async {
        let conn = db::connect(
            &settings.database_url,
            settings.tls_ca_file.as_deref(),
            None,
        )
        .await?;
        let client = &conn.client;
        let installed = schema::pinned(client, schema::installed(client)).await?;
        let Some(installed) = installed else {
            return Ok::<_, anyhow::Error>(json!({ "installed": false }));
        };
        let reads = client.query_one(
            "SELECT count(*), coalesce(extract(epoch FROM clock_timestamp() - min(created_at)), 0)::float8, \
             (SELECT count(*) FROM evictd.dead_letter) FROM evictd.outbox",
            &[],
        );
        let row = schema::pinned(client, reads).await?;
        Ok(json!({
            "installed": true,
            "delivery": installed.delivery.as_str(),
            "backlog": row.get::<_, i64>(0),
            "oldestAgeSeconds": row.get::<_, f64>(1),
            "deadLetters": row.get::<_, i64>(2),
        }))
    };
    match tokio::time::timeout(Duration::from_secs(5), read).await {
        Ok(Ok(value)) => value,
        Ok(Err(e)) => json!({ "error": format!("{e:#}") }),
        Err(_) => json!({ "error": "postgresql did not answer within 5s" }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_follow_the_application_thresholds() {
        assert_eq!(hit_rate(0, 0), 0.0);
        assert_eq!(hit_rate(3, 1), 75.0);
        assert_eq!(hit_rate_status(80.5), "excellent");
        assert_eq!(hit_rate_status(80.0), "good");
        assert_eq!(hit_rate_status(60.0), "needs_improvement");
        assert_eq!(expired_entries_status(31, 100), "high");
        assert_eq!(expired_entries_status(30, 100), "normal");
        assert_eq!(expired_entries_status(0, 0), "normal");
    }
}
