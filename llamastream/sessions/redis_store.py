"""RedisSessionStore: sessions shared by several replicas through one Redis server.

Keys (``prefix`` is ``llamastream`` unless told otherwise):

- ``{prefix}:session:{id}``: the session's JSON record, expiring ``ttl_s`` after its last save
  or load.
- ``{prefix}:lock:{id}``: the turn lock, a random token set with NX and a ``lock_ttl_s`` expiry.
- ``{prefix}:sessions``: sorted set of ids by save time (server clock, microseconds): the
  eviction order.
- ``{prefix}:sessions:expiry``: sorted set of ids by the time their record expires, so that
  records Redis expired by TTL stop counting against the caps.
- ``{prefix}:sessions:sizes`` (hash id → record bytes) and ``{prefix}:sessions:bytes`` (their
  sum).

Every change to a record and its bookkeeping is one Lua script, so two replicas saving at once
cannot leave the index, the sizes and the records out of step. The scripts touch record keys
they compute, so the store needs a standalone Redis (or one primary), not Redis Cluster.
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Awaitable
from typing import TypeVar
from urllib.parse import urlsplit, urlunsplit

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError

from llamastream.errors import SessionBusyError, SessionStoreError
from llamastream.sessions.record import Session

logger = logging.getLogger(__name__)

T = TypeVar("T")

HEALTH_CHECK_INTERVAL_S = 30
TRIM_BATCH = 1000  # expired entries forgotten per call, to keep each script short

# Shared by the scripts: forget(id) removes a session and its bookkeeping and returns the new
# byte total; trim(now_ms) forgets the sessions whose record has expired.
# KEYS: 1 index, 2 expiry, 3 sizes, 4 bytes; ARGV[1]: the record key prefix.
_LUA_HELPERS = f"""
local index, expiry, sizes, total_key = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local record_prefix = ARGV[1]

local function now_times()
    local t = redis.call('TIME')
    local s, us = tonumber(t[1]), tonumber(t[2])
    return s * 1000 + math.floor(us / 1000), s * 1000000 + us
end

local function forget(id)
    redis.call('DEL', record_prefix .. id)
    local size = tonumber(redis.call('HGET', sizes, id)) or 0
    redis.call('HDEL', sizes, id)
    redis.call('ZREM', index, id)
    redis.call('ZREM', expiry, id)
    return redis.call('DECRBY', total_key, size)
end

local function trim(now_ms)
    local dead = redis.call('ZRANGEBYSCORE', expiry, '-inf', now_ms, 'LIMIT', 0, {TRIM_BATCH})
    for _, id in ipairs(dead) do
        forget(id)
    end
end
"""

# ARGV: 1 prefix, 2 id, 3 record, 4 ttl ms, 5 max count, 6 max bytes → number evicted.
# The session just saved is never evicted, even when it alone is over max_bytes.
_SAVE = (
    _LUA_HELPERS
    + """
local id, record, ttl_ms = ARGV[2], ARGV[3], tonumber(ARGV[4])
local max_count, max_bytes = tonumber(ARGV[5]), tonumber(ARGV[6])
local now_ms, now_us = now_times()
trim(now_ms)
local size = string.len(record)
local old = tonumber(redis.call('HGET', sizes, id)) or 0
redis.call('SET', record_prefix .. id, record, 'PX', ttl_ms)
redis.call('ZADD', index, now_us, id)
redis.call('ZADD', expiry, now_ms + ttl_ms, id)
redis.call('HSET', sizes, id, size)
local total = redis.call('INCRBY', total_key, size - old)
local evicted = 0
while redis.call('ZCARD', index) > max_count or total > max_bytes do
    local oldest = redis.call('ZRANGE', index, 0, 0)[1]
    if not oldest or oldest == id then
        break
    end
    total = forget(oldest)
    evicted = evicted + 1
end
return evicted
"""
)

# ARGV: 1 prefix, 2 id, 3 ttl ms → 1 if the record exists (and now lives ttl ms more), else 0.
_TOUCH = (
    _LUA_HELPERS
    + """
local id, ttl_ms = ARGV[2], tonumber(ARGV[3])
if redis.call('PEXPIRE', record_prefix .. id, ttl_ms) == 0 then
    return 0
end
local now_ms = now_times()
redis.call('ZADD', expiry, 'XX', now_ms + ttl_ms, id)
return 1
"""
)

# ARGV: 1 prefix, 2 id.
_DELETE = (
    _LUA_HELPERS
    + """
forget(ARGV[2])
return 1
"""
)

# ARGV: 1 prefix → the number of live sessions.
_COUNT = (
    _LUA_HELPERS
    + """
trim((now_times()))
return redis.call('ZCARD', index)
"""
)

# KEYS: 1 lock; ARGV: 1 token, 2 ttl ms → 1 if renewed, 0 if the lock is not ours.
_RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
    return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"""

# KEYS: 1 lock; ARGV: 1 token → 1 if released, 0 if the lock is not ours.
_UNLOCK = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
    return redis.call('DEL', KEYS[1])
end
return 0
"""


class RedisSessionStore:
    """Sessions in Redis, shared by every replica that points at the same server and prefix.

    Same semantics as `DiskSessionStore` (see `SessionStore`); Redis failures raise
    `SessionStoreError`, and a client reconnects by itself once Redis is back.

    >>> import asyncio
    >>> async def demo(url: str) -> str:
    ...     store = RedisSessionStore(url)
    ...     try:
    ...         await store.save(Session("abc", {"theme": "dark"}))
    ...         return (await store.load("abc"))["theme"]
    ...     finally:
    ...         await store.close()
    >>> asyncio.run(demo("redis://127.0.0.1:6379/0"))  # doctest: +SKIP
    'dark'
    """

    def __init__(
        self,
        url: str,
        *,
        ttl_s: float = 7 * 24 * 3600.0,
        max_count: int = 100_000,
        max_bytes: int = 1 << 30,
        lock_ttl_s: float = 10.0,
        prefix: str = "llamastream",
        timeout_s: float = 3.0,
    ) -> None:
        self.url = redact_url(url)
        self.ttl_s = ttl_s
        self.lock_ttl_s = lock_ttl_s
        self.max_count = max_count
        self.max_bytes = max_bytes
        self.prefix = prefix
        # One pool for the store. A connection that broke (Redis restarted) is reconnected
        # and the command retried once. Timeouts are not retried: short ones turn an
        # unreachable Redis into a prompt 503 rather than a hung request, and a command that
        # timed out may have run (a retried lock would then find itself busy).
        self._redis = aioredis.Redis.from_url(
            url,
            decode_responses=True,
            socket_connect_timeout=timeout_s,
            socket_timeout=timeout_s,
            health_check_interval=HEALTH_CHECK_INTERVAL_S,
            retry=Retry(
                ExponentialBackoff(cap=0.5, base=0.05),
                retries=1,
                supported_errors=(RedisConnectionError,),
            ),
        )
        self._index_keys = [
            f"{prefix}:sessions",
            f"{prefix}:sessions:expiry",
            f"{prefix}:sessions:sizes",
            f"{prefix}:sessions:bytes",
        ]
        self._record_prefix = f"{prefix}:session:"
        self._save = self._redis.register_script(_SAVE)
        self._touch = self._redis.register_script(_TOUCH)
        self._delete = self._redis.register_script(_DELETE)
        self._count = self._redis.register_script(_COUNT)
        self._renew = self._redis.register_script(_RENEW)
        self._unlock = self._redis.register_script(_UNLOCK)

    async def load(self, session_id: str) -> Session | None:
        text = await self._call(self._redis.get(self._record_key(session_id)))
        if text is None:
            return None
        try:
            session = Session.from_json(session_id, _text(text))
        except (ValueError, TypeError, KeyError):
            logger.warning("session %s has an unreadable record; starting afresh", session_id[:8])
            return None
        await self._call(
            self._touch(
                keys=self._index_keys,
                args=[self._record_prefix, session_id, _ms(self.ttl_s)],
            )
        )
        return session

    async def save(self, session: Session) -> None:
        text = session.to_json()
        evicted = await self._call(
            self._save(
                keys=self._index_keys,
                args=[
                    self._record_prefix,
                    session.id,
                    text,
                    _ms(self.ttl_s),
                    self.max_count,
                    self.max_bytes,
                ],
            )
        )
        if evicted:
            logger.info(
                "session caps (%d sessions, %d bytes) reached: evicted the %d oldest",
                self.max_count,
                self.max_bytes,
                evicted,
            )

    async def delete(self, session_id: str) -> None:
        await self._call(
            self._delete(keys=self._index_keys, args=[self._record_prefix, session_id])
        )

    async def lock(self, session_id: str) -> str:
        token = secrets.token_hex(16)
        taken = await self._call(
            self._redis.set(self._lock_key(session_id), token, nx=True, px=_ms(self.lock_ttl_s))
        )
        if not taken:
            # A retried SET (the first one's reply lost with its connection) finds our own
            # token: the lock is ours.
            holder = await self._call(self._redis.get(self._lock_key(session_id)))
            if holder is None or _text(holder) != token:
                raise SessionBusyError("another request of this session is still running")
        return token

    async def renew(self, session_id: str, token: str) -> bool:
        renewed = await self._call(
            self._renew(keys=[self._lock_key(session_id)], args=[token, _ms(self.lock_ttl_s)])
        )
        return bool(renewed)

    async def unlock(self, session_id: str, token: str) -> None:
        await self._call(self._unlock(keys=[self._lock_key(session_id)], args=[token]))

    async def count(self) -> int:
        return int(await self._call(self._count(keys=self._index_keys, args=[self._record_prefix])))

    async def close(self) -> None:
        await self._redis.aclose()

    def _record_key(self, session_id: str) -> str:
        return f"{self._record_prefix}{session_id}"

    def _lock_key(self, session_id: str) -> str:
        return f"{self.prefix}:lock:{session_id}"

    async def _call(self, command: Awaitable[T]) -> T:
        """Await one Redis command; Redis failures become `SessionStoreError`."""
        try:
            return await command
        except (RedisError, OSError) as exc:
            logger.error("the session store (%s) failed: %s", self.url, exc)
            raise SessionStoreError(
                f"the session store ({self.url}) is unavailable: {exc}"
            ) from exc


def redact_url(url: str) -> str:
    """The URL with its password (if any) replaced by ``***``, fit for messages and logs."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    user = parts.username or ""
    host = parts.netloc.rpartition("@")[2]
    return urlunsplit(parts._replace(netloc=f"{user}:***@{host}"))


def _text(value: str | bytes) -> str:
    # decode_responses=True gives str; the client's types also allow bytes.
    return value.decode() if isinstance(value, bytes) else value


def _ms(seconds: float) -> int:
    return max(1, round(seconds * 1000))
