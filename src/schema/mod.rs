//! The SQL side: generating the DDL from the configuration (`ddl`), installing it idempotently
//! (`migrate`), removing it (`uninstall`), and reading back what is installed.

pub mod ddl;
pub mod slot;

use std::time::Duration;

use thiserror::Error;
use tokio_postgres::error::SqlState;
use tokio_postgres::{Client, GenericClient};

use crate::config::{Delivery, Settings, Wakeup};

#[derive(Debug, Error)]
pub enum SchemaError {
    /// The configuration names a table or column the database does not have: a configuration
    /// error (exit code 2), reported against the file line that names it.
    #[error("{location}: {problem}")]
    Config { location: String, problem: String },
    #[error("{}", crate::db::describe(.0))]
    Db(#[from] tokio_postgres::Error),
    #[error("the installed schema records an unknown delivery mode `{0}`")]
    BadDelivery(String),
    #[error(
        "could not take the locks to migrate within {attempts} attempts (long transactions hold the tables)"
    )]
    LockTimeout { attempts: u32 },
}

/// What `evictd.settings` says is installed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Installed {
    pub version: u32,
    pub delivery: Delivery,
    /// How outbox mode wakes the daemon (`notify` when not recorded).
    pub wakeup: Wakeup,
    pub channel: String,
    /// Fingerprint of the DDL last applied; equal means `migrate` has nothing to do.
    pub ddl_hash: Option<String>,
}

/// Reads what is installed, or `None` when schema `evictd` is absent.
pub async fn installed(client: &impl GenericClient) -> Result<Option<Installed>, SchemaError> {
    let exists: bool = client
        .query_one("SELECT to_regclass('evictd.settings') IS NOT NULL", &[])
        .await?
        .get(0);
    if !exists {
        return Ok(None);
    }
    let rows = client
        .query("SELECT key, value FROM evictd.settings", &[])
        .await?;
    let get = |name: &str| {
        rows.iter()
            .find(|r| r.get::<_, &str>(0) == name)
            .map(|r| r.get::<_, String>(1))
    };
    let delivery_text = get("delivery").unwrap_or_default();
    let delivery = delivery_text
        .parse::<Delivery>()
        .map_err(|_| SchemaError::BadDelivery(delivery_text.clone()))?;
    Ok(Some(Installed {
        version: get("schema_version")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0),
        delivery,
        wakeup: get("wakeup")
            .and_then(|w| w.parse().ok())
            .unwrap_or(Wakeup::Notify),
        channel: get("channel").unwrap_or_default(),
        ddl_hash: get("ddl_hash"),
    }))
}

/// What the rules name that the database lacks: a table (nothing can be installed on it) or a
/// column (a rule's placeholder names none, or the column was dropped or renamed since
/// `migrate`).
#[derive(Debug)]
pub struct RuleGap {
    pub table_missing: bool,
    /// A [`SchemaError::Config`] naming the rule's file and line.
    pub error: SchemaError,
}

/// Every table and rule column the database lacks, in the rules' order.
pub async fn rule_gaps(
    client: &impl GenericClient,
    settings: &Settings,
) -> Result<Vec<RuleGap>, SchemaError> {
    let mut gaps = Vec::new();
    for rule in settings.rules.tables() {
        let rows = client
            .query(
                "SELECT a.attname::text FROM pg_attribute a \
                 JOIN pg_class c ON c.oid = a.attrelid JOIN pg_namespace n ON n.oid = c.relnamespace \
                 WHERE n.nspname = $1 AND c.relname = $2 AND a.attnum > 0 AND NOT a.attisdropped",
                &[&rule.table.schema, &rule.table.name],
            )
            .await?;
        let columns: Vec<String> = rows.iter().map(|r| r.get(0)).collect();
        let first_template = rule
            .tags
            .iter()
            .chain(&rule.keys)
            .next()
            .map(|t| t.source().to_string())
            .unwrap_or_default();
        if columns.is_empty() {
            gaps.push(RuleGap {
                table_missing: true,
                error: SchemaError::Config {
                    location: settings.origin.locate(&rule.table, &first_template),
                    problem: format!("table `{}` does not exist in the database", rule.table),
                },
            });
            continue;
        }
        for template in rule.tags.iter().chain(&rule.keys) {
            let placeholders =
                crate::core::rules::Template::placeholders(template.source()).unwrap_or_default();
            for missing in placeholders.iter().filter(|p| !columns.contains(p)) {
                gaps.push(RuleGap {
                    table_missing: false,
                    error: SchemaError::Config {
                        location: settings.origin.locate(&rule.table, template.source()),
                        problem: format!(
                            "placeholder `{{{missing}}}` in `{}` names no column of table `{}`",
                            template.source(),
                            rule.table
                        ),
                    },
                });
            }
        }
    }
    Ok(gaps)
}

/// Fails with the first of [`rule_gaps`]: what `migrate` and `doctor` require.
pub async fn check_columns(
    client: &impl GenericClient,
    settings: &Settings,
) -> Result<(), SchemaError> {
    match rule_gaps(client, settings).await?.into_iter().next() {
        Some(gap) => Err(gap.error),
        None => Ok(()),
    }
}

/// Whether publication `evictd` is no longer what `migrate` made of it for `tables` tables:
/// one dropped from it, a row filter added (changes to the rows it leaves out would never
/// arrive), or partitions no longer published through their root.
async fn publication_drifted(
    client: &impl GenericClient,
    tables: usize,
) -> Result<bool, SchemaError> {
    let row = client
        .query_one(
            "SELECT (SELECT pg_catalog.count(*) FROM pg_catalog.pg_publication_tables \
                     WHERE pubname OPERATOR(pg_catalog.=) 'evictd' AND rowfilter IS NULL), \
                    coalesce((SELECT pubviaroot FROM pg_catalog.pg_publication \
                              WHERE pubname OPERATOR(pg_catalog.=) 'evictd'), false)",
            &[],
        )
        .await?;
    let unfiltered: i64 = row.get(0);
    let via_root: bool = row.get(1);
    Ok(usize::try_from(unfiltered).unwrap_or(0) != tables || !via_root)
}

/// The partitions of `table` (at any depth) that lack evictd's triggers, by qualified name:
/// attached or created since `migrate` last ran. Every delivery gives each partition a
/// `evictd_truncate` trigger, so that one stands for them all.
pub async fn partitions_without_triggers(
    client: &impl GenericClient,
    table: &crate::core::rules::TableName,
) -> Result<Vec<String>, SchemaError> {
    let rows = client
        .query(
            "SELECT pg_catalog.format('%I.%I', n.nspname, c.relname) \
             FROM pg_catalog.pg_partition_tree(pg_catalog.format('%I.%I', $1::text, $2::text)::pg_catalog.regclass) p \
             JOIN pg_catalog.pg_class c ON c.oid = p.relid \
             JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace \
             WHERE p.level OPERATOR(pg_catalog.>) 0 AND NOT EXISTS (SELECT FROM pg_catalog.pg_trigger t \
                 WHERE t.tgrelid = p.relid AND t.tgname OPERATOR(pg_catalog.=) 'evictd_truncate') \
             ORDER BY 1",
            &[&table.schema, &table.name],
        )
        .await?;
    Ok(rows.iter().map(|r| r.get(0)).collect())
}

/// What `migrate` did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Migrated {
    /// The database already had exactly this DDL; nothing was touched.
    UpToDate,
    Applied,
}

/// How long one attempt waits for a table lock before giving up and retrying, so a migration
/// never queues (and makes the application's queries queue) behind a long transaction.
const LOCK_TIMEOUT: &str = "2s";
const LOCK_ATTEMPTS: u32 = 8;

/// Makes a session resolve every name in pg_catalog (and nothing in a temporary schema
/// first), whatever its role's or database's default: evictd's own queries then cannot run
/// another role's operator. Session-wide, for the daemon's own session.
pub const PIN_SEARCH_PATH: &str = "SET search_path = pg_catalog, pg_temp";
/// [`PIN_SEARCH_PATH`] for one transaction, where the connection may be shared (a pooler).
const PIN_SEARCH_PATH_LOCAL: &str = "SET LOCAL search_path = pg_catalog, pg_temp";

/// Runs `reads` (queries on `client`, which must be in no transaction) inside a read-only
/// transaction that resolves every name in pg_catalog. For the one-shot commands (`doctor`,
/// `stats`), run by an operator often with the owner's URL, and possibly through a
/// transaction pooler that would hand a session-wide setting to the application's next
/// transaction: so the path is pinned per transaction, which is rolled back.
pub async fn pinned<T, E>(
    client: &Client,
    reads: impl Future<Output = Result<T, E>>,
) -> Result<T, E>
where
    E: From<tokio_postgres::Error>,
{
    client
        .batch_execute(&format!("BEGIN READ ONLY; {PIN_SEARCH_PATH_LOCAL}"))
        .await?;
    let outcome = reads.await;
    let ended = client.batch_execute("ROLLBACK").await;
    let value = outcome?;
    ended?;
    Ok(value)
}

/// Installs or upgrades the database side for `settings`, in one transaction. The transaction
/// pins its search path before it reads anything: `migrate` runs as an owner of the tables,
/// and the database's default path may list a schema other roles can create operators in.
pub async fn migrate(client: &mut Client, settings: &Settings) -> Result<Migrated, SchemaError> {
    let ddl = ddl::render(settings);
    let hash = format!("{:016x}", ddl::fnv1a64(ddl.as_bytes()));
    {
        let tx = client.transaction().await?;
        tx.batch_execute(PIN_SEARCH_PATH_LOCAL).await?;
        check_columns(&tx, settings).await?;
        let mut up_to_date = installed(&tx)
            .await?
            .is_some_and(|installed| installed.ddl_hash.as_deref() == Some(hash.as_str()));
        // The DDL finds a table's partitions when it runs: one attached since needs it again.
        for rule in settings.rules.tables() {
            if !up_to_date {
                break;
            }
            up_to_date = partitions_without_triggers(&tx, &rule.table)
                .await?
                .is_empty();
        }
        if up_to_date && settings.delivery == Delivery::Logical {
            up_to_date = !publication_drifted(&tx, settings.rules.tables().len()).await?;
        }
        tx.commit().await?;
        if up_to_date {
            sync_slot(client, settings.delivery).await?;
            return Ok(Migrated::UpToDate);
        }
    }
    for attempt in 1..=LOCK_ATTEMPTS {
        let tx = client.transaction().await?;
        tx.batch_execute(&format!(
            "{PIN_SEARCH_PATH_LOCAL}; SET LOCAL lock_timeout = '{LOCK_TIMEOUT}'; SELECT pg_advisory_xact_lock(hashtext('evictd.migrate'));"
        ))
        .await?;
        match tx.batch_execute(&ddl).await {
            Ok(()) => {
                tx.execute(
                    "INSERT INTO evictd.settings (key, value) VALUES ('ddl_hash', $1) \
                     ON CONFLICT (key) DO UPDATE SET value = EXCLUDED.value",
                    &[&hash],
                )
                .await?;
                tx.commit().await?;
                sync_slot(client, settings.delivery).await?;
                return Ok(Migrated::Applied);
            }
            Err(e) if e.code() == Some(&SqlState::LOCK_NOT_AVAILABLE) => {
                drop(tx);
                tracing::warn!(
                    attempt,
                    "migrate: a table is locked by another transaction; retrying"
                );
                tokio::time::sleep(Duration::from_millis(250 * u64::from(attempt))).await;
            }
            Err(e) => return Err(e.into()),
        }
    }
    Err(SchemaError::LockTimeout {
        attempts: LOCK_ATTEMPTS,
    })
}

/// `logical` delivery needs its replication slot; any other mode must not leave one behind
/// (an unread slot keeps WAL forever). Slots are not transactional, so this runs after the DDL
/// committed, outside a transaction.
async fn sync_slot(client: &Client, delivery: Delivery) -> Result<(), SchemaError> {
    let name = slot::default_name(client).await?;
    if delivery == Delivery::Logical {
        slot::create_if_missing(client, &name).await?;
    } else if slot::drop_if_idle(client, &name).await? {
        tracing::info!(
            slot = name,
            "dropped the replication slot of the former logical delivery"
        );
    }
    Ok(())
}

/// Removes schema `evictd` with its triggers, functions and outbox, and the publication and
/// replication slot of `logical` delivery. Returns whether anything was installed.
pub async fn uninstall(client: &mut Client) -> Result<bool, SchemaError> {
    let was_installed = installed(&*client).await?.is_some();
    let tx = client.transaction().await?;
    tx.batch_execute(&format!(
        "{PIN_SEARCH_PATH_LOCAL}; SET LOCAL lock_timeout = '{LOCK_TIMEOUT}'; \
         DROP SCHEMA IF EXISTS evictd CASCADE; DROP PUBLICATION IF EXISTS evictd;"
    ))
    .await?;
    tx.commit().await?;
    sync_slot(client, Delivery::Outbox).await?;
    Ok(was_installed)
}
