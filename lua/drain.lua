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
if removed > 0 and KEYS[2] then
  redis.call('HINCRBY', KEYS[2], 'keys', removed)
end
local left
if kind == 'set' then
  left = redis.call('SCARD', key)
else
  left = redis.call('ZCARD', key)
end
return {removed, left}
