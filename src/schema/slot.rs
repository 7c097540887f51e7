//! The replication slot of `logical` delivery: its name, creating it and dropping it. The one
//! module with the slot's SQL: `migrate`, `uninstall` and the daemon all go through here. Every
//! name is qualified: `migrate` runs these outside a transaction, where its search path is the
//! session's.

use tokio_postgres::GenericClient;

use super::ddl::SLOT_NAME_SQL;

/// What [`ensure`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SlotState {
    /// The slot was there: everything since our last confirmed position is still in the WAL.
    Kept,
    /// The slot had to be created (or re-created, its WAL lost): changes before now are
    /// unknown.
    Created,
}

/// The slot name installed in `evictd.settings`, or the one `migrate` would install.
pub async fn name(client: &impl GenericClient) -> Result<String, tokio_postgres::Error> {
    let row = client
        .query_one(
            &format!(
                "SELECT coalesce((SELECT value FROM evictd.settings \
                 WHERE key OPERATOR(pg_catalog.=) 'slot'), {SLOT_NAME_SQL})"
            ),
            &[],
        )
        .await?;
    Ok(row.get(0))
}

/// The name `migrate` gives the slot of this database.
pub async fn default_name(client: &impl GenericClient) -> Result<String, tokio_postgres::Error> {
    Ok(client
        .query_one(&format!("SELECT {SLOT_NAME_SQL}"), &[])
        .await?
        .get(0))
}

/// The first PostgreSQL major version with failover slots: a slot created with
/// `failover = true` is copied to standbys that synchronise slots (`sync_replication_slots`),
/// so a promoted standby has it, at the position the daemon confirmed.
pub const FAILOVER_SLOTS_SINCE: u32 = 17;

/// The server's major version (`server_version_num` / 10000: 15, 16, 17, 18…).
pub async fn server_major(client: &impl GenericClient) -> Result<u32, tokio_postgres::Error> {
    let row = client
        .query_one(
            "SELECT pg_catalog.current_setting('server_version_num')::pg_catalog.int4",
            &[],
        )
        .await?;
    Ok(u32::try_from(row.get::<_, i32>(0)).unwrap_or(0) / 10_000)
}

/// Creates slot `slot` unless it exists (as it is, even if it lost its WAL); whether it did.
/// From PostgreSQL 17 it is a failover slot ([`FAILOVER_SLOTS_SINCE`]).
pub async fn create_if_missing(
    client: &impl GenericClient,
    slot: &str,
) -> Result<bool, tokio_postgres::Error> {
    // Earlier servers have no five-argument form: the call must not even be parsed there.
    let create = if server_major(client).await? >= FAILOVER_SLOTS_SINCE {
        "pg_catalog.pg_create_logical_replication_slot($1, 'pgoutput', false, false, true)"
    } else {
        "pg_catalog.pg_create_logical_replication_slot($1, 'pgoutput')"
    };
    let created = client
        .execute(
            &format!(
                "SELECT {create} WHERE NOT EXISTS (SELECT FROM pg_catalog.pg_replication_slots \
                 WHERE slot_name OPERATOR(pg_catalog.=) $1::pg_catalog.name)"
            ),
            &[&slot],
        )
        .await?;
    Ok(created > 0)
}

/// Whether slot `slot` is a failover slot: `None` before PostgreSQL 17 (no such thing) or
/// when there is no such slot.
pub async fn failover(
    client: &impl GenericClient,
    slot: &str,
) -> Result<Option<bool>, tokio_postgres::Error> {
    if server_major(client).await? < FAILOVER_SLOTS_SINCE {
        return Ok(None);
    }
    Ok(client
        .query_opt(
            "SELECT failover FROM pg_catalog.pg_replication_slots \
             WHERE slot_name OPERATOR(pg_catalog.=) $1::pg_catalog.name",
            &[&slot],
        )
        .await?
        .map(|row| row.get(0)))
}

/// Makes sure slot `slot` exists and still has its WAL: one that lost it is dropped and made
/// again, and either way the caller learns that what came before is unknown.
pub async fn ensure(
    client: &impl GenericClient,
    slot: &str,
) -> Result<SlotState, tokio_postgres::Error> {
    let lost: Option<bool> = client
        .query_opt(
            "SELECT coalesce(wal_status OPERATOR(pg_catalog.=) 'lost', false) \
             FROM pg_catalog.pg_replication_slots WHERE slot_name OPERATOR(pg_catalog.=) $1::pg_catalog.name",
            &[&slot],
        )
        .await?
        .map(|row| row.get(0));
    match lost {
        Some(false) => return Ok(SlotState::Kept),
        Some(true) => {
            tracing::warn!(
                slot,
                "the replication slot lost its WAL (max_slot_wal_keep_size); re-creating it"
            );
            client
                .execute("SELECT pg_catalog.pg_drop_replication_slot($1)", &[&slot])
                .await?;
        }
        None => {}
    }
    create_if_missing(client, slot).await?;
    Ok(SlotState::Created)
}

/// Drops slot `slot` if it exists and no daemon streams from it; whether it did.
pub async fn drop_if_idle(
    client: &impl GenericClient,
    slot: &str,
) -> Result<bool, tokio_postgres::Error> {
    let dropped = client
        .execute(
            "SELECT pg_catalog.pg_drop_replication_slot(slot_name) \
             FROM pg_catalog.pg_replication_slots \
             WHERE slot_name OPERATOR(pg_catalog.=) $1::pg_catalog.name AND NOT active",
            &[&slot],
        )
        .await?;
    Ok(dropped > 0)
}

/// The WAL slot `slot` holds back: how far its confirmed position trails the current one, in
/// bytes (`None` when the slot does not exist).
pub async fn lag_bytes(
    client: &impl GenericClient,
    slot: &str,
) -> Result<Option<i64>, tokio_postgres::Error> {
    let row = client
        .query_opt(
            "SELECT pg_catalog.pg_wal_lsn_diff(pg_catalog.pg_current_wal_lsn(), confirmed_flush_lsn)::pg_catalog.int8 \
             FROM pg_catalog.pg_replication_slots \
             WHERE slot_name OPERATOR(pg_catalog.=) $1::pg_catalog.name",
            &[&slot],
        )
        .await?;
    Ok(row.and_then(|row| row.get(0)))
}

/// The process streaming from slot `slot`: `Some(None)` when it is free, `None` when there is no
/// such slot.
pub async fn holder(
    client: &impl GenericClient,
    slot: &str,
) -> Result<Option<Option<i32>>, tokio_postgres::Error> {
    Ok(client
        .query_opt(
            "SELECT active_pid FROM pg_catalog.pg_replication_slots \
             WHERE slot_name OPERATOR(pg_catalog.=) $1::pg_catalog.name",
            &[&slot],
        )
        .await?
        .map(|row| row.get(0)))
}
