-- Tracked events of one experiment (of one of its shards), in order, in one atomic
-- step: for each, check the assignment, dedupe, bump counters, append the write-behind
-- record. One Track is a batch of one; a batch answers exactly what its events sent one
-- by one, in order, would (a duplicate within the batch is a duplicate, caps count in
-- order).
--
-- KEYS: 1 meta, 2 asg, 3 succ, 4 conv, 5 refunded, 6 churned, 7 events, 8 cnt, 9 wb,
--       10 outcome, then one cap key per capped event (cap ~= 0), in event order: that
--       subject's events of that type this hour
-- ARGV: 1 received_ms, 2 cap ttl ms, then 8 per event: subject, variant, event_type,
--       value, currency ('' = none), event_id, occurred_ms, cap (0 = none)
-- Returns the string 'R' when the hot state is missing (rebuild first; nothing ran),
-- else a list with one reply per event, in order:
--   'A1' / 'A0' accepted (first conversion of the subject or not), 'D' duplicate event
--   id, 'N' subject not assigned, 'M<variant>' variant mismatch (the assigned one),
--   'L' over the subject's cap, 'E<error reply>' this event failed.
--
-- Errors: each event runs under pcall, so an error fails its own event only and the
-- others still run, as separate calls did. Redis never rolls back the writes made
-- before an error, but the errors the store raises here (READONLY, OOM, MISCONF) depend
-- on the server's state, which no script can see change: OOM is checked at a script's
-- first write only, the others at every write with the same answer. So such an error
-- fails an event at its first write (the SADD of its id): it wrote nothing and its
-- caller, told UNAVAILABLE, retries it. Anything else (a wrong type, a Lua error) is a
-- bug and may leave its event half applied, as it did with one call per event.
--
-- Successes per variant: subjects with a conversion. With reward
-- 'conversion_not_refunded', a subject counts while no refund occurred at or
-- after its latest conversion: a refund before any conversion blocks nothing,
-- conversion -> refund -> conversion is a success again, repeated refunds
-- change nothing more. "After" is by occurrence time, so the result does not
-- depend on the order events arrive in (store/rebuild.py agrees):
-- outcome[subject] = "latest conversion ms|latest refund ms" (0 = none).
local meta = redis.call('HMGET', KEYS[1], 'ready', 'reward')
if not meta[1] then
  return 'R'
end
local not_refunded = meta[2] == 'conversion_not_refunded'
local received_ms, cap_ttl_ms = ARGV[1], ARGV[2]

-- Reward integrity: moves the subject's latest conversion or refund time and
-- adjusts the variant's successes by the change in "converted, not refunded".
local function settle(subject, variant, at, is_conversion)
  local held = redis.call('HGET', KEYS[10], subject)
  local conv_ms, refund_ms = 0, 0
  if held then
    local bar = string.find(held, '|', 1, true)
    conv_ms = tonumber(string.sub(held, 1, bar - 1))
    refund_ms = tonumber(string.sub(held, bar + 1))
  end
  local before = conv_ms > 0 and refund_ms < conv_ms
  if is_conversion then
    conv_ms = math.max(conv_ms, at)
  else
    refund_ms = math.max(refund_ms, at)
  end
  redis.call('HSET', KEYS[10], subject, string.format('%d|%d', conv_ms, refund_ms))
  local after = conv_ms > 0 and refund_ms < conv_ms
  if after and not before then
    redis.call('HINCRBY', KEYS[3], variant, 1)
  elseif before and not after then
    redis.call('HINCRBY', KEYS[3], variant, -1)
  end
end

local function track(subject, variant, event_type, value, currency, event_id, occurred_ms,
                     cap, cap_key)
  local current = redis.call('HGET', KEYS[2], subject)
  if not current then
    return 'N'
  end
  local assigned = string.sub(current, 1, string.find(current, '|', 1, true) - 1)
  if assigned ~= variant then
    return 'M' .. assigned
  end
  -- Event ids are idempotency keys per subject (store/hot_keys.py, `event_member`): a
  -- subject's events live in its shard, so that is all one script can check atomically.
  local member = event_id .. '\0' .. subject
  -- A bare id is an event recorded before ids were per subject (until a rebuild
  -- rewrites the set): still a duplicate, so an upgrade never counts a retry twice.
  if redis.call('SISMEMBER', KEYS[7], event_id) == 1
      or redis.call('SADD', KEYS[7], member) == 0 then
    return 'D'
  end
  -- Per-subject cap (tracking without a service token): refused events leave no trace
  -- but the count, and their id stays free for a later retry.
  if cap_key then
    local seen = redis.call('INCR', cap_key)
    if seen == 1 then
      redis.call('PEXPIRE', cap_key, cap_ttl_ms)
    end
    if seen > cap then
      redis.call('SREM', KEYS[7], member)
      return 'L'
    end
  end

  local has_amount = currency ~= '' and tonumber(value) > 0
  local first_conversion = 0
  local prefix = variant .. '|'
  if event_type == 'conversion' then
    redis.call('HINCRBY', KEYS[8], prefix .. 'conversions', 1)
    if has_amount then
      redis.call('HINCRBYFLOAT', KEYS[8], prefix .. 'revenue|' .. currency, value)
    end
    if redis.call('SADD', KEYS[4], subject) == 1 then
      first_conversion = 1
      redis.call('HINCRBY', KEYS[8], prefix .. 'converted_subjects', 1)
      if not not_refunded then
        redis.call('HINCRBY', KEYS[3], variant, 1)
      end
    end
    if not_refunded then
      settle(subject, variant, tonumber(occurred_ms), true)
    end
  elseif event_type == 'refund' then
    redis.call('HINCRBY', KEYS[8], prefix .. 'refunds', 1)
    if has_amount then
      redis.call('HINCRBYFLOAT', KEYS[8], prefix .. 'refund_amount|' .. currency, value)
    end
    if redis.call('SADD', KEYS[5], subject) == 1 then
      redis.call('HINCRBY', KEYS[8], prefix .. 'refunded_subjects', 1)
    end
    if not_refunded then
      settle(subject, variant, tonumber(occurred_ms), false)
    end
  elseif event_type == 'churn' then
    redis.call('HINCRBY', KEYS[8], prefix .. 'churns', 1)
    if redis.call('SADD', KEYS[6], subject) == 1 then
      redis.call('HINCRBY', KEYS[8], prefix .. 'churned_subjects', 1)
    end
  else
    redis.call('HINCRBY', KEYS[8], prefix .. 'custom|' .. event_type, 1)
  end

  redis.call('XADD', KEYS[9], '*',
    't', 'm', 's', subject, 'v', variant, 'e', event_type, 'x', value, 'cur', currency,
    'id', event_id, 'ts', occurred_ms, 'rts', received_ms)
  return 'A' .. first_conversion
end

local replies = {}
local next_cap_key = 11
for at = 3, #ARGV, 8 do
  local cap = tonumber(ARGV[at + 7])
  local cap_key = nil
  if cap ~= 0 then
    cap_key = KEYS[next_cap_key]
    next_cap_key = next_cap_key + 1
  end
  local ok, reply = pcall(track, ARGV[at], ARGV[at + 1], ARGV[at + 2], ARGV[at + 3],
    ARGV[at + 4], ARGV[at + 5], ARGV[at + 6], cap, cap_key)
  if not ok then
    if type(reply) == 'table' then  -- a redis.call error reply, as some versions raise it
      reply = reply.err
    end
    reply = 'E' .. tostring(reply)
  end
  replies[#replies + 1] = reply
end
return replies
