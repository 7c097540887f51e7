//! The Redis engines teams grow into, the real ones, started by the test: a master with a
//! replica and three Sentinels (`redis-server --sentinel`), failed over while the daemon runs.

mod support;

use std::time::{Duration, Instant};

use evictd::config::Delivery;
use evictd::throwaway::{Redis, Sentinel};
use evictd::sink::RedisConn;
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
        let manual = env.cache("manual", &["manual:tag"]).await;
        let invalidated = env.run_cli(&["invalidate", "manual:tag"]);
        assert!(
            invalidated.status.success(),
            "{}",
            support::text(&invalidated)
        );
        env.wait_gone(&[manual]).await;
        let stats = env.run_cli(&["stats"]);
        assert!(stats.status.success(), "{}", support::text(&stats));
        drop(daemon);
    }
}
