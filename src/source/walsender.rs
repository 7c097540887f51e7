//! The replication side of the PostgreSQL wire protocol, as much of it as `logical` delivery
//! needs: a connection in replication mode (TLS, password, MD5 or SCRAM-SHA-256), `START_REPLICATION`
//! of a `pgoutput` slot, the XLogData and keepalive frames it streams, and the standby status
//! updates that confirm a position. tokio-postgres speaks everything else but not this; the
//! frontend messages and SCRAM come from its protocol crate, TLS from the same rustls connector
//! as every other connection (one crypto stack).
//!
//! No task of its own: the daemon polls [`WalStream::recv`], which sends any status update due
//! before it reads. Reads and writes go through buffers, so dropping a `recv` (the daemon's
//! `select!` does) loses nothing.
//! Formats: <https://www.postgresql.org/docs/current/protocol-replication.html>.

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::{Buf, Bytes, BytesMut};
use futures_util::FutureExt as _;
use postgres_protocol::authentication::{md5_hash, sasl};
use postgres_protocol::message::frontend;
use thiserror::Error;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio_postgres::config::Host;
use tokio_postgres::tls::{MakeTlsConnect, TlsConnect};

use crate::core::wal::{Frame, Lsn};
use crate::tls::{Attempt, PgTlsMode};

/// Authentication request kinds of the SASL exchange after the mechanism list.
const SASL_CONTINUE: u32 = 11;
const SASL_FINAL: u32 = 12;

/// Microseconds between the Unix epoch and PostgreSQL's (2000-01-01).
const PG_EPOCH_UNIX_US: i64 = 946_684_800_000_000;

/// The largest message the stream buffers whole. Every logical decoding message of evictd's
/// own is smaller (`schema::ddl::LOGICAL_MESSAGE_LIMIT`), and so is any change row short of a
/// huge value in a published column; anything larger — `pg_logical_emit_message` is open to
/// every role — is skipped unread, its first `OVERSIZED_HEAD_BYTES` kept to tell what it was
/// ([`Frame::Oversized`]), so no message makes the daemon hold more than this.
pub const MAX_FRAME_BYTES: usize = 16 << 20;
/// Of a frame too large to buffer, the start kept: the `XLogData` header and enough of the
/// message to read its kind, relation or prefix.
const OVERSIZED_HEAD_BYTES: usize = 25 + 512;
/// Before streaming starts (authentication, start-up) the server sends short messages; a
/// length field beyond this is refused before anything is allocated for it.
const MAX_STARTUP_MESSAGE_BYTES: usize = 1 << 20;

/// At most one position report per this interval (unless the server asks): one per
/// transaction would make the walsender, on the writers' cores, handle thousands a second.
/// It bounds what a daemon killed after an invalidation replays.
const STATUS_INTERVAL: Duration = Duration::from_millis(10);

#[derive(Debug, Error)]
pub enum WalError {
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("server: {0}")]
    Server(String),
    #[error("unexpected message from the server: {0}")]
    Protocol(String),
    #[error("tls: {0}")]
    Tls(String),
    #[error("authentication: {0}")]
    Auth(String),
    #[error("connecting took longer than {0:?}")]
    Timeout(Duration),
    #[error("the server ended the stream")]
    Closed,
    #[error("no host in the database url accepted the replication stream: {0}")]
    NoHost(String),
    #[error("{0}")]
    Attempts(String),
    /// Another connection streams from the slot (SQLSTATE 55006): another daemon holds it.
    #[error("server: {0}")]
    SlotInUse(String),
}

/// Restores the socket's wake-ups when dropped ([`WalStream::quiet_until`]). It borrows the
/// stream, so the descriptor it holds is open for as long as it lives.
pub struct Quiet<'a> {
    fd: Option<std::os::fd::RawFd>,
    _stream: std::marker::PhantomData<&'a ()>,
}

impl Drop for Quiet<'_> {
    fn drop(&mut self) {
        if let Some(fd) = self.fd {
            set_rcvlowat(fd, 1);
        }
    }
}

/// Sets `SO_RCVLOWAT` on `fd`; whether it took.
fn set_rcvlowat(fd: std::os::fd::RawFd, bytes: usize) -> bool {
    let value = libc::c_int::try_from(bytes).unwrap_or(libc::c_int::MAX);
    // SAFETY: `fd` is a `WalStream`'s open socket (a `Quiet` borrows the stream); the option
    // value is a c_int, read during the call only.
    let result = unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_RCVLOWAT,
            (&raw const value).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if result != 0 {
        tracing::debug!(error = %std::io::Error::last_os_error(), "SO_RCVLOWAT not set");
    }
    result == 0
}

/// One backend message taken off the read buffer.
enum Taken {
    Whole(u8, Bytes),
    /// A `CopyData` message too long to buffer: its start; the rest is being skipped.
    Oversized {
        head: Bytes,
        len: usize,
    },
}

/// Where and as whom to connect, and what to stream.
pub struct Target<'a> {
    pub config: &'a tokio_postgres::Config,
    /// What the URL's `sslmode` asks for, and the TLS configuration its TLS attempts use
    /// (`None`: none can be made; see [`crate::db::tls_config`]).
    pub mode: PgTlsMode,
    pub tls: Option<rustls::ClientConfig>,
    pub slot: &'a str,
    pub publication: &'a str,
    /// Turn the slot into a failover slot before streaming (it is not one, and the server
    /// has them: see [`crate::schema::slot::FAILOVER_SLOTS_SINCE`]).
    pub make_failover: bool,
    /// Ask for transactions in progress too ([`pgoutput_version`]).
    pub streaming: bool,
}

/// The pgoutput protocol version to ask a server of major version `major` for (the server
/// refuses a version it lacks; it never picks one): with `streaming` wanted, 2, with
/// transactions still in progress streamed (`streaming 'on'`), from PostgreSQL 14, which every
/// supported server is; otherwise, or when the version is unknown, 1: each transaction sent
/// whole at its commit. Streaming spares the server holding a huge transaction until its
/// commit (past `logical_decoding_work_mem` it spills it to disk and reads it back then); the
/// daemon holds only its targets (`core::folder`) and invalidates them at the commit — later
/// than a whole transaction's table-wide invalidation, which starts as soon as
/// `wide_row_threshold` rows of it arrived (BENCHMARKS.md). Versions 3 (two-phase) and 4
/// (parallel apply) add nothing the daemon uses.
fn pgoutput_version(major: u32, streaming: bool) -> u32 {
    if streaming && major >= 14 { 2 } else { 1 }
}

/// The major version in a `server_version` such as `17.10` or `18.4 (Debian 18.4-1)`.
fn server_major(version: &str) -> u32 {
    let digits: String = version.chars().take_while(char::is_ascii_digit).collect();
    digits.parse().unwrap_or(0)
}

trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

/// A started replication stream.
pub struct WalStream {
    io: Box<dyn Io>,
    read: BytesMut,
    write: BytesMut,
    /// The position to report as applied (and flushed), whether a report is due, whether the
    /// server asked for one, and when the last went out.
    applied: Lsn,
    status_due: bool,
    reply_requested: bool,
    last_status: Instant,
    /// Written but not yet flushed (a cancelled flush is finished by the next one).
    unflushed: bool,
    /// The TCP socket under `io` (none for a Unix socket), for [`Self::quiet_until`].
    tcp: Option<std::os::fd::RawFd>,
    /// Bytes of an oversized message still to be discarded as they arrive.
    skipping: usize,
    /// Streaming has started: messages up to [`MAX_FRAME_BYTES`] are taken, larger ones
    /// skipped; before, anything over [`MAX_STARTUP_MESSAGE_BYTES`] is an error.
    streaming: bool,
    /// Whether the connection is encrypted (see [`crate::tls`] for when it is not).
    pub encrypted: bool,
    /// The pgoutput protocol version streamed ([`pgoutput_version`]).
    pub protocol: u32,
}

impl WalStream {
    /// Connects, authenticates and starts streaming `target.slot` from its confirmed position.
    /// A URL naming several hosts is tried host by host, in order, as the main connection is:
    /// the first that accepts the stream (a standby has no slot to stream) is the one.
    pub async fn start(target: Target<'_>) -> Result<Self, WalError> {
        let limit = target
            .config
            .get_connect_timeout()
            .copied()
            .unwrap_or(Duration::from_secs(10));
        let hosts = hosts(target.config);
        let mut failures = Vec::new();
        for (host, port) in &hosts {
            let attempt =
                tokio::time::timeout(limit, Self::start_within(&target, host.clone(), *port))
                    .await
                    .map_err(|_| WalError::Timeout(limit))
                    .and_then(|started| started);
            match attempt {
                Ok(stream) => return Ok(stream),
                Err(e @ WalError::SlotInUse(_)) => return Err(e),
                Err(e) if hosts.len() == 1 => return Err(e),
                Err(e) => failures.push(format!("{}: {e}", describe_host(host, *port))),
            }
        }
        Err(WalError::NoHost(failures.join("; ")))
    }

    /// The attempts the URL's `sslmode` makes (see [`crate::tls`]), in order, on one host.
    async fn start_within(target: &Target<'_>, host: Host, port: u16) -> Result<Self, WalError> {
        let attempts = target.mode.attempts();
        let mut failures = Vec::new();
        for &attempt in attempts {
            let tls = match (attempt, &target.tls) {
                (Attempt::Plain, _) => None,
                (Attempt::Tls, Some(tls)) => Some((tls.clone(), false)),
                (Attempt::TlsIfOffered, Some(tls)) => Some((tls.clone(), true)),
                (Attempt::Tls | Attempt::TlsIfOffered, None) => continue,
            };
            match Self::start_once(target, host.clone(), port, tls).await {
                Ok(stream) => {
                    if !failures.is_empty() {
                        tracing::warn!(
                            failed = %failures.join("; "),
                            encrypted = stream.encrypted,
                            "replication connection made only after another attempt failed, as \
                             the url's sslmode allows (sslmode=verify-full refuses plain text)"
                        );
                    }
                    return Ok(stream);
                }
                // The server answered, and another daemon streams from the slot: no other
                // way of connecting changes that.
                Err(e @ WalError::SlotInUse(_)) => return Err(e),
                Err(e) if attempts.len() == 1 => return Err(e),
                Err(e) => failures.push(format!(
                    "{}: {e}",
                    if attempt == Attempt::Plain {
                        "in plain text"
                    } else {
                        "over tls"
                    }
                )),
            }
        }
        Err(WalError::Attempts(failures.join("; ")))
    }

    /// One attempt: `tls` is the configuration and whether a server declining TLS is answered
    /// in plain text on the same connection (`None`: plain text).
    async fn start_once(
        target: &Target<'_>,
        host: Host,
        port: u16,
        tls: Option<(rustls::ClientConfig, bool)>,
    ) -> Result<Self, WalError> {
        let config = target.config;
        let (io, tcp, encrypted) = connect(host, port, tls).await?;
        let mut stream = Self::over(io, tcp);
        stream.encrypted = encrypted;
        let user = config.get_user().unwrap_or("postgres");
        let database = config.get_dbname().unwrap_or(user);
        let application = config.get_application_name().unwrap_or("evictd");
        frontend::startup_message(
            [
                ("user", user),
                ("database", database),
                ("replication", "database"),
                ("application_name", application),
            ],
            &mut stream.write,
        )?;
        stream.flush_out().await?;
        stream.authenticate(user, config.get_password()).await?;
        let major = stream
            .until_ready()
            .await?
            .as_deref()
            .map_or(0, server_major);
        // The slot name is an identifier the server quotes for us nowhere else: quote it here.
        let slot = crate::db::quote_ident(target.slot);
        if target.make_failover && major >= crate::schema::slot::FAILOVER_SLOTS_SINCE {
            // No SQL function alters a slot: only this replication command does.
            frontend::query(
                &format!("ALTER_REPLICATION_SLOT {slot} ( FAILOVER true )"),
                &mut stream.write,
            )?;
            stream.flush_out().await?;
            stream.until_ready().await?;
            tracing::info!(
                slot = target.slot,
                "the replication slot is now a failover slot: standbys that synchronise slots keep it"
            );
        }
        let protocol = pgoutput_version(major, target.streaming);
        let streaming = if protocol >= 2 {
            ", streaming 'on'"
        } else {
            ""
        };
        let command = format!(
            "START_REPLICATION SLOT {slot} LOGICAL 0/0 (proto_version '{protocol}', publication_names {}, messages 'true'{streaming})",
            quote_literal(&crate::db::quote_ident(target.publication)),
        );
        stream.protocol = protocol;
        frontend::query(&command, &mut stream.write)?;
        stream.flush_out().await?;
        loop {
            let (tag, body) = stream.next_message().await?;
            match tag {
                b'W' => {
                    stream.streaming = true;
                    return Ok(stream);
                }
                b'N' | b'S' => {}
                other => return Err(unexpected(other, &body)),
            }
        }
    }

    /// A stream over a connection not yet started up.
    fn over(io: Box<dyn Io>, tcp: Option<std::os::fd::RawFd>) -> Self {
        Self {
            io,
            tcp,
            read: BytesMut::with_capacity(64 * 1024),
            write: BytesMut::new(),
            applied: Lsn(0),
            status_due: false,
            reply_requested: false,
            last_status: Instant::now(),
            unflushed: false,
            skipping: 0,
            streaming: false,
            protocol: 1,
            encrypted: false,
        }
    }

    /// The next frame. Cancel-safe.
    pub async fn recv(&mut self) -> Result<Frame, WalError> {
        loop {
            self.send_status().await?;
            if let Some(frame) = self.parse_frame()? {
                return Ok(frame);
            }
            // A report held back by the interval goes out when it ends, even if nothing comes.
            let report_at = self
                .status_due
                .then(|| tokio::time::Instant::from_std(self.last_status + STATUS_INTERVAL));
            tokio::select! {
                read = self.io.read_buf(&mut self.read) => {
                    if read? == 0 {
                        return Err(WalError::Closed);
                    }
                }
                () = tokio::time::sleep_until(report_at.unwrap_or_else(tokio::time::Instant::now)), if report_at.is_some() => {}
            }
        }
    }

    /// A frame already received, or one read without waiting.
    pub fn try_recv(&mut self) -> Result<Option<Frame>, WalError> {
        if let Some(frame) = self.parse_frame()? {
            return Ok(Some(frame));
        }
        match self.io.read_buf(&mut self.read).now_or_never() {
            None => Ok(None),
            Some(Ok(0)) => Err(WalError::Closed),
            Some(Ok(_)) => self.parse_frame(),
            Some(Err(e)) => Err(e.into()),
        }
    }

    /// Until the returned guard is dropped, the kernel wakes the daemon for this socket only
    /// once `bytes` have arrived (`SO_RCVLOWAT`): while a batch lingers nobody reads the stream,
    /// and each message the walsender sends (three per transaction) would otherwise wake a
    /// thread for nothing. Dropping the guard restores the default, and the kernel then
    /// signals at once whatever waits (Linux 4.18 and later). Best effort: where the option
    /// cannot be set the wake-ups merely cost CPU.
    pub fn quiet_until(&self, bytes: usize) -> Quiet<'_> {
        Quiet {
            fd: self.tcp.filter(|&fd| set_rcvlowat(fd, bytes)),
            _stream: std::marker::PhantomData,
        }
    }

    /// Reports everything up to `lsn` as done, so the slot may release that WAL. The report
    /// goes out from [`Self::recv`], within `STATUS_INTERVAL`.
    pub fn confirm(&mut self, lsn: Lsn) {
        if lsn > self.applied {
            self.applied = lsn;
            self.status_due = true;
        }
    }

    async fn send_status(&mut self) -> Result<(), WalError> {
        if self.status_due
            && (self.reply_requested || self.last_status.elapsed() >= STATUS_INTERVAL)
        {
            self.status_due = false;
            self.reply_requested = false;
            self.last_status = Instant::now();
            let now = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_micros() as i64)
                - PG_EPOCH_UNIX_US;
            let mut body = Vec::with_capacity(34);
            body.push(b'r');
            for _ in 0..3 {
                // Received, flushed and applied: all we report is what Redis confirmed.
                body.extend(self.applied.0.to_be_bytes());
            }
            body.extend(now.to_be_bytes());
            body.push(0);
            frontend::CopyData::new(&body[..])?.write(&mut self.write);
        }
        self.flush_out().await
    }

    /// Writes what is buffered. Cancel-safe: what was not written stays in the buffer.
    async fn flush_out(&mut self) -> Result<(), WalError> {
        while !self.write.is_empty() {
            self.io.write_buf(&mut self.write).await?;
            self.unflushed = true;
        }
        if self.unflushed {
            // TLS buffers records until flushed.
            self.io.flush().await?;
            self.unflushed = false;
        }
        Ok(())
    }

    /// One backend message from the read buffer, if a whole one (or, streaming, the head of
    /// an oversized one) is there. Discards what is left of a skipped message first.
    fn take_message(&mut self) -> Result<Option<Taken>, WalError> {
        if self.skipping > 0 {
            let discard = self.skipping.min(self.read.len());
            self.read.advance(discard);
            self.skipping -= discard;
            if self.skipping > 0 {
                return Ok(None);
            }
        }
        if self.read.len() < 5 {
            return Ok(None);
        }
        let tag = self.read[0];
        let len = u32::from_be_bytes([self.read[1], self.read[2], self.read[3], self.read[4]]);
        let len = usize::try_from(len).unwrap_or(usize::MAX);
        if len < 4 {
            return Err(WalError::Protocol(format!("message length {len}")));
        }
        let limit = if self.streaming {
            MAX_FRAME_BYTES
        } else {
            MAX_STARTUP_MESSAGE_BYTES
        };
        if len > limit {
            if !self.streaming || tag != b'd' {
                return Err(WalError::Protocol(format!(
                    "message `{}` of {len} bytes (at most {limit} accepted)",
                    char::from(tag)
                )));
            }
            let keep = 5 + OVERSIZED_HEAD_BYTES;
            if self.read.len() < keep {
                return Ok(None);
            }
            let mut head = self.read.split_to(keep).freeze();
            head.advance(5);
            self.skipping = len + 1 - keep;
            return Ok(Some(Taken::Oversized { head, len }));
        }
        if self.read.len() < len + 1 {
            self.read.reserve(len + 1 - self.read.len());
            return Ok(None);
        }
        let mut message = self.read.split_to(len + 1).freeze();
        message.advance(5);
        Ok(Some(Taken::Whole(tag, message)))
    }

    async fn next_message(&mut self) -> Result<(u8, Bytes), WalError> {
        loop {
            if let Some(message) = self.take_message()? {
                return match message {
                    Taken::Whole(b'E', body) => Err(server_error(&body)),
                    Taken::Whole(tag, body) => Ok((tag, body)),
                    Taken::Oversized { len, .. } => {
                        Err(WalError::Protocol(format!("message of {len} bytes")))
                    }
                };
            }
            if self.io.read_buf(&mut self.read).await? == 0 {
                return Err(WalError::Closed);
            }
        }
    }

    fn parse_frame(&mut self) -> Result<Option<Frame>, WalError> {
        while let Some(taken) = self.take_message()? {
            let (tag, body) = match taken {
                Taken::Whole(tag, body) => (tag, body),
                Taken::Oversized { mut head, len } => {
                    if head.first() != Some(&b'w') {
                        return Err(WalError::Protocol(format!(
                            "replication frame of {len} bytes"
                        )));
                    }
                    head.advance(25);
                    return Ok(Some(Frame::Oversized { head, len }));
                }
            };
            match tag {
                b'd' => {
                    if let Some(frame) = parse_copy_data(body)? {
                        if matches!(frame, FrameOrReply::Reply(_)) {
                            self.status_due = true;
                            self.reply_requested = true;
                        }
                        return Ok(Some(frame.into_frame()));
                    }
                }
                b'E' => return Err(server_error(&body)),
                b'c' => return Err(WalError::Closed),
                // Notices and parameter changes: nothing for us.
                b'N' | b'S' => {}
                other => return Err(unexpected(other, &body)),
            }
        }
        Ok(None)
    }

    async fn authenticate(&mut self, user: &str, password: Option<&[u8]>) -> Result<(), WalError> {
        let password = || {
            password.ok_or_else(|| {
                WalError::Auth("the server asks for a password and the URL has none".into())
            })
        };
        loop {
            let (tag, mut body) = self.next_message().await?;
            if tag != b'R' || body.len() < 4 {
                return Err(unexpected(tag, &body));
            }
            match body.get_u32() {
                0 => return Ok(()),
                3 => frontend::password_message(password()?, &mut self.write)?,
                5 if body.len() >= 4 => {
                    let salt = [body[0], body[1], body[2], body[3]];
                    let hashed = md5_hash(user.as_bytes(), password()?, salt);
                    frontend::password_message(hashed.as_bytes(), &mut self.write)?;
                }
                10 => {
                    let offered: Vec<&[u8]> = body.split(|&b| b == 0).collect();
                    if !offered.contains(&&b"SCRAM-SHA-256"[..]) {
                        return Err(WalError::Auth(format!(
                            "no supported SASL mechanism among {:?}",
                            String::from_utf8_lossy(&body)
                        )));
                    }
                    let mut scram =
                        sasl::ScramSha256::new(password()?, sasl::ChannelBinding::unsupported());
                    frontend::sasl_initial_response(
                        "SCRAM-SHA-256",
                        scram.message(),
                        &mut self.write,
                    )?;
                    let server_first = self.sasl_step(SASL_CONTINUE).await?;
                    scram
                        .update(&server_first)
                        .map_err(|e| WalError::Auth(e.to_string()))?;
                    frontend::sasl_response(scram.message(), &mut self.write)?;
                    let server_final = self.sasl_step(SASL_FINAL).await?;
                    scram
                        .finish(&server_final)
                        .map_err(|e| WalError::Auth(e.to_string()))?;
                    continue;
                }
                other => {
                    return Err(WalError::Auth(format!(
                        "authentication method {other} is not supported (use password, md5 or scram-sha-256)"
                    )));
                }
            }
            self.flush_out().await?;
        }
    }

    /// Sends what is buffered and reads the server's next SASL message, which must be an
    /// authentication request of kind `code`; returns its data.
    async fn sasl_step(&mut self, code: u32) -> Result<Bytes, WalError> {
        self.flush_out().await?;
        let (tag, mut body) = self.next_message().await?;
        if tag != b'R' || body.len() < 4 || body.get_u32() != code {
            return Err(unexpected(tag, &body));
        }
        Ok(body)
    }

    /// Reads up to ReadyForQuery; the `server_version` the server reported on the way, if it
    /// did (it does at start-up).
    async fn until_ready(&mut self) -> Result<Option<String>, WalError> {
        let mut version = None;
        loop {
            match self.next_message().await? {
                (b'Z', _) => return Ok(version),
                (b'S', body) => {
                    let mut fields = body.split(|&b| b == 0);
                    if fields.next() == Some(b"server_version".as_slice()) {
                        version = fields
                            .next()
                            .map(|v| String::from_utf8_lossy(v).into_owned());
                    }
                }
                (b'K' | b'N' | b'T' | b'D' | b'C', _) => {}
                (tag, body) => return Err(unexpected(tag, &body)),
            }
        }
    }
}

/// A parsed CopyData payload: a frame, or a keepalive that asks for a status report now.
enum FrameOrReply {
    Frame(Frame),
    Reply(Frame),
}

impl FrameOrReply {
    fn into_frame(self) -> Frame {
        match self {
            Self::Frame(frame) | Self::Reply(frame) => frame,
        }
    }
}

fn parse_copy_data(mut body: Bytes) -> Result<Option<FrameOrReply>, WalError> {
    let short = || WalError::Protocol("short replication frame".into());
    match body.first() {
        Some(b'w') if body.len() >= 25 => {
            // Start and end positions and the send time: the pgoutput message carries what
            // we use.
            body.advance(25);
            Ok(Some(FrameOrReply::Frame(Frame::XLogData(body))))
        }
        Some(b'k') if body.len() >= 18 => {
            body.advance(1);
            let wal_end = Lsn(body.get_u64());
            body.advance(8);
            let frame = Frame::KeepAlive { wal_end };
            Ok(Some(if body.get_u8() == 1 {
                FrameOrReply::Reply(frame)
            } else {
                FrameOrReply::Frame(frame)
            }))
        }
        Some(b'w' | b'k') => Err(short()),
        _ => Ok(None),
    }
}

/// The (host, port) pairs of `config`, in order: one port for all, or one per host.
fn hosts(config: &tokio_postgres::Config) -> Vec<(Host, u16)> {
    let ports = config.get_ports();
    let port = |i: usize| ports.get(i).or(ports.first()).copied().unwrap_or(5432);
    let hosts = config.get_hosts();
    if hosts.is_empty() {
        return vec![(Host::Tcp("localhost".into()), port(0))];
    }
    hosts
        .iter()
        .enumerate()
        .map(|(i, host)| (host.clone(), port(i)))
        .collect()
}

fn describe_host(host: &Host, port: u16) -> String {
    match host {
        Host::Tcp(name) => format!("{name}:{port}"),
        #[cfg(unix)]
        Host::Unix(dir) => format!("{}/.s.PGSQL.{port}", dir.display()),
    }
}

/// TCP keepalives as the main connection has them (`db::parse_config`): a peer that vanished
/// (a half-open connection) fails the socket within about a minute even while nothing is sent.
fn set_keepalives(fd: std::os::fd::RawFd) {
    let options: [(libc::c_int, libc::c_int, libc::c_int); 5] = [
        (libc::SOL_SOCKET, libc::SO_KEEPALIVE, 1),
        (libc::IPPROTO_TCP, libc::TCP_KEEPIDLE, 30),
        (libc::IPPROTO_TCP, libc::TCP_KEEPINTVL, 10),
        (libc::IPPROTO_TCP, libc::TCP_KEEPCNT, 3),
        (libc::IPPROTO_TCP, libc::TCP_USER_TIMEOUT, 30_000),
    ];
    for (level, name, value) in options {
        // SAFETY: `fd` is the open socket just connected; the value is a c_int read during
        // the call only.
        let result = unsafe {
            libc::setsockopt(
                fd,
                level,
                name,
                (&raw const value).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        if result != 0 {
            tracing::debug!(error = %std::io::Error::last_os_error(), name, "socket option not set");
        }
    }
}

/// Opens the connection, over TLS when `tls` says so; with its flag set, a server declining TLS
/// gets the startup in plain text on the same connection. Returns the stream, the TCP socket
/// (none for a Unix socket) and whether it is encrypted.
async fn connect(
    host: Host,
    port: u16,
    tls: Option<(rustls::ClientConfig, bool)>,
) -> Result<(Box<dyn Io>, Option<std::os::fd::RawFd>, bool), WalError> {
    match host {
        Host::Tcp(name) => {
            let tcp = tokio::net::TcpStream::connect((name.as_str(), port)).await?;
            tcp.set_nodelay(true)?;
            let fd = std::os::fd::AsRawFd::as_raw_fd(&tcp);
            set_keepalives(fd);
            let Some((tls, plain_if_declined)) = tls else {
                return Ok((Box::new(tcp), Some(fd), false));
            };
            let mut tcp = tcp;
            let mut request = BytesMut::new();
            frontend::ssl_request(&mut request);
            tcp.write_all(&request).await?;
            if tcp.read_u8().await? != b'S' {
                if plain_if_declined {
                    return Ok((Box::new(tcp), Some(fd), false));
                }
                return Err(WalError::Tls("the server does not accept TLS".into()));
            }
            let mut maker = tokio_postgres_rustls::MakeRustlsConnect::new(tls);
            let connector =
                <_ as MakeTlsConnect<tokio::net::TcpStream>>::make_tls_connect(&mut maker, &name)
                    .map_err(|e| WalError::Tls(e.to_string()))?;
            let stream = connector
                .connect(tcp)
                .await
                .map_err(|e| WalError::Tls(e.to_string()))?;
            Ok((Box::new(stream), Some(fd), true))
        }
        // TLS is not used over Unix sockets (nor by libpq).
        #[cfg(unix)]
        Host::Unix(dir) => {
            let path = dir.join(format!(".s.PGSQL.{port}"));
            Ok((
                Box::new(tokio::net::UnixStream::connect(path).await?),
                None,
                false,
            ))
        }
    }
}

/// The error an ErrorResponse body reports.
fn server_error(body: &[u8]) -> WalError {
    let text = error_text(body);
    let code = body
        .split(|&b| b == 0)
        .find_map(|field| field.strip_prefix(b"C"));
    if code == Some(b"55006".as_slice()) {
        WalError::SlotInUse(text)
    } else {
        WalError::Server(text)
    }
}

/// `S`everity, `C`ode and `M`essage of an ErrorResponse body.
fn error_text(body: &[u8]) -> String {
    let mut severity = "";
    let mut code = "";
    let mut message = String::new();
    for field in body.split(|&b| b == 0).filter(|f| !f.is_empty()) {
        let value = std::str::from_utf8(&field[1..]).unwrap_or("?");
        match field[0] {
            b'S' => severity = value,
            b'C' => code = value,
            b'M' => message = value.to_string(),
            _ => {}
        }
    }
    format!("{severity} {code}: {message}")
}

fn unexpected(tag: u8, body: &[u8]) -> WalError {
    WalError::Protocol(format!(
        "message `{}` ({} bytes)",
        char::from(tag),
        body.len()
    ))
}

/// `text` as a SQL string literal.
fn quote_literal(text: &str) -> String {
    format!("'{}'", text.replace('\'', "''"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_parse_and_short_ones_are_errors() {
        let mut w = vec![b'w'];
        w.extend([0u8; 24]);
        w.extend(b"B...");
        assert!(matches!(
            parse_copy_data(Bytes::from(w)),
            Ok(Some(FrameOrReply::Frame(Frame::XLogData(d)))) if &d[..] == b"B..."
        ));
        let mut k = vec![b'k'];
        k.extend(42u64.to_be_bytes());
        k.extend([0u8; 8]);
        k.push(1);
        assert!(matches!(
            parse_copy_data(Bytes::from(k)),
            Ok(Some(FrameOrReply::Reply(Frame::KeepAlive {
                wal_end: Lsn(42)
            })))
        ));
        assert!(parse_copy_data(Bytes::from_static(b"k\0\0")).is_err());
        assert!(parse_copy_data(Bytes::from_static(b"w")).is_err());
        assert!(matches!(
            parse_copy_data(Bytes::from_static(b"?")),
            Ok(None)
        ));
    }

    fn stream_over(io: tokio::io::DuplexStream, streaming: bool) -> WalStream {
        let mut stream = WalStream::over(Box::new(io), None);
        stream.streaming = streaming;
        stream
    }

    /// Before streaming starts, a length field of 2 GB from whoever answers the connection
    /// is refused, and nothing of that size is reserved for it.
    #[tokio::test]
    async fn a_length_field_cannot_make_it_allocate() {
        let (client, mut server) = tokio::io::duplex(1024);
        let mut stream = stream_over(client, false);
        server
            .write_all(&[b'R', 0x7f, 0xff, 0xff, 0xff])
            .await
            .unwrap();
        let error = stream.next_message().await.unwrap_err();
        assert!(matches!(error, WalError::Protocol(_)), "{error}");
        assert!(stream.read.capacity() < MAX_STARTUP_MESSAGE_BYTES);
    }

    /// While streaming, a frame over the limit comes out as its head and length, its bytes
    /// discarded as they arrive (the buffer never grows to hold it), and the stream goes on.
    #[tokio::test]
    async fn an_oversized_frame_is_skipped_as_it_arrives() {
        let (client, mut server) = tokio::io::duplex(64 * 1024);
        let mut stream = stream_over(client, true);
        let body = MAX_FRAME_BYTES + 1_000_000;
        let writer = tokio::spawn(async move {
            let mut frame = vec![b'd'];
            frame.extend(u32::try_from(4 + 25 + body).unwrap().to_be_bytes());
            frame.push(b'w');
            frame.extend([0u8; 24]);
            frame.extend(b"M\x01\0\0\0\0\0\0\0\x01evictd\0");
            server.write_all(&frame).await.unwrap();
            let rest = body - 17;
            let chunk = vec![b'x'; 1 << 16];
            let mut sent = 0;
            while sent < rest {
                let n = chunk.len().min(rest - sent);
                server.write_all(&chunk[..n]).await.unwrap();
                sent += n;
            }
            let mut keepalive = vec![b'd', 0, 0, 0, 22, b'k'];
            keepalive.extend(7u64.to_be_bytes());
            keepalive.extend([0u8; 8]);
            keepalive.push(0);
            server.write_all(&keepalive).await.unwrap();
            server
        });
        match stream.recv().await.unwrap() {
            Frame::Oversized { head, len } => {
                assert_eq!(len, 4 + 25 + body);
                assert!(head.starts_with(b"M\x01"));
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(
            stream.recv().await.unwrap(),
            Frame::KeepAlive { wal_end: Lsn(7) }
        );
        assert!(
            stream.read.capacity() < 1 << 20,
            "{}",
            stream.read.capacity()
        );
        drop(writer.await.unwrap());
    }

    #[test]
    fn error_responses_read_as_severity_code_message() {
        let body = b"SERROR\0VERROR\0C55006\0Mreplication slot \"s\" is active for PID 7\0\0";
        assert_eq!(
            error_text(body),
            "ERROR 55006: replication slot \"s\" is active for PID 7"
        );
        assert_eq!(error_text(b""), " : ");
    }
}
