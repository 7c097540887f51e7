//! The evictd benchmark: throwaway PostgreSQL and Redis, evictd as a separate process, and the
//! figures issue 5 asks for, per delivery setting. Prints a table and writes
//! `target/evictd-bench.json`.
//!
//!     cargo bench --bench evictd              # full run, a few minutes on 2 cores
//!     cargo bench --bench evictd -- --quick   # shorter phases, for a smoke test
//!     cargo bench --bench evictd -- --speed   # the machine-speed gauge alone (seconds)
//!     cargo bench --bench evictd -- --keyspace   # stats, sweep, invalidate --all over 5 M keys
//!     cargo bench --bench evictd -- --cluster    # backlog and big tag: one Redis, then a cluster
//!     cargo bench --bench evictd -- --versions   # writers and latency on PostgreSQL 15, then 17
//!     cargo bench --bench evictd -- --versus-peer   # the default and the peer listener, interleaved
//!     cargo bench --bench evictd -- --floor      # a NOTIFY answered by one DEL: the latency floor
//!
//! Latency is measured end to end: the time from a writer's COMMIT returning to Redis telling
//! (keyspace notification) that the entry tagged with the changed row was deleted.

#[path = "evictd/alone.rs"]
mod alone;
#[path = "evictd/backlog.rs"]
mod backlog;
#[path = "evictd/big_tag.rs"]
mod big_tag;
#[path = "evictd/bulk.rs"]
mod bulk;
#[path = "evictd/cluster.rs"]
mod cluster;
#[path = "evictd/figures.rs"]
mod figures;
#[path = "evictd/floor.rs"]
mod floor;
#[path = "evictd/full.rs"]
mod full;
#[path = "evictd/keyspace.rs"]
mod keyspace;
#[path = "evictd/lab.rs"]
mod lab;
#[path = "evictd/latency.rs"]
mod latency;
#[path = "evictd/placement.rs"]
mod placement;
#[path = "evictd/report.rs"]
mod report;
#[path = "../tests/support/mod.rs"]
mod support;
#[path = "evictd/versions.rs"]
mod versions;
#[path = "evictd/writers.rs"]
mod writers;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use evictd::throwaway::{Postgres, Redis};
use futures_util::StreamExt as _;
use redis::AsyncCommands as _;
use serde_json::{Value, json};
use support::Daemon;
use tokio::sync::Mutex;

use alone::*;
use backlog::*;
use big_tag::*;
use bulk::*;
use cluster::*;
use figures::*;
use floor::*;
use full::*;
use lab::*;
use latency::*;
use placement::*;
use report::*;
use versions::*;
use writers::*;

const PRODUCTS: usize = 1_000_000;

const CLIENTS: usize = 1_000;

const WRITERS: usize = 4;

/// Cache entries carry a TTL, as the application's do (`SET … EX 300`): a Redis whose keys
/// expire looks every key up twice (the value and its expiry), about a fifth more Redis time
/// per invalidated tag than a Redis without any TTL.
const ENTRY_TTL_S: u64 = 3_600;

/// Runs of the 100,000-row bulk phase per setting; the median is reported.
const BULK_RUNS: usize = 3;

/// The writers' statement: a single-row UPDATE of one product.
const EDIT: &str = "UPDATE products SET price_cents = price_cents + 1 WHERE id = $1::text::uuid";

#[derive(Clone, Copy)]
struct Setting {
    name: &'static str,
    delivery: &'static str,
    wakeup: &'static str,
    what: &'static str,
}

const SETTINGS: [Setting; 6] = [
    Setting {
        name: "outbox-doorbell",
        delivery: "outbox",
        wakeup: "doorbell",
        what: "outbox, NOTIFY only while no daemon drains (default)",
    },
    Setting {
        name: "outbox-notify",
        delivery: "outbox",
        wakeup: "notify",
        what: "outbox, a NOTIFY per commit (lowest latency under load)",
    },
    Setting {
        name: "outbox-poll",
        delivery: "outbox",
        wakeup: "poll",
        what: "outbox, adaptive poll (low writer overhead)",
    },
    Setting {
        name: "notify",
        delivery: "notify",
        wakeup: "notify",
        what: "NOTIFY payloads only",
    },
    Setting {
        name: "logical",
        delivery: "logical",
        wakeup: "notify",
        what: "logical replication slot (lowest writer cost)",
    },
    Setting {
        name: "peer",
        delivery: PEER,
        wakeup: "-",
        what: "not evictd: the listener a team would write (row trigger NOTIFY, Node.js awaiting each tag)",
    },
];

/// The `delivery` of the peer: `benches/peer/`, installed and run instead of evictd.
const PEER: &str = "peer";

fn product_id(i: usize) -> String {
    format!("00000000-0000-0000-0000-{i:012}")
}

/// The benchmark's command line: `cargo bench --bench evictd -- [ARGS]`. Without a mode, the
/// full run.
#[derive(clap::Parser)]
#[command(
    about = "evictd's benchmark: throwaway servers, every delivery setting, the daemon as a child process"
)]
struct Args {
    /// Shorter phases and smaller data: a smoke run of a few minutes.
    #[arg(long)]
    quick: bool,
    /// Limit the full run, or any mode, to one setting.
    #[arg(long, value_name = "NAME", value_parser = SETTINGS.map(|s| s.name))]
    setting: Option<String>,
    #[command(flatten)]
    mode: Mode,
    /// PostgreSQL on CPUs of its own (half of them), the load, Redis and the daemon on the
    /// others: the production topology, on any machine with two CPUs or more.
    #[arg(long)]
    placement: bool,
    /// With `--lag`: an open loop at this many commits/s instead of a closed one.
    #[arg(long, value_name = "N", requires = "lag")]
    rate: Option<f64>,
    /// Passed by `cargo bench` to every bench binary.
    #[arg(long, hide = true)]
    bench: bool,
}

/// What to measure alone instead of the full run (one at a time).
#[derive(clap::Args)]
#[group(multiple = false)]
struct Mode {
    /// The machine-speed gauge alone, in a few seconds: what kind of hour this VM is having.
    #[arg(long)]
    speed: bool,
    /// `stats`, a sweep pass and `invalidate --all` over 5,000,000 keys.
    #[arg(long)]
    keyspace: bool,
    /// The writers' cost, with and without the daemon, and the CPU per commit.
    #[arg(long)]
    writers: bool,
    /// The `synchronous_commit = off` lag.
    #[arg(long)]
    lag: bool,
    /// The 100,000- (three runs, median) and 1,000,000-row UPDATEs.
    #[arg(long)]
    bulk: bool,
    /// A tag of 1,000,000 members, with Redis' SLOWLOG.
    #[arg(long)]
    big_tag: bool,
    /// The outbox's backlog drain.
    #[arg(long)]
    backlog: bool,
    /// The backlog drain and the 1,000,000-member tag on one Redis, then on a Redis Cluster of
    /// three primaries.
    #[arg(long)]
    cluster: bool,
    /// The writers' cost and the latency at 500 and 2,000 commits/s on PostgreSQL 15 and 17
    /// (fetched by `scripts/fetch-postgres`), side by side.
    #[arg(long)]
    versions: bool,
    /// The full run of the default setting and of the peer listener, interleaved (default,
    /// peer, default, peer), then each figure as evictd / peer.
    #[arg(long)]
    versus_peer: bool,
    /// The floor of any NOTIFY-based listener: a row trigger NOTIFY answered with one DEL.
    #[arg(long)]
    floor: bool,
    /// One version's part of `--versions` (on the server `EVICTD_PG_BIN` names).
    #[arg(long, hide = true)]
    versions_child: bool,
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let args = <Args as clap::Parser>::parse();
    if args.mode.speed {
        let server = Redis::start().unwrap_or_else(|e| panic!("{e:#}"));
        let us = redis_lookup_us(&server).await;
        println!("machine speed: {us:.2} µs per Redis lookup of a cold key");
        return;
    }
    if args.mode.versions {
        versions_side_by_side(args.quick, args.placement, args.setting.as_deref());
        return;
    }
    if args.mode.keyspace {
        let result = keyspace::keyspace(args.quick).await;
        println!("keyspace: {result}");
        return;
    }
    let placement = if args.placement {
        let placement = Placement::for_cpus(&allowed_cpus());
        match &placement {
            Some(p) => eprintln!("placement: {}", p.describe()),
            None => eprintln!("--placement needs two CPUs or more: everything shares this one"),
        }
        placement
    } else {
        None
    };
    let pg = Postgres::start_with(&[
        "fsync=on",
        "full_page_writes=on",
        "max_wal_size=4GB",
        "shared_buffers=256MB",
        // What `doctor` recommends for `logical` delivery with asynchronous commits: they
        // are decoded only once flushed, and the WAL writer flushes every this often.
        "wal_writer_delay=10ms",
    ])
    .unwrap_or_else(|e| panic!("{e:#}"));
    let redis = Redis::start().unwrap_or_else(|e| panic!("{e:#}"));
    if let Some(p) = &placement {
        pin_tree(pg.pid().expect("postgres runs"), &p.postgres);
        pin_tree(redis.pid().expect("redis runs"), &p.redis);
        pin_this_process(&p.load);
    }
    let mut lab = Lab {
        pg,
        redis,
        placement,
        cluster_url: None,
        quick: args.quick,
        products: if args.quick { 200_000 } else { PRODUCTS },
        dir: tempfile::tempdir().unwrap(),
    };
    let products = lab.products;
    eprintln!("seeding {products} products…");
    lab.pg
        .psql("postgres", &["-c", "CREATE DATABASE bench_template"])
        .unwrap();
    lab.pg
        .psql("bench_template", &["-c", support::EXAMPLE_SCHEMA])
        .unwrap();
    lab.pg
        .psql(
            "bench_template",
            &["-c", &format!(
                "INSERT INTO clients (id, name) SELECT ('00000000-0000-0000-0000-' || lpad(i::text, 12, '0'))::uuid, 'c' || i FROM generate_series(0, {}) i;
                 INSERT INTO products (id, client_id, name) SELECT ('00000000-0000-0000-0000-' || lpad(i::text, 12, '0'))::uuid,
                        ('00000000-0000-0000-0000-' || lpad((i % {CLIENTS})::text, 12, '0'))::uuid, 'p' || i
                 FROM generate_series(0, {}) i;",
                CLIENTS - 1,
                products - 1
            ), "-c", "VACUUM ANALYZE"],
        )
        .unwrap();
    let deletions = Deletions::subscribe(&lab).await;
    let commit = std::process::Command::new("git")
        .args(["rev-parse", "--short", "HEAD"])
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default();

    eprintln!("baseline: no triggers…");
    lab.database("bench_bare", None).await;
    let bare_sync_off = {
        let c = lab.client("postgres").await;
        c.batch_execute("ALTER DATABASE bench_bare SET synchronous_commit = off")
            .await
            .unwrap();
        let rate = writer_rate(&lab, "bench_bare").await;
        // Back to durable commits: every other no-trigger baseline is measured with them.
        c.batch_execute("ALTER DATABASE bench_bare RESET synchronous_commit")
            .await
            .unwrap();
        rate
    };

    let selected: Vec<&Setting> = SETTINGS
        .iter()
        .filter(|s| args.setting.as_deref().is_none_or(|name| s.name == name))
        .collect();
    let mode = &args.mode;
    if mode.big_tag {
        big_tag_alone(&lab, &selected).await;
    } else if mode.lag {
        lag_alone(&lab, &selected, &deletions, args.rate).await;
    } else if mode.bulk {
        bulk_alone(&lab, &selected, &deletions).await;
    } else if mode.backlog {
        backlog_alone(&lab, &selected).await;
    } else if mode.cluster {
        cluster_alone(&mut lab, &selected).await;
    } else if mode.writers {
        writers_alone(&lab, &selected).await;
    } else if mode.versions_child {
        versions_child(&lab, &selected, &deletions).await;
    } else if mode.floor {
        floor_alone(&lab, &deletions).await;
    } else if mode.versus_peer {
        let ours = args.setting.as_deref().unwrap_or(SETTINGS[0].name);
        let ours = SETTINGS.iter().find(|s| s.name == ours).unwrap();
        let peer = SETTINGS.iter().find(|s| s.delivery == PEER).unwrap();
        let before = Before {
            lab: &lab,
            deletions: &deletions,
            commit,
            bare_sync_off,
        };
        let report = full_run(before, &[ours, peer, ours, peer]).await;
        print_versus_peer(&report, ours.name);
    } else {
        let before = Before {
            lab: &lab,
            deletions: &deletions,
            commit,
            bare_sync_off,
        };
        let _ = full_run(before, &selected).await;
    }
}
