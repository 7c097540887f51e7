//! A throwaway Redis Sentinel (`redis-server --sentinel`) watching one master, for the tests.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{Context as _, Result, anyhow};

use super::{free_port, kill_and_reap, scratch_dir, spawn_guarded, wait_for_text, which};

/// One sentinel process with its own (rewritable) configuration file. Killed and removed on
/// drop.
pub struct Sentinel {
    pub port: u16,
    dir: PathBuf,
    child: Option<Child>,
}

impl Sentinel {
    /// A sentinel watching `master` (a Redis on 127.0.0.1:`master_port`) under `name`, with a
    /// quorum of `quorum` and a short down-after (1 s), so failovers happen within seconds.
    pub fn start(name: &str, master_port: u16, quorum: u32) -> Result<Self> {
        let binary = which("redis-server").map_err(|_| {
            anyhow!(
                "`redis-server` not found in PATH; install it with `apt-get install redis-server`"
            )
        })?;
        let port = free_port()?;
        let dir = scratch_dir("sentinel")?;
        let config = dir.join("sentinel.conf");
        std::fs::write(
            &config,
            format!(
                "port {port}\nbind 127.0.0.1\ndir {}\nsentinel monitor {name} 127.0.0.1 {master_port} {quorum}\n\
                 sentinel down-after-milliseconds {name} 1000\nsentinel failover-timeout {name} 5000\n\
                 sentinel parallel-syncs {name} 1\n",
                dir.display()
            ),
        )?;
        let log = dir.join("sentinel.log");
        let mut command = Command::new(binary);
        command
            .arg(&config)
            .arg("--sentinel")
            .arg("--logfile")
            .arg(&log)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        let mut child = spawn_guarded(command).context("cannot start redis-server --sentinel")?;
        wait_for_text(&log, "+monitor master", Duration::from_secs(30), &mut child)?;
        Ok(Self {
            port,
            dir,
            child: Some(child),
        })
    }

    pub fn kill9(&mut self) -> Result<()> {
        kill_and_reap(&mut self.child)
    }
}

impl Drop for Sentinel {
    fn drop(&mut self) {
        self.kill9().ok();
        std::fs::remove_dir_all(&self.dir).ok();
    }
}
