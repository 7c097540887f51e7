//! Collects the targets of many events into one de-duplicated batch between flushes.
//!
//! Pure: the daemon feeds it parsed events and hands the finished [`Batch`] to the sink. Events
//! that arrive close together (a burst of commits, a migration) cost one Redis round of work.

use std::collections::BTreeMap;
use std::ops::Range;

use crate::event::{Change, ChangeEvent, Op};
use crate::rules::{Rules, Targets};

/// Why an event contributed nothing.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Skip {
    #[error("table `{0}` has no rule in this configuration")]
    UnknownTable(String),
}

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

    /// Folds one event in. An event of a table without a rule is skipped, and says why.
    pub fn add(&mut self, rules: &Rules, event: &ChangeEvent) -> Result<(), Skip> {
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
    ) -> Result<(), Skip> {
        let table_label = event.table.clone().unwrap_or_else(|| "-".to_string());
        match &event.change {
            Change::Tags(tags) => self.targets.tags.extend(tags.iter().cloned()),
            Change::TableWide | Change::Rows { .. } => {
                let table = event.table.as_deref().unwrap_or_default();
                let rule = rules
                    .find(table)
                    .ok_or_else(|| Skip::UnknownTable(table.to_string()))?;
                match &event.change {
                    Change::Rows {
                        columns,
                        rows: all_rows,
                    } if rule.covered_by(columns) => {
                        // Map the event's column order onto the rule's.
                        let positions: Vec<usize> = rule
                            .columns
                            .iter()
                            .filter_map(|c| columns.iter().position(|e| e == c))
                            .collect();
                        let mut values: Vec<Option<&str>> = Vec::with_capacity(positions.len());
                        for row in all_rows.range(rows) {
                            values.clear();
                            values.extend(
                                positions
                                    .iter()
                                    .map(|&i| row[i].as_ref().map(|t| t.as_str())),
                            );
                            rule.row_targets(&values, &mut self.targets);
                        }
                    }
                    Change::Rows { .. } => {
                        self.widened += 1;
                        rule.table_wide_targets(&mut self.targets);
                    }
                    _ => rule.table_wide_targets(&mut self.targets),
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

    #[test]
    fn unknown_table_is_skipped() {
        let mut batch = Batch::default();
        let err = batch
            .add(
                &Rules::defaults(),
                &parse(r#"{"v":1,"op":"TRUNCATE","table":"public.other"}"#),
            )
            .unwrap_err();
        assert_eq!(err, Skip::UnknownTable("public.other".into()));
        assert!(batch.is_empty());
    }
}
