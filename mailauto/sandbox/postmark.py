"""Postmark's vocabulary for the ESP sandbox: send-API validation, response bodies and
webhook payloads, shaped like Postmark's documented formats (and like what Anymail's
Postmark backend and tracking webhook parse). No I/O here."""

from __future__ import annotations

import itertools
import re
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.utils import getaddresses
from typing import Any

# Postmark API error codes (https://postmarkapp.com/developer/api/overview#error-codes).
ERROR_BAD_TOKEN = 10
ERROR_MAINTENANCE = 100
ERROR_INVALID_EMAIL_REQUEST = 300
ERROR_INVALID_JSON = 402
ERROR_INCOMPATIBLE_JSON = 403
ERROR_INACTIVE_RECIPIENT = 406
ERROR_TOO_MANY_BATCH_MESSAGES = 410
ERROR_RATE_LIMIT = 429
ERROR_INTERNAL = 500

MAX_BATCH_MESSAGES = 500
MAX_RECIPIENTS = 50
DEFAULT_MESSAGE_STREAM = "outbound"
SERVER_ID = 1

# Postmark's own address rules, as its support article on ErrorCode 300 publishes them.
_MAILBOX_RE = re.compile(r"^[a-z0-9.!#$%&'`*+\-/=^_{}|~]+$", re.IGNORECASE)
_DOMAIN_RE = re.compile(r"^((\.)?[a-zA-Z0-9\-])+$")
# The common shapes Anymail sends ("a@b.c", "Name <a@b.c>"), matched without the cost of
# getaddresses, which is most of the CPU a send request takes.
_PLAIN_ADDRESS_RE = re.compile(r"([^\s\"<>,;()@]+@[^\s\"<>,;()@]+)")
_NAMED_ADDRESS_RE = re.compile(r"([^\"<>,;()@]*?)\s*<([^\s\"<>,;()@]+@[^\s\"<>,;()@]+)>")
_HREF_RE = re.compile(r"""href\s*=\s*["'](https?://[^"']+)["']""", re.IGNORECASE)
_URL_RE = re.compile(r"https?://\S+")

# Bounce types Postmark documents: Type -> (TypeCode, Name, makes the address inactive).
BOUNCE_TYPES: dict[str, tuple[int, str, bool]] = {
    "HardBounce": (1, "Hard bounce", True),
    "Transient": (2, "Message delayed", False),
    "Unsubscribe": (16, "Unsubscribe request", False),
    "AutoResponder": (64, "Auto responder", False),
    "AddressChange": (128, "Address change", False),
    "DnsError": (256, "DNS error", False),
    "SpamNotification": (512, "Spam notification", False),
    "Unknown": (2048, "Unknown", False),
    "SoftBounce": (4096, "Soft bounce", False),
    "VirusNotification": (8192, "Virus notification", False),
    "BadEmailAddress": (100000, "Invalid email address", True),
    "SpamComplaint": (100001, "Spam complaint", True),
    "ManuallyDeactivated": (100002, "Manually deactivated", True),
    "Blocked": (100006, "ISP block", False),
    "DMARCPolicy": (100009, "DMARC policy", False),
}
RECORD_TYPES = ("Delivery", "Bounce", "SpamComplaint", "Open", "Click", "SubscriptionChange")

# Recipient local-part prefixes that script what happens after acceptance. Longest
# first, because "softbounce" must not be read as "bounce".
RECIPIENT_SCRIPTS: tuple[tuple[str, tuple[tuple[str, str | None], ...]], ...] = (
    ("softbounce", (("Bounce", "SoftBounce"),)),
    ("bounce", (("Bounce", "HardBounce"),)),
    ("complaint", (("Delivery", None), ("SpamComplaint", "SpamComplaint"))),
    ("unsubscribe", (("Delivery", None), ("SubscriptionChange", None))),
    ("open", (("Delivery", None), ("Open", None))),
    ("click", (("Delivery", None), ("Click", None))),
)
INACTIVE_PREFIX = "inactive"

# Bounce IDs must not repeat across sandbox restarts: the app deduplicates tracking
# events on them, so a restarted sandbox that counted from 1 again would have its new
# bounces silently dropped as duplicates. Start from the current time in microseconds.
_bounce_ids = itertools.count(time.time_ns() // 1000)


class PostmarkError(Exception):
    """A request Postmark would refuse, with the ErrorCode and Message it would send."""

    def __init__(self, error_code: int, message: str, http_status: int = 422) -> None:
        super().__init__(message)
        self.error_code = error_code
        self.message = message
        self.http_status = http_status

    def body(self) -> dict[str, Any]:
        return error_body(self.error_code, self.message)


@dataclass(frozen=True)
class Address:
    addr_spec: str

    @property
    def local_part(self) -> str:
        return self.addr_spec.rpartition("@")[0].lower()

    @property
    def is_inactive(self) -> bool:
        return self.local_part.startswith(INACTIVE_PREFIX)


@dataclass
class ParsedMessage:
    from_: Address
    to: list[Address]
    cc: list[Address]
    bcc: list[Address]
    raw: dict[str, Any]
    recipients: list[Address] = field(init=False)

    def __post_init__(self) -> None:
        self.recipients = [*self.to, *self.cc, *self.bcc]


def now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


def new_message_id() -> str:
    return str(uuid.uuid4())


def error_body(error_code: int, message: str) -> dict[str, Any]:
    return {"ErrorCode": error_code, "Message": message}


def bad_token_error(token_given: bool) -> PostmarkError:
    if token_given:
        msg = (
            "The Server Token you provided in the X-Postmark-Server-Token request header was "
            "invalid. Please verify that you are using a valid token."
        )
    else:
        msg = "Request does not contain a valid Server token."
    return PostmarkError(ERROR_BAD_TOKEN, msg, http_status=401)


def invalid_json_error() -> PostmarkError:
    return PostmarkError(ERROR_INVALID_JSON, "Received invalid JSON input.")


def incompatible_json_error(expected: str) -> PostmarkError:
    return PostmarkError(
        ERROR_INCOMPATIBLE_JSON,
        f"The JSON input you provided is syntactically correct, but still not the one we expect: {expected}.",
    )


def too_many_batch_messages_error(count: int) -> PostmarkError:
    return PostmarkError(
        ERROR_TOO_MANY_BATCH_MESSAGES,
        f"Too many batch messages. You can send up to {MAX_BATCH_MESSAGES} messages in one "
        f"batch; this request had {count}.",
    )


def inactive_message(addr_specs: list[str]) -> str:
    # Anymail finds the rejected addresses with r"inactive addresses:\s*(.*)\.\s*Inactive
    # recipients" and lowercases them, so this wording is load-bearing.
    return (
        "You tried to send to recipient(s) that have been marked as inactive.\n"
        f"Found inactive addresses: {', '.join(a.lower() for a in addr_specs)}.\n"
        "Inactive recipients are ones that have generated a hard bounce, a spam complaint, "
        "or a manual suppression."
    )


def partially_inactive_message(addr_specs: list[str]) -> str:
    # Postmark still accepts a message when only some recipients are inactive, and says
    # so in Message with ErrorCode 0; Anymail marks just those recipients "rejected".
    return (
        "Message OK, but will not deliver to these inactive addresses: "
        f"{', '.join(a.lower() for a in addr_specs)}. Inactive recipients are ones that have "
        "generated a hard bounce, a spam complaint, or a manual suppression."
    )


def _parse_addresses(value: Any, field_name: str) -> list[Address]:
    if value is None or value == "":
        return []
    if not isinstance(value, str):
        raise PostmarkError(ERROR_INVALID_EMAIL_REQUEST, f"Error parsing '{field_name}': not a string.")
    if match := _PLAIN_ADDRESS_RE.fullmatch(value):
        pairs = [("", match.group(1))]
    elif match := _NAMED_ADDRESS_RE.fullmatch(value):
        pairs = [(match.group(1), match.group(2))]
    else:
        # Anymail formats each address on its own and joins them with ", ", so
        # getaddresses recovers exactly what it sent (quoted display names included).
        pairs = getaddresses([value])
    addresses = []
    for _display_name, addr_spec in pairs:
        mailbox, at, domain = addr_spec.rpartition("@")
        # getaddresses quietly repairs some junk (it drops the space in "x@bad domain");
        # Postmark would not, so an address that is not in the input verbatim is invalid.
        if not (at and _MAILBOX_RE.match(mailbox) and _DOMAIN_RE.match(domain) and addr_spec in value):
            bad = addr_spec if addr_spec and addr_spec in value else value
            # Anymail maps "Invalid 'To' address: '<addr>'." to an "invalid" recipient.
            raise PostmarkError(ERROR_INVALID_EMAIL_REQUEST, f"Invalid '{field_name}' address: '{bad}'.")
        addresses.append(Address(addr_spec=addr_spec))
    return addresses


def parse_message(data: Any) -> ParsedMessage:
    """Validate one message as Postmark's /email would; raise PostmarkError if refused."""
    if not isinstance(data, dict):
        raise incompatible_json_error("a message must be a JSON object")
    from_list = _parse_addresses(data.get("From"), "From")
    if not from_list:
        raise PostmarkError(ERROR_INVALID_EMAIL_REQUEST, "Invalid 'From' address: ''.")
    to = _parse_addresses(data.get("To"), "To")
    cc = _parse_addresses(data.get("Cc"), "Cc")
    bcc = _parse_addresses(data.get("Bcc"), "Bcc")
    message = ParsedMessage(from_=from_list[0], to=to, cc=cc, bcc=bcc, raw=data)
    if not message.recipients:
        raise PostmarkError(ERROR_INVALID_EMAIL_REQUEST, "Zero recipients specified")
    if len(message.recipients) > MAX_RECIPIENTS:
        raise PostmarkError(
            ERROR_INVALID_EMAIL_REQUEST,
            f"Maximum of {MAX_RECIPIENTS} recipients allowed per email message "
            f"(To, Cc and Bcc together); this message had {len(message.recipients)}.",
        )
    if not (data.get("TextBody") or data.get("HtmlBody")):
        raise PostmarkError(ERROR_INVALID_EMAIL_REQUEST, "Provide either email TextBody or HtmlBody or both.")
    metadata = data.get("Metadata")
    if metadata is not None and (
        not isinstance(metadata, dict) or any(isinstance(v, dict | list) for v in metadata.values())
    ):
        raise PostmarkError(
            ERROR_INVALID_EMAIL_REQUEST,
            "Invalid metadata content. Metadata must be an object of field names to simple values.",
        )
    headers = data.get("Headers")
    if headers is not None and (
        not isinstance(headers, list) or not all(isinstance(h, dict) and "Name" in h for h in headers)
    ):
        raise PostmarkError(
            ERROR_INVALID_EMAIL_REQUEST, "Invalid 'Headers': expected a list of Name/Value objects."
        )
    return message


def accepted_body(
    *, message_id: str, to_header: str | None, submitted_at: str, message: str = "OK"
) -> dict[str, Any]:
    body: dict[str, Any] = {
        "ErrorCode": 0,
        "Message": message,
        "MessageID": message_id,
        "SubmittedAt": submitted_at,
    }
    if to_header:
        # Postmark omits To for a Cc/Bcc-only send; Anymail relies on that.
        body["To"] = to_header
    return body


def script_for(addr_spec: str) -> tuple[tuple[str, str | None], ...]:
    """The webhooks a recipient's local part scripts: (RecordType, bounce Type) pairs."""
    local = addr_spec.rpartition("@")[0].lower()
    for prefix, script in RECIPIENT_SCRIPTS:
        if local.startswith(prefix):
            return script
    return (("Delivery", None),)


def first_link(record: Mapping[str, Any]) -> str:
    """The link a scripted Click reports: the message's first link, so click tracking can
    be tested against real URLs."""
    match = _HREF_RE.search(record.get("html") or "")
    if match:
        return match.group(1)
    match = _URL_RE.search(record.get("text") or "")
    return match.group(0) if match else "https://example.com/"


_CLIENT = {"Name": "Chrome 120.0", "Company": "Google", "Family": "Chrome"}
_OS = {"Name": "OS X 14.0", "Company": "Apple Computer, Inc.", "Family": "OS X"}
_GEO = {
    "CountryISOCode": "NL",
    "Country": "Netherlands",
    "RegionISOCode": "NH",
    "Region": "North Holland",
    "City": "Amsterdam",
    "Zip": "1012",
    "Coords": "52.3731,4.8922",
    "IP": "192.0.2.10",
}
_USER_AGENT = "Mozilla/5.0 (Macintosh; Intel Mac OS X 14_0) AppleWebKit/537.36 Chrome/120.0 Safari/537.36"


def webhook_payload(
    record_type: str,
    record: Mapping[str, Any],
    recipient: str,
    *,
    bounce_type: str | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """A webhook body in Postmark's documented format for one recipient of a recorded message.

    `record` is a sandbox message record (see SandboxServer.messages()).
    """
    common: dict[str, Any] = {
        "RecordType": record_type,
        "ServerID": SERVER_ID,
        "MessageStream": record.get("message_stream") or DEFAULT_MESSAGE_STREAM,
        "MessageID": record["message_id"],
        "Tag": record.get("tag") or "",
        "Metadata": dict(record.get("metadata") or {}),
    }
    at = now_iso()
    if record_type == "Delivery":
        payload = {
            **common,
            "Recipient": recipient,
            "DeliveredAt": at,
            "Details": "smtp;250 2.0.0 OK (sandbox)",
        }
    elif record_type in ("Bounce", "SpamComplaint"):
        kind = bounce_type or ("SpamComplaint" if record_type == "SpamComplaint" else "HardBounce")
        if kind not in BOUNCE_TYPES:
            raise ValueError(f"unknown bounce_type {kind!r}; one of {sorted(BOUNCE_TYPES)}")
        type_code, name, inactive = BOUNCE_TYPES[kind]
        payload = {
            **common,
            "ID": next(_bounce_ids),
            "Type": kind,
            "TypeCode": type_code,
            "Name": name,
            "Description": f"{name} (ESP sandbox).",
            "Details": "smtp;550 5.1.1 The email account that you tried to reach does not exist"
            if kind == "HardBounce"
            else f"{name} reported by the ESP sandbox",
            "Email": recipient,
            "From": record.get("from") or "",
            "BouncedAt": at,
            "DumpAvailable": False,
            "Inactive": inactive,
            "CanActivate": inactive,
            "Subject": record.get("subject") or "",
            "Content": "",
        }
    elif record_type == "Open":
        payload = {
            **common,
            "Recipient": recipient,
            "ReceivedAt": at,
            "FirstOpen": True,
            "ReadSeconds": 5,
            "Platform": "Desktop",
            "UserAgent": _USER_AGENT,
            "Client": _CLIENT,
            "OS": _OS,
            "Geo": _GEO,
        }
    elif record_type == "Click":
        payload = {
            **common,
            "Recipient": recipient,
            "ReceivedAt": at,
            "ClickLocation": "HTML",
            "OriginalLink": first_link(record),
            "Platform": "Desktop",
            "UserAgent": _USER_AGENT,
            "Client": _CLIENT,
            "OS": _OS,
            "Geo": _GEO,
        }
    elif record_type == "SubscriptionChange":
        payload = {
            **common,
            "Recipient": recipient,
            "ChangedAt": at,
            "Origin": "Recipient",
            "SuppressSending": True,
            "SuppressionReason": "ManualSuppression",
        }
    else:
        raise ValueError(f"unknown record_type {record_type!r}; one of {list(RECORD_TYPES)}")
    if overrides:
        payload.update(overrides)
    return payload
