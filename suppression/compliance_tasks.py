"""Celery tasks for compliance housekeeping: thin adapters over the services.

Not named tasks.py, so Celery's autodiscovery does not find it by itself: the project
imports it (CELERY_IMPORTS or suppression/tasks.py) and beat schedules it by name.
"""

from __future__ import annotations

from celery import shared_task

from suppression import reputation


@shared_task(ignore_result=True)
def reputation_check() -> int:
    """Beat, every few minutes: pause automations and broadcasts over the bounce/complaint limits."""
    return len(reputation.reputation_check())
