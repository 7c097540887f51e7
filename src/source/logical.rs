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

use tokio_postgres::Client;

use super::SourceError;
use super::walsender::{Quiet, Target, WalStream};
use crate::config::{LogicalStreaming, Settings};
use crate::core::batch::Batch;
use crate::core::folder::{Folder, MARKER_PREFIX};
use crate::core::signature::SigningKey;
use crate::core::wal::{Frame, Lsn};
use crate::schema::ddl::PUBLICATION;

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
    /// and TLS as `settings.database_url`; with `make_failover`, the slot becomes a failover
    /// slot first (PostgreSQL 17+).
    pub async fn start(
        settings: &Settings,
        slot: &str,
        key: Option<SigningKey>,
        make_failover: bool,
    ) -> Result<Self, SourceError> {
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
            mode: tls.mode,
            tls: client_config,
            slot,
            publication: PUBLICATION,
            make_failover,
            streaming: settings.logical_streaming == LogicalStreaming::On,
        })
        .await?;
        Ok(Self {
            wal,
            state: Folder::new(key),
            pending: Batch::default(),
        })
    }

    /// Whether the replication connection is encrypted.
    pub fn encrypted(&self) -> bool {
        self.wal.encrypted
    }

    /// The pgoutput protocol version streamed (2: transactions in progress streamed too).
    pub fn protocol(&self) -> u32 {
        self.wal.protocol
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
