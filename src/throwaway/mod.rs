//! Throwaway local PostgreSQL and Redis servers (alone, in a cluster, or watched by Sentinels), started from the system binaries in temporary
//! directories on free ports. Used by `evictd dev` and by the test suite — never by `run`.
//!
//! PostgreSQL refuses to run as root, so when we are root it runs as the `postgres` system user.
//! Every server is started with a parent-death signal, so it dies with the process that started
//! it; the spawning is done by one long-lived thread because that signal fires when the
//! *thread* that forked the child exits, and test threads come and go.

mod cluster;
mod pgbouncer;
mod postgres;
mod redis;
mod sentinel;

pub use cluster::Cluster;
pub use pgbouncer::PgBouncer;
pub use postgres::{Postgres, pg_binary, pg_user};
pub use redis::Redis;
pub use sentinel::Sentinel;

use std::net::TcpListener;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
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

fn which(name: &str) -> Result<PathBuf> {
    std::env::var_os("PATH")
        .and_then(|p| {
            std::env::split_paths(&p)
                .map(|d| d.join(name))
                .find(|p| p.is_file())
        })
        .ok_or_else(|| anyhow!("`{name}` not found in PATH"))
}

/// Kills `child` with SIGKILL, if it runs, and reaps it.
fn kill_and_reap(child: &mut Option<Child>) -> Result<()> {
    if let Some(mut child) = child.take() {
        child.kill().ok();
        child.wait()?;
    }
    Ok(())
}
