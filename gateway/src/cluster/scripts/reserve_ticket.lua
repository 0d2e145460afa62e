-- Reserves one of a user's tickets (KEYS[1]: the user's count) unless the user issued
-- the most allowed (ARGV[2]) within one ticket lifetime (ARGV[1] ms). The ticket itself
-- is stored next, under its own key (another slot on a cluster).
local n = redis.call('INCR', KEYS[1])
redis.call('PEXPIRE', KEYS[1], ARGV[1])
if n > tonumber(ARGV[2]) then
  redis.call('DECR', KEYS[1])
  return 0
end
return 1
