-- Acknowledge flushed entries and delete them in one step, so the stream
-- holds only what is not yet in Postgres (never an entry still pending).
-- KEYS: 1 stream; ARGV: 1 group, 2.. entry ids
local ids = {}
for i = 2, #ARGV do
  ids[#ids + 1] = ARGV[i]
end
if #ids == 0 then
  return 0
end
local acked = redis.call('XACK', KEYS[1], ARGV[1], unpack(ids))
redis.call('XDEL', KEYS[1], unpack(ids))
return acked
