-- A session leaves a room; the user's last session there cluster-wide is announced, and
-- with the last member gone the room's state expires after a history lifetime (ARGV[7]
-- ms). Also what a sweep runs for each membership of a dead node on a cluster.
if redis.call('HDEL', KEYS[1], ARGV[1]) == 0 then return 0 end
-- The last member gone: the room's state lives on for one history lifetime.
if redis.call('HLEN', KEYS[1]) == 0 and redis.call('EXISTS', KEYS[3]) == 1 then
  redis.call('PEXPIRE', KEYS[3], ARGV[7])
end
local n = redis.call('HINCRBY', KEYS[2], ARGV[3], -1)
if n <= 0 then
  redis.call('HDEL', KEYS[2], ARGV[3])
  if ARGV[5] == '1' then redis.call(ARGV[6], ARGV[4], 'P leave ' .. ARGV[3]) end
end
return 1
