//! Collects the targets of many events into one de-duplicated batch between flushes.
//!
//! Pure: the daemon feeds it parsed events and hands the finished [`Batch`] to the sink. Events
//! that arrive close together (a burst of commits, a migration) cost one Redis round of work.

use std::collections::{BTreeMap, HashSet};
use std::hash::{BuildHasher, RandomState};
use std::ops::Range;

use crate::core::event::{Change, ChangeEvent, Op};
use crate::core::rules::{Rules, Targets, UnknownTable};

#[derive(Debug, Default)]
pub struct Batch {
    pub targets: Targets,
    /// Events folded in, by table and operation (tags events under table `-`), for metrics.
    pub events: BTreeMap<(String, Op), u64>,
    /// The oldest statement time seen (Unix ms), to measure commit-to-invalidation lag.
    pub oldest_ts_ms: Option<i64>,
    /// Events whose rows lacked a column the rules need and were widened to their table.
    pub widened: u64,
}

impl Batch {
    pub fn is_empty(&self) -> bool {
        self.targets.is_empty()
    }

    pub fn event_count(&self) -> u64 {
        self.events.values().sum()
    }

    /// Takes in everything `other` holds (a streamed transaction's targets, at its commit).
    pub fn absorb(&mut self, other: Batch) {
        self.targets.merge(other.targets);
        for (key, count) in other.events {
            *self.events.entry(key).or_default() += count;
        }
        self.oldest_ts_ms = match (self.oldest_ts_ms, other.oldest_ts_ms) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        self.widened += other.widened;
    }

    /// Folds one event in. An event of a table without a rule is skipped, and says why.
    pub fn add(&mut self, rules: &Rules, event: &ChangeEvent) -> Result<(), UnknownTable> {
        self.add_part(rules, event, 0..usize::MAX, true)
    }

    /// Folds in the rows `rows` of an event cut into parts ([`ChangeEvent::parts`]); only the
    /// first part (`first`) counts as an event. An event without rows is folded in whole.
    pub fn add_part(
        &mut self,
        rules: &Rules,
        event: &ChangeEvent,
        rows: Range<usize>,
        first: bool,
    ) -> Result<(), UnknownTable> {
        let table_label = event.table.clone().unwrap_or_else(|| "-".to_string());
        match &event.change {
            Change::Tags(tags) => self.targets.tags.extend(tags.iter().cloned()),
            Change::TableWide | Change::Rows { .. } => {
                let table = event.table.as_deref().unwrap_or_default();
                let rule = rules.rule_of(table)?;
                let precise = match &event.change {
                    // An older trigger's event may lack a column a newer rule references.
                    Change::Rows { columns, rows: all } => {
                        rule.positions(columns).is_some_and(|at| {
                            rule.rows_targets(&at, all.range(rows), &mut self.targets)
                                .is_ok()
                        })
                    }
                    _ => false,
                };
                if !precise {
                    self.widened += u64::from(matches!(event.change, Change::Rows { .. }));
                    rule.table_wide_targets(&mut self.targets);
                }
            }
        }
        if first {
            *self.events.entry((table_label, event.op)).or_default() += 1;
        }
        if let Some(ts) = event.ts_ms {
            self.oldest_ts_ms = Some(self.oldest_ts_ms.map_or(ts, |o| o.min(ts)));
        }
        Ok(())
    }
}

/// Tags already sent to Redis for one claim of events, which later pieces of the claim skip.
///
/// A statement cut into pieces repeats its shared tags in every piece (`products:all`, each
/// client's tags). Every event of one claim was committed before the claim's first piece went
/// out, so one invalidation of a tag covers all of them. Bounded: only tags that recurred from
/// one piece to the next are remembered (found through hashes of the previous piece's tags), at
/// most [`SentTags::MAX`] of them; anything else is simply sent again.
#[derive(Default)]
pub struct SentTags {
    hasher: RandomState,
    previous: HashSet<u64>,
    repeated: HashSet<String>,
}

impl SentTags {
    pub const MAX: usize = 10_000;

    /// Whether a piece has gone through [`SentTags::prune`] (a claim of small events never
    /// does, and needs no pruning).
    pub fn any(&self) -> bool {
        !self.previous.is_empty()
    }

    /// Drops from `batch` the tags already sent and notes which of the rest recurred from the
    /// previous piece. Call once per piece, just before sending it.
    pub fn prune(&mut self, batch: &mut Batch) {
        if !self.repeated.is_empty() {
            batch.targets.tags.retain(|t| !self.repeated.contains(t));
        }
        let mut current = HashSet::with_capacity(batch.targets.tags.len());
        for tag in &batch.targets.tags {
            let hash = self.hasher.hash_one(tag);
            if self.previous.contains(&hash) && self.repeated.len() < Self::MAX {
                self.repeated.insert(tag.clone());
            }
            current.insert(hash);
        }
        self.previous = current;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(json: &str) -> ChangeEvent<'_> {
        ChangeEvent::parse(json).unwrap()
    }

    fn tags(batch: &Batch) -> Vec<&str> {
        batch.targets.tags.iter().map(String::as_str).collect()
    }

    /// An UPDATE that moves a product to another client invalidates both clients.
    #[test]
    fn update_moving_product_invalidates_both_clients() {
        let mut batch = Batch::default();
        let rules = Rules::defaults();
        batch
            .add(
                &rules,
                &parse(r#"{"v":1,"op":"UPDATE","table":"public.products","cols":["client_id","id"],"rows":[["a","p"],["b","p"]]}"#),
            )
            .unwrap();
        assert_eq!(
            tags(&batch),
            [
                "products:all",
                "products:client:a",
                "products:client:b",
                "products:id:p"
            ]
        );
    }

    #[test]
    fn events_are_deduplicated_and_counted() {
        let mut batch = Batch::default();
        let rules = Rules::defaults();
        let e = parse(
            r#"{"v":1,"op":"INSERT","table":"public.clients","ts":10,"cols":["id"],"rows":[["c"]]}"#,
        );
        batch.add(&rules, &e).unwrap();
        batch.add(&rules, &e).unwrap();
        batch
            .add(&rules, &parse(r#"{"v":1,"op":"TAGS","ts":7,"tags":["x"]}"#))
            .unwrap();
        assert_eq!(
            tags(&batch),
            ["client_configs:all", "client_configs:id:c", "x"]
        );
        assert_eq!(batch.event_count(), 3);
        assert_eq!(batch.oldest_ts_ms, Some(7));
    }

    /// Rows from an older trigger that lacks a column the rules now need: widen, never miss.
    #[test]
    fn missing_column_widens_to_table() {
        let mut batch = Batch::default();
        let rules = Rules::defaults();
        batch
            .add(
                &rules,
                &parse(r#"{"v":1,"op":"DELETE","table":"public.products","cols":["id"],"rows":[["p"]]}"#),
            )
            .unwrap();
        assert_eq!(batch.widened, 1);
        assert!(batch.targets.tag_globs.contains("products:client:*"));
    }

    /// A statement split into pieces is still one event, and every row counts.
    #[test]
    fn pieces_of_one_event_count_once() {
        let rules = Rules::defaults();
        let mut batch = Batch::default();
        let event = parse(
            r#"{"v":1,"op":"DELETE","table":"public.clients","cols":["id"],"rows":[["a"],["b"],["c"]]}"#,
        );
        for (i, part) in event.parts(2).into_iter().enumerate() {
            batch.add_part(&rules, &event, part, i == 0).unwrap();
        }
        assert_eq!(batch.event_count(), 1);
        assert_eq!(
            tags(&batch),
            [
                "client_configs:all",
                "client_configs:id:a",
                "client_configs:id:b",
                "client_configs:id:c"
            ]
        );
    }

    /// The tags every piece of a statement shares are sent by the first two pieces only; each
    /// piece's own tags always go.
    #[test]
    fn shared_tags_are_sent_once_they_recur() {
        let rules = Rules::defaults();
        let event = parse(
            r#"{"v":1,"op":"DELETE","table":"public.products","cols":["client_id","id"],"rows":[["c","1"],["c","2"],["c","3"],["c","4"]]}"#,
        );
        let mut sent = SentTags::default();
        let mut pieces = Vec::new();
        for (i, part) in event.parts(1).into_iter().enumerate() {
            let mut piece = Batch::default();
            piece.add_part(&rules, &event, part, i == 0).unwrap();
            sent.prune(&mut piece);
            pieces.push(tags(&piece).join(" "));
        }
        assert_eq!(
            pieces,
            [
                "products:all products:client:c products:id:1",
                "products:all products:client:c products:id:2",
                "products:id:3",
                "products:id:4",
            ]
        );
    }

    #[test]
    fn unknown_table_is_skipped() {
        let mut batch = Batch::default();
        let err = batch
            .add(
                &Rules::defaults(),
                &parse(r#"{"v":1,"op":"TRUNCATE","table":"public.other"}"#),
            )
            .unwrap_err();
        assert_eq!(err, UnknownTable("public.other".into()));
        assert!(batch.is_empty());
    }
}
