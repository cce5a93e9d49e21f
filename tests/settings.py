"""Settings for the test suite: the production stack, Postgres and Redis, at their local
default addresses unless DATABASE_URL / REDIS_URL say otherwise. No eager Celery."""

import os

os.environ.setdefault("DATABASE_URL", "postgres://postgres@127.0.0.1:5432/mailauto")
os.environ.setdefault("REDIS_URL", "redis://127.0.0.1:6379/15")

from mailauto.settings import *  # noqa: F403

PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]  # speed only
