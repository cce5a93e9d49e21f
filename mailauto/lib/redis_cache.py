"""Django's Redis cache backend, reusing one Redis client per connection pool.

Django's RedisCacheClient builds a new redis.Redis object for every cache operation,
and redis-py's constructor costs ~0.3 ms of CPU (it rebuilds its response-callback
table each time). django-ratelimit makes two or three cache calls per request, so on
the webhook endpoint that was about a third of the server's CPU (profiled with
cProfile over 2,000 webhook POSTs). A redis.Redis object is thread-safe and its pool
notices a fork, so one per pool is enough.

`incr` is one atomic round trip (a Lua script) instead of Django's EXISTS then INCRBY:
django-ratelimit calls `add` then `incr` on every rate-limited request (webhooks, the
events API, the recipient pages), and that EXISTS was a third of the rate limit's cost
on the webhook path (bench/webhooks.py); a key expiring between the two commands was
also recreated without its expiry. The contract is Django's: ValueError for a missing
key.
"""

from __future__ import annotations

from typing import Any

from django.core.cache.backends.redis import RedisCache as DjangoRedisCache
from django.core.cache.backends.redis import RedisCacheClient

INCR_IF_EXISTS = """
if redis.call('EXISTS', KEYS[1]) == 1 then
    return redis.call('INCRBY', KEYS[1], ARGV[1])
end
return false
"""


class ReusingRedisCacheClient(RedisCacheClient):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._clients: dict[int, Any] = {}
        self._incr_script: Any = None

    def get_client(self, key: Any = None, *, write: bool = False) -> Any:
        # Private helpers of Django's client (not in django-stubs), as its own get_client uses.
        index = self._get_connection_pool_index(write)  # type: ignore[attr-defined]
        client = self._clients.get(index)
        if client is None:
            pool = self._get_connection_pool(write)  # type: ignore[attr-defined]
            client = self._clients[index] = self._client(connection_pool=pool)  # type: ignore[attr-defined]
        return client

    def incr(self, key: Any, delta: int) -> int:
        client = self.get_client(key, write=True)
        if self._incr_script is None:
            # EVALSHA, and EVAL once if this Redis has not seen the script yet.
            self._incr_script = client.register_script(INCR_IF_EXISTS)
        value = self._incr_script(keys=[key], args=[delta], client=client)
        if value is None:
            raise ValueError(f"Key '{key}' not found.")
        return int(value)


class RedisCache(DjangoRedisCache):
    def __init__(self, server: Any, params: dict[str, Any]) -> None:
        super().__init__(server, params)
        self._class = ReusingRedisCacheClient
