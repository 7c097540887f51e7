//! The outbox: events written by the triggers into `evictd.outbox` in the writer's own
//! transaction. The daemon claims a batch by deleting it (`FOR UPDATE SKIP LOCKED`, so several
//! daemons share the work) in a transaction it commits only after Redis confirmed:
//! at-least-once, the rows come back if the daemon or Redis dies in between.

use std::collections::HashMap;

use tokio_postgres::{Client, Transaction};

/// One claimed outbox row. The payload stays in the row's own buffer (a statement of 100,000
/// rows is a payload of megabytes; it is not copied).
pub struct OutboxRow(tokio_postgres::Row);

impl OutboxRow {
    pub fn id(&self) -> i64 {
        self.0.get(0)
    }

    pub fn payload(&self) -> &str {
        self.0.get(1)
    }

    fn created_at(&self) -> std::time::SystemTime {
        self.0.get(2)
    }
}

/// A claimed batch: the rows are deleted in a transaction still open (other daemons skip them)
/// until [`Claim::ack`] commits it. Dropping it without `ack` hands the rows back.
pub struct Claim<'a> {
    tx: Transaction<'a>,
    pub rows: Vec<OutboxRow>,
}

/// Claims up to `limit` of the oldest unclaimed rows.
pub async fn claim(client: &mut Client, limit: i64) -> Result<Claim<'_>, tokio_postgres::Error> {
    let tx = client.transaction().await?;
    // One statement instead of a SELECT and a later DELETE of the same ids: the deletion is
    // what the transaction's commit makes final. (`= ANY(ARRAY(…))` evaluates the locking
    // subquery once.)
    let rows = tx
        .query(
            "DELETE FROM evictd.outbox WHERE id = ANY(ARRAY( \
                 SELECT id FROM evictd.outbox ORDER BY id LIMIT $1 FOR UPDATE SKIP LOCKED)) \
             RETURNING id, payload, created_at",
            &[&limit],
        )
        .await?
        .into_iter()
        .map(OutboxRow)
        .collect();
    Ok(Claim { tx, rows })
}

impl Claim<'_> {
    /// Moves the poison rows, with their error, to `evictd.dead_letter`, and commits: the
    /// processed rows' deletion becomes final.
    pub async fn ack(self, poison: &[(i64, String)]) -> Result<(), tokio_postgres::Error> {
        if !poison.is_empty() {
            // The rows are deleted already: their payload and age come from the claim.
            let by_id: HashMap<i64, &OutboxRow> = self.rows.iter().map(|r| (r.id(), r)).collect();
            let (mut ids, mut payloads, mut errors, mut created) =
                (Vec::new(), Vec::new(), Vec::new(), Vec::new());
            for (id, error) in poison {
                if let Some(row) = by_id.get(id) {
                    ids.push(*id);
                    payloads.push(row.payload());
                    errors.push(error.as_str());
                    created.push(row.created_at());
                }
            }
            self.tx
                .execute(
                    "INSERT INTO evictd.dead_letter (id, payload, error, created_at) \
                     SELECT * FROM unnest($1::bigint[], $2::text[], $3::text[], $4::timestamptz[]) \
                     ON CONFLICT (id) DO NOTHING",
                    &[&ids, &payloads, &errors, &created],
                )
                .await?;
        }
        self.tx.commit().await
    }
}

/// Events waiting (an estimate is not good enough for the `stats` and `doctor` output).
pub async fn backlog(
    client: &impl tokio_postgres::GenericClient,
) -> Result<i64, tokio_postgres::Error> {
    Ok(client
        .query_one("SELECT count(*) FROM evictd.outbox", &[])
        .await?
        .get(0))
}
