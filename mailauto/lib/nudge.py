"""Debounced "look now" nudges: a bounded number of tasks per kind of work.

A spike of 100,000 emits, each in its own transaction, must not put 100,000 task
messages in the broker. An emitter publishes only if it can set a shared marker; the
task clears the marker when it runs out of work and then looks once more, so work
committed around that moment is never left waiting for the sweeper:

- an emitter that finds the marker set committed its row before the task cleared the
  marker, so the task's final look (after clearing) sees the row;
- an emitter that finds the marker clear publishes a fresh nudge.

A task takes its marker as it starts (`take`: the marker holds the task's own token) and
holds it (`hold`, HOLD_TTL_SECONDS) after every batch that found work, so a long drain
never looks like a lost nudge and draws no duplicate task; if a duplicate starts anyway
(the marker expired), the newer task owns the slot and the older one stops at its next
hold and publishes no continuation, so duplicates never outlive one batch. A
batch that comes back full recruits helpers on further marker slots, up to
MAILAUTO_EVENT_DRAINS / MAILAUTO_SEND_DRAINS tasks of a kind. The markers have TTLs
(a task that dies holding one swallows emitters' nudges for at most HOLD_TTL_SECONDS),
and the beat sweeper publishes past them, so recovery after a crash never waits for a
dead task's marker. Measured with bench/spike.py: a 100,000-event spike grew the
events/sends queues to 16 and 36 tasks before holds and tokens, at most 4 after.
"""

from __future__ import annotations

import atexit
import logging
import os
import secrets
import threading
import time
from typing import Any

from django.core.cache import cache

logger = logging.getLogger(__name__)

MARKER_TTL_SECONDS = 10
# A draining task re-sets its marker after every batch that found work, for this long:
# longer than a task's time budget plus its continuation's wait in the queue, so a
# drain still under way never looks like a lost nudge and draws no duplicate.
HOLD_TTL_SECONDS = 60
# nudge_soon(): a process looks at the marker at most this often per kind.
COALESCE_SECONDS = 0.01
# How long exit and fork wait for a deferred nudge in flight before going ahead.
EXIT_WAIT_SECONDS = 5.0
FORK_WAIT_SECONDS = 5.0


def _key(kind: str, slot: int = 0) -> str:
    return f"mailauto:nudge:{kind}" if slot == 0 else f"mailauto:nudge:{kind}:{slot}"


def nudge(task: Any, *, kind: str, slots: int = 1) -> None:
    """Publish `task` for the first free one of `slots` markers of this kind; nothing if
    every one is taken (that many tasks are pending or draining). Never raises.

    Emitters use one slot; a draining task that keeps finding full batches recruits
    helpers with slots > 1, so at most `slots` tasks of a kind exist at once. A recruit
    is published when workers are busy, so it may wait in the queue: its marker lasts
    HOLD_TTL_SECONDS, and without the marker store no recruit is published at all (the
    drains already running carry on)."""
    recruiting = slots > 1
    for slot in range(slots):
        try:
            ttl = HOLD_TTL_SECONDS if recruiting else MARKER_TTL_SECONDS
            if not cache.add(_key(kind, slot), 1, timeout=ttl):
                continue
        except Exception:
            if recruiting:
                logger.debug("nudge marker unavailable; recruiting no helper", exc_info=True)
                return
            logger.debug("nudge marker unavailable; publishing anyway", exc_info=True)
        try:
            # retry=False: with the broker down the caller must not block on publish
            # retries; the row is the truth and the beat sweeper will find it.
            if slot:
                task.apply_async(kwargs={"slot": slot}, retry=False)
            else:
                task.apply_async(retry=False)
        except Exception:
            logger.warning("could not nudge the %s workers; the sweeper will", kind, exc_info=True)
            try:
                cache.delete(_key(kind, slot))
            except Exception:
                logger.debug("could not clear the nudge marker", exc_info=True)
        return


def take(kind: str, slot: int = 0) -> int:
    """Called by a task as it starts on `slot`: the marker now names it, so a task that
    was already draining this slot (a duplicate, e.g. after the marker expired) sees at its
    next hold() that it is no longer the slot's task and stops. Returns the task's token."""
    token = secrets.randbits(62) + 2  # an emitter's marker is 1
    try:
        cache.set(_key(kind, slot), token, timeout=HOLD_TTL_SECONDS)
    except Exception:
        logger.debug("could not take the nudge marker", exc_info=True)
    return token


def hold(kind: str, slot: int, token: int) -> bool:
    """Called by a task after a batch that found work: it will look again (or hand over
    to its continuation), so it is the pending nudge of its slot. False when another task
    has taken the slot since: this one should stop, and publish no continuation."""
    key = _key(kind, slot)
    try:
        if hasattr(cache, "set_if_free_or_equal"):  # Redis: one atomic compare-and-set
            return bool(cache.set_if_free_or_equal(key, token, HOLD_TTL_SECONDS))
        # Other caches (the embedded file cache): the same check, not atomic; a race
        # leaves at worst one duplicate task, as before tokens existed.
        if cache.get(key) not in (None, token):
            return False
        cache.set(key, token, timeout=HOLD_TTL_SECONDS)
    except Exception:
        logger.debug("could not hold the nudge marker", exc_info=True)
    return True


def settle(kind: str, slot: int = 0, token: int | None = None) -> None:
    """Called by a task that found no work, right before it looks one last time. With a
    token, only the slot's own task lets go of it (a newer task keeps its marker)."""
    key = _key(kind, slot)
    try:
        if token is None:
            cache.delete(key)
        elif hasattr(cache, "delete_if_equal"):
            cache.delete_if_equal(key, token)
        elif cache.get(key) == token:
            cache.delete(key)
    except Exception:
        logger.debug("could not clear the nudge marker", exc_info=True)


# --- nudging from a background thread -------------------------------------------------


def nudge_soon(task: Any, *, kind: str) -> None:
    """nudge(), done by a background thread of this process. Never raises, never blocks.

    emit() calls this after every commit. Looking at the marker is a Redis round trip
    that cost a third of an emit() (bench/pipeline.py's emit section); here the caller
    does not wait for it, and commits that land within COALESCE_SECONDS of each other
    share one look. The look still happens after the commit, which is all the protocol
    above needs; a process that dies first loses only the nudge (the sweeper finds the
    row), as it would have right after a synchronous commit. At exit, pending nudges are
    sent before the interpreter stops (a management command that emits and exits).
    """
    _deferred.add(task, kind)


def flush_pending() -> None:
    """Send this process's deferred nudges now, and wait for one in flight. For exit and
    for tests that need the nudge to have happened."""
    _deferred.flush()


class _Deferred:
    def __init__(self) -> None:
        self._reset()

    def _reset(self) -> None:
        # Also after fork: the child has none of the parent's threads, and the parent's
        # locks may have been held at the moment of the fork.
        self._lock = threading.Lock()  # guards _pending and _thread
        self._sending = threading.Lock()  # held while a batch of nudges is sent
        self._wake = threading.Event()
        self._pending: dict[str, Any] = {}
        self._thread: threading.Thread | None = None
        self._held_for_fork = False

    def add(self, task: Any, kind: str) -> None:
        try:
            with self._lock:
                self._pending[kind] = task
                if self._thread is None or not self._thread.is_alive():
                    self._thread = threading.Thread(target=self._run, name="mailauto-nudge", daemon=True)
                    self._thread.start()
            self._wake.set()
        except Exception:  # e.g. no threads at interpreter shutdown: nudge inline
            logger.debug("deferred nudge unavailable; nudging inline", exc_info=True)
            nudge(task, kind=kind)

    def flush(self, *, wait: float = -1) -> None:
        # wait: at exit, how long to wait for a nudge in flight (a broker that refuses
        # connections takes seconds to say so); past it, the sweeper covers.
        if not self._sending.acquire(timeout=wait):
            return
        try:
            with self._lock:
                pending, self._pending = self._pending, {}
            for kind, task in pending.items():
                nudge(task, kind=kind)
        finally:
            self._sending.release()

    def _run(self) -> None:
        while True:
            self._wake.wait()
            self._wake.clear()
            try:
                self.flush()
            except Exception:  # nudge() never raises; belt and braces for the thread
                logger.exception("deferred nudge failed")
            time.sleep(COALESCE_SECONDS)

    # No fork while the thread is inside a nudge: it holds locks there (asgiref's lock
    # around Django's cache handler, redis-py's and kombu's pool locks) that a child
    # would inherit held by a thread it does not have, and block on forever.
    # Bounded: a nudge stuck on an unreachable broker must not hold a fork for long; past
    # FORK_WAIT_SECONDS the fork goes ahead (the child's cache calls may then block).
    def _before_fork(self) -> None:
        self._held_for_fork = self._sending.acquire(timeout=FORK_WAIT_SECONDS)

    def _after_fork_in_parent(self) -> None:
        if self._held_for_fork:
            self._sending.release()


_deferred = _Deferred()
os.register_at_fork(
    before=_deferred._before_fork,
    after_in_parent=_deferred._after_fork_in_parent,
    after_in_child=_deferred._reset,
)
atexit.register(lambda: _deferred.flush(wait=EXIT_WAIT_SECONDS))
