-- Gives an order's units back, once per order id whatever the number of calls.
-- KEYS: sale, units, released, idem, claimed
-- ARGV: order_id, user, quantity, mode ("release" | "abort"), key, events channel
--   Units given back are announced on the sale's events channel ("stock"), so ingest
--   instances drop their sold-out flag of the sale.
--   release: a settled order failed or expired; its idempotency answer stays.
--   abort:   the order never reached the log (or its decision timed out); if it holds
--            its key's answer, it is undone as if never accepted and the answer is
--            forgotten so a retry is decided afresh.
-- Reply: 1 released now, 0 released before (or, for abort, nothing held), 2 (abort only)
--        the settler already claimed the order, -1 the sale's keys are missing.
if redis.call('HGET', KEYS[1], 'ready') ~= '1' then return -1 end
local order_id, user, qty, mode = ARGV[1], ARGV[2], tonumber(ARGV[3]), ARGV[4]
if mode == 'abort' then
  -- The settler holds the record: the order is durable, whatever the producer said.
  if redis.call('SISMEMBER', KEYS[5], order_id) == 1 then return 2 end
  -- Only an order that holds its key's answer is undone: an abort of a decision that
  -- never ran, or was a refusal, gives nothing back.
  local ikey = user .. '\n' .. ARGV[5]
  local stored = redis.call('HGET', KEYS[4], ikey)
  if not stored or string.match(stored, '^[^|]*|([^|]*)|') ~= order_id then return 0 end
  redis.call('HDEL', KEYS[4], ikey)
end
if redis.call('SADD', KEYS[3], order_id) == 0 then return 0 end
redis.call('HINCRBY', KEYS[1], 'left', qty)
local held = tonumber(redis.call('HGET', KEYS[2], user) or '0')
redis.call('HSET', KEYS[2], user, math.max(held - qty, 0))
if mode == 'abort' then
  redis.call('HINCRBY', KEYS[1], 'acc_o', -1)
  redis.call('HINCRBY', KEYS[1], 'acc_u', -qty)
else
  redis.call('HINCRBY', KEYS[1], 'rel_u', qty)
end
redis.call('PUBLISH', ARGV[6], 'stock')
return 1
