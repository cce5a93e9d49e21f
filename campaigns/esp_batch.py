"""ESP batch endpoints, built on Anymail's own backends: one HTTP request carries many
*different* messages, and each message gets its own result back.

Anymail sends one message per request (its batch sending is one content to many
recipients). Anymail's per-message path costs about 1.5 ms of CPU per email here and
tops out near 600-700 emails/s, while Postmark's /email/batch takes up to 500 different
messages per call and Resend's /emails/batch up to 100. So for ESPs with such an
endpoint we let Anymail build each message's payload exactly as it would for a single
send (same headers, metadata, tags, streams, validation) and only replace the transport:
one POST of the list, results mapped back by position (Postmark answers in request
order: https://postmarkapp.com/developer/api/email-api#send-batch-emails; Resend's
answer is described on ResendBatchSender).

Errors come out as the same Anymail exceptions a single send raises, so
campaigns.delivery.classify_send_error stays the one table of what they mean.

Idempotency keys (campaigns.esp_idempotency): Resend takes one Idempotency-Key per
request, for /emails/batch as for /emails, never one per email of a batch
(https://resend.com/docs/dashboard/emails/idempotency-keys). A batch of first attempts
carries a key naming its set of messages: retried as it was, it is replayed. A message
resent after an unknown outcome (marked by apply_idempotency_key(..., after_unknown=True))
is never batched: its batch companions differ from one attempt to the next, so a set key
would be new each time. It goes alone to POST /emails with its own key, so each of its
attempts carries the same key and Resend takes it at most once. What a batch that may
have carried it delivered before is out of any key's reach; webhooks and the grace
period before the resend cover that (DESIGN.md, "No blind resends").
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import requests
from anymail.backends.postmark import EmailBackend as AnymailPostmarkBackend
from anymail.backends.postmark import PostmarkPayload
from anymail.exceptions import (
    AnymailAPIError,
    AnymailError,
    AnymailRecipientsRefused,
    AnymailRequestsAPIError,
    AnymailUnsupportedFeature,
)
from anymail.message import AnymailMessage, AnymailStatus
from anymail.utils import EmailAddress, parse_address_list

from campaigns.esp_idempotency import batch_idempotency_key, was_resent_after_unknown


@dataclass
class BatchItemResult:
    """What happened to one message of a batch: an ESP message id, or an exception."""

    esp_message_id: str = ""
    error: BaseException | None = None


class BatchSender(Protocol):
    """Sends up to `max_batch` different messages in one request; one result each, in
    order. Errors are Anymail exceptions (campaigns.delivery.classify_send_error)."""

    esp_name: str
    max_batch: int

    def send(self, emails: list[AnymailMessage]) -> list[BatchItemResult]: ...


def _post(backend: Any, url: str, *, headers: dict[str, str], **body: Any) -> requests.Response:
    """One POST through the backend's session; any non-2xx answer raised, with the
    response, as Anymail would."""
    try:
        response = backend.session.post(url, headers=headers, timeout=backend.timeout, **body)
    except requests.RequestException as err:
        # Same shape as Anymail's own post_to_esp: chain the transport error so the
        # classifier can tell "never connected" from "sent, no answer".
        raise AnymailRequestsAPIError(f"Error posting to {url}", backend=backend) from err
    if not 200 <= response.status_code < 300:
        raise AnymailRequestsAPIError(response=response, backend=backend, status_code=response.status_code)
    return response


@functools.lru_cache(maxsize=32)
def _parsed_from_email(from_email: str) -> tuple[EmailAddress, ...]:
    return tuple(parse_address_list(from_email, field="from_email"))


def _from_email_addresses(value: Any) -> list[EmailAddress]:
    """Anymail's parse of message.from_email, remembered per string.

    Every message of a campaign has the same From (DEFAULT_FROM_EMAIL), and Anymail
    parses it with the stdlib's email header classes for each one: about a third of
    building a payload. The parse depends on the string alone (the IDNA encoding and
    the formatting happen later, in the payload's setter), and the EmailAddress objects
    are read-only, so sharing them is safe. Errors are not cached: an invalid From
    raises Anymail's own AnymailInvalidAddress every time. Anything but a plain str (a
    lazy string, a list) takes Anymail's path as it is.
    """
    if type(value) is str:
        return list(_parsed_from_email(value))
    return parse_address_list(value, field="from_email")  # type: ignore[no-any-return]


class _PostmarkPayload(PostmarkPayload):  # type: ignore[misc]
    """Anymail's PostmarkPayload, with the From parse remembered (_from_email_addresses).

    Only the converter Anymail looks up in base_message_attrs changes; the payload is
    byte-identical (tests/campaigns/test_esp_batch.py compares them).
    """

    base_message_attrs = tuple(
        (attr, combiner, _from_email_addresses)
        if attr == "from_email" and converter is parse_address_list
        else (attr, combiner, converter)
        for attr, combiner, converter in PostmarkPayload.base_message_attrs
    )


class PostmarkBatchSender:
    """POST /email/batch through an open anymail.backends.postmark.EmailBackend."""

    esp_name = "postmark"
    max_batch = 500  # Postmark's documented limit per /email/batch call

    def __init__(self, backend: Any) -> None:
        self.backend = backend
        # Anymail's backend builds a plain PostmarkPayload; build ours instead, unless a
        # subclass changed how payloads are built (then its way is the one to follow).
        self._cached_from = (
            type(backend).build_message_payload is AnymailPostmarkBackend.build_message_payload
        )

    def build_payload(self, email: AnymailMessage) -> Any:
        """What backend.build_message_payload returns, built faster (_PostmarkPayload)."""
        if self._cached_from:
            return _PostmarkPayload(email, self.backend.send_defaults, self.backend)
        return self.backend.build_message_payload(email, self.backend.send_defaults)

    def send(self, emails: list[AnymailMessage]) -> list[BatchItemResult]:
        results = [BatchItemResult() for _ in emails]
        positions: list[int] = []
        bodies: list[dict[str, Any]] = []
        for index, email in enumerate(emails):
            email.anymail_status = AnymailStatus()
            try:
                payload = self.build_payload(email)
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
        headers = {"Accept": "application/json", "X-Postmark-Server-Token": backend.server_token}
        response = _post(backend, f"{backend.api_url}email/batch", headers=headers, json=bodies)
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


class ResendBatchSender:
    """POST /emails/batch through an open anymail.backends.resend.EmailBackend (or our
    subclass that adds the Idempotency-Key, campaigns.esp_idempotency).

    Each message is built and serialized by Anymail exactly as for POST /emails (from,
    to, subject, bodies, custom headers, metadata as X-Metadata and tags as X-Tags); the
    request body is those JSON objects as a list
    (https://resend.com/docs/api-reference/emails/send-batch-emails).

    Validation is strict by default: one invalid email refuses the whole batch, which
    would fail every good message with it. We ask for `x-batch-validation: permissive`
    (https://resend.com/docs/dashboard/emails/batch-validation-modes): the answer is then
    {"data": [{"id"}, ...], "errors": [{"index", "message"}, ...]}, where `data` lists
    the created emails in request order, skipping the ones `errors` names by their index
    in the request. Anything else (429, 5xx, 409 for the idempotency key) is about the
    whole request and shared by every message in it.

    The request's Idempotency-Key names the set of its messages (batch_idempotency_key,
    which says why); it is sent only when every message has its own key. A message
    resent after an unknown outcome is left out of the batch and sent alone through the
    backend's own POST /emails, with its own Idempotency-Key (module docstring): one
    more request, for a rare message, so that all its attempts carry one key.
    """

    esp_name = "resend"
    max_batch = 100  # Resend's documented limit per /emails/batch call
    # Not accepted in a batch ("not supported yet" in Resend's reference): such a
    # message fails alone here rather than making Resend refuse it.
    not_in_batch = ("attachments", "scheduled_at")

    def __init__(self, backend: Any) -> None:
        self.backend = backend

    def send(self, emails: list[AnymailMessage]) -> list[BatchItemResult]:
        results = [BatchItemResult() for _ in emails]
        positions: list[int] = []
        bodies: list[str] = []
        keys: list[str | None] = []
        headers: dict[str, str] = {}
        alone: list[int] = []
        for index, email in enumerate(emails):
            email.anymail_status = AnymailStatus()
            if was_resent_after_unknown(email):
                alone.append(index)
                continue
            try:
                payload = self.backend.build_message_payload(email, self.backend.send_defaults)
                if payload.is_batch():
                    raise AnymailUnsupportedFeature("Anymail batch sending (merge_data) in a Resend batch")
                unsupported = [name for name in self.not_in_batch if payload.data.get(name)]
                if unsupported:
                    raise AnymailUnsupportedFeature(f"{', '.join(unsupported)} in a Resend batch")
                body = payload.serialize_data()  # Anymail's own JSON for this message
            except AnymailError as err:  # unsupported feature, bad address: this message only
                results[index].error = err
                continue
            positions.append(index)
            bodies.append(body)
            keys.append(payload.headers.get("Idempotency-Key"))
            headers = dict(payload.headers)  # Authorization, Content-Type, Accept
        for index in alone:
            results[index] = self._send_alone(emails[index])
        if not bodies:
            return results

        headers.pop("Idempotency-Key", None)
        headers["x-batch-validation"] = "permissive"
        if all(keys):
            headers["Idempotency-Key"] = batch_idempotency_key(key for key in keys if key)
        try:
            # Each body is already JSON (ASCII: Anymail's json.dumps escapes the rest).
            response = _post(
                self.backend,
                f"{self.backend.api_url}emails/batch",
                headers=headers,
                data="[" + ",".join(bodies) + "]",
            )
            outcomes = self._parse(response, expected=len(bodies))
        except AnymailError as err:
            for index in positions:
                results[index].error = err
            return results

        for index, outcome in zip(positions, outcomes, strict=True):
            results[index] = outcome
        return results

    def _send_alone(self, email: AnymailMessage) -> BatchItemResult:
        """POST /emails through Anymail's own send path: campaigns.esp_idempotency's
        ResendEmailBackend adds the message's own Idempotency-Key."""
        try:
            self.backend.send_messages([email])
        except AnymailError as err:  # this message's alone; classified by the caller
            return BatchItemResult(error=err)
        esp_id = email.anymail_status.message_id
        return BatchItemResult(esp_message_id=esp_id if isinstance(esp_id, str) else "")

    def _parse(self, response: requests.Response, *, expected: int) -> list[BatchItemResult]:
        try:
            answer = response.json()
        except ValueError as err:
            raise AnymailAPIError("Resend batch answer is not JSON", backend=self.backend) from err
        mismatch = AnymailAPIError("Resend batch answer does not match the request", backend=self.backend)
        # Anything we cannot map to the request position by position is an unreadable
        # answer (ambiguous for every message): never guess.
        if not isinstance(answer, dict):
            raise mismatch
        data, errors = answer.get("data"), answer.get("errors") or []
        if not isinstance(data, list) or not isinstance(errors, list):
            raise mismatch
        failed: dict[int, str] = {}
        for entry in errors:
            position = entry.get("index") if isinstance(entry, dict) else None
            if not isinstance(position, int) or isinstance(position, bool) or not 0 <= position < expected:
                raise mismatch
            failed[position] = str(entry.get("message", ""))
        ids = [entry.get("id") if isinstance(entry, dict) else None for entry in data]
        if (
            len(failed) != len(errors)
            or len(ids) + len(failed) != expected
            or not all(isinstance(i, str) and i for i in ids)
        ):
            raise mismatch
        created = iter(ids)
        return [
            self._item_error(failed[position], response)
            if position in failed
            else BatchItemResult(esp_message_id=str(next(created)))
            for position in range(expected)
        ]

    @staticmethod
    def _item_error(text: str, response: requests.Response) -> BatchItemResult:
        if text.lower().startswith("invalid `to`"):
            # An invalid recipient address: about the address, not us (as Postmark's
            # 300 on the To field above).
            return BatchItemResult(error=AnymailRecipientsRefused(f"Resend validation error: {text}"))
        return BatchItemResult(
            error=AnymailAPIError(f"Resend validation error: {text}", status_code=422, response=response)
        )


BATCH_SENDERS: dict[str, Callable[[Any], BatchSender]] = {
    "anymail.backends.postmark.EmailBackend": PostmarkBatchSender,
    "anymail.backends.resend.EmailBackend": ResendBatchSender,
    "campaigns.esp_idempotency.ResendEmailBackend": ResendBatchSender,
}


def batch_sender_for(backend: Any) -> BatchSender | None:
    """The batch sender for this Anymail backend instance, or None (per-message path)."""
    path = f"{type(backend).__module__}.{type(backend).__name__}"
    sender = BATCH_SENDERS.get(path)
    return sender(backend) if sender is not None else None
