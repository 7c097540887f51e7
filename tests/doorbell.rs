//! The outbox's doorbell wake-up: writers skip their NOTIFY while a daemon drains, and still
//! nothing committed is left stale — the daemon's last drain waits for every writer that saw
//! it busy.

mod support;

use evictd::config::Delivery;
use support::{DEADLINE, Env};

/// The configuration that installs the doorbell wake-up.
const DOORBELL: &str = "outbox_wakeup = \"doorbell\"\n";
const C1: &str = "00000000-0000-0000-0000-0000000000c1";

fn product(i: usize) -> String {
    format!("00000000-0000-0000-0000-{i:012}")
}

/// Products 1..=`n` of client c1 (their INSERT's event dropped: no daemon runs yet), each with
/// a cached entry tagged by its id; returns the keys.
async fn seed(env: &Env, n: usize) -> Vec<String> {
    env.sql(&format!(
        "INSERT INTO clients (id, name) VALUES ('{C1}', 'c1');
         INSERT INTO products (id, client_id, name)
         SELECT ('00000000-0000-0000-0000-' || lpad(i::text, 12, '0'))::uuid, '{C1}', 'p' || i
         FROM generate_series(1, {n}) i;
         DELETE FROM evictd.outbox;"
    ))
    .await;
    let mut keys = Vec::new();
    for i in 1..=n {
        let id = product(i);
        keys.push(
            env.cache(&format!("product:{id}"), &[&format!("products:id:{id}")])
                .await,
        );
    }
    keys
}

/// Counts the wake-ups heard on the channel.
struct Listener(support::Listener);

impl Listener {
    async fn start(env: &Env) -> Listener {
        Listener(env.listen().await)
    }

    /// The wake-ups (empty payloads) heard until now: sends a closing NOTIFY and reads up to it.
    async fn wakeups(&mut self) -> usize {
        self.0
            .client
            .batch_execute("SELECT pg_notify('cache_invalidation', 'end')")
            .await
            .unwrap();
        let mut wakeups = 0;
        loop {
            let payload = tokio::time::timeout(DEADLINE, self.0.payloads.recv())
                .await
                .expect("the closing NOTIFY within the deadline")
                .unwrap();
            match payload.as_str() {
                "end" => return wakeups,
                "" => wakeups += 1,
                _ => {}
            }
        }
    }
}

/// Waits until the doorbell says idle (a daemon that found work stays busy a few milliseconds).
async fn wait_idle(env: &Env) {
    let start = std::time::Instant::now();
    while doorbell(env).await != 0 {
        assert!(start.elapsed() < DEADLINE, "the doorbell stayed busy");
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
}

async fn doorbell(env: &Env) -> i64 {
    env.pg
        .query_one(
            "SELECT coalesce(pg_sequence_last_value('evictd.doorbell'), 0)",
            &[],
        )
        .await
        .unwrap()
        .get(0)
}

/// While the doorbell says busy a writer does not ring; a daemon that died draining leaves it
/// so, and the next one sets it back and drains what was written meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn busy_doorbell_silences_writers_and_a_new_daemon_resets_it() {
    let env = Env::with_config(Delivery::Outbox, DOORBELL).await;
    let keys = seed(&env, 2).await;
    let mut listener = Listener::start(&env).await;
    env.sql(&format!(
        "UPDATE products SET price_cents = 1 WHERE id = '{}'",
        product(1)
    ))
    .await;
    assert_eq!(listener.wakeups().await, 1, "an idle doorbell rings");

    env.sql("SELECT setval('evictd.doorbell', 1)").await;
    env.sql(&format!(
        "UPDATE products SET price_cents = 1 WHERE id = '{}'",
        product(2)
    ))
    .await;
    assert_eq!(listener.wakeups().await, 0, "a busy doorbell does not ring");
    assert_eq!(env.outbox_len().await, 2, "both events are queued");

    let _daemon = env.start_daemon().await;
    env.wait_gone(&keys).await;
    wait_idle(&env).await;
    assert_eq!(env.outbox_len().await, 0);
}

/// A writer that saw the daemon busy and commits after the daemon went idle again is not left
/// behind: the daemon's last drain waits (without blocking) until that writer has ended.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_last_drain_waits_for_writers_that_saw_the_daemon_busy() {
    let env = Env::with_config(Delivery::Outbox, DOORBELL).await;
    let keys = seed(&env, 4).await;
    let daemon = env.start_daemon().await;
    wait_idle(&env).await;

    // As if the daemon were draining: the open transaction's writer sees it busy.
    env.sql("SELECT setval('evictd.doorbell', 1)").await;
    let open = env.connect_pg().await;
    open.batch_execute(&format!(
        "BEGIN; UPDATE products SET price_cents = 2 WHERE id = '{}'",
        product(1)
    ))
    .await
    .unwrap();
    // Other writers commit, silently too; a wake-up finds their three events, which sends the
    // daemon through a busy period and back to idle, where the open writer holds up its last
    // drain.
    for i in 2..=4 {
        env.sql(&format!(
            "UPDATE products SET price_cents = 2 WHERE id = '{}'",
            product(i)
        ))
        .await;
    }
    env.sql("SELECT pg_notify('cache_invalidation', '')").await;
    env.wait_gone(&keys[1..]).await;
    daemon
        .wait_log("doorbell barrier: a writer that saw the daemon busy has not ended")
        .await;
    env.assert_present(&keys[..1]).await;
    assert_eq!(doorbell(&env).await, 0, "idle while it waits");

    open.batch_execute("COMMIT").await.unwrap();
    env.wait_gone(&keys[..1]).await;
}

/// At a low rate each wake-up finds one event, and the daemon stays idle: every commit rings,
/// and none waits for a poll.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_event_at_a_time_keeps_the_doorbell_idle() {
    let env = Env::with_config(Delivery::Outbox, DOORBELL).await;
    let keys = seed(&env, 5).await;
    let _daemon = env.start_daemon().await;
    let mut listener = Listener::start(&env).await;
    for (i, key) in keys.iter().enumerate() {
        env.sql(&format!(
            "UPDATE products SET price_cents = 3 WHERE id = '{}'",
            product(i + 1)
        ))
        .await;
        env.wait_gone(std::slice::from_ref(key)).await;
    }
    assert_eq!(listener.wakeups().await, keys.len(), "every commit rang");
    assert_eq!(doorbell(&env).await, 0);
}

/// Four writers flat out against a running daemon: every touched entry goes, the others stay,
/// and the writers rang fewer times than they committed (the daemon was busy for some).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_writers_lose_nothing_and_ring_less() {
    const WRITERS: usize = 4;
    const EACH: usize = 250;
    let env = Env::with_config(Delivery::Outbox, DOORBELL).await;
    let keys = seed(&env, WRITERS * EACH + 10).await;
    let _daemon = env.start_daemon().await;
    let mut listener = Listener::start(&env).await;
    let mut writers = Vec::new();
    for w in 0..WRITERS {
        let client = env.connect_pg().await;
        writers.push(tokio::spawn(async move {
            let update = client
                .prepare(
                    "UPDATE products SET price_cents = price_cents + 1 WHERE id = $1::text::uuid",
                )
                .await
                .unwrap();
            for i in 0..EACH {
                let id = product(1 + w * EACH + i);
                client.execute(&update, &[&id]).await.unwrap();
            }
        }));
    }
    for writer in writers {
        writer.await.unwrap();
    }
    let commits = WRITERS * EACH;
    env.wait_gone(&keys[..commits]).await;
    env.assert_present(&keys[commits..]).await;
    let wakeups = listener.wakeups().await;
    assert!(
        wakeups < commits,
        "{wakeups} wake-ups for {commits} commits: the doorbell never said busy"
    );
    env.wait_outbox_empty().await;
    wait_idle(&env).await;
}

/// The doctor's `doorbell` line, as (status, message, hint).
fn doctor_doorbell(env: &Env) -> (String, String, String) {
    let output = env.run_cli(&["doctor", "--json"]);
    let report: serde_json::Value = serde_json::from_slice(&output.stdout)
        .unwrap_or_else(|e| panic!("doctor --json: {e}: {}", support::text(&output)));
    let check = report["checks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "doorbell")
        .unwrap_or_else(|| panic!("no doorbell check: {report}"));
    let field = |name: &str| check[name].as_str().unwrap_or_default().to_string();
    (field("status"), field("message"), field("hint"))
}

/// A doorbell left busy by a daemon that died draining, with events waiting, is a WARN that
/// says what to do; an idle one, or a busy one with nothing old waiting, is fine.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn doctor_reports_a_doorbell_left_busy() {
    let env = Env::with_config(Delivery::Outbox, DOORBELL).await;
    seed(&env, 1).await;
    assert_eq!(doctor_doorbell(&env).0, "OK", "idle");

    env.sql("SELECT setval('evictd.doorbell', 1)").await;
    assert_eq!(doctor_doorbell(&env).0, "OK", "busy, nothing waiting");

    env.sql(&format!(
        "UPDATE products SET price_cents = 1 WHERE id = '{}';
         UPDATE evictd.outbox SET created_at = created_at - interval '1 minute';",
        product(1)
    ))
    .await;
    let (status, message, hint) = doctor_doorbell(&env);
    assert_eq!(status, "WARN", "{message}");
    assert!(message.contains("no daemon is draining"), "{message}");
    assert!(hint.contains("evictd run"), "{hint}");
    assert_eq!(env.outbox_len().await, 1, "doctor changes nothing");
}
