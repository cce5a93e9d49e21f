"""The Redis cache backend reuses one client per pool (and still behaves as a cache)."""

from __future__ import annotations

import multiprocessing
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from django.core.cache import cache
from django.test import SimpleTestCase

from mailauto.lib.redis_cache import RedisCache


@contextmanager
def commands_sent(client: Any) -> Iterator[list[object]]:
    """The names of the Redis commands `client` sends inside the block, in order."""
    sent: list[object] = []
    original = client.execute_command

    def counting(*args: object, **kwargs: object) -> object:
        sent.append(args[0])
        return original(*args, **kwargs)

    client.execute_command = counting
    try:
        yield sent
    finally:
        del client.execute_command


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
        with commands_sent(client) as sent:
            self.assertEqual(cache.incr("mailauto:test:rl", 5), 5)
        self.assertEqual(sent, ["EVALSHA"])  # not EXISTS then INCRBY
        self.assertTrue(0 < client.ttl(key) <= 60)
        with self.assertRaises(ValueError):
            cache.incr("mailauto:test:missing")


def _ratelimited_requests(rate: str, count: int, address: str) -> list[bool]:
    """django-ratelimit's verdicts for `count` requests from `address` (a process of its own)."""
    import django

    django.setup()
    from django.test import RequestFactory
    from django_ratelimit.core import is_ratelimited

    request = RequestFactory().post("/webhooks/postmark/tracking/", REMOTE_ADDR=address)
    return [
        is_ratelimited(request, group="test:rl", key="ip", rate=rate, increment=True) for _ in range(count)
    ]


class RateLimitCacheTests(SimpleTestCase):
    """django-ratelimit's counters through RateLimitCache: the same verdicts, one round trip."""

    def setUp(self) -> None:
        from django.core.cache import caches

        self.cache = caches["ratelimit"]
        self.client_ = self.cache._cache.get_client(write=True)  # type: ignore[attr-defined]
        self.address = f"10.9.{uuid.uuid4().int % 250}.{uuid.uuid4().int % 250}"

    def test_it_is_the_cache_django_ratelimit_uses(self) -> None:
        from django.conf import settings

        from mailauto.lib.redis_cache import RateLimitCache

        self.assertEqual(settings.RATELIMIT_USE_CACHE, "ratelimit")
        self.assertIsInstance(self.cache, RateLimitCache)

    def test_the_limit_holds_with_one_round_trip_per_request(self) -> None:
        noted = set(self.cache._notes)  # type: ignore[attr-defined]
        with commands_sent(self.client_) as sent:
            verdicts = _ratelimited_requests("3/m", 5, self.address)
        self.assertEqual(verdicts, [False, False, False, True, True])
        self.assertEqual(sent, ["EVALSHA"] * 5)  # not SET NX, then EVALSHA
        [key] = set(self.cache._notes) - noted  # type: ignore[attr-defined]
        self.addCleanup(self.client_.delete, key)
        self.assertEqual(self.client_.get(key), b"5")
        # The counter expires with its window, as the SET NX EX that add() would have
        # sent: the period plus django-ratelimit's EXPIRATION_FUDGE (5 s).
        self.assertTrue(0 < self.client_.ttl(key) <= 60 + 5)

    def test_a_counter_that_vanished_is_created_again_with_an_expiry(self) -> None:
        self.cache.add("test:rl:gone", 1, 30)
        self.assertEqual(self.cache.incr("test:rl:gone"), 1)
        self.client_.delete(self.cache.make_key("test:rl:gone"))  # e.g. Redis restarted
        self.assertEqual(self.cache.incr("test:rl:gone"), 1)
        self.assertEqual(self.cache.incr("test:rl:gone"), 2)
        self.assertTrue(0 < self.client_.ttl(self.cache.make_key("test:rl:gone")) <= 30)
        self.cache.delete("test:rl:gone")

    def test_anything_else_keeps_djangos_contract(self) -> None:
        with self.assertRaises(ValueError):
            self.cache.incr("test:rl:never-added")
        # A value that is not a counter, or no timeout: a real add.
        self.assertTrue(self.cache.add("test:rl:text", "x", 30))
        self.assertFalse(self.cache.add("test:rl:text", "y", 30))
        self.assertEqual(self.cache.get("test:rl:text"), "x")
        self.cache.delete("test:rl:text")

    def test_reading_the_usage_does_not_count(self) -> None:
        from django.test import RequestFactory
        from django_ratelimit.core import get_usage

        request = RequestFactory().post("/", REMOTE_ADDR=self.address)
        _ratelimited_requests("10/m", 2, self.address)
        usage = get_usage(request, group="test:rl", key="ip", rate="10/m", increment=False)
        assert usage is not None
        self.assertEqual((usage["count"], usage["should_limit"]), (2, False))

    def test_the_limit_holds_across_processes(self) -> None:
        # 4 processes of 40 requests against one limit of 100: exactly 100 pass.
        ctx = multiprocessing.get_context("spawn")
        with ctx.Pool(4) as pool:
            results = pool.starmap(_ratelimited_requests, [("100/h", 40, self.address)] * 4)
        verdicts = [v for r in results for v in r]
        self.assertEqual((verdicts.count(False), verdicts.count(True)), (100, 60))

    def test_past_max_notes_it_falls_back_to_two_round_trips_with_the_same_verdicts(self) -> None:
        from mailauto.lib.redis_cache import RateLimitCache

        notes = self.cache._notes  # type: ignore[attr-defined]
        # Fill the notes with live windows of other addresses, as a flood of clients would.
        self.cache.MAX_NOTES = len(notes) + 3  # type: ignore[attr-defined]
        self.addCleanup(delattr, self.cache, "MAX_NOTES")
        self.assertNotEqual(self.cache.MAX_NOTES, RateLimitCache.MAX_NOTES)  # type: ignore[attr-defined]
        for n in range(3):
            self.assertFalse(self.cache.add(f"test:rl:flood:{n}", 1, 60))
        self.assertEqual(len(self.cache._notes), self.cache.MAX_NOTES)  # type: ignore[attr-defined]

        with commands_sent(self.client_) as sent:
            verdicts = _ratelimited_requests("2/m", 3, self.address)
        self.assertEqual(verdicts, [False, False, True])
        self.assertEqual(sent, ["SET", "SET", "EVALSHA", "SET", "EVALSHA"])
        self.assertEqual(len(self.cache._notes), self.cache.MAX_NOTES)  # type: ignore[attr-defined]

    def test_notes_of_windows_that_ended_are_dropped_when_the_notes_fill_up(self) -> None:
        import time
        from unittest import mock

        self.cache.MAX_NOTES = len(self.cache._notes) + 2  # type: ignore[attr-defined]
        self.addCleanup(delattr, self.cache, "MAX_NOTES")
        self.assertFalse(self.cache.add("test:rl:old:1", 1, 5))
        self.assertFalse(self.cache.add("test:rl:old:2", 1, 5))
        later = time.time() + 3600  # every window noted so far has ended
        with mock.patch("mailauto.lib.redis_cache.time.time", return_value=later):
            self.assertFalse(self.cache.add("test:rl:new", 1, 60))  # noted: no round trip
        self.assertEqual(list(self.cache._notes), [self.cache.make_key("test:rl:new")])  # type: ignore[attr-defined]
