//! Liveness means the daemon's loops make progress; readiness means its servers answer. Under a
//! fake systemd (a NOTIFY_SOCKET of the test's own): the watchdog is fed through a minute
//! without Redis and a minute without PostgreSQL, start-up work extends the start timeout, and
//! a loop stalled by the test-only fault hook fails `/healthz` and starves the watchdog.

mod support;

use std::os::unix::net::UnixDatagram;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use evictd::config::{Delivery, STALL_ON_TAG_ENV};
use support::{DEADLINE, Daemon, Env};

/// How long each outage lasts.
const OUTAGE: Duration = Duration::from_secs(60);
/// The watchdog period the fake systemd asks for (the daemon pings at least twice per period).
const WATCHDOG_PERIOD: Duration = Duration::from_secs(2);

/// What the daemon tells systemd, with the time each message arrived.
struct FakeSystemd {
    _dir: tempfile::TempDir,
    path: PathBuf,
    messages: Arc<Mutex<Vec<(Instant, String)>>>,
}

impl FakeSystemd {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify.sock");
        let socket = UnixDatagram::bind(&path).unwrap();
        let messages = Arc::new(Mutex::new(Vec::new()));
        let sink = messages.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 512];
            while let Ok(n) = socket.recv(&mut buf) {
                let text = String::from_utf8_lossy(&buf[..n]).to_string();
                sink.lock().unwrap().push((Instant::now(), text));
            }
        });
        Self {
            _dir: dir,
            path,
            messages,
        }
    }

    /// The daemon of `env` under this systemd, with a watchdog of [`WATCHDOG_PERIOD`].
    fn spawn(&self, env: &Env, extra_env: &[(&str, &str)]) -> Daemon {
        let mut command = env.command(&["run", "--http-addr", "127.0.0.1:0"]);
        command
            .env("NOTIFY_SOCKET", &self.path)
            .env("WATCHDOG_USEC", WATCHDOG_PERIOD.as_micros().to_string())
            .env("EVICTD_LOG", "evictd=debug,info")
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped());
        for (name, value) in extra_env {
            command.env(name, value);
        }
        Daemon::spawn(command)
    }

    /// When each message containing `needle` arrived.
    fn times(&self, needle: &str) -> Vec<Instant> {
        self.messages
            .lock()
            .unwrap()
            .iter()
            .filter(|(_, m)| m.contains(needle))
            .map(|(at, _)| *at)
            .collect()
    }

    async fn wait_for(&self, needle: &str) -> Instant {
        let start = Instant::now();
        loop {
            if let Some(at) = self.times(needle).first() {
                return *at;
            }
            assert!(
                start.elapsed() < DEADLINE,
                "no {needle} within {DEADLINE:?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The longest gap between two WATCHDOG=1 pings (or the window's edges) within `from..to`.
    fn longest_watchdog_gap(&self, from: Instant, to: Instant) -> Duration {
        let mut previous = from;
        let mut longest = Duration::ZERO;
        for at in self
            .times("WATCHDOG=1")
            .into_iter()
            .filter(|at| *at > from && *at < to)
        {
            longest = longest.max(at - previous);
            previous = at;
        }
        longest.max(to - previous)
    }
}

/// `/healthz` answers 200 every second for `OUTAGE`, and the watchdog is pinged at least once
/// per period all along.
async fn alive_through_the_outage(systemd: &FakeSystemd, daemon: &Daemon) {
    let from = Instant::now();
    while from.elapsed() < OUTAGE {
        let (status, body) = support::http_get(&daemon.http_addr(), "/healthz");
        assert_eq!(status, 200, "/healthz during the outage: {body}");
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    let gap = systemd.longest_watchdog_gap(from, Instant::now());
    assert!(
        gap < WATCHDOG_PERIOD,
        "no WATCHDOG=1 for {gap:?} during the outage (period {WATCHDOG_PERIOD:?}): systemd \
         would have killed the daemon"
    );
}

async fn invalidation_works(env: &Env) {
    let key = env.cache("after", &["health:after"]).await;
    env.sql("SELECT evictd.invalidate_tags('health:after')")
        .await;
    env.wait_gone(&[key]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_watchdog_is_fed_through_a_minute_without_redis() {
    let mut env = Env::isolated(Delivery::Outbox, "health_interval_ms = 500\n", &[]).await;
    let systemd = FakeSystemd::new();
    let daemon = systemd.spawn(&env, &[]);
    systemd.wait_for("READY=1").await;
    env.own().redis.kill9().unwrap();
    daemon.wait_log("redis does not answer a ping").await;
    // A change waiting for Redis: its claim fails and is retried through the outage.
    env.sql("SELECT evictd.invalidate_tags('health:during')")
        .await;
    daemon.wait_log("not serving; retrying").await;
    alive_through_the_outage(&systemd, &daemon).await;
    env.own().redis.restart().unwrap();
    daemon.wait_log_count("evictd is ready", 2).await;
    invalidation_works(&env).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_watchdog_is_fed_through_a_minute_without_postgres() {
    let mut env = Env::isolated(Delivery::Outbox, "health_interval_ms = 500\n", &[]).await;
    let systemd = FakeSystemd::new();
    let daemon = systemd.spawn(&env, &[]);
    systemd.wait_for("READY=1").await;
    env.own().pg.kill9().unwrap();
    daemon.wait_log("not serving; retrying").await;
    alive_through_the_outage(&systemd, &daemon).await;
    env.own().pg.restart().unwrap();
    env.reconnect_pg().await;
    daemon.wait_log_count("evictd is ready", 2).await;
    invalidation_works(&env).await;
}

/// Before the first READY=1, whatever keeps start-up going (here PostgreSQL is not there yet)
/// extends systemd's start timeout, by more than the liveness timeout each time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn start_up_work_extends_the_start_timeout() {
    let mut env = Env::isolated(Delivery::Outbox, "", &[]).await;
    env.own().pg.stop_fast().unwrap();
    let systemd = FakeSystemd::new();
    let daemon = systemd.spawn(&env, &[]);
    daemon.wait_log("not serving; retrying").await;
    let start = Instant::now();
    while systemd.times("EXTEND_TIMEOUT_USEC=").len() < 3 {
        assert!(
            start.elapsed() < DEADLINE,
            "no EXTEND_TIMEOUT_USEC while starting"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(systemd.times("READY=1").is_empty());
    let extension: u64 = {
        let messages = systemd.messages.lock().unwrap();
        let (_, message) = messages
            .iter()
            .find(|(_, m)| m.contains("EXTEND_TIMEOUT_USEC="))
            .unwrap();
        message
            .trim()
            .trim_start_matches("EXTEND_TIMEOUT_USEC=")
            .parse()
            .unwrap()
    };
    assert!(extension > 60_000_000, "extended by {extension} µs only");
    env.own().pg.restart().unwrap();
    let ready_at = systemd.wait_for("READY=1").await;
    // Once started, no more extensions: systemd's start timeout is over.
    daemon.wait_log("evictd is ready").await;
    let watchdog_after = loop {
        if let Some(at) = systemd
            .times("WATCHDOG=1")
            .into_iter()
            .find(|at| *at > ready_at + WATCHDOG_PERIOD)
        {
            break at;
        }
        assert!(ready_at.elapsed() < DEADLINE, "no WATCHDOG=1 after READY=1");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let late: Vec<Instant> = systemd
        .times("EXTEND_TIMEOUT_USEC=")
        .into_iter()
        .filter(|at| *at > ready_at + WATCHDOG_PERIOD && *at <= watchdog_after)
        .collect();
    assert!(late.is_empty(), "EXTEND_TIMEOUT_USEC after READY=1");
}

/// A flush that never finishes (the test-only fault hook) stops the progress: `/healthz` fails
/// within the liveness timeout and the watchdog is no longer pinged, so systemd (or
/// Kubernetes) restarts the daemon. Readiness alone would not notice: both servers answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_loop_fails_healthz_and_starves_the_watchdog() {
    let env = Env::with_config(Delivery::Outbox, "liveness_timeout_secs = 2\n").await;
    let systemd = FakeSystemd::new();
    let daemon = systemd.spawn(&env, &[(STALL_ON_TAG_ENV, "health:stall")]);
    systemd.wait_for("READY=1").await;
    systemd.wait_for("WATCHDOG=1").await;
    assert_eq!(support::http_get(&daemon.http_addr(), "/healthz").0, 200);
    env.sql("SELECT evictd.invalidate_tags('health:stall')")
        .await;
    daemon.wait_log("stalling this batch").await;
    let start = Instant::now();
    let failed_at = loop {
        let (status, body) = support::http_get(&daemon.http_addr(), "/healthz");
        if status == 503 {
            assert!(body.contains("stalled"), "{body}");
            break Instant::now();
        }
        assert_eq!(status, 200);
        assert!(start.elapsed() < DEADLINE, "/healthz never failed");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    daemon.wait_log("the daemon makes no progress").await;
    // Three watchdog periods later, no ping has come since the probe failed (one already on
    // its way may arrive within a tick).
    let window_end = failed_at + WATCHDOG_PERIOD * 3;
    while Instant::now() < window_end {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let pings: Vec<Instant> = systemd
        .times("WATCHDOG=1")
        .into_iter()
        .filter(|at| *at > failed_at + Duration::from_secs(1))
        .collect();
    assert!(
        pings.is_empty(),
        "{} WATCHDOG=1 after the stall",
        pings.len()
    );
    // Readiness is about the servers, which answer.
    assert_eq!(support::http_get(&daemon.http_addr(), "/readyz").0, 200);
}
