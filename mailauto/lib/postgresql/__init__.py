"""Django's PostgreSQL backend with a health check that costs no round trip
(settings.DATABASES uses it whenever DATABASE_URL names Postgres; see base.py)."""
