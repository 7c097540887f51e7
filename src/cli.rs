//! Command-line types only (clap). Global flags work before or after the command, and each
//! falls back to its environment variable; `config::Settings` applies the file below both.

use std::path::PathBuf;

use clap::{ArgGroup, Args, Parser, Subcommand, ValueEnum};

use crate::config::{Delivery, LogFormat, Overrides};

#[derive(Debug, Parser)]
#[command(
    name = "evictd",
    version,
    about = "Keeps a Redis tag cache honest when PostgreSQL changes behind the application's back",
    propagate_version = true
)]
pub struct Cli {
    #[command(flatten)]
    pub global: GlobalArgs,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Args)]
pub struct GlobalArgs {
    /// TOML configuration file (default: the built-in rules)
    #[arg(long, env = "EVICTD_CONFIG", global = true, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// PostgreSQL URL [default: postgres://localhost/postgres]
    #[arg(
        long,
        env = "DATABASE_URL",
        global = true,
        hide_env_values = true,
        value_name = "URL"
    )]
    pub database_url: Option<String>,
    /// Redis URL [default: redis://127.0.0.1:6379]
    #[arg(
        long,
        env = "REDIS_URL",
        global = true,
        hide_env_values = true,
        value_name = "URL"
    )]
    pub redis_url: Option<String>,
    /// NOTIFY channel installed by `migrate` [default: cache_invalidation]; `run` listens on
    /// the installed one (and warns when it differs)
    #[arg(long, env = "EVICTD_CHANNEL", global = true)]
    pub channel: Option<String>,
    /// Prefix of every Redis key evictd touches [default: cache:]
    #[arg(long, env = "EVICTD_KEY_PREFIX", global = true)]
    pub key_prefix: Option<String>,
    /// Delivery mode installed by `migrate`: outbox, notify or logical [default: outbox];
    /// `run` follows what the database has installed (and warns when it differs)
    #[arg(long, env = "EVICTD_DELIVERY", global = true)]
    pub delivery: Option<Delivery>,
    /// Address for /metrics, /healthz and /readyz [default: 127.0.0.1:9750]
    #[arg(long, env = "EVICTD_HTTP_ADDR", global = true, value_name = "ADDR")]
    pub http_addr: Option<String>,
    /// Log format: text or json [default: text]
    #[arg(long, env = "EVICTD_LOG_FORMAT", global = true)]
    pub log_format: Option<LogFormat>,
    /// Extra CA certificates (PEM) for PostgreSQL and Redis TLS, besides the system's
    #[arg(long, env = "EVICTD_TLS_CA_FILE", global = true, value_name = "FILE")]
    pub tls_ca_file: Option<PathBuf>,
    /// Log filter, e.g. `info` or `evictd=debug` [default: info]
    #[arg(long, env = "EVICTD_LOG", global = true, value_name = "FILTER")]
    pub log: Option<String>,
}

impl GlobalArgs {
    pub fn overrides(&self) -> Overrides {
        Overrides {
            config: self.config.clone(),
            database_url: self.database_url.clone(),
            redis_url: self.redis_url.clone(),
            channel: self.channel.clone(),
            key_prefix: self.key_prefix.clone(),
            delivery: self.delivery,
            http_addr: self.http_addr.clone(),
            log_format: self.log_format,
            tls_ca_file: self.tls_ca_file.clone(),
        }
    }
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the daemon: LISTEN, drain the outbox, invalidate; serve /metrics, /healthz, /readyz
    Run(RunArgs),
    /// Install or upgrade schema `evictd` and the triggers (idempotent, one transaction)
    Migrate,
    /// Remove schema `evictd`, its triggers and its outbox
    Uninstall,
    /// Print the DDL `migrate` would apply, for your own migration tool
    Sql,
    /// Check the setup: servers, schema, triggers, LISTEN, Redis eviction policy, outbox
    Doctor(DoctorArgs),
    /// Dry run: the tags and keys a change would invalidate; removes nothing
    Explain(ExplainArgs),
    /// Invalidate now: tags, whole tables, everything, or one of the application's cache types
    Invalidate(InvalidateArgs),
    /// Cache and invalidation statistics as one JSON object
    Stats,
    /// Try evictd locally: throwaway PostgreSQL and Redis (unless URLs are given), the example
    /// schema, `migrate`, then `run`
    Dev(RunArgs),
}

#[derive(Debug, Args, Clone)]
pub struct RunArgs {
    /// Seconds to finish the batch in hand after SIGTERM/SIGINT before exiting anyway
    #[arg(
        long,
        env = "EVICTD_SHUTDOWN_TIMEOUT",
        default_value_t = 10,
        value_name = "SECONDS"
    )]
    pub shutdown_timeout: u64,
}

#[derive(Debug, Args, Clone)]
pub struct DoctorArgs {
    /// Print the checks as JSON
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args, Clone)]
pub struct ExplainArgs {
    /// Table (`name` or `schema.name`)
    pub table: String,
    /// insert, update, delete or truncate
    pub op: String,
    /// A value of the old row (update, delete); `\N` is NULL. Repeat for each column.
    #[arg(long = "old", value_name = "COLUMN=VALUE")]
    pub old: Vec<String>,
    /// A value of the new row (insert, update); `\N` is NULL. Repeat for each column.
    #[arg(long = "new", value_name = "COLUMN=VALUE")]
    pub new: Vec<String>,
    /// Print the result as JSON
    #[arg(long)]
    pub json: bool,
}

/// The application's manual cache types (its admin "clear cache" endpoint).
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum CacheType {
    /// Job-readiness products, of one client with --client-id
    #[value(name = "products")]
    Products,
    /// Expert sessions, of one product with --product-id
    #[value(name = "expert_sessions")]
    ExpertSessions,
    /// Module content, of one module with --module-id
    #[value(name = "module_content")]
    ModuleContent,
    /// Client configurations, of one client with --client-id
    #[value(name = "client_configs")]
    ClientConfigs,
    /// Everything evictd's rules cover
    #[value(name = "all_phase2")]
    AllPhase2,
}

#[derive(Debug, Args, Clone)]
#[command(group(ArgGroup::new("what").required(true).multiple(true).args(["tags", "table", "all", "cache_type"])))]
pub struct InvalidateArgs {
    /// Tags to invalidate
    pub tags: Vec<String>,
    /// Invalidate everything this table's rule can produce (repeatable)
    #[arg(long, value_name = "TABLE")]
    pub table: Vec<String>,
    /// Invalidate every configured table table-wide (other keys stay)
    #[arg(long)]
    pub all: bool,
    /// One of the application's cache types
    #[arg(long = "type", value_enum, value_name = "TYPE")]
    pub cache_type: Option<CacheType>,
    /// With `--type products` or `client_configs`: only this client's entries
    #[arg(long, value_name = "ID")]
    pub client_id: Option<String>,
    /// With `--type expert_sessions`: only this product's entries
    #[arg(long, value_name = "ID")]
    pub product_id: Option<String>,
    /// With `--type module_content`: only this module's entries
    #[arg(long, value_name = "ID")]
    pub module_id: Option<String>,
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    use super::*;

    /// What configures evictd can come from the environment (containers, systemd units); the
    /// one-shot commands' own arguments say what to do this time, and have none.
    #[test]
    fn every_setting_flag_has_its_environment_variable() {
        let cli = Cli::command();
        let run = cli
            .get_subcommands()
            .find(|c| c.get_name() == "run")
            .unwrap();
        let flags = cli.get_arguments().chain(run.get_arguments());
        let mut checked = 0;
        for arg in flags.filter(|a| a.get_long().is_some()) {
            let name = arg.get_long().unwrap();
            if matches!(name, "help" | "version") {
                continue;
            }
            assert!(
                arg.get_env().is_some(),
                "--{name} has no environment variable"
            );
            checked += 1;
        }
        assert!(checked >= 11, "only {checked} flags checked");
    }

    #[test]
    fn every_invalidate_flag_has_help() {
        let cli = Cli::command();
        let invalidate = cli
            .get_subcommands()
            .find(|c| c.get_name() == "invalidate")
            .unwrap();
        for arg in invalidate.get_arguments() {
            assert!(arg.get_help().is_some(), "{} has no help", arg.get_id());
        }
    }

    #[test]
    fn delivery_help_lists_every_mode() {
        let help = Cli::command().render_long_help().to_string();
        for mode in ["outbox", "notify", "logical"] {
            assert!(help.contains(mode), "--delivery help lacks {mode}");
        }
    }
}
