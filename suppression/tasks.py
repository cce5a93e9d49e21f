"""Celery tasks for suppression: thin adapters over the services."""

from __future__ import annotations

from celery import shared_task

from suppression import cache


@shared_task(ignore_result=True)
def suppression_mirror_sync() -> int:
    """Beat, every SUPPRESSION_SYNC_INTERVAL_SECONDS: rebuild the Redis mirror from
    Postgres (storage "redis"), or delete it (storage "database")."""
    return cache.mirror_sync()
