"""Reads that decide who may get mail. Every send path asks `send_decision` and nothing else."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

from suppression import cache
from suppression.models import Suppression, Topic
from suppression.privacy import ERASED_ADDRESS_REASON, hashed_suppressed_among, is_hashed_suppressed
from suppression.services import normalize_email
from suppression.topics import preference_topics


@dataclass(frozen=True)
class SendDecision:
    allowed: bool
    reason: str = ""


ALLOWED = SendDecision(allowed=True)


def send_decision(
    *, email: str, purpose: str, transactional: bool = False, authoritative: bool = False
) -> SendDecision:
    """May we email this address, for this purpose, now?

    A global suppression (bounce, complaint, invalid, manual) stops everything. A topic
    suppression (an unsubscribe from one purpose) stops that purpose; an unsubscribe
    from all marketing (topic "") does not stop transactional mail.

    With SUPPRESSION_STORAGE "redis", an address the Redis mirror holds nothing for is
    answered without Postgres (see suppression/cache.py for why a miss can be trusted
    and what bounds its staleness). A "no" always comes from Postgres, with its reason.
    The mirror can only be stale in the "allowed" direction, so this answer is a filter,
    not the last word: delivery re-checks Postgres in the hand-off UPDATE. Pass
    `authoritative=True` to always read Postgres, e.g. to explain why that UPDATE refused
    a message.
    """
    email = normalize_email(email)
    topics = ["", purpose]
    if not authoritative:
        # MirrorUnavailable: not in use, unreachable, or not complete. Postgres decides.
        # The mirror holds erased addresses too, so a miss covers both checks below.
        with contextlib.suppress(cache.MirrorUnavailable):
            if not cache.mirror_lookup(email=email, topics=topics):
                return ALLOWED
    if is_hashed_suppressed(email):
        return _decide(erased=True, rows=[], purpose=purpose, transactional=transactional)
    rows = list(Suppression.objects.filter(email=email, topic__in=topics).values_list("topic", "reason"))
    return _decide(erased=False, rows=rows, purpose=purpose, transactional=transactional)


def _decide(*, erased: bool, rows: list[tuple[str, str]], purpose: str, transactional: bool) -> SendDecision:
    """The rules, given what Postgres holds for one address: its (topic, reason) rows."""
    if erased:
        # Erased contacts (GDPR Art. 17) survive only as a keyed hash; this stops
        # transactional mail too.
        return SendDecision(allowed=False, reason=ERASED_ADDRESS_REASON)
    for topic, reason in rows:
        if topic not in ("", purpose):
            continue
        if transactional and reason == Suppression.Reason.UNSUBSCRIBE:
            continue
        label = Suppression.Reason(reason).label
        return SendDecision(allowed=False, reason=f"suppressed: {label}" + (f" ({topic})" if topic else ""))
    return ALLOWED


@dataclass(frozen=True)
class DecisionRequest:
    email: str
    purpose: str
    transactional: bool = False


def send_decisions(requests: list[DecisionRequest]) -> dict[DecisionRequest, SendDecision]:
    """send_decision for many (address, purpose) pairs in two queries, for batch work.

    Same rules as send_decision; always reads Postgres (a batch costs two queries
    whatever its size, so the mirror would save nothing).
    """
    if not requests:
        return {}
    emails = {normalize_email(r.email) for r in requests}
    erased = hashed_suppressed_among(emails)
    found: dict[str, list[tuple[str, str]]] = {}
    topics = {""} | {r.purpose for r in requests}
    for email, topic, reason in Suppression.objects.filter(email__in=emails, topic__in=topics).values_list(
        "email", "topic", "reason"
    ):
        found.setdefault(email, []).append((topic, reason))
    decisions: dict[DecisionRequest, SendDecision] = {}
    for request in requests:
        email = normalize_email(request.email)
        decisions[request] = _decide(
            erased=email in erased,
            rows=found.get(email, []),
            purpose=request.purpose,
            transactional=request.transactional,
        )
    return decisions


# --- the preference centre ----------------------------------------------------------------


@dataclass(frozen=True)
class TopicChoice:
    slug: str
    name: str
    description: str
    subscribed: bool
    # Suppressed for another reason than the recipient's own unsubscribe (a complaint,
    # a manual entry): shown, but the recipient cannot opt back in from the page.
    locked: bool


@dataclass(frozen=True)
class RecipientPreferences:
    email: str
    topics: list[TopicChoice]
    left_all: bool  # unsubscribed from all marketing
    paused: bool  # a global suppression other than an unsubscribe: no mail at all for now


def recipient_preferences(*, email: str) -> RecipientPreferences:
    """What the preference centre shows for one address: every public topic and whether
    the address gets it."""
    email = normalize_email(email)
    reasons = dict(Suppression.objects.filter(email=email).values_list("topic", "reason"))
    unsubscribe = Suppression.Reason.UNSUBSCRIBE
    topics = [
        TopicChoice(
            slug=topic.slug,
            name=topic.name,
            description=topic.description,
            subscribed=topic.slug not in reasons,
            locked=reasons.get(topic.slug, unsubscribe) != unsubscribe,
        )
        for topic in preference_topics()
    ]
    global_reason = reasons.get("")
    return RecipientPreferences(
        email=email,
        topics=topics,
        left_all=global_reason == unsubscribe,
        paused=global_reason is not None and global_reason != unsubscribe,
    )


def recipient_unsubscribed(*, email: str, topic: str) -> bool:
    """Does the address get no mail for this topic ("" for all marketing) already?"""
    return Suppression.objects.filter(email=normalize_email(email), topic=topic).exists()


def topic_name(slug: str) -> str:
    """What recipients call a topic: its name, or the slug when it has no Topic row."""
    if not slug:
        return "all marketing email"
    topic = Topic.objects.filter(slug=slug).only("name").first()
    return topic.name if topic is not None else slug
