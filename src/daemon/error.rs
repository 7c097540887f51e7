//! Why a session ended: what the supervisor reconnects after, and what it gives up on.

use std::time::Duration;

use thiserror::Error;

use crate::schema::SchemaError;
use crate::sink::SinkError;
use crate::source::SourceError;

#[derive(Debug, Error)]
pub(super) enum SessionError {
    #[error(transparent)]
    Source(#[from] SourceError),
    #[error(transparent)]
    Sink(#[from] SinkError),
    #[error("postgresql did not answer a ping within {0:?} (half-open connection?)")]
    PgTimeout(Duration),
    #[error(
        "the replication stream did not deliver our marker within {0:?} (half-open connection?)"
    )]
    StreamSilent(Duration),
    #[error("shutting down")]
    Shutdown,
    /// The task invalidating a batch panicked (a bug) or was cancelled.
    #[error("invalidation task failed: {0}")]
    Invalidation(tokio::task::JoinError),
    /// A problem no reconnect can fix: the configuration names what the database lacks.
    #[error(transparent)]
    Fatal(SchemaError),
}
