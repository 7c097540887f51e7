//! `evictd migrate`, `evictd uninstall`, `evictd sql`.

use anyhow::Context as _;

use crate::config::Settings;
use crate::db;
use crate::schema::{self, Migrated};

pub async fn migrate(settings: &Settings) -> anyhow::Result<()> {
    let mut conn = db::connect(
        &settings.database_url,
        settings.tls_ca_file.as_deref(),
        None,
    )
    .await?;
    let outcome = schema::migrate(&mut conn.client, settings).await?;
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
    Ok(())
}

pub async fn uninstall(settings: &Settings) -> anyhow::Result<()> {
    let mut conn = db::connect(
        &settings.database_url,
        settings.tls_ca_file.as_deref(),
        None,
    )
    .await?;
    if schema::installed(&conn.client).await?.is_some() {
        let waiting = crate::source::outbox::backlog(&conn.client)
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
