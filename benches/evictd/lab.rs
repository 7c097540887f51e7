//! The laboratory: the throwaway servers, a database per setting, the daemon as a child
//! process, the cache entries the phases watch and the deletions Redis announces.

use super::*;

pub(crate) struct Lab {
    pub(crate) pg: Postgres,
    pub(crate) redis: Redis,
    /// When set, the daemons' Redis: a cluster's `redis+cluster://` URL (`--cluster`).
    pub(crate) cluster_url: Option<String>,
    pub(crate) quick: bool,
    /// `--placement`'s CPU sets (`None`: everything shares every CPU).
    pub(crate) placement: Option<Placement>,
    /// Products seeded (every one exists, so every UPDATE writes).
    pub(crate) products: usize,
    pub(crate) dir: tempfile::TempDir,
}

impl Lab {
    pub(crate) fn phase(&self) -> Duration {
        if self.quick {
            Duration::from_secs(2)
        } else {
            Duration::from_secs(5)
        }
    }

    pub(crate) fn url(&self, db: &str) -> String {
        self.pg.url(db)
    }

    pub(crate) async fn client(&self, db: &str) -> tokio_postgres::Client {
        let (client, conn) = tokio_postgres::connect(&self.url(db), tokio_postgres::NoTls)
            .await
            .unwrap();
        tokio::spawn(conn);
        client
    }

    pub(crate) async fn redis(&self) -> redis::aio::MultiplexedConnection {
        connect_redis(&self.redis).await
    }

    pub(crate) fn evictd(
        &self,
        db: &str,
        setting: &Setting,
        args: &[&str],
    ) -> std::process::Command {
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
            .env(
                "REDIS_URL",
                self.cluster_url.clone().unwrap_or_else(|| self.redis.url()),
            )
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

    pub(crate) async fn start_daemon(&self, db: &str, setting: &Setting) -> Daemon {
        if setting.delivery == PEER {
            let peer = self.spawn(self.peer(db));
            peer.wait_log("peer is ready").await;
            return peer;
        }
        let daemon = self.spawn(self.evictd(db, setting, &["run", "--http-addr", "127.0.0.1:0"]));
        daemon.wait_ready().await;
        daemon
    }

    /// Starts `command`, on the daemon's CPUs under `--placement` (every thread it has by
    /// then; those it starts later inherit the set).
    pub(crate) fn spawn(&self, command: std::process::Command) -> Daemon {
        let daemon = Daemon::spawn(command);
        if let Some(p) = &self.placement {
            pin_tree(daemon.child.id(), &p.daemon);
        }
        daemon
    }

    /// The peer's listener (`benches/peer/listener.mjs`) on database `db`, its packages
    /// installed by `npm ci` the first time.
    fn peer(&self, db: &str) -> std::process::Command {
        let folder = support::repo_file("benches/peer");
        if !folder.join("node_modules").exists() {
            let installed = std::process::Command::new("npm")
                .args(["ci", "--no-audit", "--no-fund", "--silent"])
                .current_dir(&folder)
                .status()
                .expect("npm (apt-get install npm) for the peer listener");
            assert!(installed.success(), "npm ci in benches/peer failed");
        }
        let mut command = std::process::Command::new("node");
        command
            .arg(folder.join("listener.mjs"))
            .env("DATABASE_URL", self.url(db))
            .env("REDIS_URL", self.redis.url())
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped());
        command
    }

    /// A database with the example schema and PRODUCTS products, evictd (or the peer) installed
    /// per `setting`.
    pub(crate) async fn database(&self, name: &str, setting: Option<&Setting>) {
        let admin = self.client("postgres").await;
        admin
            .batch_execute(&format!("DROP DATABASE IF EXISTS {name}"))
            .await
            .unwrap();
        admin
            .batch_execute(&format!("CREATE DATABASE {name} TEMPLATE bench_template"))
            .await
            .unwrap();
        match setting {
            Some(setting) if setting.delivery == PEER => {
                self.pg
                    .psql(
                        name,
                        &[
                            "-f",
                            &support::repo_file("benches/peer/peer.sql")
                                .display()
                                .to_string(),
                        ],
                    )
                    .unwrap();
            }
            Some(setting) => {
                let output = support::finish(self.evictd(name, setting, &["migrate"]));
                assert!(output.status.success(), "{}", support::text(&output));
            }
            None => {}
        }
    }
}

/// A connection to `server` (no [`Lab`] needed: `--speed` starts only Redis).
pub(crate) async fn connect_redis(server: &Redis) -> redis::aio::MultiplexedConnection {
    redis::Client::open(server.url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap()
}

/// Turns Redis keyspace notifications on (for per-commit latency) or off (for bulk phases,
/// where publishing a notification per deleted key would slow Redis down and skew the figure).
pub(crate) async fn keyspace_events(lab: &Lab, on: bool) {
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
pub(crate) struct Deletions {
    pub(crate) seen: Arc<Mutex<HashMap<String, Instant>>>,
    pub(crate) count: Arc<std::sync::atomic::AtomicU64>,
}

impl Deletions {
    pub(crate) async fn subscribe(lab: &Lab) -> Deletions {
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

    pub(crate) async fn clear(&self) {
        self.seen.lock().await.clear();
        self.count.store(0, std::sync::atomic::Ordering::Relaxed);
    }

    pub(crate) fn count(&self) -> u64 {
        self.count.load(std::sync::atomic::Ordering::Relaxed)
    }

    pub(crate) async fn wait_count(&self, n: u64, limit: Duration) -> Option<Instant> {
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
pub(crate) async fn cache_entries(lab: &Lab, range: std::ops::Range<usize>) {
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

/// Lets the server settle before a phase that measures Redis or the drain rather than the
/// writers: vacuums what the previous phases left (so autovacuum does not start in the middle
/// of the measurement), checkpoints, and waits for any autovacuum worker still running. On
/// these 2 cores a vacuum of a million-row table meanwhile deschedules Redis mid-command,
/// which SLOWLOG then counts as the command's own time.
pub(crate) async fn settle(lab: &Lab, db: &str) {
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
pub(crate) async fn drop_database(lab: &Lab, db: &str) {
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
