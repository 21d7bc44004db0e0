-- Give a concurrent-session slot back (quotas/concurrency.py).
-- KEYS[1] the client's slot set; ARGV[1] the token. Returns 1 when it was held.
return redis.call('ZREM', KEYS[1], ARGV[1])
