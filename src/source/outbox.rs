//! The outbox: events written by the triggers into `evictd.outbox` in the writer's own
//! transaction. The daemon claims a batch by deleting it (`FOR UPDATE SKIP LOCKED`, so several
//! daemons share the work) in a transaction it commits only after Redis confirmed:
//! at-least-once, the rows come back if the daemon or Redis dies in between.

use std::sync::atomic::{AtomicBool, Ordering};

use futures_util::StreamExt as _;
use tokio_postgres::{Client, SimpleQueryMessage, SimpleQueryRow, SimpleQueryStream};

/// One claimed outbox row, as text (the claim runs in the simple query protocol, see
/// [`TakeStatement`]). The payload stays in the row's own buffer (a statement of 100,000 rows
/// is megabytes of payloads; they are not copied).
pub struct OutboxRow(SimpleQueryRow);

impl OutboxRow {
    /// Column `i` of the claim's three (id, payload, created_at); none is NULL.
    fn column(&self, i: usize) -> &str {
        self.0.try_get(i).ok().flatten().unwrap_or_default()
    }

    pub fn payload(&self) -> &str {
        self.column(1)
    }
}

/// The rows of one [`Claim::take`], as they arrive.
pub struct Taken(std::pin::Pin<Box<SimpleQueryStream>>);

impl Taken {
    /// The next row taken; `None` once every row of this take has arrived.
    pub async fn next(&mut self) -> Option<Result<OutboxRow, tokio_postgres::Error>> {
        loop {
            match self.0.next().await? {
                Ok(SimpleQueryMessage::Row(row)) => return Some(Ok(OutboxRow(row))),
                Ok(_) => {}
                Err(e) => return Some(Err(e)),
            }
        }
    }
}

/// An event that cannot be processed, on its way to `evictd.dead_letter` with the reason. Id
/// and time as PostgreSQL printed them (the session's date style is pinned to ISO, which reads
/// back exactly).
pub struct Poison {
    pub id: String,
    pub payload: String,
    pub created_at: String,
    pub error: String,
}

impl Poison {
    pub fn new(row: &OutboxRow, error: String) -> Self {
        Self {
            id: row.column(0).to_string(),
            payload: row.payload().to_string(),
            created_at: row.column(2).to_string(),
            error,
        }
    }
}

/// The name of the claim's prepared statement in the daemon's session.
const TAKE_NAME: &str = "evictd_take";

/// Takes up to $1 of the oldest unclaimed rows in one statement, instead of a SELECT and a
/// later DELETE of the same ids (`= ANY(ARRAY(…))` evaluates the locking subquery once).
const TAKE: &str = "DELETE FROM evictd.outbox WHERE id OPERATOR(pg_catalog.=) ANY(ARRAY( \
                        SELECT id FROM evictd.outbox ORDER BY id LIMIT $1 FOR UPDATE SKIP LOCKED)) \
                    RETURNING id, payload, created_at";

/// [`TAKE`], prepared once per session (PostgreSQL neither parses nor plans it again) and run
/// by `EXECUTE` in the simple query protocol: a claim's `BEGIN` and first take then travel in
/// one message and come back in one reply, one round trip and one wake-up of the daemon where
/// the extended protocol's typed statements need two (each statement ends in a `Sync`, and the
/// server answers each on its own).
pub struct TakeStatement {
    /// A claim was dropped unfinished (an error part-way): its transaction is still open on
    /// the connection, and the next claim rolls it back first — never commits what it took.
    rollback_owed: AtomicBool,
}

/// Prepares [`TAKE`] on the daemon's session (whose search path is pinned).
pub async fn prepare_take(client: &Client) -> Result<TakeStatement, tokio_postgres::Error> {
    client
        .batch_execute(&format!("PREPARE {TAKE_NAME}(pg_catalog.int8) AS {TAKE}"))
        .await?;
    Ok(TakeStatement {
        rollback_owed: AtomicBool::new(false),
    })
}

/// A claim transaction: the rows it takes are deleted in it, so other daemons skip them, and
/// the deletion becomes final only when [`Claim::ack`] commits, after Redis confirmed.
/// [`Claim::release`] hands every row back; so does dropping it (at the next claim).
pub struct Claim<'a> {
    client: &'a Client,
    take: &'a TakeStatement,
    /// Whether `BEGIN` was sent (with the first take).
    begun: AtomicBool,
    finished: bool,
}

/// Starts a claim on the connection `take` was prepared on. Nothing is sent yet: `BEGIN`
/// goes with the first [`Claim::take`].
pub fn begin<'a>(client: &'a Client, take: &'a TakeStatement) -> Claim<'a> {
    Claim {
        client,
        take,
        begun: AtomicBool::new(false),
        finished: false,
    }
}

impl Claim<'_> {
    /// Takes up to `limit` of the oldest unclaimed rows, handed over one by one as PostgreSQL
    /// sends them (it deletes them all first, then reads each payload out of TOAST as it sends
    /// it): the caller starts on the first event of a big statement while the server still
    /// reads the next ones. `&self`: it may run while the rows taken before
    /// are being invalidated. Consume the stream before the next statement of this claim.
    pub async fn take(&self, limit: i64) -> Result<Taken, tokio_postgres::Error> {
        let execute = format!("EXECUTE {TAKE_NAME}({limit})");
        let query = if self.begun.swap(true, Ordering::Relaxed) {
            execute
        } else if self.take.rollback_owed.swap(false, Ordering::Relaxed) {
            format!("ROLLBACK; BEGIN; {execute}")
        } else {
            format!("BEGIN; {execute}")
        };
        let rows = self.client.simple_query_raw(&query).await?;
        Ok(Taken(Box::pin(rows)))
    }

    /// Moves the poison rows to `evictd.dead_letter` and commits: the deletion of everything
    /// taken becomes final.
    pub async fn ack(mut self, poison: &[Poison]) -> Result<(), tokio_postgres::Error> {
        if !poison.is_empty() {
            let ids: Vec<&str> = poison.iter().map(|p| p.id.as_str()).collect();
            let payloads: Vec<&str> = poison.iter().map(|p| p.payload.as_str()).collect();
            let errors: Vec<&str> = poison.iter().map(|p| p.error.as_str()).collect();
            let created: Vec<&str> = poison.iter().map(|p| p.created_at.as_str()).collect();
            self.client
                .execute(
                    "INSERT INTO evictd.dead_letter (id, payload, error, created_at) \
                     SELECT id::pg_catalog.int8, payload, error, created_at::pg_catalog.timestamptz \
                     FROM ROWS FROM (pg_catalog.unnest($1::pg_catalog.text[]), \
                         pg_catalog.unnest($2::pg_catalog.text[]), \
                         pg_catalog.unnest($3::pg_catalog.text[]), \
                         pg_catalog.unnest($4::pg_catalog.text[])) AS p(id, payload, error, created_at) \
                     ON CONFLICT (id) DO NOTHING",
                    &[&ids, &payloads, &errors, &created],
                )
                .await?;
        }
        self.end("COMMIT").await
    }

    /// Ends the claim without taking anything: every row goes back.
    pub async fn release(mut self) -> Result<(), tokio_postgres::Error> {
        self.end("ROLLBACK").await
    }

    async fn end(&mut self, command: &str) -> Result<(), tokio_postgres::Error> {
        self.finished = true;
        if !self.begun.load(Ordering::Relaxed) {
            return Ok(());
        }
        if let Err(e) = self.client.batch_execute(command).await {
            // Whether the transaction ended is unknown: the next claim makes sure.
            self.take.rollback_owed.store(true, Ordering::Relaxed);
            return Err(e);
        }
        Ok(())
    }
}

impl Drop for Claim<'_> {
    fn drop(&mut self) {
        if !self.finished && self.begun.load(Ordering::Relaxed) {
            self.take.rollback_owed.store(true, Ordering::Relaxed);
        }
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
