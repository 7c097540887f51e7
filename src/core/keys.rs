//! Every Redis key name evictd reads or writes, built from the key prefix in one place. The
//! layout is the cache contract (README): tag `T` is the set `{prefix}tag:T`, its last
//! invalidation time `{prefix}tagts:T`, a table-wide invalidation of table `t`
//! `{prefix}tagts-table:t`; a detached tag set waits at `{prefix}drain:{nonce}:T` until
//! emptied; evictd's own bookkeeping lives under `{prefix}evictd:`. (The DETACH script builds
//! the same names itself from the prefix it is handed: fewer bytes per call.)

use super::glob::glob_escape;
use super::slot::{hash_tag_for, slot};

/// What a key under the prefix is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyKind {
    /// A tag set (the index of one tag).
    Tag,
    /// A detached tag set being drained.
    Drain,
    /// A `tagts` or `tagts-table` marker, or evictd's own bookkeeping.
    Own,
    /// A cache entry.
    Entry,
}

/// The key names under one prefix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Keys {
    prefix: String,
}

impl Keys {
    pub fn new(prefix: &str) -> Self {
        Self {
            prefix: prefix.to_string(),
        }
    }

    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// The set of tag `tag`.
    pub fn tag(&self, tag: &str) -> String {
        format!("{}tag:{tag}", self.prefix)
    }

    /// What every tag set's name starts with.
    pub fn tag_prefix(&self) -> String {
        format!("{}tag:", self.prefix)
    }

    /// The glob over tag set names that matches the tags `glob` (a glob over tag names) does.
    pub fn tag_glob(&self, glob: &str) -> String {
        format!("{}{glob}", glob_escape(&self.tag_prefix()))
    }

    /// The marker of tag `tag`'s last invalidation (Redis clock, ms).
    pub fn tag_marker(&self, tag: &str) -> String {
        format!("{}tagts:{tag}", self.prefix)
    }

    /// The marker of a table-wide invalidation of `table`.
    pub fn table_marker(&self, table: &str) -> String {
        format!("{}tagts-table:{table}", self.prefix)
    }

    /// Where tag set `tag` waits while drained, by the invalidation with `nonce`.
    pub fn drain(&self, nonce: u64, tag: &str) -> String {
        format!("{}drain:{nonce:016x}:{tag}", self.prefix)
    }

    /// Where tag set `tag` waits while drained, in a Redis Cluster: a drain key in the tag
    /// set's own slot (a cluster renames only within one), `{prefix}drain:{H}:{nonce}:T` with
    /// `H` a hash tag of that slot — or the plain drain key when the prefix's own hash tag
    /// already places both together. `None` for a prefix whose braces place neither there.
    pub fn drain_in_slot(&self, nonce: u64, tag: &str) -> Option<String> {
        let wanted = slot(self.tag(tag).as_bytes());
        let tagged = format!(
            "{}drain:{{{}}}:{nonce:016x}:{tag}",
            self.prefix,
            hash_tag_for(wanted)
        );
        [self.drain(nonce, tag), tagged]
            .into_iter()
            .find(|key| slot(key.as_bytes()) == wanted)
    }

    /// The glob over every drain key.
    pub fn drains_glob(&self) -> String {
        format!("{}drain:*", glob_escape(&self.prefix))
    }

    /// The glob over every key under the prefix.
    pub fn everything_glob(&self) -> String {
        format!("{}*", glob_escape(&self.prefix))
    }

    /// The hash of evictd's running totals, read by `evictd stats`.
    pub fn stats(&self) -> String {
        format!("{}evictd:stats", self.prefix)
    }

    /// The list of `tagts` markers still owed their TTL.
    pub fn ttl_pending(&self) -> String {
        format!("{}evictd:ttl-pending", self.prefix)
    }

    /// What `key` (under the prefix) is.
    pub fn kind(&self, key: &[u8]) -> KeyKind {
        let rest = key.strip_prefix(self.prefix.as_bytes()).unwrap_or(key);
        if rest.starts_with(b"tag:") {
            KeyKind::Tag
        } else if rest.starts_with(b"drain:") {
            KeyKind::Drain
        } else if [&b"tagts:"[..], b"tagts-table:", b"evictd:"]
            .iter()
            .any(|own| rest.starts_with(own))
        {
            KeyKind::Own
        } else {
            KeyKind::Entry
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_the_contract() {
        let keys = Keys::new("cache:");
        assert_eq!(keys.tag("products:all"), "cache:tag:products:all");
        assert_eq!(keys.tag_glob("products:id:*"), "cache:tag:products:id:*");
        assert_eq!(
            keys.table_marker("public.products"),
            "cache:tagts-table:public.products"
        );
        assert_eq!(keys.drain(255, "t"), "cache:drain:00000000000000ff:t");
        assert_eq!(Keys::new("a*:").drains_glob(), "a\\*:drain:*");
        // A tag with a hash tag of its own keeps it in the plain drain key's name; others get
        // one chosen for their slot.
        for (tag, own) in [
            ("products:all", false),
            ("x", false),
            ("{braced}", true),
            ("a{b}c", true),
        ] {
            let drain = keys.drain_in_slot(7, tag).unwrap();
            assert_eq!(drain.starts_with("cache:drain:{"), !own, "{drain}");
            assert_eq!(
                slot(drain.as_bytes()),
                slot(keys.tag(tag).as_bytes()),
                "{tag}"
            );
        }
        let braced = Keys::new("{app}:");
        assert_eq!(
            braced.drain_in_slot(1, "t").unwrap(),
            "{app}:drain:0000000000000001:t"
        );
        for (key, kind) in [
            ("cache:tag:x", KeyKind::Tag),
            ("cache:drain:1:x", KeyKind::Drain),
            ("cache:tagts:x", KeyKind::Own),
            ("cache:tagts-table:t", KeyKind::Own),
            ("cache:evictd:stats", KeyKind::Own),
            ("cache:v1:product:1", KeyKind::Entry),
        ] {
            assert_eq!(keys.kind(key.as_bytes()), kind, "{key}");
        }
    }
}
