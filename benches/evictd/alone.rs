//! The benchmark's modes that measure one thing alone, for iterating on it.

use super::*;

/// `--writers`: the writers' cost alone, with and without the daemon running.
pub(crate) async fn writers_alone(lab: &Lab, selected: &[&Setting]) {
    // Writer cost alone, with and without the daemon running, to separate what the
    // triggers cost from what the daemon's own work costs the writers.
    keyspace_events(lab, false).await;
    for setting in selected {
        let db = format!("bench_{}", setting.name.replace('-', "_"));
        lab.database(&db, Some(setting)).await;
        let (alone, bare, with) = writer_ratio(lab, &db, &mut None).await;
        let mut daemon = lab.start_daemon(&db, setting).await;
        let mut redis = lab.redis().await;
        let (daemon_before, redis_before) = (
            process_stats(daemon.child.id()).2,
            redis_cpu_s(&mut redis).await,
        );
        let mut stopped = stopped_for_baseline(setting, &mut daemon);
        let (together, bare_again, with_daemon) = writer_ratio(lab, &db, &mut stopped).await;
        let (cpu_s_of_stopped, walsender_cpu_s) =
            stopped.map_or((0.0, 0.0), |s| (s.cpu_s_of_stopped, s.walsender_cpu_s));
        // What the daemon and Redis spent per commit (they idle during the baseline runs,
        // or in `logical` delivery are stopped then; the restarted daemons' start-up is
        // counted in).
        let commits = with_daemon * (lab.phase() / 2).as_secs_f64() * WRITER_ROUNDS as f64;
        let per_commit = |seconds: f64| seconds / commits * 1e6;
        let daemon_us =
            per_commit(cpu_s_of_stopped + process_stats(daemon.child.id()).2 - daemon_before);
        let redis_us = per_commit(redis_cpu_s(&mut redis).await - redis_before);
        let walsender = if setting.delivery == "logical" {
            format!(", walsender {:.1} µs", per_commit(walsender_cpu_s))
        } else {
            String::new()
        };
        drop(daemon);
        println!(
            "{:<14} without the daemon: {:>3.0} % ({:>6.0} vs {:>6.0}/s)  | with it running: {:>3.0} % ({:>6.0} vs {:>6.0}/s); CPU per commit: daemon {daemon_us:.1} µs, Redis {redis_us:.1} µs{walsender}",
            setting.name,
            alone * 100.0,
            with,
            bare,
            together * 100.0,
            with_daemon,
            bare_again,
        );
    }
}

/// `--lag [--rate N]`: the `synchronous_commit = off` lag alone.
pub(crate) async fn lag_alone(
    lab: &Lab,
    selected: &[&Setting],
    deletions: &Deletions,
    open_rate: Option<f64>,
) {
    // The `synchronous_commit = off` closed loop alone: how far behind each setting falls
    // (`--rate N`: an open loop at N commits/s instead, the same load for every setting).
    for setting in selected {
        let db = format!("bench_{}", setting.name.replace('-', "_"));
        lab.database(&db, Some(setting)).await;
        let daemon = lab.start_daemon(&db, setting).await;
        let admin = lab.client("postgres").await;
        admin
            .batch_execute(&format!("ALTER DATABASE {db} SET synchronous_commit = off"))
            .await
            .unwrap();
        // Who is busy: the daemon, and in logical mode the walsender decoding for it.
        let walsender: Option<i32> = admin
            .query_opt(
                "SELECT pid FROM pg_stat_activity WHERE application_name = 'evictd-logical'",
                &[],
            )
            .await
            .unwrap()
            .map(|row| row.get(0));
        let cpu = |pid: Option<u32>| pid.map_or(0.0, |pid| process_stats(pid).2);
        let daemon_pid = Some(daemon.child.id());
        let walsender_pid = walsender.map(|pid| pid as u32);
        let (daemon_before, walsender_before) = (cpu(daemon_pid), cpu(walsender_pid));
        let t = Instant::now();
        let (rate, lags, _) = latency(lab, &db, deletions, open_rate, 0).await;
        let seconds = t.elapsed().as_secs_f64();
        let daemon_cpu = (cpu(daemon_pid) - daemon_before) / seconds * 100.0;
        let walsender_cpu = (cpu(walsender_pid) - walsender_before) / seconds * 100.0;
        if std::env::var_os("EVICTD_BENCH_LOG").is_some() {
            eprintln!("{}", daemon.log());
        }
        drop(daemon);
        println!(
            "{:<14} {rate:.0} commits/s, lag {lags}, {}; CPU: daemon {daemon_cpu:.0} %, walsender {walsender_cpu:.0} %",
            setting.name,
            trend(&lags)
        );
    }
}

/// `--bulk`: the 100,000-row UPDATE (and without `--quick` the 1,000,000-row one) alone.
pub(crate) async fn bulk_alone(lab: &Lab, selected: &[&Setting], deletions: &Deletions) {
    // The 100,000-row UPDATE alone for each setting (and the 1,000,000-row one without
    // `--lab.quick`): the figures to iterate on.
    keyspace_events(lab, false).await;
    for setting in selected {
        let db = format!("bench_{}", setting.name.replace('-', "_"));
        println!(
            "{:<14} machine speed: {:.2} µs per Redis lookup of a cold key",
            setting.name,
            redis_lookup_us(&lab.redis).await
        );
        lab.database(&db, Some(setting)).await;
        let daemon = lab.start_daemon(&db, setting).await;
        let result = bulk_repeated(
            lab,
            &db,
            setting,
            deletions,
            100_000.min(lab.products / 2),
            BULK_RUNS,
        )
        .await;
        if std::env::var_os("EVICTD_BENCH_LOG").is_some() {
            eprintln!("{}", daemon.log());
        }
        println!("{:<14} {result}", setting.name);
        if !lab.quick {
            let result = bulk(lab, &db, setting, deletions, lab.products).await;
            println!("{:<14} {result}", setting.name);
        }
        let (_, peak_kb, _) = process_stats(daemon.child.id());
        println!(
            "{:<14} daemon peak RSS {:.1} MB",
            setting.name,
            peak_kb as f64 / 1024.0
        );
        drop(daemon);
    }
}

/// `--big-tag`: one tag of 1,000,000 members (200,000 with `--quick`) invalidated alone.
pub(crate) async fn big_tag_alone(lab: &Lab, selected: &[&Setting]) {
    // One tag of 1,000,000 members (200,000 with `--lab.quick`) invalidated alone, by the
    // daemon of the first (selected) setting.
    let setting = selected[0];
    // As in the full run: no keyspace notification for each of the million deletions.
    keyspace_events(lab, false).await;
    lab.database("bench_big", Some(setting)).await;
    let daemon = lab.start_daemon("bench_big", setting).await;
    let result = big_tag(
        lab,
        "bench_big",
        if lab.quick { 200_000 } else { 1_000_000 },
    )
    .await;
    drop(daemon);
    println!("big tag: {result}");
}

/// `--backlog`: the outbox settings' backlog drain alone.
pub(crate) async fn backlog_alone(lab: &Lab, selected: &[&Setting]) {
    // The outbox settings' backlog drain alone (1,000,000 events; 100,000 with `--lab.quick`).
    for setting in selected.iter().filter(|s| s.delivery == "outbox") {
        let db = format!("bench_{}", setting.name.replace('-', "_"));
        lab.database(&db, Some(setting)).await;
        let events = if lab.quick { 100_000 } else { 1_000_000 };
        let result = backlog(lab, &db, setting, events).await;
        println!("{:<14} {result}", setting.name);
    }
}
