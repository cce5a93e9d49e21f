"""Batch sending through Postmark's /email/batch and Resend's /emails/batch, over real
HTTP to the sandbox, per-message results mapped back."""

from __future__ import annotations

import json
from collections import Counter
from typing import Any
from unittest import mock

import requests
from anymail.backends.resend import EmailBackend as AnymailResendBackend
from anymail.exceptions import (
    AnymailAPIError,
    AnymailInvalidAddress,
    AnymailRequestsAPIError,
    AnymailUnsupportedFeature,
)
from anymail.message import AnymailMessage
from django.conf import settings
from django.core.mail import get_connection
from django.test import SimpleTestCase, override_settings

from campaigns.delivery import ErrorKind, classify_send_error, messages_send_batch
from campaigns.esp_batch import BatchItemResult, PostmarkBatchSender, ResendBatchSender, batch_sender_for
from campaigns.esp_idempotency import apply_idempotency_key, batch_idempotency_key, esp_idempotency_key
from campaigns.models import Message
from mailauto.sandbox import DEFAULT_SERVER_TOKEN
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
        queue_bulk(501, version=self.version, event=self.event, key="bulk")
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


class PostmarkPayloadTests(SimpleTestCase):
    """PostmarkBatchSender builds each payload with the From parse remembered: the JSON
    must be exactly what Anymail's own backend builds, whatever the From."""

    FROMS = (
        "mailauto demo <hello@mailauto.test>",
        "plain@example.com",
        "Zoë Ünïcode-Händler <hello@example.com>",
        '"Shop, Inc." <shop@example.com>',
        "=?utf-8?q?Caf=C3=A9?= <cafe@example.com>",
        "Bücher <news@bücher.example>",
        "news@xn--bcher-kva.example",
        "First <a@example.com>, second@example.com",
    )

    backend: Any  # an anymail.backends.postmark.EmailBackend

    def setUp(self) -> None:
        self.backend = get_connection(
            "anymail.backends.postmark.EmailBackend", server_token="t", api_url="http://127.0.0.1:9/"
        )
        sender = batch_sender_for(self.backend)
        assert isinstance(sender, PostmarkBatchSender)
        self.sender = sender

    def email(self, from_email: Any, to: str = "Ada Lovelace <ada@example.com>") -> AnymailMessage:
        email = AnymailMessage(
            subject="Hi", body="text", from_email=from_email, to=[to], metadata={"m": "1"}, tags=["t"]
        )
        email.attach_alternative("<p>html</p>", "text/html")
        return email

    def assert_same_payload(self, email: AnymailMessage) -> None:
        anymails = self.backend.build_message_payload(email, self.backend.send_defaults).serialize_data()
        self.assertEqual(self.sender.build_payload(email).serialize_data(), anymails)

    def test_payloads_are_anymails_own_for_every_kind_of_from(self) -> None:
        # Twice round, so a remembered parse of one From is never reused for another.
        for from_email in self.FROMS * 2:
            for to in ("ada@example.com", "Zoë <zoe@exämple.test>", '"Doe, J." <j@example.com>'):
                with self.subTest(from_email=from_email, to=to):
                    self.assert_same_payload(self.email(from_email, to))

    def test_the_idna_encoder_still_applies_to_a_remembered_from(self) -> None:
        email = self.email("Bücher <news@bücher.example>")
        self.sender.build_payload(email)  # remembered, encoded with the default encoder
        self.backend = get_connection(
            "anymail.backends.postmark.EmailBackend",
            server_token="t",
            api_url="http://127.0.0.1:9/",
            idna_encoder=lambda domain: "encoded.example",
        )
        self.sender = PostmarkBatchSender(self.backend)
        self.assert_same_payload(email)
        self.assertEqual(self.sender.build_payload(email).data["From"], "Bücher <news@encoded.example>")

    def test_a_lazy_from_is_parsed_as_anymail_does(self) -> None:
        from django.utils.functional import lazy

        self.assert_same_payload(self.email(lazy(lambda: "Lazy <lazy@example.com>", str)()))

    def test_an_invalid_from_fails_as_in_anymail_every_time(self) -> None:
        for _ in range(2):
            email = self.email("not an address <>")
            with self.assertRaises(AnymailInvalidAddress) as anymails:
                self.backend.build_message_payload(email, self.backend.send_defaults)
            with self.assertRaises(AnymailInvalidAddress) as ours:
                self.sender.build_payload(email)
            self.assertEqual(str(ours.exception), str(anymails.exception))

    def test_the_sender_sends_what_it_built(self) -> None:
        email = self.email("Zoë <hello@example.com>")
        expected = self.backend.build_message_payload(email, self.backend.send_defaults).data
        with mock.patch.object(PostmarkBatchSender, "_post", side_effect=AnymailAPIError("stop")) as post:
            self.sender.send([email])
        self.assertEqual(post.call_args.args[0], [expected])


# --- Resend's /emails/batch ----------------------------------------------------------------


class ResendSandboxTestCase(SandboxTestCase):
    """The same sandbox, speaking Resend: settings as MAILAUTO_ESP=resend would make them
    (mailauto/settings.py picks the idempotent backend), pointed at the sandbox."""

    def setUp(self) -> None:
        super().setUp()
        override = override_settings(
            ESP_NAME="resend",
            EMAIL_BACKEND="campaigns.esp_idempotency.ResendEmailBackend",
            ANYMAIL={
                **settings.ANYMAIL,
                "RESEND_API_KEY": DEFAULT_SERVER_TOKEN,
                "RESEND_API_URL": self.sandbox.url,
            },
        )
        override.enable()
        self.addCleanup(override.disable)

    def make(self, emails: list[str]) -> list[Message]:
        return [
            factories.message(self.version, factories.contact(email=email), self.event) for email in emails
        ]

    def anymail_email(self, to: str, key: str, *, after_unknown: bool = False, **kw: Any) -> AnymailMessage:
        email = AnymailMessage(
            subject=kw.pop("subject", "Hello"),
            body="Hi",
            from_email="shop@example.com",
            to=[to],
            metadata={"to": to},
            **kw,
        )
        apply_idempotency_key(email, message_key=key, esp_name="resend", after_unknown=after_unknown)
        return email

    def sender(self) -> ResendBatchSender:
        connection = get_connection()
        connection.open()
        self.addCleanup(connection.close)
        sender = batch_sender_for(connection)
        assert isinstance(sender, ResendBatchSender)
        return sender


class ResendBatchSendTests(ResendSandboxTestCase):
    def test_the_resend_backend_gets_the_resend_batch_sender(self) -> None:
        self.assertEqual(self.sender().max_batch, 100)
        self.assertIsInstance(batch_sender_for(AnymailResendBackend(api_key="k")), ResendBatchSender)

    def test_many_messages_go_in_one_request_each_with_its_own_id(self) -> None:
        messages = self.make([f"r{n}@example.com" for n in range(5)])
        result = messages_send_batch()
        self.assertEqual((result.sent, result.requests), (5, 1))
        stats = self.sandbox.stats()
        self.assertEqual((stats["requests"], stats["batch_requests"]), (1, 1))
        recorded = self.sandbox.messages()
        self.assertEqual({m["endpoint"] for m in recorded}, {"emails/batch"})
        by_recipient = {m["to"][0]: m for m in recorded}
        for message in messages:
            message.refresh_from_db()
            self.assertEqual(message.status, Message.Status.SENT)
            accepted = by_recipient[message.to_email]
            self.assertEqual(message.esp_message_id, accepted["message_id"])
            # Built by Anymail's Resend backend: metadata in X-Metadata, tags in X-Tags.
            self.assertEqual(accepted["metadata"], {"mailauto_message_id": str(message.pk)})
            self.assertEqual(accepted["tag"], "marketing")
        self.assertEqual(len({m["message_id"] for m in recorded}), 5)

    def test_a_message_the_sweeper_resends_after_unknown_goes_alone(self) -> None:
        """The delivery path passes Message.resent_after_unknown to the ESP layer: the
        resend leaves the batch and goes to POST /emails under the message's own key."""
        fresh = self.make(["fresh1@example.com", "fresh2@example.com"])
        [resend] = self.make(["resent@example.com"])
        Message.objects.filter(pk=resend.pk).update(resent_after_unknown=True)
        result = messages_send_batch()
        self.assertEqual(result.sent, 3)
        endpoints = {m["to"][0]: (m["endpoint"], m["idempotency_key"]) for m in self.sandbox.messages()}
        self.assertEqual(
            endpoints["resent@example.com"], ("emails", esp_idempotency_key(resend.idempotency_key))
        )
        self.assertEqual(endpoints["fresh1@example.com"][0], "emails/batch")
        self.assertEqual(endpoints["fresh1@example.com"], endpoints["fresh2@example.com"])
        for message in [*fresh, resend]:
            message.refresh_from_db()
            self.assertEqual(message.status, Message.Status.SENT)

    def test_one_invalid_message_fails_alone(self) -> None:
        good1, bad, good2 = self.make(["a@example.com", "someone@bad_domain.example", "b@example.com"])
        result = messages_send_batch()
        self.assertEqual((result.sent, result.failed, result.requests), (2, 1, 1))
        for message, status in ((good1, "sent"), (bad, "failed"), (good2, "sent")):
            message.refresh_from_db()
            self.assertEqual(message.status, status)
        self.assertIn("recipient refused", bad.status_reason)
        self.assertEqual(
            sorted(m["to"][0] for m in self.sandbox.messages()), ["a@example.com", "b@example.com"]
        )
        # The ids went to the right messages although the answer skipped the bad one.
        by_recipient = {m["to"][0]: m["message_id"] for m in self.sandbox.messages()}
        self.assertEqual(good2.esp_message_id, by_recipient["b@example.com"])

    def test_invalid_messages_are_mapped_back_by_their_position(self) -> None:
        addresses = [
            "x@bad_one.example",
            "a@example.com",
            "b@example.com",
            "y@bad_two.example",
            "c@example.com",
        ]
        emails = [self.anymail_email(to, f"pos-{n}") for n, to in enumerate(addresses)]
        results = self.sender().send(emails)
        recorded = {m["to"][0]: m["message_id"] for m in self.sandbox.messages()}
        self.assertEqual(
            [r.esp_message_id for r in results],
            ["", recorded["a@example.com"], recorded["b@example.com"], "", recorded["c@example.com"]],
        )
        self.assertEqual(
            [type(r.error).__name__ for r in results],
            ["AnymailRecipientsRefused", "NoneType", "NoneType", "AnymailRecipientsRefused", "NoneType"],
        )

    def test_a_message_anymail_cannot_build_fails_alone_before_the_request(self) -> None:
        bad = self.anymail_email("a@example.com", "k-1")
        bad.attach("notes.txt", b"hi", "text/plain")  # attachments: not in a Resend batch
        results = self.sender().send([bad, self.anymail_email("b@example.com", "k-2")])
        self.assertIsInstance(results[0].error, AnymailUnsupportedFeature)
        self.assertTrue(results[1].esp_message_id)
        self.assertEqual(len(self.sandbox.messages()), 1)

    def test_a_rate_limited_batch_retries_every_message(self) -> None:
        messages = self.make(["a@example.com", "b@example.com"])
        self.sandbox.set_faults(fail_429=1, retry_after=3)
        result = messages_send_batch()
        self.assertEqual(result.retrying, 2)
        for message in messages:
            message.refresh_from_db()
            self.assertEqual(message.status, Message.Status.QUEUED)
            self.assertIn("429", message.status_reason)
        self.assertEqual(self.sandbox.messages(), [])

    def test_a_server_error_retries_every_message(self) -> None:
        for fault in ("fail_500", "fail_503"):
            with self.subTest(fault):
                messages = self.make(["a@example.com", "b@example.com"])
                self.sandbox.set_faults(**{fault: 1})
                result = messages_send_batch()
                self.assertEqual(result.retrying, 2)
                for message in messages:
                    message.refresh_from_db()
                    self.assertEqual(message.status, Message.Status.QUEUED)
                    self.assertIn(fault.removeprefix("fail_"), message.status_reason)
                Message.objects.filter(pk__in=[m.pk for m in messages]).delete()

    def test_429_and_5xx_are_classified_as_for_postmark(self) -> None:
        # Any answer carrying Retry-After (a 429, or a 5xx) says "slow down" and feeds the
        # adaptive rate; a 5xx without it is an ordinary retry. The sandbox sends
        # Retry-After on 429 and 503 only, so the 500 here carries none.
        for fault, retry_after, has_header in (
            ("fail_429", 7, True),
            ("fail_500", 7, False),
            ("fail_503", 7, True),
            ("fail_503", None, False),
        ):
            with self.subTest(fault, retry_after=retry_after):
                self.sandbox.set_faults(**{fault: 1}, retry_after=retry_after)
                [item] = self.sender().send([self.anymail_email("a@example.com", f"c-{fault}-{retry_after}")])
                assert item.error is not None
                self.assertIsInstance(item.error, AnymailRequestsAPIError)
                self.assertEqual("Retry-After" in item.error.response.headers, has_header)  # type: ignore[attr-defined]
                verdict = classify_send_error(item.error)
                self.assertEqual(verdict.kind, ErrorKind.RETRYABLE)
                self.assertEqual(verdict.rate_limited, fault == "fail_429" or has_header)
                self.assertEqual(verdict.retry_after, 7.0 if has_header else None)

    def test_a_dropped_batch_answer_makes_every_message_unknown(self) -> None:
        messages = self.make(["a@example.com", "b@example.com"])
        self.sandbox.set_faults(drop=1)
        result = messages_send_batch()
        self.assertEqual(result.unknown, 2)
        for message in messages:
            message.refresh_from_db()
            self.assertEqual(message.status, Message.Status.UNKNOWN)
        self.assertEqual(len(self.sandbox.messages()), 2)  # the ESP has them; we must not resend

    def test_the_batch_sends_one_idempotency_key_for_its_set_of_messages(self) -> None:
        messages = self.make(["a@example.com", "b@example.com", "c@example.com"])
        messages_send_batch()
        expected = batch_idempotency_key(esp_idempotency_key(m.idempotency_key) for m in messages)
        self.assertEqual({m["idempotency_key"] for m in self.sandbox.messages()}, {expected})

    def test_a_retried_ambiguous_batch_is_replayed_not_sent_twice(self) -> None:
        sender = self.sender()
        self.sandbox.set_faults(drop=1)
        first = sender.send([self.anymail_email(f"{n}@example.com", f"amb-{n}") for n in range(3)])
        self.assertTrue(all(isinstance(r.error, AnymailRequestsAPIError) for r in first))
        again = sender.send([self.anymail_email(f"{n}@example.com", f"amb-{n}") for n in range(3)])
        recorded = self.sandbox.messages()
        self.assertEqual(len(recorded), 3)
        self.assertEqual([r.esp_message_id for r in again], [m["message_id"] for m in recorded])
        self.assertEqual(self.sandbox.stats()["idempotent_replays"], 1)

    def test_a_message_resent_after_unknown_goes_alone_with_its_own_key(self) -> None:
        sender = self.sender()
        self.sandbox.set_faults(drop=1)
        first = sender.send([self.anymail_email(f"{n}@example.com", f"unk-{n}") for n in "abc"])
        self.assertTrue(all(isinstance(r.error, AnymailRequestsAPIError) for r in first))
        first_key = batch_idempotency_key(esp_idempotency_key(f"unk-{n}") for n in "abc")

        # After the grace period: "a" is resent, among messages it was never with.
        resend = self.anymail_email("a@example.com", "unk-a", after_unknown=True)
        again = sender.send(
            [
                self.anymail_email("d@example.com", "unk-d"),
                resend,
                self.anymail_email("e@example.com", "unk-e"),
            ]
        )
        recorded = self.sandbox.messages()
        by_recipient: dict[str, list[dict[str, Any]]] = {}
        for m in recorded:
            by_recipient.setdefault(m["to"][0], []).append(m)
        # The resend went alone, to POST /emails, under the message's own key.
        self.assertEqual(
            [(m["endpoint"], m["idempotency_key"]) for m in by_recipient["a@example.com"]],
            [("emails/batch", first_key), ("emails", esp_idempotency_key("unk-a"))],
        )
        # (The first copy above carried the first batch's key, which no later request can
        # repeat: covering it is the job of the webhooks and the grace period.)
        # The new messages kept their batch, whose key names them alone.
        new_key = batch_idempotency_key(esp_idempotency_key(f"unk-{n}") for n in "de")
        for to in ("d@example.com", "e@example.com"):
            [m] = by_recipient[to]
            self.assertEqual((m["endpoint"], m["idempotency_key"]), ("emails/batch", new_key))
        self.assertEqual(
            [r.esp_message_id for r in again],
            [
                by_recipient[to][-1]["message_id"]
                for to in ("d@example.com", "a@example.com", "e@example.com")
            ],
        )
        self.assertEqual(resend.anymail_status.message_id, again[1].esp_message_id)

    def test_every_attempt_of_a_message_sent_alone_carries_its_own_key(self) -> None:
        sender = self.sender()

        def attempt(*companions: str) -> BatchItemResult:
            emails = [self.anymail_email(to, f"own-{to}") for to in companions]
            emails.insert(1, self.anymail_email("a@example.com", "own-a", after_unknown=True))
            return sender.send(emails)[1]

        self.sandbox.set_faults(drop=1)  # the first request is the message sent alone
        dropped = attempt("x@example.com")
        self.assertEqual(classify_send_error(dropped.error).kind, ErrorKind.AMBIGUOUS)  # type: ignore[arg-type]
        replayed = attempt("y@example.com", "z@example.com")  # other companions
        self.sandbox.set_faults(fail_503=1)
        refused = attempt("w@example.com")
        self.assertEqual(getattr(refused.error, "status_code", None), 503)
        replayed_again = attempt("v@example.com")

        # Every attempt after the first was answered with the first one's email: same key
        # and same request each time, whatever was sent with it; Resend holds it once.
        [held] = [m for m in self.sandbox.messages() if m["to"] == ["a@example.com"]]
        self.assertEqual(
            (held["endpoint"], held["idempotency_key"]), ("emails", esp_idempotency_key("own-a"))
        )
        self.assertEqual(
            (replayed.esp_message_id, replayed_again.esp_message_id), (held["message_id"], held["message_id"])
        )
        self.assertEqual(self.sandbox.stats()["idempotent_replays"], 2)

    def test_a_message_sent_alone_fails_alone(self) -> None:
        bad = self.anymail_email("someone@bad_domain.example", "alone-bad", after_unknown=True)
        good = self.anymail_email("b@example.com", "alone-good")
        results = self.sender().send([bad, good])
        self.assertEqual(classify_send_error(results[0].error).kind, ErrorKind.PERMANENT)  # type: ignore[arg-type]
        self.assertEqual([m["to"] for m in self.sandbox.messages()], [["b@example.com"]])
        self.assertEqual(results[1].esp_message_id, self.sandbox.messages()[0]["message_id"])

    def test_the_same_messages_with_a_changed_body_are_refused_as_a_whole_not_resent(self) -> None:
        sender = self.sender()
        sender.send(
            [self.anymail_email("a@example.com", "chg-1"), self.anymail_email("b@example.com", "chg-2")]
        )
        again = sender.send(
            [
                self.anymail_email("a@example.com", "chg-1", subject="Hello again"),
                self.anymail_email("b@example.com", "chg-2"),
            ]
        )
        for item in again:
            self.assertIsInstance(item.error, AnymailRequestsAPIError)
            self.assertEqual(getattr(item.error, "status_code", None), 409)
            # The ESP has these messages: held as unknown, never failed or blindly resent.
            self.assertEqual(classify_send_error(item.error).kind, ErrorKind.AMBIGUOUS)
        self.assertEqual(len(self.sandbox.messages()), 2)

    def test_more_than_100_messages_take_two_requests_of_at_most_100(self) -> None:
        queue_bulk(101, version=self.version, event=self.event, key="resend-bulk")
        result = messages_send_batch(limit=101)
        self.assertEqual((result.sent, result.requests), (101, 2))
        self.assertEqual(self.sandbox.stats()["batch_requests"], 2)
        per_request = Counter(m["idempotency_key"] for m in self.sandbox.messages())
        self.assertEqual(sorted(per_request.values()), [1, 100])


class ResendAnswerParsingTests(SimpleTestCase):
    """Answers the sandbox never gives: anything that cannot be mapped position by
    position is ambiguous for every message, never guessed."""

    def parse(self, answer: object, *, expected: int) -> list[BatchItemResult]:
        response = requests.Response()
        response.status_code = 200
        response._content = json.dumps(answer).encode()
        return ResendBatchSender(backend=None)._parse(response, expected=expected)

    def test_ids_fill_the_positions_the_errors_leave(self) -> None:
        results = self.parse(
            {"data": [{"id": "a"}, {"id": "c"}], "errors": [{"index": 1, "message": "Missing `subject`"}]},
            expected=3,
        )
        self.assertEqual([r.esp_message_id for r in results], ["a", "", "c"])
        self.assertEqual(classify_send_error(results[1].error).kind, ErrorKind.PERMANENT)  # type: ignore[arg-type]

    def test_answers_that_do_not_match_the_request_are_refused(self) -> None:
        for answer in (
            {"data": [{"id": "a"}]},  # one id for two messages
            {"data": [{"id": "a"}, {"id": "b"}], "errors": [{"index": 0, "message": "x"}]},  # too many
            {"data": [{"id": "a"}], "errors": [{"index": 2, "message": "x"}]},  # index out of range
            {"data": [], "errors": [{"index": 0, "message": "x"}, {"index": 0, "message": "x"}]},
            {"data": [{"id": ""}, {"id": "b"}]},
            [{"id": "a"}, {"id": "b"}],
        ):
            with self.subTest(answer=answer), self.assertRaises(AnymailAPIError) as caught:
                self.parse(answer, expected=2)
            self.assertEqual(classify_send_error(caught.exception).kind, ErrorKind.AMBIGUOUS)


def queue_bulk(count: int, *, version: object, event: object, key: str) -> None:
    """`count` queued messages, each to a contact of its own."""
    contacts = [factories.contact(email=f"bulk{n}@example.com") for n in range(count)]
    Message.objects.bulk_create(
        Message(
            idempotency_key=f"{key}-{n}",
            template_version=version,
            contact=contact,
            to_email=contact.email,
            event=event,
            purpose="marketing",
        )
        for n, contact in enumerate(contacts)
    )
