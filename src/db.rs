//! PostgreSQL connections: parse the URL, connect with liveness settings, and drive the
//! connection so that notifications reach the caller.
//!
//! tokio-postgres delivers notifications only to whoever polls `Connection::poll_message`, so
//! every connection here is driven by a task of ours that forwards them to a bounded channel.
//! That task never blocks: when the channel is full it drops the notification and raises the
//! `dropped` count, and the daemon answers with a table-wide resync.

use std::path::Path;
use std::str::FromStr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use futures_util::StreamExt;
use thiserror::Error;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_postgres::config::SslMode;
use tokio_postgres::tls::{MakeTlsConnect, TlsConnect};
use tokio_postgres::{AsyncMessage, Client, Config, NoTls, Notification, Socket};

use crate::redact::redact_url;
use crate::tls::{Attempt, PgTlsMode};

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

/// Notifications forwarded from a connection, and how many were dropped for lack of room
/// since the count was last taken.
pub struct NotificationFeed {
    pub receiver: mpsc::Receiver<Notification>,
    pub dropped: Arc<AtomicU64>,
}

/// A connected client and the task driving its connection (it ends when the connection does).
pub struct Connection {
    pub client: Client,
    pub driver: JoinHandle<Result<(), tokio_postgres::Error>>,
    /// Whether the connection is encrypted: with `sslmode=prefer` (the default) the server may
    /// decline TLS, or its certificate not verify, and the connection is plain text.
    pub encrypted: bool,
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

/// Connects to `url`, with or without TLS as its `sslmode` decides (see [`crate::tls`]),
/// trusting the system roots plus `ca_file` or the URL's `sslrootcert`. Notifications go to
/// `feed` when given (bounded by its capacity), and are dropped otherwise.
pub async fn connect(
    url: &str,
    ca_file: Option<&Path>,
    feed: Option<(mpsc::Sender<Notification>, Arc<AtomicU64>)>,
) -> Result<Connection, DbError> {
    let tls = crate::tls::pg_tls(url);
    let mut config = parse_config(&tls.url).map_err(|e| match e {
        DbError::Url { detail, .. } => DbError::Url {
            url: redact_url(url),
            detail,
        },
        other => other,
    })?;
    let client_config = tls_config(url, &tls, ca_file)?;
    let attempts = tls.mode.attempts();
    let mut failures = Vec::new();
    for &attempt in attempts {
        let outcome = match (attempt, &client_config) {
            (Attempt::Plain, _) => {
                config.ssl_mode(SslMode::Disable);
                connect_plain(&config, feed.clone()).await
            }
            (Attempt::Tls | Attempt::TlsIfOffered, Some(client_config)) => {
                config.ssl_mode(if attempt == Attempt::Tls {
                    SslMode::Require
                } else {
                    SslMode::Prefer
                });
                connect_tls(&config, client_config.clone(), feed.clone()).await
            }
            // No root certificate to verify with: `prefer` and `allow` go on in plain text.
            (Attempt::Tls | Attempt::TlsIfOffered, None) => continue,
        };
        match outcome {
            Ok(connection) => {
                if !failures.is_empty() {
                    tracing::warn!(
                        url = %redact_url(url),
                        failed = %failures.join("; "),
                        encrypted = connection.encrypted,
                        "connected to postgresql only after another attempt failed, as the \
                         url's sslmode allows (sslmode=verify-full refuses plain text)"
                    );
                }
                return Ok(connection);
            }
            Err(e) if attempts.len() == 1 => {
                return Err(DbError::Connect {
                    url: redact_url(url),
                    detail: describe(&e),
                });
            }
            Err(e) => failures.push(format!("{}: {}", attempt_name(attempt), describe(&e))),
        }
    }
    Err(DbError::Connect {
        url: redact_url(url),
        detail: failures.join("; "),
    })
}

fn attempt_name(attempt: Attempt) -> &'static str {
    match attempt {
        Attempt::Plain => "in plain text",
        Attempt::Tls | Attempt::TlsIfOffered => "over tls",
    }
}

async fn connect_plain(
    config: &Config,
    feed: Option<(mpsc::Sender<Notification>, Arc<AtomicU64>)>,
) -> Result<Connection, tokio_postgres::Error> {
    let (client, connection) = config.connect(NoTls).await?;
    Ok(Connection {
        client,
        driver: drive(connection, feed),
        encrypted: false,
    })
}

async fn connect_tls(
    config: &Config,
    client_config: rustls::ClientConfig,
    feed: Option<(mpsc::Sender<Notification>, Arc<AtomicU64>)>,
) -> Result<Connection, tokio_postgres::Error> {
    let handshake = Arc::new(AtomicBool::new(false));
    let connector = NotingHandshake {
        inner: tokio_postgres_rustls::MakeRustlsConnect::new(client_config),
        done: handshake.clone(),
    };
    let (client, connection) = config.connect(connector).await?;
    Ok(Connection {
        client,
        driver: drive(connection, feed),
        encrypted: handshake.load(Ordering::Relaxed),
    })
}

/// The rustls connector, noting whether a TLS handshake took place: with `sslmode=prefer`
/// tokio-postgres goes on in plain text when the server declines TLS, and does not say so.
struct NotingHandshake {
    inner: tokio_postgres_rustls::MakeRustlsConnect,
    done: Arc<AtomicBool>,
}

impl MakeTlsConnect<Socket> for NotingHandshake {
    type Stream = <tokio_postgres_rustls::MakeRustlsConnect as MakeTlsConnect<Socket>>::Stream;
    type TlsConnect = NotingConnect<
        <tokio_postgres_rustls::MakeRustlsConnect as MakeTlsConnect<Socket>>::TlsConnect,
    >;
    type Error = <tokio_postgres_rustls::MakeRustlsConnect as MakeTlsConnect<Socket>>::Error;

    fn make_tls_connect(&mut self, domain: &str) -> Result<Self::TlsConnect, Self::Error> {
        Ok(NotingConnect {
            inner: <tokio_postgres_rustls::MakeRustlsConnect as MakeTlsConnect<Socket>>::make_tls_connect(
                &mut self.inner,
                domain,
            )?,
            done: self.done.clone(),
        })
    }
}

struct NotingConnect<T> {
    inner: T,
    done: Arc<AtomicBool>,
}

impl<T> TlsConnect<Socket> for NotingConnect<T>
where
    T: TlsConnect<Socket>,
    T::Future: Send + 'static,
{
    type Stream = T::Stream;
    type Error = T::Error;
    type Future =
        std::pin::Pin<Box<dyn std::future::Future<Output = Result<T::Stream, T::Error>> + Send>>;

    fn connect(self, stream: Socket) -> Self::Future {
        let done = self.done;
        let handshake = self.inner.connect(stream);
        Box::pin(async move {
            let stream = handshake.await?;
            done.store(true, Ordering::Relaxed);
            Ok(stream)
        })
    }
}

/// The TLS configuration for `url`'s TLS attempts, trusting the system roots plus the URL's
/// `sslrootcert` or else `ca_file`; `None` when `sslmode=prefer` or `allow` finds no root to
/// verify with (they then go on in plain text). Shared by the main and the replication
/// connection.
pub fn tls_config(
    url: &str,
    tls: &crate::tls::PgTls,
    ca_file: Option<&Path>,
) -> Result<Option<rustls::ClientConfig>, DbError> {
    if tls.mode == PgTlsMode::Disable {
        return Ok(None);
    }
    match crate::tls::client_config(tls.ca_file.as_deref().or(ca_file)) {
        Ok(config) => Ok(Some(config)),
        Err(crate::tls::TlsError::NoRoots) if tls.mode != PgTlsMode::Require => Ok(None),
        Err(source) => Err(DbError::Tls {
            url: redact_url(url),
            source,
        }),
    }
}

/// Polls `connection` in a task of its own, forwarding notifications without ever blocking.
fn drive<S, T>(
    mut connection: tokio_postgres::Connection<S, T>,
    feed: Option<(mpsc::Sender<Notification>, Arc<AtomicU64>)>,
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
                    if let Some((sender, dropped)) = &feed
                        && sender.try_send(n).is_err()
                    {
                        dropped.fetch_add(1, Ordering::Relaxed);
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
    (mpsc::Sender<Notification>, Arc<AtomicU64>),
) {
    let (sender, receiver) = mpsc::channel(capacity);
    let dropped = Arc::new(AtomicU64::new(0));
    (
        NotificationFeed {
            receiver,
            dropped: dropped.clone(),
        },
        (sender, dropped),
    )
}

/// Quotes an identifier for SQL text (LISTEN takes no parameters).
pub fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}
