"""suppression_add / suppression_remove and the recipient's own changes built on them."""

from __future__ import annotations

from django.test import TestCase

from suppression.models import Suppression, SuppressionLogEntry, Topic
from suppression.services import (
    recipient_preferences_save,
    recipient_unsubscribe,
    suppression_add,
    suppression_remove,
)


def rows() -> list[tuple[str, str, str]]:
    return sorted(Suppression.objects.values_list("email", "topic", "reason"))


class SuppressionAddRemoveTests(TestCase):
    def test_add_is_idempotent_keeps_the_first_reason_and_logs_once(self) -> None:
        suppression_add(email="Ada@Example.com ", reason="hard_bounce", source="webhook")
        suppression_add(email="ada@example.com", reason="unsubscribe", source="recipient:one-click")

        self.assertEqual(rows(), [("ada@example.com", "", "hard_bounce")])
        self.assertEqual(SuppressionLogEntry.objects.count(), 1)

    def test_the_mirror_is_updated_only_after_commit(self) -> None:
        with self.captureOnCommitCallbacks() as added:
            suppression_add(email="ada@example.com", reason="unsubscribe", source="test")
        with self.captureOnCommitCallbacks() as removed:
            suppression_remove(email="ada@example.com", reason="test", source="test")
        with self.captureOnCommitCallbacks() as nothing_removed:
            suppression_remove(email="ada@example.com", reason="test", source="test")

        self.assertEqual((len(added), len(removed), len(nothing_removed)), (1, 1, 0))

    def test_remove_needs_a_reason(self) -> None:
        suppression_add(email="ada@example.com", reason="manual", source="test")

        with self.assertRaises(ValueError):
            suppression_remove(email="ada@example.com", reason="  ", source="test")
        self.assertEqual(len(rows()), 1)

    def test_only_reason_lifts_nothing_suppressed_for_another_reason(self) -> None:
        suppression_add(email="ada@example.com", topic="newsletter", reason="complaint", source="webhook")

        lifted = suppression_remove(
            email="ada@example.com",
            topic="newsletter",
            reason="opt in",
            source="t",
            only_reason="unsubscribe",
        )

        self.assertFalse(lifted)
        self.assertEqual(rows(), [("ada@example.com", "newsletter", "complaint")])
        self.assertFalse(SuppressionLogEntry.objects.filter(action="removed").exists())


class RecipientChangesTests(TestCase):
    @classmethod
    def setUpTestData(cls) -> None:
        Topic.objects.create(slug="newsletter", name="Newsletter")
        Topic.objects.create(slug="product-updates", name="Product updates")
        Topic.objects.create(slug="onboarding", name="Getting started", public=False)

    def test_unsubscribe_records_the_message_and_source(self) -> None:
        recipient_unsubscribe(
            email="ada@example.com", topic="newsletter", source="recipient:one-click", message_id=9
        )

        suppression = Suppression.objects.get()
        self.assertEqual(
            (suppression.reason, suppression.source, suppression.detail),
            ("unsubscribe", "recipient:one-click", "via message 9"),
        )

    def test_saving_preferences_reports_and_logs_each_change(self) -> None:
        recipient_unsubscribe(email="ada@example.com", topic="newsletter", source="test")

        changes = recipient_preferences_save(
            email="ada@example.com", subscribed={"newsletter"}, leave_all=True
        )

        self.assertEqual(
            (sorted(changes.opted_out), changes.opted_in), (["", "product-updates"], ["newsletter"])
        )
        self.assertEqual(
            rows(),
            [("ada@example.com", "", "unsubscribe"), ("ada@example.com", "product-updates", "unsubscribe")],
        )
        sources = set(SuppressionLogEntry.objects.exclude(source="test").values_list("source", flat=True))
        self.assertEqual(sources, {"recipient:preferences"})

    def test_topics_that_are_not_public_are_never_touched(self) -> None:
        recipient_unsubscribe(email="ada@example.com", topic="onboarding", source="test")

        changes = recipient_preferences_save(
            email="ada@example.com",
            subscribed={"newsletter", "product-updates", "onboarding"},
            leave_all=False,
        )

        self.assertFalse(changes.changed)
        self.assertEqual(rows(), [("ada@example.com", "onboarding", "unsubscribe")])

    def test_saving_the_same_choices_twice_changes_nothing_the_second_time(self) -> None:
        recipient_preferences_save(email="ada@example.com", subscribed=set(), leave_all=False)

        again = recipient_preferences_save(email="ada@example.com", subscribed=set(), leave_all=False)

        self.assertFalse(again.changed)
        self.assertEqual(SuppressionLogEntry.objects.count(), 2)


class SuppressionUpgradeTests(TestCase):
    """A complaint or bounce after an unsubscribe must not be swallowed by it."""

    def test_a_complaint_after_an_unsubscribe_upgrades_the_entry(self) -> None:
        from suppression.models import Suppression, SuppressionLogEntry
        from suppression.selectors import send_decision
        from suppression.services import suppression_add

        suppression_add(email="ada@example.com", reason="unsubscribe", source="recipient:one-click")
        suppression_add(email="ada@example.com", reason="complaint", source="webhook:postmark")
        entry = Suppression.objects.get(email="ada@example.com", topic="")
        self.assertEqual((entry.reason, entry.source), ("complaint", "webhook:postmark"))
        self.assertEqual(SuppressionLogEntry.objects.filter(email="ada@example.com").count(), 2)
        # Transactional mail stops too now.
        self.assertFalse(
            send_decision(email="ada@example.com", purpose="receipts", transactional=True).allowed
        )

    def test_a_stronger_reason_is_never_downgraded_to_an_unsubscribe(self) -> None:
        from suppression.models import Suppression
        from suppression.services import suppression_add

        suppression_add(email="ada@example.com", reason="hard_bounce", source="webhook:postmark")
        suppression_add(email="ada@example.com", reason="unsubscribe", source="recipient:one-click")
        self.assertEqual(Suppression.objects.get(email="ada@example.com").reason, "hard_bounce")
