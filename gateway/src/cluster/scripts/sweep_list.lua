-- On a cluster, the first step of a sweep (KEYS: the node's liveness, memberships and
-- users): `-1` when the node is alive again (ARGV[1] = `dead`), else what it held.
if ARGV[1] == 'dead' and redis.call('EXISTS', KEYS[1]) == 1 then return -1 end
return {redis.call('SMEMBERS', KEYS[2]), redis.call('SMEMBERS', KEYS[3])}
