//! The Lua scripts evictd runs in Redis. Each does a bounded amount of work per call, so no
//! command of ours blocks other Redis clients for long, whatever the size of a tag. Those the
//! application's package runs too (`clients/typescript`: detach, drain, stamp) live in `lua/`
//! at the root of the repository, one source for both.

/// Invalidates a run of tags. ARGV = `[member budget, tagts ttl ms, key prefix, drain nonce,
/// defer ttl (0/1), invalidations to count, tag…]`; the script builds each tag's keys
/// (`{prefix}tag:T`, `{prefix}tagts:T`, `{prefix}drain:{nonce}:T`) itself, which sends a third of the bytes a
/// KEYS list would. (One server only: a cluster refuses keys a script was not handed, and
/// runs [`CLUSTER_DETACH`] instead.)
///
/// With `defer ttl`, the `tagts` markers are written by one MSET without a TTL and their names
/// queued on `{prefix}evictd:ttl-pending` for [`EXPIRE_PENDING`]: a third less Redis work
/// before the entries are gone (a `SET … PX` of a new key is the costliest step per tag).
///
/// A tag whose set fits the remaining budget is removed right here: members (all small sets
/// read by one SUNION) and set UNLINKed atomically. A larger one is *detached*: RENAMEd to its
/// drain key, so entries tagged from now on land in a fresh set that this invalidation will not
/// sweep, and drained by [`DRAIN`] in chunks. Every processed tag gets its `tagts` marker set to the Redis clock (ms).
///
/// A tag key that is neither a set nor a sorted set (a string, a hash: written by something
/// else) is left as it is, its marker stamped, and reported: its entries cannot be found.
///
/// It adds its work to the running totals in `{prefix}evictd:stats` (`invalidations` by the
/// count given, `tags` processed but those of the wrong type, `keys` removed), in the same
/// call: a round trip less per invalidation than counting afterwards.
///
/// Stops early once the budget is spent (always processing at least one tag) and returns
/// `{processed, keys removed, position…}`: the 1-based position of each detached tag, and
/// the negated position of each tag key of the wrong type.
///
/// Written for Redis' sake: per tag it makes one call (SCARD) and builds two strings; members,
/// sets and markers go out in a few multi-key calls, and nothing is copied between Lua tables
/// (copying them, and a flag per tag in the answer, cost ~15 % more Redis time per tag).
pub const DETACH: &str = include_str!("../../lua/detach.lua");

/// Removes up to ARGV[1] members of the detached set KEYS[1] and UNLINKs them, atomically, so a
/// crash between two calls loses nothing, and adds the keys removed to the `keys` total in the
/// hash KEYS[2], when given. Returns `{keys removed, members left}`.
pub const DRAIN: &str = include_str!("../../lua/drain.lua");

/// Gives up to ARGV[1] of the `tagts` markers queued on KEYS[1] (by a deferring [`DETACH`])
/// their TTL, ARGV[2] ms. Returns how many it took off the queue (0 once it is empty).
pub const EXPIRE_PENDING: &str = r#"
local names = redis.call('LPOP', KEYS[1], ARGV[1])
if not names then
  return 0
end
for _, name in ipairs(names) do
  redis.call('PEXPIRE', name, ARGV[2])
end
return #names
"#;

/// Sets every key in KEYS to the Redis clock in ms with TTL ARGV[1] ms (table-wide markers).
pub const STAMP: &str = include_str!("../../lua/stamp.lua");

/// One step of the tag-set hygiene sweep over KEYS[1]: scans ARGV[2] members from cursor
/// ARGV[1] and removes those whose entry no longer exists (expired); for a sorted set it first
/// drops members scored (expiring) before ARGV[3] (Unix seconds). Returns `{next cursor, removed}`.
pub const SWEEP: &str = r#"
local key = KEYS[1]
local kind = redis.call('TYPE', key)['ok']
local removed = 0
local scan
if kind == 'set' then
  scan = redis.call('SSCAN', key, ARGV[1], 'COUNT', ARGV[2])
  for _, member in ipairs(scan[2]) do
    if redis.call('EXISTS', member) == 0 then
      removed = removed + redis.call('SREM', key, member)
    end
  end
elseif kind == 'zset' then
  if ARGV[1] == '0' then
    removed = redis.call('ZREMRANGEBYSCORE', key, '-inf', '(' .. ARGV[3])
  end
  scan = redis.call('ZSCAN', key, ARGV[1], 'COUNT', ARGV[2])
  for i = 1, #scan[2], 2 do
    local member = scan[2][i]
    if redis.call('EXISTS', member) == 0 then
      removed = removed + redis.call('ZREM', key, member)
    end
  end
else
  return {'0', 0}
end
return {scan[1], removed}
"#;

/// [`DETACH`] for a Redis Cluster, where a script may touch only the keys it is handed and
/// all of them in one slot. KEYS = n tag keys of one slot, then their n drain keys (in the
/// same slot, [`crate::core::keys::Keys::drain_in_slot`]); ARGV[1] = member budget. Each
/// non-empty tag set is RENAMEd to its drain key — entries tagged from now on land in a fresh
/// set — and, when it fits the remaining budget, its members are returned with it: the caller
/// UNLINKs them (in their own slots) and then empties the drain key ([`DRAIN_STEP`]); a crash
/// in between leaves the drain key to be finished. The `tagts` markers are stamped by the
/// caller before this runs. Stops early once the budget is spent (always processing at least
/// one tag) and returns one `{size, members}` per tag processed, size -1 for a tag key that is
/// neither a set nor a sorted set (left as it is).
pub const CLUSTER_DETACH: &str = r#"
local n = #KEYS / 2
local chunk = tonumber(ARGV[1])
local budget = chunk
local out = {}
for i = 1, n do
  local tag = KEYS[i]
  local kind = redis.call('TYPE', tag)['ok']
  local size = 0
  if kind == 'set' then
    size = redis.call('SCARD', tag)
  elseif kind == 'zset' then
    size = redis.call('ZCARD', tag)
  elseif kind ~= 'none' then
    size = -1
  end
  if size > 0 and size <= chunk and size > budget and #out > 0 then
    break
  end
  local members = {}
  if size > 0 then
    if size <= chunk then
      if kind == 'set' then
        members = redis.call('SMEMBERS', tag)
      else
        members = redis.call('ZRANGE', tag, 0, -1)
      end
      budget = budget - size
    end
    redis.call('RENAME', tag, KEYS[n + i])
  end
  out[#out + 1] = {size, members}
  if budget <= 0 then
    break
  end
end
return out
"#;

/// One step of emptying the detached set KEYS[1] in a Redis Cluster, whose members live in
/// other slots than the set: forgets ARGV[2…] (members the caller has just UNLINKed) and
/// returns up to ARGV[1] members still to remove (none once the set is gone). A crash between
/// steps only repeats an UNLINK.
pub const DRAIN_STEP: &str = r#"
local key = KEYS[1]
local kind = redis.call('TYPE', key)['ok']
local remove
if kind == 'set' then
  remove = 'SREM'
elseif kind == 'zset' then
  remove = 'ZREM'
else
  return {}
end
for i = 2, #ARGV, 500 do
  redis.call(remove, key, unpack(ARGV, i, math.min(i + 499, #ARGV)))
end
if kind == 'set' then
  return redis.call('SRANDMEMBER', key, ARGV[1])
end
return redis.call('ZRANGE', key, 0, tonumber(ARGV[1]) - 1)
"#;

/// Records tags ARGV in the hash KEYS[1] with the Redis clock (ms): the revalidated-tags hash of
/// `@fortedigital/nextjs-cache-handler`'s Redis handler, whose reads treat an entry older than
/// any of its tags' time as stale. Returns how many tags it recorded.
pub const RECORD_REVALIDATED: &str = r#"
local clock = redis.call('TIME')
local now = clock[1] .. string.format('%03d', math.floor(tonumber(clock[2]) / 1000))
local fields = {}
for i = 1, #ARGV do
  fields[2 * i - 1] = ARGV[i]
  fields[2 * i] = now
end
for j = 1, #fields, 1000 do
  redis.call('HSET', KEYS[1], unpack(fields, j, math.min(j + 999, #fields)))
end
return #ARGV
"#;
