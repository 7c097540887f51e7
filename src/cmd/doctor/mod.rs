//! `evictd doctor`: checks the whole setup and says, one line per check, what is wrong and how to
//! fix it. Exit code 1 when any check FAILs.
//!
//! The checks are grouped by what they look at: `redis` the cache server, `outbox` the trigger
//! deliveries (`outbox`, `notify`: triggers, LISTEN, the queue, the doorbell), `logical` the slot,
//! publication and old-row triggers.

mod logical;
mod outbox;
mod redis;

use std::time::Duration;

use serde::Serialize;
use tokio_postgres::Client;

use crate::config::{Delivery, Settings, Wakeup};
use crate::db;
use crate::redact::redact_url;
use crate::schema::{self, ddl};

use logical::{
    emit_message_check, failover_check, old_row_trigger_checks, partition_checks,
    publication_check, slot_check,
};
use outbox::{doorbell_check, listen_round_trip, outbox_check, trigger_checks};
use redis::redis_checks;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum Status {
    #[serde(rename = "OK")]
    Ok,
    #[serde(rename = "WARN")]
    Warn,
    #[serde(rename = "FAIL")]
    Fail,
}

#[derive(Debug, Clone, Serialize)]
pub struct Check {
    pub name: &'static str,
    pub status: Status,
    pub message: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hint: Option<String>,
}

fn check(name: &'static str, status: Status, message: String, hint: Option<&str>) -> Check {
    Check {
        name,
        status,
        message,
        hint: hint.map(str::to_string),
    }
}

pub async fn doctor(settings: &Settings, json: bool) -> anyhow::Result<bool> {
    let checks = run_checks(settings).await;
    let healthy = checks.iter().all(|c| c.status != Status::Fail);
    if json {
        let report = serde_json::json!({ "ok": healthy, "checks": checks });
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        for c in &checks {
            let status = match c.status {
                Status::Ok => "OK  ",
                Status::Warn => "WARN",
                Status::Fail => "FAIL",
            };
            println!("{status} {:<14} {}", c.name, c.message);
            if let Some(hint) = &c.hint {
                println!("     {:<14} fix: {hint}", "");
            }
        }
    }
    Ok(healthy)
}

pub async fn run_checks(settings: &Settings) -> Vec<Check> {
    let mut checks = Vec::new();
    let pg = tokio::time::timeout(
        Duration::from_secs(10),
        db::connect(
            &settings.database_url,
            settings.tls_ca_file.as_deref(),
            None,
        ),
    )
    .await;
    let pg = match pg {
        Ok(Ok(conn)) => {
            let version = conn
                .client
                .query_one("SHOW server_version", &[])
                .await
                .map(|r| r.get::<_, String>(0))
                .unwrap_or_default();
            checks.push(check(
                "postgresql",
                Status::Ok,
                format!(
                    "PostgreSQL {version} at {}",
                    redact_url(&settings.database_url)
                ),
                None,
            ));
            checks.push(tls_check(settings, conn.encrypted));
            Some(conn)
        }
        Ok(Err(e)) => {
            checks.push(check(
                "postgresql",
                Status::Fail,
                e.to_string(),
                Some("check DATABASE_URL / --database-url, that the server runs, and pg_hba.conf"),
            ));
            None
        }
        Err(_) => {
            checks.push(check(
                "postgresql",
                Status::Fail,
                format!(
                    "no answer within 10s from {}",
                    redact_url(&settings.database_url)
                ),
                Some("check the host, port and firewall"),
            ));
            None
        }
    };
    checks.extend(redis_checks(settings).await);
    if let Some(conn) = pg {
        checks.extend(database_checks(settings, &conn.client).await);
    }
    checks
}

/// Whether the connection to PostgreSQL is encrypted. Plain text is fine to this machine; to
/// another, passwords and cached data cross the network readable, which `sslmode=prefer` (the
/// default) allows when the server declines TLS or its certificate does not verify.
fn tls_check(settings: &Settings, encrypted: bool) -> Check {
    if encrypted {
        return check(
            "postgresql-tls",
            Status::Ok,
            "the connection to PostgreSQL is encrypted (TLS, certificate verified)".to_string(),
            None,
        );
    }
    let remote: Vec<String> =
        crate::db::parse_config(&crate::tls::pg_tls(&settings.database_url).url)
            .map(|config| {
                config
                    .get_hosts()
                    .iter()
                    .filter_map(|host| match host {
                        tokio_postgres::config::Host::Tcp(name) if !is_local(name) => {
                            Some(name.clone())
                        }
                        _ => None,
                    })
                    .collect()
            })
            .unwrap_or_default();
    if remote.is_empty() {
        return check(
            "postgresql-tls",
            Status::Ok,
            "plain text to a server on this machine".to_string(),
            None,
        );
    }
    check(
        "postgresql-tls",
        Status::Warn,
        format!(
            "plain text to {}: the password and the data cross the network unencrypted",
            remote.join(", ")
        ),
        Some(
            "add sslmode=verify-full to the URL, with the server's CA in tls_ca_file or \
             sslrootcert if the system does not trust it (Supabase: Project Settings → Database \
             → SSL certificate)",
        ),
    )
}

/// Whether `host` names this machine: `localhost` or a loopback address.
fn is_local(host: &str) -> bool {
    host.eq_ignore_ascii_case("localhost")
        || host
            .trim_matches(['[', ']'])
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// Every table and column the rules name exists. A column dropped or renamed since `migrate`
/// fails no write (the triggers, and the stream, send the table's changes table-wide), but
/// every change of that table then empties all its entries.
async fn rules_check(settings: &Settings, client: &Client) -> Check {
    match schema::pinned(client, schema::rule_gaps(client, settings)).await {
        Ok(gaps) if gaps.is_empty() => check(
            "rules",
            Status::Ok,
            "every table and column the rules name exists".to_string(),
            None,
        ),
        Ok(gaps) => check(
            "rules",
            Status::Fail,
            gaps.iter()
                .map(|gap| gap.error.to_string())
                .collect::<Vec<_>>()
                .join("; "),
            Some(
                "a column dropped or renamed since `evictd migrate` sends its table's changes \
                 table-wide: fix the rule (or the table), then run `evictd migrate`",
            ),
        ),
        Err(e) => check("rules", Status::Fail, e.to_string(), None),
    }
}

async fn database_checks(settings: &Settings, client: &Client) -> Vec<Check> {
    let mut checks = Vec::new();
    let installed = match schema::pinned(client, schema::installed(client)).await {
        Ok(Some(installed)) if installed.version == ddl::SCHEMA_VERSION => {
            checks.push(check(
                "schema",
                Status::Ok,
                format!(
                    "schema evictd version {} installed, delivery {}, channel {}",
                    installed.version,
                    installed.delivery.as_str(),
                    installed.channel
                ),
                None,
            ));
            Some(installed)
        }
        Ok(Some(installed)) => {
            checks.push(check(
                "schema",
                Status::Fail,
                format!(
                    "schema evictd is version {}, this evictd needs {}",
                    installed.version,
                    ddl::SCHEMA_VERSION
                ),
                Some("run `evictd migrate`"),
            ));
            Some(installed)
        }
        Ok(None) => {
            checks.push(check(
                "schema",
                Status::Fail,
                "schema evictd is not installed".to_string(),
                Some("run `evictd migrate` (or apply `evictd sql` with your migration tool)"),
            ));
            None
        }
        Err(e) => {
            checks.push(check("schema", Status::Fail, e.to_string(), None));
            None
        }
    };
    checks.push(rules_check(settings, client).await);
    if installed
        .as_ref()
        .is_some_and(|i| i.delivery == Delivery::Logical)
    {
        checks.push(slot_check(client).await);
        checks.push(failover_check(client).await);
        checks.push(publication_check(settings, client).await);
        checks.extend(old_row_trigger_checks(settings, client).await);
        checks.extend(partition_checks(settings, client).await);
        checks.push(emit_message_check(client).await);
        return checks;
    }
    checks.extend(trigger_checks(settings, client).await);
    if let Some(installed) = &installed {
        checks.push(listen_round_trip(settings, &installed.channel).await);
        // `notify` delivery sends its events in the NOTIFY itself: no queue, no doorbell.
        if installed.delivery == Delivery::Outbox {
            checks.push(outbox_check(client).await);
            if installed.wakeup == Wakeup::Doorbell {
                checks.push(doorbell_check(client).await);
            }
        }
    }
    checks
}
