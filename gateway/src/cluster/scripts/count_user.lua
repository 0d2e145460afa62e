-- Sets this node's session count of a user (KEYS[1], field ARGV[1]) to ARGV[2] unless
-- that takes the user's count over all nodes past ARGV[3] (`-1`: no check). Setting
-- rather than incrementing makes a retry, or a re-announcement, exact. The node's set of
-- users is updated apart (another slot on a cluster).
local count, max = tonumber(ARGV[2]), tonumber(ARGV[3])
if max >= 0 then
  local total = count - tonumber(redis.call('HGET', KEYS[1], ARGV[1]) or '0')
  for _, v in ipairs(redis.call('HVALS', KEYS[1])) do total = total + tonumber(v) end
  if total > max then return 0 end
end
if count > 0 then
  redis.call('HSET', KEYS[1], ARGV[1], count)
else
  redis.call('HDEL', KEYS[1], ARGV[1])
end
return 1
