//! The first thing the generated SQL does: check that every table and column the rules name
//! exists, and fail the migration with a message naming the rule otherwise. Applied by a
//! migration tool without `evictd migrate`'s own check, triggers reading a column the table
//! lacks would fail every write to it.

use crate::core::rules::{TableRule, Template};

/// A `DO` block raising an error for the first table or column of `rules` the database lacks.
pub(super) fn rule_columns_check(rules: &[TableRule]) -> String {
    let literal = |s: &str| format!("'{}'", s.replace('\'', "''"));
    let mut rows = Vec::new();
    for rule in rules {
        for column in &rule.columns {
            // The first template naming the column, for the message.
            let template = rule
                .tags
                .iter()
                .chain(&rule.keys)
                .map(Template::source)
                .find(|t| {
                    Template::placeholders(t)
                        .unwrap_or_default()
                        .iter()
                        .any(|p| p == column)
                })
                .unwrap_or_default();
            rows.push(format!(
                "({}, {}, {}, {})",
                literal(&rule.table.schema),
                literal(&rule.table.name),
                literal(column),
                literal(template),
            ));
        }
    }
    if rows.is_empty() {
        return String::new();
    }
    format!(
        r#"-- Every table and column the rules name must exist: triggers reading a missing column would
-- fail every write to the table.
DO $check$
DECLARE
    r record;
BEGIN
    FOR r IN SELECT * FROM (VALUES
        {rows}
    ) AS v(nsp, rel, col, template) LOOP
        IF NOT EXISTS (SELECT FROM pg_catalog.pg_class c
                       JOIN pg_catalog.pg_namespace n ON n.oid OPERATOR(pg_catalog.=) c.relnamespace
                       WHERE n.nspname OPERATOR(pg_catalog.=) r.nsp
                         AND c.relname OPERATOR(pg_catalog.=) r.rel) THEN
            RAISE EXCEPTION 'evictd: table %.% does not exist', r.nsp, r.rel
                USING HINT = 'create it, or remove its [[tables]] rule, then generate this SQL again';
        END IF;
        IF NOT EXISTS (SELECT FROM pg_catalog.pg_attribute a
                       JOIN pg_catalog.pg_class c ON c.oid OPERATOR(pg_catalog.=) a.attrelid
                       JOIN pg_catalog.pg_namespace n ON n.oid OPERATOR(pg_catalog.=) c.relnamespace
                       WHERE n.nspname OPERATOR(pg_catalog.=) r.nsp
                         AND c.relname OPERATOR(pg_catalog.=) r.rel
                         AND a.attname OPERATOR(pg_catalog.=) r.col
                         AND a.attnum OPERATOR(pg_catalog.>) 0 AND NOT a.attisdropped) THEN
            RAISE EXCEPTION 'evictd: table %.% has no column % (placeholder {{%}} of rule "%")',
                r.nsp, r.rel, r.col, r.col, r.template
                USING HINT = 'fix the rule in the configuration, then generate this SQL again';
        END IF;
    END LOOP;
END
$check$;

"#,
        rows = rows.join(",\n        "),
    )
}
