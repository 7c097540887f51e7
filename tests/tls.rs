//! TLS to both servers, against local PostgreSQL and Redis serving certificates of a CA the
//! test creates: `sslmode=verify-full` with `sslrootcert`, `rediss://` with `--tls-ca-file`, and
//! refusal when the CA is not trusted; libpq's `prefer` when the URL names no `sslmode` (TLS
//! where the server offers it, plain text where it does not, said in the log and by `doctor`);
//! `rediss+cluster://` to a cluster speaking TLS only.

mod support;

use std::path::{Path, PathBuf};
use std::process::Command;

use evictd::throwaway::{Cluster, Postgres, Redis, pg_user};
use redis::AsyncCommands as _;
use support::{Daemon, EXAMPLE_SCHEMA, finish, text};

/// A CA and a server certificate for 127.0.0.1/localhost, made with the openssl CLI.
struct Certs {
    _dir: tempfile::TempDir,
    ca: PathBuf,
    cert: PathBuf,
    key: PathBuf,
}

fn openssl(dir: &Path, args: &[&str]) {
    let output = Command::new("openssl")
        .current_dir(dir)
        .args(args)
        .output()
        .expect("the openssl command (apt-get install openssl)");
    assert!(
        output.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}

fn make_certs() -> Certs {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path();
    openssl(
        path,
        &[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            "ca.key",
            "-out",
            "ca.pem",
            "-days",
            "2",
            "-subj",
            "/CN=evictd test CA",
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=critical,keyCertSign,cRLSign",
        ],
    );
    openssl(
        path,
        &[
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            "server.key",
            "-out",
            "server.csr",
            "-subj",
            "/CN=localhost",
        ],
    );
    std::fs::write(
        path.join("ext.cnf"),
        "subjectAltName=IP:127.0.0.1,DNS:localhost\nbasicConstraints=CA:FALSE\n\
         keyUsage=digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth,clientAuth\n",
    )
    .unwrap();
    openssl(
        path,
        &[
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            "server.pem",
            "-days",
            "2",
            "-extfile",
            "ext.cnf",
        ],
    );
    // PostgreSQL runs as the postgres user and wants its key private to it.
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755)).unwrap();
    for file in ["ca.pem", "server.pem", "server.key"] {
        let mode = if file == "server.key" { 0o600 } else { 0o644 };
        std::fs::set_permissions(path.join(file), std::fs::Permissions::from_mode(mode)).unwrap();
        if let Some((uid, gid)) = pg_user().unwrap() {
            std::os::unix::fs::chown(path.join(file), Some(uid), Some(gid)).unwrap();
        }
    }
    Certs {
        ca: path.join("ca.pem"),
        cert: path.join("server.pem"),
        key: path.join("server.key"),
        _dir: dir,
    }
}

/// PostgreSQL serving `certs`' certificate (plain text is accepted too), with the example schema.
fn tls_postgres(certs: &Certs) -> Postgres {
    let pg = Postgres::start_with(&[
        "ssl=on",
        &format!("ssl_cert_file={}", certs.cert.display()),
        &format!("ssl_key_file={}", certs.key.display()),
    ])
    .unwrap_or_else(|e| panic!("{e:#}"));
    pg.psql("postgres", &["-c", EXAMPLE_SCHEMA]).unwrap();
    pg
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_full_postgres_and_rediss_with_a_test_ca() {
    // This test's own redis client builds its TLS configuration from the process default.
    evictd::tls::install_provider();
    let certs = make_certs();
    let pg = tls_postgres(&certs);
    let redis =
        Redis::start_tls(&certs.cert, &certs.key, &certs.ca).unwrap_or_else(|e| panic!("{e:#}"));
    let db_url = format!(
        "postgres://postgres@127.0.0.1:{}/postgres?sslmode=verify-full&sslrootcert={}",
        pg.port,
        certs.ca.display()
    );
    let evictd = |args: &[&str]| {
        let mut command = Command::new(env!("CARGO_BIN_EXE_evictd"));
        command
            .args(args)
            .env("DATABASE_URL", &db_url)
            .env("REDIS_URL", redis.url())
            .env("EVICTD_TLS_CA_FILE", &certs.ca)
            .env_remove("EVICTD_CONFIG");
        command
    };

    let migrated = finish(evictd(&["migrate"]));
    assert!(migrated.status.success(), "{}", text(&migrated));

    // The daemon's own session is encrypted.
    let daemon = run_encrypted(
        evictd(&["run", "--http-addr", "127.0.0.1:0"]),
        &pg,
        "evictd",
    )
    .await;

    // An edit still invalidates, through TLS on both sides.
    let client = redis::Client::build_with_tls(
        redis.url(),
        redis::TlsCertificates {
            client_tls: None,
            root_cert: Some(std::fs::read(&certs.ca).unwrap()),
        },
    )
    .unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    insert_and_wait_gone(&pg, &mut conn, &["cache:entry"]).await;
    drop(daemon);

    // `logical` delivery: the replication connection is verified and encrypted too.
    let migrated = finish({
        let mut c = evictd(&["migrate"]);
        c.env("EVICTD_DELIVERY", "logical");
        c
    });
    assert!(migrated.status.success(), "{}", text(&migrated));
    let daemon = run_encrypted(
        evictd(&["run", "--http-addr", "127.0.0.1:0"]),
        &pg,
        "evictd-logical",
    )
    .await;
    insert_and_wait_gone(&pg, &mut conn, &["cache:entry"]).await;
    drop(daemon);

    // Without the test CA, both servers are refused: the chain is verified.
    let untrusted_pg = finish({
        let mut c = evictd(&["migrate"]);
        c.env(
            "DATABASE_URL",
            format!(
                "postgres://postgres@127.0.0.1:{}/postgres?sslmode=require",
                pg.port
            ),
        )
        .env_remove("EVICTD_TLS_CA_FILE");
        c
    });
    assert_eq!(
        untrusted_pg.status.code(),
        Some(1),
        "{}",
        text(&untrusted_pg)
    );
    assert!(
        text(&untrusted_pg).to_lowercase().contains("certificate"),
        "{}",
        text(&untrusted_pg)
    );
    let untrusted_redis = finish({
        let mut c = evictd(&["doctor"]);
        c.env_remove("EVICTD_TLS_CA_FILE");
        c
    });
    assert_eq!(untrusted_redis.status.code(), Some(1));
    assert!(
        text(&untrusted_redis).contains("FAIL redis"),
        "{}",
        text(&untrusted_redis)
    );
}

/// Starts the daemon, waits for it to be ready, and checks that its sessions named
/// `application_name` are all encrypted.
async fn run_encrypted(mut command: Command, pg: &Postgres, application_name: &str) -> Daemon {
    command.stderr(std::process::Stdio::piped());
    let daemon = Daemon::spawn(command);
    daemon.wait_ready().await;
    let ssl = pg
        .psql(
            "postgres",
            &[
                "-At",
                "-c",
                &format!(
                    "SELECT bool_and(s.ssl) FROM pg_stat_ssl s JOIN pg_stat_activity a USING (pid) \
                     WHERE a.application_name = '{application_name}'"
                ),
            ],
        )
        .unwrap();
    assert_eq!(ssl.trim(), "t", "{}", daemon.log());
    daemon
}

/// Caches `entries` under `client_configs:all` (each entry, then its membership), inserts a
/// client, and waits for every entry to go.
async fn insert_and_wait_gone(
    pg: &Postgres,
    conn: &mut (impl redis::aio::ConnectionLike + Send + Sync),
    entries: &[&str],
) {
    for entry in entries {
        let () = conn.set(*entry, "v").await.unwrap();
        let () = conn
            .sadd("cache:tag:client_configs:all", *entry)
            .await
            .unwrap();
    }
    pg.psql(
        "postgres",
        &["-c", "INSERT INTO clients (name) VALUES ('tls')"],
    )
    .unwrap();
    let start = std::time::Instant::now();
    loop {
        let left: u64 = conn.exists(entries).await.unwrap();
        if left == 0 {
            break;
        }
        assert!(
            start.elapsed() < support::DEADLINE,
            "{left} entries not invalidated over TLS"
        );
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
}

fn evictd_against(db_url: &str, redis_url: &str) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_evictd"));
    command
        .env("DATABASE_URL", db_url)
        .env("REDIS_URL", redis_url)
        .env_remove("EVICTD_CONFIG")
        .env_remove("EVICTD_TLS_CA_FILE")
        .env_remove("EVICTD_DELIVERY");
    command
}

/// `doctor --json`'s `postgresql-tls` check: (status, message).
fn doctor_tls(mut command: Command) -> (String, String) {
    let output = finish({
        command.args(["doctor", "--json"]);
        command
    });
    let report: serde_json::Value = serde_json::from_slice(&output.stdout)
        .unwrap_or_else(|e| panic!("doctor --json: {e}: {}", text(&output)));
    let check = report["checks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "postgresql-tls")
        .unwrap_or_else(|| panic!("no postgresql-tls check: {report}"))
        .clone();
    (
        check["status"].as_str().unwrap().to_string(),
        check["message"].as_str().unwrap().to_string(),
    )
}

/// A URL without `sslmode` is libpq's `prefer`: a server offering TLS with a certificate that
/// verifies gets TLS (both the daemon's session and the replication stream); one whose
/// certificate does not verify gets plain text, with a warning; `sslmode=disable` never tries.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_sslmode_means_tls_where_the_server_offers_it() {
    evictd::tls::install_provider();
    let certs = make_certs();
    let pg = tls_postgres(&certs);
    let redis = Redis::start().unwrap_or_else(|e| panic!("{e:#}"));
    let db_url = format!("postgres://postgres@127.0.0.1:{}/postgres", pg.port);
    let trusted = |args: &[&str]| {
        let mut command = evictd_against(&db_url, &redis.url());
        command.args(args).env("EVICTD_TLS_CA_FILE", &certs.ca);
        command
    };
    let migrated = finish(trusted(&["migrate", "--delivery", "logical"]));
    assert!(migrated.status.success(), "{}", text(&migrated));
    let daemon = run_encrypted(
        trusted(&["run", "--http-addr", "127.0.0.1:0"]),
        &pg,
        "evictd",
    )
    .await;
    daemon.wait_log("postgres_tls=true").await;
    daemon.wait_log("tls=true").await;
    let ssl = pg
        .psql(
            "postgres",
            &[
                "-At",
                "-c",
                "SELECT bool_and(s.ssl) FROM pg_stat_ssl s JOIN pg_stat_activity a USING (pid) \
                 WHERE a.application_name = 'evictd-logical'",
            ],
        )
        .unwrap();
    assert_eq!(ssl.trim(), "t", "the replication stream: {}", daemon.log());
    drop(daemon);
    assert_eq!(
        doctor_tls(trusted(&[])).0,
        "OK",
        "doctor on an encrypted connection"
    );

    // The CA unknown: the certificate does not verify, and `prefer` goes on in plain text.
    let untrusted = |args: &[&str]| {
        let mut command = evictd_against(&db_url, &redis.url());
        command.args(args);
        command
    };
    let mut command = untrusted(&["run", "--http-addr", "127.0.0.1:0"]);
    command.stderr(std::process::Stdio::piped());
    let daemon = Daemon::spawn(command);
    daemon.wait_ready().await;
    daemon.wait_log("postgres_tls=false").await;
    daemon
        .wait_log("connected to postgresql only after another attempt failed")
        .await;
    daemon
        .wait_log("replication connection made only after another attempt failed")
        .await;
    drop(daemon);

    // `disable` never tries TLS.
    let disabled = format!("{db_url}?sslmode=disable");
    let mut command = evictd_against(&disabled, &redis.url());
    command
        .args(["run", "--http-addr", "127.0.0.1:0"])
        .env("EVICTD_TLS_CA_FILE", &certs.ca)
        .stderr(std::process::Stdio::piped());
    let daemon = Daemon::spawn(command);
    daemon.wait_ready().await;
    daemon.wait_log("postgres_tls=false").await;
    assert!(
        !daemon.log().contains("another attempt failed"),
        "{}",
        daemon.log()
    );
}

/// A server without TLS: `prefer` connects in plain text at once. `doctor` says so, and WARNs
/// when the server is on another machine (here: this machine's own non-loopback address).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_servers_work_and_doctor_warns_about_remote_ones() {
    let address = non_loopback_ipv4().expect(
        "this test needs a non-loopback IPv4 address on the machine (to stand for another host)",
    );
    let pg = Postgres::start_with(&[&format!("listen_addresses=127.0.0.1,{address}")])
        .unwrap_or_else(|e| panic!("{e:#}"));
    pg.prepend_hba(&format!("host all all {address}/32 trust\n"))
        .unwrap();
    pg.psql("postgres", &["-c", EXAMPLE_SCHEMA]).unwrap();
    let redis = Redis::start().unwrap_or_else(|e| panic!("{e:#}"));
    let local = format!("postgres://postgres@127.0.0.1:{}/postgres", pg.port);
    let remote = format!("postgres://postgres@{address}:{}/postgres", pg.port);
    let migrated = finish({
        let mut c = evictd_against(&local, &redis.url());
        c.arg("migrate");
        c
    });
    assert!(migrated.status.success(), "{}", text(&migrated));
    let mut command = evictd_against(&remote, &redis.url());
    command
        .args(["run", "--http-addr", "127.0.0.1:0"])
        .stderr(std::process::Stdio::piped());
    let daemon = Daemon::spawn(command);
    daemon.wait_ready().await;
    daemon.wait_log("postgres_tls=false").await;
    assert!(
        !daemon.log().contains("another attempt failed"),
        "{}",
        daemon.log()
    );
    drop(daemon);

    assert_eq!(doctor_tls(evictd_against(&local, &redis.url())).0, "OK");
    let (status, message) = doctor_tls(evictd_against(&remote, &redis.url()));
    assert_eq!(status, "WARN", "{message}");
    assert!(
        message.contains(&format!("plain text to {address}")),
        "{message}"
    );
}

/// The first IPv4 address of this machine that is not a loopback one.
fn non_loopback_ipv4() -> Option<std::net::Ipv4Addr> {
    let mut found = None;
    // SAFETY: getifaddrs fills a list we walk and free; nothing outlives it.
    unsafe {
        let mut list: *mut libc::ifaddrs = std::ptr::null_mut();
        if libc::getifaddrs(&mut list) != 0 {
            return None;
        }
        let mut entry = list;
        while !entry.is_null() {
            let address = (*entry).ifa_addr;
            if !address.is_null() && i32::from((*address).sa_family) == libc::AF_INET {
                let ipv4 = &*(address as *const libc::sockaddr_in);
                let ip = std::net::Ipv4Addr::from(u32::from_be(ipv4.sin_addr.s_addr));
                if !ip.is_loopback() && found.is_none() {
                    found = Some(ip);
                }
            }
            entry = (*entry).ifa_next;
        }
        libc::freeifaddrs(list);
    }
    found
}

/// `rediss+cluster://` against a cluster whose nodes speak TLS only (to clients, to each other
/// and to their replicas), with the test CA: the daemon reaches every primary encrypted and
/// invalidates there; without the CA, `doctor` fails Redis (the chain is verified).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rediss_cluster_with_a_test_ca() {
    evictd::tls::install_provider();
    let certs = make_certs();
    let cluster = Cluster::start_tls(3, 0, &certs.cert, &certs.key, &certs.ca)
        .unwrap_or_else(|e| panic!("{e:#}"));
    let pg = Postgres::start().unwrap_or_else(|e| panic!("{e:#}"));
    pg.psql("postgres", &["-c", EXAMPLE_SCHEMA]).unwrap();
    let db_url = format!("postgres://postgres@127.0.0.1:{}/postgres", pg.port);
    let evictd = |args: &[&str]| {
        let mut command = evictd_against(&db_url, &cluster.url());
        command.args(args).env("EVICTD_TLS_CA_FILE", &certs.ca);
        command
    };
    let migrated = finish(evictd(&["migrate"]));
    assert!(migrated.status.success(), "{}", text(&migrated));
    let mut daemon_command = evictd(&["run", "--http-addr", "127.0.0.1:0"]);
    daemon_command.stderr(std::process::Stdio::piped());
    let daemon = Daemon::spawn(daemon_command);
    daemon.wait_ready().await;

    let seeds: Vec<String> = cluster
        .nodes
        .iter()
        .map(|n| format!("rediss://127.0.0.1:{}", n.port))
        .collect();
    let client = redis::cluster::ClusterClientBuilder::new(seeds)
        .certs(redis::TlsCertificates {
            client_tls: None,
            root_cert: Some(std::fs::read(&certs.ca).unwrap()),
        })
        .build()
        .unwrap();
    let mut conn = client.get_async_connection().await.unwrap();
    // Entries in many slots, on every primary, under one tag.
    let entries: Vec<String> = (0..30).map(|i| format!("cache:entry:{i}")).collect();
    let entries: Vec<&str> = entries.iter().map(String::as_str).collect();
    insert_and_wait_gone(&pg, &mut conn, &entries).await;
    drop(daemon);

    let trusted = finish(evictd(&["doctor"]));
    assert!(
        text(&trusted)
            .lines()
            .any(|l| l.starts_with("OK") && l.contains("a cluster of 3 primaries")),
        "{}",
        text(&trusted)
    );
    let untrusted = finish({
        let mut c = evictd(&["doctor"]);
        c.env_remove("EVICTD_TLS_CA_FILE");
        c
    });
    assert_eq!(untrusted.status.code(), Some(1), "{}", text(&untrusted));
    assert!(
        text(&untrusted).contains("FAIL redis"),
        "{}",
        text(&untrusted)
    );
}
