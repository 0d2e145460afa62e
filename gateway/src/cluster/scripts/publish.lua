-- One atomic step per publish: the next sequence number (a new epoch when the sequence
-- restarts), the history entry, the expiry of the room's keys, and the channel message.
local history, ttl, volatile = tonumber(ARGV[2]), ARGV[3], ARGV[6]
local framed = #ARGV[4] .. ' ' .. ARGV[4] .. ARGV[5]
if volatile == '1' then
  redis.call(ARGV[8], ARGV[1], '- ' .. framed)
  return {0, 0}
end
local seq = redis.call('HINCRBY', KEYS[1], 'seq', 1)
if seq == 1 then
  -- The sequence (re)starts: nothing older may stay in the stream. The epoch is the one a
  -- joining member already saw (the view creates it), or a new one when the state was lost.
  redis.call('DEL', KEYS[2])
end
redis.call('HSETNX', KEYS[1], 'epoch', ARGV[7])
if history > 0 then
  redis.call('XADD', KEYS[2], 'MAXLEN', history, '0-' .. seq, 'm', ARGV[4], 'd', ARGV[5])
  redis.call('PEXPIRE', KEYS[2], ttl)
end
if redis.call('HLEN', KEYS[3]) == 0 then redis.call('PEXPIRE', KEYS[1], ttl) end
redis.call(ARGV[8], ARGV[1], seq .. ' ' .. redis.call('HGET', KEYS[1], 'epoch') .. ' ' .. framed)
return {seq, created}
