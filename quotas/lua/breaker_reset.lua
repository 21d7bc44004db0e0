-- Close the circuit breaker by hand (quotas/spend.py, the admin action).
-- KEYS[1] the breaker hash. Returns how many keys were deleted (0 or 1).
return redis.call('DEL', KEYS[1])
