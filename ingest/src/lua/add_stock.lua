-- Adds units to a sale. KEYS: sale; ARGV: units. Reply: 1, or -1 if the sale is missing.
if redis.call('HGET', KEYS[1], 'ready') ~= '1' then return -1 end
redis.call('HINCRBY', KEYS[1], 'stock', ARGV[1])
redis.call('HINCRBY', KEYS[1], 'left', ARGV[1])
return 1
