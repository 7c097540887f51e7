//! `--cluster`: the backlog drain and the 1,000,000-member tag against a Redis Cluster of three
//! primaries on this machine, beside the same two phases against the single Redis — one run,
//! same setting, so the figures compare.

use super::*;
use evictd::core::slot::slot;
use evictd::throwaway::Cluster;

/// Runs the two phases on the single Redis, then on a cluster of three primaries.
pub(crate) async fn cluster_alone(lab: &mut Lab, selected: &[&Setting]) {
    let setting = selected
        .iter()
        .find(|s| s.delivery == "outbox")
        .copied()
        .unwrap_or(selected[0]);
    let events = if lab.quick { 100_000 } else { 1_000_000 };
    let members = if lab.quick { 200_000 } else { 1_000_000 };
    keyspace_events(lab, false).await;

    lab.database("bench_single_backlog", Some(setting)).await;
    let single_backlog = backlog(lab, "bench_single_backlog", setting, events).await;
    println!("single redis   backlog {single_backlog}");
    lab.database("bench_single_big", Some(setting)).await;
    let daemon = lab.start_daemon("bench_single_big", setting).await;
    let single_big = big_tag(lab, "bench_single_big", members).await;
    drop(daemon);
    println!("single redis   big tag {single_big}");

    let cluster = Cluster::start(3, 0).unwrap_or_else(|e| panic!("{e:#}"));
    lab.cluster_url = Some(cluster.url());
    let on_cluster = &*lab;
    on_cluster
        .database("bench_cluster_backlog", Some(setting))
        .await;
    let cluster_backlog = backlog(on_cluster, "bench_cluster_backlog", setting, events).await;
    println!("cluster of 3   backlog {cluster_backlog}");
    on_cluster
        .database("bench_cluster_big", Some(setting))
        .await;
    let daemon = on_cluster.start_daemon("bench_cluster_big", setting).await;
    let cluster_big = big_tag_in_cluster(on_cluster, &cluster, "bench_cluster_big", members).await;
    drop(daemon);
    println!("cluster of 3   big tag {cluster_big}");
    lab.cluster_url = None;
}

/// A connection to each primary of `cluster`, with the slot ranges it serves.
async fn primaries(
    cluster: &Cluster,
) -> Vec<(u16, Vec<(u16, u16)>, redis::aio::MultiplexedConnection)> {
    let nodes = cluster
        .cli(cluster.nodes[0].port, &["cluster", "nodes"])
        .unwrap();
    let mut out = Vec::new();
    for line in nodes.lines() {
        let fields: Vec<&str> = line.split_whitespace().collect();
        if !fields.get(2).is_some_and(|f| f.contains("master")) || fields.len() <= 8 {
            continue;
        }
        let port: u16 = fields[1].split(['@', ':']).nth(1).unwrap().parse().unwrap();
        let ranges = fields[8..]
            .iter()
            .filter(|r| !r.starts_with('['))
            .map(|r| match r.split_once('-') {
                Some((a, b)) => (a.parse().unwrap(), b.parse().unwrap()),
                None => (r.parse().unwrap(), r.parse().unwrap()),
            })
            .collect();
        let conn = redis::Client::open(format!("redis://127.0.0.1:{port}"))
            .unwrap()
            .get_multiplexed_async_connection()
            .await
            .unwrap();
        out.push((port, ranges, conn));
    }
    out
}

/// The big-tag phase in a cluster: `members` entries spread over every slot, one tag set (in
/// its own slot) indexing them all, invalidated by the daemon while a client PINGs each
/// primary. Reports the time until the last entry is gone, the worst PING per primary, and
/// the longest command of the daemon by each primary's SLOWLOG.
async fn big_tag_in_cluster(lab: &Lab, cluster: &Cluster, db: &str, members: usize) -> Value {
    let mut nodes = primaries(cluster).await;
    let owner = |key: &str| {
        let s = slot(key.as_bytes());
        nodes
            .iter()
            .position(|(_, ranges, _)| ranges.iter().any(|(a, b)| (*a..=*b).contains(&s)))
            .unwrap()
    };
    let keys: Vec<String> = (0..members)
        .map(|i| format!("cache:bench:big:{i}"))
        .collect();
    let tag_key = "cache:tag:bench:big";
    let tag_owner = owner(tag_key);
    let by_node: Vec<usize> = keys.iter().map(|k| owner(k)).collect();
    for (n, (_, _, conn)) in nodes.iter_mut().enumerate() {
        let mine: Vec<&String> = keys
            .iter()
            .zip(&by_node)
            .filter(|(_, owner)| **owner == n)
            .map(|(k, _)| k)
            .collect();
        for chunk in mine.chunks(20_000) {
            let mut pipe = redis::pipe();
            for key in chunk {
                pipe.cmd("SET")
                    .arg(*key)
                    .arg("v")
                    .arg("EX")
                    .arg(ENTRY_TTL_S)
                    .ignore();
            }
            let () = pipe.query_async(conn).await.unwrap();
        }
    }
    for chunk in keys.chunks(20_000) {
        let () = nodes[tag_owner].2.sadd(tag_key, chunk).await.unwrap();
    }
    let mut before = 0u64;
    for (_, _, conn) in nodes.iter_mut() {
        before += redis::cmd("DBSIZE").query_async::<u64>(conn).await.unwrap();
        for (name, value) in [
            ("slowlog-log-slower-than", 1_000),
            ("slowlog-max-len", 100_000),
        ] {
            let () = redis::cmd("CONFIG")
                .arg("SET")
                .arg(name)
                .arg(value)
                .query_async(conn)
                .await
                .unwrap();
        }
        let () = redis::cmd("SLOWLOG")
            .arg("RESET")
            .query_async(conn)
            .await
            .unwrap();
    }
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let pingers: Vec<_> = nodes
        .iter()
        .map(|(port, _, conn)| {
            let mut conn = conn.clone();
            let stop = stop.clone();
            let port = *port;
            tokio::spawn(async move {
                let mut worst = Duration::ZERO;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let t = Instant::now();
                    let _: String = redis::cmd("PING").query_async(&mut conn).await.unwrap();
                    worst = worst.max(t.elapsed());
                }
                (port, worst)
            })
        })
        .collect();
    let client = lab.client(db).await;
    let t = Instant::now();
    client
        .batch_execute("SELECT evictd.invalidate_tags('bench:big')")
        .await
        .unwrap();
    loop {
        let mut size = 0u64;
        for (_, _, conn) in nodes.iter_mut() {
            size += redis::cmd("DBSIZE").query_async::<u64>(conn).await.unwrap();
        }
        // The invalidation may create two keys of its own: the tag's `tagts` marker and, on a
        // fresh Redis, evictd's counters hash.
        if size + members as u64 <= before + 2 || t.elapsed() > Duration::from_secs(300) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let took = t.elapsed().as_secs_f64();
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut worst_ping = Vec::new();
    for pinger in pingers {
        let (_, worst) = pinger.await.unwrap();
        worst_ping.push(round(worst.as_secs_f64() * 1000.0));
    }
    let mut longest = Vec::new();
    let mut longest_command = String::new();
    let mut longest_us = 0;
    let mut over_1ms = 0;
    for (_, _, conn) in nodes.iter_mut() {
        let slow: Vec<redis::Value> = redis::cmd("SLOWLOG")
            .arg("GET")
            .arg(100_000)
            .query_async(conn)
            .await
            .unwrap();
        let micros = slow_entry_micros;
        let daemons: Vec<&redis::Value> = slow
            .iter()
            .filter(|e| {
                !describe_slow_entry(e)
                    .to_ascii_uppercase()
                    .starts_with("SLOWLOG")
            })
            .collect();
        over_1ms += daemons.len();
        let worst = daemons.iter().copied().max_by_key(|e| micros(e));
        let us = worst.map_or(0, micros);
        longest.push(round(us as f64 / 1000.0));
        if us > longest_us {
            longest_us = us;
            longest_command = worst.map_or(String::new(), describe_slow_entry);
        }
    }
    json!({
        "members": members,
        "total_s": round(took * 1000.0) / 1000.0,
        "worst_ping_ms_per_primary": worst_ping,
        "longest_command_ms_per_primary": longest,
        "longest_command": longest_command,
        "commands_over_1ms": over_1ms,
    })
}
