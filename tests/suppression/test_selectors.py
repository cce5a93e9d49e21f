"""send_decision (with the database storage) and the preference centre's reads."""

from __future__ import annotations

from django.test import TestCase

from suppression.models import Topic
from suppression.selectors import recipient_preferences, recipient_unsubscribed, send_decision, topic_name
from suppression.services import suppression_add


def suppress(email: str, topic: str = "", reason: str = "unsubscribe") -> None:
    suppression_add(email=email, topic=topic, reason=reason, source="test")


class SendDecisionTests(TestCase):
    def test_an_address_without_suppressions_may_be_emailed(self) -> None:
        self.assertTrue(send_decision(email="ada@example.com", purpose="newsletter").allowed)

    def test_a_topic_unsubscribe_stops_that_topic_only(self) -> None:
        suppress("ada@example.com", "newsletter")

        decision = send_decision(email=" ADA@example.com ", purpose="newsletter")

        self.assertEqual(
            (decision.allowed, decision.reason), (False, "suppressed: unsubscribed (newsletter)")
        )
        self.assertTrue(send_decision(email="ada@example.com", purpose="product-updates").allowed)

    def test_leaving_all_marketing_stops_every_topic_but_not_transactional_mail(self) -> None:
        suppress("ada@example.com")

        self.assertFalse(send_decision(email="ada@example.com", purpose="product-updates").allowed)
        self.assertTrue(
            send_decision(email="ada@example.com", purpose="receipts", transactional=True).allowed
        )

    def test_a_bounce_or_complaint_stops_transactional_mail_too(self) -> None:
        suppress("ada@example.com", reason="hard_bounce")
        suppress("bob@example.com", reason="complaint")

        for email in ("ada@example.com", "bob@example.com"):
            with self.subTest(email=email):
                self.assertFalse(send_decision(email=email, purpose="receipts", transactional=True).allowed)


class RecipientPreferencesTests(TestCase):
    @classmethod
    def setUpTestData(cls) -> None:
        Topic.objects.create(slug="newsletter", name="Newsletter", position=2)
        Topic.objects.create(slug="product-updates", name="Product updates", position=1)
        Topic.objects.create(slug="onboarding", name="Getting started", public=False)

    def test_public_topics_in_order_with_their_state(self) -> None:
        suppress("ada@example.com", "newsletter")
        suppress("ada@example.com", "product-updates", reason="manual")

        prefs = recipient_preferences(email="Ada@example.com")

        self.assertEqual(
            [(t.slug, t.subscribed, t.locked) for t in prefs.topics],
            [("product-updates", False, True), ("newsletter", False, False)],
        )
        self.assertEqual((prefs.left_all, prefs.paused), (False, False))

    def test_leaving_all_and_a_global_block_are_told_apart(self) -> None:
        suppress("ada@example.com")
        suppress("bob@example.com", reason="hard_bounce")

        ada, bob = (
            recipient_preferences(email="ada@example.com"),
            recipient_preferences(email="bob@example.com"),
        )

        self.assertEqual((ada.left_all, ada.paused), (True, False))
        self.assertEqual((bob.left_all, bob.paused), (False, True))

    def test_unsubscribed_and_topic_names(self) -> None:
        suppress("ada@example.com", "newsletter")

        self.assertTrue(recipient_unsubscribed(email="ADA@example.com", topic="newsletter"))
        self.assertFalse(recipient_unsubscribed(email="ada@example.com", topic=""))
        self.assertEqual(topic_name("newsletter"), "Newsletter")
        self.assertEqual(topic_name("unknown-purpose"), "unknown-purpose")
        self.assertEqual(topic_name(""), "all marketing email")


class SendDecisionsBulkTests(TestCase):
    """The batch form answers exactly what send_decision answers, in two queries."""

    def test_bulk_answers_match_one_by_one(self) -> None:
        from suppression.selectors import DecisionRequest, send_decision, send_decisions
        from suppression.services import suppression_add

        suppression_add(email="bounced@example.com", reason="hard_bounce", source="test")
        suppression_add(email="left@example.com", reason="unsubscribe", source="test")
        suppression_add(email="topic@example.com", reason="unsubscribe", source="test", topic="news")
        requests = [
            DecisionRequest(email=email, purpose=purpose, transactional=transactional)
            for email in ("Bounced@example.com", "left@example.com", "topic@example.com", "fine@example.com")
            for purpose in ("news", "marketing")
            for transactional in (False, True)
        ]
        with self.assertNumQueries(2):
            bulk = send_decisions(requests)
        for request in requests:
            expected = send_decision(
                email=request.email,
                purpose=request.purpose,
                transactional=request.transactional,
                authoritative=True,
            )
            self.assertEqual(bulk[request], expected, request)
        self.assertFalse(bulk[DecisionRequest("Bounced@example.com", "news", True)].allowed)
        self.assertTrue(bulk[DecisionRequest("left@example.com", "news", True)].allowed)
        self.assertFalse(bulk[DecisionRequest("topic@example.com", "news", False)].allowed)
        self.assertTrue(bulk[DecisionRequest("topic@example.com", "marketing", False)].allowed)
