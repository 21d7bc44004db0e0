-- One spend decision over every cap that applies to it, in one atomic step.
-- The contract, and the Python twin that must agree with it, are in quotas/spend.py.
--
-- KEYS[1]   the breaker hash (absent: closed)
-- KEYS[2c], KEYS[2c+1]   counter c (1..n): its entries, a sorted set of "<micro>:<id>"
--           scored by time in ms, and its running total (integer micro-USD)
-- ARGV      op, now_ms, amount, add_member, remove_member, breaker_threshold, cooldown_ms,
--           hour_index (the counter the breaker watches; 0: none), then one per counter:
--           "window_ms cap ttl_s shadow resets_at_ms" (window 0: entries never expire;
--           cap 0: counted, never refused; shadow 1: never refuses; resets_at 0: no
--           calendar period end)
-- op        read | admit | reserve | charge | settle | release (admit: room for `amount`,
--           or, with 0, anything left at all)
-- Returns   one string of space-separated fields: allowed, refused (counter index, -1
--           breaker, 0 none), retry_ms, state, tripped, until_ms, state_before, added,
--           total_1..total_n, over_1..over_n
--
-- Redis calls per decision: one MGET of the totals and one HMGET of the breaker; per
-- counter, ZRANGEBYSCORE (rolling windows only), ZREM (settle, release), ZADD NX (reserve,
-- charge, settle) and, when its total changed, SET EX + EXPIRE (ZCARD only when entries
-- left and none was added: an emptied set's total is 0).

local op = ARGV[1]
local now = tonumber(ARGV[2])
local amount = tonumber(ARGV[3])
local add_member = ARGV[4]
local remove_member = ARGV[5]
local threshold = tonumber(ARGV[6])
local cooldown = tonumber(ARGV[7])
local hour_index = tonumber(ARGV[8])
local n = #ARGV - 8

local function amount_of(member)
  return tonumber(string.match(member, '^(%d+):'))
end

local deciding = op == 'admit' or op == 'reserve'
local removing = (op == 'settle' or op == 'release') and remove_member ~= ''

local window, cap, ttl, shadow, resets = {}, {}, {}, {}, {}
local total, stored, touched, emptied = {}, {}, {}, {}
local total_keys = {}
for c = 1, n do total_keys[c] = KEYS[2 * c + 1] end
local stored_raw = n > 0 and redis.call('MGET', unpack(total_keys)) or {}
for c = 1, n do
  -- ttl and resets stay strings until used (few decisions need them as numbers)
  local w, cp, t, sh, rs = string.match(ARGV[8 + c], '^(-?%d+) (-?%d+) (%d+) (%d) (%d+)$')
  window[c], cap[c], ttl[c], shadow[c], resets[c] = tonumber(w), tonumber(cp), t, sh == '1', rs
  local entries = KEYS[2 * c]
  stored[c] = tonumber(stored_raw[c] or '0')
  total[c] = stored[c]
  touched[c] = false
  emptied[c] = false -- entries left the set: it may be empty now
  if window[c] > 0 then
    local floor = now - window[c]
    local expired = redis.call('ZRANGEBYSCORE', entries, '-inf', floor)
    if #expired > 0 then
      for _, member in ipairs(expired) do total[c] = total[c] - amount_of(member) end
      redis.call('ZREMRANGEBYSCORE', entries, '-inf', floor)
      emptied[c] = true
    end
  end
  if removing and redis.call('ZREM', entries, remove_member) == 1 then
    total[c] = total[c] - amount_of(remove_member)
    touched[c] = true
    emptied[c] = true
  end
end

local breaker = redis.call('HMGET', KEYS[1], 'state', 'until')
local state = breaker[1] or 'closed'
local before = state
local until_ms = tonumber(breaker[2] or '0')
if state == 'open' and now >= until_ms then
  state = 'half_open'
  redis.call('HSET', KEYS[1], 'state', state)
end

-- How long until counter c would take `extra` more (admit: until it is under its cap).
local function retry_of(c, extra)
  if resets[c] ~= '0' then return tonumber(resets[c]) - now end
  if window[c] == 0 then return 0 end
  local need = total[c] + extra - cap[c]
  if extra == 0 then need = need + 1 end
  local gone, start = 0, 0
  while true do
    local batch = redis.call('ZRANGE', KEYS[2 * c], start, start + 127, 'WITHSCORES')
    if #batch == 0 then return window[c] end
    for i = 1, #batch, 2 do
      gone = gone + amount_of(batch[i])
      if gone >= need then return tonumber(batch[i + 1]) + window[c] - now end
    end
    start = start + 128
  end
end

local allowed, refused, retry = 1, 0, 0
local over = {}
-- admit with an amount: is there room for that much (e.g. one bounded answer)?
local extra = 0
if deciding then extra = amount end
for c = 1, n do
  over[c] = 0
  if deciding and cap[c] > 0 then
    local is_over
    if extra > 0 then is_over = total[c] + extra > cap[c] else is_over = total[c] >= cap[c] end
    if is_over then
      over[c] = 1
      if not shadow[c] and allowed == 1 and state ~= 'open' then
        allowed = 0
        refused = c
        retry = retry_of(c, extra)
      end
    end
  end
end
if deciding and state == 'open' then
  allowed, refused, retry = 0, -1, until_ms - now
end

local added = 0
if allowed == 1 and (op == 'reserve' or op == 'charge' or op == 'settle')
    and amount > 0 and add_member ~= '' then
  for c = 1, n do
    -- Added or there already: the set is not empty.
    emptied[c] = false
    if redis.call('ZADD', KEYS[2 * c], 'NX', now, add_member) == 1 then
      total[c] = total[c] + amount
      touched[c] = true
      added = 1
    end
  end
end

for c = 1, n do
  if total[c] ~= stored[c] or touched[c] then
    if emptied[c] and redis.call('ZCARD', KEYS[2 * c]) == 0 then total[c] = 0 end
    redis.call('SET', KEYS[2 * c + 1], total[c], 'EX', ttl[c])
    redis.call('EXPIRE', KEYS[2 * c], ttl[c])
  end
end

local tripped = 0
if hour_index > 0 then
  local hour = total[hour_index]
  if added == 1 and op ~= 'reserve' and state ~= 'open' and hour >= threshold then
    state = 'open'
    until_ms = now + cooldown
    tripped = 1
    redis.call('HSET', KEYS[1], 'state', state, 'until', until_ms, 'opened_at', now)
  end
  if state == 'half_open' and hour < threshold then
    state = 'closed'
    redis.call('DEL', KEYS[1])
  end
end

local reply = {allowed, refused, retry, state, tripped, until_ms, before, added}
for c = 1, n do reply[#reply + 1] = total[c] end
for c = 1, n do reply[#reply + 1] = over[c] end
-- '%d': integers printed whole, however large (tostring would round past 14 digits)
return string.format('%d %d %d %s %d %d %s %d' .. string.rep(' %d', 2 * n), unpack(reply))
