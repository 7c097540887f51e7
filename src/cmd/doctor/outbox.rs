//! `doctor`'s checks of the trigger deliveries (`outbox`, `notify`): triggers present and
//! enabled, a LISTEN/NOTIFY round trip, the outbox's backlog and the doorbell.

use std::time::Duration;

use tokio_postgres::Client;

use super::{Check, Status, check};
use crate::config::{Settings, TriggerFiring};
use crate::db;
use crate::schema::{ddl, pinned};

/// How long the LISTEN/NOTIFY round trip may take before it counts as broken.
const ROUND_TRIP: Duration = Duration::from_secs(3);
/// An outbox event older than this means the daemon is not keeping up (or not running).
const BACKLOG_AGE_WARN_SECS: f64 = 60.0;
/// A busy doorbell with an event older than this: no daemon is draining (one that is claims
/// within milliseconds), so the doorbell was left busy and writers are not ringing.
const DOORBELL_STUCK_SECS: f64 = 5.0;

pub(super) async fn trigger_checks(settings: &Settings, client: &Client) -> Vec<Check> {
    let mut checks = Vec::new();
    for rule in settings.rules.tables() {
        // The table and every partition of it: a statement naming a partition fires only
        // the partition's triggers.
        let params: [&(dyn tokio_postgres::types::ToSql + Sync); 2] =
            [&rule.table.schema, &rule.table.name];
        let reads = client.query(
            "SELECT (SELECT format('%I.%I', n.nspname, c.relname) FROM pg_class c \
                     JOIN pg_namespace n ON n.oid = c.relnamespace WHERE c.oid = r.rel), \
               r.level, \
               ARRAY(SELECT t.tgname::text || ':' || t.tgenabled::text FROM pg_trigger t \
                     WHERE t.tgrelid = r.rel AND t.tgname LIKE 'evictd\\_%') \
             FROM (SELECT c.oid AS rel, 0 AS level FROM pg_class c \
                   JOIN pg_namespace n ON n.oid = c.relnamespace \
                   WHERE n.nspname = $1 AND c.relname = $2 \
                   UNION ALL \
                   SELECT p.relid, p.level FROM pg_partition_tree(format('%I.%I', $1, $2)::regclass) p \
                   WHERE p.level > 0) r \
             ORDER BY r.level, 1",
            &params,
        );
        let rows = pinned(client, reads).await;
        let rows = match rows {
            Ok(rows) => rows,
            Err(e) => {
                checks.push(check("triggers", Status::Fail, e.to_string(), None));
                continue;
            }
        };
        let mut problems = Vec::new();
        let mut hints = Vec::new();
        for row in &rows {
            let relation: &str = row.get(0);
            let triggers: Vec<String> = row.get(2);
            for name in ddl::TRIGGER_NAMES {
                match triggers
                    .iter()
                    .find_map(|t| t.strip_prefix(&format!("{name}:")))
                {
                    None => {
                        problems.push(format!("{relation}: trigger {name} is missing"));
                        hints.push(
                            "run `evictd migrate` (after attaching a partition too)".to_string(),
                        );
                    }
                    Some("D") => {
                        problems.push(format!("{relation}: trigger {name} is disabled"));
                        hints.push(format!("ALTER TABLE {relation} ENABLE TRIGGER {name}"));
                    }
                    // Fires only while `session_replication_role = replica`: never for writers.
                    Some("R") => {
                        problems.push(format!(
                            "{relation}: trigger {name} fires only under session_replication_role = replica"
                        ));
                        hints.push("run `evictd migrate`".to_string());
                    }
                    Some("O") if settings.trigger_firing == TriggerFiring::Always => {
                        problems.push(format!(
                            "{relation}: trigger {name} stays silent during restores and on subscribers, though trigger_firing = \"always\""
                        ));
                        hints.push("run `evictd migrate`".to_string());
                    }
                    Some(_) => {}
                }
            }
        }
        let partitions = rows.len().saturating_sub(1);
        if problems.is_empty() {
            let message = if partitions > 0 {
                format!(
                    "{}: 4 triggers enabled on it and its {partitions} partitions",
                    rule.table
                )
            } else {
                format!("{}: 4 triggers enabled", rule.table)
            };
            checks.push(check("triggers", Status::Ok, message, None));
        } else {
            hints.dedup();
            checks.push(Check {
                name: "triggers",
                status: Status::Fail,
                message: problems.join(", "),
                hint: Some(hints.join("; ")),
            });
        }
    }
    checks
}

/// LISTEN on one connection, NOTIFY from another, and wait for it. A transaction-pooling
/// PgBouncer (or Supabase's pooler on port 6543) accepts LISTEN but never delivers.
pub(super) async fn listen_round_trip(settings: &Settings, channel: &str) -> Check {
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
            .execute("SELECT pg_catalog.pg_notify($1, 'doctor')", &[&probe])
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

pub(super) async fn outbox_check(client: &Client) -> Check {
    let reads = client.query_one(
        "SELECT count(*), coalesce(extract(epoch FROM clock_timestamp() - min(created_at)), 0)::float8, \
         (SELECT count(*) FROM evictd.dead_letter) FROM evictd.outbox",
        &[],
    );
    let row = pinned(client, reads).await;
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
pub(super) async fn doorbell_check(client: &Client) -> Check {
    let row = pinned(
        client,
        client.query_one(
            &format!(
                "SELECT coalesce(pg_catalog.pg_sequence_last_value('{0}'), 0) = 1, \
                 coalesce(extract(epoch FROM clock_timestamp() - \
                 (SELECT min(created_at) FROM evictd.outbox)), 0)::float8, \
                 pg_catalog.has_sequence_privilege('{0}', 'UPDATE'), current_user::text",
                ddl::DOORBELL
            ),
            &[],
        ),
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
