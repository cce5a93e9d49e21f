"""Helpers for end-to-end tests: a real Celery worker process on the test database."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import redis
from django.conf import settings
from django.db import connection

ROOT = Path(__file__).resolve().parent.parent


def worker_env(sandbox_url: str) -> dict[str, str]:
    """The environment of a worker that shares this test run's database and broker."""
    db = connection.settings_dict
    database_url = f"postgres://{db['USER']}@{db['HOST'] or '127.0.0.1'}:{db['PORT'] or 5432}/{db['NAME']}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("ANYMAIL_")}
    env.update(
        DJANGO_SETTINGS_MODULE="tests.settings",
        DATABASE_URL=database_url,
        REDIS_URL=settings.REDIS_URL,
        ANYMAIL_POSTMARK_SERVER_TOKEN="sandbox-server-token",
        ANYMAIL_POSTMARK_API_URL=sandbox_url,
        PYTHONUNBUFFERED="1",
    )
    return env


def purge_broker() -> None:
    """Forget task messages left in the test broker by earlier runs."""
    redis.Redis.from_url(settings.REDIS_URL).flushdb()


def start_worker(
    sandbox_url: str,
    *,
    concurrency: int = 2,
    log_path: Path | None = None,
    extra_env: dict[str, str] | None = None,
) -> subprocess.Popen:
    log = open(log_path or os.devnull, "ab")  # noqa: SIM115  (closed with the process)
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "celery",
            "-A",
            "mailauto",
            "worker",
            "-Q",
            "events,sends,webhooks,housekeeping",
            "--concurrency",
            str(concurrency),
            "--without-heartbeat",
            "--without-mingle",
            "--without-gossip",
            "--loglevel",
            "INFO",
        ],
        cwd=ROOT,
        env={**worker_env(sandbox_url), **(extra_env or {})},
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,  # so that the whole process group can be stopped
    )


def stop_worker(process: subprocess.Popen, *, kill: bool = False) -> None:
    if process.poll() is not None:
        return
    try:
        os.killpg(process.pid, signal.SIGKILL if kill else signal.SIGTERM)
        process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=10)
    except ProcessLookupError:
        pass


def wait_until(condition: Callable[[], bool], *, timeout: float, interval: float = 0.2) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(interval)
    return condition()
