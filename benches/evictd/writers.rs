//! What evictd costs the writers: single-row UPDATEs in a closed loop with and without the
//! triggers (and, in `logical` delivery, without the daemon's walsender), alternated.

use super::*;

/// Runs with evictd in [`writer_ratio`], each between two baseline runs.
pub(crate) const WRITER_ROUNDS: usize = 5;

/// Closed loop: WRITERS connections updating random products as fast as they can.
/// Writer cost as a ratio robust to a machine whose fsync speed drifts (a shared VM disk can
/// halve or double the no-trigger rate within a minute): short runs alternating without and
/// with evictd, each "with" run compared with the mean of the "without" runs on either side.
/// Returns (median ratio, mean rate without, mean rate with).
///
/// `daemon`, when given, is stopped for every baseline run and started again after it: in
/// `logical` delivery its walsender costs the writers of *every* database in the cluster
/// (PostgreSQL 15 wakes each walsender at every WAL flush, and it reads and decodes every
/// record: with `pg_recvlogical` streaming an idle database, pgbench's single-row UPDATEs on
/// another ran 15 % slower, the walsender using 16 % of a core in 5,000 context switches a
/// second). A baseline beside it would hide that cost; a database without evictd has none.
pub(crate) async fn writer_ratio(
    lab: &Lab,
    db: &str,
    daemon: &mut Option<StoppedForBaseline<'_>>,
) -> (f64, f64, f64) {
    let each = lab.phase() / 2;
    let mut bare = vec![baseline_rate(lab, db, each, daemon).await];
    let mut with = Vec::new();
    for _ in 0..WRITER_ROUNDS {
        let walsender = match daemon {
            Some(_) => walsender_pid(lab).await,
            None => None,
        };
        let walsender_before = walsender.map_or(0.0, |pid| process_stats(pid).2);
        with.push(writer_rate_for(lab, db, each).await);
        if let (Some(stopped), Some(pid)) = (daemon.as_mut(), walsender) {
            stopped.walsender_cpu_s += process_stats(pid).2 - walsender_before;
        }
        bare.push(baseline_rate(lab, db, each, daemon).await);
    }
    let mut ratios: Vec<f64> = with
        .iter()
        .enumerate()
        .map(|(i, w)| w / ((bare[i] + bare[i + 1]) / 2.0))
        .collect();
    ratios.sort_by(f64::total_cmp);
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
    (ratios[WRITER_ROUNDS / 2], mean(&bare), mean(&with))
}

/// The daemon [`writer_ratio`] stops during its baseline runs (in `logical` delivery only),
/// the CPU seconds the daemons it stopped had used, and those their walsenders used while the
/// writers ran beside them.
pub(crate) struct StoppedForBaseline<'a> {
    setting: &'a Setting,
    daemon: &'a mut Daemon,
    pub(crate) cpu_s_of_stopped: f64,
    pub(crate) walsender_cpu_s: f64,
}

/// The process of the `logical` daemon's walsender, once it streams.
pub(crate) async fn walsender_pid(lab: &Lab) -> Option<u32> {
    let admin = lab.client("postgres").await;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let row = admin
            .query_opt(
                "SELECT pid FROM pg_stat_activity WHERE application_name = 'evictd-logical' \
                 AND backend_type = 'walsender'",
                &[],
            )
            .await
            .unwrap();
        if let Some(row) = row {
            return Some(row.get::<_, i32>(0) as u32);
        }
        if Instant::now() > deadline {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

pub(crate) fn stopped_for_baseline<'a>(
    setting: &'a Setting,
    daemon: &'a mut Daemon,
) -> Option<StoppedForBaseline<'a>> {
    (setting.delivery == "logical").then_some(StoppedForBaseline {
        setting,
        daemon,
        cpu_s_of_stopped: 0.0,
        walsender_cpu_s: 0.0,
    })
}

/// One no-trigger baseline run of [`writer_ratio`], the daemon (if given) stopped meanwhile.
pub(crate) async fn baseline_rate(
    lab: &Lab,
    db: &str,
    phase: Duration,
    daemon: &mut Option<StoppedForBaseline<'_>>,
) -> f64 {
    if let Some(stopped) = daemon {
        stopped.cpu_s_of_stopped += process_stats(stopped.daemon.child.id()).2;
        stopped.daemon.kill9();
    }
    let rate = writer_rate_for(lab, "bench_bare", phase).await;
    if let Some(stopped) = daemon {
        *stopped.daemon = lab.start_daemon(db, stopped.setting).await;
    }
    rate
}

pub(crate) async fn writer_rate(lab: &Lab, db: &str) -> f64 {
    writer_rate_for(lab, db, lab.phase()).await
}

pub(crate) async fn writer_rate_for(lab: &Lab, db: &str, phase: Duration) -> f64 {
    let deadline = Instant::now() + phase;
    let products = lab.products;
    let mut tasks = Vec::new();
    for w in 0..WRITERS {
        let client = lab.client(db).await;
        tasks.push(tokio::spawn(async move {
            let statement = client.prepare(EDIT).await.unwrap();
            let mut n = 0u64;
            let mut i = w * 7919;
            while Instant::now() < deadline {
                i = (i + 104_729) % products;
                client.execute(&statement, &[&product_id(i)]).await.unwrap();
                n += 1;
            }
            n
        }));
    }
    let started = Instant::now();
    let mut total = 0;
    for t in tasks {
        total += t.await.unwrap();
    }
    total as f64 / started.elapsed().as_secs_f64()
}
