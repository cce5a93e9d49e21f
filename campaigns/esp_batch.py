"""ESP batch endpoints, built on Anymail's own backends: one HTTP request carries many
*different* messages, and each message gets its own result back.

Anymail sends one message per request (its batch sending is one content to many
recipients). Anymail's per-message path costs about 1.5 ms of CPU per email here and
tops out near 600-700 emails/s, while Postmark's /email/batch takes up to 500 different
messages per call. So for ESPs with such an endpoint we let Anymail build each message's
payload exactly as it would for a single send (same headers, metadata, tags, streams,
validation) and only replace the transport: one POST of the list, results mapped back by
position (Postmark answers in request order:
https://postmarkapp.com/developer/api/email-api#send-batch-emails).

Errors come out as the same Anymail exceptions a single send raises, so
campaigns.delivery.classify_send_error stays the one table of what they mean.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import requests
from anymail.exceptions import (
    AnymailAPIError,
    AnymailError,
    AnymailRecipientsRefused,
    AnymailRequestsAPIError,
)
from anymail.message import AnymailMessage, AnymailStatus


@dataclass
class BatchItemResult:
    """What happened to one message of a batch: an ESP message id, or an exception."""

    esp_message_id: str = ""
    error: BaseException | None = None


class PostmarkBatchSender:
    """POST /email/batch through an open anymail.backends.postmark.EmailBackend."""

    esp_name = "postmark"
    max_batch = 500  # Postmark's documented limit per /email/batch call

    def __init__(self, backend: Any) -> None:
        self.backend = backend

    def send(self, emails: list[AnymailMessage]) -> list[BatchItemResult]:
        results = [BatchItemResult() for _ in emails]
        positions: list[int] = []
        bodies: list[dict[str, Any]] = []
        for index, email in enumerate(emails):
            email.anymail_status = AnymailStatus()
            try:
                payload = self.backend.build_message_payload(email, self.backend.send_defaults)
            except AnymailError as err:  # unsupported feature, bad address: this message only
                results[index].error = err
                continue
            positions.append(index)
            bodies.append(payload.data)
        if not bodies:
            return results

        try:
            response = self._post(bodies)
            entries = self._parse(response, expected=len(bodies))
        except AnymailError as err:
            # The whole request failed (transport, 429, 5xx, unreadable answer): every
            # message in it shares the outcome.
            for index in positions:
                results[index].error = err
            return results

        for index, entry in zip(positions, entries, strict=True):
            results[index] = self._item_result(entry, response)
        return results

    def _post(self, bodies: list[dict[str, Any]]) -> requests.Response:
        backend = self.backend
        url = f"{backend.api_url}email/batch"
        try:
            response = backend.session.post(
                url,
                json=bodies,
                headers={
                    "Accept": "application/json",
                    "X-Postmark-Server-Token": backend.server_token,
                },
                timeout=backend.timeout,
            )
        except requests.RequestException as err:
            # Same shape as Anymail's own post_to_esp: chain the transport error so the
            # classifier can tell "never connected" from "sent, no answer".
            raise AnymailRequestsAPIError(f"Error posting to {url}", backend=backend) from err
        if response.status_code != 200:
            raise AnymailRequestsAPIError(
                response=response, backend=backend, status_code=response.status_code
            )
        return response

    def _parse(self, response: requests.Response, *, expected: int) -> list[dict[str, Any]]:
        try:
            entries = response.json()
        except ValueError as err:
            raise AnymailAPIError("Postmark batch answer is not JSON", backend=self.backend) from err
        if (
            not isinstance(entries, list)
            or len(entries) != expected
            or not all(isinstance(e, dict) for e in entries)
        ):
            # We cannot tell which message got which outcome: treat as an unreadable
            # answer (ambiguous for every message), never guess.
            raise AnymailAPIError("Postmark batch answer does not match the request", backend=self.backend)
        return entries

    @staticmethod
    def _item_result(entry: dict[str, Any], response: requests.Response) -> BatchItemResult:
        code = entry.get("ErrorCode", 0)
        text = str(entry.get("Message", ""))
        if code == 0 and entry.get("MessageID"):
            return BatchItemResult(esp_message_id=str(entry["MessageID"]))
        if code == 406 or (code == 300 and text.lower().startswith(("invalid 'to'", "error parsing 'to'"))):
            # 406: inactive recipient (hard bounce or complaint at Postmark); 300 on the
            # To address: an invalid recipient. Both are about the address, not us.
            return BatchItemResult(error=AnymailRecipientsRefused(f"Postmark error {code}: {text}"))
        return BatchItemResult(
            error=AnymailAPIError(f"Postmark error {code}: {text}", status_code=422, response=response)
        )


BATCH_SENDERS: dict[str, type[PostmarkBatchSender]] = {
    "anymail.backends.postmark.EmailBackend": PostmarkBatchSender,
}


def batch_sender_for(backend: Any) -> PostmarkBatchSender | None:
    """The batch sender for this Anymail backend instance, or None (per-message path)."""
    path = f"{type(backend).__module__}.{type(backend).__name__}"
    sender = BATCH_SENDERS.get(path)
    return sender(backend) if sender is not None else None
