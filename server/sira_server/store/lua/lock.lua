-- Release or extend a lock only if this caller still holds it (token match).
-- KEYS: 1 lock; ARGV: 1 token, 2 'release' | 'extend', 3 ttl_ms (extend)
if redis.call('GET', KEYS[1]) ~= ARGV[1] then
  return 0
end
if ARGV[2] == 'release' then
  return redis.call('DEL', KEYS[1])
end
return redis.call('PEXPIRE', KEYS[1], ARGV[3])
