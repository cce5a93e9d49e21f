"""Batch sending through Postmark's /email/batch, per-message results mapped back."""

from __future__ import annotations

from unittest import mock

from campaigns.delivery import messages_send_batch
from campaigns.models import Message
from suppression.models import Suppression
from tests import factories
from tests.campaigns.test_delivery import SandboxTestCase


class BatchSendTests(SandboxTestCase):
    def make(self, emails: list[str]) -> list[Message]:
        return [
            factories.message(self.version, factories.contact(email=email), self.event) for email in emails
        ]

    def test_many_messages_go_in_one_request_each_with_its_own_result(self) -> None:
        messages = self.make([f"p{n}@example.com" for n in range(5)])
        result = messages_send_batch()
        self.assertEqual((result.sent, result.requests), (5, 1))
        self.assertEqual((self.sandbox.stats()["requests"], self.sandbox.stats()["batch_requests"]), (1, 1))
        by_recipient = {m["to"][0]: m["message_id"] for m in self.sandbox.messages()}
        for message in messages:
            message.refresh_from_db()
            self.assertEqual(message.status, Message.Status.SENT)
            self.assertEqual(message.esp_message_id, by_recipient[message.to_email])
        self.assertEqual(len(set(by_recipient.values())), 5)

    def test_one_refused_recipient_fails_alone(self) -> None:
        good1, bad, good2 = self.make(["a@example.com", "inactive@example.com", "b@example.com"])
        result = messages_send_batch()
        self.assertEqual((result.sent, result.failed, result.requests), (2, 1, 1))
        for message, status in ((good1, "sent"), (bad, "failed"), (good2, "sent")):
            message.refresh_from_db()
            self.assertEqual(message.status, status)
        self.assertTrue(Suppression.objects.filter(email="inactive@example.com").exists())

    def test_a_rate_limited_batch_retries_every_message(self) -> None:
        messages = self.make(["a@example.com", "b@example.com"])
        self.sandbox.set_faults(fail_429=1)
        result = messages_send_batch()
        self.assertEqual(result.retrying, 2)
        for message in messages:
            message.refresh_from_db()
            self.assertEqual(message.status, Message.Status.QUEUED)
            self.assertIn("429", message.status_reason)

    def test_a_dropped_batch_answer_makes_every_message_unknown(self) -> None:
        messages = self.make(["a@example.com", "b@example.com"])
        self.sandbox.set_faults(drop=1)
        result = messages_send_batch()
        self.assertEqual(result.unknown, 2)
        for message in messages:
            message.refresh_from_db()
            self.assertEqual(message.status, Message.Status.UNKNOWN)
        self.assertEqual(len(self.sandbox.messages()), 2)  # the ESP has them; we must not resend

    def test_more_than_500_messages_take_two_requests(self) -> None:
        contacts = [factories.contact(email=f"bulk{n}@example.com") for n in range(501)]
        Message.objects.bulk_create(
            [
                Message(
                    idempotency_key=f"bulk-{n}",
                    template_version=self.version,
                    contact=contact,
                    to_email=contact.email,
                    event=self.event,
                    purpose="marketing",
                )
                for n, contact in enumerate(contacts)
            ]
        )
        result = messages_send_batch(limit=501)
        self.assertEqual((result.sent, result.requests), (501, 2))
        self.assertEqual(len(self.sandbox.messages()), 501)
        self.assertEqual(self.sandbox.stats()["batch_requests"], 2)

    def test_esps_without_a_batch_endpoint_send_one_request_per_message(self) -> None:
        self.make(["a@example.com", "b@example.com", "c@example.com"])
        with mock.patch.dict("campaigns.esp_batch.BATCH_SENDERS", {}, clear=True):
            result = messages_send_batch()
        self.assertEqual((result.sent, result.requests), (3, 3))
        self.assertEqual(len(self.sandbox.messages()), 3)
        self.assertEqual(self.sandbox.stats()["batch_requests"], 0)
