-- flashsale admission: one atomic decision per order, the same rules as ingest/src/model.rs.
--
-- KEYS[1] sale hash     stock, left, limit, rate, burst, starts, ends, seq, acc_o, acc_u,
--                       rel_u, skew, ready
-- KEYS[2] units hash    user -> units held
-- KEYS[3] the user's bucket "tokens:at_us" (milli-tokens), a string key of its own that
--         expires once the bucket has refilled (absent and full are the same bucket)
-- KEYS[4] idem hash     user.."\n"..key -> "fingerprint|order_id|sequence|quantity|confirmed"
-- KEYS[5] rejected hash code -> count
-- ARGV    user, quantity, key, fingerprint, order_id, ask
--         ask: "" (a sale of one bucket), or for a stock bucket of a sale of several
--         (ingest/src/stock_buckets.rs) "first" (too few units left answers
--         {"short", left, now} and counts nothing: the caller borrows, then asks again) or
--         "retry" (that second ask: the first one took the token).
--
-- Replies: {"accepted", order_id, sequence, quantity, now}
--          {"replayed", order_id, sequence, quantity, now}
--          {"in_progress", now} | {"rejected", code, retry_after_s, now} | {"missing", now}
--          sold out: {"rejected", "sold_out", 0, stock_left, now} (ingest's sold-out flag
--          is set only when stock_left is 0)
-- Numbers are doubles in Lua; every value here stays below 2^53, and results are written
-- with %.0f so they never turn into exponent notation.
local sale, units, buckets, idem, rejected = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
local user, qty, key, fp, order_id = ARGV[1], tonumber(ARGV[2]), ARGV[3], ARGV[4], ARGV[5]
local ask = ARGV[6] or ''

local t = redis.call('TIME')
local f = redis.call('HMGET', sale, 'ready', 'left', 'limit', 'rate', 'burst', 'starts', 'ends', 'seq', 'skew')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2]) + (tonumber(f[9]) or 0)
if f[1] ~= '1' then
  return {'missing', now}
end

local function reject(code, retry)
  redis.call('HINCRBY', rejected, code, 1)
  return {'rejected', code, retry or 0, now}
end

-- 1. Idempotency: a stored answer is returned as is.
local ikey = user .. '\n' .. key
local stored = redis.call('HGET', idem, ikey)
if stored then
  local sfp, sorder, sseq, sqty, sconf = string.match(stored, '^([^|]*)|([^|]*)|([^|]*)|([^|]*)|([^|]*)$')
  if sfp ~= fp then return reject('idempotency_conflict') end
  if sconf ~= '1' then return {'in_progress', now} end
  return {'replayed', sorder, tonumber(sseq), tonumber(sqty), now}
end

-- 2. The sale is open.
if now < tonumber(f[6]) or now >= tonumber(f[7]) then return reject('sale_not_active') end

-- 3. The user's token bucket (integer milli-tokens, as take_token in the model); not on a
-- bucket's retry (its first ask took the token).
if ask ~= 'retry' then
  local TOKEN = 1000
  local cap = tonumber(f[5]) * TOKEN
  local rate = math.max(tonumber(f[4]), 1)
  local tokens, at = cap, now
  local b = redis.call('GET', buckets)
  if b then
    local bt, ba = string.match(b, '^([^:]*):([^:]*)$')
    tokens, at = tonumber(bt), tonumber(ba)
  end
  local elapsed = math.max(now - at, 0)
  local fill = math.floor(cap * 1000 / rate) + 1
  if elapsed >= fill then
    tokens, at = cap, now
  else
    local added = math.floor(elapsed * rate / 1000)
    tokens = math.min(tokens + added, cap)
    at = at + math.floor(added * 1000 / rate)
    if tokens == cap then at = now end
  end
  local allowed = tokens >= TOKEN
  if allowed then tokens = tokens - TOKEN end
  -- Kept until it has refilled (bucket_full_at in the model), as a relative expiry: the test
  -- clock's skew only grows, so by then the bucket is full on the skewed clock too.
  local full_at = at + math.min(math.floor(((cap - tokens) * 1000 + rate - 1) / rate), fill)
  if full_at > now then
    redis.call('SET', buckets, string.format('%.0f:%.0f', tokens, at), 'PX',
      string.format('%.0f', math.floor((full_at - now + 999) / 1000)))
  else
    redis.call('DEL', buckets)
  end
  if not allowed then
    local missing_us = math.floor(((TOKEN - tokens) * 1000 + rate - 1) / rate)
    local secs = math.floor((missing_us + 999999) / 1000000)
    if secs < 1 then secs = 1 end
    return reject('rate_limited', secs)
  end
end

-- 4. The per-user limit.
local held = tonumber(redis.call('HGET', units, user) or '0')
if held + qty > tonumber(f[3]) then return reject('limit_exceeded') end

-- 5. Stock.
if tonumber(f[2]) < qty then
  if ask == 'first' then return {'short', tonumber(f[2]), now} end
  redis.call('HINCRBY', rejected, 'sold_out', 1)
  return {'rejected', 'sold_out', 0, tonumber(f[2]), now}
end

-- Accept: take the stock, count the user's units, assign the sequence, store the answer.
local seq = tonumber(f[8])
redis.call('HINCRBY', sale, 'left', -qty)
redis.call('HINCRBY', sale, 'seq', 1)
redis.call('HINCRBY', sale, 'acc_o', 1)
redis.call('HINCRBY', sale, 'acc_u', qty)
redis.call('HINCRBY', units, user, qty)
redis.call('HSET', idem, ikey, string.format('%s|%s|%.0f|%.0f|0', fp, order_id, seq, qty))
return {'accepted', order_id, seq, qty, now}
