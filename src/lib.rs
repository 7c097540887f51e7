//! evictd keeps a Redis tag cache honest when PostgreSQL changes behind the application's back.
//!
//! Modules in reading order, following the data (ARCHITECTURE.md draws the map):
//!
//! - [`config`] — every option declared once; file, environment and flags merged into
//!   validated `Settings`.
//! - [`schema`] — the SQL side: capture triggers, the publication and old-row triggers of
//!   `logical` delivery, the signing key, the replication slot; migrate and uninstall.
//! - [`source`] — PostgreSQL I/O: the listening session, the outbox's claims and doorbell, the
//!   replication stream.
//! - [`core`] — the pure core: events, the stream's frames and their folding, signatures,
//!   rules, globs, key names, batches.
//! - [`daemon`] — the supervisor, the feed of each delivery, and the path of every batch to
//!   Redis.
//! - [`sink`] — the only code that talks to Redis: detach, drain, unlink, stamp, scan.
//! - [`http`], [`metrics`], [`shutdown`] — what an operator sees and how it stops.
//! - [`cmd`] — one module per subcommand; [`cli`] — the clap types.
//! - [`db`], [`tls`], [`backoff`], [`redact`] — connection helpers.
//! - [`throwaway`] — local servers for `evictd dev`, the tests and the benchmark.

pub mod backoff;
pub mod cli;
pub mod cmd;
pub mod config;
pub mod core;
pub mod daemon;
pub mod db;
pub mod http;
pub mod liveness;
pub mod metrics;
pub mod redact;
pub mod schema;
pub mod shutdown;
pub mod sink;
pub mod source;
pub mod throwaway;
pub mod tls;
