//! What the replication stream carries, as plain data: positions in the WAL and the frames
//! the walsender sends (`source::walsender` reads them off the wire, `folder` folds them).

use std::fmt;

use bytes::Bytes;

/// A position in the WAL.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default)]
pub struct Lsn(pub u64);

impl fmt::Display for Lsn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:X}/{:X}", self.0 >> 32, self.0 & 0xffff_ffff)
    }
}

/// What the walsender sends while streaming.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    /// One `pgoutput` message (decoded by [`crate::core::pgoutput`]).
    XLogData(Bytes),
    /// The server's position, sent when idle and when it wants to hear from us.
    KeepAlive { wal_end: Lsn },
    /// A message larger than the stream holds (`source::walsender::MAX_FRAME_BYTES`),
    /// skipped: its first bytes and its length.
    Oversized { head: Bytes, len: usize },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn positions_print_as_postgres_writes_them() {
        assert_eq!(Lsn(0x1_6B37_4D48).to_string(), "1/6B374D48");
        assert_eq!(Lsn(0).to_string(), "0/0");
    }
}
