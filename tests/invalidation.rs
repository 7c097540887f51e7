//! The automatic path end to end: real PostgreSQL, real Redis, the real `evictd` binary.
//! Every test edits the database the way an operator would and checks that exactly the stale
//! cache entries went and everything else stayed.

mod support;

use std::collections::BTreeSet;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use evictd::config::Delivery;
use futures_util::StreamExt as _;
use redis::AsyncCommands as _;
use support::{Env, repo_file, text};

const C1: &str = "00000000-0000-0000-0000-0000000000c1";
const C2: &str = "00000000-0000-0000-0000-0000000000c2";
const P1: &str = "00000000-0000-0000-0000-0000000000a1";
const P2: &str = "00000000-0000-0000-0000-0000000000a2";
const P3: &str = "00000000-0000-0000-0000-0000000000a3";
const M1: &str = "00000000-0000-0000-0000-0000000000d1";
const M2: &str = "00000000-0000-0000-0000-0000000000d2";
const S1: &str = "00000000-0000-0000-0000-0000000000e1";
const S2: &str = "00000000-0000-0000-0000-0000000000e2";

/// Two clients, each with one product, each product with one module and one expert session.
fn seed_sql() -> String {
    format!(
        "INSERT INTO clients (id, name) VALUES ('{C1}', 'c1'), ('{C2}', 'c2');
         INSERT INTO products (id, client_id, name) VALUES ('{P1}', '{C1}', 'p1'), ('{P2}', '{C2}', 'p2');
         INSERT INTO modules (id, product_id, title) VALUES ('{M1}', '{P1}', 'm1'), ('{M2}', '{P2}', 'm2');
         INSERT INTO job_readiness_expert_sessions (id, product_id, title) VALUES ('{S1}', '{P1}', 's1'), ('{S2}', '{P2}', 's2');"
    )
}

/// Every tag the seeded rows produce, plus tags no table produces.
fn all_tags() -> Vec<String> {
    let mut tags: Vec<String> = vec![
        "products:all".into(),
        "expert_sessions:all".into(),
        "client_configs:all".into(),
        "unrelated:thing".into(),
        "products:client:".into(),
    ];
    for c in [C1, C2] {
        tags.push(format!("products:client:{c}"));
        tags.push(format!("client_configs:id:{c}"));
    }
    for p in [P1, P2, P3] {
        tags.push(format!("products:id:{p}"));
        tags.push(format!("expert_sessions:product:{p}"));
        tags.push(format!("module_content:product:{p}"));
    }
    for m in [M1, M2] {
        tags.push(format!("module_content:id:{m}"));
    }
    for s in [S1, S2] {
        tags.push(format!("expert_sessions:id:{s}"));
    }
    tags
}

/// One cache entry per tag, written afresh; returns (tag, key) pairs.
async fn cache_everything(env: &Env) -> Vec<(String, String)> {
    let mut entries = Vec::new();
    for tag in all_tags() {
        let key = env.cache(&format!("entry:{tag}"), &[&tag]).await;
        entries.push((tag, key));
    }
    entries
}

/// Runs `sql`, then checks that exactly the entries of `expected` tags are gone.
async fn check(env: &Env, sql: &str, expected: &[String]) {
    let entries = cache_everything(env).await;
    env.sql(sql).await;
    env.barrier().await;
    let expected: BTreeSet<&str> = expected.iter().map(String::as_str).collect();
    let mut wrong = Vec::new();
    for (tag, key) in &entries {
        let gone = !env.exists(key).await;
        if gone != expected.contains(tag.as_str()) {
            wrong.push(format!("{tag}: {}", if gone { "removed" } else { "kept" }));
        }
    }
    assert!(wrong.is_empty(), "after `{sql}`:\n  {}", wrong.join("\n  "));
}

fn tags(list: &[&str]) -> Vec<String> {
    list.iter().map(|s| s.to_string()).collect()
}

async fn table_matrix(delivery: Delivery, config: &str) {
    let env = Env::with_config(delivery, config).await;
    env.sql(&seed_sql()).await;
    let _daemon = env.start_daemon().await;

    let cases: Vec<(String, Vec<String>)> = vec![
        (
            format!("INSERT INTO products (id, client_id, name) VALUES ('{P3}', '{C1}', 'p3')"),
            tags(&[
                "products:all",
                &format!("products:client:{C1}"),
                &format!("products:id:{P3}"),
            ]),
        ),
        (
            format!("UPDATE products SET name = 'renamed' WHERE id = '{P1}'"),
            tags(&[
                "products:all",
                &format!("products:client:{C1}"),
                &format!("products:id:{P1}"),
            ]),
        ),
        (
            format!("DELETE FROM products WHERE id = '{P3}'"),
            tags(&[
                "products:all",
                &format!("products:client:{C1}"),
                &format!("products:id:{P3}"),
            ]),
        ),
        (
            format!(
                "INSERT INTO job_readiness_expert_sessions (product_id, title) VALUES ('{P2}', 'new')"
            ),
            // The new row's own id is random: its id tag has no entry here.
            tags(&[
                "expert_sessions:all",
                &format!("expert_sessions:product:{P2}"),
            ]),
        ),
        (
            format!("UPDATE job_readiness_expert_sessions SET title = 't' WHERE id = '{S1}'"),
            tags(&[
                "expert_sessions:all",
                &format!("expert_sessions:product:{P1}"),
                &format!("expert_sessions:id:{S1}"),
            ]),
        ),
        (
            format!("DELETE FROM job_readiness_expert_sessions WHERE id = '{S1}'"),
            tags(&[
                "expert_sessions:all",
                &format!("expert_sessions:product:{P1}"),
                &format!("expert_sessions:id:{S1}"),
            ]),
        ),
        (
            format!("INSERT INTO modules (product_id, title) VALUES ('{P1}', 'new')"),
            tags(&[&format!("module_content:product:{P1}")]),
        ),
        (
            format!("UPDATE modules SET content = 'c' WHERE id = '{M2}'"),
            tags(&[
                &format!("module_content:id:{M2}"),
                &format!("module_content:product:{P2}"),
            ]),
        ),
        (
            format!("DELETE FROM modules WHERE id = '{M1}'"),
            tags(&[
                &format!("module_content:id:{M1}"),
                &format!("module_content:product:{P1}"),
            ]),
        ),
        (
            "INSERT INTO clients (name) VALUES ('c3')".to_string(),
            tags(&["client_configs:all"]),
        ),
        (
            format!("UPDATE clients SET config = '{{\"theme\":\"dark\"}}' WHERE id = '{C1}'"),
            tags(&["client_configs:all", &format!("client_configs:id:{C1}")]),
        ),
        (
            // ON DELETE SET NULL updates product p2 too: its client's tag goes, and no
            // `products:client:` tag for the NULL.
            format!("DELETE FROM clients WHERE id = '{C2}'"),
            tags(&[
                "client_configs:all",
                &format!("client_configs:id:{C2}"),
                "products:all",
                &format!("products:client:{C2}"),
                &format!("products:id:{P2}"),
            ]),
        ),
        (
            // Cascades to its module and expert session.
            format!("DELETE FROM products WHERE id = '{P1}'"),
            tags(&[
                "products:all",
                &format!("products:client:{C1}"),
                &format!("products:id:{P1}"),
                // Its module added above goes with it; its expert session was deleted earlier.
                &format!("module_content:product:{P1}"),
            ]),
        ),
        (
            "UPDATE products SET name = name WHERE false".to_string(),
            vec![],
        ),
    ];
    for (sql, expected) in &cases {
        check(&env, sql, expected).await;
    }
}

/// Each table × INSERT / UPDATE / DELETE removes exactly the expected entries (notify mode).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_table_and_operation_notify() {
    table_matrix(Delivery::Notify, "").await;
}

/// The same matrix through the outbox, with the default (doorbell) wake-up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_table_and_operation_outbox() {
    table_matrix(Delivery::Outbox, "").await;
}

/// The same matrix through the outbox in its low-overhead setting: no NOTIFY at commit, the
/// daemon polls.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_table_and_operation_outbox_polled() {
    table_matrix(Delivery::Outbox, "outbox_wakeup = \"poll\"\n").await;
}

/// The same matrix with a NOTIFY per commit (the default is the doorbell: writers ring only
/// while no daemon drains).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_table_and_operation_outbox_notify() {
    table_matrix(Delivery::Outbox, "outbox_wakeup = \"notify\"\n").await;
}

/// The same matrix streamed from a replication slot (old values of deleted and moved rows
/// through the old-row triggers).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_table_and_operation_logical() {
    table_matrix(Delivery::Logical, "").await;
}

/// In poll wake-up mode the writers send no NOTIFY at all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn poll_wakeup_sends_no_notify() {
    let env = Env::with_config(Delivery::Outbox, "outbox_wakeup = \"poll\"\n").await;
    let ddl: String = env
        .pg
        .query_one(
            "SELECT pg_get_functiondef('evictd.emit(text)'::regprocedure)",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(!ddl.contains("pg_notify"), "{ddl}");
    assert!(ddl.contains("INSERT INTO evictd.outbox"), "{ddl}");
}

/// An UPDATE that moves a product to another client invalidates both clients' tags.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn update_moving_product_invalidates_both_clients() {
    let env = Env::new(Delivery::Notify).await;
    env.sql(&seed_sql()).await;
    let _daemon = env.start_daemon().await;
    check(
        &env,
        &format!("UPDATE products SET client_id = '{C2}' WHERE id = '{P1}'"),
        &tags(&[
            "products:all",
            &format!("products:client:{C1}"),
            &format!("products:client:{C2}"),
            &format!("products:id:{P1}"),
        ]),
    )
    .await;
}

/// A writer with no privilege on evictd's objects and a hostile search path (its own schema
/// first, shadowing `text`, `to_json`, `||` and `=` with functions that fail) still gets its
/// UPDATE through and invalidated: the capture function, which runs as its owner, never
/// resolves a name through the caller's search path. And the writer still cannot touch the
/// outbox directly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writer_with_hostile_search_path_cannot_hijack_the_trigger() {
    let env = Env::new(Delivery::Outbox).await;
    env.sql(&seed_sql()).await;
    let role = format!("writer_{}", env.name);
    env.sql(&format!(
        r#"CREATE ROLE {role} NOLOGIN;
        GRANT SELECT, UPDATE ON products TO {role};
        CREATE SCHEMA hostile AUTHORIZATION {role};
        SET ROLE {role};
        CREATE FUNCTION hostile.trap(a text, b text) RETURNS boolean LANGUAGE plpgsql AS
            $$ BEGIN RAISE EXCEPTION 'hijacked: ran the caller''s operator'; END $$;
        CREATE FUNCTION hostile.trap_cat(a text, b text) RETURNS text LANGUAGE plpgsql AS
            $$ BEGIN RAISE EXCEPTION 'hijacked: ran the caller''s ||'; END $$;
        CREATE FUNCTION hostile.to_json(a text) RETURNS json LANGUAGE plpgsql AS
            $$ BEGIN RAISE EXCEPTION 'hijacked: ran the caller''s to_json'; END $$;
        CREATE OPERATOR hostile.= (LEFTARG = text, RIGHTARG = text, FUNCTION = hostile.trap);
        CREATE OPERATOR hostile.|| (LEFTARG = text, RIGHTARG = text, FUNCTION = hostile.trap_cat);
        CREATE DOMAIN hostile.text AS integer;
        RESET ROLE;"#
    ))
    .await;
    let _daemon = env.start_daemon().await;
    check(
        &env,
        &format!(
            "BEGIN; SET LOCAL ROLE {role}; SET LOCAL search_path = hostile, public, pg_catalog;
             UPDATE products SET name = 'renamed' WHERE id = '{P1}'; COMMIT;"
        ),
        &tags(&[
            "products:all",
            &format!("products:client:{C1}"),
            &format!("products:id:{P1}"),
        ]),
    )
    .await;
    let denied = env
        .pg
        .batch_execute(&format!(
            "BEGIN; SET LOCAL ROLE {role}; INSERT INTO evictd.outbox (payload) VALUES ('x'); COMMIT;"
        ))
        .await
        .expect_err("the writer role must not write the outbox directly");
    assert!(
        denied.to_string().contains("permission denied")
            || format!("{denied:?}").contains("permission denied"),
        "{denied:?}"
    );
    env.sql("ROLLBACK").await;
}

/// TRUNCATE invalidates everything the table's rule can produce, and nothing else.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn truncate_is_table_wide() {
    for delivery in [Delivery::Notify, Delivery::Outbox] {
        let env = Env::new(delivery).await;
        env.sql(&seed_sql()).await;
        let _daemon = env.start_daemon().await;
        let expected: Vec<String> = all_tags()
            .into_iter()
            .filter(|t| t.starts_with("expert_sessions:"))
            .collect();
        check(&env, "TRUNCATE job_readiness_expert_sessions", &expected).await;
        let marker: Option<String> = env
            .redis
            .clone()
            .get(format!(
                "{}tagts-table:public.job_readiness_expert_sessions",
                env.prefix
            ))
            .await
            .unwrap();
        assert!(marker.is_some(), "table-wide marker missing ({delivery:?})");
    }
}

/// In notify mode a 100,000-row UPDATE cannot list its rows in 8000 bytes: it sends one
/// table-wide event, not 100,000, and every products tag goes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn huge_update_sends_one_table_wide_event_in_notify_mode() {
    let env = Env::new(Delivery::Notify).await;
    env.sql(&seed_sql()).await;
    env.sql(&format!(
        "INSERT INTO products (client_id, name) SELECT '{C1}', 'bulk ' || i FROM generate_series(1, 100000) i"
    ))
    .await;
    let _daemon = env.start_daemon().await;

    // Our own listener counts what goes over the channel.
    let mut listener = env.listen().await;

    let entries = cache_everything(&env).await;
    env.sql("UPDATE products SET price_cents = price_cents + 1")
        .await;
    env.barrier().await;

    let mut payloads = Vec::new();
    while let Some(payload) = tokio::time::timeout(support::DEADLINE, listener.payloads.recv())
        .await
        .unwrap()
    {
        let is_barrier = payload.contains("\"TAGS\"");
        payloads.push(payload);
        if is_barrier {
            break;
        }
    }
    assert_eq!(
        payloads.len(),
        2,
        "expected the UPDATE's one event and the barrier: {payloads:?}"
    );
    assert!(payloads[0].contains("\"wide\":true"), "{}", payloads[0]);
    for (tag, key) in &entries {
        let gone = !env.exists(key).await;
        assert_eq!(gone, tag.starts_with("products:"), "{tag}");
    }
}

/// A rolled-back transaction invalidates nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rollback_invalidates_nothing() {
    for delivery in [Delivery::Notify, Delivery::Outbox] {
        let env = Env::new(delivery).await;
        env.sql(&seed_sql()).await;
        let _daemon = env.start_daemon().await;
        check(
            &env,
            &format!(
                "BEGIN; UPDATE products SET name = 'x' WHERE id = '{P1}'; \
                 SELECT evictd.invalidate_tags('client_configs:all'); ROLLBACK;"
            ),
            &[],
        )
        .await;
    }
}

/// `evictd.invalidate_tags` inside a transaction takes effect after COMMIT, not before.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalidate_tags_fires_after_commit() {
    for delivery in [Delivery::Notify, Delivery::Outbox] {
        let env = Env::new(delivery).await;
        let _daemon = env.start_daemon().await;
        let a = env.cache("explicit:a", &["custom:a"]).await;
        let b = env.cache("explicit:b", &["custom:b"]).await;
        let other = env.cache("explicit:c", &["custom:c"]).await;

        let (writer, connection) = tokio_postgres::connect(&env.db_url, tokio_postgres::NoTls)
            .await
            .unwrap();
        tokio::spawn(connection);
        writer
            .batch_execute("BEGIN; SELECT evictd.invalidate_tags('custom:a', 'custom:b', NULL, '')")
            .await
            .unwrap();
        // Everything committed so far is processed, and the open transaction's tags are not.
        env.barrier().await;
        env.assert_present(&[a.clone(), b.clone()]).await;
        writer.batch_execute("COMMIT").await.unwrap();
        env.wait_gone(&[a, b]).await;
        env.barrier().await;
        env.assert_present(&[other]).await;
    }
}

/// COPY, and a multi-statement migration script run through `psql -f`, both invalidate.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn copy_and_psql_scripts_invalidate() {
    let env = Env::new(Delivery::Outbox).await;
    env.sql(&seed_sql()).await;
    let _daemon = env.start_daemon().await;

    let entries = cache_everything(&env).await;
    let key = |tag: &str| entries.iter().find(|(t, _)| t == tag).unwrap().1.clone();
    let dir = tempfile::tempdir().unwrap();
    let copy = dir.path().join("copy.sql");
    std::fs::write(
        &copy,
        format!("COPY products (id, client_id, name) FROM stdin;\n{P3}\t{C2}\tcopied\n\\.\n"),
    )
    .unwrap();
    env.psql(&["-f", copy.to_str().unwrap()]);
    env.wait_gone(&[
        key(&format!("products:client:{C2}")),
        key(&format!("products:id:{P3}")),
    ])
    .await;
    env.barrier().await;
    env.assert_present(&[key(&format!("products:client:{C1}"))])
        .await;

    let entries = cache_everything(&env).await;
    let key = |tag: &str| entries.iter().find(|(t, _)| t == tag).unwrap().1.clone();
    let migration = dir.path().join("migration.sql");
    std::fs::write(
        &migration,
        format!(
            "BEGIN;\n\
             UPDATE clients SET name = 'renamed' WHERE id = '{C1}';\n\
             UPDATE modules SET content = 'v2' WHERE product_id = '{P2}';\n\
             DELETE FROM job_readiness_expert_sessions WHERE id = '{S2}';\n\
             COMMIT;\n"
        ),
    )
    .unwrap();
    env.psql(&["-f", migration.to_str().unwrap()]);
    env.wait_gone(&[
        key(&format!("client_configs:id:{C1}")),
        key(&format!("module_content:id:{M2}")),
        key(&format!("expert_sessions:id:{S2}")),
    ])
    .await;
    env.barrier().await;
    env.assert_present(&[
        key(&format!("client_configs:id:{C2}")),
        key(&format!("module_content:id:{M1}")),
        key(&format!("expert_sessions:id:{S1}")),
    ])
    .await;
}

/// IDs containing glob metacharacters or colons remove no other key, through tags or key
/// patterns; a NULL value drops only the tag that needs it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_ids_remove_no_other_key() {
    let config = r#"
[[tables]]
table = "hostile"
tags = ["h:{id}", "hg:{grp}"]
keys = ["{prefix}hk:{id}:*"]
"#;
    let env = Env::bare(Delivery::Notify, config).await;
    env.sql("CREATE TABLE hostile (id text PRIMARY KEY, grp text)")
        .await;
    env.migrate().await;
    let hostile = ["a*", "a?", "[ab]", "a\\", "x:y", "a]"];
    // (A pattern's trailing `*` matches any suffix, so `hk:x:y:*` also covers a key
    // `hk:x:y:z:1`; that is the operator's pattern, not a value widening it.)
    let bystanders = ["a", "ab", "aX", "b", "x", "y", "a\\\\"];
    for id in hostile.iter().chain(&bystanders) {
        env.sql(&format!(
            "INSERT INTO hostile (id, grp) VALUES ('{}', 'g')",
            id.replace('\'', "''")
        ))
        .await;
    }
    let _daemon = env.start_daemon().await;
    for id in hostile {
        let mut doomed = Vec::new();
        let mut kept = Vec::new();
        for other in hostile.iter().chain(&bystanders) {
            let tag_entry = env
                .cache(&format!("by-tag:{other}"), &[&format!("h:{other}")])
                .await;
            let pattern_entry = env.cache(&format!("hk:{other}:1"), &[]).await;
            if *other == id {
                doomed.extend([tag_entry, pattern_entry]);
            } else {
                kept.extend([tag_entry, pattern_entry]);
            }
        }
        let null_group = env.cache("group-null", &["hg:"]).await;
        kept.push(null_group);
        env.sql(&format!(
            "UPDATE hostile SET grp = NULL WHERE id = '{}'",
            id.replace('\'', "''")
        ))
        .await;
        env.barrier().await;
        for key in &doomed {
            assert!(!env.exists(key).await, "{id}: {key} should be gone");
        }
        env.assert_present(&kept).await;
        env.sql(&format!(
            "UPDATE hostile SET grp = 'g' WHERE id = '{}'",
            id.replace('\'', "''")
        ))
        .await;
        env.barrier().await;
    }
}

/// Malformed events that carry evictd's signature (a trigger of another version, a bug) are
/// logged with their reason and skipped; the next valid event works.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_notifications_are_skipped() {
    let env = Env::new(Delivery::Notify).await;
    env.sql(&seed_sql()).await;
    let daemon = env.start_daemon().await;
    let key = env.signing_key().await;
    let bad = [
        "not json at all",
        r#"{"v":1,"op":"INSERT","table":"public.nope","cols":["id"],"rows":[["x"]]}"#,
        r#"{"v":9,"op":"TAGS","tags":["products:all"]}"#,
        r#"{"v":1,"op":"UPDATE","table":"public.products","cols":["id"],"rows":[["a","b"]]}"#,
    ];
    for payload in bad {
        env.sql(&format!(
            "SELECT pg_notify('cache_invalidation', '{}')",
            key.sign(payload)
        ))
        .await;
    }
    check(
        &env,
        &format!("UPDATE products SET name = 'after' WHERE id = '{P2}'"),
        &tags(&[
            "products:all",
            &format!("products:client:{C2}"),
            &format!("products:id:{P2}"),
        ]),
    )
    .await;
    daemon.wait_log_count("event skipped", bad.len()).await;
    let log = daemon.log();
    assert!(log.contains("not evictd JSON"), "{log}");
    assert!(log.contains("public.nope"), "{log}");
    assert!(log.contains("version 9"), "{log}");
}

/// One DETACH call over tags of every kind — small sets, sets over the member budget (detached
/// and drained), a sorted-set index, a missing tag — removes exactly their members, leaves no
/// drain key behind, and stamps every tag; an entry of another tag stays.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_call_over_small_big_sorted_and_missing_tags() {
    let env = Env::with_config(Delivery::Outbox, "drain_chunk = 50\n").await;
    let mut conn = env.redis.clone();
    let mut doomed = Vec::new();
    let mut fill = async |tag: &str, members: usize, sorted: bool| {
        let keys: Vec<String> = (0..members)
            .map(|i| format!("{}{tag}:{i}", env.prefix))
            .collect();
        let mut pipe = redis::pipe();
        for key in &keys {
            pipe.cmd("SET").arg(key).arg("v").ignore();
            let index = format!("{}tag:{tag}", env.prefix);
            if sorted {
                pipe.cmd("ZADD")
                    .arg(index)
                    .arg(4_000_000_000u64)
                    .arg(key)
                    .ignore();
            } else {
                pipe.cmd("SADD").arg(index).arg(key).ignore();
            }
        }
        let () = pipe.query_async(&mut conn).await.unwrap();
        doomed.extend(keys);
    };
    // In argument order: the big sets sit after small ones and between them.
    fill("mix:a", 3, false).await;
    fill("mix:b", 120, false).await;
    fill("mix:d", 5, true).await;
    fill("mix:e", 200, false).await;
    fill("mix:f", 40, false).await;
    let kept = env.cache("kept", &["mix:other"]).await;
    let tags = ["mix:a", "mix:b", "mix:c", "mix:d", "mix:e", "mix:f"];
    let mut args = vec!["invalidate"];
    args.extend(tags);

    let output = env.run_cli(&args);
    assert!(output.status.success(), "{}", text(&output));
    assert_eq!(
        String::from_utf8_lossy(&output.stdout).trim(),
        format!("invalidated 6 tags, {} keys", doomed.len())
    );
    let left: u64 = conn.exists(&doomed).await.unwrap();
    assert_eq!(left, 0, "entries of invalidated tags left");
    let keys = env.keys().await;
    let index = format!("{}tag:mix:", env.prefix);
    let left_behind: Vec<&String> = keys
        .iter()
        .filter(|k| k.contains(":drain:") || k.starts_with(&index) && !k.ends_with(":other"))
        .collect();
    assert!(left_behind.is_empty(), "{left_behind:?}");
    env.assert_present(&[kept]).await;
    for tag in tags {
        let stamp: Option<String> = conn
            .get(format!("{}tagts:{tag}", env.prefix))
            .await
            .unwrap();
        assert!(stamp.is_some(), "no tagts for {tag}");
    }
}

/// A tag with 200,000 members is invalidated completely, in bounded chunks, and an entry tagged
/// while that runs survives it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn big_tag_is_drained_and_late_entries_survive() {
    let env = Env::with_config(Delivery::Outbox, "drain_chunk = 100\n").await;
    env.sql(&seed_sql()).await;
    let _daemon = env.start_daemon().await;
    let tag_key = format!("{}tag:products:id:{P1}", env.prefix);
    let mut conn = env.redis.clone();
    let members: Vec<String> = (0..200_000)
        .map(|i| format!("{}big:{i}", env.prefix))
        .collect();
    for chunk in members.chunks(10_000) {
        let mut pipe = redis::pipe();
        for key in chunk {
            pipe.cmd("SET").arg(key).arg("v").ignore();
        }
        pipe.cmd("SADD").arg(&tag_key).arg(chunk).ignore();
        let () = pipe.query_async(&mut conn).await.unwrap();
    }
    let before_ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64;

    env.sql(&format!(
        "UPDATE products SET name = 'big' WHERE id = '{P1}'"
    ))
    .await;
    // The tag set is detached (renamed away) first; tag a new entry as soon as that happened.
    let start = std::time::Instant::now();
    loop {
        let exists: bool = conn.exists(&tag_key).await.unwrap();
        if !exists {
            break;
        }
        assert!(
            start.elapsed() < support::DEADLINE,
            "tag set never detached"
        );
        tokio::task::yield_now().await;
    }
    let late = env
        .cache("late-entry", &[&format!("products:id:{P1}")])
        .await;
    let still_cached: u64 = conn.exists(&members).await.unwrap();
    assert!(
        still_cached > 0,
        "the drain finished before the late entry was written"
    );

    env.barrier().await;
    let start = std::time::Instant::now();
    loop {
        let left: Vec<String> = env
            .keys()
            .await
            .into_iter()
            .filter(|k| k.starts_with(&format!("{}big:", env.prefix)) || k.contains(":drain:"))
            .collect();
        if left.is_empty() {
            break;
        }
        assert!(
            start.elapsed() < support::DEADLINE,
            "{} keys left",
            left.len()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    env.assert_present(std::slice::from_ref(&late)).await;
    let members: Vec<String> = conn.smembers(&tag_key).await.unwrap();
    assert_eq!(members, vec![late]);

    let stamp: String = conn
        .get(format!("{}tagts:products:id:{P1}", env.prefix))
        .await
        .unwrap();
    let stamp: i64 = stamp.parse().unwrap();
    let after_ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64;
    assert!(
        (before_ms - 1000..=after_ms + 1000).contains(&stamp),
        "tagts {stamp} not within [{before_ms}, {after_ms}]"
    );
    let ttl: i64 = conn
        .pttl(format!("{}tagts:products:id:{P1}", env.prefix))
        .await
        .unwrap();
    assert!(ttl > 0 && ttl <= 86_400_000, "tagts ttl {ttl}");
}

/// In notify mode the daemon cannot know what changed while nobody listened: at start it
/// invalidates every configured table table-wide, and leaves other keys alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn notify_mode_resyncs_at_start() {
    let env = Env::new(Delivery::Notify).await;
    let stale = env
        .cache("stale", &[&format!("products:client:{C1}")])
        .await;
    let all = env.cache("all-clients", &["client_configs:all"]).await;
    let pattern_free = env.cache("unrelated", &["unrelated:thing"]).await;
    let untagged = env.cache("untagged", &[]).await;
    let daemon = env.start_daemon().await;
    let (status, _) = support::http_get(&daemon.http_addr(), "/readyz");
    assert_eq!(status, 200);
    let (status, metrics) = support::http_get(&daemon.http_addr(), "/metrics");
    assert_eq!(status, 200);
    assert!(metrics.contains("evictd_ready 1"), "{metrics}");
    // Readiness comes after the start-up work.
    assert!(!env.exists(&stale).await);
    assert!(!env.exists(&all).await);
    env.assert_present(&[pattern_free, untagged]).await;
}

/// The repository's `sql/evictd.sql` is exactly what `evictd sql` prints for the defaults.
#[test]
fn sql_file_matches_generated_ddl() {
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_evictd"))
        .arg("sql")
        .env_remove("EVICTD_CONFIG")
        .env_remove("EVICTD_DELIVERY")
        .env_remove("EVICTD_CHANNEL")
        .output()
        .unwrap();
    assert!(output.status.success());
    let generated = String::from_utf8(output.stdout).unwrap();
    let committed = std::fs::read_to_string(repo_file("sql/evictd.sql")).unwrap_or_default();
    assert!(
        generated == committed,
        "sql/evictd.sql is out of date: run `cargo run -- sql > sql/evictd.sql`"
    );
}

/// A sorted-set index (scored by expiry) is accepted like a set, and bigint ids render in
/// decimal, never through a float (2^53 + 1 would round).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sorted_set_index_and_bigint_ids() {
    let config = "[[tables]]\ntable = \"ledger\"\ntags = [\"ledger:{id}\"]\n";
    let env = Env::bare(Delivery::Outbox, config).await;
    env.sql("CREATE TABLE ledger (id bigint PRIMARY KEY, amount bigint)")
        .await;
    env.sql("INSERT INTO ledger VALUES (9007199254740993, 1), (9007199254740992, 1)")
        .await;
    env.migrate().await;
    let _daemon = env.start_daemon().await;
    let mut conn = env.redis.clone();
    let mut doomed = Vec::new();
    for i in 0..1_500 {
        let key = env.cache(&format!("ledger-entry:{i}"), &[]).await;
        let () = conn
            .zadd(
                format!("{}tag:ledger:9007199254740993", env.prefix),
                &key,
                1_900_000_000 + i,
            )
            .await
            .unwrap();
        doomed.push(key);
    }
    let neighbour = env.cache("neighbour", &["ledger:9007199254740992"]).await;
    env.sql("UPDATE ledger SET amount = 2 WHERE id = 9007199254740993")
        .await;
    env.wait_gone(&doomed).await;
    env.barrier().await;
    env.assert_present(&[neighbour]).await;
    let left: u64 = conn
        .exists(format!("{}tag:ledger:9007199254740993", env.prefix))
        .await
        .unwrap();
    assert_eq!(left, 0, "the sorted-set index itself is removed");
}

/// With `publish_channel`, each batch's tags are PUBLISHed as JSON for in-process caches.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalidated_tags_are_published() {
    let env = Env::with_config(
        Delivery::Outbox,
        "publish_channel = \"{prefix}invalidated\"\n",
    )
    .await;
    env.sql(&seed_sql()).await;
    let client = redis::Client::open(env.redis_url.clone()).unwrap();
    let mut pubsub = client.get_async_pubsub().await.unwrap();
    pubsub
        .subscribe(format!("{}invalidated", env.prefix))
        .await
        .unwrap();
    let _daemon = env.start_daemon().await;
    env.sql(&format!("UPDATE clients SET name = 'p' WHERE id = '{C1}'"))
        .await;
    let mut messages = pubsub.on_message();
    let expected = format!("client_configs:id:{C1}");
    loop {
        let message = tokio::time::timeout(support::DEADLINE, messages.next())
            .await
            .expect("a published message")
            .unwrap();
        let payload: String = message.get_payload().unwrap();
        let json: serde_json::Value = serde_json::from_str(&payload).unwrap();
        let tags: Vec<&str> = json["tags"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|t| t.as_str())
            .collect();
        if tags.contains(&expected.as_str()) {
            assert!(tags.contains(&"client_configs:all"), "{payload}");
            break;
        }
    }
}

/// A partitioned table (two levels), with the rule naming the parent, in every delivery:
/// writes through the parent and straight to a partition, UPDATEs that move a row to another
/// partition (its old and new values both invalidated), and a TRUNCATE of one partition.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partitioned_tables_in_every_delivery() {
    const RULES: &str = r#"
[[tables]]
table = "events"
tags = ["events:region:{region}", "events:client:{client_id}", "events:id:{id}"]
"#;
    const UNIVERSE: &[&str] = &[
        "events:region:a",
        "events:region:b",
        "events:client:c1",
        "events:client:c2",
        "events:client:c3",
        "events:client:c4",
        "events:client:c5",
        "events:id:1",
        "events:id:2",
        "events:id:3",
        "events:id:120",
        "events:id:150",
        "bystander:tag",
    ];
    for delivery in [Delivery::Notify, Delivery::Outbox, Delivery::Logical] {
        let env = Env::bare(delivery, RULES).await;
        env.sql(
            "CREATE TABLE events (id int, region text, client_id text, note text,
                                  PRIMARY KEY (id, region)) PARTITION BY LIST (region);
             CREATE TABLE events_a PARTITION OF events FOR VALUES IN ('a');
             CREATE TABLE events_b PARTITION OF events FOR VALUES IN ('b') PARTITION BY RANGE (id);
             CREATE TABLE events_b_low PARTITION OF events_b FOR VALUES FROM (0) TO (100);
             CREATE TABLE events_b_high PARTITION OF events_b FOR VALUES FROM (100) TO (MAXVALUE);
             INSERT INTO events VALUES (1, 'a', 'c1'), (2, 'b', 'c2'), (150, 'b', 'c4');",
        )
        .await;
        env.migrate().await;
        let _daemon = env.start_daemon().await;
        let cases: [(&str, &[&str]); 7] = [
            (
                "UPDATE events SET region = 'b', client_id = 'c2' WHERE id = 1",
                &[
                    "events:region:a",
                    "events:region:b",
                    "events:client:c1",
                    "events:client:c2",
                    "events:id:1",
                ],
            ),
            (
                "UPDATE events_b_low SET client_id = 'c3' WHERE id = 2",
                &[
                    "events:region:b",
                    "events:client:c2",
                    "events:client:c3",
                    "events:id:2",
                ],
            ),
            (
                "INSERT INTO events_a VALUES (3, 'a', 'c5')",
                &["events:region:a", "events:client:c5", "events:id:3"],
            ),
            (
                "DELETE FROM events_a WHERE id = 3",
                &["events:region:a", "events:client:c5", "events:id:3"],
            ),
            (
                "UPDATE events SET id = 120 WHERE id = 2",
                &[
                    "events:region:b",
                    "events:client:c3",
                    "events:id:2",
                    "events:id:120",
                ],
            ),
            (
                "DELETE FROM events WHERE id = 150",
                &["events:region:b", "events:client:c4", "events:id:150"],
            ),
            ("TRUNCATE events_b_high", &UNIVERSE[..12]),
        ];
        for (sql, gone) in cases {
            env.check_gone(UNIVERSE, sql, gone).await;
        }
    }
}

/// A tag key that is not a set (a string, a hash, written by something else) cannot index
/// anything: it is left alone and reported — in the log by name, as an error in the metrics,
/// and by `doctor` — not counted as invalidated; the statement's other tags go as usual.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tag_keys_of_the_wrong_type_are_reported() {
    let env = Env::new(Delivery::Outbox).await;
    env.sql(&seed_sql()).await;
    let daemon = env.start_daemon().await;
    env.barrier().await;
    let string_tag = format!("{}tag:products:all", env.prefix);
    let hash_tag = format!("{}tag:products:id:{P1}", env.prefix);
    let mut conn = env.redis.clone();
    let () = conn.set(&string_tag, "not a set").await.unwrap();
    let () = conn.hset(&hash_tag, "field", "value").await.unwrap();
    let client_entry = env
        .cache("client-list", &[&format!("products:client:{C1}")])
        .await;
    env.sql(&format!("UPDATE products SET name = 'x' WHERE id = '{P1}'"))
        .await;
    env.wait_gone(&[client_entry]).await;
    daemon.wait_log("neither a set nor a sorted set").await;
    let log = daemon.log();
    assert!(log.contains("products:all"), "{log}");
    assert!(env.exists(&string_tag).await && env.exists(&hash_tag).await);
    let (_, metrics) = support::http_get(&daemon.http_addr(), "/metrics");
    assert!(
        metrics.contains("evictd_errors_total{kind=\"tag_type\"} 2"),
        "{metrics}"
    );
    let doctor = env.run_cli(&["doctor"]);
    let said = text(&doctor);
    assert_eq!(doctor.status.code(), Some(1), "{said}");
    assert!(
        said.contains("FAIL tag-types") && said.contains(&string_tag) && said.contains(&hash_tag),
        "{said}"
    );
}

/// Every key under this test's prefix matching `pattern`, by Redis' own matching.
async fn redis_matches(env: &Env, pattern: &str) -> BTreeSet<String> {
    let mut conn = env.redis.clone();
    let mut iter: redis::AsyncIter<String> = conn.scan_match(pattern).await.unwrap();
    let mut found = BTreeSet::new();
    while let Some(key) = iter.next_item().await {
        found.insert(key.unwrap());
    }
    found
}

/// The matcher that lets one SCAN pass serve many patterns agrees with Redis' own, on keys and
/// patterns full of metacharacters, classes, ranges and escapes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn glob_matching_agrees_with_redis() {
    let env = Env::new(Delivery::Outbox).await;
    let values = [
        "a", "b", "*", "?", "[", "]", "\\", "a*b", "[ab]", "^", "-", "a-z", "x]y", "é", "",
    ];
    let mut keys = Vec::new();
    let mut pipe = redis::pipe();
    for first in values {
        for second in values {
            let key = format!("{}k:{first}:{second}", env.prefix);
            pipe.cmd("SET").arg(&key).arg(1).ignore();
            keys.push(key);
        }
    }
    let () = pipe.query_async(&mut env.redis.clone()).await.unwrap();
    let patterns = [
        "*", "a*", "*b", "?:?", "[ab]*", "[^a]*", "[a-c]*", "\\**", "\\[*", "*\\]*", "[\\]]*",
        "[*", "a[", "*:*", "[z-a]:*", "*\\\\*", "[^\\]]*", "?", "*:", ":", "*[-]*", "[a-]*", "*é*",
        "\\", "[\\", "a\\*b:*", "*?*?*?*",
    ];
    for pattern in patterns {
        let full = format!("{}k:{pattern}", env.prefix);
        let ours: BTreeSet<String> = keys
            .iter()
            .filter(|k| evictd::core::glob::matches(full.as_bytes(), k.as_bytes()))
            .cloned()
            .collect();
        assert_eq!(ours, redis_matches(&env, &full).await, "pattern {pattern}");
    }
}

/// The key patterns of many rows go to Redis as one pass over the keyspace, not a pass each:
/// a 500-row UPDATE whose rule has a `keys` pattern, over 20,000 other keys, removes exactly
/// the matching keys with about one pass's worth of SCAN calls (one pass per pattern would
/// be ~500 times that).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn key_patterns_of_a_statement_share_one_scan_pass() {
    let env = Env::isolated(
        Delivery::Outbox,
        r#"
[[tables]]
table = "products"
tags = ["products:id:{id}"]
keys = ["{prefix}v1:product:{id}:*"]
"#,
        &[],
    )
    .await;
    env.sql("INSERT INTO products (name) SELECT 'p' FROM generate_series(1, 500)")
        .await;
    let _daemon = env.start_daemon().await;
    env.barrier().await;
    let ids: Vec<String> = env
        .pg
        .query("SELECT id::text FROM products", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    let mut conn = env.redis.clone();
    let mut doomed = Vec::new();
    let mut pipe = redis::pipe();
    for id in &ids {
        for part in ["a", "b"] {
            let key = format!("{}v1:product:{id}:{part}", env.prefix);
            pipe.cmd("SET").arg(&key).arg(1).ignore();
            doomed.push(key);
        }
    }
    let fillers: Vec<String> = (0..20_000)
        .map(|i| format!("{}filler:{i}", env.prefix))
        .collect();
    for key in &fillers {
        pipe.cmd("SET").arg(key).arg(1).ignore();
    }
    let bystander = format!("{}v1:product:other:a", env.prefix);
    pipe.cmd("SET").arg(&bystander).arg(1).ignore();
    let () = pipe.query_async(&mut conn).await.unwrap();
    let () = redis::cmd("CONFIG")
        .arg("RESETSTAT")
        .query_async(&mut conn)
        .await
        .unwrap();
    env.sql("UPDATE products SET name = 'renamed'").await;
    env.wait_gone(&doomed).await;
    env.barrier().await;
    let stats: String = redis::cmd("INFO")
        .arg("commandstats")
        .query_async(&mut conn)
        .await
        .unwrap();
    let scans: u64 = stats
        .lines()
        .find_map(|l| l.strip_prefix("cmdstat_scan:calls="))
        .and_then(|rest| rest.split(',').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    assert!(
        (1..200).contains(&scans),
        "{scans} SCAN calls for 500 patterns over 21,000 keys"
    );
    assert_eq!(env.count_existing(&fillers).await, fillers.len() as u64);
    env.assert_present(&[bystander]).await;
}

/// A restore (Supabase's procedure, `pg_restore --disable-triggers`) and a logical-replication
/// subscriber's apply worker write with `session_replication_role = replica`, under which
/// ordinary triggers stay silent: with the default firing a product moved to another client
/// that way leaves the old client's lists stale in every delivery (`logical` reads the move
/// from the WAL, but the old client only from its old-row trigger). With
/// `trigger_firing = "always"` the triggers fire there too and nothing stays stale.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn triggers_fire_under_the_replica_role_only_when_always() {
    let moved = format!(
        "SET session_replication_role = replica;
         UPDATE products SET client_id = '{C2}' WHERE id = '{P1}';
         RESET session_replication_role;"
    );
    for delivery in [Delivery::Outbox, Delivery::Notify, Delivery::Logical] {
        for (config, fires) in [("", false), ("trigger_firing = \"always\"\n", true)] {
            let env = Env::with_config(delivery, config).await;
            env.sql(&seed_sql()).await;
            let daemon = env.start_daemon().await;
            let old_client = env
                .cache("old-client", &[&format!("products:client:{C1}")])
                .await;
            env.sql(&moved).await;
            env.barrier().await;
            assert_eq!(
                !env.exists(&old_client).await,
                fires,
                "{delivery:?} {config:?}: the old client's entry {}",
                if fires {
                    "stayed"
                } else {
                    "went, though the triggers should be silent"
                }
            );
            let enabled: Vec<String> = env
                .pg
                .query(
                    "SELECT DISTINCT tgenabled::text FROM pg_trigger WHERE tgname LIKE 'evictd\\_%'",
                    &[],
                )
                .await
                .unwrap()
                .iter()
                .map(|r| r.get(0))
                .collect();
            assert_eq!(
                enabled,
                [if fires { "A" } else { "O" }],
                "{delivery:?} {config:?}"
            );
            drop(daemon);
        }
    }
}
