"""Idempotency keys reach Resend (HTTP header) and Brevo (JSON headers), the same on
every attempt of a message; a Resend batch's key names its set of messages."""

from __future__ import annotations

import json

from anymail.message import AnymailMessage
from django.test import SimpleTestCase, override_settings

from campaigns.esp_idempotency import (
    ResendEmailBackend,
    apply_idempotency_key,
    batch_idempotency_key,
    esp_idempotency_key,
    was_resent_after_unknown,
)


def email_for(esp: str, key: str) -> AnymailMessage:
    email = AnymailMessage(subject="s", body="b", from_email="a@example.com", to=["b@example.com"])
    apply_idempotency_key(email, message_key=key, esp_name=esp)
    return email


@override_settings(ANYMAIL={"RESEND_API_KEY": "re_test", "BREVO_API_KEY": "xkeysib-test"})
class IdempotencyKeyTests(SimpleTestCase):
    def test_the_key_is_a_stable_uuid_per_message(self) -> None:
        self.assertEqual(esp_idempotency_key("evt-1:3"), esp_idempotency_key("evt-1:3"))
        self.assertNotEqual(esp_idempotency_key("evt-1:3"), esp_idempotency_key("evt-1:4"))

    def test_a_batch_key_names_the_set_of_its_messages(self) -> None:
        a, b, c = (esp_idempotency_key(k) for k in ("evt-1:1", "evt-1:2", "evt-1:3"))
        self.assertEqual(batch_idempotency_key([a, b]), batch_idempotency_key([b, a]))
        self.assertNotEqual(batch_idempotency_key([a, b]), batch_idempotency_key([a, b, c]))
        self.assertNotEqual(batch_idempotency_key([a, b]), batch_idempotency_key([a, c]))
        # A batch of one is not the single send of that message (another endpoint).
        self.assertNotEqual(batch_idempotency_key([a]), a)
        self.assertLessEqual(len(batch_idempotency_key([a, b, c])), 256)

    def test_resend_gets_the_http_header(self) -> None:
        backend = ResendEmailBackend()
        payload = backend.build_message_payload(email_for("resend", "evt-1:3"), backend.send_defaults)
        params = payload.get_request_params(backend.api_url)
        self.assertEqual(params["headers"]["Idempotency-Key"], esp_idempotency_key("evt-1:3"))

    def test_brevo_gets_the_key_in_the_email_headers(self) -> None:
        from anymail.backends.brevo import EmailBackend as BrevoBackend

        backend = BrevoBackend()
        payload = backend.build_message_payload(email_for("brevo", "evt-1:3"), backend.send_defaults)
        body = json.loads(payload.serialize_data())
        self.assertEqual(body["headers"]["idempotencyKey"], esp_idempotency_key("evt-1:3"))

    def test_other_esps_get_nothing(self) -> None:
        email = email_for("postmark", "evt-1:3")
        self.assertEqual(email.extra_headers, {})
        self.assertFalse(hasattr(email, "mailauto_idempotency_key"))

    def test_a_resend_after_unknown_is_marked_for_sending_alone(self) -> None:
        first = email_for("resend", "evt-1:3")
        again = AnymailMessage(subject="s", body="b", from_email="a@example.com", to=["b@example.com"])
        apply_idempotency_key(again, message_key="evt-1:3", esp_name="resend", after_unknown=True)
        self.assertFalse(was_resent_after_unknown(first))
        self.assertTrue(was_resent_after_unknown(again))
        self.assertEqual(again.mailauto_idempotency_key, first.mailauto_idempotency_key)  # type: ignore[attr-defined]
        # Read defensively: only a real True marks a resend.
        again.mailauto_resent_after_unknown = "yes"  # type: ignore[attr-defined]
        self.assertFalse(was_resent_after_unknown(again))

    def test_resend_is_selected_with_the_idempotent_backend(self) -> None:
        import os
        import subprocess
        import sys

        code = "import django,os;os.environ['DJANGO_SETTINGS_MODULE']='mailauto.settings';from django.conf import settings;print(settings.EMAIL_BACKEND)"
        env = {**os.environ, "MAILAUTO_ESP": "resend", "ANYMAIL_RESEND_API_KEY": "re_x"}
        env.pop("EMAIL_BACKEND", None)
        out = subprocess.run(
            [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
        )
        self.assertEqual(out.stdout.strip(), "campaigns.esp_idempotency.ResendEmailBackend")
