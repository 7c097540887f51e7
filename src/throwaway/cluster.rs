//! A throwaway Redis Cluster: `redis-server --cluster-enabled yes` nodes joined by
//! `redis-cli --cluster create`, each primary with its replicas, and a short node timeout so a
//! killed primary is failed over within seconds.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, anyhow, bail};

use super::{Redis, free_port, which};

/// How long a node may be unreachable before the others fail it over.
const NODE_TIMEOUT_MS: u32 = 1_000;

/// A cluster of `primaries` primaries with `replicas` replicas each, on 127.0.0.1. Killed and
/// removed on drop.
pub struct Cluster {
    pub nodes: Vec<Redis>,
    /// The CA file, when the nodes speak TLS only (to clients, to each other and to replicas).
    ca: Option<PathBuf>,
}

impl Cluster {
    pub fn start(primaries: usize, replicas: usize) -> Result<Self> {
        Self::launch(primaries, replicas, None)
    }

    /// A cluster whose nodes speak TLS only, with this certificate, key and CA.
    pub fn start_tls(
        primaries: usize,
        replicas: usize,
        cert: &Path,
        key: &Path,
        ca: &Path,
    ) -> Result<Self> {
        Self::launch(primaries, replicas, Some([cert, key, ca]))
    }

    fn launch(primaries: usize, replicas: usize, tls: Option<[&Path; 3]>) -> Result<Self> {
        which("redis-cli").map_err(|_| {
            anyhow!("`redis-cli` not found in PATH; install it with `apt-get install redis-tools`")
        })?;
        let mut nodes = Vec::new();
        for _ in 0..primaries * (1 + replicas) {
            let bus = free_port()?.to_string();
            let timeout = NODE_TIMEOUT_MS.to_string();
            let mut args = vec![
                "--cluster-enabled",
                "yes",
                "--cluster-config-file",
                "nodes.conf",
                "--cluster-port",
                &bus,
                "--cluster-node-timeout",
                &timeout,
            ];
            nodes.push(match tls {
                None => Redis::start_with(&args)?,
                Some([cert, key, ca]) => {
                    args.extend(["--tls-cluster", "yes", "--tls-replication", "yes"]);
                    Redis::start_tls_with(cert, key, ca, &args)?
                }
            });
        }
        let cluster = Self {
            nodes,
            ca: tls.map(|[_, _, ca]| ca.to_path_buf()),
        };
        let mut create = cluster.cli_command()?;
        create.args(["--cluster", "create"]);
        let nodes = &cluster.nodes;
        for node in nodes {
            create.arg(format!("127.0.0.1:{}", node.port));
        }
        let output = create
            .args(["--cluster-replicas", &replicas.to_string(), "--cluster-yes"])
            .output()
            .context("cannot run redis-cli --cluster create")?;
        if !output.status.success() {
            bail!(
                "redis-cli --cluster create failed:\n{}{}",
                String::from_utf8_lossy(&output.stdout),
                String::from_utf8_lossy(&output.stderr)
            );
        }
        cluster.wait_until_ok(Duration::from_secs(60), replicas > 0)?;
        Ok(cluster)
    }

    /// `redis+cluster://` (`rediss+cluster://` for TLS) with every node as a seed.
    pub fn url(&self) -> String {
        let seeds: Vec<String> = self
            .nodes
            .iter()
            .map(|n| format!("127.0.0.1:{}", n.port))
            .collect();
        let scheme = if self.ca.is_some() {
            "rediss+cluster"
        } else {
            "redis+cluster"
        };
        format!("{scheme}://{}", seeds.join(","))
    }

    /// `redis-cli`, with TLS and the CA when the nodes speak TLS.
    fn cli_command(&self) -> Result<Command> {
        let mut command = Command::new(which("redis-cli")?);
        if let Some(ca) = &self.ca {
            command.arg("--tls").arg("--cacert").arg(ca);
        }
        Ok(command)
    }

    /// `redis-cli -p PORT args…`'s answer.
    pub fn cli(&self, port: u16, args: &[&str]) -> Result<String> {
        let output = self
            .cli_command()?
            .args(["-p", &port.to_string()])
            .args(args)
            .output()
            .context("cannot run redis-cli")?;
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    }

    /// The ports of the primaries serving slots, as the node on `asked` sees them.
    pub fn primary_ports(&self, asked: u16) -> Result<Vec<u16>> {
        let nodes = self.cli(asked, &["cluster", "nodes"])?;
        let mut ports: Vec<u16> = nodes
            .lines()
            .filter_map(|line| {
                let fields: Vec<&str> = line.split_whitespace().collect();
                let flags = fields.get(2)?;
                let primary = flags.contains("master") && !flags.contains("fail");
                let port = fields.get(1)?.split(['@', ':']).nth(1)?.parse().ok()?;
                (primary && fields.len() > 8).then_some(port)
            })
            .collect();
        ports.sort_unstable();
        Ok(ports)
    }

    /// Waits until every primary's replicas have acknowledged all it has written (their
    /// offsets equal its own): what was written before can survive a failover.
    pub fn wait_replicated(&self, deadline: Duration) -> Result<()> {
        let start = Instant::now();
        let asked = self
            .nodes
            .iter()
            .find(|n| n.is_running())
            .map(|n| n.port)
            .context("no node runs")?;
        for primary in self.primary_ports(asked)? {
            loop {
                let info = self.cli(primary, &["info", "replication"])?;
                let own = info
                    .lines()
                    .find_map(|l| l.strip_prefix("master_repl_offset:"))
                    .map(|v| v.trim().to_string());
                let caught_up = own.as_ref().is_some_and(|own| {
                    let replicas: Vec<&str> =
                        info.lines().filter(|l| l.starts_with("slave")).collect();
                    !replicas.is_empty()
                        && replicas
                            .iter()
                            .all(|l| l.contains(&format!("offset={own},")))
                });
                if caught_up {
                    break;
                }
                if start.elapsed() > deadline {
                    bail!("the replicas of {primary} are behind after {deadline:?}:\n{info}");
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        Ok(())
    }

    /// The port of a replica of the primary on `primary`.
    pub fn replica_of(&self, primary: u16) -> Result<u16> {
        let nodes = self.cli(primary, &["cluster", "nodes"])?;
        let id = nodes
            .lines()
            .find(|l| l.contains("myself"))
            .and_then(|l| l.split_whitespace().next())
            .context("no `myself` line")?;
        nodes
            .lines()
            .find_map(|line| {
                let fields: Vec<&str> = line.split_whitespace().collect();
                (fields.get(3) == Some(&id) && fields.get(2)?.contains("slave"))
                    .then(|| fields.get(1)?.split(['@', ':']).nth(1)?.parse().ok())
                    .flatten()
            })
            .with_context(|| format!("no replica of {primary}:\n{nodes}"))
    }

    /// The node on `port`.
    pub fn node(&mut self, port: u16) -> Option<&mut Redis> {
        self.nodes.iter_mut().find(|n| n.port == port)
    }

    /// Waits until every running node says `cluster_state:ok` and agrees on the primaries,
    /// each with a replica attached when `with_replicas`.
    pub fn wait_until_ok(&self, deadline: Duration, with_replicas: bool) -> Result<()> {
        let start = Instant::now();
        let mut last = String::new();
        while start.elapsed() < deadline {
            let alive: Vec<u16> = self
                .nodes
                .iter()
                .filter(|n| n.is_running())
                .map(|n| n.port)
                .collect();
            let ok = alive.iter().all(|port| {
                self.cli(*port, &["cluster", "info"])
                    .is_ok_and(|info| info.contains("cluster_state:ok"))
            });
            let views: Vec<Vec<u16>> = alive
                .iter()
                .filter_map(|port| self.primary_ports(*port).ok())
                .collect();
            let agreed = views.windows(2).all(|w| w[0] == w[1]);
            let linked = !with_replicas
                || views.first().is_some_and(|primaries| {
                    primaries.iter().all(|port| {
                        self.cli(*port, &["info", "replication"])
                            .is_ok_and(|info| !info.contains("connected_slaves:0"))
                    })
                });
            if ok && agreed && linked {
                return Ok(());
            }
            last = format!("ok {ok}, agreed {agreed}, replicas linked {linked}: {views:?}");
            std::thread::sleep(Duration::from_millis(100));
        }
        bail!("the cluster is not ready after {deadline:?} ({last})")
    }
}
