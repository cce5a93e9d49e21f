"""Spike benchmark: 100,000 events at once through the production processes, watching
worker memory, Redis, the backlog and whether ESP webhooks still get answered.

    python bench/spike.py [--n 100000] [--mode many|single] [--producers P] ...

One invocation creates its own Postgres database (mailauto_spike_<run>, dropped at the
end unless --keep-db) and flushes its own Redis database (SPIKE_REDIS_URL, default
redis://127.0.0.1:6379/9), sets up an event type, a published template, an active
automation and N contacts, then starts what the Procfile starts (the web server, a
`celery worker` on the Procfile's queues with its concurrency, and beat) plus the ESP
sandbox posting Delivery webhooks back to that web server. A probe POSTs Postmark
Delivery webhooks to the web server at a steady rate throughout; after a quiet spell,
N events are emitted as fast as possible. It samples memory, Redis, queue lengths and
the backlog until every message is sent and every Delivery webhook recorded, prints a
summary and writes every sample to bench/results/spike.json.

It prints figures and never passes or fails on the clock; it exits 1 only when a count
does not verify (an event not processed, a message not sent exactly once at the sandbox,
a Delivery webhook not recorded) or a process dies. See bench/README.md.
"""

from __future__ import annotations

import argparse
import base64
import http.client
import json
import multiprocessing as mp
import os
import platform
import queue
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
# `python bench/spike.py` puts bench/ on sys.path, not the project; spawned processes
# re-import this module, so they run this line too.
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench._setup import (  # noqa: E402  (needs ROOT on sys.path)
    DEFAULT_POSTGRES_URL,
    EVENT_TYPE,
    Postgres,
    Sandbox,
    Servers,
    StepFailed,
    _children_of,
    _free_port,
    _payload,
    _percentile,
    _process_cpu_seconds,
    flush_redis,
    run_processes,
    run_step,
    setup_mailauto,
)

RESULTS_DIR = ROOT / "bench" / "results"
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/9"
DATABASE_PREFIX = "mailauto_spike"
# The production settings, not bench/settings.py: the configured send rate limit, the
# configured batch sizes, prefetch and queues are what is measured.
SETTINGS_MODULE = "mailauto.settings"
WEBHOOK_PATH = "/webhooks/postmark/tracking/"
# kombu's Redis transport keeps a queue's messages in a list named after the queue, and
# those of priorities other than 0 in "<queue>\x06\x16<priority>" (priority_steps).
PRIORITY_SUFFIXES = ("", *(f"\x06\x16{p}" for p in (3, 6, 9)))
IN_PROGRESS_EVENTS = ("pending", "processing", "retrying")
IN_PROGRESS_MESSAGES = ("queued", "claimed", "sending", "unknown")
SENT_MESSAGES = ("sent", "delivered", "opened", "clicked")


# --- the Procfile ----------------------------------------------------------------------------


def procfile_command(name: str) -> list[str]:
    """The Procfile's command for `name`, with the venv's executables replaced by this
    interpreter (`python -m celery` for celery)."""
    for line in (ROOT / "Procfile").read_text().splitlines():
        if line.startswith(f"{name}:"):
            argv = shlex.split(line.split(":", 1)[1])
            break
    else:
        raise SystemExit(f"no '{name}' process in the Procfile")
    program = Path(argv[0]).name
    if program.startswith("python"):
        return [sys.executable, *argv[1:]]
    return [sys.executable, "-m", program, *argv[1:]]


def web_command(port: int) -> list[str]:
    argv = procfile_command("web")
    if "--static-path-mount" in argv:  # the admin's CSS: not needed here, and not collected
        at = argv.index("--static-path-mount")
        del argv[at : at + 2]
    if "--port" in argv:  # granian, gunicorn-style options
        argv[argv.index("--port") + 1] = str(port)
        return argv
    # runserver's addrport: the one argument that is host:port.
    return [f"127.0.0.1:{port}" if _is_addrport(arg) else arg for arg in argv]


def _is_addrport(arg: str) -> bool:
    host, _, port = arg.rpartition(":")
    return bool(host) and port.isdigit() and not arg.startswith("-")


def worker_queues(argv: list[str]) -> list[str]:
    for flag in ("-Q", "--queues"):
        if flag in argv:
            return argv[argv.index(flag) + 1].split(",")
    return ["celery"]


# --- steps that run inside Django processes ------------------------------------------------


def seed_probe_messages(*, count: int) -> dict[str, Any]:
    """`count` messages the ESP already took (status sent, no event), for the probe's
    Delivery webhooks to be about; and the webhook secret the web server checks."""
    from django.conf import settings
    from django.utils import timezone

    from campaigns.models import Message, TemplateVersion

    version = TemplateVersion.objects.filter(status=TemplateVersion.Status.PUBLISHED).first()
    now = timezone.now()
    messages = Message.objects.bulk_create(
        [
            Message(
                idempotency_key=f"spike-probe-{i}",
                to_email=f"probe{i}@probe.example.com",
                template_version=version,
                purpose="onboarding",
                status=Message.Status.SENT,
                esp_message_id=str(uuid.uuid4()),
                sent_at=now,
            )
            for i in range(count)
        ],
        batch_size=2000,
    )
    return {
        "messages": [(m.pk, m.esp_message_id, m.to_email) for m in messages],
        "webhook_secret": str(settings.ANYMAIL["WEBHOOK_SECRET"]),
    }


def producer_prepare(*, mode: str, index: int, producers: int, n: int, chunk: int) -> None:
    """Connect to Postgres and Redis before the clock starts."""
    from django.db import connection

    from campaigns.models import EventType

    EventType.objects.get(name=EVENT_TYPE)
    connection.ensure_connection()


def producer(state: None, *, mode: str, index: int, producers: int, n: int, chunk: int) -> dict[str, Any]:
    """One producer's share of the spike: events for users u<i>, i ≡ index (mod producers).
    mode "many": emit_many() of `chunk` events a transaction; "single": emit(), one event a
    transaction, as a web request would."""
    import resource

    from django.db import transaction

    import campaigns

    mine = range(index, n, producers)
    started_at = time.time()
    tick = time.perf_counter()
    transaction_ms: list[float] = []
    if mode == "many":
        for offset in range(0, len(mine), chunk):
            began = time.perf_counter()
            with transaction.atomic():
                campaigns.emit_many(
                    [
                        {"event_type": EVENT_TYPE, "user_id": f"u{i}", "payload": _payload(i)}
                        for i in mine[offset : offset + chunk]
                    ],
                    source="spike",
                )
            transaction_ms.append((time.perf_counter() - began) * 1000)
    else:
        for i in mine:
            began = time.perf_counter()
            with transaction.atomic():
                campaigns.emit(EVENT_TYPE, f"u{i}", _payload(i), source="spike")
            transaction_ms.append((time.perf_counter() - began) * 1000)
    return {
        "events": len(mine),
        "started_at": started_at,
        "finished_at": time.time(),
        "seconds": time.perf_counter() - tick,
        "transaction_p50_ms": _percentile(transaction_ms, 0.5),
        "transaction_p99_ms": _percentile(transaction_ms, 0.99),
        "transaction_max_ms": max(transaction_ms, default=0.0),
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


# --- the webhook probe (its own process, no Django) ------------------------------------------


def probe_main(
    port: int,
    auth: str,
    messages: list[tuple[int, str, str]],
    rate: float,
    threads: int,
    stop: Any,
    out: Any,
) -> None:
    """POST a distinct Postmark Delivery webhook every 1/rate seconds on a fixed schedule,
    from `threads` kept-alive connections, until `stop` is set; put a list of
    (scheduled wall time, latency from the schedule, request-to-response time, status)
    on `out`. Latency counts from the schedule, so a slow server also delays the probes
    queued behind it (no coordinated omission)."""
    from mailauto.sandbox.postmark import webhook_payload

    headers = {"Content-Type": "application/json", "Authorization": auth, "User-Agent": "Postmark"}
    jobs: queue.SimpleQueue[tuple[float, float, bytes] | None] = queue.SimpleQueue()
    results: list[tuple[float, float, float, int | str]] = []
    lock = threading.Lock()

    def connect() -> http.client.HTTPConnection:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        conn.connect()
        conn.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return conn

    def client() -> None:
        conn: http.client.HTTPConnection | None = None
        while (job := jobs.get()) is not None:
            due, due_wall, body = job
            sent = time.monotonic()
            status: int | str
            try:
                conn = conn or connect()
                conn.request("POST", WEBHOOK_PATH, body=body, headers=headers)
                response = conn.getresponse()
                response.read()
                status = response.status
                if response.will_close:
                    conn.close()
                    conn = None
            except (OSError, http.client.HTTPException) as err:
                status = type(err).__name__
                if conn is not None:
                    conn.close()
                conn = None
            done = time.monotonic()
            with lock:
                results.append((due_wall, done - due, done - sent, status))
        if conn is not None:
            conn.close()

    pool = [threading.Thread(target=client, daemon=True) for _ in range(threads)]
    for thread in pool:
        thread.start()
    started = time.monotonic()
    wall_offset = time.time() - started
    count = 0
    while True:
        due = started + count / rate
        if stop.wait(max(0.0, due - time.monotonic())):
            break
        pk, esp_message_id, email = messages[count % len(messages)]
        # DeliveredAt is now: a message probed twice gives two distinct events.
        record = {"message_id": esp_message_id, "metadata": {"mailauto_message_id": str(pk)}, "tag": ""}
        body = json.dumps(webhook_payload("Delivery", record, email)).encode()
        jobs.put((due, due + wall_offset, body))
        count += 1
    for _ in pool:
        jobs.put(None)
    for thread in pool:
        thread.join(timeout=65)
    with lock:
        out.put(list(results))


# --- sampling --------------------------------------------------------------------------------


def _rss_mb(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def _hwm_mb(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


@dataclass
class Processes:
    """The long-running processes of one run, by role."""

    web: subprocess.Popen[bytes] | None = None
    worker: subprocess.Popen[bytes] | None = None
    beat: subprocess.Popen[bytes] | None = None
    sandbox: Sandbox | None = None
    pool: list[int] = field(default_factory=list)  # the worker's pool processes, once seen
    web_workers: list[int] = field(default_factory=list)  # a multi-process server's workers

    def roles(self) -> dict[str, int]:
        """role -> pid of every process whose memory is watched."""
        roles: dict[str, int] = {}
        if self.worker is not None:
            roles["worker main"] = self.worker.pid
            for pid in _children_of(self.worker.pid):
                if pid not in self.pool:
                    self.pool.append(pid)
            for number, pid in enumerate(self.pool, 1):
                roles[f"worker pool {number} (pid {pid})"] = pid
        if self.web is not None:
            roles["web"] = self.web.pid
            # granian (the Procfile's server) runs the app in worker processes.
            for pid in _children_of(self.web.pid):
                if pid not in self.web_workers:
                    self.web_workers.append(pid)
            for number, pid in enumerate(self.web_workers, 1):
                roles[f"web worker {number} (pid {pid})"] = pid
        if self.beat is not None:
            roles["beat"] = self.beat.pid
        if self.sandbox is not None and self.sandbox.process is not None:
            roles["sandbox (the ESP)"] = self.sandbox.process.pid
        return roles


class Sampler(threading.Thread):
    """Every `interval` seconds: RSS of every process, Redis memory and queue lengths,
    the outbox backlog, messages by status, tracking events and the sandbox's counters;
    and the lag of each Delivery webhook recorded since the last sample."""

    def __init__(
        self,
        *,
        interval: float,
        database_url: str,
        redis_url: str,
        queues: list[str],
        processes: Processes,
        sandbox_url: str,
        t0: float,
        print_every: float,
    ) -> None:
        super().__init__(daemon=True)
        self.interval = interval
        self.database_url = database_url
        self.redis_url = redis_url
        self.queues = queues
        self.processes = processes
        self.sandbox_url = sandbox_url
        self.t0 = t0
        self.print_every = print_every
        self.samples: list[dict[str, Any]] = []
        self.lags: list[tuple[float, float]] = []  # (received at, seconds after sent_at)
        self.latest: dict[str, Any] = {}
        self.stopping = threading.Event()
        self.error: str | None = None
        self._last_tracking_id = 0
        self._printed_at = -1e9

    def run(self) -> None:
        import psycopg
        import redis

        from mailauto.sandbox.client import SandboxClient

        db = psycopg.connect(self.database_url, autocommit=True)
        broker = redis.Redis.from_url(self.redis_url)
        sandbox = SandboxClient(self.sandbox_url, timeout=5)
        try:
            while True:
                began = time.monotonic()
                try:
                    sample = self._sample(db, broker, sandbox)
                except Exception as err:  # keep sampling through a hiccup; say so
                    self.error = repr(err)
                else:
                    self.samples.append(sample)
                    self.latest = sample
                    self._maybe_print(sample)
                if self.stopping.wait(max(0.0, self.interval - (time.monotonic() - began))):
                    break
        finally:
            db.close()
            broker.close()
            sandbox.close()

    def stop(self) -> None:
        self.stopping.set()
        self.join(timeout=30)

    def _sample(self, db: Any, broker: Any, sandbox: Any) -> dict[str, Any]:
        at = time.time()
        rss = {role: _rss_mb(pid) for role, pid in self.processes.roles().items()}
        memory = broker.info("memory")
        pipe = broker.pipeline(transaction=False)
        for name in self.queues:
            for suffix in PRIORITY_SUFFIXES:
                pipe.llen(name + suffix)
        pipe.hlen("unacked")
        lengths = pipe.execute()
        queue_lengths = {
            name: sum(lengths[i * len(PRIORITY_SUFFIXES) : (i + 1) * len(PRIORITY_SUFFIXES)])
            for i, name in enumerate(self.queues)
        }
        row = db.execute(
            """
            SELECT
              (SELECT count(*) FROM campaigns_outboxevent WHERE status = ANY(%s)),
              (SELECT count(*) FROM campaigns_outboxevent),
              (SELECT count(*) FROM webhooks_trackingevent)
            """,
            [list(IN_PROGRESS_EVENTS)],
        ).fetchone()
        messages = dict(
            db.execute(
                "SELECT status, count(*) FROM campaigns_message WHERE event_id IS NOT NULL GROUP BY status"
            ).fetchall()
        )
        # Delivery webhooks recorded since the last sample, for spike messages: how long
        # after the worker recorded the ESP's answer (sent_at) the webhook was stored.
        lags = db.execute(
            """
            SELECT te.id, extract(epoch FROM te.received_at),
                   extract(epoch FROM te.received_at - m.sent_at)
            FROM webhooks_trackingevent te JOIN campaigns_message m ON m.id = te.message_id
            WHERE te.id > %s AND m.event_id IS NOT NULL AND te.event_type = 'delivered'
            ORDER BY te.id
            """,
            [self._last_tracking_id],
        ).fetchall()
        if lags:
            self._last_tracking_id = lags[-1][0]
            self.lags += [(float(received), float(lag)) for _, received, lag in lags]
        stats = sandbox.stats()
        return {
            "t": at - self.t0,
            "at": at,
            "rss_mb": rss,
            "redis_used_mb": memory["used_memory"] / 2**20,
            "queues": queue_lengths,
            "unacked": lengths[-1],
            "backlog": row[0],
            "events": row[1],
            "tracking_events": row[2],
            "messages": messages,
            "in_progress": sum(messages.get(s, 0) for s in IN_PROGRESS_MESSAGES),
            "sent": sum(messages.get(s, 0) for s in SENT_MESSAGES),
            "sandbox_accepted": int(stats["accepted"]),
            "sandbox_webhooks_pending": int(stats["webhooks_pending"]),
            "sandbox_webhooks_failed": int(stats["webhooks_failed"]),
            "webhook_lag_p50_s": _percentile([float(x[2]) for x in lags], 0.5) if lags else None,
            "webhook_lag_max_s": max(float(x[2]) for x in lags) if lags else None,
        }

    def _maybe_print(self, s: dict[str, Any]) -> None:
        if s["t"] - self._printed_at < self.print_every:
            return
        if self._printed_at < -1e8:
            print(
                f"{'t':>6} {'backlog':>8} {'queued':>7} {'sent':>7} {'tracked':>8} {'ESP whk q':>9} "
                + " ".join(f"{'Q ' + q[:6]:>8}" for q in self.queues)
                + f" {'unacked':>7} {'redis MB':>8} {'pool RSS MB':>12} {'web MB':>7} {'whk lag s':>9}",
                flush=True,
            )
        self._printed_at = s["t"]
        pool = [v for k, v in s["rss_mb"].items() if k.startswith("worker pool") and v is not None]
        lag = s["webhook_lag_p50_s"]
        print(
            f"{s['t']:>6.0f} {s['backlog']:>8,} {s['in_progress']:>7,} {s['sent']:>7,} "
            f"{s['tracking_events']:>8,} {s['sandbox_webhooks_pending']:>9,} "
            + " ".join(f"{s['queues'][q]:>8,}" for q in self.queues)
            + f" {s['unacked']:>7} {s['redis_used_mb']:>8.1f} "
            f"{'/'.join(f'{v:.0f}' for v in pool):>12} {s['rss_mb'].get('web') or 0:>7.0f} "
            f"{'—' if lag is None else f'{lag:.1f}':>9}",
            flush=True,
        )


# --- the run ---------------------------------------------------------------------------------


@dataclass
class Plan:
    n: int
    mode: str
    producers: int
    chunk: int
    probe_rate: float
    probe_threads: int
    baseline_seconds: float
    after_seconds: float
    interval: float
    print_every: float
    latency_ms: float
    max_seconds: float
    beat: bool
    log_level: str
    keep_db: bool


def _wait_for(predicate: Any, *, timeout: float, what: str, process: Any = None) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if process is not None and process.poll() is not None:
            raise StepFailed(f"{what}: the process exited ({process.returncode})")
        if time.monotonic() > deadline:
            raise StepFailed(f"{what}: not within {timeout:.0f} s")
        time.sleep(0.2)


def _http_ok(port: int, path: str) -> bool:
    try:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
        conn.request("GET", path)
        status = conn.getresponse().status
        conn.close()
        return status == 200
    except (OSError, http.client.HTTPException):
        return False


def _stop(process: subprocess.Popen[bytes] | None, *, timeout: float = 30) -> None:
    if process is None or process.poll() is not None:
        return
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


class Spike:
    def __init__(self, plan: Plan, servers: Servers, run_id: str) -> None:
        self.plan = plan
        self.servers = servers
        self.run_id = run_id
        self.postgres = Postgres(servers)
        self.failures: list[str] = []
        self.notes: list[str] = []
        self.database = f"{DATABASE_PREFIX}_{run_id}"
        self.logs = {name: RESULTS_DIR / f"spike-{name}.log" for name in ("web", "worker", "beat", "sandbox")}

    @contextmanager
    def own_database(self) -> Iterator[None]:
        self.postgres.create(self.database)
        try:
            yield
        finally:
            if not self.plan.keep_db:
                self.postgres.drop(self.database)

    def run(self) -> dict[str, Any]:
        with self.own_database():
            return self._run()

    def _run(self) -> dict[str, Any]:
        plan = self.plan
        flush_redis(self.servers.redis_url)
        web_port = _free_port()
        web_url = f"http://127.0.0.1:{web_port}"
        # The sandbox's URL is not known before it starts; setup never sends.
        env = self._env("http://127.0.0.1:9/")
        print(f"setup: database {self.database}, {plan.n:,} contacts …", flush=True)
        setup = run_step(setup_mailauto, env, n=plan.n, events=False, timeout=1800)
        # Enough distinct probe messages for a few minutes; then they repeat (a repeat is a
        # new event, DeliveredAt differs, and a no-op status update).
        probe = run_step(seed_probe_messages, env, count=max(100, int(plan.probe_rate * 300)))
        secret = probe["webhook_secret"]
        auth = "Basic " + base64.b64encode(secret.encode()).decode()

        processes = Processes()
        sandbox = Sandbox(
            latency_ms=plan.latency_ms,
            log_path=self.logs["sandbox"],
            webhook_url=web_url + WEBHOOK_PATH,
            webhook_auth=secret,
        )
        probe_stop = mp.get_context("spawn").Event()
        probe_out = mp.get_context("spawn").Queue()
        probe_process = None
        sampler: Sampler | None = None
        result: dict[str, Any] = {"setup": setup, "database": self.database}
        try:
            sandbox.start()
            processes.sandbox = sandbox
            env = self._env(sandbox.url)
            worker_argv = [*procfile_command("worker"), "-n", f"spike-{self.run_id}@%h"]
            queues = worker_queues(worker_argv)
            commands = {"web": web_command(web_port), "worker": worker_argv}
            if plan.beat:
                commands["beat"] = procfile_command("beat")
            result["commands"] = {k: shlex.join(v) for k, v in commands.items()}
            processes.web = self._popen(commands["web"], env, "web")
            _wait_for(
                lambda: _http_ok(web_port, "/health/"),
                timeout=60,
                what="the web server",
                process=processes.web,
            )
            processes.worker = self._popen(commands["worker"], env, "worker")
            _wait_for(
                lambda: b"ready." in self.logs["worker"].read_bytes(),
                timeout=90,
                what="the Celery worker",
                process=processes.worker,
            )
            if plan.beat:
                processes.beat = self._popen(commands["beat"], env, "beat")
            for role, command in result["commands"].items():
                print(f"{role}: {command}", flush=True)
            print(f"sandbox: {sandbox.url} → webhooks to {web_url}{WEBHOOK_PATH}", flush=True)

            t0 = time.time()
            sampler = Sampler(
                interval=plan.interval,
                database_url=self.servers.database_url(self.database),
                redis_url=self.servers.redis_url,
                queues=queues,
                processes=processes,
                sandbox_url=sandbox.url,
                t0=t0,
                print_every=plan.print_every,
            )
            sampler.start()
            ctx = mp.get_context("spawn")
            probe_process = ctx.Process(
                target=probe_main,
                args=(
                    web_port,
                    auth,
                    probe["messages"],
                    plan.probe_rate,
                    plan.probe_threads,
                    probe_stop,
                    probe_out,
                ),
                daemon=True,
            )
            probe_process.start()
            print(
                f"\nprobe: {plan.probe_rate:g} Delivery webhooks/s to {WEBHOOK_PATH}; "
                f"{plan.baseline_seconds:g} s before the spike …",
                flush=True,
            )
            time.sleep(plan.baseline_seconds)
            result["idle"] = sampler.latest

            label = (
                f"emit_many(), {plan.chunk:,} a transaction"
                if plan.mode == "many"
                else "emit(), one a transaction"
            )
            print(f"\nspike: {plan.n:,} events, {plan.producers} producer(s), {label}", flush=True)
            kwargs = [
                {"mode": plan.mode, "index": i, "producers": plan.producers, "n": plan.n, "chunk": plan.chunk}
                for i in range(plan.producers)
            ]
            released_at, reports = run_processes(
                producer, env, kwargs, timeout=plan.max_seconds, prepare=producer_prepare
            )
            emitted_at = max(r["finished_at"] for r in reports)
            result["producers"] = reports
            print(f"emitted {plan.n:,} events in {emitted_at - released_at:.1f} s", flush=True)

            drained_at = self._wait_drained(sampler, processes, deadline=released_at + plan.max_seconds)
            print("backlog drained; waiting for the Delivery webhooks …", flush=True)
            webhooks_done_at = self._wait_webhooks(sampler, processes, deadline=drained_at + plan.max_seconds)
            time.sleep(plan.after_seconds)
            probe_stop.set()
            probe_results = probe_out.get(timeout=120)
            probe_process.join(timeout=30)
            stopped_at = time.time()
            time.sleep(plan.interval * 1.5)  # one more sample
            roles = processes.roles()
            result["rss_hwm_mb"] = {role: _hwm_mb(pid) for role, pid in roles.items()}
            result["cpu_s"] = {role: _process_cpu_seconds(pid) for role, pid in roles.items()}
            sampler.stop()
            result.update(
                t0=t0,
                released_at=released_at,
                emitted_at=emitted_at,
                drained_at=drained_at,
                webhooks_done_at=webhooks_done_at,
                stopped_at=stopped_at,
                samples=sampler.samples,
                sampler_error=sampler.error,
                probe=probe_results,
                lags=sampler.lags,
            )
            result["verify"] = self._verify(sandbox)
            return result
        finally:
            probe_stop.set()
            if probe_process is not None and probe_process.is_alive():
                probe_process.join(timeout=5)
                if probe_process.is_alive():
                    probe_process.kill()
            if sampler is not None and sampler.is_alive():
                sampler.stop()
            for process in (processes.beat, processes.worker, processes.web):
                _stop(process)
            for pid in processes.pool:  # a pool process the worker left behind
                with suppress(OSError):
                    os.kill(pid, signal.SIGKILL)
            sandbox.stop()
            with suppress(Exception):
                flush_redis(self.servers.redis_url)

    def _env(self, sandbox_url: str) -> dict[str, str]:
        env = self.servers.child_env(self.database, sandbox_url)
        env["DJANGO_SETTINGS_MODULE"] = SETTINGS_MODULE
        env["LOG_LEVEL"] = self.plan.log_level
        env["PYTHONUNBUFFERED"] = "1"
        return env

    def _popen(self, command: list[str], env: dict[str, str], name: str) -> subprocess.Popen[bytes]:
        with self.logs[name].open("wb") as log:
            return subprocess.Popen(
                command, cwd=ROOT, env={**os.environ, **env}, stdout=log, stderr=subprocess.STDOUT
            )

    def _check_alive(self, processes: Processes) -> None:
        for name, process in (("web", processes.web), ("worker", processes.worker), ("beat", processes.beat)):
            if process is not None and process.poll() is not None:
                raise StepFailed(f"the {name} process exited ({process.returncode}); see {self.logs[name]}")

    def _wait_drained(self, sampler: Sampler, processes: Processes, *, deadline: float) -> float:
        """Until every event is processed and every message final (sent, or worse)."""
        while True:
            self._check_alive(processes)
            s = sampler.latest
            fresh = bool(s) and s["at"] > time.time() - 5
            if (
                fresh
                and s["events"] >= self.plan.n
                and not s["backlog"]
                and not s["in_progress"]
                and sum(s["messages"].values()) >= self.plan.n
            ):
                return float(s["at"])
            if time.time() > deadline:
                self.notes.append("stopped waiting for the backlog at --max-seconds")
                return time.time()
            time.sleep(0.2)

    def _wait_webhooks(self, sampler: Sampler, processes: Processes, *, deadline: float) -> float:
        """Until the sandbox has no webhook left to post (each recorded or failed)."""
        while True:
            self._check_alive(processes)
            s = sampler.latest
            fresh = bool(s) and s["at"] > time.time() - 5
            if fresh and s["sandbox_webhooks_pending"] == 0 and s["sandbox_accepted"] >= self.plan.n:
                return float(s["at"])
            if time.time() > deadline:
                self.notes.append("stopped waiting for webhooks at --max-seconds")
                return time.time()
            time.sleep(0.2)

    def _verify(self, sandbox: Sandbox) -> dict[str, Any]:
        """Every event processed; every message sent exactly once at the sandbox; every
        Delivery webhook recorded, once."""
        import psycopg

        n = self.plan.n
        with psycopg.connect(self.servers.database_url(self.database), autocommit=True) as db:
            events = dict(db.execute("SELECT status, count(*) FROM campaigns_outboxevent GROUP BY status"))
            messages = dict(
                db.execute(
                    "SELECT status, count(*) FROM campaigns_message WHERE event_id IS NOT NULL GROUP BY status"
                )
            )
            ours = {
                int(pk): esp_id
                for pk, esp_id in db.execute(
                    "SELECT id, esp_message_id FROM campaigns_message WHERE event_id IS NOT NULL"
                )
            }
            delivered_events, delivered_messages = db.execute(
                """
                SELECT count(*), count(DISTINCT te.message_id)
                FROM webhooks_trackingevent te JOIN campaigns_message m ON m.id = te.message_id
                WHERE m.event_id IS NOT NULL AND te.event_type = 'delivered'
                """
            ).fetchone()
            first_sent, last_sent, last_processed = db.execute(
                """
                SELECT extract(epoch FROM min(m.sent_at)), extract(epoch FROM max(m.sent_at)),
                       (SELECT extract(epoch FROM max(processed_at)) FROM campaigns_outboxevent)
                FROM campaigns_message m WHERE m.event_id IS NOT NULL
                """
            ).fetchone()
            first_recorded, last_recorded = db.execute(
                """
                SELECT extract(epoch FROM min(te.received_at)), extract(epoch FROM max(te.received_at))
                FROM webhooks_trackingevent te JOIN campaigns_message m ON m.id = te.message_id
                WHERE m.event_id IS NOT NULL AND te.event_type = 'delivered'
                """
            ).fetchone()
            tracking_total = db.execute("SELECT count(*) FROM webhooks_trackingevent").fetchone()[0]
            probe_events = db.execute(
                """
                SELECT count(*) FROM webhooks_trackingevent te JOIN campaigns_message m ON m.id = te.message_id
                WHERE m.event_id IS NULL
                """
            ).fetchone()[0]
            recorded_at = {
                esp_id: float(at)
                for esp_id, at in db.execute(
                    """
                    SELECT te.esp_message_id, extract(epoch FROM te.received_at)
                    FROM webhooks_trackingevent te JOIN campaigns_message m ON m.id = te.message_id
                    WHERE m.event_id IS NOT NULL AND te.event_type = 'delivered'
                    """
                )
            }
        # What the sandbox took, record by record (no bodies are kept).
        records: list[dict[str, Any]] = []
        while True:
            page = sandbox.client.messages(since_index=len(records), limit=10_000)
            if not page:
                break
            records += page
        stats = sandbox.stats()
        by_our_id: dict[int, int] = {}
        for record in records:
            pk = int((record.get("metadata") or {}).get("mailauto_message_id", 0))
            by_our_id[pk] = by_our_id.get(pk, 0) + 1
        twice = sum(1 for count in by_our_id.values() if count > 1)
        never = sum(1 for pk in ours if pk not in by_our_id)
        strangers = sum(1 for pk in by_our_id if pk not in ours)
        esp_ids_match = all(ours[pk] for pk in ours) and {r["message_id"] for r in records} == set(
            ours.values()
        )
        # The lag from the sandbox accepting a message to its Delivery webhook being stored.
        lags = [
            recorded_at[r["message_id"]] - _epoch(r["received_at"])
            for r in records
            if r["message_id"] in recorded_at
        ]
        processed = events.get("processed", 0)
        sent = sum(messages.get(s, 0) for s in SENT_MESSAGES)
        checks = {
            f"events: {n:,} emitted, {processed:,} processed": sum(events.values()) == n == processed,
            f"messages: {sum(messages.values()):,} created, {sent:,} sent": sum(messages.values())
            == n
            == sent,
            f"sandbox: {int(stats['accepted']):,} accepted in {int(stats['requests']):,} requests, "
            f"{len(by_our_id):,} distinct messages, {twice} twice, {never} never, {strangers} unknown": (
                int(stats["accepted"]) == len(records) == n and not twice and not never and not strangers
            ),
            "sandbox message ids = the ESP ids recorded in the database": esp_ids_match,
            f"Delivery webhooks: {delivered_events:,} recorded for {delivered_messages:,} messages, "
            f"{int(stats['webhooks_failed'])} failed at the sandbox": (
                delivered_events == delivered_messages == n and not int(stats["webhooks_failed"])
            ),
        }
        for check, ok in checks.items():
            if not ok:
                self.failures.append(check)
        return {
            "events_by_status": events,
            "messages_by_status": messages,
            "sandbox_stats": stats,
            "probe_tracking_events": probe_events,
            "accept_to_recorded_s": lags,
            "checks": checks,
            "first_sent_at": _float(first_sent),
            "last_sent_at": _float(last_sent),
            "last_processed_at": _float(last_processed),
            "first_delivery_recorded_at": _float(first_recorded),
            "last_delivery_recorded_at": _float(last_recorded),
            "tracking_events": tracking_total,
        }


def _float(value: Any) -> float | None:
    return None if value is None else float(value)


def _epoch(iso: str) -> float:
    return datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp()


# --- the summary ------------------------------------------------------------------------------


def _dist(values: list[float], scale: float = 1.0) -> dict[str, float | int]:
    return {
        "count": len(values),
        "p50": _percentile(values, 0.5) * scale,
        "p99": _percentile(values, 0.99) * scale,
        "max": max(values, default=0.0) * scale,
    }


def summarise(result: dict[str, Any], plan: Plan) -> dict[str, Any]:
    samples = result["samples"]
    released, emitted, drained = result["released_at"], result["emitted_at"], result["drained_at"]
    webhooks_done = result["webhooks_done_at"]
    phases = {
        "before the spike": (0.0, released),
        "during: emitting": (released, emitted),
        "during: draining": (emitted, drained),
        "during (emit → drained)": (released, drained),
        "after: webhook tail": (drained, webhooks_done),
        "after: idle": (webhooks_done, float("inf")),
    }
    warm = 2.0  # the probe's first connections and the web server's first requests
    probe_start = min((p[0] for p in result["probe"]), default=0.0) + warm
    probe: dict[str, Any] = {}
    for name, (start, end) in phases.items():
        rows = [p for p in result["probe"] if max(start, probe_start) <= p[0] < end]
        ok = [p for p in rows if p[3] == 200]
        errors: dict[str, int] = {}
        for p in rows:
            if p[3] != 200:
                errors[str(p[3])] = errors.get(str(p[3]), 0) + 1
        probe[name] = {
            "latency_ms": _dist([p[1] for p in ok], 1000),
            "service_ms": _dist([p[2] for p in ok], 1000),
            "errors": errors,
        }
    roles = sorted({role for s in samples for role in s["rss_mb"]})
    during = [s for s in samples if released <= s["at"] <= drained]
    idle = result.get("idle") or (samples[0] if samples else {})
    rss = {}
    for role in roles:
        values = [s["rss_mb"].get(role) for s in samples if s["rss_mb"].get(role) is not None]
        rss[role] = {
            "idle": (idle.get("rss_mb") or {}).get(role),
            "peak_sampled": max(values, default=None),
            "peak_hwm": result["rss_hwm_mb"].get(role),
            "final": values[-1] if values else None,
        }
    # Does worker memory follow the backlog? Pool RSS at the biggest backlog vs when it
    # was nearly gone: equal means memory is bounded by a batch, not by the backlog.
    biggest = max(during, key=lambda s: s["backlog"] + s["in_progress"], default=None)
    late = [s for s in during if s["backlog"] + s["in_progress"] <= 0.1 * plan.n]
    queues = sorted({q for s in samples for q in s["queues"]})
    verify = result["verify"]
    last_sent_at = verify["last_sent_at"] or drained
    last_processed_at = verify["last_processed_at"] or drained
    first_sent_at = verify["first_sent_at"] or released
    first_recorded = verify["first_delivery_recorded_at"] or released
    last_recorded = verify["last_delivery_recorded_at"] or webhooks_done
    cpu = result.get("cpu_s") or {}
    pool_cpu = sum(v for k, v in cpu.items() if k.startswith("worker pool"))
    return {
        "probe": probe,
        "rss_mb": rss,
        "pool_rss_at_biggest_backlog": biggest
        and {
            "backlog": biggest["backlog"] + biggest["in_progress"],
            "rss_mb": {k: v for k, v in biggest["rss_mb"].items() if k.startswith("worker")},
        },
        "pool_rss_when_nearly_drained": late
        and {
            "backlog": late[-1]["backlog"] + late[-1]["in_progress"],
            "rss_mb": {k: v for k, v in late[-1]["rss_mb"].items() if k.startswith("worker")},
        },
        "redis_used_mb": {
            "idle": idle.get("redis_used_mb"),
            "peak": max((s["redis_used_mb"] for s in samples), default=None),
            "final": samples[-1]["redis_used_mb"] if samples else None,
        },
        "queue_lengths": {
            q: {
                "peak": max((s["queues"][q] for s in samples), default=0),
                "final": samples[-1]["queues"][q] if samples else 0,
            }
            for q in queues
        },
        "unacked_peak": max((s["unacked"] for s in samples), default=0),
        "backlog_peak": max((s["backlog"] for s in samples), default=0),
        "queued_messages_peak": max((s["in_progress"] for s in samples), default=0),
        "sandbox_webhook_queue_peak": max((s["sandbox_webhooks_pending"] for s in samples), default=0),
        "emit_seconds": emitted - released,
        "events_per_s_emitted": plan.n / max(emitted - released, 1e-9),
        "drain_seconds": drained - released,
        "last_processed_seconds": last_processed_at - released,
        "last_sent_seconds": last_sent_at - released,
        "emails_per_s": plan.n / max(last_sent_at - released, 1e-9),
        "emails_per_s_while_sending": plan.n / max(last_sent_at - first_sent_at, 1e-9),
        "webhooks_done_seconds": last_recorded - released,
        "delivery_webhooks_per_s": plan.n / max(last_recorded - first_recorded, 1e-9),
        "worker_cpu_ms_per_email": pool_cpu * 1000 / plan.n,
        "web_cpu_ms_per_webhook": sum(v for k, v in cpu.items() if k.startswith("web"))
        * 1000
        / max(verify["tracking_events"], 1),
        "accept_to_recorded_s": _dist(result["verify"]["accept_to_recorded_s"]),
    }


def _f(value: float | None, spec: str = ".0f") -> str:
    return "—" if value is None else format(value, spec)


def print_summary(summary: dict[str, Any], result: dict[str, Any], plan: Plan) -> None:
    print("\n== summary ==")
    print(
        f"spike: {plan.n:,} events emitted in {summary['emit_seconds']:.1f} s "
        f"({summary['events_per_s_emitted']:,.0f} events/s); backlog drained (every message final) "
        f"{summary['drain_seconds']:.1f} s after the first emit; last event processed at "
        f"{summary['last_processed_seconds']:.1f} s, last message sent at {summary['last_sent_seconds']:.1f} s "
        f"→ {summary['emails_per_s']:,.0f} emails/s end to end ({summary['emails_per_s_while_sending']:,.0f}/s "
        f"from the first send); last Delivery webhook recorded at {summary['webhooks_done_seconds']:.1f} s "
        f"→ {summary['delivery_webhooks_per_s']:,.0f} Delivery webhooks/s recorded"
    )
    print(
        f"CPU: {summary['worker_cpu_ms_per_email']:.2f} ms per email in the worker pool, "
        f"{summary['web_cpu_ms_per_webhook']:.2f} ms per webhook (spike's and probe's) in the web process"
    )
    print("\nmemory (RSS, MB)              idle    peak (sampled / high-water)   final")
    for role, r in summary["rss_mb"].items():
        print(
            f"  {role:<28} {_f(r['idle']):>5}    {_f(r['peak_sampled']):>6} / {_f(r['peak_hwm']):>6}"
            f"              {_f(r['final']):>5}"
        )
    big, late = summary["pool_rss_at_biggest_backlog"], summary["pool_rss_when_nearly_drained"]
    if big:
        pool = ", ".join(f"{_f(v)}" for k, v in big["rss_mb"].items())
        print(f"  worker RSS at the biggest backlog ({big['backlog']:,} events+messages): {pool}")
    if late:
        pool = ", ".join(f"{_f(v)}" for k, v in late["rss_mb"].items())
        print(f"  worker RSS with the backlog nearly gone ({late['backlog']:,}): {pool}")
    r = summary["redis_used_mb"]
    print(
        f"\nRedis used_memory: idle {_f(r['idle'], '.1f')} MB, peak {_f(r['peak'], '.1f')} MB, "
        f"final {_f(r['final'], '.1f')} MB"
    )
    print(
        "queue lengths (LLEN), peak / final: "
        + ", ".join(f"{q} {v['peak']}/{v['final']}" for q, v in summary["queue_lengths"].items())
        + f"; unacked peak {summary['unacked_peak']}"
    )
    print(
        f"backlog peak: {summary['backlog_peak']:,} outbox events, {summary['queued_messages_peak']:,} "
        f"messages not yet sent; the sandbox's own webhook queue (the ESP's side) peaked at "
        f"{summary['sandbox_webhook_queue_peak']:,}"
    )
    print(
        f"\nwebhook probe ({plan.probe_rate:g}/s, Postmark Delivery, basic auth): latency from schedule "
        "(request → response in brackets), ms"
    )
    print(f"  {'phase':<26} {'count':>6} {'p50':>8} {'p99':>8} {'max':>8}    errors")
    for phase, p in summary["probe"].items():
        lat, svc = p["latency_ms"], p["service_ms"]
        print(
            f"  {phase:<26} {lat['count']:>6} {lat['p50']:>8.1f} {lat['p99']:>8.1f} {lat['max']:>8.1f}"
            f"    {p['errors'] or 'none'}  ({svc['p50']:.1f} / {svc['p99']:.1f} / {svc['max']:.1f})"
        )
    lag = summary["accept_to_recorded_s"]
    print(
        f"\nDelivery webhook lag, sandbox accepted → TrackingEvent stored: p50 {lag['p50']:.1f} s, "
        f"p99 {lag['p99']:.1f} s, max {lag['max']:.1f} s ({lag['count']:,} messages)"
    )
    print("\ncounts:")
    for check, ok in result["verify"]["checks"].items():
        print(f"  {'ok  ' if ok else 'FAIL'} {check}")
    print(f"  (probe: {result['verify']['probe_tracking_events']:,} probe tracking events stored)")
    cpu = result.get("cpu_s") or {}
    if cpu:
        print("\nCPU seconds used (whole run): " + ", ".join(f"{k} {v:.0f}" for k, v in cpu.items()))


# --- command line ----------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="bench/spike.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--n", type=int, default=100_000, help="events in the spike (default 100000)")
    parser.add_argument(
        "--mode",
        choices=("many", "single"),
        default="many",
        help="many: emit_many() in transactions of --chunk (default); single: emit(), one a transaction",
    )
    parser.add_argument(
        "--producers", type=int, help="producer processes (default 1 for --mode many, 4 for single)"
    )
    parser.add_argument("--chunk", type=int, default=1000, help="events per emit_many() transaction")
    parser.add_argument("--probe-rate", type=float, default=20, help="probe webhooks per second (default 20)")
    parser.add_argument("--probe-threads", type=int, default=4, help="probe connections (default 4)")
    parser.add_argument(
        "--baseline-seconds", type=float, default=15, help="probe alone before the spike (default 15)"
    )
    parser.add_argument(
        "--after-seconds", type=float, default=10, help="probe after the last webhook (default 10)"
    )
    parser.add_argument("--interval", type=float, default=1.0, help="seconds between samples (default 1)")
    parser.add_argument("--print-every", type=float, default=10, help="seconds between progress lines")
    parser.add_argument("--latency-ms", type=float, default=0, help="the sandbox's added latency per request")
    parser.add_argument(
        "--max-seconds", type=float, default=1800, help="give up waiting for a stage after this long"
    )
    parser.add_argument("--no-beat", action="store_true", help="do not start the Procfile's beat")
    parser.add_argument("--log-level", default="WARNING", help="LOG_LEVEL of every process (default WARNING)")
    parser.add_argument("--keep-db", action="store_true", help="keep the database afterwards")
    parser.add_argument(
        "--json", type=Path, default=RESULTS_DIR / "spike.json", help="where to write samples and figures"
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    plan = Plan(
        n=args.n,
        mode=args.mode,
        producers=args.producers or (1 if args.mode == "many" else 4),
        chunk=args.chunk,
        probe_rate=args.probe_rate,
        probe_threads=args.probe_threads,
        baseline_seconds=args.baseline_seconds,
        after_seconds=args.after_seconds,
        interval=args.interval,
        print_every=args.print_every,
        latency_ms=args.latency_ms,
        max_seconds=args.max_seconds,
        beat=not args.no_beat,
        log_level=args.log_level,
        keep_db=args.keep_db,
    )
    servers = Servers(
        postgres_url=os.environ.get("BENCH_DATABASE_URL")
        or os.environ.get("DATABASE_URL")
        or DEFAULT_POSTGRES_URL,
        redis_url=os.environ.get("SPIKE_REDIS_URL") or DEFAULT_REDIS_URL,
    )
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    command = shlex.join(["python", "bench/spike.py", *(sys.argv[1:] if argv is None else argv)])
    spike = Spike(plan, servers, uuid.uuid4().hex[:8])
    load_before = os.getloadavg()
    print(f"command: {command}")
    print(
        f"machine: {os.cpu_count()} CPUs, Python {platform.python_version()}, Postgres "
        f"{spike.postgres.version()}, load average {load_before[0]:.2f}; Redis {servers.redis_url} (flushed)",
        flush=True,
    )
    out: dict[str, Any] = {
        "command": command,
        "started_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "plan": plan.__dict__,
        "load_average_before": load_before,
    }
    code = 0
    try:
        result = spike.run()
        summary = summarise(result, plan)
        print_summary(summary, result, plan)
        out.update(summary=summary, result=result)
    except StepFailed as err:
        print(f"FAILED: {err}", file=sys.stderr)
        spike.failures.append(str(err))
    finally:
        out["load_average_after"] = os.getloadavg()
        out["notes"] = spike.notes
        out["failures"] = spike.failures
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(out, default=str) + "\n")
    print(
        f"\nload average before {load_before[0]:.1f}, after {out['load_average_after'][0]:.1f} "
        f"(other work on this {os.cpu_count()}-CPU machine shows here; memory, queue lengths and counts "
        "do not depend on it, rates and latencies do)"
    )
    for note in spike.notes:
        print(f"note: {note}")
    print(f"results: {args.json.relative_to(ROOT) if args.json.is_relative_to(ROOT) else args.json}")
    for failure in spike.failures:
        print(f"VERIFY FAILED: {failure}", file=sys.stderr)
        code = 1
    return code


if __name__ == "__main__":
    sys.exit(main())
