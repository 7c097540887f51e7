//! `evictd migrate`, `evictd uninstall`, `evictd sql`.

use anyhow::Context as _;

use crate::config::{Delivery, LogicalStreaming, Settings};
use crate::db;
use crate::schema::{self, Migrated, slot};

pub async fn migrate(settings: &Settings) -> anyhow::Result<()> {
    let mut conn = db::connect(
        &settings.database_url,
        settings.tls_ca_file.as_deref(),
        None,
    )
    .await?;
    let outcome = schema::migrate(&mut conn.client, settings).await?;
    let chose = match settings.delivery {
        Delivery::Logical => {
            Some(schema::pinned(&conn.client, logical_choices(settings, &conn.client)).await?)
        }
        _ => None,
    };
    match outcome {
        Migrated::UpToDate => println!(
            "evictd schema is up to date (version {}, delivery {})",
            schema::ddl::SCHEMA_VERSION,
            settings.delivery.as_str()
        ),
        Migrated::Applied => println!(
            "evictd schema installed (version {}, delivery {}, {} tables)",
            schema::ddl::SCHEMA_VERSION,
            settings.delivery.as_str(),
            settings.rules.tables().len()
        ),
    }
    if let Some(chose) = chose {
        println!("{chose}");
    }
    Ok(())
}

/// What `logical` delivery got on this server's version: the publication's shape and whether
/// the slot survives a failover.
async fn logical_choices(
    settings: &Settings,
    client: &tokio_postgres::Client,
) -> anyhow::Result<String> {
    let major = slot::server_major(client).await?;
    let name = slot::name(client).await?;
    let failover = match slot::failover(client, &name).await? {
        Some(true) => "a failover slot (standbys that synchronise slots keep it)".to_string(),
        Some(false) => "not a failover slot: the daemon makes it one when it starts".to_string(),
        None => format!(
            "no failover slots before PostgreSQL {}: a promoted standby lacks it",
            slot::FAILOVER_SLOTS_SINCE
        ),
    };
    let protocol = match settings.logical_streaming {
        LogicalStreaming::On => "2 (logical_streaming: transactions in progress too)",
        LogicalStreaming::Off => "1 (each transaction whole, at its commit)",
    };
    Ok(format!(
        "PostgreSQL {major}: publication evictd with column lists, every row, partitions through their root; \
         slot {name}: {failover}; the daemon streams pgoutput protocol {protocol}"
    ))
}

pub async fn uninstall(settings: &Settings) -> anyhow::Result<()> {
    let mut conn = db::connect(
        &settings.database_url,
        settings.tls_ca_file.as_deref(),
        None,
    )
    .await?;
    let client = &conn.client;
    if schema::pinned(client, schema::installed(client))
        .await?
        .is_some()
    {
        let waiting = schema::pinned(client, crate::source::outbox::backlog(client))
            .await
            .context("cannot count the outbox")?
            .waiting;
        if waiting > 0 {
            eprintln!("warning: dropping {waiting} events still waiting in evictd.outbox");
        }
    }
    if schema::uninstall(&mut conn.client).await? {
        println!("evictd schema removed");
    } else {
        println!("evictd schema was not installed");
    }
    Ok(())
}

pub fn sql(settings: &Settings) {
    print!("{}", schema::ddl::render(settings));
}
