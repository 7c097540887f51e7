local clock = redis.call('TIME')
local now = clock[1] .. string.format('%03d', math.floor(tonumber(clock[2]) / 1000))
local chunk = tonumber(ARGV[1])
local budget = chunk
local ttl = ARGV[2]
local prefix = ARGV[3]
local nonce = ARGV[4]
local defer = ARGV[5] == '1'
local invalidations = tonumber(ARGV[6])
local processed, removed, wrong = 0, 0, 0
local detached = {}
local sets, nsets = {}, 0
local sorted_sets, nsorted = {}, 0
local assignments, nstamps = {}, 0
for i = 7, #ARGV do
  local name = ARGV[i]
  local tag = prefix .. 'tag:' .. name
  local size = redis.pcall('SCARD', tag)
  local sorted = false
  local wrong_type = false
  if type(size) ~= 'number' then
    size = redis.pcall('ZCARD', tag)
    if type(size) ~= 'number' then
      size = 0
      wrong_type = true
    end
    sorted = true
  end
  if size <= chunk and size > budget and processed > 0 then
    break
  end
  processed = processed + 1
  if wrong_type then
    wrong = wrong + 1
    detached[#detached + 1] = -processed
  elseif size > chunk then
    redis.call('RENAME', tag, prefix .. 'drain:' .. nonce .. ':' .. name)
    detached[#detached + 1] = processed
  elseif size > 0 then
    if sorted then
      nsorted = nsorted + 1
      sorted_sets[nsorted] = tag
    else
      nsets = nsets + 1
      sets[nsets] = tag
    end
    budget = budget - size
  end
  local stamp = prefix .. 'tagts:' .. name
  if defer then
    nstamps = nstamps + 2
    assignments[nstamps - 1] = stamp
    assignments[nstamps] = now
  else
    redis.call('SET', stamp, now, 'PX', ttl)
  end
  if budget <= 0 then
    break
  end
end
local function unlink_all(list)
  for j = 1, #list, 500 do
    removed = removed + redis.call('UNLINK', unpack(list, j, math.min(j + 499, #list)))
  end
end
if nsets > 0 then
  unlink_all(redis.call('SUNION', unpack(sets)))
  unlink_all(sets)
  removed = removed - nsets
end
for k = 1, nsorted do
  unlink_all(redis.call('ZRANGE', sorted_sets[k], 0, -1))
  redis.call('UNLINK', sorted_sets[k])
end
if nstamps > 0 then
  redis.call('MSET', unpack(assignments))
  local names = {}
  for k = 1, nstamps / 2 do
    names[k] = assignments[2 * k - 1]
  end
  redis.call('RPUSH', prefix .. 'evictd:ttl-pending', unpack(names))
end
local stats = prefix .. 'evictd:stats'
if invalidations > 0 then
  redis.call('HINCRBY', stats, 'invalidations', invalidations)
end
if processed > wrong then
  redis.call('HINCRBY', stats, 'tags', processed - wrong)
end
if removed > 0 then
  redis.call('HINCRBY', stats, 'keys', removed)
end
local out = {processed, removed}
for _, d in ipairs(detached) do
  out[#out + 1] = d
end
return out
