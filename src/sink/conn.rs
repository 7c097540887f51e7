//! A connection to whichever Redis the URL names: one server (its connection manager, which
//! reconnects by itself) or a Redis Cluster (the cluster client's connection, which follows
//! MOVED and ASK redirections and refreshes its map of slots on its own). Both run any command;
//! what a cluster refuses — a script touching keys of other slots, a pipeline across slots — is
//! kept out of the cluster's way by the sink (`cluster.rs`).

use redis::aio::{ConnectionLike, ConnectionManager};
use redis::cluster_async::ClusterConnection;
use redis::cluster_routing::{RoutingInfo, SingleNodeRoutingInfo};
use redis::{Cmd, FromRedisValue, Pipeline, RedisFuture, RedisResult, Value};

#[derive(Clone)]
pub enum RedisConn {
    Single(ConnectionManager),
    Cluster(ClusterConnection),
}

/// A primary of a cluster, as the cluster itself names it.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Node {
    pub host: String,
    pub port: u16,
}

impl std::fmt::Display for Node {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.host, self.port)
    }
}

impl RedisConn {
    pub fn is_cluster(&self) -> bool {
        matches!(self, RedisConn::Cluster(_))
    }

    /// The primaries serving slots now (`CLUSTER NODES`, asked of any node). Empty for one
    /// server. An error while they do not serve every slot between them: during a failover a
    /// dead primary's slots have no primary until its replica is promoted, and a walk of the
    /// keyspace (a resync, the drains a failure left) over the others would miss its keys and
    /// count as done.
    pub async fn primaries(&mut self) -> RedisResult<Vec<Node>> {
        let RedisConn::Cluster(cluster) = self else {
            return Ok(Vec::new());
        };
        let text: String = redis::cmd("CLUSTER")
            .arg("NODES")
            .query_async(cluster)
            .await?;
        let (nodes, served) = primaries_in(&text);
        if served < SLOTS {
            return Err(redis::RedisError::from((
                redis::ErrorKind::Server(redis::ServerErrorKind::ClusterDown),
                "not every slot has a live primary",
                format!("{served} of {SLOTS} served"),
            )));
        }
        Ok(nodes)
    }

    /// Runs `cmd` on `node` of a cluster (SCAN, INFO: commands about one server, not a key).
    pub async fn on_node<T: FromRedisValue>(&mut self, node: &Node, cmd: &Cmd) -> RedisResult<T> {
        match self {
            RedisConn::Single(conn) => cmd.query_async(conn).await,
            RedisConn::Cluster(cluster) => {
                let routing = RoutingInfo::SingleNode(SingleNodeRoutingInfo::ByAddress {
                    host: node.host.clone(),
                    port: node.port,
                });
                let value = cluster.route_command(cmd.clone(), routing).await?;
                T::from_redis_value(value).map_err(Into::into)
            }
        }
    }

    /// Runs `cmds` and returns their answers in order: one pipeline on one server; on a
    /// cluster, each command on its own (a pipeline may not cross slots), a few dozen in
    /// flight at once.
    pub async fn each<T: FromRedisValue>(&mut self, cmds: Vec<Cmd>) -> RedisResult<Vec<T>> {
        if cmds.is_empty() {
            return Ok(Vec::new());
        }
        match self {
            RedisConn::Single(conn) => {
                let mut pipe = redis::pipe();
                for cmd in cmds {
                    pipe.add_command(cmd);
                }
                pipe.query_async(conn).await
            }
            RedisConn::Cluster(cluster) => {
                let cluster = cluster.clone();
                in_order(
                    cmds.into_iter().map(|cmd| {
                        let mut conn = cluster.clone();
                        async move { cmd.query_async::<T>(&mut conn).await }
                    }),
                    32,
                )
                .await
            }
        }
    }
}

/// Runs `futures`, at most `limit` at once, and returns their outputs in the order given; the
/// first error ends it.
pub async fn in_order<T, E, F>(
    futures: impl IntoIterator<Item = F>,
    limit: usize,
) -> Result<Vec<T>, E>
where
    F: std::future::Future<Output = Result<T, E>>,
{
    use futures_util::StreamExt as _;
    let mut futures = futures.into_iter().enumerate();
    let mut in_flight = futures_util::stream::FuturesUnordered::new();
    let mut out = Vec::new();
    loop {
        while in_flight.len() < limit.max(1)
            && let Some((i, future)) = futures.next()
        {
            in_flight.push(async move { (i, future.await) });
        }
        match in_flight.next().await {
            Some((i, outcome)) => out.push((i, outcome?)),
            None => break,
        }
    }
    out.sort_by_key(|(i, _)| *i);
    Ok(out.into_iter().map(|(_, value)| value).collect())
}

/// Slots of a Redis Cluster.
const SLOTS: u32 = 16_384;

/// The primaries in a `CLUSTER NODES` answer that serve slots and are not failing, and how
/// many slots they serve between them: lines of
/// `id host:port@cport[,hostname] flags master-id ping pong epoch link-state slot…`, a slot
/// being `N`, `N-M`, or `[N->-id]` / `[N-<-id]` while it migrates (counted where it is now).
fn primaries_in(text: &str) -> (Vec<Node>, u32) {
    let mut served = 0;
    let mut nodes: Vec<Node> = text
        .lines()
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let flags = fields.get(2)?;
            let serving = fields.len() > 8;
            let primary = flags.split(',').any(|f| f == "master")
                && !flags.split(',').any(|f| f == "fail" || f == "noaddr");
            if !(primary && serving) {
                return None;
            }
            let address = fields.get(1)?.split(['@', ',']).next()?;
            let (host, port) = address.rsplit_once(':')?;
            let node = Node {
                host: host
                    .trim_start_matches('[')
                    .trim_end_matches(']')
                    .to_string(),
                port: port.parse().ok()?,
            };
            served += fields[8..].iter().map(|range| slots_in(range)).sum::<u32>();
            Some(node)
        })
        .collect();
    nodes.sort();
    (nodes, served)
}

/// How many slots a slot field of `CLUSTER NODES` names (a migrating one, in brackets: none).
fn slots_in(range: &str) -> u32 {
    if range.starts_with('[') {
        return 0;
    }
    let (first, last) = range.split_once('-').unwrap_or((range, range));
    match (first.parse::<u32>(), last.parse::<u32>()) {
        (Ok(first), Ok(last)) if first <= last => last - first + 1,
        _ => 0,
    }
}

impl ConnectionLike for RedisConn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            RedisConn::Single(conn) => conn.req_packed_command(cmd),
            RedisConn::Cluster(conn) => conn.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        cmd: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            RedisConn::Single(conn) => conn.req_packed_commands(cmd, offset, count),
            RedisConn::Cluster(conn) => conn.req_packed_commands(cmd, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            RedisConn::Single(conn) => conn.get_db(),
            RedisConn::Cluster(conn) => conn.get_db(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn primaries_are_read_from_cluster_nodes() {
        let text = "\
07c3 127.0.0.1:30004@40004 slave e7d1 0 1426238317239 4 connected
67ed 127.0.0.1:30002@40002,host2 master - 0 1426238316232 2 connected 5461-10922
292f 127.0.0.1:30003@40003 master - 0 1426238318243 3 connected 10923-16383
6ec2 127.0.0.1:30005@40005 master,fail - 1426238316232 1426238316232 5 disconnected
e7d1 127.0.0.1:30001@40001 myself,master - 0 0 1 connected 0-5460
a0a0 127.0.0.1:30006@40006 master - 0 0 6 connected
";
        let (nodes, served) = primaries_in(text);
        let ports: Vec<u16> = nodes.iter().map(|n| n.port).collect();
        assert_eq!(ports, [30001, 30002, 30003]);
        assert_eq!(served, SLOTS);
    }

    /// A primary marked failing before its replica took over: its slots have no primary.
    #[test]
    fn slots_without_a_live_primary_are_not_counted() {
        let text = "\
07c3 127.0.0.1:30004@40004 slave e7d1 0 1426238317239 4 connected
67ed 127.0.0.1:30002@40002 master - 0 1426238316232 2 connected 5461-10922 [10923->-292f]
292f 127.0.0.1:30003@40003 master,fail - 0 1426238318243 3 disconnected 10923-16383
e7d1 127.0.0.1:30001@40001 myself,master - 0 0 1 connected 0-5459 5460
";
        let (nodes, served) = primaries_in(text);
        assert_eq!(nodes.len(), 2);
        assert_eq!(served, 10_923);
        assert_eq!(slots_in("[5460-<-e7d1]"), 0);
        assert_eq!(slots_in("7"), 1);
    }
}
