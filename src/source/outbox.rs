//! The outbox: events written by the triggers into `evictd.outbox` in the writer's own
//! transaction. The daemon claims a batch with `FOR UPDATE SKIP LOCKED` (so several daemons
//! share the work), invalidates it in Redis, and only then deletes the rows in the same
//! transaction: at-least-once, nothing lost if the daemon or Redis dies in between.

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
}

/// A claimed batch: the rows stay locked (invisible to other daemons) until the transaction
/// ends. Dropping it without [`Claim::ack`] hands the rows back.
pub struct Claim<'a> {
    tx: Transaction<'a>,
    pub rows: Vec<OutboxRow>,
}

/// Claims up to `limit` of the oldest unclaimed rows.
pub async fn claim(client: &mut Client, limit: i64) -> Result<Claim<'_>, tokio_postgres::Error> {
    let tx = client.transaction().await?;
    let rows = tx
        .query(
            "SELECT id, payload FROM evictd.outbox ORDER BY id LIMIT $1 FOR UPDATE SKIP LOCKED",
            &[&limit],
        )
        .await?
        .into_iter()
        .map(OutboxRow)
        .collect();
    Ok(Claim { tx, rows })
}

impl Claim<'_> {
    /// Deletes the processed rows and moves the poison ones, with their error, to
    /// `evictd.dead_letter`; commits.
    pub async fn ack(self, poison: &[(i64, String)]) -> Result<(), tokio_postgres::Error> {
        if !poison.is_empty() {
            let ids: Vec<i64> = poison.iter().map(|(id, _)| *id).collect();
            let errors: Vec<&str> = poison.iter().map(|(_, e)| e.as_str()).collect();
            self.tx
                .execute(
                    "INSERT INTO evictd.dead_letter (id, payload, error, created_at) \
                     SELECT o.id, o.payload, p.error, o.created_at \
                     FROM evictd.outbox o JOIN unnest($1::bigint[], $2::text[]) AS p(id, error) ON p.id = o.id \
                     ON CONFLICT (id) DO NOTHING",
                    &[&ids, &errors],
                )
                .await?;
        }
        let ids: Vec<i64> = self.rows.iter().map(OutboxRow::id).collect();
        self.tx
            .execute("DELETE FROM evictd.outbox WHERE id = ANY($1)", &[&ids])
            .await?;
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
