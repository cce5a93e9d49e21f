"""Event processing: claims, automation matching, idempotent Message creation."""

from __future__ import annotations

import threading
from datetime import timedelta
from unittest import mock

from django.conf import settings
from django.db import connection, transaction
from django.test import TestCase, TransactionTestCase, override_settings
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from campaigns import processing
from campaigns.models import Contact, Message, OutboxEvent
from campaigns.processing import event_fail, event_plan, events_claim, events_process_batch, events_replay
from suppression.services import suppression_add
from tests import factories


def compliance(**options: object) -> override_settings:
    return override_settings(MAILAUTO={**settings.MAILAUTO, **options})


class ProcessingTests(TestCase):
    @classmethod
    def setUpTestData(cls) -> None:
        cls.type = factories.event_type()
        cls.contact = factories.contact(user_id="u-1", email="ada@example.com", country="NL")

    def setUp(self) -> None:
        patcher = mock.patch("campaigns.tasks.messages_send.apply_async")
        self.nudge = patcher.start()
        self.addCleanup(patcher.stop)

    def test_matching_automation_creates_one_queued_message_pinned_to_the_version(self) -> None:
        version = factories.published_version()
        automation = factories.automation(self.type, version)
        event = factories.outbox_event(self.type, "u-1")
        with self.captureOnCommitCallbacks(execute=True):
            result = events_process_batch()
        self.assertEqual((result.claimed, result.processed, result.messages), (1, 1, 1))
        message = Message.objects.get()
        self.assertEqual(message.status, Message.Status.QUEUED)
        self.assertEqual(message.template_version, version)
        self.assertEqual(message.automation, automation)
        self.assertEqual(message.to_email, "ada@example.com")
        self.assertEqual(message.idempotency_key, f"{event.event_id}:{automation.pk}")
        event.refresh_from_db()
        self.assertEqual(event.status, OutboxEvent.Status.PROCESSED)
        self.assertIn("queued", event.result)
        self.nudge.assert_called_once()

    def test_conditions_on_payload_and_contact_decide(self) -> None:
        factories.automation(
            self.type, conditions={"field": "payload.plan", "op": "eq", "value": "pro"}, name="pro"
        )
        factories.automation(
            self.type, conditions={"field": "contact.country", "op": "in", "value": ["US"]}, name="us"
        )
        factories.outbox_event(self.type, "u-1", {"plan": "pro"})
        events_process_batch()
        self.assertEqual(list(Message.objects.values_list("automation__name", flat=True)), ["pro"])
        self.assertIn("us: conditions not met", OutboxEvent.objects.get().result)

    def test_inactive_automation_is_ignored(self) -> None:
        factories.automation(self.type, active=False)
        factories.outbox_event(self.type, "u-1")
        events_process_batch()
        self.assertFalse(Message.objects.exists())
        self.assertEqual(OutboxEvent.objects.get().result, "no active automation for this event type")

    def test_unknown_contact_is_processed_with_a_reason(self) -> None:
        factories.automation(self.type)
        factories.outbox_event(self.type, "nobody")
        events_process_batch()
        event = OutboxEvent.objects.get()
        self.assertEqual(event.status, OutboxEvent.Status.PROCESSED)
        self.assertIn("no contact with user_id 'nobody'", event.result)

    def test_an_event_for_a_contact_outside_the_allowed_regions_is_refused(self) -> None:
        Contact.objects.create(user_id="u-us", email="us@example.com", region="us")
        factories.automation(self.type)
        factories.outbox_event(self.type, "u-us", event_id="with-automation")
        quiet_type = factories.event_type(name="order.viewed", schema={})
        factories.outbox_event(quiet_type, "u-us", event_id="no-automation")

        with compliance(ALLOWED_REGIONS=["eu"]):
            events_process_batch()

        reason = "refused: contact region 'us' is not in ALLOWED_REGIONS (eu)"
        for event in OutboxEvent.objects.all():
            with self.subTest(event=event.event_id):
                self.assertEqual((event.status, event.result), (OutboxEvent.Status.REFUSED, reason))
        self.assertFalse(Message.objects.exists())

    def test_without_recorded_consent_marketing_is_suppressed_and_transactional_queued(self) -> None:
        factories.automation(self.type, name="newsletter", purpose="marketing")
        factories.automation(self.type, name="receipt", purpose="receipts", is_transactional=True)
        factories.outbox_event(self.type, "u-1")

        with compliance(CONSENT_CHECK=True):
            events_process_batch()

        by_name = {m.automation.name: m for m in Message.objects.select_related("automation")}
        self.assertEqual(by_name["newsletter"].status, Message.Status.SUPPRESSED)
        self.assertEqual(by_name["newsletter"].status_reason, "no consent recorded for 'marketing'")
        self.assertEqual(by_name["receipt"].status, Message.Status.QUEUED)

    def test_latest_published_version_is_used_unless_pinned(self) -> None:
        v1 = factories.published_version()
        v2 = v1.template.versions.create(
            number=2, status="published", published_at=timezone.now(), subject="v2", html="<p>v2</p>"
        )
        v1.template.versions.create(number=3, status="draft", subject="draft", html="<p>draft</p>")
        factories.automation(self.type, v1, name="latest")
        factories.automation(self.type, v1, name="pinned", pinned_version=v1)
        factories.outbox_event(self.type, "u-1")
        events_process_batch()
        used = dict(Message.objects.values_list("automation__name", "template_version"))
        self.assertEqual(used, {"latest": v2.pk, "pinned": v1.pk})

    def test_suppressed_address_gets_a_suppressed_message_with_the_reason(self) -> None:
        factories.automation(self.type)
        suppression_add(email="ADA@example.com", reason="complaint", source="test")
        factories.outbox_event(self.type, "u-1")
        events_process_batch()
        message = Message.objects.get()
        self.assertEqual(message.status, Message.Status.SUPPRESSED)
        self.assertIn("spam complaint", message.status_reason)
        self.nudge.assert_not_called()

    def test_delay_sets_send_after_from_the_event_time(self) -> None:
        factories.automation(self.type, delay=timedelta(days=1))
        occurred = timezone.now()
        factories.outbox_event(self.type, "u-1", occurred_at=occurred)
        events_process_batch()
        self.assertEqual(Message.objects.get().send_after, occurred + timedelta(days=1))

    def test_a_batch_is_written_in_a_bounded_number_of_queries(self) -> None:
        factories.automation(self.type)
        for _ in range(3):
            factories.outbox_event(self.type, "u-1")
        events_process_batch()  # warm the version cache
        for _ in range(30):
            factories.outbox_event(self.type, "u-1")
        with self.assertNumQueries(14):
            # A fixed cost per batch whatever its size: claim (4), automations,
            # contacts, suppressions and erased addresses, cached version check,
            # savepoint, one INSERT, one UPDATE, release.
            result = events_process_batch()
        self.assertEqual(result.processed, 30)

    def test_a_batch_of_messages_is_inserted_as_one_json_document_with_bulk_creates_values(self) -> None:
        transactional = factories.automation(self.type, name="receipt", is_transactional=True)
        marketing = factories.automation(self.type, name="news", delay=timedelta(hours=1))
        suppression_add(email="bob@example.com", reason="complaint", source="test")
        factories.contact(user_id="u-2", email="bob@example.com")
        events = [factories.outbox_event(self.type, user_id) for user_id in ("u-1", "u-2")]
        expected = [
            message
            for event in events
            for message in event_plan(
                event=event,
                automations=[transactional, marketing],
                contact=Contact.objects.get(user_id=event.user_id),
                versions={},
            ).messages
        ]
        with transaction.atomic():  # what bulk_create writes, rolled back
            Message.objects.bulk_create(expected)
            written_by_django = list(Message.objects.order_by("idempotency_key").values())
            transaction.set_rollback(True)

        with CaptureQueriesContext(connection) as queries:
            events_process_batch()

        inserts = [q["sql"] for q in queries.captured_queries if q["sql"].startswith("INSERT")]
        self.assertEqual(len(inserts), 1)
        self.assertIn("json_populate_recordset", inserts[0])
        ignored = {"id", "send_after", "created_at", "updated_at"}
        written = list(Message.objects.order_by("idempotency_key").values())
        self.assertEqual(
            [{k: v for k, v in row.items() if k not in ignored} for row in written],
            [{k: v for k, v in row.items() if k not in ignored} for row in written_by_django],
        )
        self.assertEqual(
            sorted((row["to_email"], row["status"]) for row in written),
            [
                ("ada@example.com", Message.Status.QUEUED),
                ("ada@example.com", Message.Status.QUEUED),
                ("bob@example.com", Message.Status.SUPPRESSED),
                ("bob@example.com", Message.Status.SUPPRESSED),
            ],
        )
        news = Message.objects.get(automation=marketing, contact__user_id="u-1")
        self.assertEqual(news.send_after, events[0].occurred_at + timedelta(hours=1))

    def test_a_value_json_would_not_carry_unchanged_falls_back_to_bulk_create(self) -> None:
        factories.automation(self.type)
        factories.outbox_event(self.type, "u-1")
        real_plan = processing.event_plan

        def with_a_json_string(**kwargs):  # type: ignore[no-untyped-def]
            plan = real_plan(**kwargs)
            for message in plan.messages:
                message.error_history = "not a list"  # a JSON string: stored as one by Django
            return plan

        with (
            mock.patch("campaigns.processing.event_plan", side_effect=with_a_json_string),
            CaptureQueriesContext(connection) as queries,
        ):
            events_process_batch()

        inserts = [q["sql"] for q in queries.captured_queries if q["sql"].startswith("INSERT")]
        self.assertEqual(len(inserts), 1)
        self.assertNotIn("json_populate_recordset", inserts[0])
        self.assertEqual(Message.objects.get().error_history, "not a list")

    def test_processing_an_event_twice_creates_no_second_message(self) -> None:
        factories.automation(self.type)
        event = factories.outbox_event(self.type, "u-1")
        events_process_batch()
        OutboxEvent.objects.filter(pk=event.pk).update(status=OutboxEvent.Status.PENDING)
        result = events_process_batch()
        self.assertEqual(result.processed, 1)
        self.assertEqual(Message.objects.count(), 1)

    def test_a_failing_event_is_retried_then_dead_and_does_not_stop_the_batch(self) -> None:
        factories.automation(self.type)
        bad = factories.outbox_event(self.type, "u-1")
        good = factories.outbox_event(self.type, "u-1")
        from campaigns import processing

        real = processing.event_plan

        def flaky(*, event, **kw):  # type: ignore[no-untyped-def]
            if event.pk == bad.pk:
                raise RuntimeError("database hiccup")
            return real(event=event, **kw)

        with mock.patch("campaigns.processing.event_plan", side_effect=flaky):
            result = events_process_batch()
        self.assertEqual((result.processed, result.failed), (1, 1))
        bad.refresh_from_db()
        good.refresh_from_db()
        self.assertEqual(good.status, OutboxEvent.Status.PROCESSED)
        self.assertEqual(bad.status, OutboxEvent.Status.RETRYING)
        self.assertIn("database hiccup", bad.last_error)
        self.assertGreater(bad.available_at, timezone.now())

        with override_settings(MAILAUTO={**self.settings_mailauto(), "EVENT_MAX_ATTEMPTS": 2}):
            OutboxEvent.objects.filter(pk=bad.pk).update(available_at=timezone.now())
            with mock.patch("campaigns.processing.event_plan", side_effect=flaky):
                events_process_batch()
        bad.refresh_from_db()
        self.assertEqual(bad.status, OutboxEvent.Status.DEAD)
        self.assertEqual(len(bad.error_history), 2)

    def settings_mailauto(self) -> dict:
        from django.conf import settings

        return dict(settings.MAILAUTO)

    def test_replay_puts_dead_events_back(self) -> None:
        event = factories.outbox_event(self.type, "u-1", status=OutboxEvent.Status.DEAD, attempts=5)
        self.assertEqual(events_replay(event_ids=[event.pk]), 1)
        event.refresh_from_db()
        self.assertEqual((event.status, event.attempts), (OutboxEvent.Status.PENDING, 0))

    def test_expired_lease_makes_an_event_claimable_again(self) -> None:
        event = factories.outbox_event(
            self.type,
            "u-1",
            status=OutboxEvent.Status.PROCESSING,
            locked_until=timezone.now() - timedelta(seconds=1),
        )
        fresh = factories.outbox_event(
            self.type,
            "u-1",
            status=OutboxEvent.Status.PROCESSING,
            locked_until=timezone.now() + timedelta(minutes=5),
        )
        claimed = [e.pk for e in events_claim(limit=10)]
        self.assertEqual(claimed, [event.pk])
        self.assertNotIn(fresh.pk, claimed)

    def test_event_fail_counts_claims(self) -> None:
        event = factories.outbox_event(self.type, "u-1")
        [claimed] = events_claim(limit=1)
        self.assertEqual(claimed.attempts, 1)
        event_fail(event=claimed, error="x")
        event.refresh_from_db()
        self.assertEqual(event.attempts, 1)
        self.assertEqual(event.status, OutboxEvent.Status.RETRYING)


class ConcurrentClaimTests(TransactionTestCase):
    """Several workers claiming at once take disjoint batches (real Postgres row locks)."""

    def test_parallel_claims_never_take_the_same_event(self) -> None:
        type_ = factories.event_type()
        for n in range(200):
            factories.outbox_event(type_, f"u-{n}")
        claimed: list[list[int]] = []
        barrier = threading.Barrier(4)

        def worker() -> None:
            try:
                barrier.wait()
                mine: list[int] = []
                while batch := events_claim(limit=7):
                    mine.extend(e.pk for e in batch)
                claimed.append(mine)
            finally:
                connection.close()

        threads = [threading.Thread(target=worker) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        all_ids = [pk for mine in claimed for pk in mine]
        self.assertEqual(len(all_ids), 200)
        self.assertEqual(len(set(all_ids)), 200)


class PoisonEventTests(TestCase):
    def test_an_event_whose_worker_keeps_dying_is_dead_lettered(self) -> None:
        from django.conf import settings

        from campaigns.processing import events_bury_poison

        type_ = factories.event_type()
        max_attempts = settings.MAILAUTO["EVENT_MAX_ATTEMPTS"]
        poison = factories.outbox_event(
            type_,
            "u-1",
            status=OutboxEvent.Status.PROCESSING,
            attempts=max_attempts,
            locked_until=timezone.now() - timedelta(seconds=1),
        )
        retry = factories.outbox_event(
            type_,
            "u-1",
            status=OutboxEvent.Status.PROCESSING,
            attempts=max_attempts - 1,
            locked_until=timezone.now() - timedelta(seconds=1),
        )
        self.assertEqual([e.pk for e in events_claim(limit=10)], [retry.pk])
        self.assertEqual(events_bury_poison(), 1)
        poison.refresh_from_db()
        self.assertEqual(poison.status, OutboxEvent.Status.DEAD)
        self.assertIn("worker stopped", poison.result)
