//! The `evictd` binary: parse the command line, load the configuration, set up logging,
//! dispatch, and map the outcome to an exit code. No logic of its own.

use std::io::IsTerminal as _;
use std::process::ExitCode;

use clap::Parser;
use tracing_subscriber::EnvFilter;

use evictd::cli::{Cli, Command};
use evictd::config::{ConfigError, LogFormat, Settings};
use evictd::schema::SchemaError;
use evictd::sink::SinkError;

fn main() -> ExitCode {
    limit_malloc_arenas();
    let cli = Cli::parse();
    let settings = match Settings::load(&cli.global.overrides()) {
        Ok(settings) => settings,
        Err(e) => {
            eprintln!("evictd: {e}");
            return ExitCode::from(2);
        }
    };
    init_logging(settings.log_format, cli.global.log.as_deref());
    // The redis crate builds its TLS configuration from rustls' process-wide default provider;
    // ring is the only one compiled in. An error means one was installed already: fine.
    evictd::tls::install_provider();
    // One thread runs every task. The daemon's work per event is a few small messages between
    // its connections' tasks; across two worker threads each hand-over was a wake-up of the
    // other thread, and half the daemon's CPU went to the kernel switching between them. On
    // one thread: 1.64 instead of 2.86 CPU s per 100,000 events, lower latency, the same
    // backlog and bulk throughput (Redis and PostgreSQL do the heavy work in their own
    // processes). Nothing in the daemon blocks its thread; `spawn_blocking` has a pool of its own.
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("evictd: cannot start the async runtime: {e}");
            return ExitCode::from(1);
        }
    };
    match runtime.block_on(dispatch(cli.command, settings)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("evictd: {e:#}");
            ExitCode::from(exit_code(&e))
        }
    }
}

/// One glibc malloc arena for the whole process, unless the operator chose otherwise
/// (`MALLOC_ARENA_MAX`). glibc gives each thread that allocates an arena of its own (up to 8 per
/// core) and keeps what is freed in each: with the runtime on two threads, a 100,000-row
/// statement left the daemon at 32 MB peak RSS with the default and 25 MB with one arena
/// (`cargo bench --bench evictd -- --bulk`). The runtime has one thread now, but the blocking
/// pool and the libraries' threads allocate too; the shared arena's lock costs nothing
/// measurable.
fn limit_malloc_arenas() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    if std::env::var_os("MALLOC_ARENA_MAX").is_none() {
        // SAFETY: called first thing in `main`, before any other thread exists; mallopt only
        // sets an allocator parameter.
        unsafe {
            libc::mallopt(libc::M_ARENA_MAX, 1);
        }
    }
}

async fn dispatch(command: Command, settings: Settings) -> anyhow::Result<()> {
    use evictd::cmd;
    match command {
        Command::Run(args) => cmd::run::run(settings, &args).await,
        Command::Migrate => cmd::migrate::migrate(&settings).await,
        Command::Uninstall => cmd::migrate::uninstall(&settings).await,
        Command::Sql => {
            cmd::migrate::sql(&settings);
            Ok(())
        }
        Command::Dev(args) => cmd::dev::dev(settings, &args).await,
        Command::Doctor(args) => {
            if cmd::doctor::doctor(&settings, args.json).await? {
                Ok(())
            } else {
                Err(ProblemsFound.into())
            }
        }
        Command::Explain(args) => cmd::explain::explain(&settings, &args).await,
        Command::Invalidate(args) => cmd::invalidate::invalidate(&settings, &args).await,
        Command::Stats => cmd::stats::stats(&settings).await,
    }
}

/// `doctor` found a problem; it has already said which.
#[derive(Debug)]
struct ProblemsFound;

impl std::fmt::Display for ProblemsFound {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("doctor found problems (FAIL above)")
    }
}

impl std::error::Error for ProblemsFound {}

/// 2 for configuration problems (including a configured column the database lacks, and a
/// cluster URL none of whose seed nodes leads to a cluster), else 1.
fn exit_code(error: &anyhow::Error) -> u8 {
    let config_problem = error.chain().any(|cause| {
        cause.downcast_ref::<ConfigError>().is_some()
            || matches!(
                cause.downcast_ref::<SchemaError>(),
                Some(SchemaError::Config { .. })
            )
            || cause
                .downcast_ref::<SinkError>()
                .is_some_and(|e| e.is_config_problem() || matches!(e, SinkError::Seeds { .. }))
    });
    if config_problem { 2 } else { 1 }
}

fn init_logging(format: LogFormat, filter: Option<&str>) {
    let filter =
        EnvFilter::try_new(filter.unwrap_or("info")).unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().flatten_event(true).init(),
    }
}
