-- The settler takes an order it read from the log; from now on an abort cannot undo it.
-- KEYS: sale, released, claimed; ARGV: order_id
-- Reply: 1 claimed (charge it), 0 aborted first (cancel it), -1 the sale's keys are missing.
if redis.call('HGET', KEYS[1], 'ready') ~= '1' then return -1 end
if redis.call('SISMEMBER', KEYS[3], ARGV[1]) == 1 then return 1 end
if redis.call('SISMEMBER', KEYS[2], ARGV[1]) == 1 then return 0 end
redis.call('SADD', KEYS[3], ARGV[1])
return 1
