local clock = redis.call('TIME')
local now = clock[1] .. string.format('%03d', math.floor(tonumber(clock[2]) / 1000))
for i = 1, #KEYS do
  redis.call('SET', KEYS[i], now, 'PX', ARGV[1])
end
return now
