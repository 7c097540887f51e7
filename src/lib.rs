//! evictd keeps a Redis tag cache honest when PostgreSQL changes behind the application's back.
//!
//! Modules in reading order, following the data:
//!
//! - [`config`] — file, environment and flags merged once into validated `Settings`.
//! - [`schema`] — the SQL side: triggers that describe each committed statement.
//! - [`source`] — where events arrive: LISTEN on the channel, the outbox table.
//! - [`event`] — `ChangeEvent` and its parser (pure).
//! - [`rules`] — event rows → tags and key patterns (pure).
//! - [`glob`] — Redis glob escaping and matching, many patterns in one SCAN pass (pure).
//! - [`batch`] — de-duplicates the targets of many events between flushes (pure).
//! - [`sink`] — the only code that talks to Redis: detach, drain, unlink, stamp.
//! - [`daemon`] — the supervisor and event loop tying them together.
//! - [`http`], [`metrics`], [`shutdown`] — what an operator sees and how it stops.
//! - [`cmd`] — one module per subcommand; [`cli`] — the clap types.
//! - [`signature`] — the check of signed NOTIFY payloads and logical messages (pure).
//! - [`db`], [`tls`], [`backoff`], [`redact`] — connection helpers.
//! - [`throwaway`] — local servers for `evictd dev` and the tests.

pub mod backoff;
pub mod cli;
pub mod cmd;
pub mod config;
pub mod core;
pub mod daemon;
pub mod db;
pub mod http;
pub mod metrics;
pub mod redact;
pub mod schema;
pub mod shutdown;
pub mod sink;
pub mod source;
pub mod throwaway;
pub mod tls;
