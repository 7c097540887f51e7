//! How the daemon starts, stops and talks to its supervisor; the second invalidation pass; the
//! bounded buffer of notify mode; secrets kept out of logs.

mod support;

use std::os::unix::net::UnixDatagram;
use std::time::{Duration, Instant};

use evictd::config::Delivery;
use support::{DEADLINE, Daemon, Env, text};

const P1: &str = "00000000-0000-0000-0000-0000000000a1";

async fn seed(env: &Env) {
    env.sql(&format!(
        "INSERT INTO clients (id, name) VALUES ('00000000-0000-0000-0000-0000000000c1', 'c');
         INSERT INTO products (id, client_id, name) VALUES ('{P1}', '00000000-0000-0000-0000-0000000000c1', 'p');"
    ))
    .await;
}

/// Waits for the child to exit, at most `limit`.
fn wait_exit(child: &mut std::process::Child, limit: Duration) -> std::process::ExitStatus {
    let start = Instant::now();
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        assert!(
            start.elapsed() < limit,
            "still running {limit:?} after SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Under systemd (NOTIFY_SOCKET set) the daemon says READY=1 once serving, pings the watchdog,
/// and on SIGTERM says STOPPING=1 and exits 0 promptly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn systemd_notifications_and_sigterm() {
    let env = Env::new(Delivery::Outbox).await;
    let dir = tempfile::tempdir().unwrap();
    let socket_path = dir.path().join("notify.sock");
    let socket = UnixDatagram::bind(&socket_path).unwrap();
    socket.set_read_timeout(Some(DEADLINE)).unwrap();

    let mut command = env.command(&["run", "--http-addr", "127.0.0.1:0"]);
    command
        .env("NOTIFY_SOCKET", &socket_path)
        .env("WATCHDOG_USEC", "400000")
        .stderr(std::process::Stdio::piped());
    let mut daemon = support::Daemon::spawn(command);

    let mut seen = Vec::new();
    let mut buf = [0u8; 512];
    while !(seen.iter().any(|m: &String| m.contains("READY=1"))
        && seen.iter().any(|m| m.contains("WATCHDOG=1")))
    {
        let n = socket
            .recv(&mut buf)
            .expect("a notification before the deadline");
        seen.push(String::from_utf8_lossy(&buf[..n]).to_string());
    }
    // READY comes once the daemon serves.
    let (status, _) = support::http_get(&daemon.http_addr(), "/readyz");
    assert_eq!(status, 200);

    // SAFETY: a signal to our own child.
    unsafe { libc::kill(daemon.child.id() as i32, libc::SIGTERM) };
    let status = wait_exit(&mut daemon.child, Duration::from_secs(10));
    assert!(status.success(), "exit status {status}");
    loop {
        let n = socket
            .recv(&mut buf)
            .expect("STOPPING=1 before the deadline");
        if String::from_utf8_lossy(&buf[..n]).contains("STOPPING=1") {
            break;
        }
    }
    daemon.wait_log("stopped").await;
}

/// SIGINT during a Redis outage: the batch in hand cannot finish, the daemon still exits 0
/// within its shutdown timeout, and (outbox) the event stays queued for the next run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_is_bounded_even_when_redis_is_down() {
    let mut env = Env::isolated(Delivery::Outbox, "", &[]).await;
    seed(&env).await;
    let mut daemon = env.spawn_daemon(&["--shutdown-timeout", "2"]);
    daemon.wait_ready().await;
    env.own().redis.kill9().unwrap();
    env.sql(&format!("UPDATE products SET name = 'x' WHERE id = '{P1}'"))
        .await;
    daemon.wait_log("not serving").await;
    // SAFETY: a signal to our own child.
    unsafe { libc::kill(daemon.child.id() as i32, libc::SIGINT) };
    let status = wait_exit(&mut daemon.child, Duration::from_secs(8));
    assert!(status.success(), "exit status {status}");
    let queued = env.outbox_len().await;
    assert!(queued >= 1, "the unconfirmed event must stay in the outbox");
}

/// With `second_pass_ms`, an entry written back from a stale read right after the first
/// invalidation is removed by the second.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn second_pass_removes_a_stale_write_back() {
    let env = Env::with_config(Delivery::Outbox, "second_pass_ms = 300\n").await;
    seed(&env).await;
    let daemon = env.start_daemon().await;
    let tag = format!("products:id:{P1}");
    let entry = env.cache("product", &[&tag]).await;
    env.sql(&format!(
        "UPDATE products SET name = 'new' WHERE id = '{P1}'"
    ))
    .await;
    env.wait_gone(std::slice::from_ref(&entry)).await;
    // The application read the old row before the commit and writes it back now.
    let stale = env.cache("product", &[&tag]).await;
    env.wait_gone(std::slice::from_ref(&stale)).await;
    daemon.wait_log("second pass").await;
}

/// Notify mode while Redis is down: events wait in a bounded buffer; past the bound the daemon
/// forgets them and invalidates every table once Redis is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn notify_buffer_overflow_falls_back_to_table_wide() {
    let mut env = Env::isolated(
        Delivery::Notify,
        "notify_buffer = 5\nhealth_interval_ms = 300\n",
        &["--appendonly", "yes", "--appendfsync", "always"],
    )
    .await;
    seed(&env).await;
    env.sql("INSERT INTO modules (title) SELECT 'm' || i FROM generate_series(1, 50) i")
        .await;
    let daemon = env.start_daemon().await;
    let stale = env.cache("modules", &["module_content:product:x"]).await;
    let unrelated = env.cache("unrelated", &["unrelated:x"]).await;
    env.own().redis.kill9().unwrap();
    let client = env.connect_pg().await;
    let ids: Vec<String> = client
        .query("SELECT id::text FROM modules", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    for id in &ids {
        client
            .execute(
                "UPDATE modules SET content = 'v2' WHERE id = $1::text::uuid",
                &[id],
            )
            .await
            .unwrap();
    }
    env.own().redis.restart().unwrap();
    env.wait_gone(&[stale]).await;
    daemon.wait_log("some were dropped").await;
    // The usual barrier's own notification may be dropped too, while the buffer still holds
    // the updates' (an explicit tag cannot be recovered by the table-wide fallback): retry it
    // until one gets through, which proves everything before it was handled.
    let start = Instant::now();
    'barrier: for round in 0.. {
        let tag = format!("overflow-barrier:{round}");
        let marker = env
            .cache(&format!("overflow-barrier:{round}"), &[&tag])
            .await;
        env.sql(&format!("SELECT evictd.invalidate_tags('{tag}')"))
            .await;
        let sent = Instant::now();
        while sent.elapsed() < Duration::from_secs(2) {
            if !env.exists(&marker).await {
                break 'barrier;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(
            start.elapsed() < DEADLINE,
            "no barrier invalidation got through in {DEADLINE:?}"
        );
    }
    env.assert_present(&[unrelated]).await;
    // Each dropped notification is counted, for the alert.
    let (_, metrics) = support::http_get(&daemon.http_addr(), "/metrics");
    let dropped: f64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("evictd_notifications_dropped_total "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no evictd_notifications_dropped_total: {metrics}"));
    assert!(dropped >= 1.0, "{dropped} notifications dropped");
}

/// Passwords in connection strings never reach a log line, an error message or a command's
/// output — generated ones too, with the characters that end a URL's parts (`/`, `?`, `#`,
/// `@`), in key/value strings with spaces and quotes — whether the server is reachable, not
/// reachable, or the string does not even parse.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn passwords_never_appear_in_logs_or_errors() {
    let env = Env::new(Delivery::Outbox).await;
    let pg_port = env.pg_server().port;
    let closed = evictd::throwaway::free_port().unwrap();
    for secret in ["Sup3rS3cretPw", "ab/S3cr3tPw", "a?S3cr3t#Pw@x"] {
        // The test server trusts local connections, so the password is sent and ignored.
        let db_with_password = format!(
            "postgres://postgres:{secret}@127.0.0.1:{pg_port}/{}",
            env.name
        );
        let redis_with_password = format!("redis://:{secret}@127.0.0.1:{closed}");

        // The daemon, retrying against an unreachable Redis.
        let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_evictd"));
        command
            .args([
                "run",
                "--http-addr",
                "127.0.0.1:0",
                "--database-url",
                &db_with_password,
            ])
            .args(["--redis-url", &redis_with_password])
            .env("EVICTD_LOG", "debug")
            .stderr(std::process::Stdio::piped());
        let daemon = support::Daemon::spawn(command);
        daemon.wait_log_count("not serving", 2).await;
        let log = daemon.log();
        assert!(!log.contains(secret), "{log}");
        assert!(log.contains("***"), "{log}");
        drop(daemon);

        // Every one-shot command, with an unreachable PostgreSQL and Redis, a malformed URL,
        // and key/value strings.
        let urls = [
            format!("postgres://postgres:{secret}@127.0.0.1:{closed}/db"),
            format!("postgres://postgres:{secret}@127.0.0.1:notaport/db"),
            format!("host=127.0.0.1 port={closed} password='{secret} x' user=u"),
            format!("host=127.0.0.1 port={closed} password = {secret}"),
        ];
        for url in &urls {
            for command in [
                vec!["migrate"],
                vec!["doctor"],
                vec!["stats"],
                vec!["invalidate", "some:tag"],
            ] {
                let output = std::process::Command::new(env!("CARGO_BIN_EXE_evictd"))
                    .args(&command)
                    .args(["--database-url", url, "--redis-url", &redis_with_password])
                    .output()
                    .unwrap();
                let said = text(&output);
                assert_ne!(output.status.code(), Some(0), "{command:?}: {said}");
                assert!(!said.contains(secret), "{command:?} {url}: {said}");
            }
        }
    }
}

/// README's first command: `evictd dev` with no URLs starts throwaway servers with the example
/// schema, and the edit it suggests invalidates the entry it names while others stay.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dev_command_runs_the_newcomer_path() {
    let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_evictd"));
    command
        .args(["dev", "--http-addr", "127.0.0.1:0"])
        .env_remove("DATABASE_URL")
        .env_remove("REDIS_URL")
        .env_remove("EVICTD_CONFIG")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped());
    let dev = Daemon::spawn(command);
    dev.wait_ready().await;
    let log = dev.log();
    let db_url = log
        .split("PostgreSQL at ")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .expect("the PostgreSQL URL")
        .to_string();
    let redis_port = log
        .split("redis-cli -p ")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .expect("the Redis port")
        .to_string();
    let mut redis = redis::Client::open(format!("redis://127.0.0.1:{redis_port}"))
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let listed = "cache:v1:products:list:00000000-0000-0000-0000-0000000000c1";
    let clients = "cache:v1:clients:all";
    let exists = |n: u64| n == 1;
    let n: u64 = redis::cmd("EXISTS")
        .arg(listed)
        .query_async(&mut redis)
        .await
        .unwrap();
    assert!(exists(n), "the demo entry is there before the edit");

    let (client, conn) = tokio_postgres::connect(&db_url, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);
    client
        .batch_execute("UPDATE products SET price_cents = price_cents + 1 WHERE client_id = '00000000-0000-0000-0000-0000000000c1'")
        .await
        .unwrap();
    let start = std::time::Instant::now();
    loop {
        let n: u64 = redis::cmd("EXISTS")
            .arg(listed)
            .query_async(&mut redis)
            .await
            .unwrap();
        if !exists(n) {
            break;
        }
        assert!(
            start.elapsed() < DEADLINE,
            "the edit did not invalidate {listed}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let n: u64 = redis::cmd("EXISTS")
        .arg(clients)
        .query_async(&mut redis)
        .await
        .unwrap();
    assert!(exists(n), "{clients} is not about products and stays");
}

/// A flood of idle connections to the HTTP port costs the daemon at most its connection cap in
/// descriptors (the rest wait in the kernel's backlog), and once they go, probes are answered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_connections_are_capped() {
    let env = Env::new(Delivery::Outbox).await;
    let daemon = env.start_daemon().await;
    let addr = daemon.http_addr();
    let open_descriptors = || {
        std::fs::read_dir(format!("/proc/{}/fd", daemon.child.id()))
            .expect("the daemon's descriptors")
            .count()
    };
    let before = open_descriptors();
    let flood: Vec<std::net::TcpStream> = (0..300)
        .map(|_| std::net::TcpStream::connect(&addr).expect("connect"))
        .collect();
    // Give the daemon every chance to accept them all.
    let start = Instant::now();
    let mut most = 0;
    while start.elapsed() < Duration::from_millis(500) {
        most = most.max(open_descriptors());
        std::thread::yield_now();
    }
    assert!(
        most <= before + 64 + 4,
        "{most} descriptors with 300 idle connections ({before} before)"
    );
    drop(flood);
    let start = Instant::now();
    loop {
        let (status, _) = support::http_get(&addr, "/healthz");
        if status == 200 {
            break;
        }
        assert!(start.elapsed() < DEADLINE, "/healthz answered {status}");
    }
}
