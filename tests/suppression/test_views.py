"""The recipient pages: /u/<token>/ (confirmation page and RFC 8058 one-click POST) and
/preferences/<token>/ (the preference centre), with no login, cookie or CSRF token."""

from __future__ import annotations

import itertools
from datetime import UTC, datetime, timedelta

import time_machine
from django.conf import settings
from django.test import Client, TestCase, override_settings
from django.urls import reverse

from campaigns.models import Broadcast
from suppression.models import Suppression, SuppressionLogEntry, Topic
from suppression.services import suppression_add
from suppression.unsubscribe import link_token
from tests import factories
from tests.suppression.test_unsubscribe import tampered

_ips = itertools.count(1)

ONE_CLICK = "List-Unsubscribe=One-Click"
FORM = "application/x-www-form-urlencoded"


def unsubscribe_path(token: str) -> str:
    return reverse("suppression:unsubscribe", args=[token])


def preferences_path(token: str) -> str:
    return reverse("suppression:preferences", args=[token])


def with_options(**options: object) -> override_settings:
    return override_settings(MAILAUTO={**settings.MAILAUTO, **options})


class RecipientPageTestCase(TestCase):
    @classmethod
    def setUpTestData(cls) -> None:
        Topic.objects.create(slug="newsletter", name="The newsletter", position=1)
        Topic.objects.create(
            slug="product-updates", name="Product updates", description="New features.", position=2
        )
        Topic.objects.create(slug="onboarding", name="Getting started", public=False)

    def setUp(self) -> None:
        # Each test is its own client IP, so the per-IP rate limit of one test (the
        # counters live in Redis) never spills into another. CSRF is enforced as a
        # browser would see it.
        n = next(_ips)
        self.ip = f"10.{n // 250}.{n % 250}.1"
        self.client = Client(enforce_csrf_checks=True, REMOTE_ADDR=self.ip)
        self.token = link_token(email="ada@example.com", topic="newsletter", message_id=42)

    def suppressions(self) -> list[tuple[str, str, str, str]]:
        return sorted(Suppression.objects.values_list("email", "topic", "reason", "source"))


class OneClickTests(RecipientPageTestCase):
    def test_one_click_post_without_cookies_or_csrf_token_unsubscribes_at_once(self) -> None:
        response = self.client.post(unsubscribe_path(self.token), ONE_CLICK, content_type=FORM)

        self.assertEqual(response.status_code, 200)
        self.assertNotIn("Location", response)
        self.assertEqual(dict(response.cookies), {})
        self.assertEqual(
            self.suppressions(), [("ada@example.com", "newsletter", "unsubscribe", "recipient:one-click")]
        )
        self.assertEqual(Suppression.objects.get().detail, "via message 42")
        entry = SuppressionLogEntry.objects.get()
        self.assertEqual(
            (entry.email, entry.topic, entry.action, entry.source),
            ("ada@example.com", "newsletter", "added", "recipient:one-click"),
        )

    def test_one_click_post_as_multipart_form_data(self) -> None:
        response = self.client.post(unsubscribe_path(self.token), {"List-Unsubscribe": "One-Click"})

        self.assertEqual(response.status_code, 200)
        self.assertEqual(
            self.suppressions(), [("ada@example.com", "newsletter", "unsubscribe", "recipient:one-click")]
        )

    def test_a_second_one_click_changes_nothing_more(self) -> None:
        for _ in range(2):
            self.assertEqual(
                self.client.post(unsubscribe_path(self.token), ONE_CLICK, content_type=FORM).status_code, 200
            )

        self.assertEqual(Suppression.objects.count(), 1)
        self.assertEqual(SuppressionLogEntry.objects.count(), 1)

    def test_a_token_for_one_address_cannot_unsubscribe_another(self) -> None:
        # The body is not read for the address: only the signed token says who.
        self.client.post(
            unsubscribe_path(self.token), f"{ONE_CLICK}&email=bob@example.com", content_type=FORM
        )
        forged = self.client.post(
            unsubscribe_path(tampered(self.token, e="bob@example.com")), ONE_CLICK, content_type=FORM
        )

        self.assertEqual(forged.status_code, 400)
        self.assertEqual([row[0] for row in self.suppressions()], ["ada@example.com"])

    def test_a_link_from_years_ago_still_unsubscribes(self) -> None:
        start = datetime(2024, 3, 1, tzinfo=UTC)
        with time_machine.travel(start, tick=False):
            token = link_token(email="ada@example.com", topic="newsletter", message_id=7)
        with time_machine.travel(start + timedelta(days=3 * 365), tick=False):
            response = self.client.post(unsubscribe_path(token), ONE_CLICK, content_type=FORM)

        self.assertEqual(response.status_code, 200)
        self.assertEqual(len(self.suppressions()), 1)


class ConfirmationPageTests(RecipientPageTestCase):
    def test_get_shows_a_confirmation_form_and_changes_nothing(self) -> None:
        for method in (self.client.get, self.client.head):
            response = method(unsubscribe_path(self.token))
            self.assertEqual(response.status_code, 200)
            self.assertEqual(dict(response.cookies), {})

        response = self.client.get(unsubscribe_path(self.token))
        self.assertContains(response, "Unsubscribe from The newsletter?")
        self.assertContains(response, "ada@example.com")
        self.assertContains(
            response, f'<form method="post" action="{unsubscribe_path(self.token)}">', html=False
        )
        self.assertContains(response, 'name="scope" value="topic"')
        self.assertContains(response, preferences_path(self.token))
        self.assertIn("no-store", response["Cache-Control"])
        self.assertEqual(response["X-Frame-Options"], "DENY")
        self.assertEqual(self.suppressions(), [])
        self.assertFalse(SuppressionLogEntry.objects.exists())

    def test_the_button_unsubscribes_from_the_topic(self) -> None:
        response = self.client.post(unsubscribe_path(self.token), {"scope": "topic"})

        self.assertEqual(response.status_code, 200)
        self.assertContains(response, "You are unsubscribed")
        self.assertEqual(
            self.suppressions(),
            [("ada@example.com", "newsletter", "unsubscribe", "recipient:unsubscribe-link")],
        )

    def test_the_all_button_leaves_all_marketing(self) -> None:
        response = self.client.post(unsubscribe_path(self.token), {"scope": "all"})

        self.assertContains(response, "any more marketing email")
        self.assertEqual(
            self.suppressions(), [("ada@example.com", "", "unsubscribe", "recipient:unsubscribe-link")]
        )

    def test_the_page_says_when_the_address_is_already_unsubscribed(self) -> None:
        suppression_add(email="ada@example.com", topic="newsletter", reason="unsubscribe", source="test")

        response = self.client.get(unsubscribe_path(self.token))

        self.assertContains(response, "already unsubscribed from The newsletter")
        self.assertNotContains(response, 'value="topic"')

    def test_other_methods_are_refused(self) -> None:
        self.assertEqual(self.client.put(unsubscribe_path(self.token)).status_code, 405)
        self.assertEqual(self.suppressions(), [])


class InvalidLinkTests(RecipientPageTestCase):
    def test_forged_or_tampered_links_answer_400_and_change_nothing(self) -> None:
        payload, timestamp, signature = self.token.split(":")
        bad_tokens = [
            tampered(self.token, e="bob@example.com"),
            tampered(self.token, t=""),
            tampered(self.token, m=1),
            f"{payload}:{timestamp}:{signature[::-1]}",
            "not-a-token",
        ]
        for bad in bad_tokens:
            for path in (unsubscribe_path(bad), preferences_path(bad)):
                with self.subTest(path=path):
                    get = self.client.get(path)
                    self.assertEqual(get.status_code, 400)
                    self.assertContains(get, "This link is invalid", status_code=400)
                    post = self.client.post(path, ONE_CLICK, content_type=FORM)
                    self.assertEqual(post.status_code, 400)
                    self.client.post(path, {"scope": "all", "leave_all": "on"})

        self.assertEqual(self.suppressions(), [])
        self.assertFalse(SuppressionLogEntry.objects.exists())


class PreferenceCentreTests(RecipientPageTestCase):
    def save(self, *, topics: list[str], leave_all: bool = False, token: str | None = None) -> object:
        data: dict[str, object] = {"shown": ["newsletter", "product-updates"], "topics": topics}
        if leave_all:
            data["leave_all"] = "on"
        return self.client.post(preferences_path(token or self.token), data)

    def test_lists_public_topics_with_what_the_address_gets(self) -> None:
        suppression_add(email="ada@example.com", topic="product-updates", reason="unsubscribe", source="test")

        response = self.client.get(preferences_path(self.token))

        self.assertEqual(response.status_code, 200)
        self.assertEqual(dict(response.cookies), {})
        choices = {c.slug: c.subscribed for c in response.context["preferences"].topics}
        self.assertEqual(choices, {"newsletter": True, "product-updates": False})
        self.assertContains(response, 'value="newsletter" id="topic-1" checked', html=False)
        self.assertContains(response, 'value="product-updates" id="topic-2" aria-describedby', html=False)
        self.assertContains(response, "New features.")
        self.assertNotContains(response, "Getting started")
        self.assertContains(response, 'name="leave_all"')

    def test_purposes_automations_and_broadcasts_are_tagged_with_are_topics_too(self) -> None:
        version = factories.published_version()
        trigger = factories.event_type()
        factories.automation(trigger, version, purpose="webinars")
        factories.automation(trigger, version, purpose="onboarding")  # its Topic is private
        factories.automation(trigger, version, purpose="receipts", is_transactional=True)
        Broadcast.objects.create(name="spring sale", template=version.template, purpose="offers")

        response = self.client.get(preferences_path(self.token))

        listed = [(c.slug, c.name) for c in response.context["preferences"].topics]
        self.assertEqual(
            listed,
            [
                ("newsletter", "The newsletter"),
                ("product-updates", "Product updates"),
                ("offers", "Offers"),
                ("webinars", "Webinars"),
            ],
        )
        self.client.post(
            preferences_path(self.token),
            {"shown": [slug for slug, _ in listed], "topics": ["newsletter", "product-updates", "offers"]},
        )
        self.assertEqual(
            self.suppressions(), [("ada@example.com", "webinars", "unsubscribe", "recipient:preferences")]
        )

    def test_opting_out_of_a_topic(self) -> None:
        response = self.save(topics=["newsletter"])

        self.assertEqual(response.status_code, 303)  # type: ignore[attr-defined]
        self.assertEqual(response["Location"], f"{preferences_path(self.token)}?saved=1")  # type: ignore[index]
        self.assertEqual(
            self.suppressions(),
            [("ada@example.com", "product-updates", "unsubscribe", "recipient:preferences")],
        )
        self.assertContains(self.client.get(response["Location"]), "Your preferences are saved.")  # type: ignore[index]

    def test_opting_back_in_lifts_the_unsubscribe_with_a_reason(self) -> None:
        self.save(topics=["newsletter"])

        self.save(topics=["newsletter", "product-updates"])

        self.assertEqual(self.suppressions(), [])
        removed = SuppressionLogEntry.objects.get(action="removed")
        self.assertEqual(
            (removed.topic, removed.reason, removed.source),
            ("product-updates", "recipient opted in via preference centre", "recipient:preferences"),
        )

    def test_leaving_all_marketing_and_coming_back(self) -> None:
        self.save(topics=["newsletter", "product-updates"], leave_all=True)
        self.assertEqual(
            self.suppressions(), [("ada@example.com", "", "unsubscribe", "recipient:preferences")]
        )
        self.assertTrue(self.client.get(preferences_path(self.token)).context["preferences"].left_all)

        self.save(topics=["newsletter", "product-updates"])

        self.assertEqual(self.suppressions(), [])

    def test_opting_in_never_lifts_a_complaint_or_a_bounce(self) -> None:
        suppression_add(
            email="ada@example.com", topic="product-updates", reason="complaint", source="webhook"
        )
        suppression_add(email="ada@example.com", reason="hard_bounce", source="webhook")

        page = self.client.get(preferences_path(self.token))
        self.assertContains(page, "paused by us")
        self.assertContains(page, "not sending any email to this address")
        self.save(topics=["newsletter", "product-updates"])

        self.assertEqual(
            self.suppressions(),
            [
                ("ada@example.com", "", "hard_bounce", "webhook"),
                ("ada@example.com", "product-updates", "complaint", "webhook"),
            ],
        )

    def test_topics_the_form_did_not_show_are_left_alone(self) -> None:
        Topic.objects.create(slug="events", name="Events near you")  # published after the page loaded

        self.save(topics=["newsletter", "product-updates"])

        self.assertEqual(self.suppressions(), [])

    def test_an_expired_link_answers_410_changes_nothing_and_still_offers_to_unsubscribe(self) -> None:
        start = datetime(2025, 1, 1, tzinfo=UTC)
        with time_machine.travel(start, tick=False):
            token = link_token(email="ada@example.com", topic="newsletter", message_id=1)
        with time_machine.travel(start + timedelta(days=400), tick=False):
            page = self.client.get(preferences_path(token))
            posted = self.save(topics=[], leave_all=True, token=token)
            self.assertEqual(self.suppressions(), [])
            unsubscribed = self.client.post(unsubscribe_path(token), {"scope": "all"})

        self.assertContains(page, "This link has expired", status_code=410)
        self.assertContains(page, f'action="{unsubscribe_path(token)}"', status_code=410)
        self.assertEqual(posted.status_code, 410)  # type: ignore[attr-defined]
        self.assertEqual(unsubscribed.status_code, 200)
        self.assertNotContains(unsubscribed, preferences_path(token))
        self.assertEqual(
            self.suppressions(), [("ada@example.com", "", "unsubscribe", "recipient:unsubscribe-link")]
        )


class RateLimitTests(RecipientPageTestCase):
    # Frozen clock: django-ratelimit counts per fixed window, which must not roll over
    # in the middle of a test.
    def setUp(self) -> None:
        super().setUp()
        traveller = time_machine.travel(datetime(2025, 6, 1, 12, 0, 1, tzinfo=UTC), tick=False)
        traveller.start()
        self.addCleanup(traveller.stop)

    @with_options(RECIPIENT_RATE_LIMIT="3/m")
    def test_over_the_limit_pages_answer_429_but_an_authentic_opt_out_is_honoured(self) -> None:
        path = unsubscribe_path(self.token)
        for _ in range(3):
            self.assertEqual(self.client.get(path).status_code, 200)

        limited = self.client.get(path)
        self.assertEqual(limited.status_code, 429)
        self.assertEqual(limited["Retry-After"], "60")
        self.assertEqual(self.client.get(preferences_path(self.token)).status_code, 429)
        forged = self.client.post(unsubscribe_path(tampered(self.token, t="")), ONE_CLICK, content_type=FORM)
        self.assertEqual(forged.status_code, 429)
        self.assertEqual(self.suppressions(), [])

        one_click = self.client.post(path, ONE_CLICK, content_type=FORM)
        self.assertEqual(one_click.status_code, 200)
        self.assertEqual(len(self.suppressions()), 1)

        other_ip = Client(REMOTE_ADDR="192.0.2.77")
        self.assertEqual(other_ip.get(path).status_code, 200)

    @override_settings(
        CACHES={
            "default": {
                "BACKEND": "django.core.cache.backends.redis.RedisCache",
                "LOCATION": "redis://127.0.0.1:1/0",  # nothing listens there
            }
        }
    )
    def test_the_pages_work_when_the_rate_limit_store_is_down(self) -> None:
        with self.assertLogs("suppression.views", "WARNING"):
            response = self.client.post(unsubscribe_path(self.token), ONE_CLICK, content_type=FORM)

        self.assertEqual(response.status_code, 200)
        self.assertEqual(len(self.suppressions()), 1)
