"""Django's PostgreSQL backend, with a connection health check that costs no round trip.

CONN_HEALTH_CHECKS makes Django check a reused connection before the first query of each
request, and Django's check is a `SELECT 1`: a round trip to Postgres per request. On the
webhook endpoint, one statement per request, dropping it took the CPU per webhook from
~4.0 to ~2.8 ms, measured in one process calling the WSGI app (a noisy machine: take
±15%), besides the Postgres backend's own share.

A connection that Postgres has closed, because it restarted, shut down or terminated the
backend (pg_terminate_backend, idle_session_timeout), is told so on its socket: the
server sends a FATAL error and closes it, which leaves the idle socket readable. So an
idle connection whose socket has nothing to read is usable, and that costs one poll()
with no wait. Only when something is waiting (such a notice, end of file, or anything
else unasked for) is Django's `SELECT 1` run, which reads it and answers truly.

What this does not see, Django's check would not have seen in time either: a peer that
vanished without closing the connection (a host lost from the network) leaves both the
poll and the `SELECT 1` waiting for TCP's timeouts.
"""

from __future__ import annotations

import select

from django.db.backends.postgresql import base


class DatabaseWrapper(base.DatabaseWrapper):
    def is_usable(self) -> bool:
        connection = self.connection
        if connection is None or connection.closed or connection.broken:
            return False
        try:
            poller = select.poll()
            poller.register(connection.fileno(), select.POLLIN | select.POLLPRI)
            waiting = poller.poll(0)
        except (OSError, ValueError):
            return False
        if not waiting:
            return True
        return bool(super().is_usable())
