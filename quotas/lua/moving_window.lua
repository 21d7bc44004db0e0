-- Moving-window rate limiting: one hit decided on every limit of a request (quotas/limiter.py).
-- KEYS: counter keys. ARGV[1]: now (ms), ARGV[2]: unique member for this hit, then five
-- per key: limit, window (ms), time to live (whole ms), enforce (1/0), and the window's
-- floor (now - window, ms): hits at or before it have left the window.
-- Returns "admitted hits_1 reset_us_1 hits_2 reset_us_2 ..." (integers, space-separated;
-- reset -1: not computed, see RedisWindows).
-- An optional last ARGV 'undo' takes the hit with this member back and answers as for a
-- refused hit (a Redis Cluster decides a request whose rules count several owners per
-- owner, and one owner's refusal undoes the others').
-- Why this shape: every Lua number passed to redis.call is formatted with %.17g and parsed
-- again, which costs more than the command itself, so times travel as the client's strings;
-- and one bulk string is far cheaper for redis-py's pure-Python parser than an array.

local counts, limits = {}, {}
local admitted = 1
local undo = ARGV[#KEYS * 5 + 3] == 'undo'
for i = 1, #KEYS do
  local base = (i - 1) * 5 + 2
  if undo then redis.call('ZREM', KEYS[i], ARGV[2]) end
  redis.call('ZREMRANGEBYSCORE', KEYS[i], '-inf', ARGV[base + 5])
  local count = redis.call('ZCARD', KEYS[i])
  local limit = tonumber(ARGV[base + 1])
  counts[i], limits[i] = count, limit
  if ARGV[base + 4] == '1' and count >= limit then admitted = 0 end
end
if undo then admitted = 0 end
-- Only the limits that shape the answer need their reset time: those at or over their
-- limit, and the enforced ones with the fewest hits left (the RateLimit-* headers).
local least = math.huge
for i = 1, #KEYS do
  if ARGV[(i - 1) * 5 + 6] == '1' then
    local left = limits[i] - counts[i] - admitted
    if left < least then least = left end
  end
end
local now = tonumber(ARGV[1])
local result = {admitted}
for i = 1, #KEYS do
  local base = (i - 1) * 5 + 2
  local count, limit = counts[i], limits[i]
  if admitted == 1 then
    redis.call('ZADD', KEYS[i], ARGV[1], ARGV[2])
    redis.call('PEXPIRE', KEYS[i], ARGV[base + 3])
    count = count + 1
  end
  local reset = -1
  if count > 0 and (count >= limit or (ARGV[base + 4] == '1' and limit - count == least)) then
    -- The hit that must leave the window before another fits: the oldest while there
    -- is room, else the one 'limit' places before the newest.
    local index = count - limit
    local entry
    if index > 0 then
      entry = redis.call('ZRANGE', KEYS[i], index, index, 'WITHSCORES')
    else
      entry = redis.call('ZRANGE', KEYS[i], '0', '0', 'WITHSCORES')
    end
    reset = 0
    if entry[2] then
      reset = math.ceil((tonumber(entry[2]) + tonumber(ARGV[base + 2]) - now) * 1000)
    end
  elseif count == 0 then
    reset = 0
  end
  result[#result + 1] = count
  result[#result + 1] = reset
end
return table.concat(result, ' ')
