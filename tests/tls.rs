//! TLS to both servers, against local PostgreSQL and Redis serving certificates of a CA the
//! test creates: `sslmode=verify-full` with `sslrootcert`, `rediss://` with `--tls-ca-file`, and
//! refusal when the CA is not trusted.

mod support;

use std::path::{Path, PathBuf};
use std::process::Command;

use evictd::throwaway::{Postgres, Redis, pg_user};
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
         keyUsage=digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\n",
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_full_postgres_and_rediss_with_a_test_ca() {
    // This test's own redis client builds its TLS configuration from the process default.
    evictd::tls::install_provider();
    let certs = make_certs();
    let pg = Postgres::start_with(&[
        "ssl=on",
        &format!("ssl_cert_file={}", certs.cert.display()),
        &format!("ssl_key_file={}", certs.key.display()),
    ])
    .unwrap_or_else(|e| panic!("{e:#}"));
    pg.psql("postgres", &["-c", EXAMPLE_SCHEMA]).unwrap();
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
    insert_and_wait_gone(&pg, &mut conn).await;
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
    insert_and_wait_gone(&pg, &mut conn).await;
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

/// Caches an entry under `client_configs:all`, inserts a client, and waits for the entry to go.
async fn insert_and_wait_gone(pg: &Postgres, conn: &mut redis::aio::MultiplexedConnection) {
    let () = redis::pipe()
        .cmd("SET")
        .arg("cache:entry")
        .arg("v")
        .ignore()
        .cmd("SADD")
        .arg("cache:tag:client_configs:all")
        .arg("cache:entry")
        .ignore()
        .query_async(conn)
        .await
        .unwrap();
    pg.psql(
        "postgres",
        &["-c", "INSERT INTO clients (name) VALUES ('tls')"],
    )
    .unwrap();
    let start = std::time::Instant::now();
    loop {
        let exists: u64 = redis::cmd("EXISTS")
            .arg("cache:entry")
            .query_async(conn)
            .await
            .unwrap();
        if exists == 0 {
            break;
        }
        assert!(
            start.elapsed() < support::DEADLINE,
            "entry not invalidated over TLS"
        );
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
}
