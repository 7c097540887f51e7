//! Real faults: kill -9 the daemon, PostgreSQL or Redis, freeze a backend, terminate the
//! listening session, poison the outbox. Every test ends by proving that no entry that should
//! have gone survived and no entry that should have stayed was removed.

mod support;

use std::time::{Duration, Instant};

use evictd::config::Delivery;
use redis::AsyncCommands as _;
use support::{DEADLINE, Env};

/// Products seeded for the burst tests, each with one cache entry tagged `products:id:<id>`.
const PRODUCTS: usize = 300;

fn product_id(i: usize) -> String {
    format!("00000000-0000-0000-0000-{i:012}")
}

async fn seed_products(env: &Env) {
    env.sql(&format!(
        "INSERT INTO clients (id, name) VALUES ('00000000-0000-0000-0000-0000000000c1', 'c');
         INSERT INTO products (id, client_id, name)
         SELECT ('00000000-0000-0000-0000-' || lpad(i::text, 12, '0'))::uuid,
                '00000000-0000-0000-0000-0000000000c1', 'p' || i
         FROM generate_series(0, {}) i;",
        PRODUCTS - 1
    ))
    .await;
}

/// One entry per product plus entries no table produces; returns (product entries, unrelated).
async fn cache_products(env: &Env) -> (Vec<String>, Vec<String>) {
    let mut entries = Vec::with_capacity(PRODUCTS);
    for i in 0..PRODUCTS {
        let tag = format!("products:id:{}", product_id(i));
        entries.push(env.cache(&format!("product:{i}"), &[&tag]).await);
    }
    let mut unrelated = Vec::new();
    for i in 0..20 {
        unrelated.push(
            env.cache(&format!("unrelated:{i}"), &[&format!("unrelated:{i}")])
                .await,
        );
    }
    unrelated.push(env.cache("untagged", &[]).await);
    (entries, unrelated)
}

/// Updates products `range`, one transaction each, from a separate connection.
async fn edit(env: &Env, range: std::ops::Range<usize>) {
    spawn_edits(env, range).await.expect("edits");
}

/// Updates products `range` in the background, one transaction each (a burst of edits).
fn spawn_edits(env: &Env, range: std::ops::Range<usize>) -> tokio::task::JoinHandle<()> {
    let db_url = env.db_url.clone();
    tokio::spawn(async move {
        let (client, conn) = tokio_postgres::connect(&db_url, tokio_postgres::NoTls)
            .await
            .expect("connect");
        tokio::spawn(conn);
        for i in range {
            client
                .execute(
                    "UPDATE products SET price_cents = price_cents + 1 WHERE id = $1::text::uuid",
                    &[&product_id(i)],
                )
                .await
                .expect("edit");
        }
    })
}

/// Edited entries are all gone; the others (when `precise`) and the unrelated ones all stayed.
async fn verify(
    env: &Env,
    entries: &[String],
    edited: &[usize],
    unrelated: &[String],
    precise: bool,
) {
    let gone: Vec<String> = edited.iter().map(|&i| entries[i].clone()).collect();
    env.wait_gone(&gone).await;
    env.barrier().await;
    if precise {
        let kept: Vec<String> = (0..entries.len())
            .filter(|i| !edited.contains(i))
            .map(|i| entries[i].clone())
            .collect();
        env.assert_present(&kept).await;
    }
    env.assert_present(unrelated).await;
}

/// kill -9 the daemon in the middle of a burst, edit more while it is down, start it again:
/// the outbox delivers every event, exactly the edited entries go.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn daemon_killed_mid_burst_loses_nothing() {
    killed_mid_burst(Delivery::Outbox, "").await;
}

/// The same with claims of 7 rows, so that each drain transaction takes several claims (the
/// next one taken while Redis works on the last) before it commits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn daemon_killed_mid_burst_loses_nothing_small_claims() {
    killed_mid_burst(Delivery::Outbox, "batch_max_events = 7\n").await;
}

/// The same with `logical` delivery: the replication slot keeps every change the daemon had
/// not confirmed, so nothing is lost and nothing more is removed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn daemon_killed_mid_burst_loses_nothing_logical() {
    killed_mid_burst(Delivery::Logical, "").await;
}

async fn killed_mid_burst(delivery: Delivery, toml: &str) {
    let env = Env::with_config(delivery, toml).await;
    seed_products(&env).await;
    let mut daemon = env.start_daemon().await;
    let (entries, unrelated) = cache_products(&env).await;

    let burst = spawn_edits(&env, 0..200);
    // Kill it once the burst is visibly being processed.
    env.wait_gone(&entries[..5]).await;
    daemon.kill9();
    burst.await.unwrap();
    edit(&env, 200..250).await;

    let _daemon = env.start_daemon().await;
    verify(
        &env,
        &entries,
        &(0..250).collect::<Vec<_>>(),
        &unrelated,
        true,
    )
    .await;
    if delivery == Delivery::Outbox {
        env.wait_outbox_empty().await;
    }
}

/// PostgreSQL stopped (fast shutdown, then kill -9) under a running daemon, restarted, edited
/// again: the daemon reconnects by itself each time and keeps invalidating.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_restarts_under_the_daemon() {
    for delivery in [Delivery::Outbox, Delivery::Notify, Delivery::Logical] {
        let mut env = Env::isolated(delivery, "health_interval_ms = 500\n", &[]).await;
        seed_products(&env).await;
        let daemon = env.start_daemon().await;
        let (entries, unrelated) = cache_products(&env).await;
        edit(&env, 0..10).await;
        env.wait_gone(&entries[..10]).await;

        env.own().pg.stop_fast().unwrap();
        daemon.wait_log("not serving; retrying").await;
        env.own().pg.restart().unwrap();
        env.reconnect_pg().await;
        daemon.wait_log_count("evictd is ready", 2).await;
        edit(&env, 10..20).await;
        env.wait_gone(&entries[10..20]).await;

        env.own().pg.kill9().unwrap();
        env.own().pg.restart().unwrap();
        env.reconnect_pg().await;
        daemon.wait_log_count("evictd is ready", 3).await;
        // Re-cache: in notify mode each reconnect invalidated every products tag.
        let (entries, unrelated_again) = cache_products(&env).await;
        edit(&env, 20..30).await;
        verify(
            &env,
            &entries,
            &(20..30).collect::<Vec<_>>(),
            &unrelated,
            delivery != Delivery::Notify,
        )
        .await;
        env.assert_present(&unrelated_again).await;
        assert!(daemon.child.id() > 0);
    }
}

/// Redis killed (-9) and restarted from its append-only file while edits are being committed:
/// entries it brings back are invalidated again, and events that arrived meanwhile wait in the
/// outbox until Redis confirms them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_restarts_while_edits_are_committed() {
    let mut env = Env::isolated(
        Delivery::Outbox,
        "health_interval_ms = 300\n",
        &["--appendonly", "yes", "--appendfsync", "always"],
    )
    .await;
    seed_products(&env).await;
    let daemon = env.start_daemon().await;
    let (entries, unrelated) = cache_products(&env).await;

    let burst = spawn_edits(&env, 0..150);
    env.wait_gone(&entries[..3]).await;
    env.own().redis.kill9().unwrap();
    burst.await.unwrap();
    edit(&env, 150..200).await;
    env.own().redis.restart().unwrap();
    daemon.wait_log("redis restarted or failed over").await;
    verify(
        &env,
        &entries,
        &(0..200).collect::<Vec<_>>(),
        &unrelated,
        false,
    )
    .await;
    env.wait_outbox_empty().await;
}

/// Two daemons share one database's outbox; one is killed mid-burst; together they lose nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_daemons_one_killed_mid_burst() {
    let env = Env::new(Delivery::Outbox).await;
    seed_products(&env).await;
    let mut first = env.start_daemon().await;
    let _second = env.start_daemon().await;
    let (entries, unrelated) = cache_products(&env).await;
    let burst = spawn_edits(&env, 0..250);
    env.wait_gone(&entries[..5]).await;
    first.kill9();
    burst.await.unwrap();
    verify(
        &env,
        &entries,
        &(0..250).collect::<Vec<_>>(),
        &unrelated,
        true,
    )
    .await;
}

/// `pg_terminate_backend` of the listening session: the daemon reconnects, LISTENs again and
/// (notify mode) resyncs, so edits during the gap are covered too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn terminated_listening_session_reconnects() {
    for delivery in [Delivery::Notify, Delivery::Outbox] {
        let env = Env::new(delivery).await;
        seed_products(&env).await;
        let daemon = env.start_daemon().await;
        let (entries, unrelated) = cache_products(&env).await;
        let killed: i64 = env
            .pg
            .query_one(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity \
                 WHERE application_name = 'evictd' AND datname = current_database()",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        assert_eq!(killed, 1);
        edit(&env, 0..5).await;
        daemon.wait_log_count("evictd is ready", 2).await;
        edit(&env, 5..10).await;
        verify(
            &env,
            &entries,
            &(0..10).collect::<Vec<_>>(),
            &unrelated,
            delivery != Delivery::Notify,
        )
        .await;
    }
}

/// `logical` delivery: a frozen walsender (SIGSTOP) leaves the replication connection open and
/// silent while the daemon's other connection works. The marker written on each health tick
/// does not come back, the daemon reconnects, and nothing committed meanwhile is lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_replication_stream_is_detected() {
    frozen_connection_is_noticed(Frozen {
        delivery: Delivery::Logical,
        pid_sql: "SELECT active_pid FROM pg_replication_slots WHERE database = current_database()",
        log_line: "did not deliver our marker",
        // The new stream can only take the slot once the frozen walsender lets it go.
        thaw_before_ready: true,
    })
    .await;
}

/// A frozen PostgreSQL backend (SIGSTOP) keeps the socket open but never answers: the daemon
/// notices within two health intervals, reconnects, and nothing committed meanwhile is lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn half_open_connection_is_detected() {
    frozen_connection_is_noticed(Frozen {
        delivery: Delivery::Outbox,
        pid_sql: "SELECT pid FROM pg_stat_activity WHERE application_name = 'evictd' AND datname = current_database()",
        log_line: "half-open",
        thaw_before_ready: false,
    })
    .await;
}

/// Which server process to freeze, and what the daemon says when it notices.
struct Frozen {
    delivery: Delivery,
    pid_sql: &'static str,
    log_line: &'static str,
    thaw_before_ready: bool,
}

async fn frozen_connection_is_noticed(frozen: Frozen) {
    let env = Env::with_config(frozen.delivery, "health_interval_ms = 400\n").await;
    seed_products(&env).await;
    let daemon = env.start_daemon().await;
    let (entries, unrelated) = cache_products(&env).await;
    let pid: i32 = env.pg.query_one(frozen.pid_sql, &[]).await.unwrap().get(0);
    // SAFETY: signals to a PostgreSQL process we started.
    unsafe { libc::kill(pid, libc::SIGSTOP) };
    let frozen_at = Instant::now();
    edit(&env, 0..10).await;
    daemon.wait_log(frozen.log_line).await;
    let detected = frozen_at.elapsed();
    if frozen.thaw_before_ready {
        unsafe { libc::kill(pid, libc::SIGCONT) };
    }
    daemon.wait_log_count("evictd is ready", 2).await;
    unsafe { libc::kill(pid, libc::SIGCONT) };
    assert!(
        detected < Duration::from_secs(3),
        "a frozen process took {detected:?} to notice (bound: two 400 ms health intervals)"
    );
    edit(&env, 10..20).await;
    verify(
        &env,
        &entries,
        &(0..20).collect::<Vec<_>>(),
        &unrelated,
        true,
    )
    .await;
}

/// The daemon killed while draining a 1,000,000-member tag: after a restart the drain completes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_of_a_huge_tag_resumes_after_a_crash() {
    let env = Env::with_config(Delivery::Outbox, "drain_chunk = 200\n").await;
    seed_products(&env).await;
    let mut daemon = env.start_daemon().await;
    let tag_key = format!("{}tag:products:id:{}", env.prefix, product_id(0));
    let mut conn = env.redis.clone();
    let members: Vec<String> = (0..1_000_000)
        .map(|i| format!("{}huge:{i}", env.prefix))
        .collect();
    for chunk in members.chunks(20_000) {
        let mut pipe = redis::pipe();
        for key in chunk {
            pipe.cmd("SET").arg(key).arg("v").ignore();
        }
        pipe.cmd("SADD").arg(&tag_key).arg(chunk).ignore();
        let () = pipe.query_async(&mut conn).await.unwrap();
    }
    let survivor = env.cache("survivor", &["unrelated:survivor"]).await;

    edit(&env, 0..1).await;
    // Wait until the drain has visibly started, then crash the daemon.
    let start = Instant::now();
    let sample: Vec<String> = members.iter().step_by(500).cloned().collect();
    loop {
        if env.count_existing(&sample).await < 1_990 {
            break;
        }
        assert!(start.elapsed() < DEADLINE, "the drain never started");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    daemon.kill9();
    let left: u64 = conn.exists(&members[..]).await.unwrap();
    assert!(
        left > 0,
        "the drain finished before the crash; nothing to resume"
    );

    let _daemon = env.start_daemon().await;
    // Readiness comes after resumed drains.
    let left = env.count_existing(&members).await;
    assert_eq!(left, 0, "members left after the resumed drain");
    let drains: Vec<String> = env
        .keys()
        .await
        .into_iter()
        .filter(|k| k.starts_with(&format!("{}drain:", env.prefix)))
        .collect();
    assert!(drains.is_empty(), "{drains:?}");
    env.assert_present(&[survivor]).await;
}

/// One statement of 60,000 rows is invalidated in several pieces, each sent to Redis while the
/// next is rendered. kill -9 the daemon once the first pieces are visibly done, before the
/// statement's outbox row is acknowledged: the restarted daemon delivers the whole statement
/// again, so every touched entry goes and the untouched one stays.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn daemon_killed_mid_statement_loses_nothing() {
    killed_mid_statement(Delivery::Outbox).await;
}

/// The same in `logical` delivery: the transaction's end is not confirmed to the slot before
/// every part went to Redis and its markers got their TTL, so the restarted daemon streams it
/// again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn daemon_killed_mid_statement_loses_nothing_logical() {
    killed_mid_statement(Delivery::Logical).await;
}

/// `rows + 1` products, each with a cache entry tagged `products:id:<id>`, and a daemon
/// (started with `daemon_args`) that has caught up with their INSERT before the entries were
/// written. Returns the daemon and the entries, product by product.
async fn products_with_entries(
    env: &Env,
    rows: usize,
    daemon_args: &[&str],
) -> (support::Daemon, Vec<String>) {
    env.sql(&format!(
        "INSERT INTO clients (id, name) VALUES ('00000000-0000-0000-0000-0000000000c1', 'c');
         INSERT INTO products (id, client_id, name)
         SELECT ('00000000-0000-0000-0000-' || lpad(i::text, 12, '0'))::uuid,
                '00000000-0000-0000-0000-0000000000c1', 'p' || i
         FROM generate_series(0, {rows}) i;"
    ))
    .await;
    let daemon = env.spawn_daemon(daemon_args);
    daemon.wait_ready().await;
    let entries: Vec<String> = (0..=rows)
        .map(|i| format!("{}product:{i}", env.prefix))
        .collect();
    let mut conn = env.redis.clone();
    for (chunk_no, chunk) in entries.chunks(10_000).enumerate() {
        let mut pipe = redis::pipe();
        for (j, key) in chunk.iter().enumerate() {
            let tag = format!(
                "{}tag:products:id:{}",
                env.prefix,
                product_id(chunk_no * 10_000 + j)
            );
            pipe.cmd("SET").arg(key).arg("cached").ignore();
            pipe.cmd("SADD").arg(tag).arg(key).ignore();
        }
        let () = pipe.query_async(&mut conn).await.unwrap();
    }
    (daemon, entries)
}

/// Short `statement_timeout` and `idle_in_transaction_session_timeout` on the daemon's role or
/// database must not break a claim: the daemon folds a claim's rows as they arrive, while Redis
/// invalidates the first ones, so its `DELETE … RETURNING` stays open for as long as the
/// statement's pieces take, and the transaction idles while Redis works on the last. The
/// daemon turns both off for its own session; otherwise the claim failed and was retried for
/// ever (the daemon never even became ready: its start-up backlog failed the same way).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn claims_outlast_short_session_timeouts() {
    outlasts_short_session_timeouts(Delivery::Outbox).await;
}

/// The same in `logical` delivery, whose replication connection and slot queries run under
/// the same role defaults.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logical_stream_outlasts_short_session_timeouts() {
    outlasts_short_session_timeouts(Delivery::Logical).await;
}

async fn outlasts_short_session_timeouts(delivery: Delivery) {
    const ROWS: usize = 60_000;
    let env = Env::new(delivery).await;
    // Over the Unix socket, whose small buffers make PostgreSQL wait for the daemon to read on
    // (over loopback TCP a 60,000-row statement's events fit the kernel's buffers).
    let url = format!(
        "{}?options=-c%20statement_timeout%3D50%20-c%20idle_in_transaction_session_timeout%3D50",
        env.pg_server().unix_url(&env.name)
    );
    let (daemon, entries) = products_with_entries(&env, ROWS, &["--database-url", &url]).await;
    let (touched, untouched) = entries.split_at(ROWS);
    env.sql(&format!(
        "UPDATE products SET name = name || '!' WHERE id <= '{}'",
        product_id(ROWS - 1)
    ))
    .await;
    env.wait_gone(touched).await;
    if delivery == Delivery::Outbox {
        env.wait_outbox_empty().await;
    }
    env.assert_present(untouched).await;
    assert!(
        !daemon.log().contains("not serving"),
        "a claim failed: {}",
        daemon.log()
    );
}

async fn killed_mid_statement(delivery: Delivery) {
    const ROWS: usize = 60_000;
    let env = Env::new(delivery).await;
    let (mut daemon, entries) = products_with_entries(&env, ROWS, &[]).await;
    let mut conn = env.redis.clone();
    let (touched, untouched) = entries.split_at(ROWS);
    let unrelated = env.cache("unrelated", &["unrelated:tag"]).await;

    env.sql(&format!(
        "UPDATE products SET name = name || '!' WHERE id <= '{}'",
        product_id(ROWS - 1)
    ))
    .await;
    let sample: Vec<String> = touched.iter().step_by(100).cloned().collect();
    let start = Instant::now();
    while env.count_existing(&sample).await == sample.len() as u64 {
        assert!(
            start.elapsed() < DEADLINE,
            "the statement was never invalidated"
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    daemon.kill9();
    if delivery == Delivery::Outbox {
        // The statement's events, one per 10,000 rows (`ddl::OUTBOX_EVENT_ROWS`), all still
        // claimed by the killed daemon's open transaction, so all back in the queue.
        let queued = env.outbox_len().await;
        assert_eq!(
            queued,
            ROWS.div_ceil(evictd::schema::ddl::OUTBOX_EVENT_ROWS as usize) as i64,
            "the statement was acknowledged before the crash; nothing to deliver again"
        );
    }
    assert!(
        env.count_existing(touched).await > 0,
        "every piece was done before the crash"
    );
    let pending: u64 = conn
        .llen(format!("{}evictd:ttl-pending", env.prefix))
        .await
        .unwrap();
    assert!(
        pending > 0,
        "no marker was waiting for its TTL at the crash"
    );

    let _daemon = env.start_daemon().await;
    assert_eq!(env.count_existing(touched).await, 0, "touched entries left");
    env.barrier().await;
    env.assert_present(untouched).await;
    env.assert_present(&[unrelated]).await;
    if delivery == Delivery::Outbox {
        env.wait_outbox_empty().await;
    }
    // The pieces' `tagts` markers were written before their TTL (deferred to the end of the
    // statement); whatever the crash left pending was finished: every marker has its TTL.
    let pending: u64 = conn
        .llen(format!("{}evictd:ttl-pending", env.prefix))
        .await
        .unwrap();
    assert_eq!(pending, 0, "markers still waiting for their TTL");
    for i in (0..ROWS).step_by(97) {
        let marker = format!("{}tagts:products:id:{}", env.prefix, product_id(i));
        let ttl: i64 = conn.pttl(&marker).await.unwrap();
        assert!(ttl > 0 && ttl <= 86_400_000, "{marker}: pttl {ttl}");
    }
}

/// A poison event between two good ones is moved aside with its error and counted, kept as it
/// was queued: id, payload, and time to the microsecond, though the database's default date
/// style and time zone print a summer time in Dublin as `IST`, which PostgreSQL reads back as
/// Israel's. The good ones on either side are invalidated.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn poison_event_is_moved_aside() {
    let env = Env::new(Delivery::Outbox).await;
    env.sql(
        "DO $$ BEGIN \
         EXECUTE format('ALTER DATABASE %I SET datestyle = ''Postgres, DMY''', current_database()); \
         EXECUTE format('ALTER DATABASE %I SET timezone = ''Europe/Dublin''', current_database()); \
         END $$",
    )
    .await;
    seed_products(&env).await;
    let daemon = env.start_daemon().await;
    let (entries, unrelated) = cache_products(&env).await;
    env.sql(&format!(
        "BEGIN; UPDATE products SET name = 'a' WHERE id = '{}';",
        product_id(1)
    ))
    .await;
    let queued = env
        .pg
        .query_one(
            r#"INSERT INTO evictd.outbox (payload, created_at)
               VALUES ('{"v":1,"op":"EXPLODE"}', '2026-07-01 12:00:00.123456+00')
               RETURNING id, created_at"#,
            &[],
        )
        .await
        .unwrap();
    env.sql(&format!(
        "UPDATE products SET name = 'b' WHERE id = '{}'; COMMIT;",
        product_id(2)
    ))
    .await;
    verify(&env, &entries, &[1, 2], &unrelated, true).await;
    let dead = env
        .pg
        .query(
            "SELECT id, created_at, payload, error, \
             (failed_at > now() - interval '1 minute')::text FROM evictd.dead_letter",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].get::<_, i64>(0), queued.get::<_, i64>(0));
    assert_eq!(
        dead[0].get::<_, std::time::SystemTime>(1),
        queued.get::<_, std::time::SystemTime>(1)
    );
    assert_eq!(dead[0].get::<_, String>(2), r#"{"v":1,"op":"EXPLODE"}"#);
    let error: String = dead[0].get(3);
    assert!(error.contains("EXPLODE"), "{error}");
    assert_eq!(dead[0].get::<_, String>(4), "true");
    env.wait_outbox_empty().await;
    let (_, metrics) = support::http_get(&daemon.http_addr(), "/metrics");
    assert!(
        metrics.contains("evictd_events_rejected_total{kind=\"malformed\"} 1"),
        "{metrics}"
    );
}

/// `n` cache entries (with a TTL) in tag `tag`; their keys.
async fn fill_tag(env: &Env, tag: &str, n: usize) -> Vec<String> {
    let mut conn = env.redis.clone();
    let tag_key = format!("{}tag:{tag}", env.prefix);
    let members: Vec<String> = (0..n)
        .map(|i| format!("{}{tag}:entry:{i}", env.prefix))
        .collect();
    for chunk in members.chunks(10_000) {
        let mut pipe = redis::pipe();
        for key in chunk {
            pipe.cmd("SET")
                .arg(key)
                .arg("v")
                .arg("EX")
                .arg(3600)
                .ignore();
        }
        pipe.cmd("SADD").arg(&tag_key).arg(chunk).ignore();
        let () = pipe.query_async(&mut conn).await.unwrap();
    }
    members
}

/// Once a detached tag set of this test is being drained, cuts every Redis client connection
/// but the one asking (`CLIENT KILL … SKIPME yes`): whoever drains loses its connection
/// mid-drain.
async fn cut_connections_mid_drain(env: &Env) {
    let client = redis::Client::open(env.redis_url.as_str()).unwrap();
    let mut own = client.get_multiplexed_async_connection().await.unwrap();
    let pattern = format!("{}drain:*", env.prefix);
    let start = Instant::now();
    loop {
        let (_, found): (u64, Vec<String>) = redis::cmd("SCAN")
            .arg(0)
            .arg("MATCH")
            .arg(&pattern)
            .arg("COUNT")
            .arg(1_000_000)
            .query_async(&mut own)
            .await
            .unwrap();
        if !found.is_empty() {
            break;
        }
        assert!(start.elapsed() < DEADLINE, "no drain started");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let killed: u64 = redis::cmd("CLIENT")
        .arg("KILL")
        .arg("TYPE")
        .arg("normal")
        .arg("SKIPME")
        .arg("yes")
        .query_async(&mut own)
        .await
        .unwrap();
    assert!(killed > 0, "no connection to cut");
}

/// What is left of a drain: members still there, and drain keys.
async fn after_the_drain(env: &Env, members: &[String]) -> (u64, Vec<String>) {
    let left = env.count_existing(members).await;
    let drains: Vec<String> = env
        .keys()
        .await
        .into_iter()
        .filter(|k| k.starts_with(&format!("{}drain:", env.prefix)))
        .collect();
    (left, drains)
}

/// Redis drops the daemon's connection while it drains a big tag set it detached. The batch
/// is retried, and counts as done only once that set is empty too: every member goes without
/// a restart, no drain key is left, and an entry of another tag stays. (The sweep, which also
/// finishes left drains, is off.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_cut_mid_drain_leaves_nothing_behind() {
    for delivery in [Delivery::Notify, Delivery::Logical] {
        let env = Env::isolated(delivery, "drain_chunk = 10\nsweep_interval_secs = 0\n", &[]).await;
        let daemon = env.start_daemon().await;
        env.barrier().await;
        let members = fill_tag(&env, "big:tag", 50_000).await;
        let survivor = env.cache("survivor", &["unrelated:survivor"]).await;
        env.sql("SELECT evictd.invalidate_tags('big:tag')").await;
        cut_connections_mid_drain(&env).await;
        daemon.wait_log("redis invalidation failed").await;
        let start = Instant::now();
        loop {
            let (left, drains) = after_the_drain(&env, &members).await;
            if left == 0 && drains.is_empty() {
                break;
            }
            assert!(
                start.elapsed() < DEADLINE,
                "{delivery:?}: {left} members and drains {drains:?} left behind"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        env.assert_present(&[survivor]).await;
        assert_eq!(
            daemon.log().matches("evictd is ready").count(),
            1,
            "{delivery:?}: the daemon started over"
        );
    }
}

/// `evictd invalidate` cut off from Redis mid-drain retries, drains what it had detached, and
/// exits 0 with nothing left behind.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalidate_command_cut_mid_drain_finishes() {
    let env = Env::isolated(Delivery::Outbox, "drain_chunk = 10\n", &[]).await;
    let members = fill_tag(&env, "big:tag", 50_000).await;
    let survivor = env.cache("survivor", &["unrelated:survivor"]).await;
    let command = env.command(&["invalidate", "big:tag"]);
    let finished = std::thread::spawn(move || support::finish(command));
    cut_connections_mid_drain(&env).await;
    let output = tokio::task::spawn_blocking(move || finished.join().unwrap())
        .await
        .unwrap();
    let said = support::text(&output);
    assert_eq!(output.status.code(), Some(0), "{said}");
    assert!(
        said.contains("retrying"),
        "the cut did not reach it: {said}"
    );
    let (left, drains) = after_the_drain(&env, &members).await;
    assert_eq!((left, drains), (0, Vec::new()));
    env.assert_present(&[survivor]).await;
}

/// `logical` delivery: the walsender freezes (SIGSTOP) while the daemon is still catching up
/// on a backlog, before readiness. The catch-up gives up after its silence bound (12 health
/// intervals) instead of waiting for ever; once the walsender thaws, the daemon catches up,
/// becomes ready, and nothing committed is lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn frozen_stream_during_catch_up_is_noticed() {
    let env = Env::with_config(Delivery::Logical, "health_interval_ms = 400\n").await;
    seed_products(&env).await;
    drop(env.start_daemon().await);
    let (entries, unrelated) = cache_products(&env).await;
    // A backlog the walsender takes a while to decode, committed while no daemon reads.
    env.sql(
        "INSERT INTO clients (id, name) SELECT gen_random_uuid(), 'bulk' FROM generate_series(1, 300000)",
    )
    .await;
    edit(&env, 0..10).await;
    let daemon = env.spawn_daemon(&[]);
    let start = Instant::now();
    // Frozen once it reads WAL past the slot's position: streaming has started (a walsender
    // frozen earlier, before it answers START_REPLICATION, is the connect timeout's case).
    let pid: i32 = loop {
        let row = env
            .pg
            .query_opt(
                "SELECT r.pid FROM pg_stat_replication r, pg_replication_slots s \
                 WHERE s.database = current_database() AND s.active_pid = r.pid \
                 AND r.sent_lsn > s.confirmed_flush_lsn",
                &[],
            )
            .await
            .unwrap();
        if let Some(row) = row {
            break row.get(0);
        }
        assert!(start.elapsed() < DEADLINE, "no walsender");
        tokio::time::sleep(Duration::from_millis(1)).await;
    };
    // SAFETY: signals to a PostgreSQL process we started.
    unsafe { libc::kill(pid, libc::SIGSTOP) };
    assert!(
        !daemon.log().contains("evictd is ready"),
        "caught up before the freeze; nothing to prove"
    );
    daemon.wait_log("did not deliver our marker").await;
    unsafe { libc::kill(pid, libc::SIGCONT) };
    daemon.wait_ready().await;
    verify(
        &env,
        &entries,
        &(0..10).collect::<Vec<_>>(),
        &unrelated,
        true,
    )
    .await;
}

/// The primary dies mid-burst and its standby is promoted (`logical` delivery, the daemon on a
/// URL naming both, `target_session_attrs=read-write`). From PostgreSQL 17 the slot is a
/// failover slot the standby keeps (synchronised here with `pg_sync_replication_slots()`,
/// `synchronized_standby_slots` on the primary): the daemon streams on from its position there,
/// so an entry goes exactly when its row's edit survived the failover and every other entry
/// stays. Before 17 the promoted standby has no slot: the daemon makes it there and invalidates
/// every table once, so nothing is stale either way.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_promoted_standby_keeps_the_slot_position() {
    const STANDBY_SLOT: &str = "evictd_test_standby";
    let mut env = Env::isolated(Delivery::Logical, "", &[]).await;
    seed_products(&env).await;
    let major = evictd::schema::slot::server_major(&env.pg).await.unwrap();
    let failover_slots = major >= evictd::schema::slot::FAILOVER_SLOTS_SINCE;
    eprintln!(
        "PostgreSQL {major}: {}",
        if failover_slots {
            "failover slots: the position must survive"
        } else {
            "no failover slots: a new slot and a table-wide resync"
        }
    );
    let standby = evictd::throwaway::Postgres::start_standby(&mut env.own().pg, STANDBY_SLOT)
        .unwrap_or_else(|e| panic!("cannot start a standby: {e:#}"));
    env.reconnect_pg().await;
    if failover_slots {
        env.sql(&format!(
            "ALTER SYSTEM SET synchronized_standby_slots = '{STANDBY_SLOT}'"
        ))
        .await;
        env.sql("SELECT pg_reload_conf()").await;
    }
    let both = format!(
        "postgres://postgres@127.0.0.1:{},127.0.0.1:{}/{}?target_session_attrs=read-write",
        env.pg_server().port,
        standby.port,
        env.name
    );
    let daemon = env.spawn_daemon(&["--database-url", &both]);
    daemon.wait_ready().await;
    let (entries, unrelated) = cache_products(&env).await;
    let update = |i: usize| {
        format!(
            "UPDATE products SET name = 'edited' WHERE id = '{}'",
            product_id(i)
        )
    };

    for i in 0..30 {
        env.sql(&update(i)).await;
    }
    env.wait_gone(&entries[..30]).await;
    let slot = evictd::schema::slot::name(&env.pg).await.unwrap();
    if failover_slots {
        // The standby's copy of the slot, once it is persistent (its first copies are
        // temporary until the standby has the WAL the slot needs).
        let (standby_pg, conn) =
            tokio_postgres::connect(&standby.url(&env.name), tokio_postgres::NoTls)
                .await
                .unwrap();
        tokio::spawn(conn);
        let start = Instant::now();
        let mut last_error = None;
        loop {
            // The copy stays temporary until the standby has the WAL the slot needs, whose
            // start moves with the primary's running-transactions records (every 15 s by
            // itself): one now.
            env.sql("SELECT pg_log_standby_snapshot()").await;
            if let Err(e) = standby_pg
                .batch_execute("SELECT pg_sync_replication_slots()")
                .await
            {
                last_error = Some(e);
            }
            let synced = standby_pg
                .query_opt(
                    "SELECT 1 FROM pg_replication_slots WHERE slot_name = $1 AND synced \
                     AND NOT temporary AND confirmed_flush_lsn IS NOT NULL",
                    &[&slot],
                )
                .await
                .unwrap();
            if synced.is_some() {
                break;
            }
            if start.elapsed() > DEADLINE {
                let slots: Vec<String> = standby_pg
                    .query(
                        "SELECT row(slot_name, synced, temporary, confirmed_flush_lsn)::text \
                         FROM pg_replication_slots",
                        &[],
                    )
                    .await
                    .unwrap()
                    .iter()
                    .map(|row| row.get(0))
                    .collect();
                panic!("the slot never reached the standby: {slots:?}, {last_error:?}");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    // The burst, and the primary's death in its middle: the daemon may not have read the last
    // edits, the standby may not have received them.
    for i in 30..60 {
        env.sql(&update(i)).await;
    }
    env.own().pg.kill9().unwrap();
    standby.promote().unwrap();
    env.db_url = both.clone();
    env.reconnect_pg().await;
    for i in 60..90 {
        env.sql(&update(i)).await;
    }
    env.barrier().await;

    let edited: Vec<String> = env
        .pg
        .query("SELECT id::text FROM products WHERE name = 'edited'", &[])
        .await
        .unwrap()
        .iter()
        .map(|row| row.get(0))
        .collect();
    assert!(
        edited.len() >= 60,
        "edits before the burst and after the promotion"
    );
    let (gone, kept): (Vec<usize>, Vec<usize>) = {
        let mut gone = Vec::new();
        let mut kept = Vec::new();
        for i in 0..PRODUCTS {
            if edited.contains(&product_id(i)) {
                gone.push(i);
            } else {
                kept.push(i);
            }
        }
        (gone, kept)
    };
    let gone: Vec<String> = gone.iter().map(|&i| entries[i].clone()).collect();
    env.wait_gone(&gone).await;
    let kept: Vec<String> = kept.iter().map(|&i| entries[i].clone()).collect();
    if failover_slots {
        env.assert_present(&kept).await;
        assert!(
            !daemon.log().contains("new replication slot"),
            "the slot was made again: {}",
            daemon.log()
        );
    } else {
        assert_eq!(
            env.count_existing(&kept).await,
            0,
            "the resync left entries"
        );
        assert!(
            daemon.log().contains("new replication slot"),
            "{}",
            daemon.log()
        );
    }
    env.assert_present(&unrelated).await;
}

/// A claim dropped part-way (an error between its take and its commit) hands its rows back,
/// even when the next claim runs on the same connection: that claim first rolls the open
/// transaction back instead of committing the rows the dropped one deleted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_claim_dropped_part_way_hands_its_rows_back() {
    use evictd::source::outbox;
    let env = Env::new(Delivery::Outbox).await;
    seed_products(&env).await;
    env.sql("DELETE FROM evictd.outbox").await;
    for i in 0..3 {
        env.sql(&format!(
            "UPDATE products SET name = 'x' WHERE id = '{}'",
            product_id(i)
        ))
        .await;
    }
    assert_eq!(env.outbox_len().await, 3);
    let (client, connection) = tokio_postgres::connect(&env.db_url, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(connection);
    let take = outbox::prepare_take(&client).await.unwrap();
    let dropped = outbox::begin(&client, &take);
    let first = taken_payloads(&dropped).await;
    assert_eq!(first.len(), 3);
    drop(dropped);
    let claim = outbox::begin(&client, &take);
    let again = taken_payloads(&claim).await;
    assert_eq!(again, first, "the dropped claim's rows are taken again");
    claim.ack(&[]).await.unwrap();
    assert_eq!(env.outbox_len().await, 0);
}

/// The payloads one take of `claim` takes (up to 10).
async fn taken_payloads(claim: &evictd::source::outbox::Claim<'_>) -> Vec<String> {
    let mut rows = claim.take(10).await.unwrap();
    let mut payloads = Vec::new();
    while let Some(row) = rows.next().await {
        payloads.push(row.unwrap().payload().to_string());
    }
    payloads
}
