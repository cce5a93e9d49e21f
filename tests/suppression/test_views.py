"""The recipient pages: /u/<token>/ (confirmation page and RFC 8058 one-click POST) and
/preferences/<token>/ (the preference centre), with no login, cookie or CSRF token."""

from __future__ import annotations

import itertools
from datetime import UTC, datetime, timedelta

import time_machine
from django.conf import settings
from django.test import Client, TestCase, override_settings
from django.urls import reverse
from django.utils import timezone

from campaigns.models import Broadcast, Contact
from suppression.consent import (
    consent_decision,
    consent_grant,
    consent_state,
    consent_withdraw,
    double_opt_in_automation,
)
from suppression.models import ConsentRecord, Suppression, SuppressionLogEntry, Topic
from suppression.privacy import email_hash
from suppression.selectors import SendDecision, send_decision
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


class ConsentLedgerTests(RecipientPageTestCase):
    """Recipient choices are written to the consent ledger (GDPR Art. 7(3)), not only to
    the suppression list: otherwise the ledger says "granted" for someone who withdrew,
    and an opt-in at the preference centre leaves a GDPR contact with no consent."""

    USER_AGENT = "Mozilla/5.0 (recipient's mail client)"

    def setUp(self) -> None:
        super().setUp()
        self.client = Client(enforce_csrf_checks=True, REMOTE_ADDR=self.ip, HTTP_USER_AGENT=self.USER_AGENT)
        # Stored as the application gave it; links carry the address lower-cased.
        self.contact = factories.contact(email="Ada@Example.com")
        Contact.objects.filter(pk=self.contact.pk).update(region="de")
        for purpose in ("newsletter", "product-updates"):
            consent_grant(contact=self.contact, purpose=purpose, source="signup-form")

    def state(self, purpose: str, contact: Contact | None = None) -> ConsentRecord | None:
        return consent_state(contact=contact or self.contact, purpose=purpose)

    def rows(self, **filters: object) -> list[tuple[str, str, str]]:
        return sorted(
            ConsentRecord.objects.filter(**filters)
            .exclude(source="signup-form")
            .values_list("purpose", "action", "source")
        )

    def save_preferences(self, *, topics: list[str], leave_all: bool = False) -> None:
        data: dict[str, object] = {"shown": ["newsletter", "product-updates"], "topics": topics}
        if leave_all:
            data["leave_all"] = "on"
        self.assertEqual(self.client.post(preferences_path(self.token), data).status_code, 303)

    def test_one_click_records_the_withdrawal_with_the_client_ip_and_user_agent(self) -> None:
        response = self.client.post(unsubscribe_path(self.token), ONE_CLICK, content_type=FORM)

        self.assertEqual(response.status_code, 200)
        state = self.state("newsletter")
        assert state is not None
        self.assertEqual(
            (state.action, state.source, state.ip_address, state.user_agent),
            ("withdrawn", "recipient:one-click", self.ip, self.USER_AGENT),
        )
        self.assertEqual(state.evidence, {"topic": "newsletter", "message_id": 42})
        self.assertEqual(state.email_hash, email_hash("ada@example.com"))
        # Only the topic the link names.
        self.assertEqual(self.rows(), [("newsletter", "withdrawn", "recipient:one-click")])
        self.assertEqual(self.state("product-updates").action, "granted")  # type: ignore[union-attr]

    def test_a_repeated_one_click_records_one_withdrawal(self) -> None:
        for _ in range(2):
            self.client.post(unsubscribe_path(self.token), ONE_CLICK, content_type=FORM)

        self.assertEqual(self.rows(), [("newsletter", "withdrawn", "recipient:one-click")])

    def test_the_confirmation_button_records_a_withdrawal_from_the_link(self) -> None:
        self.client.post(unsubscribe_path(self.token), {"scope": "topic"})

        self.assertEqual(self.rows(), [("newsletter", "withdrawn", "recipient:unsubscribe-link")])

    def test_unsubscribing_from_all_withdraws_every_purpose_the_contact_had_granted(self) -> None:
        consent_grant(contact=self.contact, purpose="partner-offers", source="signup-form")
        consent_grant(contact=self.contact, purpose="webinars", source="signup-form")
        consent_withdraw(contact=self.contact, purpose="webinars", source="identify")

        self.client.post(unsubscribe_path(self.token), {"scope": "all"})

        self.assertEqual(
            self.rows(source="recipient:unsubscribe-link"),
            [
                ("newsletter", "withdrawn", "recipient:unsubscribe-link"),
                ("partner-offers", "withdrawn", "recipient:unsubscribe-link"),
                ("product-updates", "withdrawn", "recipient:unsubscribe-link"),
            ],
        )
        self.assertEqual(self.state("webinars").source, "identify")  # type: ignore[union-attr]
        self.assertEqual(self.state("newsletter").evidence, {"all_marketing": True, "message_id": 42})  # type: ignore[union-attr]

    def test_getting_the_unsubscribe_link_records_nothing(self) -> None:
        before = ConsentRecord.objects.count()

        self.assertEqual(self.client.get(unsubscribe_path(self.token)).status_code, 200)
        self.assertEqual(self.client.head(unsubscribe_path(self.token)).status_code, 200)

        self.assertEqual(ConsentRecord.objects.count(), before)
        self.assertEqual(self.state("newsletter").action, "granted")  # type: ignore[union-attr]

    def test_every_contact_with_the_address_is_recorded_but_never_an_erased_one(self) -> None:
        other = factories.contact(email="ada@example.com")
        erased = factories.contact(email="ada@example.com")
        Contact.objects.filter(pk=erased.pk).update(erased_at=timezone.now())
        someone_else = factories.contact(email="bob@example.com")

        self.client.post(unsubscribe_path(self.token), ONE_CLICK, content_type=FORM)

        self.assertEqual(self.state("newsletter").action, "withdrawn")  # type: ignore[union-attr]
        self.assertEqual(self.state("newsletter", other).action, "withdrawn")  # type: ignore[union-attr]
        self.assertFalse(ConsentRecord.objects.filter(contact__in=[erased, someone_else]).exists())

    @with_options(GDPR=False, CCPA=False, CONSENT_CHECK=False)
    def test_a_contact_with_no_consent_history_still_gets_the_withdrawal_recorded(self) -> None:
        bob = factories.contact(email="bob@example.com")
        token = link_token(email="bob@example.com", topic="newsletter", message_id=None)

        self.client.post(unsubscribe_path(token), ONE_CLICK, content_type=FORM)

        state = self.state("newsletter", bob)
        assert state is not None
        self.assertEqual((state.action, state.source), ("withdrawn", "recipient:one-click"))
        self.assertEqual(state.evidence, {"topic": "newsletter"})

    def test_a_client_address_that_is_not_an_ip_still_unsubscribes(self) -> None:
        client = Client(REMOTE_ADDR="unix:/run/granian.sock")

        self.assertEqual(
            client.post(unsubscribe_path(self.token), ONE_CLICK, content_type=FORM).status_code, 200
        )

        state = self.state("newsletter")
        assert state is not None
        self.assertEqual((state.action, state.ip_address, state.user_agent), ("withdrawn", None, ""))
        self.assertEqual(len(self.suppressions()), 1)

    @with_options(GDPR=True, CONSENT_CHECK=False)
    def test_unticking_a_topic_withdraws_and_ticking_it_again_grants_so_mail_flows_again(self) -> None:
        self.save_preferences(topics=["newsletter"])

        state = self.state("product-updates")
        assert state is not None
        self.assertEqual(
            (state.action, state.source, state.ip_address, state.user_agent),
            ("withdrawn", "recipient:preferences", self.ip, self.USER_AGENT),
        )
        self.assertEqual(self.state("newsletter").action, "granted")  # type: ignore[union-attr]
        self.assertFalse(self.decide("product-updates").allowed)

        self.save_preferences(topics=["newsletter", "product-updates"])

        state = self.state("product-updates")
        assert state is not None
        self.assertEqual(
            (state.action, state.source, state.ip_address, state.user_agent, state.notice),
            ("granted", "recipient:preferences", self.ip, self.USER_AGENT, None),
        )
        self.assertEqual(state.evidence, {"topic": "product-updates", "label": "Product updates"})
        self.assertEqual(
            self.rows(),
            [
                ("product-updates", "granted", "recipient:preferences"),
                ("product-updates", "withdrawn", "recipient:preferences"),
            ],
        )
        # A later message for that purpose: the consent decision (GDPR, region "de") and
        # the suppression list both let it through.
        self.assertEqual(self.decide("product-updates"), SendDecision(allowed=True))

    def test_saving_unchanged_preferences_records_nothing(self) -> None:
        self.save_preferences(topics=["newsletter", "product-updates"])
        self.save_preferences(topics=["newsletter"])
        self.save_preferences(topics=["newsletter"])

        self.assertEqual(self.rows(), [("product-updates", "withdrawn", "recipient:preferences")])

    def test_a_topic_left_ticked_as_shown_is_not_a_grant(self) -> None:
        # Never granted, shown ticked (nothing suppresses it): the recipient saving the
        # page has not consented to it (a pre-ticked box, CJEU C-673/17 Planet49).
        bob = factories.contact(email="bob@example.com")
        token = link_token(email="bob@example.com", topic="newsletter", message_id=None)
        data = {"shown": ["newsletter", "product-updates"], "topics": ["newsletter", "product-updates"]}

        self.client.post(preferences_path(token), {**data, "leave_all": "on"})
        self.client.post(preferences_path(token), data)

        self.assertFalse(ConsentRecord.objects.filter(contact=bob).exists())

    def test_re_ticking_a_topic_still_granted_records_no_second_grant(self) -> None:
        # An unsubscribe recorded before the ledger was kept in step with it.
        suppression_add(email="ada@example.com", topic="product-updates", reason="unsubscribe", source="test")

        self.save_preferences(topics=["newsletter", "product-updates"])

        self.assertEqual(self.suppressions(), [])
        self.assertEqual(self.rows(), [])

    def test_leaving_all_withdraws_everything_and_coming_back_grants_what_is_ticked(self) -> None:
        consent_grant(contact=self.contact, purpose="webinars", source="signup-form")

        self.save_preferences(topics=["newsletter", "product-updates"], leave_all=True)

        self.assertEqual(
            self.rows(),
            [
                ("newsletter", "withdrawn", "recipient:preferences"),
                ("product-updates", "withdrawn", "recipient:preferences"),
                ("webinars", "withdrawn", "recipient:preferences"),
            ],
        )

        self.save_preferences(topics=["newsletter"])  # "leave all" unticked, one topic less

        self.assertEqual(self.state("newsletter").action, "granted")  # type: ignore[union-attr]
        self.assertEqual(
            self.state("newsletter").evidence,  # type: ignore[union-attr]
            {"topic": "newsletter", "label": "The newsletter", "after_all_marketing": True},
        )
        self.assertEqual(self.state("product-updates").action, "withdrawn")  # type: ignore[union-attr]
        # Not on the page: the recipient did not choose it again.
        self.assertEqual(self.state("webinars").action, "withdrawn")  # type: ignore[union-attr]

    def test_coming_back_does_not_undo_a_withdrawal_made_another_way(self) -> None:
        consent_withdraw(contact=self.contact, purpose="product-updates", source="identify")
        self.save_preferences(topics=["newsletter", "product-updates"], leave_all=True)

        self.save_preferences(topics=["newsletter", "product-updates"])

        self.assertEqual(self.state("newsletter").action, "granted")  # type: ignore[union-attr]
        self.assertEqual(self.state("product-updates").source, "identify")  # type: ignore[union-attr]

    def test_opting_in_grants_at_once_with_double_opt_in_on(self) -> None:
        # The page's link was mailed to the address and signed for it: what a
        # confirmation email would prove.
        automation = double_opt_in_automation()
        automation.active = True
        automation.save(update_fields=["active"])
        self.save_preferences(topics=["newsletter"])

        self.save_preferences(topics=["newsletter", "product-updates"])

        self.assertEqual(self.state("product-updates").action, "granted")  # type: ignore[union-attr]
        self.assertFalse(ConsentRecord.objects.filter(action="requested").exists())

    def decide(self, purpose: str) -> SendDecision:
        self.contact.refresh_from_db()
        consent = consent_decision(contact=self.contact, purpose=purpose, transactional=False)
        if not consent.allowed:
            return consent
        return send_decision(email=self.contact.email, purpose=purpose, authoritative=True)
