//! Decoding of the `pgoutput` (protocol version 1) messages `logical` delivery needs: Begin,
//! Commit, Relation, Insert, Update, Delete, Truncate and logical decoding messages (what
//! `pg_logical_emit_message` wrote).
//!
//! Pure and total: any byte string either decodes or yields a [`PgOutputError`]; never a panic.
//! Formats: <https://www.postgresql.org/docs/current/protocol-logicalrep-message-formats.html>.

use std::borrow::Cow;

use thiserror::Error;

#[derive(Debug, Error, PartialEq, Eq)]
pub enum PgOutputError {
    #[error("pgoutput message ends early (reading {0})")]
    Truncated(&'static str),
    #[error("pgoutput message has an unknown tuple marker `{0}`")]
    TupleMarker(char),
    #[error("pgoutput column value of unknown kind `{0}`")]
    ValueKind(char),
}

/// A table as the stream describes it before its first change (and again after DDL).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Relation {
    pub id: u32,
    /// `schema.table`, as the rules name tables.
    pub table: String,
    pub columns: Vec<String>,
}

/// One column value of a row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Value<'a> {
    Null,
    /// A TOASTed value the UPDATE did not change, so the stream does not carry it.
    Unchanged,
    Text(Cow<'a, str>),
}

impl crate::core::rules::RowValue for Value<'_> {
    fn text(&self) -> Result<Option<&str>, crate::core::rules::Unreadable> {
        match self {
            Value::Text(text) => Ok(Some(text)),
            Value::Null => Ok(None),
            Value::Unchanged => Err(crate::core::rules::Unreadable),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message<'a> {
    Relation(Relation),
    Insert {
        relation: u32,
        new: Vec<Value<'a>>,
    },
    /// `old` is there when the table's replica identity is FULL (the whole old row) or the key
    /// changed (the key columns, others null).
    Update {
        relation: u32,
        old: Option<Vec<Value<'a>>>,
        new: Vec<Value<'a>>,
    },
    Delete {
        relation: u32,
        old: Vec<Value<'a>>,
    },
    Truncate {
        relations: Vec<u32>,
    },
    Begin {
        /// Microseconds since 2000-01-01.
        commit_time_micros: i64,
    },
    Commit {
        /// Where the transaction's WAL ends: what may be confirmed once it is invalidated.
        end_lsn: u64,
    },
    /// A logical decoding message; `transactional` ones arrive inside their transaction.
    Logical {
        transactional: bool,
        lsn: u64,
        prefix: Cow<'a, str>,
        content: &'a [u8],
    },
    /// A block of a transaction still in progress begins (`streaming`, protocol version 2):
    /// the changes up to [`Message::StreamStop`] are that transaction's, decoded with
    /// [`decode_streamed`].
    StreamStart {
        xid: u32,
    },
    StreamStop,
    /// A streamed transaction committed: its changes, sent in blocks before, now count.
    StreamCommit {
        xid: u32,
        /// Where the transaction's WAL ends, as in [`Message::Commit`].
        end_lsn: u64,
        /// Microseconds since 2000-01-01.
        commit_time_micros: i64,
    },
    /// A streamed transaction (`xid == subxid`) or one of its subtransactions rolled back.
    StreamAbort {
        xid: u32,
        subxid: u32,
    },
    /// Anything else (Origin, Type): nothing for us here.
    Other,
}

struct Reader<'a> {
    data: &'a [u8],
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize, what: &'static str) -> Result<&'a [u8], PgOutputError> {
        if self.data.len() < n {
            return Err(PgOutputError::Truncated(what));
        }
        let (head, rest) = self.data.split_at(n);
        self.data = rest;
        Ok(head)
    }

    fn u8(&mut self, what: &'static str) -> Result<u8, PgOutputError> {
        Ok(self.take(1, what)?[0])
    }

    fn u16(&mut self, what: &'static str) -> Result<u16, PgOutputError> {
        let b = self.take(2, what)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }

    fn u32(&mut self, what: &'static str) -> Result<u32, PgOutputError> {
        let b = self.take(4, what)?;
        Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }

    fn u64(&mut self, what: &'static str) -> Result<u64, PgOutputError> {
        let mut bytes = [0; 8];
        bytes.copy_from_slice(self.take(8, what)?);
        Ok(u64::from_be_bytes(bytes))
    }

    fn cstr(&mut self, what: &'static str) -> Result<Cow<'a, str>, PgOutputError> {
        let end = self
            .data
            .iter()
            .position(|&b| b == 0)
            .ok_or(PgOutputError::Truncated(what))?;
        let text = self.take(end, what)?;
        self.take(1, what)?;
        Ok(String::from_utf8_lossy(text))
    }

    fn tuple(&mut self) -> Result<Vec<Value<'a>>, PgOutputError> {
        let count = self.u16("tuple width")?;
        let mut values = Vec::with_capacity(usize::from(count).min(1_600));
        for _ in 0..count {
            values.push(match self.u8("value kind")? {
                b'n' => Value::Null,
                b'u' => Value::Unchanged,
                b't' | b'b' => {
                    let len = self.u32("value length")? as usize;
                    Value::Text(String::from_utf8_lossy(self.take(len, "value")?))
                }
                other => return Err(PgOutputError::ValueKind(char::from(other))),
            });
        }
        Ok(values)
    }
}

/// Decodes one message sent outside a stream block.
pub fn decode(data: &[u8]) -> Result<Message<'_>, PgOutputError> {
    decode_in(data, false)
}

/// Decodes one message sent inside a stream block (between Stream Start and Stream Stop),
/// where every message of the transaction carries its id after the tag.
pub fn decode_streamed(data: &[u8]) -> Result<Message<'_>, PgOutputError> {
    decode_in(data, true)
}

/// Where the relation id of an Insert, Update or Delete starts: after the tag, and in a stream
/// block after the transaction id too.
pub fn relation_offset(streamed: bool) -> usize {
    if streamed { 5 } else { 1 }
}

fn decode_in(data: &[u8], streamed: bool) -> Result<Message<'_>, PgOutputError> {
    let mut r = Reader { data };
    let Some(&tag) = data.first() else {
        return Ok(Message::Other);
    };
    r.take(1, "tag")?;
    if streamed && matches!(tag, b'R' | b'I' | b'U' | b'D' | b'T' | b'M' | b'Y') {
        r.u32("transaction id")?;
    }
    Ok(match tag {
        b'R' => {
            let id = r.u32("relation id")?;
            let schema = r.cstr("schema")?;
            let name = r.cstr("table name")?;
            r.u8("replica identity")?;
            let count = r.u16("column count")?;
            let mut columns = Vec::with_capacity(usize::from(count).min(1_600));
            for _ in 0..count {
                r.u8("column flags")?;
                columns.push(r.cstr("column name")?.into_owned());
                r.u32("column type")?;
                r.u32("column type modifier")?;
            }
            Message::Relation(Relation {
                id,
                table: format!("{schema}.{name}"),
                columns,
            })
        }
        b'I' => {
            let relation = r.u32("relation id")?;
            match r.u8("tuple marker")? {
                b'N' => Message::Insert {
                    relation,
                    new: r.tuple()?,
                },
                other => return Err(PgOutputError::TupleMarker(char::from(other))),
            }
        }
        b'U' => {
            let relation = r.u32("relation id")?;
            let mut old = None;
            let mut marker = r.u8("tuple marker")?;
            if marker == b'K' || marker == b'O' {
                old = Some(r.tuple()?);
                marker = r.u8("tuple marker")?;
            }
            if marker != b'N' {
                return Err(PgOutputError::TupleMarker(char::from(marker)));
            }
            Message::Update {
                relation,
                old,
                new: r.tuple()?,
            }
        }
        b'D' => {
            let relation = r.u32("relation id")?;
            match r.u8("tuple marker")? {
                b'K' | b'O' => Message::Delete {
                    relation,
                    old: r.tuple()?,
                },
                other => return Err(PgOutputError::TupleMarker(char::from(other))),
            }
        }
        b'T' => {
            let count = r.u32("relation count")?;
            r.u8("truncate options")?;
            let mut relations = Vec::with_capacity((count as usize).min(10_000));
            for _ in 0..count {
                relations.push(r.u32("relation id")?);
            }
            Message::Truncate { relations }
        }
        b'B' => {
            r.u64("final position")?;
            let commit_time_micros = r.u64("commit time")? as i64;
            r.u32("transaction id")?;
            Message::Begin { commit_time_micros }
        }
        b'C' => {
            r.u8("commit flags")?;
            r.u64("commit position")?;
            let end_lsn = r.u64("end position")?;
            r.u64("commit time")?;
            Message::Commit { end_lsn }
        }
        b'M' => {
            let transactional = r.u8("message flags")? & 1 == 1;
            let lsn = r.u64("message position")?;
            let prefix = r.cstr("message prefix")?;
            let len = r.u32("message length")? as usize;
            Message::Logical {
                transactional,
                lsn,
                prefix,
                content: r.take(len, "message content")?,
            }
        }
        b'S' => {
            let xid = r.u32("transaction id")?;
            r.u8("first segment")?;
            Message::StreamStart { xid }
        }
        b'E' => Message::StreamStop,
        b'c' => {
            let xid = r.u32("transaction id")?;
            r.u8("commit flags")?;
            r.u64("commit position")?;
            let end_lsn = r.u64("end position")?;
            let commit_time_micros = r.u64("commit time")? as i64;
            Message::StreamCommit {
                xid,
                end_lsn,
                commit_time_micros,
            }
        }
        b'A' => Message::StreamAbort {
            xid: r.u32("transaction id")?,
            subxid: r.u32("subtransaction id")?,
        },
        _ => Message::Other,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(s: &str) -> Value<'_> {
        Value::Text(Cow::Borrowed(s))
    }

    fn tuple(values: &[Option<&str>]) -> Vec<u8> {
        let mut out = (values.len() as u16).to_be_bytes().to_vec();
        for v in values {
            match v {
                None => out.push(b'n'),
                Some(s) => {
                    out.push(b't');
                    out.extend((s.len() as u32).to_be_bytes());
                    out.extend(s.as_bytes());
                }
            }
        }
        out
    }

    /// A Relation message exactly as PostgreSQL 15 sent it for `public.products`.
    #[test]
    fn relation_as_postgres_sends_it() {
        let mut m = b"R\0\0@\x01public\0products\0f\0\x02".to_vec();
        m.extend(b"\x01id\0\0\0\x0b\x86\xff\xff\xff\xff");
        m.extend(b"\x00client_id\0\0\0\x0b\x86\xff\xff\xff\xff");
        assert_eq!(
            decode(&m).unwrap(),
            Message::Relation(Relation {
                id: 0x4001,
                table: "public.products".into(),
                columns: vec!["id".into(), "client_id".into()],
            })
        );
    }

    #[test]
    fn update_with_full_old_row() {
        let mut m = b"U\0\0\0\x07O".to_vec();
        m.extend(tuple(&[Some("p1"), Some("c1")]));
        m.push(b'N');
        m.extend(tuple(&[Some("p1"), None]));
        assert_eq!(
            decode(&m).unwrap(),
            Message::Update {
                relation: 7,
                old: Some(vec![text("p1"), text("c1")]),
                new: vec![text("p1"), Value::Null],
            }
        );
    }

    #[test]
    fn insert_delete_truncate_and_others() {
        let mut insert = b"I\0\0\0\x07N".to_vec();
        insert.extend(tuple(&[Some("x")]));
        assert!(matches!(
            decode(&insert).unwrap(),
            Message::Insert { relation: 7, .. }
        ));
        let mut delete = b"D\0\0\0\x07K".to_vec();
        delete.extend(tuple(&[Some("x")]));
        assert!(matches!(
            decode(&delete).unwrap(),
            Message::Delete { relation: 7, .. }
        ));
        let truncate = b"T\0\0\0\x02\x01\0\0\0\x07\0\0\0\x08";
        assert_eq!(
            decode(truncate).unwrap(),
            Message::Truncate {
                relations: vec![7, 8]
            }
        );
        assert_eq!(decode(b"Yxxxxxxxx").unwrap(), Message::Other);
        assert_eq!(decode(b"").unwrap(), Message::Other);
        assert_eq!(
            decode(b"Bxxxxxxxx"),
            Err(PgOutputError::Truncated("commit time"))
        );
    }

    /// Begin, Commit and a message as PostgreSQL 15 sends them.
    #[test]
    fn transaction_frame_and_messages() {
        let mut begin = b"B".to_vec();
        begin.extend(0x10u64.to_be_bytes());
        begin.extend(1_000_000i64.to_be_bytes());
        begin.extend(7u32.to_be_bytes());
        assert_eq!(
            decode(&begin).unwrap(),
            Message::Begin {
                commit_time_micros: 1_000_000
            }
        );
        let mut commit = b"C\0".to_vec();
        commit.extend(0x10u64.to_be_bytes());
        commit.extend(0x18u64.to_be_bytes());
        commit.extend(1_000_000i64.to_be_bytes());
        assert_eq!(decode(&commit).unwrap(), Message::Commit { end_lsn: 0x18 });
        let mut message = b"M\x01".to_vec();
        message.extend(0x20u64.to_be_bytes());
        message.extend(b"evictd\0");
        message.extend(4u32.to_be_bytes());
        message.extend(b"{}ok");
        assert_eq!(
            decode(&message).unwrap(),
            Message::Logical {
                transactional: true,
                lsn: 0x20,
                prefix: Cow::Borrowed("evictd"),
                content: b"{}ok",
            }
        );
        assert_eq!(
            decode(&message[..message.len() - 1]),
            Err(PgOutputError::Truncated("message content"))
        );
    }

    #[test]
    fn unchanged_toast_is_its_own_value() {
        let m = b"U\0\0\0\x01N\0\x01u";
        assert_eq!(
            decode(m).unwrap(),
            Message::Update {
                relation: 1,
                old: None,
                new: vec![Value::Unchanged],
            }
        );
    }

    /// Every prefix of a valid message is an error or a value, never a panic; so is garbage.
    #[test]
    fn truncated_and_garbage_input_never_panics() {
        let mut m = b"U\0\0\0\x07O".to_vec();
        m.extend(tuple(&[Some("p1"), Some("c1")]));
        m.push(b'N');
        m.extend(tuple(&[Some("p1"), None]));
        for end in 0..m.len() {
            let _ = decode(&m[..end]);
        }
        assert_eq!(
            decode(b"I\0\0\0\x07X"),
            Err(PgOutputError::TupleMarker('X'))
        );
        assert_eq!(
            decode(b"I\0\0\0\x07N\0\x01z"),
            Err(PgOutputError::ValueKind('z'))
        );
        assert_eq!(
            decode(b"I\0\0\0\x07N\0\x01t\xff\xff\xff\xff"),
            Err(PgOutputError::Truncated("value"))
        );
    }
}
