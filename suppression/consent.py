"""Consent: the services that write the ledger (grant, withdraw, request, confirm) and the
selectors that read it, including `consent_decision`, the compliance switches.

The compliance switches (settings.MAILAUTO), applied in this order:

1. An erased contact (GDPR Art. 17) gets nothing, transactional mail included.
2. CCPA: with CCPA on, a contact with do_not_sell gets no mail whose purpose is listed
   in CCPA_SHARING_PURPOSES, transactional or not. Cal. Civ. Code § 1798.120 gives a
   right to opt out of the *sale or sharing* of personal information (sharing = for
   cross-context behavioural advertising, § 1798.140); email the business sends about
   itself is neither, so ordinary marketing is not blocked. Mail that exists to pass
   data to third parties (sponsored sends, partner offers, ad audiences) is, and those
   purposes must be listed. With CCPA off, do_not_sell is recorded but not enforced.
3. Transactional mail needs no consent (GDPR Art. 6(1)(b), performance of a contract).
4. CONSENT_CHECK on: every non-transactional message needs a granted consent for its
   exact purpose, for every contact.
5. GDPR on (CONSENT_CHECK off): every non-transactional message to a contact whose
   region is in GDPR_REGIONS needs a granted consent for its purpose (GDPR Art. 6(1)(a)
   with the ePrivacy Directive, Art. 13(1): electronic direct marketing needs prior
   consent). A contact with no region is in scope only if "unknown" is listed: we do not
   presume EU residence. Set CONSENT_CHECK to require consent from everyone. (The
   ePrivacy "soft opt-in" for existing customers is not modelled: record it as a grant
   with source "soft-opt-in" if you rely on it.)

"Granted" means: the latest granted/withdrawn row for (contact, purpose) is a grant.
A pending double opt-in request does not count.
"""

from __future__ import annotations

from datetime import timedelta
from typing import TYPE_CHECKING, Any

from django.conf import settings
from django.core import signing
from django.db import transaction
from django.urls import reverse
from django.utils import timezone

from suppression.models.consent import AuditLogEntry, ConsentNotice, ConsentRecord
from suppression.privacy import email_hash
from suppression.residency import UNKNOWN_REGION, normalize_region, normalized_regions

if TYPE_CHECKING:
    from campaigns.models import Contact
    from suppression.selectors import SendDecision

CONSENT_REQUESTED_EVENT = "consent.requested"
CONSENT_REQUESTED_SCHEMA = {
    "fields": {
        "purpose": {"type": "string", "required": True},
        "confirm_url": {"type": "string", "required": True},
    }
}
# Double opt-in is switched on in the admin by activating this automation (installed,
# off, by migration suppression 0003; double_opt_in_automation() builds it again where
# it is missing). Its template is the confirmation email.
DOUBLE_OPT_IN_AUTOMATION = "Double opt-in confirmation"
DOUBLE_OPT_IN_SUBJECT = "Please confirm your subscription"
DOUBLE_OPT_IN_HTML = """<p>Hello{% if contact.first_name %} {{ contact.first_name }}{% endif %},</p>
<p>Please confirm that you want to receive email about {{ payload.purpose }}:</p>
<p><a href="{{ payload.confirm_url }}">Yes, subscribe me</a></p>
<p>If you did not ask for this, ignore this email and you will get nothing more from us.</p>"""
# A salt per use of the signing key: a token signed for anything else never verifies here.
CONFIRM_TOKEN_SALT = "suppression.consent.confirm"
CONSENT_REQUEST_MIN_INTERVAL = timedelta(minutes=10)
DECISIVE_ACTIONS = (ConsentRecord.Action.GRANTED, ConsentRecord.Action.WITHDRAWN)
MAX_USER_AGENT = 512


class ConsentError(ValueError):
    """A consent change that cannot be recorded (erased contact, bad purpose…)."""


class InvalidConsentToken(ConsentError):
    """A confirmation link that is tampered with, expired, or no longer applies."""


# --- services --------------------------------------------------------------------------


def _record(
    *,
    contact: Contact,
    purpose: str,
    action: str,
    source: str,
    notice: ConsentNotice | None,
    ip: str | None,
    user_agent: str | None,
    evidence: dict[str, Any] | None,
    actor: str,
) -> ConsentRecord:
    purpose = (purpose or "").strip()
    source = (source or "").strip()
    if not purpose or len(purpose) > 100:
        raise ConsentError("A consent purpose is 1 to 100 characters, e.g. 'marketing'.")
    if not source or len(source) > 100:
        raise ConsentError("A consent source is 1 to 100 characters, e.g. 'signup-form'.")
    if contact.erased_at is not None:
        raise ConsentError(f"Contact {contact.pk} was erased; its consent can no longer change.")
    record = ConsentRecord.objects.create(
        contact=contact,
        email_hash=email_hash(contact.email),
        purpose=purpose,
        action=action,
        source=source,
        notice=notice,
        ip_address=ip or None,
        user_agent=(user_agent or "")[:MAX_USER_AGENT],
        evidence=evidence or {},
    )
    if actor:
        # A person (staff, an operator) changed someone's consent: that is audited too.
        AuditLogEntry.objects.create(
            action=f"consent_{action}",
            contact_pk=contact.pk,
            email_hash=record.email_hash,
            actor=actor[:150],
            detail={"purpose": purpose, "source": source, "consent_record": record.pk},
        )
    return record


@transaction.atomic
def consent_grant(
    *,
    contact: Contact,
    purpose: str,
    source: str,
    notice: ConsentNotice | None = None,
    ip: str | None = None,
    user_agent: str | None = None,
    evidence: dict[str, Any] | None = None,
    actor: str = "",
) -> ConsentRecord:
    """Record that `contact` consented to mail for `purpose` (a new ledger row)."""
    return _record(
        contact=contact,
        purpose=purpose,
        action=ConsentRecord.Action.GRANTED,
        source=source,
        notice=notice,
        ip=ip,
        user_agent=user_agent,
        evidence=evidence,
        actor=actor,
    )


@transaction.atomic
def consent_withdraw(
    *,
    contact: Contact,
    purpose: str,
    source: str,
    notice: ConsentNotice | None = None,
    ip: str | None = None,
    user_agent: str | None = None,
    evidence: dict[str, Any] | None = None,
    actor: str = "",
) -> ConsentRecord:
    """Record a withdrawal (GDPR Art. 7(3)): a new row; the grant before it stays."""
    return _record(
        contact=contact,
        purpose=purpose,
        action=ConsentRecord.Action.WITHDRAWN,
        source=source,
        notice=notice,
        ip=ip,
        user_agent=user_agent,
        evidence=evidence,
        actor=actor,
    )


@transaction.atomic
def consent_request(
    *,
    contact: Contact,
    purpose: str,
    source: str,
    notice: ConsentNotice | None = None,
    ip: str | None = None,
    user_agent: str | None = None,
    evidence: dict[str, Any] | None = None,
    actor: str = "",
) -> ConsentRecord:
    """Start a double opt-in: record a "requested" row and emit `consent.requested` with
    a signed confirmation link, in this transaction (at most once per
    CONSENT_REQUEST_MIN_INTERVAL for the same contact and purpose). The email itself is sent by an
    automation on that event type (see the README, "Consent and privacy"), so
    confirmation mail takes the same path as every other message."""
    from campaigns import emit
    from campaigns.models import EventType

    # Subscription bombing: a form anyone can post must not turn into a stream of
    # confirmation emails to one inbox. One request per (contact, purpose) per interval;
    # a repeat within it returns the pending request and sends nothing.
    recent = (
        ConsentRecord.objects.filter(
            contact=contact,
            purpose=(purpose or "").strip(),
            action=ConsentRecord.Action.REQUESTED,
            occurred_at__gt=timezone.now() - CONSENT_REQUEST_MIN_INTERVAL,
        )
        .order_by("-occurred_at", "-id")
        .first()
    )
    if recent is not None:
        return recent
    record = _record(
        contact=contact,
        purpose=purpose,
        action=ConsentRecord.Action.REQUESTED,
        source=source,
        notice=notice,
        ip=ip,
        user_agent=user_agent,
        evidence=evidence,
        actor=actor,
    )
    # Installed by migration; created here too where it is missing (a database flushed
    # by tests). get_or_create runs its INSERT in a savepoint, so a concurrent first
    # request does not break ours.
    EventType.objects.get_or_create(
        name=CONSENT_REQUESTED_EVENT,
        defaults={
            "description": "A double opt-in confirmation is needed (suppression.consent.consent_request).",
            "schema": CONSENT_REQUESTED_SCHEMA,
        },
    )
    emit(
        CONSENT_REQUESTED_EVENT,
        contact.user_id,
        {"purpose": record.purpose, "confirm_url": consent_confirm_url(record=record)},
        event_id=f"consent-request-{record.pk}",
        source="consent",
    )
    return record


def consent_collect(
    *,
    contact: Contact,
    purpose: str,
    source: str,
    notice: ConsentNotice | None = None,
    ip: str | None = None,
    user_agent: str | None = None,
    evidence: dict[str, Any] | None = None,
) -> ConsentRecord:
    """The entry point for a sign-up form: with double opt-in on (double_opt_in_enabled),
    ask for confirmation by email (a "requested" row); off, record the grant at once."""
    service = consent_request if double_opt_in_enabled() else consent_grant
    return service(
        contact=contact,
        purpose=purpose,
        source=source,
        notice=notice,
        ip=ip,
        user_agent=user_agent,
        evidence=evidence,
    )


def double_opt_in_enabled() -> bool:
    """Whether an active automation sends the confirmation email: the admin's switch."""
    from campaigns.models import Automation

    return Automation.objects.filter(trigger__name=CONSENT_REQUESTED_EVENT, active=True).exists()


def double_opt_in_pending(*, contact: Contact, purpose: str) -> bool:
    """A request for (contact, purpose) whose link is still valid and that no grant or
    withdrawal has answered since."""
    max_age = timedelta(seconds=settings.MAILAUTO["CONSENT_CONFIRM_MAX_AGE_SECONDS"])
    latest = (
        ConsentRecord.objects.filter(contact=contact, purpose=(purpose or "").strip())
        .order_by("-occurred_at", "-id")
        .first()
    )
    return (
        latest is not None
        and latest.action == ConsentRecord.Action.REQUESTED
        and latest.occurred_at > timezone.now() - max_age
    )


def double_opt_in_automation(apps: Any = None) -> Any:
    """The double opt-in automation, created (off, transactional) with its event type and
    a published confirmation template where missing; an existing one is left as it is.
    `apps`: a migration's app registry (suppression 0003), else the current models."""
    if apps is None:
        from django.apps import apps
    event_type_model = apps.get_model("campaigns", "EventType")
    template_model = apps.get_model("campaigns", "EmailTemplate")
    version_model = apps.get_model("campaigns", "TemplateVersion")
    automation_model = apps.get_model("campaigns", "Automation")
    existing = automation_model.objects.filter(name=DOUBLE_OPT_IN_AUTOMATION).first()
    if existing is not None:
        return existing
    trigger, _ = event_type_model.objects.get_or_create(
        name=CONSENT_REQUESTED_EVENT,
        defaults={
            "description": "A double opt-in confirmation is needed (suppression.consent.consent_request).",
            "schema": CONSENT_REQUESTED_SCHEMA,
        },
    )
    template, created = template_model.objects.get_or_create(
        name=DOUBLE_OPT_IN_AUTOMATION,
        defaults={"description": "The email that asks a new subscriber to confirm (double opt-in)."},
    )
    if created or not version_model.objects.filter(template=template, status="published").exists():
        number = 1 + (version_model.objects.filter(template=template).count())
        version_model.objects.create(
            template=template,
            number=number,
            status="published",
            published_at=timezone.now(),
            subject=DOUBLE_OPT_IN_SUBJECT,
            html=DOUBLE_OPT_IN_HTML,
        )
    return automation_model.objects.create(
        name=DOUBLE_OPT_IN_AUTOMATION,
        trigger=trigger,
        template=template,
        purpose="consent",
        # A confirmation the recipient asked for: no topic opt-out applies to it.
        is_transactional=True,
        active=False,
    )


def consent_confirm_token(*, record: ConsentRecord) -> str:
    # Only the request's id is signed: contact and purpose are read from the row, so a
    # token can confirm exactly one request and nothing else.
    return signing.dumps({"r": record.pk}, salt=CONFIRM_TOKEN_SALT, compress=True)


def consent_confirm_url(*, record: ConsentRecord) -> str:
    token = consent_confirm_token(record=record)
    return settings.SITE_URL + reverse("consent:confirm", kwargs={"token": token})


def consent_request_for_token(*, token: str) -> ConsentRecord:
    """The pending request a confirmation link names. Reads only: the GET page uses it,
    and mail scanners that prefetch links must not confirm anything."""
    max_age = timedelta(seconds=settings.MAILAUTO["CONSENT_CONFIRM_MAX_AGE_SECONDS"])
    try:
        data = signing.loads(token, salt=CONFIRM_TOKEN_SALT, max_age=max_age)
    except signing.SignatureExpired:
        raise InvalidConsentToken("This confirmation link has expired. Please sign up again.") from None
    except signing.BadSignature:
        raise InvalidConsentToken("This confirmation link is not valid.") from None
    request_id = data.get("r") if isinstance(data, dict) else None
    record = (
        ConsentRecord.objects.filter(pk=request_id, action=ConsentRecord.Action.REQUESTED)
        .select_related("contact", "notice")
        .first()
        if isinstance(request_id, int)
        else None
    )
    if record is None or record.contact is None or record.contact.erased_at is not None:
        raise InvalidConsentToken("This confirmation link no longer applies.")
    return record


@transaction.atomic
def consent_confirm(*, token: str, ip: str | None, user_agent: str | None) -> ConsentRecord:
    """Confirm a double opt-in: record "granted" with source "double-opt-in", the IP and
    user agent of the click, and the request it answers. Idempotent per request."""
    request = consent_request_for_token(token=token)
    # Lock the request row so that two clicks at once record one grant.
    ConsentRecord.objects.select_for_update().filter(pk=request.pk).first()
    existing = ConsentRecord.objects.filter(
        action=ConsentRecord.Action.GRANTED, evidence__request_id=request.pk
    ).first()
    if existing is not None:
        return existing
    assert request.contact is not None  # checked by consent_request_for_token
    return consent_grant(
        contact=request.contact,
        purpose=request.purpose,
        source="double-opt-in",
        notice=request.notice,
        ip=ip,
        user_agent=user_agent,
        evidence={
            "request_id": request.pk,
            "requested_at": request.occurred_at.isoformat(),
            "request_source": request.source,
        },
    )


# --- selectors -------------------------------------------------------------------------


def consent_state(*, contact: Contact, purpose: str) -> ConsentRecord | None:
    """The row that decides consent for (contact, purpose): the latest grant or
    withdrawal, or None when neither was ever recorded."""
    return (
        ConsentRecord.objects.filter(contact=contact, purpose=purpose, action__in=DECISIVE_ACTIONS)
        .order_by("-occurred_at", "-id")
        .first()
    )


def gdpr_applies(*, contact: Contact) -> bool:
    return normalize_region(contact.region) in normalized_regions(settings.MAILAUTO["GDPR_REGIONS"])


def consent_decision(*, contact: Contact, purpose: str, transactional: bool) -> SendDecision:
    """May `contact` get mail for `purpose` as far as consent and the compliance switches
    go? (Suppression is send_decision's job; residency is residency_decision's.)"""
    from suppression.selectors import SendDecision

    options = settings.MAILAUTO
    if contact.erased_at is not None:
        return SendDecision(allowed=False, reason="contact erased (GDPR Art. 17)")
    if options["CCPA"] and contact.do_not_sell and purpose in options["CCPA_SHARING_PURPOSES"]:
        return SendDecision(
            allowed=False,
            reason=f"do-not-sell/share (CCPA): purpose {purpose!r} shares data with third parties",
        )
    if transactional:
        return SendDecision(allowed=True)
    if options["CONSENT_CHECK"]:
        required_by = ""
    elif options["GDPR"] and gdpr_applies(contact=contact):
        region = normalize_region(contact.region)
        required_by = " (GDPR: region unknown)" if region == UNKNOWN_REGION else f" (GDPR: region {region!r})"
    else:
        return SendDecision(allowed=True)

    state = consent_state(contact=contact, purpose=purpose)
    if state is not None and state.action == ConsentRecord.Action.GRANTED:
        return SendDecision(allowed=True)
    if state is not None:
        reason = f"consent for {purpose!r} withdrawn on {state.occurred_at:%Y-%m-%d}"
    elif ConsentRecord.objects.filter(
        contact=contact, purpose=purpose, action=ConsentRecord.Action.REQUESTED
    ).exists():
        reason = f"consent for {purpose!r} requested, not yet confirmed"
    else:
        reason = f"no consent recorded for {purpose!r}"
    return SendDecision(allowed=False, reason=reason + required_by)
