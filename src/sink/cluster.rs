//! Invalidation in a Redis Cluster. A tag's set, its `tagts` marker and its members live in
//! whatever slots their names hash to, so no script may reach them all at once: every script
//! here is handed its keys, all of one slot, and the members are removed by UNLINKs the client
//! splits by slot. Atomicity is replaced by order, each step idempotent and a crash between
//! two leaving the rest findable:
//!
//! 1. the `tagts` markers are stamped first, so an entry written back by a reader that read
//!    before the change is refused by its age from then on;
//! 2. each non-empty tag set is renamed to a drain key in its own slot ([`CLUSTER_DETACH`],
//!    one call per slot and run of tags); the entries tagged from then on land in a new set;
//! 3. each drain key is emptied: its members UNLINKed, then forgotten ([`DRAIN_STEP`]), a
//!    chunk at a time. A drain key left by a failure is owed and finished, as on one server.
//!
//! The tag-set sweep becomes read → check → remove → check again, the members found alive on
//! the second look put back (an entry written between the two looks keeps its index).

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use futures_util::FutureExt as _;
use futures_util::future::BoxFuture;
use futures_util::stream::{FuturesUnordered, StreamExt as _};
use redis::AsyncCommands;

use super::conn::in_order;
#[cfg(doc)]
use super::scripts::{CLUSTER_DETACH, DRAIN_STEP};
use super::{RedisSink, Report, SinkError, TAGS_PER_CALL};
use crate::core::slot::slot;

/// Calls in flight at once: DETACH runs, drains, marker stamps.
const CONCURRENCY: usize = 16;
/// Members per UNLINK (split further by slot by the cluster client).
const UNLINK_BATCH: usize = 500;

/// What one [`CLUSTER_DETACH`] call answered for one tag: its set's size (-1: wrong type) and,
/// when small enough, its members.
type Detached = (i64, Vec<Vec<u8>>);

impl RedisSink {
    /// Invalidates `tags` in a cluster: markers, detach, drain (see the module's comment).
    pub(super) async fn invalidate_tags_in_cluster(
        &self,
        tags: &BTreeSet<String>,
    ) -> Result<Report, SinkError> {
        let mut report = Report {
            tags: tags.len() as u64,
            ..Report::default()
        };
        if tags.is_empty() {
            return Ok(report);
        }
        let markers: Vec<String> = tags.iter().map(|t| self.keys.tag_marker(t)).collect();
        self.stamp_markers(&markers).await?;

        let nonce: u64 = rand::random();
        let mut by_slot: BTreeMap<u16, Vec<(String, String)>> = BTreeMap::new();
        for tag in tags {
            let key = self.keys.tag(tag);
            let drain = self
                .keys
                .drain_in_slot(nonce, tag)
                .ok_or_else(|| SinkError::Layout {
                    prefix: self.keys.prefix().to_string(),
                })?;
            by_slot
                .entry(slot(key.as_bytes()))
                .or_default()
                .push((key, drain));
        }
        let mut pending: VecDeque<&[(String, String)]> = by_slot
            .values()
            .flat_map(|run| run.chunks(TAGS_PER_CALL))
            .collect();
        let mut to_drain: Vec<(String, Vec<Vec<u8>>)> = Vec::new();
        let mut wrong_type = Vec::new();
        let mut in_flight = FuturesUnordered::new();
        loop {
            while in_flight.len() < CONCURRENCY
                && let Some(run) = pending.pop_front()
            {
                in_flight.push(async move { (run, self.detach_in_slot(run).await) });
            }
            let Some((run, outcome)) = in_flight.next().await else {
                break;
            };
            let answers = match outcome {
                Ok(answers) => answers,
                Err(e) => {
                    self.owe(|owed| owed.unknown = true);
                    return Err(e);
                }
            };
            let processed = answers.len().clamp(1, run.len());
            for ((key, drain), (size, members)) in run.iter().zip(answers) {
                if size < 0 {
                    wrong_type.push(key.clone());
                } else if size > 0 {
                    self.owe(|owed| {
                        owed.keys.insert(drain.clone());
                    });
                    to_drain.push((drain.clone(), members));
                }
            }
            if processed < run.len() {
                pending.push_front(&run[processed..]);
            }
        }
        report.left_alone(&wrong_type);
        // Boxed: the futures borrow `self`, which an iterator adapter's closure cannot promise
        // for every lifetime the spawned task's `Send` bound asks about.
        let drains: Vec<BoxFuture<'_, Result<u64, SinkError>>> = to_drain
            .into_iter()
            .map(|(drain, first)| {
                async move {
                    let removed = self.drain_in_cluster(&drain, first).await?;
                    self.owe(|owed| {
                        owed.keys.remove(&drain);
                    });
                    Ok(removed)
                }
                .boxed()
            })
            .collect();
        let drained = in_order(drains, CONCURRENCY).await?;
        report.keys += drained.iter().sum::<u64>();
        report.keys += self.finish_owed_drains().await?.keys;
        Ok(report)
    }

    /// One [`CLUSTER_DETACH`] call over `run` (tag keys of one slot and their drain keys).
    async fn detach_in_slot(&self, run: &[(String, String)]) -> Result<Vec<Detached>, SinkError> {
        let mut call = self.cluster_detach.prepare_invoke();
        for (key, _) in run {
            call.key(key);
        }
        for (_, drain) in run {
            call.key(drain);
        }
        call.arg(self.options.drain_chunk);
        let mut conn = self.conn();
        Ok(call.invoke_async(&mut conn).await?)
    }

    /// Empties the detached set `drain`, starting with `first` (members already read, or none):
    /// UNLINK a chunk, forget it, read the next. The keys removed.
    pub(super) async fn drain_in_cluster(
        &self,
        drain: &str,
        first: Vec<Vec<u8>>,
    ) -> Result<u64, SinkError> {
        let mut conn = self.conn();
        let mut removed = 0;
        let mut batch = if first.is_empty() {
            self.drain_step(drain, &[]).await?
        } else {
            first
        };
        while !batch.is_empty() {
            for chunk in batch.chunks(UNLINK_BATCH) {
                let n: u64 = conn.unlink(chunk).await?;
                removed += n;
            }
            batch = self.drain_step(drain, &batch).await?;
        }
        Ok(removed)
    }

    /// One [`DRAIN_STEP`]: forgets `done`, returns the next chunk.
    async fn drain_step(&self, drain: &str, done: &[Vec<u8>]) -> Result<Vec<Vec<u8>>, SinkError> {
        let mut conn = self.conn();
        let mut call = self.drain_step.prepare_invoke();
        call.key(drain).arg(self.options.drain_chunk);
        for member in done {
            call.arg(member);
        }
        Ok(call.invoke_async(&mut conn).await?)
    }

    /// Stamps `keys` (markers) with their node's clock, one [`super::scripts::STAMP`] call per
    /// slot.
    pub(super) async fn stamp_in_slots(&self, keys: &[String]) -> Result<(), SinkError> {
        let mut by_slot: BTreeMap<u16, Vec<&String>> = BTreeMap::new();
        for key in keys {
            by_slot.entry(slot(key.as_bytes())).or_default().push(key);
        }
        let stamps: Vec<BoxFuture<'_, Result<(), SinkError>>> = by_slot
            .into_values()
            .map(|group| {
                async move {
                    let mut call = self.stamp.prepare_invoke();
                    for key in group {
                        call.key(key);
                    }
                    call.arg(self.options.tagts_ttl.as_millis() as u64);
                    let mut conn = self.conn();
                    let _: String = call.invoke_async(&mut conn).await?;
                    Ok(())
                }
                .boxed()
            })
            .collect();
        in_order(stamps, CONCURRENCY).await?;
        Ok(())
    }

    /// One step of the sweep over tag set `tag_key` in a cluster: the members from `cursor`
    /// whose entry is gone are removed, those that reappear on a second look put back.
    /// Returns (next cursor, members removed).
    pub(super) async fn sweep_step_in_cluster(
        &self,
        tag_key: &[u8],
        cursor: &str,
        count: u64,
        now_s: u64,
    ) -> Result<(String, u64), SinkError> {
        let mut conn = self.conn();
        let kind: String = redis::cmd("TYPE")
            .arg(tag_key)
            .query_async(&mut conn)
            .await?;
        let sorted = match kind.as_str() {
            "set" => false,
            "zset" => true,
            _ => return Ok(("0".to_string(), 0)),
        };
        let mut removed = 0;
        if sorted && cursor == "0" {
            let n: u64 = redis::cmd("ZREMRANGEBYSCORE")
                .arg(tag_key)
                .arg("-inf")
                .arg(format!("({now_s}"))
                .query_async(&mut conn)
                .await?;
            removed += n;
        }
        let (next, items): (String, Vec<Vec<u8>>) =
            redis::cmd(if sorted { "ZSCAN" } else { "SSCAN" })
                .arg(tag_key)
                .arg(cursor)
                .arg("COUNT")
                .arg(count)
                .query_async(&mut conn)
                .await?;
        // (member, score) for a sorted set, (member, nothing) for a set.
        let members: Vec<(Vec<u8>, Option<Vec<u8>>)> = if sorted {
            items
                .chunks(2)
                .filter_map(|pair| Some((pair.first()?.clone(), pair.get(1).cloned())))
                .collect()
        } else {
            items.into_iter().map(|m| (m, None)).collect()
        };
        let gone = self.missing(&members).await?;
        if gone.is_empty() {
            return Ok((next, removed));
        }
        let names: Vec<&Vec<u8>> = gone.iter().map(|(m, _)| m).collect();
        let n: u64 = redis::cmd(if sorted { "ZREM" } else { "SREM" })
            .arg(tag_key)
            .arg(&names)
            .query_async(&mut conn)
            .await?;
        removed += n;
        let still_gone = self.missing(&gone).await?;
        let back: Vec<&(Vec<u8>, Option<Vec<u8>>)> = gone
            .iter()
            .filter(|member| !still_gone.contains(member))
            .collect();
        if !back.is_empty() {
            let mut put_back = redis::cmd(if sorted { "ZADD" } else { "SADD" });
            put_back.arg(tag_key);
            for (member, score) in &back {
                if let Some(score) = score {
                    put_back.arg(score);
                }
                put_back.arg(member);
            }
            let _: u64 = put_back.query_async(&mut conn).await?;
            removed = removed.saturating_sub(back.len() as u64);
        }
        Ok((next, removed))
    }

    /// Those of `members` whose entry does not exist.
    async fn missing(
        &self,
        members: &[(Vec<u8>, Option<Vec<u8>>)],
    ) -> Result<Vec<(Vec<u8>, Option<Vec<u8>>)>, SinkError> {
        let mut conn = self.conn();
        let asked = members
            .iter()
            .map(|(member, _)| {
                let mut cmd = redis::cmd("EXISTS");
                cmd.arg(member);
                cmd
            })
            .collect();
        let present: Vec<u64> = conn.each(asked).await?;
        Ok(members
            .iter()
            .zip(present)
            .filter(|(_, n)| *n == 0)
            .map(|(member, _)| member.clone())
            .collect())
    }
}
