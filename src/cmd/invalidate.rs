//! `evictd invalidate`: manual invalidation now, through the same sink the daemon uses.

use std::io::IsTerminal as _;
use std::time::{Duration, Instant};

use crate::backoff::Backoff;
use crate::cli::{CacheType, InvalidateArgs};
use crate::config::{ConfigError, Settings};
use crate::core::rules::Targets;
use crate::sink::{MarkerTtl, RedisSink, Report, SinkError, SinkOptions};

/// Tags invalidated per step, so progress can be shown on a big keyspace.
const STEP: usize = 1_000;
/// How long a step keeps retrying a Redis that fails or drops the connection.
const RETRY_FOR: Duration = Duration::from_secs(30);

pub async fn invalidate(settings: &Settings, args: &InvalidateArgs) -> anyhow::Result<()> {
    let targets = targets(settings, args)?;
    let sink = RedisSink::connect(&settings.redis_url, SinkOptions::from(settings)).await?;
    let progress = Progress::new();
    let mut report = Report::default();
    // Named tags in steps, so progress shows on a long list.
    let tags: Vec<String> = targets.tags.iter().cloned().collect();
    for (i, chunk) in tags.chunks(STEP).enumerate() {
        let step = Targets {
            tags: chunk.iter().cloned().collect(),
            ..Targets::default()
        };
        report.add(invalidate_retrying(&sink, &step, &|_| {}).await?);
        progress.say(&format!(
            "{}/{} tags, {} keys",
            (i * STEP + chunk.len()).min(tags.len()),
            tags.len(),
            report.keys
        ));
    }
    // Table-wide (`--table`, `--all`): one pass over the keyspace per kind of glob, each page
    // invalidated as it comes, so memory is a page whatever the number of tags.
    let wide = Targets {
        tag_globs: targets.tag_globs.clone(),
        key_globs: targets.key_globs.clone(),
        wide_tables: targets.wide_tables.clone(),
        ..Targets::default()
    };
    if !wide.is_empty() {
        let before = report;
        let say = |so_far: Report| {
            progress.say(&format!(
                "{} tags, {} keys",
                before.tags + so_far.tags,
                before.keys + so_far.keys
            ));
        };
        report.add(invalidate_retrying(&sink, &wide, &say).await?);
    }
    progress.done();
    println!("invalidated {} tags, {} keys", report.tags, report.keys);
    Ok(())
}

/// Invalidates `targets`, retrying with backoff for up to [`RETRY_FOR`] while Redis fails: a
/// step cut off part-way has its detached sets drained by the retry before it counts as done.
async fn invalidate_retrying(
    sink: &RedisSink,
    targets: &Targets,
    progress: &(dyn Fn(Report) + Sync),
) -> Result<Report, SinkError> {
    let started = Instant::now();
    let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(2));
    loop {
        match sink
            .invalidate_reporting(targets, MarkerTtl::Now, progress)
            .await
        {
            Ok(report) => return Ok(report),
            Err(e) if started.elapsed() < RETRY_FOR => {
                let delay = backoff.next_delay();
                eprintln!("evictd: {e}; retrying in {} ms", delay.as_millis());
                tokio::time::sleep(delay).await;
            }
            Err(e) => return Err(e),
        }
    }
}

/// What the arguments ask for. Unknown tables and missing ids are usage errors (exit 2).
pub fn targets(settings: &Settings, args: &InvalidateArgs) -> Result<Targets, ConfigError> {
    let mut targets = Targets::default();
    targets
        .tags
        .extend(args.tags.iter().filter(|t| !t.is_empty()).cloned());
    let table_wide = |table: &str, targets: &mut Targets| -> Result<(), ConfigError> {
        let rule = settings
            .rules
            .rule_of(table)
            .map_err(|e| ConfigError::Value {
                what: "table",
                message: e.to_string(),
            })?;
        rule.table_wide_targets(targets);
        Ok(())
    };
    for table in &args.table {
        table_wide(table, &mut targets)?;
    }
    if args.all {
        targets.merge(settings.rules.all_table_wide());
    }
    let by = |id: &Option<String>, tags: &[&str], table: &str, targets: &mut Targets| match id {
        Some(id) => {
            for tag in tags {
                targets.tags.insert(tag.replace("{}", id));
            }
            Ok(())
        }
        None => table_wide(table, targets),
    };
    match args.cache_type {
        None => {}
        Some(CacheType::AllPhase2) => targets.merge(settings.rules.all_table_wide()),
        Some(kind) => {
            if let Some((tags, table)) = clear_type(kind) {
                let id = match kind {
                    CacheType::Products | CacheType::ClientConfigs => &args.client_id,
                    CacheType::ExpertSessions => &args.product_id,
                    CacheType::ModuleContent => &args.module_id,
                    CacheType::AllPhase2 => &None,
                };
                by(id, tags, table, &mut targets)?;
            }
        }
    }
    Ok(targets)
}

/// What a clear type of the application removes: the tags of one row (`{}` standing for its
/// id), and the table cleared whole when no id is given. `None` for `all_phase2`, which clears
/// every table. The TypeScript package's `rules.json` holds the same table (a test says so).
pub fn clear_type(kind: CacheType) -> Option<(&'static [&'static str], &'static str)> {
    match kind {
        CacheType::Products => Some((&["products:client:{}", "products:all"], "products")),
        CacheType::ExpertSessions => Some((
            &["expert_sessions:product:{}", "expert_sessions:all"],
            "job_readiness_expert_sessions",
        )),
        CacheType::ModuleContent => Some((&["module_content:id:{}"], "modules")),
        CacheType::ClientConfigs => {
            Some((&["client_configs:id:{}", "client_configs:all"], "clients"))
        }
        CacheType::AllPhase2 => None,
    }
}

/// Progress on stderr, only when it is a terminal (quiet when piped or logged).
pub struct Progress {
    enabled: bool,
}

impl Progress {
    pub fn new() -> Self {
        Self {
            enabled: std::io::stderr().is_terminal(),
        }
    }

    pub fn say(&self, text: &str) {
        if self.enabled {
            eprint!("\r\x1b[2K{text}");
        }
    }

    pub fn done(&self) {
        if self.enabled {
            eprint!("\r\x1b[2K");
        }
    }
}

impl Default for Progress {
    fn default() -> Self {
        Self::new()
    }
}
