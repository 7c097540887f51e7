//! The statement triggers' capture function of each configured table: what a writer's
//! statement runs to record its rows' rule columns as an event (`outbox`, `notify`), or, in
//! `logical` delivery, the old rows of a DELETE.

use super::{
    LOGICAL_MESSAGE_LIMIT, NOTIFY_PAYLOAD_LIMIT, OLD_ROWS_PREFIX, PINNED_SEARCH_PATH,
    SIGNING_KEY_TABLE, capture_function_name, concat, ident, qualified, ring, signed, text_of,
};
use crate::config::{Delivery, TriggerFiring, Wakeup};
use crate::core::rules::TableRule;

/// Rows per outbox event: a statement of more rows writes one event per this many (distinct)
/// rows. The daemon fetches the outbox row by row, so it starts on the first event of a
/// 100,000-row statement while PostgreSQL still reads the others out of TOAST: one event of
/// 8 MB took ~30 ms to fetch and ~10 ms to parse before Redis had anything to do.
pub const OUTBOX_EVENT_ROWS: u64 = 10_000;
/// Statements of at most this many rows (and of no more than the wide threshold) take the
/// capture function's fast path: one statement that aggregates and emits, with no counting
/// query before it and no runs. Nearly every application write is such a statement, and for
/// a single-row UPDATE the fast path halves the trigger's cost to the writer's backend (~45 →
/// ~22 µs of CPU): executor start-up of the general path's many plan nodes is most of it.
const SMALL_STATEMENT_ROWS: u64 = 1_000;
/// The statement-level capture function of one table. It carries only the referenced columns,
/// de-duplicated over old and new rows, and goes table-wide above `row_limit` rows (and, in
/// notify mode, when the payload would not fit).
///
/// It is on every writer's path, so it does the least work that can be done. A statement of
/// at most [`SMALL_STATEMENT_ROWS`] rows (nearly every application write) is aggregated and
/// emitted by one SQL statement (the fast path: in PostgreSQL 15 each statement a trigger runs,
/// and each plan node it starts, costs the writer microseconds). Larger statements take the
/// general path: one query that counts (reading at most `row_limit + 1` rows) and, only for a
/// statement small enough, aggregates the distinct values (in `outbox` mode in runs of
/// [`OUTBOX_EVENT_ROWS`], one event each). Events are emitted inline rather than through
/// `evictd.emit`.
///
/// It is `SECURITY DEFINER` (writers need no privilege on `evictd.outbox`), so it runs as its
/// owner for any role that writes the table, and treats that role as hostile: its search path
/// is pinned, every table, function, type and operator is schema-qualified besides
/// (`OPERATOR(pg_catalog.=)`, `pg_catalog.text`, …; `bigint`, `extract` and `coalesce` are
/// grammar, bound to `pg_catalog`), column values become text through their type's output
/// function rather than a cast a type's owner could define ([`super::text_of`]), and what
/// leaves through NOTIFY or a logical decoding message is signed. The pinned path costs each
/// statement a search-path switch and back (~10 µs of a single-row UPDATE's ~60). Tests attack
/// every function in every delivery with a hostile path, operators and casts.
pub(super) fn capture_function(
    rule: &TableRule,
    delivery: Delivery,
    wakeup: Wakeup,
    channel: &str,
    row_limit: u64,
) -> String {
    let name = capture_function_name(&rule.table);
    let table = rule.table.to_string();
    let cols_json = serde_json::to_string(&rule.columns).unwrap_or_else(|_| "[]".into());
    let columns: Vec<String> = rule
        .columns
        .iter()
        .enumerate()
        .map(|(i, c)| format!("{} AS c{i}", text_of(&ident(c))))
        .collect();
    let columns = columns.join(", ");
    // Each row as a JSON array of PostgreSQL text values: `["a","b"]`, `null` for NULL.
    let values: Vec<String> = (0..rule.columns.len())
        .map(|i| format!("coalesce(pg_catalog.to_json(c{i})::pg_catalog.text, 'null')"))
        .collect();
    let mut row_parts = vec!["'['"];
    for (i, v) in values.iter().enumerate() {
        if i > 0 {
            row_parts.push("','");
        }
        row_parts.push(v);
    }
    row_parts.push("']'");
    let row_json = concat(&row_parts);
    let probe = row_limit + 1;
    // One query: count the statement's rows (reading at most `probe` of them), and only when
    // they are few enough, aggregate their distinct values (hash de-duplication).
    // In `outbox` mode the distinct rows are aggregated in runs of `OUTBOX_EVENT_ROWS`, one
    // body (and event) per run; a NOTIFY carries one body.
    let chunked = delivery == Delivery::Outbox;
    let capture = |counted: &str, sources: &[&str]| {
        let distinct: Vec<String> = sources
            .iter()
            .map(|t| format!("SELECT {columns} FROM {t}"))
            .collect();
        let distinct = format!(
            "SELECT DISTINCT * FROM ({}) u",
            distinct.join(" UNION ALL ")
        );
        let aggregate = if chunked {
            format!(
                "SELECT pg_catalog.array_agg(y.b) FROM (\n                    SELECT pg_catalog.string_agg(x.r, ',') AS b FROM (\n                        SELECT {row_json} AS r, (pg_catalog.row_number() OVER () OPERATOR(pg_catalog.-) 1) OPERATOR(pg_catalog./) {OUTBOX_EVENT_ROWS} AS run\n                        FROM ({distinct}) d) x\n                    GROUP BY x.run) y"
            )
        } else {
            format!(
                "SELECT pg_catalog.string_agg({row_json}, ',')\n                FROM ({distinct}) d"
            )
        };
        let into = if chunked { "bodies" } else { "body" };
        format!(
            "SELECT c.n, CASE WHEN c.n OPERATOR(pg_catalog.<=) {row_limit} THEN (\n                {aggregate}) END\n            INTO n, {into}\n            FROM (SELECT pg_catalog.count(*) AS n FROM (SELECT 1 FROM {counted} LIMIT {probe}) x) c;"
        )
    };
    let wide_payload = concat(&["head", "',\"wide\":true}'"]);
    // NOTIFY payloads and logical decoding messages have a size limit (PostgreSQL's, and the
    // one the daemon reads); the outbox has none.
    let payload_limit = match delivery {
        Delivery::Notify => Some(NOTIFY_PAYLOAD_LIMIT),
        Delivery::Logical => Some(LOGICAL_MESSAGE_LIMIT),
        Delivery::Outbox => None,
    };
    let size_check = payload_limit.map_or_else(String::new, |limit| {
        format!(
            "\n        IF pg_catalog.octet_length(payload) OPERATOR(pg_catalog.>) {limit} THEN\n            payload := {wide_payload};\n        END IF;"
        )
    });
    let signed_payload = signed("payload", "k");
    let emit = match delivery {
        Delivery::Notify => format!(
            "PERFORM pg_catalog.pg_notify('{channel}', {signed_payload})\n            FROM {SIGNING_KEY_TABLE} k;"
        ),
        // Only old rows the WAL lacks are captured in `logical` delivery (see `publication`).
        Delivery::Logical => format!(
            "PERFORM pg_catalog.pg_logical_emit_message(true, '{OLD_ROWS_PREFIX}', {signed_payload})\n            FROM {SIGNING_KEY_TABLE} k;"
        ),
        Delivery::Outbox => "INSERT INTO evictd.outbox (payload) VALUES (payload);".to_string(),
    };
    let wake = |indent: &str| match (delivery, wakeup) {
        (Delivery::Outbox, Wakeup::Notify) => {
            format!("\n{indent}PERFORM pg_catalog.pg_notify('{channel}', '');")
        }
        (Delivery::Outbox, Wakeup::Doorbell) => format!("\n{}", ring(channel, indent)),
        _ => String::new(),
    };
    let timestamp =
        "(extract(epoch FROM pg_catalog.clock_timestamp()) OPERATOR(pg_catalog.*) 1000)::bigint";
    let head = concat(&[
        "'{\"v\":1,\"op\":\"'",
        "TG_OP",
        &format!("'\",\"table\":\"{table}\",\"ts\":'"),
        timestamp,
    ]);
    // The fast path: one statement that aggregates the statement's rows (distinct, with a sort
    // inside the aggregate: no plan node of its own) and emits them, or emits nothing when
    // the statement has no row or more than `small` rows (reading at most one row past that).
    // FOUND tells which. The operation is a literal here, not TG_OP: no parameter in the plan.
    let small = SMALL_STATEMENT_ROWS.min(row_limit);
    let fast_path = |op: &str, sources: &[&str]| {
        let selects: Vec<String> = sources
            .iter()
            .map(|t| format!("SELECT {columns} FROM {t}"))
            .collect();
        // An UPDATE reads each row twice, old and new.
        let most = small * sources.len() as u64;
        let aggregated = format!(
            "SELECT {} AS h, pg_catalog.string_agg(DISTINCT {row_json}, ',') AS body\n            FROM ({} LIMIT {}) d\n            HAVING pg_catalog.count(*) OPERATOR(pg_catalog.>) 0 AND pg_catalog.count(*) OPERATOR(pg_catalog.<=) {most}",
            concat(&[
                &format!("'{{\"v\":1,\"op\":\"{op}\",\"table\":\"{table}\",\"ts\":'"),
                timestamp,
            ]),
            selects.join(" UNION ALL "),
            most + 1,
        );
        let payload = concat(&[
            "x.h",
            &format!("',\"cols\":{cols_json},\"rows\":['"),
            "x.body",
            "']}'",
        ]);
        // The payload, table-wide when it would not fit (`z.p`), signed where it needs it.
        let limited = |limit: usize| {
            format!(
                "FROM (SELECT CASE WHEN pg_catalog.octet_length(y.p) OPERATOR(pg_catalog.>) {limit} THEN {} ELSE y.p END AS p\n        FROM (SELECT x.h, {payload} AS p FROM (\n            {aggregated}) x) y) z, {SIGNING_KEY_TABLE} k;",
                concat(&["y.h", "',\"wide\":true}'"]),
            )
        };
        let signed_payload = signed("z.p", "k");
        let emit = match delivery {
            Delivery::Notify => format!(
                "PERFORM pg_catalog.pg_notify('{channel}', {signed_payload})\n        {}",
                limited(NOTIFY_PAYLOAD_LIMIT)
            ),
            Delivery::Logical => format!(
                "PERFORM pg_catalog.pg_logical_emit_message(true, '{OLD_ROWS_PREFIX}', {signed_payload})\n        {}",
                limited(LOGICAL_MESSAGE_LIMIT)
            ),
            Delivery::Outbox => format!(
                "INSERT INTO evictd.outbox (payload)\n        SELECT {payload} FROM (\n            {aggregated}) x;"
            ),
        };
        format!(
            "{emit}\n        IF FOUND THEN{}\n            RETURN NULL;\n        END IF;",
            wake("            ")
        )
    };
    let rows_payload = |body: &str| {
        concat(&[
            "head",
            &format!("',\"cols\":{cols_json},\"rows\":['"),
            body,
            "']}'",
        ])
    };
    // The precise event(s) and the declaration of what the capture query aggregates into.
    let (precise, aggregated) = if chunked {
        (
            format!(
                "INSERT INTO evictd.outbox (payload)\n            SELECT {} FROM pg_catalog.unnest(bodies) b;",
                rows_payload("b")
            ),
            "bodies pg_catalog.text[];",
        )
    } else {
        (
            format!(
                "payload := {};{size_check}\n        {emit}",
                rows_payload("body")
            ),
            "body pg_catalog.text;",
        )
    };
    format!(
        r#"CREATE OR REPLACE FUNCTION evictd.{name}() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER {PINNED_SEARCH_PATH} AS $fn$
DECLARE
    n bigint;
    {aggregated}
    head pg_catalog.text;
    payload pg_catalog.text;
BEGIN
    BEGIN
    IF TG_OP OPERATOR(pg_catalog.=) 'UPDATE' THEN
        {fast_update}
        {both_sides}
    ELSIF TG_OP OPERATOR(pg_catalog.=) 'INSERT' THEN
        {fast_insert}
        {insert}
    ELSIF TG_OP OPERATOR(pg_catalog.=) 'DELETE' THEN
        {fast_delete}
        {delete}
    END IF;
    IF n OPERATOR(pg_catalog.=) 0 THEN
        RETURN NULL;
    END IF;
    head := {head};
    IF TG_OP OPERATOR(pg_catalog.=) 'TRUNCATE' OR n OPERATOR(pg_catalog.>) {row_limit} THEN
        payload := {wide_payload};
        {emit}
    ELSE
        {precise}
    END IF;{wake}
    RETURN NULL;
    EXCEPTION WHEN undefined_column THEN
        -- A rule column dropped or renamed since `migrate`: the rows cannot be read, so the
        -- table goes table-wide and the writer's statement goes on (`doctor` names the rule).
    END;
    head := {head};
    payload := {wide_payload};
    {emit}{wake}
    RETURN NULL;
END
$fn$;
REVOKE ALL ON FUNCTION evictd.{name}() FROM PUBLIC;

"#,
        fast_update = fast_path("UPDATE", &["old_rows", "new_rows"]),
        fast_insert = fast_path("INSERT", &["new_rows"]),
        fast_delete = fast_path("DELETE", &["old_rows"]),
        insert = capture("new_rows", &["new_rows"]),
        delete = capture("old_rows", &["old_rows"]),
        both_sides = capture("new_rows", &["old_rows", "new_rows"]),
        wake = wake("    "),
    )
}

/// `ALTER TABLE … ENABLE [ALWAYS] TRIGGER name` for the relation in PL/pgSQL variable
/// `relation`, as one `EXECUTE` line: `always` makes the trigger fire under
/// `session_replication_role = replica` too (restores, logical-replication subscribers); the
/// default is PostgreSQL's. Set both ways, so that changing the setting and migrating again
/// takes effect.
pub(super) fn enable_trigger(
    name: &str,
    relation: &str,
    firing: TriggerFiring,
    indent: &str,
) -> String {
    let always = match firing {
        TriggerFiring::Always => "ALWAYS ",
        TriggerFiring::Origin => "",
    };
    format!(
        "{indent}EXECUTE pg_catalog.format('ALTER TABLE %s ENABLE {always}TRIGGER {name}', {relation});"
    )
}

/// The four statement triggers on the table and, for a partitioned table, on each of its
/// partitions: a statement fires only the triggers of the table it names, so one naming a
/// partition would pass a parent's triggers by. They all run the table's capture function,
/// which reports the table the rule names. (A partition attached later gets them at the next
/// `evictd migrate`; `doctor` names partitions without them.)
///
/// `firing` says whether they fire under `session_replication_role = replica` as well
/// ([`enable_trigger`]).
pub(super) fn triggers(rule: &TableRule, firing: TriggerFiring) -> String {
    let table = qualified(&rule.table).replace('\'', "''");
    let function = format!("evictd.{}()", capture_function_name(&rule.table));
    let create = |name: &str, event: &str, transition: &str| {
        format!(
            "        EXECUTE pg_catalog.format('CREATE OR REPLACE TRIGGER {name} AFTER {event} ON %s{transition} FOR EACH STATEMENT EXECUTE FUNCTION {function}', r);\n{}",
            enable_trigger(name, "r", firing, "        ")
        )
    };
    let statements = [
        create(
            "evictd_insert",
            "INSERT",
            " REFERENCING NEW TABLE AS new_rows",
        ),
        create(
            "evictd_update",
            "UPDATE",
            " REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows",
        ),
        create(
            "evictd_delete",
            "DELETE",
            " REFERENCING OLD TABLE AS old_rows",
        ),
        create("evictd_truncate", "TRUNCATE", ""),
    ];
    format!(
        r#"DO $do$
DECLARE
    r pg_catalog.regclass;
BEGIN
    -- `logical` delivery's old-row trigger, if the table had one (a partition's goes with it).
    DROP TRIGGER IF EXISTS evictd_old_delete ON {table};
    FOR r IN SELECT '{table}'::pg_catalog.regclass
             UNION ALL
             SELECT p.relid FROM pg_catalog.pg_partition_tree('{table}') p
             WHERE p.level OPERATOR(pg_catalog.>) 0
    LOOP
{statements}
    END LOOP;
END
$do$;

"#,
        statements = statements.join("\n"),
    )
}
