//! Compiled invalidation rules: which tags and key patterns a changed row makes stale.
//!
//! Pure: no I/O, no async. A [`Rules`] value is built once from the validated configuration and
//! answers two questions — "which tags does this row produce?" and "which tags could this table
//! ever produce?" (the table-wide case, answered with glob patterns over existing tag names).

use std::collections::BTreeSet;
use std::fmt;

use thiserror::Error;

/// A schema-qualified table name, the key rules are looked up by.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct TableName {
    pub schema: String,
    pub name: String,
}

impl TableName {
    /// Parses `table` or `schema.table`; unqualified names live in `public`, as in PostgreSQL.
    pub fn parse(text: &str) -> Result<Self, TemplateError> {
        let mut parts = text.split('.');
        let (schema, name) = match (parts.next(), parts.next(), parts.next()) {
            (Some(name), None, None) => ("public", name),
            (Some(schema), Some(name), None) => (schema, name),
            _ => return Err(TemplateError::BadTableName(text.to_string())),
        };
        if !is_identifier(schema) || !is_identifier(name) {
            return Err(TemplateError::BadTableName(text.to_string()));
        }
        Ok(Self {
            schema: schema.to_string(),
            name: name.to_string(),
        })
    }
}

impl fmt::Display for TableName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.schema, self.name)
    }
}

/// Identifiers we accept for schemas, tables and columns: plain lowercase SQL identifiers,
/// without the `$` PostgreSQL also allows: the generated functions are dollar-quoted bodies,
/// and an identifier holding a tag like `$fn$` would end one early and inject SQL.
/// Anything fancier would need quoting rules everywhere it is echoed; no real schema needs it.
pub fn is_identifier(text: &str) -> bool {
    let mut chars = text.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_lowercase() || c == '_')
        && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
        && text.len() <= 63
}

/// Why a template or table name in the configuration cannot be used.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum TemplateError {
    #[error("unclosed placeholder in `{0}` (a `{{` without its `}}`)")]
    Unclosed(String),
    #[error("stray `}}` in `{0}` (a `}}` without its `{{`)")]
    StrayClose(String),
    #[error(
        "placeholder `{{{column}}}` in `{template}` names no column (use a lowercase column name)"
    )]
    BadColumn { template: String, column: String },
    #[error("empty template")]
    Empty,
    #[error("`{0}` is not a table name (use `table` or `schema.table`, lowercase)")]
    BadTableName(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Segment {
    Literal(String),
    /// Index into the owning rule's `columns`.
    Column(usize),
}

/// A tag or key template such as `products:client:{client_id}`, compiled against its rule's columns.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Template {
    source: String,
    segments: Vec<Segment>,
}

impl Template {
    /// The placeholders of `text`, in order, without compiling it.
    pub fn placeholders(text: &str) -> Result<Vec<String>, TemplateError> {
        Ok(split_template(text)?
            .into_iter()
            .filter_map(|piece| match piece {
                Piece::Column(c) => Some(c),
                Piece::Literal(_) => None,
            })
            .collect())
    }

    fn compile(text: &str, columns: &[String]) -> Result<Self, TemplateError> {
        let segments = split_template(text)?
            .into_iter()
            .map(|piece| match piece {
                Piece::Literal(l) => Segment::Literal(l),
                Piece::Column(c) => Segment::Column(
                    columns
                        .iter()
                        .position(|known| *known == c)
                        .unwrap_or(usize::MAX),
                ),
            })
            .collect();
        Ok(Self {
            source: text.to_string(),
            segments,
        })
    }

    /// The template as written in the configuration.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// Renders with row values (indexed like the rule's columns). `None` when a value it needs is
    /// NULL or missing: a NULL foreign key drops only the tags that need it.
    fn render(&self, row: &[Option<&str>], escape_values: bool) -> Option<String> {
        let mut out = String::with_capacity(self.source.len() + 16);
        for segment in &self.segments {
            match segment {
                Segment::Literal(l) => out.push_str(l),
                Segment::Column(i) => {
                    let value = row.get(*i).copied().flatten()?;
                    if escape_values {
                        push_glob_escaped(&mut out, value);
                    } else {
                        out.push_str(value);
                    }
                }
            }
        }
        Some(out)
    }

    /// The glob matching every string this template can produce: placeholders become `*`.
    /// `escape_literals` is true for tag templates (their literal text is exact) and false for key
    /// patterns (their literal text is already a glob written by the operator).
    fn widen(&self, escape_literals: bool) -> String {
        let mut out = String::with_capacity(self.source.len());
        for segment in &self.segments {
            match segment {
                Segment::Literal(l) if escape_literals => push_glob_escaped(&mut out, l),
                Segment::Literal(l) => out.push_str(l),
                Segment::Column(_) => out.push('*'),
            }
        }
        out
    }

    fn has_placeholders(&self) -> bool {
        self.segments
            .iter()
            .any(|s| matches!(s, Segment::Column(_)))
    }
}

enum Piece {
    Literal(String),
    Column(String),
}

fn split_template(text: &str) -> Result<Vec<Piece>, TemplateError> {
    if text.is_empty() {
        return Err(TemplateError::Empty);
    }
    let mut pieces = Vec::new();
    let mut rest = text;
    while !rest.is_empty() {
        match (rest.find('{'), rest.find('}')) {
            (None, None) => {
                pieces.push(Piece::Literal(rest.to_string()));
                rest = "";
            }
            (None, Some(_)) => return Err(TemplateError::StrayClose(text.to_string())),
            (Some(open), Some(close)) if close < open => {
                return Err(TemplateError::StrayClose(text.to_string()));
            }
            (Some(open), _) => {
                if open > 0 {
                    pieces.push(Piece::Literal(rest[..open].to_string()));
                }
                let after = &rest[open + 1..];
                let end = after
                    .find('}')
                    .ok_or_else(|| TemplateError::Unclosed(text.to_string()))?;
                let column = &after[..end];
                if !is_identifier(column) {
                    return Err(TemplateError::BadColumn {
                        template: text.to_string(),
                        column: column.to_string(),
                    });
                }
                pieces.push(Piece::Column(column.to_string()));
                rest = &after[end + 1..];
            }
        }
    }
    Ok(pieces)
}

pub use crate::core::glob::{glob_escape, push_glob_escaped};

/// The rule of one table: its tag templates, key patterns and the columns they reference.
#[derive(Debug, Clone)]
pub struct TableRule {
    pub table: TableName,
    /// Every column a template references, sorted and unique: what the trigger must carry.
    pub columns: Vec<String>,
    pub tags: Vec<Template>,
    pub keys: Vec<Template>,
}

impl TableRule {
    pub fn new(table: TableName, tags: &[String], keys: &[String]) -> Result<Self, TemplateError> {
        let mut columns = BTreeSet::new();
        for text in tags.iter().chain(keys) {
            columns.extend(Template::placeholders(text)?);
        }
        let columns: Vec<String> = columns.into_iter().collect();
        let compile = |list: &[String]| -> Result<Vec<Template>, TemplateError> {
            list.iter()
                .map(|t| Template::compile(t, &columns))
                .collect()
        };
        Ok(Self {
            tags: compile(tags)?,
            keys: compile(keys)?,
            table,
            columns,
        })
    }

    /// Where each of this rule's columns sits among `columns` (those of a statement's event,
    /// or of a relation the replication stream described); `None` when one is missing.
    pub fn positions<S: AsRef<str>>(&self, columns: &[S]) -> Option<Vec<usize>> {
        self.columns
            .iter()
            .map(|wanted| columns.iter().position(|c| c.as_ref() == wanted))
            .collect()
    }

    /// Adds what `rows` make stale, each row's values read at `positions` (from
    /// [`TableRule::positions`]): the one path from a row to its tags, whatever carried it.
    pub fn rows_targets<'r, V: RowValue + 'r>(
        &self,
        positions: &[usize],
        rows: impl IntoIterator<Item = &'r [V]>,
        out: &mut Targets,
    ) -> Result<(), Unreadable> {
        let mut values: Vec<Option<&str>> = Vec::with_capacity(positions.len());
        for row in rows {
            values.clear();
            for &i in positions {
                values.push(row.get(i).map_or(Ok(None), RowValue::text)?);
            }
            self.row_targets(&values, out);
        }
        Ok(())
    }

    /// Adds what one changed row makes stale. `row` is indexed like `self.columns`.
    pub fn row_targets(&self, row: &[Option<&str>], out: &mut Targets) {
        for tag in &self.tags {
            if let Some(t) = tag.render(row, false) {
                out.tags.insert(t);
            }
        }
        for key in &self.keys {
            if let Some(k) = key.render(row, true) {
                out.key_globs.insert(k);
            }
        }
    }

    /// Adds everything any row of this table could make stale.
    pub fn table_wide_targets(&self, out: &mut Targets) {
        for tag in &self.tags {
            if tag.has_placeholders() {
                out.tag_globs.insert(tag.widen(true));
            } else {
                out.tags.insert(tag.source.clone());
            }
        }
        for key in &self.keys {
            out.key_globs.insert(key.widen(false));
        }
        out.wide_tables.insert(self.table.to_string());
    }
}

/// A table the configuration has no rule for.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error("table `{0}` has no rule in this configuration")]
pub struct UnknownTable(pub String);

/// A row value the rules cannot read: the change's targets are unknown, so its table goes
/// table-wide (a TOASTed value the replication stream does not carry).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Unreadable;

/// One value of a row as the rules read it, whatever carried the row (a trigger's event, the
/// replication stream): its text, `None` for NULL.
pub trait RowValue {
    fn text(&self) -> Result<Option<&str>, Unreadable>;
}

/// What a set of changes makes stale, de-duplicated. The sink turns this into Redis commands.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Targets {
    /// Exact tag names (without the key prefix).
    pub tags: BTreeSet<String>,
    /// Globs over tag names, from table-wide invalidations.
    pub tag_globs: BTreeSet<String>,
    /// Globs over full Redis key names, from `keys` patterns.
    pub key_globs: BTreeSet<String>,
    /// Tables invalidated table-wide (recorded in `tagts-table:`).
    pub wide_tables: BTreeSet<String>,
}

impl Targets {
    pub fn is_empty(&self) -> bool {
        self.tags.is_empty()
            && self.tag_globs.is_empty()
            && self.key_globs.is_empty()
            && self.wide_tables.is_empty()
    }

    /// What the flush bound counts: names and patterns alike. A pattern costs no more than a
    /// name (the patterns of one flush share a SCAN pass), but it is held in memory the same.
    pub fn len(&self) -> usize {
        self.tags.len() + self.tag_globs.len() + self.key_globs.len()
    }

    pub fn merge(&mut self, other: Targets) {
        self.tags.extend(other.tags);
        self.tag_globs.extend(other.tag_globs);
        self.key_globs.extend(other.key_globs);
        self.wide_tables.extend(other.wide_tables);
    }
}

/// All configured rules.
#[derive(Debug, Clone)]
pub struct Rules {
    tables: Vec<TableRule>,
}

impl Rules {
    pub fn new(tables: Vec<TableRule>) -> Self {
        Self { tables }
    }

    /// The rules for the four tables of the application (README's default rules).
    pub fn defaults() -> Self {
        let rule = |table: &str, tags: &[&str]| {
            let tags: Vec<String> = tags.iter().map(|t| t.to_string()).collect();
            // The default templates are constants checked by the unit tests below.
            TableRule::new(TableName::parse(table).expect("valid"), &tags, &[]).expect("valid")
        };
        Self::new(vec![
            rule(
                "products",
                &[
                    "products:all",
                    "products:client:{client_id}",
                    "products:id:{id}",
                ],
            ),
            rule(
                "job_readiness_expert_sessions",
                &[
                    "expert_sessions:all",
                    "expert_sessions:product:{product_id}",
                    "expert_sessions:id:{id}",
                ],
            ),
            rule(
                "modules",
                &[
                    "module_content:id:{id}",
                    "module_content:product:{product_id}",
                ],
            ),
            rule("clients", &["client_configs:all", "client_configs:id:{id}"]),
        ])
    }

    pub fn tables(&self) -> &[TableRule] {
        &self.tables
    }

    /// The rule of `table` (`schema.name` or a bare name in `public`).
    pub fn find(&self, table: &str) -> Option<&TableRule> {
        let wanted = TableName::parse(table).ok()?;
        self.tables.iter().find(|r| r.table == wanted)
    }

    /// [`Rules::find`], or why there is none.
    pub fn rule_of(&self, table: &str) -> Result<&TableRule, UnknownTable> {
        self.find(table)
            .ok_or_else(|| UnknownTable(table.to_string()))
    }

    /// Everything every configured table could make stale.
    pub fn all_table_wide(&self) -> Targets {
        let mut out = Targets::default();
        for rule in &self.tables {
            rule.table_wide_targets(&mut out);
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn products() -> TableRule {
        TableRule::new(
            TableName::parse("products").unwrap(),
            &[
                "products:all".into(),
                "products:client:{client_id}".into(),
                "products:id:{id}".into(),
            ],
            &["cache:v1:product:{id}:*".into()],
        )
        .unwrap()
    }

    #[test]
    fn columns_are_sorted_and_unique() {
        assert_eq!(products().columns, vec!["client_id", "id"]);
    }

    #[test]
    fn row_renders_tags_and_escaped_key_patterns() {
        let mut out = Targets::default();
        products().row_targets(&[Some("c1"), Some("p*1")], &mut out);
        let tags: Vec<_> = out.tags.iter().cloned().collect();
        assert_eq!(
            tags,
            ["products:all", "products:client:c1", "products:id:p*1"]
        );
        let keys: Vec<_> = out.key_globs.iter().cloned().collect();
        assert_eq!(keys, [r"cache:v1:product:p\*1:*"]);
    }

    /// A NULL foreign key drops only the tags that need it.
    #[test]
    fn null_value_drops_only_its_tag() {
        let mut out = Targets::default();
        products().row_targets(&[None, Some("p1")], &mut out);
        let tags: Vec<_> = out.tags.iter().cloned().collect();
        assert_eq!(tags, ["products:all", "products:id:p1"]);
    }

    #[test]
    fn table_wide_widens_placeholders_and_escapes_literals() {
        let rule = TableRule::new(
            TableName::parse("s.t").unwrap(),
            &["a*b:{x}".into(), "plain".into()],
            &["k:{x}:*".into()],
        )
        .unwrap();
        let mut out = Targets::default();
        rule.table_wide_targets(&mut out);
        assert_eq!(out.tag_globs.iter().next().unwrap(), r"a\*b:*");
        assert!(out.tags.contains("plain"));
        assert!(out.key_globs.contains("k:*:*"));
        assert!(out.wide_tables.contains("s.t"));
    }

    #[test]
    fn template_errors_are_named() {
        assert_eq!(
            Template::placeholders("a:{id"),
            Err(TemplateError::Unclosed("a:{id".into()))
        );
        assert!(matches!(
            Template::placeholders("a:{}"),
            Err(TemplateError::BadColumn { .. })
        ));
        assert!(matches!(
            Template::placeholders("a:}"),
            Err(TemplateError::StrayClose(_))
        ));
        assert_eq!(Template::placeholders(""), Err(TemplateError::Empty));
        // `$` would let a name end the generated functions' dollar-quoted bodies.
        assert!(matches!(
            Template::placeholders("a:{x$fn$}"),
            Err(TemplateError::BadColumn { .. })
        ));
        assert!(TableName::parse("public.t$fn$").is_err());
        assert!(TableName::parse("a$do$.t").is_err());
    }

    #[test]
    fn defaults_cover_the_four_tables() {
        let rules = Rules::defaults();
        let names: Vec<String> = rules.tables().iter().map(|r| r.table.to_string()).collect();
        assert_eq!(
            names,
            [
                "public.products",
                "public.job_readiness_expert_sessions",
                "public.modules",
                "public.clients"
            ]
        );
        assert!(rules.find("public.modules").is_some());
        assert!(rules.find("modules").is_some());
        assert!(rules.find("other").is_none());
    }

    #[test]
    fn glob_escape_escapes_every_metacharacter() {
        assert_eq!(glob_escape(r"a*b?c[d]e\f:g"), r"a\*b\?c\[d\]e\\f:g");
    }
}
