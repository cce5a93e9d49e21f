"""The delivery engine, against the local ESP sandbox over real HTTP."""

from __future__ import annotations

import socket
from datetime import timedelta
from unittest import mock

import pytest
import requests
from anymail.exceptions import AnymailAPIError, AnymailRecipientsRefused
from django.db import connection
from django.test import TestCase, override_settings
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from campaigns.delivery import (
    ErrorKind,
    classify_send_error,
    messages_claim,
    messages_expire_leases,
    messages_replay,
    messages_resend_unknown,
    messages_send_batch,
)
from campaigns.models import Message
from mailauto.sandbox import SandboxServer
from suppression.models import Suppression
from suppression.services import suppression_add
from tests import factories
from tests.conftest import sandbox_anymail_settings


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class SandboxTestCase(TestCase):
    """Runs a real sandbox for each test and points Anymail's Postmark backend at it."""

    def setUp(self) -> None:
        self.sandbox = SandboxServer(port=0).start()
        self.addCleanup(self.sandbox.stop)
        override = override_settings(
            EMAIL_BACKEND="anymail.backends.postmark.EmailBackend",
            ANYMAIL=sandbox_anymail_settings(self.sandbox),
        )
        override.enable()
        self.addCleanup(override.disable)

    @classmethod
    def setUpTestData(cls) -> None:
        cls.type = factories.event_type()
        cls.contact = factories.contact(user_id="u-1", email="ada@example.com", first_name="Ada")
        cls.version = factories.published_version(
            subject="Hi {{ contact.first_name }}",
            html="<p>Plan: {{ payload.plan }}</p><p>Card: {{ payload.card_last4 }}</p>",
        )
        cls.event = factories.outbox_event(cls.type, "u-1", {"plan": "pro", "card_last4": "4242"})

    def queued(self, **kw: object) -> Message:
        return factories.message(self.version, self.contact, self.event, **kw)


class SendTests(SandboxTestCase):
    def test_queued_message_is_rendered_sent_and_recorded(self) -> None:
        message = self.queued()
        result = messages_send_batch()
        self.assertEqual(result.sent, 1)
        message.refresh_from_db()
        self.assertEqual(message.status, Message.Status.SENT)
        [accepted] = self.sandbox.messages()
        self.assertEqual(message.esp_message_id, accepted["message_id"])
        self.assertEqual(accepted["to"], ["ada@example.com"])
        self.assertEqual(accepted["subject"], "Hi Ada")
        self.assertIn("Plan: pro", accepted["html"])
        self.assertIn("Plan: pro", accepted["text"])
        self.assertEqual(accepted["metadata"], {"mailauto_message_id": str(message.pk)})
        self.assertEqual(message.subject, "Hi Ada")
        self.assertEqual(message.attempts, 1)

    def test_undeclared_sensitive_field_is_not_rendered(self) -> None:
        self.queued()
        messages_send_batch()
        [accepted] = self.sandbox.messages()
        self.assertNotIn("4242", accepted["html"])
        self.assertNotIn("4242", accepted["text"])

    def test_each_event_type_in_a_batch_withholds_its_own_sensitive_fields(self) -> None:
        # A batch remembers each event type's sensitive fields: per type, not per batch.
        open_type = factories.event_type(
            name="order.placed", schema={"fields": {"card_last4": {"type": "string"}}}
        )
        open_event = factories.outbox_event(open_type, "u-2", {"plan": "team", "card_last4": "1111"})
        bob = factories.contact(user_id="u-2", email="bob@example.com")
        self.queued()
        factories.message(self.version, bob, open_event)
        self.queued()

        self.assertEqual(messages_send_batch().sent, 3)

        html = sorted(accepted["html"] for accepted in self.sandbox.messages())
        self.assertIn("Plan: pro", html[0])
        self.assertIn("Plan: pro", html[1])
        self.assertIn("Plan: team", html[2])
        self.assertNotIn("4242", html[0] + html[1])
        self.assertIn("Card: 1111", html[2])

    def test_a_batch_is_sent_in_a_number_of_queries_that_does_not_grow_with_its_size(self) -> None:
        # Catches a per-message query, e.g. reading a column that messages_claim defers.
        def queries_to_send(count: int) -> int:
            for _ in range(count):
                self.queued()
            with CaptureQueriesContext(connection) as queries:
                self.assertEqual(messages_send_batch().sent, count)
            return len(queries.captured_queries)

        queries_to_send(1)  # warm the caches
        self.assertEqual(queries_to_send(1), queries_to_send(5))

    def test_declared_sensitive_field_is_rendered(self) -> None:
        version = factories.published_version(
            html="<p>Card {{ payload.card_last4 }}</p>", declared=["card_last4"]
        )
        factories.message(version, self.contact, self.event)
        messages_send_batch()
        self.assertIn("Card 4242", self.sandbox.messages()[0]["html"])

    def test_message_not_yet_due_is_not_sent(self) -> None:
        self.queued(send_after=timezone.now() + timedelta(hours=1))
        self.assertEqual(messages_send_batch().claimed, 0)
        self.assertEqual(self.sandbox.messages(), [])

    def test_suppression_recorded_before_hand_off_wins(self) -> None:
        message = self.queued()
        suppression_add(email="ada@example.com", reason=Suppression.Reason.HARD_BOUNCE, source="test")
        result = messages_send_batch()
        self.assertEqual(result.suppressed, 1)
        message.refresh_from_db()
        self.assertEqual(message.status, Message.Status.SUPPRESSED)
        self.assertIn("hard bounce", message.status_reason)
        self.assertEqual(self.sandbox.messages(), [])

    def test_suppression_recorded_after_claim_and_render_still_wins(self) -> None:
        """The hand-off UPDATE itself refuses a suppressed address (no check-then-act gap)."""
        message = self.queued()
        from campaigns import delivery

        real_render = delivery.message_render

        def render_then_suppress(**kw):  # type: ignore[no-untyped-def]
            rendered = real_render(**kw)
            suppression_add(email="ada@example.com", reason=Suppression.Reason.COMPLAINT, source="test")
            return rendered

        with mock.patch("campaigns.delivery.message_render", side_effect=render_then_suppress):
            result = messages_send_batch()
        self.assertEqual(result.suppressed, 1)
        message.refresh_from_db()
        self.assertEqual(message.status, Message.Status.SUPPRESSED)
        self.assertIn("spam complaint", message.status_reason)
        self.assertEqual(self.sandbox.messages(), [])

    def test_unsubscribe_does_not_stop_transactional_mail(self) -> None:
        suppression_add(email="ada@example.com", reason=Suppression.Reason.UNSUBSCRIBE, source="test")
        message = self.queued(transactional=True, purpose="receipts")
        messages_send_batch()
        message.refresh_from_db()
        self.assertEqual(message.status, Message.Status.SENT)

    def test_rate_limited_send_is_retried_later_honouring_retry_after(self) -> None:
        message = self.queued()
        self.sandbox.set_faults(fail_429=1, retry_after=120)
        result = messages_send_batch()
        self.assertEqual(result.retrying, 1)
        message.refresh_from_db()
        self.assertEqual(message.status, Message.Status.QUEUED)
        self.assertGreaterEqual(message.send_after, timezone.now() + timedelta(seconds=115))
        self.assertIn("429", message.last_error)
        self.assertEqual(len(message.error_history), 1)
        # The 429 paused the shared rate limit for every worker until Retry-After.
        from campaigns import throttle

        state = throttle.effective_rate()
        self.assertIsNotNone(state.paused_until)
        self.assertGreaterEqual(state.paused_until, timezone.now() + timedelta(seconds=100))
        self.assertLess(state.rate, state.ceiling)
        Message.objects.filter(pk=message.pk).update(send_after=timezone.now())
        result = messages_send_batch()
        self.assertEqual((result.throttled, result.requests), (1, 0))
        message.refresh_from_db()
        self.assertEqual(message.status, Message.Status.QUEUED)
        self.assertIn("waiting for the send rate limit", message.status_reason)
        self.assertEqual(message.attempts, 1)  # waiting for a token is not an attempt

        # Once the pause is over (forget the bucket's state) it goes out.
        import redis
        from django.conf import settings

        client = redis.Redis.from_url(settings.REDIS_URL)
        client.delete(*client.scan_iter("mailauto:throttle:*"))
        Message.objects.filter(pk=message.pk).update(send_after=timezone.now())
        messages_send_batch()
        message.refresh_from_db()
        self.assertEqual(message.status, Message.Status.SENT)
        self.assertEqual(message.attempts, 2)
        self.assertEqual(len(self.sandbox.messages()), 1)

    def test_server_errors_until_max_attempts_end_dead(self) -> None:
        message = self.queued()
        self.sandbox.set_faults(fail_500=10)
        with override_settings(MAILAUTO={**self.settings_mailauto(), "RETRY_MAX_ATTEMPTS": 3}):
            for _ in range(3):
                Message.objects.filter(pk=message.pk).update(send_after=timezone.now())
                messages_send_batch()
        message.refresh_from_db()
        self.assertEqual(message.status, Message.Status.DEAD)
        self.assertEqual(message.attempts, 3)
        self.assertEqual(len(message.error_history), 3)

    def settings_mailauto(self) -> dict:
        from django.conf import settings

        return dict(settings.MAILAUTO)

    def test_inactive_recipient_fails_permanently_and_is_suppressed(self) -> None:
        contact = factories.contact(email="inactive@example.com")
        message = factories.message(self.version, contact, self.event)
        result = messages_send_batch()
        self.assertEqual(result.failed, 1)
        message.refresh_from_db()
        self.assertEqual(message.status, Message.Status.FAILED)
        self.assertTrue(Suppression.objects.filter(email="inactive@example.com", reason="invalid").exists())

    def test_dropped_response_is_held_as_unknown_not_resent(self) -> None:
        message = self.queued()
        self.sandbox.set_faults(drop=1)
        result = messages_send_batch()
        self.assertEqual(result.unknown, 1)
        message.refresh_from_db()
        self.assertEqual(message.status, Message.Status.UNKNOWN)
        self.assertEqual(len(self.sandbox.messages()), 1)  # the ESP did take it
        self.assertEqual(messages_send_batch().claimed, 0)  # and we do not send it again

    def test_connection_refused_is_retryable(self) -> None:
        message = self.queued()
        dead_port = free_port()
        with override_settings(
            ANYMAIL={
                **sandbox_anymail_settings(self.sandbox),
                "POSTMARK_API_URL": f"http://127.0.0.1:{dead_port}/",
            }
        ):
            result = messages_send_batch()
        self.assertEqual(result.retrying, 1)
        message.refresh_from_db()
        self.assertEqual(message.status, Message.Status.QUEUED)
        self.assertIn("could not connect", message.status_reason)


class LeaseAndReplayTests(SandboxTestCase):
    def test_claimed_message_of_a_dead_worker_returns_to_the_queue(self) -> None:
        message = self.queued(
            status=Message.Status.CLAIMED, locked_until=timezone.now() - timedelta(seconds=1)
        )
        self.assertEqual([m.pk for m in messages_claim(limit=5)], [message.pk])

    def test_sending_message_of_a_dead_worker_becomes_unknown_then_is_resent_once(self) -> None:
        message = self.queued(
            status=Message.Status.SENDING, locked_until=timezone.now() - timedelta(seconds=1)
        )
        self.assertEqual(messages_expire_leases(), 1)
        message.refresh_from_db()
        self.assertEqual(message.status, Message.Status.UNKNOWN)
        self.assertEqual(messages_claim(limit=5), [])

        Message.objects.filter(pk=message.pk).update(updated_at=timezone.now() - timedelta(days=2))
        messages_resend_unknown()
        message.refresh_from_db()
        self.assertEqual(message.status, Message.Status.QUEUED)
        self.assertTrue(message.resent_after_unknown)

        Message.objects.filter(pk=message.pk).update(
            status=Message.Status.UNKNOWN, updated_at=timezone.now() - timedelta(days=2)
        )
        messages_resend_unknown()
        message.refresh_from_db()
        self.assertEqual(message.status, Message.Status.DEAD)

    def test_unknown_message_inside_the_grace_period_waits(self) -> None:
        message = self.queued(status=Message.Status.UNKNOWN)
        self.assertEqual(messages_resend_unknown(), 0)
        message.refresh_from_db()
        self.assertEqual(message.status, Message.Status.UNKNOWN)

    def test_replay_never_requeues_a_message_the_esp_accepted(self) -> None:
        dead = self.queued(status=Message.Status.DEAD)
        accepted = self.queued(status=Message.Status.DEAD, esp_message_id="abc")
        self.assertEqual(messages_replay(message_ids=[dead.pk, accepted.pk]), 1)
        dead.refresh_from_db()
        accepted.refresh_from_db()
        self.assertEqual(dead.status, Message.Status.QUEUED)
        self.assertEqual(accepted.status, Message.Status.DEAD)


def _api_error(status: int, headers: dict | None = None) -> AnymailAPIError:
    response = requests.Response()
    response.status_code = status
    response.headers.update(headers or {})
    return AnymailAPIError("x", status_code=status, response=response)


@pytest.mark.parametrize(
    ("exc", "kind"),
    [
        (_api_error(429), ErrorKind.RETRYABLE),
        (_api_error(500), ErrorKind.RETRYABLE),
        (_api_error(503), ErrorKind.RETRYABLE),
        (_api_error(401), ErrorKind.RETRYABLE),
        (_api_error(422), ErrorKind.PERMANENT),
        (_api_error(400), ErrorKind.PERMANENT),
        (AnymailRecipientsRefused(), ErrorKind.PERMANENT),
        (RuntimeError("bug after the request"), ErrorKind.AMBIGUOUS),
    ],
)
def test_error_table(exc: BaseException, kind: str) -> None:
    assert classify_send_error(exc).kind == kind


def test_retry_after_is_read_from_the_response() -> None:
    assert classify_send_error(_api_error(429, {"Retry-After": "30"})).retry_after == 30.0


def test_read_timeout_is_ambiguous() -> None:
    try:
        raise AnymailAPIError("post failed") from requests.ReadTimeout("read timed out")
    except AnymailAPIError as exc:
        assert classify_send_error(exc).kind == ErrorKind.AMBIGUOUS


class WarmupAndPriorityTests(SandboxTestCase):
    def test_over_todays_cap_waits_for_tomorrow_highest_priority_first(self) -> None:
        from campaigns.models import WarmupSchedule

        WarmupSchedule.objects.create(
            name="mailauto.test", start_date=timezone.now().date(), daily_caps=[2, None]
        )
        marketing = [
            factories.message(self.version, factories.contact(email=f"m{n}@example.com"), self.event)
            for n in range(2)
        ]
        receipt = factories.message(
            self.version,
            factories.contact(email="r@example.com"),
            self.event,
            priority=10,
            transactional=True,
        )
        result = messages_send_batch()
        self.assertEqual((result.sent, result.deferred), (2, 1))
        receipt.refresh_from_db()
        self.assertEqual(receipt.status, Message.Status.SENT)  # lowest number first
        waiting = [m for m in marketing if (m.refresh_from_db() or m.status == Message.Status.QUEUED)]
        self.assertEqual(len(waiting), 1)
        self.assertIn("warm-up cap", waiting[0].status_reason)
        tomorrow = (timezone.now() + timedelta(days=1)).date()
        self.assertEqual(waiting[0].send_after.date(), tomorrow)
        self.assertEqual(waiting[0].attempts, 0)
        self.assertEqual(len(self.sandbox.messages()), 2)

    def test_paused_automation_holds_its_queued_messages(self) -> None:
        automation = factories.automation(self.type, self.version, active=False)
        message = self.queued(automation=automation)
        self.assertEqual(messages_send_batch().claimed, 0)
        automation.active = True
        automation.save(update_fields=["active"])
        self.assertEqual(messages_send_batch().sent, 1)
        message.refresh_from_db()
        self.assertEqual(message.status, Message.Status.SENT)


class HandOffLeaseTests(SandboxTestCase):
    def test_the_hand_off_renews_the_lease(self) -> None:
        """A batch claimed long ago (rate-limit waits) must not have its in-flight
        messages expired into UNKNOWN by the sweeper."""
        from campaigns import delivery

        message = self.queued()
        real_render = delivery.message_render

        def slow_render(**kw):  # type: ignore[no-untyped-def]
            # The claim's lease has run out by the time this message is handed off.
            Message.objects.filter(pk=message.pk).update(locked_until=timezone.now() - timedelta(seconds=1))
            return real_render(**kw)

        seen = {}

        def check_lease(*args, **kwargs):  # type: ignore[no-untyped-def]
            seen["locked_until"] = Message.objects.get(pk=message.pk).locked_until
            return original_send(*args, **kwargs)

        from campaigns.esp_batch import PostmarkBatchSender

        original_send = PostmarkBatchSender.send
        with (
            mock.patch("campaigns.delivery.message_render", side_effect=slow_render),
            mock.patch.object(PostmarkBatchSender, "send", autospec=True, side_effect=check_lease),
        ):
            messages_send_batch()
        self.assertGreater(seen["locked_until"], timezone.now() + timedelta(seconds=60))


class PoisonMessageTests(SandboxTestCase):
    def test_a_message_whose_worker_keeps_dying_is_dead_lettered(self) -> None:
        from campaigns.delivery import _max_claims, messages_bury_poison

        expired = timezone.now() - timedelta(seconds=1)
        poison = self.queued(status=Message.Status.CLAIMED, locked_until=expired, claims=_max_claims())
        retry = self.queued(status=Message.Status.CLAIMED, locked_until=expired, claims=_max_claims() - 1)
        self.assertEqual([m.pk for m in messages_claim(limit=10)], [retry.pk])
        retry.refresh_from_db()
        self.assertEqual(retry.claims, _max_claims())
        self.assertEqual(messages_bury_poison(), 1)
        poison.refresh_from_db()
        self.assertEqual(poison.status, Message.Status.DEAD)
        self.assertIn("worker stopped", poison.status_reason)


def test_only_a_429_feeds_the_adaptive_rate() -> None:
    assert classify_send_error(_api_error(429)).rate_limited
    assert not classify_send_error(_api_error(503)).rate_limited


class PausedSourceClaimTests(SandboxTestCase):
    def test_a_dead_workers_claimed_mail_of_a_paused_automation_waits_until_it_is_active(self) -> None:
        automation = factories.automation(self.type, self.version, active=False)
        message = self.queued(
            automation=automation,
            status=Message.Status.CLAIMED,
            locked_until=timezone.now() - timedelta(seconds=1),
            claims=1,
        )
        self.assertEqual(messages_send_batch().claimed, 0)
        self.assertEqual(self.sandbox.messages(), [])

        automation.active = True
        automation.save(update_fields=["active"])
        self.assertEqual(messages_send_batch().sent, 1)
        message.refresh_from_db()
        self.assertEqual(message.status, Message.Status.SENT)
