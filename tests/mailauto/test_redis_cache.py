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
