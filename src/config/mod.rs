//! Configuration: the TOML file, environment and flags, merged once into a validated [`Settings`].
//! Every option's name, default, bounds and doc are declared once, in [`options`].
//!
//! Precedence is flag > environment > file > built-in default (clap already folds flag and
//! environment into one `Option`). Every problem with the file is reported as
//! `FILE: line N: PROBLEM` and maps to exit code 2.

pub mod options;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use serde::Deserialize;
use thiserror::Error;
use toml::Spanned;

use crate::core::rules::{Rules, TableName, TableRule};
use options::Number;

/// How events travel from the triggers to the daemon. Chosen at `migrate` time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Delivery {
    /// Events are written to `evictd.outbox` in the writer's transaction; NOTIFY only wakes the
    /// daemon. Nothing is lost while the daemon or Redis is down.
    Outbox,
    /// Events travel in NOTIFY payloads only; after any gap the daemon resyncs table-wide.
    Notify,
    /// The daemon reads committed changes from the WAL through a logical replication slot
    /// (`pgoutput`, publication `evictd`); triggers only supply old values the WAL lacks (of
    /// deleted rows, and of rows moved to another client or product). Nothing is lost while the
    /// daemon is down (the slot keeps the WAL), and most writes run no trigger at all.
    Logical,
}

impl Delivery {
    pub fn as_str(self) -> &'static str {
        match self {
            Delivery::Outbox => "outbox",
            Delivery::Notify => "notify",
            Delivery::Logical => "logical",
        }
    }
}

impl FromStr for Delivery {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "outbox" => Ok(Delivery::Outbox),
            "notify" => Ok(Delivery::Notify),
            "logical" => Ok(Delivery::Logical),
            other => Err(format!(
                "unknown delivery mode `{other}` (use outbox, notify or logical)"
            )),
        }
    }
}

/// How the daemon learns that the outbox has new rows (outbox mode only; chosen at `migrate`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Wakeup {
    /// Each committing transaction also NOTIFYs: lowest latency under load, but PostgreSQL
    /// serialises notifying commits on a cluster-wide lock, which costs writers throughput.
    Notify,
    /// No NOTIFY: the daemon polls the outbox on an adaptive interval (10 ms while busy, backing
    /// off to `outbox_poll_max_ms` when idle): lowest writer cost, latency up to that interval.
    Poll,
    /// The default. A NOTIFY only while no daemon is draining: a daemon whose drain found
    /// several events says so (the doorbell) and polls every millisecond until its polls find
    /// few. Writers under load skip the commit-time lock (and are asked to ring again when the
    /// daemon falls behind them); invalidation waits a millisecond or two longer meanwhile.
    Doorbell,
}

impl Wakeup {
    pub fn as_str(self) -> &'static str {
        match self {
            Wakeup::Notify => "notify",
            Wakeup::Poll => "poll",
            Wakeup::Doorbell => "doorbell",
        }
    }
}

impl FromStr for Wakeup {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "notify" => Ok(Wakeup::Notify),
            "poll" => Ok(Wakeup::Poll),
            "doorbell" => Ok(Wakeup::Doorbell),
            other => Err(format!(
                "unknown outbox wake-up `{other}` (use notify, poll or doorbell)"
            )),
        }
    }
}

/// When evictd's triggers fire (chosen at `migrate`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TriggerFiring {
    /// PostgreSQL's default: not while `session_replication_role = replica`, which restores
    /// (Supabase's procedure, `pg_restore --disable-triggers`) and logical-replication apply
    /// workers set. Changes made so go unseen.
    Origin,
    /// `ENABLE ALWAYS`: in every session, restores and subscribers included.
    Always,
}

impl TriggerFiring {
    pub fn as_str(self) -> &'static str {
        match self {
            TriggerFiring::Origin => "origin",
            TriggerFiring::Always => "always",
        }
    }
}

/// Whether `logical` delivery asks the server to stream transactions still in progress.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogicalStreaming {
    /// Each transaction arrives whole at its commit (a huge one spilled to the server's disk
    /// past `logical_decoding_work_mem` meanwhile): a table it touches past
    /// `wide_row_threshold` rows is invalidated table-wide as soon as that many arrive.
    Off,
    /// Past `logical_decoding_work_mem` the server sends it while in progress (pgoutput
    /// protocol 2); the daemon holds its targets until its commit.
    On,
}

impl LogicalStreaming {
    pub fn as_str(self) -> &'static str {
        match self {
            LogicalStreaming::Off => "off",
            LogicalStreaming::On => "on",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Text,
    Json,
}

impl FromStr for LogFormat {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "text" => Ok(LogFormat::Text),
            "json" => Ok(LogFormat::Json),
            other => Err(format!("unknown log format `{other}` (use text or json)")),
        }
    }
}

/// The environment variable of [`Settings::stall_on_tag`].
pub const STALL_ON_TAG_ENV: &str = "EVICTD_FAULT_STALL_ON_TAG";

/// Values given on the command line or in the environment; `None` means "not given".
#[derive(Debug, Clone, Default)]
pub struct Overrides {
    pub config: Option<PathBuf>,
    pub database_url: Option<String>,
    pub redis_url: Option<String>,
    pub channel: Option<String>,
    pub key_prefix: Option<String>,
    pub delivery: Option<Delivery>,
    pub http_addr: Option<String>,
    pub log_format: Option<LogFormat>,
    pub tls_ca_file: Option<PathBuf>,
}

/// The validated configuration every command runs with. Built once, passed explicitly.
#[derive(Debug, Clone)]
pub struct Settings {
    pub database_url: String,
    pub redis_url: String,
    /// Whether the URLs were given (flag, environment or file) rather than defaulted; `dev`
    /// starts throwaway servers for the ones that were not.
    pub database_url_given: bool,
    pub redis_url_given: bool,
    /// NOTIFY channel the triggers signal on.
    pub channel: String,
    /// Prefix of every Redis key evictd reads or writes (`cache:`).
    pub key_prefix: String,
    /// Delivery mode `migrate` installs; `run` follows what the database records.
    pub delivery: Delivery,
    /// Whether the delivery mode and the channel were given (flag, environment or file) rather
    /// than defaulted; `run` warns when a given one differs from what the database records.
    pub delivery_given: bool,
    pub channel_given: bool,
    /// How outbox mode wakes the daemon (installed by `migrate`, like `delivery`).
    pub outbox_wakeup: Wakeup,
    /// When the triggers `migrate` installs fire.
    pub trigger_firing: TriggerFiring,
    /// Whether `logical` delivery has transactions streamed while in progress.
    pub logical_streaming: LogicalStreaming,
    /// The longest pause between two polls of the outbox in `poll` wake-up mode.
    pub outbox_poll_max: Duration,
    pub http_addr: SocketAddr,
    pub log_format: LogFormat,
    /// How long `{prefix}tagts:{tag}` markers live.
    pub tagts_ttl: Duration,
    /// Most events folded into one batch before it is flushed.
    pub batch_max_events: usize,
    /// `logical` delivery under load: a batch starts at least this long after the previous
    /// one, gathering the changes that arrive meanwhile. Fewer Redis calls and wake-ups per
    /// commit (the writers' CPU on a shared host), at most this much more latency.
    pub batch_linger: Duration,
    /// Members removed per Redis command when draining a large tag set; bounds how long any one
    /// command of ours can block Redis.
    pub drain_chunk: usize,
    /// Statements touching more rows than this become one table-wide event (outbox mode; notify
    /// mode is also bound by the 8000-byte payload limit).
    pub wide_row_threshold: u64,
    /// Events held in memory while Redis is unreachable (notify mode); past it the daemon
    /// forgets them and invalidates every table table-wide once Redis is back.
    pub notify_buffer: usize,
    /// Optional Redis channel on which every invalidated tag is published as JSON.
    pub publish_channel: Option<String>,
    /// Optional hash in which every invalidated tag is also recorded with the time (ms), the
    /// layout of `@fortedigital/nextjs-cache-handler`'s Redis handler, so that an application
    /// using it sees database edits.
    pub revalidated_tags_key: Option<String>,
    /// How often both servers are pinged; a ping slower than this fails, so a frozen
    /// (half-open) PostgreSQL connection is noticed within two intervals.
    pub health_interval: Duration,
    /// How long the daemon's loops may go without progress (a batch confirmed, a health tick, a
    /// retry) before `/healthz` fails and systemd's watchdog is no longer fed. Above the longest
    /// wait of a server call (Redis' 10 s response timeout).
    pub liveness_timeout: Duration,
    /// A fault for the liveness tests, from `EVICTD_FAULT_STALL_ON_TAG` (not an option users
    /// set): an invalidation carrying this tag never finishes, as a deadlocked one would not.
    pub stall_on_tag: Option<String>,
    /// When set, every batch's tags are invalidated a second time after this delay, removing
    /// entries an application wrote back from a read that raced the first invalidation.
    pub second_pass: Option<Duration>,
    /// Pause between two hygiene sweeps of the tag sets; `None` switches the sweep off.
    pub sweep_interval: Option<Duration>,
    /// Tag-set members the sweep examines per second at most.
    pub sweep_rate: u64,
    /// Extra CA certificates (PEM) trusted for PostgreSQL and Redis TLS, besides the system's.
    pub tls_ca_file: Option<PathBuf>,
    pub rules: Rules,
    /// Where the rules came from, and the line of each template, for error messages.
    pub origin: RulesOrigin,
}

/// Where each table rule was written, so a later check (a column the database lacks) can point
/// at the file and line.
#[derive(Debug, Clone, Default)]
pub struct RulesOrigin {
    pub file: Option<PathBuf>,
    /// (table, template, line)
    pub templates: Vec<(TableName, String, usize)>,
}

impl RulesOrigin {
    /// `FILE: line N` of the template `template` of `table`, or "built-in rules".
    pub fn locate(&self, table: &TableName, template: &str) -> String {
        match &self.file {
            None => "built-in rules".to_string(),
            Some(file) => {
                let line = self
                    .templates
                    .iter()
                    .find(|(t, s, _)| t == table && s == template)
                    .map(|(_, _, line)| *line);
                match line {
                    Some(line) => format!("{}: line {line}", file.display()),
                    None => file.display().to_string(),
                }
            }
        }
    }
}

#[derive(Debug, Error)]
pub enum ConfigError {
    #[error("{path}: cannot read the configuration file: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("{path}: line {line}: {message}")]
    Invalid {
        path: String,
        line: usize,
        message: String,
    },
    #[error("invalid {what}: {message}")]
    Value { what: &'static str, message: String },
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    database_url: Option<String>,
    redis_url: Option<String>,
    channel: Option<Spanned<String>>,
    key_prefix: Option<Spanned<String>>,
    delivery: Option<Delivery>,
    outbox_wakeup: Option<Wakeup>,
    trigger_firing: Option<TriggerFiring>,
    logical_streaming: Option<LogicalStreaming>,
    outbox_poll_max_ms: Option<Spanned<u64>>,
    http_addr: Option<Spanned<String>>,
    log_format: Option<LogFormat>,
    tagts_ttl_secs: Option<Spanned<u64>>,
    batch_max_events: Option<Spanned<u64>>,
    batch_linger_ms: Option<Spanned<u64>>,
    drain_chunk: Option<Spanned<u64>>,
    wide_row_threshold: Option<Spanned<u64>>,
    notify_buffer: Option<Spanned<u64>>,
    publish_channel: Option<String>,
    revalidated_tags_key: Option<String>,
    health_interval_ms: Option<Spanned<u64>>,
    liveness_timeout_secs: Option<Spanned<u64>>,
    second_pass_ms: Option<Spanned<u64>>,
    sweep_interval_secs: Option<Spanned<u64>>,
    sweep_rate: Option<Spanned<u64>>,
    tls_ca_file: Option<PathBuf>,
    tables: Option<Vec<FileTable>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FileTable {
    table: Spanned<String>,
    tags: Vec<Spanned<String>>,
    #[serde(default)]
    keys: Vec<Spanned<String>>,
}

impl Settings {
    /// Built-in defaults, no file, no overrides.
    pub fn defaults() -> Self {
        // Constants: cannot fail.
        Self::load(&Overrides::default()).expect("built-in defaults are valid")
    }

    /// Reads the file named by `overrides.config` (if any) and applies the overrides.
    pub fn load(overrides: &Overrides) -> Result<Self, ConfigError> {
        let (file, text) = match &overrides.config {
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
                    path: path.display().to_string(),
                    source,
                })?;
                (Some(path.clone()), text)
            }
            None => (None, String::new()),
        };
        Self::from_toml(file.as_deref(), &text, overrides)
    }

    /// Validates `text` as the file at `file` (used for messages) with `overrides` on top.
    pub fn from_toml(
        file: Option<&Path>,
        text: &str,
        overrides: &Overrides,
    ) -> Result<Self, ConfigError> {
        let path = file.map_or_else(|| "<built-in>".to_string(), |p| p.display().to_string());
        let invalid =
            |span: Option<std::ops::Range<usize>>, message: String| ConfigError::Invalid {
                path: path.clone(),
                line: span.map_or(1, |s| line_of(text, s.start)),
                message,
            };
        let raw: FileConfig =
            toml::from_str(text).map_err(|e| invalid(e.span(), e.message().trim().to_string()))?;

        // A number from the file (with its span, for messages) within its option's bounds, or
        // the option's default.
        let number = |option: &Number, value: Option<Spanned<u64>>| match value {
            None => Ok(option.default),
            Some(s) => match option.bounds_problem(*s.get_ref()) {
                None => Ok(*s.get_ref()),
                Some(problem) => Err(invalid(Some(s.span()), problem)),
            },
        };
        let text_default = |option: options::Text| option.default.unwrap_or_default();

        let channel_given = overrides.channel.is_some() || raw.channel.is_some();
        let delivery_given = overrides.delivery.is_some() || raw.delivery.is_some();
        let channel = pick_spanned(
            overrides.channel.clone(),
            raw.channel,
            text_default(options::CHANNEL),
        );
        if !crate::core::rules::is_identifier(&channel.0) {
            return Err(value_error(
                "channel",
                format!(
                    "`{}` must be a lowercase identifier of at most 63 characters",
                    channel.0
                ),
                channel.1.clone(),
                &invalid,
            ));
        }
        let key_prefix = pick_spanned(
            overrides.key_prefix.clone(),
            raw.key_prefix,
            text_default(options::KEY_PREFIX),
        );
        if key_prefix.0.contains(['*', '?', '[', ']', '\\']) {
            return Err(value_error(
                "key_prefix",
                format!("`{}` must not contain glob characters", key_prefix.0),
                key_prefix.1.clone(),
                &invalid,
            ));
        }
        let http_addr_text = pick_spanned(
            overrides.http_addr.clone(),
            raw.http_addr,
            text_default(options::HTTP_ADDR),
        );
        let http_addr = http_addr_text.0.parse::<SocketAddr>().map_err(|_| {
            value_error(
                "http_addr",
                format!(
                    "`{}` is not an address like 127.0.0.1:9750",
                    http_addr_text.0
                ),
                http_addr_text.1.clone(),
                &invalid,
            )
        })?;

        let batch_max_events = number(&options::BATCH_MAX_EVENTS, raw.batch_max_events)?;
        let drain_chunk = number(&options::DRAIN_CHUNK, raw.drain_chunk)?;
        let batch_linger_ms = number(&options::BATCH_LINGER_MS, raw.batch_linger_ms)?;
        let notify_buffer = number(&options::NOTIFY_BUFFER, raw.notify_buffer)?;
        let tagts_ttl_secs = number(&options::TAGTS_TTL_SECS, raw.tagts_ttl_secs)?;
        let wide_row_threshold = number(&options::WIDE_ROW_THRESHOLD, raw.wide_row_threshold)?;
        let health_interval_ms = number(&options::HEALTH_INTERVAL_MS, raw.health_interval_ms)?;
        let liveness_timeout_secs =
            number(&options::LIVENESS_TIMEOUT_SECS, raw.liveness_timeout_secs)?;
        let sweep_rate = number(&options::SWEEP_RATE, raw.sweep_rate)?;
        let outbox_poll_max_ms = number(&options::OUTBOX_POLL_MAX_MS, raw.outbox_poll_max_ms)?;
        let second_pass_ms = number(&options::SECOND_PASS_MS, raw.second_pass_ms)?;
        let sweep_interval_secs = number(&options::SWEEP_INTERVAL_SECS, raw.sweep_interval_secs)?;
        let size = |n: u64| usize::try_from(n).unwrap_or(usize::MAX);

        let mut origin = RulesOrigin {
            file: file.map(Path::to_path_buf),
            templates: Vec::new(),
        };
        let rules = match raw.tables {
            None => Rules::defaults(),
            Some(tables) if tables.is_empty() => {
                return Err(invalid(None, "`tables` lists no table".to_string()));
            }
            Some(tables) => {
                let mut compiled: Vec<TableRule> = Vec::with_capacity(tables.len());
                for t in tables {
                    let name = TableName::parse(t.table.get_ref())
                        .map_err(|e| invalid(Some(t.table.span()), e.to_string()))?;
                    if compiled.iter().any(|r| r.table == name) {
                        return Err(invalid(
                            Some(t.table.span()),
                            format!("table `{name}` is listed twice"),
                        ));
                    }
                    if t.tags.is_empty() && t.keys.is_empty() {
                        return Err(invalid(
                            Some(t.table.span()),
                            format!("table `{name}` has neither tags nor keys"),
                        ));
                    }
                    for template in t.tags.iter().chain(&t.keys) {
                        crate::core::rules::Template::placeholders(template.get_ref())
                            .map_err(|e| invalid(Some(template.span()), e.to_string()))?;
                        origin.templates.push((
                            name.clone(),
                            template.get_ref().clone(),
                            line_of(text, template.span().start),
                        ));
                    }
                    let tags: Vec<String> = t.tags.into_iter().map(Spanned::into_inner).collect();
                    let keys: Vec<String> = t.keys.into_iter().map(Spanned::into_inner).collect();
                    let rule = TableRule::new(name, &tags, &keys)
                        .map_err(|e| invalid(Some(t.table.span()), e.to_string()))?;
                    compiled.push(rule);
                }
                Rules::new(compiled)
            }
        };

        let redis_url = overrides
            .redis_url
            .clone()
            .or(raw.redis_url.clone())
            .unwrap_or_else(|| text_default(options::REDIS_URL).to_string());
        // Checked here so that a malformed URL is a configuration error (exit 2), named.
        crate::sink::RedisTarget::parse(&redis_url).map_err(|e| ConfigError::Value {
            what: "redis_url",
            message: e.to_string(),
        })?;
        Ok(Self {
            database_url_given: overrides.database_url.is_some() || raw.database_url.is_some(),
            redis_url_given: overrides.redis_url.is_some() || raw.redis_url.is_some(),
            database_url: overrides
                .database_url
                .clone()
                .or(raw.database_url)
                .unwrap_or_else(|| text_default(options::DATABASE_URL).to_string()),
            redis_url,
            channel: channel.0,
            key_prefix: key_prefix.0,
            delivery: overrides
                .delivery
                .or(raw.delivery)
                .unwrap_or(Delivery::Outbox),
            delivery_given,
            channel_given,
            outbox_wakeup: raw.outbox_wakeup.unwrap_or(Wakeup::Doorbell),
            trigger_firing: raw.trigger_firing.unwrap_or(TriggerFiring::Origin),
            logical_streaming: raw.logical_streaming.unwrap_or(LogicalStreaming::Off),
            outbox_poll_max: Duration::from_millis(outbox_poll_max_ms),
            http_addr,
            log_format: overrides
                .log_format
                .or(raw.log_format)
                .unwrap_or(LogFormat::Text),
            tagts_ttl: Duration::from_secs(tagts_ttl_secs),
            batch_max_events: size(batch_max_events),
            batch_linger: Duration::from_millis(batch_linger_ms),
            drain_chunk: size(drain_chunk),
            wide_row_threshold,
            notify_buffer: size(notify_buffer),
            publish_channel: raw.publish_channel.filter(|c| !c.is_empty()),
            revalidated_tags_key: raw.revalidated_tags_key.filter(|k| !k.is_empty()),
            health_interval: Duration::from_millis(health_interval_ms),
            liveness_timeout: Duration::from_secs(liveness_timeout_secs),
            stall_on_tag: std::env::var(STALL_ON_TAG_ENV)
                .ok()
                .filter(|t| !t.is_empty()),
            second_pass: (second_pass_ms > 0).then(|| Duration::from_millis(second_pass_ms)),
            sweep_interval: (sweep_interval_secs > 0)
                .then(|| Duration::from_secs(sweep_interval_secs)),
            sweep_rate,
            tls_ca_file: overrides.tls_ca_file.clone().or(raw.tls_ca_file),
            rules,
            origin,
        })
    }
}

/// An override, else the file's value (with its span), else the default.
fn pick_spanned(
    flag: Option<String>,
    file: Option<Spanned<String>>,
    default: &str,
) -> (String, Option<std::ops::Range<usize>>) {
    match (flag, file) {
        (Some(v), _) => (v, None),
        (None, Some(s)) => (s.get_ref().clone(), Some(s.span())),
        (None, None) => (default.to_string(), None),
    }
}

/// A bad value reported against the file line it came from, or as a flag/env problem.
fn value_error(
    what: &'static str,
    message: String,
    span: Option<std::ops::Range<usize>>,
    invalid: &dyn Fn(Option<std::ops::Range<usize>>, String) -> ConfigError,
) -> ConfigError {
    match span {
        Some(span) => invalid(Some(span), format!("{what}: {message}")),
        None => ConfigError::Value { what, message },
    }
}

/// 1-based line number of byte offset `at` in `text`.
fn line_of(text: &str, at: usize) -> usize {
    text.as_bytes()[..at.min(text.len())]
        .iter()
        .filter(|&&b| b == b'\n')
        .count()
        + 1
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(text: &str) -> Result<Settings, ConfigError> {
        Settings::from_toml(Some(Path::new("evictd.toml")), text, &Overrides::default())
    }

    fn error(text: &str) -> String {
        load(text).unwrap_err().to_string()
    }

    #[test]
    fn defaults_match_the_spec() {
        let s = Settings::defaults();
        assert_eq!(s.channel, "cache_invalidation");
        assert_eq!(s.batch_linger, Duration::from_millis(20));
        assert_eq!(s.key_prefix, "cache:");
        assert_eq!(s.delivery, Delivery::Outbox);
        assert_eq!(s.http_addr.to_string(), "127.0.0.1:9750");
        assert_eq!(s.redis_url, "redis://127.0.0.1:6379");
        assert_eq!(s.database_url, "postgres://localhost/postgres");
        assert_eq!(s.rules.tables().len(), 4);
    }

    /// The defaults a program without a file runs with are the declared ones.
    #[test]
    fn defaults_are_the_declared_ones() {
        let s = Settings::defaults();
        assert_eq!(Some(s.delivery.as_str()), options::DELIVERY.default);
        assert_eq!(
            Some(s.outbox_wakeup.as_str()),
            options::OUTBOX_WAKEUP.default
        );
        assert_eq!(
            Some(s.trigger_firing.as_str()),
            options::TRIGGER_FIRING.default
        );
        assert_eq!(
            Some(s.logical_streaming.as_str()),
            options::LOGICAL_STREAMING.default
        );
        assert_eq!(s.log_format, LogFormat::Text);
        assert_eq!(options::LOG_FORMAT.default, Some("text"));
        assert_eq!(s.tagts_ttl.as_secs(), options::TAGTS_TTL_SECS.default);
        assert_eq!(s.batch_max_events as u64, options::BATCH_MAX_EVENTS.default);
        assert_eq!(s.drain_chunk as u64, options::DRAIN_CHUNK.default);
        assert_eq!(s.wide_row_threshold, options::WIDE_ROW_THRESHOLD.default);
        assert_eq!(s.notify_buffer as u64, options::NOTIFY_BUFFER.default);
        assert_eq!(
            s.health_interval.as_millis() as u64,
            options::HEALTH_INTERVAL_MS.default
        );
        assert_eq!(s.sweep_rate, options::SWEEP_RATE.default);
        assert_eq!(
            s.outbox_poll_max.as_millis() as u64,
            options::OUTBOX_POLL_MAX_MS.default
        );
        assert_eq!(s.second_pass, None);
        assert_eq!(
            s.sweep_interval.map(|d| d.as_secs()),
            Some(options::SWEEP_INTERVAL_SECS.default)
        );
    }

    /// README's example lists every option at its default, and the file reads it as such:
    /// every declared name is one the file accepts.
    #[test]
    fn readme_shows_every_declared_option() {
        let reference = options::reference();
        let readme = include_str!("../../README.md");
        assert!(
            readme.contains(&reference),
            "README's configuration example should read:\n{reference}"
        );
        let uncommented = reference.replace("# tls_ca_file", "tls_ca_file");
        let uncommented = uncommented.replace("# publish_channel", "publish_channel");
        let uncommented = uncommented.replace("# revalidated_tags_key", "revalidated_tags_key");
        let s = load(&uncommented).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(s.publish_channel.as_deref(), Some("cache_invalidated"));
        assert_eq!(
            s.revalidated_tags_key.as_deref(),
            Some("__revalidated_tags__")
        );
        assert_eq!(
            s.batch_linger.as_millis() as u64,
            options::BATCH_LINGER_MS.default
        );
    }

    #[test]
    fn file_tables_replace_defaults() {
        let s = load("key_prefix = \"app:\"\n[[tables]]\ntable = \"shop.orders\"\ntags = [\"orders:{id}\"]\nkeys = [\"app:v1:order:{id}:*\"]\n").unwrap();
        assert_eq!(s.key_prefix, "app:");
        assert_eq!(s.rules.tables().len(), 1);
        assert_eq!(s.rules.tables()[0].table.to_string(), "shop.orders");
        assert_eq!(
            s.origin
                .locate(&TableName::parse("shop.orders").unwrap(), "orders:{id}"),
            "evictd.toml: line 4"
        );
    }

    #[test]
    fn flags_override_file() {
        let overrides = Overrides {
            key_prefix: Some("flag:".into()),
            delivery: Some(Delivery::Notify),
            ..Overrides::default()
        };
        let s = Settings::from_toml(
            None,
            "key_prefix = \"file:\"\ndelivery = \"outbox\"\n",
            &overrides,
        )
        .unwrap();
        assert_eq!(s.key_prefix, "flag:");
        assert_eq!(s.delivery, Delivery::Notify);
    }

    #[test]
    fn errors_name_file_line_and_problem() {
        let cases = [
            (
                "channel = \"x\"\nbogus = 1\n",
                "evictd.toml: line 2:",
                "unknown field",
            ),
            ("channel = \n", "evictd.toml: line 1:", ""),
            (
                "[[tables]]\ntable = \"t\"\ntags = [\"a:{}\"]\n",
                "evictd.toml: line 3:",
                "names no column",
            ),
            (
                "[[tables]]\ntable = \"t\"\ntags = [\n  \"ok:{id}\",\n  \"a:{id\",\n]\n",
                "evictd.toml: line 5:",
                "unclosed placeholder",
            ),
            (
                "[[tables]]\ntable = \"a.b.c\"\ntags = [\"x\"]\n",
                "line 2:",
                "not a table name",
            ),
            (
                "channel = \"Bad-Name\"\n",
                "line 1:",
                "lowercase identifier",
            ),
            ("http_addr = \"nowhere\"\n", "line 1:", "not an address"),
            ("drain_chunk = 0\n", "line 1:", "at least 1"),
            (
                "channel = \"x\"\nbatch_linger_ms = 60000\n",
                "line 2:",
                "at most 1000",
            ),
            (
                "delivery = \"carrier-pigeon\"\n",
                "line 1:",
                "unknown variant",
            ),
            (
                "[[tables]]\ntable = \"t\"\ntags = [\"x\"]\n[[tables]]\ntable = \"t\"\ntags = [\"y\"]\n",
                "line 5:",
                "listed twice",
            ),
        ];
        for (text, location, problem) in cases {
            let message = error(text);
            assert!(message.contains(location), "{text:?} gave {message}");
            assert!(message.contains(problem), "{text:?} gave {message}");
        }
    }
}
