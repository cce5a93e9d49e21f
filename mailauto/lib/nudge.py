"""Debounced "look now" nudges: at most one pending nudge per kind of work.

A spike of 100,000 emits, each in its own transaction, must not put 100,000 task
messages in the broker. An emitter publishes only if it can set a shared marker; the
task clears the marker when it runs out of work and then looks once more, so work
committed around that moment is never left waiting for the sweeper:

- an emitter that finds the marker set committed its row before the task cleared the
  marker, so the task's final look (after clearing) sees the row;
- an emitter that finds the marker clear publishes a fresh nudge.

The marker has a TTL so that a task that dies holding it delays work by at most that
long (and the beat sweeper nudges regardless).
"""

from __future__ import annotations

import logging
from typing import Any

from django.core.cache import cache

logger = logging.getLogger(__name__)

MARKER_TTL_SECONDS = 10


def _key(kind: str) -> str:
    return f"mailauto:nudge:{kind}"


def nudge(task: Any, *, kind: str) -> None:
    """Publish `task` unless a nudge of this kind is already pending. Never raises."""
    try:
        if not cache.add(_key(kind), 1, timeout=MARKER_TTL_SECONDS):
            return
    except Exception:
        logger.debug("nudge marker unavailable; publishing anyway", exc_info=True)
    try:
        # retry=False: with the broker down the caller must not block on publish
        # retries; the row is the truth and the beat sweeper will find it.
        task.apply_async(retry=False)
    except Exception:
        logger.warning("could not nudge the %s workers; the sweeper will", kind, exc_info=True)
        try:
            cache.delete(_key(kind))
        except Exception:
            logger.debug("could not clear the nudge marker", exc_info=True)


def settle(kind: str) -> None:
    """Called by a task that found no work, right before it looks one last time."""
    try:
        cache.delete(_key(kind))
    except Exception:
        logger.debug("could not clear the nudge marker", exc_info=True)
