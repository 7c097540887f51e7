//! Latency: an open loop of commits, each on a product whose cache entry is watched, from the
//! writer's COMMIT to Redis announcing the deletion.

use super::*;

/// Open loop at `rate` commits/s (or closed loop when `rate` is None), one fresh product per
/// commit, each with its cache entry; returns the achieved rate and lag percentiles.
pub(crate) async fn latency(
    lab: &Lab,
    db: &str,
    deletions: &Deletions,
    rate: Option<f64>,
    first: usize,
) -> (f64, Value, usize) {
    let planned = match rate {
        Some(r) => (r * lab.phase().as_secs_f64()) as usize,
        None => 80_000,
    };
    cache_entries(lab, first..first + planned).await;
    deletions.clear().await;
    let commits: Arc<Mutex<Vec<(usize, Instant)>>> =
        Arc::new(Mutex::new(Vec::with_capacity(planned)));
    let start = Instant::now() + Duration::from_millis(50);
    let deadline = start + lab.phase();
    let mut tasks = Vec::new();
    for w in 0..WRITERS {
        let client = lab.client(db).await;
        let commits = commits.clone();
        tasks.push(tokio::spawn(async move {
            let statement = client.prepare(EDIT).await.unwrap();
            let mut k = w;
            while k < planned {
                if let Some(rate) = rate {
                    let due = start + Duration::from_secs_f64(k as f64 / rate);
                    tokio::time::sleep_until(due.into()).await;
                } else if Instant::now() > deadline {
                    break;
                }
                let i = first + k;
                client.execute(&statement, &[&product_id(i)]).await.unwrap();
                commits.lock().await.push((i, Instant::now()));
                k += WRITERS;
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let took = start.elapsed().as_secs_f64();
    let commits = commits.lock().await.clone();
    let _ = deletions
        .wait_count(commits.len() as u64, Duration::from_secs(30))
        .await;
    let seen = deletions.seen.lock().await;
    let mut lags = Vec::with_capacity(commits.len());
    let mut missing = 0;
    for (i, at) in &commits {
        match seen.get(&format!("cache:bench:e:{i}")) {
            Some(gone) => lags.push(gone.saturating_duration_since(*at).as_secs_f64() * 1000.0),
            None => missing += 1,
        }
    }
    (
        commits.len() as f64 / took,
        summary(lags, missing),
        commits.len(),
    )
}
