//! The evictd benchmark: throwaway PostgreSQL and Redis, evictd as a separate process, and the
//! figures issue 5 asks for, per delivery setting. Prints a table and writes
//! `target/evictd-bench.json`.
//!
//!     cargo bench --bench evictd              # full run, a few minutes on 2 cores
//!     cargo bench --bench evictd -- --quick   # shorter phases, for a smoke test
//!     cargo bench --bench evictd -- --speed   # the machine-speed gauge alone (seconds)
//!     cargo bench --bench evictd -- --keyspace   # stats, sweep, invalidate --all over 5 M keys
//!
//! Latency is measured end to end: the time from a writer's COMMIT returning to Redis telling
//! (keyspace notification) that the entry tagged with the changed row was deleted.

#[path = "evictd/keyspace.rs"]
mod keyspace;
#[path = "../tests/support/mod.rs"]
mod support;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use evictd::throwaway::{Postgres, Redis};
use futures_util::StreamExt as _;
use redis::AsyncCommands as _;
use serde_json::{Value, json};
use support::Daemon;
use tokio::sync::Mutex;

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

const SETTINGS: [Setting; 5] = [
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
];

fn product_id(i: usize) -> String {
    format!("00000000-0000-0000-0000-{i:012}")
}

struct Lab {
    pg: Postgres,
    redis: Redis,
    quick: bool,
    /// Products seeded (every one exists, so every UPDATE writes).
    products: usize,
    dir: tempfile::TempDir,
}

impl Lab {
    fn phase(&self) -> Duration {
        if self.quick {
            Duration::from_secs(2)
        } else {
            Duration::from_secs(5)
        }
    }

    fn url(&self, db: &str) -> String {
        self.pg.url(db)
    }

    async fn client(&self, db: &str) -> tokio_postgres::Client {
        let (client, conn) = tokio_postgres::connect(&self.url(db), tokio_postgres::NoTls)
            .await
            .unwrap();
        tokio::spawn(conn);
        client
    }

    async fn redis(&self) -> redis::aio::MultiplexedConnection {
        connect_redis(&self.redis).await
    }

    fn evictd(&self, db: &str, setting: &Setting, args: &[&str]) -> std::process::Command {
        let config = self.dir.path().join(format!("{}.toml", setting.name));
        std::fs::write(
            &config,
            // EVICTD_BENCH_CONFIG: more settings for every daemon, for A/B runs of one
            // (`EVICTD_BENCH_CONFIG='batch_linger_ms = 0'`).
            format!(
                "outbox_wakeup = \"{}\"\nsweep_interval_secs = 0\n{}\n",
                setting.wakeup,
                std::env::var("EVICTD_BENCH_CONFIG").unwrap_or_default()
            ),
        )
        .unwrap();
        let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_evictd"));
        command
            .args(args)
            .env("DATABASE_URL", self.url(db))
            .env("REDIS_URL", self.redis.url())
            .env("EVICTD_CONFIG", &config)
            .env("EVICTD_DELIVERY", setting.delivery)
            .env(
                "EVICTD_LOG",
                std::env::var("EVICTD_BENCH_LOG").unwrap_or_else(|_| "warn,evictd=info".into()),
            )
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped());
        command
    }

    async fn start_daemon(&self, db: &str, setting: &Setting) -> Daemon {
        let daemon =
            Daemon::spawn(self.evictd(db, setting, &["run", "--http-addr", "127.0.0.1:0"]));
        daemon.wait_ready().await;
        daemon
    }

    /// A database with the example schema and PRODUCTS products, evictd installed per `setting`.
    async fn database(&self, name: &str, setting: Option<&Setting>) {
        let admin = self.client("postgres").await;
        admin
            .batch_execute(&format!("DROP DATABASE IF EXISTS {name}"))
            .await
            .unwrap();
        admin
            .batch_execute(&format!("CREATE DATABASE {name} TEMPLATE bench_template"))
            .await
            .unwrap();
        if let Some(setting) = setting {
            let output = support::finish(self.evictd(name, setting, &["migrate"]));
            assert!(output.status.success(), "{}", support::text(&output));
        }
    }
}

/// A connection to `server` (no [`Lab`] needed: `--speed` starts only Redis).
async fn connect_redis(server: &Redis) -> redis::aio::MultiplexedConnection {
    redis::Client::open(server.url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap()
}

/// Turns Redis keyspace notifications on (for per-commit latency) or off (for bulk phases,
/// where publishing a notification per deleted key would slow Redis down and skew the figure).
async fn keyspace_events(lab: &Lab, on: bool) {
    let mut conn = lab.redis().await;
    let () = redis::cmd("CONFIG")
        .arg("SET")
        .arg("notify-keyspace-events")
        .arg(if on { "Kg" } else { "" })
        .query_async(&mut conn)
        .await
        .unwrap();
}

/// Records when Redis deleted each `cache:bench:*` key (keyspace notifications).
struct Deletions {
    seen: Arc<Mutex<HashMap<String, Instant>>>,
    count: Arc<std::sync::atomic::AtomicU64>,
}

impl Deletions {
    async fn subscribe(lab: &Lab) -> Deletions {
        let mut conn = lab.redis().await;
        let () = redis::cmd("CONFIG")
            .arg("SET")
            .arg("notify-keyspace-events")
            .arg("Kg")
            .query_async(&mut conn)
            .await
            .unwrap();
        let () = redis::cmd("CONFIG")
            .arg("SET")
            .arg("client-output-buffer-limit")
            .arg("pubsub 0 0 0")
            .query_async(&mut conn)
            .await
            .unwrap();
        let client = redis::Client::open(lab.redis.url()).unwrap();
        let mut pubsub = client.get_async_pubsub().await.unwrap();
        pubsub
            .psubscribe("__keyspace@0__:cache:bench:*")
            .await
            .unwrap();
        let seen = Arc::new(Mutex::new(HashMap::new()));
        let count = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let (s, c) = (seen.clone(), count.clone());
        tokio::spawn(async move {
            let mut messages = pubsub.into_on_message();
            while let Some(msg) = messages.next().await {
                let at = Instant::now();
                let payload: String = msg.get_payload().unwrap_or_default();
                if payload != "del" {
                    continue;
                }
                let key = msg
                    .get_channel_name()
                    .trim_start_matches("__keyspace@0__:")
                    .to_string();
                c.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                s.lock().await.insert(key, at);
            }
        });
        Deletions { seen, count }
    }

    async fn clear(&self) {
        self.seen.lock().await.clear();
        self.count.store(0, std::sync::atomic::Ordering::Relaxed);
    }

    fn count(&self) -> u64 {
        self.count.load(std::sync::atomic::Ordering::Relaxed)
    }

    async fn wait_count(&self, n: u64, limit: Duration) -> Option<Instant> {
        let start = Instant::now();
        while self.count() < n {
            if start.elapsed() > limit {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        Some(Instant::now())
    }
}

/// Writes one cache entry per product in `range`, tagged `products:id:<id>`.
async fn cache_entries(lab: &Lab, range: std::ops::Range<usize>) {
    let mut conn = lab.redis().await;
    let ids: Vec<usize> = range.collect();
    for chunk in ids.chunks(10_000) {
        let mut pipe = redis::pipe();
        for &i in chunk {
            let key = format!("cache:bench:e:{i}");
            pipe.cmd("SET")
                .arg(&key)
                .arg("v")
                .arg("EX")
                .arg(ENTRY_TTL_S)
                .ignore();
            pipe.cmd("SADD")
                .arg(format!("cache:tag:products:id:{}", product_id(i)))
                .arg(&key)
                .ignore();
        }
        let () = pipe.query_async(&mut conn).await.unwrap();
    }
}

fn join_values(values: &[Value]) -> String {
    values
        .iter()
        .map(Value::to_string)
        .collect::<Vec<_>>()
        .join(" / ")
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

/// Percentiles of `lags_ms` (in commit order), and whether the lag stayed bounded.
fn summary(mut lags_ms: Vec<f64>, lost: usize) -> Value {
    let (first_quarter, last_quarter) = quarter_medians(&lags_ms);
    lags_ms.sort_by(|a, b| a.total_cmp(b));
    json!({
        "samples": lags_ms.len(),
        "missing": lost,
        "p50_ms": round(percentile(&lags_ms, 0.5)),
        "p90_ms": round(percentile(&lags_ms, 0.9)),
        "p99_ms": round(percentile(&lags_ms, 0.99)),
        "max_ms": round(lags_ms.last().copied().unwrap_or(f64::NAN)),
        "first_quarter_p50_ms": round(first_quarter),
        "last_quarter_p50_ms": round(last_quarter),
        "bounded": lost == 0 && lag_bounded(first_quarter, last_quarter),
    })
}

/// The median lag of the first and of the last quarter of the commits (in commit order).
fn quarter_medians(lags_ms: &[f64]) -> (f64, f64) {
    let quarter = lags_ms.len() / 4;
    let median = |part: &[f64]| {
        let mut part = part.to_vec();
        part.sort_by(|a, b| a.total_cmp(b));
        percentile(&part, 0.5)
    };
    (
        median(&lags_ms[..quarter]),
        median(&lags_ms[lags_ms.len() - quarter..]),
    )
}

/// Whether a closed loop's lag stayed bounded: a daemon that cannot keep up falls further
/// behind as the phase goes on, so the lag of the last quarter of the commits is a multiple of
/// the first's; one that keeps up shows about the same lag throughout (20 ms of slack for
/// batching and this VM's hiccups). When it is bounded, the closed loop's rate is the highest
/// commit rate at which the lag stays bounded: the database commits no faster.
fn lag_bounded(first_quarter_ms: f64, last_quarter_ms: f64) -> bool {
    last_quarter_ms <= (2.0 * first_quarter_ms).max(first_quarter_ms + 20.0)
}

/// How `summary`'s trend reads in a report line.
fn trend(lag: &Value) -> String {
    format!(
        "{} (median {} ms in the first quarter of the commits, {} ms in the last)",
        if lag["bounded"].as_bool() == Some(true) {
            "bounded"
        } else {
            "GROWING"
        },
        lag["first_quarter_p50_ms"],
        lag["last_quarter_p50_ms"]
    )
}

fn round(x: f64) -> f64 {
    (x * 100.0).round() / 100.0
}

/// Runs with evictd in [`writer_ratio`], each between two baseline runs.
const WRITER_ROUNDS: usize = 5;

/// Closed loop: WRITERS connections updating random products as fast as they can.
/// Writer cost as a ratio robust to a machine whose fsync speed drifts (a shared VM disk can
/// halve or double the no-trigger rate within a minute): short runs alternating without and
/// with evictd, each "with" run compared with the mean of the "without" runs on either side.
/// Returns (median ratio, mean rate without, mean rate with).
///
/// `daemon`, when given, is stopped for every baseline run and started again after it: in
/// `logical` delivery its walsender costs the writers of *every* database in the cluster
/// (PostgreSQL 15 wakes each walsender at every WAL flush, and it reads and decodes every
/// record: with `pg_recvlogical` streaming an idle database, pgbench's single-row UPDATEs on
/// another ran 15 % slower, the walsender using 16 % of a core in 5,000 context switches a
/// second). A baseline beside it would hide that cost; a database without evictd has none.
async fn writer_ratio(
    lab: &Lab,
    db: &str,
    daemon: &mut Option<StoppedForBaseline<'_>>,
) -> (f64, f64, f64) {
    let each = lab.phase() / 2;
    let mut bare = vec![baseline_rate(lab, db, each, daemon).await];
    let mut with = Vec::new();
    for _ in 0..WRITER_ROUNDS {
        let walsender = match daemon {
            Some(_) => walsender_pid(lab).await,
            None => None,
        };
        let walsender_before = walsender.map_or(0.0, |pid| process_stats(pid).2);
        with.push(writer_rate_for(lab, db, each).await);
        if let (Some(stopped), Some(pid)) = (daemon.as_mut(), walsender) {
            stopped.walsender_cpu_s += process_stats(pid).2 - walsender_before;
        }
        bare.push(baseline_rate(lab, db, each, daemon).await);
    }
    let mut ratios: Vec<f64> = with
        .iter()
        .enumerate()
        .map(|(i, w)| w / ((bare[i] + bare[i + 1]) / 2.0))
        .collect();
    ratios.sort_by(f64::total_cmp);
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
    (ratios[WRITER_ROUNDS / 2], mean(&bare), mean(&with))
}

/// The daemon [`writer_ratio`] stops during its baseline runs (in `logical` delivery only),
/// the CPU seconds the daemons it stopped had used, and those their walsenders used while the
/// writers ran beside them.
struct StoppedForBaseline<'a> {
    setting: &'a Setting,
    daemon: &'a mut Daemon,
    cpu_s_of_stopped: f64,
    walsender_cpu_s: f64,
}

/// The process of the `logical` daemon's walsender, once it streams.
async fn walsender_pid(lab: &Lab) -> Option<u32> {
    let admin = lab.client("postgres").await;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let row = admin
            .query_opt(
                "SELECT pid FROM pg_stat_activity WHERE application_name = 'evictd-logical' \
                 AND backend_type = 'walsender'",
                &[],
            )
            .await
            .unwrap();
        if let Some(row) = row {
            return Some(row.get::<_, i32>(0) as u32);
        }
        if Instant::now() > deadline {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn stopped_for_baseline<'a>(
    setting: &'a Setting,
    daemon: &'a mut Daemon,
) -> Option<StoppedForBaseline<'a>> {
    (setting.delivery == "logical").then_some(StoppedForBaseline {
        setting,
        daemon,
        cpu_s_of_stopped: 0.0,
        walsender_cpu_s: 0.0,
    })
}

/// One no-trigger baseline run of [`writer_ratio`], the daemon (if given) stopped meanwhile.
async fn baseline_rate(
    lab: &Lab,
    db: &str,
    phase: Duration,
    daemon: &mut Option<StoppedForBaseline<'_>>,
) -> f64 {
    if let Some(stopped) = daemon {
        stopped.cpu_s_of_stopped += process_stats(stopped.daemon.child.id()).2;
        stopped.daemon.kill9();
    }
    let rate = writer_rate_for(lab, "bench_bare", phase).await;
    if let Some(stopped) = daemon {
        *stopped.daemon = lab.start_daemon(db, stopped.setting).await;
    }
    rate
}

async fn writer_rate(lab: &Lab, db: &str) -> f64 {
    writer_rate_for(lab, db, lab.phase()).await
}

async fn writer_rate_for(lab: &Lab, db: &str, phase: Duration) -> f64 {
    let deadline = Instant::now() + phase;
    let products = lab.products;
    let mut tasks = Vec::new();
    for w in 0..WRITERS {
        let client = lab.client(db).await;
        tasks.push(tokio::spawn(async move {
            let statement = client.prepare(EDIT).await.unwrap();
            let mut n = 0u64;
            let mut i = w * 7919;
            while Instant::now() < deadline {
                i = (i + 104_729) % products;
                client.execute(&statement, &[&product_id(i)]).await.unwrap();
                n += 1;
            }
            n
        }));
    }
    let started = Instant::now();
    let mut total = 0;
    for t in tasks {
        total += t.await.unwrap();
    }
    total as f64 / started.elapsed().as_secs_f64()
}

/// Open loop at `rate` commits/s (or closed loop when `rate` is None), one fresh product per
/// commit, each with its cache entry; returns the achieved rate and lag percentiles.
async fn latency(
    lab: &Lab,
    db: &str,
    deletions: &Deletions,
    rate: Option<f64>,
    first: usize,
) -> (f64, Value, usize) {
    let planned = match rate {
        Some(r) => (r * lab.phase().as_secs_f64()) as usize,
        None => 80_000,
    };
    cache_entries(lab, first..first + planned).await;
    deletions.clear().await;
    let commits: Arc<Mutex<Vec<(usize, Instant)>>> =
        Arc::new(Mutex::new(Vec::with_capacity(planned)));
    let start = Instant::now() + Duration::from_millis(50);
    let deadline = start + lab.phase();
    let mut tasks = Vec::new();
    for w in 0..WRITERS {
        let client = lab.client(db).await;
        let commits = commits.clone();
        tasks.push(tokio::spawn(async move {
            let statement = client.prepare(EDIT).await.unwrap();
            let mut k = w;
            while k < planned {
                if let Some(rate) = rate {
                    let due = start + Duration::from_secs_f64(k as f64 / rate);
                    tokio::time::sleep_until(due.into()).await;
                } else if Instant::now() > deadline {
                    break;
                }
                let i = first + k;
                client.execute(&statement, &[&product_id(i)]).await.unwrap();
                commits.lock().await.push((i, Instant::now()));
                k += WRITERS;
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let took = start.elapsed().as_secs_f64();
    let commits = commits.lock().await.clone();
    let _ = deletions
        .wait_count(commits.len() as u64, Duration::from_secs(30))
        .await;
    let seen = deletions.seen.lock().await;
    let mut lags = Vec::with_capacity(commits.len());
    let mut missing = 0;
    for (i, at) in &commits {
        match seen.get(&format!("cache:bench:e:{i}")) {
            Some(gone) => lags.push(gone.saturating_duration_since(*at).as_secs_f64() * 1000.0),
            None => missing += 1,
        }
    }
    (
        commits.len() as f64 / took,
        summary(lags, missing),
        commits.len(),
    )
}

/// The daemon's resident memory now and at its peak (kB), and CPU seconds used so far.
fn process_stats(pid: u32) -> (u64, u64, f64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let fields: Vec<&str> = stat
        .rsplit(") ")
        .next()
        .unwrap_or("")
        .split_whitespace()
        .collect();
    let ticks = 100.0; // USER_HZ on Linux
    let cpu = fields
        .get(11)
        .and_then(|v| v.parse::<f64>().ok())
        .unwrap_or(0.0)
        + fields
            .get(12)
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0);
    (field("VmRSS:"), field("VmHWM:"), cpu / ticks)
}

/// One UPDATE of `rows` rows (products 0..rows): statement time with and without the triggers,
/// events it produced, time from COMMIT to the last affected entry gone, precise or table-wide.
async fn bulk(lab: &Lab, db: &str, setting: &Setting, deletions: &Deletions, rows: usize) -> Value {
    let client = lab.client(db).await;
    let sql = format!(
        "UPDATE products SET price_cents = price_cents + 1 WHERE id <= '{}'::uuid",
        product_id(rows - 1)
    );
    let bare = if setting.delivery == "logical" {
        // No trigger to disable: the change would still be streamed (and invalidated while
        // the entries below are written). Bare means the database without evictd.
        let plain = lab.client("bench_bare").await;
        let t = Instant::now();
        plain.batch_execute(&sql).await.unwrap();
        let bare = t.elapsed().as_secs_f64();
        plain
            .batch_execute("VACUUM (ANALYZE) products")
            .await
            .unwrap();
        bare
    } else {
        client
            .batch_execute("ALTER TABLE products DISABLE TRIGGER USER")
            .await
            .unwrap();
        let t = Instant::now();
        client.batch_execute(&sql).await.unwrap();
        let bare = t.elapsed().as_secs_f64();
        client
            .batch_execute("ALTER TABLE products ENABLE TRIGGER USER")
            .await
            .unwrap();
        client
            .batch_execute("VACUUM (ANALYZE) products")
            .await
            .unwrap();
        bare
    };
    // ANALYZE too: the bare UPDATE counts towards autoanalyze's threshold (10 % of the table),
    // and an autoanalyze of the million-row table could otherwise start in the middle of the
    // measured statement's invalidation.

    // Entries for (up to) 100,000 of the updated rows, and one for a row it does not touch.
    let watched = rows.min(100_000);
    cache_entries(lab, 0..watched).await;
    cache_entries(lab, rows..rows + 1).await;
    deletions.clear().await;
    let sequence = "SELECT CASE WHEN is_called THEN last_value ELSE last_value - 1 END FROM evictd.outbox_id_seq";
    let outbox_before: i64 = if setting.delivery == "outbox" {
        client.query_one(sequence, &[]).await.unwrap().get(0)
    } else {
        0
    };
    let (listener, mut conn) = tokio_postgres::connect(&lab.url(db), tokio_postgres::NoTls)
        .await
        .unwrap();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        let mut stream = futures_util::stream::poll_fn(move |cx| conn.poll_message(cx));
        while let Some(Ok(m)) = stream.next().await {
            if let tokio_postgres::AsyncMessage::Notification(n) = m {
                let _ = tx.send(n.payload().to_string());
            }
        }
    });
    listener
        .batch_execute("LISTEN cache_invalidation")
        .await
        .unwrap();

    // A 0.1 % sample is polled every few milliseconds (cheap enough not to slow Redis down:
    // a 1 % one took a tenth of Redis' CPU in this phase); once it is gone, every watched entry
    // is checked, and the clock stops only when none is left.
    let sample: Vec<String> = (0..watched)
        .step_by(1000)
        .chain([watched - 1])
        .map(|i| format!("cache:bench:e:{i}"))
        .collect();
    let everything: Vec<String> = (0..watched).map(|i| format!("cache:bench:e:{i}")).collect();
    let mut poll = lab.redis().await;
    let () = redis::cmd("CONFIG")
        .arg("RESETSTAT")
        .query_async(&mut poll)
        .await
        .unwrap();
    let cpu_before = redis_cpu_s(&mut poll).await;
    if std::env::var_os("EVICTD_BENCH_LOG").is_some() {
        // What Redis holds when the phase starts (the same tags cost more Redis CPU inside the
        // full run than alone).
        for section in ["keyspace", "memory"] {
            let info: String = redis::cmd("INFO")
                .arg(section)
                .query_async(&mut poll)
                .await
                .unwrap();
            eprintln!("redis before bulk {rows}: {}", info.replace("\r\n", " | "));
        }
    }
    let t = Instant::now();
    client.batch_execute(&sql).await.unwrap();
    let with_triggers = t.elapsed().as_secs_f64();
    let committed = Instant::now();
    let mut gone_after = None;
    // When the first sampled entry went: what comes before is the daemon's start (wake-up,
    // fetching and parsing the statement's event); what comes after, Redis removing entries.
    let mut first_gone_after = None;
    while committed.elapsed() < Duration::from_secs(60) {
        let mut left: u64 = poll.exists(&sample).await.unwrap();
        if first_gone_after.is_none() && left < sample.len() as u64 {
            first_gone_after = Some(committed.elapsed().as_secs_f64());
        }
        if left == 0 {
            let at = committed.elapsed().as_secs_f64();
            for chunk in everything.chunks(10_000) {
                left += poll.exists::<_, u64>(chunk).await.unwrap();
            }
            if left == 0 {
                gone_after = Some(at);
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let redis_cpu_s = redis_cpu_s(&mut poll).await - cpu_before;
    if std::env::var_os("EVICTD_BENCH_LOG").is_some() {
        let stats: String = redis::cmd("INFO")
            .arg("commandstats")
            .query_async(&mut poll)
            .await
            .unwrap();
        eprintln!("{stats}");
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut notifications = Vec::new();
    while let Ok(p) = rx.try_recv() {
        notifications.push(p);
    }
    let (events, wide) = if setting.delivery == "outbox" {
        // The daemon may already have consumed the rows: count what the statement wrote via
        // the identity sequence instead.
        let after: i64 = client.query_one(sequence, &[]).await.unwrap().get(0);
        let events = after - outbox_before;
        let kept: i64 = client
            .query_one("SELECT count(*) FROM evictd.outbox", &[])
            .await
            .unwrap()
            .get(0);
        let _ = kept;
        (events, None)
    } else if setting.delivery == "logical" {
        // One transaction; whether it went table-wide shows in the untouched entry.
        (1, None)
    } else {
        let wide = notifications.iter().any(|p| p.contains("\"wide\":true"));
        (notifications.len() as i64, Some(wide))
    };
    let mut redis = lab.redis().await;
    let untouched: bool = redis.exists(format!("cache:bench:e:{rows}")).await.unwrap();
    let _: () = redis.del(format!("cache:bench:e:{rows}")).await.unwrap();
    json!({
        "rows": rows,
        "statement_s_bare": round(bare * 1000.0) / 1000.0,
        "statement_s_with_triggers": round(with_triggers * 1000.0) / 1000.0,
        "overhead_pct": round((with_triggers / bare - 1.0) * 100.0),
        "events": events,
        "commit_to_last_key_gone_s": gone_after.map(|s| round(s * 1000.0) / 1000.0),
        "commit_to_first_key_gone_s": first_gone_after.map(|s| round(s * 1000.0) / 1000.0),
        "redis_cpu_s": round(redis_cpu_s * 1000.0) / 1000.0,
        "precise": wide.map_or(untouched, |w| !w && untouched),
    })
}

/// The bulk phase `times` times over the same rows, reported as the run with the median time
/// to the last key gone, with every run's figures beside it: a single 0.6-second measurement on
/// this shared VM swings by ±30 % from one minute to the next (the bare statement with it).
async fn bulk_repeated(
    lab: &Lab,
    db: &str,
    setting: &Setting,
    deletions: &Deletions,
    rows: usize,
    times: usize,
) -> Value {
    let mut runs = Vec::with_capacity(times);
    for i in 0..times {
        if i > 0 {
            settle(lab, db).await;
        }
        runs.push(bulk(lab, db, setting, deletions, rows).await);
    }
    let gone = |run: &Value| {
        run["commit_to_last_key_gone_s"]
            .as_f64()
            .unwrap_or(f64::INFINITY)
    };
    runs.sort_by(|a, b| gone(a).total_cmp(&gone(b)));
    let every = |key: &str| -> Vec<Value> { runs.iter().map(|r| r[key].clone()).collect() };
    let (gone_s, bare_s) = (
        every("commit_to_last_key_gone_s"),
        every("statement_s_bare"),
    );
    let mut median = runs[runs.len() / 2].clone();
    median["runs_commit_to_last_key_gone_s"] = Value::from(gone_s);
    median["runs_statement_s_bare"] = Value::from(bare_s);
    median
}

/// How fast this VM is right now, as Redis' time per lookup of a key that is not in the CPU's
/// caches (µs): 200,000 keys with a TTL, then 100,000 EXISTS from Lua in a scattered order,
/// timed by Redis (`INFO commandstats`). Most of what the daemon asks of Redis is such
/// lookups, and this VM's speed at them drifts by half within an hour, so each setting's
/// figures come with the speed they were measured at. Leaves Redis empty.
async fn redis_lookup_us(server: &Redis) -> f64 {
    const KEYS: u64 = 200_000;
    const LOOKUPS: u64 = 100_000;
    let mut conn = connect_redis(server).await;
    for start in (0..KEYS).step_by(20_000) {
        let mut pipe = redis::pipe();
        for i in start..start + 20_000 {
            pipe.cmd("SET")
                .arg(format!("bench:calibrate:{i}"))
                .arg("v")
                .arg("EX")
                .arg(ENTRY_TTL_S)
                .ignore();
        }
        let () = pipe.query_async(&mut conn).await.unwrap();
    }
    let () = redis::cmd("CONFIG")
        .arg("RESETSTAT")
        .query_async(&mut conn)
        .await
        .unwrap();
    // A prime stride visits the keys in an order unrelated to their insertion.
    let script = redis::Script::new(
        "local found = 0
         for i = tonumber(ARGV[1]), tonumber(ARGV[2]) do
           found = found + redis.call('EXISTS', 'bench:calibrate:' .. (i * 7919) % tonumber(ARGV[3]))
         end
         return found",
    );
    let mut found = 0;
    for start in (0..LOOKUPS).step_by(1_000) {
        let n: u64 = script
            .arg(start)
            .arg(start + 999)
            .arg(KEYS)
            .invoke_async(&mut conn)
            .await
            .unwrap();
        found += n;
    }
    assert_eq!(found, LOOKUPS, "every calibration key is there");
    let stats: String = redis::cmd("INFO")
        .arg("commandstats")
        .query_async(&mut conn)
        .await
        .unwrap();
    let usec: f64 = stats
        .lines()
        .find(|l| l.starts_with("cmdstat_evalsha:") || l.starts_with("cmdstat_eval:"))
        .and_then(|l| l.split("usec=").nth(1))
        .and_then(|v| v.split(',').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(f64::NAN);
    let () = redis::cmd("FLUSHALL")
        .arg("ASYNC")
        .query_async(&mut conn)
        .await
        .unwrap();
    usec / LOOKUPS as f64
}

/// Redis' own CPU time so far (user + system), in seconds.
async fn redis_cpu_s(conn: &mut redis::aio::MultiplexedConnection) -> f64 {
    let info: String = redis::cmd("INFO")
        .arg("cpu")
        .query_async(conn)
        .await
        .unwrap();
    info.lines()
        .filter(|l| l.starts_with("used_cpu_user:") || l.starts_with("used_cpu_sys:"))
        .filter_map(|l| l.split(':').nth(1)?.trim().parse::<f64>().ok())
        .sum()
}

/// Invalidates one tag of `members` members while another client PINGs in a loop.
async fn big_tag(lab: &Lab, db: &str, members: usize) -> Value {
    let mut conn = lab.redis().await;
    let keys: Vec<String> = (0..members)
        .map(|i| format!("cache:bench:big:{i}"))
        .collect();
    for chunk in keys.chunks(20_000) {
        let mut pipe = redis::pipe();
        for key in chunk {
            pipe.cmd("SET")
                .arg(key)
                .arg("v")
                .arg("EX")
                .arg(ENTRY_TTL_S)
                .ignore();
        }
        pipe.cmd("SADD")
            .arg("cache:tag:bench:big")
            .arg(chunk)
            .ignore();
        let () = pipe.query_async(&mut conn).await.unwrap();
    }
    let before: u64 = redis::cmd("DBSIZE").query_async(&mut conn).await.unwrap();
    // Redis' own account of how long each command ran (the PING loop also counts the time
    // the client or Redis waited for a CPU on this shared machine).
    let () = redis::cmd("CONFIG")
        .arg("SET")
        .arg("slowlog-log-slower-than")
        .arg(1_000)
        .query_async(&mut conn)
        .await
        .unwrap();
    let () = redis::cmd("CONFIG")
        .arg("SET")
        .arg("slowlog-max-len")
        .arg(100_000)
        .query_async(&mut conn)
        .await
        .unwrap();
    let () = redis::cmd("SLOWLOG")
        .arg("RESET")
        .query_async(&mut conn)
        .await
        .unwrap();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let pinger = {
        let mut ping_conn = lab.redis().await;
        let stop = stop.clone();
        tokio::spawn(async move {
            let mut worst = Duration::ZERO;
            let mut n = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let t = Instant::now();
                let _: String = redis::cmd("PING")
                    .query_async(&mut ping_conn)
                    .await
                    .unwrap();
                worst = worst.max(t.elapsed());
                n += 1;
            }
            (worst, n)
        })
    };
    let client = lab.client(db).await;
    let t = Instant::now();
    client
        .batch_execute("SELECT evictd.invalidate_tags('bench:big')")
        .await
        .unwrap();
    loop {
        let size: u64 = redis::cmd("DBSIZE").query_async(&mut conn).await.unwrap();
        // The invalidation may create two keys of its own: the tag's `tagts` marker and, on a
        // fresh Redis, evictd's counters hash.
        if size + members as u64 <= before + 2 || t.elapsed() > Duration::from_secs(120) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let took = t.elapsed().as_secs_f64();
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (worst, pings) = pinger.await.unwrap();
    let slow: Vec<redis::Value> = redis::cmd("SLOWLOG")
        .arg("GET")
        .arg(100_000)
        .query_async(&mut conn)
        .await
        .unwrap();
    // Each entry is [id, time, microseconds, command…]: sorted longest first, once.
    let micros = |entry: &redis::Value| match entry {
        redis::Value::Array(fields) => match fields.get(2) {
            Some(redis::Value::Int(us)) => *us,
            _ => 0,
        },
        _ => 0,
    };
    // The bench's own SLOWLOG RESET is logged too (and freeing the previous phase's 100,000
    // entries took 12–19 ms): only the daemon's commands count.
    let is_slowlog = |entry: &redis::Value| match entry {
        redis::Value::Array(fields) => match fields.get(3) {
            Some(redis::Value::Array(args)) => matches!(
                args.first(),
                Some(redis::Value::BulkString(name)) if name.eq_ignore_ascii_case(b"SLOWLOG")
            ),
            _ => false,
        },
        _ => false,
    };
    let mut slow: Vec<redis::Value> = slow.into_iter().filter(|e| !is_slowlog(e)).collect();
    slow.sort_by_key(|entry| std::cmp::Reverse(micros(entry)));
    let () = redis::cmd("SLOWLOG")
        .arg("RESET")
        .query_async(&mut conn)
        .await
        .unwrap();
    let longest_us = slow.first().map_or(0, micros);
    // What the longest was: a drain call of the usual size that took long was descheduled
    // (the VM, or a vacuum), not too big.
    let longest_command = slow.first().map_or(String::new(), describe_slow_entry);
    let median_slow_us = slow.get(slow.len() / 2).map_or(0, micros);
    if std::env::var_os("EVICTD_BENCH_LOG").is_some() {
        for entry in slow.iter().take(5) {
            eprintln!("slowlog: {entry:?}");
        }
    }
    json!({
        "members": members,
        "total_s": round(took * 1000.0) / 1000.0,
        "worst_ping_ms": round(worst.as_secs_f64() * 1000.0),
        "longest_command_ms": round(longest_us as f64 / 1000.0),
        "longest_command": longest_command,
        "commands_over_1ms": slow.len(),
        "median_of_those_ms": round(median_slow_us as f64 / 1000.0),
        "pings": pings,
    })
}

/// A SLOWLOG entry's command as text, script hashes shortened, cut at 100 characters.
fn describe_slow_entry(entry: &redis::Value) -> String {
    let redis::Value::Array(fields) = entry else {
        return String::new();
    };
    let Some(redis::Value::Array(args)) = fields.get(3) else {
        return String::new();
    };
    let words: Vec<String> = args
        .iter()
        .map(|arg| match arg {
            redis::Value::BulkString(bytes) if bytes.len() == 40 => {
                format!("{}…", String::from_utf8_lossy(&bytes[..8]))
            }
            redis::Value::BulkString(bytes) => String::from_utf8_lossy(bytes).into_owned(),
            other => format!("{other:?}"),
        })
        .collect();
    words.join(" ").chars().take(100).collect()
}

/// Lets the server settle before a phase that measures Redis or the drain rather than the
/// writers: vacuums what the previous phases left (so autovacuum does not start in the middle
/// of the measurement), checkpoints, and waits for any autovacuum worker still running. On
/// these 2 cores a vacuum of a million-row table meanwhile deschedules Redis mid-command,
/// which SLOWLOG then counts as the command's own time.
async fn settle(lab: &Lab, db: &str) {
    let client = lab.client(db).await;
    client.batch_execute("VACUUM (ANALYZE)").await.unwrap();
    let admin = lab.client("postgres").await;
    admin.batch_execute("CHECKPOINT").await.unwrap();
    let start = Instant::now();
    loop {
        let workers: i64 = admin
            .query_one(
                "SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'autovacuum worker'",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        if workers == 0 || start.elapsed() > Duration::from_secs(120) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Drops `db` and its replication slot, if any.
async fn drop_database(lab: &Lab, db: &str) {
    let admin = lab.client("postgres").await;
    // The killed daemon's walsender may hold the slot for a moment longer.
    let start = Instant::now();
    while let Err(e) = admin
        .execute(
            "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE database = $1",
            &[&db],
        )
        .await
    {
        assert!(start.elapsed() < Duration::from_secs(30), "{e}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    admin
        .batch_execute(&format!("DROP DATABASE {db} WITH (FORCE)"))
        .await
        .unwrap();
}

/// A backlog of `events` queued outbox events, drained by a daemon started afterwards.
async fn backlog(lab: &Lab, db: &str, setting: &Setting, events: usize) -> Value {
    settle(lab, db).await;
    let client = lab.client(db).await;
    client
        .batch_execute(&format!(
            "INSERT INTO evictd.outbox (payload)
             SELECT '{{\"v\":1,\"op\":\"UPDATE\",\"table\":\"public.products\",\"cols\":[\"client_id\",\"id\"],\"rows\":[[\"00000000-0000-0000-0000-' || lpad((i % {CLIENTS})::text, 12, '0') || '\",\"00000000-0000-0000-0000-' || lpad(i::text, 12, '0') || '\"]]}}'
             FROM generate_series(0, {}) i",
            events - 1
        ))
        .await
        .unwrap();
    // A real backlog builds up over time, autovacuum working through its inserts as they come;
    // here they came at once, so vacuum them now rather than in the middle of the drain.
    settle(lab, db).await;
    let t = Instant::now();
    let daemon = Daemon::spawn(lab.evictd(db, setting, &["run", "--http-addr", "127.0.0.1:0"]));
    // Ready once the backlog is drained: however long that takes on a slow day.
    daemon
        .wait_log_within("evictd is ready", 1, Duration::from_secs(600))
        .await;
    let took = t.elapsed().as_secs_f64();
    let left: i64 = client
        .query_one("SELECT count(*) FROM evictd.outbox", &[])
        .await
        .unwrap()
        .get(0);
    let (_, peak_kb, cpu) = process_stats(daemon.child.id());
    if std::env::var_os("EVICTD_BENCH_LOG").is_some() {
        eprintln!("{}", daemon.log());
    }
    json!({
        "events": events,
        "drain_s": round(took * 1000.0) / 1000.0,
        "events_per_s": (events as f64 / took).round(),
        "left": left,
        "daemon_peak_rss_mb": round(peak_kb as f64 / 1024.0),
        "cpu_s_per_100k_events": round(cpu / events as f64 * 100_000.0),
    })
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    if std::env::args().any(|a| a == "--speed") {
        // The machine-speed gauge alone, in a few seconds: what kind of hour this VM is
        // having, before spending a quarter of an hour on a full run.
        let server = Redis::start().unwrap_or_else(|e| panic!("{e:#}"));
        let us = redis_lookup_us(&server).await;
        println!("machine speed: {us:.2} µs per Redis lookup of a cold key");
        return;
    }
    let quick = std::env::args().any(|a| a == "--quick");
    if std::env::args().any(|a| a == "--keyspace") {
        let result = keyspace::keyspace(quick).await;
        println!("keyspace: {result}");
        return;
    }
    let lab = Lab {
        pg: Postgres::start_with(&[
            "fsync=on",
            "full_page_writes=on",
            "max_wal_size=4GB",
            "shared_buffers=256MB",
            // What `doctor` recommends for `logical` delivery with asynchronous commits: they
            // are decoded only once flushed, and the WAL writer flushes every this often.
            "wal_writer_delay=10ms",
        ])
        .unwrap_or_else(|e| panic!("{e:#}")),
        redis: Redis::start().unwrap_or_else(|e| panic!("{e:#}")),
        quick,
        products: if quick { 200_000 } else { PRODUCTS },
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

    // `--setting NAME` limits every mode below, the full run included, to one setting.
    let args: Vec<String> = std::env::args().collect();
    let selected: Vec<&Setting> = match args.iter().position(|a| a == "--setting") {
        Some(i) => {
            let name = args.get(i + 1).map(String::as_str).unwrap_or_default();
            vec![
                SETTINGS
                    .iter()
                    .find(|s| s.name == name)
                    .unwrap_or_else(|| panic!("--setting takes a setting name, not `{name}`")),
            ]
        }
        None => SETTINGS.iter().collect(),
    };

    if std::env::args().any(|a| a == "--big-tag") {
        // One tag of 1,000,000 members (200,000 with `--quick`) invalidated alone, by the
        // daemon of the first (selected) setting.
        let setting = selected[0];
        // As in the full run: no keyspace notification for each of the million deletions.
        keyspace_events(&lab, false).await;
        lab.database("bench_big", Some(setting)).await;
        let daemon = lab.start_daemon("bench_big", setting).await;
        let result = big_tag(&lab, "bench_big", if quick { 200_000 } else { 1_000_000 }).await;
        drop(daemon);
        println!("big tag: {result}");
        return;
    }

    if std::env::args().any(|a| a == "--lag") {
        // The `synchronous_commit = off` closed loop alone: how far behind each setting falls
        // (`--rate N`: an open loop at N commits/s instead, the same load for every setting).
        let args: Vec<String> = std::env::args().collect();
        let open_rate: Option<f64> = args
            .iter()
            .position(|a| a == "--rate")
            .and_then(|i| args.get(i + 1))
            .map(|r| r.parse().expect("--rate takes commits per second"));
        for setting in &selected {
            let db = format!("bench_{}", setting.name.replace('-', "_"));
            lab.database(&db, Some(setting)).await;
            let daemon = lab.start_daemon(&db, setting).await;
            let admin = lab.client("postgres").await;
            admin
                .batch_execute(&format!("ALTER DATABASE {db} SET synchronous_commit = off"))
                .await
                .unwrap();
            // Who is busy: the daemon, and in logical mode the walsender decoding for it.
            let walsender: Option<i32> = admin
                .query_opt(
                    "SELECT pid FROM pg_stat_activity WHERE application_name = 'evictd-logical'",
                    &[],
                )
                .await
                .unwrap()
                .map(|row| row.get(0));
            let cpu = |pid: Option<u32>| pid.map_or(0.0, |pid| process_stats(pid).2);
            let daemon_pid = Some(daemon.child.id());
            let walsender_pid = walsender.map(|pid| pid as u32);
            let (daemon_before, walsender_before) = (cpu(daemon_pid), cpu(walsender_pid));
            let t = Instant::now();
            let (rate, lags, _) = latency(&lab, &db, &deletions, open_rate, 0).await;
            let seconds = t.elapsed().as_secs_f64();
            let daemon_cpu = (cpu(daemon_pid) - daemon_before) / seconds * 100.0;
            let walsender_cpu = (cpu(walsender_pid) - walsender_before) / seconds * 100.0;
            if std::env::var_os("EVICTD_BENCH_LOG").is_some() {
                eprintln!("{}", daemon.log());
            }
            drop(daemon);
            println!(
                "{:<14} {rate:.0} commits/s, lag {lags}, {}; CPU: daemon {daemon_cpu:.0} %, walsender {walsender_cpu:.0} %",
                setting.name,
                trend(&lags)
            );
        }
        return;
    }

    if std::env::args().any(|a| a == "--bulk") {
        // The 100,000-row UPDATE alone for each setting (and the 1,000,000-row one without
        // `--quick`): the figures to iterate on.
        keyspace_events(&lab, false).await;
        for setting in &selected {
            let db = format!("bench_{}", setting.name.replace('-', "_"));
            println!(
                "{:<14} machine speed: {:.2} µs per Redis lookup of a cold key",
                setting.name,
                redis_lookup_us(&lab.redis).await
            );
            lab.database(&db, Some(setting)).await;
            let daemon = lab.start_daemon(&db, setting).await;
            let result = bulk_repeated(
                &lab,
                &db,
                setting,
                &deletions,
                100_000.min(products / 2),
                BULK_RUNS,
            )
            .await;
            if std::env::var_os("EVICTD_BENCH_LOG").is_some() {
                eprintln!("{}", daemon.log());
            }
            println!("{:<14} {result}", setting.name);
            if !quick {
                let result = bulk(&lab, &db, setting, &deletions, products).await;
                println!("{:<14} {result}", setting.name);
            }
            let (_, peak_kb, _) = process_stats(daemon.child.id());
            println!(
                "{:<14} daemon peak RSS {:.1} MB",
                setting.name,
                peak_kb as f64 / 1024.0
            );
            drop(daemon);
        }
        return;
    }

    if std::env::args().any(|a| a == "--backlog") {
        // The outbox settings' backlog drain alone (1,000,000 events; 100,000 with `--quick`).
        for setting in selected.iter().filter(|s| s.delivery == "outbox") {
            let db = format!("bench_{}", setting.name.replace('-', "_"));
            lab.database(&db, Some(setting)).await;
            let events = if quick { 100_000 } else { 1_000_000 };
            let result = backlog(&lab, &db, setting, events).await;
            println!("{:<14} {result}", setting.name);
        }
        return;
    }

    if std::env::args().any(|a| a == "--writers") {
        // Writer cost alone, with and without the daemon running, to separate what the
        // triggers cost from what the daemon's own work costs the writers.
        keyspace_events(&lab, false).await;
        for setting in &selected {
            let db = format!("bench_{}", setting.name.replace('-', "_"));
            lab.database(&db, Some(setting)).await;
            let (alone, bare, with) = writer_ratio(&lab, &db, &mut None).await;
            let mut daemon = lab.start_daemon(&db, setting).await;
            let mut redis = lab.redis().await;
            let (daemon_before, redis_before) = (
                process_stats(daemon.child.id()).2,
                redis_cpu_s(&mut redis).await,
            );
            let mut stopped = stopped_for_baseline(setting, &mut daemon);
            let (together, bare_again, with_daemon) = writer_ratio(&lab, &db, &mut stopped).await;
            let (cpu_s_of_stopped, walsender_cpu_s) =
                stopped.map_or((0.0, 0.0), |s| (s.cpu_s_of_stopped, s.walsender_cpu_s));
            // What the daemon and Redis spent per commit (they idle during the baseline runs,
            // or in `logical` delivery are stopped then; the restarted daemons' start-up is
            // counted in).
            let commits = with_daemon * (lab.phase() / 2).as_secs_f64() * WRITER_ROUNDS as f64;
            let per_commit = |seconds: f64| seconds / commits * 1e6;
            let daemon_us =
                per_commit(cpu_s_of_stopped + process_stats(daemon.child.id()).2 - daemon_before);
            let redis_us = per_commit(redis_cpu_s(&mut redis).await - redis_before);
            let walsender = if setting.delivery == "logical" {
                format!(", walsender {:.1} µs", per_commit(walsender_cpu_s))
            } else {
                String::new()
            };
            drop(daemon);
            println!(
                "{:<14} without the daemon: {:>3.0} % ({:>6.0} vs {:>6.0}/s)  | with it running: {:>3.0} % ({:>6.0} vs {:>6.0}/s); CPU per commit: daemon {daemon_us:.1} µs, Redis {redis_us:.1} µs{walsender}",
                setting.name,
                alone * 100.0,
                with,
                bare,
                together * 100.0,
                with_daemon,
                bare_again,
            );
        }
        return;
    }

    let mut results = Vec::new();
    for setting in &selected {
        eprintln!("setting {}…", setting.name);
        let lookup_us = redis_lookup_us(&lab.redis).await;
        let db = format!("bench_{}", setting.name.replace('-', "_"));
        lab.database(&db, Some(setting)).await;
        let mut daemon = lab.start_daemon(&db, setting).await;
        let (idle_kb, _, _) = process_stats(daemon.child.id());

        // Alternating with the no-trigger baseline, so both see the same machine. Without
        // the latency phases' keyspace notifications: a Redis in production has none, and
        // each `tagts` marker's TTL would publish one.
        keyspace_events(&lab, false).await;
        let (ratio, bare_rate, rate) =
            writer_ratio(&lab, &db, &mut stopped_for_baseline(setting, &mut daemon)).await;
        keyspace_events(&lab, true).await;
        // (A logical daemon was restarted for each baseline run: this one is the last.)
        let pid = daemon.child.id();
        // CPU per event is measured over the latency phases, whose events are counted (the
        // writer phase's are not).
        let (_, _, cpu_before) = process_stats(pid);
        let mut next = 0;
        let mut events = 0;
        let mut latencies = serde_json::Map::new();
        for target in [500.0, 2_000.0] {
            let (achieved, lags, n) = latency(&lab, &db, &deletions, Some(target), next).await;
            next += n;
            events += n;
            latencies.insert(
                format!("{target}"),
                json!({ "achieved_per_s": achieved.round(), "lag": lags }),
            );
        }
        let admin = lab.client("postgres").await;
        admin
            .batch_execute(&format!("ALTER DATABASE {db} SET synchronous_commit = off"))
            .await
            .unwrap();
        let (max_rate, max_lags, n) = latency(&lab, &db, &deletions, None, next).await;
        events += n;
        admin
            .batch_execute(&format!("ALTER DATABASE {db} RESET synchronous_commit"))
            .await
            .unwrap();
        let (_, peak_kb, cpu_after) = process_stats(pid);

        keyspace_events(&lab, false).await;
        settle(&lab, &db).await;
        let bulk_small = bulk_repeated(
            &lab,
            &db,
            setting,
            &deletions,
            100_000.min(products / 2),
            if quick { 1 } else { BULK_RUNS },
        )
        .await;
        let bulk_large = if quick {
            Value::Null
        } else {
            bulk(&lab, &db, setting, &deletions, products).await
        };
        settle(&lab, &db).await;
        let tag = big_tag(&lab, &db, if quick { 200_000 } else { 1_000_000 }).await;
        keyspace_events(&lab, true).await;
        let (_, peak_after_bulk_kb, _) = process_stats(pid);
        drop(daemon);
        let drain = if setting.delivery == "outbox" {
            Some(backlog(&lab, &db, setting, if quick { 100_000 } else { 1_000_000 }).await)
        } else {
            None
        };
        // The next setting runs on a quiet server: no autovacuum working through this one's
        // million-row tables meanwhile (it slowed the next setting's figures down by up to 2×).
        drop_database(&lab, &db).await;
        // Nor on a Redis full of this one's keys: its backlog phase alone leaves 1,000,000
        // `tagts` markers (with a day's TTL) behind.
        // (ASYNC: a synchronous flush of that many keys outlasts the client's timeout.)
        let () = redis::cmd("FLUSHALL")
            .arg("ASYNC")
            .query_async(&mut lab.redis().await)
            .await
            .unwrap();
        results.push(json!({
            "setting": setting.name,
            "description": setting.what,
            "redis_us_per_cold_lookup": round(lookup_us),
            "writer": {
                "commits_per_s_no_triggers": bare_rate.round(),
                "commits_per_s_with_triggers": rate.round(),
                "ratio": round(ratio),
            },
            "latency": latencies,
            "synchronous_commit_off": {
                "commits_per_s_no_triggers": bare_sync_off.round(),
                "commits_per_s": max_rate.round(),
                "lag": max_lags,
            },
            "bulk_100k": bulk_small,
            "bulk_1m": bulk_large,
            "big_tag": tag,
            "backlog": drain,
            "daemon": {
                "rss_idle_mb": round(idle_kb as f64 / 1024.0),
                "rss_peak_mb_load": round(peak_kb as f64 / 1024.0),
                "rss_peak_mb_with_bulk": round(peak_after_bulk_kb as f64 / 1024.0),
                "cpu_s_per_100k_events": round((cpu_after - cpu_before) / events as f64 * 100_000.0),
            },
        }));
    }
    let report = json!({
        "commit": commit,
        "machine": format!("{} cores, {}", std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
            std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default().lines()
                .find(|l| l.starts_with("model name")).and_then(|l| l.split(':').nth(1)).unwrap_or("").trim()),
        "quick": quick,
        "products": products,
        "results": results,
    });
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("target/evictd-bench.json");
    std::fs::write(&path, serde_json::to_string_pretty(&report).unwrap()).unwrap();
    print_table(&report);
    eprintln!("\nwrote {}", path.display());
}

fn print_table(report: &Value) {
    println!(
        "\nevictd benchmark — commit {}, {}",
        report["commit"].as_str().unwrap_or(""),
        report["machine"].as_str().unwrap_or("")
    );
    for r in report["results"].as_array().unwrap() {
        println!(
            "\n== {} ({}) — machine speed: {} µs per Redis lookup of a cold key",
            r["setting"].as_str().unwrap(),
            r["description"].as_str().unwrap(),
            r["redis_us_per_cold_lookup"]
        );
        let w = &r["writer"];
        println!(
            "  writers (4 clients, single-row UPDATE): {} commits/s vs {} without triggers = {:.0}%",
            w["commits_per_s_with_triggers"],
            w["commits_per_s_no_triggers"],
            w["ratio"].as_f64().unwrap_or(0.0) * 100.0
        );
        for rate in ["500", "2000"] {
            let l = &r["latency"][rate];
            println!(
                "  latency @{rate}/s (achieved {}): p50 {} ms, p90 {} ms, p99 {} ms, max {} ms, missing {}",
                l["achieved_per_s"],
                l["lag"]["p50_ms"],
                l["lag"]["p90_ms"],
                l["lag"]["p99_ms"],
                l["lag"]["max_ms"],
                l["lag"]["missing"]
            );
        }
        let s = &r["synchronous_commit_off"];
        println!(
            "  synchronous_commit=off: {} commits/s (bare {}), lag p50 {} ms, p99 {} ms, max {} ms, {}",
            s["commits_per_s"],
            s["commits_per_s_no_triggers"],
            s["lag"]["p50_ms"],
            s["lag"]["p99_ms"],
            s["lag"]["max_ms"],
            trend(&s["lag"])
        );
        for key in ["bulk_100k", "bulk_1m"] {
            let b = &r[key];
            if b.is_null() {
                continue;
            }
            println!(
                "  UPDATE {} rows: {} s bare, {} s with triggers (+{}%), {} events, first / last key gone {} / {} s after commit, precise: {}{}",
                b["rows"],
                b["statement_s_bare"],
                b["statement_s_with_triggers"],
                b["overhead_pct"],
                b["events"],
                b["commit_to_first_key_gone_s"],
                b["commit_to_last_key_gone_s"],
                b["precise"],
                match (
                    &b["runs_commit_to_last_key_gone_s"],
                    &b["runs_statement_s_bare"]
                ) {
                    (Value::Array(gone), Value::Array(bare)) => format!(
                        " (median of {}: gone {}; bare {})",
                        gone.len(),
                        join_values(gone),
                        join_values(bare)
                    ),
                    _ => String::new(),
                }
            );
        }
        let t = &r["big_tag"];
        println!(
            "  tag of {} members: {} s, worst PING meanwhile {} ms, longest Redis command {} ms ({} over 1 ms): {}",
            t["members"],
            t["total_s"],
            t["worst_ping_ms"],
            t["longest_command_ms"],
            t["commands_over_1ms"],
            t["longest_command"].as_str().unwrap_or("")
        );
        if !r["backlog"].is_null() {
            let b = &r["backlog"];
            println!(
                "  backlog of {} events drained in {} s = {} events/s (peak RSS {} MB, {} CPU s per 100k)",
                b["events"],
                b["drain_s"],
                b["events_per_s"],
                b["daemon_peak_rss_mb"],
                b["cpu_s_per_100k_events"]
            );
        }
        let d = &r["daemon"];
        println!(
            "  daemon: RSS idle {} MB, peak {} MB under load, {} MB with bulk; {} CPU s per 100k events",
            d["rss_idle_mb"],
            d["rss_peak_mb_load"],
            d["rss_peak_mb_with_bulk"],
            d["cpu_s_per_100k_events"]
        );
    }
}
