//! One big UPDATE: the statement with and without the triggers, the events it produced, and how
//! soon every affected entry is gone.

use super::*;

/// One UPDATE of `rows` rows (products 0..rows): statement time with and without the triggers,
/// events it produced, time from COMMIT to the last affected entry gone, precise or table-wide.
pub(crate) async fn bulk(
    lab: &Lab,
    db: &str,
    setting: &Setting,
    deletions: &Deletions,
    rows: usize,
) -> Value {
    let client = lab.client(db).await;
    let sql = format!(
        "UPDATE products SET price_cents = price_cents + 1 WHERE id <= '{}'::uuid",
        product_id(rows - 1)
    );
    let bare = if setting.delivery == "logical" {
        // No trigger to disable: the change would still be streamed (and invalidated while
        // the entries below are written). Bare means the database without evictd.
        let plain = lab.client("bench_bare").await;
        let t = Instant::now();
        plain.batch_execute(&sql).await.unwrap();
        let bare = t.elapsed().as_secs_f64();
        plain
            .batch_execute("VACUUM (ANALYZE) products")
            .await
            .unwrap();
        bare
    } else {
        client
            .batch_execute("ALTER TABLE products DISABLE TRIGGER USER")
            .await
            .unwrap();
        let t = Instant::now();
        client.batch_execute(&sql).await.unwrap();
        let bare = t.elapsed().as_secs_f64();
        client
            .batch_execute("ALTER TABLE products ENABLE TRIGGER USER")
            .await
            .unwrap();
        client
            .batch_execute("VACUUM (ANALYZE) products")
            .await
            .unwrap();
        bare
    };
    // ANALYZE too: the bare UPDATE counts towards autoanalyze's threshold (10 % of the table),
    // and an autoanalyze of the million-row table could otherwise start in the middle of the
    // measured statement's invalidation.

    // Entries for (up to) 100,000 of the updated rows, and one for a row it does not touch.
    let watched = rows.min(100_000);
    cache_entries(lab, 0..watched).await;
    cache_entries(lab, rows..rows + 1).await;
    deletions.clear().await;
    let sequence = "SELECT CASE WHEN is_called THEN last_value ELSE last_value - 1 END FROM evictd.outbox_id_seq";
    let outbox_before: i64 = if setting.delivery == "outbox" {
        client.query_one(sequence, &[]).await.unwrap().get(0)
    } else {
        0
    };
    // What the notify delivery's triggers send, heard on the channel (their signatures are not
    // checked here: only whether the event went table-wide is read).
    let mut listener = support::listen(&lab.url(db)).await;

    // A 0.1 % sample is polled every few milliseconds (cheap enough not to slow Redis down:
    // a 1 % one took a tenth of Redis' CPU in this phase); once it is gone, every watched entry
    // is checked, and the clock stops only when none is left.
    let sample: Vec<String> = (0..watched)
        .step_by(1000)
        .chain([watched - 1])
        .map(|i| format!("cache:bench:e:{i}"))
        .collect();
    let everything: Vec<String> = (0..watched).map(|i| format!("cache:bench:e:{i}")).collect();
    let mut poll = lab.redis().await;
    let () = redis::cmd("CONFIG")
        .arg("RESETSTAT")
        .query_async(&mut poll)
        .await
        .unwrap();
    let cpu_before = redis_cpu_s(&mut poll).await;
    if std::env::var_os("EVICTD_BENCH_LOG").is_some() {
        // What Redis holds when the phase starts (the same tags cost more Redis CPU inside the
        // full run than alone).
        for section in ["keyspace", "memory"] {
            let info: String = redis::cmd("INFO")
                .arg(section)
                .query_async(&mut poll)
                .await
                .unwrap();
            eprintln!("redis before bulk {rows}: {}", info.replace("\r\n", " | "));
        }
    }
    let t = Instant::now();
    client.batch_execute(&sql).await.unwrap();
    let with_triggers = t.elapsed().as_secs_f64();
    let committed = Instant::now();
    let mut gone_after = None;
    // When the first sampled entry went: what comes before is the daemon's start (wake-up,
    // fetching and parsing the statement's event); what comes after, Redis removing entries.
    let mut first_gone_after = None;
    while committed.elapsed() < Duration::from_secs(60) {
        let mut left: u64 = poll.exists(&sample).await.unwrap();
        if first_gone_after.is_none() && left < sample.len() as u64 {
            first_gone_after = Some(committed.elapsed().as_secs_f64());
        }
        if left == 0 {
            let at = committed.elapsed().as_secs_f64();
            for chunk in everything.chunks(10_000) {
                left += poll.exists::<_, u64>(chunk).await.unwrap();
            }
            if left == 0 {
                gone_after = Some(at);
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let redis_cpu_s = redis_cpu_s(&mut poll).await - cpu_before;
    if std::env::var_os("EVICTD_BENCH_LOG").is_some() {
        let stats: String = redis::cmd("INFO")
            .arg("commandstats")
            .query_async(&mut poll)
            .await
            .unwrap();
        eprintln!("{stats}");
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut notifications = Vec::new();
    while let Ok(p) = listener.payloads.try_recv() {
        notifications.push(p);
    }
    let (events, wide) = if setting.delivery == "outbox" {
        // The daemon may already have consumed the rows: count what the statement wrote via
        // the identity sequence instead.
        let after: i64 = client.query_one(sequence, &[]).await.unwrap().get(0);
        let events = after - outbox_before;
        let kept: i64 = client
            .query_one("SELECT count(*) FROM evictd.outbox", &[])
            .await
            .unwrap()
            .get(0);
        let _ = kept;
        (events, None)
    } else if setting.delivery == "logical" {
        // One transaction; whether it went table-wide shows in the untouched entry.
        (1, None)
    } else {
        let wide = notifications.iter().any(|p| p.contains("\"wide\":true"));
        (notifications.len() as i64, Some(wide))
    };
    let mut redis = lab.redis().await;
    let untouched: bool = redis.exists(format!("cache:bench:e:{rows}")).await.unwrap();
    let _: () = redis.del(format!("cache:bench:e:{rows}")).await.unwrap();
    json!({
        "rows": rows,
        "statement_s_bare": round(bare * 1000.0) / 1000.0,
        "statement_s_with_triggers": round(with_triggers * 1000.0) / 1000.0,
        "overhead_pct": round((with_triggers / bare - 1.0) * 100.0),
        "events": events,
        "commit_to_last_key_gone_s": gone_after.map(|s| round(s * 1000.0) / 1000.0),
        "commit_to_first_key_gone_s": first_gone_after.map(|s| round(s * 1000.0) / 1000.0),
        "redis_cpu_s": round(redis_cpu_s * 1000.0) / 1000.0,
        "precise": wide.map_or(untouched, |w| !w && untouched),
    })
}

/// The bulk phase `times` times over the same rows, reported as the run with the median time
/// to the last key gone, with every run's figures beside it: a single 0.6-second measurement on
/// this shared VM swings by ±30 % from one minute to the next (the bare statement with it).
pub(crate) async fn bulk_repeated(
    lab: &Lab,
    db: &str,
    setting: &Setting,
    deletions: &Deletions,
    rows: usize,
    times: usize,
) -> Value {
    let mut runs = Vec::with_capacity(times);
    for i in 0..times {
        if i > 0 {
            settle(lab, db).await;
        }
        runs.push(bulk(lab, db, setting, deletions, rows).await);
    }
    let gone = |run: &Value| {
        run["commit_to_last_key_gone_s"]
            .as_f64()
            .unwrap_or(f64::INFINITY)
    };
    runs.sort_by(|a, b| gone(a).total_cmp(&gone(b)));
    let every = |key: &str| -> Vec<Value> { runs.iter().map(|r| r[key].clone()).collect() };
    let (gone_s, bare_s) = (
        every("commit_to_last_key_gone_s"),
        every("statement_s_bare"),
    );
    let mut median = runs[runs.len() / 2].clone();
    median["runs_commit_to_last_key_gone_s"] = Value::from(gone_s);
    median["runs_statement_s_bare"] = Value::from(bare_s);
    median
}
