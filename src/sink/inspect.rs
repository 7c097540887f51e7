//! Read-only views of Redis for `stats`, `doctor` and `explain`: server facts, the cache's shape,
//! the members a tag would take with it. Nothing here deletes.

use std::collections::BTreeMap;

use redis::AsyncCommands;

use super::{RedisSink, SinkError};
use crate::rules::glob_escape;

/// The oldest Redis evictd's scripts run on: they pop a count of items at once
/// (`LPOP key count`, Redis 6.2).
pub const MIN_REDIS_VERSION: (u32, u32) = (6, 2);

/// What `INFO` says about the server.
#[derive(Debug, Clone, Default)]
pub struct ServerInfo {
    pub version: String,
    pub run_id: String,
    pub role: String,
    pub keyspace_hits: u64,
    pub keyspace_misses: u64,
}

impl ServerInfo {
    /// Whether this server is new enough ([`MIN_REDIS_VERSION`]); an unreadable version
    /// (a proxy that rewrites INFO) is given the benefit of the doubt.
    pub fn supported(&self) -> bool {
        supported_version(&self.version)
    }
}

fn supported_version(version: &str) -> bool {
    let mut parts = version.split('.').map(|p| p.parse::<u32>().ok());
    match (parts.next().flatten(), parts.next().flatten()) {
        (Some(major), Some(minor)) => (major, minor) >= MIN_REDIS_VERSION,
        _ => true,
    }
}

/// The cache as `evictd stats` reports it.
#[derive(Debug, Clone, Default)]
pub struct CacheStats {
    /// Cache entries: keys under the prefix that are not evictd's index or marker keys.
    pub total_entries: u64,
    /// Tag-set members whose entry no longer exists (expired, still indexed).
    pub expired_entries: u64,
    pub tag_sets: u64,
    pub tag_members: u64,
    /// Tag sets detached and still being drained.
    pub draining: u64,
    /// evictd's running totals (`invalidations`, `tags`, `keys`, `swept`).
    pub counters: BTreeMap<String, u64>,
}

impl RedisSink {
    pub async fn server_info(&self) -> Result<ServerInfo, SinkError> {
        let mut conn = self.conn.clone();
        let text: String = redis::cmd("INFO").query_async(&mut conn).await?;
        let field = |name: &str| {
            text.lines()
                .find_map(|l| l.strip_prefix(name).and_then(|r| r.strip_prefix(':')))
                .map(|v| v.trim().to_string())
                .unwrap_or_default()
        };
        Ok(ServerInfo {
            version: field("redis_version"),
            run_id: field("run_id"),
            role: field("role"),
            keyspace_hits: field("keyspace_hits").parse().unwrap_or(0),
            keyspace_misses: field("keyspace_misses").parse().unwrap_or(0),
        })
    }

    /// Walks every key under the prefix (SCAN, bounded steps). `progress` is told how many keys
    /// were looked at so far.
    pub async fn cache_stats(&self, progress: &dyn Fn(u64)) -> Result<CacheStats, SinkError> {
        let prefix = &self.options.key_prefix;
        let own = |suffix: &str| format!("{prefix}{suffix}");
        let (tag_p, tagts_p, table_p, drain_p, evictd_p) = (
            own("tag:"),
            own("tagts:"),
            own("tagts-table:"),
            own("drain:"),
            own("evictd:"),
        );
        let mut stats = CacheStats::default();
        let mut conn = self.conn.clone();
        let mut seen = 0u64;
        for key in self.scan(&format!("{}*", glob_escape(prefix))).await? {
            seen += 1;
            if seen.is_multiple_of(10_000) {
                progress(seen);
            }
            if key.starts_with(&tag_p) {
                stats.tag_sets += 1;
                let (members, missing) = self.count_members(&key).await?;
                stats.tag_members += members;
                stats.expired_entries += missing;
            } else if key.starts_with(&drain_p) {
                stats.draining += 1;
            } else if ![&tagts_p, &table_p, &evictd_p]
                .iter()
                .any(|own| key.starts_with(own.as_str()))
            {
                stats.total_entries += 1;
            }
        }
        let counters: BTreeMap<String, u64> = conn.hgetall(own("evictd:stats")).await?;
        stats.counters = counters;
        Ok(stats)
    }

    /// (members, members whose entry is gone) of one tag set.
    async fn count_members(&self, key: &str) -> Result<(u64, u64), SinkError> {
        let members = self.members(key, usize::MAX).await?.1;
        let mut conn = self.conn.clone();
        let mut missing = 0;
        for chunk in members.chunks(1_000) {
            let present: u64 = conn.exists(chunk).await?;
            missing += chunk.len() as u64 - present;
        }
        Ok((members.len() as u64, missing))
    }

    /// The size of tag set `key` and up to `limit` of its members (SSCAN/ZSCAN, bounded steps).
    pub async fn members(&self, key: &str, limit: usize) -> Result<(u64, Vec<String>), SinkError> {
        let mut conn = self.conn.clone();
        let kind: String = redis::cmd("TYPE").arg(key).query_async(&mut conn).await?;
        let (size_cmd, scan_cmd, stride) = match kind.as_str() {
            "set" => ("SCARD", "SSCAN", 1),
            "zset" => ("ZCARD", "ZSCAN", 2),
            _ => return Ok((0, Vec::new())),
        };
        let size: u64 = redis::cmd(size_cmd).arg(key).query_async(&mut conn).await?;
        let mut members = Vec::new();
        let mut cursor = "0".to_string();
        loop {
            let (next, items): (String, Vec<String>) = redis::cmd(scan_cmd)
                .arg(key)
                .arg(&cursor)
                .arg("COUNT")
                .arg(1_000)
                .query_async(&mut conn)
                .await?;
            members.extend(items.into_iter().step_by(stride));
            if next == "0" || members.len() >= limit {
                break;
            }
            cursor = next;
        }
        members.sort();
        members.dedup();
        members.truncate(limit);
        Ok((size, members))
    }

    /// Tag keys that are neither a set nor a sorted set: how many, and up to `examples` of
    /// their names. One SCAN over the tag keys, their types asked a page at a time.
    pub async fn tags_of_wrong_type(
        &self,
        examples: usize,
    ) -> Result<(u64, Vec<String>), SinkError> {
        let pattern = format!("{}tag:*", glob_escape(&self.options.key_prefix));
        let mut conn = self.conn.clone();
        let (mut count, mut names) = (0, Vec::new());
        let mut cursor = 0;
        loop {
            let (next, keys) = self.scan_page(&pattern, cursor).await?;
            if !keys.is_empty() {
                let mut pipe = redis::pipe();
                for key in &keys {
                    pipe.cmd("TYPE").arg(key);
                }
                let types: Vec<String> = pipe.query_async(&mut conn).await?;
                for (key, kind) in keys.iter().zip(types) {
                    if kind != "set" && kind != "zset" && kind != "none" {
                        count += 1;
                        if names.len() < examples {
                            names.push(format!("{key} ({kind})"));
                        }
                    }
                }
            }
            if next == 0 {
                return Ok((count, names));
            }
            cursor = next;
        }
    }

    /// Keys that exist among `keys`.
    pub async fn existing(&self, keys: &[String]) -> Result<Vec<String>, SinkError> {
        let mut conn = self.conn.clone();
        let mut out = Vec::new();
        for key in keys {
            let n: u64 = conn.exists(key).await?;
            if n == 1 {
                out.push(key.clone());
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_from_6_2_are_supported() {
        for (version, ok) in [
            ("7.0.15", true),
            ("6.2.0", true),
            ("6.0.16", false),
            ("5.0.7", false),
            ("10.1", true),
            ("", true),
            ("unknown", true),
        ] {
            assert_eq!(supported_version(version), ok, "{version}");
        }
    }
}
