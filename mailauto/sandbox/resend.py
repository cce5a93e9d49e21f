"""Resend's vocabulary for the ESP sandbox: send-API validation and the response and
error bodies of `POST /emails` and `POST /emails/batch`, shaped like Resend's documented
formats (https://resend.com/docs/api-reference/errors, .../emails/send-batch-emails) and
like what Anymail's Resend backend parses. No I/O here.

Resend validates a message when it is created and refuses nothing for its recipient's
history (a suppressed address is accepted and reported later by webhook), so the
sandbox's recipient scripts have no API-time outcome on this side.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from email.utils import getaddresses
from typing import Any

MAX_BATCH_EMAILS = 100
MAX_RECIPIENTS = 50  # per field (to, cc, bcc)
MAX_IDEMPOTENCY_KEY = 256
# Keys are kept for 24 hours (https://resend.com/docs/dashboard/emails/idempotency-keys).
IDEMPOTENCY_TTL_SECONDS = 24 * 3600
BATCH_VALIDATION_HEADER = "x-batch-validation"

_ADDR_SPEC_RE = re.compile(
    r"^[a-z0-9.!#$%&'*+/=?^_`{|}~-]+@[a-z0-9](?:[a-z0-9-]*[a-z0-9])?(?:\.[a-z0-9](?:[a-z0-9-]*[a-z0-9])?)+$",
    re.IGNORECASE,
)
# Not accepted by Resend's batch endpoint ("not supported yet" in its reference).
_NOT_IN_BATCH = ("attachments", "scheduled_at")


class ResendError(Exception):
    """A request Resend would refuse: its HTTP status, error `name` and message."""

    def __init__(self, status: int, name: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.name = name
        self.message = message

    def body(self) -> dict[str, Any]:
        return error_body(self.status, self.name, self.message)


@dataclass
class ParsedEmail:
    from_: str
    to: list[str]
    cc: list[str]
    bcc: list[str]
    raw: dict[str, Any]
    headers: dict[str, str] = field(default_factory=dict)


def error_body(status: int, name: str, message: str) -> dict[str, Any]:
    return {"statusCode": status, "name": name, "message": message}


def missing_api_key_error() -> ResendError:
    return ResendError(
        401,
        "missing_api_key",
        "Missing API key in the authorization header. Include: Authorization: Bearer <key>",
    )


def invalid_api_key_error() -> ResendError:
    return ResendError(401, "validation_error", "API key is invalid")


def invalid_json_error() -> ResendError:
    return ResendError(400, "validation_error", "Invalid JSON: the request body could not be parsed.")


def invalid_idempotency_key_error() -> ResendError:
    return ResendError(
        400,
        "invalid_idempotency_key",
        f"Idempotency keys, if present, must have between 1 and {MAX_IDEMPOTENCY_KEY} characters.",
    )


def idempotency_conflict_error() -> ResendError:
    return ResendError(
        409, "invalid_idempotent_request", "Same idempotency key used with a different request payload."
    )


def idempotency_in_progress_error() -> ResendError:
    return ResendError(
        409,
        "concurrent_idempotent_requests",
        "Same idempotency key used while original request is still in progress.",
    )


def validation_error(message: str) -> ResendError:
    # Resend answers field errors with 422 and name validation_error (or
    # missing_required_field); Anymail reads neither, only the status.
    return ResendError(422, "validation_error", message)


def _missing(field_name: str) -> ResendError:
    return ResendError(422, "missing_required_field", f"Missing `{field_name}` field.")


def _addresses(value: Any, field_name: str) -> list[str]:
    """Resend takes a string or a list of strings, each "a@b.c" or "Name <a@b.c>"."""
    if value is None or value == "" or value == []:
        return []
    values = [value] if isinstance(value, str) else value
    if not isinstance(values, list) or not all(isinstance(v, str) for v in values):
        raise validation_error(f"The `{field_name}` field must be a string or an array of strings.")
    if len(values) > MAX_RECIPIENTS:
        raise validation_error(f"The `{field_name}` field cannot have more than {MAX_RECIPIENTS} addresses.")
    found = []
    for item in values:
        pairs = getaddresses([item])
        addr_spec = pairs[0][1] if len(pairs) == 1 else ""
        # getaddresses repairs some junk; an address not in the input verbatim is invalid.
        if not (_ADDR_SPEC_RE.match(addr_spec) and addr_spec in item):
            raise validation_error(
                f"Invalid `{field_name}` field. The email address needs to follow the "
                "`email@example.com` or `Name <email@example.com>` format."
            )
        found.append(addr_spec)
    return found


def parse_email(data: Any, *, in_batch: bool) -> ParsedEmail:
    """Validate one email as Resend would; raise ResendError if it would be refused."""
    if not isinstance(data, dict):
        raise validation_error("An email must be a JSON object.")
    if not data.get("from"):
        raise _missing("from")
    [from_] = _addresses(data["from"], "from")[:1] or [""]
    to = _addresses(data.get("to"), "to")
    if not to:
        raise _missing("to")
    cc = _addresses(data.get("cc"), "cc")
    bcc = _addresses(data.get("bcc"), "bcc")
    _addresses(data.get("reply_to"), "reply_to")
    if not data.get("subject"):
        raise _missing("subject")
    if not (data.get("html") or data.get("text")):
        raise validation_error("Provide either `html` or `text` (or both).")
    headers = data.get("headers")
    if headers is not None and (
        not isinstance(headers, dict) or not all(isinstance(v, str) for v in headers.values())
    ):
        raise validation_error("The `headers` field must be an object of string values.")
    if in_batch:
        for name in _NOT_IN_BATCH:
            if data.get(name):
                raise validation_error(f"The `{name}` field is not supported in batch sending.")
    return ParsedEmail(from_=from_, to=to, cc=cc, bcc=bcc, raw=data, headers=dict(headers or {}))


def header_json(headers: dict[str, str], name: str) -> Any:
    """A JSON-valued custom header (Anymail sends metadata as X-Metadata and tags as
    X-Tags), or None."""
    for key, value in headers.items():
        if key.lower() == name.lower():
            try:
                return json.loads(value)
            except ValueError:
                return None
    return None
