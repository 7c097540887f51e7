//! `doctor`'s checks of Redis: reachable, and an eviction policy that keeps the tag sets.

use std::time::Duration;

use super::{Check, Status, check};
use crate::config::Settings;
use crate::redact::redact_url;
use crate::sink::{RedisSink, SinkOptions};

pub(super) async fn redis_checks(settings: &Settings) -> Vec<Check> {
    let connected = tokio::time::timeout(
        Duration::from_secs(10),
        RedisSink::connect(&settings.redis_url, SinkOptions::from(settings)),
    )
    .await;
    let sink = match connected {
        Ok(Ok(sink)) => sink,
        Ok(Err(e)) => {
            return vec![check(
                "redis",
                Status::Fail,
                e.to_string(),
                Some("check REDIS_URL / --redis-url and that the server runs"),
            )];
        }
        Err(_) => {
            return vec![check(
                "redis",
                Status::Fail,
                format!(
                    "no answer within 10s from {}",
                    redact_url(&settings.redis_url)
                ),
                Some("check the host, port and firewall"),
            )];
        }
    };
    let mut checks = Vec::new();
    match sink.server_info().await {
        Ok(info) if !info.supported() => checks.push(check(
            "redis",
            Status::Fail,
            format!(
                "Redis {} at {}: evictd needs {}.{} or newer",
                info.version,
                redact_url(&settings.redis_url),
                crate::sink::MIN_REDIS_VERSION.0,
                crate::sink::MIN_REDIS_VERSION.1
            ),
            Some("upgrade Redis"),
        )),
        Ok(info) => checks.push(check(
            "redis",
            Status::Ok,
            match info.primaries {
                0 => format!(
                    "Redis {} ({}) at {}",
                    info.version,
                    info.role,
                    redact_url(&settings.redis_url)
                ),
                n => format!(
                    "Redis {} (a cluster of {n} primaries) at {}",
                    info.version,
                    redact_url(&settings.redis_url)
                ),
            },
            None,
        )),
        Err(e) => {
            checks.push(check(
                "redis",
                Status::Fail,
                e.to_string(),
                Some("check Redis ACLs: evictd needs INFO, SCAN, EVALSHA, UNLINK"),
            ));
            return checks;
        }
    }
    checks.push(match sink.tags_of_wrong_type(5).await {
        Ok((0, _)) => check(
            "tag-types",
            Status::Ok,
            "every tag key is a set or a sorted set".to_string(),
            None,
        ),
        Ok((count, names)) => check(
            "tag-types",
            Status::Fail,
            format!(
                "{count} tag keys are neither a set nor a sorted set, so the entries they should index cannot be invalidated: {}",
                names.join(", ")
            ),
            Some("the application must write tags with SADD (or ZADD); delete these keys"),
        ),
        Err(e) => check("tag-types", Status::Warn, e.to_string(), None),
    });
    checks.push(match sink.eviction_policy().await {
        Ok(Some(policy)) if policy.starts_with("allkeys-") => check(
            "redis-eviction",
            Status::Warn,
            format!("maxmemory-policy is {policy}: Redis may evict tag sets, and entries they index can then never be invalidated"),
            Some("CONFIG SET maxmemory-policy volatile-lru (give cache entries a TTL) or noeviction"),
        ),
        Ok(Some(policy)) => check("redis-eviction", Status::Ok, format!("maxmemory-policy is {policy}"), None),
        Ok(None) | Err(_) => check(
            "redis-eviction",
            Status::Warn,
            "cannot read maxmemory-policy (CONFIG GET refused)".to_string(),
            Some("make sure the policy cannot evict keys without a TTL"),
        ),
    });
    checks
}
