"""The reputation guard: bounce and complaint rates, and the automatic pause."""

from __future__ import annotations

import io
import itertools
import json
from datetime import UTC, date, datetime, timedelta

import time_machine
from django.conf import settings
from django.core.management import call_command
from django.db import connection
from django.test import TestCase, override_settings

from campaigns.models import Automation, Message, TemplateVersion
from suppression import compliance_tasks
from suppression.reputation import (
    BOUNCE_EVENTS,
    COMPLAINT_EVENTS,
    SOURCES,
    reputation_check,
    reputation_report,
    source_figures,
)
from tests import factories
from tests.webhooks.postmark import URL as POSTMARK_TRACKING_URL
from tests.webhooks.postmark import basic_auth, for_message, iso
from webhooks.models import TrackingEvent

NOW = datetime(2025, 3, 10, 12, 0, tzinfo=UTC)
_keys = itertools.count(1)
EventType = TrackingEvent.EventType
# How long after the send the ESP reports a bounce or complaint, unless a test says.
REPORTED_AFTER = timedelta(minutes=1)
# The event that put a message in each of these statuses.
EVENT_FOR_STATUS = {
    Message.Status.BOUNCED: EventType.BOUNCED,
    Message.Status.COMPLAINED: EventType.COMPLAINED,
}


def report(messages: list[Message], event_type: str, at: datetime | None = None) -> None:
    """The ESP reports `event_type` for each message, at `at` (default: REPORTED_AFTER
    its send), as the webhook would store it."""
    TrackingEvent.objects.bulk_create(
        TrackingEvent(
            esp="postmark",
            esp_event_id=f"rep-{next(_keys)}",
            event_type=event_type,
            bounce_kind=TrackingEvent.BounceKind.HARD if event_type == EventType.BOUNCED else "",
            message=message,
            recipient=message.to_email,
            occurred_at=at or message.sent_at + REPORTED_AFTER,
            received_at=at or message.sent_at + REPORTED_AFTER,
        )
        for message in messages
    )


def report_by_status(messages: list[Message], at: datetime | None = None) -> None:
    """The bounce or complaint event behind each bounced or complained message."""
    if messages and messages[0].status in EVENT_FOR_STATUS:
        report(messages, EVENT_FOR_STATUS[messages[0].status], at)


def limits(**options: object) -> override_settings:
    return override_settings(
        MAILAUTO={
            **settings.MAILAUTO,
            "REPUTATION_COMPLAINT_RATE": 0.003,
            "REPUTATION_BOUNCE_RATE": 0.05,
            "REPUTATION_MIN_VOLUME": 100,
            "REPUTATION_WINDOW_HOURS": 24,
            **options,
        }
    )


@time_machine.travel(NOW, tick=False)
class ReputationTestCase(TestCase):
    @classmethod
    def setUpTestData(cls) -> None:
        cls.trigger = factories.event_type()
        cls.version = factories.published_version()
        cls.welcome = factories.automation(cls.trigger, cls.version, name="Welcome")
        cls.digest = factories.automation(cls.trigger, factories.published_version(), name="Digest")

    def send(
        self,
        automation: Automation | None,
        count: int,
        status: str = Message.Status.DELIVERED,
        ago: timedelta | None = timedelta(hours=1),
        reported_at: datetime | None = None,
    ) -> list[Message]:
        """`count` messages of `automation` in `status`, handed over `ago` before NOW
        (None: never handed over). Bounced or complained ones come with the event that
        reported it, at `reported_at` (default: REPORTED_AFTER the send)."""
        version = (
            TemplateVersion.objects.filter(template=automation.template).first()
            if automation
            else self.version
        )
        messages = Message.objects.bulk_create(
            Message(
                idempotency_key=f"rep-{next(_keys)}",
                automation=automation,
                to_email=f"r{n}@example.com",
                template_version=version,
                purpose="marketing",
                status=status,
                sent_at=None if ago is None else NOW - ago,
            )
            for n in range(count)
        )
        report_by_status(messages, reported_at)
        return messages


class RateTests(ReputationTestCase):
    def test_rates_count_only_messages_handed_to_the_esp_in_the_window(self) -> None:
        self.send(self.welcome, 190)
        self.send(self.welcome, 6, Message.Status.BOUNCED)
        self.send(self.welcome, 2, Message.Status.COMPLAINED)
        self.send(self.welcome, 2, Message.Status.OPENED)
        # Not handed over: not in the denominator.
        self.send(self.welcome, 50, Message.Status.QUEUED, ago=None)
        self.send(self.welcome, 30, Message.Status.SUPPRESSED)
        self.send(self.welcome, 20, Message.Status.FAILED)
        # Outside the window.
        self.send(self.welcome, 40, Message.Status.BOUNCED, ago=timedelta(hours=25))

        (figures,) = source_figures(source=SOURCES[0], since=NOW - timedelta(hours=24), until=NOW)

        self.assertEqual((figures.source_id, figures.name), (self.welcome.pk, "Welcome"))
        self.assertEqual((figures.handed_over, figures.bounced, figures.complained), (200, 6, 2))
        self.assertAlmostEqual(figures.bounce_rate, 0.03)
        self.assertAlmostEqual(figures.complaint_rate, 0.01)

    def test_each_automation_has_its_own_figures(self) -> None:
        self.send(self.welcome, 10, Message.Status.COMPLAINED)
        self.send(self.digest, 10)
        self.send(None, 10, Message.Status.COMPLAINED)  # automation deleted: no source

        figures = {
            f.name: f.complained
            for f in source_figures(source=SOURCES[0], since=NOW - timedelta(days=1), until=NOW)
        }
        self.assertEqual(figures, {"Welcome": 10, "Digest": 0})

    def test_a_message_that_bounced_and_drew_a_complaint_counts_as_both(self) -> None:
        # Its status shows only the complaint (the highest state); the events show both.
        self.send(self.welcome, 98)
        both = self.send(self.welcome, 2, Message.Status.COMPLAINED)
        report(both, EventType.BOUNCED)
        # A complaint the ESP reports again under another event id is one complaint.
        report(both, EventType.COMPLAINED, at=NOW - timedelta(minutes=5))

        (figures,) = source_figures(source=SOURCES[0], since=NOW - timedelta(hours=24), until=NOW)

        self.assertEqual((figures.handed_over, figures.bounced, figures.complained), (100, 2, 2))

    def test_every_event_that_makes_a_message_bounced_counts_as_a_bounce(self) -> None:
        # As Message.status counts them: bounces (soft ones too) and the ESP's own
        # rejections and failures. Deferrals and other events count for nothing.
        self.send(self.welcome, 94)
        for event_type in (
            EventType.BOUNCED,
            EventType.REJECTED,
            EventType.FAILED,
            EventType.DEFERRED,
            EventType.UNSUBSCRIBED,
            EventType.OPENED,
        ):
            report(self.send(self.welcome, 1), event_type)
        TrackingEvent.objects.filter(event_type=EventType.BOUNCED).update(
            bounce_kind=TrackingEvent.BounceKind.SOFT
        )

        (figures,) = source_figures(source=SOURCES[0], since=NOW - timedelta(hours=24), until=NOW)

        self.assertEqual((figures.handed_over, figures.bounced, figures.complained), (100, 3, 0))

    def test_figures_take_two_queries_per_kind_of_source(self) -> None:
        for n in range(5):
            automation = factories.automation(self.trigger, self.version, name=f"Drip {n}")
            self.send(automation, 10)
            self.send(automation, 1, Message.Status.COMPLAINED, ago=timedelta(hours=30))
            self.send(automation, 1, Message.Status.BOUNCED)

        with self.assertNumQueries(2):
            figures = source_figures(source=SOURCES[0], since=NOW - timedelta(hours=24), until=NOW)
        self.assertEqual(len(figures), 5)
        with self.assertNumQueries(2 * len(SOURCES)):
            reputation_report(days=7)
        with self.assertNumQueries(2 * len(SOURCES)), limits():
            self.assertEqual(reputation_check(), [])  # 11 messages each: below the volume

    def test_the_events_counted_are_those_the_partial_index_covers(self) -> None:
        # Without the index the check reads every tracking event ever stored, every five
        # minutes; the planner uses a partial index only if its condition covers the
        # query's event types.
        with connection.cursor() as cursor:
            cursor.execute("SELECT indexdef FROM pg_indexes WHERE indexname = 'tracking_event_reputation'")
            (definition,) = cursor.fetchone()
        for event_type in BOUNCE_EVENTS + COMPLAINT_EVENTS:
            self.assertIn(f"'{event_type}'", definition)

    def test_report_gives_figures_per_day_and_automation(self) -> None:
        self.send(self.welcome, 100, ago=timedelta(hours=1))
        self.send(self.welcome, 4, Message.Status.BOUNCED, ago=timedelta(hours=2))
        self.send(self.welcome, 50, ago=timedelta(days=1))
        self.send(self.welcome, 1, Message.Status.COMPLAINED, ago=timedelta(days=1))
        self.send(self.digest, 10, ago=timedelta(days=2))
        self.send(self.digest, 10, ago=timedelta(days=9))  # before the report

        report = [(f.day, f.name, f.handed_over, f.bounced, f.complained) for f in reputation_report(days=7)]

        self.assertEqual(
            report,
            [
                (date(2025, 3, 10), "Welcome", 104, 4, 0),
                (date(2025, 3, 9), "Welcome", 51, 0, 1),
                (date(2025, 3, 8), "Digest", 10, 0, 0),
            ],
        )

    def test_the_report_counts_complaints_on_the_day_they_occur(self) -> None:
        self.send(self.welcome, 100, ago=timedelta(days=1))  # 9 March, noon
        # Sent on 8 March, the complaints came on 9 March.
        self.send(
            self.welcome,
            2,
            Message.Status.COMPLAINED,
            ago=timedelta(days=2),
            reported_at=NOW - timedelta(hours=23),
        )
        # Mail from before the report draws a complaint today: a row with nothing sent.
        self.send(
            self.digest,
            1,
            Message.Status.COMPLAINED,
            ago=timedelta(days=9),
            reported_at=NOW - timedelta(minutes=1),
        )

        rows = [(f.day, f.name, f.handed_over, f.bounced, f.complained) for f in reputation_report(days=7)]

        self.assertEqual(
            rows,
            [
                (date(2025, 3, 10), "Digest", 0, 0, 1),
                (date(2025, 3, 9), "Welcome", 100, 0, 2),
                (date(2025, 3, 8), "Welcome", 2, 0, 0),
            ],
        )
        out = io.StringIO()
        with limits():
            call_command("reputation_check", "--report", stdout=out)
        lines = out.getvalue().splitlines()
        self.assertIn(
            "2025-03-10  a:Digest                               0       0       -        1       -", lines
        )
        self.assertIn(
            "2025-03-09  a:Welcome                            100       0   0.00%        2   2.00%", lines
        )


class PauseTests(ReputationTestCase):
    def test_an_automation_at_the_complaint_limit_is_paused(self) -> None:
        self.send(self.welcome, 997)
        self.send(self.welcome, 3, Message.Status.COMPLAINED)  # 0.30%

        with limits():
            paused = reputation_check()

        self.assertEqual([p.figures.source_id for p in paused], [self.welcome.pk])
        self.welcome.refresh_from_db()
        self.assertFalse(self.welcome.active)
        self.assertEqual(self.welcome.paused_at, NOW)
        self.assertEqual(
            self.welcome.paused_reason,
            "complaint rate 0.30% over the last 24 h reaches 0.30% (Gmail's limit)",
        )
        self.digest.refresh_from_db()
        self.assertTrue(self.digest.active)

    def test_a_reactivated_automation_is_judged_on_the_mail_it_sends_after(self) -> None:
        from campaigns.services import automation_set_active

        self.send(self.welcome, 95)
        self.send(self.welcome, 5, Message.Status.COMPLAINED)
        with limits():
            (paused,) = reputation_check()
        self.assertEqual(paused.figures.source_id, self.welcome.pk)

        # Switched back on after the list was cleaned: the old complaints are still in
        # the window, but they are what the pause was about.
        automation_set_active(automation=self.welcome, active=True)
        with limits():
            self.assertEqual(reputation_check(), [])
        self.welcome.refresh_from_db()
        self.assertEqual((self.welcome.active, self.welcome.resumed_at), (True, NOW))

        # As bad again on the mail sent since: paused again.
        self.send(self.welcome, 95, ago=-timedelta(hours=1))
        self.send(self.welcome, 5, Message.Status.COMPLAINED, ago=-timedelta(hours=1))
        with limits():
            (again,) = reputation_check(now=NOW + timedelta(hours=2))
        self.assertEqual((again.figures.handed_over, again.figures.complained), (100, 5))
        self.welcome.refresh_from_db()
        self.assertFalse(self.welcome.active)

    def test_above_the_limit_the_reason_says_exceeds(self) -> None:
        self.send(self.welcome, 995)
        self.send(self.welcome, 5, Message.Status.COMPLAINED)  # 0.50%
        with limits():
            (paused,) = reputation_check()
        self.assertEqual(
            paused.reason, "complaint rate 0.50% over the last 24 h exceeds 0.30% (Gmail's limit)"
        )

    def test_just_below_the_limit_nothing_is_paused(self) -> None:
        self.send(self.welcome, 998)
        self.send(self.welcome, 2, Message.Status.COMPLAINED)  # 0.20%
        with limits():
            self.assertEqual(reputation_check(), [])
        self.welcome.refresh_from_db()
        self.assertTrue(self.welcome.active)

    def test_below_the_minimum_volume_nothing_is_paused(self) -> None:
        self.send(self.welcome, 89)
        self.send(self.welcome, 10, Message.Status.COMPLAINED)  # 99 messages, 10% complaints
        with limits():
            self.assertEqual(reputation_check(), [])
            self.send(self.welcome, 1)  # the 100th
            self.assertEqual(len(reputation_check()), 1)

    def test_a_bounce_rate_at_the_limit_pauses(self) -> None:
        self.send(self.welcome, 95)
        self.send(self.welcome, 5, Message.Status.BOUNCED)
        with limits():
            (paused,) = reputation_check()
        self.assertEqual(paused.reason, "bounce rate 5.00% over the last 24 h reaches 5.00%")

    def test_both_limits_are_named(self) -> None:
        self.send(self.welcome, 90)
        self.send(self.welcome, 5, Message.Status.BOUNCED)
        self.send(self.welcome, 5, Message.Status.COMPLAINED)
        with limits(REPUTATION_COMPLAINT_RATE=0.01):
            (paused,) = reputation_check()
        self.assertEqual(
            paused.reason,
            "complaint rate 5.00% over the last 24 h exceeds 1.00%; bounce rate 5.00% over the last 24 h reaches 5.00%",
        )

    def test_complaints_arriving_now_on_mail_sent_30_hours_ago_pause(self) -> None:
        # A steady automation: yesterday's mail draws its complaints today, and they
        # are today's complaints, as in Gmail's Postmaster Tools.
        self.send(self.welcome, 1000)
        self.send(
            self.welcome,
            5,
            Message.Status.COMPLAINED,
            ago=timedelta(hours=30),
            reported_at=NOW - timedelta(hours=1),
        )
        with limits():
            (paused,) = reputation_check()
        self.assertEqual((paused.figures.handed_over, paused.figures.complained), (1000, 5))
        self.assertEqual(
            paused.reason, "complaint rate 0.50% over the last 24 h exceeds 0.30% (Gmail's limit)"
        )
        self.welcome.refresh_from_db()
        self.assertFalse(self.welcome.active)

    def test_complaints_that_occurred_30_hours_ago_do_not_count(self) -> None:
        self.send(self.welcome, 200)
        self.send(
            self.welcome,
            50,
            Message.Status.COMPLAINED,
            ago=timedelta(hours=31),
            reported_at=NOW - timedelta(hours=30),
        )
        # Just outside the window, too.
        self.send(
            self.welcome,
            50,
            Message.Status.BOUNCED,
            ago=timedelta(hours=25),
            reported_at=NOW - timedelta(hours=24, seconds=1),
        )
        with limits():
            self.assertEqual(reputation_check(), [])
        (figures,) = source_figures(source=SOURCES[0], since=NOW - timedelta(hours=24), until=NOW)
        self.assertEqual((figures.handed_over, figures.bounced, figures.complained), (200, 0, 0))

    def test_a_complaint_postmark_posts_today_about_mail_sent_yesterday_counts(self) -> None:
        self.send(self.welcome, 999)
        (yesterdays,) = self.send(self.welcome, 1, ago=timedelta(hours=30))
        body = for_message("spam_complaint", yesterdays, BouncedAt=iso(NOW - timedelta(minutes=10)))

        response = self.client.post(
            POSTMARK_TRACKING_URL,
            data=json.dumps(body),
            content_type="application/json",
            headers={"Authorization": basic_auth(settings.ANYMAIL["WEBHOOK_SECRET"])},
        )

        self.assertEqual(response.status_code, 200, response.content)
        with limits(REPUTATION_COMPLAINT_RATE=0.001):
            (paused,) = reputation_check()
        self.assertEqual((paused.figures.handed_over, paused.figures.complained), (999, 1))
        self.assertEqual(paused.reason, "complaint rate 0.10% over the last 24 h exceeds 0.10%")

    def test_complaints_after_a_resume_on_mail_sent_before_it_do_not_pause_again(self) -> None:
        from campaigns.services import automation_set_active

        self.send(self.welcome, 95)
        self.send(self.welcome, 5, Message.Status.COMPLAINED)
        with limits():
            self.assertEqual(len(reputation_check()), 1)
        automation_set_active(automation=self.welcome, active=True)

        # The mail sent before the pause keeps drawing complaints for a while; the mail
        # sent since the resume draws none.
        self.send(self.welcome, 20, Message.Status.COMPLAINED, reported_at=NOW + timedelta(minutes=30))
        self.send(self.welcome, 100, ago=-timedelta(minutes=10))
        with limits():
            self.assertEqual(reputation_check(now=NOW + timedelta(hours=1)), [])
        self.welcome.refresh_from_db()
        self.assertTrue(self.welcome.active)

    def test_a_paused_automation_is_not_paused_again(self) -> None:
        self.send(self.welcome, 90)
        self.send(self.welcome, 10, Message.Status.COMPLAINED)
        with limits():
            self.assertEqual(len(reputation_check()), 1)
            self.assertEqual(reputation_check(), [])
        self.welcome.refresh_from_db()
        self.assertEqual(self.welcome.paused_at, NOW)

    def test_an_automation_switched_off_by_hand_keeps_its_state(self) -> None:
        Automation.objects.filter(pk=self.welcome.pk).update(active=False)
        self.send(self.welcome, 90)
        self.send(self.welcome, 10, Message.Status.COMPLAINED)
        with limits():
            self.assertEqual(reputation_check(), [])
        self.welcome.refresh_from_db()
        self.assertEqual(self.welcome.paused_reason, "")

    def test_the_task_and_the_command_run_the_check(self) -> None:
        self.send(self.welcome, 90)
        self.send(self.welcome, 10, Message.Status.COMPLAINED)
        self.send(self.digest, 90)
        self.send(self.digest, 10, Message.Status.BOUNCED)
        with limits(REPUTATION_BOUNCE_RATE=0.5):
            self.assertEqual(compliance_tasks.reputation_check(), 1)
        out = io.StringIO()
        with limits():
            call_command("reputation_check", "--report", stdout=out)
        self.assertIn("paused automation 'Digest': bounce rate 10.00%", out.getvalue())
        self.assertIn("a:Welcome", out.getvalue())


# --- broadcasts ---------------------------------------------------------------------------


class BroadcastPauseTests(ReputationTestCase):
    @classmethod
    def setUpTestData(cls) -> None:
        super().setUpTestData()
        from campaigns.models import Broadcast

        cls.june = factories.broadcast(
            cls.version,
            name="June news",
            status=Broadcast.Status.SENDING,
            template_version=cls.version,
            started_at=NOW - timedelta(hours=2),
        )

    def send_broadcast(
        self,
        count: int,
        status: str = Message.Status.DELIVERED,
        sent_at_override: datetime | None = None,
        **kw: object,
    ) -> list[Message]:
        first = next(_keys)
        messages = Message.objects.bulk_create(
            Message(
                idempotency_key=f"rep-{first}-{n}",
                broadcast=self.june,
                # One address per message: a broadcast has one message per mailbox.
                to_email=f"b{first}-{n}@example.com",
                template_version=self.version,
                purpose="marketing",
                status=status,
                sent_at=sent_at_override
                or (NOW - timedelta(hours=1) if status != Message.Status.QUEUED else None),
                **kw,
            )
            for n in range(count)
        )
        report_by_status(messages)
        return messages

    def test_a_broadcast_over_the_complaint_limit_is_paused_and_says_why(self) -> None:
        from campaigns.delivery import claimable_messages_q
        from campaigns.models import Broadcast

        self.send_broadcast(995)
        self.send_broadcast(5, Message.Status.COMPLAINED)  # 0.50%
        self.send_broadcast(10, Message.Status.QUEUED, send_after=NOW - timedelta(minutes=1))
        self.send(self.welcome, 100)  # the automation is fine

        with limits():
            (paused,) = reputation_check()

        self.assertEqual((paused.figures.kind, paused.figures.name), ("broadcast", "June news"))
        self.june.refresh_from_db()
        self.assertEqual(self.june.status, Broadcast.Status.PAUSED)
        self.assertEqual((self.june.paused_by, self.june.paused_at), ("reputation guard", NOW))
        self.assertEqual(
            self.june.paused_reason, "complaint rate 0.50% over the last 24 h exceeds 0.30% (Gmail's limit)"
        )
        # Its queued mail waits.
        self.assertFalse(Message.objects.filter(claimable_messages_q(NOW), broadcast=self.june).exists())
        self.welcome.refresh_from_db()
        self.assertTrue(self.welcome.active)

    def test_a_broadcast_has_its_own_figures_and_report_rows(self) -> None:
        self.send_broadcast(48)
        self.send_broadcast(2, Message.Status.BOUNCED)
        self.send(self.welcome, 10, Message.Status.BOUNCED)

        source = next(s for s in SOURCES if s.kind == "broadcast")
        (figures,) = source_figures(source=source, since=NOW - timedelta(hours=24), until=NOW)

        self.assertEqual((figures.source_id, figures.handed_over, figures.bounced), (self.june.pk, 50, 2))
        self.assertIn(
            ("broadcast", "June news", 50, 2),
            [(f.kind, f.name, f.handed_over, f.bounced) for f in reputation_report()],
        )

    def test_a_broadcast_paused_by_a_person_or_already_sent_is_left_as_it_is(self) -> None:
        from campaigns.broadcasts import broadcast_pause
        from campaigns.models import Broadcast

        self.send_broadcast(90)
        self.send_broadcast(10, Message.Status.COMPLAINED)
        broadcast_pause(broadcast=self.june, actor="admin:root", reason="checking the list")
        with limits():
            self.assertEqual(reputation_check(), [])
        self.june.refresh_from_db()
        self.assertEqual((self.june.paused_by, self.june.paused_reason), ("admin:root", "checking the list"))

        Broadcast.objects.filter(pk=self.june.pk).update(status=Broadcast.Status.SENT)
        with limits():
            self.assertEqual(reputation_check(), [])

    def test_a_resumed_broadcast_is_judged_on_the_mail_it_sends_after_the_resume(self) -> None:
        from campaigns.broadcasts import broadcast_resume
        from campaigns.models import Broadcast

        self.send_broadcast(90)
        self.send_broadcast(10, Message.Status.COMPLAINED)  # an hour before NOW
        with limits():
            (paused,) = reputation_check()
        self.assertEqual(paused.figures.source_id, self.june.pk)

        # The marketer fixed the list and resumes: the old complaints are still in the
        # 24 h window, but they are what the pause was about.
        broadcast_resume(broadcast=self.june, actor="admin:root")
        with limits():
            self.assertEqual(reputation_check(), [])
        self.june.refresh_from_db()
        self.assertEqual((self.june.status, self.june.resumed_at), (Broadcast.Status.SENDING, NOW))

        # The same again on the mail sent after the resume: paused again.
        later = NOW + timedelta(hours=2)
        self.send_broadcast(95, sent_at_override=NOW + timedelta(hours=1))
        self.send_broadcast(5, Message.Status.COMPLAINED, sent_at_override=NOW + timedelta(hours=1))
        with limits():
            (again,) = reputation_check(now=later)
        self.assertEqual((again.figures.handed_over, again.figures.complained), (100, 5))
        self.june.refresh_from_db()
        self.assertEqual(
            (self.june.status, self.june.paused_by), (Broadcast.Status.PAUSED, "reputation guard")
        )

    def test_the_report_still_shows_the_whole_day_after_a_resume(self) -> None:
        from campaigns.broadcasts import broadcast_pause, broadcast_resume

        self.send_broadcast(90)
        self.send_broadcast(10, Message.Status.COMPLAINED)
        broadcast_pause(broadcast=self.june, actor="admin:root", reason="check")
        broadcast_resume(broadcast=self.june, actor="admin:root")

        (row,) = [f for f in reputation_report() if f.kind == "broadcast"]
        self.assertEqual((row.handed_over, row.complained), (100, 10))
