//! The Redis sink: the only code that talks to Redis. Every deletion evictd makes goes through
//! here — tag sets (detach, then drain in bounded chunks), key patterns (SCAN + UNLINK), the
//! `tagts` markers and the optional publish.
//!
//! Key names come from [`Keys`] (the cache contract). A detached, half-drained tag set waits at
//! its drain key until emptied, also across a crash; `tagts` markers written without their TTL
//! yet ([`MarkerTtl::Deferred`]) wait on a list ([`Keys::ttl_pending`]).

mod cluster;
mod conn;
mod inspect;
mod revalidated;
mod scan;
pub mod scripts;
mod sweep;
mod target;

pub use conn::{Node, RedisConn};
pub use inspect::{CacheStats, MIN_REDIS_VERSION, ServerInfo};
pub use scan::KeyScan;

use std::collections::{BTreeSet, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::StreamExt as _;
use futures_util::stream::FuturesUnordered;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::cluster::ClusterClientBuilder;
use redis::{AsyncCommands, Script};
use thiserror::Error;

use crate::core::glob::PatternSet;
use crate::core::keys::Keys;
use crate::core::rules::Targets;
use crate::redact::redact_url;
pub use target::{RedisTarget, TargetError};

/// Tags handed to one DETACH call at most (it may stop earlier, on its member budget).
const TAGS_PER_CALL: usize = 200;
/// DETACH calls awaiting their answers at any moment.
const CALLS_IN_FLIGHT: usize = 4;
/// `tagts` markers given their TTL per EXPIRE_PENDING call.
const EXPIRE_PER_CALL: usize = 500;

/// When the `tagts` markers of an invalidation get their TTL.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MarkerTtl {
    /// With the marker, in the same atomic step (`SET … PX`).
    Now,
    /// Later, by [`RedisSink::expire_pending_markers`]: the markers are written without a TTL
    /// and queued in Redis (`{prefix}evictd:ttl-pending`), so the entries go sooner. The
    /// caller owes that call before it acknowledges the work (a crash before it leaves the
    /// queue to the next start).
    Deferred,
}

#[derive(Debug, Error)]
pub enum SinkError {
    #[error("cannot open redis at {url}: {source}")]
    Open {
        url: String,
        source: redis::RedisError,
    },
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
    #[error(transparent)]
    Target(#[from] TargetError),
    #[error(
        "key_prefix `{prefix}`: its braces would place a drain key outside its tag set's cluster slot; use a prefix without `{{`, or with a complete hash tag such as `{{cache}}:`"
    )]
    Layout { prefix: String },
    /// The cluster's seed nodes were all unreachable, or one answered that it is no cluster
    /// node: what the URL names is wrong (or down), node by node.
    #[error("redis_url {url}: no seed node leads to a Redis Cluster: {detail}")]
    Seeds {
        url: String,
        detail: String,
        /// A seed answered but is not a cluster node: no retry will help.
        not_a_cluster: bool,
    },
    #[error("no sentinel of {url} names a master: {detail}")]
    NoMaster { url: String, detail: String },
    #[error(
        "redis {found} is too old: evictd needs {}.{} or newer",
        MIN_REDIS_VERSION.0,
        MIN_REDIS_VERSION.1
    )]
    TooOld { found: String },
}

/// What an invalidation did, for logs, metrics and the `invalidate` command.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Report {
    /// Tags invalidated (given, or found by a table-wide glob).
    pub tags: u64,
    /// Cache entries removed (member keys and pattern matches that existed).
    pub keys: u64,
    /// Tag keys that are neither a set nor a sorted set, left as they are (logged by name):
    /// not counted in `tags`, since nothing they index could be found.
    pub wrong_type: u64,
}

impl SinkError {
    /// Whether the setting is wrong, not the server down: `redis_url` names no cluster node
    /// where it says `redis+cluster://`, or a key prefix no cluster slot can hold.
    pub fn is_config_problem(&self) -> bool {
        matches!(
            self,
            SinkError::Seeds {
                not_a_cluster: true,
                ..
            } | SinkError::Layout { .. }
                | SinkError::Target(_)
        )
    }
}

impl Report {
    /// Counts `tags`, whose keys are neither a set nor a sorted set, as left alone (and says
    /// so): they were counted among the tags invalidated.
    fn left_alone(&mut self, tags: &[String]) {
        if tags.is_empty() {
            return;
        }
        self.tags -= tags.len() as u64;
        self.wrong_type += tags.len() as u64;
        tracing::warn!(
            tags = %tags.join(", "),
            "tag keys that are neither a set nor a sorted set were left alone: the entries they should index cannot be invalidated"
        );
    }

    pub fn add(&mut self, other: Report) {
        self.tags += other.tags;
        self.keys += other.keys;
        self.wrong_type += other.wrong_type;
    }
}

/// Knobs of the sink, from `Settings`.
#[derive(Debug, Clone)]
pub struct SinkOptions {
    pub key_prefix: String,
    pub drain_chunk: usize,
    pub tagts_ttl: Duration,
    pub publish_channel: Option<String>,
    /// `@fortedigital/nextjs-cache-handler`'s revalidated-tags hash, also told every tag.
    pub revalidated_tags_key: Option<String>,
    /// Extra CA certificates for `rediss://` URLs.
    pub tls_ca_file: Option<std::path::PathBuf>,
    /// Beaten at each page of a keyspace walk, so that a long one counts as progress.
    pub heartbeat: Option<crate::liveness::Liveness>,
    /// The liveness tests' fault (`Settings::stall_on_tag`): an invalidation carrying this tag
    /// never finishes, as a deadlocked one would not.
    pub stall_on_tag: Option<String>,
}

impl From<&crate::config::Settings> for SinkOptions {
    fn from(settings: &crate::config::Settings) -> Self {
        Self {
            key_prefix: settings.key_prefix.clone(),
            drain_chunk: settings.drain_chunk,
            tagts_ttl: settings.tagts_ttl,
            publish_channel: settings.publish_channel.clone(),
            revalidated_tags_key: settings.revalidated_tags_key.clone(),
            tls_ca_file: settings.tls_ca_file.clone(),
            heartbeat: None,
            stall_on_tag: settings.stall_on_tag.clone(),
        }
    }
}

/// A client for `url`, trusting `options.tls_ca_file` besides the system's roots for TLS.
fn client_for(url: &str, options: &SinkOptions) -> redis::RedisResult<redis::Client> {
    match &options.tls_ca_file {
        Some(ca_file) if url.starts_with("rediss://") => {
            let root_cert = std::fs::read(ca_file).map_err(|e| {
                redis::RedisError::from((
                    redis::ErrorKind::Client,
                    "cannot read the CA file",
                    format!("{}: {e}", ca_file.display()),
                ))
            })?;
            redis::Client::build_with_tls(
                url,
                redis::TlsCertificates {
                    client_tls: None,
                    root_cert: Some(root_cert),
                },
            )
        }
        _ => redis::Client::open(url),
    }
}

/// Detached tag sets not yet drained because an invalidation failed part-way (a Redis error,
/// a dropped connection). The next invalidation through the same sink drains them before its
/// own work, so the batch that failed, retried, counts as done only once they are empty.
#[derive(Debug, Default)]
struct OwedDrains {
    /// Drain keys a DETACH call reported.
    keys: BTreeSet<String>,
    /// A DETACH call failed without an answer: it may have detached sets whose keys are not
    /// known, so every drain key in Redis is looked for (a SCAN).
    unknown: bool,
}

/// A Redis connection plus the layout and scripts. Cheap to clone (the connection and the
/// drains owed are shared).
#[derive(Clone)]
pub struct RedisSink {
    /// Replaced when a Sentinel-managed master moves ([`RedisSink::follow_master`]).
    conn: Arc<std::sync::RwLock<RedisConn>>,
    target: Arc<RedisTarget>,
    /// The URL `conn` is connected to (the master's, for a Sentinel target).
    connected_to: Arc<Mutex<String>>,
    options: SinkOptions,
    keys: Keys,
    owed: Arc<Mutex<OwedDrains>>,
    detach: Script,
    expire_pending: Script,
    drain: Script,
    stamp: Script,
    sweep: Script,
    cluster_detach: Script,
    drain_step: Script,
    record_revalidated: Script,
}

impl RedisSink {
    /// Connects to `url`: one server, or the master its Sentinels name. The connection manager
    /// reconnects by itself; a command in flight when the connection drops fails, and callers
    /// retry (every operation here is idempotent).
    pub async fn connect(url: &str, options: SinkOptions) -> Result<Self, SinkError> {
        crate::tls::install_provider();
        let target = RedisTarget::parse(url)?;
        let (server, conn) = match &target {
            RedisTarget::Cluster(seeds) => {
                (redact_url(url), Self::cluster(url, seeds, &options).await?)
            }
            _ => {
                let server = Self::server_url(url, &target, &options).await?;
                let conn = Self::manager(&server, &options).await?;
                (server, RedisConn::Single(conn))
            }
        };
        Ok(Self {
            conn: Arc::new(std::sync::RwLock::new(conn)),
            target: Arc::new(target),
            connected_to: Arc::new(Mutex::new(server)),
            keys: Keys::new(&options.key_prefix),
            options,
            owed: Arc::default(),
            detach: Script::new(scripts::DETACH),
            expire_pending: Script::new(scripts::EXPIRE_PENDING),
            drain: Script::new(scripts::DRAIN),
            stamp: Script::new(scripts::STAMP),
            sweep: Script::new(scripts::SWEEP),
            cluster_detach: Script::new(scripts::CLUSTER_DETACH),
            drain_step: Script::new(scripts::DRAIN_STEP),
            record_revalidated: Script::new(scripts::RECORD_REVALIDATED),
        })
    }

    /// A connection to the cluster `seeds` belong to. It fails when no seed answers as a
    /// cluster node; afterwards it follows the cluster's slots by itself.
    async fn cluster(
        url: &str,
        seeds: &[String],
        options: &SinkOptions,
    ) -> Result<RedisConn, SinkError> {
        let open_error = |source| SinkError::Open {
            url: redact_url(url),
            source,
        };
        let mut builder = ClusterClientBuilder::new(seeds.to_vec())
            .connection_timeout(Duration::from_secs(3))
            .response_timeout(Duration::from_secs(10))
            .retries(4)
            .min_retry_wait(50)
            .max_retry_wait(1_000);
        if let Some(ca_file) = &options.tls_ca_file
            && url.starts_with("rediss+cluster://")
        {
            let root_cert = std::fs::read(ca_file).map_err(|e| {
                open_error(redis::RedisError::from((
                    redis::ErrorKind::Client,
                    "cannot read the CA file",
                    format!("{}: {e}", ca_file.display()),
                )))
            })?;
            builder = builder.certs(redis::TlsCertificates {
                client_tls: None,
                root_cert: Some(root_cert),
            });
        }
        let client = builder.build().map_err(open_error)?;
        match client.get_async_connection().await {
            Ok(conn) => Ok(RedisConn::Cluster(conn)),
            Err(e) => {
                let (detail, not_a_cluster) = Self::ask_seeds(seeds, options).await;
                Err(SinkError::Seeds {
                    url: redact_url(url),
                    detail: if detail.is_empty() {
                        e.to_string()
                    } else {
                        detail
                    },
                    not_a_cluster,
                })
            }
        }
    }

    /// Why no seed led to a cluster, seed by seed (its address only): unreachable, or not a
    /// cluster node. Whether one answered as no cluster node.
    async fn ask_seeds(seeds: &[String], options: &SinkOptions) -> (String, bool) {
        let mut reasons = Vec::new();
        let mut not_a_cluster = false;
        for seed in seeds {
            let address = redact_url(seed);
            let asked = async {
                let mut conn = client_for(seed, options)?
                    .get_multiplexed_async_connection()
                    .await?;
                redis::cmd("CLUSTER")
                    .arg("INFO")
                    .query_async::<String>(&mut conn)
                    .await
            };
            let reason = match tokio::time::timeout(Duration::from_secs(3), asked).await {
                Err(_) => "no answer within 3s".to_string(),
                Ok(Ok(_)) => continue,
                Ok(Err(e)) if e.to_string().contains("cluster support disabled") => {
                    not_a_cluster = true;
                    "answers, but is not a cluster node (use redis:// for one server)".to_string()
                }
                Ok(Err(e)) => format!("unreachable ({e})"),
            };
            reasons.push(format!("{address} {reason}"));
        }
        (reasons.join("; "), not_a_cluster)
    }

    /// The URL of the server `target` names now: itself, or the master of its Sentinels.
    async fn server_url(
        url: &str,
        target: &RedisTarget,
        options: &SinkOptions,
    ) -> Result<String, SinkError> {
        match target {
            RedisTarget::Single(url) => Ok(url.clone()),
            RedisTarget::Cluster(_) => Ok(redact_url(url)),
            RedisTarget::Sentinel(sentinel) => sentinel
                .resolve(|url| client_for(url, options))
                .await
                .map_err(|detail| SinkError::NoMaster {
                    url: redact_url(url),
                    detail,
                }),
        }
    }

    async fn manager(url: &str, options: &SinkOptions) -> Result<ConnectionManager, SinkError> {
        let open_error = |source| SinkError::Open {
            url: redact_url(url),
            source,
        };
        let client = client_for(url, options).map_err(open_error)?;
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(Duration::from_secs(3)))
            .set_response_timeout(Some(Duration::from_secs(10)))
            .set_number_of_retries(2)
            .set_max_delay(Duration::from_secs(2));
        ConnectionManager::new_with_config(client, config)
            .await
            .map_err(open_error)
    }

    /// For a Sentinel target: asks the sentinels which server is the master now and, when it
    /// moved (a failover), connects to the new one. Whether it moved; a new master may be an
    /// older copy of the data, which the caller's check of Redis' identity notices.
    pub async fn follow_master(&self) -> Result<bool, SinkError> {
        if !matches!(*self.target, RedisTarget::Sentinel(_)) {
            return Ok(false);
        }
        let url = self
            .connected_to
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let now = Self::server_url(&url, &self.target, &self.options).await?;
        if now == url {
            return Ok(false);
        }
        let conn = Self::manager(&now, &self.options).await?;
        *self.conn.write().unwrap_or_else(|e| e.into_inner()) = RedisConn::Single(conn);
        *self.connected_to.lock().unwrap_or_else(|e| e.into_inner()) = now.clone();
        tracing::warn!(
            master = %redact_url(&now),
            "the sentinels name another master (a failover): following it"
        );
        Ok(true)
    }

    /// The current connection (cheap: a handle to the shared one).
    fn conn(&self) -> RedisConn {
        self.conn.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Whether this sink talks to a Redis Cluster.
    pub fn is_cluster(&self) -> bool {
        matches!(*self.target, RedisTarget::Cluster(_))
    }

    pub fn options(&self) -> &SinkOptions {
        &self.options
    }

    /// A raw connection handle, for read-only commands (`stats`, `doctor`, `explain`).
    pub fn connection(&self) -> RedisConn {
        self.conn()
    }

    /// The names of the keys under this sink's prefix.
    pub fn keys(&self) -> &Keys {
        &self.keys
    }

    /// Refuses a server older than [`MIN_REDIS_VERSION`], whose missing commands would fail
    /// invalidations half-way.
    pub async fn check_version(&self) -> Result<(), SinkError> {
        let info = self.server_info().await?;
        if info.supported() {
            Ok(())
        } else {
            Err(SinkError::TooOld {
                found: info.version,
            })
        }
    }

    /// Answers when Redis does.
    pub async fn ping(&self) -> Result<(), SinkError> {
        let mut conn = self.conn();
        let _: String = redis::cmd("PING").query_async(&mut conn).await?;
        Ok(())
    }

    /// Logs a warning when Redis may evict keys that are not volatile: tag sets have no TTL, and
    /// an evicted index means entries that can no longer be invalidated.
    pub async fn warn_if_evicting(&self) {
        if let Ok(Some(policy)) = self.eviction_policy().await
            && policy.starts_with("allkeys-")
        {
            tracing::warn!(
                policy = %policy,
                "redis maxmemory-policy may evict tag sets; use a volatile-* policy or noeviction"
            );
        }
    }

    /// Redis' `maxmemory-policy`, when `CONFIG GET` is allowed.
    pub async fn eviction_policy(&self) -> Result<Option<String>, SinkError> {
        let mut conn = self.conn();
        let pair: Vec<String> = redis::cmd("CONFIG")
            .arg("GET")
            .arg("maxmemory-policy")
            .query_async(&mut conn)
            .await?;
        Ok(pair.into_iter().nth(1))
    }

    /// Invalidates everything in `targets`. Idempotent: safe to retry after an error.
    pub async fn invalidate(&self, targets: &Targets) -> Result<Report, SinkError> {
        self.invalidate_with(targets, MarkerTtl::Now).await
    }

    /// [`RedisSink::invalidate`], choosing when the `tagts` markers get their TTL. Drains an
    /// earlier failed invalidation left owed are finished first.
    pub async fn invalidate_with(
        &self,
        targets: &Targets,
        marker_ttl: MarkerTtl,
    ) -> Result<Report, SinkError> {
        if let Some(tag) = &self.options.stall_on_tag
            && targets.tags.contains(tag)
        {
            tracing::warn!(tag = %tag, "stalling this batch, as EVICTD_FAULT_STALL_ON_TAG asks");
            std::future::pending::<()>().await;
        }
        self.invalidate_reporting(targets, marker_ttl, &|_| {})
            .await
    }

    /// [`RedisSink::invalidate_with`], telling `progress` the running report after each step
    /// (a run of tags, a SCAN page). Globs — table-wide tag globs, rules' key patterns — are
    /// served by one SCAN pass per kind however many there are, each page invalidated as it
    /// comes: Redis walks its keyspace at most twice per call, and memory holds a page.
    pub async fn invalidate_reporting(
        &self,
        targets: &Targets,
        marker_ttl: MarkerTtl,
        progress: &(dyn Fn(Report) + Sync),
    ) -> Result<Report, SinkError> {
        let mut report = self.finish_owed_drains().await?;
        let tags = &targets.tags;
        // On one server DETACH and DRAIN add their own work to the running totals, in the same
        // call (no round trip of its own); the first DETACH counts this invalidation too.
        let counted_by_scripts = !self.is_cluster();
        let mut keys_uncounted = 0;
        report.add(self.invalidate_tags(tags, marker_ttl, true).await?);
        self.record_revalidated(tags).await?;
        progress(report);
        let prefix = self.keys.tag_prefix();
        let tag_globs = PatternSet::new(targets.tag_globs.iter().map(|g| self.keys.tag_glob(g)));
        if !tag_globs.is_empty() {
            let mut scan = KeyScan::new(tag_globs.scan_pattern());
            while let Some(page) = self.next_page(&mut scan).await? {
                let found: BTreeSet<String> = page
                    .into_iter()
                    .filter(|key| tag_globs.matches(key))
                    .filter_map(|key| String::from_utf8(key).ok())
                    .filter_map(|key| key.strip_prefix(&prefix).map(str::to_string))
                    .filter(|tag| !tags.contains(tag))
                    .collect();
                report.add(self.invalidate_tags(&found, marker_ttl, false).await?);
                self.record_revalidated(&found).await?;
                progress(report);
            }
            self.record_revalidated_globs(&PatternSet::new(targets.tag_globs.iter().cloned()))
                .await?;
        }
        let key_globs = PatternSet::new(targets.key_globs.iter().cloned());
        if !key_globs.is_empty() {
            let mut scan = KeyScan::new(key_globs.scan_pattern());
            let mut conn = self.conn();
            while let Some(page) = self.next_page(&mut scan).await? {
                let found: Vec<Vec<u8>> = page
                    .into_iter()
                    .filter(|key| key_globs.matches(key))
                    .collect();
                if !found.is_empty() {
                    let removed: u64 = conn.unlink(&found).await?;
                    report.keys += removed;
                    keys_uncounted += removed;
                    progress(report);
                }
            }
        }
        if !targets.wide_tables.is_empty() {
            let markers: Vec<String> = targets
                .wide_tables
                .iter()
                .map(|t| self.keys.table_marker(t))
                .collect();
            self.stamp_markers(&markers).await?;
        }
        if let Some(channel) = &self.options.publish_channel
            && !(tags.is_empty() && targets.wide_tables.is_empty())
        {
            let message = serde_json::json!({
                "tags": tags,
                "tables": targets.wide_tables,
            });
            let mut conn = self.conn();
            let _: i64 = conn.publish(channel, message.to_string()).await?;
        }
        let uncounted = if counted_by_scripts {
            [
                ("invalidations", u64::from(tags.is_empty())),
                ("tags", 0),
                ("keys", keys_uncounted),
            ]
        } else {
            [
                ("invalidations", 1),
                ("tags", report.tags),
                ("keys", report.keys),
            ]
        };
        self.count(&uncounted).await?;
        Ok(report)
    }

    /// Adds to the running totals that outlive this process (nothing to add: no call).
    async fn count(&self, fields: &[(&str, u64)]) -> Result<(), SinkError> {
        let mut pipe = redis::pipe();
        for (field, n) in fields.iter().filter(|(_, n)| *n > 0) {
            pipe.cmd("HINCRBY")
                .arg(self.keys.stats())
                .arg(*field)
                .arg(*n)
                .ignore();
        }
        if pipe.cmd_iter().next().is_none() {
            return Ok(());
        }
        let mut conn = self.conn();
        let () = pipe.query_async(&mut conn).await?;
        Ok(())
    }

    /// Names of the existing tags whose name matches `glob` (a glob over tag names).
    pub async fn existing_tags(&self, glob: &str) -> Result<Vec<String>, SinkError> {
        let prefix = self.keys.tag_prefix();
        let keys = self.scan(&self.keys.tag_glob(glob)).await?;
        Ok(keys
            .into_iter()
            .filter_map(|k| k.strip_prefix(&prefix).map(str::to_string))
            .collect())
    }

    async fn stamp_markers(&self, keys: &[String]) -> Result<(), SinkError> {
        if self.is_cluster() {
            return self.stamp_in_slots(keys).await;
        }
        let mut conn = self.conn();
        let mut call = self.stamp.prepare_invoke();
        for key in keys {
            call.key(key);
        }
        call.arg(self.options.tagts_ttl.as_millis() as u64);
        let _: String = call.invoke_async(&mut conn).await?;
        Ok(())
    }

    /// Gives every `tagts` marker queued by a [`MarkerTtl::Deferred`] invalidation its TTL.
    /// (In a cluster markers are written with their TTL: nothing is queued.)
    pub async fn expire_pending_markers(&self) -> Result<(), SinkError> {
        if self.is_cluster() {
            return Ok(());
        }
        let mut conn = self.conn();
        let queue = self.keys.ttl_pending();
        loop {
            let taken: u64 = self
                .expire_pending
                .key(&queue)
                .arg(EXPIRE_PER_CALL)
                .arg(self.options.tagts_ttl.as_millis() as u64)
                .invoke_async(&mut conn)
                .await?;
            if taken == 0 {
                return Ok(());
            }
        }
    }

    /// Detaches and drains `tags`, in calls of bounded work. On one server the scripts count
    /// what they do in the running totals, and the first call counts an invalidation too when
    /// `count_invalidation` asks (in a cluster the caller counts).
    async fn invalidate_tags(
        &self,
        tags: &BTreeSet<String>,
        marker_ttl: MarkerTtl,
        count_invalidation: bool,
    ) -> Result<Report, SinkError> {
        if self.is_cluster() {
            return self.invalidate_tags_in_cluster(tags).await;
        }
        let mut report = Report {
            tags: tags.len() as u64,
            ..Report::default()
        };
        let nonce: u64 = rand::random();
        let tags: Vec<&str> = tags.iter().map(String::as_str).collect();
        let mut pending: VecDeque<&[&str]> = tags.chunks(TAGS_PER_CALL).collect();
        // A few calls in flight at once, topped up as each answers: the multiplexed connection
        // pipelines them, so Redis always has the next one queued (no round trip between
        // calls), and still runs each script alone, each of bounded work.
        let mut in_flight = FuturesUnordered::new();
        let mut invalidations = u8::from(count_invalidation);
        loop {
            while in_flight.len() < CALLS_IN_FLIGHT
                && let Some(run) = pending.pop_front()
            {
                let counts = std::mem::take(&mut invalidations);
                in_flight.push(async move {
                    (run, self.detach_run(run, nonce, marker_ttl, counts).await)
                });
            }
            let Some((run, outcome)) = in_flight.next().await else {
                break;
            };
            let (processed, keys, drains, wrong_type) = match outcome {
                Ok(answer) => answer,
                Err(e) => {
                    // The call may have run without its answer arriving: what it detached is
                    // unknown until the drain keys are looked for.
                    self.owe(|owed| owed.unknown = true);
                    return Err(e);
                }
            };
            report.keys += keys;
            self.owe(|owed| owed.keys.extend(drains));
            report.left_alone(&wrong_type);
            // A script stops early when its member budget is spent; it always processes at
            // least one tag, so this terminates.
            if processed < run.len() {
                pending.push_front(&run[processed..]);
            }
        }
        report.keys += self.finish_owed_drains().await?.keys;
        Ok(report)
    }

    fn owe(&self, change: impl FnOnce(&mut OwedDrains)) {
        // A panic elsewhere while holding the lock leaves the set as it was: still usable.
        change(&mut self.owed.lock().unwrap_or_else(|e| e.into_inner()));
    }

    /// Drains every detached set owed: the known keys, and after a call that failed without
    /// an answer, every drain key there is. A key leaves the set once empty, so an error
    /// part-way leaves the rest owed for the next call.
    async fn finish_owed_drains(&self) -> Result<Report, SinkError> {
        let mut report = Report::default();
        let unknown =
            std::mem::take(&mut self.owed.lock().unwrap_or_else(|e| e.into_inner()).unknown);
        if unknown {
            match self.scan(&self.keys.drains_glob()).await {
                Ok(keys) => self.owe(|owed| owed.keys.extend(keys)),
                Err(e) => {
                    self.owe(|owed| owed.unknown = true);
                    return Err(e);
                }
            }
        }
        loop {
            let next = self
                .owed
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .keys
                .first()
                .cloned();
            let Some(key) = next else {
                return Ok(report);
            };
            report.keys += self.drain_detached(&key).await?;
            self.owe(|owed| {
                owed.keys.remove(&key);
            });
        }
    }

    /// One DETACH call over `run`, adding `invalidations` to that running total: (tags
    /// processed, keys removed, drain keys left to empty, tags whose key has the wrong type).
    async fn detach_run(
        &self,
        run: &[&str],
        nonce: u64,
        marker_ttl: MarkerTtl,
        invalidations: u8,
    ) -> Result<(usize, u64, Vec<String>, Vec<String>), SinkError> {
        let drain_key = |tag: &str| self.keys.drain(nonce, tag);
        let mut call = self.detach.prepare_invoke();
        call.arg(self.options.drain_chunk)
            .arg(self.options.tagts_ttl.as_millis() as u64)
            .arg(self.keys.prefix())
            .arg(format!("{nonce:016x}"))
            .arg(u8::from(marker_ttl == MarkerTtl::Deferred))
            .arg(invalidations);
        for tag in run {
            call.arg(*tag);
        }
        let mut conn = self.conn();
        let out: Vec<i64> = call.invoke_async(&mut conn).await?;
        let count = |i: usize| u64::try_from(out.get(i).copied().unwrap_or(0)).unwrap_or(0);
        let processed = usize::try_from(count(0)).unwrap_or(0).min(run.len());
        let keys = count(1);
        let tag_at = |position: i64| {
            let index = usize::try_from(position.unsigned_abs())
                .ok()?
                .checked_sub(1)?;
            run.get(index).copied()
        };
        let drains = out
            .iter()
            .skip(2)
            .filter(|&&p| p > 0)
            .filter_map(|&p| tag_at(p))
            .map(drain_key)
            .collect();
        let wrong_type = out
            .iter()
            .skip(2)
            .filter(|&&p| p < 0)
            .filter_map(|&p| tag_at(p))
            .map(str::to_string)
            .collect();
        Ok((processed, keys, drains, wrong_type))
    }

    /// Empties one detached tag set, `drain_chunk` members per call.
    async fn drain_detached(&self, key: &str) -> Result<u64, SinkError> {
        if self.is_cluster() {
            return self.drain_in_cluster(key, Vec::new()).await;
        }
        let mut conn = self.conn();
        let mut removed = 0;
        loop {
            let (n, left): (u64, u64) = self
                .drain
                .key(key)
                .key(self.keys.stats())
                .arg(self.options.drain_chunk)
                .invoke_async(&mut conn)
                .await?;
            removed += n;
            if left == 0 {
                return Ok(removed);
            }
        }
    }

    /// Finishes drains a previous run left behind (it crashed or was stopped mid-drain), and
    /// the TTLs of the markers it had queued.
    pub async fn resume_drains(&self) -> Result<Report, SinkError> {
        self.expire_pending_markers().await?;
        let mut report = Report::default();
        for key in self.scan(&self.keys.drains_glob()).await? {
            report.keys += self.drain_detached(&key).await?;
            report.tags += 1;
        }
        Ok(report)
    }
}
