-- Sticky assignment: set if absent, else return the existing one.
-- Atomic with the trials bump and the write-behind record, so an assignment
-- is counted and made durable exactly once, whoever wins the race.
--
-- KEYS: 1 meta, 2 asg, 3 trials, 4 wb
-- ARGV: 1 subject, 2 variant, 3 propensity, 4 now_ms, 5 context_json
-- Returns {'C', value} created, {'E', value} existing,
--         {'R'} hot state missing (rebuild first), {'U'} unknown variant.
-- value = "variant_id|propensity|assigned_ms"
if redis.call('HEXISTS', KEYS[1], 'ready') == 0 then
  return {'R'}
end
local current = redis.call('HGET', KEYS[2], ARGV[1])
if current then
  return {'E', current}
end
-- Only variants registered on Start: an unknown one would break the FK in Postgres.
if redis.call('HEXISTS', KEYS[3], ARGV[2]) == 0 then
  return {'U'}
end
local value = ARGV[2] .. '|' .. ARGV[3] .. '|' .. ARGV[4]
redis.call('HSET', KEYS[2], ARGV[1], value)
redis.call('HINCRBY', KEYS[3], ARGV[2], 1)
redis.call('XADD', KEYS[4], '*',
  't', 'a', 's', ARGV[1], 'v', ARGV[2], 'p', ARGV[3], 'ts', ARGV[4], 'c', ARGV[5])
return {'C', value}
