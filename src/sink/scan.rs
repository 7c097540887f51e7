//! Walking the keyspace with SCAN (never KEYS): a page at a time, so memory is bounded by a
//! page however many keys Redis holds, and a page that failed is simply asked again. In a
//! cluster, every primary is walked in turn (the primaries as they were when the walk began: a
//! failover's new primary holds its predecessor's keys).

use super::{Node, RedisSink, SinkError};

/// Keys asked for per SCAN step (and so UNLINKed at most per command when removing by pattern).
const SCAN_COUNT: usize = 1_000;

/// A SCAN in progress: its MATCH pattern and where it stands. Keys come as bytes: a key that
/// is not UTF-8 must not fail the walk.
pub struct KeyScan {
    pattern: Vec<u8>,
    cursor: u64,
    done: bool,
    /// In a cluster, the primaries still to walk, the one being walked first; asked of the
    /// cluster at the first page.
    nodes: Option<Vec<Node>>,
}

impl KeyScan {
    pub fn new(pattern: impl Into<Vec<u8>>) -> Self {
        Self {
            pattern: pattern.into(),
            cursor: 0,
            done: false,
            nodes: None,
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
        let mut cmd = redis::cmd("SCAN");
        cmd.arg(scan.cursor)
            .arg("MATCH")
            .arg(&scan.pattern)
            .arg("COUNT")
            .arg(SCAN_COUNT);
        let (next, keys): (u64, Vec<Vec<u8>>) = if conn.is_cluster() {
            if scan.nodes.is_none() {
                let mut primaries = conn.primaries().await?;
                primaries.reverse();
                scan.nodes = Some(primaries);
            }
            let Some(node) = scan.nodes.as_ref().and_then(|nodes| nodes.last()).cloned() else {
                scan.done = true;
                return Ok(Some(Vec::new()));
            };
            let (next, keys): (u64, Vec<Vec<u8>>) = conn.on_node(&node, &cmd).await?;
            if next == 0
                && let Some(nodes) = scan.nodes.as_mut()
            {
                nodes.pop();
            }
            scan.done = scan.nodes.as_ref().is_none_or(Vec::is_empty);
            (next, keys)
        } else {
            let answer: (u64, Vec<Vec<u8>>) = cmd.query_async(&mut conn).await?;
            scan.done = answer.0 == 0;
            answer
        };
        scan.cursor = next;
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
