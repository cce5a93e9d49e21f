"""Signed recipient links, the links and RFC 8058 headers each message carries, and the
whole loop through the delivery engine and the ESP sandbox."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from urllib.parse import urlsplit

import time_machine
from django.conf import settings
from django.core import signing
from django.test import TestCase, override_settings
from django.urls import reverse, set_script_prefix

from campaigns.delivery import messages_send_batch
from campaigns.models import Contact, Message
from mailauto.sandbox import SandboxServer
from suppression.consent import consent_grant, consent_state
from suppression.models import Suppression, SuppressionLogEntry, Topic
from suppression.services import suppression_remove
from suppression.unsubscribe import (
    TOKEN_SALT,
    InvalidLink,
    link_read,
    link_token,
    message_headers,
    message_links,
)
from tests import factories
from tests.conftest import sandbox_anymail_settings, use_sandbox

HTTPS_SITE = "https://mail.example.test"


def tampered(token: str, **changes: object) -> str:
    """The token with its payload changed and its timestamp and signature kept."""
    payload, timestamp, signature = token.split(":")
    data = json.loads(signing.b64_decode(payload.encode()))
    data.update(changes)
    encoded = signing.b64_encode(json.dumps(data, separators=(",", ":")).encode()).decode()
    return f"{encoded}:{timestamp}:{signature}"


class TokenTests(TestCase):
    def setUp(self) -> None:
        self.token = link_token(email="Ada@Example.com", topic="marketing", message_id=42)

    def test_round_trip(self) -> None:
        link = link_read(self.token)

        self.assertEqual((link.email, link.topic, link.message_id), ("ada@example.com", "marketing", 42))
        self.assertFalse(link.preferences_expired)

    def test_re_encoding_an_unchanged_payload_still_verifies(self) -> None:
        # Guards the tampering tests below: they fail because of the change, not the encoding.
        self.assertEqual(link_read(tampered(self.token)).email, "ada@example.com")

    def test_changing_the_email_invalidates_it(self) -> None:
        with self.assertRaises(InvalidLink):
            link_read(tampered(self.token, e="bob@example.com"))

    def test_changing_the_topic_invalidates_it(self) -> None:
        with self.assertRaises(InvalidLink):
            link_read(tampered(self.token, t=""))

    def test_changing_the_message_id_invalidates_it(self) -> None:
        with self.assertRaises(InvalidLink):
            link_read(tampered(self.token, m=43))

    def test_changing_the_signature_or_timestamp_invalidates_it(self) -> None:
        payload, timestamp, signature = self.token.split(":")
        flipped = ("A" if signature[0] != "A" else "B") + signature[1:]
        for bad in (f"{payload}:{timestamp}:{flipped}", f"{payload}:{timestamp}x:{signature}"):
            with self.subTest(bad=bad), self.assertRaises(InvalidLink):
                link_read(bad)

    def test_a_value_signed_for_another_purpose_is_refused(self) -> None:
        payload = {"e": "ada@example.com", "t": "marketing", "m": 42}
        for salt in ("django.core.signing", "mailauto.suppression.consent"):
            with self.subTest(salt=salt), self.assertRaises(InvalidLink):
                link_read(signing.dumps(payload, salt=salt))
        self.assertEqual(link_read(signing.dumps(payload, salt=TOKEN_SALT)).topic, "marketing")

    def test_a_token_signed_with_another_key_is_refused(self) -> None:
        with override_settings(SECRET_KEY="another-key-entirely-" * 3), self.assertRaises(InvalidLink):
            link_read(self.token)

    def test_a_changed_secret_key_signs_new_tokens_at_once(self) -> None:
        # The signer is reused between calls; it must never outlive the key.
        with override_settings(SECRET_KEY="another-key-entirely-" * 3):
            other = link_token(email="ada@example.com", topic="marketing", message_id=42)
            self.assertEqual(link_read(other).email, "ada@example.com")
        with self.assertRaises(InvalidLink):
            link_read(other)
        self.assertEqual(link_read(self.token).email, "ada@example.com")

    def test_a_rotated_key_kept_in_the_fallbacks_still_verifies(self) -> None:

        with override_settings(SECRET_KEY="the-new-key-" * 5, SECRET_KEY_FALLBACKS=[settings.SECRET_KEY]):
            self.assertEqual(link_read(self.token).message_id, 42)

    def test_garbage_is_refused(self) -> None:
        for bad in ("", "abc", "a:b:c", "é:é:é", self.token[:-3], self.token + "x", "x" * 2000):
            with self.subTest(bad=bad[:20]), self.assertRaises(InvalidLink):
                link_read(bad)

    def test_preference_centre_lifetime_is_a_year_and_unsubscribing_never_expires(self) -> None:
        start = datetime(2025, 1, 1, tzinfo=UTC)
        with time_machine.travel(start, tick=False):
            token = link_token(email="ada@example.com", topic="marketing", message_id=1)
        with time_machine.travel(start + timedelta(days=364), tick=False):
            self.assertFalse(link_read(token).preferences_expired)
        with time_machine.travel(start + timedelta(days=366), tick=False):
            self.assertTrue(link_read(token).preferences_expired)
        with time_machine.travel(start + timedelta(days=5 * 365), tick=False):
            link = link_read(token)  # authentic: still good for unsubscribing
        self.assertEqual((link.email, link.preferences_expired), ("ada@example.com", True))


@override_settings(SITE_URL=HTTPS_SITE)
class MessageLinksAndHeadersTests(TestCase):
    @classmethod
    def setUpTestData(cls) -> None:
        cls.contact = factories.contact(email="ada@example.com")
        cls.version = factories.published_version()

    def test_marketing_message_gets_unsubscribe_and_preferences_links(self) -> None:
        message = factories.message(self.version, self.contact, purpose="product-updates")

        links = message_links(message=message)

        self.assertEqual(set(links), {"unsubscribe_url", "preferences_url"})
        unsubscribe, preferences = urlsplit(links["unsubscribe_url"]), urlsplit(links["preferences_url"])
        self.assertEqual(f"{unsubscribe.scheme}://{unsubscribe.netloc}", HTTPS_SITE)
        self.assertTrue(unsubscribe.path.startswith("/u/"))
        self.assertTrue(preferences.path.startswith("/preferences/"))
        link = link_read(unsubscribe.path.split("/")[2])
        self.assertEqual(
            (link.email, link.topic, link.message_id), ("ada@example.com", "product-updates", message.pk)
        )

    def test_links_are_the_reversed_urls_under_site_url(self) -> None:
        message = factories.message(self.version, self.contact)
        links = message_links(message=message)
        token = urlsplit(links["unsubscribe_url"]).path.split("/")[2]
        self.assertEqual(
            links["unsubscribe_url"], HTTPS_SITE + reverse("suppression:unsubscribe", args=[token])
        )
        self.assertEqual(
            links["preferences_url"], HTTPS_SITE + reverse("suppression:preferences", args=[token])
        )

    def test_a_changed_site_url_takes_effect_at_once(self) -> None:
        # The URL around the token is remembered; it must never outlive SITE_URL.
        message = factories.message(self.version, self.contact)
        for site in (HTTPS_SITE, "https://other.example.test", HTTPS_SITE):
            with self.subTest(site=site), override_settings(SITE_URL=site):
                links = message_links(message=message)
                self.assertTrue(links["unsubscribe_url"].startswith(f"{site}/u/"))
                self.assertTrue(links["preferences_url"].startswith(f"{site}/preferences/"))

    def test_the_script_prefix_is_honoured(self) -> None:
        message = factories.message(self.version, self.contact)
        message_links(message=message)  # remembered without a prefix
        set_script_prefix("/mail/")
        self.addCleanup(set_script_prefix, "/")
        self.assertTrue(message_links(message=message)["unsubscribe_url"].startswith(f"{HTTPS_SITE}/mail/u/"))

    def test_transactional_message_gets_only_a_preferences_link(self) -> None:
        message = factories.message(self.version, self.contact, purpose="receipts", transactional=True)

        links = message_links(message=message)

        self.assertEqual(set(links), {"preferences_url"})
        link = link_read(urlsplit(links["preferences_url"]).path.split("/")[2])
        self.assertEqual((link.email, link.topic, link.message_id), ("ada@example.com", "", message.pk))

    def test_marketing_message_carries_the_one_click_headers(self) -> None:
        message = factories.message(self.version, self.contact)
        links = message_links(message=message)

        headers = message_headers(message=message, links=links)

        self.assertEqual(
            headers,
            {
                "List-Unsubscribe": f"<{links['unsubscribe_url']}>",
                "List-Unsubscribe-Post": "List-Unsubscribe=One-Click",
            },
        )

    def test_transactional_message_carries_no_unsubscribe_headers(self) -> None:
        message = factories.message(self.version, self.contact, transactional=True, purpose="receipts")

        self.assertEqual(message_headers(message=message, links=message_links(message=message)), {})

    @override_settings(SITE_URL="http://127.0.0.1:8000")
    def test_no_one_click_signal_without_https(self) -> None:
        message = factories.message(self.version, self.contact)
        links = message_links(message=message)

        headers = message_headers(message=message, links=links)

        self.assertEqual(headers, {"List-Unsubscribe": f"<{links['unsubscribe_url']}>"})


@override_settings(SITE_URL=HTTPS_SITE)
class UnsubscribeThroughDeliveryTests(TestCase):
    """The real loop: send through Anymail to the sandbox, follow the link it received."""

    def setUp(self) -> None:
        self.sandbox = use_sandbox(self)

    @classmethod
    def setUpTestData(cls) -> None:
        cls.contact = factories.contact(email="ada@example.com", first_name="Ada")
        cls.version = factories.published_version(html="<p>News for {{ contact.first_name }}</p>")

    def send(self, **kw: object) -> Message:
        message = factories.message(self.version, self.contact, **kw)
        messages_send_batch()
        message.refresh_from_db()
        return message

    def test_one_click_on_the_received_link_stops_the_next_send_for_that_topic(self) -> None:
        first = self.send(purpose="newsletter")
        self.assertEqual(first.status, Message.Status.SENT)
        [received] = self.sandbox.messages()
        headers = received["headers"]
        self.assertEqual(headers["List-Unsubscribe-Post"], "List-Unsubscribe=One-Click")
        url = headers["List-Unsubscribe"].strip("<>")
        self.assertTrue(url.startswith(f"{HTTPS_SITE}/u/"))
        # A visible link in both parts (Gmail's sender guidelines ask for one in the body).
        self.assertIn(f'href="{url}"', received["html"])
        self.assertIn(f"Unsubscribe: {url}", received["text"])

        response = self.client.post(
            urlsplit(url).path,
            "List-Unsubscribe=One-Click",
            content_type="application/x-www-form-urlencoded",
        )

        self.assertEqual(response.status_code, 200)
        suppression = Suppression.objects.get(email="ada@example.com")
        self.assertEqual(
            (suppression.topic, suppression.reason, suppression.source, suppression.detail),
            ("newsletter", "unsubscribe", "recipient:one-click", f"via message {first.pk}"),
        )
        self.assertTrue(SuppressionLogEntry.objects.filter(source="recipient:one-click").exists())

        second = self.send(purpose="newsletter")
        self.assertEqual(second.status, Message.Status.SUPPRESSED)
        self.assertEqual(len(self.sandbox.messages()), 1)

        # Other topics and transactional mail still go.
        self.assertEqual(self.send(purpose="product-updates").status, Message.Status.SENT)
        receipt = self.send(purpose="newsletter", transactional=True)
        self.assertEqual(receipt.status, Message.Status.SENT)
        self.assertNotIn("List-Unsubscribe", self.sandbox.messages()[-1]["headers"])


@override_settings(SITE_URL=HTTPS_SITE)
class UnsubscribeWithdrawsConsentThroughDeliveryTests(TestCase):
    """The ledger, not only the suppression list, keeps a one-click unsubscribe: with GDPR
    on, lifting the suppression later (an admin) does not let mail through on the old
    grant; opting in again at the preference centre does."""

    def setUp(self) -> None:
        self.sandbox = SandboxServer(port=0).start()
        self.addCleanup(self.sandbox.stop)
        override = override_settings(
            EMAIL_BACKEND="anymail.backends.postmark.EmailBackend",
            ANYMAIL=sandbox_anymail_settings(self.sandbox),
            MAILAUTO={**settings.MAILAUTO, "GDPR": True, "CONSENT_CHECK": False},
        )
        override.enable()
        self.addCleanup(override.disable)

    @classmethod
    def setUpTestData(cls) -> None:
        cls.contact = factories.contact(email="ada@example.com", first_name="Ada")
        Contact.objects.filter(pk=cls.contact.pk).update(region="fr")
        cls.contact.refresh_from_db()
        cls.version = factories.published_version(html="<p>News for {{ contact.first_name }}</p>")
        Topic.objects.create(slug="newsletter", name="The newsletter")
        consent_grant(contact=cls.contact, purpose="newsletter", source="signup-form")

    def send(self) -> Message:
        message = factories.message(self.version, self.contact, purpose="newsletter")
        messages_send_batch()
        message.refresh_from_db()
        return message

    def one_click(self) -> None:
        url = self.sandbox.messages()[-1]["headers"]["List-Unsubscribe"].strip("<>")
        response = self.client.post(
            urlsplit(url).path,
            "List-Unsubscribe=One-Click",
            content_type="application/x-www-form-urlencoded",
            headers={"user-agent": "Gmail one-click"},
        )
        self.assertEqual(response.status_code, 200)

    def test_lifting_the_suppression_does_not_revive_the_old_grant(self) -> None:
        self.assertEqual(self.send().status, Message.Status.SENT)
        self.one_click()
        suppression_remove(
            email="ada@example.com", topic="newsletter", reason="lifted by staff", source="admin"
        )

        state = consent_state(contact=self.contact, purpose="newsletter")
        assert state is not None
        self.assertEqual(
            (state.action, state.source, state.user_agent),
            ("withdrawn", "recipient:one-click", "Gmail one-click"),
        )
        after = self.send()
        self.assertEqual(after.status, Message.Status.SUPPRESSED)
        self.assertIn("consent for 'newsletter' withdrawn", after.status_reason)
        self.assertEqual(len(self.sandbox.messages()), 1)

    def test_opting_in_again_at_the_preference_centre_lets_mail_through(self) -> None:
        first = self.send()
        self.one_click()
        self.assertEqual(self.send().status, Message.Status.SUPPRESSED)

        token = link_token(email="ada@example.com", topic="newsletter", message_id=first.pk)
        saved = self.client.post(
            reverse("suppression:preferences", args=[token]),
            {"shown": ["newsletter"], "topics": ["newsletter"]},
        )

        self.assertEqual(saved.status_code, 303)
        self.assertEqual(self.send().status, Message.Status.SENT)
        self.assertEqual(len(self.sandbox.messages()), 2)
