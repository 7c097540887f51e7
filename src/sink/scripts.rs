//! The Lua scripts evictd runs in Redis. Each does a bounded amount of work per call, so no
//! command of ours blocks other Redis clients for long, whatever the size of a tag.

/// Invalidates a run of tags. ARGV = `[member budget, tagts ttl ms, key prefix, drain nonce,
/// defer ttl (0/1), tag…]`; the script builds each tag's keys (`{prefix}tag:T`,
/// `{prefix}tagts:T`, `{prefix}drain:{nonce}:T`) itself, which sends a third of the bytes a
/// KEYS list would. (evictd targets a standalone Redis: scripts touch keys they were not handed.)
///
/// With `defer ttl`, the `tagts` markers are written by one MSET without a TTL and their names
/// queued on `{prefix}evictd:ttl-pending` for [`EXPIRE_PENDING`]: a third less Redis work
/// before the entries are gone (a `SET … PX` of a new key is the costliest step per tag).
///
/// A tag whose set fits the remaining budget is removed right here: members (all small sets
/// read by one SUNION) and set UNLINKed atomically. A larger one is *detached*: RENAMEd to its drain key, so entries tagged from now
/// on land in a fresh set that this invalidation will not sweep, and drained by [`DRAIN`] in
/// chunks. Every processed tag gets its `tagts` marker set to the Redis clock (ms).
///
/// Stops early once the budget is spent (always processing at least one tag) and returns
/// `{processed, keys removed, detached flag per processed tag...}`.
pub const DETACH: &str = r#"
local clock = redis.call('TIME')
local now = clock[1] .. string.format('%03d', math.floor(tonumber(clock[2]) / 1000))
local chunk = tonumber(ARGV[1])
local budget = chunk
local ttl = ARGV[2]
local prefix = ARGV[3]
local nonce = ARGV[4]
local defer = ARGV[5] == '1'
local processed, removed, tag_sets = 0, 0, 0
local flags = {}
-- Small sets are read by one SUNION at the end; sorted sets and their members go to doomed.
local sets = {}
local doomed = {}
local stamps = {}
for i = 6, #ARGV do
  local name = ARGV[i]
  local tag = prefix .. 'tag:' .. name
  -- SCARD answers 0 for a missing key and fails on a sorted set (then ZCARD).
  local size = redis.pcall('SCARD', tag)
  local sorted = false
  if type(size) ~= 'number' then
    size = redis.pcall('ZCARD', tag)
    if type(size) ~= 'number' then
      size = 0
    end
    sorted = true
  end
  if size <= chunk and size > budget and processed > 0 then
    break
  end
  local detached = 0
  if size > chunk then
    redis.call('RENAME', tag, prefix .. 'drain:' .. nonce .. ':' .. name)
    detached = 1
  elseif size > 0 then
    if sorted then
      for _, m in ipairs(redis.call('ZRANGE', tag, 0, -1)) do
        doomed[#doomed + 1] = m
      end
      doomed[#doomed + 1] = tag
      tag_sets = tag_sets + 1
    else
      sets[#sets + 1] = tag
    end
    budget = budget - size
  end
  local stamp = prefix .. 'tagts:' .. name
  if defer then
    stamps[#stamps + 1] = stamp
  else
    redis.call('SET', stamp, now, 'PX', ttl)
  end
  processed = processed + 1
  flags[processed] = detached
  if budget <= 0 then
    break
  end
end
tag_sets = tag_sets + #sets
if #sets > 0 then
  for _, m in ipairs(redis.call('SUNION', unpack(sets))) do
    doomed[#doomed + 1] = m
  end
  for _, s in ipairs(sets) do
    doomed[#doomed + 1] = s
  end
end
if #stamps > 0 then
  local assignments = {}
  for k, stamp in ipairs(stamps) do
    assignments[2 * k - 1] = stamp
    assignments[2 * k] = now
  end
  redis.call('MSET', unpack(assignments))
  redis.call('RPUSH', prefix .. 'evictd:ttl-pending', unpack(stamps))
end
for j = 1, #doomed, 500 do
  removed = removed + redis.call('UNLINK', unpack(doomed, j, math.min(j + 499, #doomed)))
end
local out = {processed, removed - tag_sets}
for i = 1, processed do
  out[#out + 1] = flags[i]
end
return out
"#;

/// Removes up to ARGV[1] members of the detached set KEYS[1] and UNLINKs them, atomically, so a
/// crash between two calls loses nothing. Returns `{keys removed, members left}`.
pub const DRAIN: &str = r#"
local key = KEYS[1]
local count = tonumber(ARGV[1])
local kind = redis.call('TYPE', key)['ok']
local members = {}
if kind == 'set' then
  members = redis.call('SPOP', key, count)
elseif kind == 'zset' then
  local popped = redis.call('ZPOPMIN', key, count)
  for i = 1, #popped, 2 do
    members[#members + 1] = popped[i]
  end
else
  return {0, 0}
end
local removed = 0
for i = 1, #members, 500 do
  removed = removed + redis.call('UNLINK', unpack(members, i, math.min(i + 499, #members)))
end
local left
if kind == 'set' then
  left = redis.call('SCARD', key)
else
  left = redis.call('ZCARD', key)
end
return {removed, left}
"#;

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
pub const STAMP: &str = r#"
local clock = redis.call('TIME')
local now = clock[1] .. string.format('%03d', math.floor(tonumber(clock[2]) / 1000))
for i = 1, #KEYS do
  redis.call('SET', KEYS[i], now, 'PX', ARGV[1])
end
return now
"#;

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
