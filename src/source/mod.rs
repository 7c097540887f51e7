//! PostgreSQL I/O of the feeds: a session that LISTENs on the channel (events in `notify`
//! delivery, wake-ups in the others) and reads what is installed; the outbox's claims and
//! doorbell (`outbox`); the replication stream (`logical`). Connection loss surfaces as an
//! error; the daemon's supervisor reconnects.

pub mod doorbell;
pub mod logical;
pub mod outbox;
pub mod walsender;

use std::sync::atomic::Ordering;

use thiserror::Error;
use tokio_postgres::Notification;
use tracing::warn;

use crate::config::{Delivery, Settings, Wakeup};
use crate::core::signature::SigningKey;
use crate::db::{self, Connection, DbError, NotificationFeed};
use crate::schema::{self, SchemaError};

#[derive(Debug, Error)]
pub enum SourceError {
    #[error(transparent)]
    Db(#[from] DbError),
    #[error(transparent)]
    Schema(#[from] SchemaError),
    #[error("postgresql: {}", crate::db::describe(.0))]
    Postgres(#[from] tokio_postgres::Error),
    #[error("schema `evictd` is not installed in this database: run `evictd migrate` first")]
    NotInstalled,
    #[error(
        "the installed schema is version {installed}, this evictd needs {wanted}: run `evictd migrate`"
    )]
    Version { installed: u32, wanted: u32 },
    #[error("the postgresql connection ended")]
    Closed,
    #[error("logical replication: {0}")]
    Logical(#[from] walsender::WalError),
    #[error(
        "cannot read the signing key ({}): the daemon's role needs SELECT on {} (deploy/sql/evictd-role.sql)",
        crate::db::describe(.0),
        schema::ddl::SIGNING_KEY_TABLE
    )]
    SigningKey(tokio_postgres::Error),
}

impl SourceError {
    /// Another connection streams from the replication slot: another daemon holds it.
    pub fn is_slot_in_use(&self) -> bool {
        matches!(
            self,
            SourceError::Logical(walsender::WalError::SlotInUse(_))
        )
    }
}

/// A listening PostgreSQL session and what is installed in its database.
pub struct Session {
    pub connection: Connection,
    pub feed: NotificationFeed,
    pub delivery: Delivery,
    pub wakeup: Wakeup,
    pub channel: String,
    /// The key of the signed events of `notify` and `logical` delivery (`None` in `outbox`,
    /// whose events need none: only the table's privileges let them in).
    pub signing_key: Option<SigningKey>,
}

impl Session {
    /// Connects, checks the configured tables and columns exist, reads the installed delivery
    /// mode and channel, and LISTENs on it.
    pub async fn open(settings: &Settings) -> Result<Self, SourceError> {
        let (feed, sender) = db::notification_feed(settings.notify_buffer);
        let connection = db::connect(
            &settings.database_url,
            settings.tls_ca_file.as_deref(),
            Some(sender),
        )
        .await?;
        // The session resolves names in pg_catalog whatever the role's or database's default
        // search path says: a schema another role can create objects in must not stand in for
        // an operator in the daemon's own queries. (A session of its own: LISTEN needs one.)
        connection
            .client
            .batch_execute(schema::PIN_SEARCH_PATH)
            .await?;
        // A missing table is a configuration the database cannot serve. A missing column is
        // one dropped or renamed since `migrate` (which refuses rules naming none): the
        // triggers, and the stream, send that table's changes table-wide meanwhile.
        for gap in schema::rule_gaps(&connection.client, settings).await? {
            if gap.table_missing {
                return Err(gap.error.into());
            }
            warn!(
                problem = %gap.error,
                "a rule names a column the table lacks (dropped or renamed since `evictd \
                 migrate`?): the table's changes are invalidated table-wide until the rule is \
                 fixed and `evictd migrate` runs"
            );
        }
        let installed = schema::installed(&connection.client)
            .await?
            .ok_or(SourceError::NotInstalled)?;
        if installed.version != schema::ddl::SCHEMA_VERSION {
            return Err(SourceError::Version {
                installed: installed.version,
                wanted: schema::ddl::SCHEMA_VERSION,
            });
        }
        if settings.delivery_given && settings.delivery != installed.delivery {
            warn!(
                configured = %settings.delivery.as_str(),
                installed = %installed.delivery.as_str(),
                "the configured delivery differs from what the database has installed; following \
                 the database (run `evictd migrate` to install the configured one)"
            );
        }
        if settings.channel_given && settings.channel != installed.channel {
            warn!(
                configured = %settings.channel,
                installed = %installed.channel,
                "the configured channel differs from what the database has installed; listening \
                 on the installed one (run `evictd migrate` to install the configured one)"
            );
        }
        // The daemon's own commits only acknowledge outbox rows. Losing the last few acks in a
        // PostgreSQL crash means invalidating those events again (at-least-once holds); not
        // waiting for their WAL flush keeps the daemon off the writers' commit path.
        // No statement or idle-in-transaction timeout from the role or database: a claim's
        // `DELETE … RETURNING` stays open while Redis invalidates the rows read so far (the
        // daemon reads on as it goes), and its transaction idles while Redis works on the last
        // of them; a short timeout failed the claim, and every retry, for ever. (A daemon that
        // dies mid-claim closes its connection; one waiting on Redis gives up after its
        // response timeout and rolls back.)
        // Dates in ISO style: the claim reads the outbox as text and writes poison rows' times
        // back from it, which only ISO (a numeric offset) reads back exactly whatever the time
        // zone: in another style, Dublin's summer time prints as `IST`, read back as Israel's.
        connection
            .client
            .batch_execute(&format!(
                "SET synchronous_commit = off; SET statement_timeout = 0; \
                 SET idle_in_transaction_session_timeout = 0; SET datestyle = 'ISO, YMD'; \
                 LISTEN {}",
                db::quote_ident(&installed.channel)
            ))
            .await?;
        let signing_key = match installed.delivery {
            Delivery::Outbox => None,
            Delivery::Notify | Delivery::Logical => {
                let row = connection
                    .client
                    .query_one(
                        &format!("SELECT key FROM {}", schema::ddl::SIGNING_KEY_TABLE),
                        &[],
                    )
                    .await
                    .map_err(SourceError::SigningKey)?;
                Some(SigningKey::new(row.get::<_, &[u8]>(0)))
            }
        };
        Ok(Self {
            connection,
            feed,
            delivery: installed.delivery,
            wakeup: installed.wakeup,
            channel: installed.channel,
            signing_key,
        })
    }

    /// Waits for the next notification. `Err(Closed)` when the connection is gone.
    pub async fn next_notification(&mut self) -> Result<Notification, SourceError> {
        tokio::select! {
            n = self.feed.receiver.recv() => n.ok_or(SourceError::Closed),
            ended = &mut self.connection.driver => match ended {
                Ok(Err(e)) => Err(SourceError::Postgres(e)),
                _ => Err(SourceError::Closed),
            },
        }
    }

    /// A notification already received, without waiting.
    pub fn try_next_notification(&mut self) -> Option<Notification> {
        self.feed.receiver.try_recv().ok()
    }

    /// How many notifications were dropped because the buffer was full, since the last call.
    pub fn take_dropped(&self) -> u64 {
        self.feed.dropped.swap(0, Ordering::Relaxed)
    }
}
