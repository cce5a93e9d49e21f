"""The beat sweeper: it finds what lost nudges, dead workers and delays left behind."""

from __future__ import annotations

from datetime import timedelta
from unittest import mock

from django.core.cache import cache
from django.test import TestCase
from django.utils import timezone

from campaigns.models import Message
from campaigns.tasks import sweep_outbox
from mailauto.lib import nudge
from tests import factories


class SweepTests(TestCase):
    @classmethod
    def setUpTestData(cls) -> None:
        cls.type = factories.event_type()
        cls.contact = factories.contact()
        cls.version = factories.published_version()

    def run_sweep(self) -> tuple[mock.Mock, mock.Mock]:
        with (
            mock.patch("campaigns.tasks.events_process.apply_async") as events,
            mock.patch("campaigns.tasks.messages_send.apply_async") as sends,
        ):
            sweep_outbox()
        return events, sends

    def test_nothing_due_nudges_nothing(self) -> None:
        factories.message(self.version, self.contact, send_after=timezone.now() + timedelta(hours=1))
        events, sends = self.run_sweep()
        events.assert_not_called()
        sends.assert_not_called()

    def test_pending_event_whose_nudge_was_lost_is_picked_up(self) -> None:
        factories.outbox_event(self.type, self.contact.user_id)
        events, sends = self.run_sweep()
        events.assert_called_once()
        sends.assert_not_called()

    def test_delayed_message_that_became_due_is_sent(self) -> None:
        factories.message(self.version, self.contact, send_after=timezone.now() - timedelta(seconds=1))
        _, sends = self.run_sweep()
        sends.assert_called_once()

    def test_a_marker_left_by_a_killed_drain_does_not_hold_up_the_sweeper(self) -> None:
        # A worker SIGKILLed mid-drain leaves its slot's marker held for HOLD_TTL_SECONDS;
        # the sweeper, the way back after a crash, must not wait for it to expire.
        nudge.take("sends")
        nudge.take("events")
        self.addCleanup(cache.delete_many, ["mailauto:nudge:sends", "mailauto:nudge:events"])
        factories.outbox_event(self.type, self.contact.user_id)
        factories.message(self.version, self.contact)
        events, sends = self.run_sweep()
        events.assert_called_once_with(retry=False)
        sends.assert_called_once_with(retry=False)

    def test_expired_sending_lease_becomes_unknown(self) -> None:
        message = factories.message(
            self.version,
            self.contact,
            status=Message.Status.SENDING,
            locked_until=timezone.now() - timedelta(seconds=1),
        )
        self.run_sweep()
        message.refresh_from_db()
        self.assertEqual(message.status, Message.Status.UNKNOWN)
