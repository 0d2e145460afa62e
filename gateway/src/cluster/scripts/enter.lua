-- A session enters a room (KEYS: the room's members, users and state): listed, counted
-- per user, the room's state kept without expiry while it has members; the user's first
-- session there cluster-wide is announced (ARGV[6]: `PUBLISH` or `SPUBLISH`). Entering
-- again changes nothing (a node re-announces its members after it was swept). The node's
-- own record of the membership is written before, apart (its keys are in another slot on
-- a cluster).
local added = redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
-- A room with members keeps its sequence and epoch however long it is quiet.
redis.call('PERSIST', KEYS[3])
if added == 0 then return 0 end
local n = redis.call('HINCRBY', KEYS[2], ARGV[3], 1)
if n == 1 and ARGV[5] == '1' then
  redis.call(ARGV[6], ARGV[4], 'P join ' .. ARGV[3])
end
return n
