//! Redis Cluster's key slots: which of the 16,384 slots a key hashes to (CRC16/XMODEM of the
//! key, or of its hash tag — the first non-empty `{…}`), and a short hash tag for each slot, so
//! that a key evictd makes up (a drain key) can be placed in the slot of a key it must be
//! renamed from: a cluster renames only within a slot.

use std::sync::OnceLock;

/// Slots in a Redis Cluster.
pub const SLOTS: u16 = 16_384;

/// CRC16/XMODEM (polynomial 0x1021, initial value 0), as Redis Cluster computes it.
fn crc16(bytes: &[u8]) -> u16 {
    let mut crc: u16 = 0;
    for &byte in bytes {
        crc ^= u16::from(byte) << 8;
        for _ in 0..8 {
            crc = if crc & 0x8000 != 0 {
                (crc << 1) ^ 0x1021
            } else {
                crc << 1
            };
        }
    }
    crc
}

/// The part of `key` that is hashed: its hash tag when it has a non-empty one.
pub fn hashed_part(key: &[u8]) -> &[u8] {
    let Some(open) = key.iter().position(|&b| b == b'{') else {
        return key;
    };
    match key[open + 1..].iter().position(|&b| b == b'}') {
        Some(0) | None => key,
        Some(len) => &key[open + 1..open + 1 + len],
    }
}

/// The slot `key` lives in.
pub fn slot(key: &[u8]) -> u16 {
    crc16(hashed_part(key)) % SLOTS
}

/// A short string that hashes to `slot` (the smallest decimal number that does): written as
/// `{tag}` first in a key, it places the key in that slot.
pub fn hash_tag_for(slot: u16) -> &'static str {
    static TAGS: OnceLock<Vec<String>> = OnceLock::new();
    let tags = TAGS.get_or_init(|| {
        let mut tags = vec![String::new(); usize::from(SLOTS)];
        let mut missing = usize::from(SLOTS);
        let mut n: u64 = 0;
        // Every slot is reached by a number below ~200,000; the loop ends when all are.
        while missing > 0 {
            let text = n.to_string();
            let entry = &mut tags[usize::from(crc16(text.as_bytes()) % SLOTS)];
            if entry.is_empty() {
                *entry = text;
                missing -= 1;
            }
            n += 1;
        }
        tags
    });
    &tags[usize::from(slot % SLOTS)]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_as_redis_computes_them() {
        // Redis Cluster specification: CRC16 of "123456789" is 0x31C3.
        assert_eq!(crc16(b"123456789"), 0x31C3);
        // `CLUSTER KEYSLOT` answers of a Redis 7 server.
        assert_eq!(slot(b"foo"), 12182);
        assert_eq!(slot(b"bar"), 5061);
        assert_eq!(slot(b"{user1000}.following"), slot(b"user1000"));
        assert_eq!(slot(b"foo{}{bar}"), slot(b"foo{}{bar}"));
        assert_eq!(hashed_part(b"foo{}{bar}"), b"foo{}{bar}");
        assert_eq!(hashed_part(b"foo{{bar}}zap"), b"{bar");
        assert_eq!(hashed_part(b"a{b}c{d}"), b"b");
        assert_eq!(hashed_part(b"a{bc"), b"a{bc");
    }

    #[test]
    fn every_slot_has_a_hash_tag() {
        for s in [0, 1, 5061, 12182, SLOTS - 1] {
            let tag = hash_tag_for(s);
            assert_eq!(slot(format!("x{{{tag}}}y").as_bytes()), s);
        }
        assert!((0..SLOTS).all(|s| slot(hash_tag_for(s).as_bytes()) == s));
    }
}
