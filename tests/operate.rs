//! The operator's tools against real servers: doctor (each FAIL), explain (changes nothing),
//! invalidate, stats, the readiness probe, JSON logs and the tag-set sweep.

mod support;

use std::collections::BTreeMap;

use evictd::config::Delivery;
use evictd::throwaway::{PgBouncer, Redis, free_port};
use redis::AsyncCommands as _;
use serde_json::Value;
use support::{Env, finish, text};

const C1: &str = "00000000-0000-0000-0000-0000000000c1";
const C2: &str = "00000000-0000-0000-0000-0000000000c2";
const P1: &str = "00000000-0000-0000-0000-0000000000a1";
const P2: &str = "00000000-0000-0000-0000-0000000000a2";
const M1: &str = "00000000-0000-0000-0000-0000000000d1";

async fn seed(env: &Env) {
    env.sql(&format!(
        "INSERT INTO clients (id, name) VALUES ('{C1}', 'c1'), ('{C2}', 'c2');
         INSERT INTO products (id, client_id, name) VALUES ('{P1}', '{C1}', 'p1'), ('{P2}', '{C2}', 'p2');
         INSERT INTO modules (id, product_id, title) VALUES ('{M1}', '{P1}', 'm1');"
    ))
    .await;
}

/// Doctor's checks by name: (status, message, hint) each.
type Checks = BTreeMap<String, Vec<(String, String, String)>>;

/// `doctor --json` as its exit code and checks.
fn doctor(env: &Env, extra: &[&str]) -> (Option<i32>, Checks) {
    let mut args = vec!["doctor", "--json"];
    args.extend_from_slice(extra);
    let output = env.run_cli(&args);
    let report: Value = serde_json::from_slice(&output.stdout)
        .unwrap_or_else(|e| panic!("doctor --json: {e}: {}", text(&output)));
    let mut checks: Checks = BTreeMap::new();
    for c in report["checks"].as_array().unwrap() {
        checks
            .entry(c["name"].as_str().unwrap().to_string())
            .or_default()
            .push((
                c["status"].as_str().unwrap().to_string(),
                c["message"].as_str().unwrap().to_string(),
                c["hint"].as_str().unwrap_or_default().to_string(),
            ));
    }
    assert_eq!(
        report["ok"].as_bool(),
        Some(output.status.code() == Some(0))
    );
    (output.status.code(), checks)
}

fn status_of(checks: &Checks, name: &str) -> Vec<String> {
    checks
        .get(name)
        .map(|v| v.iter().map(|c| c.0.clone()).collect())
        .unwrap_or_default()
}

/// A healthy setup: every check OK, exit 0, and the text form has one line per check.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn doctor_passes_on_a_healthy_setup() {
    let env = Env::new(Delivery::Outbox).await;
    let (code, checks) = doctor(&env, &[]);
    assert_eq!(code, Some(0), "{checks:#?}");
    for name in [
        "postgresql",
        "redis",
        "redis-eviction",
        "schema",
        "triggers",
        "listen",
        "outbox",
    ] {
        let statuses = status_of(&checks, name);
        assert!(
            !statuses.is_empty() && statuses.iter().all(|s| s == "OK"),
            "{name}: {checks:#?}"
        );
    }
    assert!(checks["postgresql"][0].1.contains("PostgreSQL 1"));
    assert!(checks["redis"][0].1.contains("Redis 7"));
    let plain = env.run_cli(&["doctor"]);
    assert!(plain.status.success());
    assert!(
        text(&plain).lines().all(|l| l.starts_with("OK ")),
        "{}",
        text(&plain)
    );

    // `notify` delivery has no queue and no doorbell: doctor looks at neither.
    let notify = Env::new(Delivery::Notify).await;
    let (code, checks) = doctor(&notify, &[]);
    assert_eq!(code, Some(0), "{checks:#?}");
    assert_eq!(status_of(&checks, "listen"), ["OK"], "{checks:#?}");
    for name in ["outbox", "doorbell"] {
        assert!(status_of(&checks, name).is_empty(), "{name}: {checks:#?}");
    }
}

/// Each FAIL doctor knows, provoked for real: exit 1, the failing check named with a fix.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn doctor_reports_each_failure() {
    let env = Env::new(Delivery::Outbox).await;

    // A trigger disabled by hand, and one dropped.
    env.sql("ALTER TABLE products DISABLE TRIGGER evictd_update; DROP TRIGGER evictd_delete ON modules;").await;
    let (code, checks) = doctor(&env, &[]);
    assert_eq!(code, Some(1));
    let triggers = &checks["triggers"];
    let products = triggers
        .iter()
        .find(|c| c.1.contains("public.products"))
        .unwrap();
    assert_eq!(products.0, "FAIL");
    assert!(
        products.1.contains("evictd_update is disabled"),
        "{products:?}"
    );
    assert!(
        products.2.contains("ENABLE TRIGGER evictd_update"),
        "{products:?}"
    );
    let modules = triggers
        .iter()
        .find(|c| c.1.contains("public.modules"))
        .unwrap();
    assert!(
        modules.1.contains("evictd_delete is missing"),
        "{modules:?}"
    );
    env.sql("ALTER TABLE products ENABLE TRIGGER evictd_update")
        .await;

    // A schema behind the binary.
    env.sql("UPDATE evictd.settings SET value = '0' WHERE key = 'schema_version'")
        .await;
    let (code, checks) = doctor(&env, &[]);
    assert_eq!(code, Some(1));
    assert_eq!(status_of(&checks, "schema"), ["FAIL"]);
    assert!(checks["schema"][0].2.contains("evictd migrate"));

    // No schema at all.
    env.sql("DROP SCHEMA evictd CASCADE").await;
    let (code, checks) = doctor(&env, &[]);
    assert_eq!(code, Some(1));
    assert!(
        checks["schema"][0].1.contains("not installed"),
        "{checks:#?}"
    );

    // Unreachable servers, named without their passwords.
    let closed = free_port().unwrap();
    let output = finish({
        let mut c = env.command(&["doctor"]);
        c.args([
            "--database-url",
            &format!("postgres://u:pw-secret@127.0.0.1:{closed}/x"),
        ])
        .args([
            "--redis-url",
            &format!("redis://:pw-secret@127.0.0.1:{closed}"),
        ]);
        c
    });
    let said = text(&output);
    assert_eq!(output.status.code(), Some(1), "{said}");
    assert!(said.contains("FAIL postgresql"), "{said}");
    assert!(said.contains("FAIL redis"), "{said}");
    assert!(!said.contains("pw-secret"), "{said}");
}

/// A partition attached after `migrate` has none of the statement triggers, so writes naming
/// it would go unseen: doctor names it, and `migrate` fixes it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn doctor_names_a_partition_without_triggers() {
    let env = Env::bare(
        Delivery::Outbox,
        "[[tables]]\ntable = \"events\"\ntags = [\"events:id:{id}\"]\n",
    )
    .await;
    env.sql(
        "CREATE TABLE events (id int PRIMARY KEY) PARTITION BY RANGE (id);
         CREATE TABLE events_low PARTITION OF events FOR VALUES FROM (0) TO (100);",
    )
    .await;
    env.migrate().await;
    let (code, checks) = doctor(&env, &[]);
    assert_eq!(status_of(&checks, "triggers"), ["OK"], "{checks:#?}");
    assert!(
        checks["triggers"][0].1.contains("1 partitions"),
        "{checks:#?}"
    );
    assert_eq!(code, Some(0), "{checks:#?}");

    env.sql("CREATE TABLE events_high PARTITION OF events FOR VALUES FROM (100) TO (200)")
        .await;
    let (code, checks) = doctor(&env, &[]);
    assert_eq!(code, Some(1), "{checks:#?}");
    assert_eq!(status_of(&checks, "triggers"), ["FAIL"], "{checks:#?}");
    assert!(
        checks["triggers"][0]
            .1
            .contains("public.events_high: trigger evictd_insert is missing"),
        "{checks:#?}"
    );
    assert!(
        checks["triggers"][0].2.contains("evictd migrate"),
        "{checks:#?}"
    );
    env.migrate().await;
    let (code, _) = doctor(&env, &[]);
    assert_eq!(code, Some(0));
}

/// Through a transaction-pooling PgBouncer LISTEN is accepted but never delivers: doctor says so
/// and says what to use instead.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn doctor_detects_transaction_pooling() {
    let env = Env::new(Delivery::Outbox).await;
    let bouncer = PgBouncer::start_transaction_pooling(support::servers().pg.port)
        .unwrap_or_else(|e| panic!("{e:#}"));
    let (code, checks) = doctor(&env, &["--database-url", &bouncer.url(&env.name)]);
    assert_eq!(code, Some(1), "{checks:#?}");
    assert_eq!(status_of(&checks, "listen"), ["FAIL"], "{checks:#?}");
    assert!(
        checks["listen"][0].2.contains("session-mode"),
        "{checks:#?}"
    );
}

/// A Redis that may evict tag sets is a WARN, not a FAIL; an old outbox event is a WARN.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn doctor_warns_on_eviction_policy_and_backlog() {
    let env = Env::new(Delivery::Outbox).await;
    let evicting = Redis::start_with(&["--maxmemory-policy", "allkeys-lru"]).unwrap();
    env.sql("INSERT INTO evictd.outbox (payload, created_at) VALUES ('{}', now() - interval '10 minutes')")
        .await;
    let (code, checks) = doctor(&env, &["--redis-url", &evicting.url()]);
    assert_eq!(code, Some(0), "{checks:#?}");
    assert_eq!(status_of(&checks, "redis-eviction"), ["WARN"]);
    assert!(checks["redis-eviction"][0].1.contains("allkeys-lru"));
    assert_eq!(status_of(&checks, "outbox"), ["WARN"]);
    assert!(
        checks["outbox"][0].1.contains("1 events waiting"),
        "{checks:#?}"
    );
}

/// All keys with their values, to prove a command changed nothing.
async fn snapshot(env: &Env) -> Vec<(String, String)> {
    let mut conn = env.redis.clone();
    let mut out = Vec::new();
    for key in env.keys().await {
        let dump: Option<Vec<u8>> = redis::cmd("DUMP")
            .arg(&key)
            .query_async(&mut conn)
            .await
            .unwrap();
        out.push((key, format!("{:?}", dump)));
    }
    out
}

/// `explain` shows the tags and keys an UPDATE would take, and removes nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn explain_shows_tags_and_keys_and_changes_nothing() {
    let env = Env::new(Delivery::Outbox).await;
    env.cache(
        "list:c1",
        &["products:all", &format!("products:client:{C1}")],
    )
    .await;
    env.cache(
        "list:c2",
        &["products:all", &format!("products:client:{C2}")],
    )
    .await;
    env.cache("product:p1", &[&format!("products:id:{P1}")])
        .await;
    env.cache("clients", &["client_configs:all"]).await;
    let before = snapshot(&env).await;
    let old_client = format!("client_id={C1}");
    let new_client = format!("client_id={C2}");
    let id = format!("id={P1}");
    let output = env.run_cli(&[
        "explain",
        "products",
        "update",
        "--old",
        &old_client,
        "--old",
        &id,
        "--new",
        &new_client,
        "--json",
    ]);
    assert!(output.status.success(), "{}", text(&output));
    let report: Value = serde_json::from_slice(&output.stdout).unwrap();
    let tags: Vec<&str> = report["tags"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["tag"].as_str().unwrap())
        .collect();
    assert_eq!(
        tags,
        [
            "products:all".to_string(),
            format!("products:client:{C1}"),
            format!("products:client:{C2}"),
            format!("products:id:{P1}"),
        ]
    );
    // Three entries, listed once each however many of the tags name them.
    let prefix = &env.prefix;
    let expected: Vec<String> = ["list:c1", "list:c2", "product:p1"]
        .iter()
        .map(|k| format!("{prefix}{k}"))
        .collect();
    assert_eq!(report["keysThatWouldGo"], 3);
    assert_eq!(report["keys"], serde_json::json!(expected), "{report:#}");
    assert_eq!(
        report["tags"][0]["keys"],
        serde_json::json!([&expected[0], &expected[1]]),
        "products:all names both lists"
    );

    assert_eq!(
        snapshot(&env).await,
        before,
        "explain must not change Redis"
    );

    // A tag naming more entries than the text shows: the text lists ten and says how many
    // more, `--json` lists them all.
    let mut many = Vec::new();
    for i in 0..12 {
        many.push(env.cache(&format!("page:{i:02}"), &["products:all"]).await);
    }
    many.sort();
    let before = snapshot(&env).await;
    let plain = env.run_cli(&[
        "explain",
        "products",
        "insert",
        "--new",
        &new_client,
        "--new",
        &id,
    ]);
    let said = text(&plain);
    assert!(plain.status.success(), "{said}");
    assert!(said.contains(&format!("    {}", many[0])), "{said}");
    assert!(
        said.contains("… and 4 more (--json lists them all)"),
        "{said}"
    );
    let json = env.run_cli(&[
        "explain",
        "products",
        "insert",
        "--new",
        &new_client,
        "--new",
        &id,
        "--json",
    ]);
    let report: Value = serde_json::from_slice(&json.stdout).unwrap();
    let all_tag = report["tags"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["tag"] == "products:all")
        .unwrap();
    assert_eq!(all_tag["keys"].as_array().unwrap().len(), 14, "{all_tag}");
    for key in &many {
        assert!(
            report["keys"]
                .as_array()
                .unwrap()
                .contains(&serde_json::json!(key))
        );
    }

    let plain = env.run_cli(&["explain", "products", "truncate"]);
    assert!(text(&plain).contains("table-wide"), "{}", text(&plain));
    assert!(
        text(&plain).contains("nothing was removed"),
        "{}",
        text(&plain)
    );
    assert_eq!(
        snapshot(&env).await,
        before,
        "explain must not change Redis"
    );

    let bad = env.run_cli(&["explain", "nope", "update"]);
    assert_eq!(bad.status.code(), Some(2), "{}", text(&bad));
}

/// `invalidate` by tags, by table, by the application's cache types, and everything; it prints
/// what went and stays quiet on a pipe.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalidate_by_tag_table_type_and_all() {
    let env = Env::new(Delivery::Outbox).await;
    let by_client = env
        .cache("list:c1", &[&format!("products:client:{C1}")])
        .await;
    let other_client = env
        .cache("list:c2", &[&format!("products:client:{C2}")])
        .await;
    let all = env.cache("all", &["products:all"]).await;
    let module = env
        .cache("module", &[&format!("module_content:id:{M1}")])
        .await;
    let config = env
        .cache("config", &[&format!("client_configs:id:{C2}")])
        .await;
    let custom = env.cache("custom", &["custom:tag"]).await;
    let unrelated = env.cache("unrelated", &["unrelated:x"]).await;

    let output = env.run_cli(&["invalidate", "--type", "products", "--client-id", C1]);
    assert!(output.status.success(), "{}", text(&output));
    assert_eq!(
        String::from_utf8_lossy(&output.stdout).trim(),
        "invalidated 2 tags, 2 keys"
    );
    assert!(
        output.stderr.is_empty(),
        "progress must stay off a pipe: {:?}",
        String::from_utf8_lossy(&output.stderr)
    );
    env.assert_present(&[other_client.clone(), module.clone()])
        .await;
    assert!(!env.exists(&by_client).await && !env.exists(&all).await);

    let output = env.run_cli(&["invalidate", "custom:tag"]);
    assert!(
        text(&output).contains("invalidated 1 tags, 1 keys"),
        "{}",
        text(&output)
    );
    assert!(!env.exists(&custom).await);

    let output = env.run_cli(&["invalidate", "--type", "module_content", "--module-id", M1]);
    assert!(output.status.success());
    assert!(!env.exists(&module).await);

    // `client_configs:all` and the one id tag that exists; only the latter had an entry.
    let output = env.run_cli(&["invalidate", "--table", "clients"]);
    assert!(
        text(&output).contains("invalidated 2 tags, 1 keys"),
        "{}",
        text(&output)
    );
    assert!(!env.exists(&config).await);
    env.assert_present(std::slice::from_ref(&other_client))
        .await;

    let output = env.run_cli(&["invalidate", "--all"]);
    assert!(output.status.success());
    assert!(!env.exists(&other_client).await);
    env.assert_present(&[unrelated]).await;
    let marker: Option<String> = env
        .redis
        .clone()
        .get(format!("{}tagts-table:public.products", env.prefix))
        .await
        .unwrap();
    assert!(marker.is_some());

    let nothing = env.run_cli(&["invalidate"]);
    assert_eq!(nothing.status.code(), Some(2));
    let unknown = env.run_cli(&["invalidate", "--table", "nope"]);
    assert_eq!(unknown.status.code(), Some(2), "{}", text(&unknown));
}

/// The running totals count what each invalidation did, exactly (on one server the scripts
/// count their own work).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn running_totals_count_each_invalidation_exactly() {
    let env = Env::new(Delivery::Outbox).await;
    support::assert_totals_count_exactly(&env).await;
}

/// `stats` is one JSON object with the application's fields; own keys are not entries.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stats_reports_entries_expired_members_and_statuses() {
    let env = Env::new(Delivery::Outbox).await;
    seed(&env).await;
    let _daemon = env.start_daemon().await;
    for i in 0..7 {
        env.cache(&format!("entry:{i}"), &[&format!("products:id:{P2}")])
            .await;
    }
    let mut conn = env.redis.clone();
    // Three members whose entries are gone (expired).
    for i in 0..3 {
        let () = conn
            .sadd(
                format!("{}tag:products:id:{P2}", env.prefix),
                format!("{}gone:{i}", env.prefix),
            )
            .await
            .unwrap();
    }
    env.sql(&format!("UPDATE products SET name = 'x' WHERE id = '{P1}'"))
        .await;
    env.barrier().await;
    let output = env.run_cli(&["stats"]);
    assert!(output.status.success(), "{}", text(&output));
    let stats: Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(stats["totalEntries"], 7, "{stats:#}");
    assert_eq!(stats["expiredEntries"], 3, "{stats:#}");
    assert_eq!(stats["tagSets"], 1, "{stats:#}");
    assert_eq!(stats["tagMembers"], 10, "{stats:#}");
    assert!(stats["hitRate"].as_f64().unwrap() >= 0.0);
    assert!(
        stats["invalidations"]["tags"].as_u64().unwrap() >= 4,
        "{stats:#}"
    );
    assert_eq!(stats["outbox"]["backlog"], 0);
    assert_eq!(stats["recommendations"]["expired_entries_status"], "high");
    let status = stats["recommendations"]["hit_rate_status"]
        .as_str()
        .unwrap();
    assert!(["excellent", "good", "needs_improvement"].contains(&status));
}

/// The sweep removes members whose entries expired, leaves live ones, and counts them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sweep_removes_expired_members() {
    let env = Env::with_config(Delivery::Outbox, "sweep_interval_secs = 1\n").await;
    let live = env.cache("live", &["sweep:tag"]).await;
    let mut conn = env.redis.clone();
    let tag_key = format!("{}tag:sweep:tag", env.prefix);
    for i in 0..250 {
        let () = conn
            .sadd(&tag_key, format!("{}expired:{i}", env.prefix))
            .await
            .unwrap();
    }
    let zkey = format!("{}tag:sweep:zset", env.prefix);
    let () = conn
        .zadd(&zkey, format!("{}old", env.prefix), 1)
        .await
        .unwrap();
    let daemon = env.start_daemon().await;
    daemon.wait_log("tag-set sweep removed").await;
    let start = std::time::Instant::now();
    loop {
        let members: Vec<String> = conn.smembers(&tag_key).await.unwrap();
        if members == vec![live.clone()] {
            break;
        }
        assert!(
            start.elapsed() < support::DEADLINE,
            "{} members left",
            members.len()
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let zset_left: u64 = conn.exists(&zkey).await.unwrap();
    assert_eq!(zset_left, 0, "an expired sorted-set member is swept too");
    env.assert_present(&[live]).await;
    let output = env.run_cli(&["stats"]);
    let stats: Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(stats["invalidations"]["sweptMembers"], 251, "{stats:#}");
}

/// `/readyz` answers 503 while Redis is down and 200 again once it is back; `/healthz` stays 200.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_follows_redis() {
    let mut env = Env::isolated(Delivery::Outbox, "health_interval_ms = 200\n", &[]).await;
    let daemon = env.start_daemon().await;
    let addr = daemon.http_addr();
    assert_eq!(support::http_get(&addr, "/readyz").0, 200);
    env.own().redis.kill9().unwrap();
    wait_status(&addr, "/readyz", 503).await;
    assert_eq!(support::http_get(&addr, "/healthz").0, 200);
    env.own().redis.restart().unwrap();
    wait_status(&addr, "/readyz", 200).await;
    let (_, metrics) = support::http_get(&addr, "/metrics");
    assert!(metrics.contains("evictd_lag_seconds_bucket"), "{metrics}");
    assert!(
        metrics.contains("evictd_reconnects_total") || metrics.contains("evictd_errors_total"),
        "{metrics}"
    );
}

async fn wait_status(addr: &str, path: &str, status: u16) {
    let start = std::time::Instant::now();
    while support::http_get(addr, path).0 != status {
        assert!(
            start.elapsed() < support::DEADLINE,
            "{path} never answered {status}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

/// `--log-format json` writes one JSON object per line, with the per-batch span.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_logs_are_one_object_per_line() {
    let env = Env::new(Delivery::Outbox).await;
    seed(&env).await;
    let daemon = env.spawn_daemon(&["--log-format", "json"]);
    daemon.wait_ready().await;
    env.sql(&format!("UPDATE products SET name = 'j' WHERE id = '{P1}'"))
        .await;
    env.barrier().await;
    daemon.wait_log("batch invalidated").await;
    for line in daemon.log().lines() {
        let value: Value = serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}"));
        assert!(value.get("level").is_some(), "{line}");
    }
    assert!(daemon.log().contains("\"span\""), "{}", daemon.log());
}

/// A `--delivery` or `--channel` that differs from what `migrate` installed is followed by the
/// database's record, with a warning naming both; invalidation goes on as installed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_warns_when_flags_differ_from_the_installed_delivery() {
    let env = Env::new(Delivery::Outbox).await;
    seed(&env).await;
    let daemon = env.spawn_daemon(&["--delivery", "notify", "--channel", "somewhere_else"]);
    daemon.wait_ready().await;
    daemon
        .wait_log("the configured delivery differs from what the database has installed")
        .await;
    daemon
        .wait_log("the configured channel differs from what the database has installed")
        .await;
    let log = daemon.log();
    assert!(log.contains("configured=notify installed=outbox"), "{log}");
    assert!(log.contains("configured=somewhere_else"), "{log}");
    let key = env.cache("p1", &[&format!("products:id:{P1}")]).await;
    env.sql(&format!("UPDATE products SET name = 'w' WHERE id = '{P1}'"))
        .await;
    env.wait_gone(&[key]).await;
}

/// With the flags matching what is installed (as every other test runs), no such warning.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_is_quiet_when_flags_match_the_installed_delivery() {
    let env = Env::new(Delivery::Outbox).await;
    let daemon = env.start_daemon().await;
    assert!(
        !daemon
            .log()
            .contains("differs from what the database has installed"),
        "{}",
        daemon.log()
    );
}

/// The value of the first sample of `name` in a `/metrics` text.
fn sample(metrics: &str, name: &str) -> f64 {
    metrics
        .lines()
        .find(|l| l.starts_with(name) && l[name.len()..].starts_with([' ', '{']))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no {name} in: {metrics}"))
}

/// What an operator alerts on: the build, the process's memory and descriptors, when the last
/// batch went, and the outbox's oldest event and the slot's WAL as the daemon reads them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_an_operator_alerts_on() {
    let env = Env::with_config(Delivery::Outbox, "health_interval_ms = 200\n").await;
    seed(&env).await;
    let daemon = env.start_daemon().await;
    let before = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    env.barrier().await;
    let (_, metrics) = support::http_get(&daemon.http_addr(), "/metrics");
    assert!(
        metrics.contains(&format!(
            "evictd_build_info{{version=\"{}\"}} 1",
            env!("CARGO_PKG_VERSION")
        )),
        "{metrics}"
    );
    let last_batch = sample(&metrics, "evictd_last_batch_timestamp_seconds");
    assert!(
        last_batch >= before - 1.0,
        "last batch at {last_batch}, test began {before}"
    );
    assert!(sample(&metrics, "process_resident_memory_bytes") > 1e6);
    assert!(sample(&metrics, "process_open_fds") >= 3.0);
    assert!(sample(&metrics, "process_max_fds") >= sample(&metrics, "process_open_fds"));
    assert!(sample(&metrics, "process_cpu_seconds_total") > 0.0);
    // The barrier's own events leave the outbox only after their keys are gone: wait for them,
    // so the only event left waiting below is the one this test plants.
    env.wait_outbox_empty().await;
    drop(daemon);

    // The outbox's oldest event, as the health tick reads it: one left waiting 90 s ago.
    env.sql(
        "INSERT INTO evictd.outbox (payload, created_at) \
         VALUES ('{\"v\":1,\"op\":\"TRUNCATE\",\"table\":\"public.clients\"}', clock_timestamp() - interval '90 s')",
    )
    .await;
    let backlog = evictd::source::outbox::backlog(&env.pg).await.unwrap();
    assert_eq!(backlog.waiting, 1);
    assert!(backlog.oldest_age_seconds >= 90.0, "{backlog:?}");
    let daemon = env.start_daemon().await;
    env.wait_outbox_empty().await;
    let start = std::time::Instant::now();
    loop {
        let (_, metrics) = support::http_get(&daemon.http_addr(), "/metrics");
        if sample(&metrics, "evictd_outbox_oldest_event_age_seconds") == 0.0
            && sample(&metrics, "evictd_outbox_backlog") == 0.0
        {
            break;
        }
        assert!(start.elapsed() < support::DEADLINE, "{metrics}");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

/// The WAL a replication slot holds back, as the `logical` daemon reports it: writes made while
/// no daemon reads grow it, and a daemon that caught up reports it back down.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slot_lag_is_measured_and_reported() {
    let env = Env::with_config(Delivery::Logical, "health_interval_ms = 200\n").await;
    seed(&env).await;
    drop(env.start_daemon().await);
    let slot = evictd::schema::slot::name(&env.pg).await.unwrap();
    let before = evictd::schema::slot::lag_bytes(&env.pg, &slot)
        .await
        .unwrap()
        .expect("the slot exists");
    env.sql("INSERT INTO clients (name) SELECT 'lag' FROM generate_series(1, 2000)")
        .await;
    let behind = evictd::schema::slot::lag_bytes(&env.pg, &slot)
        .await
        .unwrap()
        .unwrap();
    assert!(behind > before + 10_000, "{before} -> {behind} bytes");
    let daemon = env.start_daemon().await;
    let start = std::time::Instant::now();
    loop {
        let (_, metrics) = support::http_get(&daemon.http_addr(), "/metrics");
        let reported = sample(&metrics, "evictd_replication_slot_lag_bytes");
        // -1 until the health tick measured it.
        if reported >= 0.0 && reported < behind as f64 {
            break;
        }
        assert!(
            start.elapsed() < support::DEADLINE,
            "slot lag reported {reported}, {behind} before catching up"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}
