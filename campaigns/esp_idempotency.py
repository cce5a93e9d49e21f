"""Idempotency keys for the ESPs that honour one, sent with every attempt of a message.

A retry after an ambiguous failure (the request may have reached the ESP) then cannot
become a second email, within the ESP's window: Resend keeps keys 24 hours and takes
them in the `Idempotency-Key` HTTP header
(https://resend.com/docs/dashboard/emails/idempotency-keys); Brevo takes
`idempotencyKey` among the email's `headers` in the JSON body, must be a UUID, and keeps
it 15-30 minutes (https://developers.brevo.com/docs/heterogenous-versions-batch-emails).
The key is derived from Message.idempotency_key, so every attempt carries the same one.
"""

from __future__ import annotations

import uuid
from typing import Any

from anymail.backends.resend import EmailBackend as AnymailResendBackend
from anymail.message import AnymailMessage

# Any fixed namespace works; it only has to stay the same across deploys.
KEY_NAMESPACE = uuid.UUID("6f1f2d1e-5b8e-4d0a-9a7c-6a9b2a1e0c11")


def esp_idempotency_key(message_key: str) -> str:
    """A stable UUID for a message's idempotency key (Brevo requires a UUID; Resend
    accepts any string up to 256 characters, so the same UUID serves both)."""
    return str(uuid.uuid5(KEY_NAMESPACE, message_key))


def apply_idempotency_key(email: AnymailMessage, *, message_key: str, esp_name: str) -> None:
    """Attach the key the way this ESP wants it (no-op for ESPs without the feature)."""
    key = esp_idempotency_key(message_key)
    if esp_name == "brevo":
        email.extra_headers["idempotencyKey"] = key
    elif esp_name == "resend":
        # Read by ResendEmailBackend below: Anymail has no way to set an HTTP header.
        email.mailauto_idempotency_key = key  # type: ignore[attr-defined]


class ResendEmailBackend(AnymailResendBackend):
    """Anymail's Resend backend, plus the Idempotency-Key HTTP header.

    Selected automatically when MAILAUTO_ESP=resend (mailauto/settings.py).
    """

    def build_message_payload(self, message: Any, defaults: Any) -> Any:
        payload = super().build_message_payload(message, defaults)
        key = getattr(message, "mailauto_idempotency_key", None)
        if key:
            payload.headers["Idempotency-Key"] = key
        return payload
