"""The guarded webhook endpoints (webhooks/views.py, webhooks/urls.py): every ESP mounted,
basic auth, the ESP's signature, rate limiting, and bad input answered with a 4xx that
changes nothing and logs no address."""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import uuid

import time_machine
from anymail import urls as anymail_urls
from django.conf import settings
from django.test import override_settings
from django.urls import reverse
from django.utils import timezone

from campaigns.models import Message
from suppression.models import Suppression, SuppressionLogEntry
from tests.webhooks.postmark import URL, WebhookTestCase, for_message, payload
from webhooks.models import TrackingEvent

MAILGUN_KEY = "mailgun-signing-key-for-tests"


def unique_ip() -> str:
    """A client address no other test (or earlier run, within the rate-limit window)
    used: django-ratelimit keys IPv6 clients by their /64."""
    h = uuid.uuid4().hex
    return f"2001:db8:{h[:4]}:{h[4:8]}::1"


class GuardTestCase(WebhookTestCase):
    def setUp(self) -> None:
        self.sent = self.message()

    def assertNothingChanged(self) -> None:
        self.assertFalse(TrackingEvent.objects.exists())
        self.assertFalse(Suppression.objects.exists())
        self.assertFalse(SuppressionLogEntry.objects.exists())
        self.sent.refresh_from_db()
        self.assertEqual(self.sent.status, Message.Status.SENT)

    def bounce(self) -> dict[str, object]:
        return for_message("bounce", self.sent)


class MountTests(GuardTestCase):
    def test_every_anymail_tracking_webhook_is_mounted_under_webhooks(self) -> None:
        names = [p.name for p in anymail_urls.urlpatterns if p.name and p.name.endswith("_tracking_webhook")]
        self.assertIn("postmark_tracking_webhook", names)
        self.assertGreaterEqual(len(names), 14)
        for name in names:
            esp = name.removesuffix("_tracking_webhook")
            with self.subTest(esp=esp):
                url = reverse(f"webhooks:{esp}-tracking")
                self.assertEqual(url, f"/webhooks/{esp}/tracking/")
                # Guarded like Postmark's: no credentials, no entry.
                self.assertEqual(self.post({}, auth="", url=url).status_code, 401)

    def test_a_head_request_is_answered_for_esps_that_verify_the_url(self) -> None:
        self.assertEqual(self.client.head(URL).status_code, 200)

    def test_a_get_is_not_allowed(self) -> None:
        self.assertEqual(self.client.get(URL).status_code, 405)


class AuthTests(GuardTestCase):
    def test_missing_secret_is_401_and_changes_nothing(self) -> None:
        response = self.post(self.bounce(), auth="")
        self.assertEqual(response.status_code, 401)
        self.assertEqual(response["WWW-Authenticate"], 'Basic realm="webhooks"')
        self.assertNothingChanged()

    def test_wrong_secret_is_401_and_changes_nothing(self) -> None:
        for credentials in ("sandbox:wrong", "other:sandbox-webhook-secret", "sandbox"):
            with self.subTest(credentials=credentials):
                self.assertEqual(self.post(self.bounce(), auth=credentials).status_code, 401)
        response = self.client.post(
            URL,
            data=json.dumps(self.bounce()),
            content_type="application/json",
            headers={"Authorization": "Bearer x"},
        )
        self.assertEqual(response.status_code, 401)
        self.assertNothingChanged()

    def test_any_of_several_secrets_is_accepted(self) -> None:
        # Rotating the secret: Anymail's WEBHOOK_SECRET may be a list.
        anymail = {**settings.ANYMAIL, "WEBHOOK_SECRET": ["old:secret", "new:secret"]}
        with override_settings(ANYMAIL=anymail):
            self.assertEqual(self.post(self.bounce(), auth="sandbox:sandbox-webhook-secret").status_code, 401)
            self.assertAccepted(self.post(self.bounce(), auth="old:secret"))
        self.assertTrue(Suppression.objects.exists())

    def test_no_secret_configured_is_503_and_changes_nothing(self) -> None:
        # ANYMAIL_WEBHOOK_SECRET="" in the environment (or an empty *_FILE) leaves the
        # secret empty: Anymail alone would then take posts from anyone.
        for secret in ("", [], [""], None):
            anymail = {**settings.ANYMAIL, "WEBHOOK_SECRET": secret}
            if secret is None:
                del anymail["WEBHOOK_SECRET"]
            with self.subTest(secret=secret), override_settings(ANYMAIL=anymail):
                for auth in ("", "sandbox:sandbox-webhook-secret", ":"):
                    with self.assertLogs("webhooks.views", level="ERROR") as logs:
                        response = self.post(self.bounce(), auth=auth)
                    self.assertEqual(response.status_code, 503, response.content)
                    self.assertEqual(response.json(), {"error": "webhook secret not configured"})
                    self.assertNotIn(self.sent.to_email, " ".join(logs.output))
        self.assertNothingChanged()


@override_settings(ANYMAIL={**settings.ANYMAIL, "MAILGUN_WEBHOOK_SIGNING_KEY": MAILGUN_KEY})
class SignatureTests(GuardTestCase):
    url = "/webhooks/mailgun/tracking/"

    def mailgun(self, *, key: str = MAILGUN_KEY) -> dict[str, object]:
        # Mailgun's documented JSON webhook: a signature block and the event data.
        timestamp, token = "1700000000", uuid.uuid4().hex
        signature = hmac.new(key.encode(), f"{timestamp}{token}".encode(), hashlib.sha256).hexdigest()
        return {
            "signature": {"timestamp": timestamp, "token": token, "signature": signature},
            "event-data": {
                "event": "failed",
                "severity": "permanent",
                "reason": "bounce",
                "timestamp": 1700000000.5,
                "id": "event-1",
                "recipient": self.sent.to_email,
                "message": {"headers": {"message-id": "mailgun-1@example.com"}},
                "user-variables": {"mailauto_message_id": str(self.sent.pk)},
                "delivery-status": {"code": 550, "message": "5.1.1 user unknown", "description": ""},
            },
        }

    def test_a_valid_mailgun_signature_is_accepted_and_recorded(self) -> None:
        self.assertAccepted(self.post(self.mailgun()))
        event = TrackingEvent.objects.get()
        self.assertEqual(event.esp, "mailgun")
        self.assertEqual(event.message_id, self.sent.pk)
        self.assertEqual(Suppression.objects.get().source, "webhook:mailgun")

    def test_a_bad_signature_is_403_and_changes_nothing(self) -> None:
        self.assertEqual(self.post(self.mailgun(key="not-the-key")).status_code, 403)
        self.assertNothingChanged()

    def test_a_missing_signature_block_is_403(self) -> None:
        body = self.mailgun()
        del body["signature"]
        self.assertEqual(self.post(body).status_code, 403)
        self.assertNothingChanged()

    def test_unstorable_text_or_an_out_of_range_timestamp_is_400_for_other_esps_too(self) -> None:
        cases: dict[str, tuple[str, object]] = {
            "the payload contains text that is not valid Unicode (a lone surrogate)": (
                "reason",
                "bounce \ud800",
            ),
            "the payload contains a NUL character, which cannot be stored": ("reason", "bounce \x00"),
            "the timestamp is out of range (1970 to 9998 UTC)": ("timestamp", -86400.0),
        }
        for error, (field, value) in cases.items():
            with self.subTest(error=error):
                body = self.mailgun()
                body["event-data"][field] = value  # type: ignore[index]
                response = self.post(json.dumps(body), raw=True)
                self.assertEqual(response.status_code, 400, response.content)
                self.assertEqual(response.json(), {"error": error})
        self.assertNothingChanged()

    def test_the_basic_auth_secret_is_still_required(self) -> None:
        self.assertEqual(self.post(self.mailgun(), auth="").status_code, 401)
        self.assertNothingChanged()


class UnconfiguredEspTests(GuardTestCase):
    def test_an_esp_without_its_keys_answers_503_not_500(self) -> None:
        # Mailgun needs a signing key; none is configured in the test settings.
        with self.assertLogs("webhooks.views", level="ERROR"):
            response = self.post({"event-data": {}}, url="/webhooks/mailgun/tracking/")
        self.assertEqual(response.status_code, 503)


class BadInputTests(GuardTestCase):
    def assertRejected(self, body: object, status: int = 400, *, raw: bool = False) -> dict[str, object]:
        response = self.post(body, raw=raw)
        self.assertEqual(response.status_code, status, response.content)
        self.assertNothingChanged()
        return response.json()

    def assertNoPayloadLogged(self, records: list[logging.LogRecord], *, count: int) -> None:
        rejections = [r for r in records if r.name == "webhooks.views"]
        self.assertEqual(len(rejections), count)
        for record in records:
            text = " ".join([record.getMessage(), *(str(v) for v in record.__dict__.values())])
            self.assertNotIn("@example.com", text, record.name)
            self.assertNotIn("secret.person", text, record.name)

    def test_malformed_json_is_400(self) -> None:
        for body in ('{"RecordType": "Bounce",', "", "not json", b"\xff\xfe{}", "[" * 100_000):
            with self.subTest(body=body[:20]):
                self.assertRejected(body, raw=True)

    def test_json_that_is_not_an_object_is_400(self) -> None:
        for body in ([self.bounce()], "Bounce", 42, None):
            with self.subTest(body=type(body).__name__):
                self.assertRejected(body)

    def test_missing_record_type_is_400(self) -> None:
        body = self.bounce()
        del body["RecordType"]
        self.assertEqual(self.assertRejected(body), {"error": "RecordType is missing"})

    def test_postmark_inbound_payload_on_the_tracking_url_is_400(self) -> None:
        self.assertRejected(payload("inbound"))

    def test_fields_of_the_wrong_type_are_400(self) -> None:
        cases = {
            "RecordType": 5,
            "Email": 5,
            "MessageID": ["x"],
            "Metadata": ["mailauto_message_id"],
            "ID": "4323372036854775807",
            "BouncedAt": "yesterday",
            "Type": None,
            "Description": {"text": "x"},
        }
        for field, value in cases.items():
            with self.subTest(field=field):
                self.assertRejected({**self.bounce(), field: value})
        self.assertRejected({**self.bounce(), "Metadata": {"nested": {"a": 1}}})
        self.assertRejected({**self.bounce(), "ID": True})

    def test_required_fields_of_a_known_record_type_are_400_when_missing(self) -> None:
        for field in ("ID", "Type", "Email"):
            with self.subTest(field=field):
                body = self.bounce()
                del body[field]
                self.assertRejected(body)
        delivery = for_message("delivery", self.sent)
        del delivery["Recipient"]
        self.assertRejected(delivery)

    def test_values_postgres_cannot_store_are_400(self) -> None:
        self.assertRejected('{"RecordType": "Delivery", "Recipient": "a@example.com", "Tag": NaN}', raw=True)
        self.assertRejected({**for_message("delivery", self.sent), "Details": "nul \x00 here"})
        self.assertRejected({**for_message("delivery", self.sent), "Extra": {"k": "nul \x00 here"}})
        self.assertRejected({**for_message("delivery", self.sent), "MessageID": "x" * 300})

    def test_a_lone_surrogate_anywhere_in_the_payload_is_400_and_logs_no_payload(self) -> None:
        # JSON "\\ud800" parses to a lone surrogate, which Postgres cannot store (and whose
        # error would quote the row, addresses included, into the database's log).
        delivery = for_message("delivery", self.sent)
        cases: list[dict[str, object]] = [
            {**delivery, "Details": "secret.person@example.com \ud800"},
            {**delivery, "Recipient": "secret.person\udfff@example.com"},
            {**delivery, "Metadata": {"note": "\ud83d secret.person@example.com"}},
            {**delivery, "Extra": ["secret.person@example.com", {"k": "\udc00"}]},
            {**delivery, "Key \ud800": "secret.person@example.com"},
            {**self.bounce(), "Description": "\ud800 secret.person@example.com"},
            {**for_message("click", self.sent), "OriginalLink": "https://example.com/\ud800"},
        ]
        with self.assertLogs(level="DEBUG") as logs:
            for body in cases:
                with self.subTest(body=sorted(body)):
                    error = self.assertRejected(json.dumps(body), raw=True)
                    self.assertEqual(
                        error,
                        {"error": "the payload contains text that is not valid Unicode (a lone surrogate)"},
                    )
        self.assertNoPayloadLogged(logs.records, count=len(cases))

    def test_a_nul_character_anywhere_in_the_payload_is_400_and_logs_no_payload(self) -> None:
        delivery = for_message("delivery", self.sent)
        cases: list[dict[str, object]] = [
            {**delivery, "Details": "secret.person@example.com \x00"},
            {**delivery, "Metadata": {"note": "\x00 secret.person@example.com"}},
            {**delivery, "Key \x00": "secret.person@example.com"},
            {**self.bounce(), "Description": "\x00"},
        ]
        with self.assertLogs(level="DEBUG") as logs:
            for body in cases:
                with self.subTest(body=sorted(body)):
                    error = self.assertRejected(body)
                    self.assertEqual(
                        error, {"error": "the payload contains a NUL character, which cannot be stored"}
                    )
        self.assertNoPayloadLogged(logs.records, count=len(cases))

    def test_text_beyond_the_basic_plane_is_still_accepted(self) -> None:
        # A real astral character is one code point, not a lone surrogate.
        self.assertAccepted(self.post({**for_message("delivery", self.sent), "Details": "ok \U0001f600"}))
        self.assertEqual(TrackingEvent.objects.get().esp_event["Details"], "ok \U0001f600")

    def test_a_timestamp_outside_1970_to_9998_in_utc_is_400_naming_the_field(self) -> None:
        cases = {
            "delivery": ("DeliveredAt", "0001-01-01T00:00:00+14:00"),  # 1 BC in UTC
            "bounce": ("BouncedAt", "9999-12-31T23:59:59-14:00"),  # year 10000 in UTC
            "open": ("ReceivedAt", "1969-12-31T23:59:59Z"),
            "click": ("ReceivedAt", "0001-01-01T00:00:00"),
            "subscription_change": ("ChangedAt", "9999-01-01T00:00:00Z"),
        }
        for name, (field, value) in cases.items():
            with self.subTest(name=name, field=field, value=value):
                error = self.assertRejected({**for_message(name, self.sent), field: value})
                self.assertEqual(error, {"error": f"{field} is out of range (1970 to 9998 UTC)"})

    def test_timestamps_at_the_edges_of_the_range_are_accepted(self) -> None:
        for at in ("1970-01-01T00:00:00Z", "1970-01-01T10:00:00+10:00", "9998-12-31T23:59:59Z"):
            with self.subTest(at=at):
                self.assertAccepted(self.post({**for_message("open", self.sent), "ReceivedAt": at}))
        self.assertEqual(TrackingEvent.objects.count(), 3)

    def test_a_malformed_delivery_open_or_click_is_400_and_changes_nothing(self) -> None:
        # These take the one-statement path when well formed; bad input never reaches it.
        cases: dict[str, dict[str, object]] = {
            "delivery": {"Recipient": 5, "DeliveredAt": "soon", "Metadata": ["x"]},
            "open": {"Recipient": None, "ReceivedAt": "today", "Metadata": {"a": {"b": 1}}},
            "click": {"OriginalLink": 5, "Recipient": ["a@example.com"], "Details": "nul \x00"},
        }
        for name, fields in cases.items():
            for field, value in fields.items():
                with self.subTest(name=name, field=field):
                    self.assertRejected({**for_message(name, self.sent), field: value})

    def test_an_unknown_record_type_is_stored_as_unknown(self) -> None:
        # Not an error: Postmark may add record types; refusing them would only make
        # Postmark retry for ever.
        self.assertAccepted(self.post({**for_message("delivery", self.sent), "RecordType": "Futuristic"}))
        self.assertEqual(TrackingEvent.objects.get().event_type, TrackingEvent.EventType.UNKNOWN)

    def test_a_body_over_the_upload_limit_is_413(self) -> None:
        with override_settings(DATA_UPLOAD_MAX_MEMORY_SIZE=1000):
            self.assertRejected({**self.bounce(), "Content": "x" * 2000}, status=413)

    def test_a_rejection_logs_no_email_address(self) -> None:
        bodies: list[tuple[object, str, bool]] = [
            ('{"RecordType": "Bounce", "Email": "secret.person@example.com",', "", True),
            ([{"Email": "secret.person@example.com"}], "", False),
            ({"Email": "secret.person@example.com", "Type": "HardBounce"}, "", False),
            ({**self.bounce(), "Email": "secret.person@example.com", "ID": "x"}, "", False),
            ({**self.bounce(), "Email": "secret.person@example.com"}, "sandbox:wrong", False),
            ({**self.bounce(), "Metadata": "secret.person@example.com"}, "", False),
        ]
        with self.assertLogs(level="DEBUG") as logs:
            for body, auth, raw in bodies:
                response = self.post(body, raw=raw, auth=auth or None)
                self.assertIn(response.status_code, (400, 401))
        self.assertNothingChanged()
        rejections = [r for r in logs.records if r.name == "webhooks.views"]
        self.assertEqual(len(rejections), len(bodies))
        for record in logs.records:
            text = " ".join([record.getMessage(), *(str(v) for v in record.__dict__.values())])
            self.assertNotIn("@example.com", text, record.name)
            self.assertNotIn("secret.person", text, record.name)


class RateLimitTests(GuardTestCase):
    def setUp(self) -> None:
        super().setUp()
        # django-ratelimit counts in fixed windows: stay inside one.
        traveller = time_machine.travel(timezone.now(), tick=False)
        traveller.start()
        self.addCleanup(traveller.stop)

    def test_over_the_limit_answers_429_and_changes_nothing(self) -> None:
        ip = unique_ip()
        other_ip = unique_ip()
        with override_settings(MAILAUTO={**settings.MAILAUTO, "WEBHOOK_RATE_LIMIT": "2/m"}):
            first = self.post(for_message("delivery", self.sent), REMOTE_ADDR=ip)
            second = self.post(for_message("open", self.sent), REMOTE_ADDR=ip)
            third = self.post(self.bounce(), REMOTE_ADDR=ip)
            elsewhere = self.post(for_message("click", self.sent), REMOTE_ADDR=other_ip)
        self.assertEqual([first.status_code, second.status_code, third.status_code], [200, 200, 429])
        self.assertAccepted(elsewhere)
        self.assertFalse(Suppression.objects.exists())  # the bounce was not processed
        self.assertEqual(TrackingEvent.objects.count(), 3)

    def test_bad_credentials_count_against_the_limit_too(self) -> None:
        ip = unique_ip()
        with override_settings(MAILAUTO={**settings.MAILAUTO, "WEBHOOK_RATE_LIMIT": "2/m"}):
            statuses = [
                self.post(self.bounce(), auth="guess:word", REMOTE_ADDR=ip).status_code for _ in range(3)
            ]
            last = self.post(self.bounce(), REMOTE_ADDR=ip)
        self.assertEqual(statuses, [401, 401, 429])
        self.assertEqual(last.status_code, 429)
        self.assertNothingChanged()

    def test_without_the_shared_cache_webhooks_are_still_taken(self) -> None:
        unreachable = {
            "default": {
                "BACKEND": "django.core.cache.backends.redis.RedisCache",
                "LOCATION": "redis://127.0.0.1:1/0",
            }
        }
        with (
            override_settings(CACHES=unreachable),
            self.assertLogs("webhooks.views", level="WARNING") as logs,
        ):
            self.assertAccepted(self.post(self.bounce()))
        self.assertIn("rate limit unavailable", logs.output[0])
        self.assertTrue(Suppression.objects.exists())

    def test_the_default_limit_is_high(self) -> None:
        self.assertEqual(settings.MAILAUTO["WEBHOOK_RATE_LIMIT"], "60000/m")


class LoggingQuietTests(GuardTestCase):
    def test_an_accepted_webhook_logs_no_email_address(self) -> None:
        with self.assertLogs(level="DEBUG") as logs:
            logging.getLogger("webhooks.tests").debug("start")
            self.assertAccepted(self.post(self.bounce()))
        for record in logs.records:
            text = " ".join([record.getMessage(), *(str(v) for v in record.__dict__.values())])
            self.assertNotIn(self.sent.to_email, text, record.name)


class SessionlessTests(GuardTestCase):
    def test_a_webhook_request_gets_no_session_user_or_messages_and_sets_no_cookie(self) -> None:
        self.client.cookies["sessionid"] = "anything"
        response = self.post(for_message("delivery", self.sent))
        self.assertAccepted(response)
        request = response.wsgi_request
        for attribute in ("session", "user", "_messages"):
            self.assertFalse(hasattr(request, attribute), attribute)
        self.assertEqual(dict(response.cookies), {})

    def test_other_paths_keep_sessions_and_users(self) -> None:
        response = self.client.get("/admin/login/")
        self.assertEqual(response.status_code, 200)
        self.assertTrue(hasattr(response.wsgi_request, "session"))
        self.assertTrue(hasattr(response.wsgi_request, "user"))
        self.assertIn("csrftoken", response.cookies)


class MetadataLinkTests(GuardTestCase):
    """Our message id travels in the ESP's metadata; a value that is not one is ignored."""

    def test_a_metadata_id_that_is_not_ascii_digits_is_ignored_and_the_esp_id_links(self) -> None:
        # str.isdigit() is true for all of these; int() refuses the superscripts (a 500,
        # before) and reads the others as numbers: the last is `other`'s id in full-width
        # digits, which linked the event to the wrong message.
        other = self.message(email="other@example.com")
        values = [
            "²",
            "¹²",
            "\U0001d7d9",  # MATHEMATICAL DOUBLE-STRUCK DIGIT ONE
            "\u0661",  # ARABIC-INDIC DIGIT ONE
            "\u0967",  # DEVANAGARI DIGIT ONE
            str(other.pk).translate(str.maketrans("0123456789", "".join(chr(0xFF10 + d) for d in range(10)))),
        ]
        for index, value in enumerate(values):
            for name in ("delivery", "bounce"):  # one-statement path, and the general one
                with self.subTest(value=value, name=name):
                    body = for_message(name, self.sent, Metadata={"mailauto_message_id": value})
                    if name == "bounce":
                        body["ID"] = 2 * 10**12 + index
                    self.assertAccepted(self.post(body))
        events = TrackingEvent.objects.all()
        self.assertEqual(len(events), 2 * len(values))
        self.assertEqual({event.message_id for event in events}, {self.sent.pk})
        other.refresh_from_db()
        self.assertEqual(other.status, Message.Status.SENT)

    def test_a_metadata_id_too_long_for_a_bigint_is_ignored(self) -> None:
        body = for_message("delivery", self.sent, Metadata={"mailauto_message_id": "9" * 19})
        self.assertAccepted(self.post(body))
        self.assertEqual(TrackingEvent.objects.get().message_id, self.sent.pk)

    def test_a_bad_metadata_id_and_no_esp_id_stores_the_event_unlinked(self) -> None:
        body = for_message("delivery", self.sent, Metadata={"mailauto_message_id": "²"}, MessageID="")
        self.assertAccepted(self.post(body))
        self.assertIsNone(TrackingEvent.objects.get().message_id)
        self.sent.refresh_from_db()
        self.assertEqual(self.sent.status, Message.Status.SENT)
