//! Folding the replication stream (`logical` delivery) into a batch: relations described,
//! changes rendered to targets with their table's rule, rows counted per transaction (past
//! `wide_row_threshold` a table goes table-wide, as the triggers would), evictd's signed
//! messages read, and how far everything read is complete (what may be confirmed once Redis
//! has it). A change that cannot be read exactly widens; a message that is not evictd's is
//! refused with a reason. Pure: frames in, targets out.

use std::collections::{HashMap, HashSet};

use super::batch::Batch;
use thiserror::Error;

use super::event::{ChangeEvent, EventError, Op};
use super::pgoutput::{self, Message, PgOutputError, Relation};
use super::rules::Rules;
use super::signature::{Forged, SigningKey};
use super::wal::{Frame, Lsn};

/// Milliseconds between the Unix epoch and PostgreSQL's (2000-01-01).
const PG_EPOCH_UNIX_MS: i64 = 946_684_800_000;

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
    /// The key evictd's messages are signed with.
    key: Option<SigningKey>,
    /// Changes that could not be told to a table, so widened to every table.
    pub widened_everything: u64,
    /// Published tables seen without a rule, and whether one is new since the last look.
    unruled: Vec<String>,
    unruled_news: bool,
    /// Transactions the server streams while they are in progress (`streaming`): what each
    /// changed so far, held until its commit (its abort drops it). Invalidating earlier would
    /// let a reader cache a value the transaction is about to change.
    streamed: HashMap<u32, Held>,
    /// The transaction whose stream block is being read, and the targets of that block (its
    /// counts are in `rows_in_tx`, `wide_in_tx` and `counted_in_tx` meanwhile).
    streaming: Option<u32>,
    block: Batch,
    /// Streamed transactions committed since the last [`Folder::take_streamed_commits`].
    streamed_commits: u64,
}

/// What a streamed transaction changed so far, between its blocks.
#[derive(Default)]
struct Held {
    batch: Batch,
    rows: HashMap<u32, u64>,
    wide: HashSet<u32>,
    counted: HashSet<(u32, Op)>,
}

/// Prefix of the logical decoding messages that carry old rows the WAL lacks (`logical`
/// delivery, written by the old-row triggers): their rows are invalidated like a change's, but
/// they are not counted as events.
pub const OLD_ROWS_PREFIX: &str = "evictd-old";

/// The largest event a trigger writes as one logical decoding message; a statement whose old
/// rows would not fit becomes one table-wide event. Anything larger with evictd's prefix is
/// forged.
pub const LOGICAL_MESSAGE_LIMIT: usize = 8 << 20;

/// Prefix of the messages `evictd.emit` writes in `logical` delivery (`invalidate_tags`).
pub const EVENTS_PREFIX: &str = "evictd";

/// Prefix of the non-transactional messages the daemon writes into the WAL and reads back:
/// at start (caught up) and on every health tick (the stream is alive, and everything before
/// the marker has been delivered, so its position may be confirmed).
pub const MARKER_PREFIX: &str = "evictd-marker";

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

/// Why a logical decoding message with evictd's prefix was refused. The stream goes on.
#[derive(Debug, Error)]
pub enum Refused {
    #[error(transparent)]
    Forged(#[from] Forged),
    #[error("no signing key to check messages with")]
    NoKey,
    #[error(
        "a logical decoding message of {0} bytes with evictd's prefix (evictd's own are at most {LOGICAL_MESSAGE_LIMIT} bytes)"
    )]
    Oversized(usize),
    #[error("the message is not UTF-8")]
    NotText,
    #[error(transparent)]
    Event(#[from] EventError),
    #[error(transparent)]
    Decode(#[from] PgOutputError),
}

impl Refused {
    /// The label of `evictd_events_rejected_total`: `forged` or `malformed`.
    pub fn kind(&self) -> &'static str {
        match self {
            Refused::Forged(_) | Refused::NoKey | Refused::Oversized(_) => "forged",
            Refused::NotText | Refused::Event(_) | Refused::Decode(_) => "malformed",
        }
    }
}

impl Folder {
    /// A folder whose evictd messages must carry `key`'s signature (`None`: every evictd
    /// message is refused).
    pub fn new(key: Option<SigningKey>) -> Self {
        Self {
            key,
            ..Self::default()
        }
    }

    /// Folds one event into `batch`. A change that cannot be read exactly (an undecodable or
    /// oversized message, a relation never described, a value the stream lacks) widens what
    /// it may have touched to table-wide: a change never vanishes. A logical decoding message
    /// that is not evictd's own is refused with the reason (the caller logs and counts it).
    pub fn fold(
        &mut self,
        frame: &Frame,
        rules: &Rules,
        wide_threshold: u64,
        batch: &mut Batch,
    ) -> Result<(), Refused> {
        if self.streaming.is_some() {
            // A block of a transaction in progress: its targets wait in `block`.
            let mut block = std::mem::take(&mut self.block);
            let folded = self.fold_one(frame, rules, wide_threshold, &mut block, true);
            if self.streaming.is_some() {
                self.block = block;
            }
            return folded;
        }
        self.fold_one(frame, rules, wide_threshold, batch, false)
    }

    /// How many transactions the server is streaming while in progress.
    #[cfg(test)]
    fn streamed_in_progress(&self) -> usize {
        self.streamed.len() + usize::from(self.streaming.is_some())
    }

    /// Streamed transactions committed since the last call.
    pub fn take_streamed_commits(&mut self) -> u64 {
        std::mem::take(&mut self.streamed_commits)
    }

    /// [`Folder::fold`] of one frame into `batch`; `streamed`: inside a stream block.
    fn fold_one(
        &mut self,
        frame: &Frame,
        rules: &Rules,
        wide_threshold: u64,
        batch: &mut Batch,
        streamed: bool,
    ) -> Result<(), Refused> {
        let data = match frame {
            // Between transactions a keepalive's position is complete too: confirming it lets
            // the slot release WAL while only other tables are written.
            Frame::KeepAlive { wal_end } => {
                if !self.in_transaction {
                    self.advance(*wal_end);
                }
                return Ok(());
            }
            Frame::Oversized { head, len } => {
                return self.fold_oversized(head, *len, rules, batch, streamed);
            }
            Frame::XLogData(data) => data,
        };
        // Rows of a table this transaction already invalidated table-wide need no decoding: a
        // 1,000,000-row UPDATE costs a byte check per row after the first `wide_row_threshold`.
        if let Some((relation, op)) = change_head(data, streamed)
            && self.wide_in_tx.contains(&relation)
        {
            self.count(relation, op, batch);
            return Ok(());
        }
        let decoded = if streamed {
            pgoutput::decode_streamed(data)
        } else {
            pgoutput::decode(data)
        };
        let message = match decoded {
            Ok(message) => message,
            Err(e) => {
                if data.first() == Some(&b'M') {
                    return Err(e.into());
                }
                self.widen_unreadable(data, rules, batch, streamed);
                return Ok(());
            }
        };
        match message {
            Message::StreamStart { xid } => {
                let held = self.streamed.remove(&xid).unwrap_or_default();
                self.rows_in_tx = held.rows;
                self.wide_in_tx = held.wide;
                self.counted_in_tx = held.counted;
                self.block = held.batch;
                self.streaming = Some(xid);
            }
            Message::StreamStop => {
                if let Some(xid) = self.streaming.take() {
                    let held = Held {
                        batch: std::mem::take(batch),
                        rows: std::mem::take(&mut self.rows_in_tx),
                        wide: std::mem::take(&mut self.wide_in_tx),
                        counted: std::mem::take(&mut self.counted_in_tx),
                    };
                    self.streamed.insert(xid, held);
                }
            }
            Message::StreamCommit {
                xid,
                end_lsn,
                commit_time_micros,
            } => {
                if let Some(held) = self.streamed.remove(&xid) {
                    batch.absorb(held.batch);
                }
                self.streamed_commits += 1;
                let ts = (commit_time_micros / 1_000).saturating_add(PG_EPOCH_UNIX_MS);
                batch.oldest_ts_ms = Some(batch.oldest_ts_ms.map_or(ts, |o| o.min(ts)));
                self.advance(Lsn(end_lsn));
            }
            // A subtransaction's rollback keeps the rest: what it changed is invalidated with
            // the transaction (more than needed, never less).
            Message::StreamAbort { xid, subxid } => {
                if xid == subxid {
                    self.streamed.remove(&xid);
                }
            }
            Message::Begin { commit_time_micros } => {
                self.in_transaction = true;
                self.rows_in_tx.clear();
                self.wide_in_tx.clear();
                self.counted_in_tx.clear();
                let ts = (commit_time_micros / 1_000).saturating_add(PG_EPOCH_UNIX_MS);
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
            } if prefix == EVENTS_PREFIX || prefix == OLD_ROWS_PREFIX => {
                let key = self.key.as_ref().ok_or(Refused::NoKey)?;
                let payload = key.open(content)?;
                let text = std::str::from_utf8(payload).map_err(|_| Refused::NotText)?;
                let event = ChangeEvent::parse(text)?;
                // Old rows the WAL lacks belong to a change already counted as an event.
                let counted = prefix == EVENTS_PREFIX;
                if batch
                    .add_part(rules, &event, 0..usize::MAX, counted)
                    .is_err()
                {
                    // A table without a rule here (the configuration changed since `migrate`):
                    // nothing of ours to invalidate.
                    self.note_unruled(event.table.as_deref().unwrap_or("-"));
                }
            }
            // Other applications' messages: not ours to read.
            Message::Logical { .. } => {}
            change => self.fold_change(change, rules, wide_threshold, batch),
        }
        Ok(())
    }

    /// A message too large to hold ([`Frame::Oversized`]): a change widens its table (every
    /// table when it cannot be told); evictd's own messages are never that large, so one with
    /// its prefix is forged; other applications' messages are none of ours.
    fn fold_oversized(
        &mut self,
        head: &[u8],
        len: usize,
        rules: &Rules,
        batch: &mut Batch,
        streamed: bool,
    ) -> Result<(), Refused> {
        if head.first() == Some(&b'M') {
            // Tag, (transaction id,) flags and position, then the prefix.
            let at = pgoutput::relation_offset(streamed) + 9;
            let prefix = head
                .get(at..)
                .and_then(|rest| rest.split(|&b| b == 0).next())
                .filter(|p| p.len() < head.len().saturating_sub(at))
                .unwrap_or_default();
            if prefix == EVENTS_PREFIX.as_bytes() || prefix == OLD_ROWS_PREFIX.as_bytes() {
                return Err(Refused::Oversized(len));
            }
            return Ok(());
        }
        self.widen_unreadable(head, rules, batch, streamed);
        Ok(())
    }

    /// A change that cannot be decoded: its table goes table-wide, or, when not even the
    /// relation can be read, every configured table.
    fn widen_unreadable(&mut self, data: &[u8], rules: &Rules, batch: &mut Batch, streamed: bool) {
        match change_head(data, streamed) {
            Some((relation, op)) => {
                self.count(relation, op, batch);
                self.widen(relation, rules, batch);
            }
            None => self.widen_everything(rules, batch),
        }
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
    ) {
        let (relation, op, rows) = match message {
            Message::Relation(relation) => {
                self.relations
                    .insert(relation.id, Known::new(relation, rules));
                return;
            }
            Message::Truncate { relations } => {
                for id in relations {
                    self.count(id, Op::Truncate, batch);
                    self.widen(id, rules, batch);
                }
                return;
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
            | Message::StreamStart { .. }
            | Message::StreamStop
            | Message::StreamCommit { .. }
            | Message::StreamAbort { .. }
            | Message::Other => return,
        };
        self.count(relation, op, batch);
        if self.wide_in_tx.contains(&relation) {
            return;
        }
        let seen = self.rows_in_tx.entry(relation).or_default();
        *seen += 1;
        if *seen > wide_threshold {
            return self.widen(relation, rules, batch);
        }
        let Some(known) = self.relations.get(&relation) else {
            // A change before its relation's description: which table is unknown.
            return self.widen_everything(rules, batch);
        };
        let Some(rule) = rules.find(&known.table) else {
            return self.note_unruled(&known.table.clone());
        };
        let Some(positions) = &known.positions else {
            // The table lacks a column the rules reference: everything it could make stale.
            return self.widen(relation, rules, batch);
        };
        let rows = rows.iter().map(Vec::as_slice);
        if rule
            .rows_targets(positions, rows, &mut batch.targets)
            .is_err()
        {
            // A TOASTed value the stream does not carry: the tag cannot be rendered.
            self.widen(relation, rules, batch);
        }
    }

    /// Counts one event per table and operation per transaction, like one statement trigger.
    fn count(&mut self, relation: u32, op: Op, batch: &mut Batch) {
        if self.counted_in_tx.insert((relation, op)) {
            let table = self
                .relations
                .get(&relation)
                .map_or_else(|| format!("relation {relation}"), |k| k.table.clone());
            *batch.events.entry((table, op)).or_default() += 1;
        }
    }

    /// Invalidates everything `relation`'s rule can produce, once per transaction; every
    /// configured table when the relation was never described.
    fn widen(&mut self, relation: u32, rules: &Rules, batch: &mut Batch) {
        if !self.wide_in_tx.insert(relation) {
            return;
        }
        match self.relations.get(&relation) {
            Some(known) => match rules.find(&known.table) {
                Some(rule) => rule.table_wide_targets(&mut batch.targets),
                None => self.note_unruled(&known.table.clone()),
            },
            None => self.widen_everything(rules, batch),
        }
    }

    /// Every configured table table-wide: what a change of an unknown table may have touched.
    fn widen_everything(&mut self, rules: &Rules, batch: &mut Batch) {
        self.widened_everything += 1;
        batch.targets.merge(rules.all_table_wide());
    }

    /// A published table the rules do not name (the configuration changed since `migrate`):
    /// it makes nothing stale. Remembered so the daemon can say so once.
    fn note_unruled(&mut self, table: &str) {
        if self.unruled.len() < 100 && !self.unruled.iter().any(|t| t == table) {
            self.unruled.push(table.to_string());
            self.unruled_news = true;
        }
    }

    /// Tables seen without a rule since the last call, once each.
    pub fn take_unruled(&mut self) -> Option<&[String]> {
        std::mem::take(&mut self.unruled_news).then_some(&self.unruled[..])
    }
}

/// The relation and operation of an Insert, Update or Delete message, from its first bytes
/// (`streamed`: sent in a stream block, with the transaction id before the relation).
fn change_head(data: &[u8], streamed: bool) -> Option<(u32, Op)> {
    let op = match data.first()? {
        b'I' => Op::Insert,
        b'U' => Op::Update,
        b'D' => Op::Delete,
        _ => return None,
    };
    let at = pgoutput::relation_offset(streamed);
    let id = data.get(at..at + 4)?;
    Some((u32::from_be_bytes([id[0], id[1], id[2], id[3]]), op))
}

/// A relation the stream described, with where each of its rule's columns sits in its rows.
struct Known {
    table: String,
    /// Column index of each rule column; `None` when a rule column is missing.
    positions: Option<Vec<usize>>,
}

impl Known {
    fn new(relation: Relation, rules: &Rules) -> Self {
        let positions = rules
            .find(&relation.table)
            .and_then(|rule| rule.positions(&relation.columns));
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

    /// `frame`'s message as sent inside a stream block: transaction `xid` after the tag.
    fn in_block(xid: u32, frame: Frame) -> Frame {
        let Frame::XLogData(data) = frame else {
            unreachable!()
        };
        let mut m = vec![data[0]];
        m.extend(xid.to_be_bytes());
        m.extend(&data[1..]);
        xlog(m)
    }

    fn stream_start(xid: u32) -> Frame {
        let mut m = b"S".to_vec();
        m.extend(xid.to_be_bytes());
        m.push(1);
        xlog(m)
    }

    fn stream_stop() -> Frame {
        xlog(b"E".to_vec())
    }

    fn stream_commit(xid: u32, end: u64) -> Frame {
        let mut m = b"c".to_vec();
        m.extend(xid.to_be_bytes());
        m.push(0);
        m.extend((end - 1).to_be_bytes());
        m.extend(end.to_be_bytes());
        m.extend(2_000_000i64.to_be_bytes());
        xlog(m)
    }

    fn stream_abort(xid: u32, subxid: u32) -> Frame {
        let mut m = b"A".to_vec();
        m.extend(xid.to_be_bytes());
        m.extend(subxid.to_be_bytes());
        xlog(m)
    }

    fn product_update(id: &str, client: &str) -> Frame {
        update(
            &[Some(id), Some(client), None],
            &[Some(id), Some(client), None],
        )
    }

    /// Transactions streamed while in progress (protocol 2): their blocks interleave with
    /// each other and with whole transactions, and nothing of theirs is in the batch before
    /// their commit; a rollback drops them, a subtransaction's rollback drops nothing.
    #[test]
    fn streamed_transactions_count_at_their_commit_only() {
        let rules = Rules::defaults();
        let mut folder = Folder::default();
        let mut batch = Batch::default();
        let fold = |folder: &mut Folder, batch: &mut Batch, frames: Vec<Frame>| {
            for frame in frames {
                folder.fold(&frame, &rules, 3, batch).unwrap();
            }
        };
        fold(
            &mut folder,
            &mut batch,
            vec![
                stream_start(7),
                in_block(7, relation()),
                in_block(7, product_update("s1", "c1")),
                stream_stop(),
                stream_start(8),
                in_block(8, product_update("r1", "c2")),
                stream_stop(),
                begin(),
                product_update("w1", "c3"),
                commit(50),
                stream_start(7),
                in_block(7, product_update("s2", "c1")),
                stream_stop(),
            ],
        );
        assert_eq!(
            tags_of(&batch),
            ["products:all", "products:client:c3", "products:id:w1"]
        );
        assert_eq!(folder.streamed_in_progress(), 2);
        assert_eq!(folder.confirmable, Some(Lsn(50)));

        let mut batch = Batch::default();
        fold(
            &mut folder,
            &mut batch,
            vec![stream_abort(8, 9), stream_abort(8, 8), stream_commit(7, 90)],
        );
        assert_eq!(
            tags_of(&batch),
            [
                "products:all",
                "products:client:c1",
                "products:id:s1",
                "products:id:s2"
            ]
        );
        assert_eq!(batch.event_count(), 1);
        assert_eq!(batch.oldest_ts_ms, Some(2_000 + PG_EPOCH_UNIX_MS));
        assert_eq!(folder.confirmable, Some(Lsn(90)));
        assert_eq!(folder.streamed_in_progress(), 0);
        assert_eq!(folder.take_streamed_commits(), 1);
    }

    /// A streamed transaction past the threshold goes table-wide at its commit, its later rows
    /// skipped unread as in a whole transaction.
    #[test]
    fn a_streamed_transaction_past_the_threshold_goes_table_wide() {
        let mut frames = vec![stream_start(7), in_block(7, relation())];
        for i in 0..5 {
            frames.push(in_block(7, product_update(&format!("p{i}"), "c1")));
        }
        frames.extend([stream_stop(), stream_commit(7, 60)]);
        let (_, batch) = fold_all(&frames, 3);
        assert!(batch.targets.wide_tables.contains("public.products"));
        assert!(!batch.targets.tags.contains("products:id:p4"));
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

    fn tags_of(batch: &Batch) -> Vec<&str> {
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
            tags_of(&batch),
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

    /// A change that cannot be read exactly is never dropped: a relation never described, or
    /// a change that does not decode, widens every table; the stream goes on.
    #[test]
    fn changes_that_cannot_be_read_widen() {
        let rules = Rules::defaults();
        let mut folder = Folder::default();
        let mut batch = Batch::default();
        let orphan = update(&[Some("p1"), None, None], &[Some("p1"), None, None]);
        folder.fold(&orphan, &rules, 10, &mut batch).unwrap();
        assert_eq!(batch.targets.wide_tables.len(), 4, "every table");
        let mut batch = Batch::default();
        folder.fold(&begin(), &rules, 10, &mut batch).unwrap();
        folder.fold(&relation(), &rules, 10, &mut batch).unwrap();
        folder
            .fold(&xlog(b"U\0\0\0\x07x".to_vec()), &rules, 10, &mut batch)
            .unwrap();
        assert_eq!(
            batch.targets.wide_tables.iter().collect::<Vec<_>>(),
            ["public.products"],
            "an undecodable change of a known relation widens its table"
        );
        let mut batch = Batch::default();
        folder.fold(&begin(), &rules, 10, &mut batch).unwrap();
        folder.fold(&orphan, &rules, 10, &mut batch).unwrap();
        assert!(batch.targets.tags.contains("products:id:p1"));
    }

    /// A TRUNCATE of several tables, one of them without a rule (configured away since
    /// `migrate`): the ruled one goes table-wide, the other is noted once, nothing fails.
    #[test]
    fn truncate_of_a_ruled_and_an_unruled_table() {
        let rules = Rules::defaults();
        let mut folder = Folder::default();
        let mut batch = Batch::default();
        let mut other = b"R\0\0\0\x09public\0other\0f\0\x01".to_vec();
        other.extend(b"\x00id\0\0\0\x0b\x86\xff\xff\xff\xff");
        let mut truncate = b"T".to_vec();
        truncate.extend(2u32.to_be_bytes());
        truncate.push(0);
        truncate.extend(PRODUCTS.to_be_bytes());
        truncate.extend(9u32.to_be_bytes());
        for frame in [begin(), relation(), xlog(other), xlog(truncate), commit(60)] {
            folder.fold(&frame, &rules, 10, &mut batch).unwrap();
        }
        assert_eq!(
            batch.targets.wide_tables.iter().collect::<Vec<_>>(),
            ["public.products"]
        );
        assert_eq!(
            folder.take_unruled(),
            Some(&["public.other".to_string()][..])
        );
        assert_eq!(folder.take_unruled(), None, "said once");
    }

    /// evictd's messages count only when signed with its key: a role calling
    /// `pg_logical_emit_message` itself is refused as forged; other prefixes are ignored.
    #[test]
    fn only_signed_messages_count() {
        let rules = Rules::defaults();
        let key = SigningKey::new(&[3; 64]);
        let mut folder = Folder::new(Some(key.clone()));
        let mut batch = Batch::default();
        let tags = r#"{"v":1,"op":"TAGS","ts":1,"tags":["products:all"]}"#;
        let forged = folder.fold(&message("evictd", tags.as_bytes()), &rules, 10, &mut batch);
        assert_eq!(forged.map_err(|r| r.kind()), Err("forged"));
        let wrong_key = SigningKey::new(&[4; 64]).sign(tags);
        let forged = folder.fold(
            &message("evictd", wrong_key.as_bytes()),
            &rules,
            10,
            &mut batch,
        );
        assert_eq!(forged.map_err(|r| r.kind()), Err("forged"));
        let not_json = key.sign("not json");
        let malformed = folder.fold(
            &message("evictd", not_json.as_bytes()),
            &rules,
            10,
            &mut batch,
        );
        assert_eq!(malformed.map_err(|r| r.kind()), Err("malformed"));
        folder
            .fold(
                &message("someone-else", b"whatever"),
                &rules,
                10,
                &mut batch,
            )
            .unwrap();
        assert!(batch.is_empty());
        folder
            .fold(
                &message("evictd", key.sign(tags).as_bytes()),
                &rules,
                10,
                &mut batch,
            )
            .unwrap();
        assert_eq!(tags_of(&batch), ["products:all"]);
        let unsigned = Folder::default().fold(
            &message("evictd", key.sign(tags).as_bytes()),
            &rules,
            10,
            &mut Batch::default(),
        );
        assert_eq!(
            unsigned.map_err(|r| r.kind()),
            Err("forged"),
            "no key, no trust"
        );
    }

    /// A message too large to hold is skipped by the stream with its first bytes kept: a
    /// change widens its table, one with evictd's prefix is forged (evictd's own are smaller),
    /// any other is none of ours.
    #[test]
    fn oversized_messages_widen_or_are_refused() {
        let rules = Rules::defaults();
        let mut folder = Folder::default();
        let mut batch = Batch::default();
        folder.fold(&begin(), &rules, 10, &mut batch).unwrap();
        folder.fold(&relation(), &rules, 10, &mut batch).unwrap();
        let oversized = |head: Vec<u8>| Frame::Oversized {
            head: Bytes::from(head),
            len: 300 << 20,
        };
        let Frame::XLogData(change) = update(&[Some("p1"), None, None], &[Some("p1"), None, None])
        else {
            unreachable!()
        };
        folder
            .fold(&oversized(change[..8].to_vec()), &rules, 10, &mut batch)
            .unwrap();
        assert!(batch.targets.wide_tables.contains("public.products"));
        let Frame::XLogData(ours) = message("evictd-old", &[b'x'; 600]) else {
            unreachable!()
        };
        let refused = folder.fold(&oversized(ours[..537].to_vec()), &rules, 10, &mut batch);
        assert_eq!(refused.map_err(|r| r.kind()), Err("forged"));
        let Frame::XLogData(theirs) = message("pgl", &[b'x'; 600]) else {
            unreachable!()
        };
        folder
            .fold(&oversized(theirs[..537].to_vec()), &rules, 10, &mut batch)
            .unwrap();
    }
}
