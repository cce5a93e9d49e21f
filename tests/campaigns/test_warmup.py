"""IP/domain warm-up (campaigns/warmup.py): daily caps, atomic reservations across
workers, the daily review, and the admin pages for schedules and the shared send rate."""

from __future__ import annotations

import threading
import uuid
from datetime import UTC, date, datetime, timedelta
from types import SimpleNamespace
from typing import Any

import time_machine
from django.conf import settings
from django.contrib.auth import get_user_model
from django.core.exceptions import ValidationError
from django.db import IntegrityError, connection, transaction
from django.test import TestCase, TransactionTestCase, override_settings
from django.urls import reverse

from campaigns import throttle
from campaigns.models import Contact, Message, TemplateVersion, WarmupDay, WarmupSchedule
from campaigns.warmup import (
    warmup_admit,
    warmup_advance,
    warmup_advance_all,
    warmup_allowance,
    warmup_day_stats,
    warmup_defer_until,
    warmup_release,
    warmup_schedule_current,
    warmup_take,
)
from tests import factories
from tests.campaigns.test_throttle import delete_namespace

D0 = date(2024, 6, 1)
D1 = D0 + timedelta(days=1)


def schedule(**fields: Any) -> WarmupSchedule:
    defaults: dict[str, Any] = {
        "name": "mailauto.test",
        "start_date": D0,
        "daily_caps": [50, 100, 200, None],
        "max_bounce_rate": 0.05,
        "max_complaint_rate": 0.01,
    }
    return WarmupSchedule.objects.create(**{**defaults, **fields})


class WarmupCapTests(TestCase):
    schedule: WarmupSchedule

    @classmethod
    def setUpTestData(cls) -> None:
        cls.schedule = schedule()

    def test_the_allowance_is_the_cap_of_the_current_step(self) -> None:
        self.assertEqual(warmup_allowance(schedule=self.schedule, today=D0), 50)

    def test_take_grants_up_to_the_cap_then_nothing(self) -> None:
        self.assertEqual(warmup_take(schedule=self.schedule, count=30, today=D0), 30)
        self.assertEqual(warmup_take(schedule=self.schedule, count=30, today=D0), 20)
        self.assertEqual(warmup_take(schedule=self.schedule, count=1, today=D0), 0)
        self.assertEqual(warmup_allowance(schedule=self.schedule, today=D0), 0)
        day = WarmupDay.objects.get(schedule=self.schedule, day=D0)
        self.assertEqual((day.sent, day.cap, day.step), (50, 50, 0))

    def test_each_day_has_its_own_counter(self) -> None:
        warmup_take(schedule=self.schedule, count=50, today=D0)
        self.assertEqual(warmup_take(schedule=self.schedule, count=10, today=D1), 10)
        self.assertEqual(warmup_allowance(schedule=self.schedule, today=D1), 40)

    def test_nothing_is_sent_before_the_start_date(self) -> None:
        before = D0 - timedelta(days=1)
        self.assertEqual(warmup_allowance(schedule=self.schedule, today=before), 0)
        self.assertEqual(warmup_take(schedule=self.schedule, count=5, today=before), 0)

    def test_an_inactive_schedule_limits_nothing(self) -> None:
        inactive = schedule(name="old.example", active=False)
        self.assertIsNone(warmup_allowance(schedule=inactive, today=D0))
        self.assertEqual(warmup_take(schedule=inactive, count=10**6, today=D0), 10**6)
        self.assertFalse(WarmupDay.objects.filter(schedule=inactive).exists())

    def test_a_null_step_is_unlimited_and_still_counted(self) -> None:
        WarmupSchedule.objects.filter(pk=self.schedule.pk).update(step=3)
        self.schedule.refresh_from_db()
        self.assertIsNone(warmup_allowance(schedule=self.schedule, today=D0))
        self.assertEqual(warmup_take(schedule=self.schedule, count=10**6, today=D0), 10**6)
        self.assertEqual(WarmupDay.objects.get(schedule=self.schedule, day=D0).sent, 10**6)

    def test_the_last_step_stays_after_the_end_of_the_curve(self) -> None:
        capped = schedule(name="capped.example", daily_caps=[10, 20], step=1)
        self.assertEqual(capped.cap_for_step(7), 20)
        self.assertEqual(warmup_allowance(schedule=capped, today=D0), 20)

    def test_release_gives_back_sends_that_never_left(self) -> None:
        warmup_take(schedule=self.schedule, count=50, today=D0)
        warmup_release(schedule=self.schedule, count=20, day=D0)
        self.assertEqual(warmup_allowance(schedule=self.schedule, today=D0), 20)
        warmup_release(schedule=self.schedule, count=500, day=D0)
        self.assertEqual(WarmupDay.objects.get(schedule=self.schedule, day=D0).sent, 0)

    def test_take_counts_against_the_utc_day(self) -> None:
        # 23:30 in New York on 1 June is 03:30 UTC on 2 June.
        with time_machine.travel(datetime(2024, 6, 2, 3, 30, tzinfo=UTC), tick=False):
            warmup_take(schedule=self.schedule, count=5)
        self.assertEqual(WarmupDay.objects.get(schedule=self.schedule).day, D1)

    def test_the_table_refuses_more_sent_than_the_cap(self) -> None:
        warmup_take(schedule=self.schedule, count=50, today=D0)
        with self.assertRaises(IntegrityError), transaction.atomic():
            WarmupDay.objects.filter(schedule=self.schedule, day=D0).update(sent=51)


class WarmupConcurrencyTests(TransactionTestCase):
    def test_concurrent_workers_never_pass_the_cap(self) -> None:
        capped = schedule(daily_caps=[100])
        barrier = threading.Barrier(8)
        granted: list[int] = []
        errors: list[BaseException] = []
        lock = threading.Lock()

        def worker() -> None:
            try:
                barrier.wait(timeout=30)
                while True:
                    got = warmup_take(schedule=capped, count=7, today=D0)
                    with lock:
                        granted.append(got)
                    if got == 0:
                        return
            except BaseException as err:  # surfaced below
                errors.append(err)
            finally:
                connection.close()

        threads = [threading.Thread(target=worker) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
        self.assertEqual(errors, [])
        self.assertEqual(sum(granted), 100)
        self.assertEqual(WarmupDay.objects.get(schedule=capped, day=D0).sent, 100)
        self.assertIn(100 % 7, granted)  # one worker got the partial remainder


class WarmupAdvanceTests(TestCase):
    version: TemplateVersion
    contact: Contact

    @classmethod
    def setUpTestData(cls) -> None:
        cls.version = factories.published_version()
        cls.contact = factories.contact()

    def setUp(self) -> None:
        self.schedule = schedule()

    def sent(self, day: date, status: str, count: int) -> None:
        at = datetime.combine(day, datetime.min.time(), tzinfo=UTC) + timedelta(hours=12)
        Message.objects.bulk_create(
            Message(
                idempotency_key=f"k-{uuid.uuid4().hex}",
                template_version=self.version,
                contact=self.contact,
                to_email=self.contact.email,
                purpose="marketing",
                status=status,
                sent_at=at,
            )
            for _ in range(count)
        )

    def test_the_first_day_starts_at_the_first_step(self) -> None:
        day = warmup_advance(schedule=self.schedule, today=D0)
        assert day is not None
        self.assertEqual((day.step, day.cap, day.held), (0, 50, False))
        self.assertIn("started", day.reason)

    def test_a_clean_day_advances_one_step(self) -> None:
        self.sent(D0, Message.Status.DELIVERED, 96)
        self.sent(D0, Message.Status.BOUNCED, 4)  # 4 % <= 5 %
        day = warmup_advance(schedule=self.schedule, today=D1)
        assert day is not None
        self.schedule.refresh_from_db()
        self.assertEqual((self.schedule.step, self.schedule.held), (1, False))
        self.assertEqual((day.day, day.step, day.cap), (D1, 1, 100))
        self.assertIn("advanced to step 2", self.schedule.reason)
        self.assertEqual(self.schedule.evaluated_on, D1)
        self.assertEqual(warmup_allowance(schedule=self.schedule, today=D1), 100)

    def test_a_high_bounce_rate_holds_the_step_and_says_why(self) -> None:
        self.sent(D0, Message.Status.SENT, 90)
        self.sent(D0, Message.Status.BOUNCED, 10)
        day = warmup_advance(schedule=self.schedule, today=D1)
        assert day is not None
        self.schedule.refresh_from_db()
        self.assertEqual((self.schedule.step, self.schedule.held, day.cap, day.held), (0, True, 50, True))
        self.assertIn("bounce rate 10.00%", self.schedule.reason)
        self.assertEqual(day.reason, self.schedule.reason)

    def test_a_high_complaint_rate_holds_the_step(self) -> None:
        self.sent(D0, Message.Status.OPENED, 98)
        self.sent(D0, Message.Status.COMPLAINED, 2)  # 2 % > 1 %
        warmup_advance(schedule=self.schedule, today=D1)
        self.schedule.refresh_from_db()
        self.assertEqual((self.schedule.step, self.schedule.held), (0, True))
        self.assertIn("complaint rate 2.00%", self.schedule.reason)

    def test_a_day_with_nothing_sent_holds(self) -> None:
        warmup_advance(schedule=self.schedule, today=D1)
        self.schedule.refresh_from_db()
        self.assertEqual((self.schedule.step, self.schedule.held), (0, True))
        self.assertIn("nothing was sent", self.schedule.reason)

    def test_only_messages_handed_to_the_esp_count(self) -> None:
        self.sent(D0, Message.Status.DELIVERED, 10)
        self.sent(D0, Message.Status.BOUNCED, 1)  # 1 of 11: over 5 %
        for status in (Message.Status.FAILED, Message.Status.DEAD, Message.Status.UNKNOWN):
            self.sent(D0, status, 30)  # never taken by the ESP: would dilute the rate
        stats = warmup_day_stats(day=D0)
        self.assertEqual((stats.handed, stats.bounced, stats.complained), (11, 1, 0))
        warmup_advance(schedule=self.schedule, today=D1)
        self.schedule.refresh_from_db()
        self.assertTrue(self.schedule.held)

    def test_only_yesterdays_messages_count(self) -> None:
        self.sent(D0, Message.Status.CLICKED, 20)
        self.sent(D0 - timedelta(days=1), Message.Status.BOUNCED, 20)
        self.sent(D1, Message.Status.BOUNCED, 20)
        warmup_advance(schedule=self.schedule, today=D1)
        self.schedule.refresh_from_db()
        self.assertEqual((self.schedule.step, self.schedule.held), (1, False))

    def test_the_review_runs_once_a_day(self) -> None:
        self.sent(D0, Message.Status.DELIVERED, 20)
        warmup_advance(schedule=self.schedule, today=D1)
        warmup_advance(schedule=self.schedule, today=D1)
        self.schedule.refresh_from_db()
        self.assertEqual(self.schedule.step, 1)

    def test_the_review_raises_the_cap_of_a_counter_workers_already_started(self) -> None:
        self.sent(D0, Message.Status.DELIVERED, 20)
        self.assertEqual(warmup_take(schedule=self.schedule, count=30, today=D1), 30)  # before the review
        day = warmup_advance(schedule=self.schedule, today=D1)
        assert day is not None
        self.assertEqual((day.cap, day.sent), (100, 30))
        self.assertEqual(warmup_allowance(schedule=self.schedule, today=D1), 70)

    def test_the_last_step_stays(self) -> None:
        WarmupSchedule.objects.filter(pk=self.schedule.pk).update(step=3)
        self.sent(D0, Message.Status.DELIVERED, 20)
        day = warmup_advance(schedule=self.schedule, today=D1)
        assert day is not None
        self.assertEqual((day.step, day.cap, day.held), (3, None, False))
        self.assertIn("last step", day.reason)

    def test_advance_all_reviews_active_schedules_on_the_utc_day(self) -> None:
        inactive = schedule(name="old.example", active=False)
        self.sent(D0, Message.Status.DELIVERED, 20)
        with time_machine.travel(datetime(2024, 6, 2, 0, 5, tzinfo=UTC), tick=False):
            days = warmup_advance_all()
        self.assertEqual([(d.schedule_id, d.day, d.step) for d in days], [(self.schedule.pk, D1, 1)])
        self.assertFalse(WarmupDay.objects.filter(schedule=inactive).exists())


class WarmupAdmitTests(TestCase):
    def item(self, pk: int, priority: int, minutes_ago: int = 0) -> SimpleNamespace:
        at = datetime(2024, 6, 1, 12, tzinfo=UTC) - timedelta(minutes=minutes_ago)
        return SimpleNamespace(pk=pk, priority=priority, send_after=at)

    def test_the_highest_priority_messages_take_the_allowance(self) -> None:
        capped = schedule(daily_caps=[3])
        batch = [self.item(1, 100), self.item(2, 10), self.item(3, 100, minutes_ago=5), self.item(4, 50)]
        batch.append(self.item(5, 100, minutes_ago=1))
        now = datetime(2024, 6, 1, 12, tzinfo=UTC)
        admission = warmup_admit(schedule=capped, messages=batch, now=now)
        self.assertEqual([m.pk for m in admission.admitted], [2, 4, 3])
        self.assertEqual([m.pk for m in admission.deferred], [5, 1])
        self.assertEqual(admission.defer_until, datetime(2024, 6, 2, tzinfo=UTC))
        self.assertIn("warm-up cap", admission.reason)
        self.assertIn("(3/day)", admission.reason)
        self.assertEqual(admission.day, D0)

    def test_without_a_schedule_everything_is_admitted(self) -> None:
        batch = [self.item(1, 100), self.item(2, 10)]
        admission = warmup_admit(schedule=None, messages=batch)
        self.assertEqual(admission.admitted, batch)
        self.assertEqual((admission.deferred, admission.defer_until), ([], None))

    def test_defer_until_is_the_next_utc_midnight(self) -> None:
        self.assertEqual(
            warmup_defer_until(now=datetime(2024, 6, 1, 13, tzinfo=UTC)), datetime(2024, 6, 2, tzinfo=UTC)
        )
        new_york = datetime.fromisoformat("2024-06-01T23:30:00-04:00")  # 03:30 UTC, 2 June
        self.assertEqual(warmup_defer_until(now=new_york), datetime(2024, 6, 3, tzinfo=UTC))
        with self.assertRaises(ValueError):
            warmup_defer_until(now=datetime(2024, 6, 1, 13))


class WarmupScheduleSelectionTests(TestCase):
    domain: WarmupSchedule
    stream: WarmupSchedule

    @classmethod
    def setUpTestData(cls) -> None:
        cls.domain = schedule(name="mail.example.com")
        cls.stream = schedule(name="broadcasts")
        schedule(name="news.example.com", active=False)

    @override_settings(DEFAULT_FROM_EMAIL="News <news@Mail.Example.com>")
    def test_the_schedule_named_after_the_from_domain_applies(self) -> None:
        self.assertEqual(warmup_schedule_current(), self.domain)

    @override_settings(DEFAULT_FROM_EMAIL="News <news@news.example.com>")
    def test_an_inactive_schedule_does_not_apply(self) -> None:
        self.assertIsNone(warmup_schedule_current())

    def test_a_configured_stream_wins(self) -> None:
        options = {**settings.MAILAUTO, "WARMUP_STREAM": "broadcasts"}
        with override_settings(MAILAUTO=options, DEFAULT_FROM_EMAIL="x@mail.example.com"):
            self.assertEqual(warmup_schedule_current(), self.stream)


class WarmupScheduleModelTests(TestCase):
    def test_daily_caps_must_be_a_list_of_whole_numbers_or_null(self) -> None:
        for caps in ([], [50, "100"], [50, -1], [1.5], {"a": 1}, [True]):
            with self.subTest(caps=caps), self.assertRaises(ValidationError):
                WarmupSchedule(name="x.example", start_date=D0, daily_caps=caps).full_clean()
        WarmupSchedule(name="x.example", start_date=D0, daily_caps=[50, None]).full_clean()

    def test_the_step_must_be_on_the_curve(self) -> None:
        with self.assertRaises(ValidationError):
            WarmupSchedule(name="x.example", start_date=D0, daily_caps=[50], step=1).full_clean()

    def test_the_name_is_stored_in_lower_case(self) -> None:
        s = WarmupSchedule(name=" Mail.Example.COM ", start_date=D0)
        s.full_clean()
        self.assertEqual(s.name, "mail.example.com")

    def test_the_default_curve_climbs_for_three_weeks_then_is_unlimited(self) -> None:
        caps = WarmupSchedule(name="x", start_date=D0).daily_caps
        self.assertEqual(caps[:3], [50, 100, 200])
        self.assertEqual(len(caps), 22)  # 21 capped days: within the 2-4 weeks asked for
        self.assertEqual(caps[-2:], [400_000, None])
        self.assertEqual(caps[:-1], sorted(caps[:-1]))


class DeliveryAdminTests(TestCase):
    admin: Any
    schedule: WarmupSchedule

    @classmethod
    def setUpTestData(cls) -> None:
        cls.admin = get_user_model().objects.create_superuser("root", "root@example.com", "pw")
        cls.schedule = schedule()

    def setUp(self) -> None:
        self.client.force_login(self.admin)
        account = f"test-{uuid.uuid4().hex[:12]}"
        override = override_settings(MAILAUTO={**settings.MAILAUTO, "RATE_LIMIT_ACCOUNT": account})
        override.enable()
        self.addCleanup(override.disable)
        self.addCleanup(delete_namespace, throttle.default_throttle().namespace)

    def test_the_rate_page_shows_the_effective_rate_and_why(self) -> None:
        throttle.report_rate_limited(retry_after=None)
        ceiling = settings.MAILAUTO["RATE_LIMIT_PER_SECOND"]
        response = self.client.get(reverse("admin:campaigns_delivery_rate"))
        self.assertEqual(response.status_code, 200)
        content = response.content.decode()
        self.assertIn(f"{ceiling / 2:.2f}/s", content)
        self.assertIn(f"{ceiling:.2f}/s", content)
        self.assertIn("rate limited by the ESP (429)", content)
        self.assertIn("(throttled)", content)

    def test_the_schedule_list_links_to_the_rate_page(self) -> None:
        with time_machine.travel(datetime(2024, 6, 1, 9, tzinfo=UTC), tick=False):
            warmup_take(schedule=self.schedule, count=7)
            response = self.client.get(reverse("admin:campaigns_warmupschedule_changelist"))
        content = response.content.decode()
        self.assertIn(reverse("admin:campaigns_delivery_rate"), content)
        self.assertIn("Delivery rate:", content)
        self.assertIn("1 of 4", content)  # step
        self.assertIn('<td class="field-sent_today">7</td>', content)

    def test_the_schedule_page_lists_its_days_read_only(self) -> None:
        warmup_take(schedule=self.schedule, count=7, today=D0)
        response = self.client.get(reverse("admin:campaigns_warmupschedule_change", args=[self.schedule.pk]))
        self.assertEqual(response.status_code, 200)
        self.assertContains(response, "June 1, 2024")
        self.assertNotContains(response, 'name="days-0-sent"')

    def test_the_rate_page_needs_the_view_permission(self) -> None:
        staff = get_user_model().objects.create_user("staff", "s@example.com", "pw", is_staff=True)
        self.client.force_login(staff)
        self.assertEqual(self.client.get(reverse("admin:campaigns_delivery_rate")).status_code, 403)
