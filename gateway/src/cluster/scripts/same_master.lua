-- On a cluster (the last argument `1`), a room's state remembers which master it was written on
-- (`rid`, the master's replication id): after a failover or a move of its slot the
-- promoted replica or new master has another id, and whatever it holds of the room may
-- lack the last writes, so the room starts over in a new epoch (clients then get
-- `recovered: false`, never a silent gap). KEYS[1]: state, KEYS[2]: stream.
if ARGV[#ARGV] == '1' then
  local rid = string.match(redis.call('INFO', 'replication'), 'master_replid:(%w+)') or ''
  local had = redis.call('HGET', KEYS[1], 'rid')
  if had ~= rid then
    if had then redis.call('DEL', KEYS[1], KEYS[2]) end
    redis.call('HSET', KEYS[1], 'rid', rid)
  end
end
