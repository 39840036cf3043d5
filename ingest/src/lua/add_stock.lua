-- Adds units to a sale. KEYS: sale; ARGV: units, events channel.
-- Reply: 1, or -1 if the sale is missing. Announces "stock" on the sale's events channel,
-- so ingest instances drop their sold-out flag of the sale.
if redis.call('HGET', KEYS[1], 'ready') ~= '1' then return -1 end
redis.call('HINCRBY', KEYS[1], 'stock', ARGV[1])
redis.call('HINCRBY', KEYS[1], 'left', ARGV[1])
redis.call('PUBLISH', ARGV[2], 'stock')
return 1
