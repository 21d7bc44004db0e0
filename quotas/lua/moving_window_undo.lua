-- Take one admitted hit back from counters of one owner (quotas/limiter.py): on a Redis
-- Cluster a request whose rules count several owners is decided per owner, and a hit that
-- another owner's limits refused must not stay recorded here.
-- KEYS: counter keys of one owner (one hash slot); ARGV[1]: the hit's member.
-- Returns how many entries were removed.
local removed = 0
for i = 1, #KEYS do removed = removed + redis.call('ZREM', KEYS[i], ARGV[1]) end
return removed
