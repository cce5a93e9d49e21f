"""The Redis mirror of the suppression list, against a real Redis, and send_decision's use
of it: a miss saves the Postgres query, a hit or any doubt goes to Postgres."""

from __future__ import annotations

from unittest import mock

import redis
from django.conf import settings
from django.test import TestCase, override_settings

from campaigns.delivery import messages_send_batch
from campaigns.models import Message
from suppression import cache
from suppression.models import Suppression
from suppression.selectors import send_decision
from suppression.services import suppression_add, suppression_remove
from tests import factories
from tests.conftest import use_sandbox

DOWN_REDIS_URL = "redis://127.0.0.1:1/0"  # nothing listens there


def options(**changes: object) -> dict:
    return {**settings.MAILAUTO, **changes}


@override_settings(MAILAUTO=options(SUPPRESSION_STORAGE="redis"))
class MirrorTestCase(TestCase):
    def setUp(self) -> None:
        self.redis = redis.Redis.from_url(settings.REDIS_URL, decode_responses=True)
        self.addCleanup(self.redis.close)
        self.forget_mirror()
        self.addCleanup(self.forget_mirror)

    def forget_mirror(self) -> None:
        self.redis.delete(cache.MIRROR_KEY, cache.RECENT_KEY)
        cache.reset_breaker()
        cache._client_for.cache_clear()

    def suppress(self, email: str, topic: str = "", reason: str = "unsubscribe") -> None:
        with self.captureOnCommitCallbacks(execute=True):
            suppression_add(email=email, topic=topic, reason=reason, source="test")

    def lookup(self, email: str, *topics: str) -> set[str]:
        return cache.mirror_lookup(email=email, topics=topics or ("",))


class MirrorContentTests(MirrorTestCase):
    def test_rebuild_mirrors_every_suppression_without_plain_addresses(self) -> None:
        self.suppress("ada@example.com", "newsletter")
        self.suppress("bob@example.com", reason="hard_bounce")

        self.assertEqual(cache.mirror_rebuild(), 2)

        self.assertEqual(self.lookup("ada@example.com", "", "newsletter", "other"), {"newsletter"})
        self.assertEqual(self.lookup("bob@example.com", "", "newsletter"), {""})
        self.assertEqual(self.lookup("carol@example.com", "", "newsletter"), set())
        fields = self.redis.hkeys(cache.MIRROR_KEY)
        self.assertEqual(len(fields), 3)  # two suppressions and the marker
        self.assertFalse([f for f in fields if "@" in f or "ada" in f or "bob" in f])

    def test_not_trusted_before_the_first_rebuild(self) -> None:
        self.suppress("ada@example.com")  # written to Redis, but nobody vouched for completeness

        with self.assertRaises(cache.MirrorUnavailable):
            self.lookup("carol@example.com")

    def test_an_add_reaches_the_mirror_after_commit(self) -> None:
        cache.mirror_rebuild()

        with self.captureOnCommitCallbacks(execute=False) as callbacks:
            suppression_add(email="Ada@Example.com", topic="newsletter", reason="unsubscribe", source="test")
        self.assertEqual(self.lookup("ada@example.com", "newsletter"), set())  # not committed yet
        for callback in callbacks:
            callback()

        self.assertEqual(self.lookup("ada@example.com", "newsletter"), {"newsletter"})

    def test_a_removal_reaches_the_mirror_after_commit(self) -> None:
        self.suppress("ada@example.com", "newsletter")
        cache.mirror_rebuild()

        with self.captureOnCommitCallbacks(execute=True):
            suppression_remove(email="ada@example.com", topic="newsletter", reason="opted in", source="test")

        self.assertEqual(self.lookup("ada@example.com", "newsletter"), set())

    def test_a_removal_that_runs_after_a_newer_add_puts_the_entry_back(self) -> None:
        """Two after-commit callbacks in the wrong order: the removal's HDEL lands after
        the re-add's HSET. Postgres still has the row, so the mirror must too."""
        cache.mirror_rebuild()
        self.suppress("ada@example.com", "newsletter")  # the re-add, committed and mirrored

        cache.mirror_record_removed(email="ada@example.com", topic="newsletter")  # the late removal

        self.assertEqual(self.lookup("ada@example.com", "newsletter"), {"newsletter"})

    def test_an_add_committed_during_a_rebuild_is_carried_over(self) -> None:
        """The snapshot misses an add that commits while it is read; the add's
        after-commit write must survive the swap."""
        self.suppress("ada@example.com")
        real_write = cache._write_batch

        def write_then_commit_elsewhere(*args, **kwargs):  # type: ignore[no-untyped-def]
            written = real_write(*args, **kwargs)
            # Another process commits a suppression now, after our snapshot was taken:
            # only its after-commit mirror write tells us about it.
            cache.mirror_record_added(email="late@example.com", topic="")
            return written

        with mock.patch.object(cache, "_write_batch", side_effect=write_then_commit_elsewhere):
            cache.mirror_rebuild()

        self.assertEqual(self.lookup("late@example.com"), {""})
        self.assertEqual(self.lookup("ada@example.com"), {""})

    def test_a_rebuild_drops_entries_postgres_no_longer_has(self) -> None:
        cache.mirror_rebuild()
        self.suppress("ghost@example.com")
        Suppression.objects.filter(email="ghost@example.com").delete()  # bypassing the services
        self.redis.zadd(cache.RECENT_KEY, {cache._field("ghost@example.com", ""): 0})  # written long ago

        cache.mirror_rebuild()

        self.assertEqual(self.lookup("ghost@example.com"), set())

    def test_a_mirror_hashed_with_another_secret_key_is_not_trusted(self) -> None:
        cache.mirror_rebuild()

        with override_settings(SECRET_KEY="rotated-" * 8), self.assertRaises(cache.MirrorUnavailable):
            self.lookup("ada@example.com")

    def test_an_evicted_or_flushed_mirror_is_not_trusted(self) -> None:
        cache.mirror_rebuild()
        self.redis.delete(cache.MIRROR_KEY)
        self.suppress("ada@example.com")  # recreates the hash, without the marker

        with self.assertRaises(cache.MirrorUnavailable):
            self.lookup("carol@example.com")

    def test_the_mirror_expires_unless_it_is_rebuilt(self) -> None:
        cache.mirror_rebuild()

        ttl = self.redis.ttl(cache.MIRROR_KEY)

        interval = settings.MAILAUTO["SUPPRESSION_SYNC_INTERVAL_SECONDS"]
        self.assertGreater(ttl, 0)
        self.assertLessEqual(ttl, 2 * interval + cache.SKEW_MARGIN_SECONDS)


class SendDecisionWithMirrorTests(MirrorTestCase):
    def test_a_miss_is_answered_without_postgres(self) -> None:
        self.suppress("ada@example.com", "newsletter")
        cache.mirror_rebuild()

        with self.assertNumQueries(0):
            self.assertTrue(send_decision(email="carol@example.com", purpose="newsletter").allowed)
            self.assertTrue(send_decision(email="ada@example.com", purpose="product-updates").allowed)

    def test_a_hit_is_confirmed_in_postgres_with_its_reason(self) -> None:
        self.suppress("ada@example.com", "newsletter")
        cache.mirror_rebuild()

        with self.assertNumQueries(2):
            decision = send_decision(email="ADA@example.com", purpose="newsletter")

        self.assertEqual(decision.reason, "suppressed: unsubscribed (newsletter)")

    def test_an_erased_address_is_never_a_mirror_miss(self) -> None:
        """Erased addresses live only as a keyed hash; the mirror must cover them, after
        the erasure (written after commit) and after a rebuild from Postgres alike."""
        from campaigns.models import Contact
        from suppression.privacy import contact_erase

        contact = Contact.objects.create(user_id="gone", email="gone@example.com")
        cache.mirror_rebuild()
        with self.captureOnCommitCallbacks(execute=True):
            contact_erase(contact=contact, actor="test", reason="request")
        decision = send_decision(email="gone@example.com", purpose="newsletter", transactional=True)
        self.assertFalse(decision.allowed)
        self.assertIn("erased", decision.reason)

        cache.mirror_rebuild()
        self.assertFalse(send_decision(email="Gone@example.com", purpose="newsletter").allowed)

    def test_secret_key_fallbacks_switch_the_mirror_off(self) -> None:
        cache.mirror_rebuild()
        with self.settings(SECRET_KEY_FALLBACKS=["old-key"]), self.assertNumQueries(2):
            self.assertTrue(send_decision(email="carol@example.com", purpose="x").allowed)

    def test_a_stale_hit_costs_a_query_and_blocks_nothing(self) -> None:
        self.suppress("ada@example.com", "newsletter")
        cache.mirror_rebuild()
        Suppression.objects.all().delete()  # lifted behind the mirror's back

        self.assertTrue(send_decision(email="ada@example.com", purpose="newsletter").allowed)

    def test_authoritative_always_reads_postgres(self) -> None:
        cache.mirror_rebuild()

        with self.assertNumQueries(2):
            self.assertTrue(send_decision(email="carol@example.com", purpose="x", authoritative=True).allowed)

    def test_without_a_complete_mirror_postgres_decides(self) -> None:
        self.suppress("ada@example.com")

        with self.assertNumQueries(2):
            self.assertFalse(send_decision(email="ada@example.com", purpose="newsletter").allowed)

    @override_settings(REDIS_URL=DOWN_REDIS_URL)
    def test_redis_down_falls_back_to_postgres(self) -> None:
        with self.assertLogs("suppression.cache", "WARNING"):
            self.suppress("ada@example.com", reason="hard_bounce")  # the mirror write fails quietly
        self.assertTrue(Suppression.objects.filter(email="ada@example.com").exists())

        decision = send_decision(email="ada@example.com", purpose="newsletter", transactional=True)

        self.assertEqual(decision.reason, "suppressed: hard bounce")
        self.assertTrue(send_decision(email="carol@example.com", purpose="newsletter").allowed)

    @override_settings(REDIS_URL="")
    def test_redis_storage_without_redis_uses_the_database_with_a_warning(self) -> None:
        self.suppress("ada@example.com", "newsletter")
        cache._warn_no_redis.cache_clear()  # warned once per process: forget the one above

        with self.assertLogs("suppression.cache", "WARNING") as logs, self.assertNumQueries(2):
            decision = send_decision(email="ada@example.com", purpose="newsletter")

        self.assertFalse(decision.allowed)
        self.assertIn("REDIS_URL is not set", logs.output[0])


class StaleMirrorNeverSendsTests(MirrorTestCase):
    """The one staleness no cache can rule out (a lost write, a Redis failover): the
    mirror misses a suppression that Postgres has. send_decision then says "allowed",
    and the hand-off UPDATE, which reads Postgres, still stops the mail."""

    def setUp(self) -> None:
        super().setUp()
        self.sandbox = use_sandbox(self)

    def test_a_suppression_the_mirror_missed_still_stops_the_send(self) -> None:
        contact = factories.contact(email="ada@example.com")
        message = factories.message(factories.published_version(), contact)
        cache.mirror_rebuild()
        # Committed in Postgres, but its mirror write was lost.
        Suppression.objects.create(email="ada@example.com", reason="complaint", source="test")
        self.assertTrue(send_decision(email="ada@example.com", purpose="marketing").allowed)
        self.assertFalse(
            send_decision(email="ada@example.com", purpose="marketing", authoritative=True).allowed
        )

        messages_send_batch()

        self.assertEqual(self.sandbox.messages(), [])
        message.refresh_from_db()
        self.assertNotIn(message.status, [Message.Status.SENDING, Message.Status.SENT])


class MirrorSyncTests(MirrorTestCase):
    def test_sync_rebuilds_with_redis_storage(self) -> None:
        self.suppress("ada@example.com")

        self.assertEqual(cache.mirror_sync(), 1)

        self.assertEqual(self.lookup("ada@example.com"), {""})

    def test_sync_deletes_the_mirror_with_database_storage(self) -> None:
        """A mirror that suppression_add no longer maintains must not be found complete
        if storage is switched back to "redis"."""
        cache.mirror_rebuild()

        with override_settings(MAILAUTO=options(SUPPRESSION_STORAGE="database")):
            self.suppress("ada@example.com")  # not mirrored in database mode
            self.assertEqual(cache.mirror_sync(), 0)

        self.assertFalse(self.redis.exists(cache.MIRROR_KEY))
        with self.assertRaises(cache.MirrorUnavailable):
            self.lookup("ada@example.com")
