//! `evictd doctor`: checks the whole setup and says, one line per check, what is wrong and how to
//! fix it. Exit code 1 when any check FAILs.

use std::time::Duration;

use serde::Serialize;
use tokio_postgres::Client;

use crate::config::{Delivery, Settings, Wakeup};
use crate::db;
use crate::redact::redact_url;
use crate::schema::{self, ddl};
use crate::sink::{RedisSink, SinkOptions};

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

/// How long the LISTEN/NOTIFY round trip may take before it counts as broken.
const ROUND_TRIP: Duration = Duration::from_secs(3);
/// An outbox event older than this means the daemon is not keeping up (or not running).
const BACKLOG_AGE_WARN_SECS: f64 = 60.0;
/// A busy doorbell with an event older than this: no daemon is draining (one that is claims
/// within milliseconds), so the doorbell was left busy and writers are not ringing.
const DOORBELL_STUCK_SECS: f64 = 5.0;

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

async fn redis_checks(settings: &Settings) -> Vec<Check> {
    let connected = tokio::time::timeout(
        Duration::from_secs(10),
        RedisSink::connect(&settings.redis_url, SinkOptions::from(settings)),
    )
    .await;
    let sink = match connected {
        Ok(Ok(sink)) => sink,
        Ok(Err(e)) => {
            return vec![check(
                "redis",
                Status::Fail,
                e.to_string(),
                Some("check REDIS_URL / --redis-url and that the server runs"),
            )];
        }
        Err(_) => {
            return vec![check(
                "redis",
                Status::Fail,
                format!(
                    "no answer within 10s from {}",
                    redact_url(&settings.redis_url)
                ),
                Some("check the host, port and firewall"),
            )];
        }
    };
    let mut checks = Vec::new();
    match sink.server_info().await {
        Ok(info) => checks.push(check(
            "redis",
            Status::Ok,
            format!(
                "Redis {} ({}) at {}",
                info.version,
                info.role,
                redact_url(&settings.redis_url)
            ),
            None,
        )),
        Err(e) => {
            checks.push(check(
                "redis",
                Status::Fail,
                e.to_string(),
                Some("check Redis ACLs: evictd needs INFO, SCAN, EVALSHA, UNLINK"),
            ));
            return checks;
        }
    }
    checks.push(match sink.eviction_policy().await {
        Ok(Some(policy)) if policy.starts_with("allkeys-") => check(
            "redis-eviction",
            Status::Warn,
            format!("maxmemory-policy is {policy}: Redis may evict tag sets, and entries they index can then never be invalidated"),
            Some("CONFIG SET maxmemory-policy volatile-lru (give cache entries a TTL) or noeviction"),
        ),
        Ok(Some(policy)) => check("redis-eviction", Status::Ok, format!("maxmemory-policy is {policy}"), None),
        Ok(None) | Err(_) => check(
            "redis-eviction",
            Status::Warn,
            "cannot read maxmemory-policy (CONFIG GET refused)".to_string(),
            Some("make sure the policy cannot evict keys without a TTL"),
        ),
    });
    checks
}

async fn database_checks(settings: &Settings, client: &Client) -> Vec<Check> {
    let mut checks = Vec::new();
    let installed = match schema::installed(client).await {
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
    if installed
        .as_ref()
        .is_some_and(|i| i.delivery == Delivery::Logical)
    {
        checks.push(slot_check(client).await);
        checks.push(publication_check(settings, client).await);
        checks.extend(old_row_trigger_checks(settings, client).await);
        return checks;
    }
    checks.extend(trigger_checks(settings, client).await);
    if let Some(installed) = &installed {
        checks.push(listen_round_trip(settings, &installed.channel).await);
        checks.push(outbox_check(client).await);
        if installed.wakeup == Wakeup::Doorbell {
            checks.push(doorbell_check(client).await);
        }
    }
    checks
}

/// `logical` delivery: every configured table is in publication `evictd` (a table added to the
/// configuration without `evictd migrate` would otherwise be silently ignored).
async fn publication_check(settings: &Settings, client: &Client) -> Check {
    let rows = client
        .query(
            "SELECT schemaname::text || '.' || tablename::text FROM pg_publication_tables \
             WHERE pubname = 'evictd'",
            &[],
        )
        .await;
    let published: Vec<String> = match rows {
        Ok(rows) => rows.iter().map(|r| r.get(0)).collect(),
        Err(e) => return check("publication", Status::Fail, e.to_string(), None),
    };
    let missing: Vec<String> = settings
        .rules
        .tables()
        .iter()
        .map(|r| r.table.to_string())
        .filter(|t| !published.contains(t))
        .collect();
    if missing.is_empty() {
        check(
            "publication",
            Status::Ok,
            format!(
                "publication evictd covers the {} configured tables",
                published.len()
            ),
            None,
        )
    } else {
        check(
            "publication",
            Status::Fail,
            format!(
                "not published (their changes are ignored): {}",
                missing.join(", ")
            ),
            Some("run `evictd migrate`"),
        )
    }
}

/// WAL a slot nobody reads may hold before it is worth a warning.
const SLOT_LAG_WARN_BYTES: i64 = 1 << 30;
/// With asynchronous commits, the lag `logical` delivery adds on top of the invalidation itself.
const WAL_WRITER_DELAY_WARN_MS: i32 = 20;

/// `logical` delivery: `wal_level`, the slot, and how much WAL it holds back.
async fn slot_check(client: &Client) -> Check {
    let row = client
        .query_one(
            &format!(
                "SELECT current_setting('wal_level'), s.slot_name::text, s.active, s.wal_status, \
                 pg_wal_lsn_diff(pg_current_wal_lsn(), s.confirmed_flush_lsn)::int8, \
                 current_setting('synchronous_commit'), \
                 (SELECT setting::int4 FROM pg_settings WHERE name = 'wal_writer_delay') \
                 FROM (SELECT {}) AS want(name) \
                 LEFT JOIN pg_replication_slots s ON s.slot_name = want.name",
                ddl::SLOT_NAME_SQL
            ),
            &[],
        )
        .await;
    let row = match row {
        Ok(row) => row,
        Err(e) => return check("slot", Status::Fail, e.to_string(), None),
    };
    let wal_level: String = row.get(0);
    let slot: Option<String> = row.get(1);
    let active: Option<bool> = row.get(2);
    let wal_status: Option<String> = row.get(3);
    let behind: Option<i64> = row.get(4);
    let synchronous_commit: String = row.get(5);
    let wal_writer_delay_ms: i32 = row.get(6);
    if wal_level != "logical" {
        return check(
            "slot",
            Status::Fail,
            format!("wal_level is {wal_level}; logical delivery needs logical"),
            Some("ALTER SYSTEM SET wal_level = logical; then restart PostgreSQL"),
        );
    }
    let Some(slot) = slot else {
        return check(
            "slot",
            Status::Warn,
            "the replication slot does not exist".to_string(),
            Some("`evictd migrate` creates it (the daemon too, with a table-wide resync)"),
        );
    };
    let behind = behind.unwrap_or(0);
    let message = format!(
        "slot {slot}: {}, {} MB of WAL behind{}",
        if active == Some(true) {
            "streaming"
        } else {
            "not in use"
        },
        behind / (1 << 20),
        wal_status.map_or(String::new(), |w| format!(", wal_status {w}"))
    );
    if active != Some(true) && behind > SLOT_LAG_WARN_BYTES {
        check(
            "slot",
            Status::Warn,
            message,
            Some(
                "no daemon reads the slot and PostgreSQL keeps its WAL: start `evictd run`, or `evictd uninstall`",
            ),
        )
    } else if synchronous_commit == "off" && wal_writer_delay_ms > WAL_WRITER_DELAY_WARN_MS {
        // Logical decoding streams only WAL already flushed; an asynchronous commit is flushed
        // by the WAL writer, every `wal_writer_delay`.
        check(
            "slot",
            Status::Warn,
            format!(
                "{message}; synchronous_commit is off and wal_writer_delay {wal_writer_delay_ms}ms: \
                 asynchronous commits reach evictd only when the WAL writer flushes them"
            ),
            Some("ALTER SYSTEM SET wal_writer_delay = '10ms'; SELECT pg_reload_conf();"),
        )
    } else {
        check("slot", Status::Ok, message, None)
    }
}

async fn trigger_checks(settings: &Settings, client: &Client) -> Vec<Check> {
    if let Err(e) = schema::check_columns(client, settings).await {
        return vec![check(
            "triggers",
            Status::Fail,
            e.to_string(),
            Some("fix the configuration or the table, then run `evictd migrate`"),
        )];
    }
    let mut checks = Vec::new();
    for rule in settings.rules.tables() {
        let rows = client
            .query(
                "SELECT t.tgname::text, t.tgenabled::text FROM pg_trigger t \
                 JOIN pg_class c ON c.oid = t.tgrelid JOIN pg_namespace n ON n.oid = c.relnamespace \
                 WHERE n.nspname = $1 AND c.relname = $2 AND t.tgname LIKE 'evictd\\_%'",
                &[&rule.table.schema, &rule.table.name],
            )
            .await;
        let rows = match rows {
            Ok(rows) => rows,
            Err(e) => {
                checks.push(check("triggers", Status::Fail, e.to_string(), None));
                continue;
            }
        };
        let mut problems = Vec::new();
        let mut hints = Vec::new();
        for name in ddl::TRIGGER_NAMES {
            match rows.iter().find(|r| r.get::<_, &str>(0) == name) {
                None => {
                    problems.push(format!("trigger {name} is missing"));
                    hints.push("run `evictd migrate`".to_string());
                }
                Some(row) if row.get::<_, &str>(1) == "D" => {
                    problems.push(format!("trigger {name} is disabled"));
                    hints.push(format!("ALTER TABLE {} ENABLE TRIGGER {name}", rule.table));
                }
                Some(_) => {}
            }
        }
        if problems.is_empty() {
            checks.push(check(
                "triggers",
                Status::Ok,
                format!("{}: 4 triggers enabled", rule.table),
                None,
            ));
        } else {
            hints.dedup();
            checks.push(Check {
                name: "triggers",
                status: Status::Fail,
                message: format!("{}: {}", rule.table, problems.join(", ")),
                hint: Some(hints.join("; ")),
            });
        }
    }
    checks
}

/// `logical` delivery: where a rule uses columns outside the table's replica identity, their
/// old values come from triggers `evictd_old_update` and `evictd_old_delete`; without them an
/// UPDATE moving a row, or a DELETE, leaves the old values' tags stale.
async fn old_row_trigger_checks(settings: &Settings, client: &Client) -> Vec<Check> {
    const NAMES: [&str; 2] = ["evictd_old_update", "evictd_old_delete"];
    let mut checks = Vec::new();
    for rule in settings.rules.tables() {
        let row = client
            .query_opt(
                &format!(
                    "SELECT c.relreplident::text, {}, {}, \
                       ARRAY(SELECT t.tgname::text FROM pg_trigger t WHERE t.tgrelid = c.oid \
                             AND t.tgname LIKE 'evictd\\_old\\_%' AND t.tgenabled <> 'D'), \
                       EXISTS (SELECT FROM pg_index i WHERE i.indrelid = c.oid AND i.indisprimary) \
                     FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
                     WHERE n.nspname = $1 AND c.relname = $2",
                    ddl::identity_columns_sql("c.oid", "c.relreplident"),
                    ddl::sent_columns_sql("c.oid"),
                ),
                &[&rule.table.schema, &rule.table.name],
            )
            .await;
        let (replident, key, present, enabled, primary_key): (
            String,
            Vec<String>,
            Vec<String>,
            Vec<String>,
            bool,
        ) = match row {
            Ok(Some(row)) => (row.get(0), row.get(1), row.get(2), row.get(3), row.get(4)),
            // A missing table is the publication check's to report.
            Ok(None) => continue,
            Err(e) => {
                checks.push(check("triggers", Status::Fail, e.to_string(), None));
                continue;
            }
        };
        let outside = rule
            .columns
            .iter()
            .any(|c| present.contains(c) && !key.contains(c));
        if replident == "f" && primary_key {
            checks.push(full_identity_advice(&rule.table.to_string()));
            continue;
        }
        if replident == "f" || !outside {
            continue;
        }
        let absent: Vec<&str> = NAMES
            .into_iter()
            .filter(|name| !enabled.iter().any(|e| e == name))
            .collect();
        checks.push(if absent.is_empty() {
            check(
                "triggers",
                Status::Ok,
                format!("{}: old-row triggers enabled", rule.table),
                None,
            )
        } else {
            check(
                "triggers",
                Status::Fail,
                format!(
                    "{}: {} missing or disabled: moved and deleted rows' old tags stay stale",
                    rule.table,
                    absent.join(", ")
                ),
                Some(&format!(
                    "run `evictd migrate`, or ALTER TABLE {} ENABLE TRIGGER {}",
                    rule.table,
                    absent.join(", ENABLE TRIGGER ")
                )),
            )
        });
    }
    checks
}

/// A table with a primary key and `REPLICA IDENTITY FULL`: every UPDATE logs the old row whole,
/// TOASTed values inlined, and the walsender decodes it all, which evictd does not need (its
/// old-row triggers give the rule columns' old values). Schema version 2 set FULL on every
/// published table and migrate leaves identities as they are, so such a table may be a
/// leftover; it may also be the user's choice, hence OK with advice rather than a warning.
fn full_identity_advice(table: &str) -> Check {
    check(
        "identity",
        Status::Ok,
        format!(
            "{table}: REPLICA IDENTITY FULL logs each updated row's old version whole; evictd \
             needs only the primary key (unless you chose FULL, ALTER TABLE {table} REPLICA \
             IDENTITY DEFAULT, then `evictd migrate`, saves that WAL)"
        ),
        None,
    )
}

/// LISTEN on one connection, NOTIFY from another, and wait for it. A transaction-pooling
/// PgBouncer (or Supabase's pooler on port 6543) accepts LISTEN but never delivers.
async fn listen_round_trip(settings: &Settings, channel: &str) -> Check {
    let hint = "connect evictd directly to PostgreSQL (Supabase: db.<ref>.supabase.co:5432) or through a session-mode pooler; transaction pooling cannot deliver LISTEN/NOTIFY";
    let attempt = async {
        let (mut feed, sender) = db::notification_feed(16);
        let listener = db::connect(
            &settings.database_url,
            settings.tls_ca_file.as_deref(),
            Some(sender),
        )
        .await?;
        let probe = format!("evictd_doctor_{:08x}", rand::random::<u32>());
        listener
            .client
            .batch_execute(&format!("LISTEN {}", db::quote_ident(&probe)))
            .await?;
        let notifier = db::connect(
            &settings.database_url,
            settings.tls_ca_file.as_deref(),
            None,
        )
        .await?;
        notifier
            .client
            .execute("SELECT pg_notify($1, 'doctor')", &[&probe])
            .await?;
        let received = tokio::time::timeout(ROUND_TRIP, async {
            while let Some(n) = feed.receiver.recv().await {
                if n.channel() == probe {
                    return true;
                }
            }
            false
        })
        .await
        .unwrap_or(false);
        Ok::<bool, anyhow::Error>(received)
    };
    match attempt.await {
        Ok(true) => check(
            "listen",
            Status::Ok,
            format!("LISTEN/NOTIFY round trip works (daemon channel: {channel})"),
            None,
        ),
        Ok(false) => check(
            "listen",
            Status::Fail,
            format!("a NOTIFY was not delivered to a LISTENing session within {ROUND_TRIP:?}"),
            Some(hint),
        ),
        Err(e) => check(
            "listen",
            Status::Fail,
            format!("LISTEN failed: {e:#}"),
            Some(hint),
        ),
    }
}

async fn outbox_check(client: &Client) -> Check {
    let row = client
        .query_one(
            "SELECT count(*), coalesce(extract(epoch FROM clock_timestamp() - min(created_at)), 0)::float8, \
             (SELECT count(*) FROM evictd.dead_letter) FROM evictd.outbox",
            &[],
        )
        .await;
    match row {
        Ok(row) => {
            let (backlog, age, dead): (i64, f64, i64) = (row.get(0), row.get(1), row.get(2));
            let message = format!(
                "{backlog} events waiting, oldest {age:.1}s old; {dead} in evictd.dead_letter"
            );
            if age > BACKLOG_AGE_WARN_SECS {
                check(
                    "outbox",
                    Status::Warn,
                    message,
                    Some("is `evictd run` running and ready? see its /readyz and logs"),
                )
            } else if dead > 0 {
                check(
                    "outbox",
                    Status::Warn,
                    message,
                    Some("inspect SELECT * FROM evictd.dead_letter; the error column says why"),
                )
            } else {
                check("outbox", Status::Ok, message, None)
            }
        }
        Err(e) => check(
            "outbox",
            Status::Fail,
            e.to_string(),
            Some("run `evictd migrate`"),
        ),
    }
}

/// `doorbell` wake-up: whether writers ring. A daemon killed while draining leaves the doorbell
/// busy; writers then skip their wake-up until a daemon starts again (it resets it), so their
/// events wait for the daemon's safety poll at best.
async fn doorbell_check(client: &Client) -> Check {
    let row = client
        .query_one(
            &format!(
                "SELECT coalesce(pg_catalog.pg_sequence_last_value('{0}'), 0) = 1, \
                 coalesce(extract(epoch FROM clock_timestamp() - \
                 (SELECT min(created_at) FROM evictd.outbox)), 0)::float8, \
                 pg_catalog.has_sequence_privilege('{0}', 'UPDATE'), current_user::text",
                ddl::DOORBELL
            ),
            &[],
        )
        .await;
    match row {
        Ok(row) => {
            let (busy, age): (bool, f64) = (row.get(0), row.get(1));
            let (may_ring, role): (bool, String) = (row.get(2), row.get(3));
            if !may_ring {
                check(
                    "doorbell",
                    Status::Fail,
                    format!(
                        "role {role} cannot set the doorbell: the daemon would fail when it has work"
                    ),
                    Some(&format!(
                        "GRANT SELECT, UPDATE ON SEQUENCE {} TO {role} (deploy/sql/evictd-role.sql)",
                        ddl::DOORBELL
                    )),
                )
            } else if !busy {
                check(
                    "doorbell",
                    Status::Ok,
                    "idle: writers wake the daemon".to_string(),
                    None,
                )
            } else if age > DOORBELL_STUCK_SECS {
                check(
                    "doorbell",
                    Status::Warn,
                    format!(
                        "busy, yet an event has waited {age:.1}s: no daemon is draining, and writers skip their wake-up"
                    ),
                    Some(
                        "start `evictd run` (it resets the doorbell), or SELECT setval('evictd.doorbell', 0)",
                    ),
                )
            } else {
                check(
                    "doorbell",
                    Status::Ok,
                    "busy: a daemon is draining, writers skip their wake-up".to_string(),
                    None,
                )
            }
        }
        Err(e) => check(
            "doorbell",
            Status::Fail,
            e.to_string(),
            Some("run `evictd migrate`"),
        ),
    }
}
