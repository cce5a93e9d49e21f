"""Small factories for the wide models, so tests say only what matters to them."""

from __future__ import annotations

import itertools
from typing import Any

from django.utils import timezone

from campaigns.models import (
    Automation,
    Contact,
    EmailTemplate,
    EventType,
    Message,
    OutboxEvent,
    TemplateVersion,
)

_seq = itertools.count(1)

SIGNUP_SCHEMA = {
    "fields": {
        "plan": {"type": "string", "required": True, "enum": ["free", "pro"]},
        "card_last4": {"type": "string", "sensitive": True},
    }
}


def event_type(name: str = "user.signed_up", schema: dict | None = None, **kw: Any) -> EventType:
    return EventType.objects.create(name=name, schema=SIGNUP_SCHEMA if schema is None else schema, **kw)


def contact(user_id: str | None = None, email: str | None = None, **attributes: Any) -> Contact:
    n = next(_seq)
    return Contact.objects.create(
        user_id=user_id or f"user-{n}", email=email or f"person{n}@example.com", attributes=attributes
    )


def published_version(
    name: str | None = None,
    subject: str = "Hello {{ contact.first_name|default:'there' }}",
    html: str = "<p>Welcome on the {{ payload.plan }} plan.</p>",
    text: str = "",
    declared: list[str] | None = None,
) -> TemplateVersion:
    template = EmailTemplate.objects.create(name=name or f"template-{next(_seq)}")
    return TemplateVersion.objects.create(
        template=template,
        number=1,
        status=TemplateVersion.Status.PUBLISHED,
        published_at=timezone.now(),
        subject=subject,
        html=html,
        text=text,
        declared_sensitive_fields=declared or [],
    )


def automation(trigger: EventType, version: TemplateVersion | None = None, **kw: Any) -> Automation:
    version = version or published_version()
    kw.setdefault("name", f"automation-{next(_seq)}")
    kw.setdefault("active", True)
    return Automation.objects.create(trigger=trigger, template=version.template, **kw)


def outbox_event(type_: EventType, user_id: str, payload: dict | None = None, **kw: Any) -> OutboxEvent:
    kw.setdefault("event_id", f"evt-{next(_seq)}")
    kw.setdefault("occurred_at", timezone.now())
    return OutboxEvent.objects.create(
        event_type=type_, user_id=user_id, payload=payload or {"plan": "pro"}, **kw
    )


def message(
    version: TemplateVersion, to_contact: Contact, event: OutboxEvent | None = None, **kw: Any
) -> Message:
    kw.setdefault("idempotency_key", f"key-{next(_seq)}")
    kw.setdefault("purpose", "marketing")
    return Message.objects.create(
        template_version=version, contact=to_contact, to_email=to_contact.email, event=event, **kw
    )


# Appended with broadcasts (factories are only ever appended to).
from campaigns.models import Broadcast  # noqa: E402


def broadcast(version: TemplateVersion | None = None, **kw: Any) -> Broadcast:
    """A draft broadcast of `version`'s template (a fresh published one by default)."""
    version = version or published_version(subject="News for {{ contact.first_name|default:'you' }}")
    kw.setdefault("name", f"broadcast-{next(_seq)}")
    return Broadcast.objects.create(template=version.template, **kw)
