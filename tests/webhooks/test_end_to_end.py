"""The feedback loop over real HTTP: a message sent through campaigns.delivery to the
local ESP sandbox, whose Postmark-format webhook reaches this app on a live server and
suppresses the address."""

from __future__ import annotations

from django.conf import settings
from django.test import LiveServerTestCase

from campaigns.delivery import messages_send_batch
from campaigns.models import Message
from suppression.models import Suppression
from tests import factories
from tests.conftest import use_sandbox
from webhooks.models import TrackingEvent


class SandboxWebhookLoopTests(LiveServerTestCase):
    def setUp(self) -> None:
        self.sandbox = use_sandbox(
            self,
            webhook_url=f"{self.live_server_url}/webhooks/postmark/tracking/",
            webhook_auth=str(settings.ANYMAIL["WEBHOOK_SECRET"]),
        )
        self.version = factories.published_version()

    def queue(self, email: str) -> Message:
        return factories.message(self.version, factories.contact(email=email))

    def test_a_hard_bounce_from_the_sandbox_suppresses_the_address(self) -> None:
        bounced = self.queue("bounce@example.com")
        delivered = self.queue("ada@example.com")

        result = messages_send_batch()
        self.assertEqual(result.sent, 2)
        self.sandbox.wait_for_webhooks(timeout=30)

        log = self.sandbox.webhook_log()
        self.assertEqual(sorted(entry["record_type"] for entry in log), ["Bounce", "Delivery"])
        self.assertEqual({entry["http_status"] for entry in log}, {200}, log)

        suppression = Suppression.objects.get(email="bounce@example.com")
        self.assertEqual(suppression.reason, Suppression.Reason.HARD_BOUNCE)
        self.assertEqual(suppression.source, "webhook:postmark")
        bounced.refresh_from_db()
        delivered.refresh_from_db()
        self.assertEqual(bounced.status, Message.Status.BOUNCED)
        self.assertEqual(delivered.status, Message.Status.DELIVERED)
        events = {event.message_id: event for event in TrackingEvent.objects.all()}
        self.assertEqual(events[bounced.pk].esp_message_id, bounced.esp_message_id)
        self.assertEqual(events[bounced.pk].bounce_kind, TrackingEvent.BounceKind.HARD)
        self.assertFalse(Suppression.objects.filter(email="ada@example.com").exists())

        # The next message to that address never leaves.
        again = self.queue("bounce@example.com")
        self.assertEqual(messages_send_batch().suppressed, 1)
        again.refresh_from_db()
        self.assertEqual(again.status, Message.Status.SUPPRESSED)
        self.assertEqual(len(self.sandbox.messages(to="bounce@example.com")), 1)

    def test_bounce_complaint_and_unsubscribe_webhooks_stop_every_later_send(self) -> None:
        """Issue 4's closing criterion: the sandbox's bounce, complaint and unsubscribe
        webhooks, over HTTP, stop every later send to those addresses (and only those)."""
        stopped = ["bounce@example.com", "complaint@example.com", "unsubscribe@example.com"]
        for email in [*stopped, "ada@example.com"]:
            self.queue(email)
        self.assertEqual(messages_send_batch().sent, 4)
        self.sandbox.wait_for_webhooks(timeout=30)
        self.assertEqual({entry["http_status"] for entry in self.sandbox.webhook_log()}, {200})

        reasons = dict(Suppression.objects.values_list("email", "reason"))
        self.assertEqual(
            reasons,
            {
                "bounce@example.com": Suppression.Reason.HARD_BOUNCE,
                "complaint@example.com": Suppression.Reason.COMPLAINT,
                "unsubscribe@example.com": Suppression.Reason.UNSUBSCRIBE,
            },
        )

        first_webhooks = len(self.sandbox.webhook_log())
        later = [self.queue(email) for email in [*stopped, "ada@example.com"]]
        result = messages_send_batch()
        self.assertEqual((result.suppressed, result.sent), (3, 1))
        # The control message's own Delivery webhook follows asynchronously; wait for it
        # so that its status is a fact, not a race between the sandbox and this assertion.
        self.sandbox.wait_for_webhooks(timeout=30)
        new_webhooks = self.sandbox.webhook_log()[first_webhooks:]
        self.assertEqual(
            [(e["record_type"], e["recipient"], e["http_status"]) for e in new_webhooks],
            [("Delivery", "ada@example.com", 200)],
        )
        for message in later:
            message.refresh_from_db()
        self.assertEqual(
            {m.to_email: m.status for m in later},
            {
                **dict.fromkeys(stopped, Message.Status.SUPPRESSED),
                "ada@example.com": Message.Status.DELIVERED,
            },
        )
        for email in stopped:
            self.assertEqual(len(self.sandbox.messages(to=email)), 1, email)
        self.assertEqual(len(self.sandbox.messages(to="ada@example.com")), 2)
