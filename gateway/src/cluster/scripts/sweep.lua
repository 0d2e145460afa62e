-- On one Redis: removes every membership and session count of a node (dead, or
-- restarting under the same id) atomically, with the `leave` events its users' last
-- sessions call for. A node whose liveness key (KEYS[3]) is back is not dead: it is left
-- alone. (On a cluster the same work is done step by step: `Scripts::sweep` in node.rs.)
if ARGV[2] == 'dead' and redis.call('EXISTS', KEYS[3]) == 1 then return -1 end
for _, user in ipairs(redis.call('SMEMBERS', KEYS[4])) do
  redis.call('HDEL', 'gw:{user:' .. user .. '}:sessions', ARGV[1])
end
redis.call('DEL', KEYS[4])
local entries = redis.call('SMEMBERS', KEYS[1])
for _, e in ipairs(entries) do
  local events, room, session, user = string.match(e, '^(.-)\n(.-)\n(.-)\n(.*)$')
  if room then
    local prefix = 'gw:{room:' .. room .. '}'
    if redis.call('HDEL', prefix .. ':members', session) == 1 then
      if redis.call('HLEN', prefix .. ':members') == 0 then
        redis.call('PEXPIRE', prefix .. ':state', ARGV[3])
      end
      local n = redis.call('HINCRBY', prefix .. ':users', user, -1)
      if n <= 0 then
        redis.call('HDEL', prefix .. ':users', user)
        if events == '1' then redis.call('PUBLISH', prefix, 'P leave ' .. user) end
      end
    end
  end
end
redis.call('DEL', KEYS[1])
if ARGV[2] ~= 'keep' then redis.call('SREM', KEYS[2], ARGV[1]) end
return #entries
