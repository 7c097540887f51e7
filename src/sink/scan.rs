//! Walking the keyspace with SCAN (never KEYS): a page at a time, so memory is bounded by a
//! page however many keys Redis holds, and a page that failed is simply asked again.

use super::{RedisSink, SinkError};

/// Keys asked for per SCAN step (and so UNLINKed at most per command when removing by pattern).
const SCAN_COUNT: usize = 1_000;

/// A SCAN in progress: its MATCH pattern and where it stands. Keys come as bytes: a key that
/// is not UTF-8 must not fail the walk.
pub struct KeyScan {
    pattern: Vec<u8>,
    cursor: u64,
    done: bool,
}

impl KeyScan {
    pub fn new(pattern: impl Into<Vec<u8>>) -> Self {
        Self {
            pattern: pattern.into(),
            cursor: 0,
            done: false,
        }
    }
}

impl RedisSink {
    /// The next page of `scan`, `None` once it has gone round. SCAN may return a key twice
    /// (while Redis resizes its table); callers do idempotent work or tolerate a recount.
    pub async fn next_page(&self, scan: &mut KeyScan) -> Result<Option<Vec<Vec<u8>>>, SinkError> {
        if scan.done {
            return Ok(None);
        }
        let mut conn = self.conn();
        let (next, keys): (u64, Vec<Vec<u8>>) = redis::cmd("SCAN")
            .arg(scan.cursor)
            .arg("MATCH")
            .arg(&scan.pattern)
            .arg("COUNT")
            .arg(SCAN_COUNT)
            .query_async(&mut conn)
            .await?;
        scan.cursor = next;
        scan.done = next == 0;
        if let Some(heartbeat) = &self.options.heartbeat {
            heartbeat.beat();
        }
        Ok(Some(keys))
    }

    /// Every key matching `pattern`, de-duplicated, held in memory: for sets known to be small
    /// (drain keys), and for `explain`, which lists what it finds.
    pub async fn scan(&self, pattern: &str) -> Result<Vec<String>, SinkError> {
        let mut scan = KeyScan::new(pattern);
        let mut found = std::collections::BTreeSet::new();
        while let Some(page) = self.next_page(&mut scan).await? {
            found.extend(page.into_iter().filter_map(|k| String::from_utf8(k).ok()));
        }
        Ok(found.into_iter().collect())
    }
}
