//! Test support: real PostgreSQL and Redis servers shared by the tests of one binary, a fresh
//! database and key prefix per test, the daemon as a real child process, and waits on events
//! (a key disappearing, a log line) with deadlines instead of sleeps.
//!
//! Missing server binaries fail the test with a message saying what to install.

#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use evictd::config::{Delivery, Overrides, Settings};
use evictd::sink::RedisConn;
use evictd::throwaway::{Postgres, Redis};
use redis::AsyncCommands;
use redis::aio::ConnectionManager;

pub const EXAMPLE_SCHEMA: &str = include_str!("../../sql/example-schema.sql");

/// How long any wait in a test may take before it fails.
pub const DEADLINE: Duration = Duration::from_secs(30);

pub struct Servers {
    pub pg: Postgres,
    pub redis: Redis,
}

/// The servers shared by every test of this binary, started on first use.
pub fn servers() -> &'static Servers {
    static SERVERS: OnceLock<Servers> = OnceLock::new();
    SERVERS.get_or_init(|| {
        let pg = Postgres::start().unwrap_or_else(|e| panic!("cannot start PostgreSQL: {e:#}"));
        let redis = Redis::start().unwrap_or_else(|e| panic!("cannot start Redis: {e:#}"));
        pg.psql("postgres", &["-c", "CREATE DATABASE evictd_template"])
            .expect("create template database");
        pg.psql("evictd_template", &["-c", EXAMPLE_SCHEMA])
            .expect("load example schema");
        Servers { pg, redis }
    })
}

static NEXT: AtomicU32 = AtomicU32::new(1);

/// One test's world: its own database (a copy of the example schema), its own key prefix.
pub struct Env {
    pub name: String,
    pub db_url: String,
    pub redis_url: String,
    pub prefix: String,
    pub delivery: Delivery,
    pub pg: tokio_postgres::Client,
    /// Reconnects by itself after a Redis restart (a cluster's follows its slots).
    pub redis: RedisConn,
    /// Extra TOML for the configuration file (tables, tuning).
    pub config_toml: String,
    pub config_path: PathBuf,
    /// Servers of this test alone (fault tests kill and restart them); `None` for the shared ones.
    pub own: Option<Servers>,
}

/// The test's configuration file goes with it (its database goes with the shared server).
impl Drop for Env {
    fn drop(&mut self) {
        std::fs::remove_file(&self.config_path).ok();
    }
}

impl Env {
    /// A fresh database with the example schema and evictd installed with `delivery`.
    pub async fn new(delivery: Delivery) -> Env {
        Self::with_config(delivery, "").await
    }

    /// Like [`Env::new`], with `toml` as the configuration file (its `[[tables]]`, if any,
    /// replace the defaults). `{prefix}` in it is replaced by the test's key prefix.
    pub async fn with_config(delivery: Delivery, toml: &str) -> Env {
        let env = Self::bare(delivery, toml).await;
        env.migrate().await;
        env
    }

    /// A fresh database with the example schema, without evictd installed.
    pub async fn bare(delivery: Delivery, toml: &str) -> Env {
        Self::build(delivery, toml, None).await
    }

    /// Like [`Env::with_config`] on servers of its own, which the test may kill and restart.
    /// `redis_args` go to `redis-server` (e.g. persistence for restart tests).
    pub async fn isolated(delivery: Delivery, toml: &str, redis_args: &[&str]) -> Env {
        let pg = Postgres::start().unwrap_or_else(|e| panic!("cannot start PostgreSQL: {e:#}"));
        let redis =
            Redis::start_with(redis_args).unwrap_or_else(|e| panic!("cannot start Redis: {e:#}"));
        pg.psql("postgres", &["-c", "CREATE DATABASE evictd_template"])
            .expect("create template database");
        pg.psql("evictd_template", &["-c", EXAMPLE_SCHEMA])
            .expect("load example schema");
        let env = Self::build(delivery, toml, Some(Servers { pg, redis })).await;
        env.migrate().await;
        env
    }

    async fn build(delivery: Delivery, toml: &str, own: Option<Servers>) -> Env {
        let servers: &Servers = match &own {
            Some(own) => own,
            None => servers(),
        };
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let name = format!("t{}_{n}", std::process::id());
        {
            static CREATE: Mutex<()> = Mutex::new(());
            let _serial = CREATE.lock().unwrap_or_else(|e| e.into_inner());
            servers
                .pg
                .psql(
                    "postgres",
                    &[
                        "-c",
                        &format!("CREATE DATABASE {name} TEMPLATE evictd_template"),
                    ],
                )
                .expect("create test database");
        }
        let db_url = servers.pg.url(&name);
        let prefix = format!("{name}:");
        let (pg, conn) = tokio_postgres::connect(&db_url, tokio_postgres::NoTls)
            .await
            .expect("connect to test database");
        tokio::spawn(conn);
        let redis_url = servers.redis.url();
        let redis = RedisConn::Single(
            ConnectionManager::new_with_config(
                redis::Client::open(redis_url.clone()).unwrap(),
                redis::aio::ConnectionManagerConfig::new()
                    .set_response_timeout(Some(Duration::from_secs(20))),
            )
            .await
            .expect("connect to redis"),
        );
        let config_toml = toml.replace("{prefix}", &prefix);
        let config_path = std::env::temp_dir().join(format!("evictd-test-{name}.toml"));
        std::fs::write(&config_path, &config_toml).expect("write config");
        Env {
            name,
            db_url,
            redis_url,
            prefix,
            delivery,
            pg,
            redis,
            config_toml,
            config_path,
            own,
        }
    }

    /// The settings the daemon of this test runs with.
    pub fn settings(&self) -> Settings {
        Settings::load(&Overrides {
            config: Some(self.config_path.clone()),
            database_url: Some(self.db_url.clone()),
            redis_url: Some(self.redis_url.clone()),
            key_prefix: Some(self.prefix.clone()),
            delivery: Some(self.delivery),
            ..Overrides::default()
        })
        .expect("test settings")
    }

    pub async fn migrate(&self) {
        let mut conn = evictd::db::connect(&self.db_url, None, None)
            .await
            .expect("connect");
        evictd::schema::migrate(&mut conn.client, &self.settings())
            .await
            .expect("migrate");
    }

    /// The `evictd` binary with this test's URLs, prefix and config (in the environment, so
    /// that flags given in `args` override them).
    pub fn command(&self, args: &[&str]) -> Command {
        let mut command = Command::new(env!("CARGO_BIN_EXE_evictd"));
        command
            .args(args)
            .env("EVICTD_CONFIG", &self.config_path)
            .env("DATABASE_URL", &self.db_url)
            .env("REDIS_URL", &self.redis_url)
            .env("EVICTD_KEY_PREFIX", &self.prefix)
            .env("EVICTD_DELIVERY", self.delivery.as_str());
        command
    }

    /// Starts the daemon and waits until it reports ready.
    pub async fn start_daemon(&self) -> Daemon {
        let daemon = self.spawn_daemon(&[]);
        daemon.wait_ready().await;
        daemon
    }

    /// Starts the daemon without waiting.
    pub fn spawn_daemon(&self, extra: &[&str]) -> Daemon {
        let mut command = self.command(&["run", "--http-addr", "127.0.0.1:0"]);
        command
            .args(extra)
            .env("EVICTD_LOG", "evictd=debug,info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        Daemon::spawn(command)
    }

    /// Writes a cache entry `{prefix}{key}` tagged with `tags`, as the application does.
    pub async fn cache(&self, key: &str, tags: &[&str]) -> String {
        let full = format!("{}{key}", self.prefix);
        let mut cmds = vec![redis::cmd("SET")];
        cmds[0].arg(&full).arg("cached").arg("EX").arg(600);
        for tag in tags {
            let mut sadd = redis::cmd("SADD");
            sadd.arg(format!("{}tag:{tag}", self.prefix)).arg(&full);
            cmds.push(sadd);
        }
        // Retried while Redis restarts, as `exists` is: one server runs it as a transaction (so
        // at most once); a cluster runs none across slots, so the entry goes first, then its
        // memberships (idempotent).
        let start = Instant::now();
        loop {
            let mut conn = self.redis.clone();
            let written = if conn.is_cluster() {
                conn.each::<redis::Value>(cmds.clone()).await.map(drop)
            } else {
                let mut pipe = redis::pipe();
                pipe.atomic();
                for cmd in &cmds {
                    pipe.add_command(cmd.clone()).ignore();
                }
                pipe.query_async::<()>(&mut conn).await
            };
            match written {
                Ok(()) => return full,
                Err(e) => {
                    assert!(start.elapsed() < DEADLINE, "write cache entry: {e}");
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
        }
    }

    /// Whether `full_key` exists. Retries while Redis restarts (the first command on a dropped
    /// connection fails; the connection manager reconnects behind it).
    pub async fn exists(&self, full_key: &str) -> bool {
        let start = Instant::now();
        loop {
            match self.redis.clone().exists::<_, u64>(full_key).await {
                Ok(n) => return n == 1,
                Err(e) => {
                    assert!(start.elapsed() < DEADLINE, "EXISTS: {e}");
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
        }
    }

    /// How many of `keys` exist, asked in chunks so Redis is never blocked for long. Retries
    /// while the connection is re-established (a restart, a cut connection).
    pub async fn count_existing(&self, keys: &[String]) -> u64 {
        let mut total = 0;
        for chunk in keys.chunks(20_000) {
            let start = Instant::now();
            total += loop {
                match self.redis.clone().exists::<_, u64>(chunk).await {
                    Ok(n) => break n,
                    Err(e) => {
                        assert!(start.elapsed() < DEADLINE, "EXISTS: {e}");
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                }
            };
        }
        total
    }

    /// Waits until every key in `keys` is gone; fails naming those still there.
    pub async fn wait_gone(&self, keys: &[String]) {
        let start = Instant::now();
        loop {
            let mut left = Vec::new();
            for key in keys {
                if self.exists(key).await {
                    left.push(key.clone());
                }
            }
            if left.is_empty() {
                return;
            }
            assert!(
                start.elapsed() < DEADLINE,
                "still cached after {DEADLINE:?}: {left:?}"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    pub async fn assert_present(&self, keys: &[String]) {
        for key in keys {
            assert!(
                self.exists(key).await,
                "{key} was removed but should have stayed"
            );
        }
    }

    /// Returns once the daemon has processed everything committed before this call: commits an
    /// explicit invalidation of a marker tag and waits for its entry to go (events are handled in
    /// commit order), twice. The first marker may share a batch with the events before it, and
    /// a batch removes exact tags before table-wide globs; the second marker comes in a later
    /// batch, and batches run one after the other.
    pub async fn barrier(&self) {
        for _ in 0..2 {
            let n = NEXT.fetch_add(1, Ordering::Relaxed);
            let tag = format!("barrier:{n}");
            let key = self.cache(&format!("barrier-entry:{n}"), &[&tag]).await;
            self.sql(&format!("SELECT evictd.invalidate_tags('{tag}')"))
                .await;
            self.wait_gone(&[key]).await;
        }
    }

    /// A connection of its own LISTENing on the default channel: what it hears arrives on
    /// `payloads`.
    pub async fn listen(&self) -> Listener {
        listen(&self.db_url).await
    }

    pub async fn sql(&self, sql: &str) {
        self.pg
            .batch_execute(sql)
            .await
            .unwrap_or_else(|e| match e.as_db_error() {
                Some(db) => panic!("{sql}: {db}"),
                None => panic!("{sql}: {e}"),
            });
    }

    /// Runs psql against this test's database (a file or commands), as an operator would.
    pub fn psql(&self, args: &[&str]) -> String {
        self.pg_server().psql(&self.name, args).expect("psql")
    }

    pub fn pg_server(&self) -> &Postgres {
        match &self.own {
            Some(own) => &own.pg,
            None => &servers().pg,
        }
    }

    /// The servers of an isolated test, to kill and restart.
    pub fn own(&mut self) -> &mut Servers {
        self.own.as_mut().expect("an Env::isolated test")
    }

    /// A new client connection (after the server restarted, or for a second session).
    pub async fn connect_pg(&self) -> tokio_postgres::Client {
        let start = Instant::now();
        loop {
            match tokio_postgres::connect(&self.db_url, tokio_postgres::NoTls).await {
                Ok((client, conn)) => {
                    tokio::spawn(conn);
                    return client;
                }
                Err(e) => {
                    assert!(start.elapsed() < DEADLINE, "cannot reconnect: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    }

    /// Replaces `self.pg` with a fresh connection.
    pub async fn reconnect_pg(&mut self) {
        self.pg = self.connect_pg().await;
    }

    /// Events queued in the outbox (claimed but unacknowledged ones included).
    pub async fn outbox_len(&self) -> i64 {
        self.pg
            .query_one("SELECT count(*) FROM evictd.outbox", &[])
            .await
            .expect("count the outbox")
            .get(0)
    }

    /// Waits until the outbox is empty: acknowledgements follow Redis' confirmation, so an
    /// entry can be gone a moment before its outbox row is deleted.
    pub async fn wait_outbox_empty(&self) {
        let start = Instant::now();
        loop {
            let left = self.outbox_len().await;
            if left == 0 {
                return;
            }
            assert!(
                start.elapsed() < DEADLINE,
                "{left} events still in the outbox"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// The key evictd signs NOTIFY payloads and logical messages with, read as the owner.
    pub async fn signing_key(&self) -> evictd::core::signature::SigningKey {
        let row = self
            .pg
            .query_one("SELECT key FROM evictd.signing_key", &[])
            .await
            .expect("read the signing key");
        evictd::core::signature::SigningKey::new(row.get::<_, &[u8]>(0))
    }

    /// Caches one entry per tag of `universe`, runs `sql`, and checks that exactly the entries
    /// of the tags in `gone` went.
    pub async fn check_gone(&self, universe: &[&str], sql: &str, gone: &[&str]) {
        let mut entries = Vec::new();
        for tag in universe {
            entries.push((*tag, self.cache(&format!("entry:{tag}"), &[tag]).await));
        }
        self.sql(sql).await;
        self.barrier().await;
        let mut wrong = Vec::new();
        for (tag, key) in &entries {
            let removed = !self.exists(key).await;
            if removed != gone.contains(tag) {
                wrong.push(format!(
                    "{tag}: {}",
                    if removed { "removed" } else { "kept" }
                ));
            }
        }
        assert!(wrong.is_empty(), "after `{sql}`:\n  {}", wrong.join("\n  "));
    }

    /// All keys under this test's prefix.
    pub async fn keys(&self) -> Vec<String> {
        let mut conn = self.redis.clone();
        let mut keys: Vec<String> = Vec::new();
        let mut iter: redis::AsyncIter<String> = conn
            .scan_match(format!("{}*", self.prefix))
            .await
            .expect("SCAN");
        while let Some(k) = iter.next_item().await {
            keys.push(k.expect("scan item"));
        }
        keys.sort();
        keys.dedup();
        keys
    }
}

/// A connection of its own to `db_url` LISTENing on the default channel: what it hears arrives
/// on `payloads`.
pub async fn listen(db_url: &str) -> Listener {
    use futures_util::StreamExt as _;
    let (client, mut connection) = tokio_postgres::connect(db_url, tokio_postgres::NoTls)
        .await
        .expect("listener connection");
    let (tx, payloads) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        let mut stream = futures_util::stream::poll_fn(move |cx| connection.poll_message(cx));
        while let Some(Ok(message)) = stream.next().await {
            if let tokio_postgres::AsyncMessage::Notification(n) = message {
                let _ = tx.send(n.payload().to_string());
            }
        }
    });
    client
        .batch_execute("LISTEN cache_invalidation")
        .await
        .expect("LISTEN");
    Listener { client, payloads }
}

/// See [`listen`].
pub struct Listener {
    pub client: tokio_postgres::Client,
    pub payloads: tokio::sync::mpsc::UnboundedReceiver<String>,
}

pub struct Daemon {
    pub child: Child,
    log: Arc<Mutex<String>>,
}

impl Daemon {
    pub fn spawn(mut command: Command) -> Daemon {
        use std::os::unix::process::CommandExt as _;
        // SAFETY: prctl is async-signal-safe. The daemon dies with the test thread that
        // started it, even if the test process is killed.
        unsafe {
            command.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            });
        }
        let mut child = command.spawn().expect("spawn evictd");
        let stderr = child.stderr.take().expect("stderr");
        let log = Arc::new(Mutex::new(String::new()));
        let sink = log.clone();
        std::thread::spawn(move || {
            let reader = BufReader::new(stderr);
            for line in reader.lines().map_while(Result::ok) {
                if std::env::var_os("EVICTD_TEST_ECHO").is_some() {
                    eprintln!("[evictd] {line}");
                }
                let mut log = sink.lock().unwrap_or_else(|e| e.into_inner());
                log.push_str(&line);
                log.push('\n');
            }
        });
        Daemon { child, log }
    }

    pub fn log(&self) -> String {
        self.log.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Waits until the log has a line containing `needle` (counting from the start).
    pub async fn wait_log(&self, needle: &str) {
        self.wait_log_count(needle, 1).await;
    }

    /// Waits until `needle` has appeared `count` times in the log.
    pub async fn wait_log_count(&self, needle: &str, count: usize) {
        self.wait_log_within(needle, count, DEADLINE).await;
    }

    /// Like [`Daemon::wait_log_count`] with a deadline of `limit`.
    pub async fn wait_log_within(&self, needle: &str, count: usize, limit: Duration) {
        let start = Instant::now();
        loop {
            let log = self.log();
            if log.matches(needle).count() >= count {
                return;
            }
            assert!(
                start.elapsed() < limit,
                "no `{needle}` (x{count}) in the daemon log after {limit:?}:\n{log}"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    pub async fn wait_ready(&self) {
        self.wait_log("evictd is ready").await;
    }

    /// The HTTP address the daemon bound (from its start-up line).
    pub fn http_addr(&self) -> String {
        let log = self.log();
        log.lines()
            .find_map(|l| l.split("http=").nth(1))
            .and_then(|rest| rest.split_whitespace().next())
            .expect("http address in log")
            .to_string()
    }

    pub fn kill9(&mut self) {
        self.child.kill().ok();
        self.child.wait().ok();
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.kill9();
        // A failing test shows what the daemon said, to tell a bug from a reconnect.
        if std::thread::panicking() {
            let log = self.log();
            let lines: Vec<&str> = log.lines().collect();
            eprintln!(
                "--- evictd log (last 40 lines) ---\n{}",
                lines[lines.len().saturating_sub(40)..].join("\n")
            );
        }
    }
}

/// The peak resident memory (VmHWM) of process `pid`, in MB.
pub fn process_peak_mb(pid: u32) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse::<f64>().ok())
        .map_or(0.0, |kb| kb / 1024.0)
}

/// Path of a file in the repository.
pub fn repo_file(relative: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(relative)
}

/// `GET path` on `addr` with a bare HTTP/1.0 request; returns (status, body).
pub fn http_get(addr: &str, path: &str) -> (u16, String) {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(addr).expect("connect to the http endpoint");
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    write!(stream, "GET {path} HTTP/1.0\r\nHost: x\r\n\r\n").expect("request");
    let mut response = String::new();
    stream.read_to_string(&mut response).expect("response");
    let status = response
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .expect("status code");
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (status, body)
}

/// Runs `command` to completion, failing the test if it is still running at the deadline.
pub fn finish(mut command: Command) -> std::process::Output {
    let mut child = command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn evictd");
    let start = Instant::now();
    while child.try_wait().expect("wait").is_none() {
        if start.elapsed() > DEADLINE {
            child.kill().ok();
            let output = child.wait_with_output().expect("output");
            panic!(
                "evictd still running after {DEADLINE:?}: {}",
                String::from_utf8_lossy(&output.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.wait_with_output().expect("output")
}

/// Standard output and error together, for assertions on what a command said.
pub fn text(output: &std::process::Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

impl Env {
    /// Runs an evictd command with this test's settings to completion.
    pub fn run_cli(&self, args: &[&str]) -> std::process::Output {
        finish(self.command(args))
    }
}

/// `evictd invalidate` of a small tag, one past `drain_chunk` (detached, then drained in
/// chunks), a tag key of the wrong type and a tag without entries: the running totals `stats`
/// reports grow by exactly one invalidation, three tags and every entry removed.
pub async fn assert_totals_count_exactly(env: &Env) {
    for i in 0..3 {
        env.cache(&format!("totals:small:{i}"), &["totals:small"])
            .await;
    }
    for i in 0..600 {
        env.cache(&format!("totals:big:{i}"), &["totals:big"]).await;
    }
    let mut conn = env.redis.clone();
    let () = conn
        .set(format!("{}tag:totals:wrong", env.prefix), "not a set")
        .await
        .unwrap();
    let stats = format!("{}evictd:stats", env.prefix);
    let before: std::collections::HashMap<String, i64> = conn.hgetall(&stats).await.unwrap();
    let output = env.run_cli(&[
        "invalidate",
        "totals:small",
        "totals:big",
        "totals:wrong",
        "totals:none",
    ]);
    assert!(output.status.success(), "{}", text(&output));
    let after: std::collections::HashMap<String, i64> = conn.hgetall(&stats).await.unwrap();
    let grew = |field: &str| after.get(field).unwrap_or(&0) - before.get(field).unwrap_or(&0);
    assert_eq!(
        (grew("invalidations"), grew("tags"), grew("keys")),
        (1, 3, 603),
        "{before:?} → {after:?}"
    );
}
