"""Broadcasts: the audience rule, materialisation into messages, the state changes, the
sweeper, sending through the real ESP sandbox, and the admin."""

from __future__ import annotations

import threading
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any
from unittest import mock

import time_machine
from django.conf import settings
from django.contrib import messages as admin_messages
from django.contrib.auth import get_user_model
from django.contrib.messages import get_messages
from django.core.exceptions import ValidationError
from django.db import IntegrityError, connection, connections, transaction
from django.test import TestCase, TransactionTestCase, override_settings
from django.test.utils import CaptureQueriesContext
from django.urls import reverse
from django.utils import timezone

from campaigns import tasks
from campaigns.broadcasts import (
    BROADCAST_PRIORITY,
    audience_preview,
    broadcast_cancel,
    broadcast_create,
    broadcast_materialise_batch,
    broadcast_pause,
    broadcast_resume,
    broadcast_schedule,
    broadcast_send_now,
    broadcasts_sweep,
    materialise,
)
from campaigns.delivery import claimable_messages_q, messages_claim, messages_replay, messages_send_batch
from campaigns.models import Broadcast, Contact, EmailTemplate, Message
from mailauto.celery import app as celery_app
from suppression.consent import consent_grant, consent_withdraw
from suppression.models import Suppression
from suppression.services import suppression_add
from tests import factories
from tests.conftest import use_sandbox
from webhooks.models import TrackingEvent

NOW = datetime(2025, 6, 2, 9, 0, tzinfo=UTC)
PRO = {"field": "contact.plan", "op": "eq", "value": "pro"}


def clear_nudges() -> None:
    from django.core.cache import cache

    cache.delete_many(["mailauto:nudge:broadcasts", "mailauto:nudge:sends"])


class BroadcastTestCase(TestCase):
    @classmethod
    def setUpTestData(cls) -> None:
        cls.version = factories.published_version(
            name="newsletter",
            subject="News for {{ contact.first_name|default:'you' }}",
            html="<p>June news</p>",
        )
        cls.ada = factories.contact(email="ada@example.com", first_name="Ada", plan="pro")
        cls.bob = factories.contact(email="bob@example.com", first_name="Bob", plan="free")
        cls.cy = factories.contact(email="cy@example.com", first_name="Cy", plan="pro")
        cls.dee = factories.contact(email="dee@example.com")  # no plan at all

    def setUp(self) -> None:
        clear_nudges()

    def started(self, audience: object = None, **kw: object) -> Broadcast:
        broadcast = factories.broadcast(self.version, audience=audience or {}, **kw)
        return broadcast_send_now(broadcast=broadcast, actor="test")

    def messages_of(self, broadcast: Broadcast) -> list[Message]:
        return list(Message.objects.filter(broadcast=broadcast).order_by("contact_id"))


class AudienceTests(BroadcastTestCase):
    def test_audience_rule_selects_the_matching_contacts(self) -> None:
        broadcast = self.started(PRO)

        broadcasts_sweep()

        messages = self.messages_of(broadcast)
        self.assertEqual([m.contact for m in messages], [self.ada, self.cy])
        for message in messages:
            self.assertEqual(message.idempotency_key, f"broadcast:{broadcast.pk}:{message.contact_id}")
            self.assertEqual(message.template_version, self.version)
            self.assertEqual((message.purpose, message.transactional), ("marketing", False))
            self.assertEqual((message.status, message.priority), (Message.Status.QUEUED, BROADCAST_PRIORITY))
            self.assertIsNone(message.event)
        broadcast.refresh_from_db()
        self.assertEqual((broadcast.audience_size, broadcast.recipients), (2, 2))
        self.assertIsNotNone(broadcast.audience_done_at)

    def test_an_empty_audience_is_every_contact_with_an_address_and_not_erased(self) -> None:
        erased = factories.contact(email="erased+1@erased.invalid")
        Contact.objects.filter(pk=erased.pk).update(erased_at=timezone.now())
        no_address = factories.contact()
        Contact.objects.filter(pk=no_address.pk).update(email="")
        broadcast = self.started()

        broadcasts_sweep()

        recipients = {m.contact_id for m in self.messages_of(broadcast)}
        self.assertEqual(recipients, {self.ada.pk, self.bob.pk, self.cy.pk, self.dee.pk})
        self.assertNotIn(erased.pk, recipients)
        self.assertNotIn(no_address.pk, recipients)

    def test_rules_see_attributes_email_and_user_id(self) -> None:
        broadcast = self.started(
            {"or": [{"field": "contact.email", "op": "ends_with", "value": "@example.com"}]}
        )
        other = self.started({"field": "contact.user_id", "op": "eq", "value": self.bob.user_id})
        broadcasts_sweep()
        self.assertEqual(len(self.messages_of(broadcast)), 4)
        self.assertEqual([m.contact for m in self.messages_of(other)], [self.bob])

    def test_contacts_created_after_the_start_are_not_in_the_audience(self) -> None:
        broadcast = self.started(PRO)
        late = factories.contact(email="late@example.com", plan="pro")

        broadcasts_sweep()

        self.assertNotIn(late.pk, {m.contact_id for m in self.messages_of(broadcast)})

    def test_two_contacts_with_one_address_get_one_message(self) -> None:
        twin = factories.contact(email="ADA@example.com", plan="pro")
        broadcast = self.started(PRO)

        broadcasts_sweep(batch_size=1)  # the twin is in another batch than Ada

        self.assertEqual([m.contact for m in self.messages_of(broadcast)], [self.ada, self.cy])
        broadcast.refresh_from_db()
        self.assertEqual((broadcast.audience_size, broadcast.recipients), (3, 2))
        self.assertNotIn(twin.pk, {m.contact_id for m in self.messages_of(broadcast)})

    def test_one_message_per_mailbox_whichever_spelling_comes_first(self) -> None:
        # Each pair is one mailbox; the first of each pair has the lower id and is in
        # an earlier batch (batch_size=1) than the second.
        first = factories.contact(email="Bob@Example.com", plan="twins")
        factories.contact(email="bob@example.com", plan="twins")
        second = factories.contact(email="zed@example.com", plan="twins")
        factories.contact(email="ZED@Example.COM", plan="twins")
        broadcast = self.started({"field": "contact.plan", "op": "eq", "value": "twins"})

        broadcasts_sweep(batch_size=1)

        self.assertEqual([m.contact for m in self.messages_of(broadcast)], [first, second])
        broadcast.refresh_from_db()
        self.assertEqual((broadcast.audience_size, broadcast.recipients), (4, 2))

    def test_the_database_allows_one_message_per_address_per_broadcast(self) -> None:
        broadcast = self.started()
        other = self.started(name="other")
        factories.message(self.version, factories.contact(email="Bob@Example.com"), broadcast=broadcast)
        factories.message(self.version, self.bob, broadcast=other)  # another broadcast: fine
        factories.message(self.version, self.bob)  # automation mail: not concerned
        factories.message(self.version, self.bob)
        with self.assertRaises(IntegrityError), transaction.atomic():
            factories.message(self.version, self.bob, broadcast=broadcast)

    def test_a_contact_whose_region_may_not_be_processed_gets_no_message(self) -> None:
        Contact.objects.filter(pk=self.ada.pk).update(region="us")
        Contact.objects.filter(pk=self.cy.pk).update(region="eu")
        with override_settings(MAILAUTO={**settings.MAILAUTO, "ALLOWED_REGIONS": ["eu"]}):
            broadcast = self.started(PRO)
            broadcasts_sweep()
        self.assertEqual([m.contact for m in self.messages_of(broadcast)], [self.cy])

    def test_an_address_already_suppressed_gets_a_suppressed_message_saying_why(self) -> None:
        suppression_add(email="cy@example.com", reason=Suppression.Reason.COMPLAINT, source="test")
        broadcast = self.started(PRO)

        broadcasts_sweep()

        statuses = {m.to_email: (m.status, m.status_reason) for m in self.messages_of(broadcast)}
        self.assertEqual(statuses["ada@example.com"], (Message.Status.QUEUED, ""))
        self.assertEqual(statuses["cy@example.com"][0], Message.Status.SUPPRESSED)
        self.assertIn("complaint", statuses["cy@example.com"][1])

    def test_the_preview_counts_what_the_rule_selects(self) -> None:
        self.assertEqual(audience_preview(audience=PRO).matched, 2)
        self.assertEqual(audience_preview(audience={}).matched, 4)
        partial = audience_preview(audience=PRO, scan_limit=1)
        self.assertEqual((partial.matched, partial.scanned, partial.complete), (1, 1, False))


class ValidationTests(BroadcastTestCase):
    def test_a_bad_audience_rule_is_rejected_with_a_message_and_nothing_written(self) -> None:
        cases = {
            "audience: unknown operator 'matches'": {"field": "contact.plan", "op": "matches", "value": "x"},
            "audience.and[1].field: 'payload.plan': an audience can only use contact fields": {
                "and": [PRO, {"field": "payload.plan", "op": "eq", "value": "pro"}]
            },
            "audience.or[0]: 'in' needs a list value": {
                "or": [{"field": "contact.plan", "op": "in", "value": "pro"}]
            },
        }
        for expected, audience in cases.items():
            with self.subTest(expected=expected):
                with self.assertRaises(ValidationError) as raised:
                    broadcast_create(name="June", template=self.version.template, audience=audience)
                self.assertIn(expected, " ".join(raised.exception.message_dict["audience"]))
        self.assertFalse(Broadcast.objects.exists())

    def test_starting_without_a_published_version_is_refused(self) -> None:
        draft_only = EmailTemplate.objects.create(name="unfinished")
        broadcast = broadcast_create(name="June", template=draft_only)

        with self.assertRaisesMessage(ValidationError, "has no published version"):
            broadcast_send_now(broadcast=broadcast, actor="test")
        with self.assertRaisesMessage(ValidationError, "has no published version"):
            broadcast_schedule(broadcast=broadcast, at=timezone.now() + timedelta(hours=1), actor="test")

        broadcast.refresh_from_db()
        self.assertEqual((broadcast.status, broadcast.template_version), (Broadcast.Status.DRAFT, None))
        broadcasts_sweep()
        self.assertFalse(Message.objects.exists())

    def test_sending_pins_the_latest_published_version(self) -> None:
        newer = self.version.template.versions.create(
            number=2, status="published", published_at=timezone.now(), subject="v2", html="<p>2</p>"
        )
        self.version.template.versions.create(number=3, subject="draft", html="<p>3</p>")
        broadcast = self.started()
        self.assertEqual(broadcast.template_version, newer)
        broadcasts_sweep()
        self.assertEqual({m.template_version_id for m in self.messages_of(broadcast)}, {newer.pk})

    def test_a_started_broadcast_cannot_be_started_or_scheduled_again(self) -> None:
        broadcast = self.started()
        with self.assertRaisesMessage(ValidationError, "is sending: only a draft or scheduled"):
            broadcast_send_now(broadcast=broadcast, actor="test")
        with self.assertRaisesMessage(ValidationError, "is sending"):
            broadcast_schedule(broadcast=broadcast, at=timezone.now() + timedelta(hours=1), actor="test")

    def test_a_time_without_a_time_zone_is_refused_with_a_message(self) -> None:
        broadcast = factories.broadcast(self.version)
        with self.assertRaisesMessage(ValidationError, "time zone"):
            broadcast_schedule(broadcast=broadcast, at=datetime(2999, 6, 1, 9, 0), actor="test")
        broadcast.refresh_from_db()
        self.assertEqual(broadcast.status, Broadcast.Status.DRAFT)

    def test_a_template_that_uses_event_data_is_refused_at_start(self) -> None:
        version = factories.published_version(html="<p>Your plan: {{ payload.plan }}</p>")
        broadcast = factories.broadcast(version)
        for start in (
            lambda: broadcast_send_now(broadcast=broadcast, actor="test"),
            lambda: broadcast_schedule(
                broadcast=broadcast, at=timezone.now() + timedelta(hours=1), actor="test"
            ),
        ):
            with self.assertRaisesMessage(ValidationError, "payload.plan"):
                start()
        broadcast.refresh_from_db()
        self.assertEqual(broadcast.status, Broadcast.Status.DRAFT)

    def test_a_time_in_the_past_cannot_be_scheduled(self) -> None:
        broadcast = factories.broadcast(self.version)
        with self.assertRaisesMessage(ValidationError, "in the past"):
            broadcast_schedule(broadcast=broadcast, at=timezone.now() - timedelta(minutes=1), actor="test")


class MaterialisationTests(BroadcastTestCase):
    def test_running_twice_creates_no_duplicate(self) -> None:
        broadcast = self.started()
        broadcasts_sweep(batch_size=3)
        broadcasts_sweep(batch_size=3)

        self.assertIsNone(broadcast_materialise_batch(broadcast_id=broadcast.pk))
        self.assertEqual(len(self.messages_of(broadcast)), 4)

    def test_batches_advance_a_cursor_committed_with_their_messages(self) -> None:
        broadcast = self.started()

        first = broadcast_materialise_batch(broadcast_id=broadcast.pk, size=3)

        self.assertEqual((first.considered, first.created, first.done), (3, 3, False))
        broadcast.refresh_from_db()
        self.assertEqual(broadcast.cursor, self.cy.pk)
        self.assertEqual(len(self.messages_of(broadcast)), 3)
        last = broadcast_materialise_batch(broadcast_id=broadcast.pk, size=3)
        self.assertEqual((last.considered, last.created, last.done), (1, 1, True))

    def test_a_worker_killed_mid_batch_leaves_nothing_and_the_next_run_redoes_it_once(self) -> None:
        broadcast = self.started()
        broadcast_materialise_batch(broadcast_id=broadcast.pk, size=2)

        # Killed after the INSERT, before the cursor moved: the batch's transaction rolls back.
        killed = mock.patch(
            "campaigns.delivery.nudge_send_workers", side_effect=RuntimeError("worker killed")
        )
        with killed, self.assertRaises(RuntimeError):
            broadcast_materialise_batch(broadcast_id=broadcast.pk, size=2)
        self.assertEqual(len(self.messages_of(broadcast)), 2)
        broadcast.refresh_from_db()
        self.assertEqual(broadcast.cursor, self.bob.pk)

        broadcasts_sweep(batch_size=2)

        messages = self.messages_of(broadcast)
        self.assertEqual([m.contact for m in messages], [self.ada, self.bob, self.cy, self.dee])
        broadcast.refresh_from_db()
        self.assertEqual((broadcast.audience_size, broadcast.recipients), (4, 4))

    def test_materialising_a_range_again_hits_the_idempotency_key_not_a_duplicate(self) -> None:
        broadcast = self.started()
        broadcasts_sweep()
        ids = {m.pk for m in self.messages_of(broadcast)}
        # A lost cursor, and the address check out of the way: only ON CONFLICT is left.
        Broadcast.objects.filter(pk=broadcast.pk).update(cursor=0, audience_done_at=None)
        with mock.patch.object(
            materialise, "broadcast_new_recipients", side_effect=lambda *, broadcast, matched: matched
        ):
            broadcasts_sweep()
        self.assertEqual({m.pk for m in self.messages_of(broadcast)}, ids)

    def test_queued_messages_nudge_the_send_workers_after_commit(self) -> None:
        broadcast = self.started()
        nudge = mock.patch.object(tasks.messages_send, "apply_async")
        with nudge as apply_async, self.captureOnCommitCallbacks(execute=True):
            broadcast_materialise_batch(broadcast_id=broadcast.pk)
        apply_async.assert_called_once_with(retry=False)

    def test_a_broadcast_is_sent_once_its_audience_is_done_and_its_messages_are_final(self) -> None:
        broadcast = self.started(PRO)
        broadcasts_sweep()
        broadcast.refresh_from_db()
        self.assertEqual(broadcast.status, Broadcast.Status.SENDING)

        Message.objects.filter(broadcast=broadcast, contact=self.ada).update(status=Message.Status.DELIVERED)
        Message.objects.filter(broadcast=broadcast, contact=self.cy).update(status=Message.Status.UNKNOWN)
        broadcasts_sweep()
        broadcast.refresh_from_db()
        self.assertEqual(broadcast.status, Broadcast.Status.SENDING)  # an outcome is still unknown

        Message.objects.filter(broadcast=broadcast, contact=self.cy).update(status=Message.Status.BOUNCED)
        broadcasts_sweep()
        broadcast.refresh_from_db()
        self.assertEqual(broadcast.status, Broadcast.Status.SENT)
        self.assertIsNotNone(broadcast.finished_at)
        self.assertEqual(broadcast.stats, {"delivered": 1, "bounced": 1})

    def test_a_broadcast_with_nobody_in_its_audience_is_sent(self) -> None:
        broadcast = self.started({"field": "contact.plan", "op": "eq", "value": "enterprise"})
        broadcasts_sweep()
        broadcast.refresh_from_db()
        self.assertEqual((broadcast.status, broadcast.recipients), (Broadcast.Status.SENT, 0))


class ConcurrentMaterialiseTests(TransactionTestCase):
    """Real row locks: a second database connection, in a thread, is the other worker."""

    def setUp(self) -> None:
        for task in (tasks.sweep_broadcasts, tasks.messages_send):
            patcher = mock.patch.object(task, "apply_async")
            patcher.start()
            self.addCleanup(patcher.stop)

    def test_another_worker_holding_the_broadcast_is_skipped(self) -> None:
        version = factories.published_version(html="<p>June news</p>")
        for n in range(3):
            factories.contact(email=f"p{n}@example.com")
        broadcast = broadcast_send_now(broadcast=factories.broadcast(version), actor="test")
        locked, release = threading.Event(), threading.Event()

        def other_worker() -> None:
            try:
                with transaction.atomic():
                    Broadcast.objects.select_for_update().get(pk=broadcast.pk)
                    locked.set()
                    release.wait(timeout=30)
            finally:
                connections["default"].close()

        worker = threading.Thread(target=other_worker)
        worker.start()
        try:
            self.assertTrue(locked.wait(timeout=10))
            # Without SKIP LOCKED this would wait for the other worker: fail fast instead.
            with connection.cursor() as cursor:
                cursor.execute("SET lock_timeout = '2s'")
            try:
                self.assertIsNone(broadcast_materialise_batch(broadcast_id=broadcast.pk))
                self.assertEqual(broadcasts_sweep().messages, 0)
            finally:
                with connection.cursor() as cursor:
                    cursor.execute("RESET lock_timeout")
            self.assertFalse(Message.objects.exists())
        finally:
            release.set()
            worker.join()

        self.assertEqual(broadcasts_sweep().messages, 3)  # the lock is gone: this worker's turn


class ScheduleTests(BroadcastTestCase):
    def test_a_scheduled_broadcast_starts_when_due_and_not_before(self) -> None:
        broadcast = factories.broadcast(self.version, audience=PRO)
        with time_machine.travel(NOW, tick=False):
            broadcast_schedule(broadcast=broadcast, at=NOW + timedelta(hours=1), actor="test")
            self.assertEqual(broadcasts_sweep().started, [])
        broadcast.refresh_from_db()
        self.assertEqual(broadcast.status, Broadcast.Status.SCHEDULED)
        self.assertFalse(Message.objects.exists())

        with time_machine.travel(NOW + timedelta(hours=1), tick=False):
            self.assertEqual(broadcasts_sweep().started, [broadcast.pk])
        broadcast.refresh_from_db()
        self.assertEqual(
            (broadcast.status, broadcast.started_at), (Broadcast.Status.SENDING, NOW + timedelta(hours=1))
        )
        self.assertEqual(len(self.messages_of(broadcast)), 2)

    def test_a_scheduled_broadcast_that_cannot_start_goes_back_to_draft_saying_why(self) -> None:
        broadcast = factories.broadcast(self.version)
        broadcast_schedule(broadcast=broadcast, at=timezone.now() + timedelta(seconds=1), actor="test")
        Broadcast.objects.filter(pk=broadcast.pk).update(
            template=EmailTemplate.objects.create(name="empty"), scheduled_at=timezone.now()
        )
        broadcasts_sweep()
        broadcast.refresh_from_db()
        self.assertEqual(broadcast.status, Broadcast.Status.DRAFT)
        self.assertIn("not started at its scheduled time", broadcast.start_error)
        self.assertIn("no published version", broadcast.start_error)
        self.assertEqual((broadcast.paused_by, broadcast.paused_reason, broadcast.paused_at), ("", "", None))

    def test_a_broadcast_started_after_the_scheduler_refused_it_shows_no_stale_reason(self) -> None:
        broadcast = factories.broadcast(self.version)
        broadcast_schedule(broadcast=broadcast, at=timezone.now() + timedelta(seconds=1), actor="test")
        Broadcast.objects.filter(pk=broadcast.pk).update(
            template=EmailTemplate.objects.create(name="empty"), scheduled_at=timezone.now()
        )
        broadcasts_sweep()
        Broadcast.objects.filter(pk=broadcast.pk).update(template=self.version.template)  # fixed

        broadcast = broadcast_send_now(broadcast=Broadcast.objects.get(pk=broadcast.pk), actor="test")

        broadcast.refresh_from_db()
        self.assertEqual(broadcast.status, Broadcast.Status.SENDING)
        self.assertEqual((broadcast.paused_by, broadcast.paused_reason, broadcast.paused_at), ("", "", None))
        self.assertEqual(getattr(broadcast, "start_error", ""), "")


class PauseResumeCancelTests(BroadcastTestCase):
    def test_a_paused_broadcasts_messages_are_not_claimed_and_resume_sends_them(self) -> None:
        broadcast = self.started(PRO)
        broadcasts_sweep()

        broadcast_pause(broadcast=broadcast, actor="admin:root", reason="wrong link in the footer")

        self.assertEqual(messages_claim(limit=10), [])
        self.assertFalse(Message.objects.filter(claimable_messages_q(timezone.now())).exists())
        broadcast.refresh_from_db()
        self.assertEqual(
            (broadcast.status, broadcast.paused_by, broadcast.paused_reason),
            (Broadcast.Status.PAUSED, "admin:root", "wrong link in the footer"),
        )

        nudge = mock.patch.object(tasks.messages_send, "apply_async")
        with nudge as send_nudge, self.captureOnCommitCallbacks(execute=True):
            broadcast_resume(broadcast=broadcast, actor="admin:root")
        send_nudge.assert_called_once_with(retry=False)

        claimed = messages_claim(limit=10)
        self.assertEqual({m.contact_id for m in claimed}, {self.ada.pk, self.cy.pk})
        broadcast.refresh_from_db()
        self.assertEqual((broadcast.status, broadcast.paused_reason), (Broadcast.Status.SENDING, ""))

    def test_a_broadcast_paused_before_its_audience_is_done_continues_on_resume(self) -> None:
        broadcast = self.started()
        broadcast_materialise_batch(broadcast_id=broadcast.pk, size=2)
        broadcast_pause(broadcast=broadcast, actor="admin:root", reason="check")

        broadcasts_sweep(batch_size=2)
        self.assertEqual(len(self.messages_of(broadcast)), 2)  # nothing materialised while paused

        broadcast_resume(broadcast=broadcast, actor="admin:root")
        broadcasts_sweep(batch_size=2)
        self.assertEqual(len(self.messages_of(broadcast)), 4)

    def test_only_a_sending_broadcast_can_be_paused_and_only_a_paused_one_resumed(self) -> None:
        draft = factories.broadcast(self.version)
        with self.assertRaisesMessage(ValidationError, "is draft: only a sending broadcast can be paused"):
            broadcast_pause(broadcast=draft, actor="test", reason="x")
        with self.assertRaisesMessage(ValidationError, "only a paused broadcast can be resumed"):
            broadcast_resume(broadcast=draft, actor="test")
        with self.assertRaisesMessage(ValidationError, "needs a reason"):
            broadcast_pause(broadcast=self.started(), actor="test", reason=" ")

    def test_cancel_makes_queued_messages_final_and_leaves_a_claimed_batch_to_its_worker(self) -> None:
        broadcast = self.started()
        broadcasts_sweep()
        in_worker = Message.objects.get(broadcast=broadcast, contact=self.bob)
        Message.objects.filter(pk=in_worker.pk).update(
            status=Message.Status.CLAIMED, locked_until=timezone.now() + timedelta(minutes=5)
        )
        Message.objects.filter(broadcast=broadcast, contact=self.dee).update(status=Message.Status.SENT)

        cancelled = broadcast_cancel(broadcast=broadcast, actor="admin:root", reason="sent by mistake")

        self.assertEqual(cancelled, 2)
        statuses = {m.contact_id: (m.status, m.status_reason) for m in self.messages_of(broadcast)}
        self.assertEqual(statuses[self.ada.pk], (Message.Status.CANCELLED, "broadcast cancelled"))
        self.assertEqual(statuses[self.cy.pk], (Message.Status.CANCELLED, "broadcast cancelled"))
        self.assertEqual(statuses[self.bob.pk][0], Message.Status.CLAIMED)
        self.assertEqual(statuses[self.dee.pk][0], Message.Status.SENT)
        broadcast.refresh_from_db()
        self.assertEqual(broadcast.status, Broadcast.Status.CANCELLED)
        self.assertEqual(broadcast.cancelled_reason, "sent by mistake (admin:root)")
        self.assertIsNotNone(broadcast.finished_at)

        # The worker gives its message back to the queue (e.g. no rate-limit token): the
        # sweeper cancels it instead of leaving it queued forever.
        Message.objects.filter(pk=in_worker.pk).update(status=Message.Status.QUEUED, locked_until=None)
        self.assertEqual(broadcasts_sweep().cancelled_messages, 1)
        self.assertEqual(Message.objects.get(pk=in_worker.pk).status, Message.Status.CANCELLED)

        with self.assertRaisesMessage(ValidationError, "is cancelled"):
            broadcast_cancel(broadcast=broadcast, actor="admin:root", reason="again")
        with self.assertRaisesMessage(ValidationError, "is cancelled"):
            broadcast_resume(broadcast=broadcast, actor="admin:root")

    def test_a_cancelled_broadcast_is_not_materialised(self) -> None:
        broadcast = self.started()
        broadcast_cancel(broadcast=broadcast, actor="test", reason="no")
        broadcasts_sweep()
        self.assertFalse(Message.objects.exists())


class SweepIsolationTests(BroadcastTestCase):
    def test_one_broadcast_failing_does_not_stop_the_others_or_the_rest_of_the_sweep(self) -> None:
        broken = self.started(name="broken")
        healthy = self.started(PRO, name="healthy")
        finished = self.started({"field": "contact.plan", "op": "eq", "value": "enterprise"}, name="empty")
        real_bulk_create = Message.objects.bulk_create

        def bulk_create(objs: list[Message], *args: Any, **kwargs: Any) -> Any:
            if objs and objs[0].broadcast_id == broken.pk:
                raise RuntimeError("disk full")
            return real_bulk_create(objs, *args, **kwargs)

        with (
            mock.patch.object(Message.objects, "bulk_create", side_effect=bulk_create),
            self.assertLogs("campaigns.broadcasts", "ERROR") as logs,
        ):
            result = broadcasts_sweep()

        self.assertIn("disk full", "\n".join(logs.output))
        self.assertEqual(self.messages_of(broken), [])
        self.assertEqual(len(self.messages_of(healthy)), 2)
        self.assertEqual((result.failed, result.finished), ([broken.pk], 1))
        finished.refresh_from_db()
        self.assertEqual(finished.status, Broadcast.Status.SENT)
        broken.refresh_from_db()
        self.assertEqual((broken.status, broken.cursor), (Broadcast.Status.SENDING, 0))
        broadcasts_sweep()  # once the fault is gone the broadcast carries on
        self.assertEqual(len(self.messages_of(broken)), 4)


class TaskTests(BroadcastTestCase):
    def test_starting_nudges_the_sweeper_after_commit(self) -> None:
        broadcast = factories.broadcast(self.version)
        with mock.patch.object(tasks.sweep_broadcasts, "apply_async") as apply_async:
            with self.captureOnCommitCallbacks() as callbacks:
                broadcast_send_now(broadcast=broadcast, actor="test")
            self.assertFalse(apply_async.called)
            for callback in callbacks:
                callback()
        apply_async.assert_called_once_with(retry=False)

    def test_the_task_sweeps_and_continues_in_a_fresh_task_when_out_of_time(self) -> None:
        broadcast = self.started()
        with mock.patch.object(tasks.sweep_broadcasts, "apply_async") as again:
            self.assertEqual(tasks.sweep_broadcasts(), 4)
            self.assertFalse(again.called)
            Broadcast.objects.filter(pk=broadcast.pk).update(audience_done_at=None, cursor=0)
            with mock.patch.object(tasks, "TASK_TIME_BUDGET_SECONDS", 0.0):
                tasks.sweep_broadcasts()
            again.assert_called_once_with()

    def test_a_broadcast_started_during_a_sweep_gets_a_fresh_sweep(self) -> None:
        # Its start's nudge found the running sweep's marker set and published nothing.
        late = factories.broadcast(self.version)
        real_sweep = broadcasts_sweep

        def sweep_while_a_start_commits(**kwargs: Any) -> Any:
            result = real_sweep(**kwargs)
            broadcast_send_now(broadcast=late, actor="test")
            return result

        with (
            mock.patch("campaigns.broadcasts.broadcasts_sweep", side_effect=sweep_while_a_start_commits),
            mock.patch.object(tasks.sweep_broadcasts, "apply_async") as apply_async,
        ):
            tasks.sweep_broadcasts()
        apply_async.assert_called_once_with(retry=False)

    def test_beat_runs_the_sweeper_on_the_housekeeping_queue(self) -> None:
        entry = settings.CELERY_BEAT_SCHEDULE["sweep-broadcasts"]
        self.assertEqual(entry["task"], "campaigns.tasks.sweep_broadcasts")
        route = celery_app.amqp.router.route({}, "campaigns.tasks.sweep_broadcasts")
        self.assertEqual(route["queue"].name, "housekeeping")


class SandboxSendTests(BroadcastTestCase):
    """A broadcast sent through the delivery engine to the real local ESP sandbox."""

    def setUp(self) -> None:
        super().setUp()
        self.sandbox = use_sandbox(self)

    def test_each_contact_gets_exactly_one_email(self) -> None:
        factories.contact(email="Cy@example.com", first_name="Twin", plan="pro")  # Cy's mailbox again
        erased = factories.contact(email="gone@erased.invalid", plan="pro")
        Contact.objects.filter(pk=erased.pk).update(erased_at=timezone.now())
        broadcast = self.started(PRO)

        broadcasts_sweep(batch_size=1)
        first = messages_send_batch()
        second = messages_send_batch()
        broadcasts_sweep()  # the same audience again: nothing new
        third = messages_send_batch()

        self.assertEqual((first.sent, second.claimed, third.claimed), (2, 0, 0))
        accepted = self.sandbox.messages()
        self.assertEqual(sorted(a["to"][0] for a in accepted), ["ada@example.com", "cy@example.com"])
        self.assertEqual(sorted(a["subject"] for a in accepted), ["News for Ada", "News for Cy"])
        for item in accepted:
            self.assertIn("List-Unsubscribe", item["headers"])
        messages = self.messages_of(broadcast)
        self.assertEqual({m.status for m in messages}, {Message.Status.SENT})
        self.assertEqual({m.esp_message_id for m in messages}, {a["message_id"] for a in accepted})

        broadcasts_sweep()
        broadcast.refresh_from_db()
        self.assertEqual(broadcast.status, Broadcast.Status.SENT)

    def test_consent_and_suppression_are_decided_again_at_send_time(self) -> None:
        eve = factories.contact(email="eve@example.com", plan="pro")
        fay = factories.contact(email="fay@example.com", plan="pro")
        for contact in (self.ada, self.cy, eve, fay):
            consent_grant(contact=contact, purpose="marketing", source="test")
        with override_settings(MAILAUTO={**settings.MAILAUTO, "CONSENT_CHECK": True}):
            broadcast = self.started(PRO)
            broadcasts_sweep()
            self.assertEqual(
                set(Message.objects.filter(broadcast=broadcast).values_list("status", flat=True)),
                {Message.Status.QUEUED},
            )
            # After the messages were made: a global unsubscribe, an unsubscribe from
            # this broadcast's topic only, and a withdrawn consent.
            suppression_add(email="ada@example.com", reason=Suppression.Reason.UNSUBSCRIBE, source="test")
            suppression_add(
                email="cy@example.com",
                reason=Suppression.Reason.UNSUBSCRIBE,
                source="test",
                topic="marketing",
            )
            consent_withdraw(contact=eve, purpose="marketing", source="test")

            result = messages_send_batch()

        self.assertEqual((result.sent, result.suppressed), (1, 3))
        statuses = {m.contact_id: (m.status, m.status_reason) for m in self.messages_of(broadcast)}
        self.assertEqual(statuses[self.ada.pk][0], Message.Status.SUPPRESSED)
        self.assertEqual(statuses[self.cy.pk][0], Message.Status.SUPPRESSED)
        self.assertIn("marketing", statuses[self.cy.pk][1])
        self.assertEqual(statuses[eve.pk][0], Message.Status.SUPPRESSED)
        self.assertIn("consent", statuses[eve.pk][1])
        self.assertEqual(statuses[fay.pk][0], Message.Status.SENT)
        self.assertEqual([a["to"] for a in self.sandbox.messages()], [["fay@example.com"]])

    def test_a_message_replayed_after_the_broadcast_is_sent_goes_out(self) -> None:
        broadcast = self.started(PRO)
        broadcasts_sweep()
        ada = Message.objects.get(broadcast=broadcast, contact=self.ada)
        Message.objects.filter(pk=ada.pk).update(
            status=Message.Status.DEAD, status_reason="retries exhausted"
        )
        self.assertEqual(messages_send_batch().sent, 1)  # Cy's
        broadcasts_sweep()
        broadcast.refresh_from_db()
        self.assertEqual(broadcast.status, Broadcast.Status.SENT)

        self.assertEqual(messages_replay(message_ids=[ada.pk]).replayed, 1)
        result = messages_send_batch()

        self.assertEqual((result.claimed, result.sent), (1, 1))
        ada.refresh_from_db()
        self.assertEqual(ada.status, Message.Status.SENT)
        self.assertEqual(
            sorted(a["to"][0] for a in self.sandbox.messages()), ["ada@example.com", "cy@example.com"]
        )
        broadcasts_sweep()
        broadcast.refresh_from_db()
        self.assertEqual(broadcast.status, Broadcast.Status.SENT)

    def pause_during_render(self, broadcast: Broadcast, action: Callable[[], object]) -> None:
        """Run messages_send_batch, with `action` (a pause or a cancel) happening after the
        batch is claimed and before it is handed off."""
        from campaigns import delivery

        real_render = delivery.message_render
        done: list[bool] = []

        def render_then_act(**kw: Any) -> Any:
            if not done:
                done.append(True)
                action()
            return real_render(**kw)

        with (
            mock.patch("campaigns.delivery.message_render", side_effect=render_then_act),
            CaptureQueriesContext(connection) as queries,
        ):
            result = messages_send_batch()
        self.assertEqual((result.claimed, result.sent), (2, 0))
        # Giving the batch back reads the claim's lease from memory, not a query per
        # message (locked_until is deferred by messages_claim).
        lazy = [
            q["sql"]
            for q in queries.captured_queries
            if q["sql"].startswith('SELECT "campaigns_message"."id", "campaigns_message"."locked_until"')
        ]
        self.assertEqual(lazy, [])

    def test_a_broadcast_paused_before_the_hand_off_sends_nothing_and_resume_sends_it(self) -> None:
        broadcast = self.started(PRO)
        broadcasts_sweep()

        self.pause_during_render(
            broadcast, lambda: broadcast_pause(broadcast=broadcast, actor="admin:root", reason="stop")
        )

        self.assertEqual(self.sandbox.messages(), [])
        for message in self.messages_of(broadcast):
            self.assertEqual(
                (message.status, message.attempts, message.locked_until), (Message.Status.QUEUED, 0, None)
            )
        self.assertEqual(messages_send_batch().claimed, 0)

        broadcast_resume(broadcast=broadcast, actor="admin:root")
        self.assertEqual(messages_send_batch().sent, 2)
        self.assertEqual(len(self.sandbox.messages()), 2)

    def test_a_broadcast_cancelled_before_the_hand_off_sends_nothing(self) -> None:
        broadcast = self.started(PRO)
        broadcasts_sweep()

        self.pause_during_render(
            broadcast, lambda: broadcast_cancel(broadcast=broadcast, actor="admin:root", reason="wrong list")
        )

        self.assertEqual(self.sandbox.messages(), [])
        broadcasts_sweep()
        self.assertEqual({m.status for m in self.messages_of(broadcast)}, {Message.Status.CANCELLED})
        self.assertEqual(messages_send_batch().claimed, 0)
        self.assertEqual(self.sandbox.messages(), [])

    def test_a_dead_workers_claimed_mail_of_a_paused_broadcast_waits_for_resume(self) -> None:
        broadcast = self.started(PRO)
        broadcasts_sweep()
        # A worker claimed the batch and died before the hand-off; then a pause.
        Message.objects.filter(broadcast=broadcast).update(
            status=Message.Status.CLAIMED, locked_until=timezone.now() - timedelta(seconds=1), claims=1
        )
        broadcast_pause(broadcast=broadcast, actor="admin:root", reason="stop")

        self.assertEqual(messages_send_batch().claimed, 0)
        self.assertEqual(self.sandbox.messages(), [])

        broadcast_resume(broadcast=broadcast, actor="admin:root")
        self.assertEqual(messages_send_batch().sent, 2)


# --- the admin ---------------------------------------------------------------------------------


def changelist() -> str:
    return reverse("admin:campaigns_broadcast_changelist")


def change(broadcast: Broadcast) -> str:
    return reverse("admin:campaigns_broadcast_change", args=[broadcast.pk])


class BroadcastAdminTests(BroadcastTestCase):
    @classmethod
    def setUpTestData(cls) -> None:
        super().setUpTestData()
        cls.admin_user = get_user_model().objects.create_superuser("root", "root@example.com", "pw")

    def setUp(self) -> None:
        super().setUp()
        self.client.force_login(self.admin_user)

    def notes(self, response: object) -> list[str]:
        return [str(m) for m in get_messages(response.wsgi_request)]  # type: ignore[attr-defined]

    def act(self, action: str, *selected: Broadcast, confirm: bool = True, **fields: str) -> object:
        data = {"action": action, "_selected_action": [b.pk for b in selected], "index": 0, **fields}
        if confirm:
            data["post"] = "yes"
        return self.client.post(changelist(), data)

    def test_changelist_shows_status_audience_progress_rates_and_why(self) -> None:
        broadcast = self.started(name="June news")
        broadcasts_sweep()
        sent = Message.objects.filter(broadcast=broadcast)
        sent.filter(contact=self.ada).update(status=Message.Status.COMPLAINED, sent_at=timezone.now())
        # The guard counts the complaint the ESP reported, not the status it left.
        TrackingEvent.objects.create(
            esp="postmark",
            esp_event_id="complaint-ada",
            event_type=TrackingEvent.EventType.COMPLAINED,
            message=sent.get(contact=self.ada),
            occurred_at=timezone.now(),
        )
        sent.filter(contact=self.cy).update(status=Message.Status.DELIVERED, sent_at=timezone.now())
        Broadcast.objects.filter(pk=broadcast.pk).update(stats_updated_at=None)
        broadcasts_sweep()
        from suppression.reputation import reputation_check

        with override_settings(MAILAUTO={**settings.MAILAUTO, "REPUTATION_MIN_VOLUME": 1}):
            reputation_check()

        response = self.client.get(changelist())

        self.assertContains(response, "June news")
        self.assertContains(response, "4 contacts, 4 messages")
        self.assertContains(response, "queued 2 · delivered 1 · complained 1")
        self.assertContains(response, "50.00%")  # complaint rate
        self.assertContains(response, "reputation guard: complaint rate 50.00% over the last 24 h exceeds")
        self.assertContains(response, "paused")

    def test_changelist_says_what_and_to_whom(self) -> None:
        long_rule = {"or": [{"field": f"contact.tag_{n}", "op": "eq", "value": "x" * 20} for n in range(10)]}
        self.started(PRO, name="June news", purpose="product-news")
        factories.broadcast(self.version, name="Everyone", audience={})
        factories.broadcast(self.version, name="Long", audience=long_rule)

        response = self.client.get(changelist())

        self.assertContains(response, '<td class="field-template nowrap">newsletter</td>', count=3)
        self.assertContains(response, '<td class="field-purpose">product-news</td>')
        self.assertContains(response, "contact.plan = &quot;pro&quot;</td>")
        self.assertContains(response, "every contact</td>")
        self.assertContains(response, "contact.tag_0 = &quot;xxxxxxxxxxxxxxxxxxxx&quot; or")
        self.assertNotContains(response, "contact.tag_9")  # shortened

    def test_changelist_queries_do_not_grow_with_rows(self) -> None:
        self.started(PRO)

        def count() -> int:
            with CaptureQueriesContext(connection) as queries:
                self.assertEqual(self.client.get(changelist()).status_code, 200)
            return len(queries)

        one = count()
        for n in range(10):
            self.started(PRO, name=f"b{n}")
        self.assertEqual(count(), one)

    def test_the_change_page_of_a_draft_previews_its_audience(self) -> None:
        draft = factories.broadcast(self.version, audience=PRO)
        response = self.client.get(change(draft))
        self.assertContains(response, "2 contacts match now")
        self.assertContains(response, "contact.plan = &quot;pro&quot;")

    def test_the_draft_preview_reads_a_bounded_number_of_contacts(self) -> None:
        draft = factories.broadcast(self.version, audience=PRO)
        with CaptureQueriesContext(connection) as queries:
            response = self.client.get(change(draft))
        self.assertContains(response, "2 contacts match now")
        scans = [q["sql"] for q in queries.captured_queries if '"campaigns_contact"."attributes"' in q["sql"]]
        self.assertEqual(len(scans), 1)
        self.assertIn("LIMIT 10001", scans[0])

    def test_a_preview_beyond_the_cap_is_a_lower_bound(self) -> None:
        draft = factories.broadcast(self.version, audience=PRO)
        from campaigns.admin import broadcasts as broadcasts_admin

        with mock.patch.object(broadcasts_admin, "AUDIENCE_PREVIEW_SCAN_LIMIT", 2):
            response = self.client.get(change(draft))
        self.assertContains(response, "At least 1 contacts match")

    def test_the_change_page_of_a_sending_broadcast_is_read_only_with_live_counts(self) -> None:
        broadcast = self.started(PRO)
        broadcasts_sweep()
        response = self.client.get(change(broadcast))
        self.assertContains(response, "queued</a></td><td>2</td>")
        self.assertContains(response, "Fixed when sending started")
        self.assertNotContains(response, 'name="_save"')
        link = f"{reverse('admin:campaigns_message_changelist')}?broadcast__id__exact={broadcast.pk}"
        self.assertEqual(self.client.get(link).status_code, 200)

    def test_adding_with_a_bad_audience_shows_the_error_and_writes_nothing(self) -> None:
        response = self.client.post(
            reverse("admin:campaigns_broadcast_add"),
            {
                "name": "June",
                "template": self.version.template.pk,
                "purpose": "marketing",
                "audience": '{"field": "payload.plan", "op": "eq", "value": "pro"}',
            },
        )
        self.assertEqual(response.status_code, 200)
        errors = " ".join(response.context["adminform"].form.errors["audience"])
        self.assertIn("audience.field: 'payload.plan': an audience can only use contact fields", errors)
        self.assertFalse(Broadcast.objects.exists())

    def test_adding_a_draft_records_who(self) -> None:
        response = self.client.post(
            reverse("admin:campaigns_broadcast_add"),
            {"name": "June", "template": self.version.template.pk, "purpose": "news", "audience": "{}"},
        )
        self.assertEqual(response.status_code, 302)
        broadcast = Broadcast.objects.get()
        self.assertEqual((broadcast.status, broadcast.created_by), (Broadcast.Status.DRAFT, "admin:root"))

    def test_send_now_asks_for_confirmation_then_starts(self) -> None:
        draft = factories.broadcast(self.version, name="June")
        unpublished = factories.broadcast(name="Not ready")
        unpublished.template.versions.update(status="draft", published_at=None)

        page = self.act("send_now", draft, confirm=False)
        self.assertContains(page, "Send broadcasts now")
        self.assertContains(page, 'value="Send now"')
        draft.refresh_from_db()
        self.assertEqual(draft.status, Broadcast.Status.DRAFT)

        sweeper = mock.patch.object(tasks.sweep_broadcasts, "apply_async")
        with sweeper as nudge, self.captureOnCommitCallbacks(execute=True):
            response = self.act("send_now", draft, unpublished)
        nudge.assert_called_once_with(retry=False)
        self.assertEqual(response.status_code, 302)
        draft.refresh_from_db()
        self.assertEqual(draft.status, Broadcast.Status.SENDING)
        notes = self.notes(response)
        self.assertIn("1 broadcast(s) started.", notes)
        self.assertTrue(any("Not ready" in n and "no published version" in n for n in notes))

    def test_an_action_that_changed_nothing_is_a_warning_not_a_success(self) -> None:
        unpublished = factories.broadcast(name="Not ready")
        unpublished.template.versions.update(status="draft", published_at=None)

        response = self.act("send_now", unpublished)

        levels = {str(m): m.level for m in get_messages(response.wsgi_request)}
        self.assertEqual(levels["0 broadcast(s) started."], admin_messages.WARNING)
        self.assertEqual(
            [level for note, level in levels.items() if "Not ready" in note], [admin_messages.ERROR]
        )

    def test_schedule_needs_a_time(self) -> None:
        draft = factories.broadcast(self.version)
        page = self.act("schedule", draft, scheduled_at="")
        self.assertContains(page, "Give the date and time to send at")

        response = self.act("schedule", draft, scheduled_at="2999-06-01T09:00")

        self.assertEqual(response.status_code, 302)
        draft.refresh_from_db()
        self.assertEqual(draft.status, Broadcast.Status.SCHEDULED)
        self.assertEqual(draft.scheduled_at, datetime(2999, 6, 1, 9, 0, tzinfo=UTC))

    def test_pause_needs_a_reason_and_records_who(self) -> None:
        broadcast = self.started()
        page = self.act("pause", broadcast)
        self.assertContains(page, "A reason is required.")

        response = self.act("pause", broadcast, reason="typo in subject")

        self.assertIn("1 broadcast(s) paused.", self.notes(response))
        broadcast.refresh_from_db()
        self.assertEqual(
            (broadcast.status, broadcast.paused_by, broadcast.paused_reason),
            (Broadcast.Status.PAUSED, "admin:root", "typo in subject"),
        )
        self.assertContains(self.client.get(change(broadcast)), "by admin:root at")

    def test_resume_and_cancel(self) -> None:
        broadcast = self.started()
        broadcasts_sweep()
        broadcast_pause(broadcast=broadcast, actor="admin:root", reason="check")

        self.assertIn("1 broadcast(s) resumed.", self.notes(self.act("resume", broadcast)))
        response = self.act("cancel", broadcast, reason="wrong audience")

        self.assertIn("1 broadcast(s) cancelled.", self.notes(response))
        broadcast.refresh_from_db()
        self.assertEqual(broadcast.status, Broadcast.Status.CANCELLED)
        self.assertEqual(
            set(Message.objects.filter(broadcast=broadcast).values_list("status", flat=True)),
            {Message.Status.CANCELLED},
        )

    def test_started_broadcasts_cannot_be_deleted(self) -> None:
        broadcast = self.started()
        self.assertEqual(
            self.client.get(reverse("admin:campaigns_broadcast_delete", args=[broadcast.pk])).status_code, 403
        )
        self.assertNotContains(self.client.get(changelist()), "delete_selected")
