//! Read-only views of Redis for `stats`, `doctor` and `explain`: server facts, the cache's shape,
//! the members a tag would take with it. Nothing here deletes.

use std::collections::BTreeMap;

use redis::AsyncCommands;

use super::{KeyScan, RedisSink, SinkError};
use crate::core::keys::KeyKind;

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
    /// The primaries of a cluster; 0 for one server.
    pub primaries: usize,
}

impl ServerInfo {
    /// Whether this server is new enough ([`MIN_REDIS_VERSION`]); an unreadable version
    /// (a proxy that rewrites INFO) is given the benefit of the doubt.
    pub fn supported(&self) -> bool {
        supported_version(&self.version)
    }
}

/// The fields evictd reads from an `INFO` answer.
fn parse_info(text: &str) -> ServerInfo {
    let field = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name).and_then(|r| r.strip_prefix(':')))
            .map(|v| v.trim().to_string())
            .unwrap_or_default()
    };
    ServerInfo {
        version: field("redis_version"),
        run_id: field("run_id"),
        role: field("role"),
        keyspace_hits: field("keyspace_hits").parse().unwrap_or(0),
        keyspace_misses: field("keyspace_misses").parse().unwrap_or(0),
        primaries: 0,
    }
}

/// Whether version `a` is at least `b` (numbers compared part by part).
fn newer_or_equal(a: &str, b: &str) -> bool {
    let parts = |v: &str| -> Vec<u32> { v.split('.').filter_map(|p| p.parse().ok()).collect() };
    parts(a) >= parts(b)
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
    /// What `INFO` says. In a cluster, of every primary: the oldest version, the run ids of
    /// all (a failover or a restart of any changes them), the hits and misses summed.
    pub async fn server_info(&self) -> Result<ServerInfo, SinkError> {
        let mut conn = self.conn();
        if !conn.is_cluster() {
            let text: String = redis::cmd("INFO").query_async(&mut conn).await?;
            return Ok(parse_info(&text));
        }
        let mut combined = ServerInfo::default();
        let mut run_ids = Vec::new();
        for node in conn.primaries().await? {
            let text: String = conn.on_node(&node, &redis::cmd("INFO")).await?;
            let info = parse_info(&text);
            if combined.version.is_empty() || !newer_or_equal(&info.version, &combined.version) {
                combined.version = info.version;
            }
            run_ids.push(info.run_id);
            combined.primaries += 1;
            combined.role = info.role;
            combined.keyspace_hits += info.keyspace_hits;
            combined.keyspace_misses += info.keyspace_misses;
        }
        run_ids.sort();
        combined.run_id = run_ids.join(",");
        Ok(combined)
    }

    /// Walks every key under the prefix a SCAN page at a time, and each tag set an SSCAN page
    /// at a time: memory stays bounded by a page whatever the keyspace. `progress` is told how
    /// many keys were looked at so far. (A key SCAN returns twice, while Redis resizes its
    /// table, is counted twice.)
    pub async fn cache_stats(&self, progress: &dyn Fn(u64)) -> Result<CacheStats, SinkError> {
        let mut stats = CacheStats::default();
        let mut conn = self.conn();
        let mut seen = 0u64;
        let mut scan = KeyScan::new(self.keys.everything_glob());
        while let Some(page) = self.next_page(&mut scan).await? {
            let mut tag_sets = Vec::new();
            for key in page {
                seen += 1;
                if seen.is_multiple_of(10_000) {
                    progress(seen);
                }
                match self.keys.kind(&key) {
                    KeyKind::Tag => tag_sets.push(key),
                    KeyKind::Drain => stats.draining += 1,
                    KeyKind::Own => {}
                    KeyKind::Entry => stats.total_entries += 1,
                }
            }
            stats.tag_sets += tag_sets.len() as u64;
            let (members, missing) = self.count_members(&tag_sets).await?;
            stats.tag_members += members;
            stats.expired_entries += missing;
        }
        let counters: BTreeMap<String, u64> = conn.hgetall(self.keys.stats()).await?;
        stats.counters = counters;
        Ok(stats)
    }

    /// (members, members whose entry is gone) of the tag sets `keys` (a SCAN page of them):
    /// their types, first pages of members and which of those exist are asked in three
    /// pipelines for the whole page; only a set larger than a first page is walked on alone,
    /// a page at a time. (A member the scan returns twice is counted twice.)
    async fn count_members(&self, keys: &[Vec<u8>]) -> Result<(u64, u64), SinkError> {
        const FIRST_PAGE: usize = 100;
        if keys.is_empty() {
            return Ok((0, 0));
        }
        let mut conn = self.conn();
        let kinds: Vec<String> = conn
            .each(keys.iter().map(|key| one("TYPE", key)).collect())
            .await?;
        let sets: Vec<(&[u8], &str, usize)> = keys
            .iter()
            .zip(&kinds)
            .filter_map(|(key, kind)| match kind.as_str() {
                "set" => Some((key.as_slice(), "SSCAN", 1)),
                "zset" => Some((key.as_slice(), "ZSCAN", 2)),
                _ => None,
            })
            .collect();
        let firsts: Vec<(String, Vec<Vec<u8>>)> = conn
            .each(
                sets.iter()
                    .map(|(key, scan, _)| {
                        let mut cmd = one(scan, key);
                        cmd.arg(0).arg("COUNT").arg(FIRST_PAGE);
                        cmd
                    })
                    .collect(),
            )
            .await?;
        let mut asked_each = Vec::new();
        let mut asked = 0;
        let (mut members, mut missing) = (0, 0);
        for ((_, _, stride), (_, items)) in sets.iter().zip(&firsts) {
            let page: Vec<&Vec<u8>> = items.iter().step_by(*stride).collect();
            if !page.is_empty() {
                let mut cmd = redis::cmd("EXISTS");
                cmd.arg(page.as_slice());
                asked_each.push(cmd);
                members += page.len() as u64;
                asked += page.len() as u64;
            }
        }
        if asked > 0 {
            let present: Vec<u64> = conn.each(asked_each).await?;
            missing += asked - present.iter().sum::<u64>();
        }
        for ((key, scan, stride), (cursor, _)) in sets.iter().zip(firsts) {
            if cursor != "0" {
                let (more, gone) = self.count_rest(key, scan, *stride, cursor).await?;
                members += more;
                missing += gone;
            }
        }
        Ok((members, missing))
    }

    /// The rest of one large tag set's members from `cursor` on: (members, those gone).
    async fn count_rest(
        &self,
        key: &[u8],
        scan: &str,
        stride: usize,
        mut cursor: String,
    ) -> Result<(u64, u64), SinkError> {
        let mut conn = self.conn();
        let (mut members, mut missing) = (0, 0);
        loop {
            let (next, items): (String, Vec<Vec<u8>>) = redis::cmd(scan)
                .arg(key)
                .arg(&cursor)
                .arg("COUNT")
                .arg(1_000)
                .query_async(&mut conn)
                .await?;
            let page: Vec<Vec<u8>> = items.into_iter().step_by(stride).collect();
            if !page.is_empty() {
                let present: u64 = conn.exists(&page).await?;
                members += page.len() as u64;
                missing += page.len() as u64 - present;
            }
            if next == "0" {
                return Ok((members, missing));
            }
            cursor = next;
        }
    }

    /// The size of tag set `key` and up to `limit` of its members (SSCAN/ZSCAN, bounded steps).
    pub async fn members(&self, key: &str, limit: usize) -> Result<(u64, Vec<String>), SinkError> {
        let mut conn = self.conn();
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
        let pattern = self.keys.tag_glob("*");
        let mut conn = self.conn();
        let (mut count, mut names) = (0, Vec::new());
        let mut scan = KeyScan::new(pattern);
        while let Some(keys) = self.next_page(&mut scan).await? {
            if keys.is_empty() {
                continue;
            }
            let types: Vec<String> = conn
                .each(keys.iter().map(|key| one("TYPE", key)).collect())
                .await?;
            for (key, kind) in keys.iter().zip(types) {
                if kind != "set" && kind != "zset" && kind != "none" {
                    count += 1;
                    if names.len() < examples {
                        names.push(format!("{} ({kind})", String::from_utf8_lossy(key)));
                    }
                }
            }
        }
        Ok((count, names))
    }

    /// Keys that exist among `keys`, asked a pipeline of a thousand at a time.
    pub async fn existing(&self, keys: &[String]) -> Result<Vec<String>, SinkError> {
        let mut conn = self.conn();
        let mut out = Vec::new();
        for chunk in keys.chunks(1_000) {
            let found: Vec<u64> = conn
                .each(chunk.iter().map(|key| one("EXISTS", key)).collect())
                .await?;
            out.extend(
                chunk
                    .iter()
                    .zip(found)
                    .filter(|(_, n)| *n == 1)
                    .map(|(key, _)| key.clone()),
            );
        }
        Ok(out)
    }
}

/// `name key`: a command about one key.
fn one(name: &str, key: impl redis::ToRedisArgs) -> redis::Cmd {
    let mut cmd = redis::cmd(name);
    cmd.arg(key);
    cmd
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
