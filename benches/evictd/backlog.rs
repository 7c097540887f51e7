//! The outbox's backlog: events queued before a daemon starts, drained.

use super::*;

/// A backlog of `events` queued outbox events, drained by a daemon started afterwards.
pub(crate) async fn backlog(lab: &Lab, db: &str, setting: &Setting, events: usize) -> Value {
    settle(lab, db).await;
    let client = lab.client(db).await;
    client
        .batch_execute(&format!(
            "INSERT INTO evictd.outbox (payload)
             SELECT '{{\"v\":1,\"op\":\"UPDATE\",\"table\":\"public.products\",\"cols\":[\"client_id\",\"id\"],\"rows\":[[\"00000000-0000-0000-0000-' || lpad((i % {CLIENTS})::text, 12, '0') || '\",\"00000000-0000-0000-0000-' || lpad(i::text, 12, '0') || '\"]]}}'
             FROM generate_series(0, {}) i",
            events - 1
        ))
        .await
        .unwrap();
    // A real backlog builds up over time, autovacuum working through its inserts as they come;
    // here they came at once, so vacuum them now rather than in the middle of the drain.
    settle(lab, db).await;
    let t = Instant::now();
    let daemon = lab.spawn(lab.evictd(db, setting, &["run", "--http-addr", "127.0.0.1:0"]));
    // Ready once the backlog is drained: however long that takes on a slow day.
    daemon
        .wait_log_within("evictd is ready", 1, Duration::from_secs(600))
        .await;
    let took = t.elapsed().as_secs_f64();
    let left: i64 = client
        .query_one("SELECT count(*) FROM evictd.outbox", &[])
        .await
        .unwrap()
        .get(0);
    let (_, peak_kb, cpu) = process_stats(daemon.child.id());
    if std::env::var_os("EVICTD_BENCH_LOG").is_some() {
        eprintln!("{}", daemon.log());
    }
    json!({
        "events": events,
        "drain_s": round(took * 1000.0) / 1000.0,
        "events_per_s": (events as f64 / took).round(),
        "left": left,
        "daemon_peak_rss_mb": round(peak_kb as f64 / 1024.0),
        "cpu_s_per_100k_events": round(cpu / events as f64 * 100_000.0),
    })
}
