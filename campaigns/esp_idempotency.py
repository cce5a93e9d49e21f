"""Idempotency keys for the ESPs that honour one, sent with every attempt of a message.

A retry after an ambiguous failure (the request may have reached the ESP) then cannot
become a second email, within the ESP's window: Resend keeps keys 24 hours and takes
them in the `Idempotency-Key` HTTP header
(https://resend.com/docs/dashboard/emails/idempotency-keys); Brevo takes
`idempotencyKey` among the email's `headers` in the JSON body, must be a UUID, and keeps
it 15-30 minutes (https://developers.brevo.com/docs/heterogenous-versions-batch-emails).
The key is derived from Message.idempotency_key, so every attempt carries the same one.

Resend's batch endpoint takes one key for the whole request, never one per email
(https://resend.com/docs/dashboard/emails/idempotency-keys: "For batch sends, choose a
key that represents the whole batch"), so a batch carries batch_idempotency_key. A
message resent after an unknown outcome is marked (apply_idempotency_key(...,
after_unknown=True)) and campaigns.esp_batch sends it alone, to POST /emails, with its
own key, whatever else is sent with it.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable
from typing import Any

from anymail.backends.resend import EmailBackend as AnymailResendBackend
from anymail.message import AnymailMessage

# Any fixed namespace works; it only has to stay the same across deploys.
KEY_NAMESPACE = uuid.UUID("6f1f2d1e-5b8e-4d0a-9a7c-6a9b2a1e0c11")


def esp_idempotency_key(message_key: str) -> str:
    """A stable UUID for a message's idempotency key (Brevo requires a UUID; Resend
    accepts any string up to 256 characters, so the same UUID serves both)."""
    return str(uuid.uuid5(KEY_NAMESPACE, message_key))


def batch_idempotency_key(member_keys: Iterable[str]) -> str:
    """One key for a Resend /emails/batch request: a UUID of the *set* of its messages'
    keys (esp_idempotency_key values).

    Resend replays a request whose key and payload it has seen in the last 24 hours and
    answers 409 to a known key with a different payload; a key it has not seen is a new
    send. So the key must name exactly what the request carries:

    - the same set of messages, resent (an ambiguous batch retried as it was) gets the
      same key: Resend replays its first answer, nothing is sent twice. Sorted, so a new
      order of the same messages is "the same request" too: a 409 at worst, never a
      second copy.
    - a batch whose membership changed (some messages suppressed, sent or re-chunked
      since) gets a new key: reusing the old one would be refused (409) for the whole
      batch, the new members included, until the key expired.
    - the same set re-rendered differently (an edited contact name) keeps the key and
      is answered 409: those messages were taken before, which is the answer we want.

    What it cannot do: protect a message resent in a *different* set than the request
    that may have carried it. That case is an ambiguous outcome, and those are
    reconciled by webhooks and resent only after the grace period (DESIGN.md,
    "No blind resends"). Such a resend is therefore never put in a batch
    (was_resent_after_unknown): it goes alone with the message's own key, so it and
    every later attempt of it (a retry, a replay from the dead letters) are one email at
    Resend. The copy the first batch may have delivered carried the set's key, which no
    later request repeats: only the webhooks and the grace period stand between it and
    the resend.
    """
    digest = "\n".join(sorted(set(member_keys)))
    return str(uuid.uuid5(KEY_NAMESPACE, f"resend-batch\n{digest}"))


# Set on an AnymailMessage whose Message may already have reached the ESP (it is being
# resent after an unknown outcome, Message.resent_after_unknown). Read only through
# was_resent_after_unknown.
RESENT_AFTER_UNKNOWN_ATTR = "mailauto_resent_after_unknown"


def was_resent_after_unknown(email: AnymailMessage) -> bool:
    """True when the caller marked this email as a resend after an unknown outcome.
    Anything but a real True (no attribute, a mock, a truthy string) is a first attempt."""
    return getattr(email, RESENT_AFTER_UNKNOWN_ATTR, False) is True


def apply_idempotency_key(
    email: AnymailMessage, *, message_key: str, esp_name: str, after_unknown: bool = False
) -> None:
    """Attach the key the way this ESP wants it (no-op for ESPs without the feature).

    `after_unknown`: the message is being resent after an ambiguous attempt
    (Message.resent_after_unknown); a Resend batch then sends it alone with this key
    rather than under the batch's key (campaigns.esp_batch.ResendBatchSender).
    """
    if after_unknown is True:
        setattr(email, RESENT_AFTER_UNKNOWN_ATTR, True)
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
