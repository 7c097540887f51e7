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
    Sink(SinkError),
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
    /// A problem no reconnect can fix.
    #[error(transparent)]
    Fatal(FatalError),
}

/// What `run` gives up on: the configuration names what the database lacks, or a Redis the
/// URL cannot name (a `redis+cluster://` seed that is no cluster node, a key prefix no slot
/// can hold).
#[derive(Debug, Error)]
pub enum FatalError {
    #[error(transparent)]
    Schema(#[from] SchemaError),
    #[error(transparent)]
    Redis(SinkError),
}

impl From<SinkError> for SessionError {
    fn from(e: SinkError) -> Self {
        if e.is_config_problem() {
            SessionError::Fatal(FatalError::Redis(e))
        } else {
            SessionError::Sink(e)
        }
    }
}
