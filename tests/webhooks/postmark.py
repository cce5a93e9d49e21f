"""Postmark webhook payloads from tests/fixtures/postmark/ and a TestCase that posts them
to /webhooks/postmark/tracking/ through the HTTP layer, with basic auth."""

from __future__ import annotations

import base64
import json
import zlib
from datetime import datetime
from pathlib import Path
from typing import Any

from django.conf import settings
from django.http import HttpResponse
from django.test import TestCase

from campaigns.models import Message, TemplateVersion
from tests import factories

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures" / "postmark"
URL = "/webhooks/postmark/tracking/"


def payload(name: str, **overrides: Any) -> dict[str, Any]:
    """A fixture, e.g. payload("delivery", Recipient="ada@example.com")."""
    data = json.loads((FIXTURES / f"{name}.json").read_text())
    data.update(overrides)
    return data


def for_message(name: str, message: Message, *, metadata: bool = True, **overrides: Any) -> dict[str, Any]:
    """A fixture about `message`: its ESP id, its recipient and (by default) our metadata id."""
    data = payload(name, MessageID=message.esp_message_id or "11111111-2222-3333-4444-555555555555")
    data["Metadata"] = {"mailauto_message_id": str(message.pk)} if metadata else {}
    data["Email" if "Email" in data else "Recipient"] = message.to_email
    if "ID" in data:
        # Postmark's bounce ids are unique: one per (message, kind of bounce) here.
        data["ID"] = 10**12 + message.pk * 1000 + zlib.crc32(name.encode()) % 1000
    data.update(overrides)
    return data


def iso(at: datetime) -> str:
    return at.isoformat().replace("+00:00", "Z")


def basic_auth(credentials: str) -> str:
    return "Basic " + base64.b64encode(credentials.encode()).decode()


class WebhookTestCase(TestCase):
    url = URL
    version: TemplateVersion

    @classmethod
    def setUpTestData(cls) -> None:
        cls.version = factories.published_version()

    def message(
        self, email: str = "ada@example.com", status: str = Message.Status.SENT, esp_message_id: str = "auto"
    ) -> Message:
        contact = factories.contact(email=email)
        if esp_message_id == "auto":
            esp_message_id = f"esp-{contact.pk}-0000-0000-0000-000000000000"
        return factories.message(self.version, contact, status=status, esp_message_id=esp_message_id)

    def post(
        self,
        body: object,
        *,
        auth: str | None = None,
        url: str | None = None,
        raw: bool = False,
        **extra: Any,
    ) -> Any:  # the test client's response
        headers = {}
        credentials = settings.ANYMAIL["WEBHOOK_SECRET"] if auth is None else auth
        if credentials:
            headers["Authorization"] = basic_auth(str(credentials))
        data = body if raw else json.dumps(body)
        return self.client.post(
            url or self.url, data=data, content_type="application/json", headers=headers, **extra
        )

    def assertAccepted(self, response: HttpResponse) -> None:
        self.assertEqual(response.status_code, 200, response.content)
