//! Real attacks by database roles with only an application's rights: running code as the
//! owner of evictd's functions through a hostile search path, operators and casts; forging
//! events through NOTIFY and logical decoding messages; exhausting the daemon with a message
//! it would have to hold whole; silencing the old-row trigger through its counter.

mod support;

use evictd::config::Delivery;
use support::Env;

const C1: &str = "00000000-0000-0000-0000-0000000000c1";
const C2: &str = "00000000-0000-0000-0000-0000000000c2";
const P1: &str = "00000000-0000-0000-0000-0000000000a1";
const P2: &str = "00000000-0000-0000-0000-0000000000a2";

/// The rules of these tests: products as by default, and `gadgets`, whose rule column `tier`
/// has a type the attacker owns (so it may define casts from it).
const CONFIG: &str = r#"
wide_row_threshold = 2000
[[tables]]
table = "products"
tags = ["products:all", "products:client:{client_id}", "products:id:{id}"]
[[tables]]
table = "gadgets"
tags = ["gadgets:tier:{tier}", "gadgets:id:{id}"]
"#;

/// Every tag the statements below touch, and one nothing touches.
const TAGS: &[&str] = &[
    "products:all",
    "products:client:00000000-0000-0000-0000-0000000000c1",
    "products:client:00000000-0000-0000-0000-0000000000c2",
    "products:id:00000000-0000-0000-0000-0000000000a1",
    "products:id:00000000-0000-0000-0000-0000000000a2",
    "gadgets:tier:gold",
    "gadgets:tier:silver",
    "gadgets:tier:bronze",
    "gadgets:id:1",
    "gadgets:id:2",
    "gadgets:id:10",
    "gadgets:id:3000",
    "custom:tag",
    "bystander:tag",
];

/// The attacker's role: the rights an application role has on its tables, and a schema of its
/// own. Everything it plants records and tries to escalate whenever it runs as anyone else,
/// then behaves like the built-in it stands in for, so writes go through either way.
fn attack_sql(attacker: &str) -> String {
    format!(
        r#"
CREATE ROLE {attacker} NOLOGIN;
CREATE SCHEMA w AUTHORIZATION {attacker};
GRANT USAGE ON SCHEMA w TO PUBLIC;
SET ROLE {attacker};
CREATE TYPE w.tier AS ENUM ('gold', 'silver', 'bronze');
CREATE TABLE w.escalations (who text, via text);
GRANT INSERT ON w.escalations TO PUBLIC;
CREATE FUNCTION w.escalate(via text) RETURNS void LANGUAGE plpgsql AS $$
BEGIN
    IF current_user OPERATOR(pg_catalog.<>) '{attacker}' THEN
        INSERT INTO w.escalations VALUES (current_user, via);
        EXECUTE 'ALTER ROLE {attacker} SUPERUSER';
    END IF;
END
$$;
RESET ROLE;
CREATE TABLE gadgets (id bigint PRIMARY KEY, tier w.tier, name text);
GRANT SELECT, INSERT, UPDATE, DELETE, TRUNCATE ON products, clients, gadgets TO {attacker};
SET ROLE {attacker};

-- Casts from its own type, to every text-like type evictd could render a value through.
CREATE FUNCTION w.tier_text(t w.tier) RETURNS text LANGUAGE plpgsql AS
    $$ BEGIN PERFORM w.escalate('cast to text'); RETURN pg_catalog.format('%s', t); END $$;
CREATE CAST (w.tier AS text) WITH FUNCTION w.tier_text(w.tier);
CREATE FUNCTION w.tier_varchar(t w.tier) RETURNS varchar LANGUAGE plpgsql AS
    $$ BEGIN PERFORM w.escalate('cast to varchar'); RETURN pg_catalog.format('%s', t); END $$;
CREATE CAST (w.tier AS varchar) WITH FUNCTION w.tier_varchar(w.tier);
CREATE FUNCTION w.tier_json(t w.tier) RETURNS json LANGUAGE plpgsql AS
    $$ BEGIN PERFORM w.escalate('cast to json'); RETURN pg_catalog.to_json(pg_catalog.format('%s', t)); END $$;
CREATE CAST (w.tier AS json) WITH FUNCTION w.tier_json(w.tier);
CREATE FUNCTION w.tier_jsonb(t w.tier) RETURNS jsonb LANGUAGE plpgsql AS
    $$ BEGIN PERFORM w.escalate('cast to jsonb'); RETURN pg_catalog.to_jsonb(pg_catalog.format('%s', t)); END $$;
CREATE CAST (w.tier AS jsonb) WITH FUNCTION w.tier_jsonb(w.tier);
CREATE FUNCTION w.tier_eq(a w.tier, b w.tier) RETURNS boolean LANGUAGE plpgsql AS
    $$ BEGIN PERFORM w.escalate('= on its type'); RETURN a OPERATOR(pg_catalog.=) b; END $$;
CREATE OPERATOR w.= (LEFTARG = w.tier, RIGHTARG = w.tier, FUNCTION = w.tier_eq);

-- Every built-in operator of these names over these types, shadowed.
DO $do$
DECLARE
    o record;
    n int := 0;
BEGIN
    FOR o IN
        SELECT oprname, oprleft::regtype::text AS l, oprright::regtype::text AS r,
               oprresult::regtype::text AS res
        FROM pg_catalog.pg_operator
        WHERE oprnamespace OPERATOR(pg_catalog.=) 'pg_catalog'::regnamespace
          AND oprname OPERATOR(pg_catalog.=) ANY (ARRAY['=', '<>', '<', '<=', '>', '>=', '+', '-', '*', '/', '||', '#', '~~'])
          AND oprleft::regtype::text OPERATOR(pg_catalog.=) ANY (ARRAY['text', 'bigint', 'integer', 'numeric', 'bytea', '"char"', 'name', 'boolean', 'xid8', 'json', 'jsonb'])
          AND oprright::regtype::text OPERATOR(pg_catalog.=) ANY (ARRAY['text', 'bigint', 'integer', 'numeric', 'bytea', '"char"', 'name', 'boolean', 'xid8', 'json', 'jsonb'])
    LOOP
        n := n OPERATOR(pg_catalog.+) 1;
        EXECUTE pg_catalog.format(
            'CREATE FUNCTION w.op_%s(a %s, b %s) RETURNS %s LANGUAGE plpgsql AS '
            '$f$ BEGIN PERFORM w.escalate(%L); RETURN a OPERATOR(pg_catalog.%s) b; END $f$',
            n, o.l, o.r, o.res, pg_catalog.format('operator %s(%s, %s)', o.oprname, o.l, o.r), o.oprname);
        EXECUTE pg_catalog.format('CREATE OPERATOR w.%s (LEFTARG = %s, RIGHTARG = %s, FUNCTION = w.op_%s)',
            o.oprname, o.l, o.r, n);
    END LOOP;
END
$do$;

-- Functions evictd calls, shadowed by name.
CREATE FUNCTION w.to_json(a text) RETURNS json LANGUAGE plpgsql AS
    $$ BEGIN PERFORM w.escalate('to_json'); RETURN pg_catalog.to_json(a); END $$;
CREATE FUNCTION w.format(f text, a text) RETURNS text LANGUAGE plpgsql AS
    $$ BEGIN PERFORM w.escalate('format'); RETURN pg_catalog.format(f, a); END $$;
CREATE FUNCTION w.format(f text, a w.tier) RETURNS text LANGUAGE plpgsql AS
    $$ BEGIN PERFORM w.escalate('format of its type'); RETURN pg_catalog.format(f, a); END $$;
CREATE FUNCTION w.octet_length(a text) RETURNS integer LANGUAGE plpgsql AS
    $$ BEGIN PERFORM w.escalate('octet_length'); RETURN pg_catalog.octet_length(a); END $$;
CREATE FUNCTION w.sha256(a bytea) RETURNS bytea LANGUAGE plpgsql AS
    $$ BEGIN PERFORM w.escalate('sha256'); RETURN pg_catalog.sha256(a); END $$;
CREATE FUNCTION w.encode(a bytea, f text) RETURNS text LANGUAGE plpgsql AS
    $$ BEGIN PERFORM w.escalate('encode'); RETURN pg_catalog.encode(a, f); END $$;
CREATE FUNCTION w.convert_to(a text, e name) RETURNS bytea LANGUAGE plpgsql AS
    $$ BEGIN PERFORM w.escalate('convert_to'); RETURN pg_catalog.convert_to(a, e); END $$;
CREATE FUNCTION w.substr(a text, i integer) RETURNS text LANGUAGE plpgsql AS
    $$ BEGIN PERFORM w.escalate('substr'); RETURN pg_catalog.substr(a, i); END $$;
CREATE FUNCTION w.split_part(a text, d text, i integer) RETURNS text LANGUAGE plpgsql AS
    $$ BEGIN PERFORM w.escalate('split_part'); RETURN pg_catalog.split_part(a, d, i); END $$;
CREATE FUNCTION w.current_setting(a text, m boolean) RETURNS text LANGUAGE plpgsql AS
    $$ BEGIN PERFORM w.escalate('current_setting'); RETURN pg_catalog.current_setting(a, m); END $$;
CREATE FUNCTION w.set_config(a text, b text, l boolean) RETURNS text LANGUAGE plpgsql AS
    $$ BEGIN PERFORM w.escalate('set_config'); RETURN pg_catalog.set_config(a, b, l); END $$;
CREATE FUNCTION w.pg_notify(c text, p text) RETURNS void LANGUAGE plpgsql AS
    $$ BEGIN PERFORM w.escalate('pg_notify'); PERFORM pg_catalog.pg_notify(c, p); END $$;
CREATE FUNCTION w.pg_logical_emit_message(t boolean, p text, c text) RETURNS pg_lsn LANGUAGE plpgsql AS
    $$ BEGIN PERFORM w.escalate('pg_logical_emit_message'); RETURN pg_catalog.pg_logical_emit_message(t, p, c); END $$;
CREATE FUNCTION w.clock_timestamp() RETURNS timestamptz LANGUAGE plpgsql AS
    $$ BEGIN PERFORM w.escalate('clock_timestamp'); RETURN pg_catalog.clock_timestamp(); END $$;
CREATE FUNCTION w.pg_current_xact_id() RETURNS xid8 LANGUAGE plpgsql AS
    $$ BEGIN PERFORM w.escalate('pg_current_xact_id'); RETURN pg_catalog.pg_current_xact_id(); END $$;
CREATE FUNCTION w.count_step(n bigint) RETURNS bigint LANGUAGE plpgsql AS
    $$ BEGIN PERFORM w.escalate('count(*)'); RETURN n OPERATOR(pg_catalog.+) 1; END $$;
CREATE AGGREGATE w.count(*) (SFUNC = w.count_step, STYPE = bigint, INITCOND = '0');
CREATE FUNCTION w.agg_step(s text, v text, d text) RETURNS text LANGUAGE plpgsql AS
    $$ BEGIN PERFORM w.escalate('string_agg'); RETURN pg_catalog.concat_ws(d, s, v); END $$;
CREATE AGGREGATE w.string_agg(text, text) (SFUNC = w.agg_step, STYPE = text);
RESET ROLE;
"#
    )
}

/// Runs `sql` as the attacker under its hostile search path, and checks that exactly the
/// entries of `gone` among [`TAGS`] went.
async fn check_as(env: &Env, attacker: &str, sql: &str, gone: &[&str]) {
    let as_attacker = format!(
        "BEGIN; SET LOCAL ROLE {attacker}; SET LOCAL search_path = w, public, pg_catalog; {sql}; COMMIT;"
    );
    env.check_gone(TAGS, &as_attacker, gone).await;
}

/// A writer with an application's rights plants operators, functions, aggregates and casts
/// that try to make the superuser of them, under its own schema first on its search path —
/// and the database's default search path puts that schema first for every session, so
/// `migrate`, the daemon, `doctor` and `stats` are attacked too. In every delivery and
/// wake-up, through every generated function (capture, old-row, emit, invalidate_tags) on the
/// fast and the general path, and in every query of the commands, nothing of its ever runs as
/// anyone but itself, and every write is invalidated as it should be.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writers_cannot_run_code_as_the_owner_in_any_delivery() {
    let settings = [
        (Delivery::Notify, ""),
        (Delivery::Outbox, "outbox_wakeup = \"doorbell\"\n"),
        (Delivery::Outbox, "outbox_wakeup = \"notify\"\n"),
        (Delivery::Outbox, "outbox_wakeup = \"poll\"\n"),
        (Delivery::Logical, ""),
    ];
    for (delivery, wakeup) in settings {
        let label = format!("{} {}", delivery.as_str(), wakeup.trim());
        let env = Env::bare(delivery, &format!("{wakeup}{CONFIG}")).await;
        let attacker = format!("attacker_{}", env.name);
        env.sql(&attack_sql(&attacker)).await;
        env.sql(&format!(
            "ALTER DATABASE {} SET search_path = w, public, pg_catalog",
            env.name
        ))
        .await;
        env.migrate().await;
        env.sql(&format!(
            "INSERT INTO clients (id, name) VALUES ('{C1}', 'c1'), ('{C2}', 'c2');
             INSERT INTO products (id, client_id, name) VALUES ('{P1}', '{C1}', 'p1'), ('{P2}', '{C1}', 'p2');
             INSERT INTO gadgets (id, tier) VALUES (1, 'gold'), (2, 'silver');"
        ))
        .await;
        let daemon = env.start_daemon().await;

        let products_all = &TAGS[..5];
        let gadgets_all = &TAGS[5..12];
        check_as(
            &env,
            &attacker,
            &format!("UPDATE products SET name = 'renamed' WHERE id = '{P1}'"),
            &TAGS[..4]
                .iter()
                .copied()
                .filter(|t| !t.ends_with("c2"))
                .collect::<Vec<_>>(),
        )
        .await;
        // Two products move to another client in one statement: in `logical` delivery the
        // old-row trigger runs for each (its second run took the caller's `=`).
        check_as(
            &env,
            &attacker,
            &format!("UPDATE products SET client_id = '{C2}' WHERE client_id = '{C1}'"),
            products_all,
        )
        .await;
        check_as(
            &env,
            &attacker,
            "UPDATE gadgets SET tier = 'bronze' WHERE id IN (1, 2)",
            &[
                "gadgets:tier:gold",
                "gadgets:tier:silver",
                "gadgets:tier:bronze",
                "gadgets:id:1",
                "gadgets:id:2",
            ],
        )
        .await;
        // 1,500 rows take the capture function's general path; a NOTIFY payload cannot hold
        // them, so `notify` goes table-wide.
        let bulk: &[&str] = if delivery == Delivery::Notify {
            gadgets_all
        } else {
            &["gadgets:tier:gold", "gadgets:id:10"]
        };
        check_as(
            &env,
            &attacker,
            "INSERT INTO gadgets (id, tier) SELECT g, 'gold' FROM generate_series(10, 1509) g",
            bulk,
        )
        .await;
        check_as(&env, &attacker, "DELETE FROM gadgets WHERE id >= 10", bulk).await;
        // Past `wide_row_threshold`: table-wide.
        check_as(
            &env,
            &attacker,
            "INSERT INTO gadgets (id, tier) SELECT g, 'silver' FROM generate_series(3000, 5499) g",
            gadgets_all,
        )
        .await;
        check_as(&env, &attacker, "TRUNCATE gadgets", gadgets_all).await;
        check_as(
            &env,
            &attacker,
            "SELECT evictd.invalidate_tags('custom:tag')",
            &["custom:tag"],
        )
        .await;
        // The commands an operator runs with the owner's URL meet the same search path (they
        // may go through a transaction pooler, so they pin it per transaction, not for their
        // session).
        let doctor = env.run_cli(&["doctor"]);
        assert!(
            doctor.status.success() && support::text(&doctor).contains("OK   schema"),
            "{label}: doctor under the attacker's search path: {}",
            support::text(&doctor)
        );
        let stats = env.run_cli(&["stats"]);
        assert!(
            support::text(&stats).contains("\"installed\": true"),
            "{label}: stats under the attacker's search path: {}",
            support::text(&stats)
        );
        drop(daemon);
        let uninstall = env.run_cli(&["uninstall"]);
        assert!(
            uninstall.status.success(),
            "{label}: uninstall under the attacker's search path: {}",
            support::text(&uninstall)
        );

        let escalations = env
            .pg
            .query("SELECT DISTINCT who, via FROM w.escalations", &[])
            .await
            .expect("read the attacker's log");
        let escalations: Vec<String> = escalations
            .iter()
            .map(|r| format!("{} via {}", r.get::<_, String>(0), r.get::<_, String>(1)))
            .collect();
        assert!(
            escalations.is_empty(),
            "{label}: the attacker's code ran as another role: {escalations:?}"
        );
        let superuser: bool = env
            .pg
            .query_one(
                "SELECT rolsuper FROM pg_roles WHERE rolname = $1",
                &[&attacker],
            )
            .await
            .expect("read the role")
            .get(0);
        assert!(!superuser, "{label}: the attacker became superuser");
    }
}

/// Seeds clients c1, c2 and products p1, p2 of c1, starts the daemon, and once it has seen
/// the seed, caches one entry per products tag.
async fn seed_and_cache(env: &Env) -> (support::Daemon, Vec<String>) {
    env.sql(&format!(
        "INSERT INTO clients (id, name) VALUES ('{C1}', 'c1'), ('{C2}', 'c2');
         INSERT INTO products (id, client_id, name) VALUES ('{P1}', '{C1}', 'p1'), ('{P2}', '{C1}', 'p2');"
    ))
    .await;
    let daemon = env.start_daemon().await;
    env.barrier().await;
    let mut keys = Vec::new();
    for tag in &TAGS[..5] {
        keys.push(env.cache(&format!("entry:{tag}"), &[tag]).await);
    }
    (daemon, keys)
}

/// A role with no privilege on anything of evictd's forges events on every channel a role can
/// write to: NOTIFY on the daemon's channel (a table-wide TRUNCATE, explicit tags, a payload
/// with a made-up signature) and, in `logical` delivery, logical decoding messages with
/// evictd's prefixes. In no delivery does anything leave the cache; where the daemon reads
/// such events at all it says it refused them as forged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_events_remove_nothing() {
    let truncate = r#"{"v":1,"op":"TRUNCATE","table":"public.products","ts":1}"#;
    let tags = r#"{"v":1,"op":"TAGS","ts":1,"tags":["products:all"]}"#;
    let fake_signature = format!("{}{truncate}", "ab".repeat(32));
    let forged = [truncate, tags, fake_signature.as_str()];
    for delivery in [Delivery::Notify, Delivery::Outbox, Delivery::Logical] {
        let env = Env::new(delivery).await;
        let (daemon, keys) = seed_and_cache(&env).await;
        let nobody = format!("nobody_{}", env.name);
        env.sql(&format!("CREATE ROLE {nobody} NOLOGIN")).await;
        for payload in forged {
            let mut sql = format!(
                "BEGIN; SET LOCAL ROLE {nobody}; SELECT pg_notify('cache_invalidation', '{payload}');"
            );
            if delivery == Delivery::Logical {
                for prefix in ["evictd", "evictd-old"] {
                    sql.push_str(&format!(
                        "SELECT pg_logical_emit_message(true, '{prefix}', '{payload}');
                         SELECT pg_logical_emit_message(false, '{prefix}', '{payload}');"
                    ));
                }
            }
            sql.push_str("COMMIT;");
            env.sql(&sql).await;
        }
        env.barrier().await;
        env.assert_present(&keys).await;
        let refused = match delivery {
            Delivery::Notify => forged.len(),
            Delivery::Logical => 4 * forged.len(),
            Delivery::Outbox => 0,
        };
        wait_forged(&daemon, refused as u64).await;
        if refused > 0 {
            daemon.wait_log("forged").await;
        }
    }
}

/// Waits until the daemon's metrics count `n` events refused as forged (a flood of them is
/// logged only a few a second; the metric counts each).
async fn wait_forged(daemon: &support::Daemon, n: u64) {
    let start = std::time::Instant::now();
    loop {
        let (_, metrics) = support::http_get(&daemon.http_addr(), "/metrics");
        let counted: u64 = metrics
            .lines()
            .find_map(|l| l.strip_prefix("evictd_events_rejected_total{kind=\"forged\"} "))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0);
        if counted >= n {
            assert_eq!(counted, n, "more refused than forged");
            return;
        }
        assert!(
            start.elapsed() < support::DEADLINE,
            "{counted} of {n} forged events counted"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

/// `pg_logical_emit_message` is open to every role: one message of many times the daemon's
/// frame limit, with evictd's prefix or another, is skipped as it streams in, never held
/// whole (the daemon's peak memory stays far below its size), and the stream goes on: the
/// next change is invalidated.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_logical_messages_are_skipped_unbuffered() {
    let env = Env::new(Delivery::Logical).await;
    let (daemon, keys) = seed_and_cache(&env).await;
    let nobody = format!("nobody_{}", env.name);
    env.sql(&format!("CREATE ROLE {nobody} NOLOGIN")).await;
    let size = 48 << 20;
    env.sql(&format!(
        "BEGIN; SET LOCAL ROLE {nobody};
         SELECT pg_logical_emit_message(true, 'evictd', repeat('x', {size}));
         SELECT pg_logical_emit_message(false, 'someone-else', repeat('y', {size}));
         COMMIT;"
    ))
    .await;
    env.barrier().await;
    env.assert_present(&keys).await;
    daemon.wait_log("forged").await;
    env.sql(&format!(
        "UPDATE products SET name = 'after' WHERE id = '{P1}'"
    ))
    .await;
    env.wait_gone(&keys[3..4]).await;
    let peak_mb = support::process_peak_mb(daemon.child.id());
    assert!(
        peak_mb < 40.0,
        "the daemon's peak RSS was {peak_mb:.1} MB for a {size}-byte message"
    );
}

/// The old-row trigger of `logical` delivery counts moved rows in a setting the writer's own
/// session can set. A writer that sets it far past the limit before moving a product still
/// gets the old client's tags invalidated: a value the trigger did not sign counts as the
/// limit reached, which widens the table.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forged_row_count_cannot_silence_the_old_row_trigger() {
    let env = Env::new(Delivery::Logical).await;
    let (_daemon, keys) = seed_and_cache(&env).await;
    let source: String = env
        .pg
        .query_one(
            "SELECT prosrc FROM pg_proc WHERE proname = 'old_row__public__products'",
            &[],
        )
        .await
        .expect("the old-row function")
        .get(0);
    let counter = source
        .split('\'')
        .find(|s| s.starts_with("evictd.rows_"))
        .expect("the counter's name in the function's source");
    let writer = format!("writer_{}", env.name);
    env.sql(&format!(
        "CREATE ROLE {writer} NOLOGIN; GRANT SELECT, UPDATE ON products TO {writer};"
    ))
    .await;
    env.sql(&format!(
        "BEGIN; SET LOCAL ROLE {writer}; SET LOCAL {counter} = '999999999';
         UPDATE products SET client_id = '{C2}' WHERE id = '{P1}'; COMMIT;"
    ))
    .await;
    // The old client's list went, as did the new client's and the product's.
    env.wait_gone(&keys[..4]).await;
}
