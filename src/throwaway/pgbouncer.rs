//! A throwaway PgBouncer in transaction pooling mode.

use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{Context as _, Result, anyhow};

use super::{free_port, kill_and_reap, pg_user, scratch_dir, spawn_guarded, wait_for_text, which};

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
        kill_and_reap(&mut self.child).ok();
        std::fs::remove_dir_all(&self.dir).ok();
    }
}
