"""The one mutation path for suppression state: suppression_add / suppression_remove, and
the recipient's own changes (unsubscribe links, the preference centre) built on them."""

from __future__ import annotations

import logging
from collections.abc import Collection
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from django.db import transaction
from django.db.models import QuerySet

from suppression import cache
from suppression.models import Suppression, SuppressionLogEntry
from suppression.topics import preference_topics

if TYPE_CHECKING:
    from campaigns.models import Contact

# Sources recorded on suppressions and log entries changed by recipients themselves.
SOURCE_UNSUBSCRIBE_LINK = "recipient:unsubscribe-link"
SOURCE_ONE_CLICK = "recipient:one-click"
SOURCE_PREFERENCES = "recipient:preferences"
OPT_IN_REASON = "recipient opted in via preference centre"

logger = logging.getLogger(__name__)


def normalize_email(email: str) -> str:
    return email.strip().lower()


@transaction.atomic
def suppression_add(
    *, email: str, reason: str, source: str, topic: str = "", detail: str = ""
) -> Suppression | None:
    """Suppress an address (idempotent: an existing entry keeps its reason, except that
    an unsubscribe is upgraded to any stronger reason).

    An erased address (GDPR Art. 17; suppression.privacy) is suppressed for good already,
    as a keyed hash only: a late complaint, bounce or unsubscribe for it stores nothing
    (a plain row would put the address back) and returns None.

    Why the upgrade: an unsubscribe lets transactional mail through and can be undone
    by the recipient in the preference centre; a complaint or a hard bounce after it
    (common: some mail clients unsubscribe when the user reports spam) must stop
    everything, for good.
    """
    # Imported here: suppression.privacy builds on this module.
    from suppression.privacy import is_hashed_suppressed

    email = normalize_email(email)
    if is_hashed_suppressed(email):
        logger.info("suppression of an erased address not stored: it is suppressed as a hash")
        return None
    suppression, created = Suppression.objects.get_or_create(
        email=email, topic=topic, defaults={"reason": reason, "source": source, "detail": detail}
    )
    upgraded = (
        not created
        and reason != Suppression.Reason.UNSUBSCRIBE
        and Suppression.objects.filter(pk=suppression.pk, reason=Suppression.Reason.UNSUBSCRIBE).update(
            reason=reason, source=source, detail=detail
        )
    )
    if upgraded:
        suppression.refresh_from_db()
    if created or upgraded:
        SuppressionLogEntry.objects.create(
            email=email, topic=topic, action=SuppressionLogEntry.Action.ADDED, reason=reason, source=source
        )
    # Mirrored even when it already existed: an earlier mirror write may have failed.
    transaction.on_commit(lambda: cache.mirror_record_added(email=email, topic=topic), robust=True)
    return suppression


@transaction.atomic
def suppression_remove(
    *, email: str, reason: str, source: str, topic: str = "", only_reason: str | None = None
) -> bool:
    """Lift a suppression. A reason is required; the caller checks the permission.

    `only_reason` lifts it only if it was suppressed for that reason, in the same
    statement: a recipient opting back in lifts their own unsubscribe, never a bounce or
    a complaint recorded for the same address and topic.
    """
    if not reason.strip():
        raise ValueError("Removing a suppression needs a reason.")
    email = normalize_email(email)
    rows = Suppression.objects.filter(email=email, topic=topic)
    if only_reason is not None:
        rows = rows.filter(reason=only_reason)
    deleted, _ = rows.delete()
    if deleted:
        SuppressionLogEntry.objects.create(
            email=email, topic=topic, action=SuppressionLogEntry.Action.REMOVED, reason=reason, source=source
        )
        transaction.on_commit(lambda: cache.mirror_record_removed(email=email, topic=topic), robust=True)
    return bool(deleted)


# --- the recipient's own changes --------------------------------------------------------


@transaction.atomic
def recipient_unsubscribe(
    *,
    email: str,
    topic: str,
    source: str,
    message_id: int | None = None,
    ip: str | None = None,
    user_agent: str = "",
) -> Suppression | None:
    """Unsubscribe an address from one topic, or from all marketing (topic "").

    Takes effect when this returns: the row is committed before the recipient sees the
    confirmation (Gmail and Yahoo ask that unsubscribes are honoured within two days;
    we do it at once). Transactional mail is not stopped by it (see send_decision).
    The withdrawal is written to the consent ledger in the same transaction
    (recipient_consent_withdraw), with `ip` and `user_agent` as evidence.
    """
    detail = f"via message {message_id}" if message_id is not None else ""
    suppression = suppression_add(
        email=email, topic=topic, reason=Suppression.Reason.UNSUBSCRIBE, source=source, detail=detail
    )
    recipient_consent_withdraw(
        email=email, topic=topic, source=source, message_id=message_id, ip=ip, user_agent=user_agent
    )
    return suppression


def recipient_consent_withdraw(
    *,
    email: str,
    topic: str,
    source: str,
    message_id: int | None = None,
    ip: str | None = None,
    user_agent: str = "",
) -> int:
    """Record in the consent ledger what an unsubscribe from `topic` withdraws (GDPR
    Art. 7(3)), for every contact with the address that is not erased: the purpose
    `topic`, or for topic "" (all marketing) every purpose granted at the time. Returns
    the number of rows recorded.

    Without this, the ledger would still say "granted" after an unsubscribe, and lifting
    the suppression later (an admin) would let mail through on the old grant. A purpose
    already withdrawn gets no new row (unchanged state writes nothing, as in identify());
    one with no history gets one, even where no consent is required: it is the truth,
    and it decides if a compliance switch is turned on later.
    """
    # Imported here: suppression.consent builds on suppression.privacy, which builds on
    # this module.
    from suppression.consent import consent_withdraw
    from suppression.models import ConsentRecord

    evidence: dict[str, object] = {"topic": topic} if topic else {"all_marketing": True}
    if message_id is not None:
        evidence["message_id"] = message_id
    ip = _evidence_ip(ip)
    recorded = 0
    contacts = _contacts_with_address(email)
    for contact in contacts:
        latest = _latest_consent(contact_id=contact.pk)
        if topic:
            already = topic in latest and latest[topic][0] == ConsentRecord.Action.WITHDRAWN
            purposes = [] if already else [topic]
        else:
            purposes = [p for p, (action, _) in latest.items() if action == ConsentRecord.Action.GRANTED]
        for purpose in purposes:
            consent_withdraw(
                contact=contact,
                purpose=purpose,
                source=source,
                ip=ip,
                user_agent=user_agent,
                evidence=evidence,
            )
            recorded += 1
    return recorded


def _contacts_with_address(email: str) -> QuerySet[Contact]:
    """The contacts (not erased) with this address, locked in id order, so that two
    requests at once (a mail client repeating its one-click POST) record one change, not
    two, and never deadlock. Matched case-insensitively: identify() keeps the address as
    the application gave it, links and suppressions carry it lower-cased (the index
    contact_email_iexact serves the lookup)."""
    from campaigns.models import Contact

    return (
        Contact.objects.select_for_update()
        .filter(email__iexact=normalize_email(email), erased_at__isnull=True)
        .order_by("pk")
    )


def _latest_consent(*, contact_id: int) -> dict[str, tuple[str, dict[str, object]]]:
    """purpose -> (action, evidence) of the row that decides it (as consent_state)."""
    from suppression.consent import DECISIVE_ACTIONS
    from suppression.models import ConsentRecord

    rows = (
        ConsentRecord.objects.filter(contact_id=contact_id, action__in=DECISIVE_ACTIONS)
        .order_by("purpose", "-occurred_at", "-id")
        .values_list("purpose", "action", "evidence")
    )
    latest: dict[str, tuple[str, dict[str, object]]] = {}
    for purpose, action, evidence in rows:
        latest.setdefault(purpose, (action, evidence if isinstance(evidence, dict) else {}))
    return latest


def _evidence_ip(ip: str | None) -> str | None:
    """The client's address if it is one: REMOTE_ADDR can be empty or a socket path
    under some servers, and a value the inet column refuses must not cost the recipient
    their unsubscribe."""
    import ipaddress

    try:
        return str(ipaddress.ip_address((ip or "").strip()))
    except ValueError:
        return None


@dataclass
class PreferenceChanges:
    opted_out: list[str] = field(default_factory=list)  # topic slugs; "" is all marketing
    opted_in: list[str] = field(default_factory=list)

    @property
    def changed(self) -> bool:
        return bool(self.opted_out or self.opted_in)


@transaction.atomic
def recipient_preferences_save(
    *,
    email: str,
    subscribed: Collection[str],
    leave_all: bool,
    shown: Collection[str] | None = None,
    source: str = SOURCE_PREFERENCES,
    ip: str | None = None,
    user_agent: str = "",
) -> PreferenceChanges:
    """Save the preference centre form: every topic it lists (preference_topics) that is
    not in `subscribed` is opted out of, every one in it opted back in to; `leave_all`
    adds or lifts the unsubscribe from all marketing. Topics that are not listed are
    never touched, nor (when `shown` is given) topics the form did not show, such as one
    published while the page was open. Opting in only ever lifts an unsubscribe, never a
    bounce, a complaint or a manual suppression. Each change is written to the consent
    ledger too, with `ip` and `user_agent` (recipient_consent_withdraw,
    _recipient_consent_opt_in)."""
    email = normalize_email(email)
    listed = preference_topics()
    labels = {topic.slug: topic.name for topic in listed}
    public = [topic.slug for topic in listed]
    if shown is not None:
        public = [slug for slug in public if slug in shown]
    existing = dict(
        Suppression.objects.filter(email=email, topic__in=["", *public]).values_list("topic", "reason")
    )
    wanted_out = {slug: slug not in subscribed for slug in public}
    wanted_out[""] = leave_all
    changes = PreferenceChanges()
    for topic, out in wanted_out.items():
        if out and topic not in existing:
            recipient_unsubscribe(email=email, topic=topic, source=source, ip=ip, user_agent=user_agent)
            changes.opted_out.append(topic)
            continue
        if out or existing.get(topic) != Suppression.Reason.UNSUBSCRIBE:
            continue
        lifted = suppression_remove(
            email=email,
            topic=topic,
            reason=OPT_IN_REASON,
            source=source,
            only_reason=Suppression.Reason.UNSUBSCRIBE,
        )
        if lifted:
            changes.opted_in.append(topic)
    if changes.opted_in:
        still_suppressed = set(existing) - set(changes.opted_in)
        _recipient_consent_opt_in(
            email=email,
            opted_in=changes.opted_in,
            ticked=[slug for slug in public if slug in subscribed and slug not in still_suppressed],
            labels=labels,
            source=source,
            ip=ip,
            user_agent=user_agent,
        )
    return changes


def _recipient_consent_opt_in(
    *,
    email: str,
    opted_in: list[str],
    ticked: list[str],
    labels: dict[str, str],
    source: str,
    ip: str | None,
    user_agent: str,
) -> int:
    """Record the grants a preference-centre opt-in gives, for every contact with the
    address that is not erased; returns the number of rows recorded. Without them, a
    contact GDPR covers would see "subscribed" and get nothing ("no consent recorded",
    or the withdrawal its unsubscribe recorded).

    - A topic the recipient ticked again (its unsubscribe lifted: `opted_in`) is granted,
      unless it is granted already (unchanged state writes nothing, as in identify()).
    - Lifting "leave all" ("" in `opted_in`) grants again the topics still ticked whose
      grant was withdrawn by an unsubscribe from all marketing, and only those: a box
      the recipient left as we ticked it is not consent (CJEU C-673/17, Planet49), and
      a withdrawal made any other way stands.

    Granted at once, also with double opt-in on (identify() would ask by email): the
    link to this page was mailed to the address and is signed for it, which is what the
    confirmation email would prove. No notice: the ledger's notice is optional and
    identify() records grants without one; the page's wording is a template, not a
    ConsentNotice, so the topic's label as shown goes into the evidence instead.
    """
    from suppression.consent import consent_grant
    from suppression.models import ConsentRecord

    ip = _evidence_ip(ip)
    direct = [topic for topic in opted_in if topic]
    restorable = [topic for topic in ticked if topic not in direct] if "" in opted_in else []
    recorded = 0
    contacts = _contacts_with_address(email)
    for contact in contacts:
        latest = _latest_consent(contact_id=contact.pk)
        grants: list[tuple[str, dict[str, object]]] = [
            (topic, {}) for topic in direct if latest.get(topic, ("",))[0] != ConsentRecord.Action.GRANTED
        ]
        for topic in restorable:
            action, evidence = latest.get(topic, ("", {}))
            if action == ConsentRecord.Action.WITHDRAWN and evidence.get("all_marketing") is True:
                grants.append((topic, {"after_all_marketing": True}))
        for topic, extra in grants:
            consent_grant(
                contact=contact,
                purpose=topic,
                source=source,
                ip=ip,
                user_agent=user_agent,
                evidence={"topic": topic, "label": labels.get(topic, topic), **extra},
            )
            recorded += 1
    return recorded
