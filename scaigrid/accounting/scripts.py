"""The Lua scripts of the request path: admitting requests and recording their usage, in one round trip per batch.

BATCH runs, in one EVALSHA, every admission and usage record an http process has waiting (a group commit: what
queues while one batch is on its way goes in the next), each one exactly as it would run alone: Redis runs a script
atomically, so limits stay exact across processes.

Rate limits are a sliding log: one sorted set per limited object (key, user, tenant, partner) holding the
Redis TIME of each admitted request in the last 60 s. Chosen over the two-bucket sliding-window counter
because it is exact: a key with rpm 10 gets exactly 10 requests in any 60 s, across any number of http
processes, where the counter's interpolation lets one through too many or too few near a bucket edge.
Its cost is bounded by the limit: only admitted requests are logged, so a set never holds more entries
than its limit, and every request costs O(log n) per level.

Each batch with usage records also keeps the usage journal's books (service.py): it stamps the process's writer key
with the process's own count of its batches and reports whether the key still held the previous stamp, where its last
record stands among all ever pushed, and how many of those the flush has stored, so that a process learns from the
answer it waits for anyway, with no round trip of its own, which of its records are in MariaDB and whether Redis lost
any of them.

Budget counters are hashes of integers (requests, tokens, cost as whole units + picos), incremented with
HINCRBY, so costs add exactly; the comparison with the limit may round in Lua's doubles (at 1e-16 relative),
which is fine for a gate.
"""

# Shared by both calls: what a budget's counter hash says it has used, in each limit's unit, and which of its
# limits (cost, tokens, requests: three arguments of `args` from `arg`, '' for one not set) it has reached at `share`
# of it.
_USED = """
local LIMIT_TYPES = {'cost', 'tokens', 'requests'}
local function used(key, limit_type)
  if limit_type == 'cost' then
    local v = redis.call('HMGET', key, 'cost_units', 'cost_picos')
    return (tonumber(v[1]) or 0) + (tonumber(v[2]) or 0) / 1e12
  end
  return tonumber(redis.call('HGET', key, limit_type)) or 0
end
local function reached(key, args, arg, share)
  for i = 1, 3 do
    local limit = args[arg + i - 1]
    if limit ~= '' and used(key, LIMIT_TYPES[i]) >= tonumber(limit) * share then
      return i
    end
  end
  return 0
end
"""

# Admitting one request. KEYS: one sorted set per rate-limited level, then one counter hash per budget to check.
# ARGV: number of levels, a unique member for this request, each level's limit, then per budget:
#       hard action, cost limit, token limit, request limit ('' for a limit not set).
# Returns {verdict (0 admitted, 1 rate limited, 2 budget), level shown, its limit, remaining, reset (unix s),
#          retry after (s), index of the blocking budget, which of its limits blocks (1 cost, 2 tokens, 3 requests)}.
_ADMIT = """
local function admit(KEYS, ARGV)
local WINDOW_US = 60000000
local THROTTLE_DIVISOR = 10
local n_levels = tonumber(ARGV[1])
local member = ARGV[2]
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])

local blocked, blocking_limit, divisor = 0, 0, 1
for j = 1, #KEYS - n_levels do
  local arg = 3 + n_levels + (j - 1) * 4  -- its hard action; its limits follow
  local limit = reached(KEYS[n_levels + j], ARGV, arg + 1, 1)
  if limit > 0 then
    if ARGV[arg] == 'block' then
      blocked, blocking_limit = j, limit
      break
    elseif ARGV[arg] == 'throttle' then
      divisor = THROTTLE_DIVISOR
    end
  end
end

local counts, limits = {}, {}
local shown, retry_us = 0, 0
for i = 1, n_levels do
  redis.call('ZREMRANGEBYSCORE', KEYS[i], '-inf', now - WINDOW_US)
  counts[i] = redis.call('ZCARD', KEYS[i])
  limits[i] = math.max(1, math.floor(tonumber(ARGV[2 + i]) / divisor))
  if counts[i] >= limits[i] then
    -- One more fits once the oldest (count - limit + 1) entries have left the window.
    local entry = redis.call('ZRANGE', KEYS[i], counts[i] - limits[i], counts[i] - limits[i], 'WITHSCORES')
    local wait_us = tonumber(entry[2]) + WINDOW_US - now
    if wait_us > retry_us then
      retry_us, shown = wait_us, i
    end
  end
end

local verdict = 0
if blocked > 0 then
  verdict = 2
  shown = 0
elseif shown > 0 then
  verdict = 1
else
  for i = 1, n_levels do
    redis.call('ZADD', KEYS[i], now, member)
    redis.call('PEXPIRE', KEYS[i], WINDOW_US / 1000)
    counts[i] = counts[i] + 1
  end
end

if shown == 0 then  -- the most restrictive level: fewest requests left, then the lowest limit
  shown = 1
  for i = 2, n_levels do
    local left, best = limits[i] - counts[i], limits[shown] - counts[shown]
    if left < best or (left == best and limits[i] < limits[shown]) then
      shown = i
    end
  end
end
local reset_us = now + retry_us
if verdict ~= 1 then  -- a request comes back when the oldest one logged leaves the window
  local oldest = redis.call('ZRANGE', KEYS[shown], 0, 0, 'WITHSCORES')
  reset_us = (oldest[2] and tonumber(oldest[2]) or now) + WINDOW_US
end
return {verdict, shown, limits[shown], math.max(0, limits[shown] - counts[shown]), math.ceil(reset_us / 1e6),
        math.ceil(retry_us / 1e6), blocked, blocking_limit}
end
"""

# Recording one request's usage. KEYS: the usage buffer (a list), then one counter hash per budget the record counts
# towards.
# ARGV: the record as JSON, its tokens (in + out), its cost as whole units and picos, then per budget:
#       counter TTL in seconds (0: none), soft limit share, cost limit, token limit, request limit ('' if not set).
# Returns {budget index, 'soft' | 'hard', ...} for each threshold crossed for the first time this period: the soft
# limit or the limit of any one of the budget's limits.
_RECORD = """
local buffer_length = 0  -- after the last push
local function record(KEYS, ARGV)
buffer_length = redis.call('RPUSH', KEYS[1], ARGV[1])
local crossed = {}
for j = 2, #KEYS do
  local key, arg = KEYS[j], 4 + (j - 2) * 5
  redis.call('HINCRBY', key, 'requests', 1)
  redis.call('HINCRBY', key, 'tokens', ARGV[2])
  redis.call('HINCRBY', key, 'cost_units', ARGV[3])
  if redis.call('HINCRBY', key, 'cost_picos', ARGV[4]) >= 1e12 then
    redis.call('HINCRBY', key, 'cost_picos', '-1000000000000')
    redis.call('HINCRBY', key, 'cost_units', 1)
  end
  if tonumber(ARGV[arg + 1]) > 0 then
    redis.call('EXPIRE', key, ARGV[arg + 1])
  end
  -- HSETNX marks the crossing in the counter itself: reported once per budget and period, by one process.
  if reached(key, ARGV, arg + 3, tonumber(ARGV[arg + 2])) > 0 and redis.call('HSETNX', key, 'soft', 1) == 1 then
    table.insert(crossed, j - 1)
    table.insert(crossed, 'soft')
  end
  if reached(key, ARGV, arg + 3, 1) > 0 and redis.call('HSETNX', key, 'hard', 1) == 1 then
    table.insert(crossed, j - 1)
    table.insert(crossed, 'hard')
  end
end
return crossed
end
"""

ADMIT, RECORD = "a", "r"  # the kinds of call BATCH runs
# KEYS: usage.TRIMMED_KEY, this process's writer key, then the keys of every call, one call after another.
# ARGV: the number of calls; the writer key's stamp after this process's last batch of records that Redis confirmed
# (0: none yet), the stamp of this batch, the writer key's TTL in seconds; for each call its kind (ADMIT or RECORD),
# its number of keys and its number of arguments; then the arguments of every call, one after another.
# Returns each call's own answer, in order, then {lost, position, drained}, all 0 for admissions only (no calls at all
# is a probe: lost and drained without pushing anything): lost is 1 if the writer key held less than the confirmed
# stamp (Redis lost data written since; it keeps a prefix of its writes, whether it restarted empty, from an older
# snapshot or failed over to a replica, so anything it kept of this process's is older than what it lost); position
# that of the batch's last record among all entries ever pushed; drained how many of those, from the first, the
# flush has stored (and trimmed).
BATCH = _USED + _ADMIT + _RECORD + """
local function slice(t, from, n)
  local part = {}
  for i = 1, n do
    part[i] = t[from + i - 1]
  end
  return part
end
local calls = tonumber(ARGV[1])
local answers = {}
local records = false
local k, a = 3, 5 + 3 * calls
for c = 1, calls do
  local head = 5 + 3 * (c - 1)
  local n_keys, n_args = tonumber(ARGV[head + 1]), tonumber(ARGV[head + 2])
  local call = admit
  if ARGV[head] == 'r' then
    call, records = record, true
  end
  answers[c] = call(slice(KEYS, k, n_keys), slice(ARGV, a, n_args))
  k, a = k + n_keys, a + n_args
end
local lost, position, drained = 0, 0, 0
if records or calls == 0 then  -- admissions only say nothing (the next batch of records will); no calls: a probe
  local held
  if records then
    held = redis.call('SET', KEYS[2], ARGV[3], 'EX', ARGV[4], 'GET')
  else
    held = redis.call('GET', KEYS[2])
  end
  if tonumber(held or '0') < tonumber(ARGV[2]) then
    lost = 1
  end
  drained = tonumber(redis.call('GET', KEYS[1]) or '0')
  if records then
    position = drained + buffer_length
  end
end
answers[calls + 1] = {lost, position, drained}
return answers
"""

# KEYS: a budget's counter hash, the mark that counters have not been lost since the worker last checked.
# ARGV: TTL in seconds (0: none), requests, tokens, cost units, picos already in MariaDB, and whether that is
# the whole period's usage (1) or only what came before the budget (0). Adds them once (the `seeded` mark makes
# a second run a no-op); returns 1 if it did. A partial seed of a counter Redis has just lost would leave it
# short for good, so without the mark it waits for the next run's whole-period seed.
SEED = """
if ARGV[6] == '0' and redis.call('EXISTS', KEYS[2]) == 0 then
  return 0
end
if redis.call('HSETNX', KEYS[1], 'seeded', 1) == 0 then
  return 0
end
redis.call('HINCRBY', KEYS[1], 'requests', ARGV[2])
redis.call('HINCRBY', KEYS[1], 'tokens', ARGV[3])
redis.call('HINCRBY', KEYS[1], 'cost_units', ARGV[4])
if redis.call('HINCRBY', KEYS[1], 'cost_picos', ARGV[5]) >= 1e12 then
  redis.call('HINCRBY', KEYS[1], 'cost_picos', '-1000000000000')
  redis.call('HINCRBY', KEYS[1], 'cost_units', 1)
end
if tonumber(ARGV[1]) > 0 then
  redis.call('EXPIRE', KEYS[1], ARGV[1])
end
return 1
"""

# KEYS: the usage buffer, usage.TRIMMED_KEY. ARGV: how many entries were flushed, and the last of them as it was read.
# Trims them only if they are still at the head: a Redis that restarted empty meanwhile holds only newer
# entries, which must stay. Counts them as trimmed: every entry up to that count is in MariaDB.
TRIM = """
if redis.call('LINDEX', KEYS[1], tonumber(ARGV[1]) - 1) == ARGV[2] then
  redis.call('LTRIM', KEYS[1], ARGV[1], -1)
  redis.call('INCRBY', KEYS[2], ARGV[1])
  return 1
end
return 0
"""
