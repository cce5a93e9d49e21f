"""Events in: emit(), emit_many() and identify(), the API application code calls.

emit() is one INSERT into the outbox, inside the caller's transaction, so an event
exists exactly when the caller's own writes do. Workers are nudged after commit; if the
broker is down the nudge is lost, not the event: the beat sweeper finds it.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from django.core.exceptions import ValidationError
from django.core.validators import validate_email
from django.db import DEFAULT_DB_ALIAS, connections, transaction
from django.utils import timezone
from django.utils.dateparse import parse_datetime

from campaigns.exceptions import InvalidContact, InvalidEvent, InvalidInput
from campaigns.models import Contact, EventType, OutboxEvent
from campaigns.schemas import PayloadError, check_payload, validate_schema_definition
from mailauto.lib.nudge import nudge_soon
from mailauto.lib.prepared import prepared_cursor

logger = logging.getLogger(__name__)

MAX_ID_LENGTH = 255


@dataclass(frozen=True)
class EventSpec:
    """One event for emit_many(); the same fields emit() takes."""

    event_type: str
    user_id: str
    payload: Mapping[str, Any]
    event_id: str | None = None
    occurred_at: datetime | str | None = None
    source: str | None = None


def emit(
    event_type: str,
    user_id: str | int,
    payload: Mapping[str, Any] | None = None,
    *,
    event_id: str | uuid.UUID | None = None,
    occurred_at: datetime | str | None = None,
    source: str | None = None,
) -> str:
    """Record that something happened to a user; return the event id.

    Raises InvalidEvent (and writes nothing) for an unknown event type or a payload that
    does not fit the type's schema. Emitting an event_id that already exists is a no-op
    that returns the same id: retries from the caller are safe.
    """
    event = _build_event(
        event_type=event_type,
        user_id=user_id,
        payload=payload if payload is not None else {},
        event_id=event_id,
        occurred_at=occurred_at,
        source=source,
        event_types={},
        index=None,
    )
    _insert_events([event])
    _nudge_after_commit()
    return event["event_id"]


def emit_many(events: Iterable[EventSpec | Mapping[str, Any]], *, source: str | None = None) -> list[str]:
    """Emit a batch in one statement; all or nothing. Returns the event ids in order.

    Each item is an EventSpec or a mapping with the keys emit() takes. If any event is
    invalid, InvalidEvent is raised naming it by index ("events[3].payload.plan") and
    nothing is written.
    """
    event_types: dict[str, EventType] = {}
    rows: list[dict[str, Any]] = []
    errors: dict[str, str] = {}
    for index, item in enumerate(events):
        spec = item if isinstance(item, EventSpec) else _spec_from_mapping(item, index)
        try:
            rows.append(
                _build_event(
                    event_type=spec.event_type,
                    user_id=spec.user_id,
                    payload=spec.payload,
                    event_id=spec.event_id,
                    occurred_at=spec.occurred_at,
                    source=spec.source if spec.source is not None else source,
                    event_types=event_types,
                    index=index,
                )
            )
        except InvalidEvent as err:
            errors.update(err.errors)
    if errors:
        raise InvalidEvent(_summarise(errors), errors=errors)
    if rows:
        _insert_events(rows)
        _nudge_after_commit()
    return [row["event_id"] for row in rows]


def identify(
    user_id: str | int,
    *,
    email: str,
    attributes: Mapping[str, Any] | None = None,
    replace_attributes: bool = False,
    region: str | None = None,
    do_not_sell: bool | None = None,
    consent: Mapping[str, bool] | None = None,
    consent_source: str = "identify",
) -> Contact:
    """Create or update the contact that events for `user_id` refer to.

    Attributes are merged into the existing ones (a key set to None is removed) unless
    replace_attributes is true. `region` (data residency, GDPR) and `do_not_sell` (CCPA)
    are set when given. `consent` maps purposes to granted (True) or withdrawn (False);
    a change is appended to the consent ledger with `consent_source` (an unchanged state
    writes nothing; with double opt-in on, a grant is recorded as a request that the
    recipient confirms by email, asked once while its link is valid). Raises InvalidContact for a bad email, attributes or consent.
    """
    user_id = _clean_user_id(user_id, InvalidContact)
    email = (email or "").strip()
    try:
        validate_email(email)
    except ValidationError:
        raise InvalidContact(
            f"{email!r} is not a valid email address", errors={"email": "invalid email address"}
        ) from None
    attrs = _clean_json_object(attributes or {}, "attributes", InvalidContact)
    if region is not None and (not isinstance(region, str) or len(region.strip()) > 32):
        raise InvalidContact("region must be a string of at most 32 characters", errors={"region": "invalid"})
    if consent is not None and (
        not isinstance(consent, Mapping)
        or not all(isinstance(k, str) and k and isinstance(v, bool) for k, v in consent.items())
    ):
        message = "consent must map purposes to true (granted) or false (withdrawn)"
        raise InvalidContact(message, errors={"consent": message})

    with transaction.atomic():
        contact, created = Contact.objects.select_for_update().get_or_create(
            user_id=user_id,
            defaults={"email": email, "attributes": {k: v for k, v in attrs.items() if v is not None}},
        )
        if not created:
            merged = {} if replace_attributes else dict(contact.attributes)
            for key, value in attrs.items():
                if value is None:
                    merged.pop(key, None)
                else:
                    merged[key] = value
            contact.email = email
            contact.attributes = merged
            contact.updated_at = timezone.now()
            contact.save(update_fields=["email", "attributes", "updated_at"])
        changed = []
        if region is not None and contact.region != region.strip().lower():
            contact.region = region.strip().lower()
            changed.append("region")
        if do_not_sell is not None and contact.do_not_sell != do_not_sell:
            contact.do_not_sell = do_not_sell
            changed.append("do_not_sell")
        if changed:
            contact.save(update_fields=changed)
        if consent:
            _record_consent(contact, consent, source=consent_source)
    return contact


def _record_consent(contact: Contact, consent: Mapping[str, bool], *, source: str) -> None:
    from suppression.consent import (
        consent_grant,
        consent_request,
        consent_state,
        consent_withdraw,
        double_opt_in_enabled,
        double_opt_in_pending,
    )
    from suppression.models import ConsentRecord

    for purpose, granted in consent.items():
        current = consent_state(contact=contact, purpose=purpose)
        is_granted = current is not None and current.action == ConsentRecord.Action.GRANTED
        if current is not None and is_granted == granted:
            continue
        if not granted:
            if current is not None:
                consent_withdraw(contact=contact, purpose=purpose, source=source)
        elif not double_opt_in_enabled():
            consent_grant(contact=contact, purpose=purpose, source=source)
        elif not double_opt_in_pending(contact=contact, purpose=purpose):
            # Double opt-in: a grant becomes a request the recipient confirms by email;
            # an application that calls identify() on every login asks once, not each time.
            consent_request(contact=contact, purpose=purpose, source=source)


# --- building and validating one event ------------------------------------------------


def _build_event(
    *,
    event_type: str,
    user_id: str | int,
    payload: Mapping[str, Any],
    event_id: str | uuid.UUID | None,
    occurred_at: datetime | str | None,
    source: str | None,
    event_types: dict[str, EventType],
    index: int | None,
) -> dict[str, Any]:
    """The outbox row for one event, as {attname: value} for the columns emit() sets
    (_insert_events fills in the rest from the model's defaults); InvalidEvent naming
    every problem otherwise."""
    prefix = "" if index is None else f"events[{index}]."
    errors: dict[str, str] = {}

    type_row = _event_type(event_type, event_types)
    if type_row is None:
        errors[f"{prefix}event_type"] = f"unknown event type {event_type!r} (register it in the admin)"
    elif not type_row.active:
        errors[f"{prefix}event_type"] = f"event type {event_type!r} is inactive"

    try:
        user_id = _clean_user_id(user_id, InvalidEvent)
    except InvalidEvent as err:
        errors[f"{prefix}user_id"] = err.errors["user_id"]

    if event_id is None:
        event_id = uuid.uuid4().hex
    else:
        event_id = str(event_id).strip()
        if not event_id or len(event_id) > MAX_ID_LENGTH:
            errors[f"{prefix}event_id"] = f"must be a non-empty string of at most {MAX_ID_LENGTH} characters"

    when = _clean_occurred_at(occurred_at)
    if when is None:
        errors[f"{prefix}occurred_at"] = (
            "must be a timezone-aware datetime or an ISO 8601 string with an offset"
        )

    if source is not None and len(str(source)) > 100:
        errors[f"{prefix}source"] = "must be at most 100 characters"

    if type_row is not None:
        try:
            check_payload(type_row.schema, payload)  # the schema itself: _event_type
        except PayloadError as err:
            for path, message in err.errors.items():
                errors[f"{prefix}payload.{path}" if path else f"{prefix}payload"] = message

    if errors:
        raise InvalidEvent(_summarise(errors), errors=errors)
    assert type_row is not None and when is not None
    return {
        "event_id": str(event_id),
        "event_type_id": type_row.pk,
        "user_id": str(user_id),
        "payload": dict(payload),
        "source": str(source or ""),
        "occurred_at": when,
        "available_at": timezone.now(),
    }


# Event types (and their schemas) are read on every emit, and change rarely: each
# process keeps them for EVENT_TYPE_TTL_SECONDS. A change made in this process clears the
# entry at once (forget_event_type, on save/delete); another process sees it within the
# TTL. This halves the work of one emit() (measured with bench/pipeline.py --emit). The
# schema definition is validated when a row is read, not for every event: a schema
# that fails raises SchemaError (a configuration bug) and is not kept.
EVENT_TYPE_TTL_SECONDS = 5.0
_event_types: dict[str, tuple[float, EventType]] = {}


def forget_event_type(name: str | None = None) -> None:
    """Drop cached event types (all of them without a name)."""
    if name is None:
        _event_types.clear()
    else:
        _event_types.pop(name, None)


def _event_type(name: str, cache: dict[str, EventType]) -> EventType | None:
    if not isinstance(name, str):
        return None
    if name not in cache:
        hit = _event_types.get(name)
        if hit is not None and time.monotonic() - hit[0] < EVENT_TYPE_TTL_SECONDS:
            cache[name] = hit[1]
        else:
            row = EventType.objects.filter(name=name).first()
            if row is None:
                return None
            validate_schema_definition(row.schema)
            _event_types[name] = (time.monotonic(), row)
            cache[name] = row
    return cache[name]


def _clean_user_id(user_id: object, error: type[InvalidInput]) -> str:
    if isinstance(user_id, bool) or not isinstance(user_id, str | int):
        raise error(
            "user_id must be a string or an integer", errors={"user_id": "must be a string or an integer"}
        )
    value = str(user_id).strip()
    if not value or len(value) > MAX_ID_LENGTH:
        message = f"must be a non-empty string of at most {MAX_ID_LENGTH} characters"
        raise error(f"user_id {message}", errors={"user_id": message})
    return value


def _clean_occurred_at(value: datetime | str | None) -> datetime | None:
    if value is None:
        return timezone.now()
    if isinstance(value, str):
        try:
            value = parse_datetime(value)
        except ValueError:
            return None
    if not isinstance(value, datetime) or timezone.is_naive(value):
        return None
    return value


def _clean_json_object(value: object, name: str, error: type[InvalidInput]) -> dict[str, Any]:
    if not isinstance(value, Mapping):
        raise error(f"{name} must be a JSON object", errors={name: "must be a JSON object"})
    try:
        return json.loads(json.dumps(dict(value), allow_nan=False))
    except (TypeError, ValueError) as err:
        raise error(
            f"{name} must be JSON-serialisable: {err}", errors={name: f"not JSON-serialisable: {err}"}
        ) from None


def _spec_from_mapping(item: Mapping[str, Any], index: int) -> EventSpec:
    if not isinstance(item, Mapping):
        raise InvalidEvent(
            f"events[{index}] must be an object", errors={f"events[{index}]": "must be an object"}
        )
    unknown = set(item) - {"event_type", "user_id", "payload", "event_id", "occurred_at", "source"}
    if unknown:
        names = ", ".join(sorted(unknown))
        raise InvalidEvent(
            f"events[{index}]: unknown keys {names}", errors={f"events[{index}]": f"unknown keys: {names}"}
        )
    # Types are not checked here: _build_event validates every field and names it.
    return EventSpec(
        event_type=item.get("event_type"),  # type: ignore[arg-type]
        user_id=item.get("user_id"),  # type: ignore[arg-type]
        payload=item.get("payload", {}),
        event_id=item.get("event_id"),
        occurred_at=item.get("occurred_at"),
        source=item.get("source"),
    )


def _summarise(errors: dict[str, str]) -> str:
    return "invalid event: " + "; ".join(f"{path}: {message}" for path, message in errors.items())


# --- writing -------------------------------------------------------------------------

INSERT_BATCH = 1000


def _insert_events(rows: list[dict[str, Any]], using: str = DEFAULT_DB_ALIAS) -> None:
    """INSERT … ON CONFLICT DO NOTHING, in the caller's transaction.

    A plain INSERT that hit the unique event_id would raise IntegrityError and, on
    Postgres, abort the *caller's* transaction; a duplicate event id must not do that.
    This writes what bulk_create(ignore_conflicts=True) writes, without the ORM's
    per-call query compilation or a model instance per event, which cost more client
    CPU than the INSERT's own round trip (emit()'s client CPU, measured in one process
    with time.process_time over 2,000 transactions, went from ~1.0 to ~0.6 ms;
    bench/pipeline.py's emit section compares it with an ORM create and pgbench).
    Columns a row does not set take the model field's default, as OutboxEvent() would.
    """
    connection = connections[using]
    statement = _insert_statement(connection)
    batch = max(
        1, min(INSERT_BATCH, connection.ops.bulk_batch_size([c.field for c in statement.columns], rows))
    )
    # Several INSERTs are all or nothing even for a caller in autocommit (emit_many's
    # promise); inside the caller's transaction this adds nothing (no savepoint).
    with transaction.atomic(using=using, savepoint=False), prepared_cursor(connection) as cursor:
        for start in range(0, len(rows), batch):
            chunk = rows[start : start + batch]
            params: list[Any] = []
            for row in chunk:
                for column in statement.columns:
                    value = row[column.attname] if column.attname in row else column.field.get_default()
                    if column.adapt == _AS_IS or (column.adapt == _AWARE_AS_IS and _is_aware(value)):
                        params.append(value)
                    else:
                        params.append(column.field.get_db_prep_save(value, connection))
            values = ", ".join([statement.row] * len(chunk))
            cursor.execute(f"{statement.head} VALUES {values} ON CONFLICT DO NOTHING", params)


def _is_aware(value: Any) -> bool:
    return type(value) is datetime and value.tzinfo is not None


# How a column's value reaches the driver: as it is, through the field's
# get_db_prep_save(), or as it is when it is an aware datetime. Text, integer and
# boolean columns go to every backend as they are. JSON always needs the backend's
# adaptation (psycopg wants Jsonb, SQLite text). An aware datetime needs none on
# Postgres: DateTimeField.get_db_prep_save() ends in the backend's
# adapt_datetimefield_value(), which returns the value unchanged there (Django 5.2,
# django/db/backends/postgresql/operations.py), after checks that only act on naive
# values; psycopg sends it as timestamptz. On SQLite it becomes text.
_AS_IS, _ADAPTED, _AWARE_AS_IS = "as is", "adapted", "aware as is"


@dataclass(frozen=True)
class _Column:
    field: Any
    attname: str
    adapt: str


@dataclass(frozen=True)
class _InsertStatement:
    columns: list[_Column]
    head: str
    row: str


_ADAPTED_TYPES = {"DateTimeField", "JSONField"}
_statements: dict[str, _InsertStatement] = {}


def _insert_statement(connection: Any) -> _InsertStatement:
    if connection.vendor not in _statements:
        quote = connection.ops.quote_name
        fields = [f for f in OutboxEvent._meta.concrete_fields if not f.primary_key]
        unexpected = [f.name for f in fields if f.get_internal_type() not in _PLAIN_TYPES | _ADAPTED_TYPES]
        if unexpected:  # a new column type must be sorted into one of the sets knowingly
            raise TypeError(f"OutboxEvent fields of a type emit() does not know how to send: {unexpected}")

        def adapt(field: Any) -> str:
            kind = field.get_internal_type()
            if kind not in _ADAPTED_TYPES:
                return _AS_IS
            if kind == "DateTimeField" and connection.vendor == "postgresql":
                return _AWARE_AS_IS
            return _ADAPTED

        _statements[connection.vendor] = _InsertStatement(
            columns=[_Column(field=f, attname=f.attname, adapt=adapt(f)) for f in fields],
            head=f"INSERT INTO {quote(OutboxEvent._meta.db_table)} ({', '.join(quote(f.column) for f in fields)})",
            row="(" + ", ".join(["%s"] * len(fields)) + ")",
        )
    return _statements[connection.vendor]


_PLAIN_TYPES = {
    "CharField",
    "TextField",
    "ForeignKey",
    "PositiveIntegerField",
    "IntegerField",
    "BooleanField",
}


# --- nudging workers ------------------------------------------------------------------


def _nudge_after_commit(using: str = DEFAULT_DB_ALIAS) -> None:
    """Ask a worker to look at the outbox once this transaction commits.

    One nudge per transaction however many events it emits: a caller emitting in a loop
    inside one atomic block must not publish thousands of broker messages.
    """
    connection = connections[using]
    # run_on_commit holds (savepoint ids, callback, robust) tuples.
    if connection.in_atomic_block and any(
        entry[1] is nudge_event_workers for entry in connection.run_on_commit
    ):
        return
    transaction.on_commit(nudge_event_workers, using=using)


def nudge_event_workers() -> None:
    # Imported here: tasks import the services, and the services must not need Celery
    # to be importable.
    from campaigns.tasks import events_process

    # From a background thread: the caller does not wait for Redis (mailauto/lib/nudge.py).
    nudge_soon(events_process, kind="events")
