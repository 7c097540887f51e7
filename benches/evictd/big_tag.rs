//! One tag of a million members invalidated while another client PINGs: how long Redis was
//! blocked, and the daemon's longest command by Redis' own clock.

use super::*;

/// Invalidates one tag of `members` members while another client PINGs in a loop.
pub(crate) async fn big_tag(lab: &Lab, db: &str, members: usize) -> Value {
    let mut conn = lab.redis().await;
    let keys: Vec<String> = (0..members)
        .map(|i| format!("cache:bench:big:{i}"))
        .collect();
    for chunk in keys.chunks(20_000) {
        let mut pipe = redis::pipe();
        for key in chunk {
            pipe.cmd("SET")
                .arg(key)
                .arg("v")
                .arg("EX")
                .arg(ENTRY_TTL_S)
                .ignore();
        }
        pipe.cmd("SADD")
            .arg("cache:tag:bench:big")
            .arg(chunk)
            .ignore();
        let () = pipe.query_async(&mut conn).await.unwrap();
    }
    let before: u64 = redis::cmd("DBSIZE").query_async(&mut conn).await.unwrap();
    // Redis' own account of how long each command ran (the PING loop also counts the time
    // the client or Redis waited for a CPU on this shared machine).
    let () = redis::cmd("CONFIG")
        .arg("SET")
        .arg("slowlog-log-slower-than")
        .arg(1_000)
        .query_async(&mut conn)
        .await
        .unwrap();
    let () = redis::cmd("CONFIG")
        .arg("SET")
        .arg("slowlog-max-len")
        .arg(100_000)
        .query_async(&mut conn)
        .await
        .unwrap();
    let () = redis::cmd("SLOWLOG")
        .arg("RESET")
        .query_async(&mut conn)
        .await
        .unwrap();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let pinger = {
        let mut ping_conn = lab.redis().await;
        let stop = stop.clone();
        tokio::spawn(async move {
            let mut worst = Duration::ZERO;
            let mut n = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let t = Instant::now();
                let _: String = redis::cmd("PING")
                    .query_async(&mut ping_conn)
                    .await
                    .unwrap();
                worst = worst.max(t.elapsed());
                n += 1;
            }
            (worst, n)
        })
    };
    let client = lab.client(db).await;
    let t = Instant::now();
    client
        .batch_execute("SELECT evictd.invalidate_tags('bench:big')")
        .await
        .unwrap();
    loop {
        let size: u64 = redis::cmd("DBSIZE").query_async(&mut conn).await.unwrap();
        // The invalidation may create two keys of its own: the tag's `tagts` marker and, on a
        // fresh Redis, evictd's counters hash.
        if size + members as u64 <= before + 2 || t.elapsed() > Duration::from_secs(120) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let took = t.elapsed().as_secs_f64();
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (worst, pings) = pinger.await.unwrap();
    let slow: Vec<redis::Value> = redis::cmd("SLOWLOG")
        .arg("GET")
        .arg(100_000)
        .query_async(&mut conn)
        .await
        .unwrap();
    // Sorted longest first, once.
    let micros = slow_entry_micros;
    // The bench's own SLOWLOG RESET is logged too (and freeing the previous phase's 100,000
    // entries took 12–19 ms): only the daemon's commands count.
    let is_slowlog = |entry: &redis::Value| match entry {
        redis::Value::Array(fields) => match fields.get(3) {
            Some(redis::Value::Array(args)) => matches!(
                args.first(),
                Some(redis::Value::BulkString(name)) if name.eq_ignore_ascii_case(b"SLOWLOG")
            ),
            _ => false,
        },
        _ => false,
    };
    let mut slow: Vec<redis::Value> = slow.into_iter().filter(|e| !is_slowlog(e)).collect();
    slow.sort_by_key(|entry| std::cmp::Reverse(micros(entry)));
    let () = redis::cmd("SLOWLOG")
        .arg("RESET")
        .query_async(&mut conn)
        .await
        .unwrap();
    let longest_us = slow.first().map_or(0, micros);
    // What the longest was: a drain call of the usual size that took long was descheduled
    // (the VM, or a vacuum), not too big.
    let longest_command = slow.first().map_or(String::new(), describe_slow_entry);
    let median_slow_us = slow.get(slow.len() / 2).map_or(0, micros);
    if std::env::var_os("EVICTD_BENCH_LOG").is_some() {
        for entry in slow.iter().take(5) {
            eprintln!("slowlog: {entry:?}");
        }
    }
    json!({
        "members": members,
        "total_s": round(took * 1000.0) / 1000.0,
        "worst_ping_ms": round(worst.as_secs_f64() * 1000.0),
        "longest_command_ms": round(longest_us as f64 / 1000.0),
        "longest_command": longest_command,
        "commands_over_1ms": slow.len(),
        "median_of_those_ms": round(median_slow_us as f64 / 1000.0),
        "pings": pings,
    })
}

/// How long a SLOWLOG entry's command ran, µs (an entry is [id, time, µs, command…]).
pub(crate) fn slow_entry_micros(entry: &redis::Value) -> i64 {
    match entry {
        redis::Value::Array(fields) => match fields.get(2) {
            Some(redis::Value::Int(us)) => *us,
            _ => 0,
        },
        _ => 0,
    }
}

/// A SLOWLOG entry's command as text, script hashes shortened, cut at 100 characters.
pub(crate) fn describe_slow_entry(entry: &redis::Value) -> String {
    let redis::Value::Array(fields) = entry else {
        return String::new();
    };
    let Some(redis::Value::Array(args)) = fields.get(3) else {
        return String::new();
    };
    let words: Vec<String> = args
        .iter()
        .map(|arg| match arg {
            redis::Value::BulkString(bytes) if bytes.len() == 40 => {
                format!("{}…", String::from_utf8_lossy(&bytes[..8]))
            }
            redis::Value::BulkString(bytes) => String::from_utf8_lossy(bytes).into_owned(),
            other => format!("{other:?}"),
        })
        .collect();
    words.join(" ").chars().take(100).collect()
}
