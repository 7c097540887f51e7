//! `ChangeEvent`: one committed statement (or one explicit `invalidate_tags` call) as the triggers
//! describe it, and the parser for the JSON they write.
//!
//! Pure and total: any byte string either parses or yields an [`EventError`] naming the reason.
//! The same JSON arrives through NOTIFY payloads (`notify` delivery, signed), outbox rows
//! (`outbox`) and logical decoding messages (`logical`: `invalidate_tags` and old rows, signed).
//!
//! Wire format, version 1 (written by the SQL in `schema::ddl`):
//!
//! ```json
//! {"v":1,"op":"UPDATE","table":"public.products","ts":1732871234567,
//!  "cols":["client_id","id"],"rows":[["c1","p1"],["c2","p1"]]}
//! {"v":1,"op":"UPDATE","table":"public.products","ts":1732871234567,"wide":true}
//! {"v":1,"op":"TAGS","ts":1732871234567,"tags":["products:all"]}
//! ```
//!
//! `rows` holds the distinct combinations of the referenced columns over old and new rows, as
//! PostgreSQL text (`null` for NULL). `ts` is the statement's clock time in Unix milliseconds.

use std::borrow::Cow;
use std::fmt;
use std::ops::Range;

use serde::Deserialize;
use serde::de::{Deserializer, Visitor};
use thiserror::Error;

/// The kind of statement that produced an event.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Op {
    Insert,
    Update,
    Delete,
    Truncate,
    /// An explicit `evictd.invalidate_tags(...)` call.
    Tags,
}

impl Op {
    pub fn as_str(self) -> &'static str {
        match self {
            Op::Insert => "INSERT",
            Op::Update => "UPDATE",
            Op::Delete => "DELETE",
            Op::Truncate => "TRUNCATE",
            Op::Tags => "TAGS",
        }
    }

    pub fn parse(text: &str) -> Option<Self> {
        Some(match text.to_ascii_uppercase().as_str() {
            "INSERT" => Op::Insert,
            "UPDATE" => Op::Update,
            "DELETE" => Op::Delete,
            "TRUNCATE" => Op::Truncate,
            "TAGS" => Op::Tags,
            _ => return None,
        })
    }
}

/// A row value as PostgreSQL text, borrowed from the payload when it has no JSON escapes: a
/// 100,000-row event then costs no allocation per value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Text<'a>(pub Cow<'a, str>);

impl Text<'_> {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl<'a> From<&'a str> for Text<'a> {
    fn from(text: &'a str) -> Self {
        Text(Cow::Borrowed(text))
    }
}

impl<'de: 'a, 'a> Deserialize<'de> for Text<'a> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct TextVisitor;
        impl<'de> Visitor<'de> for TextVisitor {
            type Value = Cow<'de, str>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a string")
            }
            fn visit_borrowed_str<E>(self, v: &'de str) -> Result<Self::Value, E> {
                Ok(Cow::Borrowed(v))
            }
            fn visit_str<E>(self, v: &str) -> Result<Self::Value, E> {
                Ok(Cow::Owned(v.to_owned()))
            }
            fn visit_string<E>(self, v: String) -> Result<Self::Value, E> {
                Ok(Cow::Owned(v))
            }
        }
        deserializer.deserialize_str(TextVisitor).map(Text)
    }
}

impl crate::core::rules::RowValue for Option<Text<'_>> {
    fn text(&self) -> Result<Option<&str>, crate::core::rules::Unreadable> {
        Ok(self.as_ref().map(Text::as_str))
    }
}

/// The rows of an event, stored flat (`width` values per row) so that a statement of 100,000
/// rows costs one allocation, not one per row.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Rows<'a> {
    width: usize,
    count: usize,
    values: Vec<Option<Text<'a>>>,
    /// The first row whose width differs from the first row's: (index, width).
    ragged: Option<(usize, usize)>,
}

impl<'a> Rows<'a> {
    /// Rows built from nested vectors (all of the same width).
    pub fn from_nested(rows: Vec<Vec<Option<Text<'a>>>>) -> Self {
        let width = rows.first().map_or(0, Vec::len);
        let count = rows.len();
        Self {
            width,
            count,
            values: rows.into_iter().flatten().collect(),
            ragged: None,
        }
    }

    pub fn len(&self) -> usize {
        self.count
    }

    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// Each row as a slice of `width` values.
    pub fn iter(&self) -> impl Iterator<Item = &[Option<Text<'a>>]> {
        let width = self.width;
        (0..self.count).map(move |i| &self.values[i * width..(i + 1) * width])
    }

    /// The rows in `range` (clamped to the rows there are), each as a slice of `width` values.
    pub fn range(&self, range: Range<usize>) -> impl Iterator<Item = &[Option<Text<'a>>]> {
        let width = self.width;
        let end = range.end.min(self.count);
        (range.start.min(end)..end).map(move |i| &self.values[i * width..(i + 1) * width])
    }
}

impl<'de: 'a, 'a> Deserialize<'de> for Rows<'a> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct RowsVisitor;
        impl<'de> Visitor<'de> for RowsVisitor {
            type Value = Rows<'de>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("an array of arrays of strings or nulls")
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                mut seq: A,
            ) -> Result<Self::Value, A::Error> {
                let mut rows = Rows::default();
                while let Some(row) = seq.next_element_seed(RowSeed(&mut rows.values))? {
                    if rows.count == 0 {
                        rows.width = row;
                    } else if row != rows.width && rows.ragged.is_none() {
                        rows.ragged = Some((rows.count, row));
                    }
                    rows.count += 1;
                }
                Ok(rows)
            }
        }
        deserializer.deserialize_seq(RowsVisitor)
    }
}

/// Appends one row's values to the flat vector; yields the row's width.
struct RowSeed<'v, 'a>(&'v mut Vec<Option<Text<'a>>>);

impl<'de: 'a, 'a> serde::de::DeserializeSeed<'de> for RowSeed<'_, 'a> {
    type Value = usize;
    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<usize, D::Error> {
        struct RowVisitor<'v, 'a>(&'v mut Vec<Option<Text<'a>>>);
        impl<'de: 'a, 'a> Visitor<'de> for RowVisitor<'_, 'a> {
            type Value = usize;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("an array of strings or nulls")
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                mut seq: A,
            ) -> Result<usize, A::Error> {
                let mut width = 0;
                while let Some(value) = seq.next_element::<Option<Text<'de>>>()? {
                    self.0.push(value);
                    width += 1;
                }
                Ok(width)
            }
        }
        deserializer.deserialize_seq(RowVisitor(self.0))
    }
}

/// What changed, as far as invalidation cares.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change<'a> {
    /// Distinct values of `columns` over the statement's old and new rows.
    Rows {
        columns: Vec<String>,
        rows: Rows<'a>,
    },
    /// Too many rows to list, or TRUNCATE: everything the table's rule can produce.
    TableWide,
    /// Explicit tags from `evictd.invalidate_tags`.
    Tags(Vec<String>),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChangeEvent<'a> {
    pub op: Op,
    /// `schema.table`; `None` for explicit tags.
    pub table: Option<String>,
    /// When the statement ran (Unix ms, database clock), for the lag metric.
    pub ts_ms: Option<i64>,
    pub change: Change<'a>,
}

/// Why a payload was rejected. The daemon logs it, counts it and moves on.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum EventError {
    #[error("payload is not evictd JSON: {0}")]
    Json(String),
    #[error("unsupported payload version {0} (this evictd reads version 1)")]
    Version(u32),
    #[error("unknown operation `{0}`")]
    Op(String),
    #[error("{0} event without a table")]
    MissingTable(&'static str),
    #[error("row {index} has {got} values for {expected} columns")]
    RowWidth {
        index: usize,
        got: usize,
        expected: usize,
    },
    #[error("TAGS event with no tags")]
    NoTags,
    #[error("empty tag name")]
    EmptyTag,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Wire<'a> {
    v: u32,
    op: String,
    #[serde(default)]
    table: Option<String>,
    #[serde(default)]
    ts: Option<i64>,
    #[serde(default)]
    cols: Vec<String>,
    #[serde(default, borrow)]
    rows: Rows<'a>,
    #[serde(default)]
    wide: bool,
    #[serde(default)]
    tags: Vec<String>,
}

impl<'a> ChangeEvent<'a> {
    /// Parses one payload, borrowing row values from it. Never panics, whatever the input.
    pub fn parse(payload: &'a str) -> Result<Self, EventError> {
        let wire: Wire =
            serde_json::from_str(payload).map_err(|e| EventError::Json(e.to_string()))?;
        if wire.v != 1 {
            return Err(EventError::Version(wire.v));
        }
        let op = Op::parse(&wire.op).ok_or_else(|| EventError::Op(truncate(&wire.op, 40)))?;
        let change = match op {
            Op::Tags => {
                if wire.tags.is_empty() {
                    return Err(EventError::NoTags);
                }
                if wire.tags.iter().any(|t| t.is_empty()) {
                    return Err(EventError::EmptyTag);
                }
                Change::Tags(wire.tags)
            }
            Op::Truncate => Change::TableWide,
            Op::Insert | Op::Update | Op::Delete if wire.wide => Change::TableWide,
            Op::Insert | Op::Update | Op::Delete => {
                let expected = wire.cols.len();
                if let Some((index, got)) = wire.rows.ragged {
                    return Err(EventError::RowWidth {
                        index,
                        got,
                        expected,
                    });
                }
                if !wire.rows.is_empty() && wire.rows.width != expected {
                    return Err(EventError::RowWidth {
                        index: 0,
                        got: wire.rows.width,
                        expected,
                    });
                }
                Change::Rows {
                    columns: wire.cols,
                    rows: wire.rows,
                }
            }
        };
        if op != Op::Tags && wire.table.as_deref().is_none_or(str::is_empty) {
            return Err(EventError::MissingTable(op.as_str()));
        }
        Ok(Self {
            op,
            table: wire.table,
            ts_ms: wire.ts,
            change,
        })
    }
}

impl<'a> ChangeEvent<'a> {
    /// The row ranges of at most `rows_per_part` rows that cover a many-row event, so the daemon
    /// can invalidate a huge statement in bounded pieces without copying its rows. Any other
    /// event is one part (an empty range, which [`crate::core::batch::Batch::add_part`] ignores for
    /// events without rows).
    pub fn parts(&self, rows_per_part: usize) -> Vec<Range<usize>> {
        let per_part = rows_per_part.max(1);
        let len = match &self.change {
            Change::Rows { rows, .. } => rows.len(),
            _ => 0,
        };
        let mut parts: Vec<Range<usize>> = (0..len)
            .step_by(per_part)
            .map(|start| start..(start + per_part).min(len))
            .collect();
        if parts.is_empty() {
            parts.push(0..0);
        }
        parts
    }
}

/// At most `max` characters of `text`, for echoing hostile input into a log line.
pub fn truncate(text: &str, max: usize) -> String {
    match text.char_indices().nth(max) {
        Some((at, _)) => format!("{}…", &text[..at]),
        None => text.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_rows_event() {
        let e = ChangeEvent::parse(
            r#"{"v":1,"op":"UPDATE","table":"public.products","ts":5,"cols":["client_id","id"],"rows":[["c1","p1"],[null,"p1"]]}"#,
        )
        .unwrap();
        assert_eq!(e.op, Op::Update);
        assert_eq!(e.table.as_deref(), Some("public.products"));
        assert_eq!(
            e.change,
            Change::Rows {
                columns: vec!["client_id".into(), "id".into()],
                rows: Rows::from_nested(vec![
                    vec![Some("c1".into()), Some("p1".into())],
                    vec![None, Some("p1".into())]
                ]),
            }
        );
    }

    #[test]
    fn parses_wide_and_tags_events() {
        let e = ChangeEvent::parse(r#"{"v":1,"op":"UPDATE","table":"t","wide":true}"#).unwrap();
        assert_eq!(e.change, Change::TableWide);
        let e = ChangeEvent::parse(r#"{"v":1,"op":"TRUNCATE","table":"t"}"#).unwrap();
        assert_eq!(e.change, Change::TableWide);
        let e = ChangeEvent::parse(r#"{"v":1,"op":"TAGS","tags":["a","b"]}"#).unwrap();
        assert_eq!(e.change, Change::Tags(vec!["a".into(), "b".into()]));
    }

    #[test]
    fn rejects_bad_payloads_with_reasons() {
        type Expect = fn(&EventError) -> bool;
        let cases: &[(&str, Expect)] = &[
            ("hello", |e| matches!(e, EventError::Json(_))),
            ("", |e| matches!(e, EventError::Json(_))),
            (r#"{"v":2,"op":"TAGS","tags":["a"]}"#, |e| {
                matches!(e, EventError::Version(2))
            }),
            (r#"{"v":1,"op":"MERGE","table":"t"}"#, |e| {
                matches!(e, EventError::Op(_))
            }),
            (r#"{"v":1,"op":"INSERT","cols":[],"rows":[]}"#, |e| {
                matches!(e, EventError::MissingTable(_))
            }),
            (
                r#"{"v":1,"op":"INSERT","table":"t","cols":["a"],"rows":[["1","2"]]}"#,
                |e| matches!(e, EventError::RowWidth { .. }),
            ),
            (r#"{"v":1,"op":"TAGS","tags":[]}"#, |e| {
                matches!(e, EventError::NoTags)
            }),
            (r#"{"v":1,"op":"TAGS","tags":[""]}"#, |e| {
                matches!(e, EventError::EmptyTag)
            }),
            (r#"{"v":1,"op":"TAGS","tags":["a"],"extra":1}"#, |e| {
                matches!(e, EventError::Json(_))
            }),
            (
                r#"{"v":1,"op":"INSERT","table":"t","cols":["a"],"rows":[[1]]}"#,
                |e| matches!(e, EventError::Json(_)),
            ),
        ];
        for (payload, expected) in cases {
            let err = ChangeEvent::parse(payload).unwrap_err();
            assert!(expected(&err), "{payload}: {err}");
        }
    }

    /// Values without escapes are borrowed from the payload; escaped ones are unescaped.
    #[test]
    fn values_are_borrowed_unless_escaped() {
        let e = ChangeEvent::parse(
            r#"{"v":1,"op":"INSERT","table":"t","cols":["id"],"rows":[["plain"],["a\"b"]]}"#,
        )
        .unwrap();
        let Change::Rows { rows, .. } = e.change else {
            panic!("rows expected")
        };
        let rows: Vec<&[Option<Text>]> = rows.iter().collect();
        assert!(matches!(
            rows[0][0].as_ref().unwrap().0,
            Cow::Borrowed("plain")
        ));
        assert_eq!(rows[1][0].as_ref().unwrap().as_str(), "a\"b");
    }

    #[test]
    fn parts_cover_every_row_once() {
        let e = ChangeEvent::parse(
            r#"{"v":1,"op":"UPDATE","table":"t","ts":3,"cols":["id"],"rows":[["1"],["2"],["3"],["4"],["5"]]}"#,
        )
        .unwrap();
        let parts = e.parts(2);
        assert_eq!(parts, [0..2, 2..4, 4..5]);
        let Change::Rows { rows, .. } = &e.change else {
            panic!("rows expected")
        };
        let ids: Vec<&str> = parts
            .into_iter()
            .flat_map(|part| rows.range(part))
            .map(|r| r[0].as_ref().unwrap().as_str())
            .collect();
        assert_eq!(ids, ["1", "2", "3", "4", "5"]);
        assert_eq!(
            rows.range(4..9).count(),
            1,
            "a range past the end is clamped"
        );
        let wide = ChangeEvent::parse(r#"{"v":1,"op":"TRUNCATE","table":"t"}"#).unwrap();
        let whole = wide.parts(2);
        assert!(whole.len() == 1 && whole[0].is_empty(), "{whole:?}");
    }

    #[test]
    fn truncate_keeps_char_boundaries() {
        assert_eq!(truncate("ééé", 2), "éé…");
        assert_eq!(truncate("ab", 5), "ab");
    }
}
