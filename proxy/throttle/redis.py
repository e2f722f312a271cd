"""The throttle's store on Redis (`shared_state: redis://HOST:PORT/DB`), shared by every proxy
task that names the same database.

Each key is one Redis string holding the entry as JSON, read and written by one Lua script, so
every call is atomic for its key on the server, whatever other proxies do at the same moment; the
script applies the same rules as `MemoryStore` (proxy/throttle/store.py) and gives each key a
TTL, so Redis forgets an entry when `MemoryStore` would. Times come from the proxies' clocks
(wall-clock seconds): keep them in step (NTP), as TLS already needs.

Known addresses are a hash per user (address -> last login) and a sorted set of the users by
last login, kept by a second script within the same bounds as `MemoryStore`'s and without a
TTL: `maxmemory-policy volatile-ttl` evicts only keys with one, so a flood of failures filling
`maxmemory` evicts failures, never a known address. Any `allkeys-*` policy would not keep that.

The browser's sign-outs are a sorted set of users (user's key -> when the refusal ends) and a
hash of the same users (-> the issue time up to which their sessions are refused), kept in step by
a third script, also without a TTL for the same reason: a flood of failures must not let a
signed-out cookie back in. Each sign-out drops ended entries (a few at a time) and, past
`MAX_ENDED_USERS`, those that end soonest. A restarted Redis without persistence forgets them, as
it forgets failures: a cookie signed out before the restart is taken again until it expires.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.commands.core import AsyncScript
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError

from proxy.config import redacted
from proxy.throttle.store import (
    KNOWN_PER_USER,
    MAX_ENDED_USERS,
    MAX_KNOWN_USERS,
    RESERVATION_LEASE,
    Entry,
    StoreUnavailable,
    check_owner,
)

PREFIX = "registry-proxy:throttle:"
KNOWN = PREFIX + "known:"
KNOWN_USERS = PREFIX + "known-users"
ENDED = PREFIX + "ended-sessions"
ENDED_BEFORE = PREFIX + "ended-sessions-before"
# Past these, a call fails and the throttle uses the local store until Redis answers again.
SOCKET_TIMEOUT = 0.5
POOL_TIMEOUT = 2.0
MAX_CONNECTIONS = 32

_SCRIPT = """
local op, now, window = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
local member, lease = ARGV[4], tonumber(ARGV[5])
local raw = redis.call('GET', KEYS[1])
local e = raw and cjson.decode(raw) or {f = {}, r = {}, a = {}}
if e.b == cjson.null then e.b = nil end
-- release and clear are not told the window: the entry keeps the last one it was given.
if window > 0 then e.w = window else window = e.w or 0 end

local function size(t) local n = 0 for _ in pairs(t) do n = n + 1 end return n end
local function members()
  local n = size(e.r)
  for m in pairs(e.f) do if e.r[m] == nil then n = n + 1 end end
  return n
end
local function answer() return cjson.encode({e.f, e.r, e.b or cjson.null}) end
local function unreserve()
  local count = (e.r[member] or 0) - 1
  if count > 0 then e.r[member] = count else e.r[member] = nil; e.a[member] = nil end
end
local function save()
  if next(e.f) == nil and next(e.r) == nil and e.b == nil then
    redis.call('DEL', KEYS[1])
    return
  end
  local keep = 0
  for _, t in pairs(e.f) do keep = math.max(keep, t + window - now) end
  for _, t in pairs(e.a) do keep = math.max(keep, t + lease - now) end
  if e.b then keep = math.max(keep, e.b - now) end
  redis.call('SET', KEYS[1], cjson.encode(e), 'PX', math.max(1, math.ceil(keep * 1000)))
end

-- Drop what `now` has outlived, as MemoryEntry.expire does.
if e.b and e.b <= now then e.b = nil; e.f = {} end
for m, t in pairs(e.f) do if t <= now - window then e.f[m] = nil end end
for m, t in pairs(e.a) do
  if t <= now - lease then e.a[m] = nil; e.r[m] = nil end
end

if op == 'get' then
  return answer()
elseif op == 'reserve' then
  local limit = tonumber(ARGV[6])
  local new = e.f[member] == nil and e.r[member] == nil
  if e.b or (new and members() >= limit) then save(); return answer() end
  e.r[member] = (e.r[member] or 0) + 1
  e.a[member] = now
elseif op == 'commit' then
  local limit, block = tonumber(ARGV[6]), tonumber(ARGV[7])
  unreserve()
  e.f[member] = now
  if block > 0 and limit > 0 and e.b == nil and size(e.f) >= limit then e.b = now + block end
elseif op == 'release' then
  unreserve()
elseif op == 'clear' then
  if member == '' then e.f = {}; e.b = nil else e.f[member] = nil end
end
save()
return false
"""

# KEYS: the user's hash, the users' set. The hash's fields have no order: the least recent
# address is found by its time (at most KNOWN_PER_USER + 1 of them).
_KNOWN_SCRIPT = """
local op, now, ttl, client = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3]), ARGV[4]
local lapsed = now - ttl
if op == 'recall' then
  local at = tonumber(redis.call('HGET', KEYS[1], client))
  return at ~= nil and at > lapsed
end
local user, per_user, max_users = ARGV[5], tonumber(ARGV[6]), tonumber(ARGV[7])
redis.call('HSET', KEYS[1], client, ARGV[2])
local fields, kept = redis.call('HGETALL', KEYS[1]), {}
for i = 1, #fields, 2 do
  local at = tonumber(fields[i + 1])
  if at > lapsed then
    kept[#kept + 1] = {fields[i], at}
  else
    redis.call('HDEL', KEYS[1], fields[i])
  end
end
table.sort(kept, function(a, b) return a[2] < b[2] end)
for i = 1, #kept - per_user do redis.call('HDEL', KEYS[1], kept[i][1]) end
redis.call('ZADD', KEYS[2], now, user)
-- Users whose last login has lapsed (a few at a time), then the oldest beyond the bound.
local gone = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', lapsed, 'LIMIT', 0, 16)
local over = redis.call('ZCARD', KEYS[2]) - #gone - max_users
if over > 0 then
  for _, name in ipairs(redis.call('ZRANGE', KEYS[2], #gone, #gone + over - 1)) do
    gone[#gone + 1] = name
  end
end
for _, name in ipairs(gone) do
  redis.call('DEL', ARGV[8] .. name)
  redis.call('ZREM', KEYS[2], name)
end
return false
"""

# KEYS: the users' set (score: when the refusal ends), the users' hash (-> before). An entry
# that has ended counts as none, until it is dropped.
_ENDED_SCRIPT = """
local op, user, now = ARGV[1], ARGV[2], tonumber(ARGV[3])
local ends = tonumber(redis.call('ZSCORE', KEYS[1], user))
local live = ends ~= nil and ends > now
if op == 'sessions_ended' then
  if not live then return false end
  return redis.call('HGET', KEYS[2], user)
end
-- Times go to Redis as the strings given: a Lua number would be cut to 14 digits.
local before, ends_new, max_users = ARGV[4], ARGV[5], tonumber(ARGV[6])
if tonumber(ends_new) > now then
  if not live then
    redis.call('ZADD', KEYS[1], ends_new, user)
    redis.call('HSET', KEYS[2], user, before)
  else
    -- Never an earlier `before`, never a sooner end: each only refuses more.
    redis.call('ZADD', KEYS[1], 'GT', ends_new, user)
    local kept = tonumber(redis.call('HGET', KEYS[2], user))
    if kept == nil or kept < tonumber(before) then redis.call('HSET', KEYS[2], user, before) end
  end
end
-- Ended entries (a few at a time), then those ending soonest beyond the bound.
local gone = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[3], 'LIMIT', 0, 64)
local over = redis.call('ZCARD', KEYS[1]) - #gone - max_users
if over > 0 then
  for _, name in ipairs(redis.call('ZRANGE', KEYS[1], #gone, #gone + over - 1)) do
    gone[#gone + 1] = name
  end
end
for _, name in ipairs(gone) do
  redis.call('ZREM', KEYS[1], name)
  redis.call('HDEL', KEYS[2], name)
end
return false
"""


class RedisStore:
    """`ThrottleStore` on one Redis database; any failure to answer is `StoreUnavailable`."""

    name = "redis"

    def __init__(
        self,
        url: str,
        *,
        max_known_users: int = MAX_KNOWN_USERS,
        known_per_user: int = KNOWN_PER_USER,
        max_ended_users: int = MAX_ENDED_USERS,
    ) -> None:
        self.url = redacted(url)
        self._known_bounds = [repr(known_per_user), repr(max_known_users)]
        self._max_ended_users = repr(max_ended_users)
        pool = BlockingConnectionPool.from_url(
            url,
            # The calls' connections, and one for the ping.
            max_connections=MAX_CONNECTIONS + 1,
            timeout=POOL_TIMEOUT,
            socket_timeout=SOCKET_TIMEOUT,
            socket_connect_timeout=SOCKET_TIMEOUT,
            # One retry, on a fresh connection: after a Redis restart every pooled connection
            # is stale once. No more: the throttle falls back rather than hold password checks.
            # Never after a timeout: the script may have run, and reserve or release run twice
            # leave a reservation behind or give back another check's.
            retry=Retry(NoBackoff(), 1, supported_errors=(RedisConnectionError,)),
        )
        self._redis = Redis(connection_pool=pool)
        self._script = self._redis.register_script(_SCRIPT)
        self._known_script = self._redis.register_script(_KNOWN_SCRIPT)
        self._ended_script = self._redis.register_script(_ENDED_SCRIPT)
        # Calls queue here for a connection: a queue of checks under load is no outage (the
        # pool's wait timing out was taken for one). Once a call has failed, those queued fail
        # at once rather than each wait out its timeout, until a ping answers.
        self._slots = asyncio.Semaphore(MAX_CONNECTIONS)
        self._failure: str | None = None

    async def get(self, key: str, window: float, now: float) -> Entry:
        return await self._run("get", key, now, window) or Entry()

    async def reserve(
        self, key: str, member: str, limit: int, window: float, now: float
    ) -> Entry | None:
        return await self._run("reserve", key, now, window, member, limit)

    async def commit(
        self, key: str, member: str, window: float, now: float, *, limit: int = 0,
        block: float = 0,
    ) -> None:  # fmt: skip
        await self._run("commit", key, now, window, member, limit, block)

    async def release(self, key: str, member: str, now: float) -> None:
        await self._run("release", key, now, 0, member)

    async def clear(self, key: str, now: float, member: str | None = None) -> None:
        await self._run("clear", key, now, 0, member or "")

    async def remember(self, user: str, client: str, ttl: float, now: float) -> None:
        args = ["remember", repr(now), repr(ttl), client, user, *self._known_bounds, KNOWN]
        await self._eval(self._known_script, [KNOWN + user, KNOWN_USERS], args)

    async def recall(self, user: str, client: str, ttl: float, now: float) -> bool:
        args = ["recall", repr(now), repr(ttl), client]
        return bool(await self._eval(self._known_script, [KNOWN + user, KNOWN_USERS], args))

    async def end_sessions(self, user: str, before: float, until: float, now: float) -> None:
        args = ["end_sessions", check_owner(user), repr(now), repr(before), repr(until),
                self._max_ended_users]  # fmt: skip
        await self._eval(self._ended_script, [ENDED, ENDED_BEFORE], args)

    async def sessions_ended(self, user: str, now: float) -> float | None:
        args = ["sessions_ended", check_owner(user), repr(now)]
        ended = await self._eval(self._ended_script, [ENDED, ENDED_BEFORE], args)
        return None if ended is None else float(ended)

    async def ping(self) -> None:
        try:
            await self._redis.ping()
        except (RedisError, OSError) as exc:
            raise StoreUnavailable(f"Redis at {self.url}: {exc}") from None
        self._failure = None

    async def close(self) -> None:
        await self._redis.aclose(close_connection_pool=True)

    async def _run(
        self, op: str, key: str, now: float, window: float, member: str = "", *rest: Any
    ) -> Entry | None:
        args = [op, repr(now), repr(window), member, repr(RESERVATION_LEASE), *map(repr, rest)]
        raw = await self._eval(self._script, [PREFIX + key], args)
        if not raw:
            return None
        failed, reserved, blocked_until = json.loads(raw)
        return Entry(dict(failed), dict(reserved), blocked_until)

    async def _eval(self, script: AsyncScript, keys: list[str], args: list[str]) -> Any:
        async with self._slots:
            if self._failure is not None:
                raise StoreUnavailable(self._failure)
            try:
                return await script(keys=keys, args=args)
            except (RedisError, OSError) as exc:
                self._failure = f"Redis at {self.url}: {exc}"
                raise StoreUnavailable(self._failure) from None
