//! A throwaway PostgreSQL cluster, run as the `postgres` user when we are root.

use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::Ordering;
use std::time::Duration;

use anyhow::{Context as _, Result, anyhow, bail};

use super::{
    COUNTER, free_port, kill_and_reap, relaunch, scratch_dir, spawn_guarded, wait_for_text, which,
};

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

    /// A hot standby of `primary`, streaming its WAL through physical slot `slot` (made here),
    /// with `hot_standby_feedback` and a `dbname` in `primary_conninfo`, as slot
    /// synchronisation needs. Its base is a copy of the primary's data directory taken while
    /// the primary is stopped for a moment (the packaged servers of `scripts/fetch-postgres`
    /// ship no `pg_basebackup`), without the primary's replication slots, as `pg_basebackup`
    /// would leave them out.
    pub fn start_standby(primary: &mut Postgres, slot: &str) -> Result<Self> {
        primary.psql(
            "postgres",
            &[
                "-c",
                &format!("SELECT pg_create_physical_replication_slot('{slot}')"),
            ],
        )?;
        primary.stop_fast()?;
        let dir = scratch_dir("pg")?;
        if let Some((uid, gid)) = primary.user {
            std::os::unix::fs::chown(&dir, Some(uid), Some(gid))
                .with_context(|| format!("cannot give {} to the postgres user", dir.display()))?;
        }
        let data = dir.join("data");
        let copied = Command::new("cp")
            .arg("-a")
            .arg(primary.dir.join("data"))
            .arg(&data)
            .status()
            .context("cannot run cp")?;
        primary.restart()?;
        if !copied.success() {
            bail!("cannot copy the primary's data directory");
        }
        for entry in std::fs::read_dir(data.join("pg_replslot"))?.flatten() {
            std::fs::remove_dir_all(entry.path())?;
        }
        std::fs::remove_file(data.join("postmaster.pid")).ok();
        let signal = data.join("standby.signal");
        std::fs::write(&signal, "")?;
        if let Some((uid, gid)) = primary.user {
            std::os::unix::fs::chown(&signal, Some(uid), Some(gid))?;
        }
        let mut standby = Self {
            port: free_port()?,
            dir,
            child: None,
            user: primary.user,
            settings: vec![
                format!(
                    "primary_conninfo=host=127.0.0.1 port={} user=postgres dbname=postgres",
                    primary.port
                ),
                format!("primary_slot_name={slot}"),
                "hot_standby_feedback=on".to_string(),
            ],
        };
        standby.launch()?;
        Ok(standby)
    }

    /// Promotes this standby to a primary and waits until it accepts writes.
    pub fn promote(&self) -> Result<()> {
        let promoted = self.psql("postgres", &["-At", "-c", "SELECT pg_promote()"])?;
        if promoted.trim() != "t" {
            bail!("the standby was not promoted: {promoted}");
        }
        Ok(())
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
        // A primary is "ready to accept connections", a standby "… read-only connections".
        wait_for_text(
            &log,
            "database system is ready to accept",
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
        // Orphaned backends exit once they notice the postmaster is gone; the next start
        // waits for the shared memory they hold to be released.
        kill_and_reap(&mut self.child)
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

impl Drop for Postgres {
    fn drop(&mut self) {
        self.kill9().ok();
        std::fs::remove_dir_all(&self.dir).ok();
    }
}
