"""Anymail's tracking webhook views, guarded: rate limited per client IP, basic auth
checked before anything else, and bad input answered with a 4xx (never a 500) and logged
without the payload.

What Anymail itself does with bad input (anymail/webhooks/base.py and postmark.py,
django-anymail 15.2), and what we answer instead:

| input | Anymail alone | here |
|---|---|---|
| missing or wrong basic auth | AnymailWebhookValidationFailure, a SuspiciousOperation: 400 | 401 + WWW-Authenticate |
| bad ESP signature (Mailgun, SendGrid, ...) | the same 400 | 403 |
| body not JSON (Postmark) | json.loads raises: 500 | 400 |
| a JSON list, or Metadata not an object | TypeError while parsing: 500 | 400 |
| no RecordType | a normalized "unknown" event: 200, stored | 400 |
| a field of the wrong type (Email: 5) | passed through to the signal | 400 |
| a NUL or a lone surrogate ("\\ud800") in any string | Postgres refuses the INSERT: 500, retried for ever | 400 |
| a timestamp outside 1970-9998 UTC | stored (a BC date breaks the admin) | 400 |
| no WEBHOOK_SECRET configured | takes posts from anyone | 503, logged as an error |
| an ESP whose keys are not configured | ImproperlyConfigured in the view's __init__: 500 | 503, logged as an error |

An exception from our own signal receiver (the database is down) still propagates: the
ESP gets a 500 and retries later, and the retry is deduplicated.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable, Iterator, Mapping
from datetime import UTC, datetime
from typing import Any, cast

from anymail.exceptions import AnymailWebhookValidationFailure
from anymail.signals import AnymailTrackingEvent
from anymail.utils import get_anymail_setting, get_request_basic_auth
from anymail.webhooks.base import AnymailCoreWebhookView
from django.conf import settings
from django.core.exceptions import ImproperlyConfigured, RequestDataTooBig
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.utils import timezone
from django.utils.crypto import constant_time_compare
from django.utils.dateparse import parse_datetime
from django.views.decorators.csrf import csrf_exempt
from django_ratelimit.core import is_ratelimited

from webhooks.services import canonical_json, esp_event_as_json

logger = logging.getLogger(__name__)

View = Callable[..., HttpResponse]


class WebhookRejected(Exception):
    """Bad input: answered with `status`. `reason` is ours and names no payload value,
    so that it can be logged and sent back without leaking what the request carried."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


# --- Postmark's documented shape ---------------------------------------------------------

# https://postmarkapp.com/developer/webhooks/webhooks-overview and the fixtures in
# tests/fixtures/postmark/. Anymail reads these fields without checking their types.
POSTMARK_STRING_FIELDS = (
    "RecordType",
    "MessageID",
    "Recipient",
    "Email",
    "Tag",
    "Type",
    "Description",
    "Details",
    "OriginalLink",
    "MessageStream",
    "SuppressionReason",
)
POSTMARK_TIMESTAMP_FIELDS = ("DeliveredAt", "BouncedAt", "ReceivedAt", "ChangedAt")
POSTMARK_REQUIRED_FIELDS: dict[str, tuple[str, ...]] = {
    "Delivery": ("Recipient",),
    "Bounce": ("ID", "Type", "Email"),
    "SpamComplaint": ("ID", "Type", "Email"),
    "Open": ("Recipient",),
    "Click": ("Recipient",),
    "SubscriptionChange": ("Recipient",),
}


def postmark_payload_check(request: HttpRequest) -> None:
    """Refuse a Postmark tracking payload that is not shaped as Postmark documents it.

    An unknown RecordType (one Postmark adds later) passes: Anymail stores it as an
    "unknown" event, which is better than refusing it for ever.
    """
    try:
        body = json.loads(request.body, parse_constant=_refuse_constant)
    except RequestDataTooBig:
        raise
    except (ValueError, RecursionError) as err:
        raise WebhookRejected(400, "the body is not valid JSON") from err
    if not isinstance(body, dict):
        raise WebhookRejected(400, "the body is not a JSON object")
    if "RecordType" not in body:
        raise WebhookRejected(400, "RecordType is missing")
    for name in POSTMARK_STRING_FIELDS:
        if name in body and not isinstance(body[name], str):
            raise WebhookRejected(400, f"{name} is not a string")
    for name in POSTMARK_REQUIRED_FIELDS.get(body["RecordType"], ()):
        if name not in body:
            raise WebhookRejected(400, f"{name} is missing for RecordType {body['RecordType']!r}"[:200])
    if "ID" in body and (isinstance(body["ID"], bool) or not isinstance(body["ID"], int)):
        raise WebhookRejected(400, "ID is not an integer")
    metadata = body.get("Metadata", {})
    if not isinstance(metadata, dict) or any(isinstance(v, dict | list) for v in metadata.values()):
        raise WebhookRejected(400, "Metadata is not an object of simple values")
    for name in POSTMARK_TIMESTAMP_FIELDS:
        if name in body:
            at = _timestamp(body[name])
            if at is None:
                raise WebhookRejected(400, f"{name} is not an ISO 8601 timestamp")
            if not timestamp_in_range(at):
                raise WebhookRejected(400, f"{name} is out of range (1970 to 9998 UTC)")


def _refuse_constant(name: str) -> object:
    raise ValueError(f"{name} is not JSON")


def _timestamp(value: object) -> datetime | None:
    if not isinstance(value, str):
        return None
    try:
        return parse_datetime(value)
    except ValueError:
        return None


# Postgres takes 4713 BC to 294276 AD, Python's datetime only years 1 to 9999: an event
# stamped 0001-01-01T00:00:00+14:00 (1 BC in UTC) would be stored, and every page that
# reads it back would fail. No ESP event predates 1970.
EARLIEST_TIMESTAMP = datetime(1970, 1, 1, tzinfo=UTC)
LATEST_TIMESTAMP = datetime(9999, 1, 1, tzinfo=UTC)  # exclusive


def timestamp_in_range(value: datetime) -> bool:
    """Whether `value` (naive means UTC, as webhooks.services stores it) lies within
    1970 to 9998 in UTC."""
    if timezone.is_naive(value):
        value = value.replace(tzinfo=UTC)
    try:
        value = value.astimezone(UTC)
    except OverflowError:  # before year 1 or after 9999 once converted
        return False
    return EARLIEST_TIMESTAMP <= value < LATEST_TIMESTAMP


# Checks of the raw request, per ESP, before Anymail parses it.
PAYLOAD_CHECKS: dict[str, Callable[[HttpRequest], None]] = {
    "postmark": postmark_payload_check,
}


# --- every ESP: what Anymail normalized ----------------------------------------------------

_OPTIONAL_TEXT = ("message_id", "recipient", "description", "mta_response", "reject_reason", "click_url")
_FIELD_LIMITS = {"message_id": 255, "recipient": 254, "reject_reason": 20}

# Postgres text and jsonb hold neither U+0000 nor a lone UTF-16 surrogate (JSON "\ud800"
# parses to one). Either fails the INSERT: a 500 that the ESP retries for ever, and an
# error whose CONTEXT quotes the row, addresses included, into the database's log.
_NUL = "\x00"
_SURROGATE = re.compile("[\ud800-\udfff]")


def tracking_event_check(event: object) -> None:
    """Refuse an event whose normalized fields do not have the types Anymail documents
    (a payload can put anything where Anymail expects a string)."""
    if not isinstance(event, AnymailTrackingEvent) or not isinstance(event.event_type, str):
        raise WebhookRejected(400, "not a tracking event")
    if event.event_id is not None and not isinstance(event.event_id, str | int):
        raise WebhookRejected(400, "the event id is not a string")
    for name in _OPTIONAL_TEXT:
        value = getattr(event, name, None)
        if value is None:
            continue
        if not isinstance(value, str):
            raise WebhookRejected(400, f"{name} is not a string")
    if event.timestamp is not None:
        if not isinstance(event.timestamp, datetime):
            raise WebhookRejected(400, "the timestamp is not a date and time")
        if not timestamp_in_range(event.timestamp):
            raise WebhookRejected(400, "the timestamp is out of range (1970 to 9998 UTC)")
    if not isinstance(event.metadata, Mapping):
        raise WebhookRejected(400, "the metadata is not an object")
    esp_event = esp_event_as_json(event.esp_event)
    try:
        canonical_json(esp_event)
        canonical_json(dict(event.metadata))
    except (TypeError, ValueError) as err:
        raise WebhookRejected(400, "the event is not plain JSON") from err
    texts = [getattr(event, name, None) for name in _OPTIONAL_TEXT]
    storable_text_check([event.event_id, texts, dict(event.metadata), esp_event])
    for name in _OPTIONAL_TEXT:
        value = getattr(event, name, None)
        if value is not None and len(value) > _FIELD_LIMITS.get(name, 100_000):
            raise WebhookRejected(400, f"{name} is too long")


def storable_text_check(data: object) -> None:
    """Refuse JSON data with a string (a value or a key, at any depth) that Postgres
    cannot store. Says which kind of character, never where or in what."""
    for text in _strings(data):
        if _SURROGATE.search(text):
            raise WebhookRejected(
                400, "the payload contains text that is not valid Unicode (a lone surrogate)"
            )
        if _NUL in text:
            raise WebhookRejected(400, "the payload contains a NUL character, which cannot be stored")


def _strings(data: object) -> Iterator[str]:
    # Iterative: the payload may nest as deep as json.loads allows.
    stack = [data]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            yield item
        elif isinstance(item, Mapping):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list | tuple):
            stack.extend(item)


# --- the guard around Anymail's views --------------------------------------------------------


class WebhookGuardMixin(AnymailCoreWebhookView):
    """Put before an Anymail tracking view class: turns what Anymail raises while
    validating and parsing into WebhookRejected, answered in dispatch()."""

    esp_slug = ""

    def run_validators(self, request: HttpRequest) -> None:
        try:
            super().run_validators(request)
        except AnymailWebhookValidationFailure as err:
            # Basic auth was checked before the view was built, so this is the ESP's
            # own signature (or its required headers) failing.
            raise WebhookRejected(403, "the ESP's signature did not verify") from err
        except RequestDataTooBig as err:
            raise WebhookRejected(413, "the body is too large") from err
        except Exception as err:
            # Some validators parse the body first (Amazon SES, Unisender Go, Mailgun).
            raise WebhookRejected(400, f"unreadable payload ({type(err).__name__})") from err

    def parse_events(self, request: HttpRequest) -> list[AnymailTrackingEvent]:
        try:
            check = PAYLOAD_CHECKS.get(self.esp_slug)
            if check is not None:
                check(request)
            events = super().parse_events(request)
            for event in events:
                tracking_event_check(event)
        except WebhookRejected:
            raise
        except RequestDataTooBig as err:
            raise WebhookRejected(413, "the body is too large") from err
        except Exception as err:
            # Anymail's parsers index into the payload as documented; anything else
            # surfaces as KeyError, TypeError, ValueError... Bad input, not our bug.
            raise WebhookRejected(400, f"unexpected payload shape ({type(err).__name__})") from err
        return events

    def dispatch(self, request: HttpRequest, *args: Any, **kwargs: Any) -> HttpResponse:
        try:
            return super().dispatch(request, *args, **kwargs)
        except WebhookRejected as err:
            return _rejected(request, self.esp_slug, err)


def _rejected(request: HttpRequest, esp: str, err: WebhookRejected) -> HttpResponse:
    # Never the payload, nor str() of a parser's exception: either may hold addresses.
    logger.warning(
        "%s webhook rejected with %s: %s",
        esp,
        err.status,
        err.reason,
        extra={"esp": esp, "status": err.status, "client_ip": request.META.get("REMOTE_ADDR", "")},
    )
    response = JsonResponse({"error": err.reason}, status=err.status)
    if err.status == 401:
        response["WWW-Authenticate"] = 'Basic realm="webhooks"'
    return response


def _webhook_secrets() -> list[str]:
    """The configured basic-auth secrets ('user:password'), empty ones left out."""
    allowed = get_anymail_setting("webhook_secret", default=[])
    if isinstance(allowed, str):
        allowed = [allowed]
    if not isinstance(allowed, list | tuple):
        return []
    return [secret for secret in allowed if isinstance(secret, str) and secret]


def _basic_auth_ok(request: HttpRequest, allowed: list[str]) -> bool:
    """The same check as Anymail's AnymailBasicAuthMixin.validate_request, made first so
    that a missing or wrong secret is a 401 (the ESP retries once it is fixed) and not
    the 400 that Anymail raises for it. `allowed` is never empty: with no secret, the
    caller refuses the request (Anymail would take it from anyone)."""
    if not allowed:
        return False
    given = get_request_basic_auth(request)
    if given is None:
        return False
    return any(constant_time_compare(given, secret) for secret in allowed)


def _rate_limited(request: HttpRequest) -> bool:
    # Keyed by REMOTE_ADDR (django-ratelimit's "ip"): behind a reverse proxy, set
    # RATELIMIT_IP_META_KEY, or every ESP shares the proxy's one counter.
    try:
        return is_ratelimited(
            request,
            group="webhooks",
            key="ip",
            rate=settings.MAILAUTO["WEBHOOK_RATE_LIMIT"],
            increment=True,
        )
    except Exception:
        # The counter lives in the shared cache (Redis). Without it, take the webhook
        # anyway: losing bounces and complaints would cost more than an unmetered hour.
        logger.warning("webhook rate limit unavailable; not limiting", exc_info=True)
        return False


def tracking_view(esp: str, view_class: type[AnymailCoreWebhookView]) -> View:
    """Anymail's tracking view for `esp`, guarded."""
    guarded_class = cast(
        type[AnymailCoreWebhookView],
        type(f"Guarded{view_class.__name__}", (WebhookGuardMixin, view_class), {"esp_slug": esp}),
    )
    anymail_view = guarded_class.as_view()

    @csrf_exempt  # authenticated by the shared secret and the ESP's signature; no cookies
    def webhook(request: HttpRequest, *args: Any, **kwargs: Any) -> HttpResponse:
        if _rate_limited(request):
            return _rejected(
                request, esp, WebhookRejected(429, "too many webhook requests from this address")
            )
        if request.method == "POST":
            secrets = _webhook_secrets()
            if not secrets:
                # ANYMAIL_WEBHOOK_SECRET set but empty (system check mailauto.E002). Fail
                # closed: the ESP retries once the secret is set, nothing is forged meanwhile.
                logger.error("%s webhook refused: no webhook secret is configured", esp)
                return JsonResponse({"error": "webhook secret not configured"}, status=503)
            if not _basic_auth_ok(request, secrets):
                return _rejected(request, esp, WebhookRejected(401, "missing or wrong webhook credentials"))
        try:
            return anymail_view(request, *args, **kwargs)
        except ImproperlyConfigured:
            # Raised while Anymail builds the view: this ESP's keys (e.g. Mailgun's
            # signing key) are not set. Ours to fix; the ESP should retry later.
            logger.error("%s webhook received, but Anymail is not configured for %s", esp, esp, exc_info=True)
            return JsonResponse({"error": f"webhooks for {esp} are not configured"}, status=503)

    webhook.view_class = guarded_class  # type: ignore[attr-defined]
    return webhook
