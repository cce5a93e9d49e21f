"""The delivery engine: claim due Messages, render them, hand them to the ESP with
Anymail, and record what happened. ESP errors are classified here, in one table.

A message moves QUEUED → CLAIMED (leased to a worker; nothing has left the building, so
an expired lease simply returns it to the queue) → SENDING (committed *before* the HTTP
request, so that a crash from here on is known to be ambiguous) → SENT, or back to
QUEUED with backoff, or FAILED, DEAD, SUPPRESSED, or UNKNOWN when we cannot know whether
the ESP took it. No ESP call ever happens inside a database transaction.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime, timedelta
from email.utils import parsedate_to_datetime

import requests
from anymail.exceptions import (
    AnymailAPIError,
    AnymailConfigurationError,
    AnymailError,
    AnymailInvalidAddress,
    AnymailRecipientsRefused,
    AnymailSerializationError,
    AnymailUnsupportedFeature,
)
from anymail.message import AnymailMessage
from django.conf import settings
from django.core.mail import get_connection
from django.db import connection as db_connection
from django.db import transaction
from django.db.models import Exists, F, OuterRef, Q, QuerySet
from django.db.models.expressions import RawSQL
from django.db.models.functions import Greatest, Lower
from django.utils import timezone

from campaigns import throttle
from campaigns.esp_batch import BatchItemResult, batch_sender_for
from campaigns.esp_idempotency import apply_idempotency_key
from campaigns.models import Automation, Broadcast, EventType, Message, TemplateVersion
from campaigns.rendering import RenderedEmail, build_context, render_email
from campaigns.schemas import sensitive_fields
from campaigns.warmup import warmup_admit, warmup_release, warmup_schedule_current
from mailauto.lib import metrics
from mailauto.lib.backoff import retry_delay
from mailauto.lib.nudge import nudge
from suppression.consent import consent_decision
from suppression.models import HashedSuppression, Suppression
from suppression.privacy import ERASED_DOMAIN, email_hashes
from suppression.residency import residency_decision
from suppression.selectors import send_decision
from suppression.services import suppression_add
from suppression.unsubscribe import message_headers, message_links

logger = logging.getLogger(__name__)

MAX_ERROR_HISTORY = 20


# --- the one table of ESP errors -------------------------------------------------------


class ErrorKind:
    RETRYABLE = "retryable"  # the ESP provably did not take the message: try again later
    PERMANENT = "permanent"  # it never will: do not retry
    AMBIGUOUS = "ambiguous"  # it may have: hold as UNKNOWN, never blindly resend


@dataclass(frozen=True)
class SendError:
    kind: str
    reason: str
    retry_after: float | None = None
    suppress_recipient: bool = False
    # The ESP said "slow down" (a 429, or a 5xx with Retry-After): feeds the shared
    # adaptive rate, and its Retry-After pauses every worker.
    rate_limited: bool = False


def classify_send_error(exc: BaseException) -> SendError:
    """Map an exception from AnymailMessage.send() to what we do about it.

    An HTTP answer decides first (its status code says what the ESP did); only without
    one do we look at the transport error that Anymail chains as __cause__ (see
    anymail/backends/base_requests.py, post_to_esp).
    """
    if isinstance(exc, AnymailRecipientsRefused):
        return SendError(
            ErrorKind.PERMANENT, "recipient refused by the ESP (invalid or inactive)", suppress_recipient=True
        )
    if isinstance(exc, AnymailInvalidAddress):
        return SendError(ErrorKind.PERMANENT, "invalid address", suppress_recipient=True)
    if isinstance(exc, AnymailSerializationError | AnymailUnsupportedFeature):
        return SendError(ErrorKind.PERMANENT, f"the ESP cannot send this message: {type(exc).__name__}")
    if isinstance(exc, AnymailConfigurationError):
        # A deployment mistake (missing API key): keep the message, retry with backoff,
        # and let it reach the dead letters if nobody fixes it; replay is safe.
        return SendError(ErrorKind.RETRYABLE, "ESP configuration error (check the ESP settings)")

    status = getattr(exc, "status_code", None)
    response = getattr(exc, "response", None)
    if status is None and response is not None:
        status = getattr(response, "status_code", None)
    if isinstance(exc, AnymailAPIError) and status is not None:
        if status == 429:
            return SendError(
                ErrorKind.RETRYABLE,
                "rate limited by the ESP (429)",
                _retry_after(response),
                rate_limited=True,
            )
        if status >= 500 or status in (401, 403, 408):
            # 5xx with a response: the ESP answered that it failed. 401/403: a bad key
            # is an operator's problem, not the recipient's; keep the message. A 5xx
            # with Retry-After (a 503 while the ESP sheds load) says "slow down" as
            # plainly as a 429: it feeds the shared rate and pauses every worker.
            retry_after = _retry_after(response)
            return SendError(
                ErrorKind.RETRYABLE,
                f"ESP answered {status}" + (" with Retry-After" if retry_after is not None else ""),
                retry_after,
                rate_limited=status >= 500 and retry_after is not None,
            )
        if status == 409:
            # Resend: this Idempotency-Key came with another payload, or its first request
            # is still in flight. The ESP has (or is taking) these messages: never resend
            # blindly; a webhook or the unknown-grace resend settles it.
            return SendError(
                ErrorKind.AMBIGUOUS, "the ESP already has a request with this idempotency key (409)"
            )
        return SendError(ErrorKind.PERMANENT, f"rejected by the ESP ({status})")

    # No HTTP answer at all: a transport failure. (AnymailRequestsAPIError is itself a
    # requests.HTTPError, so only look at it as a transport error once we know it
    # carries no response.)
    cause = exc.__cause__ if exc.__cause__ is not None else exc
    if isinstance(cause, requests.ConnectTimeout):
        return SendError(ErrorKind.RETRYABLE, "could not connect to the ESP (timeout)")
    if isinstance(cause, requests.ConnectionError) and _connection_never_made(cause):
        return SendError(ErrorKind.RETRYABLE, "could not connect to the ESP (refused or unreachable)")
    if isinstance(cause, requests.RequestException):
        # Read timeout, connection reset or closed after the request was written: the
        # ESP may have accepted the message. Resending could duplicate it.
        return SendError(
            ErrorKind.AMBIGUOUS, f"no answer from the ESP after sending ({type(cause).__name__})"
        )
    if isinstance(exc, AnymailError):
        # An Anymail error without a status: an unparseable answer to a request that
        # did reach the ESP.
        return SendError(ErrorKind.AMBIGUOUS, f"unexpected answer from the ESP ({type(exc).__name__})")
    return SendError(ErrorKind.AMBIGUOUS, f"unexpected error while sending ({type(exc).__name__})")


def _connection_never_made(err: requests.ConnectionError) -> bool:
    """True when the TCP connection was never established, so no byte reached the ESP."""
    import urllib3.exceptions

    seen: set[int] = set()
    node: BaseException | None = err
    while node is not None and id(node) not in seen:
        seen.add(id(node))
        if isinstance(node, urllib3.exceptions.NewConnectionError | ConnectionRefusedError):
            return True
        reason = getattr(node, "reason", None)
        if isinstance(reason, BaseException) and id(reason) not in seen:
            node = reason
            continue
        args = getattr(node, "args", ())
        inner = next((a for a in args if isinstance(a, BaseException)), None)
        node = inner if inner is not None else node.__cause__ or node.__context__
    return False


def _retry_after(response: object) -> float | None:
    headers = getattr(response, "headers", None)
    value = headers.get("Retry-After") if headers is not None else None
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        try:
            return max(0.0, (parsedate_to_datetime(value) - timezone.now()).total_seconds())
        except (TypeError, ValueError):
            return None


# --- claiming -------------------------------------------------------------------------


def _options() -> dict:
    return settings.MAILAUTO


def claimable_messages_q(now) -> Q:  # type: ignore[no-untyped-def]
    """Due queued messages, and claimed ones whose worker died before handing them to
    the ESP (CLAIMED is before the HTTP request, so retaking them is safe).

    Messages of a paused or deactivated automation, or of a broadcast that is paused or
    cancelled (not in Broadcast.MAY_SEND), wait until it is active again, whether queued
    or claimed by a worker that died: a pause (by a marketer, or by the reputation
    guard) stops its mail at once. A finished (sent) broadcast's replayed mail may go.
    """
    not_paused = Q(automation__isnull=True) | Q(automation__active=True)
    not_paused &= Q(broadcast__isnull=True) | Q(broadcast__status__in=Broadcast.MAY_SEND)
    return Q(not_paused) & (
        Q(status=Message.Status.QUEUED, send_after__lte=now)
        | Q(status=Message.Status.CLAIMED, locked_until__lt=now, claims__lt=_max_claims())
    )


def _max_claims() -> int:
    # A claim handed back unsent (a rate-limit or warm-up wait, a paused source) is not
    # counted (_requeue, _hand_off), so claims count hand-offs, retries and crashes; only
    # a message whose worker dies holding it (CLAIMED past its lease) this many times is
    # buried.
    return int(_options()["RETRY_MAX_ATTEMPTS"]) * 4


def messages_bury_poison() -> int:
    """Dead-letter messages whose worker died while holding them (before the hand-off,
    e.g. while rendering) too many times; otherwise they would kill workers forever."""
    return _end_abandoned(
        Message.objects.filter(
            status=Message.Status.CLAIMED, locked_until__lt=timezone.now(), claims__gte=_max_claims()
        ),
        status=Message.Status.DEAD,
        reason="its worker stopped while preparing it, every time",
    )


def _end_abandoned(queryset: QuerySet[Message], *, status: str, reason: str) -> int:
    """Give the messages of `queryset` (abandoned by a worker that stopped) `status` and
    `reason`, and say so in each one's error history, as _finish does for an ESP error.

    The history is JSON appended per row, so the rows are locked and written with one
    bulk UPDATE per thousand; a row another transaction holds (a webhook reconciling it,
    a worker recording its outcome) is skipped, and the next sweep sees it if it still
    qualifies.
    """
    ended = 0
    while True:
        now = timezone.now()
        with transaction.atomic():
            rows = list(
                queryset.select_for_update(skip_locked=True, of=("self",))
                .only("id", "attempts", "error_history")
                .order_by("id")[:1000]
            )
            for message in rows:
                entry = {
                    "at": now.isoformat(),
                    "attempt": message.attempts,
                    "status": status,
                    "error": reason,
                }
                message.error_history = [*message.error_history, entry][-MAX_ERROR_HISTORY:]
                message.status = status
                message.status_reason = reason[:255]
                message.locked_until = None
                message.updated_at = now
            Message.objects.bulk_update(
                rows, ["status", "status_reason", "locked_until", "updated_at", "error_history"]
            )
        ended += len(rows)
        if len(rows) < 1000:
            return ended


# Columns the send path never reads (it writes them with UPDATEs): not loading them
# (datetimes and JSON to parse, on three rows per message) is about a third of a
# claim's CPU. Reading one of them later costs a query per message:
# test_a_batch_is_sent_in_a_number_of_queries_that_does_not_grow_with_its_size.
_NOT_READ_WHILE_SENDING = (
    *("status_reason", "locked_until", "esp_message_id", "subject"),
    *("last_error", "created_at", "sent_at", "updated_at"),
    *("event__user_id", "event__status", "event__attempts", "event__available_at"),
    *("event__locked_until", "event__processed_at", "event__result", "event__last_error"),
    *("event__error_history", "contact__created_at", "contact__updated_at"),
)


def messages_claim(*, limit: int) -> list[Message]:
    now = timezone.now()
    lease = now + timedelta(seconds=_options()["SEND_LEASE_SECONDS"])
    with transaction.atomic():
        ids = list(
            Message.objects.filter(claimable_messages_q(now))
            .order_by("priority", "send_after", "id")
            .select_for_update(skip_locked=True, of=("self",))
            .values_list("id", flat=True)[:limit]
        )
        if not ids:
            return []
        Message.objects.filter(claimable_messages_q(now), id__in=ids).update(
            status=Message.Status.CLAIMED, locked_until=lease, updated_at=now, claims=F("claims") + 1
        )
        messages = list(
            Message.objects.filter(id__in=ids, status=Message.Status.CLAIMED, locked_until=lease)
            .select_related("contact", "event")
            .defer(*_NOT_READ_WHILE_SENDING)
            .order_by("id")
        )
    # A batch pins a handful of template versions and event types; load each once, not
    # once per row (a version's HTML is the bulk of a row's data, and an event type's
    # schema is JSON decoded for every row that joins it). Published versions never
    # change.
    versions = TemplateVersion.objects.in_bulk({m.template_version_id for m in messages})
    event_types = EventType.objects.in_bulk({m.event.event_type_id for m in messages if m.event is not None})
    for message in messages:
        message.template_version = versions[message.template_version_id]
        message.locked_until = lease  # deferred, and known: the rows were selected by it
        if message.event is not None:
            message.event.event_type = event_types[message.event.event_type_id]
    return messages


# --- sending ---------------------------------------------------------------------------


@dataclass
class SendBatchResult:
    claimed: int = 0
    sent: int = 0
    retrying: int = 0
    failed: int = 0
    unknown: int = 0
    suppressed: int = 0
    cancelled: int = 0  # refused by data residency at send time
    dead: int = 0
    deferred: int = 0  # over today's warm-up cap: waiting for tomorrow
    throttled: int = 0  # no rate-limit token in time: back in the queue
    requests: int = 0  # HTTP requests made to the ESP

    def count(self, outcome: str) -> None:
        setattr(self, outcome, getattr(self, outcome) + 1)


@dataclass
class _Outgoing:
    message: Message
    email: AnymailMessage
    subject: str


def messages_send_batch(*, limit: int | None = None) -> SendBatchResult:
    """Claim one batch of due messages and send it, within the warm-up cap and the
    shared rate limit.

    1. claim (leased, committed); 2. warm-up: take today's allowance, defer the rest to
    tomorrow, highest priority first; 3. render; 4. per mailbox provider, per ESP
    request (500 messages a request for Postmark, 1 for ESPs without a batch endpoint):
    take a rate-limit token, hand the chunk off (SENDING, committed), send, feed the
    outcome back to the adaptive limit, record. A chunk that cannot get a token in time
    goes back to the queue untouched. Nothing is sent inside a database transaction.
    """
    connection = get_connection()
    batch_sender = batch_sender_for(connection)
    messages = messages_claim(limit=limit or _options()["SEND_BATCH_SIZE"])
    result = SendBatchResult(claimed=len(messages))
    if not messages:
        return result

    schedule = warmup_schedule_current()
    admission = warmup_admit(schedule=schedule, messages=messages)
    if admission.deferred and admission.defer_until is not None:
        _requeue([m for m in admission.deferred], send_after=admission.defer_until, reason=admission.reason)
        result.deferred += len(admission.deferred)
    outgoing = _prepare(admission.admitted, connection, result)
    not_sent = len(admission.admitted) - len(outgoing)  # reserved warm-up sends to give back

    size = batch_sender.max_batch if batch_sender is not None else 1
    chunks = [
        (provider, group[start : start + size])
        for provider, group in throttle.group_by_provider(
            outgoing, email=lambda item: item.message.to_email
        ).items()
        for start in range(0, len(group), size)
    ]
    waiting: set[str] = set()  # providers whose own limit has no token for now
    connection.open()
    try:
        for index, (provider, chunk) in enumerate(chunks):
            if provider in waiting:
                continue  # requeued with the chunk that found its limit spent
            try:
                throttle.acquire_for_batch(
                    recipients=[item.message.to_email for item in chunk], timeout=_acquire_timeout()
                )
            except throttle.ThrottleError as exc:
                # A provider's own limit (e.g. Yahoo at 1/s) holds back only that
                # provider's mail: the other providers' chunks go on. The ESP's limit
                # holds back everything left.
                bucket = str(getattr(exc, "bucket", ""))
                only_this = "provider:" in bucket
                rest = [
                    item.message
                    for later_provider, later in chunks[index:]
                    if later_provider not in waiting and (later_provider == provider or not only_this)
                    for item in later
                ]
                wait = max(1.0, float(getattr(exc, "wait", 0) or 5.0))
                _requeue(
                    rest,
                    send_after=timezone.now() + timedelta(seconds=wait),
                    reason=f"waiting for the send rate limit ({exc})"[:255],
                )
                result.throttled += len(rest)
                not_sent += len(rest)
                if only_this:
                    waiting.add(provider)
                    continue
                break
            handed = _hand_off(chunk, result)
            not_sent += len(chunk) - len(handed)
            if not handed:
                continue
            result.requests += 1
            if batch_sender is not None:
                items = batch_sender.send([item.email for item in handed])
            else:
                items = [_send_one(item.email) for item in handed]
            not_sent += _feed_back(items)
            _record_results(handed, items, result)
    finally:
        connection.close()
        if schedule is not None and admission.day is not None and not_sent:
            warmup_release(schedule=schedule, count=not_sent, day=admission.day)
    _count(result)
    return result


def _acquire_timeout() -> float:
    # Long enough to ride out ordinary waits, short enough that a claimed batch goes
    # back to the queue well inside its lease.
    return float(min(30.0, _options()["SEND_LEASE_SECONDS"] / 10))


def _feed_back(items: list[BatchItemResult]) -> int:
    """Tell the adaptive rate limit how the request went; return how many messages
    provably did not reach the ESP (their warm-up allowance is given back)."""
    errors = [classify_send_error(item.error) for item in items if item.error is not None]
    limited = [e for e in errors if e.rate_limited]
    if limited:
        retry_after = max((e.retry_after or 0.0) for e in limited) or None
        reason = limited[0].reason + (f", Retry-After {retry_after:g}s" if retry_after else "")
        throttle.report_rate_limited(retry_after=retry_after, reason=reason)
    else:
        throttle.report_success()
    return sum(1 for e in errors if e.kind == ErrorKind.RETRYABLE)


def _requeue(messages: list[Message], *, send_after: datetime, reason: str) -> int:
    """Claimed messages that will not be sent in this batch go back to the queue as
    they were (nothing left the building: no attempt is counted)."""
    return Message.objects.filter(_still_ours(messages)).update(
        status=Message.Status.QUEUED,
        send_after=send_after,
        status_reason=reason[:255],
        locked_until=None,
        updated_at=timezone.now(),
        # Nor a claim: a message deferred day after day by warm-up, or again and again
        # by the rate limit, must not look like one that keeps killing its worker
        # (messages_bury_poison) at its first real crash.
        claims=_claim_given_back(),
    )


def _still_ours(messages: list[Message]) -> Q:
    """The rows of `messages` that this worker still holds: CLAIMED (or SENDING) under
    the lease it took (kept on each instance as locked_until). A worker that stalled past
    its lease may find a row claimed again by another worker, same status, another
    lease: that row is not its to send, requeue or finish."""
    by_lease: dict[tuple[str, datetime | None], list[int]] = {}
    for message in messages:
        by_lease.setdefault((message.status, message.locked_until), []).append(message.pk)
    q = Q(pk__in=[])
    for (status, lease), pks in by_lease.items():
        q |= Q(pk__in=pks, status=status, locked_until=lease)
    return q


def _claim_given_back() -> Greatest:
    return Greatest(F("claims") - 1, 0)


def _count(result: SendBatchResult) -> None:
    for outcome in ("sent", "retrying", "failed", "unknown", "suppressed", "cancelled", "dead"):
        metrics.incr("sends_total", getattr(result, outcome), outcome=outcome)
    metrics.incr("esp_requests_total", result.requests)


def _send_one(email: AnymailMessage) -> BatchItemResult:
    try:
        email.send()
    except Exception as exc:
        return BatchItemResult(error=exc)
    esp_id = email.anymail_status.message_id
    return BatchItemResult(esp_message_id=esp_id if isinstance(esp_id, str) else "")


def message_render(
    *,
    message: Message,
    links: dict[str, str] | None = None,
    sensitive_by_type: dict[int, set[str]] | None = None,
) -> RenderedEmail:
    """Render a message from the exact template version it pins.

    `sensitive_by_type` remembers each event type's sensitive fields across one claimed
    batch (whose messages share one EventType instance per type, see messages_claim)."""
    version = message.template_version
    event = message.event
    contact = message.contact
    if event is None:
        sensitive = sensitive_fields({})
    elif sensitive_by_type is None:
        sensitive = sensitive_fields(event.event_type.schema)
    elif event.event_type_id in sensitive_by_type:
        sensitive = sensitive_by_type[event.event_type_id]
    else:
        sensitive = sensitive_by_type[event.event_type_id] = sensitive_fields(event.event_type.schema)
    context = build_context(
        contact=contact.as_context() if contact is not None else {"email": message.to_email},
        event={
            "type": event.event_type.name,
            "occurred_at": event.occurred_at.isoformat(),
            "source": event.source,
        }
        if event is not None
        else {},
        payload=event.payload if event is not None else {},
        links=links or {},
        sensitive_fields=sensitive,
        declared_fields=set(version.declared_sensitive_fields or []),
    )
    return render_email(subject=version.subject, html=version.html, text=version.text, context=context)


def message_email(
    *, message: Message, rendered: RenderedEmail, links: dict[str, str], connection: object
) -> AnymailMessage:
    """The Anymail message for one Message: what the ESP receives."""
    email = AnymailMessage(
        subject=rendered.subject,
        body=rendered.text,
        from_email=settings.DEFAULT_FROM_EMAIL,
        to=[message.to_email],
        connection=connection,
        headers=message_headers(message=message, links=links),
        # Links webhooks back to the row even before we record the ESP's message id.
        metadata={"mailauto_message_id": str(message.pk)},
        tags=[message.purpose],
    )
    email.attach_alternative(rendered.html, "text/html")
    apply_idempotency_key(
        email,
        message_key=message.idempotency_key,
        esp_name=settings.ESP_NAME,
        after_unknown=message.resent_after_unknown,
    )
    return email


def _prepare(messages: list[Message], connection: object, result: SendBatchResult) -> list[_Outgoing]:
    """Render every claimed message; a message that cannot be rendered fails alone."""
    outgoing = []
    sensitive_by_type: dict[int, set[str]] = {}
    for message in messages:
        if message.contact is not None:
            # Data residency, again: the contact's region (or ALLOWED_REGIONS) may have
            # changed since the event was processed. No query: the contact is loaded.
            in_region, why = residency_decision(contact=message.contact)
            if not in_region:
                _finish(
                    message,
                    status=Message.Status.CANCELLED,
                    reason=f"refused by data residency: {why}",
                    from_status=Message.Status.CLAIMED,
                )
                result.count("cancelled")
                continue
            # Consent may have been withdrawn (or the contact erased) since the message
            # was created; only the compliance switches that are on cost a query.
            consent = consent_decision(
                contact=message.contact, purpose=message.purpose, transactional=message.transactional
            )
            if not consent.allowed:
                _finish(
                    message,
                    status=Message.Status.SUPPRESSED,
                    reason=consent.reason,
                    from_status=Message.Status.CLAIMED,
                )
                result.count("suppressed")
                continue
        links = message_links(message=message)
        try:
            rendered = message_render(message=message, links=links, sensitive_by_type=sensitive_by_type)
        except Exception as err:
            logger.exception(
                "rendering failed", extra={"message_id": message.pk, "outbox_event_id": message.event_id}
            )
            _finish(
                message,
                status=Message.Status.FAILED,
                reason="rendering failed",
                error=f"{type(err).__name__}: {err}",
                from_status=Message.Status.CLAIMED,
            )
            result.count("failed")
            continue
        email = message_email(message=message, rendered=rendered, links=links, connection=connection)
        outgoing.append(_Outgoing(message=message, email=email, subject=rendered.subject))
    return outgoing


def _hand_off(outgoing: list[_Outgoing], result: SendBatchResult) -> list[_Outgoing]:
    """Mark the batch SENDING in one committed statement, before any request leaves.

    The same statement refuses addresses suppressed by then ("suppression wins": a
    suppression committed before this UPDATE stops the send, with no check-then-act
    gap), erased ones included (only their keyed hash is left, in HashedSuppression:
    see _erased_addresses_q), and messages of a broadcast paused or cancelled by then
    (not in Broadcast.MAY_SEND) or of an automation deactivated by then (by a marketer,
    or by the reputation guard mid-batch): those go back to the queue as they were, to
    be sent on resume or cancelled by the sweeper. From here on, a crash leaves
    messages SENDING, which the sweeper turns into UNKNOWN rather than resending blindly.
    """
    if not outgoing:
        return []
    now = timezone.now()
    lease = now + timedelta(seconds=_options()["SEND_LEASE_SECONDS"])
    erased = _erased_addresses_q(outgoing)
    for transactional in (False, True):
        mine = [item.message for item in outgoing if item.message.transactional is transactional]
        if mine:
            # A fresh lease: a long batch (rate-limit waits, per-message ESPs) must not
            # see its in-flight messages expired into UNKNOWN by the sweeper.
            Message.objects.filter(_still_ours(mine)).filter(
                Q(broadcast_id__isnull=True)
                | Exists(Broadcast.objects.filter(pk=OuterRef("broadcast_id"), status__in=Broadcast.MAY_SEND))
            ).filter(
                Q(automation_id__isnull=True)
                | Exists(Automation.objects.filter(pk=OuterRef("automation_id"), active=True))
            ).exclude(Exists(_blocking_suppressions(transactional))).exclude(erased).update(
                status=Message.Status.SENDING, attempts=F("attempts") + 1, updated_at=now, locked_until=lease
            )
    handed = set(
        Message.objects.filter(
            pk__in=[item.message.pk for item in outgoing], status=Message.Status.SENDING, updated_at=now
        ).values_list("pk", flat=True)
    )
    kept = []
    give_back: list[Message] = []
    for item in outgoing:
        message = item.message
        if message.pk in handed:
            message.attempts += 1
            message.status = Message.Status.SENDING
            message.locked_until = lease
            kept.append(item)
            continue
        # Postgres refused the hand-off; ask Postgres (not a cache) why.
        decision = send_decision(
            email=message.to_email,
            purpose=message.purpose,
            transactional=message.transactional,
            authoritative=True,
        )
        if not decision.allowed:
            _finish(
                message,
                status=Message.Status.SUPPRESSED,
                reason=decision.reason,
                from_status=Message.Status.CLAIMED,
            )
            result.count("suppressed")
            continue
        # Its broadcast was paused or cancelled, or its automation deactivated, since the
        # claim, or our lease expired and another worker holds it now (not ours to send,
        # nor to touch).
        give_back.append(message)
    if give_back:
        # Still our claim (the lease we took): back to the queue untouched, like
        # _requeue but without a new send_after or reason; no attempt was made.
        Message.objects.filter(_still_ours(give_back)).update(
            status=Message.Status.QUEUED, locked_until=None, updated_at=now, claims=_claim_given_back()
        )
    return kept


def _record_results(chunk: list[_Outgoing], items: list[BatchItemResult], result: SendBatchResult) -> None:
    sent: list[tuple[int, str, str]] = []
    event_pks: dict[int, None] = {}  # an ordered set
    latencies: list[float] = []
    now = timezone.now()
    for item, outcome in zip(chunk, items, strict=True):
        if outcome.error is None:
            sent.append((item.message.pk, outcome.esp_message_id, item.subject))
            if item.message.event_id is not None:
                event_pks[item.message.event_id] = None
            if item.message.event is not None:
                latencies.append((now - item.message.event.created_at).total_seconds())
        else:
            result.count(_record_failure(item.message, classify_send_error(outcome.error), outcome.error))
    if sent:
        _record_sent(sent)
        result.sent += len(sent)
        metrics.observe_latencies("event_to_esp_seconds", latencies)
        # Outbox row ids, not the callers' event_id strings: an application may build
        # those from personal data ("signup-<address>"), which never goes in a log line.
        logger.info(
            "messages sent",
            extra={
                "count": len(sent),
                "message_ids": [row[0] for row in sent][:20],
                "outbox_event_ids": list(event_pks)[:20],
            },
        )


def _record_sent(rows: list[tuple[int, str, str]]) -> None:
    """Record the ESP's acceptance of many messages in one statement.

    A tracking webhook may already have advanced a message (the ESP can be faster than
    this UPDATE); the CASE never moves a status backwards, while the ESP id is always
    recorded. UPDATE … FROM a VALUES list works on Postgres and on SQLite ≥ 3.33.
    """
    now = timezone.now()
    table = Message._meta.db_table
    values = ", ".join(["(%s, %s, %s)"] * len(rows))
    # Only %s placeholders and our own table name are interpolated.
    sql = (
        f"WITH v(id, esp_id, subject) AS (VALUES {values}) "  # noqa: S608
        f"UPDATE {table} SET "
        f"status = CASE WHEN {table}.status IN (%s, %s) THEN %s ELSE {table}.status END, "
        f"esp_message_id = v.esp_id, subject = v.subject, sent_at = %s, updated_at = %s, "
        f"locked_until = NULL, last_error = '' "
        f"FROM v WHERE {table}.id = CAST(v.id AS BIGINT)"
    )
    flat: list[int | str] = [value for row in rows for value in row]
    params: list[int | str | datetime] = [
        *flat,
        Message.Status.SENDING,
        Message.Status.UNKNOWN,
        Message.Status.SENT,
        now,
        now,
    ]
    with db_connection.cursor() as cursor:
        cursor.execute(sql, params)


def _erased_addresses_q(outgoing: list[_Outgoing]) -> Q:
    """The messages of `outgoing` whose address was erased (GDPR Art. 17), as a condition
    of the hand-off UPDATE itself, so an erasure committed after the claim still wins.

    Erasure deletes the plain Suppression rows and keeps only a keyed HMAC of the address
    (suppression.privacy), which SQL cannot compute; so the statement is given each
    message's hashes (one per SECRET_KEY and fallback) as a VALUES list and matches them
    against HashedSuppression: part of the UPDATE, no extra query. The placeholder
    addresses erasure leaves behind are refused too (nothing is delivered there).
    """
    rows = [(item.message.pk, h) for item in outgoing for h in email_hashes(item.message.to_email)]
    values = ", ".join(["(%s, %s)"] * len(rows))
    # Only %s placeholders and a table name from the model's metadata are interpolated.
    sql = (
        f"WITH v(id, email_hash) AS (VALUES {values}) "  # noqa: S608
        f"SELECT CAST(v.id AS BIGINT) FROM v "
        f"WHERE v.email_hash IN (SELECT email_hash FROM {HashedSuppression._meta.db_table})"
    )
    params = [value for row in rows for value in row]
    return Q(pk__in=RawSQL(sql, params)) | Q(to_email__iendswith="@" + ERASED_DOMAIN)  # noqa: S611


def _blocking_suppressions(transactional: bool):  # type: ignore[no-untyped-def]
    blocking = Suppression.objects.filter(email=Lower(OuterRef("to_email"))).filter(
        Q(topic="") | Q(topic=OuterRef("purpose"))
    )
    if transactional:
        blocking = blocking.exclude(reason=Suppression.Reason.UNSUBSCRIBE)
    return blocking


def _record_failure(message: Message, error: SendError, exc: BaseException) -> str:
    detail = f"{error.reason}: {type(exc).__name__}: {str(exc)[:500]}"
    logger.warning(
        "send failed (%s)",
        error.kind,
        extra={"message_id": message.pk, "outbox_event_id": message.event_id, "reason": error.reason},
    )
    if error.kind == ErrorKind.AMBIGUOUS:
        _finish(
            message,
            status=Message.Status.UNKNOWN,
            reason=error.reason,
            error=detail,
            from_status=Message.Status.SENDING,
        )
        return "unknown"
    if error.kind == ErrorKind.PERMANENT:
        _finish(
            message,
            status=Message.Status.FAILED,
            reason=error.reason,
            error=detail,
            from_status=Message.Status.SENDING,
        )
        if error.suppress_recipient:
            suppression_add(
                email=message.to_email,
                reason=Suppression.Reason.INVALID,
                source=f"esp:{settings.ESP_NAME}",
                detail=error.reason,
            )
        return "failed"
    options = _options()
    # "Slow down" (a 429, or a 5xx with Retry-After) is not a refusal of this message:
    # waiting it out is not a failed attempt, or a day-long quota would bury every
    # message after RETRY_MAX_ATTEMPTS tries. The shared rate has been lowered and every
    # worker paused (_feed_back); the message waits at least Retry-After.
    counted = not error.rate_limited
    if counted and message.attempts >= options["RETRY_MAX_ATTEMPTS"]:
        _finish(
            message,
            status=Message.Status.DEAD,
            reason=f"retries exhausted: {error.reason}",
            error=detail,
            from_status=Message.Status.SENDING,
        )
        return "dead"
    delay = retry_delay(
        attempt=message.attempts if counted else 1,
        base=options["RETRY_BACKOFF_BASE_SECONDS"],
        cap=options["RETRY_BACKOFF_MAX_SECONDS"],
        retry_after=error.retry_after,
    )
    if not counted:
        message.attempts = max(0, message.attempts - 1)
    _finish(
        message,
        status=Message.Status.QUEUED,
        reason=f"will retry{'' if counted else ' (rate limited, not counted as an attempt)'}: {error.reason}",
        error=detail,
        from_status=Message.Status.SENDING,
        send_after=timezone.now() + timedelta(seconds=delay),
        attempts=None if counted else message.attempts,
    )
    return "retrying"


def _finish(
    message: Message,
    *,
    status: str,
    reason: str,
    error: str = "",
    from_status: str | None = None,
    send_after=None,  # type: ignore[no-untyped-def]
    attempts: int | None = None,
) -> None:
    now = timezone.now()
    fields: dict[str, object] = {
        "status": status,
        "status_reason": reason[:255],
        "locked_until": None,
        "updated_at": now,
    }
    if attempts is not None:
        fields["attempts"] = attempts
    if error:
        history = [
            *message.error_history,
            {"at": now.isoformat(), "attempt": message.attempts, "status": status, "error": error[:2000]},
        ]
        message.error_history = history[-MAX_ERROR_HISTORY:]
        fields["error_history"] = message.error_history
        fields["last_error"] = error[:2000]
    if send_after is not None:
        fields["send_after"] = send_after
    queryset = Message.objects.filter(pk=message.pk)
    if from_status is not None:
        # Only while this worker still holds it: the status it expects, under its lease.
        queryset = queryset.filter(status=from_status, locked_until=message.locked_until)
    queryset.update(**fields)


# --- housekeeping ------------------------------------------------------------------------


STILL_UNKNOWN = "still unknown after one resend"
LEASE_EXPIRED_WHILE_SENDING = "worker stopped while handing the message to the ESP"


def messages_expire_leases() -> int:
    """SENDING messages whose worker's lease ran out may or may not have reached the ESP:
    hold them as UNKNOWN until a webhook or the grace period decides."""
    return _end_abandoned(
        Message.objects.filter(status=Message.Status.SENDING, locked_until__lt=timezone.now()),
        status=Message.Status.UNKNOWN,
        reason=LEASE_EXPIRED_WHILE_SENDING,
    )


def messages_resend_unknown() -> int:
    """After the grace period with no webhook, an UNKNOWN message is queued once more.

    Only once: a message that was already resent after being unknown goes to the dead
    letters instead of looping.
    """
    now = timezone.now()
    cutoff = now - timedelta(seconds=_options()["UNKNOWN_RESEND_GRACE_SECONDS"])
    stale = Message.objects.filter(status=Message.Status.UNKNOWN, updated_at__lt=cutoff)
    dead = _end_abandoned(
        stale.filter(resent_after_unknown=True), status=Message.Status.DEAD, reason=STILL_UNKNOWN
    )
    requeued = stale.filter(resent_after_unknown=False).update(
        status=Message.Status.QUEUED,
        status_reason="resent after the grace period with no webhook",
        resent_after_unknown=True,
        send_after=now,
        updated_at=now,
    )
    return requeued + dead


@dataclass(frozen=True)
class ReplayResult:
    replayed: int
    # Dead or failed, but an earlier attempt may have reached the ESP (an ambiguous
    # outcome): refused, since the recipient may already have the message.
    refused_maybe_delivered: list[int]

    def summary(self) -> str:
        text = f"{self.replayed} message(s) queued for replay."
        if self.refused_maybe_delivered:
            ids = ", ".join(str(pk) for pk in self.refused_maybe_delivered[:20])
            more = "…" if len(self.refused_maybe_delivered) > 20 else ""
            text += (
                f" {len(self.refused_maybe_delivered)} not replayed: an earlier attempt may have"
                f" reached the ESP (outcome unknown), so a replay could send it twice: {ids}{more}."
            )
        return text


def _may_have_reached_esp(*, resent_after_unknown: bool, status_reason: str, error_history: list) -> bool:
    """Did an earlier attempt end ambiguously (the ESP may have taken the message)?

    What records it: `resent_after_unknown` (set when an UNKNOWN message is requeued for
    its one resend, and by an erasure of a SENDING/UNKNOWN one), the reasons the sweeper
    writes (STILL_UNKNOWN, LEASE_EXPIRED_WHILE_SENDING), and an error history entry with
    status "unknown" (_record_failure for an ambiguous error, messages_expire_leases).
    A webhook that later names the message moves it out of DEAD/FAILED (see
    webhooks.services.BEFORE_SENT), so a reconciled message is never a replay candidate.
    """
    if resent_after_unknown:
        return True
    if status_reason.startswith((STILL_UNKNOWN, LEASE_EXPIRED_WHILE_SENDING)):
        return True
    return any(
        isinstance(entry, dict) and entry.get("status") == Message.Status.UNKNOWN
        for entry in error_history or []
    )


@transaction.atomic
def messages_replay(*, message_ids: list[int]) -> ReplayResult:
    """Queue dead or failed messages again, and say which were refused. A message the
    ESP is known to have accepted (it has an ESP message id) is never replayed, nor one
    it may have accepted (_may_have_reached_esp): either would be a duplicate."""
    candidates = (
        Message.objects.filter(id__in=message_ids, status__in=[Message.Status.DEAD, Message.Status.FAILED])
        .filter(esp_message_id="")
        .exclude(contact__erased_at__isnull=False)
    )
    replayable: list[int] = []
    refused: list[int] = []
    for pk, resent, reason, history in candidates.values_list(
        "id", "resent_after_unknown", "status_reason", "error_history"
    ):
        ambiguous = _may_have_reached_esp(
            resent_after_unknown=resent, status_reason=reason, error_history=history
        )
        (refused if ambiguous else replayable).append(pk)
    # The same conditions again in the UPDATE: a webhook may have reconciled one since.
    # A fresh start: its attempts and its claims (a message buried because its worker
    # died holding it, once replayed, would otherwise be buried again at the next crash).
    replayed = candidates.filter(id__in=replayable).update(
        status=Message.Status.QUEUED,
        status_reason="replayed",
        attempts=0,
        claims=0,
        send_after=timezone.now(),
    )
    if refused:
        logger.warning("replay refused", extra={"message_ids": sorted(refused)[:20], "count": len(refused)})
    return ReplayResult(replayed=replayed, refused_maybe_delivered=sorted(refused))


def nudge_send_workers() -> None:
    """Ask a send worker to look for due messages once the current transaction commits."""

    def send_nudge() -> None:
        from campaigns.tasks import messages_send

        nudge(messages_send, kind="sends")

    transaction.on_commit(send_nudge)
