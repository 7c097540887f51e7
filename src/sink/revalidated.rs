//! The interop with `@fortedigital/nextjs-cache-handler`'s Redis handler (`revalidated_tags_key`):
//! every tag evictd invalidates is also recorded in that handler's revalidated-tags hash with
//! the time, so an application caching through it, unmodified, sees database edits. The handler
//! lists each entry's tags in a second hash beside it (`…__sharedTags__`); a table-wide
//! invalidation, whose tags are globs, records the tags found there that match them.

use std::collections::BTreeSet;

use crate::core::glob::PatternSet;

use super::{RedisSink, SinkError};

/// The hash's name in the handler's layout ends with this; its tags hash sits beside it.
const REVALIDATED_SUFFIX: &str = "__revalidated_tags__";
const SHARED_TAGS_SUFFIX: &str = "__sharedTags__";
/// Tags recorded per call.
const TAGS_PER_CALL: usize = 1_000;
/// Fields asked per HSCAN step of the tags hash.
const HSCAN_COUNT: usize = 1_000;

impl RedisSink {
    /// Records `tags` as revalidated now, when `revalidated_tags_key` is set.
    pub(super) async fn record_revalidated<'a>(
        &self,
        tags: impl IntoIterator<Item = &'a String>,
    ) -> Result<(), SinkError> {
        let Some(hash) = &self.options.revalidated_tags_key else {
            return Ok(());
        };
        let tags: Vec<&String> = tags.into_iter().collect();
        let mut conn = self.conn();
        for chunk in tags.chunks(TAGS_PER_CALL) {
            let mut call = self.record_revalidated.prepare_invoke();
            call.key(hash);
            for tag in chunk {
                call.arg(tag.as_str());
            }
            let _: u64 = call.invoke_async(&mut conn).await?;
        }
        Ok(())
    }

    /// Records the tags of the handler's entries that `globs` (over tag names) match: what a
    /// table-wide invalidation reaches in that handler's layout.
    pub(super) async fn record_revalidated_globs(
        &self,
        globs: &PatternSet,
    ) -> Result<(), SinkError> {
        let Some(hash) = &self.options.revalidated_tags_key else {
            return Ok(());
        };
        let Some(prefix) = hash.strip_suffix(REVALIDATED_SUFFIX) else {
            return Ok(());
        };
        if globs.is_empty() {
            return Ok(());
        }
        let shared = format!("{prefix}{SHARED_TAGS_SUFFIX}");
        let mut conn = self.conn();
        let mut cursor = 0u64;
        loop {
            let (next, fields): (u64, Vec<String>) = redis::cmd("HSCAN")
                .arg(&shared)
                .arg(cursor)
                .arg("COUNT")
                .arg(HSCAN_COUNT)
                .query_async(&mut conn)
                .await?;
            let found: BTreeSet<String> = fields
                .chunks(2)
                .filter_map(|pair| pair.get(1))
                .filter_map(|tags| serde_json::from_str::<Vec<String>>(tags).ok())
                .flatten()
                .filter(|tag| globs.matches(tag.as_bytes()))
                .collect();
            self.record_revalidated(&found).await?;
            if next == 0 {
                return Ok(());
            }
            cursor = next;
        }
    }
}
