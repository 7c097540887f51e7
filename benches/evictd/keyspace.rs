//! `--keyspace`: what walking a big keyspace costs evictd — a Redis of 5,000,000 keys
//! (4,000,000 cache entries, 1,000,000 one-member tag sets; a tenth of each with `--quick`),
//! then the time and peak memory of `evictd stats`, of one pass of the daemon's tag-set sweep,
//! and of `evictd invalidate --all`. Memory must not grow with the keyspace.
//! `EVICTD_BENCH_BIN` runs another evictd binary (an older build, for a before/after).

use std::time::{Duration, Instant};

use evictd::throwaway::{Postgres, Redis};
use serde_json::{Value, json};

use crate::support::{self, Daemon};

/// Fills Redis with `entries` cache entries (with a TTL) and `tags` one-member tag sets, in
/// server-side loops of 20,000 writes.
async fn populate(conn: &mut redis::aio::MultiplexedConnection, entries: usize, tags: usize) {
    const FILL: &str = r#"
local from, to, kind = tonumber(ARGV[1]), tonumber(ARGV[2]), ARGV[3]
for i = from, to do
  if kind == 'entry' then
    redis.call('SET', 'cache:v1:e:' .. i, 'v', 'EX', 3600)
  else
    redis.call('SADD', 'cache:tag:products:id:' .. i, 'cache:v1:e:' .. i)
  end
end
return 0
"#;
    for (kind, count) in [("entry", entries), ("tag", tags)] {
        for from in (0..count).step_by(20_000) {
            let to = (from + 20_000).min(count) - 1;
            let _: i64 = redis::cmd("EVAL")
                .arg(FILL)
                .arg(0)
                .arg(from)
                .arg(to)
                .arg(kind)
                .query_async(conn)
                .await
                .unwrap();
        }
    }
}

/// Runs `command` to its end; (seconds, peak RSS in MB) from the kernel's accounting.
fn measured(mut command: std::process::Command) -> (f64, f64) {
    let started = Instant::now();
    // Reaped by `wait4` below: std's `wait` cannot say how much memory the child peaked at.
    #[allow(clippy::zombie_processes)]
    let child = command
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("spawn evictd");
    let mut status = 0;
    // SAFETY: an all-zero rusage is a valid value for wait4 to fill in.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: waits for our own child, filling two locals.
    let pid = unsafe { libc::wait4(child.id() as i32, &raw mut status, 0, &raw mut usage) };
    assert_eq!(pid, child.id() as i32, "wait4");
    assert_eq!(status, 0, "evictd exited with status {status}");
    (
        started.elapsed().as_secs_f64(),
        usage.ru_maxrss as f64 / 1024.0,
    )
}

pub async fn keyspace(quick: bool) -> Value {
    let (entries, tags) = if quick {
        (400_000, 100_000)
    } else {
        (4_000_000, 1_000_000)
    };
    let redis = Redis::start().unwrap_or_else(|e| panic!("{e:#}"));
    let pg = Postgres::start().unwrap_or_else(|e| panic!("{e:#}"));
    pg.psql("postgres", &["-c", support::EXAMPLE_SCHEMA])
        .unwrap();
    let mut conn = redis::Client::open(redis.url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    eprintln!("keyspace: {entries} entries, {tags} tag sets…");
    populate(&mut conn, entries, tags).await;
    // A thousand members whose entries are gone: the sweep's pass has something to say.
    for i in 0..1_000 {
        let _: i64 = redis::cmd("SADD")
            .arg(format!("cache:tag:products:id:{i}"))
            .arg(format!("cache:v1:gone:{i}"))
            .query_async(&mut conn)
            .await
            .unwrap();
    }
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("evictd.toml");
    std::fs::write(&config, "sweep_interval_secs = 1\nsweep_rate = 100000000\n").unwrap();
    let binary = std::env::var("EVICTD_BENCH_BIN")
        .unwrap_or_else(|_| env!("CARGO_BIN_EXE_evictd").to_string());
    let evictd = |args: &[&str]| {
        let mut command = std::process::Command::new(&binary);
        command
            .args(args)
            .env("DATABASE_URL", pg.url("postgres"))
            .env("REDIS_URL", redis.url())
            .env("EVICTD_CONFIG", &config)
            .env("EVICTD_LOG", "warn,evictd=info")
            .stdin(std::process::Stdio::null());
        command
    };
    let migrated = support::finish(evictd(&["migrate"]));
    assert!(migrated.status.success(), "{}", support::text(&migrated));

    let (stats_s, stats_mb) = measured(evictd(&["stats"]));
    eprintln!("keyspace: stats {stats_s:.1} s, peak RSS {stats_mb:.1} MB");

    let mut command = evictd(&["run", "--http-addr", "127.0.0.1:0"]);
    command
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped());
    let daemon = Daemon::spawn(command);
    daemon.wait_ready().await;
    let idle_mb = support::process_peak_mb(daemon.child.id());
    let started = Instant::now();
    daemon
        .wait_log_within("tag-set sweep removed", 1, Duration::from_secs(1_800))
        .await;
    let sweep_s = started.elapsed().as_secs_f64();
    let sweep_mb = support::process_peak_mb(daemon.child.id());
    drop(daemon);
    eprintln!(
        "keyspace: sweep {sweep_s:.1} s, daemon peak RSS {sweep_mb:.1} MB (idle {idle_mb:.1})"
    );

    let (all_s, all_mb) = measured(evictd(&["invalidate", "--all"]));
    eprintln!("keyspace: invalidate --all {all_s:.1} s, peak RSS {all_mb:.1} MB");
    json!({
        "keys": entries + tags,
        "stats": { "seconds": stats_s, "peak_rss_mb": stats_mb },
        "sweep": { "seconds": sweep_s, "peak_rss_mb": sweep_mb, "idle_rss_mb": idle_mb },
        "invalidate_all": { "seconds": all_s, "peak_rss_mb": all_mb },
    })
}
