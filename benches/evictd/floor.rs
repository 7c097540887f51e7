//! The floor of a NOTIFY-based listener on this machine: a row trigger NOTIFYing the changed
//! row's id, and a listener in this process that answers each notification with one `DEL` of
//! the entry (no tag set read, no batching, no acknowledgement). What is left of the latency is
//! PostgreSQL delivering the notification and one Redis round trip: no listener, evictd or the
//! peer, can invalidate sooner after a commit.

use super::*;

const FLOOR_SQL: &str = "
CREATE FUNCTION floor_notify() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('cache_invalidation', NEW.id::text);
    RETURN NULL;
END $$;
CREATE TRIGGER floor_notify AFTER UPDATE ON products FOR EACH ROW EXECUTE FUNCTION floor_notify();
";

pub(crate) async fn floor_alone(lab: &Lab, deletions: &Deletions) {
    let db = "bench_floor";
    lab.database(db, None).await;
    lab.client(db).await.batch_execute(FLOOR_SQL).await.unwrap();
    let mut listener = support::listen(&lab.url(db)).await;
    let mut redis = lab.redis().await;
    let answering = tokio::spawn(async move {
        while let Some(id) = listener.payloads.recv().await {
            let i: usize = id.rsplit('-').next().unwrap().parse().unwrap();
            let _: u64 = redis.del(format!("cache:bench:e:{i}")).await.unwrap();
        }
    });
    keyspace_events(lab, false).await;
    let (ratio, bare, with) = writer_ratio(lab, db, &mut None).await;
    keyspace_events(lab, true).await;
    println!(
        "floor (row trigger NOTIFY, one DEL per notification): writers kept {:.0} % ({with:.0} vs {bare:.0}/s)",
        ratio * 100.0
    );
    let mut next = 0;
    for rate in [500.0, 2_000.0] {
        let (achieved, lags, n) = latency(lab, db, deletions, Some(rate), next).await;
        next += n;
        println!(
            "floor @{rate}/s (achieved {achieved:.0}): p50 {} ms, p90 {} ms, p99 {} ms, max {} ms, missing {}",
            lags["p50_ms"], lags["p90_ms"], lags["p99_ms"], lags["max_ms"], lags["missing"]
        );
    }
    answering.abort();
    bulk_floor(lab).await;
}

/// Redis' own cost for what a 100,000-row UPDATE makes it do, with no discovery and no
/// script: the entries and their one-member tag sets UNLINKed 500 keys a call, then the same
/// with every tag's `tagts` marker written too (MSET, 200 a call), pipelined as fast as Redis
/// takes them. The bulk phase's time to the last entry gone is measured against this.
async fn bulk_floor(lab: &Lab) {
    const ROWS: usize = 100_000;
    let mut redis = lab.redis().await;
    for markers in [false, true] {
        cache_entries(lab, 0..ROWS).await;
        let tags: Vec<String> = (0..ROWS)
            .map(|i| format!("products:id:{}", product_id(i)))
            .collect();
        let keys: Vec<String> = (0..ROWS)
            .map(|i| format!("cache:bench:e:{i}"))
            .chain(tags.iter().map(|t| format!("cache:tag:{t}")))
            .collect();
        let mut pipe = redis::pipe();
        for chunk in keys.chunks(500) {
            pipe.cmd("UNLINK").arg(chunk).ignore();
        }
        if markers {
            for chunk in tags.chunks(200) {
                let mut mset = redis::cmd("MSET");
                for tag in chunk {
                    mset.arg(format!("cache:tagts:{tag}")).arg("1764892800000");
                }
                pipe.add_command(mset).ignore();
            }
        }
        let cpu_before = redis_cpu_s(&mut redis).await;
        let t = Instant::now();
        let () = pipe.query_async(&mut redis).await.unwrap();
        let took = t.elapsed().as_secs_f64();
        let cpu = redis_cpu_s(&mut redis).await - cpu_before;
        println!(
            "floor UPDATE {ROWS} rows{}: {took:.3} s, Redis CPU {cpu:.3} s",
            if markers {
                ", entries, tag sets and markers"
            } else {
                ", entries and tag sets"
            }
        );
    }
}
