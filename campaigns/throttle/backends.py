"""Where the buckets live: Redis (shared by every machine) or, in the embedded mode
without Redis, a JSON state file under VAR_DIR guarded by flock (this machine only).
Both run the same algorithm (script.py) atomically."""

from __future__ import annotations

import fcntl
import json
import os
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

import redis

from campaigns.throttle.errors import ThrottleUnavailable
from campaigns.throttle.script import LUA, run_script_in_python


class Backend(Protocol):
    """Runs the bucket script atomically against the shared store."""

    def run(self, keys: Sequence[str], argv: Sequence[str]) -> list[Any]: ...


class RedisBackend:
    """Redis: EVALSHA of the script (redis-py's Script loads it again after a
    NOSCRIPT, e.g. a Redis restart), timed by the server's clock."""

    def __init__(self, *, url: str) -> None:
        self.url = url
        self.client = redis.Redis.from_url(url, socket_connect_timeout=3, socket_timeout=5)
        self._script = self.client.register_script(LUA)

    def run(self, keys: Sequence[str], argv: Sequence[str]) -> list[Any]:
        try:
            result = self._script(keys=list(keys), args=list(argv))
        except redis.RedisError as err:
            raise ThrottleUnavailable(f"rate-limit store unavailable: {err}") from err
        return [item.decode() if isinstance(item, bytes) else item for item in result]

    def describe(self) -> str:
        return "Redis (shared by every machine)"


class FileBackend:
    """One JSON state file under VAR_DIR for the embedded mode (no Redis): every process
    on this machine takes an exclusive flock on a lock file, runs the same algorithm as
    the Lua script, and replaces the state file atomically (a crash mid-write loses at
    most one refill, never corrupts the file). Timed by the machine's wall clock, which
    all its processes share."""

    def __init__(self, *, path: Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock_path = self.path.with_suffix(".lock")
        self._fd: int | None = None
        self._pid = 0
        self._thread_lock = threading.Lock()

    def _lock_fd(self) -> int:
        # flock belongs to the open file description, which a fork shares: a child must
        # open its own, or parent and child would never exclude each other.
        if self._fd is None or self._pid != os.getpid():
            self._fd = os.open(self._lock_path, os.O_RDWR | os.O_CREAT, 0o600)
            self._pid = os.getpid()
        return self._fd

    def run(self, keys: Sequence[str], argv: Sequence[str]) -> list[Any]:
        try:
            with self._thread_lock:
                fd = self._lock_fd()
                fcntl.flock(fd, fcntl.LOCK_EX)
                try:
                    return self._run_locked(keys, argv)
                finally:
                    fcntl.flock(fd, fcntl.LOCK_UN)
        except OSError as err:
            raise ThrottleUnavailable(f"rate-limit state file unavailable: {err}") from err

    def _run_locked(self, keys: Sequence[str], argv: Sequence[str]) -> list[Any]:
        try:
            store = json.loads(self.path.read_bytes())
        except FileNotFoundError:
            store = {}
        except ValueError:
            store = {}  # unreadable: start from full buckets rather than stop sending
        result, changed = run_script_in_python(store, keys, argv)
        if changed:
            now = time.time_ns() // 1000 if argv[1] == "" else int(argv[1])
            live = {k: v for k, v in store.items() if v.get("expires_at", now + 1) > now}
            tmp = self.path.with_name(f"{self.path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
            tmp.write_text(json.dumps(live))
            os.replace(tmp, self.path)
        return result

    def describe(self) -> str:
        return f"state file {self.path} (this machine only)"
