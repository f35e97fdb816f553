"""The Redis Functions of the Redis bus (Redis 7+), loaded by mailpush at
start-up (``FUNCTION LOAD REPLACE``): publishing with history in one atomic
step on the Redis side, so a mail store in any language publishes with one
command::

    FCALL mailpush_publish 2 mailpush:meta:{alice} mailpush:hist:{alice} \\
          alice new_letter '{"id": 42}' '"state-17"'

(arguments: subscriber, event, data as JSON, the new state as JSON or an
empty string; the two keys are the subscriber's, hash-tagged so that a Redis
Cluster keeps them in one slot).

Per subscriber: a hash ``mailpush:meta:{S}`` (``epoch``, ``top`` offset,
``state``) and a stream ``mailpush:hist:{S}`` whose entry IDs are the
offsets (``N-0``), each with the event, its data and when it was stored.
The epoch is made (from Redis's clock) the first time a subscriber is seen,
so a Redis that lost its data makes a new one: tabs that come back with the
old epoch resync. Both keys expire after the history TTL without events;
the stream is trimmed to the history size on every publish.
"""

from __future__ import annotations

__all__ = ["library", "PUBLISH", "READ", "CONNECTIONS", "meta_key", "history_key", "connections_key", "cluster_channel"]

PUBLISH = "mailpush_publish"
READ = "mailpush_read"
CONNECTIONS = "mailpush_connections"


def meta_key(subscriber: str) -> str:
    """The subscriber's hash: epoch, top offset, latest state."""
    return "mailpush:meta:{" + subscriber + "}"


def history_key(subscriber: str) -> str:
    """The subscriber's stream of events, IDs = offsets."""
    return "mailpush:hist:{" + subscriber + "}"


def connections_key(subscriber: str) -> str:
    """The subscriber's open connections per instance (the cap across
    instances, see :mod:`mailpush.shared_cap`): a hash, a field per
    instance, ``"COUNT EXPIRY_MS"``."""
    return "mailpush:conns:{" + subscriber + "}"


def cluster_channel(subscriber: str) -> str:
    """The subscriber's channel on a Redis Cluster: hash-tagged like its
    keys, so it lives in their slot (sharded pub/sub, SPUBLISH)."""
    return "mailpush:{" + subscriber + "}"


def library(size: int, ttl_ms: int, *, sharded: bool = False) -> str:
    """The library's source with the history's retention in it: the mail
    store's FCALL carries no retention arguments, and a function may only
    touch the keys it is given (so no settings key either). Every mailpush
    instance on one Redis should run with the same history options: the
    last one to start loads its own.

    ``sharded``: for a Redis Cluster, where ``mailpush_publish`` SPUBLISHes
    on ``mailpush:{SUBSCRIBER}`` (:func:`cluster_channel`) instead of
    PUBLISHing on ``mailpush:SUBSCRIBER``; the library is loaded on every
    master."""
    source = _LIBRARY.replace("__SIZE__", str(int(size))).replace("__TTL_MS__", str(int(ttl_ms)))
    if sharded:
        source = source.replace(_PUBLISH_LINE, "redis.call('SPUBLISH', 'mailpush:{' .. sub .. '}', payload)")
    return source


_PUBLISH_LINE = "redis.call('PUBLISH', 'mailpush:' .. sub, payload)"

_LIBRARY = r"""#!lua name=mailpush

local function settings()
  return __SIZE__, __TTL_MS__
end

local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

-- The subscriber's epoch, made now if it has none (first sight, or a Redis
-- that lost its data).
local function epoch_of(meta, ttl)
  local epoch = redis.call('HGET', meta, 'epoch')
  if not epoch then
    local t = redis.call('TIME')
    epoch = t[1] .. '.' .. t[2]
    redis.call('HSET', meta, 'epoch', epoch, 'top', 0)
    redis.call('PEXPIRE', meta, ttl)
  end
  return epoch
end

redis.register_function('mailpush_publish', function(keys, args)
  local meta, hist = keys[1], keys[2]
  local sub, event, data, state = args[1], args[2], args[3], args[4]
  local size, ttl = settings()
  local epoch = epoch_of(meta, ttl)
  local top = redis.call('HINCRBY', meta, 'top', 1)
  if state ~= nil and state ~= '' then
    redis.call('HSET', meta, 'state', state)
  end
  redis.call('PEXPIRE', meta, ttl)
  if size > 0 then
    redis.call('XADD', hist, 'MAXLEN', size, top .. '-0', 'e', event, 'd', data, 't', now_ms())
    redis.call('PEXPIRE', hist, ttl)
  end
  local payload = '{"subscriber":' .. cjson.encode(sub) .. ',"event":' .. cjson.encode(event)
    .. ',"data":' .. data .. ',"offset":' .. top .. ',"epoch":' .. cjson.encode(epoch) .. '}'
  redis.call('PUBLISH', 'mailpush:' .. sub, payload)
  return top
end)

-- Where the subscriber's stream stands and, asked for an offset in an epoch,
-- the events after it: {epoch, top, state or false, reason, {offset, event,
-- data, ...} or false}.
redis.register_function('mailpush_read', function(keys, args)
  local meta, hist = keys[1], keys[2]
  local asked_epoch, asked = args[1], tonumber(args[2])
  local size, ttl = settings()
  local epoch = epoch_of(meta, ttl)
  local top = tonumber(redis.call('HGET', meta, 'top') or '0')
  local state = redis.call('HGET', meta, 'state')
  if asked_epoch == '' or asked == nil then
    return {epoch, top, state, '', {}}
  end
  if asked_epoch ~= epoch then
    return {epoch, top, state, 'epoch_changed', false}
  end
  if asked > top then
    return {epoch, top, state, 'bad_offset', false}
  end
  if asked == top then
    return {epoch, top, state, '', {}}
  end
  if size == 0 then
    return {epoch, top, state, 'history_off', false}
  end
  local entries = redis.call('XRANGE', hist, '(' .. asked .. '-0', '+')
  local first = entries[1]
  if first == nil or tonumber(string.match(first[1], '^(%d+)')) ~= asked + 1 then
    return {epoch, top, state, 'history_gap', false}
  end
  local out, cutoff = {}, now_ms() - ttl
  for i, entry in ipairs(entries) do
    local f = entry[2]
    local fields = {}
    for j = 1, #f, 2 do fields[f[j]] = f[j + 1] end
    if i == 1 and tonumber(fields['t']) < cutoff then
      return {epoch, top, state, 'history_gap', false}
    end
    out[#out + 1] = string.match(entry[1], '^(%d+)')
    out[#out + 1] = fields['e']
    out[#out + 1] = fields['d']
  end
  return {epoch, top, state, '', out}
end)

-- The per-subscriber connection cap across instances. One hash per
-- subscriber, a field per instance: "COUNT EXPIRY_MS", the instance's lease,
-- which it renews while it holds connections; a field past its expiry (an
-- instance that died) no longer counts and is deleted here. Arguments: the
-- instance, its connections already counted, the new ones it asks for, the
-- cap, the lease in ms. Stores the instance's count and returns how many of
-- the new ones may stay (all of them when the cap is 0).
redis.register_function('mailpush_connections', function(keys, args)
  local key, me = keys[1], args[1]
  local kept, wanted = tonumber(args[2]), tonumber(args[3])
  local cap, lease = tonumber(args[4]), tonumber(args[5])
  local now = now_ms()
  local others = 0
  local fields = redis.call('HGETALL', key)
  for i = 1, #fields, 2 do
    if fields[i] ~= me then
      local n, expiry = string.match(fields[i + 1], '^(%d+) (%d+)$')
      if n and tonumber(expiry) > now then
        others = others + tonumber(n)
      else
        redis.call('HDEL', key, fields[i])
      end
    end
  end
  local allowed = wanted
  if cap > 0 then
    allowed = math.max(0, math.min(wanted, cap - others - kept))
  end
  local mine = kept + allowed
  if mine > 0 then
    redis.call('HSET', key, me, mine .. ' ' .. (now + lease))
    redis.call('PEXPIRE', key, lease)
  else
    redis.call('HDEL', key, me)
  end
  return allowed
end)
"""
