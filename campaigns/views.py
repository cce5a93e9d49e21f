"""The events API: POST /api/events/ for services outside the monolith."""

from __future__ import annotations

import json

from django.conf import settings
from django.db import transaction
from django.http import HttpRequest, JsonResponse
from django.views.decorators.csrf import csrf_exempt
from django.views.decorators.http import require_POST
from django_ratelimit.core import is_ratelimited

from campaigns.events import emit_many
from campaigns.exceptions import InvalidEvent
from campaigns.services import api_source_authenticate

MAX_EVENTS_PER_REQUEST = 1000


def _token(request: HttpRequest) -> str:
    header = request.headers.get("Authorization", "")
    if header.lower().startswith("bearer "):
        return header[7:].strip()
    return request.headers.get("X-Mailauto-Token", "").strip()


def _error(status: int, message: str, errors: dict[str, str] | None = None) -> JsonResponse:
    body: dict[str, object] = {"error": message}
    if errors:
        body["errors"] = errors
    return JsonResponse(body, status=status)


@csrf_exempt  # token-authenticated machine endpoint; no cookies are involved
@require_POST
def events_api(request: HttpRequest) -> JsonResponse:
    """Emit one event (a JSON object) or many (a JSON list). 202 with the event ids.

    All or nothing: if any event in a list is invalid, none is written and the 400 body
    names each bad field as "events[i].payload.plan".
    """
    token = _token(request)
    source = api_source_authenticate(token=token) if token else None
    if source is None:
        return _error(401, "missing or invalid API token (send 'Authorization: Bearer <token>')")
    if is_ratelimited(
        request,
        group="events-api",
        key=lambda _group, _request: str(source.pk),
        rate=settings.MAILAUTO["EVENTS_API_RATE_LIMIT"],
        increment=True,
    ):
        return _error(429, "rate limit exceeded for this API source")
    if request.content_type != "application/json":
        return _error(415, "send the body as application/json")
    try:
        body = json.loads(request.body)
    except (ValueError, UnicodeDecodeError) as err:
        return _error(400, f"body is not valid JSON: {err}")

    items = body if isinstance(body, list) else [body]
    if not items:
        return _error(400, "the list of events is empty")
    if len(items) > MAX_EVENTS_PER_REQUEST:
        return _error(400, f"at most {MAX_EVENTS_PER_REQUEST} events per request")
    try:
        with transaction.atomic():
            event_ids = emit_many(items, source=source.name)
    except InvalidEvent as err:
        errors = err.errors
        if not isinstance(body, list):
            # A single object: name fields as "payload.plan", not "events[0].payload.plan".
            errors = {key.removeprefix("events[0]."): value for key, value in errors.items()}
        return _error(400, "invalid event", errors)
    if isinstance(body, list):
        return JsonResponse({"event_ids": event_ids}, status=202)
    return JsonResponse({"event_id": event_ids[0]}, status=202)
