-- Take a concurrent-session slot for one client (quotas/concurrency.py).
-- KEYS[1] the client's slot set (token -> expiry time, seconds)
-- ARGV    now, expires_at, maximum, token
-- Returns 1 when the slot is held (taken or refreshed), 0 when the client has the maximum.
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', ARGV[1])
if redis.call('ZSCORE', KEYS[1], ARGV[4]) then
  redis.call('ZADD', KEYS[1], ARGV[2], ARGV[4])
  return 1
end
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[3]) then return 0 end
redis.call('ZADD', KEYS[1], ARGV[2], ARGV[4])
redis.call('EXPIRE', KEYS[1], math.ceil(tonumber(ARGV[2]) - tonumber(ARGV[1])) + 1)
return 1
