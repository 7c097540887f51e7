//! The database side and the command line around it: migrate is idempotent, uninstall removes
//! everything, and a broken configuration exits 2 naming the file, line and problem.

mod support;

use std::process::Output;

use evictd::config::Delivery;
use support::{Env, finish, text};

/// Everything evictd owns in the database, as text, to compare before and after.
async fn catalog_snapshot(env: &Env) -> Vec<String> {
    let rows = env
        .pg
        .query(
            "SELECT 'trigger ' || tgrelid::regclass || ' ' || tgname || ' ' || tgenabled::text || ' ' || pg_get_triggerdef(t.oid)
               FROM pg_trigger t WHERE tgname LIKE 'evictd\\_%'
             UNION ALL
             SELECT 'function ' || p.oid::regprocedure || ' ' || md5(pg_get_functiondef(p.oid))
               FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace WHERE n.nspname = 'evictd'
             UNION ALL
             SELECT 'relation ' || c.oid::regclass || ' ' || c.relkind::text
               FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace WHERE n.nspname = 'evictd'
             UNION ALL
             SELECT 'setting ' || key || '=' || value FROM evictd.settings
             ORDER BY 1",
            &[],
        )
        .await
        .unwrap();
    rows.iter().map(|r| r.get(0)).collect()
}

fn run(env: &Env, args: &[&str]) -> Output {
    env.run_cli(args)
}

/// `migrate` twice changes nothing the second time; `uninstall` removes every object.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrate_is_idempotent_and_uninstall_removes_everything() {
    let env = Env::bare(Delivery::Outbox, "").await;
    let first = run(&env, &["migrate"]);
    assert!(first.status.success(), "{}", text(&first));
    assert!(text(&first).contains("installed"), "{}", text(&first));
    let before = catalog_snapshot(&env).await;
    assert_eq!(
        before.iter().filter(|l| l.starts_with("trigger ")).count(),
        16,
        "four triggers on each of four tables: {before:#?}"
    );
    // Big events are compressed with lz4 wherever the server has it.
    let row = env
        .pg
        .query_one(
            "SELECT EXISTS (SELECT FROM pg_settings WHERE name = 'default_toast_compression' \
                            AND 'lz4'::text = ANY (enumvals)), \
                    attcompression::text \
             FROM pg_attribute WHERE attrelid = 'evictd.outbox'::regclass AND attname = 'payload'",
            &[],
        )
        .await
        .unwrap();
    let (has_lz4, compression): (bool, String) = (row.get(0), row.get(1));
    assert_eq!(
        compression,
        if has_lz4 { "l" } else { "" },
        "outbox payload compression (lz4 available: {has_lz4})"
    );

    let second = run(&env, &["migrate"]);
    assert!(second.status.success(), "{}", text(&second));
    assert!(text(&second).contains("up to date"), "{}", text(&second));
    assert_eq!(catalog_snapshot(&env).await, before);

    // Switching the delivery mode re-applies, and back again restores the same objects.
    let notify = finish(env.command(&["migrate", "--delivery", "notify"]));
    assert!(notify.status.success(), "{}", text(&notify));
    assert!(
        catalog_snapshot(&env)
            .await
            .contains(&"setting delivery=notify".to_string())
    );
    assert!(run(&env, &["migrate"]).status.success());
    assert_eq!(catalog_snapshot(&env).await, before);

    let removed = run(&env, &["uninstall"]);
    assert!(removed.status.success(), "{}", text(&removed));
    let left: i64 = env
        .pg
        .query_one(
            "SELECT (SELECT count(*) FROM pg_trigger WHERE tgname LIKE 'evictd\\_%') + \
                    (SELECT count(*) FROM pg_namespace WHERE nspname = 'evictd')",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(left, 0);
    // The application's writes still work without evictd.
    env.sql("INSERT INTO clients (name) VALUES ('after uninstall')")
        .await;
}

/// A table dropped from the configuration loses its triggers at the next migrate.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrate_removes_triggers_of_tables_no_longer_configured() {
    let env = Env::new(Delivery::Outbox).await;
    std::fs::write(
        &env.config_path,
        "[[tables]]\ntable = \"clients\"\ntags = [\"client_configs:id:{id}\"]\n",
    )
    .unwrap();
    let output = run(&env, &["migrate"]);
    assert!(output.status.success(), "{}", text(&output));
    let tables: Vec<String> = env
        .pg
        .query(
            "SELECT DISTINCT tgrelid::regclass::text FROM pg_trigger WHERE tgname LIKE 'evictd\\_%'",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(tables, vec!["clients".to_string()]);
}

/// Broken configurations exit 2 with `FILE: line N: PROBLEM`, and touch nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broken_configuration_exits_2_naming_file_and_line() {
    let env = Env::bare(Delivery::Outbox, "").await;
    let path = env.config_path.display().to_string();
    let cases = [
        (
            "channel = \"x\"\nnot_a_setting = true\n",
            "line 2",
            "unknown field",
        ),
        ("[[tables]\ntable = \"products\"\n", "line 1", ""),
        (
            "[[tables]]\ntable = \"products\"\ntags = [\n  \"products:all\",\n  \"products:client:{nope}\",\n]\n",
            "line 5",
            "names no column",
        ),
        (
            "[[tables]]\ntable = \"products\"\ntags = [\"p:{id\"]\n",
            "line 3",
            "unclosed",
        ),
        (
            "[[tables]]\ntable = \"missing_table\"\ntags = [\"m:{id}\"]\n",
            "line 3",
            "does not exist",
        ),
    ];
    for (toml, line, problem) in cases {
        std::fs::write(&env.config_path, toml).unwrap();
        for command in ["migrate", "run", "sql"] {
            if command == "sql" && (problem == "names no column" || problem == "does not exist") {
                continue; // only the database knows its columns
            }
            if command == "run" && problem == "names no column" {
                // A column can be renamed after `migrate`: `run` warns and serves (see
                // `a_rule_column_renamed_or_dropped_later_fails_no_write`).
                continue;
            }
            let output = run(&env, &[command]);
            let message = text(&output);
            assert_eq!(
                output.status.code(),
                Some(2),
                "{command} with {toml:?}: {message}"
            );
            assert!(
                message.contains(&format!("{path}: {line}:")),
                "{command}: {message}"
            );
            assert!(message.contains(problem), "{command}: {message}");
        }
    }
    let installed: bool = env
        .pg
        .query_one("SELECT to_regnamespace('evictd') IS NOT NULL", &[])
        .await
        .unwrap()
        .get(0);
    assert!(
        !installed,
        "a rejected configuration must not install anything"
    );

    let missing = finish(env.command(&["run", "--config", "/nonexistent/evictd.toml"]));
    assert_eq!(missing.status.code(), Some(2));
    assert!(text(&missing).contains("/nonexistent/evictd.toml"));

    let bad_flag = finish(env.command(&["run", "--delivery", "pigeon"]));
    assert_eq!(bad_flag.status.code(), Some(2), "{}", text(&bad_flag));
}

/// Flags work before or after the command, and flags beat the environment.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flags_before_or_after_the_command() {
    let env = Env::bare(Delivery::Notify, "").await;
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_evictd"))
        .env("EVICTD_CHANNEL", "from_env")
        .args(["--channel", "from_flag", "sql"])
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&output.stdout).contains("pg_notify('from_flag'"));
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_evictd"))
        .env("EVICTD_CHANNEL", "from_env")
        .args(["sql", "--delivery", "notify"])
        .output()
        .unwrap();
    let ddl = String::from_utf8_lossy(&output.stdout);
    assert!(ddl.contains("pg_notify('from_env', "), "{ddl}");
    drop(env);
}

/// `run` before `migrate` says what to do, and becomes ready once migrate ran.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_before_migrate_waits_and_says_why() {
    let env = Env::bare(Delivery::Outbox, "").await;
    let daemon = env.spawn_daemon(&[]);
    daemon.wait_log("run `evictd migrate` first").await;
    env.migrate().await;
    daemon.wait_ready().await;
}

/// `migrate` never queues behind a long transaction (which would make the application's own
/// queries queue behind it): it gives up each lock attempt after its lock timeout, says so,
/// retries, and succeeds once the table is free.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrate_retries_behind_a_long_transaction() {
    let env = Env::bare(Delivery::Outbox, "").await;
    let holder = env.connect_pg().await;
    holder
        .batch_execute("BEGIN; LOCK TABLE products IN ACCESS EXCLUSIVE MODE")
        .await
        .unwrap();
    let mut command = env.command(&["migrate"]);
    command
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped());
    let mut migrate = support::Daemon::spawn(command);
    migrate.wait_log("retrying").await;
    // While migrate waits between attempts, nobody queues behind it.
    env.sql("SELECT count(*) FROM clients").await;
    holder.batch_execute("COMMIT").await.unwrap();
    let start = std::time::Instant::now();
    let status = loop {
        if let Some(status) = migrate.child.try_wait().unwrap() {
            break status;
        }
        assert!(start.elapsed() < support::DEADLINE, "migrate still waiting");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    };
    assert!(status.success(), "{}", migrate.log());
    let installed: bool = env
        .pg
        .query_one("SELECT to_regclass('evictd.outbox') IS NOT NULL", &[])
        .await
        .unwrap()
        .get(0);
    assert!(installed);
}

/// In outbox mode a statement of many rows writes one event per `OUTBOX_EVENT_ROWS` distinct
/// rows (so the daemon can start on the first while the rest are read), each a complete event;
/// together they carry every distinct (old and new) row exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn big_statement_writes_one_outbox_event_per_run_of_rows() {
    use evictd::core::event::{Change, ChangeEvent};
    use evictd::schema::ddl::OUTBOX_EVENT_ROWS;
    const PRODUCTS: usize = 25_000;
    let env = Env::new(Delivery::Outbox).await;
    env.sql(&format!(
        "INSERT INTO clients (id, name) VALUES
             ('00000000-0000-0000-0000-0000000000c1', 'one'),
             ('00000000-0000-0000-0000-0000000000c2', 'two');
         INSERT INTO products (client_id, name)
         SELECT '00000000-0000-0000-0000-0000000000c1', 'p' || i FROM generate_series(1, {PRODUCTS}) i;
         DELETE FROM evictd.outbox;"
    ))
    .await;
    // Moving every product to another client: the old and the new client both count, so
    // 50,000 distinct (client, id) rows.
    env.sql("UPDATE products SET client_id = '00000000-0000-0000-0000-0000000000c2'")
        .await;

    let events = env
        .pg
        .query("SELECT payload FROM evictd.outbox ORDER BY id", &[])
        .await
        .unwrap();
    let distinct_rows = 2 * PRODUCTS;
    assert_eq!(
        events.len(),
        distinct_rows.div_ceil(OUTBOX_EVENT_ROWS as usize)
    );
    let mut seen = std::collections::HashSet::new();
    for event in &events {
        let payload: &str = event.get(0);
        let event = ChangeEvent::parse(payload).expect("each event is complete JSON");
        let Change::Rows { columns, rows } = event.change else {
            panic!("a precise event, not {:?}", event.change);
        };
        assert_eq!(columns, ["client_id", "id"]);
        assert!(
            rows.len() <= OUTBOX_EVENT_ROWS as usize,
            "{} rows",
            rows.len()
        );
        for row in rows.iter() {
            let values: Vec<String> = row
                .iter()
                .map(|v| v.as_ref().expect("no NULL here").as_str().to_string())
                .collect();
            assert!(seen.insert(values), "a row sent twice");
        }
    }
    assert_eq!(seen.len(), distinct_rows);
}

/// What the capture triggers emit for `statement`, as (operation, table-wide?, distinct rows):
/// read from the outbox, or in notify mode heard on the channel up to a closing NOTIFY (and
/// checked against the signing key).
async fn events_of(env: &Env, statement: &str) -> Vec<(String, bool, Vec<Vec<String>>)> {
    use evictd::core::event::{Change, ChangeEvent};
    let payloads: Vec<String> = if env.delivery == Delivery::Notify {
        let mut listener = env.listen().await;
        env.sql(statement).await;
        env.sql("SELECT pg_notify('cache_invalidation', 'end')")
            .await;
        let mut payloads = Vec::new();
        loop {
            let payload = tokio::time::timeout(support::DEADLINE, listener.payloads.recv())
                .await
                .expect("the closing NOTIFY within the deadline")
                .unwrap();
            if payload == "end" {
                break payloads;
            }
            let key = env.signing_key().await;
            let opened = key.open_str(&payload).expect("a signed payload");
            payloads.push(opened.to_string());
        }
    } else {
        env.sql("DELETE FROM evictd.outbox").await;
        env.sql(statement).await;
        let rows = env
            .pg
            .query("SELECT payload FROM evictd.outbox ORDER BY id", &[])
            .await
            .unwrap();
        rows.iter().map(|r| r.get(0)).collect()
    };
    payloads
        .iter()
        .map(|payload| {
            let event = ChangeEvent::parse(payload).expect("each event is complete JSON");
            let op = format!("{:?}", event.op).to_uppercase();
            match event.change {
                Change::TableWide => (op, true, Vec::new()),
                Change::Rows { columns, rows } => {
                    assert_eq!(columns, ["client_id", "id"]);
                    let rows: Vec<Vec<String>> = rows
                        .iter()
                        .map(|row| {
                            row.iter()
                                .map(|v| v.as_ref().map_or("NULL", |v| v.as_str()).to_string())
                                .collect()
                        })
                        .collect();
                    let distinct: std::collections::HashSet<_> = rows.iter().collect();
                    assert_eq!(distinct.len(), rows.len(), "a row sent twice: {payload}");
                    (op, false, rows)
                }
                Change::Tags(_) => panic!("no explicit tags here: {payload}"),
            }
        })
        .collect()
}

/// Clients c1 and c2, and products 1..=`n` of client c1.
async fn seed_products(env: &Env, n: usize) {
    env.sql(&format!(
        "INSERT INTO clients (id, name) VALUES
             ('00000000-0000-0000-0000-0000000000c1', 'one'),
             ('00000000-0000-0000-0000-0000000000c2', 'two');
         INSERT INTO products (id, client_id, name)
         SELECT ('00000000-0000-0000-0000-' || lpad(i::text, 12, '0'))::uuid,
                '00000000-0000-0000-0000-0000000000c1', 'p' || i
         FROM generate_series(1, {n}) i;"
    ))
    .await;
}

fn product_rows(client: &str, ids: std::ops::RangeInclusive<usize>) -> Vec<Vec<String>> {
    ids.map(|i| {
        vec![
            format!("00000000-0000-0000-0000-0000000000{client}"),
            format!("00000000-0000-0000-0000-{i:012}"),
        ]
    })
    .collect()
}

fn sorted(mut rows: Vec<Vec<String>>) -> Vec<Vec<String>> {
    rows.sort();
    rows
}

/// Statements of up to 1,000 rows take the capture function's one-statement fast path, larger
/// ones the general path; both emit the same events: every distinct old and new row once, no
/// event for a statement that changes nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn small_and_large_statements_emit_the_same_events() {
    let env = Env::new(Delivery::Outbox).await;
    seed_products(&env, 2_100).await;
    let precise = |op: &str, rows: Vec<Vec<String>>| vec![(op.to_string(), false, sorted(rows))];
    let sorted_events = |mut events: Vec<(String, bool, Vec<Vec<String>>)>| {
        for event in &mut events {
            event.2.sort();
        }
        events
    };
    let id = |i: usize| format!("00000000-0000-0000-0000-{i:012}");

    // One row, its key columns unchanged: old and new are the same row, sent once.
    let events = events_of(
        &env,
        &format!("UPDATE products SET price_cents = 1 WHERE id = '{}'", id(1)),
    )
    .await;
    assert_eq!(
        sorted_events(events),
        precise("UPDATE", product_rows("c1", 1..=1))
    );
    // Moved to another client: both clients.
    let events = events_of(
        &env,
        &format!(
            "UPDATE products SET client_id = '00000000-0000-0000-0000-0000000000c2' WHERE id = '{}'",
            id(2)
        ),
    )
    .await;
    let mut both = product_rows("c1", 2..=2);
    both.extend(product_rows("c2", 2..=2));
    assert_eq!(sorted_events(events), precise("UPDATE", both));
    // Nothing changed, nothing sent.
    let events = events_of(&env, "UPDATE products SET price_cents = 1 WHERE false").await;
    assert_eq!(events, []);
    // Exactly 1,000 rows (fast path) and 1,001 (general path), all moving: old and new.
    for (first, last) in [(3, 1_002), (1_003, 2_003)] {
        let events = events_of(
            &env,
            &format!(
                "UPDATE products SET client_id = '00000000-0000-0000-0000-0000000000c2'
                 WHERE id BETWEEN '{}' AND '{}'",
                id(first),
                id(last)
            ),
        )
        .await;
        let mut both = product_rows("c1", first..=last);
        both.extend(product_rows("c2", first..=last));
        assert_eq!(
            sorted_events(events),
            precise("UPDATE", both),
            "{first}..={last}"
        );
    }
    // INSERT and DELETE take it too.
    let events = events_of(
        &env,
        &format!(
            "INSERT INTO products (id, client_id, name) VALUES ('{}', '00000000-0000-0000-0000-0000000000c1', 'new')",
            id(5_000)
        ),
    )
    .await;
    assert_eq!(
        sorted_events(events),
        precise("INSERT", product_rows("c1", 5_000..=5_000))
    );
    let events = events_of(
        &env,
        &format!(
            "DELETE FROM products WHERE id BETWEEN '{}' AND '{}'",
            id(2_050),
            id(2_055)
        ),
    )
    .await;
    assert_eq!(
        sorted_events(events),
        precise("DELETE", product_rows("c1", 2_050..=2_055))
    );
}

/// A `wide_row_threshold` below the fast path's size still decides: above it a statement is
/// table-wide, at it precise. In notify mode a small statement whose rows do not fit one
/// payload goes table-wide too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_fast_path_respects_the_threshold_and_the_payload_limit() {
    let env = Env::with_config(Delivery::Outbox, "wide_row_threshold = 5\n").await;
    seed_products(&env, 10).await;
    let between = |a: usize, b: usize| {
        format!(
            "UPDATE products SET price_cents = 2 WHERE id BETWEEN '00000000-0000-0000-0000-{a:012}' AND '00000000-0000-0000-0000-{b:012}'"
        )
    };
    let events = events_of(&env, &between(1, 5)).await;
    assert_eq!(events.len(), 1);
    assert!(!events[0].1, "5 rows: precise");
    assert_eq!(events[0].2.len(), 5);
    let events = events_of(&env, &between(1, 6)).await;
    assert_eq!(
        events,
        [("UPDATE".to_string(), true, Vec::new())],
        "6 rows: wide"
    );

    let env = Env::new(Delivery::Notify).await;
    seed_products(&env, 300).await;
    let events = events_of(&env, &between(1, 1)).await;
    assert_eq!(events.len(), 1);
    assert!(!events[0].1, "one row fits a payload");
    let events = events_of(&env, &between(1, 300)).await;
    assert_eq!(
        events,
        [("UPDATE".to_string(), true, Vec::new())],
        "300 rows do not fit 8000 bytes"
    );
}

/// `evictd sql` cannot see the database, so the SQL it prints checks for itself, when applied,
/// that every rule column exists: a placeholder naming no column fails the migration with a
/// message naming the rule, installs nothing, and leaves the table's writes alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn generated_sql_refuses_a_rule_column_the_table_lacks() {
    let env = Env::bare(
        Delivery::Outbox,
        "[[tables]]\ntable = \"products\"\ntags = [\"products:client:{clientid}\"]\n",
    )
    .await;
    let sql = run(&env, &["sql"]);
    assert!(sql.status.success(), "{}", text(&sql));
    let file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(file.path(), &sql.stdout).unwrap();
    let applied = env
        .pg_server()
        .psql(&env.name, &["-1", "-f", file.path().to_str().unwrap()])
        .expect_err("applying SQL for a column the table lacks must fail");
    let said = format!("{applied:#}");
    assert!(
        said.contains(
            "table public.products has no column clientid (placeholder {clientid} of rule \"products:client:{clientid}\")"
        ),
        "{said}"
    );
    let installed: i64 = env
        .pg
        .query_one(
            "SELECT count(*) FROM pg_namespace WHERE nspname = 'evictd'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(installed, 0, "nothing of the failed migration may stay");
    env.sql("INSERT INTO clients (id, name) VALUES ('00000000-0000-0000-0000-0000000000c1', 'c')")
        .await;
}

/// A rule column renamed (or, where the database allows it, dropped) after `migrate` fails no
/// application write: the change is invalidated table-wide (the table's entries go, others
/// stay), `doctor` FAILs naming the rule, and a daemon started afterwards serves (with a
/// warning) instead of exiting on a configuration error. Every delivery.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rule_column_renamed_or_dropped_later_fails_no_write() {
    for (delivery, alteration) in [
        (Delivery::Outbox, "RENAME COLUMN client_id TO owner_id"),
        (Delivery::Outbox, "DROP COLUMN client_id"),
        (Delivery::Notify, "RENAME COLUMN client_id TO owner_id"),
        (Delivery::Notify, "DROP COLUMN client_id"),
        (Delivery::Logical, "RENAME COLUMN client_id TO owner_id"),
    ] {
        let env = Env::new(delivery).await;
        env.sql(
            "INSERT INTO clients (id, name) VALUES ('00000000-0000-0000-0000-0000000000c1', 'c');
             INSERT INTO products (id, client_id, name) VALUES
               ('00000000-0000-0000-0000-0000000000a1', '00000000-0000-0000-0000-0000000000c1', 'p');",
        )
        .await;
        let daemon = env.start_daemon().await;
        let entries = vec![
            env.cache("list", &["products:all"]).await,
            env.cache(
                "client",
                &["products:client:00000000-0000-0000-0000-0000000000c1"],
            )
            .await,
            env.cache(
                "other-product",
                &["products:id:00000000-0000-0000-0000-0000000000ff"],
            )
            .await,
        ];
        let unrelated = env
            .cache(
                "config",
                &["client_configs:id:00000000-0000-0000-0000-0000000000c1"],
            )
            .await;
        env.sql(&format!("ALTER TABLE products {alteration}")).await;
        // The application's write succeeds...
        env.sql("UPDATE products SET name = 'renamed' WHERE id = '00000000-0000-0000-0000-0000000000a1'")
            .await;
        // ...and every entry of the table goes, since which rows changed cannot be read.
        env.wait_gone(&entries).await;
        env.barrier().await;
        env.assert_present(std::slice::from_ref(&unrelated)).await;
        drop(daemon);

        let doctor = run(&env, &["doctor", "--json"]);
        let report: serde_json::Value = serde_json::from_slice(&doctor.stdout)
            .unwrap_or_else(|e| panic!("doctor --json: {e}: {}", text(&doctor)));
        let rules = report["checks"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["name"] == "rules")
            .unwrap_or_else(|| panic!("no rules check: {report}"));
        assert_eq!(
            rules["status"], "FAIL",
            "{delivery:?} {alteration}: {rules}"
        );
        assert!(
            rules["message"]
                .as_str()
                .unwrap()
                .contains("placeholder `{client_id}` in `products:client:{client_id}`"),
            "{rules}"
        );
        assert_eq!(doctor.status.code(), Some(1), "{}", text(&doctor));

        let restarted = env.start_daemon().await;
        restarted
            .wait_log("a rule names a column the table lacks")
            .await;
    }
}

/// Redis URLs that cannot be what was meant are configuration errors (exit 2) naming the
/// setting, without the password: several hosts in a single-server URL, a sentinel URL
/// without its master's name, cluster URLs mixing forms or naming a database, cluster seeds
/// that lead nowhere or to a server that is no cluster node.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_redis_urls_exit_2_without_their_password() {
    let env = Env::bare(Delivery::Outbox, "").await;
    let every: &[&str] = &["run", "invalidate", "stats"];
    // Seeds that lead to no cluster: nothing listens there, or a server that is no cluster
    // node (the test's own Redis). The daemon waits for a cluster that is down, as for any
    // Redis, but gives up on one that is not a cluster.
    let nothing = format!(
        "redis+cluster://:hunter2secret@127.0.0.1:{}",
        evictd::throwaway::free_port().unwrap()
    );
    let not_cluster = env.redis_url.replace("redis://", "redis+cluster://");
    let cases: Vec<(&str, &str, &[&str])> = vec![
        (
            "redis://:hunter2secret@h1:6379,h2:6379",
            "several hosts",
            every,
        ),
        (
            "redis+sentinel://:hunter2secret@h1:26379,h2:26379",
            "names its master",
            every,
        ),
        (
            "redis+sentinel://:hunter2secret@h1/mymaster",
            "is not host:port",
            every,
        ),
        (
            "redis+cluster://:hunter2secret@h1:7000,redis://h2:7001",
            "mixes URL forms",
            every,
        ),
        (
            "redis+cluster://:hunter2secret@h1:7000/3",
            "one database",
            every,
        ),
        (&nothing, "unreachable", &["invalidate", "stats"]),
        (&not_cluster, "is not a cluster node", every),
    ];
    for (url, said, commands) in cases {
        for command in commands {
            let mut args = vec![*command, "--redis-url", url];
            if *command == "invalidate" {
                args.push("--all");
            }
            let output = run(&env, &args);
            let message = text(&output);
            assert_eq!(output.status.code(), Some(2), "{command} {url}: {message}");
            assert!(message.contains("redis_url"), "{message}");
            assert!(message.contains(said), "{message}");
            assert!(!message.contains("hunter2secret"), "{message}");
        }
    }
}
