//! The signing key: what the triggers send through channels any role can write to — NOTIFY
//! payloads (`notify` delivery) and logical decoding messages (`logical`) — carries an
//! HMAC-SHA256 under a key only evictd's functions and the daemon can read, so an event forged
//! with a bare `NOTIFY` or `pg_logical_emit_message` is rejected. (`outbox` events need none:
//! the table's own privileges keep writers out.)
//!
//! A signed payload is the signature in lowercase hex followed by the payload itself
//! ([`SIGNATURE_HEX_LEN`] characters, then the JSON). The key is 64 random bytes — SHA-256's
//! block size, so HMAC uses it as it is — made by `migrate` from `gen_random_uuid()` (the
//! server's strong random source) and kept across migrations; the inner and outer pads are
//! stored beside it so that signing costs two `sha256` calls and no byte loop.

pub use crate::core::signature::SIGNATURE_HEX_LEN;

/// The table holding the key (one row), readable by its owner and the daemon's role only.
pub const SIGNING_KEY_TABLE: &str = "evictd.signing_key";

/// Creates the key table and, the first time, the key.
pub(super) fn signing_key_ddl() -> String {
    format!(
        r#"-- The key that signs NOTIFY payloads and logical decoding messages: any role can send
-- those, so the daemon accepts only what carries this key's HMAC. Readable by the owner
-- and the daemon's role (deploy/sql/evictd-role.sql) only.
CREATE TABLE IF NOT EXISTS {SIGNING_KEY_TABLE} (
    only_row boolean PRIMARY KEY DEFAULT true CHECK (only_row),
    key bytea NOT NULL,
    inner_pad bytea NOT NULL,
    outer_pad bytea NOT NULL
);
REVOKE ALL ON {SIGNING_KEY_TABLE} FROM PUBLIC;
DO $key$
DECLARE
    k bytea;
    inner_pad bytea;
    outer_pad bytea;
BEGIN
    IF NOT EXISTS (SELECT FROM {SIGNING_KEY_TABLE}) THEN
        k := pg_catalog.decode(pg_catalog.replace(
            pg_catalog.concat(pg_catalog.gen_random_uuid(), pg_catalog.gen_random_uuid(),
                              pg_catalog.gen_random_uuid(), pg_catalog.gen_random_uuid()),
            '-', ''), 'hex');
        inner_pad := k;
        outer_pad := k;
        FOR i IN 0..63 LOOP
            inner_pad := pg_catalog.set_byte(inner_pad, i, pg_catalog.get_byte(k, i) OPERATOR(pg_catalog.#) 54);
            outer_pad := pg_catalog.set_byte(outer_pad, i, pg_catalog.get_byte(k, i) OPERATOR(pg_catalog.#) 92);
        END LOOP;
        INSERT INTO {SIGNING_KEY_TABLE} (key, inner_pad, outer_pad) VALUES (k, inner_pad, outer_pad);
    END IF;
END
$key$;

"#
    )
}

/// The SQL expression of `payload` (a text expression, evaluated twice: pass a column or a
/// variable) signed with the key row `key` (an alias over [`SIGNING_KEY_TABLE`] in scope).
pub(super) fn signed(payload: &str, key: &str) -> String {
    let bytes = format!("pg_catalog.convert_to({payload}, 'UTF8')");
    let inner = format!("pg_catalog.sha256({key}.inner_pad OPERATOR(pg_catalog.||) {bytes})");
    let outer = format!("pg_catalog.sha256({key}.outer_pad OPERATOR(pg_catalog.||) {inner})");
    format!("pg_catalog.encode({outer}, 'hex') OPERATOR(pg_catalog.||) {payload}")
}
