//! What `logical` delivery adds to the database side: publication `evictd` with its column
//! lists, the slot's name, and the old-row triggers for rule columns outside the replica
//! identity (the WAL lacks their old values).

use super::{
    PINNED_SEARCH_PATH, SIGNATURE_HEX_LEN, SIGNING_KEY_TABLE, TRIGGER_NAMES, capture_function_name,
    concat, enable_trigger, fnv1a64, ident, qualified, signed, text_of,
};
use crate::config::TriggerFiring;
use crate::core::rules::{TableName, TableRule};

/// The replication slot of `logical` delivery, as an SQL expression: one per database (slot
/// names are cluster-wide), `evictd_` and the database name folded to `[a-z0-9_]`.
/// Every name qualified: it also runs outside evictd's pinned search path.
pub const SLOT_NAME_SQL: &str = "pg_catalog.left('evictd_' OPERATOR(pg_catalog.||) \
     pg_catalog.regexp_replace(pg_catalog.lower(pg_catalog.current_database()), '[^a-z0-9_]', '_', 'g'), 63)";

/// The publication `logical` delivery streams (named literally in the SQL below).
pub const PUBLICATION: &str = "evictd";

pub use crate::core::folder::OLD_ROWS_PREFIX;

/// `logical` delivery: publication `evictd` over the configured tables, and what each table
/// needs so that UPDATEs and DELETEs carry the old values of the rule's columns (an UPDATE
/// moving a product to another client must invalidate the old client's tags too).
///
/// The WAL carries the old replica identity (the primary key by default) of a deleted row, and
/// of an updated one whose identity changed. Rule columns outside it come from two triggers:
/// `evictd_old_update`, a row trigger whose `WHEN` fires only when such a column changed (so
/// other UPDATEs run no function at all), and `evictd_old_delete`, a statement trigger; both
/// emit the old rows as messages ([`OLD_ROWS_PREFIX`]) in the writer's transaction. The
/// alternative, REPLICA IDENTITY FULL, puts every updated row's old version in the WAL in full,
/// TOASTed values inlined, and the walsender decodes and sends it all: a title edit of a row
/// with 96 KB of content logged 96 KB instead of 206 bytes. A table already FULL (the user's choice, or an older evictd's) is
/// left so and needs no trigger; a table without any identity (no primary key, or NOTHING)
/// is made FULL, as its UPDATEs and DELETEs could not be published otherwise.
///
/// From PostgreSQL 15 each table is published with a column list (the identity and the rule
/// columns): the walsender sends the daemon nothing else. `firing` applies to the triggers as
/// in the other deliveries (the WAL itself is decoded whatever the writer's
/// `session_replication_role`).
pub(super) fn publication(rules: &[TableRule], firing: TriggerFiring) -> String {
    let tables: Vec<String> = rules
        .iter()
        .map(|rule| {
            let columns: Vec<String> = rule
                .columns
                .iter()
                .map(|c| format!("'{}'", c.replace('\'', "''")))
                .collect();
            format!(
                "('{}'::pg_catalog.regclass, ARRAY[{}]::pg_catalog.text[], '{}', '{}')",
                qualified(&rule.table).replace('\'', "''"),
                columns.join(", "),
                capture_function_name(&rule.table),
                old_row_function_name(&rule.table),
            )
        })
        .collect();
    // The statement triggers of the other deliveries, on the table and its partitions.
    let dropped: Vec<String> = TRIGGER_NAMES
        .iter()
        .map(|name| {
            format!(
                "            EXECUTE pg_catalog.format('DROP TRIGGER IF EXISTS {name} ON %s', leaf);"
            )
        })
        .collect();
    format!(
        r#"-- Logical delivery: the daemon streams these tables' committed changes from slot
-- `evictd_<database>` (created by `evictd migrate`, or by the daemon when missing).
DO $do$
BEGIN
    IF NOT EXISTS (SELECT FROM pg_publication WHERE pubname = 'evictd') THEN
        CREATE PUBLICATION evictd;
    END IF;
END
$do$;
-- Per table: the replica identity's columns, the triggers for old values of the other rule
-- columns, and the publication's column list.
DO $do$
DECLARE
    t record;
    replident "char";
    kind "char";
    leaf pg_catalog.regclass;
    key_columns pg_catalog.text[];
    present pg_catalog.text[];
    outside pg_catalog.text[];
    entries pg_catalog.text[] := '{{}}';
BEGIN
    FOR t IN SELECT * FROM (VALUES
        {tables}
    ) AS v(tab, rule_columns, capture, old_row) LOOP
        FOR leaf IN SELECT t.tab UNION ALL SELECT p.relid FROM pg_catalog.pg_partition_tree(t.tab) p
                    WHERE p.level > 0 LOOP
{dropped}
        END LOOP;
        SELECT c.relreplident, c.relkind INTO replident, kind FROM pg_class c WHERE c.oid = t.tab;
        -- With changes published as the root's, a TRUNCATE naming a partition is not
        -- published at all: each partition gets a trigger that sends it table-wide.
        FOR leaf IN SELECT p.relid FROM pg_catalog.pg_partition_tree(t.tab) p WHERE p.level > 0 LOOP
            EXECUTE pg_catalog.format(
                'CREATE TRIGGER evictd_truncate AFTER TRUNCATE ON %s FOR EACH STATEMENT EXECUTE FUNCTION evictd.%I()',
                leaf, t.capture);
{enable_truncate}
        END LOOP;
        key_columns := {key_columns};
        IF replident <> 'f' AND pg_catalog.cardinality(key_columns) = 0 THEN
            EXECUTE pg_catalog.format('ALTER TABLE %s REPLICA IDENTITY FULL', t.tab);
            replident := 'f';
        END IF;
        -- A partitioned table's changes are logged by its partitions, each under its own
        -- identity: without the parent's primary key, every partition logs whole old rows.
        IF kind = 'p' AND replident = 'f' THEN
            FOR leaf IN SELECT p.relid FROM pg_catalog.pg_partition_tree(t.tab) p
                        JOIN pg_catalog.pg_class c ON c.oid = p.relid
                        WHERE p.isleaf AND c.relkind = 'r' AND c.relreplident <> 'f' LOOP
                EXECUTE pg_catalog.format('ALTER TABLE %s REPLICA IDENTITY FULL', leaf);
            END LOOP;
        END IF;
        -- Rule columns the table has and pgoutput sends (not generated ones); a missing one
        -- makes the daemon invalidate the table wide.
        present := ARRAY(SELECT c FROM pg_catalog.unnest({sent}) c WHERE c = ANY (t.rule_columns));
        outside := ARRAY(SELECT c FROM pg_catalog.unnest(present) c
                         WHERE replident <> 'f' AND c <> ALL (key_columns));
        IF pg_catalog.cardinality(outside) = 0 THEN
            EXECUTE pg_catalog.format('DROP TRIGGER IF EXISTS evictd_old_update ON %s', t.tab);
            EXECUTE pg_catalog.format('DROP TRIGGER IF EXISTS evictd_old_delete ON %s', t.tab);
        ELSE
            -- The WHEN clause runs on every UPDATE of the table, as the writer. A built-in
            -- type's cast to text is built in too (a cast needs the owner of one of its types);
            -- a user type is compared through its output function, which nobody can replace.
            EXECUTE pg_catalog.format(
                'CREATE OR REPLACE TRIGGER evictd_old_update AFTER UPDATE ON %s FOR EACH ROW '
                'WHEN (%s) EXECUTE FUNCTION evictd.%I()',
                t.tab,
                (SELECT pg_catalog.string_agg(pg_catalog.format(
                    CASE WHEN a.atttypid OPERATOR(pg_catalog.<) 16384
                         THEN 'OLD.%1$I::pg_catalog.text IS DISTINCT FROM NEW.%1$I::pg_catalog.text'
                         ELSE '({old}) IS DISTINCT FROM ({new})' END, c), ' OR ')
                 FROM pg_catalog.unnest(outside) c
                 JOIN pg_catalog.pg_attribute a ON a.attrelid = t.tab AND a.attname = c),
                t.old_row);
{enable_old_update}
            EXECUTE pg_catalog.format('DROP TRIGGER IF EXISTS evictd_old_delete ON %s', t.tab);
            IF kind = 'p' THEN
                -- An UPDATE moving a row to another partition deletes it from the first and
                -- runs only row-level DELETE triggers there: a row trigger, which every
                -- partition inherits, sees those old rows (and those of direct deletes).
                EXECUTE pg_catalog.format(
                    'CREATE TRIGGER evictd_old_delete AFTER DELETE ON %s '
                    'FOR EACH ROW EXECUTE FUNCTION evictd.%I()',
                    t.tab, t.old_row);
            ELSE
                EXECUTE pg_catalog.format(
                    'CREATE TRIGGER evictd_old_delete AFTER DELETE ON %s '
                    'REFERENCING OLD TABLE AS old_rows FOR EACH STATEMENT EXECUTE FUNCTION evictd.%I()',
                    t.tab, t.capture);
            END IF;
{enable_old_delete}
        END IF;
        IF replident <> 'f' AND pg_catalog.current_setting('server_version_num')::int >= 150000 THEN
            entries := entries || pg_catalog.format('%s (%s)', t.tab,
                (SELECT pg_catalog.string_agg(pg_catalog.quote_ident(c), ', ')
                 FROM (SELECT DISTINCT pg_catalog.unnest(key_columns || coalesce(present, '{{}}')) c) u));
        ELSE
            entries := entries || t.tab::pg_catalog.text;
        END IF;
    END LOOP;
    -- Changes of a partition are published as its root's (the table a rule names), which
    -- also lets a partitioned table have a column list.
    ALTER PUBLICATION evictd SET (publish_via_partition_root = true);
    EXECUTE 'ALTER PUBLICATION evictd SET TABLE ' || pg_catalog.array_to_string(entries, ', ');
END
$do$;
INSERT INTO evictd.settings (key, value) VALUES ('slot', {SLOT_NAME_SQL})
ON CONFLICT (key) DO UPDATE SET value = EXCLUDED.value;

"#,
        tables = tables.join(",\n        "),
        dropped = dropped.join("\n"),
        key_columns = identity_columns_sql("t.tab", "replident"),
        // The value as the tags render it (see `text_of`), `%1$I` the column, for `format`.
        old = text_of("OLD.%1$I").replace("%s", "%%s").replace('\'', "''"),
        new = text_of("NEW.%1$I").replace("%s", "%%s").replace('\'', "''"),
        sent = sent_columns_sql("t.tab"),
        enable_truncate = enable_trigger("evictd_truncate", "leaf", firing, "            "),
        enable_old_update = enable_trigger("evictd_old_update", "t.tab", firing, "            "),
        enable_old_delete = enable_trigger("evictd_old_delete", "t.tab", firing, "            "),
    )
}

/// The columns of relation `rel` (an OID expression) that its replica identity `replident`
/// (a `relreplident` expression) logs for a deleted or updated row, as a `text[]`: the primary
/// key's (`d`) or the chosen index's (`i`); none for `f` (every column) or `n`. `migrate` and
/// `doctor` both decide with it which rule columns need the old-row triggers.
pub fn identity_columns_sql(rel: &str, replident: &str) -> String {
    format!(
        "ARRAY(SELECT a.attname::pg_catalog.text FROM pg_catalog.pg_index i \
         JOIN pg_catalog.pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = ANY (i.indkey) \
         WHERE i.indrelid = {rel} AND (({replident} = 'd' AND i.indisprimary) \
         OR ({replident} = 'i' AND i.indisreplident)))"
    )
}

/// The columns of relation `rel` that pgoutput sends (not dropped, not generated), as a
/// `text[]`: a rule column outside them makes the daemon invalidate the table wide.
pub fn sent_columns_sql(rel: &str) -> String {
    format!(
        "ARRAY(SELECT a.attname::pg_catalog.text FROM pg_catalog.pg_attribute a \
         WHERE a.attrelid = {rel} AND a.attnum > 0 AND NOT a.attisdropped AND a.attgenerated = '')"
    )
}

/// The old-row function's name for `table` (`logical` delivery), like
/// [`capture_function_name`].
pub fn old_row_function_name(table: &TableName) -> String {
    capture_function_name(table).replacen("capture__", "old_row__", 1)
}

/// `logical` delivery: the row trigger function of `evictd_old_update` (see [`publication`]),
/// run only for rows whose rule columns outside the replica identity changed. It emits the old
/// row as a signed message; past `row_limit` such rows in one transaction it emits one
/// table-wide event instead and then nothing, so a mass move costs the walsender and the daemon
/// no more than a big statement does.
///
/// The count lives in a transaction-local setting, which the writer's own session can set as
/// well: a writer could set it past the limit first and move rows unseen. So the value is
/// signed together with the transaction's id, and one that does not verify counts as the limit
/// reached: tampering can only widen the invalidation, never silence it.
pub(super) fn old_row_function(rule: &TableRule, row_limit: u64) -> String {
    let name = old_row_function_name(&rule.table);
    let table = rule.table.to_string();
    let cols_json = serde_json::to_string(&rule.columns).unwrap_or_else(|_| "[]".into());
    let counter = format!("evictd.rows_{:016x}", fnv1a64(name.as_bytes()));
    let mut row = vec!["'['".to_string()];
    for (i, c) in rule.columns.iter().enumerate() {
        if i > 0 {
            row.push("','".to_string());
        }
        row.push(format!(
            "coalesce(pg_catalog.to_json({})::pg_catalog.text, 'null')",
            text_of(&format!("OLD.{}", ident(c)))
        ));
    }
    row.push("']'".to_string());
    let row: Vec<&str> = row.iter().map(String::as_str).collect();
    let timestamp =
        "(extract(epoch FROM pg_catalog.clock_timestamp()) OPERATOR(pg_catalog.*) 1000)::bigint";
    let head = concat(&[
        &format!("'{{\"v\":1,\"op\":\"UPDATE\",\"table\":\"{table}\",\"ts\":'"),
        timestamp,
    ]);
    let precise = concat(&[
        &head,
        &format!("',\"cols\":{cols_json},\"rows\":['"),
        &concat(&row),
        "']}'",
    ]);
    let wide = concat(&[&head, "',\"wide\":true}'"]);
    let count_text = concat(&["tx", "':'", "n::pg_catalog.text"]);
    format!(
        r#"CREATE OR REPLACE FUNCTION evictd.{name}() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER {PINNED_SEARCH_PATH} AS $fn$
DECLARE
    k record;
    seen pg_catalog.text := pg_catalog.current_setting('{counter}', true);
    tx pg_catalog.text := pg_catalog.pg_current_xact_id()::pg_catalog.text;
    n bigint := 1;
    counted pg_catalog.text;
    payload pg_catalog.text;
BEGIN
    SELECT * INTO k FROM {SIGNING_KEY_TABLE};
    IF seen IS NOT NULL AND seen OPERATOR(pg_catalog.<>) '' THEN
        counted := pg_catalog.substr(seen, {counted_from});
        IF {signed_counted} OPERATOR(pg_catalog.=) seen
           AND pg_catalog.split_part(counted, ':', 1) OPERATOR(pg_catalog.=) tx THEN
            n := pg_catalog.split_part(counted, ':', 2)::bigint OPERATOR(pg_catalog.+) 1;
            IF n OPERATOR(pg_catalog.>) {wide_at} THEN
                -- The table went table-wide in this transaction already.
                RETURN NULL;
            END IF;
        ELSE
            n := {wide_at};
        END IF;
    END IF;
    counted := {count_text};
    PERFORM pg_catalog.set_config('{counter}', {signed_counted}, true);
    IF n OPERATOR(pg_catalog.<=) {row_limit} THEN
        BEGIN
            payload := {precise};
        EXCEPTION WHEN undefined_column THEN
            -- A rule column renamed since `migrate` (a WHEN clause keeps a dropped one): the
            -- table goes table-wide and the writer's statement goes on.
            payload := {wide};
        END;
    ELSIF n OPERATOR(pg_catalog.=) {wide_at} THEN
        payload := {wide};
    ELSE
        RETURN NULL;
    END IF;
    PERFORM pg_catalog.pg_logical_emit_message(true, '{OLD_ROWS_PREFIX}', {signed_payload});
    RETURN NULL;
END
$fn$;
REVOKE ALL ON FUNCTION evictd.{name}() FROM PUBLIC;

"#,
        wide_at = row_limit + 1,
        counted_from = SIGNATURE_HEX_LEN + 1,
        signed_counted = signed("counted", "k"),
        signed_payload = signed("payload", "k"),
    )
}
