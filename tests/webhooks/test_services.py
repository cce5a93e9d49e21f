"""Recording tracking events (webhooks/services.py), driven through the HTTP layer with
Postmark's documented payloads: the status timeline, suppression, deduplication."""

from __future__ import annotations

import json
import threading
from datetime import UTC, datetime, timedelta

import time_machine
from anymail.signals import AnymailTrackingEvent
from django.conf import settings
from django.db import connection, connections, transaction
from django.test import TransactionTestCase, override_settings
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from campaigns.models import Message
from suppression.consent import consent_grant, consent_state
from suppression.models import ConsentRecord, Suppression, SuppressionLogEntry
from suppression.privacy import contact_erase, is_hashed_suppressed
from suppression.services import recipient_unsubscribe, suppression_add
from tests import factories
from tests.webhooks.postmark import WebhookTestCase, basic_auth, for_message, iso, payload
from webhooks.models import TrackingEvent
from webhooks.services import ERASED_RECIPIENT, bounce_kind, statuses_before, tracking_event_record

Status = Message.Status


class TimelineTests(WebhookTestCase):
    def test_delivery_advances_a_sent_message_to_delivered_and_is_stored(self) -> None:
        message = self.message()
        body = for_message("delivery", message)

        self.assertAccepted(self.post(body))

        message.refresh_from_db()
        self.assertEqual(message.status, Status.DELIVERED)
        self.assertEqual(message.status_reason, "delivered (webhook:postmark)")
        event = TrackingEvent.objects.get()
        self.assertEqual(event.esp, "postmark")
        self.assertEqual(event.event_type, TrackingEvent.EventType.DELIVERED)
        self.assertEqual(event.message_id, message.pk)
        self.assertEqual(event.esp_message_id, message.esp_message_id)
        self.assertEqual(event.recipient, "ada@example.com")
        self.assertEqual(event.occurred_at, datetime(2019, 11, 5, 16, 33, 54, 907025, tzinfo=UTC))
        self.assertEqual(event.mta_response, "Test delivery webhook details")
        self.assertEqual(event.metadata, {"mailauto_message_id": str(message.pk)})
        self.assertEqual(event.esp_event, body)
        # Postmark gives no id for deliveries: the content is the identity.
        self.assertRegex(event.esp_event_id, r"^sha256:[0-9a-f]{64}$")

    def test_open_then_click_advance_to_clicked(self) -> None:
        message = self.message()
        self.assertAccepted(self.post(for_message("delivery", message)))
        self.assertAccepted(self.post(for_message("open", message)))
        message.refresh_from_db()
        self.assertEqual(message.status, Status.OPENED)

        self.assertAccepted(self.post(for_message("click", message)))
        message.refresh_from_db()
        self.assertEqual(message.status, Status.CLICKED)
        click = TrackingEvent.objects.get(event_type=TrackingEvent.EventType.CLICKED)
        self.assertEqual(click.click_url, "https://example.com")
        self.assertEqual(TrackingEvent.objects.filter(message=message).count(), 3)

    def test_status_never_goes_backwards(self) -> None:
        # (first event, later event, status after both)
        cases = [
            ("delivery", "transient", Status.DELIVERED),  # a late "deferred" (sent-level) event
            ("open", "delivery", Status.OPENED),
            ("click", "open", Status.CLICKED),
            ("spam_complaint", "open", Status.COMPLAINED),
            ("bounce", "delivery", Status.BOUNCED),
            ("spam_complaint", "subscription_change_unsubscribe", Status.COMPLAINED),
        ]
        for first, later, expected in cases:
            with self.subTest(first=first, later=later):
                message = self.message(email=f"{first}.{later}@example.com")
                self.assertAccepted(self.post(for_message(first, message)))
                self.assertAccepted(self.post(for_message(later, message)))
                message.refresh_from_db()
                self.assertEqual(message.status, expected)

    def test_complaint_after_an_open_is_complained(self) -> None:
        message = self.message()
        self.assertAccepted(self.post(for_message("open", message)))
        self.assertAccepted(self.post(for_message("spam_complaint", message)))
        message.refresh_from_db()
        self.assertEqual(message.status, Status.COMPLAINED)

    def test_links_by_esp_message_id_when_metadata_is_absent(self) -> None:
        message = self.message()
        self.assertAccepted(self.post(for_message("delivery", message, metadata=False)))
        self.assertEqual(TrackingEvent.objects.get().message_id, message.pk)
        message.refresh_from_db()
        self.assertEqual(message.status, Status.DELIVERED)

    def test_metadata_wins_over_the_esp_message_id(self) -> None:
        ours = self.message(email="ours@example.com")
        other = self.message(email="other@example.com")
        body = for_message("delivery", ours, MessageID=other.esp_message_id)
        self.assertAccepted(self.post(body))
        self.assertEqual(TrackingEvent.objects.get().message_id, ours.pk)
        other.refresh_from_db()
        self.assertEqual(other.status, Status.SENT)

    def test_event_for_an_unknown_message_is_stored_without_one(self) -> None:
        self.assertAccepted(self.post(payload("delivery")))  # fixture's MessageID and metadata
        event = TrackingEvent.objects.get()
        self.assertIsNone(event.message_id)
        self.assertEqual(event.esp_message_id, "883953f4-6105-42a2-a16a-77a8eac79483")
        self.assertEqual(event.recipient, "john@example.com")

    def test_unknown_message_is_reconciled_as_sent_and_gets_its_esp_message_id(self) -> None:
        message = self.message(status=Status.UNKNOWN, esp_message_id="")
        # Postmark's "Transient" bounce is Anymail's "deferred": the ESP has the message.
        body = for_message("transient", message, MessageID="0d4bd0a0-0000-4000-8000-00000000abcd")
        self.assertAccepted(self.post(body))
        message.refresh_from_db()
        self.assertEqual(message.status, Status.SENT)
        self.assertEqual(message.esp_message_id, "0d4bd0a0-0000-4000-8000-00000000abcd")
        self.assertTrue(message.status_reason.startswith("reconciled: deferred (webhook:postmark)"))
        self.assertIsNotNone(message.sent_at)
        self.assertFalse(Suppression.objects.exists())

    def test_sending_message_is_reconciled_to_the_webhooks_later_state(self) -> None:
        message = self.message(status=Status.SENDING, esp_message_id="")
        message.locked_until = timezone.now() + timedelta(minutes=5)
        message.save(update_fields=["locked_until"])
        self.assertAccepted(self.post(for_message("delivery", message, MessageID="esp-late-id")))
        message.refresh_from_db()
        self.assertEqual(message.status, Status.DELIVERED)
        self.assertEqual(message.esp_message_id, "esp-late-id")
        self.assertIsNone(message.locked_until)

    def test_a_known_esp_message_id_is_kept(self) -> None:
        message = self.message(status=Status.UNKNOWN, esp_message_id="the-resend-id")
        self.assertAccepted(self.post(for_message("delivery", message, MessageID="the-first-id")))
        message.refresh_from_db()
        self.assertEqual(message.status, Status.DELIVERED)
        self.assertEqual(message.esp_message_id, "the-resend-id")

    def test_allowed_previous_statuses(self) -> None:
        self.assertNotIn(Status.DELIVERED, statuses_before(Status.DELIVERED))
        self.assertIn(Status.SENT, statuses_before(Status.DELIVERED))
        self.assertIn(Status.UNKNOWN, statuses_before(Status.SENT))
        self.assertNotIn(Status.OPENED, statuses_before(Status.DELIVERED))
        self.assertIn(Status.CLICKED, statuses_before(Status.COMPLAINED))
        self.assertNotIn(Status.COMPLAINED, statuses_before(Status.BOUNCED))


class DeduplicationTests(WebhookTestCase):
    def snapshot(self, message: Message) -> tuple[object, ...]:
        message.refresh_from_db()
        row = Message.objects.filter(pk=message.pk).values().get()
        return (
            row,
            TrackingEvent.objects.count(),
            Suppression.objects.count(),
            SuppressionLogEntry.objects.count(),
        )

    def test_a_replayed_delivery_changes_nothing(self) -> None:
        message = self.message()
        body = for_message("delivery", message)
        self.assertAccepted(self.post(body))
        before = self.snapshot(message)

        with time_machine.travel(timezone.now() + timedelta(hours=1)):
            self.assertAccepted(self.post(body))

        self.assertEqual(self.snapshot(message), before)
        self.assertEqual(TrackingEvent.objects.count(), 1)

    def test_a_replayed_bounce_changes_nothing(self) -> None:
        message = self.message()
        body = for_message("bounce", message)
        self.assertAccepted(self.post(body))
        before = self.snapshot(message)
        self.assertEqual(before[1:], (1, 1, 1))

        with time_machine.travel(timezone.now() + timedelta(hours=1)):
            self.assertAccepted(self.post(body))

        self.assertEqual(self.snapshot(message), before)
        self.assertEqual(TrackingEvent.objects.get().esp_event_id, str(body["ID"]))

    def test_a_replay_takes_few_queries(self) -> None:
        message = self.message()
        body = for_message("delivery", message)
        self.assertAccepted(self.post(body))
        # One statement: its INSERT finds the event already there, so its UPDATE
        # touches nothing (webhooks.services._record_in_one_statement).
        with self.assertNumQueries(1):
            self.assertAccepted(self.post(body))

    def test_a_new_delivery_takes_few_queries(self) -> None:
        message = self.message()
        # The lookup, the INSERT and the conditional UPDATE are one statement, with no
        # transaction of its own around it (a savepoint pair under TestCase).
        with self.assertNumQueries(1):
            self.assertAccepted(self.post(for_message("delivery", message)))

    def test_different_events_for_one_message_are_each_stored(self) -> None:
        message = self.message()
        self.assertAccepted(self.post(for_message("open", message)))
        self.assertAccepted(self.post(for_message("open", message, ReceivedAt="2019-11-05T17:00:00Z")))
        self.assertEqual(TrackingEvent.objects.filter(event_type="opened").count(), 2)


class OneStatementPathTests(WebhookTestCase):
    """Events that suppress nothing (deliveries, opens, clicks, deferrals, blocks) are
    recorded by one statement (webhooks.services._record_in_one_statement); events that
    may suppress take the general path. Same outcomes either way."""

    def snapshot(self, message: Message) -> tuple[object, ...]:
        row = Message.objects.filter(pk=message.pk).values().get()
        return row, list(TrackingEvent.objects.order_by("pk").values()), Suppression.objects.count()

    def test_events_that_cannot_suppress_take_one_statement_and_the_others_more(self) -> None:
        message = self.message()
        for name in ("delivery", "open", "click", "transient", "blocked"):
            with self.subTest(name=name), self.assertNumQueries(1):
                self.assertAccepted(self.post(for_message(name, message)))
        with CaptureQueriesContext(connection) as queries:
            self.assertAccepted(self.post(for_message("bounce", message)))
        self.assertGreater(len(queries), 1)
        self.assertTrue(Suppression.objects.filter(email=message.to_email).exists())

    def test_a_replayed_open_or_click_changes_nothing(self) -> None:
        for name in ("open", "click"):
            with self.subTest(name=name):
                message = self.message(email=f"{name}@example.com")
                body = for_message(name, message)
                self.assertAccepted(self.post(body))
                before = self.snapshot(message)
                with time_machine.travel(timezone.now() + timedelta(hours=1)):
                    self.assertAccepted(self.post(body))
                self.assertEqual(self.snapshot(message), before)

    def test_a_replay_after_the_message_moved_on_changes_nothing(self) -> None:
        message = self.message()
        delivery = for_message("delivery", message)
        self.assertAccepted(self.post(delivery))
        self.assertAccepted(self.post(for_message("click", message)))
        before = self.snapshot(message)
        self.assertAccepted(self.post(delivery))
        self.assertEqual(self.snapshot(message), before)

    def test_a_replay_moves_no_message_even_where_the_event_could(self) -> None:
        # The message went back to the queue after its delivery was recorded (say, an
        # operator's replay): the same event redelivered is still a replay, not news.
        message = self.message()
        delivery = for_message("delivery", message)
        self.assertAccepted(self.post(delivery))
        Message.objects.filter(pk=message.pk).update(status=Status.QUEUED, status_reason="requeued")
        before = self.snapshot(message)
        self.assertAccepted(self.post(delivery))
        self.assertEqual(self.snapshot(message), before)

    def test_an_event_for_an_unknown_message_is_stored_and_changes_no_message(self) -> None:
        bystander = self.message()
        before = Message.objects.filter(pk=bystander.pk).values().get()
        body = for_message(
            "open", bystander, MessageID="not-one-of-ours", Metadata={"mailauto_message_id": "999999999"}
        )
        self.assertAccepted(self.post(body))
        event = TrackingEvent.objects.get()
        self.assertIsNone(event.message_id)
        self.assertEqual(event.esp_message_id, "not-one-of-ours")
        self.assertEqual(event.event_type, TrackingEvent.EventType.OPENED)
        self.assertEqual(Message.objects.filter(pk=bystander.pk).values().get(), before)

    def test_an_unknown_metadata_id_falls_back_to_the_esp_message_id(self) -> None:
        message = self.message()
        body = for_message("delivery", message, Metadata={"mailauto_message_id": "999999999"})
        self.assertAccepted(self.post(body))
        self.assertEqual(TrackingEvent.objects.get().message_id, message.pk)
        message.refresh_from_db()
        self.assertEqual(message.status, Status.DELIVERED)

    def test_a_late_event_never_moves_a_refused_message_back(self) -> None:
        for refusal, status in (("spam_complaint", Status.COMPLAINED), ("bounce", Status.BOUNCED)):
            with self.subTest(refusal=refusal):
                message = self.message(email=f"{refusal}@example.com")
                self.assertAccepted(self.post(for_message(refusal, message)))
                before = Message.objects.filter(pk=message.pk).values().get()
                for later in ("delivery", "open", "click", "transient", "blocked"):
                    self.assertAccepted(self.post(for_message(later, message)))
                self.assertEqual(Message.objects.filter(pk=message.pk).values().get(), before)
                self.assertEqual(before["status"], status)
                self.assertEqual(TrackingEvent.objects.filter(message=message).count(), 6)

    def test_an_isp_block_records_why_the_message_bounced(self) -> None:
        message = self.message()
        self.assertAccepted(self.post(for_message("blocked", message)))
        message.refresh_from_db()
        self.assertEqual(message.status, Status.BOUNCED)
        self.assertEqual(
            message.status_reason,
            "rejected (webhook:postmark): The ISP has blocked this message because it was "
            "suspected of being spam.",
        )
        event = TrackingEvent.objects.get()
        self.assertEqual(event.event_type, TrackingEvent.EventType.REJECTED)
        self.assertEqual(event.reject_reason, "blocked")
        self.assertFalse(Suppression.objects.exists())

    def test_the_stored_event_is_the_same_as_the_general_paths(self) -> None:
        # The general path stores what a suppressing event says; the one-statement path
        # must store a non-suppressing event's fields the same way (here: a click).
        message = self.message()
        body = for_message("click", message)
        self.assertAccepted(self.post(body))
        event = TrackingEvent.objects.get()
        self.assertEqual(event.esp_event, body)
        self.assertEqual(event.metadata, {"mailauto_message_id": str(message.pk)})
        self.assertEqual(event.click_url, "https://example.com")
        self.assertEqual(event.recipient, message.to_email)
        self.assertEqual(event.message_id, message.pk)
        self.assertRegex(event.esp_event_id, r"^sha256:[0-9a-f]{64}$")
        self.assertIsNotNone(event.occurred_at.tzinfo)


class SuppressionTests(WebhookTestCase):
    def suppression(self, email: str = "ada@example.com") -> Suppression:
        return Suppression.objects.get(email=email)

    def test_hard_bounce_suppresses_the_address_and_marks_the_message_bounced(self) -> None:
        message = self.message(email="Ada@Example.com")
        self.assertAccepted(self.post(for_message("bounce", message)))

        suppression = self.suppression()
        self.assertEqual(suppression.reason, Suppression.Reason.HARD_BOUNCE)
        self.assertEqual(suppression.topic, "")
        self.assertEqual(suppression.source, "webhook:postmark")
        self.assertIn(TrackingEvent.objects.get().esp_event_id, suppression.detail)
        message.refresh_from_db()
        self.assertEqual(message.status, Status.BOUNCED)
        self.assertIn("unknown user", message.status_reason)
        self.assertEqual(TrackingEvent.objects.get().bounce_kind, TrackingEvent.BounceKind.HARD)

    def test_spam_complaint_suppresses_as_complaint(self) -> None:
        message = self.message()
        self.assertAccepted(self.post(for_message("spam_complaint", message)))
        self.assertEqual(self.suppression().reason, Suppression.Reason.COMPLAINT)
        message.refresh_from_db()
        self.assertEqual(message.status, Status.COMPLAINED)

    def test_subscription_change_unsubscribes_from_all_marketing(self) -> None:
        message = self.message()
        self.assertAccepted(self.post(for_message("subscription_change_unsubscribe", message)))
        suppression = self.suppression()
        self.assertEqual(suppression.reason, Suppression.Reason.UNSUBSCRIBE)
        self.assertEqual(suppression.topic, "")
        message.refresh_from_db()
        self.assertEqual(message.status, Status.UNSUBSCRIBED)

    def test_subscription_change_withdraws_every_granted_purpose_in_the_ledger(self) -> None:
        message = self.message()
        consent_grant(contact=message.contact, purpose="newsletter", source="signup-form")
        consent_grant(contact=message.contact, purpose="offers", source="signup-form")
        self.assertAccepted(self.post(for_message("subscription_change_unsubscribe", message)))
        for purpose in ("newsletter", "offers"):
            state = consent_state(contact=message.contact, purpose=purpose)
            assert state is not None
            self.assertEqual(
                (state.action, state.source), (ConsentRecord.Action.WITHDRAWN, "webhook:postmark")
            )
            self.assertEqual(state.evidence, {"all_marketing": True, "message_id": message.pk})

    def test_subscription_change_for_a_hard_bounce_suppresses_as_hard_bounce(self) -> None:
        # Postmark's SubscriptionChange with SuppressionReason "HardBounce": Anymail
        # normalizes it to "bounced".
        self.assertAccepted(self.post(payload("subscription_change")))
        self.assertEqual(
            self.suppression("bounced-address@example.com").reason, Suppression.Reason.HARD_BOUNCE
        )

    def test_invalid_address_rejection_suppresses_as_invalid(self) -> None:
        message = self.message()
        self.assertAccepted(self.post(for_message("bad_email_address", message)))
        self.assertEqual(self.suppression().reason, Suppression.Reason.INVALID)
        self.assertEqual(TrackingEvent.objects.get().event_type, TrackingEvent.EventType.REJECTED)

    def test_an_isp_block_bounces_the_message_but_does_not_suppress_the_address(self) -> None:
        message = self.message()
        self.assertAccepted(self.post(for_message("blocked", message)))
        self.assertFalse(Suppression.objects.exists())
        message.refresh_from_db()
        self.assertEqual(message.status, Status.BOUNCED)

    def test_a_transient_bounce_neither_suppresses_nor_counts_as_soft(self) -> None:
        message = self.message()
        self.assertAccepted(self.post(for_message("transient", message)))
        self.assertFalse(Suppression.objects.exists())
        self.assertEqual(TrackingEvent.objects.get().bounce_kind, "")

    def test_recipient_falls_back_to_the_messages_address(self) -> None:
        message = self.message()
        body = for_message("subscription_change_unsubscribe", message)
        del body["Recipient"]
        # (Recipient is required by Postmark's format; the service copes without it.)
        event = AnymailTrackingEvent(
            event_type="unsubscribed",
            message_id=body["MessageID"],
            metadata=body["Metadata"],
            esp_event=body,
        )
        tracking_event_record(esp="postmark", event=event)
        self.assertEqual(self.suppression().reason, Suppression.Reason.UNSUBSCRIBE)


class SoftBounceTests(WebhookTestCase):
    start = datetime(2025, 3, 1, 12, 0, tzinfo=UTC)

    def soft_bounce_on(self, day: float, email: str = "ada@example.com") -> None:
        at = self.start + timedelta(days=day)
        with time_machine.travel(at, tick=False):
            message = self.message(email=email)
            body = for_message("soft_bounce", message, ID=int(at.timestamp() * 1000), BouncedAt=iso(at))
            self.assertAccepted(self.post(body))

    def suppressed(self, email: str = "ada@example.com") -> bool:
        return Suppression.objects.filter(email=email).exists()

    def test_a_soft_bounce_is_not_a_hard_bounce(self) -> None:
        # Anymail normalizes Postmark's SoftBounce to "bounced", like a hard bounce.
        self.soft_bounce_on(0)
        event = TrackingEvent.objects.get()
        self.assertEqual(event.event_type, TrackingEvent.EventType.BOUNCED)
        self.assertEqual(event.bounce_kind, TrackingEvent.BounceKind.SOFT)
        self.assertFalse(self.suppressed())
        self.assertEqual(Message.objects.get().status, Status.BOUNCED)

    def test_soft_bounces_suppress_at_the_limit_within_the_window(self) -> None:
        self.soft_bounce_on(0)
        self.soft_bounce_on(2)
        self.assertFalse(self.suppressed())
        self.soft_bounce_on(6.5)
        suppression = Suppression.objects.get(email="ada@example.com")
        self.assertEqual(suppression.reason, Suppression.Reason.SOFT_BOUNCES)
        self.assertEqual(suppression.source, "webhook:postmark")

    def test_soft_bounces_outside_the_window_do_not_count(self) -> None:
        self.soft_bounce_on(0)
        self.soft_bounce_on(1)
        self.soft_bounce_on(8.5)  # days 0 and 1 are more than 7 days before this one
        self.assertFalse(self.suppressed())
        self.soft_bounce_on(9.5)  # 8.5 and 9.5 count: two
        self.assertFalse(self.suppressed())
        self.soft_bounce_on(10)  # 8.5, 9.5 and 10: three within 7 days
        self.assertTrue(self.suppressed())

    def test_soft_bounces_of_other_addresses_do_not_count(self) -> None:
        self.soft_bounce_on(0, email="one@example.com")
        self.soft_bounce_on(1, email="two@example.com")
        self.soft_bounce_on(2)
        self.assertFalse(Suppression.objects.exists())

    def test_the_limit_and_window_come_from_settings(self) -> None:
        options = {**settings.MAILAUTO, "SOFT_BOUNCE_LIMIT": 2, "SOFT_BOUNCE_WINDOW_DAYS": 30}
        with override_settings(MAILAUTO=options):
            self.soft_bounce_on(0)
            self.assertFalse(self.suppressed())
            self.soft_bounce_on(20)
            self.assertTrue(self.suppressed())

    def test_a_replayed_soft_bounce_counts_once(self) -> None:
        message = self.message()
        body = for_message("soft_bounce", message, BouncedAt=iso(timezone.now()))
        for _ in range(3):
            self.assertAccepted(self.post(body))
        self.assertFalse(self.suppressed())


class OtherEspVocabularyTests(WebhookTestCase):
    """The soft-bounce table for ESPs whose soft bounces Anymail calls "bounced"."""

    def test_soft_bounces_by_esp(self) -> None:
        cases = [
            ("postmark", {"Type": "SoftBounce"}, "soft"),
            ("postmark", {"Type": "HardBounce"}, "hard"),
            ("amazon_ses", {"bounce": {"bounceType": "Transient"}}, "soft"),
            ("amazon_ses", {"bounce": {"bounceType": "Permanent"}}, "hard"),
            ("brevo", {"event": "soft_bounce"}, "soft"),
            ("brevo", {"event": "hard_bounce"}, "hard"),
            ("mandrill", {"event": "soft_bounce"}, "soft"),
            ("mailersend", {"data": {"type": "soft_bounced"}}, "soft"),
            ("mailjet", {"event": "bounce", "hard_bounce": False}, "soft"),
            ("mailjet", {"event": "bounce", "hard_bounce": True}, "hard"),
            ("sparkpost", {"type": "bounce"}, "hard"),
        ]
        for esp, esp_event, expected in cases:
            with self.subTest(esp=esp, esp_event=esp_event):
                event = AnymailTrackingEvent(
                    event_type="bounced", reject_reason="bounced", esp_event=esp_event
                )
                self.assertEqual(bounce_kind(esp=esp, event=event), expected)

    def test_a_bounce_for_a_virus_or_a_block_says_nothing_about_the_address(self) -> None:
        for reason in ("other", "blocked", "spam"):
            with self.subTest(reason=reason):
                event = AnymailTrackingEvent(event_type="bounced", reject_reason=reason, esp_event={})
                self.assertEqual(bounce_kind(esp="postmark", event=event), "")

    def test_amazon_ses_events_of_one_notification_are_kept_apart_by_recipient(self) -> None:
        for recipient in ("a@example.com", "b@example.com"):
            event = AnymailTrackingEvent(
                event_type="bounced",
                reject_reason="bounced",
                event_id="sns-message-1",
                recipient=recipient,
                esp_event={"bounce": {"bounceType": "Permanent"}},
            )
            self.assertIsNotNone(tracking_event_record(esp="amazon_ses", event=event))
        ids = list(TrackingEvent.objects.values_list("esp_event_id", flat=True))
        self.assertEqual(len(set(ids)), 2)
        for esp_event_id in ids:
            self.assertRegex(esp_event_id, r"^sns-message-1/[0-9a-f]{16}$")  # no address in a key
        self.assertEqual(Suppression.objects.count(), 2)


class ConcurrencyTests(TransactionTestCase):
    """Real transactions on separate connections: what conditional UPDATEs are for."""

    def setUp(self) -> None:
        version = factories.published_version()
        contact = factories.contact(email="ada@example.com")
        self.message = factories.message(
            version, contact, status=Status.SENT, esp_message_id="esp-concurrent-1"
        )

    def event(self, name: str) -> AnymailTrackingEvent:
        from anymail.webhooks.postmark import PostmarkTrackingWebhookView

        return PostmarkTrackingWebhookView().esp_to_anymail_event(for_message(name, self.message))

    def waiting_for_a_lock(self) -> int:
        with connection.cursor() as cursor:
            cursor.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                "AND wait_event_type = 'Lock'"
            )
            return cursor.fetchone()[0]

    def test_a_delivery_committed_after_a_complaint_does_not_move_the_message_back(self) -> None:
        complaint_recorded = threading.Event()
        may_commit = threading.Event()
        errors: list[BaseException] = []

        def complain() -> None:
            try:
                with transaction.atomic():
                    tracking_event_record(esp="postmark", event=self.event("spam_complaint"))
                    complaint_recorded.set()
                    may_commit.wait(timeout=30)
            except BaseException as err:
                errors.append(err)
            finally:
                connections.close_all()

        def deliver() -> None:
            try:
                # Reads the message as SENT (the complaint is not committed yet), then
                # its UPDATE waits for the complaint's row lock.
                tracking_event_record(esp="postmark", event=self.event("delivery"))
            except BaseException as err:
                errors.append(err)
            finally:
                connections.close_all()

        complainer = threading.Thread(target=complain)
        complainer.start()
        self.assertTrue(complaint_recorded.wait(timeout=30))
        deliverer = threading.Thread(target=deliver)
        deliverer.start()
        for _ in range(3000):  # bounded: until the delivery's UPDATE is blocked
            if self.waiting_for_a_lock():
                break
            threading.Event().wait(0.01)
        self.assertEqual(self.waiting_for_a_lock(), 1)
        may_commit.set()
        complainer.join(timeout=30)
        deliverer.join(timeout=30)

        self.assertEqual(errors, [])
        self.message.refresh_from_db()
        self.assertEqual(self.message.status, Status.COMPLAINED)
        self.assertEqual(TrackingEvent.objects.count(), 2)

    def record_racing(self, name: str, *, threads: int) -> list[object]:
        """Record the same event (fixture `name`) from `threads` connections at once,
        each thread parsing the webhook itself as a request would; their results."""
        start = threading.Barrier(threads)
        results: list[object] = []
        errors: list[BaseException] = []

        def record() -> None:
            try:
                event = self.event(name)
                start.wait(timeout=30)
                results.append(tracking_event_record(esp="postmark", event=event))
            except BaseException as err:
                errors.append(err)
            finally:
                connections.close_all()

        workers = [threading.Thread(target=record) for _ in range(threads)]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join(timeout=30)
        self.assertEqual(errors, [])
        return results

    def test_the_same_event_racing_itself_is_stored_once(self) -> None:
        results = self.record_racing("bounce", threads=4)
        self.assertEqual(sum(result is not None for result in results), 1)
        self.assertEqual(TrackingEvent.objects.count(), 1)
        self.assertEqual(SuppressionLogEntry.objects.count(), 1)

    def test_the_same_delivery_racing_itself_is_stored_once(self) -> None:
        results = self.record_racing("delivery", threads=4)
        self.assertEqual(sum(result is not None for result in results), 1)
        self.assertEqual(TrackingEvent.objects.count(), 1)
        self.message.refresh_from_db()
        self.assertEqual(self.message.status, Status.DELIVERED)

    def test_a_bounce_is_suppressed_for_everyone_before_the_webhook_is_answered(self) -> None:
        # Committed, not merely written: another connection sees the suppression as soon
        # as the 2xx is back (the hand-off UPDATE of a concurrent sender reads it there).
        response = self.client.post(
            "/webhooks/postmark/tracking/",
            data=for_message("bounce", self.message),
            content_type="application/json",
            headers={"Authorization": basic_auth(str(settings.ANYMAIL["WEBHOOK_SECRET"]))},
        )
        self.assertEqual(response.status_code, 200, response.content)
        seen: list[bool] = []

        def look() -> None:
            try:
                seen.append(Suppression.objects.filter(email="ada@example.com").exists())
            finally:
                connections.close_all()

        elsewhere = threading.Thread(target=look)
        elsewhere.start()
        elsewhere.join(timeout=30)
        self.assertEqual(seen, [True])


class ErasedAddressTests(WebhookTestCase):
    """Feedback that arrives after a contact was erased (GDPR Art. 17): complaints and
    opens often come days after the send. It is recorded (the message's timeline and
    the reputation counts stay right) without bringing the address back anywhere."""

    ADDRESS = "gone@example.com"

    def setUp(self) -> None:
        super().setUp()
        self.message_ = self.message(email=self.ADDRESS)
        # What the ESP will post carries the address the message was sent to.
        self.bodies = {
            name: for_message(name, self.message_)
            for name in ("spam_complaint", "bounce", "open", "delivery")
        }
        contact_erase(contact=self.message_.contact, actor="test", reason="Art. 17")
        self.message_.refresh_from_db()

    def assert_address_nowhere(self) -> None:
        self.assertFalse(Suppression.objects.filter(email__icontains="gone@").exists())
        self.assertFalse(SuppressionLogEntry.objects.filter(email__icontains="gone@").exists())
        for row in TrackingEvent.objects.values():
            self.assertNotIn(self.ADDRESS, json.dumps(row, default=str).lower())
        self.assertTrue(is_hashed_suppressed(self.ADDRESS), "the hashed suppression survives")

    def test_a_late_complaint_or_bounce_is_recorded_without_the_address(self) -> None:
        for name in ("spam_complaint", "bounce"):
            with self.subTest(name=name):
                self.assertAccepted(self.post(self.bodies[name]))
                event = TrackingEvent.objects.get(event_type=for_event_type(name))
                self.assertEqual(event.message_id, self.message_.pk)
                self.assertEqual(event.recipient, ERASED_RECIPIENT)
                self.assertEqual((event.esp_event, event.metadata, event.mta_response), ({}, {}, ""))
        self.message_.refresh_from_db()
        self.assertEqual(self.message_.status, Status.COMPLAINED)
        self.assert_address_nowhere()

    def test_a_late_open_or_delivery_takes_one_statement_and_drops_the_address(self) -> None:
        for name in ("delivery", "open"):
            with self.subTest(name=name), self.assertNumQueries(1):
                self.assertAccepted(self.post(self.bodies[name]))
        events = TrackingEvent.objects.order_by("pk")
        self.assertEqual([e.recipient for e in events], [ERASED_RECIPIENT] * 2)
        self.assertEqual({e.message_id for e in events}, {self.message_.pk})
        self.assertEqual([(e.esp_event, e.metadata) for e in events], [({}, {})] * 2)
        self.assert_address_nowhere()

    def test_an_event_naming_the_erased_address_with_no_message_is_scrubbed_too(self) -> None:
        body = payload("open", Recipient="Gone@Example.com", MessageID="not-ours", Metadata={})
        self.assertAccepted(self.post(body))
        self.assertEqual(TrackingEvent.objects.get().recipient, ERASED_RECIPIENT)
        self.assert_address_nowhere()

    def test_a_redelivered_late_event_is_still_recognised(self) -> None:
        for _ in range(2):
            self.assertAccepted(self.post(self.bodies["spam_complaint"]))
            self.assertAccepted(self.post(self.bodies["open"]))
        self.assertEqual(TrackingEvent.objects.count(), 2)

    def test_other_addresses_keep_their_events_as_they_came(self) -> None:
        other = self.message(email="kept@example.com")
        self.assertAccepted(self.post(for_message("open", other)))
        self.assertAccepted(self.post(for_message("spam_complaint", other)))
        self.assertEqual(set(TrackingEvent.objects.values_list("recipient", flat=True)), {"kept@example.com"})
        self.assertTrue(Suppression.objects.filter(email="kept@example.com").exists())

    def test_suppression_add_and_an_old_unsubscribe_link_store_nothing(self) -> None:
        self.assertIsNone(
            suppression_add(email=self.ADDRESS, reason=Suppression.Reason.MANUAL, source="test")
        )
        self.assertIsNone(recipient_unsubscribe(email=self.ADDRESS, topic="", source="recipient:one-click"))
        self.assert_address_nowhere()


def for_event_type(fixture: str) -> str:
    return {"spam_complaint": TrackingEvent.EventType.COMPLAINED, "bounce": TrackingEvent.EventType.BOUNCED}[
        fixture
    ]
