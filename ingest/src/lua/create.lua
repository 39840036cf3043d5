-- Creates a sale's keys in one step, so a sale is either whole or absent.
-- One stock bucket of a sale of several (see ingest/src/stock_buckets.rs) is created the
-- same way, with its share of the stock; every bucket records the sale's bucket count.
-- KEYS: sale, units, buckets, idem, rejected, released, claimed, lent, borrowed
-- ARGV: stock, limit, rate, burst, starts_us, ends_us, expire_at_ms, bucket count
-- Reply: 1 created, 0 exists.
if redis.call('HGET', KEYS[1], 'ready') == '1' then return 0 end
redis.call('DEL', KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6], KEYS[7], KEYS[8], KEYS[9])
redis.call('HSET', KEYS[1],
  'stock', ARGV[1], 'left', ARGV[1], 'limit', ARGV[2], 'rate', ARGV[3], 'burst', ARGV[4],
  'starts', ARGV[5], 'ends', ARGV[6], 'seq', 1, 'acc_o', 0, 'acc_u', 0, 'rel_u', 0,
  'skew', 0, 'nb', ARGV[8], 'ready', 1)
-- Every key exists from the start, so each carries the sale's expiry (longer than the sale).
redis.call('HSET', KEYS[2], '\n', 0)
redis.call('HSET', KEYS[3], '\n', '0:0')
redis.call('HSET', KEYS[4], '\n', '')
redis.call('HSET', KEYS[5], '\n', 0)
redis.call('SADD', KEYS[6], '\n')
redis.call('SADD', KEYS[7], '\n')
redis.call('HSET', KEYS[8], '\n', '')
redis.call('SADD', KEYS[9], '\n')
for i = 1, 9 do redis.call('PEXPIREAT', KEYS[i], ARGV[7]) end
return 1
