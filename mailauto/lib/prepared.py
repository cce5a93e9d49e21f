"""A cursor for the few statements that run once per event, per webhook or per email:
on PostgreSQL, server-side parameter binding, so that psycopg prepares each statement
on its connection after `prepare_threshold` runs (settings: DB_PREPARED_STATEMENTS) and
Postgres skips parsing and planning it from then on.

Django's own cursors bind parameters on the client (psycopg's ClientCursor), which
never prepares: every statement is sent as text with its values quoted in, and parsed
and planned again by Postgres. That is the right default for the ORM's ever-changing
queries; for the handful of fixed statements on the hot paths it costs more than the
statements themselves. Measured with pgbench on this project's emit() INSERT (4
clients, one INSERT per transaction): 2,480 transactions/s as plain text, 3,475
prepared. psycopg's own counting decides when to prepare, keyed by the statement's text
and its parameters' types (https://www.psycopg.org/psycopg3/docs/advanced/prepare.html).

Everything else Django gives a cursor stays: the same connection and transaction, its
health check, its error wrapping, and the query log (DEBUG, assertNumQueries). On
other databases this is Django's ordinary cursor.

With a connection pooler in transaction mode (pgbouncer), prepared statements need
pgbouncer 1.21+ with max_prepared_statements set, or DB_PREPARED_STATEMENTS=false.
"""

from __future__ import annotations

from typing import Any

from django.db.backends.base.base import BaseDatabaseWrapper
from django.db.backends.utils import CursorWrapper


def prepared_cursor(connection: BaseDatabaseWrapper) -> CursorWrapper:
    """A cursor on `connection` whose statements Postgres prepares once they repeat.

    Use it as Django's: `with prepared_cursor(connection) as cursor:`. Placeholders are
    %s as usual. With server-side binding a parameter's type must be clear from where
    it stands in the statement (a column, a comparison) or cast in the SQL (%s::jsonb).
    """
    if connection.vendor != "postgresql":
        return connection.cursor()
    from django.db.backends.postgresql import base

    # Django's own class for OPTIONS server_side_binding=True (psycopg's Cursor, plus
    # callproc); django-stubs does not describe it.
    server_binding_cursor: Any = base.ServerBindingCursor  # type: ignore[attr-defined]

    # What BaseDatabaseWrapper._cursor() does, with the other cursor class.
    connection.close_if_health_check_failed()
    connection.ensure_connection()
    with connection.wrap_database_errors:
        raw = server_binding_cursor(connection.connection)
        connection.validate_thread_sharing()
        if connection.queries_logged:
            return connection.make_debug_cursor(raw)
        return connection.make_cursor(raw)
