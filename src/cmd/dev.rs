//! `evictd dev`: the newcomer's path. Starts throwaway PostgreSQL and Redis (for whichever URL
//! was not given); a throwaway PostgreSQL gets the example schema and a few rows, a throwaway
//! Redis a few tagged cache entries; then it installs evictd and runs it, printing what to try.
//! Servers you name are used as they are (evictd is installed in the database, nothing else).

use anyhow::Context as _;

use crate::cli::RunArgs;
use crate::cmd::run;
use crate::config::Settings;
use crate::throwaway::{Postgres, Redis};
use crate::{db, schema, shutdown};

const EXAMPLE_SCHEMA: &str = include_str!("../../sql/example-schema.sql");
const EXAMPLE_SEED: &str = include_str!("../../sql/example-seed.sql");

/// Cache entries the demo writes, each with its tags, as the application would.
const DEMO_ENTRIES: &[(&str, &[&str])] = &[
    (
        "v1:products:list:00000000-0000-0000-0000-0000000000c1",
        &[
            "products:all",
            "products:client:00000000-0000-0000-0000-0000000000c1",
        ],
    ),
    (
        "v1:products:list:00000000-0000-0000-0000-0000000000c2",
        &[
            "products:all",
            "products:client:00000000-0000-0000-0000-0000000000c2",
        ],
    ),
    (
        "v1:product:00000000-0000-0000-0000-0000000000a1",
        &["products:id:00000000-0000-0000-0000-0000000000a1"],
    ),
    ("v1:clients:all", &["client_configs:all"]),
];

pub async fn dev(mut settings: Settings, args: &RunArgs) -> anyhow::Result<()> {
    let token = shutdown::on_signals()?;
    let postgres = if settings.database_url_given {
        None
    } else {
        let pg = tokio::task::spawn_blocking(Postgres::start)
            .await?
            .context("cannot start a throwaway PostgreSQL")?;
        settings.database_url = pg.url("postgres");
        Some(pg)
    };
    let redis = if settings.redis_url_given {
        None
    } else {
        let r = tokio::task::spawn_blocking(Redis::start)
            .await?
            .context("cannot start a throwaway Redis")?;
        settings.redis_url = r.url();
        Some(r)
    };

    let mut conn = db::connect(
        &settings.database_url,
        settings.tls_ca_file.as_deref(),
        None,
    )
    .await?;
    // A database you named keeps its own tables and rows; only a throwaway one gets the example.
    if postgres.is_some() {
        conn.client
            .batch_execute(EXAMPLE_SCHEMA)
            .await
            .context("cannot load the example schema")?;
        conn.client
            .batch_execute(EXAMPLE_SEED)
            .await
            .context("cannot load the example rows")?;
    }
    schema::migrate(&mut conn.client, &settings).await?;
    drop(conn);
    if redis.is_some() {
        seed_cache(&settings).await?;
    }

    // A URL you gave may carry a password: shown masked. A throwaway server's has none.
    let db_url = &crate::redact::redact_url(&settings.database_url);
    let redis_port = settings
        .redis_url
        .rsplit(':')
        .next()
        .unwrap_or("6379")
        .trim_end_matches('/');
    let prefix = &settings.key_prefix;
    eprintln!(
        "\n  evictd dev: PostgreSQL at {db_url}\n             Redis at {}\n\n  \
         Cache entries written: redis-cli -p {redis_port} --scan --pattern '{prefix}v1:*'\n  \
         Edit a product:        psql {db_url} -c \"UPDATE products SET price_cents = price_cents + 1 WHERE client_id = '00000000-0000-0000-0000-0000000000c1'\"\n  \
         and watch {prefix}v1:products:list:…c1 disappear while …c2 stays. Ctrl-C stops everything.\n",
        crate::redact::redact_url(&settings.redis_url)
    );
    let outcome = run::serve_and_run(settings, args, token).await;
    drop(redis);
    drop(postgres);
    outcome
}

async fn seed_cache(settings: &Settings) -> anyhow::Result<()> {
    let client = redis::Client::open(settings.redis_url.as_str())?;
    let mut conn = client.get_multiplexed_async_connection().await?;
    let prefix = &settings.key_prefix;
    let keys = crate::core::keys::Keys::new(prefix);
    let mut pipe = redis::pipe();
    for (key, tags) in DEMO_ENTRIES {
        let key = format!("{prefix}{key}");
        pipe.cmd("SET")
            .arg(&key)
            .arg("{\"demo\":true}")
            .arg("EX")
            .arg(3600)
            .ignore();
        for tag in *tags {
            pipe.cmd("SADD").arg(keys.tag(tag)).arg(&key).ignore();
        }
    }
    let () = pipe.query_async(&mut conn).await?;
    Ok(())
}
