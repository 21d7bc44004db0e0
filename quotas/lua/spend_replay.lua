-- Replay ledger entries into one spend counter after an outage (quotas/spend.py).
-- Each entry is added at most once (by member), so replaying what Redis already has, or
-- replaying twice, changes nothing.
-- KEYS[1] the counter's entries (sorted set), KEYS[2] its running total
-- ARGV    now_ms, window_ms (0: entries never expire), ttl_s, then pairs (score_ms, member)
-- Returns the counter's total after the replay.

local now = tonumber(ARGV[1])
local window = tonumber(ARGV[2])
local ttl = tonumber(ARGV[3])

local function amount_of(member)
  return tonumber(string.match(member, '^(%d+):'))
end

local total = tonumber(redis.call('GET', KEYS[2]) or '0')
if window > 0 then
  local floor = now - window
  for _, member in ipairs(redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', floor)) do
    total = total - amount_of(member)
  end
  redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', floor)
end
for i = 4, #ARGV, 2 do
  local score = tonumber(ARGV[i])
  if (window == 0 or score > now - window)
      and redis.call('ZADD', KEYS[1], 'NX', score, ARGV[i + 1]) == 1 then
    total = total + amount_of(ARGV[i + 1])
  end
end
if redis.call('ZCARD', KEYS[1]) == 0 then
  total = 0
  redis.call('DEL', KEYS[2])
else
  redis.call('SET', KEYS[2], total, 'EX', ttl)
  redis.call('EXPIRE', KEYS[1], ttl)
end
return total
