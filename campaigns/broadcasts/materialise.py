"""Materialisation: turning a sending broadcast's audience into Message rows that the
delivery engine sends like any other.

It walks the contacts in id order, BATCH_SIZE per transaction, with the cursor (the last
contact id considered) committed in the same transaction as the batch's messages. A
worker killed mid-batch rolls back both, so the next sweep redoes exactly that batch; the
idempotency key f"broadcast:{id}:{contact_id}" and the one-message-per-address index
(INSERT … ON CONFLICT DO NOTHING) make even a redone batch harmless. One worker
materialises a broadcast at a time: it holds the broadcast's row lock for the batch and
others skip it (SKIP LOCKED).

The audience is the contacts that existed when sending started (ids up to
contact_id_limit), matched by the rule as they are when their batch is materialised.
Erased contacts and contacts without an address are never in it; a contact whose region
may not be processed (ALLOWED_REGIONS), or whose address already has this broadcast
(two contacts, one mailbox), gets no message. Suppression is recorded at once for
addresses already suppressed, and decided again at send time by the delivery engine,
with consent, as for every message.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from django.db import transaction
from django.utils import timezone

from campaigns.broadcasts.selectors import audience_candidates, audience_matches, broadcast_new_recipients
from campaigns.broadcasts.services import broadcast_pause_if_sending
from campaigns.models import Broadcast, Message
from campaigns.rules import RuleError
from suppression.selectors import DecisionRequest, send_decisions

BATCH_SIZE = 1000  # contacts per materialisation transaction
# Broadcast mail goes after automations' (100) and transactional mail (10) when the
# send queue is long or a warm-up cap bites: a welcome email must not wait behind a
# million-recipient newsletter.
BROADCAST_PRIORITY = 200


@dataclass
class MaterialiseBatch:
    considered: int = 0  # contacts read (not erased, with an address)
    matched: int = 0  # of which in the audience
    created: int = 0  # messages created
    done: bool = False  # the audience is exhausted


def broadcast_materialise_batch(*, broadcast_id: int, size: int = BATCH_SIZE) -> MaterialiseBatch | None:
    """Turn the next `size` contacts of a sending broadcast into messages, in one
    transaction. None when the broadcast is not sending, already materialised, or being
    materialised by another worker right now."""
    now = timezone.now()
    with transaction.atomic():
        broadcast = (
            Broadcast.objects.select_for_update(skip_locked=True, of=("self",))
            .select_related("template_version")
            .filter(pk=broadcast_id, status=Broadcast.Status.SENDING, audience_done_at__isnull=True)
            .first()
        )
        if broadcast is None:
            return None
        contacts = list(
            audience_candidates()
            .filter(id__gt=broadcast.cursor, id__lte=broadcast.contact_id_limit or 0)
            .order_by("id")
            .only("id", "user_id", "email", "attributes", "region")[:size]
        )
        batch = MaterialiseBatch(considered=len(contacts), done=len(contacts) < size)
        try:
            matched = [c for c in contacts if audience_matches(broadcast.audience, c)]
        except RuleError as err:  # only if the stored rule was corrupted after the start
            broadcast_pause_if_sending(
                broadcast_id=broadcast.pk, reason=f"invalid audience rule: {err}", by="materialiser", now=now
            )
            return None
        batch.matched = len(matched)
        recipients = broadcast_new_recipients(broadcast=broadcast, matched=matched)
        if recipients:
            decisions = send_decisions(
                [DecisionRequest(email=c.email, purpose=broadcast.purpose) for c in recipients]
            )
            messages = []
            for contact in recipients:
                decision = decisions[DecisionRequest(email=contact.email, purpose=broadcast.purpose)]
                messages.append(
                    Message(
                        idempotency_key=f"broadcast:{broadcast.pk}:{contact.pk}",
                        broadcast=broadcast,
                        contact=contact,
                        to_email=contact.email,
                        template_version=broadcast.template_version,
                        purpose=broadcast.purpose,
                        transactional=False,
                        priority=BROADCAST_PRIORITY,
                        status=Message.Status.QUEUED if decision.allowed else Message.Status.SUPPRESSED,
                        status_reason=decision.reason,
                        send_after=now,
                    )
                )
            # ON CONFLICT DO NOTHING on both unique keys: the idempotency key (one message
            # per broadcast and contact, even if this range is ever materialised again)
            # and message_broadcast_address (one per broadcast and mailbox). The row lock
            # means no other worker inserts for this broadcast meanwhile.
            Message.objects.bulk_create(messages, ignore_conflicts=True, batch_size=BATCH_SIZE)
            batch.created = len(messages)
            if any(m.status == Message.Status.QUEUED for m in messages):
                from campaigns.delivery import nudge_send_workers

                nudge_send_workers()
        fields: dict[str, Any] = {
            "cursor": contacts[-1].pk if contacts else broadcast.contact_id_limit or 0,
            "audience_size": broadcast.audience_size + batch.matched,
            "recipients": broadcast.recipients + batch.created,
            "updated_at": now,
        }
        if batch.done:
            fields["audience_done_at"] = now
        Broadcast.objects.filter(pk=broadcast.pk).update(**fields)
    return batch
