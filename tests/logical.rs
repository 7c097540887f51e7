//! `logical` delivery: what differs from the trigger-based modes. Triggers only for old values
//! the WAL lacks; a large transaction goes table-wide; the
//! slot is created, kept, and removed with the installation. (The per-table matrix is in
//! `invalidation.rs`, the kill -9 tests in `faults.rs`.)

mod support;

use evictd::config::Delivery;
use redis::AsyncCommands as _;
use support::Env;

const C1: &str = "00000000-0000-0000-0000-0000000000c1";
const C2: &str = "00000000-0000-0000-0000-0000000000c2";
const P1: &str = "00000000-0000-0000-0000-0000000000a1";
const P2: &str = "00000000-0000-0000-0000-0000000000a2";

async fn seeded(toml: &str) -> Env {
    let env = Env::with_config(Delivery::Logical, toml).await;
    env.sql(&format!(
        "INSERT INTO clients (id, name) VALUES ('{C1}', 'c1'), ('{C2}', 'c2');
         INSERT INTO products (id, client_id, name) VALUES ('{P1}', '{C1}', 'p1'), ('{P2}', '{C2}', 'p2');"
    ))
    .await;
    env
}

/// Inserts products `00000000-0000-0000-{group}-…` numbered 1 to `count` (12 digits), of `client`.
async fn insert_products(env: &Env, group: &str, count: usize, client: &str) {
    env.sql(&format!(
        "INSERT INTO products (id, client_id, name)
         SELECT ('00000000-0000-0000-{group}-' || lpad(i::text, 12, '0'))::uuid, '{client}', 'n' || i
         FROM generate_series(1, {count}) i"
    ))
    .await;
}

/// Each published table with the columns the walsender sends of it.
const PUBLISHED_COLUMNS: &str = "SELECT tablename::text || ' ' || array_to_string(attnames, ',') \
     FROM pg_publication_tables WHERE pubname = 'evictd' ORDER BY 1";

/// Runs `evictd doctor`: its exit code and what it printed.
fn doctor(env: &Env) -> (Option<i32>, String) {
    let output = support::finish(env.command(&["doctor"]));
    (output.status.code(), support::text(&output))
}

async fn query_strings(env: &Env, sql: &str) -> Vec<String> {
    env.pg
        .query(sql, &[])
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"))
        .iter()
        .map(|r| r.get::<_, String>(0))
        .collect()
}

/// Writers pay a trigger only for old values the WAL lacks: rule columns outside the primary
/// key, of rows deleted or of rows whose such a column changed. Replica identities stay as
/// they were, and each table is published with its key and rule columns only.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn triggers_only_for_old_values_the_wal_lacks() {
    let env = seeded("").await;
    let triggers = query_strings(
        &env,
        "SELECT tgrelid::regclass::text || '.' || tgname FROM pg_trigger \
         WHERE tgname LIKE 'evictd%' ORDER BY 1",
    )
    .await;
    assert_eq!(
        triggers,
        [
            "job_readiness_expert_sessions.evictd_old_delete",
            "job_readiness_expert_sessions.evictd_old_update",
            "modules.evictd_old_delete",
            "modules.evictd_old_update",
            "products.evictd_old_delete",
            "products.evictd_old_update",
        ]
    );
    let published = query_strings(&env, PUBLISHED_COLUMNS).await;
    assert_eq!(
        published,
        [
            "clients id",
            "job_readiness_expert_sessions id,product_id",
            "modules id,product_id",
            "products id,client_id",
        ]
    );
    let identities = query_strings(
        &env,
        "SELECT relname::text || '=' || relreplident::text FROM pg_class \
         WHERE relname IN ('clients', 'products') ORDER BY 1",
    )
    .await;
    assert_eq!(identities, ["clients=d", "products=d"]);
    let slots = query_strings(
        &env,
        "SELECT slot_name::text FROM pg_replication_slots WHERE database = current_database()",
    )
    .await;
    assert_eq!(slots, [format!("evictd_{}", env.name)]);

    // doctor checks the slot instead of triggers and a LISTEN round trip.
    let (status, report) = doctor(&env);
    assert_eq!(status, Some(0), "{report}");
    assert!(!report.contains("FAIL"), "{report}");
    assert!(
        report.contains(&format!("slot evictd_{}: not in use", env.name)),
        "{report}"
    );
    assert!(
        report.contains("covers the 4 configured tables"),
        "{report}"
    );
    // Who may write logical messages, and how to restrict it.
    assert!(
        report.contains("OK   logical-messages every role may call pg_logical_emit_message"),
        "{report}"
    );
    assert!(
        report.contains("REVOKE EXECUTE ON FUNCTION pg_logical_emit_message"),
        "{report}"
    );

    // Asynchronous commits are decoded once the WAL writer flushes them: with the default
    // wal_writer_delay (200ms) that is the lag, and doctor says how to shorten it.
    env.sql(&format!(
        "ALTER DATABASE {} SET synchronous_commit = off",
        env.name
    ))
    .await;
    let (status, report) = doctor(&env);
    assert_eq!(status, Some(0), "{report}");
    assert!(
        report.contains("synchronous_commit is off and wal_writer_delay 200ms"),
        "{report}"
    );
    assert!(report.contains("wal_writer_delay = '10ms'"), "{report}");

    // An old-row trigger disabled (as a bulk load or a restore may leave it) is a FAIL.
    env.sql("ALTER TABLE products DISABLE TRIGGER evictd_old_update")
        .await;
    let (status, report) = doctor(&env);
    assert_eq!(status, Some(1), "{report}");
    assert!(
        report.contains("public.products: evictd_old_update missing or disabled"),
        "{report}"
    );
    env.sql("ALTER TABLE products ENABLE TRIGGER evictd_old_update")
        .await;

    // A table dropped from the publication (as if added to the configuration without
    // `evictd migrate`) is a FAIL naming it.
    env.sql("ALTER PUBLICATION evictd DROP TABLE modules").await;
    let (status, report) = doctor(&env);
    assert_eq!(status, Some(1), "{report}");
    assert!(
        report.contains("not published (their changes are ignored): public.modules"),
        "{report}"
    );
}

/// Runs `sql`, and returns the old-row messages (`evictd-old`) it emitted, read through a slot
/// of the test's own with pgoutput, as their JSON contents.
async fn old_rows_of(env: &Env, slot: &str, sql: &str) -> Vec<String> {
    env.sql(sql).await;
    query_strings(
        env,
        &format!(
            "SELECT convert_from(substring(data FROM position('evictd-old'::bytea || '\\x00'::bytea IN data) + 15), 'UTF8') \
             FROM pg_logical_slot_get_binary_changes('{slot}', NULL, NULL, 'proto_version', '1', \
                  'publication_names', 'evictd', 'messages', 'true') \
             WHERE get_byte(data, 0) = 77 AND position('evictd-old'::bytea IN data) > 0"
        ),
    )
    .await
}

/// What the old-row triggers emit: nothing for an UPDATE that leaves the rule columns outside
/// the key alone, the old row for one that moves a product, one message for a DELETE
/// statement, and past `wide_row_threshold` moved rows in a transaction one table-wide event
/// and then nothing more.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn old_rows_are_emitted_only_where_the_wal_lacks_them() {
    let env = seeded("wide_row_threshold = 3\n").await;
    insert_products(&env, "0001", 6, C1).await;
    let slot = format!("probe_{}", env.name);
    env.sql(&format!(
        "SELECT pg_create_logical_replication_slot('{slot}', 'pgoutput')"
    ))
    .await;

    let priced = old_rows_of(
        &env,
        &slot,
        &format!("UPDATE products SET price_cents = 5 WHERE id = '{P1}'"),
    )
    .await;
    assert_eq!(priced, Vec::<String>::new());

    let moved = old_rows_of(
        &env,
        &slot,
        &format!("UPDATE products SET client_id = '{C2}' WHERE id = '{P1}'"),
    )
    .await;
    assert_eq!(moved.len(), 1, "{moved:?}");
    assert!(
        moved[0].contains(&format!(r#""rows":[["{C1}","{P1}"]]"#)),
        "the old row: {moved:?}"
    );

    let deleted = old_rows_of(
        &env,
        &slot,
        &format!("DELETE FROM products WHERE id IN ('{P1}', '{P2}')"),
    )
    .await;
    assert_eq!(deleted.len(), 1, "one per statement: {deleted:?}");
    assert!(
        deleted[0].contains(&format!(r#"["{C2}","{P1}"]"#))
            && deleted[0].contains(&format!(r#"["{C2}","{P2}"]"#)),
        "{deleted:?}"
    );

    let mass = old_rows_of(
        &env,
        &slot,
        &format!(
            "UPDATE products SET client_id = '{C2}' WHERE id::text LIKE '00000000-0000-0000-0001-%'"
        ),
    )
    .await;
    assert_eq!(mass.len(), 4, "3 rows, then table-wide: {mass:?}");
    assert_eq!(
        mass.iter().filter(|m| m.contains(r#""wide":true"#)).count(),
        1,
        "{mass:?}"
    );
    env.sql(&format!("SELECT pg_drop_replication_slot('{slot}')"))
        .await;
}

/// A replica identity of the user's is kept and used: FULL (old rows in the WAL, no trigger,
/// no column list), USING INDEX (its columns are the key); a table without any gets FULL, as
/// its UPDATEs could not be published otherwise. Old values arrive either way.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replica_identities_of_the_user_are_kept_and_used() {
    let config = r#"
[[tables]]
table = "products"
tags = ["products:client:{client_id}", "products:id:{id}"]
[[tables]]
table = "clients"
tags = ["clients:name:{name}"]
[[tables]]
table = "notes"
tags = ["notes:author:{author}"]
"#;
    let env = Env::bare(Delivery::Logical, config).await;
    env.sql(&format!(
        "CREATE TABLE notes (author text, body text);
         INSERT INTO notes VALUES ('ann', 'hello');
         INSERT INTO clients (id, name) VALUES ('{C1}', 'c1'), ('{C2}', 'c2');
         INSERT INTO products (id, client_id, name) VALUES ('{P1}', '{C1}', 'p1');
         ALTER TABLE products REPLICA IDENTITY FULL;
         CREATE UNIQUE INDEX clients_id_name ON clients (id, name);
         ALTER TABLE clients REPLICA IDENTITY USING INDEX clients_id_name;"
    ))
    .await;
    env.migrate().await;
    let identities = query_strings(
        &env,
        "SELECT relname::text || '=' || relreplident::text FROM pg_class \
         WHERE relname IN ('clients', 'notes', 'products') ORDER BY 1",
    )
    .await;
    assert_eq!(identities, ["clients=i", "notes=f", "products=f"]);
    let triggers = query_strings(
        &env,
        "SELECT tgname::text FROM pg_trigger WHERE tgname LIKE 'evictd%'",
    )
    .await;
    assert!(triggers.is_empty(), "{triggers:?}");
    // doctor points at the FULL of a table with a primary key (perhaps left by schema
    // version 2), not at the one a table without any key needs.
    let (status, report) = doctor(&env);
    assert_eq!(status, Some(0), "{report}");
    assert!(
        report.contains("public.products: REPLICA IDENTITY FULL"),
        "{report}"
    );
    assert!(!report.contains("public.notes: REPLICA"), "{report}");
    let published = query_strings(&env, PUBLISHED_COLUMNS).await;
    assert_eq!(
        published,
        [
            "clients id,name",
            "notes author,body",
            "products id,client_id,name,price_cents"
        ]
    );

    let _daemon = env.start_daemon().await;
    let old_client = env.cache("old", &[&format!("products:client:{C1}")]).await;
    let old_name = env.cache("c1", &["clients:name:c1"]).await;
    let author = env.cache("ann", &["notes:author:ann"]).await;
    let other = env.cache("c2", &["clients:name:c2"]).await;
    env.sql(&format!(
        "UPDATE products SET client_id = '{C2}' WHERE id = '{P1}';
         UPDATE clients SET name = 'renamed' WHERE id = '{C1}';
         DELETE FROM notes;"
    ))
    .await;
    env.wait_gone(&[old_client, old_name, author]).await;
    env.barrier().await;
    env.assert_present(&[other]).await;
}

/// An UPDATE moving a product to another client invalidates both clients' tags: the old
/// client comes from the old row the WAL carries.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn moving_a_product_invalidates_both_clients() {
    let env = seeded("").await;
    let _daemon = env.start_daemon().await;
    let old_client = env.cache("old", &[&format!("products:client:{C1}")]).await;
    let new_client = env.cache("new", &[&format!("products:client:{C2}")]).await;
    let product = env.cache("p1", &[&format!("products:id:{P1}")]).await;
    let other = env.cache("p2", &[&format!("products:id:{P2}")]).await;
    env.sql(&format!(
        "UPDATE products SET client_id = '{C2}' WHERE id = '{P1}'"
    ))
    .await;
    env.wait_gone(&[old_client, new_client, product]).await;
    env.barrier().await;
    env.assert_present(&[other]).await;
}

/// A transaction touching more rows of a table than `wide_row_threshold` invalidates the table
/// table-wide; one at the threshold stays precise. A rolled-back one invalidates nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_transactions_go_table_wide_and_rollbacks_do_nothing() {
    let env = seeded("wide_row_threshold = 2\n").await;
    let _daemon = env.start_daemon().await;
    let p1 = env.cache("p1", &[&format!("products:id:{P1}")]).await;
    let p2 = env.cache("p2", &[&format!("products:id:{P2}")]).await;
    let clients = env
        .cache("client", &[&format!("client_configs:id:{C1}")])
        .await;

    env.sql(&format!(
        "BEGIN; UPDATE products SET name = 'x' WHERE id = '{P1}'; ROLLBACK;"
    ))
    .await;
    env.barrier().await;
    env.assert_present(&[p1.clone(), p2.clone(), clients.clone()])
        .await;

    // Two rows (at the threshold): precise, so a third product's entry stays.
    let p3 = env
        .cache("p3", &["products:id:00000000-0000-0000-0000-0000000000a3"])
        .await;
    env.sql("UPDATE products SET name = 'y'").await;
    env.wait_gone(&[p1.clone(), p2.clone()]).await;
    env.barrier().await;
    env.assert_present(&[p3.clone(), clients.clone()]).await;

    // Three rows in one transaction: table-wide, even the entry of a product not touched.
    env.sql(&format!(
        "INSERT INTO products (id, client_id, name) VALUES
            ('00000000-0000-0000-0000-0000000000b1', '{C1}', 'b1'),
            ('00000000-0000-0000-0000-0000000000b2', '{C1}', 'b2'),
            ('00000000-0000-0000-0000-0000000000b3', '{C1}', 'b3')"
    ))
    .await;
    env.wait_gone(&[p3]).await;
    env.barrier().await;
    env.assert_present(&[clients]).await;
}

fn tags_invalidated(daemon: &support::Daemon) -> u64 {
    counter(daemon, "evictd_tags_invalidated_total")
}

fn counter(daemon: &support::Daemon, name: &str) -> u64 {
    let (_, metrics) = support::http_get(&daemon.http_addr(), "/metrics");
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{name} ")))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {name} in {metrics}"))
}

/// Under load, the commits that arrive within `batch_linger_ms` of a batch go to Redis
/// together in the next one: eleven commits in quick succession make a few batches (one per
/// commit without the linger), and every entry they touch is gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commits_within_the_linger_share_a_batch() {
    let env = seeded("batch_linger_ms = 1000\n").await;
    let daemon = env.start_daemon().await;
    let entries: Vec<String> = (1..=10)
        .map(|i| format!("00000000-0000-0000-0002-{i:012}"))
        .collect();
    insert_products(&env, "0002", 10, C2).await;
    env.barrier().await;
    let before = counter(&daemon, "evictd_batches_total");
    let mut cached = Vec::new();
    for id in &entries {
        cached.push(env.cache(id, &[&format!("products:id:{id}")]).await);
    }
    let first = env.cache("first", &[&format!("products:id:{P1}")]).await;

    env.sql(&format!("UPDATE products SET name = 'x' WHERE id = '{P1}'"))
        .await;
    env.wait_gone(std::slice::from_ref(&first)).await;
    for id in &entries {
        env.sql(&format!("UPDATE products SET name = 'x' WHERE id = '{id}'"))
            .await;
    }
    env.wait_gone(&cached).await;
    // Two or three batches (the barrier's last one may be counted after `before` was read);
    // a batch is counted just after its entries are gone.
    let deadline = std::time::Instant::now() + support::DEADLINE;
    let batches = loop {
        let batches = counter(&daemon, "evictd_batches_total") - before;
        if batches >= 2 || std::time::Instant::now() > deadline {
            break batches;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    };
    assert!(
        (2..=4).contains(&batches),
        "{batches} batches for 11 commits"
    );
}

/// While a batch lingers the daemon asks the kernel not to wake it for every message of the
/// stream (`SO_RCVLOWAT`); when the linger ends, what arrived meanwhile is read at once and joins
/// the batch, even if nothing else follows. (Left for the next read, a change would wait a
/// second linger; with the socket never restored, the walsender's next keepalive, tens of
/// seconds away: the health ticks' WAL markers are an hour apart here.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_arrives_during_the_linger_joins_the_batch() {
    let env = seeded("batch_linger_ms = 1000\nhealth_interval_ms = 3600000\n").await;
    let _daemon = env.start_daemon().await;
    let first = env.cache("first", &[&format!("products:id:{P1}")]).await;
    env.sql(&format!("UPDATE products SET name = 'x' WHERE id = '{P1}'"))
        .await;
    env.wait_gone(std::slice::from_ref(&first)).await;

    // Both within the linger that follows the first batch; the first starts the next batch,
    // the second arrives while it lingers, and nothing follows them.
    let a = env.cache("a", &[&format!("products:id:{P2}")]).await;
    let b = env.cache("b", &[&format!("products:id:{P1}")]).await;
    env.sql(&format!("UPDATE products SET name = 'y' WHERE id = '{P2}'"))
        .await;
    env.sql(&format!("UPDATE products SET name = 'y' WHERE id = '{P1}'"))
        .await;
    let committed = std::time::Instant::now();
    env.wait_gone(&[a, b]).await;
    let took = committed.elapsed();
    assert!(
        took < std::time::Duration::from_millis(1_600),
        "the change that arrived during a 1 s linger took {took:?} to be invalidated"
    );
}

/// A transaction is invalidated whole, not slice by slice as its rows stream in: the tags all
/// its rows share (`products:all`, the client's) go to Redis once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transaction_shares_one_invalidation() {
    let env = seeded("").await;
    insert_products(&env, "0001", 5000, C1).await;
    // Ready means caught up: the INSERT above is counted already.
    let daemon = env.start_daemon().await;
    let before = tags_invalidated(&daemon);
    let all = env.cache("all", &["products:all"]).await;

    env.sql(&format!(
        "UPDATE products SET name = name || '!' WHERE client_id = '{C1}' AND id <> '{P1}'"
    ))
    .await;
    env.wait_gone(&[all]).await;
    env.barrier().await;
    // 5,000 product ids, the client, `products:all`, and the barrier's own two tags (the last
    // counted just after its entry is gone, hence the wait). Slice by slice it was 5,083.
    let expected = 5_000 + 2 + 2;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let counted = tags_invalidated(&daemon) - before;
        assert!(
            counted <= expected,
            "{counted} tags invalidated, {expected} expected"
        );
        if counted == expected {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{counted} tags invalidated, {expected} expected"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

/// A transaction too big for one batch goes to Redis in parts whose `tagts` markers get their
/// TTL only at its end (one MSET per call meanwhile): once it is invalidated, every marker has
/// its TTL and none is left waiting for one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn markers_of_a_huge_transaction_get_their_ttl() {
    let env = seeded("").await;
    insert_products(&env, "0003", 30000, C1).await;
    let _daemon = env.start_daemon().await;
    let first = env
        .cache(
            "first",
            &["products:id:00000000-0000-0000-0003-000000000001"],
        )
        .await;
    let last = env
        .cache(
            "last",
            &["products:id:00000000-0000-0000-0003-000000030000"],
        )
        .await;

    env.sql(
        "UPDATE products SET name = name || '!' WHERE id::text LIKE '00000000-0000-0000-0003-%'",
    )
    .await;
    env.wait_gone(&[first, last]).await;
    env.barrier().await;

    let mut conn = env.redis.clone();
    let pending: u64 = conn
        .llen(format!("{}evictd:ttl-pending", env.prefix))
        .await
        .unwrap();
    assert_eq!(pending, 0, "markers still waiting for their TTL");
    let markers: Vec<String> = env
        .keys()
        .await
        .into_iter()
        .filter(|k| k.contains("tagts:products:id:"))
        .collect();
    assert!(markers.len() >= 30_000, "{} markers", markers.len());
    let mut pipe = redis::pipe();
    for marker in &markers {
        pipe.pttl(marker);
    }
    let ttls: Vec<i64> = pipe.query_async(&mut conn).await.unwrap();
    let without: Vec<&String> = markers
        .iter()
        .zip(&ttls)
        .filter(|(_, ttl)| **ttl <= 0)
        .map(|(marker, _)| marker)
        .collect();
    assert!(
        without.is_empty(),
        "{} markers without a TTL",
        without.len()
    );
}

/// Once Redis confirmed, the slot's position moves past the transaction even when nothing else
/// happens (no further commits, no health marker for a minute): the held-back report is sent
/// on its own, so the slot does not keep that WAL and a restart does not replay it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn confirmed_position_reaches_the_slot_without_further_traffic() {
    let env = seeded("health_interval_ms = 60000\n").await;
    let _daemon = env.start_daemon().await;
    let entry = env.cache("p1", &[&format!("products:id:{P1}")]).await;
    env.sql(&format!(
        "UPDATE products SET name = 'moved' WHERE id = '{P1}'"
    ))
    .await;
    let committed = query_strings(&env, "SELECT pg_current_wal_lsn()::text").await;
    env.wait_gone(&[entry]).await;
    let sql = format!(
        "SELECT (confirmed_flush_lsn >= '{}'::pg_lsn)::text FROM pg_replication_slots \
         WHERE slot_name = 'evictd_{}'",
        committed[0], env.name
    );
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while query_strings(&env, &sql).await != ["true"] {
        assert!(
            std::time::Instant::now() < deadline,
            "the slot's confirmed position did not reach {} within 5 s",
            committed[0]
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

/// `uninstall` removes the publication and the slot (an unread slot would keep WAL forever),
/// and so does migrating to another delivery; each delivery leaves only its own triggers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slot_and_triggers_follow_the_delivery_and_go_with_uninstall() {
    let env = seeded("").await;
    let slots =
        "SELECT slot_name::text FROM pg_replication_slots WHERE database = current_database()";
    assert_eq!(query_strings(&env, slots).await.len(), 1);

    let migrate = env
        .command(&["migrate"])
        .env("EVICTD_DELIVERY", "outbox")
        .output()
        .expect("run migrate");
    assert!(migrate.status.success(), "{}", support::text(&migrate));
    assert!(query_strings(&env, slots).await.is_empty());
    // Each delivery's triggers, and only its own.
    let products_triggers = "SELECT tgname::text FROM pg_trigger \
         WHERE tgrelid = 'products'::regclass AND tgname LIKE 'evictd%' ORDER BY 1";
    assert_eq!(
        query_strings(&env, products_triggers).await,
        [
            "evictd_delete",
            "evictd_insert",
            "evictd_truncate",
            "evictd_update"
        ]
    );

    let back = support::finish(env.command(&["migrate"]));
    assert!(back.status.success(), "{}", support::text(&back));
    assert_eq!(query_strings(&env, slots).await.len(), 1);
    assert_eq!(
        query_strings(&env, products_triggers).await,
        ["evictd_old_delete", "evictd_old_update"]
    );

    let uninstall = support::finish(env.command(&["uninstall"]));
    assert!(uninstall.status.success(), "{}", support::text(&uninstall));
    assert!(query_strings(&env, slots).await.is_empty());
    let publications = query_strings(
        &env,
        "SELECT pubname::text FROM pg_publication WHERE pubname = 'evictd'",
    )
    .await;
    assert!(publications.is_empty(), "{publications:?}");
}

/// A slot dropped behind the daemon's back (or never created, as when the SQL was applied by
/// hand) is created at start, with a table-wide resync: what happened before is unknown.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_slot_is_created_with_a_resync() {
    let env = seeded("").await;
    env.sql(&format!(
        "SELECT pg_drop_replication_slot('evictd_{}')",
        env.name
    ))
    .await;
    let stale = env.cache("p1", &[&format!("products:id:{P1}")]).await;
    let unrelated = env.cache("other", &["unrelated:thing"]).await;
    let daemon = env.start_daemon().await;
    daemon.wait_log("new replication slot").await;
    env.wait_gone(&[stale]).await;
    env.assert_present(&[unrelated]).await;
}

/// Three daemons on one database: one streams from the slot, the others stand by quietly —
/// ready, `evictd_standby 1`, no warning, error or reconnect — and when the holder is killed
/// (-9) in the middle of a burst, one of them takes the slot over within 10 s; every change of
/// the burst is invalidated and nothing else.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_standby_takes_over_the_slot_within_ten_seconds() {
    let env = seeded("").await;
    insert_products(&env, "0001", 60, C1).await;
    let mut holder = env.start_daemon().await;
    let standbys = [env.spawn_daemon(&[]), env.spawn_daemon(&[])];
    for standby in &standbys {
        standby.wait_log("standing by to take over").await;
        wait_ready_probe(standby).await;
        let (_, metrics) = support::http_get(&standby.http_addr(), "/metrics");
        for quiet in [
            "evictd_standby 1",
            "evictd_errors_total{kind=\"postgres\"} 0",
            "evictd_errors_total{kind=\"redis\"} 0",
            "evictd_reconnects_total{server=\"postgres\"} 0",
        ] {
            assert!(metrics.contains(quiet), "{quiet} in {metrics}");
        }
        let log = standby.log();
        assert!(
            !log.contains(" WARN ") && !log.contains(" ERROR "),
            "a standby logs no warning: {log}"
        );
    }
    let ids: Vec<String> = (1..=60)
        .map(|i| format!("00000000-0000-0000-0001-{i:012}"))
        .collect();
    let mut entries = Vec::new();
    for id in &ids {
        entries.push(
            env.cache(&format!("p{id}"), &[&format!("products:id:{id}")])
                .await,
        );
    }
    let other = env.cache("p2", &[&format!("products:id:{P2}")]).await;
    // A burst: the first half before the kill, the rest while the slot changes hands.
    for id in &ids[..30] {
        env.sql(&format!(
            "UPDATE products SET name = 'burst' WHERE id = '{id}'"
        ))
        .await;
    }
    holder.kill9();
    for id in &ids[30..] {
        env.sql(&format!(
            "UPDATE products SET name = 'burst' WHERE id = '{id}'"
        ))
        .await;
    }
    // Both standbys may see the slot free and try; the one streaming is the one that caught
    // up (the other stands by again).
    let start = std::time::Instant::now();
    let taken_over = loop {
        if let Some(standby) = standbys
            .iter()
            .find(|d| d.log().contains("caught up with the replication slot"))
        {
            break standby;
        }
        assert!(
            start.elapsed() < std::time::Duration::from_secs(10),
            "no standby took the slot over within 10 s"
        );
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    };
    taken_over.wait_ready().await;
    env.wait_gone(&entries).await;
    env.barrier().await;
    env.assert_present(&[other]).await;
    let (_, metrics) = support::http_get(&taken_over.http_addr(), "/metrics");
    assert!(metrics.contains("evictd_standby 0"), "{metrics}");
}

/// Waits until `/readyz` answers 200.
async fn wait_ready_probe(daemon: &support::Daemon) {
    let start = std::time::Instant::now();
    while support::http_get(&daemon.http_addr(), "/readyz").0 != 200 {
        assert!(
            start.elapsed() < support::DEADLINE,
            "never ready: {}",
            daemon.log()
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

/// The replication connection authenticates as the main one does: SCRAM-SHA-256, MD5 and
/// clear-text passwords (the test servers otherwise trust every local connection).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replication_connection_authenticates_with_each_password_method() {
    let env = Env::isolated(Delivery::Logical, "", &[]).await;
    env.sql(&format!(
        "INSERT INTO clients (id, name) VALUES ('{C1}', 'c1');
         INSERT INTO products (id, client_id, name) VALUES ('{P1}', '{C1}', 'p1');
         SET password_encryption = 'scram-sha-256';
         CREATE ROLE evictd_scram LOGIN SUPERUSER PASSWORD 'sc''ram pw';
         SET password_encryption = 'md5';
         CREATE ROLE evictd_md5 LOGIN SUPERUSER PASSWORD 'md5 pw';
         CREATE ROLE evictd_clear LOGIN SUPERUSER PASSWORD 'clear pw';"
    ))
    .await;
    let pg = env.pg_server();
    pg.prepend_hba(
        "host all evictd_scram 127.0.0.1/32 scram-sha-256\n\
         host all evictd_md5 127.0.0.1/32 md5\n\
         host all evictd_clear 127.0.0.1/32 password",
    )
    .unwrap();
    for (user, password) in [
        ("evictd_scram", "sc%27ram%20pw"),
        ("evictd_md5", "md5%20pw"),
        ("evictd_clear", "clear%20pw"),
    ] {
        let url = format!(
            "postgres://{user}:{password}@127.0.0.1:{}/{}",
            pg.port, env.name
        );
        let daemon = env.spawn_daemon(&["--database-url", &url]);
        // Ready in logical mode means the stream delivered the start-up marker.
        daemon.wait_ready().await;
        let streaming_as = query_strings(
            &env,
            "SELECT usename::text FROM pg_stat_replication WHERE application_name = 'evictd-logical'",
        )
        .await;
        assert_eq!(streaming_as, [user]);
        let entry = env.cache(user, &[&format!("products:id:{P1}")]).await;
        env.sql(&format!(
            "UPDATE products SET name = '{user}' WHERE id = '{P1}'"
        ))
        .await;
        env.wait_gone(&[entry]).await;
        drop(daemon);
    }
}

/// A database URL naming several hosts, the first of them down: the replication stream tries
/// them in order, as the main connection does, and streams from the one that answers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn multi_host_urls_stream_from_the_host_that_answers() {
    let env = Env::new(Delivery::Logical).await;
    env.sql(&format!(
        "INSERT INTO clients (id, name) VALUES ('{C1}', 'c1');
         INSERT INTO products (id, client_id, name) VALUES ('{P1}', '{C1}', 'p1');"
    ))
    .await;
    let closed = evictd::throwaway::free_port().unwrap();
    let url = format!(
        "postgres://postgres@127.0.0.1:{closed},127.0.0.1:{}/{}",
        env.pg_server().port,
        env.name
    );
    let daemon = env.spawn_daemon(&["--database-url", &url]);
    daemon.wait_ready().await;
    env.barrier().await;
    let entry = env.cache("p1", &[&format!("products:id:{P1}")]).await;
    env.sql(&format!(
        "UPDATE products SET name = 'renamed' WHERE id = '{P1}'"
    ))
    .await;
    env.wait_gone(&[entry]).await;
}

/// What `doctor` says of the publication's rows and of the slot's fate in a failover, and the
/// daemon turning a slot made without failover (by PostgreSQL 16 before an upgrade, or by hand)
/// into a failover slot where the server has them (17+).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn doctor_reports_row_filters_and_failover_slots() {
    let env = seeded("").await;
    let (status, report) = doctor(&env);
    assert_eq!(status, Some(0), "{report}");
    assert!(
        report.contains("every row, partitions through their root"),
        "{report}"
    );
    let migrated = support::finish(env.command(&["migrate"]));
    let migrated = support::text(&migrated);
    let major = evictd::schema::slot::server_major(&env.pg).await.unwrap();
    assert!(
        migrated.contains(&format!(
            "PostgreSQL {major}: publication evictd with column lists"
        )),
        "{migrated}"
    );
    assert!(
        migrated.contains("pgoutput protocol 1 (each transaction whole"),
        "{migrated}"
    );
    assert!(
        migrated.contains(if major >= evictd::schema::slot::FAILOVER_SLOTS_SINCE {
            ": a failover slot"
        } else {
            ": no failover slots before PostgreSQL 17"
        }),
        "{migrated}"
    );

    // A row filter someone added hides changes: a FAIL until `migrate` publishes every row.
    env.sql(
        "ALTER PUBLICATION evictd DROP TABLE products;
         ALTER PUBLICATION evictd ADD TABLE products WHERE (id IS NOT NULL);",
    )
    .await;
    let (status, report) = doctor(&env);
    assert_eq!(status, Some(1), "{report}");
    assert!(
        report.contains("publication evictd has a row filter on public.products"),
        "{report}"
    );
    env.migrate().await;
    let (status, report) = doctor(&env);
    assert_eq!(status, Some(0), "{report}");

    let slot = evictd::schema::slot::name(&env.pg).await.unwrap();
    if major < evictd::schema::slot::FAILOVER_SLOTS_SINCE {
        eprintln!(
            "PostgreSQL {major} has no failover slots: doctor must say what a failover costs"
        );
        assert!(
            report.contains(&format!("PostgreSQL {major} has no failover slots")),
            "{report}"
        );
        return;
    }
    eprintln!("PostgreSQL {major}: failover slots");
    assert!(
        report.contains(&format!("slot {slot} is a failover slot")),
        "{report}"
    );
    env.sql(&format!(
        "SELECT pg_drop_replication_slot('{slot}');
         SELECT pg_create_logical_replication_slot('{slot}', 'pgoutput');"
    ))
    .await;
    let (status, report) = doctor(&env);
    assert_eq!(status, Some(0), "{report}");
    assert!(
        report.contains(&format!("slot {slot} is not a failover slot")),
        "{report}"
    );
    let daemon = env.start_daemon().await;
    assert!(
        daemon.log().contains("now a failover slot"),
        "{}",
        daemon.log()
    );
    assert_eq!(
        evictd::schema::slot::failover(&env.pg, &slot)
            .await
            .unwrap(),
        Some(true)
    );
    let (_, report) = doctor(&env);
    assert!(
        report.contains(&format!("slot {slot} is a failover slot")),
        "{report}"
    );
}

/// With `logical_streaming = "on"`, PostgreSQL streams a transaction that outgrows
/// `logical_decoding_work_mem` while it is still in progress (pgoutput protocol 2): the daemon
/// holds its targets and
/// invalidates them at its commit, not before (a reader could otherwise cache again a value the
/// transaction is about to change), and a rolled-back one invalidates nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transactions_streamed_in_progress_invalidate_at_their_commit() {
    let env = seeded("wide_row_threshold = 100000\nlogical_streaming = \"on\"\n").await;
    // The smallest memory a walsender of this database decodes in: 3,000 rows outgrow it.
    env.sql(&format!(
        "ALTER DATABASE {} SET logical_decoding_work_mem = '64kB'",
        env.name
    ))
    .await;
    insert_products(&env, "0002", 3_000, C1).await;
    let daemon = env.start_daemon().await;
    assert!(daemon.log().contains("pgoutput=2"), "{}", daemon.log());
    let ids: Vec<String> = [1, 1_500, 3_000]
        .iter()
        .map(|i| format!("00000000-0000-0000-0002-{i:012}"))
        .collect();
    let cache_all = || async {
        let mut keys = Vec::new();
        for id in &ids {
            keys.push(
                env.cache(&format!("p{id}"), &[&format!("products:id:{id}")])
                    .await,
            );
        }
        keys
    };
    let touched = cache_all().await;
    let untouched = env.cache("p2", &[&format!("products:id:{P2}")]).await;
    let (writer, connection) = tokio_postgres::connect(&env.db_url, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(connection);
    let edit = "UPDATE products SET name = name || '!' \
                WHERE id::text LIKE '00000000-0000-0000-0002-%'";

    writer
        .batch_execute(&format!("BEGIN; {edit}"))
        .await
        .unwrap();
    // Everything committed after the UPDATE's WAL has been delivered, so its streamed blocks
    // have too: its entries must still be there.
    env.barrier().await;
    env.assert_present(&touched).await;
    writer.batch_execute("COMMIT").await.unwrap();
    env.wait_gone(&touched).await;
    daemon
        .wait_log("transactions streamed while in progress committed")
        .await;

    let touched = cache_all().await;
    writer
        .batch_execute(&format!("BEGIN; {edit}"))
        .await
        .unwrap();
    env.barrier().await;
    writer.batch_execute("ROLLBACK").await.unwrap();
    env.barrier().await;
    env.assert_present(&touched).await;

    // The daemon killed while it holds a streamed transaction, after it confirmed a position
    // past that transaction's blocks (the barrier's commit): the server sends the transaction
    // again, whole (changes before the confirmed position are not streamed), to the next
    // daemon, which invalidates it at its commit.
    let mut daemon = daemon;
    writer
        .batch_execute(&format!("BEGIN; {edit}"))
        .await
        .unwrap();
    env.barrier().await;
    daemon.kill9();
    let daemon = env.start_daemon().await;
    env.barrier().await;
    env.assert_present(&touched).await;
    writer.batch_execute("COMMIT").await.unwrap();
    env.wait_gone(&touched).await;
    env.barrier().await;
    env.assert_present(&[untouched]).await;
    drop(daemon);
}
