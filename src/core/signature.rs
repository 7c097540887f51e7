//! Checks the signature triggers put in front of what they send through channels any database
//! role can write to: NOTIFY payloads (`notify` delivery) and logical decoding messages
//! (`logical`). Any role that can connect can `NOTIFY cache_invalidation, '…'` or call
//! `pg_logical_emit_message`; only evictd's functions can read the key (`schema::ddl::signing`).
//!
//! Pure: the key is read from the database by `source`, the check is HMAC-SHA256 over bytes.

use ring::hmac;
use thiserror::Error;

/// Characters the hex signature adds in front of a signed payload: the HMAC-SHA256 in lowercase
/// hex, then the payload itself.
pub const SIGNATURE_HEX_LEN: usize = 64;

/// Why a payload was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub enum Forged {
    #[error("payload carries no signature (forged, or sent by something other than evictd)")]
    Unsigned,
    #[error("payload signature does not match (forged, or signed under another key)")]
    BadSignature,
}

/// The key of `evictd.signing_key`.
#[derive(Clone)]
pub struct SigningKey(hmac::Key);

impl std::fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SigningKey(…)")
    }
}

impl SigningKey {
    pub fn new(key: &[u8]) -> Self {
        Self(hmac::Key::new(hmac::HMAC_SHA256, key))
    }

    /// The payload behind a valid signature.
    pub fn open<'a>(&self, signed: &'a [u8]) -> Result<&'a [u8], Forged> {
        if signed.len() < SIGNATURE_HEX_LEN {
            return Err(Forged::Unsigned);
        }
        let (hex, payload) = signed.split_at(SIGNATURE_HEX_LEN);
        let mut tag = [0u8; SIGNATURE_HEX_LEN / 2];
        for (byte, pair) in tag.iter_mut().zip(hex.chunks_exact(2)) {
            let (Some(high), Some(low)) = (hex_value(pair[0]), hex_value(pair[1])) else {
                return Err(Forged::Unsigned);
            };
            *byte = high << 4 | low;
        }
        hmac::verify(&self.0, payload, &tag).map_err(|_| Forged::BadSignature)?;
        Ok(payload)
    }

    /// [`SigningKey::open`] for text payloads.
    pub fn open_str<'a>(&self, signed: &'a str) -> Result<&'a str, Forged> {
        let payload = self.open(signed.as_bytes())?;
        // The signature is ASCII, so the rest starts on a character boundary.
        Ok(&signed[signed.len() - payload.len()..])
    }

    /// `payload` signed as the triggers sign it (for tests and tools).
    pub fn sign(&self, payload: &str) -> String {
        let tag = hmac::sign(&self.0, payload.as_bytes());
        let mut out = String::with_capacity(SIGNATURE_HEX_LEN + payload.len());
        for byte in tag.as_ref() {
            out.push_str(&format!("{byte:02x}"));
        }
        out.push_str(payload);
        out
    }
}

fn hex_value(digit: u8) -> Option<u8> {
    match digit {
        b'0'..=b'9' => Some(digit - b'0'),
        b'a'..=b'f' => Some(digit - b'a' + 10),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signed_payloads_open_and_tampered_ones_do_not() {
        let key = SigningKey::new(&[7; 64]);
        let signed = key.sign(r#"{"v":1}"#);
        assert_eq!(key.open_str(&signed), Ok(r#"{"v":1}"#));
        let mut tampered = signed.clone();
        tampered.push(' ');
        assert_eq!(key.open_str(&tampered), Err(Forged::BadSignature));
        assert_eq!(
            SigningKey::new(&[8; 64]).open_str(&signed),
            Err(Forged::BadSignature)
        );
        assert_eq!(key.open_str(r#"{"v":1}"#), Err(Forged::Unsigned));
        assert_eq!(
            key.open_str(&format!("{}{{}}", "Z".repeat(64))),
            Err(Forged::Unsigned)
        );
        assert_eq!(key.open_str("é".repeat(40).as_str()), Err(Forged::Unsigned));
    }

    /// RFC 4231 test case 2, the HMAC-SHA256 the database computes with `sha256` and the pads.
    #[test]
    fn matches_hmac_sha256() {
        let key = SigningKey::new(b"Jefe");
        assert_eq!(
            &key.sign("what do ya want for nothing?")[..64],
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }
}
