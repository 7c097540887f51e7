//! The Redis engines teams grow into, the real ones, started by the test: a master with a
//! replica and three Sentinels (`redis-server --sentinel`), and a Redis Cluster of three
//! primaries and three replicas (`redis-cli --cluster create`), failed over while the daemon
//! runs.

mod support;

use std::time::{Duration, Instant};

use evictd::config::Delivery;
use evictd::sink::RedisConn;
use evictd::throwaway::{Cluster, Redis, Sentinel};
use redis::AsyncCommands;
use redis::aio::ConnectionManager;
use support::{DEADLINE, Env};

const C1: &str = "00000000-0000-0000-0000-0000000000c1";
const P1: &str = "00000000-0000-0000-0000-0000000000a1";
const P2: &str = "00000000-0000-0000-0000-0000000000a2";

async fn connect(url: &str) -> ConnectionManager {
    ConnectionManager::new(redis::Client::open(url).unwrap())
        .await
        .unwrap()
}

/// Waits until `check` holds, at most [`DEADLINE`].
async fn until<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let start = Instant::now();
    while !check().await {
        assert!(start.elapsed() < DEADLINE, "{what} within {DEADLINE:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The port of the master `sentinel` names.
async fn named_master(sentinel: &Sentinel) -> Option<u16> {
    let mut conn = connect(&format!("redis://127.0.0.1:{}", sentinel.port)).await;
    redis::cmd("SENTINEL")
        .arg("get-master-addr-by-name")
        .arg("evictd")
        .query_async::<Option<(String, u16)>>(&mut conn)
        .await
        .ok()
        .flatten()
        .map(|(_, port)| port)
}

/// `redis+sentinel://` finds the master through the sentinels; after a forced failover the
/// daemon follows the new master, treats it as a possibly older copy (table-wide resync: the
/// configured tables' entries go, others stay), and invalidates precisely there afterwards. A
/// change committed while the failover happens is not lost. Outbox and logical delivery.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sentinel_failover_is_followed() {
    for delivery in [Delivery::Outbox, Delivery::Logical] {
        let master = Redis::start().unwrap_or_else(|e| panic!("{e:#}"));
        let replica = Redis::start_with(&["--replicaof", "127.0.0.1", &master.port.to_string()])
            .unwrap_or_else(|e| panic!("{e:#}"));
        let to_replica = connect(&replica.url()).await;
        until("the replica in sync", || {
            let mut conn = to_replica.clone();
            async move {
                let info: String = redis::cmd("INFO")
                    .arg("replication")
                    .query_async(&mut conn)
                    .await
                    .unwrap_or_default();
                info.contains("master_link_status:up")
            }
        })
        .await;
        let sentinels: Vec<Sentinel> = (0..3)
            .map(|_| Sentinel::start("evictd", master.port, 2).unwrap_or_else(|e| panic!("{e:#}")))
            .collect();
        let sentinel_url = format!(
            "redis+sentinel://{}/evictd",
            sentinels
                .iter()
                .map(|s| format!("127.0.0.1:{}", s.port))
                .collect::<Vec<_>>()
                .join(",")
        );

        let mut env = Env::with_config(delivery, "health_interval_ms = 200\n").await;
        env.redis_url = sentinel_url;
        env.redis = RedisConn::Single(connect(&master.url()).await);
        env.sql(&format!(
            "INSERT INTO clients (id, name) VALUES ('{C1}', 'c1');
             INSERT INTO products (id, client_id, name) VALUES ('{P1}', '{C1}', 'p1'), ('{P2}', '{C1}', 'p2');"
        ))
        .await;
        let daemon = env.start_daemon().await;
        let precise = env.cache("p1", &[&format!("products:id:{P1}")]).await;
        let kept = env.cache("p2", &[&format!("products:id:{P2}")]).await;
        env.sql(&format!(
            "UPDATE products SET name = 'before' WHERE id = '{P1}'"
        ))
        .await;
        env.wait_gone(std::slice::from_ref(&precise)).await;
        env.assert_present(std::slice::from_ref(&kept)).await;
        let unrelated = env.cache("other", &["unrelated:thing"]).await;
        let during = env
            .cache("p2-during", &[&format!("products:id:{P2}")])
            .await;
        let _: redis::Value = redis::cmd("WAIT")
            .arg(1)
            .arg(2000)
            .query_async(&mut env.redis.clone())
            .await
            .unwrap();

        let mut first = connect(&format!("redis://127.0.0.1:{}", sentinels[0].port)).await;
        let _: redis::Value = redis::cmd("SENTINEL")
            .arg("FAILOVER")
            .arg("evictd")
            .query_async(&mut first)
            .await
            .unwrap();
        // A change committed while the master changes hands.
        env.sql(&format!(
            "UPDATE products SET name = 'during' WHERE id = '{P2}'"
        ))
        .await;
        until("every sentinel names the replica", || {
            let sentinels = &sentinels;
            let replica_port = replica.port;
            async move {
                for sentinel in sentinels {
                    if named_master(sentinel).await != Some(replica_port) {
                        return false;
                    }
                }
                true
            }
        })
        .await;
        env.redis = RedisConn::Single(to_replica.clone());
        daemon.wait_log("the sentinels name another master").await;
        daemon.wait_log("redis restarted or failed over").await;
        env.wait_gone(&[during]).await;
        env.barrier().await;
        env.assert_present(std::slice::from_ref(&unrelated)).await;

        // On the new master, precise again.
        let after = env.cache("p1-after", &[&format!("products:id:{P1}")]).await;
        let stays = env.cache("p2-after", &[&format!("products:id:{P2}")]).await;
        env.sql(&format!(
            "UPDATE products SET name = 'after' WHERE id = '{P1}'"
        ))
        .await;
        env.wait_gone(&[after]).await;
        env.barrier().await;
        env.assert_present(&[stays, unrelated]).await;
        // The one-shot commands find the master through the sentinels too.
        invalidate_by_hand(&env).await;
        let stats = env.run_cli(&["stats"]);
        assert!(stats.status.success(), "{}", support::text(&stats));
        drop(daemon);
    }
}

/// `evictd invalidate` of a tag, as an operator runs it: the entry goes.
async fn invalidate_by_hand(env: &Env) {
    let manual = env.cache("manual", &["manual:tag"]).await;
    let invalidated = env.run_cli(&["invalidate", "manual:tag"]);
    assert!(
        invalidated.status.success(),
        "{}",
        support::text(&invalidated)
    );
    env.wait_gone(&[manual]).await;
}

/// The test's world on `cluster`: its database and prefix as usual, Redis the cluster.
async fn cluster_env(delivery: Delivery, cluster: &Cluster, toml: &str) -> Env {
    let mut env = Env::with_config(delivery, toml).await;
    env.redis_url = cluster.url();
    let seeds: Vec<String> = cluster
        .nodes
        .iter()
        .map(|n| format!("redis://127.0.0.1:{}", n.port))
        .collect();
    let client = redis::cluster::ClusterClientBuilder::new(seeds)
        .response_timeout(Duration::from_secs(5))
        .build()
        .unwrap();
    env.redis = RedisConn::Cluster(client.get_async_connection().await.unwrap());
    env
}

/// Keys matching `pattern` on every primary of the cluster.
async fn cluster_keys(env: &Env, pattern: &str) -> Vec<String> {
    let mut conn = env.redis.clone();
    let mut found = Vec::new();
    for node in conn.primaries().await.unwrap() {
        let mut cursor = 0u64;
        loop {
            let (next, keys): (u64, Vec<String>) = conn
                .on_node(
                    &node,
                    redis::cmd("SCAN")
                        .arg(cursor)
                        .arg("MATCH")
                        .arg(pattern)
                        .arg("COUNT")
                        .arg(1000),
                )
                .await
                .unwrap();
            found.extend(keys);
            if next == 0 {
                break;
            }
            cursor = next;
        }
    }
    found.sort();
    found.dedup();
    found
}

/// Caches an entry per (key, tag); their full keys.
async fn cache_all(env: &Env, entries: impl Iterator<Item = (String, String)>) -> Vec<String> {
    let mut keys = Vec::new();
    for (key, tag) in entries {
        keys.push(env.cache(&key, &[&tag]).await);
    }
    keys
}

fn uuid(kind: char, i: usize) -> String {
    format!("00000000-0000-0000-0000-{kind}{i:011}")
}

/// Against a real cluster (three primaries, three replicas), with the default key layout: a
/// tag's members are removed in whatever slots they live (a small set at once, a large one
/// drained in chunks), other tags' entries stay, `invalidate`, `stats`, `doctor` and `explain`
/// work, the sweep and table-wide invalidation reach every primary, and no drain key is left.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_invalidates_across_slots() {
    let cluster = Cluster::start(3, 1).unwrap_or_else(|e| panic!("{e:#}"));
    let env = cluster_env(
        Delivery::Outbox,
        &cluster,
        "health_interval_ms = 200\nsweep_interval_secs = 1\n",
    )
    .await;
    let (c1, c2) = (uuid('c', 1), uuid('c', 2));
    let (p1, p2, p3) = (uuid('a', 1), uuid('a', 2), uuid('a', 3));
    env.sql(&format!(
        "INSERT INTO clients (id, name) VALUES ('{c1}', 'c1'), ('{c2}', 'c2');
         INSERT INTO products (id, client_id, name) VALUES
           ('{p1}', '{c1}', 'p1'), ('{p2}', '{c1}', 'p2'), ('{p3}', '{c2}', 'p3');"
    ))
    .await;
    let daemon = env.start_daemon().await;
    env.barrier().await;
    let small = cache_all(
        &env,
        (0..60).map(|i| (format!("p1:{i}"), format!("products:id:{p1}"))),
    )
    .await;
    let large = cache_all(
        &env,
        (0..1_000).map(|i| (format!("c2:{i}"), format!("products:client:{c2}"))),
    )
    .await;
    let kept = cache_all(
        &env,
        (0..5).map(|i| (format!("p2:{i}"), format!("products:id:{p2}"))),
    )
    .await;
    let unrelated = env.cache("unrelated", &["unrelated:thing"]).await;

    env.sql(&format!("UPDATE products SET name = 'x' WHERE id = '{p1}'"))
        .await;
    env.wait_gone(&small).await;
    env.sql(&format!("UPDATE products SET name = 'x' WHERE id = '{p3}'"))
        .await;
    env.wait_gone(&large).await;
    env.barrier().await;
    env.assert_present(&kept).await;
    env.assert_present(std::slice::from_ref(&unrelated)).await;
    let marker: Option<String> = env
        .redis
        .clone()
        .get(format!("{}tagts:products:id:{p1}", env.prefix))
        .await
        .unwrap();
    assert!(marker.is_some(), "the tag's tagts marker is stamped");

    invalidate_by_hand(&env).await;

    // The sweep reaches tag sets on every primary: members whose entry is gone go, the live
    // one stays.
    let live = env.cache("live", &["sweep:tag"]).await;
    let tag_key = format!("{}tag:sweep:tag", env.prefix);
    for i in 0..50 {
        let () = env
            .redis
            .clone()
            .sadd(&tag_key, format!("{}expired:{i}", env.prefix))
            .await
            .unwrap();
    }
    until("the sweep removes the expired members", || {
        let mut conn = env.redis.clone();
        let tag_key = tag_key.clone();
        async move { conn.scard::<_, u64>(&tag_key).await.unwrap_or(0) == 1 }
    })
    .await;
    env.assert_present(std::slice::from_ref(&live)).await;

    let stats = env.run_cli(&["stats"]);
    assert!(stats.status.success(), "{}", support::text(&stats));
    let stats: serde_json::Value = serde_json::from_slice(&stats.stdout).unwrap();
    assert_eq!(stats["totalEntries"], 7, "{stats:#}");
    assert_eq!(stats["tagSets"], 3, "{stats:#}");
    let doctor = env.run_cli(&["doctor"]);
    assert!(doctor.status.success(), "{}", support::text(&doctor));
    assert!(
        support::text(&doctor).contains("a cluster of 3 primaries"),
        "{}",
        support::text(&doctor)
    );
    let explain = env.run_cli(&["explain", "products", "truncate"]);
    assert!(explain.status.success(), "{}", support::text(&explain));
    for key in &kept {
        assert!(
            support::text(&explain).contains(key.as_str()),
            "{}",
            support::text(&explain)
        );
    }

    // Table-wide: every primary's products tags go, the rest stays.
    env.sql("TRUNCATE products CASCADE").await;
    env.wait_gone(&kept).await;
    env.barrier().await;
    env.assert_present(&[unrelated, live]).await;
    assert_eq!(
        cluster_keys(&env, &format!("{}drain:*", env.prefix)).await,
        Vec::<String>::new(),
        "drain keys left"
    );
    let table_marker: Option<String> = env
        .redis
        .clone()
        .get(format!("{}tagts-table:public.products", env.prefix))
        .await
        .unwrap();
    assert!(table_marker.is_some());
    support::assert_totals_count_exactly(&env).await;
    let log = daemon.log();
    assert!(!log.contains("CROSSSLOT"), "{log}");
    assert!(!log.contains("ERROR"), "{log}");
}

/// A primary failover in the middle of a burst of edits loses nothing, in both of its forms:
/// `CLUSTER FAILOVER` on a replica (a handover: redirections while slots move), and a primary
/// killed with SIGKILL (its replica promoted after the node timeout). Every edited product's
/// entry goes; entries of other tags stay; afterwards invalidation is precise again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_failover_during_a_burst_loses_nothing() {
    for kill in [false, true] {
        let mut cluster = Cluster::start(3, 1).unwrap_or_else(|e| panic!("{e:#}"));
        let env = cluster_env(Delivery::Outbox, &cluster, "health_interval_ms = 200\n").await;
        let c1 = uuid('c', 1);
        let products: Vec<String> = (0..60).map(|i| uuid('a', i)).collect();
        let mut sql = format!("INSERT INTO clients (id, name) VALUES ('{c1}', 'c1');");
        for p in &products {
            sql.push_str(&format!(
                "INSERT INTO products (id, client_id, name) VALUES ('{p}', '{c1}', 'p');"
            ));
        }
        env.sql(&sql).await;
        let daemon = env.start_daemon().await;
        env.barrier().await;
        let entries = cache_all(
            &env,
            products
                .iter()
                .map(|p| (format!("p:{p}"), format!("products:id:{p}"))),
        )
        .await;
        let unrelated = cache_all(
            &env,
            (0..30).map(|i| (format!("u:{i}"), format!("unrelated:{i}"))),
        )
        .await;
        cluster
            .wait_replicated(Duration::from_secs(10))
            .unwrap_or_else(|e| panic!("{e:#}"));

        let first = cluster.nodes[0].port;
        let victim = cluster.primary_ports(first).unwrap()[0];
        for (i, p) in products.iter().enumerate() {
            if i == 20 {
                if kill {
                    cluster.node(victim).unwrap().kill9().unwrap();
                } else {
                    let replica = cluster.replica_of(victim).unwrap();
                    let answer = cluster.cli(replica, &["cluster", "failover"]).unwrap();
                    assert!(answer.contains("OK"), "CLUSTER FAILOVER: {answer}");
                }
            }
            env.sql(&format!("UPDATE products SET name = 'x' WHERE id = '{p}'"))
                .await;
        }
        env.wait_gone(&entries).await;
        cluster
            .wait_until_ok(Duration::from_secs(30), false)
            .unwrap_or_else(|e| panic!("{e:#}"));
        daemon.wait_log("redis restarted or failed over").await;
        env.barrier().await;
        env.assert_present(&unrelated).await;

        let after = env
            .cache("after", &[&format!("products:id:{}", products[0])])
            .await;
        let stays = env
            .cache("stays", &[&format!("products:id:{}", products[1])])
            .await;
        env.sql(&format!(
            "UPDATE products SET name = 'y' WHERE id = '{}'",
            products[0]
        ))
        .await;
        env.wait_gone(&[after]).await;
        env.barrier().await;
        env.assert_present(&[stays]).await;
        env.assert_present(&unrelated).await;
        drop(daemon);
    }
}
