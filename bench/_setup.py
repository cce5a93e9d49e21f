"""What the benchmarks share: where Postgres and Redis are, spawned Django processes, the
marketer's setup a mailauto run starts from (an event type, a published ~3 KB welcome
template, an active automation, N contacts and, unless told otherwise, N pending events),
and the ESP sandbox, Postgres and Redis as the orchestrator sees them.

Imported by bench/pipeline.py and bench/spike.py; importing it sets nothing up.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import queue
import socket
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

ROOT = Path(__file__).resolve().parent.parent

SETTINGS_MODULE = "bench.settings"
SANDBOX_TOKEN = "bench-server-token"
DEFAULT_POSTGRES_URL = "postgres://postgres@127.0.0.1:5432/postgres"

EVENT_TYPE = "user.signed_up"
EVENT_SCHEMA: dict[str, Any] = {
    "fields": {
        "plan": {"type": "string", "required": True, "enum": ["free", "pro", "team"]},
        "trial_days": {"type": "integer", "min": 0, "max": 90},
        "referrer": {"type": "string", "max_length": 200},
        "next_steps": {"type": "array", "items": {"type": "string"}, "max_length": 10},
    }
}
PLANS = ("free", "pro", "team")
FIRST_NAMES = ("Ada", "Grace", "Alan", "Edsger", "Barbara", "Donald", "Frances", "Ken")

# The one template both systems send: a ~3 KB welcome email with a few variables, an
# {% if %} and a {% for %}, valid in mailauto's restricted engine and in Django's own
# engine (which post_office renders with). Only plain variables and filters both share.
TEMPLATE_SUBJECT = 'Welcome to Acme, {{ contact.first_name|default:"there" }}!'
TEMPLATE_HTML = """\
<table role="presentation" width="100%" cellpadding="0" cellspacing="0" border="0">
<tr><td style="padding:0 0 16px 0;">
<img src="https://static.acme.example/email/logo-2x.png" alt="Acme" width="120" height="32" border="0">
</td></tr>
<tr><td style="font-family:Arial,Helvetica,sans-serif;font-size:24px;line-height:1.3;color:#111827;padding:0 0 12px 0;">
<h1 style="margin:0;font-size:24px;font-weight:bold;">Welcome aboard, {{ contact.first_name|default:"there" }}!</h1>
</td></tr>
<tr><td style="font-family:Arial,Helvetica,sans-serif;font-size:16px;line-height:1.5;color:#374151;">
<p style="margin:0 0 12px 0;">Thanks for signing up for Acme {{ payload.plan|title }}. Your account for
<strong>{{ contact.email }}</strong> is ready{% if contact.company %}, and your team at
{{ contact.company }} can join whenever they like{% endif %}.</p>
{% if payload.trial_days %}<p style="margin:0 0 12px 0;">Your free trial runs for
<strong>{{ payload.trial_days }} days</strong>. You will not be charged before it ends, and
we will remind you three days before it does.</p>{% endif %}
<p style="margin:0 0 12px 0;">Here is how most teams get value in their first week:</p>
<ol style="margin:0 0 16px 24px;padding:0;">
{% for step in payload.next_steps %}<li style="margin:0 0 6px 0;">{{ step }}</li>
{% endfor %}</ol>
</td></tr>
<tr><td align="center" style="padding:8px 0 24px 0;">
<table role="presentation" cellpadding="0" cellspacing="0" border="0"><tr>
<td bgcolor="#4f46e5" style="border-radius:6px;padding:12px 28px;">
<a href="https://app.acme.example/onboarding?plan={{ payload.plan|urlencode }}" target="_blank"
style="font-family:Arial,Helvetica,sans-serif;font-size:16px;font-weight:bold;color:#ffffff;text-decoration:none;">Open
your dashboard</a>
</td></tr></table>
</td></tr>
<tr><td style="font-family:Arial,Helvetica,sans-serif;font-size:14px;line-height:1.5;color:#6b7280;border-top:1px solid #e5e7eb;padding:16px 0 0 0;">
<p style="margin:0 0 8px 0;">Questions? Reply to this email or visit the
<a href="https://help.acme.example/getting-started" style="color:#4f46e5;">help centre</a>;
a real person reads every message, usually within a few hours.</p>
<p style="margin:0 0 8px 0;">You are receiving this because you created an Acme account
{% if payload.referrer %}after following a link from {{ payload.referrer }}{% else %}on our website{% endif %}.
Acme Inc., 1 Example Street, Springfield.</p>
<p style="margin:0;"><a href="https://acme.example/privacy" style="color:#6b7280;">Privacy</a> &middot;
<a href="https://acme.example/terms" style="color:#6b7280;">Terms</a> &middot;
<a href="https://acme.example/email-preferences" style="color:#6b7280;">Email preferences</a></p>
</td></tr>
</table>
"""
TEMPLATE_TEXT = """\
Welcome aboard, {{ contact.first_name|default:"there" }}!

Thanks for signing up for Acme {{ payload.plan|title }}. Your account for {{ contact.email }} is ready.
{% if payload.trial_days %}Your free trial runs for {{ payload.trial_days }} days.{% endif %}

Here is how most teams get value in their first week:
{% for step in payload.next_steps %}- {{ step }}
{% endfor %}
Open your dashboard: https://app.acme.example/onboarding?plan={{ payload.plan|urlencode }}

Questions? Reply to this email or visit https://help.acme.example/getting-started

Acme Inc., 1 Example Street, Springfield.
"""
NEXT_STEPS = [
    "Connect your first data source (it takes about two minutes)",
    "Invite the teammates who will review dashboards with you",
    "Set up a weekly summary so the numbers come to you",
]


# --- configuration ----------------------------------------------------------------------


@dataclass(frozen=True)
class Servers:
    """Where Postgres and Redis are; database names are the benchmark's own."""

    postgres_url: str
    redis_url: str

    def database_url(self, name: str) -> str:
        parts = urlsplit(self.postgres_url)
        return urlunsplit((parts.scheme, parts.netloc, f"/{name}", parts.query, ""))

    def child_env(self, database: str, sandbox_url: str) -> dict[str, str]:
        """The environment every benchmark process runs with (settings read it at startup)."""
        return {
            "DJANGO_SETTINGS_MODULE": SETTINGS_MODULE,
            "DATABASE_URL": self.database_url(database),
            "REDIS_URL": self.redis_url,
            "CELERY_BROKER_URL": self.redis_url,
            "MAILAUTO_ESP": "postmark",
            "ANYMAIL_POSTMARK_API_URL": sandbox_url,
            "ANYMAIL_POSTMARK_SERVER_TOKEN": SANDBOX_TOKEN,
        }


# --- running work in spawned processes ----------------------------------------------------
#
# Every process that touches Django is a fresh 'spawn' child with its own environment:
# the orchestrator itself never sets Django up, so it can point each step at a
# different database, and a worker's peak RSS is its own, not inherited from a parent.


def _child(
    target: Callable[..., Any],
    prepare: Callable[..., Any] | None,
    env: dict[str, str],
    kwargs: dict[str, Any],
    start: Any,
    results: Any,
) -> None:
    os.environ.update(env)
    pid = os.getpid()
    try:
        import django

        django.setup()
        state = prepare(**kwargs) if prepare is not None else None
        results.put(("ready", pid, None))
        start.wait()
        value = target(state, **kwargs) if prepare is not None else target(**kwargs)
        results.put(("done", pid, value))
    except BaseException:
        results.put(("error", pid, traceback.format_exc()))


class StepFailed(RuntimeError):
    pass


def run_processes(
    target: Callable[..., Any],
    env: dict[str, str],
    kwargs_list: list[dict[str, Any]],
    *,
    timeout: float,
    prepare: Callable[..., Any] | None = None,
) -> tuple[float, list[Any]]:
    """Run `target(**kwargs)` in one spawned process per kwargs, all released at once
    after every one of them has set Django up. With `prepare`, each process first runs
    `state = prepare(**kwargs)` (warm-up, not timed) and then `target(state, **kwargs)`.

    Returns the wall-clock time of the release and each process's return value.
    """
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    start = ctx.Event()
    processes = [
        # Not daemonic: post_office's send_queued_mail forks a pool of its own.
        ctx.Process(target=_child, args=(target, prepare, env, kwargs, start, results))
        for kwargs in kwargs_list
    ]
    for process in processes:
        process.start()
    by_pid = {process.pid: index for index, process in enumerate(processes)}
    values: list[Any] = [None] * len(processes)
    ready = done = 0
    released_at = 0.0
    deadline = time.monotonic() + timeout
    finished = False
    try:
        while done < len(processes):
            try:
                kind, pid, value = results.get(timeout=1.0)
            except queue.Empty:
                dead = [p for p in processes if not p.is_alive() and p.exitcode not in (0, None)]
                if dead:
                    raise StepFailed(
                        f"{target.__name__}: process {dead[0].pid} died ({dead[0].exitcode})"
                    ) from None
                if time.monotonic() > deadline:
                    raise StepFailed(f"{target.__name__}: no answer within {timeout:.0f} s") from None
                continue
            if kind == "error":
                raise StepFailed(f"{target.__name__} failed in process {pid}:\n{value}")
            if kind == "ready":
                ready += 1
                if ready == len(processes):
                    released_at = time.time()
                    start.set()
            else:
                values[by_pid[pid]] = value
                done += 1
        finished = True
    finally:
        for process in processes:
            process.join(timeout=10 if finished else 0)
            if process.is_alive():
                process.kill()
                process.join()
    return released_at, values


def run_step(target: Callable[..., Any], env: dict[str, str], *, timeout: float = 600, **kwargs: Any) -> Any:
    return run_processes(target, env, [kwargs], timeout=timeout)[1][0]


# --- steps that run inside Django processes ------------------------------------------------


def migrate() -> None:
    from django.core.management import call_command

    call_command("migrate", verbosity=0, interactive=False)


def _contact_attributes(i: int) -> dict[str, Any]:
    return {"first_name": FIRST_NAMES[i % len(FIRST_NAMES)], "company": f"Company {i % 97}", "country": "US"}


def _payload(i: int) -> dict[str, Any]:
    return {
        "plan": PLANS[i % len(PLANS)],
        "trial_days": 14,
        "referrer": "the pricing page" if i % 2 else "",
        "next_steps": NEXT_STEPS,
    }


def _email(i: int) -> str:
    # "user…": the sandbox's scripted outcomes (bounce…, inactive…) never apply.
    return f"user{i}@bench.example.com"


def setup_mailauto(*, n: int, chunk: int = 1000, events: bool = True) -> dict[str, float]:
    """Migrate, then the marketer's configuration, N contacts and (with `events`) N
    pending events for them."""
    from django.db import transaction

    import campaigns
    from campaigns.models import Automation, Contact, EmailTemplate, EventType
    from campaigns.services import automation_set_active, template_version_create, template_version_publish

    timings: dict[str, float] = {}
    started = time.perf_counter()
    migrate()
    timings["migrate_s"] = time.perf_counter() - started

    event_type = EventType.objects.create(name=EVENT_TYPE, schema=EVENT_SCHEMA)
    template = EmailTemplate.objects.create(name="Welcome")
    version = template_version_create(
        template=template, subject=TEMPLATE_SUBJECT, html=TEMPLATE_HTML, text=TEMPLATE_TEXT
    )
    template_version_publish(version=version)
    automation = Automation.objects.create(
        name="Welcome",
        trigger=event_type,
        template=template,
        conditions={"field": "payload.plan", "op": "in", "value": list(PLANS)},
        purpose="onboarding",
    )
    automation_set_active(automation=automation, active=True)

    # bulk_create rather than identify(): setup is not what is measured.
    started = time.perf_counter()
    for offset in range(0, n, chunk):
        Contact.objects.bulk_create(
            [
                Contact(user_id=f"u{i}", email=_email(i), attributes=_contact_attributes(i))
                for i in range(offset, min(n, offset + chunk))
            ]
        )
    timings["contacts_s"] = time.perf_counter() - started
    if not events:
        return timings

    started = time.perf_counter()
    for offset in range(0, n, chunk):
        with transaction.atomic():
            campaigns.emit_many(
                [
                    {"event_type": EVENT_TYPE, "user_id": f"u{i}", "payload": _payload(i)}
                    for i in range(offset, min(n, offset + chunk))
                ],
                source="bench",
            )
    timings["emit_many_s"] = time.perf_counter() - started
    return timings


# --- the ESP sandbox, Postgres and Redis, seen from the orchestrator ---------------------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Sandbox:
    """`python -m mailauto.sandbox` in its own process, so that it never shares a GIL
    with what is measured."""

    def __init__(
        self,
        *,
        latency_ms: float,
        log_path: Path,
        webhook_url: str | None = None,
        webhook_auth: str | None = None,
        webhook_workers: int | None = None,
    ) -> None:
        self.latency_ms = latency_ms
        # No webhook_url: the sandbox posts no webhooks at all.
        self.webhook_url = webhook_url
        self.webhook_auth = webhook_auth
        self.webhook_workers = webhook_workers
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}/"
        self.log_path = log_path
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> Sandbox:
        from mailauto.sandbox.client import SandboxClient

        if self.webhook_url is None:
            webhooks = ["--no-webhooks"]
        else:
            webhooks = ["--webhook-url", self.webhook_url]
            if self.webhook_auth:
                webhooks += ["--webhook-auth", self.webhook_auth]
            if self.webhook_workers:
                webhooks += ["--webhook-workers", str(self.webhook_workers)]
        command = [
            sys.executable, "-m", "mailauto.sandbox",
            "--port", str(self.port),
            "--no-bodies", *webhooks,
            "--latency-ms", str(self.latency_ms),
            "--server-token", SANDBOX_TOKEN,
            "--log-level", "WARNING",
        ]  # fmt: skip
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
        self.client = SandboxClient(self.url, timeout=5)
        deadline = time.monotonic() + 20
        while True:
            try:
                self.client.health()
                return self
            except Exception:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    raise StepFailed(f"the ESP sandbox did not start (see {self.log_path})") from None
                time.sleep(0.1)

    def reset(self) -> None:
        self.client.reset()

    def accepted(self) -> int:
        return int(self.client.stats()["accepted"])

    def stats(self) -> dict[str, Any]:
        return self.client.stats()

    def cpu_seconds(self) -> float:
        return _process_cpu_seconds(self.process.pid) if self.process else 0.0

    def stop(self) -> None:
        if self.process is None:
            return
        with suppress(Exception):
            self.client.close()
        self.process.terminate()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.process = None


def python_speed_ms() -> float:
    """Milliseconds one core takes for a fixed pure-Python loop (best of 5): a reading of
    the machine at the start of a run, printed with the figures. It moves: on
    2026-11-28 one machine read 36 ms, 62 ms and, hours apart, 117-170 ms (steal time
    from other tenants). It does not capture everything: at 62 ms that day a
    do-nothing Django view still served less than half of what it had the day before
    (memory-bound work suffers more than this loop). Compare runs by the baseline each
    benchmark measures in the same run, not by this."""
    best = float("inf")
    for _ in range(5):
        started = time.perf_counter()
        total = 0
        for i in range(1_000_000):
            total += i
        best = min(best, time.perf_counter() - started)
    return best * 1000


def _echo(sock: socket.socket) -> None:
    while data := sock.recv(64):
        sock.sendall(data)


def round_trip_us() -> float:
    """Median microseconds of a one-byte ping-pong with another process over a socket
    pair: what waking another process costs on this machine right now, which every
    Postgres and Redis round trip pays twice. A reading, like python_speed_ms."""
    ours, theirs = socket.socketpair()
    child = mp.get_context("fork").Process(target=_echo, args=(theirs,), daemon=True)
    child.start()
    theirs.close()
    times = []
    try:
        for _ in range(2000):
            started = time.perf_counter()
            ours.sendall(b"x")
            ours.recv(64)
            times.append(time.perf_counter() - started)
    finally:
        ours.close()
        child.join(timeout=5)
    times.sort()
    return times[len(times) // 2] * 1e6


def _process_cpu_seconds(pid: int) -> float:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    # utime and stime are fields 14 and 15 of /proc/<pid>/stat (index 11, 12 after the name).
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _peak_rss_of(pid: int) -> float:
    with suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return 0.0


class Postgres:
    def __init__(self, servers: Servers) -> None:
        self.servers = servers

    def _admin(self) -> Any:
        import psycopg

        return psycopg.connect(self.servers.database_url("postgres"), autocommit=True)

    def create(self, name: str) -> None:
        with self._admin() as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            conn.execute(f'CREATE DATABASE "{name}"')

    def drop(self, name: str) -> None:
        with self._admin() as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    def version(self) -> str:
        with self._admin() as conn:
            row = conn.execute("SHOW server_version").fetchone()
            return str(row[0]) if row else "?"


def flush_redis(url: str) -> None:
    import redis

    client = redis.Redis.from_url(url)
    try:
        client.flushdb()
    finally:
        client.close()


def _children_of(pid: int) -> list[int]:
    found: list[int] = []
    with suppress(OSError):
        for task in Path(f"/proc/{pid}/task").iterdir():
            found += [int(c) for c in (task / "children").read_text().split()]
    return found


def _percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return 0.0
    return ordered[min(len(ordered) - 1, round(fraction * (len(ordered) - 1)))]
