"""Webhook throughput: distinct Postmark Delivery webhooks for existing messages, POSTed
through the whole HTTP stack (a WSGI server in subprocesses, the middleware, rate
limiting, basic auth, Anymail's parsing, our receiver and Postgres), compared with the
same POSTs to a Django view that does nothing, served by the same server in the same
run: the ceiling of the HTTP stack on this machine.

    DATABASE_URL=postgres://postgres@127.0.0.1:5432/mailauto REDIS_URL=redis://127.0.0.1:6379/15 \\
        .venv/bin/python bench/webhooks.py [--server granian] [--processes 2] [--webhooks 20000]
        .venv/bin/python bench/webhooks.py --in-process [--profile]   # no HTTP: for A/B runs

Servers: "granian" (the default, and the production server: a Rust HTTP server calling
the WSGI app from --threads threads in each of --processes workers; HTTP/1.1
keep-alive), "gunicorn" (sync workers: one request at a time per process, a new
connection per request), "runserver" (Django's threaded development server, one
process per --processes sharing the port; HTTP/1.1 keep-alive). gunicorn is not in
requirements/ (measured here: more CPU per webhook than granian); install it to compare.
The client is a raw-socket HTTP/1.1 client in threads of this process (it shares the
cores with the server, so it is kept light).

It works in a throwaway database (<name>_bench_webhooks, every table built from the
models) that it drops afterwards. Besides the rates it prints the CPU time each party
spent per request (the server's processes, Postgres, Redis, the client), read from
/proc, which says what limits the figure, and the SQL statements per webhook. It never
passes or fails on time.
"""

from __future__ import annotations

import argparse
import base64
import importlib.metadata
import importlib.util
import json
import os
import shlex
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

NOOP_PATH = "/_bench/noop/"
WEBHOOK_PATH = "/webhooks/postmark/tracking/"
WARMUP = 400
STATEMENT_COUNT = 20
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


# --- the server process -------------------------------------------------------------------


def __getattr__(name: str) -> Any:
    """The server process's URLconf is this module (ROOT_URLCONF = "__main__"): the app's
    own URLs plus a view that does nothing. Built lazily, because the benchmark process
    imports this module before Django is set up."""
    if name == "urlpatterns":
        from django.urls import include, path

        return [path(NOOP_PATH.strip("/") + "/", _noop_view), path("", include("mailauto.urls"))]
    raise AttributeError(name)


def wsgi_app() -> Any:
    """The WSGI application for granian and gunicorn (a factory: "bench.webhooks:wsgi_app"):
    the project's settings, with this module as the URLconf."""
    import logging

    import django

    django.setup()
    from django.conf import settings
    from django.core.wsgi import get_wsgi_application

    settings.ROOT_URLCONF = __name__
    app = get_wsgi_application()
    logging.getLogger("gunicorn.access").setLevel(logging.WARNING)
    return app


def _noop_view(request: Any) -> Any:
    from django.http import HttpResponse

    return HttpResponse()


_noop_view.csrf_exempt = True  # type: ignore[attr-defined]


def serve(port: int) -> None:
    """Run the Django app in Django's threaded WSGI server (runserver's: HTTP/1.1 with
    keep-alive, one thread per connection) and print the port once it listens. Several
    of these may share one port (SO_REUSEPORT), like the workers of a production server."""
    import logging

    import django

    django.setup()
    from django.conf import settings
    from django.core.servers.basehttp import ThreadedWSGIServer, WSGIRequestHandler
    from django.core.wsgi import get_wsgi_application

    settings.ROOT_URLCONF = "__main__"
    app = get_wsgi_application()  # (sets logging up again)
    logging.getLogger("django.server").setLevel(logging.WARNING)  # no line per request

    class Handler(WSGIRequestHandler):
        def setup(self) -> None:
            super().setup()
            # wsgiref writes the status line, Date, Server and the other headers in
            # separate sends; with Nagle on, a response then waits for the client's
            # delayed ACK (~40 ms). Production WSGI servers set TCP_NODELAY too.
            cast(socket.socket, self.connection).setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    class Server(ThreadedWSGIServer):
        request_queue_size = 128  # runserver's 10 refuses a burst of new connections

        def server_bind(self) -> None:
            self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            super().server_bind()

    httpd = Server(("127.0.0.1", port), Handler)
    httpd.set_app(app)
    print(f"READY {httpd.server_address[1]}", flush=True)
    httpd.serve_forever()


# --- the benchmark process -----------------------------------------------------------------


def seed(count: int) -> list[bytes]:
    """`count` sent messages, and a distinct Postmark Delivery webhook body for each."""
    from django.utils import timezone

    from campaigns.models import EmailTemplate, Message, TemplateVersion
    from mailauto.sandbox.postmark import webhook_payload

    template = EmailTemplate.objects.create(name=f"bench-{uuid.uuid4().hex[:8]}")
    version = TemplateVersion.objects.create(
        template=template,
        number=1,
        status=TemplateVersion.Status.PUBLISHED,
        published_at=timezone.now(),
        subject="Hello",
        html="<p>Hello</p>",
    )
    now = timezone.now()
    messages = Message.objects.bulk_create(
        [
            Message(
                idempotency_key=f"bench-{n}",
                to_email=f"person{n}@example.com",
                template_version=version,
                purpose="marketing",
                status=Message.Status.SENT,
                esp_message_id=str(uuid.uuid4()),
                sent_at=now,
            )
            for n in range(count)
        ],
        batch_size=5000,
    )
    return [
        json.dumps(
            webhook_payload(
                "Delivery",
                {
                    "message_id": m.esp_message_id,
                    "metadata": {"mailauto_message_id": str(m.pk)},
                    "tag": m.purpose,
                },
                m.to_email,
            )
        ).encode()
        for m in messages
    ]


def _proc_cpu_seconds(pid: int) -> tuple[str, float, float]:
    """(command name, user CPU seconds, system CPU seconds) of a process, all threads."""
    with open(f"/proc/{pid}/stat") as f:
        stat = f.read()
    name = stat[stat.index("(") + 1 : stat.rindex(")")]
    fields = stat[stat.rindex(")") + 2 :].split()
    return name, int(fields[11]) / CLOCK_TICKS, int(fields[12]) / CLOCK_TICKS


def _bench_backends() -> list[int]:
    """The Postgres backends serving the benchmark's database (not other users')."""
    from django.db import connection

    with connection.cursor() as cursor:
        cursor.execute("SELECT pid FROM pg_stat_activity WHERE datname = current_database()")
        return [row[0] for row in cursor.fetchall()]


def cpu_snapshot(servers: list[int]) -> dict[int, tuple[str, float, float]]:
    """pid -> (party, CPU seconds, of which in the kernel) for the server processes and
    their children (gunicorn's workers), the Postgres backends of the benchmark's
    database, every redis-server, and this process (the client threads)."""
    backends = set(_bench_backends())
    stats: dict[int, tuple[str, int, float, float]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:
            continue  # gone meanwhile
        fields = stat[stat.rindex(")") + 2 :].split()
        name = stat[stat.index("(") + 1 : stat.rindex(")")]
        stats[int(entry)] = (
            name,
            int(fields[1]),
            int(fields[11]) / CLOCK_TICKS,
            int(fields[12]) / CLOCK_TICKS,
        )
    serving = set(servers)
    for pid, (_, parent, _, _) in stats.items():
        if parent in serving:
            serving.add(pid)
    snapshot: dict[int, tuple[str, float, float]] = {}
    for pid, (name, _, user, system) in stats.items():
        if pid in serving:
            snapshot[pid] = ("server", user + system, system)
        elif pid in backends:
            snapshot[pid] = ("postgres", user + system, system)
        elif name.startswith("redis-server"):
            snapshot[pid] = ("redis", user + system, system)
        elif pid == os.getpid():
            snapshot[pid] = ("client", user + system, system)
    return snapshot


def cpu_by_party(
    before: dict[int, tuple[str, float, float]], after: dict[int, tuple[str, float, float]]
) -> dict[str, float]:
    """CPU seconds each party used between two snapshots; a process that started in
    between counts from zero (one that ended in between is lost, and counts nothing)."""
    totals = {"server": 0.0, "(server in kernel)": 0.0, "postgres": 0.0, "redis": 0.0, "client": 0.0}
    for pid, (party, seconds, system) in after.items():
        _, seconds_before, system_before = before.get(pid, (party, 0.0, 0.0))
        totals[party] += seconds - seconds_before
        if party == "server":
            totals["(server in kernel)"] += system - system_before
    return totals


@dataclass
class Run:
    seconds: float
    statuses: Counter[int | str]
    cpu: dict[str, float] = field(default_factory=dict)

    def rate(self, n: int) -> float:
        return n / self.seconds


class RawConnection:
    """A minimal HTTP/1.1 client connection: sends a prepared request in one write and
    reads the status, Content-Length (or chunked) body, and whether the server closes.
    Reconnects when the server closed (gunicorn's sync workers close after every
    response). http.client costs several times more CPU per request, and this client
    shares the cores with the server it measures."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.sock: socket.socket | None = None
        self.buffer = b""

    def connect(self) -> socket.socket:
        sock = socket.create_connection(("127.0.0.1", self.port), timeout=60)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock, self.buffer = sock, b""
        return sock

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
        self.sock, self.buffer = None, b""

    def _fill(self, sock: socket.socket) -> None:
        data = sock.recv(65536)
        if not data:
            raise ConnectionError("the server closed the connection")
        self.buffer += data

    def exchange(self, request: bytes) -> int:
        sock = self.sock or self.connect()
        sock.sendall(request)
        while b"\r\n\r\n" not in self.buffer:
            self._fill(sock)
        head, _, self.buffer = self.buffer.partition(b"\r\n\r\n")
        lines = head.split(b"\r\n")
        status = int(lines[0].split(b" ", 2)[1])
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            headers[name.strip().lower()] = value.strip().lower()
        if b"content-length" in headers:
            length = int(headers[b"content-length"])
            while len(self.buffer) < length:
                self._fill(sock)
            self.buffer = self.buffer[length:]
        elif headers.get(b"transfer-encoding") == b"chunked":
            while True:
                while b"\r\n" not in self.buffer:
                    self._fill(sock)
                size_line, _, self.buffer = self.buffer.partition(b"\r\n")
                size = int(size_line.split(b";")[0], 16)
                while len(self.buffer) < size + 2:
                    self._fill(sock)
                self.buffer = self.buffer[size + 2 :]
                if size == 0:
                    break
        if headers.get(b"connection") == b"close":
            self.close()
        return status


def post_all(port: int, path: str, bodies: list[bytes], clients: int, auth: str, servers: list[int]) -> Run:
    """POST every body from `clients` threads, each on its own connection (kept alive
    where the server allows). Returns the wall time from the first request to the last
    answer, the statuses and the CPU time each party spent meanwhile."""
    statuses: Counter[int | str] = Counter()
    lock = threading.Lock()
    start, finished = threading.Barrier(clients + 1), threading.Barrier(clients + 1)
    may_close = threading.Event()
    head = (
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\n"
        f"Authorization: {auth}\r\nUser-Agent: Postmark\r\n"
    )
    # Built before the clock starts: the client's own CPU per request stays small.
    requests = [f"{head}Content-Length: {len(body)}\r\n\r\n".encode() + body for body in bodies]

    def client(share: list[bytes]) -> None:
        seen: Counter[int | str] = Counter()
        conn = RawConnection(port)
        conn.connect()
        start.wait()
        for request in share:
            try:
                seen[conn.exchange(request)] += 1
            except (OSError, ValueError, IndexError) as err:
                seen[type(err).__name__] += 1
                conn.close()
        with lock:
            statuses.update(seen)
        finished.wait()
        # Keep the connection (so a keep-alive server's thread and its database
        # connection) until the CPU they used has been read.
        may_close.wait()
        conn.close()

    threads = [threading.Thread(target=client, args=(requests[i::clients],)) for i in range(clients)]
    for thread in threads:
        thread.start()
    before = cpu_snapshot(servers)
    sampler = CpuSampler(servers)
    sampler.start()
    start.wait()
    began = time.perf_counter()
    finished.wait()
    elapsed = time.perf_counter() - began
    after = sampler.stop()
    may_close.set()
    for thread in threads:
        thread.join()
    return Run(elapsed, statuses, cpu_by_party(before, after))


class CpuSampler(threading.Thread):
    """Reads CPU times every half second while a run lasts, so that a database
    connection Django closes mid-run (CONN_MAX_AGE) still counts what it used."""

    def __init__(self, servers: list[int]) -> None:
        super().__init__(daemon=True)
        self.servers = servers
        self.latest: dict[int, tuple[str, float, float]] = {}
        self.stopping = threading.Event()

    def run(self) -> None:
        from django.db import connection

        try:
            while True:
                self.latest.update(cpu_snapshot(self.servers))
                if self.stopping.wait(0.5):
                    break
            self.latest.update(cpu_snapshot(self.servers))
        finally:
            connection.close()  # this thread's own; the database is dropped at the end

    def stop(self) -> dict[int, tuple[str, float, float]]:
        self.stopping.set()
        self.join()
        return self.latest


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _wait_for_port(port: int, servers: list[subprocess.Popen[str]]) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if any(server.poll() is not None for server in servers):
            break
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.1)
    for server in servers:
        server.kill()
    raise SystemExit("the server did not start")


def start_servers(
    kind: str, count: int, threads: int, env: dict[str, str]
) -> tuple[list[subprocess.Popen[str]], int]:
    """Start the server: granian with `count` workers of `threads` threads, gunicorn with
    `count` sync workers, or `count` runserver-style processes sharing one port."""
    servers: list[subprocess.Popen[str]] = []
    if kind in ("granian", "gunicorn") and importlib.util.find_spec(kind) is None:
        raise SystemExit(f"--server {kind} needs {kind} installed (.venv/bin/pip install {kind})")
    if kind in ("granian", "gunicorn"):
        port = _free_port()
        if kind == "granian":
            command = [
                *(sys.executable, "-m", "granian", "--interface", "wsgi", "--workers", str(count)),
                *("--blocking-threads", str(threads), "--port", str(port), "--factory"),
                *("--log-level", "warning", "--no-ws", "bench.webhooks:wsgi_app"),
            ]
        else:
            command = [
                *(sys.executable, "-m", "gunicorn", "--workers", str(count), "--worker-class", "sync"),
                *("--bind", f"127.0.0.1:{port}", "--log-level", "warning", "--backlog", "2048"),
                "bench.webhooks:wsgi_app()",
            ]
        servers.append(subprocess.Popen(command, env=env, text=True, cwd=ROOT))
        _wait_for_port(port, servers)
        return servers, port
    port = 0
    for _ in range(count):
        server = subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve()), "--serve", str(port)],
            env=env,
            stdout=subprocess.PIPE,
            text=True,
            cwd=ROOT,
        )
        servers.append(server)
        assert server.stdout is not None
        line = server.stdout.readline()
        if not line.startswith("READY "):
            for started in servers:
                started.kill()
            raise SystemExit(f"the server did not start: {line!r}")
        port = int(line.split()[1])
    return servers, port


def server_description(kind: str, count: int, threads: int) -> str:
    if kind == "granian":
        version = importlib.metadata.version("granian")
        return (
            f"granian {version} (WSGI), {count} worker process(es) of {threads} threads, HTTP/1.1 keep-alive"
        )
    if kind == "gunicorn":
        version = importlib.metadata.version("gunicorn")
        return f"gunicorn {version}, {count} sync worker process(es), a new connection per request"
    return f"Django's threaded WSGI server (runserver's), {count} process(es), HTTP/1.1 keep-alive"


def statements_per_webhook(bodies: list[bytes], auth: str) -> float:
    """SQL statements Django runs for one webhook, counted in this process through the
    same code path (Django's test client, the same URLconf). The connection health check
    (CONN_HEALTH_CHECKS) sends nothing: mailauto.lib.postgresql polls the socket."""
    from django.db import connection
    from django.test import Client
    from django.test.utils import CaptureQueriesContext, override_settings

    client = Client(HTTP_AUTHORIZATION=auth, HTTP_USER_AGENT="Postmark")
    with override_settings(ROOT_URLCONF=__name__), CaptureQueriesContext(connection) as queries:
        for body in bodies:
            response = client.post(WEBHOOK_PATH, data=body, content_type="application/json")
            assert response.status_code == 200, response.content
    return len(queries.captured_queries) / len(bodies)


def in_process(warmup: list[bytes], bodies: list[bytes], auth: str, *, profile: bool) -> None:
    """The same requests through the WSGI application called in this process, one at a
    time: no server, no client, no other thread. CPU per request (this process's user
    and system time) is far steadier here than through HTTP, which is what an A/B of a
    change to the request path needs; --profile adds cProfile's top functions."""
    import cProfile
    import io
    import pstats
    import resource

    from django.conf import settings
    from django.core.wsgi import get_wsgi_application

    settings.ROOT_URLCONF = __name__
    app = get_wsgi_application()

    def call(path: str, body: bytes) -> None:
        environ = {
            "REQUEST_METHOD": "POST",
            "PATH_INFO": path,
            "SCRIPT_NAME": "",
            "SERVER_NAME": "127.0.0.1",
            "SERVER_PORT": "8000",
            "SERVER_PROTOCOL": "HTTP/1.1",
            "REMOTE_ADDR": "127.0.0.1",
            "CONTENT_TYPE": "application/json",
            "CONTENT_LENGTH": str(len(body)),
            "HTTP_AUTHORIZATION": auth,
            "HTTP_USER_AGENT": "Postmark",
            "wsgi.input": io.BytesIO(body),
            "wsgi.url_scheme": "http",
        }
        statuses: list[str] = []
        response = app(environ, lambda status, headers: statuses.append(status))
        b"".join(response)
        response.close()
        if not statuses[0].startswith("200"):
            raise SystemExit(f"{path} answered {statuses[0]}")

    for path in (WEBHOOK_PATH, NOOP_PATH):
        for body in warmup:
            call(path, body)
    for label, path in (
        ("a Django view that does nothing", NOOP_PATH),
        (f"webhooks, {WEBHOOK_PATH}", WEBHOOK_PATH),
    ):
        profiler = cProfile.Profile() if profile and path == WEBHOOK_PATH else None
        before, started = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
        if profiler:
            profiler.enable()
        for body in bodies:
            call(path, body)
        if profiler:
            profiler.disable()
        after, wall = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter() - started
        n = len(bodies)
        print(
            f"in process, {label}: CPU ms per request user {1000 * (after.ru_utime - before.ru_utime) / n:.3f}, "
            f"system {1000 * (after.ru_stime - before.ru_stime) / n:.3f}; wall {1000 * wall / n:.3f} ms"
        )
        if profiler:
            pstats.Stats(profiler).sort_stats("tottime").print_stats(30)


def describe(label: str, run: Run, n: int) -> str:
    cpu = ", ".join(f"{party} {1000 * seconds / n:.2f}" for party, seconds in run.cpu.items())
    return (
        f"{label}: {run.rate(n):8,.0f} POSTs/s  {dict(run.statuses)}\n"
        f"    CPU ms per request: {cpu}  (wall {1000 * run.seconds / n:.3f} ms per request overall)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--webhooks", type=int, default=20_000, help="distinct webhooks to POST (default 20000)"
    )
    parser.add_argument(
        "--clients", type=int, default=16, help="client threads, one connection each (default 16)"
    )
    parser.add_argument(
        "--server",
        choices=["granian", "gunicorn", "runserver"],
        default="granian",
        help="the WSGI server (default granian, as in production; see the module docstring)",
    )
    parser.add_argument(
        "--processes",
        type=int,
        default=2,
        help="server processes: granian or gunicorn workers, or runserver processes (default 2)",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=8,
        help="granian's threads per worker (default 8): they overlap the wait for each commit's fsync",
    )
    parser.add_argument(
        "--in-process",
        action="store_true",
        help="call the WSGI app in this process instead of over HTTP: steadier CPU per request, for A/B runs",
    )
    parser.add_argument("--profile", action="store_true", help="with --in-process: cProfile the webhooks")
    args = parser.parse_args()

    database_url = os.environ.get("DATABASE_URL", "")
    if not database_url.startswith(("postgres://", "postgresql://")):
        raise SystemExit(
            "set DATABASE_URL to a Postgres server, e.g. postgres://postgres@127.0.0.1:5432/mailauto"
        )
    os.environ["DJANGO_SETTINGS_MODULE"] = "mailauto.settings"
    os.environ.setdefault("LOG_LEVEL", "WARNING")
    from bench._setup import python_speed_ms, round_trip_us

    speed_ms, round_trip = python_speed_ms(), round_trip_us()

    import django

    django.setup()
    from django.conf import settings
    from django.db import connection

    from campaigns.models import Message
    from webhooks.models import TrackingEvent

    db = connection.settings_dict
    original_name = db["NAME"]
    db["TEST"] = {**db.get("TEST", {}), "NAME": f"{original_name}_bench_webhooks", "MIGRATE": False}
    connection.creation.create_test_db(verbosity=0, autoclobber=True, serialize=False)
    servers: list[subprocess.Popen[str]] = []
    try:
        bodies = seed(args.webhooks + WARMUP + STATEMENT_COUNT)
        auth = "Basic " + base64.b64encode(str(settings.ANYMAIL["WEBHOOK_SECRET"]).encode()).decode()
        statements = statements_per_webhook(bodies[-STATEMENT_COUNT:], auth)
        bodies = bodies[:-STATEMENT_COUNT]
        connection.close()
        warmup, bodies = bodies[:WARMUP], bodies[WARMUP:]
        if args.in_process:
            print(
                f"setup: {len(bodies):,} webhooks; Python speed {speed_ms:.0f} ms, process round trip {round_trip:.0f} µs"
            )
            in_process(warmup, bodies, auth, profile=args.profile)
            return
        password = f":{db['PASSWORD']}" if db["PASSWORD"] else ""
        env = {
            **os.environ,
            "DATABASE_URL": f"postgres://{db['USER']}{password}@{db['HOST'] or '127.0.0.1'}:{db['PORT'] or 5432}/{db['NAME']}",
            "PYTHONUNBUFFERED": "1",
        }
        servers, port = start_servers(args.server, args.processes, args.threads, env)
        pids = [server.pid for server in servers]

        # Warm up: server threads, database connections, imports, caches.
        post_all(port, NOOP_PATH, warmup, args.clients, auth, pids)
        post_all(port, WEBHOOK_PATH, warmup, args.clients, auth, pids)

        n = len(bodies)
        baseline = post_all(port, NOOP_PATH, bodies, args.clients, auth, pids)
        webhooks = post_all(port, WEBHOOK_PATH, bodies, args.clients, auth, pids)

        stored = TrackingEvent.objects.count() - WARMUP - STATEMENT_COUNT
        delivered = Message.objects.filter(status=Message.Status.DELIVERED).count() - WARMUP - STATEMENT_COUNT
        command = " ".join(
            [
                *(
                    f"{k}={shlex.quote(os.environ[k])}"
                    for k in ("DATABASE_URL", "REDIS_URL")
                    if k in os.environ
                ),
                shlex.quote(os.path.relpath(sys.executable, ROOT)),
                "bench/webhooks.py",
                *sys.argv[1:],
            ]
        )
        load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
        print(f"command: {command}")
        print(
            f"setup: {n:,} distinct Postmark Delivery webhooks for existing messages; {args.clients} client "
            f"threads (raw HTTP/1.1); {server_description(args.server, args.processes, args.threads)}; Postgres, "
            f"{'Redis' if os.environ.get('REDIS_URL') else 'a file cache'} for the rate limit; "
            f"{os.cpu_count()} cores, load average {load}; Python speed {speed_ms:.0f} ms, process round "
            f"trip {round_trip:.0f} µs before the run (bench/_setup.py: lower is faster)"
        )
        print(describe("baseline, a Django view that does nothing", baseline, n))
        print(describe(f"webhooks, {WEBHOOK_PATH}", webhooks, n))
        print(f"ratio webhooks / baseline: {webhooks.rate(n) / baseline.rate(n):.2f}")
        print(
            f"SQL statements per webhook: {statements:.2f} (Django's count, in-process, "
            f"{STATEMENT_COUNT} webhooks; the health check sends none)"
        )
        print(
            f"check: {stored:,} tracking events stored, {delivered:,} messages advanced to delivered (of {n:,})"
        )
    finally:
        for server in servers:
            server.terminate()
        for server in servers:
            server.wait(timeout=10)
        connection.creation.destroy_test_db(original_name, verbosity=0)


if __name__ == "__main__":
    if "--serve" in sys.argv:
        serve(int(sys.argv[sys.argv.index("--serve") + 1]))
    else:
        main()
