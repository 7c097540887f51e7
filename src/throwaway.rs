//! Throwaway local PostgreSQL and Redis servers, started from the system binaries in temporary
//! directories on free ports. Used by `evictd dev` and by the test suite — never by `run`.
//!
//! PostgreSQL refuses to run as root, so when we are root it runs as the `postgres` system user.
//! Every server is started with a parent-death signal, so it dies with the process that started
//! it; the spawning is done by one long-lived thread because that signal fires when the
//! *thread* that forked the child exits, and test threads come and go.

use std::io::{BufRead, BufReader};
use std::net::TcpListener;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::mpsc;
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, anyhow, bail};

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// A fresh directory `evictd-{what}-{pid}-{n}` under the system temp dir.
fn scratch_dir(what: &str) -> Result<PathBuf> {
    remove_stale_dirs();
    let dir = std::env::temp_dir().join(format!(
        "evictd-{what}-{}-{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    ));
    if dir.exists() {
        std::fs::remove_dir_all(&dir).ok();
    }
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    Ok(dir)
}

/// Removes scratch directories of processes that no longer exist (a killed test run).
fn remove_stale_dirs() {
    static ONCE: OnceLock<()> = OnceLock::new();
    ONCE.get_or_init(|| {
        let Ok(entries) = std::fs::read_dir(std::env::temp_dir()) else {
            return;
        };
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().to_string();
            let Some(rest) = name.strip_prefix("evictd-") else {
                continue;
            };
            let pid = rest.split('-').nth(1).and_then(|p| p.parse::<u32>().ok());
            if let Some(pid) = pid
                && !Path::new(&format!("/proc/{pid}")).exists()
            {
                std::fs::remove_dir_all(entry.path()).ok();
            }
        }
    });
}

/// A port that was free a moment ago.
pub fn free_port() -> Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

type SpawnRequest = (Command, mpsc::Sender<std::io::Result<Child>>);

/// Spawns `command` from the long-lived spawner thread, with a parent-death signal.
fn spawn_guarded(mut command: Command) -> Result<Child> {
    static SPAWNER: OnceLock<Mutex<mpsc::Sender<SpawnRequest>>> = OnceLock::new();
    let sender = SPAWNER.get_or_init(|| {
        let (tx, rx) = mpsc::channel::<SpawnRequest>();
        std::thread::Builder::new()
            .name("evictd-spawner".into())
            .spawn(move || {
                for (mut command, reply) in rx {
                    let _ = reply.send(command.spawn());
                }
            })
            .ok();
        Mutex::new(tx)
    });
    // SAFETY: prctl is async-signal-safe and touches no memory of the parent.
    unsafe {
        command.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let (reply_tx, reply_rx) = mpsc::channel();
    sender
        .lock()
        .map_err(|_| anyhow!("spawner lock poisoned"))?
        .send((command, reply_tx))
        .map_err(|_| anyhow!("spawner thread is gone"))?;
    Ok(reply_rx
        .recv()
        .map_err(|_| anyhow!("spawner thread is gone"))??)
}

/// Waits until `path` contains `needle`, or fails after `deadline` with the file's tail.
fn wait_for_text(path: &Path, needle: &str, deadline: Duration, child: &mut Child) -> Result<()> {
    let start = Instant::now();
    loop {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        if text.contains(needle) {
            return Ok(());
        }
        if let Some(status) = child.try_wait()? {
            bail!(
                "server exited ({status}) before it was ready; its log:\n{}",
                tail(&text)
            );
        }
        if start.elapsed() > deadline {
            bail!(
                "server not ready after {deadline:?}; its log:\n{}",
                tail(&text)
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Calls `launch` until it succeeds, for at most `patience`: a killed server's port can take a
/// moment to be free again.
fn relaunch(patience: Duration, mut launch: impl FnMut() -> Result<()>) -> Result<()> {
    let deadline = Instant::now() + patience;
    loop {
        match launch() {
            Ok(()) => return Ok(()),
            Err(_) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(100)),
            Err(e) => return Err(e),
        }
    }
}

fn tail(text: &str) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(20)..].join("\n")
}

/// Finds a PostgreSQL server binary: `$EVICTD_PG_BIN`, then `PATH`, then Debian's
/// `/usr/lib/postgresql/<version>/bin` (newest first).
pub fn pg_binary(name: &str) -> Result<PathBuf> {
    let mut candidates = Vec::new();
    if let Some(dir) = std::env::var_os("EVICTD_PG_BIN") {
        candidates.push(PathBuf::from(dir).join(name));
    }
    if let Some(path) = std::env::var_os("PATH") {
        candidates.extend(std::env::split_paths(&path).map(|d| d.join(name)));
    }
    let mut versions: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .map(|entries| entries.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    versions.sort_by_key(|p| {
        p.file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.parse::<u32>().ok())
            .unwrap_or(0)
    });
    candidates.extend(versions.into_iter().rev().map(|v| v.join("bin").join(name)));
    candidates.into_iter().find(|p| p.is_file()).ok_or_else(|| {
        anyhow!(
            "PostgreSQL server binary `{name}` not found (looked in $EVICTD_PG_BIN, PATH and /usr/lib/postgresql/*/bin); \
             install it with `apt-get install postgresql`"
        )
    })
}

/// The uid/gid PostgreSQL must run as: ours, unless we are root (then the `postgres` user).
pub fn pg_user() -> Result<Option<(u32, u32)>> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Ok(None);
    }
    let passwd = std::fs::read_to_string("/etc/passwd").context("cannot read /etc/passwd")?;
    for line in passwd.lines() {
        let fields: Vec<&str> = line.split(':').collect();
        if fields.first() == Some(&"postgres") && fields.len() > 3 {
            let uid = fields[2].parse().context("bad uid for postgres")?;
            let gid = fields[3].parse().context("bad gid for postgres")?;
            return Ok(Some((uid, gid)));
        }
    }
    bail!(
        "running as root, and PostgreSQL refuses root: create a `postgres` system user (apt-get install postgresql does)"
    )
}

/// A throwaway PostgreSQL cluster. Killed and removed on drop.
pub struct Postgres {
    pub port: u16,
    dir: PathBuf,
    child: Option<Child>,
    user: Option<(u32, u32)>,
    /// Extra `-c name=value` settings, kept for restarts.
    settings: Vec<String>,
}

impl Postgres {
    /// initdb + start, trust authentication, superuser `postgres`.
    pub fn start() -> Result<Self> {
        Self::start_with(&[])
    }

    /// Like [`Postgres::start`] with extra server settings (`name=value`).
    pub fn start_with(settings: &[&str]) -> Result<Self> {
        let dir = scratch_dir("pg")?;
        let user = pg_user()?;
        if let Some((uid, gid)) = user {
            std::os::unix::fs::chown(&dir, Some(uid), Some(gid))
                .with_context(|| format!("cannot give {} to the postgres user", dir.display()))?;
        }
        let mut initdb = Command::new(pg_binary("initdb")?);
        initdb
            .args([
                "-A",
                "trust",
                "-U",
                "postgres",
                "--no-sync",
                "-E",
                "UTF8",
                "--locale=C",
                "-D",
            ])
            .arg(dir.join("data"))
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        if let Some((uid, gid)) = user {
            initdb.uid(uid).gid(gid);
        }
        let output = initdb.output().context("cannot run initdb")?;
        if !output.status.success() {
            bail!("initdb failed: {}", String::from_utf8_lossy(&output.stderr));
        }
        let mut pg = Self {
            port: free_port()?,
            dir,
            child: None,
            user,
            settings: settings.iter().map(|s| s.to_string()).collect(),
        };
        pg.launch()?;
        Ok(pg)
    }

    fn launch(&mut self) -> Result<()> {
        let log = self.dir.join(format!(
            "server-{}.log",
            COUNTER.fetch_add(1, Ordering::Relaxed)
        ));
        let log_file = std::fs::File::create(&log)?;
        if let Some((uid, gid)) = self.user {
            std::os::unix::fs::chown(&log, Some(uid), Some(gid))?;
        }
        let mut command = Command::new(pg_binary("postgres")?);
        command
            .arg("-D")
            .arg(self.dir.join("data"))
            .args(["-p", &self.port.to_string()])
            .args(["-c", "listen_addresses=127.0.0.1"])
            .arg("-c")
            .arg(format!("unix_socket_directories={}", self.dir.display()))
            .args([
                "-c",
                "fsync=off",
                "-c",
                "full_page_writes=off",
                "-c",
                "max_connections=300",
            ])
            .args(["-c", "shared_buffers=64MB"])
            // `logical` delivery streams from a replication slot, one per database.
            .args([
                "-c",
                "wal_level=logical",
                "-c",
                "max_replication_slots=100",
                "-c",
                "max_wal_senders=100",
            ]);
        for setting in &self.settings {
            command.args(["-c", setting]);
        }
        command
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log_file);
        if let Some((uid, gid)) = self.user {
            command.uid(uid).gid(gid);
        }
        let mut child = spawn_guarded(command).context("cannot start postgres")?;
        wait_for_text(
            &log,
            "database system is ready to accept connections",
            Duration::from_secs(60),
            &mut child,
        )?;
        self.child = Some(child);
        Ok(())
    }

    /// `postgres://postgres@127.0.0.1:PORT/DB`
    pub fn url(&self, database: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{database}", self.port)
    }

    /// The same over the server's Unix socket (whose buffers hold a few hundred kilobytes
    /// where loopback TCP holds megabytes).
    pub fn unix_url(&self, database: &str) -> String {
        let dir: String = self
            .dir
            .display()
            .to_string()
            .replace('%', "%25")
            .replace('/', "%2F");
        format!("postgres://postgres@{dir}:{}/{database}", self.port)
    }

    /// Puts `lines` first in `pg_hba.conf` (they win over the trust-everyone default) and
    /// reloads the configuration.
    pub fn prepend_hba(&self, lines: &str) -> Result<()> {
        let path = self.dir.join("data").join("pg_hba.conf");
        let rest = std::fs::read_to_string(&path)
            .with_context(|| format!("cannot read {}", path.display()))?;
        std::fs::write(&path, format!("{lines}\n{rest}"))
            .with_context(|| format!("cannot write {}", path.display()))?;
        self.psql("postgres", &["-c", "SELECT pg_reload_conf()"])?;
        Ok(())
    }

    /// The postmaster's process id.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Kills the postmaster with SIGKILL (a crash), and waits for it to be gone.
    pub fn kill9(&mut self) -> Result<()> {
        if let Some(mut child) = self.child.take() {
            child.kill().ok();
            child.wait()?;
        }
        // Orphaned backends exit once they notice the postmaster is gone; the next start
        // waits for the shared memory they hold to be released.
        Ok(())
    }

    /// Stops the server with a fast shutdown (SIGINT) and waits for it.
    pub fn stop_fast(&mut self) -> Result<()> {
        if let Some(mut child) = self.child.take() {
            // SAFETY: kill on a pid we own.
            unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
            child.wait()?;
        }
        Ok(())
    }

    /// Starts the server again on the same port and data directory.
    pub fn restart(&mut self) -> Result<()> {
        // After a kill -9 the old backends may still hold the port or shared memory.
        relaunch(Duration::from_secs(60), || self.launch())
    }

    /// Runs a `psql` file or command against `database` (as the caller would in a shell).
    pub fn psql(&self, database: &str, args: &[&str]) -> Result<String> {
        let output = Command::new(pg_binary("psql").or_else(|_| which("psql"))?)
            .arg(self.url(database))
            .args(["-v", "ON_ERROR_STOP=1", "-X", "-q"])
            .args(args)
            .output()
            .context("cannot run psql")?;
        if !output.status.success() {
            bail!("psql failed: {}", String::from_utf8_lossy(&output.stderr));
        }
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    }
}

fn which(name: &str) -> Result<PathBuf> {
    std::env::var_os("PATH")
        .and_then(|p| {
            std::env::split_paths(&p)
                .map(|d| d.join(name))
                .find(|p| p.is_file())
        })
        .ok_or_else(|| anyhow!("`{name}` not found in PATH"))
}

impl Drop for Postgres {
    fn drop(&mut self) {
        self.kill9().ok();
        std::fs::remove_dir_all(&self.dir).ok();
    }
}

/// A throwaway Redis server (no persistence). Killed and removed on drop.
pub struct Redis {
    pub port: u16,
    dir: PathBuf,
    child: Option<Child>,
    extra: Vec<String>,
    /// Certificate, key and CA files when the server speaks TLS only.
    tls: Option<[PathBuf; 3]>,
}

impl Redis {
    pub fn start() -> Result<Self> {
        Self::start_with(&[])
    }

    /// Like [`Redis::start`] with extra `redis-server` arguments.
    pub fn start_with(extra: &[&str]) -> Result<Self> {
        let mut redis = Self {
            port: free_port()?,
            dir: scratch_dir("redis")?,
            child: None,
            extra: extra.iter().map(|s| s.to_string()).collect(),
            tls: None,
        };
        redis.launch()?;
        Ok(redis)
    }

    /// A Redis that accepts TLS connections only, with this certificate, key and CA.
    pub fn start_tls(cert: &Path, key: &Path, ca: &Path) -> Result<Self> {
        let mut redis = Self {
            port: free_port()?,
            dir: scratch_dir("redis")?,
            child: None,
            extra: Vec::new(),
            tls: Some([cert.to_path_buf(), key.to_path_buf(), ca.to_path_buf()]),
        };
        redis.launch()?;
        Ok(redis)
    }

    fn launch(&mut self) -> Result<()> {
        let binary = which("redis-server").map_err(|_| {
            anyhow!(
                "`redis-server` not found in PATH; install it with `apt-get install redis-server`"
            )
        })?;
        let mut command = Command::new(binary);
        match &self.tls {
            None => {
                command.args(["--port", &self.port.to_string()]);
            }
            Some([cert, key, ca]) => {
                command
                    .args(["--port", "0", "--tls-port", &self.port.to_string()])
                    .arg("--tls-cert-file")
                    .arg(cert)
                    .arg("--tls-key-file")
                    .arg(key)
                    .arg("--tls-ca-cert-file")
                    .arg(ca)
                    .args(["--tls-auth-clients", "no"]);
            }
        }
        command
            .args(["--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no", "--daemonize", "no"])
            .arg("--dir")
            .arg(&self.dir)
            .args(&self.extra)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null());
        let mut child = spawn_guarded(command).context("cannot start redis-server")?;
        let stdout = child.stdout.take().context("no stdout")?;
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut reader = BufReader::new(stdout);
            let mut line = String::new();
            let mut log = String::new();
            while reader.read_line(&mut line).unwrap_or(0) > 0 {
                log.push_str(&line);
                if line.contains("Ready to accept connections") {
                    let _ = tx.send(Ok(()));
                }
                line.clear();
            }
            let _ = tx.send(Err(log));
        });
        match rx.recv_timeout(Duration::from_secs(30)) {
            Ok(Ok(())) => {
                self.child = Some(child);
                Ok(())
            }
            Ok(Err(log)) => bail!("redis-server exited before it was ready:\n{}", tail(&log)),
            Err(_) => bail!("redis-server not ready after 30s"),
        }
    }

    /// `redis://127.0.0.1:PORT`, or `rediss://` for a TLS server.
    pub fn url(&self) -> String {
        let scheme = if self.tls.is_some() {
            "rediss"
        } else {
            "redis"
        };
        format!("{scheme}://127.0.0.1:{}", self.port)
    }

    pub fn kill9(&mut self) -> Result<()> {
        if let Some(mut child) = self.child.take() {
            child.kill().ok();
            child.wait()?;
        }
        Ok(())
    }

    /// Starts it again on the same port (empty unless persistence was asked for).
    pub fn restart(&mut self) -> Result<()> {
        relaunch(Duration::from_secs(30), || self.launch())
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        self.kill9().ok();
        std::fs::remove_dir_all(&self.dir).ok();
    }
}

/// A throwaway PgBouncer in front of a PostgreSQL, in transaction pooling mode (the mode in
/// which LISTEN cannot work), for testing that `doctor` notices.
pub struct PgBouncer {
    pub port: u16,
    dir: PathBuf,
    child: Option<Child>,
}

impl PgBouncer {
    pub fn start_transaction_pooling(postgres_port: u16) -> Result<Self> {
        let binary = ["/usr/sbin/pgbouncer", "/usr/bin/pgbouncer"]
            .iter()
            .map(PathBuf::from)
            .find(|p| p.is_file())
            .or_else(|| which("pgbouncer").ok())
            .ok_or_else(|| {
                anyhow!("`pgbouncer` not found; install it with `apt-get install pgbouncer`")
            })?;
        let dir = scratch_dir("pgbouncer")?;
        let user = pg_user()?;
        let port = free_port()?;
        let config = dir.join("pgbouncer.ini");
        let log = dir.join("pgbouncer.log");
        std::fs::write(
            &config,
            format!(
                "[databases]\n* = host=127.0.0.1 port={postgres_port} user=postgres\n\n[pgbouncer]\n\
                 listen_addr = 127.0.0.1\nlisten_port = {port}\nauth_type = any\n\
                 pool_mode = transaction\nunix_socket_dir =\nlogfile = {}\n",
                log.display()
            ),
        )?;
        if let Some((uid, gid)) = user {
            for path in [&dir, &config] {
                std::os::unix::fs::chown(path, Some(uid), Some(gid))?;
            }
        }
        let mut command = Command::new(binary);
        command
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        if let Some((uid, gid)) = user {
            command.uid(uid).gid(gid);
        }
        let mut child = spawn_guarded(command).context("cannot start pgbouncer")?;
        wait_for_text(&log, "process up", Duration::from_secs(30), &mut child)?;
        Ok(Self {
            port,
            dir,
            child: Some(child),
        })
    }

    pub fn url(&self, database: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{database}", self.port)
    }
}

impl Drop for PgBouncer {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            child.kill().ok();
            child.wait().ok();
        }
        std::fs::remove_dir_all(&self.dir).ok();
    }
}
