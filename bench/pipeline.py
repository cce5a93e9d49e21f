"""Throughput benchmark: mailauto's pipeline (emit → process → render → Anymail → ESP)
against django-post-office, and the cost of emit() against a plain INSERT.

    python bench/pipeline.py [--quick] [--n N] [--workers W] [--latency 0 100] ...

One invocation starts the ESP sandbox as a subprocess, creates its own Postgres
databases (dropped at the end unless --keep-db), runs every scenario, prints one table
per scenario and writes the same figures to bench/results/latest.json. It prints
figures and never passes or fails on the clock; it exits 1 only when a count does not
verify (the sandbox and the database disagree about what was sent) or a system crashes.

Environment: DATABASE_URL / BENCH_DATABASE_URL name the Postgres server (the database
name in it is ignored), BENCH_REDIS_URL a Redis database the benchmark may flush
(default redis://127.0.0.1:6379/10). See bench/README.md.
"""

from __future__ import annotations

import argparse
import cProfile
import hashlib
import json
import os
import platform
import pstats
import resource
import shlex
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
# `python bench/pipeline.py` puts bench/ on sys.path, not the project; spawned workers
# re-import this module, so they run this line too.
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench._setup import (  # noqa: E402  (needs ROOT on sys.path)
    DEFAULT_POSTGRES_URL,
    EVENT_SCHEMA,
    EVENT_TYPE,
    TEMPLATE_HTML,
    TEMPLATE_SUBJECT,
    TEMPLATE_TEXT,
    Postgres,
    Sandbox,
    Servers,
    StepFailed,
    _children_of,
    _contact_attributes,
    _email,
    _payload,
    _peak_rss_of,
    _percentile,
    _process_cpu_seconds,
    flush_redis,
    migrate,
    python_speed_ms,
    round_trip_us,
    run_processes,
    run_step,
    setup_mailauto,
)

RESULTS_DIR = ROOT / "bench" / "results"
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/10"

TARGETS = {
    "emit_events_per_s": 5000,
    "emit_p99_ms": 2.0,
    "pipeline_ratio_at_0ms": 2.0,
    "pipeline_emails_per_s_at_100ms": 1000,
}


@dataclass
class Plan:
    latencies: list[float]
    workers: int
    n: int | None
    n_baseline: int | None
    max_seconds: float
    event_batch: int | None
    send_batch: int | None
    emit_seconds: float
    emit_events: int | None
    producers: int
    celery: bool
    skip_baseline: bool
    skip_emit: bool
    skip_pipeline: bool
    keep_db: bool
    profile: bool
    quick: bool

    def n_for(self, system: str, latency_ms: float) -> int:
        if self.quick:
            default = 200
        elif latency_ms == 0:
            default = 5000
        else:
            # post_office sends ~80/s at 100 ms per request on this kind of machine.
            default = 2000 if system == "post_office" else 20000
        if system == "post_office" and self.n_baseline is not None:
            return self.n_baseline
        return self.n if self.n is not None else default


def _cpu_s(who: int = resource.RUSAGE_SELF) -> float:
    usage = resource.getrusage(who)
    return usage.ru_utime + usage.ru_stime


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: kilobytes


# --- steps that run inside Django processes ------------------------------------------------


def _mailauto_unfinished() -> bool:
    from campaigns.models import Message, OutboxEvent

    return (
        OutboxEvent.objects.filter(
            status__in=[
                OutboxEvent.Status.PENDING,
                OutboxEvent.Status.PROCESSING,
                OutboxEvent.Status.RETRYING,
            ]
        ).exists()
        or Message.objects.filter(
            status__in=[Message.Status.QUEUED, Message.Status.CLAIMED, Message.Status.SENDING]
        ).exists()
    )


@dataclass
class WorkerReport:
    pid: int
    events: int = 0
    messages_created: int = 0
    send_claimed: int = 0
    sent: int = 0
    esp_requests: int = 0
    process_busy_s: float = 0.0
    send_busy_s: float = 0.0
    first_claim_at: float | None = None
    last_sent_at: float | None = None
    stopped_by_deadline: bool = False
    peak_rss_mb: float = 0.0
    cpu_s: float = 0.0  # this process's CPU time from the release to the end, not Postgres's
    profile_path: str | None = None


def pipeline_worker(
    *, max_seconds: float, event_batch: int | None, send_batch: int | None, profile_path: str | None
) -> dict[str, Any]:
    """What a worker process does: process a batch of events, send a batch of messages,
    until nothing is left to do anywhere (or max_seconds have passed)."""
    deadline_at = time.time() + max_seconds
    cpu_at_start = _cpu_s()
    from campaigns.delivery import messages_send_batch
    from campaigns.processing import events_process_batch

    report = WorkerReport(pid=os.getpid(), profile_path=profile_path)
    profiler = cProfile.Profile() if profile_path else None
    if profiler is not None:
        profiler.enable()
    while True:
        if time.time() >= deadline_at:
            report.stopped_by_deadline = True
            break
        began = time.time()
        tick = time.perf_counter()
        processed = events_process_batch(limit=event_batch)
        if processed.claimed:
            report.process_busy_s += time.perf_counter() - tick
            report.events += processed.claimed
            report.messages_created += processed.messages
            if report.first_claim_at is None:
                report.first_claim_at = began
        began = time.time()
        tick = time.perf_counter()
        sent = messages_send_batch(limit=send_batch)
        if sent.claimed:
            report.send_busy_s += time.perf_counter() - tick
            report.send_claimed += sent.claimed
            report.sent += sent.sent
            report.esp_requests += getattr(sent, "requests", sent.sent)
            if report.first_claim_at is None:
                report.first_claim_at = began
            if sent.sent:
                report.last_sent_at = time.time()
        if not processed.claimed and not sent.claimed:
            if not _mailauto_unfinished():
                break
            time.sleep(0.02)  # another worker holds the last batches
    if profiler is not None and profile_path:
        profiler.disable()
        profiler.dump_stats(profile_path)
    report.peak_rss_mb = _peak_rss_mb()
    report.cpu_s = _cpu_s() - cpu_at_start
    return asdict(report)


def celery_controller(*, workers: int, max_seconds: float) -> dict[str, Any]:
    """Nudge the (already running) Celery workers once per process, then wait for the
    pipeline to drain; the tasks nudge the send queue themselves as they go."""
    from campaigns.tasks import events_process

    kicked_at = time.time()
    deadline_at = kicked_at + max_seconds
    for _ in range(workers):
        events_process.apply_async()
    while time.time() < deadline_at and _mailauto_unfinished():
        time.sleep(0.1)
    return {"kicked_at": kicked_at, "stopped_by_deadline": time.time() >= deadline_at}


def verify_mailauto() -> dict[str, Any]:
    from django.db.models import Count, Max, Min

    from campaigns.models import Message, OutboxEvent

    events = dict(OutboxEvent.objects.values_list("status").annotate(c=Count("id")).order_by())
    messages = dict(Message.objects.values_list("status").annotate(c=Count("id")).order_by())
    span = OutboxEvent.objects.filter(processed_at__isnull=False).aggregate(
        first=Min("processed_at"), last=Max("processed_at")
    )
    last_sent = Message.objects.aggregate(last=Max("sent_at"))["last"]
    return {
        "events_by_status": events,
        "messages_by_status": messages,
        "first_processed_at": span["first"].timestamp() if span["first"] else None,
        "last_processed_at": span["last"].timestamp() if span["last"] else None,
        "last_sent_at": last_sent.timestamp() if last_sent else None,
    }


def setup_post_office(*, n: int, chunk: int = 1000) -> dict[str, float]:
    """Migrate, then one post_office EmailTemplate with the same content, and N queued
    emails that render it on delivery (as mailauto renders at send time)."""
    from django.conf import settings
    from post_office import mail
    from post_office.models import EmailTemplate

    timings: dict[str, float] = {}
    started = time.perf_counter()
    migrate()
    timings["migrate_s"] = time.perf_counter() - started
    template = EmailTemplate.objects.create(
        name="welcome", subject=TEMPLATE_SUBJECT, content=TEMPLATE_TEXT, html_content=TEMPLATE_HTML
    )
    started = time.perf_counter()
    for offset in range(0, n, chunk):
        mail.send_many(
            [
                {
                    "recipients": [_email(i)],
                    "sender": settings.DEFAULT_FROM_EMAIL,
                    "template": template,
                    "context": {
                        "contact": {**_contact_attributes(i), "email": _email(i), "user_id": f"u{i}"},
                        "payload": _payload(i),
                        "event": {"type": EVENT_TYPE, "source": "bench"},
                        "links": {},
                    },
                    "render_on_delivery": True,
                    "priority": "medium",
                }
                for i in range(offset, min(n, offset + chunk))
            ]
        )
    timings["queue_s"] = time.perf_counter() - started
    return timings


def post_office_send(*, processes: int, lockfile: str) -> dict[str, Any]:
    """`manage.py send_queued_mail --processes W`: post_office's own loop, batch by batch
    until its queue is empty."""
    from django.core.management import call_command

    cpu_at_start = _cpu_s() + _cpu_s(resource.RUSAGE_CHILDREN)
    started = time.time()
    call_command("send_queued_mail", processes=processes, lockfile=lockfile)
    finished = time.time()
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    return {
        "started_at": started,
        "finished_at": finished,
        # The command's process and the pools it forked (each waited for).
        "cpu_s": _cpu_s() + _cpu_s(resource.RUSAGE_CHILDREN) - cpu_at_start,
        "peak_rss_mb": _peak_rss_mb(),
        "children_peak_rss_mb": children,
    }


def verify_post_office() -> dict[str, Any]:
    from django.db.models import Count
    from post_office.models import STATUS, Email

    names = {value: name for name, value in STATUS._asdict().items()}
    by_status = dict(Email.objects.values_list("status").annotate(c=Count("id")).order_by())
    return {"emails_by_status": {names.get(k, str(k)): v for k, v in by_status.items()}}


def setup_emit() -> None:
    from campaigns.models import EventType

    migrate()
    EventType.objects.create(name=EVENT_TYPE, schema=EVENT_SCHEMA)


def emit_producer_prepare(
    *, mode: str, index: int, seconds: float, max_events: int | None, pace_per_s: float | None = None
) -> dict[str, Any]:
    """Warm up one producer (connections to Postgres and Redis) before the clock starts."""
    from campaigns import events as events_module

    state: dict[str, Any] = {"nudge_s": 0.0}
    # Time the on-commit nudge apart from the COMMIT itself: wrap the function emit()
    # registers with on_commit (looked up by name each time, also by its "one nudge per
    # transaction" check) without changing what it does.
    original = events_module.nudge_event_workers

    def timed_nudge() -> None:
        tick = time.perf_counter()
        try:
            original()
        finally:
            state["nudge_s"] += time.perf_counter() - tick

    events_module.nudge_event_workers = timed_nudge  # type: ignore[assignment]
    for warmup in range(20):
        _emit_one(mode, f"warmup-{index}-{warmup}", warmup, state)
    from django.db import connection

    # This producer's Postgres backend (same machine): its CPU per event is read from
    # /proc, beside the producer's own, because wall-clock rates on a shared 2-core
    # machine move with whatever else runs; CPU per event says what each event costs.
    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_backend_pid()")
        state["backend_pid"] = cursor.fetchone()[0]
    return state


def emit_producer(
    state: dict[str, Any],
    *,
    mode: str,
    index: int,
    seconds: float,
    max_events: int | None,
    pace_per_s: float | None = None,
) -> dict[str, Any]:
    """One producer of the emit benchmark: one event per transaction, as a web request
    would emit (EMIT_PER_TRANSACTION events for the "emit10" mode), for `seconds` or
    `max_events`."""
    call_ms: list[float] = []
    commit_ms: list[float] = []
    nudge_ms: list[float] = []
    backend = state["backend_pid"]
    state["round_trip_ms"] = []  # not the warm-up's
    cpu_before, backend_before = time.process_time(), _process_cpu_seconds(backend)
    started = time.perf_counter()
    end = started + seconds
    count = 0
    while time.perf_counter() < end and (max_events is None or count < max_events):
        if pace_per_s:
            # Paced: transactions at a fixed rate, as requests arrive, rather than flat out.
            pause = started + count / pace_per_s - time.perf_counter()
            if pause > 0:
                time.sleep(pause)
        calls, commit, nudge, events = _emit_one(mode, f"p{index}-{count}", count, state)
        call_ms.extend(call * 1000 for call in calls)
        commit_ms.append(commit * 1000)
        nudge_ms.append(nudge * 1000)
        count += events
    return {
        "events": count,
        "seconds": time.perf_counter() - started,
        "call_ms": call_ms,
        "commit_ms": commit_ms,
        "nudge_ms": nudge_ms,
        "round_trip_ms": state.pop("round_trip_ms", []),
        "client_cpu_s": time.process_time() - cpu_before,
        "postgres_cpu_s": _process_cpu_seconds(backend) - backend_before,
        "peak_rss_mb": _peak_rss_mb(),
    }


# The "emit10" mode: a caller that emits several events in one transaction (a signup
# that records three things, an import); shows what the per-transaction COMMIT costs.
EMIT_PER_TRANSACTION = 10
# The "many" mode: a producer that batches (an import, a queue consumer) with one
# emit_many() call per transaction; its call times are per call of EMIT_MANY events.
EMIT_MANY = 100
EMIT_MODES = {
    "emit": "campaigns.emit()",
    "insert": "OutboxEvent.objects.create() (base)",
    "emit10": f"emit() x{EMIT_PER_TRANSACTION} per transaction",
    "paced": "emit(), paced at half its rate",
    "many": f"emit_many() of {EMIT_MANY} per transaction",
}


def _emit_one(
    mode: str, user_id: str, i: int, state: dict[str, Any]
) -> tuple[list[float], float, float, int]:
    """One transaction; returns (each call inside it, COMMIT, the on-commit nudge) in
    seconds, and the number of events it wrote."""
    from django.db import connection, transaction
    from django.utils import timezone

    import campaigns
    from campaigns.events import EventSpec
    from campaigns.models import EventType, OutboxEvent

    payload = _payload(i)
    if mode == "insert" and "event_type" not in state:
        state["event_type"] = EventType.objects.get(name=EVENT_TYPE)
    state["nudge_s"] = 0.0
    with transaction.atomic():
        # The caller's own work opens its transaction (psycopg sends BEGIN before the
        # first statement, a round trip of its own); what is timed is what one emit()
        # adds to a transaction that is already under way, as in a real request.
        with connection.cursor() as cursor:
            cursor.execute("SELECT 1")
            if mode == "paced":
                # The floor under any statement emit() could send: one round trip to
                # Postgres inside the transaction, on this machine, at this load.
                tick = time.perf_counter()
                cursor.execute("SELECT 1")
                state.setdefault("round_trip_ms", []).append(1000 * (time.perf_counter() - tick))
        calls: list[float] = []
        tick = time.perf_counter()
        if mode == "emit10":
            for _ in range(EMIT_PER_TRANSACTION):
                campaigns.emit(EVENT_TYPE, user_id, payload, source="bench")
                calls.append(time.perf_counter() - tick)
                tick = time.perf_counter()
        elif mode in ("emit", "paced"):
            campaigns.emit(EVENT_TYPE, user_id, payload, source="bench")
        elif mode == "many":
            campaigns.emit_many(
                [EventSpec(EVENT_TYPE, f"{user_id}-{n}", payload) for n in range(EMIT_MANY)], source="bench"
            )
        else:
            # The baseline: the same row through the ORM, with no validation, no
            # ON CONFLICT and no nudge.
            now = timezone.now()
            OutboxEvent.objects.create(
                event_id=uuid.uuid4().hex,
                event_type=state["event_type"],
                user_id=user_id,
                payload=payload,
                source="bench",
                occurred_at=now,
                available_at=now,
            )
        called = time.perf_counter()
        if mode != "emit10":
            calls.append(called - tick)
    committed = time.perf_counter()
    nudge = state["nudge_s"]
    events = EMIT_MANY if mode == "many" else len(calls)
    return calls, committed - called - nudge, nudge, events


# --- the scenarios --------------------------------------------------------------------------


@dataclass
class SystemResult:
    system: str
    n: int
    sent: int = 0
    seconds: float = 0.0
    emails_per_s: float = 0.0
    ratio_vs_baseline: float | None = None
    events_per_s: float | None = None
    peak_rss_mb_per_worker: float = 0.0
    workers: int = 0
    verified: bool = False
    complete: bool = False
    sandbox_accepted: int = 0
    sandbox_requests: int = 0
    sandbox_cpu_s: float = 0.0
    worker_cpu_s: float = 0.0
    cpu_ms_per_email: float | None = None
    load_average: tuple[float, float] = (0.0, 0.0)  # 1-minute, before and after
    setup: dict[str, float] = field(default_factory=dict)
    detail: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


class Bench:
    def __init__(self, plan: Plan, servers: Servers, run_id: str) -> None:
        self.plan = plan
        self.servers = servers
        self.postgres = Postgres(servers)
        self.run_id = run_id
        self.failures: list[str] = []

    @contextmanager
    def database(self, name: str) -> Iterator[str]:
        self.postgres.create(name)
        try:
            yield name
        finally:
            if not self.plan.keep_db:
                self.postgres.drop(name)

    # -- mailauto -------------------------------------------------------------------------

    def mailauto(self, sandbox: Sandbox, latency_ms: float) -> SystemResult:
        plan = self.plan
        n = plan.n_for("mailauto", latency_ms)
        label = f"mailauto ({'celery, ' if plan.celery else ''}{plan.workers} workers)"
        result = SystemResult(system=label, n=n, workers=plan.workers)
        tag = f"l{int(latency_ms)}"
        with self.database(f"mailauto_bench_{tag}") as db:
            env = self.servers.child_env(db, sandbox.url)
            result.setup = run_step(setup_mailauto, env, n=n)
            flush_redis(self.servers.redis_url)  # the nudges emit_many queued; no consumer yet
            sandbox.reset()
            cpu_before = sandbox.cpu_seconds()
            if plan.celery:
                started_at = self._run_celery(env, result, tag)
            else:
                started_at = self._run_workers(env, result, tag)
            result.sandbox_cpu_s = sandbox.cpu_seconds() - cpu_before
            check = run_step(verify_mailauto, env)
            stats = sandbox.stats()
        result.sandbox_accepted = int(stats["accepted"])
        result.sandbox_requests = int(stats["requests"])
        sent_in_db = int(check["messages_by_status"].get("sent", 0))
        result.sent = sent_in_db
        result.detail.update(check)
        end = check["last_sent_at"] or started_at
        result.seconds = max(end - started_at, 1e-9)
        result.emails_per_s = sent_in_db / result.seconds if sent_in_db else 0.0
        if result.events_per_s is None and check["last_processed_at"]:
            # Celery: no per-worker busy time; the processing stage's wall-clock span.
            processed = int(check["events_by_status"].get("processed", 0))
            result.events_per_s = processed / max(check["last_processed_at"] - started_at, 1e-9)
        result.complete = sent_in_db == n
        result.verified = result.sandbox_accepted == sent_in_db and not self._stuck(check)
        if not result.complete:
            result.notes.append(
                f"incomplete: {sent_in_db} of {n} sent within --max-seconds {plan.max_seconds:g}"
            )
        if result.sandbox_accepted != sent_in_db:
            self.failures.append(
                f"{label} at {latency_ms:g} ms: sandbox accepted {result.sandbox_accepted}, DB says {sent_in_db} sent"
            )
        return result

    @staticmethod
    def _stuck(check: dict[str, Any]) -> bool:
        bad = {"failed", "dead", "unknown", "suppressed"}
        return any(check["messages_by_status"].get(status) for status in bad)

    def _run_workers(self, env: dict[str, str], result: SystemResult, tag: str) -> float:
        plan = self.plan
        kwargs = [
            {
                "max_seconds": plan.max_seconds,
                "event_batch": plan.event_batch,
                "send_batch": plan.send_batch,
                "profile_path": str(RESULTS_DIR / f"profile-{tag}-worker0.prof")
                if plan.profile and index == 0
                else None,
            }
            for index in range(plan.workers)
        ]
        released_at, reports = run_processes(pipeline_worker, env, kwargs, timeout=plan.max_seconds + 120)
        firsts = [r["first_claim_at"] for r in reports if r["first_claim_at"]]
        started_at = min(firsts) if firsts else released_at
        # Each worker's rate while it was busy processing, summed: the processing
        # stage's capacity on W workers (the wall-clock span is shared with sending).
        result.events_per_s = sum(r["events"] / r["process_busy_s"] for r in reports if r["process_busy_s"])
        result.peak_rss_mb_per_worker = max(r["peak_rss_mb"] for r in reports)
        result.worker_cpu_s = sum(r["cpu_s"] for r in reports)
        result.detail["workers"] = reports
        result.detail["released_at"] = released_at
        if any(r["stopped_by_deadline"] for r in reports):
            result.notes.append("workers stopped at the deadline")
        if plan.profile and reports[0]["profile_path"]:
            result.notes.append("worker 0 ran under cProfile: its figures are slower than unprofiled")
            print_profile(Path(reports[0]["profile_path"]))
        return started_at

    def _run_celery(self, env: dict[str, str], result: SystemResult, tag: str) -> float:
        plan = self.plan
        log_path = RESULTS_DIR / f"celery-{tag}.log"
        command = [
            sys.executable, "-m", "celery", "-A", "mailauto", "worker",
            "-Q", "events,sends", "-c", str(plan.workers), "-P", "prefork",
            "--prefetch-multiplier", "1", "--without-gossip", "--without-mingle", "--without-heartbeat",
            "-n", f"bench-{os.getpid()}@%h", "-l", "INFO",
        ]  # fmt: skip
        with log_path.open("wb") as log:
            worker = subprocess.Popen(
                command, cwd=ROOT, env={**os.environ, **env}, stdout=log, stderr=subprocess.STDOUT
            )
        try:
            deadline = time.monotonic() + 60
            while b"ready." not in log_path.read_bytes():
                if worker.poll() is not None or time.monotonic() > deadline:
                    raise StepFailed(f"the Celery worker did not start (see {log_path})")
                time.sleep(0.2)
            outcome = run_step(
                celery_controller, env, workers=plan.workers, max_seconds=plan.max_seconds,
                timeout=plan.max_seconds + 120,
            )  # fmt: skip
            pool = _children_of(worker.pid)
            result.peak_rss_mb_per_worker = max((_peak_rss_of(pid) for pid in pool), default=0.0)
            result.detail["celery_pool_pids"] = pool
            result.detail["celery_main_peak_rss_mb"] = _peak_rss_of(worker.pid)
            # Pool processes fork after Django is set up: this is their own work, mostly.
            result.worker_cpu_s = sum(_process_cpu_seconds(pid) for pid in pool)
            if outcome["stopped_by_deadline"]:
                result.notes.append("stopped at the deadline")
            result.notes.append("Celery: events/s is the processing stage's wall-clock span")
            return float(outcome["kicked_at"])
        finally:
            worker.terminate()
            try:
                worker.wait(timeout=20)
            except subprocess.TimeoutExpired:
                worker.kill()
                worker.wait()

    # -- post_office ----------------------------------------------------------------------

    def post_office(self, sandbox: Sandbox, latency_ms: float) -> SystemResult:
        plan = self.plan
        n = plan.n_for("post_office", latency_ms)
        label = f"post-office ({plan.workers} processes)"
        result = SystemResult(system=label, n=n, workers=plan.workers)
        tag = f"l{int(latency_ms)}"
        with self.database(f"postoffice_bench_{tag}") as db:
            env = self.servers.child_env(db, sandbox.url)
            result.setup = run_step(setup_post_office, env, n=n)
            flush_redis(self.servers.redis_url)
            sandbox.reset()
            cpu_before = sandbox.cpu_seconds()
            timing = run_step(
                post_office_send,
                env,
                processes=plan.workers,
                lockfile=str(RESULTS_DIR / f"post_office-{self.run_id}"),
                timeout=plan.max_seconds * 4 + 300,
            )
            result.sandbox_cpu_s = sandbox.cpu_seconds() - cpu_before
            check = run_step(verify_post_office, env)
            stats = sandbox.stats()
        result.sandbox_accepted = int(stats["accepted"])
        result.sandbox_requests = int(stats["requests"])
        sent_in_db = int(check["emails_by_status"].get("sent", 0))
        result.sent = sent_in_db
        result.seconds = timing["finished_at"] - timing["started_at"]
        result.emails_per_s = sent_in_db / result.seconds if result.seconds else 0.0
        result.ratio_vs_baseline = 1.0
        # With more than one process post_office forks a pool per batch: the workers are
        # those children. With one, it sends from the command's own process.
        result.peak_rss_mb_per_worker = (
            timing["children_peak_rss_mb"] if plan.workers > 1 else timing["peak_rss_mb"]
        )
        result.worker_cpu_s = timing["cpu_s"]
        result.detail.update(check)
        result.detail["timing"] = timing
        result.complete = sent_in_db == n
        result.verified = result.sandbox_accepted == sent_in_db == n
        if not result.verified:
            self.failures.append(
                f"{label} at {latency_ms:g} ms: sandbox accepted {result.sandbox_accepted}, "
                f"DB says {sent_in_db} sent, of {n}"
            )
        return result

    # -- one scenario ---------------------------------------------------------------------

    def scenario(self, latency_ms: float) -> dict[str, Any]:
        print(f"\n== scenario: ESP latency {latency_ms:g} ms ==", flush=True)
        sandbox = Sandbox(latency_ms=latency_ms, log_path=RESULTS_DIR / "sandbox.log").start()
        try:
            baseline = None
            if not self.plan.skip_baseline:
                baseline = self._system("post_office", self.post_office, sandbox, latency_ms)
            ours = self._system("mailauto", self.mailauto, sandbox, latency_ms)
        finally:
            sandbox.stop()
        if baseline is not None and baseline.emails_per_s and ours.emails_per_s:
            ours.ratio_vs_baseline = ours.emails_per_s / baseline.emails_per_s
        rows = [ours] if baseline is None else [ours, baseline]
        return {"latency_ms": latency_ms, "rows": [asdict(row) for row in rows]}

    def _system(
        self, system: str, run: Callable[[Sandbox, float], SystemResult], sandbox: Sandbox, latency_ms: float
    ) -> SystemResult:
        """Run one system; a crash is reported in its row and the run goes on."""
        n = self.plan.n_for(system, latency_ms)
        print(f"  {system}: N={n:,} …", flush=True)
        load_before = os.getloadavg()[0]
        try:
            result = run(sandbox, latency_ms)
        except StepFailed as err:
            print(f"  {system} FAILED: {err}", file=sys.stderr, flush=True)
            reason = _exception_line(str(err))
            self.failures.append(f"{system} at {latency_ms:g} ms crashed: {reason}")
            result = SystemResult(system=system, n=n, notes=[f"crashed: {reason}"])
        # Other people's processes on a shared machine show up here (so does this
        # benchmark's own previous step: it is a one-minute average).
        result.load_average = (load_before, os.getloadavg()[0])
        if result.sent and result.worker_cpu_s:
            # Less sensitive to other people's load than emails/s: CPU the workers
            # themselves burnt per email (Postgres's and the sandbox's not included).
            result.cpu_ms_per_email = result.worker_cpu_s * 1000 / result.sent
        if load_before > 1.5 * (os.cpu_count() or 1):
            result.notes.append(f"load average {load_before:.1f} before the run: other work on the machine?")
        return result

    # -- emit -----------------------------------------------------------------------------

    def emit(self, sandbox_url: str) -> dict[str, Any]:
        plan = self.plan
        print(
            f"\n== emit: {plan.producers} producer processes, {plan.emit_seconds:g} s each mode ==",
            flush=True,
        )
        out: dict[str, Any] = {"producers": plan.producers, "seconds": plan.emit_seconds}
        with self.database("mailauto_bench_emit") as db:
            env = self.servers.child_env(db, sandbox_url)
            run_step(setup_emit, env)
            for mode in EMIT_MODES:
                flush_redis(self.servers.redis_url)
                # "paced": the latency one emit() adds when the machine is not flat out
                # (a web app's requests leave it idle between them), at half the rate
                # that "emit" reached in this run.
                pace = out["emit"]["events_per_s"] / 2 / plan.producers if mode == "paced" else None
                kwargs = [
                    {
                        "mode": mode,
                        "index": i,
                        "seconds": plan.emit_seconds,
                        "max_events": plan.emit_events,
                        "pace_per_s": pace,
                    }
                    for i in range(plan.producers)
                ]
                _, reports = run_processes(
                    emit_producer, env, kwargs, timeout=plan.emit_seconds + 300, prepare=emit_producer_prepare
                )
                out[mode] = _summarise_producers(reports)
            out["pgbench"] = pgbench_insert(
                self.servers.database_url(db), clients=plan.producers, seconds=plan.emit_seconds
            )
        out["ratio_p50"] = _ratio(out["emit"]["call_p50_ms"], out["insert"]["call_p50_ms"])
        out["ratio_p99"] = _ratio(out["emit"]["call_p99_ms"], out["insert"]["call_p99_ms"])
        out["ratio_events_per_s"] = _ratio(out["emit"]["events_per_s"], out["insert"]["events_per_s"])
        return out


def _pgbench() -> str | None:
    import glob
    import shutil

    found = shutil.which("pgbench")
    if found:
        return found
    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin/pgbench"))
    return candidates[-1] if candidates else None


def pgbench_insert(database_url: str, *, clients: int, seconds: float) -> dict[str, Any] | None:
    """The same outbox INSERT from pgbench (prepared, as emit() sends it), one per transaction, `clients` connections:
    what Postgres alone does on this machine with no Python in the loop, the ceiling
    for any emit(). None when pgbench is not installed."""
    from urllib.parse import urlsplit

    import psycopg

    program = _pgbench()
    if program is None:
        return None
    with psycopg.connect(database_url) as conn:
        row = conn.execute("SELECT id FROM campaigns_eventtype WHERE name = %s", [EVENT_TYPE]).fetchone()
    assert row is not None
    script = ROOT / "bench" / "results" / "pgbench_emit.sql"
    script.parent.mkdir(parents=True, exist_ok=True)
    script.write_text(
        "INSERT INTO campaigns_outboxevent (event_id, event_type_id, user_id, payload, source, occurred_at,"
        " created_at, status, attempts, available_at, result, last_error, error_history) VALUES"
        f" (md5(random()::text || clock_timestamp()::text), {int(row[0])}, 'u' || :client_id,"
        " '{\"plan\": \"pro\", \"seats\": 3}', 'bench', now(), now(), 'pending', 0, now(), '', '', '[]')"
        " ON CONFLICT DO NOTHING;\n"
    )
    url = urlsplit(database_url)
    command = [
        program, "-n", "-M", "prepared", "-c", str(clients), "-j", str(clients), "-T", str(max(1, round(seconds))),
        "-f", str(script), "-h", url.hostname or "127.0.0.1", "-p", str(url.port or 5432),
        "-U", url.username or "postgres", url.path.lstrip("/"),
    ]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=seconds + 120)
    tps = latency = None
    for line in done.stdout.splitlines():
        if line.startswith("tps = "):
            tps = float(line.split()[2])
        elif line.startswith("latency average = "):
            latency = float(line.split()[3])
    return {"transactions_per_s": tps, "latency_avg_ms": latency, "command": shlex.join(command)}


def _exception_line(text: str) -> str:
    """The "module.Error: message" line of a traceback (the last unindented line)."""
    lines = [line for line in text.splitlines() if line.strip() and not line[0].isspace()]
    return lines[-1] if lines else text


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def _summarise_producers(reports: list[dict[str, Any]]) -> dict[str, Any]:
    call = [v for r in reports for v in r["call_ms"]]
    commit = [v for r in reports for v in r["commit_ms"]]
    nudge = [v for r in reports for v in r["nudge_ms"]]
    events = sum(r["events"] for r in reports)
    seconds = max(r["seconds"] for r in reports)
    round_trip = [v for r in reports for v in r["round_trip_ms"]]
    return {
        "round_trip_p50_ms": _percentile(round_trip, 0.50) if round_trip else None,
        "round_trip_p99_ms": _percentile(round_trip, 0.99) if round_trip else None,
        "client_cpu_ms_per_event": 1000 * sum(r["client_cpu_s"] for r in reports) / events
        if events
        else None,
        "postgres_cpu_ms_per_event": 1000 * sum(r["postgres_cpu_s"] for r in reports) / events
        if events
        else None,
        "events": events,
        "events_per_s": events / seconds if seconds else 0.0,
        "call_p50_ms": _percentile(call, 0.50),
        "call_p99_ms": _percentile(call, 0.99),
        "commit_p50_ms": _percentile(commit, 0.50),
        "commit_p99_ms": _percentile(commit, 0.99),
        "nudge_p50_ms": _percentile(nudge, 0.50),
        "nudge_p99_ms": _percentile(nudge, 0.99),
        "peak_rss_mb": max(r["peak_rss_mb"] for r in reports),
    }


# --- output ---------------------------------------------------------------------------------


def _fmt(value: float | None, spec: str = ",.0f", suffix: str = "") -> str:
    return "—" if value is None else f"{value:{spec}}{suffix}"


def print_scenario(scenario: dict[str, Any]) -> None:
    latency = scenario["latency_ms"]
    header = (
        f"{'system':<30} {'N':>7} {'sent':>7} {'seconds':>8} {'emails/s':>9} {'vs base':>8} "
        f"{'events/s':>9} {'CPU ms/email':>12} {'RSS/worker':>11} {'ESP reqs':>9}  verified"
    )
    print(f"\nESP latency {latency:g} ms")
    print(header)
    print("-" * len(header))
    for row in scenario["rows"]:
        print(
            f"{row['system']:<30} {row['n']:>7,} {row['sent']:>7,} {row['seconds']:>8.1f} "
            f"{row['emails_per_s']:>9,.0f} {_fmt(row['ratio_vs_baseline'], '.2f', 'x'):>8} "
            f"{_fmt(row['events_per_s']):>9} {_fmt(row['cpu_ms_per_email'], '.2f'):>12} "
            f"{row['peak_rss_mb_per_worker']:>8.0f} MB "
            f"{row['sandbox_requests']:>9,}  "
            f"{'yes' if row['verified'] else 'NO'} (sandbox {row['sandbox_accepted']:,})"
        )
        for note in row["notes"]:
            print(f"{'':<30} note: {note}")
    ours = scenario["rows"][0]
    if latency == 0 and ours["ratio_vs_baseline"] is not None:
        target = TARGETS["pipeline_ratio_at_0ms"]
        print(f"target: mailauto ≥ {target:g}x post-office → {ours['ratio_vs_baseline']:.2f}x")
    elif latency > 0:
        target = TARGETS["pipeline_emails_per_s_at_100ms"]
        print(f"target: mailauto ≥ {target:,} emails/s at 100 ms → {ours['emails_per_s']:,.0f} emails/s")


def print_emit(emit: dict[str, Any]) -> None:
    print(
        f"\nemit: {emit['producers']} producers, one event per transaction (the last row: {EMIT_PER_TRANSACTION}), {emit['seconds']:g} s"
    )
    header = (
        f"{'mode':<34} {'events':>8} {'events/s':>9} {'call p50':>9} {'call p99':>9} "
        f"{'commit p50':>11} {'commit p99':>11} {'nudge p50':>10} {'nudge p99':>10} "
        f"{'CPU ms/event: client':>21} {'postgres':>9}"
    )
    print(header)
    print("-" * len(header))
    for mode, name in EMIT_MODES.items():
        if mode not in emit:
            continue
        row = emit[mode]
        print(
            f"{name:<34} {row['events']:>8,} {row['events_per_s']:>9,.0f} "
            f"{row['call_p50_ms']:>7.2f}ms {row['call_p99_ms']:>7.2f}ms "
            f"{row['commit_p50_ms']:>9.2f}ms {row['commit_p99_ms']:>9.2f}ms "
            f"{row['nudge_p50_ms']:>8.2f}ms {row['nudge_p99_ms']:>8.2f}ms "
            f"{_fmt(row['client_cpu_ms_per_event'], '.3f'):>21} {_fmt(row['postgres_cpu_ms_per_event'], '.3f'):>9}"
        )
    ceiling = emit.get("pgbench")
    if ceiling and ceiling["transactions_per_s"]:
        print(
            f"{'pgbench, the same INSERT, prepared':<34} {'':>8} {ceiling['transactions_per_s']:>9,.0f} "
            f"{'':>9} {'':>9} (latency avg {ceiling['latency_avg_ms']:.2f} ms: the ceiling on this machine)"
        )
    print(
        f"ratio emit/base: call p50 {_fmt(emit['ratio_p50'], '.2f', 'x')}, "
        f"call p99 {_fmt(emit['ratio_p99'], '.2f', 'x')}, events/s {_fmt(emit['ratio_events_per_s'], '.2f', 'x')}"
    )
    print(
        f"targets: ≥ {TARGETS['emit_events_per_s']:,} events/s from 4 producers → "
        f"{emit['emit']['events_per_s']:,.0f}; emit p99 ≤ {TARGETS['emit_p99_ms']:g} ms → "
        f"{emit['emit']['call_p99_ms']:.2f} ms"
        + (
            f" ({EMIT_PER_TRANSACTION} per transaction: {emit['emit10']['events_per_s']:,.0f} events/s, "
            f"p99 {emit['emit10']['call_p99_ms']:.2f} ms)"
            if "emit10" in emit
            else ""
        )
        + (
            f"; paced at {emit['paced']['events_per_s']:,.0f} events/s: p99 {emit['paced']['call_p99_ms']:.2f} ms"
            f" (a bare round trip to Postgres at that load: p50 {emit['paced']['round_trip_p50_ms']:.2f} ms,"
            f" p99 {emit['paced']['round_trip_p99_ms']:.2f} ms)"
            if "paced" in emit
            else ""
        )
    )
    if "many" in emit:
        print(
            f"batched: emit_many() of {EMIT_MANY} per transaction → {emit['many']['events_per_s']:,.0f} events/s "
            f"(its call p99 is for {EMIT_MANY} events: {emit['many']['call_p99_ms']:.2f} ms)"
        )
    print(
        "(call: emit() inside a transaction the caller has already begun; commit: COMMIT alone; "
        "nudge: handing the on-commit nudge to the background thread)"
    )


def print_profile(path: Path, top: int = 25) -> None:
    """The frames worker 0 spent its time in, by own time and by cumulative time."""
    print(f"\nprofile of worker 0 ({path.relative_to(ROOT)}):")
    for order in ("tottime", "cumulative"):
        stats = pstats.Stats(str(path), stream=sys.stdout)
        stats.strip_dirs().sort_stats(order).print_stats(top)


def provenance() -> dict[str, Any]:
    def git(*args: str) -> str:
        try:
            return subprocess.run(
                ["git", *args], cwd=ROOT, capture_output=True, text=True, check=False
            ).stdout.strip()
        except OSError:
            return ""

    digests = {
        path: hashlib.sha256((ROOT / path).read_bytes()).hexdigest()[:12]
        for path in ("campaigns/delivery.py", "campaigns/processing.py", "campaigns/events.py")
        if (ROOT / path).exists()
    }
    return {
        "git_head": git("rev-parse", "--short", "HEAD"),
        "git_dirty_files": len(git("status", "--porcelain").splitlines()),
        "sha256": digests,
    }


# --- command line ---------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="bench/pipeline.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--n", type=int, help="events/emails per system (default 5000 at 0 ms; 20000 / 2000 otherwise)"
    )
    parser.add_argument("--n-baseline", type=int, help="N for post-office only")
    parser.add_argument(
        "--workers",
        type=int,
        default=(os.cpu_count() or 2) + 1,
        help="worker processes for each system (default: CPUs + 1, as the Procfile runs: a sending "
        "worker waits on the ESP and on Postgres part of the time)",
    )
    parser.add_argument(
        "--latency", type=float, nargs="+", default=[0, 100], help="ESP latencies in ms (default: 0 100)"
    )
    parser.add_argument(
        "--max-seconds", type=float, default=120, help="cap on one system's run (default 120)"
    )
    parser.add_argument("--event-batch", type=int, help="events_process_batch(limit=) (default: settings)")
    parser.add_argument("--send-batch", type=int, help="messages_send_batch(limit=) (default: settings)")
    parser.add_argument(
        "--celery", action="store_true", help="real Celery workers instead of plain processes"
    )
    parser.add_argument("--skip-baseline", action="store_true", help="no django-post-office")
    parser.add_argument("--skip-emit", action="store_true", help="no emit benchmark")
    parser.add_argument("--skip-pipeline", action="store_true", help="only the emit benchmark")
    parser.add_argument("--emit-seconds", type=float, default=10, help="emit benchmark: seconds per mode")
    parser.add_argument("--emit-events", type=int, help="emit benchmark: stop each producer after M events")
    parser.add_argument("--producers", type=int, default=4, help="emit benchmark: producer processes")
    parser.add_argument(
        "--profile", action="store_true", help="cProfile worker 0 (bench/results/profile-*.prof)"
    )
    parser.add_argument("--quick", action="store_true", help="tiny N, short emit run: a smoke test")
    parser.add_argument("--keep-db", action="store_true", help="keep the benchmark databases")
    parser.add_argument(
        "--json", type=Path, default=RESULTS_DIR / "latest.json", help="where to write the results"
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.emit_seconds = min(args.emit_seconds, 2)
        args.max_seconds = min(args.max_seconds, 60)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    plan = Plan(
        latencies=args.latency,
        workers=args.workers,
        n=args.n,
        n_baseline=args.n_baseline,
        max_seconds=args.max_seconds,
        event_batch=args.event_batch,
        send_batch=args.send_batch,
        emit_seconds=args.emit_seconds,
        emit_events=args.emit_events,
        producers=args.producers,
        celery=args.celery,
        skip_baseline=args.skip_baseline,
        skip_emit=args.skip_emit,
        skip_pipeline=args.skip_pipeline,
        keep_db=args.keep_db,
        profile=args.profile,
        quick=args.quick,
    )
    servers = Servers(
        postgres_url=os.environ.get("BENCH_DATABASE_URL")
        or os.environ.get("DATABASE_URL")
        or DEFAULT_POSTGRES_URL,
        redis_url=os.environ.get("BENCH_REDIS_URL") or DEFAULT_REDIS_URL,
    )
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    command = shlex.join(["python", "bench/pipeline.py", *(sys.argv[1:] if argv is None else argv)])
    run_id = uuid.uuid4().hex[:8]
    bench = Bench(plan, servers, run_id)
    print(f"command: {command}")
    speed_ms, round_trip = python_speed_ms(), round_trip_us()
    print(
        f"machine: {os.cpu_count()} CPUs, Python {platform.python_version()}, Postgres {bench.postgres.version()}, "
        f"load average {os.getloadavg()[0]:.2f}; Redis {servers.redis_url} (flushed); "
        f"Python speed {speed_ms:.0f} ms, process round trip {round_trip:.0f} µs (bench/_setup.py: lower is faster)"
    )
    results: dict[str, Any] = {
        "command": command,
        "started_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": {
            "cpus": os.cpu_count(),
            "python_speed_ms": speed_ms,
            "process_round_trip_us": round_trip,
            "python": platform.python_version(),
            "postgres": bench.postgres.version(),
            "load_average_at_start": os.getloadavg(),
        },
        "code": provenance(),
        "plan": asdict(plan),
        "targets": TARGETS,
        "scenarios": [],
        "emit": None,
    }
    try:
        if not plan.skip_pipeline:
            for latency in plan.latencies:
                scenario = bench.scenario(latency)
                results["scenarios"].append(scenario)
                print_scenario(scenario)
        if not plan.skip_emit:
            # emit() never talks to the ESP: no sandbox; the URL only has to be well formed.
            results["emit"] = bench.emit("http://127.0.0.1:9/")
            print_emit(results["emit"])
    finally:
        with suppress(Exception):
            flush_redis(servers.redis_url)
        results["finished_at"] = datetime.now(UTC).isoformat(timespec="seconds")
        results["load_average_at_end"] = os.getloadavg()
        results["verification_failures"] = bench.failures
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2, default=str) + "\n")
        print(f"\nresults: {args.json.relative_to(ROOT) if args.json.is_relative_to(ROOT) else args.json}")
    for failure in bench.failures:
        print(f"VERIFY FAILED: {failure}", file=sys.stderr)
    return 1 if bench.failures else 0


if __name__ == "__main__":
    sys.exit(main())
