-- A stock bucket lends units to another bucket of the same sale that ran short (see
-- ingest/src/stock_buckets.rs, lend_amount): at least what is missing, up to half of what
-- it holds, never more than it has. The transfer is recorded in the bucket's `lent` hash
-- until the borrower has it (borrow.lua) and the caller deletes the entry; an entry left
-- behind by a caller that died in between is completed by `flashsale reconcile`.
-- KEYS: sale (the lender's), lent
-- ARGV: transfer id, units missing, the borrowing bucket
-- Reply: units lent (0: none left), -1 the bucket's keys are missing.
if redis.call('HGET', KEYS[1], 'ready') ~= '1' then return -1 end
local left = tonumber(redis.call('HGET', KEYS[1], 'left') or '0')
local want = tonumber(ARGV[2])
if left <= 0 then return 0 end
local take = math.min(math.max(want, math.floor((left + 1) / 2)), left)
redis.call('HINCRBY', KEYS[1], 'left', -take)
redis.call('HSET', KEYS[2], ARGV[1], ARGV[3] .. ':' .. string.format('%.0f', take))
return take
