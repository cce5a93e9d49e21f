"""emit(), emit_many() and identify(): the API application code calls."""

from __future__ import annotations

from datetime import UTC, datetime
from unittest import mock
from zoneinfo import ZoneInfo

from django.db import IntegrityError, OperationalError, transaction
from django.db.backends.utils import CursorWrapper
from django.test import TestCase, TransactionTestCase
from django.utils import timezone

import campaigns
from campaigns import events
from campaigns.events import EventSpec
from campaigns.models import Contact, EventType, OutboxEvent
from campaigns.schemas import SchemaError
from mailauto.lib import nudge
from tests import factories


class EmitTests(TestCase):
    @classmethod
    def setUpTestData(cls) -> None:
        cls.type = factories.event_type()

    def test_emit_writes_one_pending_event(self) -> None:
        event_id = campaigns.emit("user.signed_up", "u-1", {"plan": "pro"}, source="billing")
        event = OutboxEvent.objects.get(event_id=event_id)
        self.assertEqual(event.status, OutboxEvent.Status.PENDING)
        self.assertEqual(event.payload, {"plan": "pro"})
        self.assertEqual(event.user_id, "u-1")
        self.assertEqual(event.source, "billing")

    def test_same_event_id_twice_is_one_event_and_keeps_the_transaction_usable(self) -> None:
        with transaction.atomic():
            first = campaigns.emit("user.signed_up", "u-1", {"plan": "pro"}, event_id="order-1")
            second = campaigns.emit("user.signed_up", "u-1", {"plan": "free"}, event_id="order-1")
            # The caller's transaction is still usable after the duplicate.
            Contact.objects.create(user_id="after", email="after@example.com")
        self.assertEqual(first, second)
        self.assertEqual(OutboxEvent.objects.filter(event_id="order-1").count(), 1)
        self.assertEqual(OutboxEvent.objects.get(event_id="order-1").payload, {"plan": "pro"})

    def test_unknown_event_type_raises_and_writes_nothing(self) -> None:
        with self.assertRaises(campaigns.InvalidEvent) as ctx:
            campaigns.emit("user.signed_upp", "u-1", {"plan": "pro"})
        self.assertIn("event_type", ctx.exception.errors)
        self.assertIn("user.signed_upp", str(ctx.exception))
        self.assertFalse(OutboxEvent.objects.exists())

    def test_payload_not_fitting_schema_names_the_field(self) -> None:
        with self.assertRaises(campaigns.InvalidEvent) as ctx:
            campaigns.emit("user.signed_up", "u-1", {"plan": "gold"})
        self.assertEqual(list(ctx.exception.errors), ["payload.plan"])
        self.assertIn("payload.plan", str(ctx.exception))
        self.assertFalse(OutboxEvent.objects.exists())

    def test_missing_required_field_is_rejected(self) -> None:
        with self.assertRaises(campaigns.InvalidEvent) as ctx:
            campaigns.emit("user.signed_up", "u-1", {})
        self.assertIn("payload.plan", ctx.exception.errors)

    def test_inactive_event_type_is_refused(self) -> None:
        factories.event_type(name="legacy.thing", schema={}, active=False)
        with self.assertRaises(campaigns.InvalidEvent) as ctx:
            campaigns.emit("legacy.thing", "u-1", {})
        self.assertIn("inactive", ctx.exception.errors["event_type"])

    def test_bad_user_id_and_naive_occurred_at_are_rejected(self) -> None:
        with self.assertRaises(campaigns.InvalidEvent) as ctx:
            campaigns.emit("user.signed_up", "", {"plan": "pro"}, occurred_at=datetime(2026, 1, 1))
        self.assertEqual(set(ctx.exception.errors), {"user_id", "occurred_at"})

    def test_occurred_at_accepts_iso_strings(self) -> None:
        event_id = campaigns.emit(
            "user.signed_up", 42, {"plan": "pro"}, occurred_at="2026-11-01T10:00:00+00:00"
        )
        event = OutboxEvent.objects.get(event_id=event_id)
        self.assertEqual(event.occurred_at, datetime(2026, 11, 1, 10, tzinfo=UTC))
        self.assertEqual(event.user_id, "42")

    def test_an_aware_datetime_in_another_zone_is_stored_as_the_same_instant(self) -> None:
        # On Postgres emit() hands aware datetimes to psycopg as they are (events.py).
        paris = datetime(2026, 11, 1, 11, 30, tzinfo=ZoneInfo("Europe/Paris"))
        event_id = campaigns.emit("user.signed_up", "u-1", {"plan": "pro"}, occurred_at=paris)
        event = OutboxEvent.objects.get(event_id=event_id)
        self.assertEqual(event.occurred_at, datetime(2026, 11, 1, 10, 30, tzinfo=UTC))

    def test_columns_emit_does_not_set_take_the_models_defaults(self) -> None:
        before = timezone.now()
        event_id = campaigns.emit("user.signed_up", "u-1", {"plan": "pro"})
        event = OutboxEvent.objects.get(event_id=event_id)
        blank = OutboxEvent()
        set_by_emit = {
            "id",
            "event_id",
            "event_type_id",
            "user_id",
            "payload",
            "source",
            "occurred_at",
            "available_at",
            "created_at",
        }
        for field in OutboxEvent._meta.concrete_fields:
            if field.attname not in set_by_emit:
                with self.subTest(field=field.attname):
                    self.assertEqual(getattr(event, field.attname), getattr(blank, field.attname))
        self.assertEqual(event.error_history, [])
        self.assertEqual(event.attempts, 0)
        self.assertTrue(before <= event.created_at <= timezone.now())
        self.assertTrue(before <= event.available_at <= timezone.now())

    def test_a_schema_broken_outside_the_admin_raises_schema_error_and_writes_nothing(self) -> None:
        # The schema is checked once when emit() reads the type, not for every event;
        # a broken one (written past EventType.clean) must still stop it.
        EventType.objects.filter(name="user.signed_up").update(schema={"fields": {"plan": {"type": "strin"}}})
        events.forget_event_type()
        with self.assertRaises(SchemaError) as ctx:
            campaigns.emit("user.signed_up", "u-1", {"plan": "pro"})
        self.assertEqual(ctx.exception.path, "fields.plan.type")
        self.assertFalse(OutboxEvent.objects.exists())
        # Not kept: once mended, the next emit() uses the mended schema.
        EventType.objects.filter(name="user.signed_up").update(
            schema={"fields": {"plan": {"type": "string"}}}
        )
        campaigns.emit("user.signed_up", "u-1", {"plan": "anything"})
        self.assertEqual(OutboxEvent.objects.count(), 1)

    def test_rollback_of_the_callers_transaction_removes_the_event(self) -> None:
        class Boom(Exception):
            pass

        with self.assertRaises(Boom), transaction.atomic():
            campaigns.emit("user.signed_up", "u-1", {"plan": "pro"}, event_id="rolled-back")
            raise Boom
        self.assertFalse(OutboxEvent.objects.filter(event_id="rolled-back").exists())

    def test_emit_nudges_workers_once_per_transaction_after_commit(self) -> None:
        with mock.patch("campaigns.tasks.events_process.apply_async") as apply_async:
            with self.captureOnCommitCallbacks(execute=True) as callbacks, transaction.atomic():
                for n in range(5):
                    campaigns.emit("user.signed_up", f"u-{n}", {"plan": "pro"})
                apply_async.assert_not_called()  # not before commit
            nudge.flush_pending()  # sent from a background thread; wait for it
        self.assertEqual(len(callbacks), 1)
        apply_async.assert_called_once_with(retry=False)

    def test_emit_succeeds_when_the_broker_is_down(self) -> None:
        with mock.patch(
            "campaigns.tasks.events_process.apply_async", side_effect=ConnectionError("broker down")
        ) as apply_async:
            with self.captureOnCommitCallbacks(execute=True):
                event_id = campaigns.emit("user.signed_up", "u-1", {"plan": "pro"})
            nudge.flush_pending()
        apply_async.assert_called_once()  # it was tried, failed, and raised nowhere
        self.assertTrue(OutboxEvent.objects.filter(event_id=event_id).exists())


class EmitManyTests(TestCase):
    @classmethod
    def setUpTestData(cls) -> None:
        cls.type = factories.event_type()

    def test_emit_many_writes_all(self) -> None:
        ids = campaigns.emit_many(
            [
                EventSpec(event_type="user.signed_up", user_id="a", payload={"plan": "pro"}),
                {
                    "event_type": "user.signed_up",
                    "user_id": "b",
                    "payload": {"plan": "free"},
                    "event_id": "b-1",
                },
            ],
            source="import",
        )
        self.assertEqual(len(ids), 2)
        self.assertEqual(ids[1], "b-1")
        self.assertEqual(set(OutboxEvent.objects.values_list("source", flat=True)), {"import"})

    def test_one_bad_event_rejects_the_whole_batch_naming_its_index(self) -> None:
        with self.assertRaises(campaigns.InvalidEvent) as ctx:
            campaigns.emit_many(
                [
                    {"event_type": "user.signed_up", "user_id": "a", "payload": {"plan": "pro"}},
                    {"event_type": "user.signed_up", "user_id": "b", "payload": {"plan": 3}},
                ]
            )
        self.assertIn("events[1].payload.plan", ctx.exception.errors)
        self.assertNotIn("events[0].payload.plan", ctx.exception.errors)
        self.assertFalse(OutboxEvent.objects.exists())

    def test_unknown_keys_in_a_mapping_are_rejected(self) -> None:
        with self.assertRaises(campaigns.InvalidEvent) as ctx:
            campaigns.emit_many(
                [{"event_type": "user.signed_up", "user_id": "a", "payload": {"plan": "pro"}, "typo": 1}]
            )
        self.assertIn("events[0]", ctx.exception.errors)


class IdentifyTests(TestCase):
    def test_identify_creates_then_merges_attributes(self) -> None:
        campaigns.identify("u-1", email="ada@example.com", attributes={"first_name": "Ada", "plan": "free"})
        contact = campaigns.identify(
            "u-1", email="ada@new.example.com", attributes={"plan": "pro", "first_name": None}
        )
        contact.refresh_from_db()
        self.assertEqual(contact.email, "ada@new.example.com")
        self.assertEqual(contact.attributes, {"plan": "pro"})
        self.assertEqual(Contact.objects.count(), 1)

    def test_identify_can_replace_attributes(self) -> None:
        campaigns.identify("u-1", email="ada@example.com", attributes={"a": 1, "b": 2})
        contact = campaigns.identify(
            "u-1", email="ada@example.com", attributes={"c": 3}, replace_attributes=True
        )
        self.assertEqual(contact.attributes, {"c": 3})

    def test_invalid_email_is_rejected_and_nothing_written(self) -> None:
        with self.assertRaises(campaigns.InvalidContact) as ctx:
            campaigns.identify("u-1", email="not-an-address")
        self.assertIn("email", ctx.exception.errors)
        self.assertFalse(Contact.objects.exists())

    def test_non_json_attributes_are_rejected(self) -> None:
        with self.assertRaises(campaigns.InvalidContact):
            campaigns.identify("u-1", email="ada@example.com", attributes={"when": object()})
        self.assertFalse(Contact.objects.exists())

    def test_contact_user_id_is_unique_in_the_database(self) -> None:
        factories.contact(user_id="dup")
        with self.assertRaises(IntegrityError), transaction.atomic():
            Contact.objects.create(user_id="dup", email="x@example.com")


class IdentifyComplianceTests(TestCase):
    def test_region_and_do_not_sell_are_set(self) -> None:
        contact = campaigns.identify("u-1", email="ada@example.com", region="EU", do_not_sell=True)
        contact.refresh_from_db()
        self.assertEqual((contact.region, contact.do_not_sell), ("eu", True))
        campaigns.identify("u-1", email="ada@example.com")  # not given: unchanged
        contact.refresh_from_db()
        self.assertEqual((contact.region, contact.do_not_sell), ("eu", True))

    def test_consent_changes_are_appended_to_the_ledger_once(self) -> None:
        from suppression.models import ConsentRecord

        campaigns.identify(
            "u-1", email="ada@example.com", consent={"marketing": True}, consent_source="signup-form"
        )
        campaigns.identify("u-1", email="ada@example.com", consent={"marketing": True})  # unchanged: nothing
        campaigns.identify("u-1", email="ada@example.com", consent={"marketing": False})
        rows = list(ConsentRecord.objects.order_by("id").values_list("purpose", "action", "source"))
        self.assertEqual(
            rows, [("marketing", "granted", "signup-form"), ("marketing", "withdrawn", "identify")]
        )

    def test_withdrawing_what_was_never_granted_writes_nothing(self) -> None:
        from suppression.models import ConsentRecord

        campaigns.identify("u-1", email="ada@example.com", consent={"marketing": False})
        self.assertFalse(ConsentRecord.objects.exists())

    def test_bad_consent_is_rejected_and_nothing_written(self) -> None:
        with self.assertRaises(campaigns.InvalidContact) as ctx:
            campaigns.identify("u-1", email="ada@example.com", consent={"marketing": "yes"})
        self.assertIn("consent", ctx.exception.errors)
        self.assertFalse(Contact.objects.exists())


class EventTypeCacheTests(TestCase):
    def test_emit_reads_the_event_type_once_then_from_the_cache(self) -> None:
        factories.event_type(schema={})
        campaigns.emit("user.signed_up", "u-1", {})
        with self.assertNumQueries(1):  # the INSERT only
            campaigns.emit("user.signed_up", "u-2", {})

    def test_a_schema_change_in_this_process_applies_at_once(self) -> None:
        type_ = factories.event_type(schema={})
        campaigns.emit("user.signed_up", "u-1", {"anything": 1})
        type_.schema = {"fields": {"plan": {"type": "string", "required": True}}}
        type_.save()
        with self.assertRaises(campaigns.InvalidEvent):
            campaigns.emit("user.signed_up", "u-1", {"anything": 1})

    def test_deactivation_applies_at_once_in_this_process(self) -> None:
        type_ = factories.event_type(schema={})
        campaigns.emit("user.signed_up", "u-1", {})
        type_.active = False
        type_.save()
        with self.assertRaises(campaigns.InvalidEvent):
            campaigns.emit("user.signed_up", "u-1", {})


class EmitManyAutocommitTests(TransactionTestCase):
    def test_a_batch_written_in_several_inserts_is_all_or_nothing_in_autocommit(self) -> None:
        factories.event_type()
        specs = [
            {"event_type": "user.signed_up", "user_id": f"u-{n}", "payload": {"plan": "pro"}}
            for n in range(5)
        ]
        real_execute = CursorWrapper.execute
        calls: list[int] = []

        def second_insert_fails(cursor: CursorWrapper, sql: str, params: object = None) -> object:
            if sql.startswith("INSERT INTO") and "outboxevent" in sql:
                calls.append(1)
                if len(calls) == 2:
                    raise OperationalError("connection lost mid-batch")
            return real_execute(cursor, sql, params)

        with (
            mock.patch.object(events, "INSERT_BATCH", 2),
            mock.patch.object(CursorWrapper, "execute", second_insert_fails),
            self.assertRaises(OperationalError),
        ):
            campaigns.emit_many(specs)  # no transaction of the caller's
        self.assertEqual(len(calls), 2)
        self.assertEqual(OutboxEvent.objects.count(), 0)  # the first INSERT was rolled back
