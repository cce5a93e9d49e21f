"""The Redis cache backend reuses one client per pool (and still behaves as a cache)."""

from __future__ import annotations

from django.core.cache import cache
from django.test import SimpleTestCase

from mailauto.lib.redis_cache import RedisCache


class RedisCacheTests(SimpleTestCase):
    def test_the_configured_cache_is_ours_and_reuses_its_client(self) -> None:
        from django.core.cache import caches

        default = caches["default"]
        self.assertIsInstance(default, RedisCache)
        first = default._cache.get_client(write=True)
        self.assertIs(default._cache.get_client(write=True), first)

    def test_it_still_stores_counts_and_expires(self) -> None:
        cache.set("mailauto:test:k", 1, timeout=30)
        self.assertEqual(cache.incr("mailauto:test:k", 2), 3)
        self.assertTrue(cache.add("mailauto:test:new", "x", timeout=30))
        self.assertFalse(cache.add("mailauto:test:new", "y", timeout=30))
        self.assertEqual(cache.get("mailauto:test:new"), "x")
        cache.delete_many(["mailauto:test:k", "mailauto:test:new"])

    def test_incr_is_one_round_trip_and_keeps_the_expiry(self) -> None:
        # django-ratelimit's counter: add with a TTL, then incr on every request.
        client = cache._cache.get_client(write=True)  # type: ignore[attr-defined]
        cache.add("mailauto:test:rl", 0, timeout=60)
        key = cache.make_key("mailauto:test:rl")
        self.addCleanup(cache.delete, "mailauto:test:rl")
        sent: list[object] = []
        original = client.execute_command

        def counting(*args: object, **kwargs: object) -> object:
            sent.append(args[0])
            return original(*args, **kwargs)

        client.execute_command = counting
        try:
            self.assertEqual(cache.incr("mailauto:test:rl", 5), 5)
        finally:
            del client.execute_command
        self.assertEqual(sent, ["EVALSHA"])  # not EXISTS then INCRBY
        self.assertTrue(0 < client.ttl(key) <= 60)
        with self.assertRaises(ValueError):
            cache.incr("mailauto:test:missing")
