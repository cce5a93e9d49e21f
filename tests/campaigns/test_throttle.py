"""The shared rate limit (campaigns/throttle/) on real Redis and on the file backend.

The bucket tests drive the store's clock (the script's "now" override), so nothing here
depends on how fast the machine is. The cross-process tests use the real clocks and
check the token-bucket bound against the store's own timestamps of each grant.

This module must stay importable without django.setup() (no models at the top): the
cross-process tests start fresh interpreters that import it to find _hammer.
"""

from __future__ import annotations

import multiprocessing
import os
import tempfile
import time
import uuid
from collections.abc import Mapping
from datetime import datetime
from pathlib import Path
from typing import Any

import redis
from django.conf import settings
from django.core.exceptions import ImproperlyConfigured
from django.db import connection, transaction
from django.test import SimpleTestCase, TestCase, TransactionTestCase, override_settings

from campaigns import throttle
from campaigns.throttle import (
    Decision,
    FileBackend,
    RedisBackend,
    Throttle,
    ThrottleInTransaction,
    ThrottleTimeout,
    configuration_errors,
    esp_account,
    group_by_provider,
    provider_for,
)

OPTIONS: dict[str, Any] = {
    "RATE_LIMIT_PER_SECOND": 10.0,
    "RATE_LIMIT_BURST": 3.0,
    "PROVIDER_RATE_LIMITS": {},
    "THROTTLE_DECREASE_FACTOR": 0.5,
    "THROTTLE_MIN_RATE": 1.0,
    "THROTTLE_INCREASE_FRACTION": 0.1,  # +1 req/s per step at a ceiling of 10
    "THROTTLE_DECREASE_COOLDOWN_SECONDS": 2.0,
}


class FakeTime:
    """The store's clock and the caller's clocks, all one controllable number."""

    def __init__(self) -> None:
        self.now = 1_700_000_000.0
        self.sleeps: list[float] = []

    def clock(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds

    def advance(self, seconds: float) -> None:
        self.now += seconds


def epoch(value: datetime | None) -> float:
    assert value is not None
    return value.timestamp()


def delete_namespace(namespace: str) -> None:
    client = redis.Redis.from_url(settings.REDIS_URL)
    keys = list(client.scan_iter(match=f"mailauto:throttle:{{{namespace}}}:*"))
    if keys:
        client.delete(*keys)


class BucketContract(SimpleTestCase):
    """The behaviour both backends must share. Subclasses provide make_backend()."""

    __test__ = False
    kind = ""
    backend: Any

    def make_backend(self) -> Any:
        raise NotImplementedError

    def setUp(self) -> None:
        self.backend = self.make_backend()
        self.time = FakeTime()
        self.namespace = f"test-{uuid.uuid4().hex[:12]}"
        self.decisions: list[Decision] = []

    def throttle(self, **options: Any) -> Throttle:
        return Throttle(
            backend=self.backend,
            options={**OPTIONS, **options},
            namespace=self.namespace,
            clock=self.time.clock,
            sleep=self.time.sleep,
            monotonic=self.time.clock,
            on_decision=lambda decision, tokens: self.decisions.append(decision),
        )

    def drain(self, t: Throttle, n: int = 3) -> None:
        for _ in range(n):
            self.assertTrue(t.try_acquire().granted)

    # -- the bucket

    def test_burst_is_granted_at_once_then_the_next_token_waits_one_interval(self) -> None:
        t = self.throttle()
        self.assertEqual([t.try_acquire().granted for _ in range(3)], [True, True, True])
        refused = t.try_acquire()
        self.assertFalse(refused.granted)
        self.assertAlmostEqual(refused.wait, 0.1, places=6)

    def test_tokens_refill_at_the_configured_rate(self) -> None:
        t = self.throttle()
        self.drain(t)
        self.time.advance(0.25)  # 2.5 tokens at 10/s
        self.assertEqual([t.try_acquire().granted for _ in range(3)], [True, True, False])
        self.assertAlmostEqual(t.try_acquire().wait, 0.05, places=6)

    def test_the_bucket_never_holds_more_than_the_burst(self) -> None:
        t = self.throttle()
        self.drain(t)
        self.time.advance(3600)
        self.assertEqual([t.try_acquire().granted for _ in range(4)], [True, True, True, False])

    def test_acquire_sleeps_the_wait_it_is_told_then_takes_the_token(self) -> None:
        t = self.throttle()
        self.drain(t)
        self.decisions.clear()
        waited = t.acquire(timeout=5)
        # One refusal, one sleep of 0.1 s plus at most 5 ms of jitter, one grant: no spinning.
        self.assertEqual([d.granted for d in self.decisions], [False, True])
        self.assertEqual(len(self.time.sleeps), 1)
        self.assertGreaterEqual(waited, 0.1)
        self.assertLessEqual(waited, 0.105 + 1e-9)

    def test_acquire_times_out_at_once_when_the_wait_is_longer_than_the_timeout(self) -> None:
        t = self.throttle()
        self.drain(t)
        with self.assertRaises(ThrottleTimeout) as caught:
            t.acquire(timeout=0.05)
        self.assertEqual(self.time.sleeps, [])
        self.assertAlmostEqual(caught.exception.wait, 0.1, places=6)
        self.assertEqual(caught.exception.bucket, "esp")

    def test_timeout_zero_is_a_single_try(self) -> None:
        t = self.throttle()
        self.assertEqual(t.acquire(timeout=0), 0.0)
        self.drain(t, 2)
        self.decisions.clear()
        with self.assertRaises(ThrottleTimeout):
            t.acquire(timeout=0)
        self.assertEqual(len(self.decisions), 1)

    def test_waiters_line_up_one_interval_apart_and_keep_their_turn(self) -> None:
        t = self.throttle()
        self.drain(t)
        esp = [t._bucket("esp", 1)]
        # Three workers told to wait, each prepared to wait up to 5 s: lined up, not all
        # sent back for the same token.
        waits = [t._try(esp, max_wait=5, returning=False).wait for _ in range(3)]
        for wait, expected in zip(waits, [0.1, 0.2, 0.3], strict=True):
            self.assertAlmostEqual(wait, expected, places=6)
        self.time.advance(0.1)
        # A newcomer does not take the token the first waiter was told to come back for.
        newcomer = t.try_acquire()
        self.assertFalse(newcomer.granted)
        self.assertAlmostEqual(newcomer.wait, 0.3, places=6)
        self.assertTrue(t._try(esp, max_wait=5, returning=True).granted)
        # A caller that will not wait does not hold a place in line.
        self.time.advance(0.3)
        self.assertTrue(t._try(esp, max_wait=5, returning=True).granted)
        self.assertTrue(t._try(esp, max_wait=5, returning=True).granted)
        self.time.advance(0.1)
        self.assertTrue(t.try_acquire().granted)

    def test_waiters_caught_by_a_pause_line_up_again_after_it(self) -> None:
        t = self.throttle()
        self.drain(t)
        esp = [t._bucket("esp", 1)]
        for _ in range(3):
            t._try(esp, max_wait=60, returning=False)  # told 0.1, 0.2, 0.3
        t.report_rate_limited(retry_after=10)  # 5/s, paused for 10 s
        waits = []
        for _ in range(3):
            self.time.advance(0.1)
            waits.append(t._try(esp, max_wait=60, returning=True).wait)
        # Back at 10.2, 10.4 and 10.6 s: one interval (1/5 s) apart, not all at once.
        for wait, expected in zip(waits, [10.1, 10.2, 10.3], strict=True):
            self.assertAlmostEqual(wait, expected, places=6)

    def test_workers_share_one_bucket(self) -> None:
        first, second = self.throttle(), self.throttle()
        self.assertTrue(first.try_acquire().granted)
        self.assertTrue(second.try_acquire().granted)
        self.assertTrue(first.try_acquire().granted)
        self.assertFalse(second.try_acquire().granted)

    def test_unknown_bucket_is_refused(self) -> None:
        with self.assertRaises(ValueError):
            self.throttle().try_acquire(bucket="provider:gmail")

    # -- adaptive throttling

    def test_a_429_halves_the_rate_and_empties_the_bucket(self) -> None:
        t = self.throttle()
        state = t.report_rate_limited(retry_after=None)
        self.assertEqual(state.rate, 5.0)
        self.assertEqual(state.ceiling, 10.0)
        self.assertIn("429", state.reason)
        self.assertAlmostEqual(epoch(state.changed_at), self.time.now, delta=1e-5)
        self.assertTrue(state.throttled)
        refused = t.try_acquire()
        self.assertFalse(refused.granted)
        self.assertAlmostEqual(refused.wait, 1 / 5, places=6)

    def test_429s_within_the_cooldown_count_once(self) -> None:
        t = self.throttle()
        t.report_rate_limited(retry_after=None)
        self.time.advance(1.0)
        self.assertEqual(t.report_rate_limited(retry_after=None).rate, 5.0)
        self.time.advance(1.0)
        self.assertEqual(t.report_rate_limited(retry_after=None).rate, 2.5)

    def test_the_rate_never_drops_below_the_floor(self) -> None:
        t = self.throttle(THROTTLE_DECREASE_COOLDOWN_SECONDS=0.0)
        for _ in range(10):
            state = t.report_rate_limited(retry_after=None)
        self.assertEqual(state.rate, 1.0)

    def test_retry_after_pauses_every_worker_until_then(self) -> None:
        t, other_worker = self.throttle(), self.throttle()
        state = t.report_rate_limited(retry_after=30)
        self.assertAlmostEqual(epoch(state.paused_until), self.time.now + 30, delta=1e-5)
        self.assertIn("Retry-After 30s", state.reason)
        refused = other_worker.try_acquire()
        self.assertFalse(refused.granted)
        self.assertAlmostEqual(refused.wait, 30 + 1 / 5, places=6)
        self.time.advance(30.1)
        self.assertFalse(other_worker.try_acquire().granted)
        self.time.advance(0.1)
        self.assertTrue(other_worker.try_acquire().granted)
        self.assertIsNone(t.effective_rate().paused_until)

    def test_a_later_429_within_the_cooldown_still_extends_the_pause(self) -> None:
        t = self.throttle()
        t.report_rate_limited(retry_after=5)
        state = t.report_rate_limited(retry_after=20)
        self.assertEqual(state.rate, 5.0)
        self.assertAlmostEqual(epoch(state.paused_until), self.time.now + 20, delta=1e-5)

    def test_clean_sends_raise_the_rate_additively_back_to_the_ceiling(self) -> None:
        t = self.throttle()
        t.report_rate_limited(retry_after=None)  # 5/s
        t.report_success(n=4)
        self.assertEqual(t.effective_rate().rate, 5.0)
        t.report_success(n=1)  # 5 clean requests at 5/s: one step
        state = t.effective_rate()
        self.assertEqual(state.rate, 6.0)
        self.assertIn("raised", state.reason)
        t.report_success(n=6 + 7 + 8 + 9 - 1)
        self.assertEqual(t.effective_rate().rate, 9.0)
        t.report_success(n=1000)
        state = t.effective_rate()
        self.assertEqual(state.rate, 10.0)
        self.assertIn("ceiling", state.reason)
        self.assertFalse(state.throttled)

    def test_successes_are_counted_in_the_store_not_per_worker(self) -> None:
        first, second = self.throttle(), self.throttle()
        first.report_rate_limited(retry_after=None)  # 5/s: a step needs 5 clean requests
        first.report_success(n=3)
        second.report_success(n=3)
        self.assertEqual(first.effective_rate().rate, 6.0)

    def test_a_429_resets_the_count_of_clean_sends(self) -> None:
        t = self.throttle()
        t.report_rate_limited(retry_after=None)  # 5/s
        t.report_success(n=4)
        self.time.advance(2.0)
        t.report_rate_limited(retry_after=None)  # 2.5/s: a step needs 3
        t.report_success(n=2)
        self.assertEqual(t.effective_rate().rate, 2.5)

    def test_a_raised_ceiling_is_followed_unless_throttled(self) -> None:
        self.throttle().try_acquire()
        state = self.throttle(RATE_LIMIT_PER_SECOND=20.0).effective_rate()
        self.assertEqual((state.rate, state.ceiling), (20.0, 20.0))
        throttled = self.throttle(RATE_LIMIT_PER_SECOND=20.0)
        throttled.report_rate_limited(retry_after=None)  # 10/s under a ceiling of 20
        self.assertEqual(self.throttle(RATE_LIMIT_PER_SECOND=40.0).effective_rate().rate, 10.0)

    # -- batches and providers

    def test_a_batch_costs_one_request_and_one_message_token_per_limited_recipient(self) -> None:
        t = self.throttle(PROVIDER_RATE_LIMITS={"gmail": 10})
        recipients = [f"a{i}@gmail.com" for i in range(5)] + [f"b{i}@yahoo.com" for i in range(3)]
        self.assertEqual(t.acquire_for_batch(recipients=recipients, timeout=0), 0.0)
        self.assertEqual(t.effective_rate("esp").available, 2.0)
        self.assertEqual(t.effective_rate("provider:gmail").available, 5.0)
        self.assertEqual([s.bucket for s in t.rate_states()], ["esp", "provider:gmail"])

    def test_a_batch_takes_all_its_tokens_or_none(self) -> None:
        t = self.throttle(PROVIDER_RATE_LIMITS={"gmail": 2})
        t.acquire_for_batch(recipients=["a@gmail.com", "b@gmail.com"], timeout=0)
        with self.assertRaises(ThrottleTimeout):
            t.acquire_for_batch(recipients=["c@gmail.com", "d@example.com"], timeout=0)
        self.assertEqual(t.effective_rate("esp").available, 2.0)
        # Mail to providers without a limit only needs the request token.
        t.acquire_for_batch(recipients=["d@example.com"], timeout=0)
        self.assertEqual(t.effective_rate("esp").available, 1.0)

    def test_a_batch_larger_than_the_burst_waits_for_a_full_bucket_and_leaves_debt(self) -> None:
        t = self.throttle(
            PROVIDER_RATE_LIMITS={"gmail": 10}, RATE_LIMIT_PER_SECOND=1000.0, RATE_LIMIT_BURST=1000.0
        )
        t.acquire_for_batch(recipients=["a@gmail.com"], timeout=0)
        big = [f"u{i}@gmail.com" for i in range(25)]
        refused = t.try_acquire(tokens=25, bucket="provider:gmail")
        self.assertAlmostEqual(refused.wait, 0.1, places=6)
        self.time.advance(0.1)
        t.acquire_for_batch(recipients=big, timeout=0)
        self.assertAlmostEqual(t.effective_rate("provider:gmail").available, -15.0, places=6)
        self.assertAlmostEqual(t.try_acquire(bucket="provider:gmail").wait, 1.6, places=6)

    def test_an_unknown_provider_in_the_settings_is_refused(self) -> None:
        with self.assertRaises(ImproperlyConfigured):
            self.throttle(PROVIDER_RATE_LIMITS={"hotmail": 5}).acquire_for_batch(
                recipients=["a@b.c"], timeout=0
            )

    # -- across processes, on the real clock

    def hammer_target(self) -> str:
        raise NotImplementedError

    def run_processes(self, options: Mapping[str, Any], recipients: list[str] | None) -> list[dict[str, Any]]:
        ctx = multiprocessing.get_context("spawn")
        ready, results, start = ctx.Queue(), ctx.Queue(), ctx.Event()
        args = (self.kind, self.hammer_target(), self.namespace, dict(options), 1.5, recipients)
        procs = [
            ctx.Process(target=_hammer, args=(*args, ready, start, results), daemon=True) for _ in range(4)
        ]
        for p in procs:
            p.start()
        try:
            for _ in procs:
                ready.get(timeout=120)
            start.set()
            return [results.get(timeout=120) for _ in procs]
        finally:
            for p in procs:
                p.join(timeout=10)
                if p.is_alive():
                    p.terminate()

    def assert_bucket_bound(self, out: list[dict[str, Any]], bucket: str, rate: float, burst: float) -> None:
        grants = sorted((at, tokens[bucket]) for r in out for at, tokens in r["grants"])
        total = sum(n for _, n in grants)
        elapsed = grants[-1][0] - grants[0][0]
        # The token-bucket guarantee, measured on the store's clock: in any window no more
        # than burst + rate * window. Machine load changes how many grants there are, not
        # this bound, so it needs no slack beyond float rounding.
        self.assertLessEqual(total, burst + rate * elapsed + 1e-6)
        self.assertGreater(total, burst)  # it refilled: nobody starved
        calls = sum(r["calls"] for r in out)
        # No spinning: waiters are lined up, so a grant costs about two script calls (one
        # "come back in ...", one grant), not the hundreds a busy loop would make.
        self.assertLessEqual(calls, 4 * len(grants) + 20)

    def test_the_request_limit_holds_across_processes(self) -> None:
        options = {**OPTIONS, "RATE_LIMIT_PER_SECOND": 40.0, "RATE_LIMIT_BURST": 5.0}
        self.assert_bucket_bound(self.run_processes(options, None), "esp", 40.0, 5.0)

    def test_a_provider_limit_holds_across_processes(self) -> None:
        options = {
            **OPTIONS,
            "RATE_LIMIT_PER_SECOND": 1000.0,
            "RATE_LIMIT_BURST": 1000.0,
            "PROVIDER_RATE_LIMITS": {"gmail": 60},
        }
        recipients = ["a@gmail.com", "b@googlemail.com", "c@gmail.com", "d@example.com"]
        self.assert_bucket_bound(self.run_processes(options, recipients), "provider:gmail", 60.0, 60.0)


def _hammer(
    kind: str,
    target: str,
    namespace: str,
    options: dict[str, Any],
    duration: float,
    recipients: list[str] | None,
    ready: Any,
    start: Any,
    results: Any,
) -> None:
    """One worker process: acquire as fast as allowed for `duration`, recording the store
    time and tokens of every grant, and how many times it called the store."""
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "tests.settings")
    import django

    django.setup()  # before "ready": lazy settings would otherwise eat the first second
    backend = RedisBackend(url=target) if kind == "redis" else FileBackend(path=Path(target))
    grants: list[tuple[float, dict[str, int]]] = []
    calls = 0

    def seen(decision: Decision, tokens: Mapping[str, int]) -> None:
        nonlocal calls
        calls += 1
        if decision.granted:
            grants.append((decision.now, dict(tokens)))

    t = Throttle(backend=backend, options=options, namespace=namespace, on_decision=seen)
    ready.put(os.getpid())
    start.wait(120)
    end = time.monotonic() + duration
    while (left := end - time.monotonic()) > 0:
        try:
            if recipients:
                t.acquire_for_batch(recipients=recipients, timeout=left)
            else:
                t.acquire(timeout=left)
        except ThrottleTimeout:
            break
    results.put({"grants": grants, "calls": calls})


class RedisBucketTests(BucketContract):
    __test__ = True
    kind = "redis"

    def make_backend(self) -> RedisBackend:
        return RedisBackend(url=settings.REDIS_URL)

    def hammer_target(self) -> str:
        return settings.REDIS_URL

    def setUp(self) -> None:
        super().setUp()
        self.addCleanup(delete_namespace, self.namespace)

    def test_state_lives_in_one_hash_per_bucket_under_the_account_hash_tag(self) -> None:
        self.throttle(PROVIDER_RATE_LIMITS={"gmail": 5}).acquire_for_batch(
            recipients=["a@gmail.com"], timeout=0
        )
        client = redis.Redis.from_url(settings.REDIS_URL)
        keys = sorted(k.decode() for k in client.scan_iter(match=f"mailauto:throttle:{{{self.namespace}}}:*"))
        self.assertEqual(
            keys,
            [
                f"mailauto:throttle:{{{self.namespace}}}:esp",
                f"mailauto:throttle:{{{self.namespace}}}:provider:gmail",
            ],
        )
        self.assertGreater(client.ttl(keys[0]), 0)

    def test_without_a_clock_override_the_redis_server_clock_is_used(self) -> None:
        t = Throttle(backend=self.backend, options=OPTIONS, namespace=self.namespace)
        seconds, micros = self.backend.client.time()
        server_now = seconds + micros / 1e6
        decision = t.try_acquire()
        self.assertTrue(decision.granted)
        self.assertAlmostEqual(decision.now, server_now, delta=5.0)


class FileBucketTests(BucketContract):
    __test__ = True
    kind = "file"

    def make_backend(self) -> FileBackend:
        self.tmp = tempfile.TemporaryDirectory()
        self.addCleanup(self.tmp.cleanup)
        return FileBackend(path=Path(self.tmp.name) / "throttle" / "buckets.json")

    def hammer_target(self) -> str:
        return str(self.backend.path)

    def test_a_corrupt_state_file_starts_from_full_buckets(self) -> None:
        t = self.throttle()
        self.drain(t)
        self.backend.path.write_text("{not json")
        self.assertTrue(t.try_acquire().granted)

    def test_idle_buckets_expire_from_the_state_file(self) -> None:
        t = self.throttle()
        t.try_acquire()
        self.time.advance(throttle.STATE_TTL_SECONDS + 1)
        other = Throttle(
            backend=self.backend,
            options=OPTIONS,
            namespace="other",
            clock=self.time.clock,
            sleep=self.time.sleep,
        )
        other.try_acquire()
        self.assertNotIn(self.namespace, self.backend.path.read_text())


class TransactionGuardTests(TestCase):
    """acquire() may wait: never inside a transaction that holds locks and a connection."""

    def setUp(self) -> None:
        self.namespace = f"test-{uuid.uuid4().hex[:12]}"
        self.addCleanup(delete_namespace, self.namespace)
        self.calls: list[Decision] = []
        self.throttle = Throttle(
            backend=RedisBackend(url=settings.REDIS_URL),
            options=OPTIONS,
            namespace=self.namespace,
            on_decision=lambda decision, tokens: self.calls.append(decision),
        )

    def test_acquire_inside_a_transaction_is_refused_before_taking_a_token(self) -> None:
        with transaction.atomic():
            with self.assertRaises(ThrottleInTransaction):
                self.throttle.acquire(timeout=1)
            with self.assertRaises(ThrottleInTransaction):
                self.throttle.acquire_for_batch(recipients=["a@gmail.com"], timeout=1)
        self.assertEqual(self.calls, [])

    def test_acquire_outside_a_transaction_is_allowed(self) -> None:
        # The test case's own wrapping transaction does not count (as for durable=True).
        self.throttle.acquire(timeout=1)
        self.throttle.acquire_for_batch(recipients=["a@gmail.com"], timeout=1)
        self.assertEqual([d.granted for d in self.calls], [True, True])


class IdleConnectionTests(TransactionTestCase):
    def test_a_long_wait_closes_the_idle_db_connection_first(self) -> None:
        namespace = f"test-{uuid.uuid4().hex[:12]}"
        self.addCleanup(delete_namespace, namespace)
        fake = FakeTime()
        t = Throttle(
            backend=RedisBackend(url=settings.REDIS_URL),
            options=OPTIONS,
            namespace=namespace,
            clock=fake.clock,
            sleep=fake.sleep,
            monotonic=fake.clock,
        )
        t.report_rate_limited(retry_after=2)
        with connection.cursor() as cursor:
            cursor.execute("SELECT 1")
        self.assertIsNotNone(connection.connection)
        t.acquire(timeout=10)
        self.assertIsNone(connection.connection)

    def test_a_short_wait_keeps_the_connection(self) -> None:
        namespace = f"test-{uuid.uuid4().hex[:12]}"
        self.addCleanup(delete_namespace, namespace)
        fake = FakeTime()
        t = Throttle(
            backend=RedisBackend(url=settings.REDIS_URL),
            options={**OPTIONS, "RATE_LIMIT_BURST": 1.0},
            namespace=namespace,
            clock=fake.clock,
            sleep=fake.sleep,
            monotonic=fake.clock,
        )
        t.acquire(timeout=1)
        with connection.cursor() as cursor:
            cursor.execute("SELECT 1")
        t.acquire(timeout=1)
        self.assertEqual(len(fake.sleeps), 1)
        self.assertIsNotNone(connection.connection)


class DefaultThrottleTests(SimpleTestCase):
    def test_with_redis_the_bucket_lives_in_redis(self) -> None:
        self.assertIsInstance(throttle.default_throttle().backend, RedisBackend)

    def test_without_redis_a_state_file_under_var_dir_is_used(self) -> None:
        with tempfile.TemporaryDirectory() as tmp, override_settings(REDIS_URL="", VAR_DIR=Path(tmp)):
            backend = throttle.default_throttle().backend
            assert isinstance(backend, FileBackend)
            self.assertEqual(backend.path, Path(tmp) / "throttle" / "buckets.json")

    def test_the_bucket_key_names_the_esp_and_a_hash_of_its_key(self) -> None:
        anymail = {**settings.ANYMAIL, "POSTMARK_SERVER_TOKEN": "secret-token-1"}
        with override_settings(ESP_NAME="postmark", ANYMAIL=anymail):
            first = esp_account()
            namespace = throttle.default_throttle().namespace
        with override_settings(
            ESP_NAME="postmark", ANYMAIL={**anymail, "POSTMARK_SERVER_TOKEN": "secret-token-2"}
        ):
            second = esp_account()
        self.assertEqual(namespace, f"postmark:{first}")
        self.assertNotEqual(first, second)
        self.assertNotIn("secret", first)

    def test_a_configured_account_name_wins(self) -> None:
        with override_settings(MAILAUTO={**settings.MAILAUTO, "RATE_LIMIT_ACCOUNT": "main-server"}):
            self.assertEqual(esp_account(), "main-server")

    def test_the_ceiling_is_the_reference_rate_limit_setting(self) -> None:
        account = f"test-{uuid.uuid4().hex[:12]}"
        options = {**settings.MAILAUTO, "RATE_LIMIT_PER_SECOND": 7.0, "RATE_LIMIT_ACCOUNT": account}
        with override_settings(MAILAUTO=options):
            self.addCleanup(delete_namespace, throttle.default_throttle().namespace)
            state = throttle.effective_rate()
        self.assertEqual((state.rate, state.ceiling), (7.0, 7.0))
        self.assertEqual(state.reason, "at the configured rate")


class ConfigurationTests(SimpleTestCase):
    def test_the_default_settings_are_valid(self) -> None:
        self.assertEqual(configuration_errors(), [])

    def test_bad_values_are_reported(self) -> None:
        errors = configuration_errors(
            {
                **OPTIONS,
                "RATE_LIMIT_BURST": 0.5,
                "THROTTLE_DECREASE_FACTOR": 1.5,
                "PROVIDER_RATE_LIMITS": {"hotmail": 5, "gmail": 0},
            }
        )
        self.assertEqual(len(errors), 4, errors)
        self.assertTrue(any("hotmail" in e for e in errors))


class ProviderTests(SimpleTestCase):
    def test_recipient_domains_map_to_providers(self) -> None:
        cases = {
            "a@gmail.com": "gmail",
            "a@GoogleMail.com": "gmail",
            "a@outlook.com": "outlook",
            "a@hotmail.com": "outlook",
            "a@hotmail.co.uk": "outlook",
            "a@live.com": "outlook",
            "a@msn.com": "outlook",
            "a@yahoo.com": "yahoo",
            "a@yahoo.co.jp": "yahoo",
            "a@ymail.com": "yahoo",
            "a@aol.com": "yahoo",
            "a@icloud.com": "icloud",
            "a@me.com": "icloud",
            "a@mac.com": "icloud",
            "a@example.com": "other",
            "a@mail.gmail.com.evil.test": "other",
            "a@yahoo": "other",
            "not-an-address": "other",
        }
        self.assertEqual({email: provider_for(email) for email in cases}, cases)

    def test_group_by_provider_keeps_the_order_within_each_group(self) -> None:
        emails = ["1@gmail.com", "2@example.com", "3@gmail.com", "4@me.com"]
        self.assertEqual(
            group_by_provider(emails, email=lambda e: e),
            {"gmail": ["1@gmail.com", "3@gmail.com"], "other": ["2@example.com"], "icloud": ["4@me.com"]},
        )
