//! `evictd run`: the supervisor and the event loop.
//!
//! ```text
//! supervisor: connect Redis + PostgreSQL (backoff) -> the feed's start-up work -> ready -> loop
//!             any connection error -> not ready -> backoff -> again (never exits for it)
//! loop:       the feed's wake-up -> its batches -> Flusher (Redis, retried) -> the feed's ack
//!             beside: health ticks (both servers, the feed's own), second passes, shutdown
//! ```
//!
//! Start-up work, before readiness, so that entries written after `ready` are never swept by
//! it: finish interrupted drains; then the feed's own (`feed`): in `notify` mode invalidate
//! every table table-wide (what happened while nobody listened is unknown), in `outbox` mode
//! drain the backlog, in `logical` mode catch up with the replication slot.

mod error;
mod feed;
mod flush;
mod report;
mod sweeper;
mod watchdog;

use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::backoff::Backoff;
use crate::config::Settings;
use crate::liveness::Liveness;
use crate::metrics::Metrics;
use crate::schema::SchemaError;
use crate::sink::{RedisSink, SinkOptions};
use crate::source::{Session, SourceError};
pub use error::FatalError;
use error::SessionError;
use feed::{AnyFeed, Feed as _};
use flush::Flusher;
use sweeper::sweep_forever;

/// Shared state the HTTP endpoints and tests observe.
#[derive(Clone)]
pub struct Observed {
    pub ready: Arc<AtomicBool>,
    pub liveness: Liveness,
    pub metrics: Metrics,
}

/// Runs until `shutdown` is cancelled. Connection problems are retried forever; the only errors
/// returned are configurations no retry fixes (a missing table or column, a cluster URL whose
/// seed answers as no cluster node).
pub async fn run(
    settings: Settings,
    observed: Observed,
    shutdown: CancellationToken,
) -> Result<(), FatalError> {
    if let Some(interval) = settings.sweep_interval {
        tokio::spawn(sweep_forever(
            settings.clone(),
            interval,
            observed.metrics.clone(),
            shutdown.clone(),
        ));
    }
    tokio::spawn(watchdog::watch(
        observed.liveness.clone(),
        observed.ready.clone(),
        shutdown.clone(),
    ));
    let liveness = observed.liveness.clone();
    let mut flusher = Flusher::new(settings, observed, shutdown.clone());
    let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(10));
    loop {
        liveness.beat();
        let outcome = session(&mut flusher, &shutdown, &mut backoff).await;
        flusher.set_ready(false);
        match outcome {
            Ok(()) | Err(SessionError::Shutdown) => return Ok(()),
            Err(SessionError::Fatal(e)) => return Err(e),
            Err(e) => {
                let server = match &e {
                    SessionError::Sink(_) => "redis",
                    _ => "postgres",
                };
                flusher.observed.metrics.error(server);
                flusher.observed.metrics.reconnect(server);
                let delay = backoff.next_delay();
                warn!(error = %e, retry_in_ms = delay.as_millis() as u64, "not serving; retrying");
                tokio::select! {
                    _ = shutdown.cancelled() => return Ok(()),
                    _ = liveness.sleep(delay) => {}
                }
            }
        }
    }
}

/// One session: connected to both servers until either fails or the daemon shuts down.
async fn session(
    flusher: &mut Flusher,
    shutdown: &CancellationToken,
    backoff: &mut Backoff,
) -> Result<(), SessionError> {
    let settings = flusher.settings.clone();
    let options = SinkOptions {
        heartbeat: Some(flusher.observed.liveness.clone()),
        ..SinkOptions::from(&settings)
    };
    let sink = RedisSink::connect(&settings.redis_url, options).await?;
    sink.ping().await?;
    sink.check_version().await?;
    sink.warn_if_evicting().await;
    let mut source = match Session::open(&settings).await {
        Err(SourceError::Schema(e @ SchemaError::Config { .. })) => {
            return Err(SessionError::Fatal(e.into()));
        }
        other => other?,
    };
    let redis_restarted = flusher.check_redis_restart(&sink).await?;
    let resumed = sink.resume_drains().await?;
    if resumed.tags > 0 {
        info!(
            drains = resumed.tags,
            keys = resumed.keys,
            "finished drains a previous run left"
        );
    }
    let mut feed = AnyFeed::start(&mut source, &sink, flusher, redis_restarted).await?;
    flusher.set_ready(true);
    backoff.reset();
    info!(
        channel = %source.channel,
        delivery = source.delivery.as_str(),
        postgres_tls = source.connection.encrypted,
        "evictd is ready"
    );

    let mut health = tokio::time::interval(settings.health_interval);
    health.reset();
    loop {
        // Every turn is progress; a turn that never ends (a stuck flush) stops the beats.
        flusher.observed.liveness.beat();
        tokio::select! {
            biased;
            _ = shutdown.cancelled() => return Ok(()),
            _ = health.tick() => {
                let limit = settings.health_interval;
                match tokio::time::timeout(limit, source.connection.client.simple_query("")).await {
                    Ok(result) => {
                        result.map_err(SourceError::from)?;
                    }
                    Err(_) => return Err(SessionError::PgTimeout(limit)),
                }
                feed.health(&source, flusher).await?;
                flusher.redis_health(&sink, limit).await?;
            }
            _ = flusher.second_pass_due() => flusher.second_pass(&sink).await?,
            wake = feed.wait(&mut source) => {
                feed.handle(wake?, &mut source, &sink, flusher).await?;
            }
        }
    }
}
