"""The delivery engine, against the local ESP sandbox over real HTTP."""

from __future__ import annotations

import socket
from datetime import timedelta
from unittest import mock

import pytest
import requests
import time_machine
from anymail.exceptions import AnymailAPIError, AnymailRecipientsRefused
from django.conf import settings
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
from suppression.models import Suppression
from suppression.services import suppression_add
from tests import factories
from tests.conftest import sandbox_anymail_settings, use_sandbox


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class SandboxTestCase(TestCase):
    """Runs a real sandbox for each test and points Anymail's Postmark backend at it."""

    def setUp(self) -> None:
        self.sandbox = use_sandbox(self)

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
        self.assertEqual(message.attempts, 0)  # neither the 429 nor waiting for a token is an attempt
        self.assertEqual(message.claims, 1)  # nor a claim (only the first, handed off)

        # Once the pause is over (forget the bucket's state) it goes out.
        import redis

        client = redis.Redis.from_url(settings.REDIS_URL)
        client.delete(*client.scan_iter("mailauto:throttle:*"))
        Message.objects.filter(pk=message.pk).update(send_after=timezone.now())
        messages_send_batch()
        message.refresh_from_db()
        self.assertEqual(message.status, Message.Status.SENT)
        self.assertEqual(message.attempts, 1)  # the 429 was not an attempt
        self.assertEqual(len(self.sandbox.messages()), 1)

    def test_a_long_run_of_429s_never_buries_a_message(self) -> None:
        """A daily quota answers 429 for hours: every message waits, none goes dead."""
        import redis

        message = self.queued()
        self.sandbox.set_faults(fail_429=6, retry_after=1)
        client = redis.Redis.from_url(settings.REDIS_URL)
        with override_settings(MAILAUTO={**settings.MAILAUTO, "RETRY_MAX_ATTEMPTS": 2}):
            for _ in range(7):
                for key in client.scan_iter("mailauto:throttle:*"):  # the pause is over
                    client.delete(key)
                Message.objects.filter(pk=message.pk).update(send_after=timezone.now())
                messages_send_batch()
        message.refresh_from_db()
        self.assertEqual((message.status, message.attempts), (Message.Status.SENT, 1))
        self.assertEqual(len(self.sandbox.messages()), 1)
        self.assertEqual([e["status"] for e in message.error_history], [Message.Status.QUEUED] * 6)

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
        self.assertEqual(messages_replay(message_ids=[dead.pk, accepted.pk]).replayed, 1)
        dead.refresh_from_db()
        accepted.refresh_from_db()
        self.assertEqual(dead.status, Message.Status.QUEUED)
        self.assertEqual(accepted.status, Message.Status.DEAD)

    def test_a_replayed_poison_message_starts_afresh(self) -> None:
        buried = self.queued(
            status=Message.Status.DEAD,
            status_reason="its worker stopped while preparing it, every time",
            claims=20,
            attempts=3,
        )
        self.assertEqual(messages_replay(message_ids=[buried.pk]).replayed, 1)
        buried.refresh_from_db()
        self.assertEqual((buried.status, buried.claims, buried.attempts), (Message.Status.QUEUED, 0, 0))

    def test_replay_refuses_a_message_whose_lost_answer_was_followed_by_failed_retries(self) -> None:
        """The ESP took the first attempt (the answer was lost), the one resend after the
        grace period met 500s until dead: it has no ESP id, yet the recipient has it."""

        message = self.queued()
        self.sandbox.set_faults(drop=1)
        messages_send_batch()
        Message.objects.filter(pk=message.pk).update(updated_at=timezone.now() - timedelta(days=2))
        messages_resend_unknown()
        self.sandbox.set_faults(fail_500=10)

        with override_settings(MAILAUTO={**settings.MAILAUTO, "RETRY_MAX_ATTEMPTS": 2}):
            messages_send_batch()
        message.refresh_from_db()
        self.assertEqual((message.status, message.esp_message_id), (Message.Status.DEAD, ""))
        self.assertIn("retries exhausted", message.status_reason)
        clean = self.queued(status=Message.Status.DEAD, status_reason="retries exhausted: ESP answered 500")

        result = messages_replay(message_ids=[message.pk, clean.pk])

        self.assertEqual((result.replayed, result.refused_maybe_delivered), (1, [message.pk]))
        self.assertIn("1 message(s) queued for replay.", result.summary())
        self.assertIn(
            f"may have reached the ESP (outcome unknown), so a replay could send it twice: {message.pk}.",
            result.summary(),
        )
        message.refresh_from_db()
        clean.refresh_from_db()
        self.assertEqual((message.status, clean.status), (Message.Status.DEAD, Message.Status.QUEUED))
        self.assertEqual(len(self.sandbox.messages()), 1)  # the first attempt, never replayed

    def test_replay_refuses_every_record_of_an_ambiguous_attempt(self) -> None:
        ambiguous = [
            # Dead by the sweeper after the one resend stayed unknown too.
            self.queued(status=Message.Status.DEAD, status_reason="still unknown after one resend"),
            # Resent after an unknown outcome, then refused permanently.
            self.queued(
                status=Message.Status.FAILED, resent_after_unknown=True, status_reason="rejected (422)"
            ),
            # An ambiguous answer in its error history (replayed and failed since).
            self.queued(
                status=Message.Status.FAILED,
                status_reason="rejected by the ESP (422)",
                error_history=[{"status": "unknown", "error": "no answer from the ESP after sending"}],
            ),
        ]
        self.assertEqual(messages_replay(message_ids=[m.pk for m in ambiguous]).replayed, 0)
        for message in ambiguous:
            message.refresh_from_db()
            self.assertIn(message.status, (Message.Status.DEAD, Message.Status.FAILED))


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

    def test_transactional_mail_is_never_held_by_the_cap_but_counts_towards_it(self) -> None:
        from campaigns.models import WarmupDay, WarmupSchedule

        schedule = WarmupSchedule.objects.create(
            name="mailauto.test", start_date=timezone.now().date(), daily_caps=[1, None]
        )
        first = factories.message(self.version, factories.contact(email="m0@example.com"), self.event)
        self.assertEqual(messages_send_batch().sent, 1)  # today's cap of 1 is used up
        reset = factories.message(
            self.version,
            factories.contact(email="r@example.com"),
            self.event,
            priority=10,
            transactional=True,
        )
        later = factories.message(self.version, factories.contact(email="m1@example.com"), self.event)
        result = messages_send_batch()
        self.assertEqual((result.sent, result.deferred), (1, 1))
        for message, status in ((first, "sent"), (reset, "sent"), (later, "queued")):
            message.refresh_from_db()
            self.assertEqual(message.status, status)
        self.assertIn("warm-up cap", later.status_reason)
        self.assertEqual(WarmupDay.objects.get(schedule=schedule).sent, 1)  # never past the cap

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
        lease = timedelta(seconds=settings.MAILAUTO["SEND_LEASE_SECONDS"])
        # Claimed so long ago that the claim's lease has run out by the hand-off (and no
        # other worker took it over meanwhile: the row still holds this claim's lease).
        claimed_at = timezone.now() - lease - timedelta(seconds=1)
        Message.objects.filter(pk=message.pk).update(send_after=claimed_at - timedelta(seconds=1))
        with time_machine.travel(claimed_at):
            batch = delivery.messages_claim(limit=10)
        self.assertEqual([m.pk for m in batch], [message.pk])
        self.assertLess(Message.objects.get(pk=message.pk).locked_until, timezone.now())

        seen = {}

        def check_lease(*args, **kwargs):  # type: ignore[no-untyped-def]
            seen["locked_until"] = Message.objects.get(pk=message.pk).locked_until
            return original_send(*args, **kwargs)

        from campaigns.esp_batch import PostmarkBatchSender

        original_send = PostmarkBatchSender.send
        with (
            mock.patch.object(delivery, "messages_claim", return_value=batch),
            mock.patch.object(PostmarkBatchSender, "send", autospec=True, side_effect=check_lease),
        ):
            self.assertEqual(messages_send_batch().sent, 1)
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


class CrashPathHistoryTests(SandboxTestCase):
    """The sweeper's verdicts on abandoned messages are in the error history the admin
    shows, like an ESP error's."""

    def test_an_expired_sending_lease_then_a_second_unknown_are_in_the_history(self) -> None:
        message = self.queued(
            status=Message.Status.SENDING,
            locked_until=timezone.now() - timedelta(seconds=1),
            attempts=1,
            error_history=[{"at": "earlier", "attempt": 0, "status": "queued", "error": "ESP answered 500"}],
        )
        self.assertEqual(messages_expire_leases(), 1)
        message.refresh_from_db()
        self.assertEqual((message.status, message.locked_until), (Message.Status.UNKNOWN, None))
        self.assertEqual(len(message.error_history), 2)
        entry = message.error_history[-1]
        self.assertEqual((entry["status"], entry["attempt"]), ("unknown", 1))
        self.assertIn("worker stopped while handing the message to the ESP", entry["error"])
        self.assertTrue(entry["at"])

        Message.objects.filter(pk=message.pk).update(
            resent_after_unknown=True, updated_at=timezone.now() - timedelta(days=2)
        )
        self.assertEqual(messages_resend_unknown(), 1)
        message.refresh_from_db()
        self.assertEqual(message.status, Message.Status.DEAD)
        self.assertEqual(
            [(e["status"], e["error"]) for e in message.error_history[1:]],
            [
                ("unknown", "worker stopped while handing the message to the ESP"),
                ("dead", "still unknown after one resend"),
            ],
        )

    def test_a_buried_poison_message_says_so_in_its_history(self) -> None:
        from campaigns.delivery import _max_claims, messages_bury_poison

        expired = timezone.now() - timedelta(seconds=1)
        poison = self.queued(status=Message.Status.CLAIMED, locked_until=expired, claims=_max_claims())
        self.assertEqual(messages_bury_poison(), 1)
        poison.refresh_from_db()
        [entry] = poison.error_history
        self.assertEqual(entry["status"], "dead")
        self.assertIn("worker stopped while preparing it", entry["error"])

    def test_warm_up_waits_are_not_claims_that_bury_a_message_at_its_first_crash(self) -> None:
        from campaigns.delivery import _max_claims, messages_bury_poison
        from campaigns.models import WarmupSchedule

        WarmupSchedule.objects.create(
            name="mailauto.test", start_date=timezone.now().date() + timedelta(days=3), daily_caps=[5]
        )
        message = self.queued()
        for _ in range(_max_claims() + 1):  # deferred day after day
            Message.objects.filter(pk=message.pk).update(send_after=timezone.now())
            self.assertEqual(messages_send_batch().deferred, 1)
        message.refresh_from_db()
        self.assertEqual((message.status, message.claims), (Message.Status.QUEUED, 0))

        # Its first real crash: claimed, and the worker dies before the hand-off.
        Message.objects.filter(pk=message.pk).update(send_after=timezone.now())
        self.assertEqual([m.pk for m in messages_claim(limit=5)], [message.pk])
        Message.objects.filter(pk=message.pk).update(locked_until=timezone.now() - timedelta(seconds=1))
        self.assertEqual(messages_bury_poison(), 0)
        self.assertEqual([m.pk for m in messages_claim(limit=5)], [message.pk])  # retried instead


def test_a_429_or_a_retry_after_feeds_the_adaptive_rate() -> None:
    assert classify_send_error(_api_error(429)).rate_limited
    assert not classify_send_error(_api_error(503)).rate_limited
    assert not classify_send_error(_api_error(500)).rate_limited
    for status in (500, 502, 503):
        with_header = classify_send_error(_api_error(status, {"Retry-After": "30"}))
        assert (with_header.kind, with_header.rate_limited, with_header.retry_after) == (
            ErrorKind.RETRYABLE,
            True,
            30.0,
        )
    # Not a "slow down": an operator's problem, retried as before.
    assert not classify_send_error(_api_error(401, {"Retry-After": "30"})).rate_limited


class RetryAfterWithoutA429Tests(SandboxTestCase):
    # The shared rate starts fresh for each test (tests/conftest.py, _fresh_rate_limits).
    def test_a_503_with_retry_after_slows_and_pauses_the_shared_rate(self) -> None:
        from campaigns import throttle

        message = self.queued()
        self.sandbox.set_faults(fail_503=1, retry_after=120)
        self.assertEqual(messages_send_batch().retrying, 1)
        state = throttle.effective_rate()
        self.assertLess(state.rate, state.ceiling)
        self.assertIsNotNone(state.paused_until)
        self.assertGreaterEqual(state.paused_until, timezone.now() + timedelta(seconds=100))
        self.assertIn("503", state.reason)
        message.refresh_from_db()
        self.assertGreaterEqual(message.send_after, timezone.now() + timedelta(seconds=115))

    def test_a_503_without_retry_after_does_not_lower_it(self) -> None:
        from campaigns import throttle

        self.queued()
        self.sandbox.set_faults(fail_503=1)
        self.assertEqual(messages_send_batch().retrying, 1)
        state = throttle.effective_rate()
        self.assertEqual(state.rate, state.ceiling)
        self.assertIsNone(state.paused_until)


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


class ErasedAddressTests(SandboxTestCase):
    """An erased address survives only as a keyed hash (HashedSuppression): the hand-off
    must refuse it like any suppression, whichever contact the message is for."""

    def test_an_address_erased_through_another_contact_is_not_sent_to(self) -> None:
        from suppression.privacy import contact_erase

        # Ada complained; a second contact row shares her address.
        suppression_add(email="ada@example.com", reason=Suppression.Reason.COMPLAINT, source="test")
        twin = factories.contact(user_id="u-twin", email="Ada@Example.com")
        contact_erase(contact=self.contact, actor="ops", reason="Art. 17 request")
        self.assertFalse(Suppression.objects.filter(email="ada@example.com").exists())
        # Queued for the twin after the erasure (erasure itself stops what was queued).
        message = factories.message(self.version, twin, self.event)

        result = messages_send_batch()

        self.assertEqual((result.suppressed, result.sent), (1, 0))
        message.refresh_from_db()
        self.assertEqual(message.status, Message.Status.SUPPRESSED)
        self.assertEqual(message.status_reason, "suppressed: erased (GDPR Art. 17)")
        self.assertEqual(message.attempts, 0)
        self.assertEqual(self.sandbox.messages(), [])

    def test_an_erasure_committed_after_claim_and_render_still_wins(self) -> None:
        """The hand-off UPDATE itself matches the hashes (no check-then-act gap)."""
        from campaigns import delivery
        from suppression.models import HashedSuppression
        from suppression.privacy import email_hash

        message = self.queued()
        real_render = delivery.message_render

        def render_then_erase(**kw):  # type: ignore[no-untyped-def]
            rendered = real_render(**kw)
            HashedSuppression.objects.create(email_hash=email_hash("ada@example.com"), reason="erased")
            return rendered

        with mock.patch("campaigns.delivery.message_render", side_effect=render_then_erase):
            result = messages_send_batch()
        self.assertEqual(result.suppressed, 1)
        message.refresh_from_db()
        self.assertEqual(message.status, Message.Status.SUPPRESSED)
        self.assertIn("erased", message.status_reason)
        self.assertEqual(self.sandbox.messages(), [])

    def test_other_addresses_in_the_batch_still_go(self) -> None:
        from suppression.models import HashedSuppression
        from suppression.privacy import email_hash

        HashedSuppression.objects.create(email_hash=email_hash("ada@example.com"), reason="erased")
        erased = self.queued()
        bob = factories.message(self.version, factories.contact(email="bob@example.com"), self.event)
        result = messages_send_batch()
        self.assertEqual((result.sent, result.suppressed), (1, 1))
        erased.refresh_from_db()
        bob.refresh_from_db()
        self.assertEqual((erased.status, bob.status), (Message.Status.SUPPRESSED, Message.Status.SENT))
        self.assertEqual([m["to"] for m in self.sandbox.messages()], [["bob@example.com"]])


class AutomationPausedMidBatchTests(SandboxTestCase):
    def test_mail_of_an_automation_paused_after_the_claim_waits_until_it_is_active(self) -> None:
        """The reputation guard may pause an automation while a worker renders its batch:
        the hand-off re-checks it, as it does a broadcast, and the message waits."""
        from campaigns import delivery

        automation = factories.automation(self.type, self.version, active=True)
        message = self.queued(automation=automation)
        real_render = delivery.message_render

        def render_then_pause(**kw):  # type: ignore[no-untyped-def]
            rendered = real_render(**kw)
            type(automation).objects.filter(pk=automation.pk).update(active=False)
            return rendered

        with mock.patch("campaigns.delivery.message_render", side_effect=render_then_pause):
            result = messages_send_batch()
        self.assertEqual((result.claimed, result.sent, result.requests), (1, 0, 0))
        self.assertEqual(self.sandbox.messages(), [])
        message.refresh_from_db()
        self.assertEqual((message.status, message.attempts, message.claims), (Message.Status.QUEUED, 0, 0))
        self.assertEqual(messages_send_batch().claimed, 0)  # still paused: it waits

        automation.active = True
        automation.save(update_fields=["active"])
        self.assertEqual(messages_send_batch().sent, 1)
        message.refresh_from_db()
        self.assertEqual(message.status, Message.Status.SENT)


class DeliveryLogTests(SandboxTestCase):
    def test_sent_and_failed_log_lines_carry_message_and_event_ids_and_no_address(self) -> None:
        import json

        from mailauto.lib.structured_logs import JsonFormatter, KeyValueFormatter

        # A caller's own event id may carry personal data: the outbox row id is logged.
        event = factories.outbox_event(self.type, "u-1", {"plan": "pro"}, event_id="signup-ada@example.com")
        sent = factories.message(self.version, self.contact, event)
        inactive = factories.contact(user_id="u-3", email="inactive@example.com")
        failed_event = factories.outbox_event(self.type, "u-3", {}, event_id="signup-inactive@example.com")
        failed = factories.message(self.version, inactive, failed_event)

        with self.assertLogs("campaigns.delivery", level="INFO") as logs:
            result = messages_send_batch()
        self.assertEqual((result.sent, result.failed), (1, 1))

        as_json = {r.getMessage(): json.loads(JsonFormatter().format(r)) for r in logs.records}
        self.assertEqual(as_json["messages sent"]["message_ids"], [sent.pk])
        self.assertEqual(as_json["messages sent"]["outbox_event_ids"], [event.pk])
        self.assertEqual(as_json["send failed (permanent)"]["message_id"], failed.pk)
        self.assertEqual(as_json["send failed (permanent)"]["outbox_event_id"], failed_event.pk)
        line = KeyValueFormatter("%(message)s").format(logs.records[-1])
        self.assertIn(f"outbox_event_ids=[{event.pk}]", line.replace(" ", ""))
        for record in logs.records:
            self.assertNotIn("@", KeyValueFormatter("%(message)s").format(record))
            self.assertNotIn("@", JsonFormatter().format(record))


class ResidencyAtSendTimeTests(SandboxTestCase):
    """Data residency is decided again when a message is sent: the contact's region, or
    the deployment's ALLOWED_REGIONS, may have changed since its event was processed."""

    def test_a_contact_moved_out_of_the_allowed_regions_is_not_sent_and_says_why(self) -> None:
        Contact = type(self.contact)
        Contact.objects.filter(pk=self.contact.pk).update(region="ca")
        message = self.queued()
        other = factories.message(
            self.version, factories.contact(user_id="u-2", email="bob@example.com"), self.event
        )
        Contact.objects.filter(pk=other.contact_id).update(region="ca")
        Contact.objects.filter(pk=self.contact.pk).update(region="us")  # after the message was made
        with override_settings(MAILAUTO={**settings.MAILAUTO, "ALLOWED_REGIONS": ["ca"]}):
            result = messages_send_batch()
        self.assertEqual((result.sent, result.cancelled), (1, 1), result)
        message.refresh_from_db()
        self.assertEqual(message.status, Message.Status.CANCELLED)
        self.assertEqual(
            message.status_reason,
            "refused by data residency: contact region 'us' is not in ALLOWED_REGIONS (ca)",
        )
        self.assertEqual([m["to"] for m in self.sandbox.messages()], [["bob@example.com"]])

    def test_narrowing_allowed_regions_stops_queued_mail_transactional_included(self) -> None:
        message = self.queued(transactional=True)
        with override_settings(MAILAUTO={**settings.MAILAUTO, "ALLOWED_REGIONS": ["ch"]}):
            messages_send_batch()
        message.refresh_from_db()
        self.assertEqual(message.status, Message.Status.CANCELLED)
        self.assertIn("ALLOWED_REGIONS (ch) does not list 'unknown'", message.status_reason)
        self.assertEqual(self.sandbox.messages(), [])


class ProviderLimitTests(SandboxTestCase):
    """MAILAUTO_PROVIDER_RATE_LIMITS: a provider whose own limit is spent waits alone."""

    def test_a_spent_provider_limit_holds_back_only_that_providers_mail(self) -> None:
        options = {**settings.MAILAUTO, "PROVIDER_RATE_LIMITS": {"yahoo": 1}, "SEND_LEASE_SECONDS": 10}
        with override_settings(MAILAUTO=options):
            for n in range(5):
                factories.message(self.version, factories.contact(email=f"y{n}@yahoo.com"), self.event)
            # Five Yahoo recipients at 1/s: sent, leaving Yahoo's bucket ~4 s in debt.
            self.assertEqual(messages_send_batch().sent, 5)
            yahoo = [
                factories.message(self.version, factories.contact(email=f"z{n}@yahoo.com"), self.event)
                for n in range(2)
            ]
            others = [
                factories.message(self.version, factories.contact(email=f"o{n}@example.com"), self.event)
                for n in range(3)
            ]
            result = messages_send_batch()  # Yahoo's chunk comes first, and must wait
        self.assertEqual((result.sent, result.throttled), (3, 2))
        statuses = dict(Message.objects.values_list("to_email", "status"))
        for message in others:
            self.assertEqual(statuses[message.to_email], Message.Status.SENT)
        for message in yahoo:
            message.refresh_from_db()
            self.assertEqual(message.status, Message.Status.QUEUED)
            self.assertIn("provider:yahoo", message.status_reason)
            self.assertGreater(message.send_after, timezone.now())
