-- Whether the room's state (KEYS[1]) is new, checked before anything else: a new room may
-- be created only when the next-to-last argument is `1` (the node's room budget allows
-- it, or the room keeps no history); otherwise the script returns `{-1}` and keeps
-- nothing. `created` tells the caller the room was created, for the node's accounting.
local fresh = redis.call('EXISTS', KEYS[1]) == 0
if fresh and ARGV[#ARGV - 1] ~= '1' then return {-1} end
local created = fresh and 1 or 0
