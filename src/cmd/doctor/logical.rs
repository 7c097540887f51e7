//! `doctor`'s checks of `logical` delivery: `wal_level`, the slot, the publication, the old-row
//! triggers and the replica identities.

use tokio_postgres::Client;

use super::{Check, Status, check};
use crate::config::Settings;
use crate::schema::{ddl, pinned, slot};

/// `logical` delivery: every configured table is in publication `evictd` (a table added to the
/// configuration without `evictd migrate` would otherwise be silently ignored), with every row
/// (a row filter someone added would hide changes), partitions published as their root (the
/// table a rule names).
pub(super) async fn publication_check(settings: &Settings, client: &Client) -> Check {
    let rows = pinned(
        client,
        client.query(
            "SELECT t.schemaname::pg_catalog.text OPERATOR(pg_catalog.||) '.' \
             OPERATOR(pg_catalog.||) t.tablename::pg_catalog.text, t.rowfilter IS NOT NULL, \
             p.pubviaroot, t.attnames IS NOT NULL \
             FROM pg_catalog.pg_publication p JOIN pg_catalog.pg_publication_tables t \
             ON t.pubname OPERATOR(pg_catalog.=) p.pubname \
             WHERE p.pubname OPERATOR(pg_catalog.=) 'evictd'",
            &[],
        ),
    )
    .await;
    let rows = match rows {
        Ok(rows) => rows,
        Err(e) => return check("publication", Status::Fail, e.to_string(), None),
    };
    let published: Vec<String> = rows.iter().map(|r| r.get(0)).collect();
    let configured: Vec<String> = settings
        .rules
        .tables()
        .iter()
        .map(|r| r.table.to_string())
        .collect();
    let missing: Vec<&String> = configured
        .iter()
        .filter(|t| !published.contains(t))
        .collect();
    let filtered: Vec<String> = rows
        .iter()
        .filter(|r| r.get::<_, bool>(1) && configured.contains(&r.get(0)))
        .map(|r| r.get(0))
        .collect();
    let via_root = rows.iter().all(|r| r.get::<_, bool>(2));
    let column_lists = rows.iter().filter(|r| r.get::<_, bool>(3)).count();
    if !missing.is_empty() {
        let missing: Vec<&str> = missing.iter().map(|t| t.as_str()).collect();
        return check(
            "publication",
            Status::Fail,
            format!(
                "not published (their changes are ignored): {}",
                missing.join(", ")
            ),
            Some("run `evictd migrate`"),
        );
    }
    if !filtered.is_empty() {
        return check(
            "publication",
            Status::Fail,
            format!(
                "publication evictd has a row filter on {}: changes to rows it leaves out never reach evictd",
                filtered.join(", ")
            ),
            Some("run `evictd migrate` (it publishes every row again)"),
        );
    }
    if !via_root {
        return check(
            "publication",
            Status::Fail,
            "publication evictd does not publish partitions' changes as their root's: rules name the root".to_string(),
            Some("run `evictd migrate`"),
        );
    }
    check(
        "publication",
        Status::Ok,
        format!(
            "publication evictd covers the {} configured tables, every row, partitions through their root; \
             {column_lists} with a column list (the replica identity and the rules' columns)",
            published.len()
        ),
        None,
    )
}

/// `logical` delivery: whether the slot would survive a failover. From PostgreSQL 17 evictd's
/// slot is a failover slot, which standbys with `sync_replication_slots = on` keep a copy of;
/// `synchronized_standby_slots` on the primary holds the daemon back until those standbys have
/// the WAL it reads, so the copy is never ahead of them. Before 17 a promoted standby lacks the
/// slot: the daemon makes it again there and invalidates every configured table once.
pub(super) async fn failover_check(client: &Client) -> Check {
    let slot = match pinned(client, slot::name(client)).await {
        Ok(slot) => slot,
        Err(e) => return check("failover", Status::Fail, e.to_string(), None),
    };
    let major = match pinned(client, slot::server_major(client)).await {
        Ok(major) => major,
        Err(e) => return check("failover", Status::Fail, e.to_string(), None),
    };
    if major < slot::FAILOVER_SLOTS_SINCE {
        return check(
            "failover",
            Status::Ok,
            format!(
                "PostgreSQL {major} has no failover slots: a standby promoted in a failover lacks slot {slot}; \
                 the daemon makes it again there and invalidates every configured table once (nothing stale, a cold cache)"
            ),
            Some("PostgreSQL 17 keeps the slot on standbys (evictd makes it a failover slot)"),
        );
    }
    let row = pinned(
        client,
        client.query_one(
            "SELECT (SELECT failover FROM pg_catalog.pg_replication_slots \
                     WHERE slot_name OPERATOR(pg_catalog.=) $1::pg_catalog.name), \
             pg_catalog.current_setting('synchronized_standby_slots'), \
             (SELECT pg_catalog.count(*) FROM pg_catalog.pg_replication_slots \
              WHERE slot_type OPERATOR(pg_catalog.=) 'physical')",
            &[&slot],
        ),
    )
    .await;
    let row = match row {
        Ok(row) => row,
        Err(e) => return check("failover", Status::Fail, e.to_string(), None),
    };
    let failover: Option<bool> = row.get(0);
    let synchronized: String = row.get(1);
    let physical: i64 = row.get(2);
    match failover {
        None => check(
            "failover",
            Status::Ok,
            format!("slot {slot} does not exist yet; it is made a failover slot"),
            None,
        ),
        Some(false) => check(
            "failover",
            Status::Warn,
            format!(
                "slot {slot} is not a failover slot: a standby promoted in a failover would lack it"
            ),
            Some("restart `evictd run`: it makes the slot a failover slot before it streams"),
        ),
        Some(true) if physical > 0 && synchronized.is_empty() => check(
            "failover",
            Status::Warn,
            format!(
                "slot {slot} is a failover slot, but synchronized_standby_slots is empty: evictd may read \
                 changes a standby has not received, and a promoted standby's copy of the slot would be past its WAL"
            ),
            Some(
                "on the primary set synchronized_standby_slots to the standbys' physical slots; on each standby \
                 sync_replication_slots = on, hot_standby_feedback = on, and a dbname in primary_conninfo",
            ),
        ),
        Some(true) => check(
            "failover",
            Status::Ok,
            format!(
                "slot {slot} is a failover slot: standbys with sync_replication_slots = on keep it{}",
                if synchronized.is_empty() {
                    String::new()
                } else {
                    format!(" (synchronized_standby_slots = {synchronized})")
                }
            ),
            None,
        ),
    }
}

/// WAL a slot nobody reads may hold before it is worth a warning.
const SLOT_LAG_WARN_BYTES: i64 = 1 << 30;
/// With asynchronous commits, the lag `logical` delivery adds on top of the invalidation itself.
const WAL_WRITER_DELAY_WARN_MS: i32 = 20;

/// `logical` delivery: `wal_level`, the slot, and how much WAL it holds back.
pub(super) async fn slot_check(client: &Client) -> Check {
    let row = pinned(
        client,
        client.query_one(
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
        ),
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

/// `logical` delivery: where a rule uses columns outside the table's replica identity, their
/// old values come from triggers `evictd_old_update` and `evictd_old_delete`; without them an
/// UPDATE moving a row, or a DELETE, leaves the old values' tags stale.
pub(super) async fn old_row_trigger_checks(settings: &Settings, client: &Client) -> Vec<Check> {
    const NAMES: [&str; 2] = ["evictd_old_update", "evictd_old_delete"];
    let mut checks = Vec::new();
    for rule in settings.rules.tables() {
        let row = pinned(
            client,
            client.query_opt(
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
            ),
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

/// `logical` delivery: every partition of a configured table carries the trigger that sends a
/// TRUNCATE naming it (the stream publishes changes as the root's, and such a TRUNCATE not at
/// all). One attached since `migrate` lacks it.
pub(super) async fn partition_checks(settings: &Settings, client: &Client) -> Vec<Check> {
    let mut checks = Vec::new();
    for rule in settings.rules.tables() {
        match pinned(
            client,
            crate::schema::partitions_without_triggers(client, &rule.table),
        )
        .await
        {
            Ok(missing) if missing.is_empty() => {}
            Ok(missing) => checks.push(check(
                "triggers",
                Status::Fail,
                format!(
                    "{}: partitions without evictd's trigger: {}",
                    rule.table,
                    missing.join(", ")
                ),
                Some("run `evictd migrate` (after attaching a partition too)"),
            )),
            Err(e) => checks.push(check("triggers", Status::Fail, e.to_string(), None)),
        }
    }
    checks
}

/// `logical` delivery: who may write logical decoding messages into the WAL. Every role may by
/// default; the daemon refuses forged events and skips large messages unread, but each one
/// still costs the walsender its decoding. OK either way, with the way to restrict it. The
/// function's signatures differ between versions (PostgreSQL 17 added a `flush` argument), so
/// they are found by name and the advice names the server's own.
pub(super) async fn emit_message_check(client: &Client) -> Check {
    let reads = client.query_one(
        "SELECT coalesce(bool_or(pg_catalog.has_function_privilege('public', p.oid, 'EXECUTE')), false), \
                coalesce(string_agg(p.oid::pg_catalog.regprocedure::text, ', ' ORDER BY p.oid), '') \
         FROM pg_catalog.pg_proc p \
         WHERE p.proname = 'pg_logical_emit_message' \
           AND p.pronamespace = 'pg_catalog'::pg_catalog.regnamespace",
        &[],
    );
    let open = pinned(client, reads).await;
    match open {
        Ok(row) if row.get::<_, bool>(0) => {
            let signatures: String = row.get(1);
            check(
                "logical-messages",
                Status::Ok,
                "every role may call pg_logical_emit_message: forged events are refused (unsigned) and large messages skipped unread, but each is still decoded by the walsender".to_string(),
                Some(&format!(
                    "to restrict it, as a superuser: REVOKE EXECUTE ON FUNCTION {signatures} FROM PUBLIC; then GRANT EXECUTE on them to the owner of schema evictd and to the daemon's role"
                )),
            )
        }
        Ok(_) => check(
            "logical-messages",
            Status::Ok,
            "pg_logical_emit_message is not open to every role".to_string(),
            None,
        ),
        Err(e) => check(
            "logical-messages",
            Status::Warn,
            crate::db::describe(&e),
            None,
        ),
    }
}
