//! PostgreSQL connections: parse the URL, connect with liveness settings, and drive the
//! connection so that notifications reach the caller.
//!
//! tokio-postgres delivers notifications only to whoever polls `Connection::poll_message`, so
//! every connection here is driven by a task of ours that forwards them to a bounded channel.
//! That task never blocks: when the channel is full it drops the notification and raises the
//! `overflowed` flag, and the daemon answers with a table-wide resync.

use std::path::Path;
use std::str::FromStr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use futures_util::StreamExt;
use thiserror::Error;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_postgres::{AsyncMessage, Client, Config, NoTls, Notification};

use crate::redact::redact_url;

#[derive(Debug, Error)]
pub enum DbError {
    #[error("invalid database url {url}: {detail}")]
    Url { url: String, detail: String },
    #[error("cannot connect to postgresql at {url}: {detail}")]
    Connect { url: String, detail: String },
    #[error("cannot set up tls for postgresql at {url}: {source}")]
    Tls {
        url: String,
        source: crate::tls::TlsError,
    },
}

/// The whole cause chain of a PostgreSQL error in one line: tokio-postgres' own Display says
/// only "db error" and keeps the server's message in the source.
pub fn describe(error: &tokio_postgres::Error) -> String {
    if let Some(db) = error.as_db_error() {
        return format!("{}: {}", db.severity(), db.message());
    }
    let mut text = error.to_string();
    let mut source = std::error::Error::source(error);
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text = format!("{text}: {cause_text}");
        }
        source = cause.source();
    }
    text
}

/// Notifications forwarded from a connection, and whether any were dropped for lack of room.
pub struct NotificationFeed {
    pub receiver: mpsc::Receiver<Notification>,
    pub overflowed: Arc<AtomicBool>,
}

/// A connected client and the task driving its connection (it ends when the connection does).
pub struct Connection {
    pub client: Client,
    pub driver: JoinHandle<Result<(), tokio_postgres::Error>>,
}

/// Parses `url` and applies the liveness defaults evictd needs: a connect timeout and TCP
/// keepalives far shorter than the OS default of two hours.
pub fn parse_config(url: &str) -> Result<Config, DbError> {
    let mut config = Config::from_str(url).map_err(|e| DbError::Url {
        url: redact_url(url),
        detail: describe(&e),
    })?;
    if config.get_connect_timeout().is_none() {
        config.connect_timeout(Duration::from_secs(5));
    }
    config
        .keepalives(true)
        .keepalives_idle(Duration::from_secs(30))
        .keepalives_interval(Duration::from_secs(10))
        .keepalives_retries(3)
        .tcp_user_timeout(Duration::from_secs(30));
    if config.get_application_name().is_none() {
        config.application_name("evictd");
    }
    Ok(config)
}

/// Connects to `url` (over TLS when its `sslmode` asks for it, trusting the system roots plus
/// `ca_file` or the URL's `sslrootcert`). Notifications go to `feed` when given (bounded by its
/// capacity), and are dropped otherwise.
pub async fn connect(
    url: &str,
    ca_file: Option<&Path>,
    feed: Option<(mpsc::Sender<Notification>, Arc<AtomicBool>)>,
) -> Result<Connection, DbError> {
    let tls = crate::tls::pg_tls(url);
    let config = parse_config(&tls.url).map_err(|e| match e {
        DbError::Url { detail, .. } => DbError::Url {
            url: redact_url(url),
            detail,
        },
        other => other,
    })?;
    let connect_error = |e: tokio_postgres::Error| DbError::Connect {
        url: redact_url(url),
        detail: describe(&e),
    };
    if let Some(client_config) = tls_config(url, &tls, ca_file)? {
        let connector = tokio_postgres_rustls::MakeRustlsConnect::new(client_config);
        let (client, connection) = config.connect(connector).await.map_err(connect_error)?;
        Ok(Connection {
            client,
            driver: drive(connection, feed),
        })
    } else {
        let (client, connection) = config.connect(NoTls).await.map_err(connect_error)?;
        Ok(Connection {
            client,
            driver: drive(connection, feed),
        })
    }
}

/// The TLS configuration `url` asks for (`None`: plain text), trusting the system roots plus
/// the URL's `sslrootcert` or else `ca_file`. Shared by the main and the replication connection.
pub fn tls_config(
    url: &str,
    tls: &crate::tls::PgTls,
    ca_file: Option<&Path>,
) -> Result<Option<rustls::ClientConfig>, DbError> {
    if !tls.tls {
        return Ok(None);
    }
    crate::tls::client_config(tls.ca_file.as_deref().or(ca_file))
        .map(Some)
        .map_err(|source| DbError::Tls {
            url: redact_url(url),
            source,
        })
}

/// Polls `connection` in a task of its own, forwarding notifications without ever blocking.
fn drive<S, T>(
    mut connection: tokio_postgres::Connection<S, T>,
    feed: Option<(mpsc::Sender<Notification>, Arc<AtomicBool>)>,
) -> JoinHandle<Result<(), tokio_postgres::Error>>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    T: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    tokio::spawn(async move {
        let mut messages = futures_util::stream::poll_fn(move |cx| connection.poll_message(cx));
        while let Some(message) = messages.next().await {
            match message? {
                AsyncMessage::Notification(n) => {
                    if let Some((sender, overflowed)) = &feed
                        && sender.try_send(n).is_err()
                    {
                        overflowed.store(true, Ordering::Relaxed);
                    }
                }
                AsyncMessage::Notice(notice) => {
                    tracing::debug!(message = notice.message(), "postgresql notice");
                }
                _ => {}
            }
        }
        Ok(())
    })
}

/// A feed with room for `capacity` notifications, and the sender half for [`connect`].
pub fn notification_feed(
    capacity: usize,
) -> (
    NotificationFeed,
    (mpsc::Sender<Notification>, Arc<AtomicBool>),
) {
    let (sender, receiver) = mpsc::channel(capacity);
    let overflowed = Arc::new(AtomicBool::new(false));
    (
        NotificationFeed {
            receiver,
            overflowed: overflowed.clone(),
        },
        (sender, overflowed),
    )
}

/// Quotes an identifier for SQL text (LISTEN takes no parameters).
pub fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}
