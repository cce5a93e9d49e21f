"""Writes for the marketer-owned configuration: template versions, API sources, automation
activation. The admin and the API call these; nothing saves these models directly."""

from __future__ import annotations

import hmac
import secrets
from datetime import timedelta
from typing import Any

from django.core.exceptions import NON_FIELD_ERRORS, ValidationError
from django.db import transaction
from django.db.models import Max, Q
from django.utils import timezone

from campaigns.models import ApiSource, Automation, Contact, EmailTemplate, EventType, TemplateVersion
from campaigns.rendering import (
    RenderedEmail,
    TemplateRejected,
    build_context,
    render_email,
    validate_template,
)
from campaigns.rules import RuleError, validate_rule
from campaigns.schemas import SchemaError, sensitive_fields
from campaigns.selectors import template_versions_forget

API_TOKEN_PREFIX_LENGTH = 8
# last_used_at is informational ("is this source still in use?"); writing it on every
# request would turn each authenticated API call into a row update on a hot row.
API_SOURCE_USAGE_RESOLUTION = timedelta(minutes=1)

PREVIEW_CONTACT = {"user_id": "preview-user", "email": "preview@example.com"}

_TEMPLATE_PARTS = ("subject", "html", "text")


# --- template versions -------------------------------------------------------------------


def template_version_validate(
    *, subject: str, html: str, text: str = "", declared_sensitive_fields: object = None
) -> set[str]:
    """Check a version's content; return the variable paths it references.

    Raises ValidationError with each problem on the field it belongs to, so that the
    admin form can show it beside the input. Pure: used by the admin form's clean() and
    by the services below, which validate again inside their transaction.
    """
    errors: dict[str, list[str]] = {}
    try:
        _clean_declared_fields(declared_sensitive_fields)
    except ValidationError as err:
        errors["declared_sensitive_fields"] = err.messages
    variables: set[str] = set()
    try:
        variables = validate_template(subject=subject, html=html, text=text)
    except TemplateRejected as rejected:
        for field, messages in _attribute_template_errors(rejected).items():
            errors.setdefault(field, []).extend(messages)
    if errors:
        raise ValidationError(errors)
    return variables


def _attribute_template_errors(rejected: TemplateRejected) -> dict[str, list[str]]:
    """Put each message of a rejection on the part it names.

    campaigns.rendering starts every message with the part and the line ("html, line 3:
    the filter 'safe' is not allowed"); a message that names no part belongs to the
    version as a whole.
    """
    by_field: dict[str, list[str]] = {}
    for message in rejected.errors or [str(rejected) or "The template was rejected."]:
        part = message.split(",", 1)[0].strip()
        by_field.setdefault(part if part in _TEMPLATE_PARTS else NON_FIELD_ERRORS, []).append(message)
    return by_field


def _clean_declared_fields(value: object) -> list[str]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise ValidationError('Declared sensitive fields must be a list of field names, e.g. ["card_last4"].')
    bad = [item for item in value if not isinstance(item, str) or not item.strip()]
    if bad:
        shown = ", ".join(repr(item) for item in bad[:5])
        raise ValidationError(f"Declared sensitive fields must be non-empty strings; got {shown}.")
    return sorted({item.strip() for item in value})


@transaction.atomic
def template_version_create(
    *,
    template: EmailTemplate,
    subject: str,
    html: str,
    text: str = "",
    declared_sensitive_fields: list[str] | None = None,
) -> TemplateVersion:
    """Add a draft version with the next number for its template."""
    template_version_validate(
        subject=subject, html=html, text=text, declared_sensitive_fields=declared_sensitive_fields
    )
    return TemplateVersion.objects.create(
        template=template,
        number=_next_number(template),
        status=TemplateVersion.Status.DRAFT,
        subject=subject,
        html=html,
        text=text,
        declared_sensitive_fields=_clean_declared_fields(declared_sensitive_fields),
    )


def _next_number(template: EmailTemplate) -> int:
    # Lock the template row so that two people adding a version at the same moment
    # queue up here instead of one of them failing on the unique (template, number).
    EmailTemplate.objects.select_for_update().filter(pk=template.pk).values_list("pk", flat=True).first()
    highest = TemplateVersion.objects.filter(template=template).aggregate(highest=Max("number"))["highest"]
    return (highest or 0) + 1


@transaction.atomic
def template_version_update(
    *,
    version: TemplateVersion,
    subject: str,
    html: str,
    text: str,
    declared_sensitive_fields: list[str] | None,
) -> TemplateVersion:
    """Edit a draft. Published versions never change: Messages point at them."""
    # Re-read under a lock: the status on the caller's instance may be stale if someone
    # published this draft since it was loaded.
    current = TemplateVersion.objects.select_for_update().get(pk=version.pk)
    if current.is_published:
        raise ValidationError("published versions are immutable; create a new version")
    template_version_validate(
        subject=subject, html=html, text=text, declared_sensitive_fields=declared_sensitive_fields
    )
    version.subject = subject
    version.html = html
    version.text = text
    version.declared_sensitive_fields = _clean_declared_fields(declared_sensitive_fields)
    version.save(update_fields=["subject", "html", "text", "declared_sensitive_fields"])
    return version


@transaction.atomic
def template_version_publish(*, version: TemplateVersion) -> TemplateVersion:
    """Publish a draft after validating it again (the rules may have changed since it
    was written). Publishing a published version changes nothing."""
    current = TemplateVersion.objects.select_for_update().get(pk=version.pk)
    if not current.is_published:
        template_version_validate(
            subject=current.subject,
            html=current.html,
            text=current.text,
            declared_sensitive_fields=current.declared_sensitive_fields,
        )
        current.status = TemplateVersion.Status.PUBLISHED
        current.published_at = timezone.now()
        current.save(update_fields=["status", "published_at"])
        template_id = current.template_id
        transaction.on_commit(lambda: template_versions_forget(template_id))
    version.status = current.status
    version.published_at = current.published_at
    return version


@transaction.atomic
def template_version_copy(*, version: TemplateVersion) -> TemplateVersion:
    """A new draft with the content of any version, numbered after the latest.

    Not validated here: a version that today's rules reject can still be copied so that
    it can be fixed; publishing validates.
    """
    return TemplateVersion.objects.create(
        template_id=version.template_id,
        number=_next_number(version.template),
        status=TemplateVersion.Status.DRAFT,
        subject=version.subject,
        html=version.html,
        text=version.text,
        declared_sensitive_fields=list(version.declared_sensitive_fields or []),
    )


def template_version_preview(
    *,
    version: TemplateVersion,
    contact: Contact | None,
    payload: dict[str, Any],
    event_type: EventType | None,
) -> RenderedEmail:
    """Render a version as a send would, for a contact (or a placeholder) and a payload.

    The event type's sensitive payload fields are withheld unless the version declares
    them, exactly as for a real message (build_context does the withholding).
    """
    schema = event_type.schema if event_type is not None else {}
    try:
        hidden = sensitive_fields(schema)
    except SchemaError:
        hidden = set()
    context = build_context(
        contact=contact.as_context() if contact is not None else dict(PREVIEW_CONTACT),
        event={"type": event_type.name, "occurred_at": timezone.now().isoformat(), "source": "preview"}
        if event_type is not None
        else {},
        payload=payload,
        links={},
        sensitive_fields=hidden,
        declared_fields=set(version.declared_sensitive_fields or []),
    )
    return render_email(subject=version.subject, html=version.html, text=version.text, context=context)


# --- API sources -------------------------------------------------------------------------


@transaction.atomic
def api_source_create(*, name: str) -> tuple[ApiSource, str]:
    """Register a service allowed to POST events; return it and its token.

    The token is returned this once and never stored: only its SHA-256 is.
    """
    name = name.strip()
    token = secrets.token_urlsafe(32)
    source = ApiSource(
        name=name, token_hash=ApiSource.hash_token(token), token_prefix=token[:API_TOKEN_PREFIX_LENGTH]
    )
    source.full_clean(exclude=["token_hash", "token_prefix"])
    source.save()
    return source, token


@transaction.atomic
def api_source_authenticate(*, token: str) -> ApiSource | None:
    """The active source this token belongs to, or None.

    The lookup is by SHA-256 of the token, so timing differences in the index lookup can
    only reveal something about a hash, never about a valid token; the final comparison
    is constant-time as well.
    """
    if not isinstance(token, str) or not token or len(token) > 200:
        return None
    token_hash = ApiSource.hash_token(token)
    source = ApiSource.objects.filter(token_hash=token_hash, active=True).first()
    if source is None or not hmac.compare_digest(source.token_hash, token_hash):
        return None
    now = timezone.now()
    # Conditional UPDATE: at most one write a minute per source however many requests
    # (and workers) authenticate with it concurrently.
    updated = (
        ApiSource.objects.filter(pk=source.pk)
        .filter(Q(last_used_at__isnull=True) | Q(last_used_at__lt=now - API_SOURCE_USAGE_RESOLUTION))
        .update(last_used_at=now)
    )
    if updated:
        source.last_used_at = now
    return source


# --- automations -------------------------------------------------------------------------


def automation_activation_errors(*, automation: Automation) -> dict[str, str]:
    """What stops this automation from being active, by field; empty when nothing does."""
    errors: dict[str, str] = {}
    try:
        validate_rule(automation.conditions)
    except RuleError as err:
        errors["conditions"] = str(err)
    if automation.pinned_version_id is not None:
        version = automation.pinned_version
        if version is None or version.template_id != automation.template_id:
            errors["pinned_version"] = "The pinned version belongs to another template."
        elif not version.is_published:
            errors["pinned_version"] = "Only a published version can be pinned."
    elif (
        automation.template_id is not None
        and not TemplateVersion.objects.filter(
            template_id=automation.template_id, status=TemplateVersion.Status.PUBLISHED
        ).exists()
    ):
        errors["template"] = (
            f"Template {automation.template.name!r} has no published version; publish one or pin a version."
        )
    return errors


@transaction.atomic
def automation_set_active(*, automation: Automation, active: bool) -> Automation:
    """Switch an automation on or off. Switching on requires a valid rule and a template
    version to send (a published one, or a pinned one)."""
    current = (
        Automation.objects.select_for_update(of=("self",))
        .select_related("template", "pinned_version")
        .get(pk=automation.pk)
    )
    if active:
        errors = automation_activation_errors(automation=current)
        if errors:
            raise ValidationError(errors)
    now = timezone.now()
    if current.active != active:
        changes: dict[str, object] = {"active": active, "updated_at": now}
        if active:
            # The reputation guard judges it on what it sends from now on: the bounces or
            # complaints that paused it are still in its window (suppression/reputation.py).
            changes["resumed_at"] = automation.resumed_at = now
            # Whoever switches it back on has seen why it was paused; the admin stops
            # showing the reason.
            changes["paused_reason"] = automation.paused_reason = ""
            changes["paused_at"] = automation.paused_at = None
        Automation.objects.filter(pk=current.pk).update(**changes)
        automation.updated_at = now
    automation.active = active
    return automation
