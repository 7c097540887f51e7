//! Which Redis a URL names: one server (`redis://`, `rediss://`), the master a set of
//! Sentinels names (`redis+sentinel://[user:pass@]host:port[,host:port…]/MASTER_NAME[/DB]`,
//! `rediss+sentinel://` for TLS to the sentinels and the master alike; credentials are the
//! master's, the sentinels are asked without them), or a Redis Cluster found through seed nodes
//! (`redis+cluster://[user:pass@]host:port[,host:port…]`, `rediss+cluster://` for TLS).

use std::time::Duration;

use thiserror::Error;

use crate::redact::redact_url;

/// How long one sentinel, or the master it names, may take to answer.
const SENTINEL_TIMEOUT: Duration = Duration::from_secs(2);

#[derive(Debug, Error, PartialEq, Eq)]
pub enum TargetError {
    #[error(
        "{url}: a sentinel URL names its master: redis+sentinel://host:port[,host:port…]/MASTER_NAME"
    )]
    NoMasterName { url: String },
    #[error(
        "{url}: several hosts in a redis:// URL; name a cluster's seed nodes with redis+cluster://host:port,host:port… or sentinels with redis+sentinel://…/MASTER_NAME"
    )]
    SeveralHosts { url: String },
    #[error(
        "{url}: a Redis Cluster has one database and no master name: redis+cluster://host:port[,host:port…] without a path"
    )]
    ClusterPath { url: String },
    #[error(
        "{url}: mixes URL forms; give one scheme for the whole list, nodes as host:port (redis+cluster://h1:7000,h2:7000)"
    )]
    Mixed { url: String },
    #[error("{url}: `{host}` is not host:port")]
    BadHost { url: String, host: String },
    #[error(
        "{url}: `{scheme}` is not a Redis URL scheme (redis, rediss, redis+sentinel, rediss+sentinel, redis+cluster, rediss+cluster)"
    )]
    Scheme { url: String, scheme: String },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RedisTarget {
    /// One server, by its URL as the redis crate reads it.
    Single(String),
    Sentinel(SentinelTarget),
    /// A Redis Cluster, by the URLs of its seed nodes (credentials on each).
    Cluster(Vec<String>),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SentinelTarget {
    pub sentinels: Vec<(String, u16)>,
    pub master: String,
    pub tls: bool,
    /// `user:password@` of the master, as written (percent-encoded).
    userinfo: Option<String>,
    db: Option<String>,
}

impl RedisTarget {
    /// Reads `url`. Errors name the URL with its password masked.
    pub fn parse(url: &str) -> Result<Self, TargetError> {
        let redacted = || redact_url(url);
        let (scheme, rest) = url.split_once("://").unwrap_or(("", url));
        if rest.contains("://") {
            return Err(TargetError::Mixed { url: redacted() });
        }
        let sentinel = match scheme {
            "redis" | "rediss" | "unix" | "redis+unix" => false,
            "redis+sentinel" | "rediss+sentinel" => true,
            "redis+cluster" | "rediss+cluster" => return Self::parse_cluster(url),
            other => {
                return Err(TargetError::Scheme {
                    url: redacted(),
                    scheme: other.to_string(),
                });
            }
        };
        let (authority, path) = rest.split_once('/').unwrap_or((rest, ""));
        let (userinfo, hosts) = match authority.rsplit_once('@') {
            Some((userinfo, hosts)) => (Some(userinfo.to_string()), hosts),
            None => (None, authority),
        };
        if !sentinel {
            if hosts.contains(',') {
                return Err(TargetError::SeveralHosts { url: redacted() });
            }
            return Ok(RedisTarget::Single(url.to_string()));
        }
        let mut parts = path.splitn(2, '/');
        let master = parts.next().unwrap_or_default();
        if master.is_empty() {
            return Err(TargetError::NoMasterName { url: redacted() });
        }
        let db = parts.next().filter(|d| !d.is_empty()).map(str::to_string);
        Ok(RedisTarget::Sentinel(SentinelTarget {
            sentinels: host_list(url, hosts)?,
            master: master.to_string(),
            tls: scheme == "rediss+sentinel",
            userinfo,
            db,
        }))
    }

    /// A `redis+cluster://` URL: its seed nodes, each as a `redis://` (or `rediss://`) URL
    /// with the credentials.
    fn parse_cluster(url: &str) -> Result<Self, TargetError> {
        let (scheme, rest) = url.split_once("://").unwrap_or(("", url));
        let (authority, path) = rest.split_once('/').unwrap_or((rest, ""));
        if !matches!(path, "" | "0") {
            return Err(TargetError::ClusterPath {
                url: redact_url(url),
            });
        }
        let (userinfo, hosts) = match authority.rsplit_once('@') {
            Some((userinfo, hosts)) => (format!("{userinfo}@"), hosts),
            None => (String::new(), authority),
        };
        let node_scheme = if scheme == "rediss+cluster" {
            "rediss"
        } else {
            "redis"
        };
        Ok(RedisTarget::Cluster(
            host_list(url, hosts)?
                .into_iter()
                .map(|(host, port)| format!("{node_scheme}://{userinfo}{}:{port}", bracket(&host)))
                .collect(),
        ))
    }
}

/// `host:port[,host:port…]` of `url`, IPv6 hosts in brackets.
fn host_list(url: &str, hosts: &str) -> Result<Vec<(String, u16)>, TargetError> {
    let mut list = Vec::new();
    for host in hosts.split(',') {
        let bad = || TargetError::BadHost {
            url: redact_url(url),
            host: host.to_string(),
        };
        let (name, port) = host.rsplit_once(':').ok_or_else(bad)?;
        let port: u16 = port.parse().map_err(|_| bad())?;
        let name = name.trim_start_matches('[').trim_end_matches(']');
        if name.is_empty() || name.contains(['/', '@']) {
            return Err(bad());
        }
        list.push((name.to_string(), port));
    }
    Ok(list)
}

/// `host`, in brackets when it is an IPv6 address.
fn bracket(host: &str) -> String {
    if host.contains(':') {
        format!("[{host}]")
    } else {
        host.to_string()
    }
}

impl SentinelTarget {
    /// A URL for `host:port` with this target's scheme, and the master's credentials and
    /// database when `master` is set.
    fn url(&self, host: &str, port: u16, master: bool) -> String {
        let scheme = if self.tls { "rediss" } else { "redis" };
        let host = bracket(host);
        let userinfo = match (&self.userinfo, master) {
            (Some(userinfo), true) => format!("{userinfo}@"),
            _ => String::new(),
        };
        let db = match (&self.db, master) {
            (Some(db), true) => format!("/{db}"),
            _ => String::new(),
        };
        format!("{scheme}://{userinfo}{host}:{port}{db}")
    }

    /// The URL of the master the sentinels name now, asking them in order and checking that
    /// the server named is a master (a sentinel may lag behind a failover).
    pub async fn resolve(
        &self,
        client: impl Fn(&str) -> redis::RedisResult<redis::Client>,
    ) -> Result<String, String> {
        let mut failures = Vec::new();
        for (host, port) in &self.sentinels {
            let asked = async {
                let sentinel = client(&self.url(host, *port, false))?;
                let mut conn = sentinel.get_multiplexed_async_connection().await?;
                let named: Option<(String, u16)> = redis::cmd("SENTINEL")
                    .arg("get-master-addr-by-name")
                    .arg(&self.master)
                    .query_async(&mut conn)
                    .await?;
                let Some((master_host, master_port)) = named else {
                    return Ok(Err(format!("knows no master named `{}`", self.master)));
                };
                let url = self.url(&master_host, master_port, true);
                let mut master = client(&url)?.get_multiplexed_async_connection().await?;
                let role: Vec<redis::Value> = redis::cmd("ROLE").query_async(&mut master).await?;
                let is_master =
                    matches!(role.first(), Some(redis::Value::BulkString(r)) if r == b"master");
                Ok::<_, redis::RedisError>(if is_master {
                    Ok(url)
                } else {
                    Err(format!(
                        "names {master_host}:{master_port}, which is not a master (yet)"
                    ))
                })
            };
            match tokio::time::timeout(SENTINEL_TIMEOUT, asked).await {
                Ok(Ok(Ok(url))) => return Ok(url),
                Ok(Ok(Err(why))) => failures.push(format!("sentinel {host}:{port} {why}")),
                Ok(Err(e)) => failures.push(format!("sentinel {host}:{port}: {e}")),
                Err(_) => failures.push(format!(
                    "sentinel {host}:{port}: no answer within {SENTINEL_TIMEOUT:?}"
                )),
            }
        }
        Err(failures.join("; "))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sentinel_urls() {
        let target =
            RedisTarget::parse("redis+sentinel://u:p%40ss@h1:26379,[::1]:26380/mymaster/2")
                .unwrap();
        let RedisTarget::Sentinel(s) = target else {
            panic!("not a sentinel target")
        };
        assert_eq!(
            s.sentinels,
            [("h1".to_string(), 26379), ("::1".to_string(), 26380)]
        );
        assert_eq!(s.master, "mymaster");
        assert!(!s.tls);
        assert_eq!(s.url("m", 6379, true), "redis://u:p%40ss@m:6379/2");
        assert_eq!(s.url("::1", 26380, false), "redis://[::1]:26380");
        let RedisTarget::Sentinel(s) = RedisTarget::parse("rediss+sentinel://h:1/m").unwrap()
        else {
            panic!()
        };
        assert!(s.tls);
        assert_eq!(s.url("x", 2, true), "rediss://x:2");
    }

    #[test]
    fn bad_urls_are_refused_without_their_password() {
        for (url, wanted) in [
            ("redis+sentinel://u:secret@h:1,h:2", "names its master"),
            ("redis+sentinel://u:secret@h:1,h:2/", "names its master"),
            ("redis://u:secret@h1:1,h2:2", "several hosts"),
            ("redis+sentinel://u:secret@h/m", "is not host:port"),
            ("redis+sentinel://u:secret@h:port/m", "is not host:port"),
            ("http://u:secret@h:1", "not a Redis URL scheme"),
            ("redis+cluster://u:secret@h:1,h:2/3", "one database"),
            ("redis+cluster://u:secret@h:1/mymaster", "one database"),
            (
                "redis+cluster://u:secret@h:1,redis://h:2",
                "mixes URL forms",
            ),
            (
                "redis://u:secret@h:1,redis+cluster://h:2",
                "mixes URL forms",
            ),
            ("redis+cluster://u:secret@h1", "is not host:port"),
            (
                "redis+sentinel+cluster://u:secret@h:1",
                "not a Redis URL scheme",
            ),
        ] {
            let error = RedisTarget::parse(url).unwrap_err().to_string();
            assert!(error.contains(wanted), "{url}: {error}");
            assert!(!error.contains("secret"), "{url}: {error}");
        }
        assert_eq!(
            RedisTarget::parse("rediss+cluster://u:p%40ss@h1:7000,[::1]:7001/").unwrap(),
            RedisTarget::Cluster(vec![
                "rediss://u:p%40ss@h1:7000".to_string(),
                "rediss://u:p%40ss@[::1]:7001".to_string()
            ])
        );
        assert_eq!(
            RedisTarget::parse("redis://h:1/0").unwrap(),
            RedisTarget::Single("redis://h:1/0".to_string())
        );
    }
}
