"""The mailauto project package: settings, Celery app, URLs, checks, health, lib/."""

from mailauto.celery import app as celery_app

__all__ = ["celery_app"]
