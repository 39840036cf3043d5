-- A stock bucket receives units another bucket lent it (lend.lua), once per transfer id
-- whatever the number of calls (a retry, or reconcile completing a transfer a dead caller
-- left half-done). Announces "stock" on the sale's events channel, so no instance keeps a
-- sold-out flag learnt while the units were on their way.
-- KEYS: sale (the borrower's), borrowed
-- ARGV: transfer id, units, events channel
-- Reply: 1 added now, 0 added before, -1 the bucket's keys are missing.
if redis.call('HGET', KEYS[1], 'ready') ~= '1' then return -1 end
if redis.call('SADD', KEYS[2], ARGV[1]) == 0 then return 0 end
redis.call('HINCRBY', KEYS[1], 'left', ARGV[2])
redis.call('PUBLISH', ARGV[3], 'stock')
return 1
