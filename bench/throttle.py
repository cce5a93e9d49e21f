"""Benchmark: what one acquire() through the shared rate limit costs.

N processes call acquire() in a loop against a bucket whose rate is so high that nobody
ever waits, so what is measured is the call itself (one EVALSHA round trip plus the
client's checks). The baseline, in the same run, from the same number of processes on
the same Redis, is a bare PING loop: the ratio is the script's overhead over the
cheapest possible round trip. Also shown: the file backend (embedded mode, no Redis),
and a limited bucket under contention (achieved rate and script calls per grant).

    REDIS_URL=redis://127.0.0.1:6379/8 .venv/bin/python bench/throttle.py [--processes 4] [--seconds 3]

Prints figures; it never passes or fails.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent


def _setup() -> None:
    sys.path.insert(0, str(ROOT))
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "mailauto.settings")
    import django

    django.setup()


def _options(rate: float) -> dict[str, Any]:
    from django.conf import settings

    return {**settings.MAILAUTO, "RATE_LIMIT_PER_SECOND": rate, "RATE_LIMIT_BURST": min(rate, 10.0)}


def _worker(
    kind: str, target: str, namespace: str, rate: float, seconds: float, ready: Any, start: Any, out: Any
) -> None:
    _setup()
    import redis

    from campaigns.throttle import Decision, FileBackend, RedisBackend, Throttle, ThrottleTimeout

    calls = 0

    def seen(decision: Decision, tokens: Any) -> None:
        nonlocal calls
        calls += 1

    step: Any
    if kind == "ping":
        client = redis.Redis.from_url(target)
        step = client.ping
    else:
        backend = RedisBackend(url=target) if kind == "redis" else FileBackend(path=Path(target))
        t = Throttle(backend=backend, options=_options(rate), namespace=namespace, on_decision=seen)

        def step() -> None:
            t.acquire(timeout=5)

    step()  # connect, load the script
    calls = 0
    ready.put(os.getpid())
    start.wait(120)
    done = 0
    began = time.monotonic()
    end = began + seconds
    while time.monotonic() < end:
        try:
            step()
        except ThrottleTimeout:
            break
        done += 1
    out.put((done, calls, time.monotonic() - began))


def run(kind: str, target: str, *, processes: int, seconds: float, rate: float = 1e9) -> tuple[float, float]:
    """Operations per second over all processes, and store calls per operation."""
    ctx = multiprocessing.get_context("spawn")
    ready, start, out = ctx.Queue(), ctx.Event(), ctx.Queue()
    namespace = f"bench-{uuid.uuid4().hex[:12]}"
    args = (kind, target, namespace, rate, seconds, ready, start, out)
    procs = [ctx.Process(target=_worker, args=args, daemon=True) for _ in range(processes)]
    for p in procs:
        p.start()
    for _ in procs:
        ready.get(timeout=120)
    start.set()
    results = [out.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(timeout=10)
    done = sum(r[0] for r in results)
    calls = sum(r[1] for r in results)
    elapsed = max(r[2] for r in results)
    if kind == "redis":
        import redis

        client = redis.Redis.from_url(target)
        keys = list(client.scan_iter(match=f"mailauto:throttle:{{{namespace}}}:*"))
        if keys:
            client.delete(*keys)
    return done / elapsed, (calls / done if done else 0.0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--processes", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--limited-rate", type=float, default=200.0)
    args = parser.parse_args()
    _setup()
    from django.conf import settings

    url = settings.REDIS_URL
    if not url:
        sys.exit("bench/throttle.py needs REDIS_URL (the file backend is measured beside it)")
    n, secs = args.processes, args.seconds
    print(f"throttle bench: {n} processes x {secs:g} s, Redis {url}, {os.cpu_count()} CPUs")
    ping, _ = run("ping", url, processes=n, seconds=secs)
    print(f"  PING baseline                          {ping:>10,.0f} ops/s")
    acquire, per = run("redis", url, processes=n, seconds=secs)
    print(
        f"  acquire(), unlimited rate, Redis       {acquire:>10,.0f} ops/s"
        f"   {acquire / ping:.2f}x PING, {per:.2f} script calls per grant"
    )
    with tempfile.TemporaryDirectory() as tmp:
        state = str(Path(tmp) / "buckets.json")
        on_file, per = run("file", state, processes=n, seconds=secs)
    print(f"  acquire(), unlimited rate, state file  {on_file:>10,.0f} ops/s   {on_file / ping:.2f}x PING")
    limited, per = run("redis", url, processes=n, seconds=secs, rate=args.limited_rate)
    print(
        f"  acquire(), {args.limited_rate:g}/s limit, Redis       {limited:>10,.1f} grants/s"
        f"   configured {args.limited_rate:g}/s (+ burst 10), {per:.2f} script calls per grant"
    )


if __name__ == "__main__":
    main()
