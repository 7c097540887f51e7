//! The doorbell of `outbox` delivery with `doorbell` wake-up. A writer's wake-up NOTIFY makes
//! its commit hold a cluster-wide lock through the WAL flush, so notifying writers commit one
//! at a time; while a daemon drains anyway, the NOTIFY is wasted. So a daemon that found
//! several events marks itself busy ([`DOORBELL`] = 1) and writers skip the NOTIFY; going idle it sets 0 and
//! passes the [barrier](barrier_passed) before its last drain.
//!
//! Why nothing is missed: a writer that skips the NOTIFY has first taken [`DOORBELL_LOCK`]
//! (shared, held until it ends) and then seen 1. The daemon that set 1 later sets 0 and then
//! takes the lock exclusive — possible only once every such writer has ended — and drains:
//! their rows are committed by then (or rolled back). Until the barrier passes, the daemon
//! retries it; meanwhile writers see 0 and ring as usual.

use tokio_postgres::{Client, SimpleQueryMessage};

use crate::schema::ddl::{DOORBELL, DOORBELL_LOCK};

/// Tells writers whether a daemon is draining (`busy`: they may skip their wake-up NOTIFY).
/// Immediate: a sequence is not transactional.
pub async fn set_busy(client: &Client, busy: bool) -> Result<(), tokio_postgres::Error> {
    client
        .batch_execute(&format!(
            "SELECT pg_catalog.setval('{DOORBELL}', {})",
            u8::from(busy)
        ))
        .await
}

/// Whether every writer that saw the daemon busy has ended (committed or rolled back): takes
/// [`DOORBELL_LOCK`] exclusive without waiting and lets it go at once. Never waits, so a
/// long transaction that saw the daemon busy cannot stall it; the caller retries.
pub async fn barrier_passed(client: &Client) -> Result<bool, tokio_postgres::Error> {
    let messages = client
        .simple_query(&format!(
            "SELECT CASE WHEN pg_catalog.pg_try_advisory_lock({DOORBELL_LOCK}) \
             THEN pg_catalog.pg_advisory_unlock({DOORBELL_LOCK}) ELSE false END"
        ))
        .await?;
    Ok(messages.iter().any(|m| match m {
        SimpleQueryMessage::Row(row) => row.get(0) == Some("t"),
        _ => false,
    }))
}
