-- On one Redis: releases a user's session counts (KEYS[1]) held by nodes other than
-- ARGV[1] whose liveness key has expired, in one atomic step (a node that came back
-- between the check and the removal keeps its count). Returns how many were released.
local released = 0
for _, other in ipairs(redis.call('HKEYS', KEYS[1])) do
  if other ~= ARGV[1] and redis.call('EXISTS', 'gw:{node:' .. other .. '}') == 0 then
    released = released + redis.call('HDEL', KEYS[1], other)
  end
end
return released
