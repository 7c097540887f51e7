//! `evictd run`: the HTTP endpoints plus the daemon, until a signal.

use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::cli::RunArgs;
use crate::config::Settings;
use crate::daemon::{self, Observed};
use crate::liveness::Liveness;
use crate::metrics::Metrics;
use crate::redact::redact_url;
use crate::{http, shutdown};

pub async fn run(settings: Settings, args: &RunArgs) -> anyhow::Result<()> {
    let token = shutdown::on_signals()?;
    serve_and_run(settings, args, token).await
}

/// Serves the endpoints and runs the daemon until `token` is cancelled, then waits for the
/// daemon at most `--shutdown-timeout`.
pub async fn serve_and_run(
    settings: Settings,
    args: &RunArgs,
    token: CancellationToken,
) -> anyhow::Result<()> {
    let (metrics, registry) = Metrics::new();
    let ready = Arc::new(AtomicBool::new(false));
    let liveness = Liveness::new(settings.liveness_timeout);
    let addr = http::serve(
        settings.http_addr,
        ready.clone(),
        liveness.clone(),
        Arc::new(registry),
        token.clone(),
    )
    .await?;
    info!(
        version = env!("CARGO_PKG_VERSION"),
        database = %redact_url(&settings.database_url),
        redis = %redact_url(&settings.redis_url),
        http = %addr,
        "evictd starting"
    );
    let mut daemon = tokio::spawn(daemon::run(
        settings,
        Observed {
            ready,
            liveness,
            metrics,
        },
        token.clone(),
    ));
    let grace = Duration::from_secs(args.shutdown_timeout);
    let finished = tokio::select! {
        biased;
        _ = token.cancelled() => tokio::time::timeout(grace, &mut daemon).await,
        finished = &mut daemon => Ok(finished),
    };
    match finished {
        Ok(joined) => {
            match joined? {
                Ok(()) => {}
                Err(daemon::FatalError::Schema(e)) => return Err(e.into()),
                Err(daemon::FatalError::Redis(e)) => return Err(e.into()),
            }
            info!("stopped");
        }
        Err(_) => warn!(
            timeout_s = args.shutdown_timeout,
            "the batch in hand did not finish in time; exiting anyway"
        ),
    }
    Ok(())
}
