//! The full run: every phase for each setting, the JSON report and the table.

use super::*;

/// What the full run needs from before the settings: the seeded laboratory, the deletions
/// Redis announces, the commit measured, and the no-trigger rate with asynchronous commits.
pub(crate) struct Before<'a> {
    pub lab: &'a Lab,
    pub deletions: &'a Deletions,
    pub commit: String,
    pub bare_sync_off: f64,
}

/// Every phase, setting after setting; writes `target/evictd-bench.json` and prints the table.
pub(crate) async fn full_run(before: Before<'_>, selected: &[&Setting]) -> Value {
    let Before {
        lab,
        deletions,
        commit,
        bare_sync_off,
    } = before;
    let (quick, products) = (lab.quick, lab.products);
    let mut results = Vec::new();
    for setting in selected {
        eprintln!("setting {}…", setting.name);
        let lookup_us = redis_lookup_us(&lab.redis).await;
        let db = format!("bench_{}", setting.name.replace('-', "_"));
        lab.database(&db, Some(setting)).await;
        let mut daemon = lab.start_daemon(&db, setting).await;
        let (idle_kb, _, _) = process_stats(daemon.child.id());

        // Alternating with the no-trigger baseline, so both see the same machine. Without
        // the latency phases' keyspace notifications: a Redis in production has none, and
        // each `tagts` marker's TTL would publish one.
        keyspace_events(lab, false).await;
        let (ratio, bare_rate, rate) =
            writer_ratio(lab, &db, &mut stopped_for_baseline(setting, &mut daemon)).await;
        keyspace_events(lab, true).await;
        // (A logical daemon was restarted for each baseline run: this one is the last.)
        let pid = daemon.child.id();
        // CPU per event is measured over the latency phases, whose events are counted (the
        // writer phase's are not).
        let (_, _, cpu_before) = process_stats(pid);
        let mut next = 0;
        let mut events = 0;
        let mut latencies = serde_json::Map::new();
        // Each phase's own share too: the closed loop's events, gathered into batches, are
        // most of the events and cost far less each than the open loops' one-event batches.
        let mut by_phase = serde_json::Map::new();
        let mut cpu_mark = cpu_before;
        let mut phase_cpu = |name: &str, n: usize, by_phase: &mut serde_json::Map<_, _>| {
            let (_, _, cpu) = process_stats(pid);
            by_phase.insert(
                name.to_string(),
                json!(round((cpu - cpu_mark) / n.max(1) as f64 * 100_000.0)),
            );
            cpu_mark = cpu;
        };
        for target in [500.0, 2_000.0] {
            let (achieved, lags, n) = latency(lab, &db, deletions, Some(target), next).await;
            phase_cpu(&format!("{target}"), n, &mut by_phase);
            next += n;
            events += n;
            latencies.insert(
                format!("{target}"),
                json!({ "achieved_per_s": achieved.round(), "lag": lags }),
            );
        }
        let admin = lab.client("postgres").await;
        admin
            .batch_execute(&format!("ALTER DATABASE {db} SET synchronous_commit = off"))
            .await
            .unwrap();
        let (max_rate, max_lags, n) = latency(lab, &db, deletions, None, next).await;
        phase_cpu("closed_loop", n, &mut by_phase);
        events += n;
        admin
            .batch_execute(&format!("ALTER DATABASE {db} RESET synchronous_commit"))
            .await
            .unwrap();
        let (_, peak_kb, cpu_after) = process_stats(pid);

        keyspace_events(lab, false).await;
        settle(lab, &db).await;
        let bulk_small = bulk_repeated(
            lab,
            &db,
            setting,
            deletions,
            100_000.min(products / 2),
            if quick { 1 } else { BULK_RUNS },
        )
        .await;
        // The peer's 1,000,000 notifications would take minutes to handle; its figure is the
        // 100,000-row one.
        let bulk_large = if quick || setting.delivery == PEER {
            Value::Null
        } else {
            bulk(lab, &db, setting, deletions, products).await
        };
        settle(lab, &db).await;
        // The peer has no manual invalidation to call.
        let tag = if setting.delivery == PEER {
            Value::Null
        } else {
            big_tag(lab, &db, if quick { 200_000 } else { 1_000_000 }).await
        };
        keyspace_events(lab, true).await;
        let (_, peak_after_bulk_kb, _) = process_stats(pid);
        drop(daemon);
        let drain = if setting.delivery == "outbox" {
            Some(backlog(lab, &db, setting, if quick { 100_000 } else { 1_000_000 }).await)
        } else {
            None
        };
        // The next setting runs on a quiet server: no autovacuum working through this one's
        // million-row tables meanwhile (it slowed the next setting's figures down by up to 2×).
        drop_database(lab, &db).await;
        // Nor on a Redis full of this one's keys: its backlog phase alone leaves 1,000,000
        // `tagts` markers (with a day's TTL) behind.
        // (ASYNC: a synchronous flush of that many keys outlasts the client's timeout.)
        let () = redis::cmd("FLUSHALL")
            .arg("ASYNC")
            .query_async(&mut lab.redis().await)
            .await
            .unwrap();
        results.push(json!({
            "setting": setting.name,
            "description": setting.what,
            "redis_us_per_cold_lookup": round(lookup_us),
            "writer": {
                "commits_per_s_no_triggers": bare_rate.round(),
                "commits_per_s_with_triggers": rate.round(),
                "ratio": round(ratio),
            },
            "latency": latencies,
            "synchronous_commit_off": {
                "commits_per_s_no_triggers": bare_sync_off.round(),
                "commits_per_s": max_rate.round(),
                "lag": max_lags,
            },
            "bulk_100k": bulk_small,
            "bulk_1m": bulk_large,
            "big_tag": tag,
            "backlog": drain,
            "daemon": {
                "rss_idle_mb": round(idle_kb as f64 / 1024.0),
                "rss_peak_mb_load": round(peak_kb as f64 / 1024.0),
                "rss_peak_mb_with_bulk": round(peak_after_bulk_kb as f64 / 1024.0),
                "cpu_s_per_100k_events": round((cpu_after - cpu_before) / events as f64 * 100_000.0),
                "cpu_s_per_100k_events_by_phase": by_phase,
            },
        }));
    }
    let report = json!({
        "commit": commit,
        "machine": format!("{} cores, {}", std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
            std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default().lines()
                .find(|l| l.starts_with("model name")).and_then(|l| l.split(':').nth(1)).unwrap_or("").trim()),
        "quick": quick,
        "products": products,
        "results": results,
    });
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("target/evictd-bench.json");
    std::fs::write(&path, serde_json::to_string_pretty(&report).unwrap()).unwrap();
    print_table(&report);
    eprintln!("\nwrote {}", path.display());
    report
}
