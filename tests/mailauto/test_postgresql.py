"""The PostgreSQL backend (mailauto/lib/postgresql) and prepared_cursor
(mailauto/lib/prepared.py), on the real server."""

from __future__ import annotations

import time
from unittest import mock

from django.db import connection, connections
from django.db.backends.postgresql.base import DatabaseWrapper as DjangoWrapper
from django.test import TestCase, TransactionTestCase
from django.test.utils import CaptureQueriesContext

from campaigns import emit
from mailauto.lib.postgresql.base import DatabaseWrapper
from mailauto.lib.prepared import prepared_cursor
from tests import factories


class HealthCheckTests(TransactionTestCase):
    def probe(self) -> DatabaseWrapper:
        """A connection of its own, to the test database, that this test may break."""
        wrapper = DatabaseWrapper(dict(connection.settings_dict), alias="probe")
        self.addCleanup(wrapper.close)
        wrapper.ensure_connection()
        return wrapper

    def test_the_configured_backend_is_ours(self) -> None:
        self.assertIsInstance(connections["default"], DatabaseWrapper)

    def test_an_idle_healthy_connection_is_usable_without_a_query(self) -> None:
        probe = self.probe()
        with mock.patch.object(DjangoWrapper, "is_usable") as select_one:
            self.assertTrue(probe.is_usable())
        select_one.assert_not_called()

    def test_a_connection_the_server_closed_is_not_usable_and_the_next_query_reconnects(self) -> None:
        probe = self.probe()
        with probe.cursor() as cursor:
            cursor.execute("SELECT pg_backend_pid()")
            (pid,) = cursor.fetchone()
        with connection.cursor() as cursor:
            cursor.execute("SELECT pg_terminate_backend(%s)", [pid])
        deadline = time.monotonic() + 10
        while probe.is_usable() and time.monotonic() < deadline:
            time.sleep(0.01)  # the server's FATAL notice is on its way
        self.assertFalse(probe.is_usable())

        # What Django does before a request's first query with CONN_HEALTH_CHECKS.
        probe.health_check_enabled, probe.health_check_done = True, False
        probe.close_if_health_check_failed()
        with probe.cursor() as cursor:
            cursor.execute("SELECT pg_backend_pid()")
            (new_pid,) = cursor.fetchone()
        self.assertNotEqual(new_pid, pid)

    def test_unread_input_falls_back_to_djangos_select_1(self) -> None:
        probe = self.probe()
        with probe.cursor() as cursor:
            cursor.execute("LISTEN mailauto_test")
        with connection.cursor() as cursor:
            cursor.execute("NOTIFY mailauto_test")
        time.sleep(0.2)  # the notification waits unread on the probe's socket
        with mock.patch.object(DjangoWrapper, "is_usable", return_value=True) as select_one:
            self.assertTrue(probe.is_usable())
        select_one.assert_called_once()


def _prepared(sql_start: str) -> list[str]:
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT statement FROM pg_prepared_statements WHERE statement LIKE %s", [sql_start + "%"]
        )
        return [row[0] for row in cursor.fetchall()]


class PreparedCursorTests(TestCase):
    def test_a_repeated_statement_is_prepared_and_logged_as_any_other(self) -> None:
        sql = "SELECT %s::int + 1 /* prepared-cursor test */"
        with CaptureQueriesContext(connection) as queries:
            for n in range(7):
                with prepared_cursor(connection) as cursor:
                    cursor.execute(sql, [n])
                    self.assertEqual(cursor.fetchone(), (n + 1,))
        self.assertEqual(len(queries.captured_queries), 7)
        self.assertEqual(len(_prepared("SELECT $1::int + 1 /* prepared-cursor test */")), 1)

    def test_nothing_is_prepared_when_it_is_switched_off(self) -> None:
        connection.ensure_connection()
        raw = connection.connection
        before, raw.prepare_threshold = raw.prepare_threshold, None  # DB_PREPARED_STATEMENTS=false
        self.addCleanup(setattr, raw, "prepare_threshold", before)
        sql = "SELECT %s::int * 2 /* not prepared */"
        for n in range(7):
            with prepared_cursor(connection) as cursor:
                cursor.execute(sql, [n])
        self.assertEqual(_prepared("SELECT $1::int * 2 /* not prepared */"), [])

    def test_the_settings_turn_it_on_after_psycopgs_threshold(self) -> None:
        self.assertEqual(connection.settings_dict["OPTIONS"]["prepare_threshold"], 5)

    def test_emit_prepares_its_insert(self) -> None:
        factories.event_type("prepared.test", schema={})
        for n in range(6):
            emit("prepared.test", f"user-{n}", {})
        self.assertEqual(len(_prepared('INSERT INTO "campaigns_outboxevent"')), 1)


class HotTableIndexTests(TestCase):
    def test_the_tables_written_per_event_and_per_email_have_no_like_indexes(self) -> None:
        # unique=True or db_index=True on a CharField also builds a varchar_pattern_ops
        # index on Postgres; every INSERT and non-HOT UPDATE pays for it, and nothing here
        # queries with LIKE 'x%'. Declare such indexes in Meta instead.
        with connection.cursor() as cursor:
            cursor.execute(
                "SELECT indexname FROM pg_indexes WHERE tablename = ANY(%s) AND indexdef LIKE %s",
                [["campaigns_outboxevent", "campaigns_message", "webhooks_trackingevent"], "%pattern_ops%"],
            )
            self.assertEqual(cursor.fetchall(), [])


class ContactEmailLookupTests(TestCase):
    def test_a_case_insensitive_address_lookup_uses_an_index(self) -> None:
        """suppression.services finds every contact with an address (email__iexact) on
        each unsubscribe: with the index it is a probe, not a scan of all contacts."""
        from campaigns.models import Contact

        for n in range(50):
            factories.contact(email=f"user{n}@example.com")
        with connection.cursor() as cursor:
            cursor.execute("ANALYZE campaigns_contact")
            cursor.execute("SET LOCAL enable_seqscan = off")  # a tiny table is scanned anyway
            plan = Contact.objects.filter(email__iexact="User7@Example.com").explain()
        self.assertIn("contact_email_iexact", plan)
