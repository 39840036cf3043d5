-- Marks an accepted order's idempotency answer durable (its record is in the log).
-- KEYS: idem; ARGV: user, key, order_id. Reply: 1 confirmed, 0 no such answer.
local ikey = ARGV[1] .. '\n' .. ARGV[2]
local stored = redis.call('HGET', KEYS[1], ikey)
if not stored then return 0 end
local fp, order, seq, qty = string.match(stored, '^([^|]*)|([^|]*)|([^|]*)|([^|]*)|')
if order ~= ARGV[3] then return 0 end
redis.call('HSET', KEYS[1], ikey, fp .. '|' .. order .. '|' .. seq .. '|' .. qty .. '|1')
return 1
