-- A room as a joining member sees it: its sequence number and epoch (created if the room
-- has none), its members, whether it was created, and with `since` the kept entries
-- after it, flattened as seq, meta, data.
redis.call('HSETNX', KEYS[1], 'epoch', ARGV[1])
if redis.call('HLEN', KEYS[3]) == 0 then redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
local seq = tonumber(redis.call('HGET', KEYS[1], 'seq') or '0')
local out = {seq, redis.call('HGET', KEYS[1], 'epoch'), redis.call('HLEN', KEYS[3]), created}
local since = tonumber(ARGV[3])
if since >= 0 and since < seq then
  for _, e in ipairs(redis.call('XRANGE', KEYS[2], '0-' .. (since + 1), '+')) do
    local f = e[2]
    local m, d
    for i = 1, #f, 2 do
      if f[i] == 'm' then m = f[i + 1] elseif f[i] == 'd' then d = f[i + 1] end
    end
    out[#out + 1] = string.sub(e[1], 3)
    out[#out + 1] = m
    out[#out + 1] = d
  end
end
return out
