//! Turning measurements into figures: percentiles, lag trends, CPU and memory of a process,
//! Redis' own CPU and its speed at cold lookups (the machine-speed gauge).

use super::*;

pub(crate) fn join_values(values: &[Value]) -> String {
    values
        .iter()
        .map(Value::to_string)
        .collect::<Vec<_>>()
        .join(" / ")
}

pub(crate) fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

/// Percentiles of `lags_ms` (in commit order), and whether the lag stayed bounded.
pub(crate) fn summary(mut lags_ms: Vec<f64>, lost: usize) -> Value {
    let (first_quarter, last_quarter) = quarter_medians(&lags_ms);
    lags_ms.sort_by(|a, b| a.total_cmp(b));
    json!({
        "samples": lags_ms.len(),
        "missing": lost,
        "p50_ms": round(percentile(&lags_ms, 0.5)),
        "p90_ms": round(percentile(&lags_ms, 0.9)),
        "p99_ms": round(percentile(&lags_ms, 0.99)),
        "max_ms": round(lags_ms.last().copied().unwrap_or(f64::NAN)),
        "first_quarter_p50_ms": round(first_quarter),
        "last_quarter_p50_ms": round(last_quarter),
        "bounded": lost == 0 && lag_bounded(first_quarter, last_quarter),
    })
}

/// The median lag of the first and of the last quarter of the commits (in commit order).
pub(crate) fn quarter_medians(lags_ms: &[f64]) -> (f64, f64) {
    let quarter = lags_ms.len() / 4;
    let median = |part: &[f64]| {
        let mut part = part.to_vec();
        part.sort_by(|a, b| a.total_cmp(b));
        percentile(&part, 0.5)
    };
    (
        median(&lags_ms[..quarter]),
        median(&lags_ms[lags_ms.len() - quarter..]),
    )
}

/// Whether a closed loop's lag stayed bounded: a daemon that cannot keep up falls further
/// behind as the phase goes on, so the lag of the last quarter of the commits is a multiple of
/// the first's; one that keeps up shows about the same lag throughout (20 ms of slack for
/// batching and this VM's hiccups). When it is bounded, the closed loop's rate is the highest
/// commit rate at which the lag stays bounded: the database commits no faster.
pub(crate) fn lag_bounded(first_quarter_ms: f64, last_quarter_ms: f64) -> bool {
    last_quarter_ms <= (2.0 * first_quarter_ms).max(first_quarter_ms + 20.0)
}

/// How `summary`'s trend reads in a report line.
pub(crate) fn trend(lag: &Value) -> String {
    format!(
        "{} (median {} ms in the first quarter of the commits, {} ms in the last)",
        if lag["bounded"].as_bool() == Some(true) {
            "bounded"
        } else {
            "GROWING"
        },
        lag["first_quarter_p50_ms"],
        lag["last_quarter_p50_ms"]
    )
}

pub(crate) fn round(x: f64) -> f64 {
    (x * 100.0).round() / 100.0
}

/// The daemon's resident memory now and at its peak (kB), and CPU seconds used so far.
pub(crate) fn process_stats(pid: u32) -> (u64, u64, f64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let fields: Vec<&str> = stat
        .rsplit(") ")
        .next()
        .unwrap_or("")
        .split_whitespace()
        .collect();
    let ticks = 100.0; // USER_HZ on Linux
    let cpu = fields
        .get(11)
        .and_then(|v| v.parse::<f64>().ok())
        .unwrap_or(0.0)
        + fields
            .get(12)
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0);
    (field("VmRSS:"), field("VmHWM:"), cpu / ticks)
}

/// How fast this VM is right now, as Redis' time per lookup of a key that is not in the CPU's
/// caches (µs): 200,000 keys with a TTL, then 100,000 EXISTS from Lua in a scattered order,
/// timed by Redis (`INFO commandstats`). Most of what the daemon asks of Redis is such
/// lookups, and this VM's speed at them drifts by half within an hour, so each setting's
/// figures come with the speed they were measured at. Leaves Redis empty.
pub(crate) async fn redis_lookup_us(server: &Redis) -> f64 {
    const KEYS: u64 = 200_000;
    const LOOKUPS: u64 = 100_000;
    let mut conn = connect_redis(server).await;
    for start in (0..KEYS).step_by(20_000) {
        let mut pipe = redis::pipe();
        for i in start..start + 20_000 {
            pipe.cmd("SET")
                .arg(format!("bench:calibrate:{i}"))
                .arg("v")
                .arg("EX")
                .arg(ENTRY_TTL_S)
                .ignore();
        }
        let () = pipe.query_async(&mut conn).await.unwrap();
    }
    let () = redis::cmd("CONFIG")
        .arg("RESETSTAT")
        .query_async(&mut conn)
        .await
        .unwrap();
    // A prime stride visits the keys in an order unrelated to their insertion.
    let script = redis::Script::new(
        "local found = 0
         for i = tonumber(ARGV[1]), tonumber(ARGV[2]) do
           found = found + redis.call('EXISTS', 'bench:calibrate:' .. (i * 7919) % tonumber(ARGV[3]))
         end
         return found",
    );
    let mut found = 0;
    for start in (0..LOOKUPS).step_by(1_000) {
        let n: u64 = script
            .arg(start)
            .arg(start + 999)
            .arg(KEYS)
            .invoke_async(&mut conn)
            .await
            .unwrap();
        found += n;
    }
    assert_eq!(found, LOOKUPS, "every calibration key is there");
    let stats: String = redis::cmd("INFO")
        .arg("commandstats")
        .query_async(&mut conn)
        .await
        .unwrap();
    let usec: f64 = stats
        .lines()
        .find(|l| l.starts_with("cmdstat_evalsha:") || l.starts_with("cmdstat_eval:"))
        .and_then(|l| l.split("usec=").nth(1))
        .and_then(|v| v.split(',').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(f64::NAN);
    let () = redis::cmd("FLUSHALL")
        .arg("ASYNC")
        .query_async(&mut conn)
        .await
        .unwrap();
    usec / LOOKUPS as f64
}

/// Redis' own CPU time so far (user + system), in seconds.
pub(crate) async fn redis_cpu_s(conn: &mut redis::aio::MultiplexedConnection) -> f64 {
    let info: String = redis::cmd("INFO")
        .arg("cpu")
        .query_async(conn)
        .await
        .unwrap();
    info.lines()
        .filter(|l| l.starts_with("used_cpu_user:") || l.starts_with("used_cpu_sys:"))
        .filter_map(|l| l.split(':').nth(1)?.trim().parse::<f64>().ok())
        .sum()
}
