"""The data templates render with: build_context() turns the contact, the event, its
payload and the links into plain JSON, withholding the payload's sensitive fields that
the template version has not declared."""

from __future__ import annotations

import json
from typing import Any

from django.core.serializers.json import DjangoJSONEncoder

ALLOWED_ROOTS = ("contact", "event", "payload", "links")


def _plain_json(value: Any, depth: int = 0) -> Any:
    """dict/list/str/int/float/bool/None only: dates become ISO strings (and the date
    filter reads them back), anything else that JSON cannot hold raises TypeError.

    The same result as json.loads(json.dumps(value, cls=DjangoJSONEncoder)), a fresh
    copy, without the round trip for what is plain already (every email's context is
    checked twice, in build_context and in render_email). Exact types only: a str
    subclass such as SafeString must come out as a plain str, or it would skip
    autoescaping. Anything else, including a dict with a non-string key, goes through
    the JSON round trip itself."""
    kind = type(value)
    if kind is str or kind is int or kind is bool or kind is float or value is None:
        return value
    if depth < _MAX_WALK_DEPTH:
        if kind is dict and all(type(key) is str for key in value):
            return {key: _plain_json(item, depth + 1) for key, item in value.items()}
        if kind is list or kind is tuple:
            return [_plain_json(item, depth + 1) for item in value]
    return json.loads(json.dumps(value, cls=DjangoJSONEncoder))


# Deeper than this, the rest goes through json (which also reports a circular structure
# as ValueError, as before, instead of recursing forever).
_MAX_WALK_DEPTH = 50


def _field_path(path: str) -> tuple[str, ...]:
    # "items.*.card" (campaigns.schemas) and "items.0.card" both mean "card of every item".
    return tuple(
        segment for segment in path.split(".") if segment and segment != "*" and not segment.isdigit()
    )


_WITHHELD = object()


def _withhold(
    value: Any, path: tuple[str, ...], sensitive: set[tuple[str, ...]], declared: set[tuple[str, ...]]
) -> Any:
    def starts(longer: tuple[str, ...], prefix: tuple[str, ...]) -> bool:
        return longer[: len(prefix)] == prefix

    if any(starts(path, field) for field in declared):
        return value
    inside_sensitive = any(starts(path, field) for field in sensitive)
    above_sensitive = any(starts(field, path) and field != path for field in sensitive)
    above_declared = any(starts(field, path) and field != path for field in declared)
    if inside_sensitive and not above_declared:
        return _WITHHELD
    if not (inside_sensitive or above_sensitive):
        return value
    if isinstance(value, dict):
        kept = {}
        for key, item in value.items():
            item_path = path if key.isdigit() else (*path, key)
            if (item := _withhold(item, item_path, sensitive, declared)) is not _WITHHELD:
                kept[key] = item
        return kept
    if isinstance(value, list):
        return [
            item
            for item in (_withhold(item, path, sensitive, declared) for item in value)
            if item is not _WITHHELD
        ]
    # A scalar where the schema has an object or list holding sensitive data: it may
    # contain that data in some other shape, so it is withheld too.
    return _WITHHELD


def build_context(
    *,
    contact: dict[str, Any],
    event: dict[str, Any],
    payload: dict[str, Any],
    links: dict[str, Any],
    sensitive_fields: set[str],
    declared_fields: set[str],
) -> dict[str, Any]:
    """The plain-JSON context templates render with. Payload fields in sensitive_fields
    ("card_last4", "address.street", "items.*.card", relative to the payload) are removed
    unless declared_fields (same form) names them or an object around them."""
    sensitive = {path for path in map(_field_path, sensitive_fields) if path}
    declared = {path for path in map(_field_path, declared_fields) if path}
    plain_payload = _withhold(_plain_json(payload), (), sensitive, declared)
    return {
        "contact": _plain_json(contact),
        "event": _plain_json(event),
        "payload": plain_payload if plain_payload is not _WITHHELD else {},
        "links": _plain_json(links),
    }
