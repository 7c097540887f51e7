//! `logical` delivery: committed changes streamed from a logical replication slot (`pgoutput`,
//! publication `evictd`) instead of written by triggers, so writers pay nearly nothing. Only
//! old values the WAL lacks (rule columns outside the replica identity, of rows deleted or
//! moved) come from triggers, as messages with prefix `evictd-old` (`schema::ddl::publication`).
//!
//! The slot is the durable queue: PostgreSQL keeps the WAL from the last position we confirmed,
//! and we confirm a transaction's end only after Redis confirmed its invalidation
//! (at-least-once, as in outbox mode). Changes arrive only after their transaction committed,
//! in commit order; a transaction touching more than `wide_row_threshold` rows of a table
//! invalidates that table table-wide, as the triggers would.

use std::collections::{HashMap, HashSet};

use tokio_postgres::Client;

use super::SourceError;
use super::pgoutput::{self, Message, Relation, Value};
use super::walsender::{Frame, Lsn, Quiet, Target, WalStream};
use crate::batch::Batch;
use crate::config::Settings;
use crate::event::{ChangeEvent, Op};
use crate::rules::Rules;
use crate::schema::ddl::{OLD_ROWS_PREFIX, PUBLICATION, SLOT_NAME_SQL};

/// Milliseconds between the Unix epoch and PostgreSQL's (2000-01-01).
const PG_EPOCH_UNIX_MS: i64 = 946_684_800_000;

/// What [`ensure_slot`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SlotState {
    /// The slot was there: everything since our last confirmed position is still in the WAL.
    Kept,
    /// The slot had to be created (or re-created, its WAL lost): changes before now are
    /// unknown.
    Created,
}

/// The slot name installed in `evictd.settings`, or the one `migrate` would install.
pub async fn slot_name(client: &Client) -> Result<String, SourceError> {
    let row = client
        .query_one(
            &format!(
                "SELECT coalesce((SELECT value FROM evictd.settings WHERE key = 'slot'), {SLOT_NAME_SQL})"
            ),
            &[],
        )
        .await?;
    Ok(row.get(0))
}

/// Makes sure slot `slot` exists and still has its WAL.
pub async fn ensure_slot(client: &Client, slot: &str) -> Result<SlotState, SourceError> {
    let row = client
        .query_opt(
            "SELECT coalesce(wal_status, '') FROM pg_replication_slots WHERE slot_name = $1",
            &[&slot],
        )
        .await?;
    match row.map(|r| r.get::<_, String>(0)) {
        Some(status) if status != "lost" => return Ok(SlotState::Kept),
        Some(_) => {
            tracing::warn!(
                slot,
                "the replication slot lost its WAL (max_slot_wal_keep_size); re-creating it"
            );
            client
                .execute("SELECT pg_drop_replication_slot($1)", &[&slot])
                .await?;
        }
        None => {}
    }
    client
        .execute(
            "SELECT pg_create_logical_replication_slot($1, 'pgoutput')",
            &[&slot],
        )
        .await?;
    Ok(SlotState::Created)
}

/// Drops slot `slot` if it exists and no daemon streams from it.
pub async fn drop_slot(client: &Client, slot: &str) -> Result<bool, tokio_postgres::Error> {
    let dropped = client
        .execute(
            "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots \
             WHERE slot_name = $1 AND NOT active",
            &[&slot],
        )
        .await?;
    Ok(dropped > 0)
}

/// The change stream of one session.
pub struct LogicalStream {
    wal: WalStream,
    /// What has been folded so far (pure: tested without a server).
    pub state: Folder,
    /// Targets folded from a transaction not yet read to its end: held back (up to a bound)
    /// rather than invalidated piecemeal, so the tags every row shares (`products:all`, the
    /// client's tag) go to Redis once per transaction instead of once per slice read.
    pub pending: Batch,
}

/// Turns the stream's events into targets: relations seen, per-transaction row counts, what is
/// complete enough to confirm, the liveness marker awaited.
#[derive(Default)]
pub struct Folder {
    relations: HashMap<u32, Known>,
    /// Rows seen per table in the transaction being read, and the tables already widened.
    rows_in_tx: HashMap<u32, u64>,
    wide_in_tx: HashSet<u32>,
    counted_in_tx: HashSet<(u32, Op)>,
    /// How far everything read is complete: the end of the last transaction, or a keepalive's
    /// position between transactions. What may be confirmed once the batch is in Redis.
    pub confirmable: Option<Lsn>,
    /// Inside a transaction (between Begin and Commit): a keepalive then says nothing about
    /// the rest of the transaction, so it moves nothing.
    pub in_transaction: bool,
    /// The heartbeat marker written into the WAL and not yet seen back, with when it was
    /// written: the end-to-end liveness probe of the replication path.
    pub awaiting: Option<(String, std::time::Instant)>,
}

/// Prefix of the non-transactional messages the daemon writes into the WAL and reads back:
/// at start (caught up) and on every health tick (the stream is alive, and everything before
/// the marker has been delivered, so its position may be confirmed).
pub const MARKER_PREFIX: &str = "evictd-marker";

/// Writes a marker carrying `nonce` into the WAL (it needs no transaction and no privilege).
pub async fn write_marker(client: &Client, nonce: &str) -> Result<(), SourceError> {
    client
        .execute(
            "SELECT pg_logical_emit_message(false, $1, $2)",
            &[&MARKER_PREFIX, &nonce],
        )
        .await?;
    Ok(())
}

impl LogicalStream {
    /// See [`WalStream::quiet_until`].
    pub fn quiet_until(&self, bytes: usize) -> Quiet<'_> {
        self.wal.quiet_until(bytes)
    }

    /// Starts streaming from the slot's confirmed position, over the same host, credentials
    /// and TLS as `settings.database_url`.
    pub async fn start(settings: &Settings, slot: &str) -> Result<Self, SourceError> {
        let tls = crate::tls::pg_tls(&settings.database_url);
        let mut config = crate::db::parse_config(&tls.url)?;
        config.application_name("evictd-logical");
        let client_config = crate::db::tls_config(
            &settings.database_url,
            &tls,
            settings.tls_ca_file.as_deref(),
        )?;
        let wal = WalStream::start(Target {
            config: &config,
            tls: client_config,
            slot,
            publication: PUBLICATION,
        })
        .await?;
        Ok(Self {
            wal,
            state: Folder::default(),
            pending: Batch::default(),
        })
    }

    /// The next frame; `Err` when the stream ended (connection loss included). Cancel-safe.
    pub async fn recv(&mut self) -> Result<Frame, SourceError> {
        Ok(self.wal.recv().await?)
    }

    /// A frame already received, without waiting.
    pub fn try_recv(&mut self) -> Result<Option<Frame>, SourceError> {
        Ok(self.wal.try_recv()?)
    }

    /// Tells PostgreSQL everything up to `lsn` is done: the slot may release that WAL. The
    /// report goes out with the next [`Self::recv`].
    pub fn confirm(&mut self, lsn: Lsn) {
        self.wal.confirm(lsn);
    }
}

/// The content of `frame` if it is one of our markers.
pub fn marker_content(frame: &Frame) -> Option<&[u8]> {
    let Frame::XLogData(data) = frame else {
        return None;
    };
    if data.first() != Some(&b'M') {
        return None;
    }
    match pgoutput::decode(data) {
        Ok(Message::Logical {
            prefix, content, ..
        }) if prefix == MARKER_PREFIX => Some(content),
        _ => None,
    }
}

impl Folder {
    /// Folds one event into `batch`. A bad message or a table without a rule is returned as the
    /// reason (the caller logs and counts it); the stream goes on.
    pub fn fold(
        &mut self,
        frame: &Frame,
        rules: &Rules,
        wide_threshold: u64,
        batch: &mut Batch,
    ) -> Result<(), String> {
        let data = match frame {
            // Between transactions a keepalive's position is complete too: confirming it lets
            // the slot release WAL while only other tables are written.
            Frame::KeepAlive { wal_end } => {
                if !self.in_transaction {
                    self.advance(*wal_end);
                }
                return Ok(());
            }
            Frame::XLogData(data) => data,
        };
        // Rows of a table this transaction already invalidated table-wide need no decoding: a
        // 1,000,000-row UPDATE costs a byte check per row after the first `wide_row_threshold`.
        if let [tag @ (b'I' | b'U' | b'D'), a, b, c, d, ..] = data.as_ref() {
            let relation = u32::from_be_bytes([*a, *b, *c, *d]);
            if self.wide_in_tx.contains(&relation) {
                let op = match tag {
                    b'I' => Op::Insert,
                    b'U' => Op::Update,
                    _ => Op::Delete,
                };
                return self.count(relation, op, batch);
            }
        }
        match pgoutput::decode(data).map_err(|e| e.to_string())? {
            Message::Begin { commit_time_micros } => {
                self.in_transaction = true;
                self.rows_in_tx.clear();
                self.wide_in_tx.clear();
                self.counted_in_tx.clear();
                let ts = commit_time_micros / 1_000 + PG_EPOCH_UNIX_MS;
                batch.oldest_ts_ms = Some(batch.oldest_ts_ms.map_or(ts, |o| o.min(ts)));
            }
            Message::Commit { end_lsn } => {
                self.in_transaction = false;
                self.advance(Lsn(end_lsn));
            }
            Message::Logical {
                prefix,
                lsn,
                content,
                ..
            } if prefix == MARKER_PREFIX => {
                if self
                    .awaiting
                    .as_ref()
                    .is_some_and(|(nonce, _)| content == nonce.as_bytes())
                {
                    self.awaiting = None;
                }
                if !self.in_transaction {
                    self.advance(Lsn(lsn));
                }
            }
            Message::Logical {
                prefix, content, ..
            } if prefix == "evictd" || prefix == OLD_ROWS_PREFIX => {
                let text = String::from_utf8_lossy(content);
                let event = ChangeEvent::parse(&text).map_err(|e| e.to_string())?;
                // Old rows the WAL lacks belong to a change already counted as an event.
                let counted = prefix == "evictd";
                batch
                    .add_part(rules, &event, 0..usize::MAX, counted)
                    .map_err(|e| e.to_string())?;
            }
            change => self.fold_change(change, rules, wide_threshold, batch)?,
        }
        Ok(())
    }

    fn advance(&mut self, lsn: Lsn) {
        self.confirmable = Some(self.confirmable.map_or(lsn, |c| c.max(lsn)));
    }

    fn fold_change(
        &mut self,
        message: Message<'_>,
        rules: &Rules,
        wide_threshold: u64,
        batch: &mut Batch,
    ) -> Result<(), String> {
        let (relation, op, rows) = match message {
            Message::Relation(relation) => {
                self.relations
                    .insert(relation.id, Known::new(relation, rules));
                return Ok(());
            }
            Message::Truncate { relations } => {
                for id in relations {
                    self.count(id, Op::Truncate, batch)?;
                    self.widen(id, rules, batch)?;
                }
                return Ok(());
            }
            Message::Insert { relation, new } => (relation, Op::Insert, vec![new]),
            Message::Update { relation, old, new } => {
                let mut rows = vec![new];
                rows.extend(old);
                (relation, Op::Update, rows)
            }
            Message::Delete { relation, old } => (relation, Op::Delete, vec![old]),
            Message::Begin { .. }
            | Message::Commit { .. }
            | Message::Logical { .. }
            | Message::Other => return Ok(()),
        };
        self.count(relation, op, batch)?;
        if self.wide_in_tx.contains(&relation) {
            return Ok(());
        }
        let seen = self.rows_in_tx.entry(relation).or_default();
        *seen += 1;
        if *seen > wide_threshold {
            return self.widen(relation, rules, batch);
        }
        let known = self.known(relation)?;
        let rule = rules
            .find(&known.table)
            .ok_or_else(|| format!("table `{}` has no rule in this configuration", known.table))?;
        let Some(positions) = &known.positions else {
            // The table lacks a column the rules reference: everything it could make stale.
            return self.widen(relation, rules, batch);
        };
        let mut values: Vec<Option<&str>> = Vec::with_capacity(positions.len());
        let mut unknown = false;
        for row in &rows {
            values.clear();
            for &i in positions {
                match row.get(i) {
                    Some(Value::Text(text)) => values.push(Some(text)),
                    Some(Value::Null) | None => values.push(None),
                    // A TOASTed value the stream does not carry: the tag cannot be rendered.
                    Some(Value::Unchanged) => unknown = true,
                }
            }
            if unknown {
                break;
            }
            rule.row_targets(&values, &mut batch.targets);
        }
        if unknown {
            return self.widen(relation, rules, batch);
        }
        Ok(())
    }

    /// Counts one event per table and operation per transaction, like one statement trigger.
    fn count(&mut self, relation: u32, op: Op, batch: &mut Batch) -> Result<(), String> {
        if !self.counted_in_tx.contains(&(relation, op)) {
            let table = self.known(relation)?.table.clone();
            self.counted_in_tx.insert((relation, op));
            *batch.events.entry((table, op)).or_default() += 1;
        }
        Ok(())
    }

    /// Invalidates everything `relation`'s rule can produce, once per transaction.
    fn widen(&mut self, relation: u32, rules: &Rules, batch: &mut Batch) -> Result<(), String> {
        if self.wide_in_tx.contains(&relation) {
            return Ok(());
        }
        let known = self.known(relation)?;
        let rule = rules
            .find(&known.table)
            .ok_or_else(|| format!("table `{}` has no rule in this configuration", known.table))?;
        rule.table_wide_targets(&mut batch.targets);
        self.wide_in_tx.insert(relation);
        Ok(())
    }

    fn known(&self, relation: u32) -> Result<&Known, String> {
        self.relations
            .get(&relation)
            .ok_or_else(|| format!("change of relation {relation} before its description"))
    }
}

/// A relation the stream described, with where each of its rule's columns sits in its rows.
struct Known {
    table: String,
    /// Column index of each rule column; `None` when a rule column is missing.
    positions: Option<Vec<usize>>,
}

impl Known {
    fn new(relation: Relation, rules: &Rules) -> Self {
        let positions = rules.find(&relation.table).and_then(|rule| {
            rule.columns
                .iter()
                .map(|c| relation.columns.iter().position(|e| e == c))
                .collect()
        });
        Self {
            table: relation.table,
            positions,
        }
    }
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;

    use super::*;

    const PRODUCTS: u32 = 7;

    fn relation() -> Frame {
        let mut m = b"R\0\0\0\x07public\0products\0f\0\x03".to_vec();
        for column in ["id", "client_id", "name"] {
            m.extend(b"\x00");
            m.extend(column.as_bytes());
            m.extend(b"\0\0\0\x0b\x86\xff\xff\xff\xff");
        }
        xlog(m)
    }

    fn xlog(data: Vec<u8>) -> Frame {
        Frame::XLogData(Bytes::from(data))
    }

    /// A tuple of text values; `None` for NULL, `Some("\u{0}u")` for an unchanged TOAST value.
    fn tuple(values: &[Option<&str>]) -> Vec<u8> {
        let mut out = (values.len() as u16).to_be_bytes().to_vec();
        for v in values {
            match v {
                None => out.push(b'n'),
                Some("\u{0}u") => out.push(b'u'),
                Some(s) => {
                    out.push(b't');
                    out.extend((s.len() as u32).to_be_bytes());
                    out.extend(s.as_bytes());
                }
            }
        }
        out
    }

    fn update(old: &[Option<&str>], new: &[Option<&str>]) -> Frame {
        let mut m = b"U".to_vec();
        m.extend(PRODUCTS.to_be_bytes());
        m.push(b'O');
        m.extend(tuple(old));
        m.push(b'N');
        m.extend(tuple(new));
        xlog(m)
    }

    fn begin() -> Frame {
        let mut m = b"B".to_vec();
        m.extend(10u64.to_be_bytes());
        m.extend(1_000_000i64.to_be_bytes());
        m.extend(1u32.to_be_bytes());
        xlog(m)
    }

    fn commit(end: u64) -> Frame {
        let mut m = b"C\0".to_vec();
        m.extend((end - 1).to_be_bytes());
        m.extend(end.to_be_bytes());
        m.extend(1_000_000i64.to_be_bytes());
        xlog(m)
    }

    fn message(prefix: &str, content: &[u8]) -> Frame {
        let mut m = b"M\x01".to_vec();
        m.extend(1u64.to_be_bytes());
        m.extend(prefix.as_bytes());
        m.push(0);
        m.extend((content.len() as u32).to_be_bytes());
        m.extend(content);
        xlog(m)
    }

    fn fold_all(events: &[Frame], threshold: u64) -> (Folder, Batch) {
        let rules = Rules::defaults();
        let mut folder = Folder::default();
        let mut batch = Batch::default();
        for event in events {
            folder.fold(event, &rules, threshold, &mut batch).unwrap();
        }
        (folder, batch)
    }

    fn tags(batch: &Batch) -> Vec<&str> {
        batch.targets.tags.iter().map(String::as_str).collect()
    }

    #[test]
    fn update_moving_a_product_renders_old_and_new_rows() {
        let (folder, batch) = fold_all(
            &[
                begin(),
                relation(),
                update(
                    &[Some("p1"), Some("c1"), Some("a")],
                    &[Some("p1"), Some("c2"), Some("b")],
                ),
                commit(20),
            ],
            10,
        );
        assert_eq!(
            tags(&batch),
            [
                "products:all",
                "products:client:c1",
                "products:client:c2",
                "products:id:p1"
            ]
        );
        assert_eq!(folder.confirmable, Some(Lsn(20)));
        assert_eq!(batch.event_count(), 1);
        assert_eq!(batch.oldest_ts_ms, Some(1_000 + PG_EPOCH_UNIX_MS));
    }

    #[test]
    fn more_rows_than_the_threshold_go_table_wide_once() {
        let rows: Vec<Frame> = (0..5)
            .map(|i| {
                let id = format!("p{i}");
                update(
                    &[Some(&id), Some("c1"), None],
                    &[Some(&id), Some("c1"), None],
                )
            })
            .collect();
        let mut events = vec![begin(), relation()];
        events.extend(rows);
        events.push(commit(30));
        let (_, batch) = fold_all(&events, 3);
        assert!(batch.targets.wide_tables.contains("public.products"));
        assert!(batch.targets.tag_globs.contains("products:id:*"));
        // The rows before the threshold were rendered; none after it.
        assert!(batch.targets.tags.contains("products:id:p2"));
        assert!(!batch.targets.tags.contains("products:id:p3"));
        assert_eq!(batch.event_count(), 1);
    }

    /// A TOASTed column the UPDATE did not change is not in the stream: the tag cannot be
    /// rendered, so the table goes table-wide rather than miss it.
    #[test]
    fn unchanged_toast_value_in_a_rule_column_widens() {
        let (_, batch) = fold_all(
            &[
                begin(),
                relation(),
                update(
                    &[Some("p1"), Some("\u{0}u"), None],
                    &[Some("p1"), Some("\u{0}u"), None],
                ),
                commit(40),
            ],
            10,
        );
        assert!(batch.targets.wide_tables.contains("public.products"));
    }

    /// Keepalives and markers move the confirmable position only between transactions.
    #[test]
    fn positions_inside_a_transaction_are_not_confirmable() {
        let keepalive = |at: u64| Frame::KeepAlive { wal_end: Lsn(at) };
        let (folder, _) = fold_all(&[begin(), relation(), keepalive(99)], 10);
        assert_eq!(folder.confirmable, None);
        let (folder, _) = fold_all(&[begin(), commit(50), keepalive(99)], 10);
        assert_eq!(folder.confirmable, Some(Lsn(99)));
    }

    /// A change of a relation never described, or a malformed message, is an error the daemon
    /// logs and counts; folding goes on.
    #[test]
    fn bad_messages_are_reasons_not_panics() {
        let rules = Rules::defaults();
        let mut folder = Folder::default();
        let mut batch = Batch::default();
        let orphan = update(&[Some("p1"), None, None], &[Some("p1"), None, None]);
        assert!(folder.fold(&orphan, &rules, 10, &mut batch).is_err());
        assert!(
            folder
                .fold(&xlog(b"Uxx".to_vec()), &rules, 10, &mut batch)
                .is_err()
        );
        let tags_message = message("evictd", b"not json");
        assert!(folder.fold(&tags_message, &rules, 10, &mut batch).is_err());
        folder.fold(&relation(), &rules, 10, &mut batch).unwrap();
        folder.fold(&orphan, &rules, 10, &mut batch).unwrap();
        assert!(batch.targets.tags.contains("products:id:p1"));
    }
}
