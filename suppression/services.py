"""The one mutation path for suppression state: suppression_add / suppression_remove, and
the recipient's own changes (unsubscribe links, the preference centre) built on them."""

from __future__ import annotations

import logging
from collections.abc import Collection
from dataclasses import dataclass, field

from django.db import transaction

from suppression import cache
from suppression.models import Suppression, SuppressionLogEntry
from suppression.topics import preference_topics

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


def recipient_unsubscribe(
    *, email: str, topic: str, source: str, message_id: int | None = None
) -> Suppression | None:
    """Unsubscribe an address from one topic, or from all marketing (topic "").

    Takes effect when this returns: the row is committed before the recipient sees the
    confirmation (Gmail and Yahoo ask that unsubscribes are honoured within two days;
    we do it at once). Transactional mail is not stopped by it (see send_decision).
    """
    detail = f"via message {message_id}" if message_id is not None else ""
    return suppression_add(
        email=email, topic=topic, reason=Suppression.Reason.UNSUBSCRIBE, source=source, detail=detail
    )


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
) -> PreferenceChanges:
    """Save the preference centre form: every topic it lists (preference_topics) that is
    not in `subscribed` is opted out of, every one in it opted back in to; `leave_all`
    adds or lifts the unsubscribe from all marketing. Topics that are not listed are
    never touched, nor (when `shown` is given) topics the form did not show, such as one
    published while the page was open. Opting in only ever lifts an unsubscribe, never a
    bounce, a complaint or a manual suppression."""
    email = normalize_email(email)
    public = [topic.slug for topic in preference_topics()]
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
            recipient_unsubscribe(email=email, topic=topic, source=source)
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
    return changes
