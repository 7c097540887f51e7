//! The pure core: no I/O, no async, no clock but what it is handed. Everything a change goes
//! through between arriving and reaching Redis is here, testable without a server:
//!
//! - [`event`] — the JSON events the triggers write, and their parser;
//! - [`wal`], [`pgoutput`], [`folder`] — the replication stream's frames, its messages, and
//!   their folding into targets (`logical` delivery);
//! - [`signature`] — the check of signed NOTIFY payloads and logical messages;
//! - [`rules`] — a row's values → tags and key patterns; a table → everything it can make stale;
//! - [`glob`] — Redis glob escaping and matching; [`keys`] — every Redis key name; [`slot`] —
//!   Redis Cluster's key slots;
//! - [`batch`] — many events folded into one de-duplicated set of targets.

pub mod batch;
pub mod event;
pub mod folder;
pub mod glob;
pub mod keys;
pub mod pgoutput;
pub mod rules;
pub mod signature;
pub mod slot;
pub mod wal;
