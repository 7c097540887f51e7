//! The outbox: events written by the triggers into `evictd.outbox` in the writer's own
//! transaction. The daemon claims a batch by deleting it (`FOR UPDATE SKIP LOCKED`, so several
//! daemons share the work) in a transaction it commits only after Redis confirmed:
//! at-least-once, the rows come back if the daemon or Redis dies in between.

use std::time::SystemTime;

use tokio_postgres::types::Type;
use tokio_postgres::{Client, Statement, Transaction};

/// One claimed outbox row. The payload stays in the row's own buffer (a statement of 100,000
/// rows is megabytes of payloads; they are not copied).
pub struct OutboxRow(tokio_postgres::Row);

impl OutboxRow {
    pub fn id(&self) -> i64 {
        self.0.get(0)
    }

    pub fn payload(&self) -> &str {
        self.0.get(1)
    }

    fn created_at(&self) -> SystemTime {
        self.0.get(2)
    }
}

/// The rows of one [`Claim::take`], as they arrive.
pub struct Taken(std::pin::Pin<Box<tokio_postgres::RowStream>>);

impl Taken {
    /// The next row taken; `None` once every row of this take has arrived.
    pub async fn next(&mut self) -> Option<Result<OutboxRow, tokio_postgres::Error>> {
        use futures_util::StreamExt as _;
        Some(self.0.next().await?.map(OutboxRow))
    }
}

/// An event that cannot be processed, on its way to `evictd.dead_letter` with the reason.
pub struct Poison {
    pub id: i64,
    pub payload: String,
    pub created_at: SystemTime,
    pub error: String,
}

impl Poison {
    pub fn new(row: &OutboxRow, error: String) -> Self {
        Self {
            id: row.id(),
            payload: row.payload().to_string(),
            created_at: row.created_at(),
            error,
        }
    }
}

/// Takes up to $1 of the oldest unclaimed rows in one statement, instead of a SELECT and a
/// later DELETE of the same ids (`= ANY(ARRAY(…))` evaluates the locking subquery once).
const TAKE: &str = "DELETE FROM evictd.outbox WHERE id = ANY(ARRAY( \
                        SELECT id FROM evictd.outbox ORDER BY id LIMIT $1 FOR UPDATE SKIP LOCKED)) \
                    RETURNING id, payload, created_at";

/// [`TAKE`], prepared once per connection: each claim then costs one round trip less, and
/// PostgreSQL neither parses nor plans it again.
pub struct TakeStatement(Statement);

/// Prepares [`TAKE`] on the daemon's session (whose search path is pinned).
pub async fn prepare_take(client: &Client) -> Result<TakeStatement, tokio_postgres::Error> {
    Ok(TakeStatement(
        client.prepare_typed(TAKE, &[Type::INT8]).await?,
    ))
}

/// A claim transaction: the rows it takes are deleted in it, so other daemons skip them, and
/// the deletion becomes final only when [`Claim::ack`] commits, after Redis confirmed.
/// Dropping it without `ack` hands every row back.
pub struct Claim<'a> {
    tx: Transaction<'a>,
    take: &'a TakeStatement,
}

/// Starts a claim transaction on the connection `take` was prepared on.
pub async fn begin<'a>(
    client: &'a mut Client,
    take: &'a TakeStatement,
) -> Result<Claim<'a>, tokio_postgres::Error> {
    Ok(Claim {
        tx: client.transaction().await?,
        take,
    })
}

impl Claim<'_> {
    /// Takes up to `limit` of the oldest unclaimed rows, handed over one by one as PostgreSQL
    /// sends them (it deletes them all first, then reads each payload out of TOAST as it sends
    /// it): the caller starts on the first event of a big statement while the server still
    /// reads the next ones. `&self`: it may run while the rows taken before
    /// are being invalidated. Consume the stream before the next statement of this claim.
    pub async fn take(&self, limit: i64) -> Result<Taken, tokio_postgres::Error> {
        let rows = self.tx.query_raw(&self.take.0, [limit]).await?;
        Ok(Taken(Box::pin(rows)))
    }

    /// Moves the poison rows to `evictd.dead_letter` and commits: the deletion of everything
    /// taken becomes final.
    pub async fn ack(self, poison: &[Poison]) -> Result<(), tokio_postgres::Error> {
        if !poison.is_empty() {
            let ids: Vec<i64> = poison.iter().map(|p| p.id).collect();
            let payloads: Vec<&str> = poison.iter().map(|p| p.payload.as_str()).collect();
            let errors: Vec<&str> = poison.iter().map(|p| p.error.as_str()).collect();
            let created: Vec<SystemTime> = poison.iter().map(|p| p.created_at).collect();
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

/// The outbox's waiting events.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Backlog {
    /// How many (an estimate is not good enough for the `stats` and `doctor` output).
    pub waiting: i64,
    /// How long the oldest has waited, 0 when none does.
    pub oldest_age_seconds: f64,
}

pub async fn backlog(
    client: &impl tokio_postgres::GenericClient,
) -> Result<Backlog, tokio_postgres::Error> {
    let row = client
        .query_one(
            "SELECT pg_catalog.count(*), coalesce(extract(epoch FROM \
                 pg_catalog.clock_timestamp() OPERATOR(pg_catalog.-) pg_catalog.min(created_at)), 0)::float8 \
             FROM evictd.outbox",
            &[],
        )
        .await?;
    Ok(Backlog {
        waiting: row.get(0),
        oldest_age_seconds: row.get::<_, f64>(1).max(0.0),
    })
}
