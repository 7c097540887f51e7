//! A throwaway Redis server, optionally speaking TLS only.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use anyhow::{Context as _, Result, anyhow, bail};

use super::{free_port, kill_and_reap, relaunch, scratch_dir, spawn_guarded, tail, which};

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
        Self::start_tls_with(cert, key, ca, &[])
    }

    /// Like [`Redis::start_tls`] with extra `redis-server` arguments.
    pub fn start_tls_with(cert: &Path, key: &Path, ca: &Path, extra: &[&str]) -> Result<Self> {
        let mut redis = Self {
            port: free_port()?,
            dir: scratch_dir("redis")?,
            child: None,
            extra: extra.iter().map(|s| s.to_string()).collect(),
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

    /// Whether it runs (it was not killed, or was restarted since).
    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }

    /// The server's process id.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    pub fn kill9(&mut self) -> Result<()> {
        kill_and_reap(&mut self.child)
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
